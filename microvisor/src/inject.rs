//! Fault injection, the part that needs no hardware: what the command line asks for
//! (`inject=KIND:DOMAIN[:WHERE[:BIT]][@STEPS]`), how a run's seed fills in what it leaves
//! open, and the record the summary reports.
//!
//! The kinds are the ReHype/NiLiHype fault types: `failstop` (RIP := 0), `register` (one bit of
//! one of the 16 GPRs, RSP, RFLAGS or RIP flipped) and `code` (one bit of one of the 15 bytes at
//! RIP flipped in the domain's code, restored when the fault is detected), and `hang` (the two
//! bytes at RIP replaced by `jmp $`, an endless loop, restored when the hang is detected: what
//! the hang detector must catch). The trigger has two
//! levels: the scenario's first level (the target's request after the VMs are up, as for the
//! plain fail-stop), then `STEPS` instructions executed inside the target, counted by
//! single-stepping it (RFLAGS.TF on its thread). The kernel carries it out in `inject.rs`.
//!
//! The target `core` is the core itself, the baseline a monolithic hypervisor would have: its
//! unit of work is a VM exit, and the core's own code is stepped from an exit to the next VM
//! entry; a fault that manifests there ends the run (the core cannot recover itself).

use core::fmt::{self, Display, Formatter};

/// The registers a `register` fault may flip (the 16 general-purpose registers, RSP among
/// them, then RFLAGS and RIP), in the order a seed picks them.
pub const REGISTERS: [&str; 18] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15", "rflags", "rip",
];

/// Index of RFLAGS in [`REGISTERS`].
pub const RFLAGS: u8 = 16;
/// Index of RIP in [`REGISTERS`].
pub const RIP: u8 = 17;

/// The most instructions the second-level trigger counts (the papers' 0-20,000).
pub const MAX_STEPS: u32 = 20_000;

/// RFLAGS bits a flip may touch: the architecturally defined ones a return to ring 3 can
/// carry (CF, PF, AF, ZF, SF, TF, IF, DF, OF, IOPL, NT, RF, AC, VIF, VIP, ID); VM (17) is left
/// out because IRETQ cannot return to virtual-8086 mode in IA-32e mode.
pub const RFLAGS_BITS: [u8; 17] = [0, 2, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 18, 19, 20, 21];

/// What kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// RIP := 0.
    Failstop,
    /// Flip one bit of one register of the target's live context.
    Register,
    /// Flip one bit of one byte among the 15 at RIP in the target's code.
    Code,
    /// Replace the two bytes at RIP with `jmp $` (EB FE): the target loops forever.
    Hang,
}

impl Kind {
    /// The name on the command line and in the summary.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Failstop => "failstop",
            Kind::Register => "register",
            Kind::Code => "code",
            Kind::Hang => "hang",
        }
    }
}

/// A fault as the command line gives it: anything left `None` is drawn from the seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    /// The kind.
    pub kind: Kind,
    /// `register`: index into [`REGISTERS`]; `code`: the byte's offset from RIP (0-14).
    pub location: Option<u8>,
    /// The bit to flip.
    pub bit: Option<u8>,
    /// Instructions the target executes between the first-level trigger and the fault.
    pub steps: Option<u32>,
}

/// Parses the part of `inject=` after `KIND:DOMAIN` is split off: `kind` and the words after
/// the domain (`[:WHERE[:BIT]][@STEPS]`, e.g. `rbx:5@1200`). `None` if anything is malformed.
pub fn parse_spec(kind: &str, rest: &str) -> Option<Spec> {
    let kind = match kind {
        "failstop" => Kind::Failstop,
        "register" => Kind::Register,
        "code" => Kind::Code,
        "hang" => Kind::Hang,
        _ => return None,
    };
    let (where_bit, steps) = match rest.split_once('@') {
        Some((head, steps)) => (head, Some(steps.parse::<u32>().ok()?)),
        None => (rest, None),
    };
    if steps.is_some_and(|steps| steps > MAX_STEPS) {
        return None;
    }
    let mut words = where_bit.split(':').filter(|word| !word.is_empty());
    let location = match (kind, words.next()) {
        (_, None) => None,
        (Kind::Failstop | Kind::Hang, Some(_)) => return None,
        (Kind::Register, Some(name)) => {
            Some(REGISTERS.iter().position(|register| *register == name)? as u8)
        }
        (Kind::Code, Some(offset)) => Some(offset.parse::<u8>().ok().filter(|&o| o < 15)?),
    };
    let bit = match words.next() {
        None => None,
        Some(bit) => {
            let bit = bit.parse::<u8>().ok()?;
            let limit = match (kind, location) {
                (Kind::Code, _) => 8,
                (Kind::Register, Some(RFLAGS)) if !RFLAGS_BITS.contains(&bit) => return None,
                _ => 64,
            };
            Some((bit < limit).then_some(bit)?)
        }
    };
    if words.next().is_some() || (bit.is_some() && location.is_none()) {
        return None;
    }
    Some(Spec {
        kind,
        location,
        bit,
        steps,
    })
}

