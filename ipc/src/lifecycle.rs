//! The lifecycle interface every service domain implements, called by the core on the
//! recovery manager's orders: repair after a microreset or microreboot, validate state,
//! liveness ping.
//!
//! Recovery runs `Repair` and then `Validate`; a domain whose state does not validate after
//! its repair re-initialises it (the boot routine: restart uses the boot path) and says so.

use serde::{Deserialize, Serialize};

use crate::call::{Idempotence, Operation};

/// Which recovery the repair follows.
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RepairMode {
    /// Threads were discarded, state stayed in place.
    Microreset,
    /// The image was reloaded; state is what the state region preserved.
    Microreboot,
}

/// What a repair did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairOutcome {
    /// How many inconsistencies the repair fixed (0: state was consistent).
    pub fixes: u32,
    /// The state did not validate after the repair and was re-initialised (state lost).
    pub reinitialised: bool,
}

/// Lifecycle requests.
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Runs the domain's repair routine, then validation (re-initialising state that does
    /// not validate). Answer: `Repaired`. Idempotent: repairing consistent state changes
    /// nothing.
    Repair {
        /// The recovery just executed.
        mode: RepairMode,
    },
    /// Checks every invariant of the state. Answer: `Valid` or `Invalid`. Idempotent.
    Validate,
    /// Liveness check. Answer: `Pong`. Idempotent.
    Ping,
}

/// Lifecycle replies.
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The repair ran.
    Repaired(RepairOutcome),
    /// Every invariant holds.
    Valid,
    /// An invariant is broken: `check` is the component's `StateError` code (see the
    /// component crate), for the recovery log.
    Invalid {
        /// Which check failed.
        check: u16,
    },
    /// Alive.
    Pong,
    /// The request was refused.
    Error(Error),
}

/// Why a lifecycle request was refused.
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Error {
    /// The domain does not support this repair mode (the recovery manager's fault: the
    /// manifest says which modes a domain supports).
    Unsupported,
}

impl Request {
    /// Whether this request may be repeated after the domain restarted: all are.
    pub const fn idempotence(&self) -> Idempotence {
        Idempotence::Idempotent
    }

    /// The operation tag (declaration index).
    pub const fn tag(&self) -> u16 {
        match self {
            Request::Repair { .. } => 0,
            Request::Validate => 1,
            Request::Ping => 2,
        }
    }
}

impl Operation for Request {
    type Reply = Reply;
    const OPERATION_COUNT: u16 = 3;

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
    use crate::test_support::*;

    fn samples() -> [Request; 4] {
        [
            Request::Repair {
                mode: RepairMode::Microreset,
            },
            Request::Repair {
                mode: RepairMode::Microreboot,
            },
            Request::Validate,
            Request::Ping,
        ]
    }

    #[test]
    fn golden_requests() {
        assert_golden_request(
            &Request::Repair {
                mode: RepairMode::Microreset,
            },
            &[0, 0],
        );
        assert_golden_request(
            &Request::Repair {
                mode: RepairMode::Microreboot,
            },
            &[0, 1],
        );
        assert_golden_request(&Request::Validate, &[1]);
        assert_golden_request(&Request::Ping, &[2]);
    }

    #[test]
    fn golden_replies() {
        assert_golden(
            &Reply::Repaired(RepairOutcome {
                fixes: 3,
                reinitialised: false,
            }),
            &[0, 3, 0],
        );
        assert_golden(
            &Reply::Repaired(RepairOutcome {
                fixes: 0,
                reinitialised: true,
            }),
            &[0, 0, 1],
        );
        assert_golden(&Reply::Valid, &[1]);
        assert_golden(&Reply::Invalid { check: 300 }, &[2, 172, 2]);
        assert_golden(&Reply::Pong, &[3]);
        assert_golden(&Reply::Error(Error::Unsupported), &[4, 0]);
    }

    #[test]
    fn tags_and_idempotence() {
        let tags: [u16; 4] = samples().map(|request| request.tag());
        assert_eq!(tags, [0, 0, 1, 2]);
        assert_eq!(Request::OPERATION_COUNT, 3);
        assert!(
            samples()
                .iter()
                .all(|request| request.idempotence() == Idempotence::Idempotent)
        );
    }

    #[test]
    fn damaged_requests_are_rejected() {
        for request in samples() {
            assert_rejects_damage(&request);
        }
    }

    #[test]
    fn fuzz() {
        fuzz_decode(0x11fe_c1c1, &samples());
    }
}
