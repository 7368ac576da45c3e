//! The boot tests: which emulator, how many CPUs, which command line, what must come out.

use std::time::Duration;

/// The emulator a case boots in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Emulator {
    /// QEMU (TCG, or KVM where the host has usable nested VMX).
    Qemu,
    /// bochs 2.7 (emulated VMX); always boots the GRUB ISO.
    Bochs,
}

/// How the image is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Boot {
    /// QEMU `-kernel` with the ELF (PVH entry).
    Direct,
    /// A GRUB ISO (multiboot2 entry).
    Iso,
}

/// The summary's `"outcome"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `"ok"`.
    Ok,
    /// `"failed"`.
    Failed,
}

impl Outcome {
    /// The JSON string the kernel prints for this outcome.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
        }
    }
}

/// The exception a failure case expects in `"failure"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpectedFailure {
    /// Exception vector (6 = #UD, 13 = #GP, 14 = #PF).
    pub vector: u64,
    /// CPU index the exception must be reported on.
    pub cpu: u64,
}

/// What a case must print.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expect {
    /// Expected `"outcome"`.
    pub outcome: Outcome,
    /// Expected `"boot_protocol"` (`"pvh"` or `"multiboot2"`).
    pub boot_protocol: &'static str,
    /// `"cpus_expected"` and `"cpus_online"` must both equal this.
    pub cpus: u64,
    /// Every entry of `"timer_ticks"` must be positive (one per CPU).
    pub timer_ticks: bool,
    /// `None`: `"failure"` must be `null`. `Some`: an exception report, on the serial console
    /// (a line starting `EXCEPTION`) and in `"failure"`.
    pub failure: Option<ExpectedFailure>,
    /// Stages that must appear in `"ran"`.
    pub stages: &'static [&'static str],
    /// `Some(n)`: `"domains"` lists the probe domain with `n` failures, each recovered (its
    /// generation is `n + 1`).
    pub probe_failures: Option<u64>,
    /// `Some(mode)`: `"last_recovery.mode"` must be this (`microreset` or `microreboot`).
    pub recovery_mode: Option<&'static str>,
    /// `Some(name)`: `"last_recovery.domain"` must be this domain.
    pub recovered_domain: Option<&'static str>,
    /// `"workload.verdict"` must be `"ok"`.
    pub workload_ok: bool,
    /// `Some(who)`: `"last_recovery.decided_by"` must be this (`recovery-manager` or `core`).
    pub decided_by: Option<&'static str>,
    /// `"vmx.cpus_in_root"` must equal the CPU count and the first VMX guest must have run
    /// (stage `vmx-guest`): bochs emulates VMX; QEMU's TCG has none, so QEMU cases do not check.
    pub vmx_root: bool,
    /// `Some(n)`: `"vms"` lists `n` VMs of a scenario, every one with verdict `"passed"`.
    pub vms_passed: Option<usize>,
    /// Of those VMs, how many must instead end `"stopped"` (by the core, for attacking).
    pub vms_stopped: usize,
    /// If not empty: the stopped VMs' `"stop_reason"`s, in VM order, must each contain the
    /// matching entry (so a VM stopped for another reason than its attack fails the case).
    pub stop_reasons: &'static [&'static str],
    /// `Some(stage)` (with `failure` `None`): `"failure"` must be a failed check of this stage
    /// (`{"kind":"check","stage":...}`): a case that shows a check fails when it should.
    pub failed_check: Option<&'static str>,
}

/// Every stage a healthy boot with two CPUs or more runs: in the order they run, but for
/// `domain-quiesce` (the check that a recovery takes another CPU out of the failed domain),
/// which runs between `domain-calls-every-cpu` and `workload` and is last here so that
/// [`ALL_STAGES`] can leave it out. (The check asks only that each appears.)
pub const ALL_STAGES_SMP: &[&str] = &[
    "boot-info",
    "frame-allocator",
    "paging",
    "gdt-tss-idt",
    "acpi-madt",
    "apic-timer",
    "smp",
    "timer-all-cpus",
    "domains",
    "domain-isolation",
    "domain-calls-every-cpu",
    "workload",
    "domain-quiesce",
];

