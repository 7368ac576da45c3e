//! Named scenarios: which guest kernels boot as which VMs, with which parameters, and where
//! their vCPUs live.
//!
//! `scenario=NAME` on the kernel command line (or `cargo xtask run --scenario NAME`) picks one.
//! VM numbers start at [`FIRST_VM`]; VM *i* of a scenario gets number `FIRST_VM + i` and its
//! vCPU is homed on CPU `i % cpus`, so a scenario with more VMs than CPUs runs more vCPUs than
//! CPUs (the scheduler domain time-slices them).

/// The number of a scenario's first VM (0 is reserved; 1 is the control VM's).
pub const FIRST_VM: u16 = 2;

/// One VM of a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSpec {
    /// The guest kernel (`guest-NAME.elf` in the boot bundle).
    pub guest: &'static str,
    /// Its start parameters (see the guest's documentation; 0 = its default).
    pub params: [u64; 8],
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
}

const UNIXBENCH: VmSpec = VmSpec {
    guest: "unixbench",
    params: [0; 8],
};

/// Every scenario the core knows.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "1vm-unixbench",
        about: "one AppVM running the UnixBench-like workload",
        vms: &[UNIXBENCH],
    },
    Scenario {
        name: "5vm-unixbench",
        about: "five UnixBench-like AppVMs time-sliced over the CPUs",
        vms: &[UNIXBENCH; 5],
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
        }
        assert_eq!(find("nope"), None);
    }

    #[test]
    fn vms_spread_round_robin_over_cpus() {
        assert_eq!(home_cpu(0, 2), 0);
        assert_eq!(home_cpu(3, 2), 1);
        assert_eq!(home_cpu(4, 4), 0);
        assert_eq!(home_cpu(2, 0), 0);
    }
}
