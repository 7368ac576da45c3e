//! The recovery interface, core <-> recovery manager: the core reports detections and the
//! recovery manager answers with an order the core executes.
//!
//! The recovery manager holds policy only (escalation from microreset to microreboot to
//! giving up, rate limits); the core holds mechanism (suspend, discard threads, unlock the
//! lock table, reload the image, bump the generation, resume).

use serde::{Deserialize, Serialize};

use crate::call::{Idempotence, Operation};
use crate::domain::DomainId;

/// What the core saw fail.
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// A CPU exception raised in the domain (page fault, #GP, #UD, ...).
    Exception {
        /// The exception vector (Intel SDM Vol. 3A, 6.3.1).
        vector: u8,
    },
    /// The domain reported a Rust panic or a failed assertion.
    Panic,
    /// The domain did not answer within its deadline, or its CPU stopped taking ticks.
    Hang,
    /// The domain's reply did not decode.
    MalformedReply,
}

/// The request a failed domain was serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    /// Who called.
    pub caller: DomainId,
    /// The operation tag of the request (`Operation::tag`).
    pub operation: u16,
}

/// One detection, as recorded by the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detection {
    /// The failed domain, in the generation that failed.
    pub domain: DomainId,
    /// The CPU the failure was seen on.
    pub cpu: u8,
    /// What failed.
    pub kind: FailureKind,
    /// The domain's RIP at the failure.
    pub rip: u64,
    /// The TSC at detection.
    pub tsc: u64,
    /// The request it was serving, if any.
    pub in_flight: Option<InFlight>,
}

/// What the core is to do with a failed domain.
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RecoveryOrder {
    /// Keep state in place: discard threads, release locks, run the domain's repair, retry or
    /// fail the abandoned requests.
    Microreset,
    /// As microreset, but code and initial data come back from the pristine image and state is
    /// reintegrated from the state region after validation.
    Microreboot,
    /// Give up on the domain: its callers get `PeerFailed`.
    Fail,
}

/// Requests from the core to the recovery manager.
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A domain failed and is suspended. Answer: `Order`. Non-idempotent: each report counts
    /// toward escalation.
    DomainFailed(Detection),
    /// The core finished executing an order for `domain` (now in its new generation).
    /// Answer: `Acknowledged`. Idempotent: the manager records the latest completion.
    Recovered {
        /// The recovered domain's new identity.
        domain: DomainId,
        /// The order executed.
        order: RecoveryOrder,
        /// Total TSC from detection to resume.
        tsc_total: u64,
    },
    /// The core sets the policy at boot (from its command line). Answer: `Acknowledged`.
    /// Idempotent: the latest configuration holds.
    Configure {
        /// The order for a domain's first failure in a window.
        first: RecoveryOrder,
        /// Failures of one domain closer together than this (TSC) escalate: microreset, then
        /// microreboot, then fail. 0 turns escalation off (every failure gets `first`).
        escalation_window_tsc: u64,
        /// At most this many recoveries of one domain per window; beyond it the domain is
        /// failed (rate limit). 0 means no limit.
        max_in_window: u32,
    },
    /// The core asks the manager to forget `domain`'s failures so far: they do not count
    /// toward its escalation or rate limit (the boot self-checks fail the probe on purpose).
    /// Answer: `Acknowledged`, or `Error(UnknownDomain)`. Idempotent.
    Forget {
        /// The domain whose history starts again (the generation is not checked).
        domain: DomainId,
    },
}

/// Replies of the recovery manager.
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Execute this order on the failed domain.
    Order(RecoveryOrder),
    /// Noted.
    Acknowledged,
    /// The request was refused.
    Error(Error),
}

/// Why the recovery manager refused a request (the core's fault; not retryable as is).
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Error {
    /// The domain index is not in the manifest, or is the core or the manager itself.
    UnknownDomain,
    /// `Recovered` for a domain no order was given for.
    NotRecovering,
}

