//! Named scenarios: which guest kernels boot as which VMs, with which parameters, and where
//! their vCPUs live.
//!
//! `scenario=NAME` on the kernel command line (or `cargo xtask run --scenario NAME`) picks one.
//! VM numbers start at [`FIRST_VM`]; VM *i* of a scenario gets number `FIRST_VM + i` and its
//! vCPU is homed on CPU `i % cpus`, so a scenario with more VMs than CPUs runs more vCPUs than
//! CPUs (the scheduler domain time-slices them).

/// The number of a scenario's first VM (0 is reserved; 1 is the control VM's). VMs the
/// control VM creates are numbered from here too, never reusing a number within a run.
pub const FIRST_VM: u16 = 2;

/// The control VM's number.
pub const CONTROL_VM: u16 = 1;

/// The guest kernels every boot bundle carries (`guests/src/bin/`), by name.
pub const GUEST_KERNELS: &[&str] = &[
    "unixbench",
    "control",
    "blkbench",
    "netbench",
    "hostile",
    "smpbench",
    "fuzz",
];

/// One VM of a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSpec {
    /// The guest kernel (`guest-NAME.elf` in the boot bundle).
    pub guest: &'static str,
    /// Its start parameters (see the guest's documentation; 0 = its default).
    pub params: [u64; 8],
    /// The privileged control VM (number [`CONTROL_VM`]; may create and destroy VMs).
    pub privileged: bool,
    /// Guest kernels copied into its RAM as boot modules (the images it creates VMs from).
    pub modules: &'static [&'static str],
    /// The core must stop this VM (it attacks the system); every other VM must pass.
    pub expect_stopped: bool,
    /// Its vCPUs (spread over the CPUs from its home CPU).
    pub vcpus: u8,
}

impl VmSpec {
    /// An unprivileged VM running `guest` with `params`.
    pub const fn app(guest: &'static str, params: [u64; 8]) -> VmSpec {
        VmSpec {
            guest,
            params,
            privileged: false,
            modules: &[],
            expect_stopped: false,
            vcpus: 1,
        }
    }

    /// An unprivileged VM running `guest` with `params` on `vcpus` vCPUs.
    pub const fn smp(guest: &'static str, params: [u64; 8], vcpus: u8) -> VmSpec {
        VmSpec {
            vcpus,
            ..VmSpec::app(guest, params)
        }
    }

    /// An unprivileged VM running `guest` with `params` that the core must stop.
    pub const fn stopped(guest: &'static str, params: [u64; 8]) -> VmSpec {
        VmSpec {
            expect_stopped: true,
            ..VmSpec::app(guest, params)
        }
    }

    /// The verdict this VM must end with.
    pub const fn expected_verdict(&self) -> &'static str {
        if self.expect_stopped {
            "stopped"
        } else {
            "passed"
        }
    }

    /// The control VM holding `modules`: it starts the first `at_boot` of them as AppVMs,
    /// the rest `later_ms` of guest time after its start (see `guests::control`).
    pub const fn control(modules: &'static [&'static str], at_boot: u64, later_ms: u64) -> VmSpec {
        VmSpec {
            guest: "control",
            params: [at_boot, later_ms, 0, 0, 0, 0, 0, 0],
            privileged: true,
            modules,
            expect_stopped: false,
            vcpus: 1,
        }
    }
}

/// The guest-kernel name a VM_CREATE name word stands for (`"image"` if none).
pub fn guest_name(word: u64) -> &'static str {
    GUEST_KERNELS
        .iter()
        .find(|name| microvisor_abi::guest::name_word(name) == word)
        .copied()
        .unwrap_or("image")
}

/// A named scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scenario {
    /// Its name on the command line.
    pub name: &'static str,
    /// What a user reads about it.
    pub about: &'static str,
    /// Its VMs, in creation order.
    pub vms: &'static [VmSpec],
    /// With an injected fail-stop: the requests the target service serves after the VMs were
    /// created before the fault strikes (late enough that every VM is running).
    pub inject_after: u32,
}

/// The usual [`Scenario::inject_after`]: the guests start at once.
const INJECT_AFTER: u32 = 20;

const UNIXBENCH: VmSpec = VmSpec::app("unixbench", [0; 8]);

/// When the control VM of `3appvm` creates its third AppVM (ms of guest time after it starts).
pub const THIRD_APPVM_MS: u64 = 400;

