//! The timer interface: per-CPU software timers, one-shot and recurring, and their expiry.
//!
//! Deadlines and periods are in the CPU's TSC units (instructions under bochs). A timer fires
//! on the CPU it was set on; `Expire` is driven by that CPU's APIC timer interrupt and answers
//! the cookies of the timers that fired, which the core delivers as notifications. A guest
//! timer (its cookie names a VM, `hypercall::timer_charge`) is charged to that VM's quota
//! ([`crate::quota`], `SetQuota`) while it is armed; any other timer comes out of each heap's
//! host reserve.

use heapless::Vec;
use serde::{Deserialize, Serialize};

use crate::call::{Idempotence, Operation};

/// How many cookies one `Expire` reply carries at most; more due timers stay armed and the
/// reply says `more`.
pub const EXPIRE_MAX: usize = 8;

/// A timer's handle, unique over all CPUs; never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TimerId(pub u32);

/// Timer requests.
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Arms a timer that fires once at `deadline`. Answer: `Armed`. Non-idempotent: a repeat
    /// arms a second timer.
    SetOneShot {
        /// The CPU it fires on.
        cpu: u8,
        /// When it fires.
        deadline: u64,
        /// What `Expire` reports when it fires.
        cookie: u32,
    },
    /// Arms a timer that fires at `deadline`, then every `period` after. Answer: `Armed`.
    /// Non-idempotent: a repeat arms a second timer.
    SetRecurring {
        /// The CPU it fires on.
        cpu: u8,
        /// Its first expiry.
        deadline: u64,
        /// Time between expiries; not 0.
        period: u64,
        /// What `Expire` reports when it fires.
        cookie: u32,
    },
    /// Disarms a timer. Answer: `Done`. Idempotent: a repeat answers `UnknownTimer`, which
    /// the caller reads as "already cancelled".
    Cancel {
        /// The timer.
        id: TimerId,
    },
    /// Fires the timers of `cpu` due at `now` (deadline <= now): one-shots are removed,
    /// recurring ones re-armed at their next deadline after `now`. Answer: `Expired`.
    /// Non-idempotent: a repeat finds them gone or re-armed.
    Expire {
        /// The CPU whose timer interrupt fired.
        cpu: u8,
        /// The current TSC.
        now: u64,
    },
    /// The earliest deadline armed on `cpu` (what the APIC timer should be programmed to).
    /// Answer: `Deadline`. Idempotent.
    NextDeadline {
        /// The CPU.
        cpu: u8,
    },
    /// Reserves VM `vm`'s quota of guest timers (`crate::quota`): from then on a timer whose
    /// cookie names `vm` as its target (`hypercall::timer_charge`) is refused with
    /// `QuotaExceeded` while `vm` has `timers` of them armed. Replaces the VM's previous
    /// limit. Answer: `Done`, or `Error(QuotaUnavailable)` (nothing changed) if the limits
    /// every VM has reserved would no longer fit one CPU's heap less the host's reserve (a VM
    /// may arm all its timers on one CPU). Idempotent.
    SetQuota {
        /// The VM.
        vm: u16,
        /// The most timers it may have armed at once.
        timers: u16,
    },
    /// Releases VM `vm`'s reservation: cancels every timer charged to it (the VM is gone;
    /// nobody is left to take their vectors) and sets its limit to 0. Answer: `Done`.
    /// Idempotent.
    DropQuota {
        /// The VM.
        vm: u16,
    },
}

/// Timer replies.
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The timer armed.
    Armed(TimerId),
    /// The request took effect.
    Done,
    /// The cookies of the timers that fired, earliest deadline first.
    Expired {
        /// At most [`EXPIRE_MAX`] cookies.
        cookies: Vec<u32, EXPIRE_MAX>,
        /// More timers are due: call `Expire` again.
        more: bool,
    },
    /// The earliest armed deadline, if any timer is armed on the CPU.
    Deadline(Option<u64>),
    /// The request was refused; nothing changed.
    Error(Error),
}

/// Why the timer domain refused a request.
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Error {
    /// The CPU number is not below the CPU count the timer domain was initialised with
    /// (caller's fault).
    BadCpu,
    /// A recurring timer with period 0 (caller's fault).
    BadPeriod,
    /// The CPU's timer heap is full (nobody's fault; retryable after cancels or expiries).
    HeapFull,
    /// No armed timer has this id (caller's fault, or an already cancelled / fired one-shot).
    UnknownTimer,
    /// The timer heaps are inconsistent (callee's fault: recovery should validate and repair
    /// them). Retryable after repair.
    Inconsistent,
    /// `SetQuota` or `DropQuota` of a VM number at or over `limits::MAX_VMS` (caller's fault).
    BadVm,
    /// The VM a timer is charged to has as many armed as its quota allows (the VM's fault;
    /// retryable once one fires).
    QuotaExceeded,
    /// `SetQuota`: the VMs' reservations together would exceed a heap (the caller's choice
    /// of quotas; retryable after other quotas are dropped).
    QuotaUnavailable,
}