/// The policy of a `Configure`, packed into the recovery manager's 32-bit configuration word
/// (the core gives it at every start of the manager, so a manager that must initialise its
/// state again keeps the boot's policy): bits 0-1 the first order, 2-9 `max_in_window`
/// (at most 255), 10-31 the escalation window in units of 2^20 TSC ticks (about 0.4 ms at
/// 2.4 GHz, 21 ms at bochs' 50 M per second; up to about 4.4 * 10^12 ticks).
pub fn policy_word(first: RecoveryOrder, escalation_window_tsc: u64, max_in_window: u32) -> u32 {
    let order = match first {
        RecoveryOrder::Microreset => 0,
        RecoveryOrder::Microreboot => 1,
        RecoveryOrder::Fail => 2,
    };
    let window = escalation_window_tsc.div_ceil(1 << 20).min((1 << 22) - 1) as u32;
    order | (max_in_window.min(255) << 2) | (window << 10)
}

/// The `Configure` a policy word stands for: (first order, escalation window in TSC ticks,
/// max_in_window). Every word is some policy (an order code of 3 reads as `Fail`).
pub fn policy_of_word(word: u32) -> (RecoveryOrder, u64, u32) {
    let first = match word & 3 {
        0 => RecoveryOrder::Microreset,
        1 => RecoveryOrder::Microreboot,
        _ => RecoveryOrder::Fail,
    };
    (first, u64::from(word >> 10) << 20, (word >> 2) & 0xff)
}

impl Request {
    /// Whether this request may be repeated after the recovery manager restarted.
    pub const fn idempotence(&self) -> Idempotence {
        match self {
            Request::DomainFailed(_) => Idempotence::NonIdempotent,
            Request::Recovered { .. } | Request::Configure { .. } | Request::Forget { .. } => {
                Idempotence::Idempotent
            }
        }
    }

    /// The operation tag (declaration index).
    pub const fn tag(&self) -> u16 {
        match self {
            Request::DomainFailed(_) => 0,
            Request::Recovered { .. } => 1,
            Request::Configure { .. } => 2,
            Request::Forget { .. } => 3,
        }
    }
}

impl Operation for Request {
    type Reply = Reply;
    const OPERATION_COUNT: u16 = 4;

    fn tag(&self) -> u16 {
        Request::tag(self)
    }