/// Every scenario the core knows.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "3appvm",
        about: "control VM + AppVM(netbench) + AppVM(unixbench); the control VM creates a \
                third AppVM (blkbench) later, which must complete",
        // netbench first: it gets CPU 1 to itself on two CPUs (the control VM keeps CPU 0).
        vms: &[VmSpec::control(
            &["netbench", "unixbench", "blkbench"],
            2,
            THIRD_APPVM_MS,
        )],
        // The control VM's setup takes the first requests: strike while netbench pings.
        inject_after: 300,
    },
    Scenario {
        name: "1appvm-unixbench",
        about: "control VM + one AppVM running the UnixBench-like workload",
        vms: &[VmSpec::control(&["unixbench"], 1, 0)],
        inject_after: INJECT_AFTER,
    },
    Scenario {
        name: "1appvm-blkbench",
        about: "control VM + one AppVM running the BlkBench-like workload on the control VM's \
                shared-ring block device",
        vms: &[VmSpec::control(&["blkbench"], 1, 0)],
        inject_after: INJECT_AFTER,
    },
    Scenario {
        name: "1appvm-smpbench",
        about: "control VM + one 2-vCPU AppVM running the SMP workload (VM_CREATE with a vCPU \
                count)",
        vms: &[VmSpec::control(&["smpbench"], 1, 0)],
        inject_after: INJECT_AFTER,
    },
    Scenario {
        name: "isolation",
        about: "three malicious VMs (bad pointers, foreign frames, double unmaps, privileged \
                calls, random hypercalls; one then writes outside its memory, one reads an MSR: \
                each must be stopped alone) and two that exhaust their quotas of frames, \
                grants, event ports and timers (each refused QuotaExceeded after exactly its \
                quota) beside two UnixBench-like VMs that must pass",
        vms: &[
            VmSpec::app("hostile", [0; 8]),
            VmSpec::stopped("hostile", [1, 0, 0, 0, 0, 0, 0, 0]),
            VmSpec::stopped("hostile", [2, 0, 0, 0, 0, 0, 0, 0]),
            UNIXBENCH,
            UNIXBENCH,
            VmSpec::app("hostile", [3, 0, 0, 0, 0, 0, 0, 0]),
            VmSpec::app("hostile", [3, 0, 0, 0, 0, 0, 0, 0]),
        ],
        inject_after: INJECT_AFTER,
    },
    Scenario {
        name: "1vm-unixbench",
        about: "one AppVM running the UnixBench-like workload",
        vms: &[UNIXBENCH],
        inject_after: INJECT_AFTER,
    },
    Scenario {
        name: "5vm-unixbench",
        about: "five UnixBench-like AppVMs time-sliced over the CPUs",
        vms: &[UNIXBENCH; 5],
        inject_after: INJECT_AFTER,
    },
    Scenario {
        name: "smp",
        about: "multi-vCPU VMs: SMP workloads on 4 and 2 vCPUs (shared counter, shared \
                demand-zero page, populate/release with EPT shootdowns) beside a one-vCPU \
                UnixBench-like VM: more vCPUs than CPUs; a fourth, 2-vCPU VM's second vCPU \
                writes outside its memory and the whole VM must be stopped alone",
        vms: &[
            VmSpec::smp("smpbench", [0; 8], 4),
            VmSpec::smp("smpbench", [0; 8], 2),
            UNIXBENCH,
            VmSpec {
                expect_stopped: true,
                ..VmSpec::smp("smpbench", [0, 1, 0, 0, 0, 0, 0, 0], 2)
            },
        ],
        inject_after: INJECT_AFTER,
    },
    Scenario {
        name: "fuzz",
        about: "fuzzing guests (seeded values in CR2, CR8, DR0-DR7, XMM, MXCSR, GS and \
                KERNEL_GS_BASE read back after random hypercalls, exits and yields) on 1 and 2 \
                vCPUs beside two UnixBench-like VMs; two of them end with a seeded forbidden \
                instruction and must be stopped alone",
        vms: &[
            VmSpec::smp("fuzz", [0x5eed_0001, 0, 0, 0, 0, 0, 0, 0], 2),
            UNIXBENCH,
            VmSpec::app("fuzz", [0x5eed_0002, 0, 0, 0, 0, 0, 0, 0]),
            VmSpec::stopped("fuzz", [0x5eed_0003, 4, 1, 0, 0, 0, 0, 0]),
            UNIXBENCH,
            VmSpec {
                expect_stopped: true,
                ..VmSpec::smp("fuzz", [0x5eed_0004, 4, 1, 0, 0, 0, 0, 0], 2)
            },
        ],
        inject_after: INJECT_AFTER,
    },
    Scenario {
        name: "forbidden-cpu",
        about: "seven fuzzing guests, each ending with another instruction the virtual CPU does \
                not offer (XSETBV, RDPMC, CR4.OSXSAVE, CR4.PCE, CR4.FSGSBASE, RDTSCP, MONITOR): \
                each must be stopped alone, beside a UnixBench-like VM that must pass",
        vms: &[
            VmSpec::stopped("fuzz", [0, 2, 2, 0, 0, 0, 0, 0]),
            VmSpec::stopped("fuzz", [0, 2, 3, 0, 0, 0, 0, 0]),
            VmSpec::stopped("fuzz", [0, 2, 4, 0, 0, 0, 0, 0]),
            UNIXBENCH,
            VmSpec::stopped("fuzz", [0, 2, 5, 0, 0, 0, 0, 0]),
            VmSpec::stopped("fuzz", [0, 2, 6, 0, 0, 0, 0, 0]),
            VmSpec::stopped("fuzz", [0, 2, 7, 0, 0, 0, 0, 0]),
            VmSpec::stopped("fuzz", [0, 2, 8, 0, 0, 0, 0, 0]),
        ],
        inject_after: INJECT_AFTER,
    },
    Scenario {
        name: "forbidden-memory",
        about: "fuzzing guests ending with MWAIT, VMXOFF, a read of KERNEL_GS_BASE, and reads \
                of the local APIC, the I/O APIC and unbacked guest-physical memory (each must \
                be stopped alone), beside a UnixBench-like VM that must pass",
        vms: &[
            VmSpec::stopped("fuzz", [0, 2, 9, 0, 0, 0, 0, 0]),
            VmSpec::stopped("fuzz", [0, 2, 10, 0, 0, 0, 0, 0]),
            VmSpec::stopped("fuzz", [0, 2, 17, 0, 0, 0, 0, 0]),
            UNIXBENCH,
            VmSpec::stopped("fuzz", [0, 2, 35, 0, 0, 0, 0, 0]),
            VmSpec::stopped("fuzz", [0, 2, 36, 0, 0, 0, 0, 0]),
            VmSpec::stopped("fuzz", [0, 2, 37, 0, 0, 0, 0, 0]),
            VmSpec::stopped("fuzz", [0, 2, 38, 0, 0, 0, 0, 0]),
        ],
        inject_after: INJECT_AFTER,
    },
];