/// Every stage a healthy boot with one CPU runs (no quiesce check: no other CPU).
pub const ALL_STAGES: &[&str] = ALL_STAGES_SMP.split_at(ALL_STAGES_SMP.len() - 1).0;

/// Misbehaviours the probe domain is told to commit on every boot (see the core's
/// `domains.rs`): each must be caught and recovered.
pub const PROBE_MISBEHAVIOURS: u64 = 5;

/// The probe's failures on a healthy boot with `cpus` CPUs: its misbehaviours, and with two
/// CPUs or more the fail-stop of the quiesce check (`domain-quiesce`), one failure although
/// CPU 1 was inside the probe too.
pub fn probe_failures(cpus: u32) -> u64 {
    PROBE_MISBEHAVIOURS + u64::from(cpus >= 2)
}

/// One boot test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootCase {
    /// Unique, stable name (also used for the run directory).
    pub name: &'static str,
    /// Emulator to boot in.
    pub emulator: Emulator,
    /// How to load the image.
    pub boot: Boot,
    /// Number of CPUs the emulated machine has.
    pub cpus: u32,
    /// Kernel command line.
    pub cmdline: &'static str,
    /// Wall-clock limit for the whole boot.
    pub timeout: Duration,
    /// What the run must print.
    pub expect: Expect,
}

const QEMU_TIMEOUT: Duration = Duration::from_secs(60);
const BOCHS_TIMEOUT: Duration = Duration::from_secs(180);

fn healthy(name: &'static str, emulator: Emulator, boot: Boot, cpus: u32) -> BootCase {
    let boot_protocol = match boot {
        Boot::Direct => "pvh",
        Boot::Iso => "multiboot2",
    };
    BootCase {
        name,
        emulator,
        boot,
        cpus,
        cmdline: "",
        timeout: timeout_for(emulator),
        expect: Expect {
            outcome: Outcome::Ok,
            boot_protocol,
            cpus: u64::from(cpus),
            timer_ticks: true,
            failure: None,
            stages: if cpus >= 2 {
                ALL_STAGES_SMP
            } else {
                ALL_STAGES
            },
            probe_failures: Some(probe_failures(cpus)),
            recovery_mode: Some("microreset"),
            recovered_domain: Some("probe"),
            workload_ok: true,
            decided_by: Some("recovery-manager"),
            vmx_root: emulator == Emulator::Bochs,
            vms_passed: None,
            vms_stopped: 0,
            stop_reasons: &[],
            failed_check: None,
        },
    }
}

/// A scenario (`scenario=NAME`) of `vms` guest VMs under bochs: every VM must pass its own
/// checks.
fn scenario(name: &'static str, cpus: u32, cmdline: &'static str, vms: usize) -> BootCase {
    let mut case = healthy(name, Emulator::Bochs, Boot::Iso, cpus);
    case.cmdline = cmdline;
    case.expect.stages = SCENARIO_STAGES;
    case.expect.vms_passed = Some(vms);
    case
}

/// The isolation scenario: three malicious VMs, two of which the core must stop, and two
/// that exhaust their quotas and must pass, beside two honest VMs that must pass.
fn isolation(name: &'static str, cpus: u32) -> BootCase {
    let mut case = scenario(name, cpus, "scenario=isolation", 7);
    case.expect.vms_stopped = 2;
    case
}

/// The SMP scenario: multi-vCPU VMs that must pass, and one 2-vCPU VM the core must stop
/// whole when one of its vCPUs writes outside its memory.
fn smp(name: &'static str, cpus: u32) -> BootCase {
    let mut case = scenario(name, cpus, "scenario=smp", 4);
    case.expect.vms_stopped = 1;
    case
}

