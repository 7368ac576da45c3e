//! The kernel command line: space-separated `key=value` words.
//!
//! Unknown keys and malformed values are collected as [`CmdlineError`]s so the kernel can
//! report each one and go on booting with defaults: a typo must be visible, not fatal.

/// An exception the core raises on purpose, to prove that faults are caught and reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliberateFault {
    /// `ud`: invalid opcode (`ud2`), vector 6.
    InvalidOpcode,
    /// `pf`: read of an unmapped address, vector 14.
    PageFault,
    /// `gp`: read of a non-canonical address, vector 13.
    GeneralProtection,
    /// `stack`: unbounded recursion on the CPU's stack until it runs into the unmapped guard
    /// page below it, vector 14 (the exception is taken on its own IST stack).
    StackOverflow,
    /// `hang`: an endless loop with interrupts off; another CPU's watchdog stops it with an
    /// NMI, vector 2 (needs two CPUs).
    Hang,
}

/// A deliberate fault and the CPU index that raises it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRequest {
    /// Which exception.
    pub fault: DeliberateFault,
    /// CPU index (0 = bootstrap processor) that raises it.
    pub cpu: usize,
}

/// A benchmark the core runs after bring-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Benchmark {
    /// `ipc`: round trips of a small message from the core to a domain and back.
    Ipc,
    /// `hypercall`: a guest's null hypercall, served in the core and by the hypercall domain.
    Hypercall,
    /// `all`: every benchmark.
    All,
}

/// The recovery policy the core gives the recovery manager.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RecoveryMode {
    /// `escalate` (the default): a domain's first failure is microreset; another failure of
    /// the same domain within the escalation window is microrebooted; a third declares it
    /// failed.
    #[default]
    Escalate,
    /// `microreset`: every failure is microreset (abandon the domain's threads, release its
    /// locks, keep its memory). Pins one mode, for experiments.
    Microreset,
    /// `microreboot`: every failure is microrebooted (as a microreset, and reload code and data
    /// from the pristine image). Pins one mode, for experiments.
    Microreboot,
}

impl RecoveryMode {
    /// The name used on the command line and in the summary.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Escalate => "escalate",
            Self::Microreset => "microreset",
            Self::Microreboot => "microreboot",
        }
    }
}

/// A fault the core injects into a domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectedFault<'a> {
    /// `failstop:DOMAIN`: RIP := 0 in DOMAIN while it serves a request.
    Failstop {
        /// Domain name.
        domain: &'a str,
    },
    /// `register:DOMAIN[:REG[:BIT]][@STEPS]`, `code:DOMAIN[:OFFSET[:BIT]][@STEPS]` or
    /// `failstop:DOMAIN@STEPS`: under a scenario, a fault `STEPS` instructions into the
    /// target's request that the first-level trigger picks (see [`crate::inject`]); what is
    /// left open comes from `seed=`.
    Stepped {
        /// Domain name.
        domain: &'a str,
        /// The fault.
        spec: crate::inject::Spec,
    },
    /// `lostreply:memory`: under a scenario, the memory domain fail-stops as it replies to its
    /// first EPT violation: the allocation is committed, the reply never reaches the core.
    LostReply {
        /// Domain name (the memory domain: the only one whose replies the injector tells apart).
        domain: &'a str,
    },
    /// `badreply:DOMAIN`: under a scenario, DOMAIN's next reply to the core arrives corrupted
    /// (its first byte replaced): the core must detect the malformed reply and recover DOMAIN.
    BadReply {
        /// Domain name.
        domain: &'a str,
    },
}

impl<'a> InjectedFault<'a> {
    /// The target domain's name.
    pub const fn domain(&self) -> &'a str {
        match *self {
            InjectedFault::Failstop { domain }
            | InjectedFault::Stepped { domain, .. }
            | InjectedFault::LostReply { domain }
            | InjectedFault::BadReply { domain } => domain,
        }
    }
}