/// The scenario called `name`.
pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|scenario| scenario.name == name)
}

/// The home CPU of a scenario's VM `index` on a machine with `cpus` CPUs.
pub fn home_cpu(index: usize, cpus: usize) -> u8 {
    (index % cpus.max(1)) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        for (index, scenario) in SCENARIOS.iter().enumerate() {
            assert_eq!(find(scenario.name), Some(scenario));
            assert!(
                SCENARIOS[index + 1..]
                    .iter()
                    .all(|other| other.name != scenario.name)
            );
            assert!(!scenario.vms.is_empty());
            for vm in scenario.vms {
                assert!(GUEST_KERNELS.contains(&vm.guest));
                assert!(
                    vm.modules
                        .iter()
                        .all(|module| GUEST_KERNELS.contains(module))
                );
                assert!(vm.modules.len() <= microvisor_abi::guest::MAX_MODULES);
                assert!(vm.privileged || vm.modules.is_empty());
                assert!((1..=microvisor_abi::guest::MAX_VCPUS).contains(&u16::from(vm.vcpus)));
            }
            assert!(scenario.vms.iter().filter(|vm| vm.privileged).count() <= 1);
        }
        assert_eq!(find("nope"), None);
    }

    #[test]
    fn name_words_map_back_to_guest_kernels() {
        for name in GUEST_KERNELS {
            assert_eq!(guest_name(microvisor_abi::guest::name_word(name)), *name);
        }
        assert_eq!(guest_name(0), "image");
    }

    #[test]
    fn vms_spread_round_robin_over_cpus() {
        assert_eq!(home_cpu(0, 2), 0);
        assert_eq!(home_cpu(3, 2), 1);
        assert_eq!(home_cpu(4, 4), 0);
        assert_eq!(home_cpu(2, 0), 0);
    }

    #[test]
    fn every_scenarios_quotas_fit_together() {
        use ipc::quota::{
            EVENT_PORT_CAPACITY, FRAME_CAPACITY, GRANT_CAPACITY, Quota, SIZED_FOR_VMS,
            TIMER_CAPACITY,
        };
        // The core reserves the defaults for the scenario's VMs, and the control VM's
        // VM_CREATEs (arg5 = 0) the AppVM default for each of its modules: even with every one
        // of them alive at once, no reservation may be refused.
        for scenario in SCENARIOS {
            let quotas = scenario.vms.iter().flat_map(|vm| {
                let own = if vm.privileged {
                    Quota::CONTROL_VM
                } else {
                    Quota::APP_VM
                };
                core::iter::once(own).chain(vm.modules.iter().map(|_| Quota::APP_VM))
            });
            let (mut vms, mut frames, mut grants, mut ports, mut timers) = (0, 0, 0, 0, 0);
            for quota in quotas {
                vms += 1;
                frames += quota.frames;
                grants += u32::from(quota.grants);
                ports += u32::from(quota.event_ports);
                timers += u32::from(quota.timers);
            }
            let name = scenario.name;
            assert!(vms <= SIZED_FOR_VMS, "{name}: {vms} VMs");
            assert!(frames <= FRAME_CAPACITY, "{name}: {frames} frames");
            assert!(grants <= GRANT_CAPACITY, "{name}: {grants} grants");
            assert!(ports <= EVENT_PORT_CAPACITY, "{name}: {ports} event ports");
            assert!(timers <= TIMER_CAPACITY, "{name}: {timers} timers");
        }
    }
}