/// Why the core stops a VM that reads an MSR (the hypercall domain refuses it).
const MSR_REFUSED: &str = "refused a CPUID, port or MSR access";
/// Why the core stops a VM that changes a CR4 bit it owns.
const CR4_REFUSED: &str = "CR4 bit the virtual CPU does not offer";
/// Why the core stops a VM that touches guest-physical memory it has not got.
const NOT_ITS_MEMORY: &str = "guest-physical memory it has not got";

/// The fuzz scenario: fuzzing guests on 1 and 2 vCPUs that must read back only their own
/// register values, two that end with a seeded forbidden instruction (both draw an MSR access
/// from their seeds), and two honest VMs.
fn fuzz(name: &'static str, cpus: u32) -> BootCase {
    let mut case = scenario(name, cpus, "scenario=fuzz", 6);
    case.expect.vms_stopped = 2;
    case.expect.stop_reasons = &[MSR_REFUSED, MSR_REFUSED];
    case
}

/// A scenario of fuzzing guests that each end with one forbidden instruction or access
/// (`reasons`, in VM order: why each must be stopped) beside one honest VM.
fn forbidden(
    name: &'static str,
    cpus: u32,
    cmdline: &'static str,
    reasons: &'static [&'static str],
) -> BootCase {
    let mut case = scenario(name, cpus, cmdline, reasons.len() + 1);
    case.expect.vms_stopped = reasons.len();
    case.expect.stop_reasons = reasons;
    case
}

/// XSETBV (#UD: CR4.OSXSAVE is clear, and #UD comes before its exit), RDPMC, CR4.OSXSAVE,
/// CR4.PCE, CR4.FSGSBASE, RDTSCP (#UD: the enable-RDTSCP control is off), MONITOR.
const FORBIDDEN_CPU: &[&str] = &[
    "#UD",
    "RDPMC is not offered",
    CR4_REFUSED,
    CR4_REFUSED,
    CR4_REFUSED,
    "#UD",
    "MONITOR/MWAIT are not offered",
];

/// MWAIT, VMXOFF, RDMSR of KERNEL_GS_BASE, the local APIC, the I/O APIC, 1 GiB, 3 GiB.
const FORBIDDEN_MEMORY: &[&str] = &[
    "MONITOR/MWAIT are not offered",
    "VMX instructions are not offered",
    MSR_REFUSED,
    NOT_ITS_MEMORY,
    NOT_ITS_MEMORY,
    NOT_ITS_MEMORY,
    NOT_ITS_MEMORY,
];

/// Stages a scenario boot must run, beyond bring-up.
pub const SCENARIO_STAGES: &[&str] = &["workload", "vmx-guest", "scenario-vms-created", "scenario"];

/// Stages a scenario boot with an injected service fail-stop must run.
pub const SCENARIO_INJECT_STAGES: &[&str] = &[
    "workload",
    "vmx-guest",
    "scenario-vms-created",
    "scenario",
    "inject-failstop",
];

/// A scenario under which service `service` fail-stops while the guests run and is recovered
/// by microreset; every VM must still pass.
fn scenario_fault(
    name: &'static str,
    service: &'static str,
    cmdline: &'static str,
    vms: usize,
) -> BootCase {
    let mut case = scenario(name, 2, cmdline, vms);
    case.expect.stages = SCENARIO_INJECT_STAGES;
    case.expect.recovery_mode = Some("microreset");
    case.expect.recovered_domain = Some(service);
    case
}

/// A boot that injects a fail-stop into the recovery manager as it decides the probe's
/// first recovery: the core restarts the manager and still recovers the probe, and the
/// manager decides the probe's later recoveries again.
fn manager_fault(name: &'static str, cmdline: &'static str) -> BootCase {
    let mut case = healthy(name, Emulator::Bochs, Boot::Iso, 2);
    case.cmdline = cmdline;
    case.expect.stages = &["domains", "domain-isolation", "inject-failstop", "workload"];
    case
}

/// Stages a boot with `inject=failstop:SERVICE` must run, beyond bring-up.
pub const SERVICE_INJECT_STAGES: &[&str] =
    &["domains", "domain-isolation", "workload", "inject-failstop"];