/// Options the command line can set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options<'a> {
    /// `fault=ud|pf|gp|stack[@CPU]`.
    pub fault: Option<FaultRequest>,
    /// `bench=ipc|hypercall|all`.
    pub bench: Option<Benchmark>,
    /// `recovery=escalate|microreset|microreboot`.
    pub recovery: RecoveryMode,
    /// `inject=failstop:DOMAIN`.
    pub inject: Option<InjectedFault<'a>>,
    /// `scenario=NAME` (see [`crate::scenario`]).
    pub scenario: Option<&'static crate::scenario::Scenario>,
    /// `seed=N`: the run's seed, from which an injected fault's open choices are drawn.
    pub seed: u64,
    /// `inject_break=1`: stop in bochs' debugger (a magic breakpoint) when the fault strikes.
    pub inject_break: bool,
    /// `selfcheck=0`: a scenario boot skips the boot self-checks (the probe's isolation checks,
    /// the calls from every CPU, the synthetic workload, the first guest), which are the same
    /// in every run: campaigns boot this way.
    pub skip_self_checks: bool,
    /// `selfcheck=escalation`: the self-checks, and then the escalation check (the probe
    /// fails three times in a row: microreset, microreboot, declared failed for good).
    pub check_escalation: bool,
    /// `budget=SECONDS`: how much emulated (TSC) time a scenario's VMs get before the run
    /// fails as stuck (`None`: the default, 60 s). Campaigns set it tight, so a run whose VMs
    /// stall after a fault ends in seconds instead of a minute.
    pub scenario_budget_s: Option<u64>,
    /// `repairs=all|none|NAME,NAME,...`: the repairs a recovery makes
    /// ([`microvisor_abi::repair`]); all by default.
    pub repairs: Repairs,
}

/// A set of [`microvisor_abi::repair`] bits; every repair by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Repairs(pub u64);

impl Default for Repairs {
    fn default() -> Self {
        Self(microvisor_abi::repair::ALL)
    }
}

/// `all`, `none`, or names of [`microvisor_abi::repair::NAMES`] joined by commas.
pub fn parse_repairs(value: &str) -> Option<Repairs> {
    match value {
        "all" => Some(Repairs(microvisor_abi::repair::ALL)),
        "none" => Some(Repairs(0)),
        _ => value
            .split(',')
            .try_fold(0, |mask, name| {
                Some(mask | microvisor_abi::repair::named(name)?)
            })
            .map(Repairs),
    }
}

/// A word of the command line that could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmdlineError<'a> {
    /// A key this kernel does not know.
    UnknownKey(&'a str),
    /// A known key with a value it cannot take.
    BadValue {
        /// The key.
        key: &'a str,
        /// The value given.
        value: &'a str,
        /// What the key accepts.
        expected: &'static str,
    },
}

/// A 0/1 switch.
fn flag(value: &str) -> Option<bool> {
    match value {
        "1" => Some(true),
        "0" => Some(false),
        _ => None,
    }
}

/// Parses `line`, calling `on_error` for each word it cannot use.
pub fn parse<'a>(line: &'a str, mut on_error: impl FnMut(CmdlineError<'a>)) -> Options<'a> {
    let mut options = Options::default();
    for word in line.split_ascii_whitespace() {
        let (key, value) = word.split_once('=').unwrap_or((word, ""));
        match key {
            "fault" => match parse_fault(value) {
                Some(request) => options.fault = Some(request),
                None => on_error(CmdlineError::BadValue {
                    key,
                    value,
                    expected: "ud|pf|gp|stack|hang, optionally @CPU",
                }),
            },
            "recovery" => match value {
                "escalate" => options.recovery = RecoveryMode::Escalate,
                "microreset" => options.recovery = RecoveryMode::Microreset,
                "microreboot" => options.recovery = RecoveryMode::Microreboot,
                _ => on_error(CmdlineError::BadValue {
                    key,
                    value,
                    expected: "escalate|microreset|microreboot",
                }),
            },
            "inject" => match parse_inject(value) {
                Some(fault) => options.inject = Some(fault),
                None => on_error(CmdlineError::BadValue {
                    key,
                    value,
                    expected: "failstop:DOMAIN[@STEPS], register:DOMAIN[:REG[:BIT]][@STEPS], \
                               code:DOMAIN[:OFFSET[:BIT]][@STEPS], lostreply:memory or badreply:DOMAIN",
                }),
            },
            "inject_break" => match flag(value) {
                Some(on) => options.inject_break = on,
                None => on_error(CmdlineError::BadValue {
                    key,
                    value,
                    expected: "0 or 1",
                }),
            },
            "selfcheck" => match value {
                "escalation" => {
                    (options.skip_self_checks, options.check_escalation) = (false, true)
                }
                _ => match flag(value) {
                    Some(on) => (options.skip_self_checks, options.check_escalation) = (!on, false),
                    None => on_error(CmdlineError::BadValue {
                        key,
                        value,
                        expected: "0, 1 or escalation",
                    }),
                },
            },
            "repairs" => match parse_repairs(value) {
                Some(repairs) => options.repairs = repairs,
                None => on_error(CmdlineError::BadValue {
                    key,
                    value,
                    expected: "all, none, or repairs joined by commas (microvisor_abi::repair::NAMES)",
                }),
            },
            "budget" => match value.parse() {
                Ok(seconds @ 1..=3600) => options.scenario_budget_s = Some(seconds),
                _ => on_error(CmdlineError::BadValue {
                    key,
                    value,
                    expected: "seconds, 1 to 3600",
                }),
            },
            "seed" => match value.parse() {
                Ok(seed) => options.seed = seed,
                Err(_) => on_error(CmdlineError::BadValue {
                    key,
                    value,
                    expected: "a number",
                }),
            },
            "scenario" => match crate::scenario::find(value) {
                Some(scenario) => options.scenario = Some(scenario),
                None => on_error(CmdlineError::BadValue {
                    key,
                    value,
                    expected: "a scenario name (see microvisor::scenario)",
                }),
            },
            "bench" => match value {
                "ipc" => options.bench = Some(Benchmark::Ipc),
                "hypercall" => options.bench = Some(Benchmark::Hypercall),
                "all" => options.bench = Some(Benchmark::All),
                _ => on_error(CmdlineError::BadValue {
                    key,
                    value,
                    expected: "ipc",
                }),
            },
            _ => on_error(CmdlineError::UnknownKey(key)),
        }
    }
    options
}

fn parse_inject(value: &str) -> Option<InjectedFault<'_>> {
    let (kind, rest) = value.split_once(':')?;
    // The domain runs to the first ':' or '@' after the kind.
    let end = rest.find([':', '@']).unwrap_or(rest.len());
    let (domain, tail) = rest.split_at(end);
    if domain.is_empty() {
        return None;
    }
    if kind == "failstop" && tail.is_empty() {
        return Some(InjectedFault::Failstop { domain });
    }
    if kind == "badreply" {
        return tail
            .is_empty()
            .then_some(InjectedFault::BadReply { domain });
    }
    if kind == "lostreply" {
        return (domain == "memory" && tail.is_empty())
            .then_some(InjectedFault::LostReply { domain });
    }
    let spec = crate::inject::parse_spec(kind, tail.strip_prefix(':').unwrap_or(tail))?;
    Some(InjectedFault::Stepped { domain, spec })
}