/// SplitMix64: every random choice of a run comes from its seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub const fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `bound` (> 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }
}

/// A fault with every choice made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The kind.
    pub kind: Kind,
    /// `register`: index into [`REGISTERS`]; `code`: offset from RIP; `failstop`: 0.
    pub location: u8,
    /// The bit to flip (`failstop`: 0).
    pub bit: u8,
    /// Instructions inside the target before the fault.
    pub steps: u32,
    /// The first-level trigger: requests of the target to let pass before stepping starts.
    pub skip: u32,
}

impl Spec {
    /// Fills in what the command line left open from `seed`, and draws the first-level
    /// trigger from `0..=max_skip` (the scenario's busy window, in requests of the target).
    /// The draws happen in a fixed order whatever was given, so the same seed picks the same
    /// steps with or without a given register.
    pub fn resolve(&self, seed: u64, max_skip: u32) -> Plan {
        let mut rng = Rng::new(seed);
        let skip = rng.below(u64::from(max_skip) + 1) as u32;
        let steps = rng.below(u64::from(MAX_STEPS) + 1) as u32;
        let register = rng.below(REGISTERS.len() as u64) as u8;
        let offset = rng.below(15) as u8;
        let word = rng.next_u64();
        let location = self.location.unwrap_or(match self.kind {
            Kind::Failstop | Kind::Hang => 0,
            Kind::Register => register,
            Kind::Code => offset,
        });
        let bit = self.bit.unwrap_or(match (self.kind, location) {
            (Kind::Failstop | Kind::Hang, _) => 0,
            (Kind::Code, _) => (word % 8) as u8,
            (Kind::Register, RFLAGS) => RFLAGS_BITS[(word % RFLAGS_BITS.len() as u64) as usize],
            (Kind::Register, _) => (word % 64) as u8,
        });
        Plan {
            kind: self.kind,
            location,
            bit,
            steps: self.steps.unwrap_or(steps),
            skip,
        }
    }
}

/// What happened to the armed fault, for the summary's `"injection"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InjectionReport<'a> {
    /// The kind.
    pub kind: Kind,
    /// The target domain.
    pub domain: &'a str,
    /// The seed the choices came from.
    pub seed: u64,
    /// Instructions the trigger was to count inside the target.
    pub steps: u32,
    /// The first-level trigger: the target's requests let pass before stepping began.
    pub skip: u32,
    /// What became of it.
    pub state: InjectionState<'a>,
}

/// Whether and where the fault struck.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectionState<'a> {
    /// The target ran fewer instructions than the trigger counted (`counted` of them) before
    /// the run ended: nothing was injected.
    NotInjected {
        /// Instructions counted.
        counted: u32,
    },
    /// The fault struck.
    Injected {
        /// CPU it struck on.
        cpu: usize,
        /// TSC when it struck.
        tsc: u64,
        /// The target's RIP then.
        rip: u64,
        /// What was flipped: a register name, or `"code"`, or `"rip"` for a fail-stop.
        location: &'a str,
        /// The address of the flipped code byte (`code`), else 0.
        address: u64,
        /// The bit.
        bit: u8,
        /// The value before (register or byte; RIP for a fail-stop).
        before: u64,
        /// The value after.
        after: u64,
        /// TSC of the first detection in any domain after it, if any.
        detected_tsc: Option<u64>,
    },
}