/// A boot that injects a fail-stop into service domain `service` during the synthetic
/// workload and recovers it by `mode`; the workload must still get every result right.
fn service_fault(
    name: &'static str,
    service: &'static str,
    mode: &'static str,
    cmdline: &'static str,
) -> BootCase {
    let mut case = healthy(name, Emulator::Bochs, Boot::Iso, 2);
    case.cmdline = cmdline;
    case.expect.stages = SERVICE_INJECT_STAGES;
    case.expect.recovery_mode = Some(mode);
    case.expect.recovered_domain = Some(service);
    case
}

/// Stages a boot with `inject=failstop:probe` must run, beyond bring-up.
pub const INJECT_STAGES: &[&str] = &[
    "domains",
    "domain-isolation",
    "domain-calls-every-cpu",
    "inject-failstop",
];

/// A boot that injects a fail-stop into the probe (`inject=failstop:probe`) on top of its
/// misbehaviours, and recovers by `mode`.
fn injecting(
    name: &'static str,
    emulator: Emulator,
    boot: Boot,
    cpus: u32,
    mode: &'static str,
    cmdline: &'static str,
) -> BootCase {
    let mut case = recovering(name, emulator, boot, cpus, mode, cmdline);
    case.expect.stages = INJECT_STAGES;
    case.expect.probe_failures = Some(probe_failures(cpus) + 1);
    case
}

/// `selfcheck=escalation` under the default policy: after the self-checks the probe fails
/// three times in a row and is microreset, microrebooted, then declared failed (its last
/// recovery's mode is `fail`, and it counts three more failures).
fn escalating(name: &'static str) -> BootCase {
    let mut case = healthy(name, Emulator::Bochs, Boot::Iso, 2);
    case.cmdline = "selfcheck=escalation";
    case.expect.stages = &[
        "domain-isolation",
        "domain-calls-every-cpu",
        "domain-quiesce",
        "workload",
        "escalation",
    ];
    case.expect.probe_failures = Some(probe_failures(2) + 3);
    case.expect.recovery_mode = Some("fail");
    case
}

/// A boot with every repair but quiesce (`repairs=`): the quiesce check must fail, CPU 1's
/// thread running on in the failed probe until it is detected again, as hung. Shows the
/// switch works, and what quiesce is for.
fn without_quiesce(name: &'static str) -> BootCase {
    let mut case = healthy(name, Emulator::Qemu, Boot::Direct, 2);
    case.cmdline = "repairs=release-locks,undo-log,recount,scheduler-queues,\
                    timer-reactivation,multicall-log,reinit-invalid";
    case.expect.outcome = Outcome::Failed;
    case.expect.failed_check = Some("domain-quiesce");
    case.expect.stages = &["domain-isolation", "domain-calls-every-cpu"];
    case.expect.probe_failures = None;
    case.expect.recovery_mode = None;
    case.expect.recovered_domain = None;
    case.expect.workload_ok = false;
    case.expect.decided_by = None;
    case
}

/// A healthy boot whose domain recoveries use `mode` (`recovery=MODE` on the command line).
fn recovering(
    name: &'static str,
    emulator: Emulator,
    boot: Boot,
    cpus: u32,
    mode: &'static str,
    cmdline: &'static str,
) -> BootCase {
    let mut case = healthy(name, emulator, boot, cpus);
    case.cmdline = cmdline;
    case.expect.recovery_mode = Some(mode);
    case
}

fn faulting(
    name: &'static str,
    emulator: Emulator,
    boot: Boot,
    cpus: u32,
    cmdline: &'static str,
    failure: ExpectedFailure,
) -> BootCase {
    let mut case = healthy(name, emulator, boot, cpus);
    case.cmdline = cmdline;
    case.expect.outcome = Outcome::Failed;
    case.expect.timer_ticks = false;
    case.expect.failure = Some(failure);
    case.expect.stages = &[];
    case.expect.probe_failures = None;
    case.expect.recovery_mode = None;
    case.expect.recovered_domain = None;
    case.expect.workload_ok = false;
    case.expect.decided_by = None;
    case.expect.vmx_root = false;
    case
}