    fn idempotence(&self) -> Idempotence {
        Request::idempotence(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DomainIndex;
    use crate::test_support::*;

    const MEMORY: DomainId = DomainId::new(DomainIndex::Memory, 1);
    const HYPERCALL: DomainId = DomainId::new(DomainIndex::Hypercall, 0);

    fn detection() -> Detection {
        Detection {
            domain: MEMORY,
            cpu: 1,
            kind: FailureKind::Exception { vector: 14 },
            rip: 0x40_1000,
            tsc: 123_456,
            in_flight: Some(InFlight {
                caller: HYPERCALL,
                operation: 0,
            }),
        }
    }

    fn samples() -> [Request; 2] {
        [
            Request::DomainFailed(detection()),
            Request::Recovered {
                domain: MEMORY.next_generation(),
                order: RecoveryOrder::Microreboot,
                tsc_total: 9000,
            },
        ]
    }

    #[test]
    fn golden_requests() {
        assert_golden_request(
            &Request::DomainFailed(detection()),
            &[0, 3, 1, 1, 0, 14, 128, 160, 128, 2, 192, 196, 7, 1, 5, 0, 0],
        );
        assert_golden_request(
            &Request::DomainFailed(Detection {
                domain: DomainId::new(DomainIndex::Timer, 0),
                cpu: 0,
                kind: FailureKind::Hang,
                rip: 0,
                tsc: 1,
                in_flight: None,
            }),
            &[0, 4, 0, 0, 2, 0, 1, 0],
        );
        assert_golden_request(
            &Request::DomainFailed(Detection {
                kind: FailureKind::Panic,
                in_flight: None,
                ..detection()
            }),
            &[0, 3, 1, 1, 1, 128, 160, 128, 2, 192, 196, 7, 0],
        );
        assert_golden_request(
            &Request::DomainFailed(Detection {
                kind: FailureKind::MalformedReply,
                in_flight: None,
                ..detection()
            }),
            &[0, 3, 1, 1, 3, 128, 160, 128, 2, 192, 196, 7, 0],
        );
        assert_golden_request(
            &Request::Recovered {
                domain: MEMORY.next_generation(),
                order: RecoveryOrder::Microreboot,
                tsc_total: 9000,
            },
            &[1, 3, 2, 1, 168, 70],
        );
        assert_golden_request(
            &Request::Configure {
                first: RecoveryOrder::Microreboot,
                escalation_window_tsc: 1000,
                max_in_window: 16,
            },
            &[2, 1, 232, 7, 16],
        );
        // Variant 3, then the DomainId: index 4 (timer) and generation 3, as varints.
        assert_golden_request(
            &Request::Forget {
                domain: DomainId::new(DomainIndex::Timer, 3),
            },
            &[3, 4, 3],
        );
    }

    #[test]
    fn golden_replies() {
        assert_golden(&Reply::Order(RecoveryOrder::Microreset), &[0, 0]);
        assert_golden(&Reply::Order(RecoveryOrder::Microreboot), &[0, 1]);
        assert_golden(&Reply::Order(RecoveryOrder::Fail), &[0, 2]);
        assert_golden(&Reply::Acknowledged, &[1]);
        assert_golden(&Reply::Error(Error::NotRecovering), &[2, 1]);
    }

    #[test]
    fn tags_and_idempotence() {
        let [failed, recovered] = samples();
        assert_eq!((failed.tag(), recovered.tag()), (0, 1));
        assert_eq!(Request::OPERATION_COUNT, 4);
        let configure = Request::Configure {
            first: RecoveryOrder::Microreset,
            escalation_window_tsc: 0,
            max_in_window: 0,
        };
        assert_eq!(
            (configure.tag(), configure.idempotence()),
            (2, Idempotence::Idempotent)
        );
        assert_eq!(failed.idempotence(), Idempotence::NonIdempotent);
        assert_eq!(recovered.idempotence(), Idempotence::Idempotent);
        let forget = Request::Forget { domain: MEMORY };
        assert_eq!(
            (forget.tag(), forget.idempotence()),
            (3, Idempotence::Idempotent)
        );
    }

    #[test]
    fn a_policy_survives_its_word() {
        // A window is kept to within 2^20 ticks, rounded up.
        let window = 1000 * 49_997;
        let (first, kept, max) = policy_of_word(policy_word(RecoveryOrder::Microreset, window, 0));
        assert_eq!((first, max), (RecoveryOrder::Microreset, 0));
        assert!(
            kept >= window && kept - window < 1 << 20,
            "{kept} for {window}"
        );
        assert_eq!(
            policy_of_word(policy_word(RecoveryOrder::Microreboot, 0, 7)),
            (RecoveryOrder::Microreboot, 0, 7)
        );
        // The word 0 is the boot default: microreset, no escalation, no limit.
        assert_eq!(policy_of_word(0), (RecoveryOrder::Microreset, 0, 0));
        // Out-of-range values are clamped, never wrapped into another policy.
        let (_, huge, max) = policy_of_word(policy_word(RecoveryOrder::Fail, u64::MAX, 1000));
        assert_eq!((huge, max), (((1 << 22) - 1) << 20, 255));
    }

    #[test]
    fn largest_messages_fit() {
        let big = DomainId {
            index: u16::MAX,
            generation: u32::MAX,
        };
        assert_fits(&Request::DomainFailed(Detection {
            domain: big,
            cpu: u8::MAX,
            kind: FailureKind::Exception { vector: u8::MAX },
            rip: u64::MAX,
            tsc: u64::MAX,
            in_flight: Some(InFlight {
                caller: big,
                operation: u16::MAX,
            }),
        }));
    }

    #[test]
    fn damaged_requests_are_rejected() {
        for request in samples() {
            assert_rejects_damage(&request);
        }
    }

    #[test]
    fn fuzz() {
        fuzz_decode(0x2ec0_7e21, &samples());
    }
}