impl Display for InjectionReport<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(
            f,
            r#"{{"kind":"{}","domain":"{}","seed":{},"skip":{},"steps":{},"#,
            self.kind.name(),
            self.domain,
            self.seed,
            self.skip,
            self.steps
        )?;
        match self.state {
            InjectionState::NotInjected { counted } => {
                write!(f, r#""injected":false,"counted":{counted}}}"#)
            }
            InjectionState::Injected {
                cpu,
                tsc,
                rip,
                location,
                address,
                bit,
                before,
                after,
                detected_tsc,
            } => {
                write!(
                    f,
                    r#""injected":true,"cpu":{cpu},"tsc":{tsc},"rip":"{rip:#x}","location":"{location}","address":"{address:#x}","bit":{bit},"before":"{before:#x}","after":"{after:#x}","detection_latency":"#
                )?;
                match detected_tsc {
                    Some(detected) => write!(f, "{}}}", detected.saturating_sub(tsc)),
                    None => f.write_str("null}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::format;

    #[test]
    fn specs_parse_as_documented() {
        assert_eq!(
            parse_spec("register", "rbx:5@1200"),
            Some(Spec {
                kind: Kind::Register,
                location: Some(1),
                bit: Some(5),
                steps: Some(1200)
            })
        );
        assert_eq!(
            parse_spec("code", "3"),
            Some(Spec {
                kind: Kind::Code,
                location: Some(3),
                bit: None,
                steps: None
            })
        );
        assert_eq!(
            parse_spec("failstop", "@0"),
            Some(Spec {
                kind: Kind::Failstop,
                location: None,
                bit: None,
                steps: Some(0)
            })
        );
        assert_eq!(
            parse_spec("hang", "@20"),
            Some(Spec {
                kind: Kind::Hang,
                location: None,
                bit: None,
                steps: Some(20)
            })
        );
        assert_eq!(parse_spec("hang", "2"), None);
        let hang = Spec {
            kind: Kind::Hang,
            location: None,
            bit: None,
            steps: None,
        };
        let plan = hang.resolve(9, 300);
        assert_eq!((plan.location, plan.bit), (0, 0));
        assert_eq!(plan.kind.name(), "hang");
        assert_eq!(parse_spec("register", "").map(|s| s.location), Some(None));
        for bad in [
            ("register", "xmm0"),
            ("register", "rax:64"),
            ("register", "rflags:17"),
            ("register", "rax:1:2"),
            ("code", "15"),
            ("code", "1:8"),
            ("failstop", "rax"),
            ("register", "rax@20001"),
            ("register", "rax@x"),
            ("flip", "rax"),
        ] {
            assert_eq!(parse_spec(bad.0, bad.1), None, "{bad:?}");
        }
    }

    #[test]
    fn seeds_fill_in_only_what_is_open() {
        let open = parse_spec("register", "").unwrap();
        let a = open.resolve(7, 300);
        assert_eq!(a, open.resolve(7, 300), "the same seed, the same plan");
        assert!(a.steps <= MAX_STEPS && usize::from(a.location) < REGISTERS.len());
        let pinned = parse_spec("register", "rbx:5").unwrap().resolve(7, 300);
        assert_eq!((pinned.location, pinned.bit, pinned.steps), (1, 5, a.steps));
        // Over many seeds every register, offset and the whole step range are drawn.
        let mut registers = [false; REGISTERS.len()];
        let (mut low, mut high) = (false, false);
        for seed in 0..2000 {
            let plan = open.resolve(seed, 300);
            registers[usize::from(plan.location)] = true;
            low |= plan.steps < 1000;
            high |= plan.steps > 19_000;
            if plan.location == RFLAGS {
                assert!(RFLAGS_BITS.contains(&plan.bit));
            }
            let code = parse_spec("code", "").unwrap().resolve(seed, 300);
            assert!(code.location < 15 && code.bit < 8);
        }
        assert!(registers.iter().all(|&drawn| drawn) && low && high);
        let skips: std::collections::BTreeSet<u32> =
            (0..200).map(|seed| open.resolve(seed, 10).skip).collect();
        assert_eq!(
            skips.len(),
            11,
            "every request of the window 0..=10 is drawn"
        );
        assert_eq!(open.resolve(1, 0).skip, 0);
    }

    #[test]
    fn the_report_is_json() {
        let mut report = InjectionReport {
            kind: Kind::Register,
            domain: "memory",
            seed: 3,
            skip: 4,
            steps: 12,
            state: InjectionState::NotInjected { counted: 5 },
        };
        assert_eq!(
            format!("{report}"),
            r#"{"kind":"register","domain":"memory","seed":3,"skip":4,"steps":12,"injected":false,"counted":5}"#
        );
        report.state = InjectionState::Injected {
            cpu: 1,
            tsc: 100,
            rip: 0x401000,
            location: "rbx",
            address: 0,
            bit: 5,
            before: 0x20,
            after: 0,
            detected_tsc: Some(150),
        };
        let text = format!("{report}");
        assert!(
            text.ends_with(r#""before":"0x20","after":"0x0","detection_latency":50}"#),
            "{text}"
        );
    }
}