fn timeout_for(emulator: Emulator) -> Duration {
    match emulator {
        Emulator::Qemu => QEMU_TIMEOUT,
        Emulator::Bochs => BOCHS_TIMEOUT,
    }
}

/// Every boot test, in the order `xtask test` starts them (slow bochs cases first, so that
/// two workers finish at about the same time).
pub fn catalogue() -> Vec<BootCase> {
    use Boot::{Direct, Iso};
    use Emulator::{Bochs, Qemu};
    const UD: ExpectedFailure = ExpectedFailure { vector: 6, cpu: 0 };
    const PF: ExpectedFailure = ExpectedFailure { vector: 14, cpu: 0 };
    const GP_ON_1: ExpectedFailure = ExpectedFailure { vector: 13, cpu: 1 };
    // A CPU looping with interrupts off, stopped by the other CPU's watchdog (an NMI).
    const NMI_ON_1: ExpectedFailure = ExpectedFailure { vector: 2, cpu: 1 };
    vec![
        // The memory domain fails as it answers an EPT violation: the allocation is committed
        // and the reply lost. The retried violation must get the same frame: the scenario's
        // end checks that every frame in use is held by a VM (none leaked).
        scenario_fault(
            "bochs-5vm-unixbench-lostreply-memory",
            "memory",
            "scenario=5vm-unixbench inject=lostreply:memory",
            5,
        ),
        // The hypercall domain's next reply to the core arrives corrupted: the core must detect
        // the malformed reply, recover the domain, and the guest's hypercall is retried.
        scenario_fault(
            "bochs-1appvm-unixbench-badreply-hypercall",
            "hypercall",
            "scenario=1appvm-unixbench inject=badreply:hypercall",
            2,
        ),
        scenario_fault(
            "bochs-5vm-unixbench-failstop-scheduler",
            "scheduler",
            "scenario=5vm-unixbench inject=failstop:scheduler recovery=microreset",
            5,
        ),
        scenario_fault(
            "bochs-5vm-unixbench-failstop-memory",
            "memory",
            "scenario=5vm-unixbench inject=failstop:memory recovery=microreset",
            5,
        ),
        scenario_fault(
            "bochs-5vm-unixbench-failstop-timer",
            "timer",
            "scenario=5vm-unixbench inject=failstop:timer recovery=microreset",
            5,
        ),
        scenario_fault(
            "bochs-5vm-unixbench-failstop-hypercall",
            "hypercall",
            "scenario=5vm-unixbench inject=failstop:hypercall recovery=microreset",
            5,
        ),
        scenario_fault(
            "bochs-3appvm-failstop-scheduler",
            "scheduler",
            "scenario=3appvm inject=failstop:scheduler recovery=microreset",
            4,
        ),
        scenario_fault(
            "bochs-3appvm-failstop-memory",
            "memory",
            "scenario=3appvm inject=failstop:memory recovery=microreset",
            4,
        ),
        scenario_fault(
            "bochs-3appvm-failstop-timer",
            "timer",
            "scenario=3appvm inject=failstop:timer recovery=microreset",
            4,
        ),
        scenario_fault(
            "bochs-3appvm-failstop-hypercall",
            "hypercall",
            "scenario=3appvm inject=failstop:hypercall recovery=microreset",
            4,
        ),
        scenario("bochs-3appvm-2cpu", 2, "scenario=3appvm", 4),
        scenario("bochs-3appvm-4cpu", 4, "scenario=3appvm", 4),
        scenario(
            "bochs-1appvm-blkbench-2cpu",
            2,
            "scenario=1appvm-blkbench",
            2,
        ),
        scenario(
            "bochs-1appvm-blkbench-4cpu",
            4,
            "scenario=1appvm-blkbench",
            2,
        ),
        scenario(
            "bochs-1appvm-unixbench-2cpu",
            2,
            "scenario=1appvm-unixbench",
            2,
        ),
        scenario(
            "bochs-1appvm-unixbench-4cpu",
            4,
            "scenario=1appvm-unixbench",
            2,
        ),
        scenario(
            "bochs-1appvm-smpbench-2cpu",
            2,
            "scenario=1appvm-smpbench",
            2,
        ),
        scenario(
            "bochs-1appvm-smpbench-4cpu",
            4,
            "scenario=1appvm-smpbench",
            2,
        ),
        isolation("bochs-isolation-2cpu", 2),
        isolation("bochs-isolation-4cpu", 4),
        smp("bochs-smp-2cpu", 2),
        smp("bochs-smp-4cpu", 4),
        fuzz("bochs-fuzz-2cpu", 2),
        fuzz("bochs-fuzz-4cpu", 4),
        forbidden(
            "bochs-forbidden-cpu-2cpu",
            2,
            "scenario=forbidden-cpu",
            FORBIDDEN_CPU,
        ),
        forbidden(
            "bochs-forbidden-memory-2cpu",
            2,
            "scenario=forbidden-memory",
            FORBIDDEN_MEMORY,
        ),
        {
            let mut case = scenario_fault(
                "bochs-smp-failstop-memory",
                "memory",
                "scenario=smp inject=failstop:memory recovery=microreset",
                4,
            );
            case.expect.vms_stopped = 1;
            case
        },
        scenario("bochs-5vm-unixbench-4cpu", 4, "scenario=5vm-unixbench", 5),
        scenario("bochs-5vm-unixbench-2cpu", 2, "scenario=5vm-unixbench", 5),
        scenario("bochs-1vm-unixbench-4cpu", 4, "scenario=1vm-unixbench", 1),
        scenario("bochs-1vm-unixbench-2cpu", 2, "scenario=1vm-unixbench", 1),
        manager_fault(
            "bochs-failstop-recovery-manager",
            "inject=failstop:recovery-manager",
        ),
        service_fault(
            "bochs-failstop-scheduler-microreset",
            "scheduler",
            "microreset",
            "inject=failstop:scheduler recovery=microreset",
        ),
        service_fault(
            "bochs-failstop-scheduler-microreboot",
            "scheduler",
            "microreboot",
            "inject=failstop:scheduler recovery=microreboot",
        ),
        service_fault(
            "bochs-failstop-memory-microreset",
            "memory",
            "microreset",
            "inject=failstop:memory recovery=microreset",
        ),
        service_fault(
            "bochs-failstop-memory-microreboot",
            "memory",
            "microreboot",
            "inject=failstop:memory recovery=microreboot",
        ),
        service_fault(
            "bochs-failstop-timer-microreset",
            "timer",
            "microreset",
            "inject=failstop:timer recovery=microreset",
        ),
        service_fault(
            "bochs-failstop-timer-microreboot",
            "timer",
            "microreboot",
            "inject=failstop:timer recovery=microreboot",
        ),
        service_fault(
            "bochs-failstop-hypercall-microreset",
            "hypercall",
            "microreset",
            "inject=failstop:hypercall recovery=microreset",
        ),
        service_fault(
            "bochs-failstop-hypercall-microreboot",
            "hypercall",
            "microreboot",
            "inject=failstop:hypercall recovery=microreboot",
        ),
        healthy("bochs-iso-4cpu", Bochs, Iso, 4),
        healthy("bochs-iso-2cpu", Bochs, Iso, 2),
        healthy("bochs-iso-1cpu", Bochs, Iso, 1),
        faulting("bochs-iso-2cpu-fault-ud", Bochs, Iso, 2, "fault=ud", UD),
        faulting(
            "bochs-iso-2cpu-hang-on-cpu1-watchdog",
            Bochs,
            Iso,
            2,
            "fault=hang@1",
            NMI_ON_1,
        ),
        recovering(
            "bochs-iso-2cpu-microreboot",
            Bochs,
            Iso,
            2,
            "microreboot",
            "recovery=microreboot",
        ),
        escalating("bochs-iso-2cpu-escalation"),
        injecting(
            "bochs-iso-2cpu-inject-failstop-microreset",
            Bochs,
            Iso,
            2,
            "microreset",
            "inject=failstop:probe recovery=microreset",
        ),
        healthy("qemu-direct-1cpu", Qemu, Direct, 1),
        without_quiesce("qemu-direct-2cpu-repairs-without-quiesce"),
        healthy("qemu-direct-2cpu", Qemu, Direct, 2),
        healthy("qemu-direct-4cpu", Qemu, Direct, 4),
        healthy("qemu-iso-2cpu", Qemu, Iso, 2),
        recovering(
            "qemu-direct-2cpu-microreboot",
            Qemu,
            Direct,
            2,
            "microreboot",
            "recovery=microreboot",
        ),
        injecting(
            "qemu-direct-2cpu-inject-failstop-microreboot",
            Qemu,
            Direct,
            2,
            "microreboot",
            "inject=failstop:probe recovery=microreboot",
        ),
        faulting("qemu-direct-fault-ud", Qemu, Direct, 1, "fault=ud", UD),
        faulting("qemu-direct-fault-pf", Qemu, Direct, 1, "fault=pf", PF),
        faulting(
            "qemu-direct-fault-stack",
            Qemu,
            Direct,
            1,
            "fault=stack",
            PF,
        ),
        faulting(
            "qemu-direct-2cpu-fault-stack-on-cpu1",
            Qemu,
            Direct,
            2,
            "fault=stack@1",
            ExpectedFailure { vector: 14, cpu: 1 },
        ),
        faulting(
            "qemu-direct-2cpu-fault-gp-on-cpu1",
            Qemu,
            Direct,
            2,
            "fault=gp@1",
            GP_ON_1,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn names_are_unique_and_path_safe() {
        let cases = catalogue();
        let names: HashSet<_> = cases.iter().map(|c| c.name).collect();
        assert_eq!(names.len(), cases.len());
        for name in names {
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{name}"
            );
        }
    }

    #[test]
    fn catalogue_covers_what_the_contract_promises() {
        let cases = catalogue();
        let healthy = |e, b, n| {
            cases.iter().any(|c| {
                c.emulator == e && c.boot == b && c.cpus == n && c.expect.outcome == Outcome::Ok
            })
        };
        for n in [1, 2, 4] {
            assert!(healthy(Emulator::Qemu, Boot::Direct, n));
            assert!(healthy(Emulator::Bochs, Boot::Iso, n));
        }
        assert!(healthy(Emulator::Qemu, Boot::Iso, 2));
        let vectors: HashSet<_> = cases
            .iter()
            .filter_map(|c| c.expect.failure.map(|f| (c.emulator, f.vector, f.cpu)))
            .collect();
        for expected in [
            (Emulator::Qemu, 6, 0),
            (Emulator::Qemu, 14, 0),
            (Emulator::Qemu, 13, 1),
            (Emulator::Bochs, 6, 0),
        ] {
            assert!(vectors.contains(&expected), "{expected:?}");
        }
    }

    #[test]
    fn cases_are_consistent() {
        for case in catalogue() {
            if case.emulator == Emulator::Bochs {
                assert_eq!(
                    case.boot,
                    Boot::Iso,
                    "bochs boots only the ISO: {}",
                    case.name
                );
            }
            let protocol = if case.boot == Boot::Direct {
                "pvh"
            } else {
                "multiboot2"
            };
            assert_eq!(case.expect.boot_protocol, protocol, "{}", case.name);
            assert_eq!(case.expect.cpus, u64::from(case.cpus));
            assert_eq!(
                case.expect.failure.is_some(),
                case.cmdline.contains("fault=")
            );
            assert_eq!(
                case.expect.failure.is_some() || case.expect.failed_check.is_some(),
                case.expect.outcome == Outcome::Failed
            );
            assert!(case.expect.failure.is_none() || case.expect.failed_check.is_none());
            let limit = if case.emulator == Emulator::Qemu {
                60
            } else {
                180
            };
            assert_eq!(case.timeout, Duration::from_secs(limit));
        }
    }
}