fn parse_fault(value: &str) -> Option<FaultRequest> {
    let (kind, cpu) = match value.split_once('@') {
        Some((kind, cpu)) => (kind, cpu.parse().ok()?),
        None => (value, 0),
    };
    let fault = match kind {
        "ud" => DeliberateFault::InvalidOpcode,
        "pf" => DeliberateFault::PageFault,
        "gp" => DeliberateFault::GeneralProtection,
        "stack" => DeliberateFault::StackOverflow,
        "hang" => DeliberateFault::Hang,
        _ => return None,
    };
    Some(FaultRequest { fault, cpu })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    fn parse_collect(line: &str) -> (Options<'_>, Vec<CmdlineError<'_>>) {
        let mut errors = Vec::new();
        let options = parse(line, |error| errors.push(error));
        (options, errors)
    }

    #[test]
    fn selfcheck_is_on_unless_turned_off() {
        assert!(!parse_collect("scenario=3appvm").0.skip_self_checks);
        let (options, errors) = parse_collect("selfcheck=0");
        assert!(errors.is_empty() && options.skip_self_checks);
        let (options, errors) = parse_collect("selfcheck=0 selfcheck=maybe");
        assert_eq!(errors.len(), 1);
        assert!(options.skip_self_checks);
        assert!(!parse_collect("selfcheck=0 selfcheck=1").0.skip_self_checks);
        let (options, errors) = parse_collect("selfcheck=0 selfcheck=escalation");
        assert!(errors.is_empty() && !options.skip_self_checks && options.check_escalation);
        assert!(!parse_collect("").0.check_escalation);
    }

    #[test]
    fn repairs_are_all_by_default_and_named_otherwise() {
        use microvisor_abi::repair;
        assert_eq!(parse_collect("").0.repairs, Repairs(repair::ALL));
        assert_eq!(parse_collect("repairs=none").0.repairs, Repairs(0));
        assert_eq!(
            parse_collect("repairs=quiesce,undo-log").0.repairs,
            Repairs(repair::QUIESCE | repair::UNDO_LOG)
        );
        let (options, errors) = parse_collect("repairs=quiesce,magic");
        assert_eq!((options.repairs, errors.len()), (Repairs(repair::ALL), 1));
    }

    #[test]
    fn a_scenario_budget_is_whole_seconds() {
        assert_eq!(parse_collect("budget=12").0.scenario_budget_s, Some(12));
        assert_eq!(parse_collect("").0.scenario_budget_s, None);
        for bad in ["budget=0", "budget=1.5", "budget=3601", "budget="] {
            let (options, errors) = parse_collect(bad);
            assert_eq!(
                (options.scenario_budget_s, errors.len()),
                (None, 1),
                "{bad}"
            );
        }
    }

    #[test]
    fn empty_line_gives_defaults() {
        assert_eq!(parse_collect("  "), (Options::default(), Vec::new()));
    }

    #[test]
    fn fault_with_and_without_cpu() {
        let (options, errors) = parse_collect("fault=gp@3");
        assert!(errors.is_empty());
        assert_eq!(
            options.fault,
            Some(FaultRequest {
                fault: DeliberateFault::GeneralProtection,
                cpu: 3
            })
        );
        let (options, _) = parse_collect("fault=ud");
        assert_eq!(
            options.fault,
            Some(FaultRequest {
                fault: DeliberateFault::InvalidOpcode,
                cpu: 0
            })
        );
        let (options, _) = parse_collect("fault=stack@1");
        assert_eq!(
            options.fault,
            Some(FaultRequest {
                fault: DeliberateFault::StackOverflow,
                cpu: 1
            })
        );
    }

    #[test]
    fn recovery_mode_defaults_to_escalation() {
        assert_eq!(parse_collect("").0.recovery, RecoveryMode::Escalate);
        assert_eq!(
            parse_collect("recovery=microreboot").0.recovery,
            RecoveryMode::Microreboot
        );
        assert_eq!(
            parse_collect("recovery=microreboot recovery=escalate")
                .0
                .recovery,
            RecoveryMode::Escalate
        );
        let (options, errors) = parse_collect("recovery=reboot");
        assert_eq!(
            (options.recovery, errors.len()),
            (RecoveryMode::Escalate, 1)
        );
    }

    #[test]
    fn a_lost_reply_is_the_memory_domains() {
        let (options, errors) = parse_collect("inject=lostreply:memory");
        assert!(errors.is_empty());
        assert_eq!(
            options.inject,
            Some(InjectedFault::LostReply { domain: "memory" })
        );
        assert_eq!(
            parse_collect("inject=badreply:hypercall").0.inject,
            Some(InjectedFault::BadReply {
                domain: "hypercall"
            })
        );
        for bad in [
            "inject=lostreply:timer",
            "inject=lostreply:memory@5",
            "inject=badreply:hypercall@3",
        ] {
            let (options, errors) = parse_collect(bad);
            assert_eq!((options.inject, errors.len()), (None, 1), "{bad}");
        }
    }

    #[test]
    fn inject_names_a_fault_and_a_domain() {
        let (options, errors) = parse_collect("inject=failstop:memory");
        assert!(errors.is_empty());
        assert_eq!(
            options.inject,
            Some(InjectedFault::Failstop { domain: "memory" })
        );
        let (options, errors) = parse_collect("inject=register:memory:rbx:5@1200 seed=9");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(options.seed, 9);
        assert_eq!(
            options.inject,
            Some(InjectedFault::Stepped {
                domain: "memory",
                spec: crate::inject::parse_spec("register", "rbx:5@1200").unwrap()
            })
        );
        let (options, errors) = parse_collect("inject=code:timer inject_break=1");
        assert!(errors.is_empty() && options.inject_break);
        assert_eq!(options.inject.map(|fault| fault.domain()), Some("timer"));
        let (options, _) = parse_collect("inject=failstop:hypercall@300");
        assert!(matches!(
            options.inject,
            Some(InjectedFault::Stepped {
                domain: "hypercall",
                ..
            })
        ));
        for bad in [
            "inject=failstop:",
            "inject=flip:memory",
            "inject=memory",
            "inject=register:",
            "inject=register:memory:xmm1",
            "seed=x",
        ] {
            let (options, errors) = parse_collect(bad);
            assert_eq!((options.inject, errors.len()), (None, 1), "{bad}");
        }
    }

    #[test]
    fn bench_takes_only_known_names() {
        let (options, errors) = parse_collect("bench=ipc");
        assert_eq!((options.bench, errors.len()), (Some(Benchmark::Ipc), 0));
        let (options, errors) = parse_collect("bench=disk");
        assert_eq!(options.bench, None);
        assert!(matches!(
            errors[0],
            CmdlineError::BadValue { key: "bench", .. }
        ));
    }

    #[test]
    fn bad_words_are_reported_and_skipped() {
        let (options, errors) = parse_collect("fault=xx quiet fault=pf@ fault=pf");
        assert_eq!(
            options.fault,
            Some(FaultRequest {
                fault: DeliberateFault::PageFault,
                cpu: 0
            })
        );
        assert_eq!(errors.len(), 3);
        assert!(matches!(
            errors[0],
            CmdlineError::BadValue {
                key: "fault",
                value: "xx",
                ..
            }
        ));
        assert_eq!(errors[1], CmdlineError::UnknownKey("quiet"));
        assert!(matches!(
            errors[2],
            CmdlineError::BadValue { value: "pf@", .. }
        ));
    }
}