impl Request {
    /// Whether this request may be repeated after the timer domain restarted.
    pub const fn idempotence(&self) -> Idempotence {
        match self {
            Request::Cancel { .. }
            | Request::NextDeadline { .. }
            | Request::SetQuota { .. }
            | Request::DropQuota { .. } => Idempotence::Idempotent,
            Request::SetOneShot { .. } | Request::SetRecurring { .. } | Request::Expire { .. } => {
                Idempotence::NonIdempotent
            }
        }
    }

    /// The operation tag (declaration index).
    pub const fn tag(&self) -> u16 {
        match self {
            Request::SetOneShot { .. } => 0,
            Request::SetRecurring { .. } => 1,
            Request::Cancel { .. } => 2,
            Request::Expire { .. } => 3,
            Request::NextDeadline { .. } => 4,
            Request::SetQuota { .. } => 5,
            Request::DropQuota { .. } => 6,
        }
    }
}

impl Operation for Request {
    type Reply = Reply;
    const OPERATION_COUNT: u16 = 7;

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
    use crate::{WireError, decode};

    fn samples() -> [Request; 7] {
        [
            Request::SetOneShot {
                cpu: 1,
                deadline: 5000,
                cookie: 42,
            },
            Request::SetRecurring {
                cpu: 0,
                deadline: 100,
                period: 1000,
                cookie: 7,
            },
            Request::Cancel { id: TimerId(3) },
            Request::Expire {
                cpu: 2,
                now: 1 << 40,
            },
            Request::NextDeadline { cpu: 3 },
            Request::SetQuota { vm: 2, timers: 8 },
            Request::DropQuota { vm: 2 },
        ]
    }

    fn cookies(values: &[u32]) -> Vec<u32, EXPIRE_MAX> {
        Vec::from_slice(values).unwrap()
    }

    #[test]
    fn golden_requests() {
        assert_golden_request(
            &Request::SetOneShot {
                cpu: 1,
                deadline: 5000,
                cookie: 42,
            },
            &[0, 1, 136, 39, 42],
        );
        assert_golden_request(
            &Request::SetRecurring {
                cpu: 0,
                deadline: 100,
                period: 1000,
                cookie: 7,
            },
            &[1, 0, 100, 232, 7, 7],
        );
        assert_golden_request(&Request::Cancel { id: TimerId(3) }, &[2, 3]);
        assert_golden_request(
            &Request::Expire {
                cpu: 2,
                now: 1 << 40,
            },
            &[3, 2, 128, 128, 128, 128, 128, 32],
        );
        assert_golden_request(&Request::NextDeadline { cpu: 3 }, &[4, 3]);
        assert_golden_request(&Request::SetQuota { vm: 2, timers: 8 }, &[5, 2, 8]);
        assert_golden_request(&Request::DropQuota { vm: 300 }, &[6, 172, 2]);
    }

    #[test]
    fn golden_replies() {
        assert_golden(&Reply::Armed(TimerId(9)), &[0, 9]);
        assert_golden(&Reply::Done, &[1]);
        assert_golden(
            &Reply::Expired {
                cookies: cookies(&[]),
                more: false,
            },
            &[2, 0, 0],
        );
        assert_golden(
            &Reply::Expired {
                cookies: cookies(&[1, 300]),
                more: true,
            },
            &[2, 2, 1, 172, 2, 1],
        );
        assert_golden(&Reply::Deadline(None), &[3, 0]);
        assert_golden(&Reply::Deadline(Some(5000)), &[3, 1, 136, 39]);
        assert_golden(&Reply::Error(Error::UnknownTimer), &[4, 3]);
        assert_golden(&Reply::Error(Error::BadVm), &[4, 5]);
        assert_golden(&Reply::Error(Error::QuotaExceeded), &[4, 6]);
        assert_golden(&Reply::Error(Error::QuotaUnavailable), &[4, 7]);
    }

    #[test]
    fn tags_and_idempotence() {
        for (index, request) in samples().iter().enumerate() {
            assert_eq!(usize::from(request.tag()), index);
        }
        assert_eq!(usize::from(Request::OPERATION_COUNT), samples().len());
        let idempotent = [false, false, true, false, true, true, true];
        for (request, expected) in samples().iter().zip(idempotent) {
            assert_eq!(
                request.idempotence() == Idempotence::Idempotent,
                expected,
                "{request:?}"
            );
        }
    }

    #[test]
    fn largest_messages_fit() {
        assert_fits(&Request::SetRecurring {
            cpu: u8::MAX,
            deadline: u64::MAX,
            period: u64::MAX,
            cookie: u32::MAX,
        });
        assert_fits(&Reply::Expired {
            cookies: cookies(&[u32::MAX; EXPIRE_MAX]),
            more: true,
        });
    }

    #[test]
    fn expired_list_over_its_bound_is_malformed() {
        // Tag 2 (Expired), length 9: one more cookie than a reply may carry.
        let mut bytes = [0u8; 12];
        bytes[0] = 2;
        bytes[1] = 9;
        assert_eq!(decode::<Reply>(&bytes), Err(WireError::Malformed));
    }

    #[test]
    fn damaged_requests_are_rejected() {
        for request in samples() {
            assert_rejects_damage(&request);
        }
    }

    #[test]
    fn fuzz() {
        fuzz_decode(0x7153_0001, &samples());
    }
}
