//! The scheduler interface: vCPU records, per-CPU runqueues, the per-CPU current vCPU and
//! time accounting.
//!
//! Rules the service keeps: a Runnable vCPU waits in the runqueue of its home CPU; a Running
//! vCPU is current on exactly one CPU; requeued vCPUs go to the tail (FIFO).

use serde::{Deserialize, Serialize};

use crate::call::{Idempotence, Operation};

/// A virtual CPU: VM number and vCPU number inside that VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VcpuId {
    /// The VM (also its memory owner number).
    pub vm: u16,
    /// The vCPU inside the VM.
    pub vcpu: u16,
}

/// Scheduler requests.
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Creates a vCPU record, Runnable, queued on `home_cpu`. Answer: `Done`.
    /// Non-idempotent: a repeat answers `VcpuExists`.
    CreateVcpu {
        /// The new vCPU.
        vcpu: VcpuId,
        /// The CPU whose runqueue it waits in.
        home_cpu: u8,
    },
    /// Removes a vCPU (from its runqueue, or from its CPU if Running). Answer: `Done`.
    /// Non-idempotent: a repeat answers `UnknownVcpu`.
    DestroyVcpu {
        /// The vCPU to remove.
        vcpu: VcpuId,
    },
    /// Makes a Blocked vCPU Runnable (tail of its home runqueue); no-op otherwise.
    /// Answer: `Done`. Idempotent.
    Wake {
        /// The vCPU to wake.
        vcpu: VcpuId,
    },
    /// Makes a vCPU Blocked (out of its runqueue, or off its CPU if Running); no-op if
    /// already Blocked. Answer: `Done`. Idempotent.
    Block {
        /// The vCPU to block.
        vcpu: VcpuId,
    },
    /// The current vCPU of `cpu` gives the CPU up: it goes to the tail of its home runqueue
    /// and `cpu` has no current vCPU until `PickNext`. Answer: `Done`. Non-idempotent (a
    /// repeat after another `PickNext` requeues a different vCPU).
    Yield {
        /// The physical CPU.
        cpu: u8,
    },
    /// Chooses what runs on `cpu`: the head of its runqueue becomes current (a still-Running
    /// previous current goes to the tail of its home runqueue); with an empty runqueue the
    /// current vCPU keeps the CPU. Answer: `Current(new current)`. Non-idempotent: it rotates
    /// the runqueue.
    PickNext {
        /// The physical CPU.
        cpu: u8,
    },
    /// The vCPU current on `cpu`. Answer: `Current`. Idempotent.
    Current {
        /// The physical CPU.
        cpu: u8,
    },
    /// Charges `ticks` to the current vCPU of `cpu`. Answer: `Done`. Non-idempotent: a
    /// repeat charges twice.
    Account {
        /// The physical CPU.
        cpu: u8,
        /// TSC ticks (or instructions under bochs) consumed.
        ticks: u64,
    },
    /// Moves a vCPU's home to `home_cpu` (a Runnable one moves to that runqueue's tail; a
    /// Running one moves when it is next requeued). Answer: `Done`. Idempotent.
    SetAffinity {
        /// The vCPU.
        vcpu: VcpuId,
        /// Its new home CPU.
        home_cpu: u8,
    },
}

/// Scheduler replies.
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The request took effect.
    Done,
    /// The current vCPU of the CPU asked about (after the request), if any.
    Current(Option<VcpuId>),
    /// The request was refused; nothing changed.
    Error(Error),
}

/// Why the scheduler refused a request. All but `Inconsistent` are the caller's fault and not
/// retryable as is.
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Error {
    /// The CPU number is not below the CPU count the scheduler was initialised with.
    BadCpu,
    /// No vCPU with this id exists.
    UnknownVcpu,
    /// `CreateVcpu` of an id that exists.
    VcpuExists,
    /// All vCPU records are in use.
    TableFull,
    /// `Account` on a CPU with no current vCPU.
    Idle,
    /// The scheduler's own state is inconsistent (callee's fault: the recovery path should
    /// validate and repair it). Retryable after repair.
    Inconsistent,
}

impl Request {
    /// Whether this request may be repeated after the scheduler restarted (see each variant).
    pub const fn idempotence(&self) -> Idempotence {
        match self {
            Request::Wake { .. }
            | Request::Block { .. }
            | Request::Current { .. }
            | Request::SetAffinity { .. } => Idempotence::Idempotent,
            Request::CreateVcpu { .. }
            | Request::DestroyVcpu { .. }
            | Request::Yield { .. }
            | Request::PickNext { .. }
            | Request::Account { .. } => Idempotence::NonIdempotent,
        }
    }

    /// The operation tag (declaration index).
    pub const fn tag(&self) -> u16 {
        match self {
            Request::CreateVcpu { .. } => 0,
            Request::DestroyVcpu { .. } => 1,
            Request::Wake { .. } => 2,
            Request::Block { .. } => 3,
            Request::Yield { .. } => 4,
            Request::PickNext { .. } => 5,
            Request::Current { .. } => 6,
            Request::Account { .. } => 7,
            Request::SetAffinity { .. } => 8,
        }
    }
}

impl Operation for Request {
    type Reply = Reply;
    const OPERATION_COUNT: u16 = 9;

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

    const V: VcpuId = VcpuId { vm: 1, vcpu: 2 };

    fn samples() -> [Request; 9] {
        [
            Request::CreateVcpu {
                vcpu: V,
                home_cpu: 3,
            },
            Request::DestroyVcpu { vcpu: V },
            Request::Wake { vcpu: V },
            Request::Block { vcpu: V },
            Request::Yield { cpu: 1 },
            Request::PickNext { cpu: 2 },
            Request::Current { cpu: 7 },
            Request::Account {
                cpu: 0,
                ticks: 1000,
            },
            Request::SetAffinity {
                vcpu: VcpuId { vm: 300, vcpu: 0 },
                home_cpu: 5,
            },
        ]
    }

    #[test]
    fn golden_requests() {
        assert_golden_request(
            &Request::CreateVcpu {
                vcpu: V,
                home_cpu: 3,
            },
            &[0, 1, 2, 3],
        );
        assert_golden_request(&Request::DestroyVcpu { vcpu: V }, &[1, 1, 2]);
        assert_golden_request(&Request::Wake { vcpu: V }, &[2, 1, 2]);
        assert_golden_request(&Request::Block { vcpu: V }, &[3, 1, 2]);
        assert_golden_request(&Request::Yield { cpu: 1 }, &[4, 1]);
        assert_golden_request(&Request::PickNext { cpu: 2 }, &[5, 2]);
        assert_golden_request(&Request::Current { cpu: 7 }, &[6, 7]);
        assert_golden_request(
            &Request::Account {
                cpu: 0,
                ticks: 1000,
            },
            &[7, 0, 232, 7],
        );
        assert_golden_request(
            &Request::SetAffinity {
                vcpu: VcpuId { vm: 300, vcpu: 0 },
                home_cpu: 5,
            },
            &[8, 172, 2, 0, 5],
        );
    }

    #[test]
    fn golden_replies() {
        assert_golden(&Reply::Done, &[0]);
        assert_golden(&Reply::Current(None), &[1, 0]);
        assert_golden(&Reply::Current(Some(V)), &[1, 1, 1, 2]);
        assert_golden(&Reply::Error(Error::BadCpu), &[2, 0]);
        assert_golden(&Reply::Error(Error::Idle), &[2, 4]);
        assert_golden(&Reply::Error(Error::Inconsistent), &[2, 5]);
    }

    #[test]
    fn tags_and_idempotence() {
        for (index, request) in samples().iter().enumerate() {
            assert_eq!(usize::from(request.tag()), index);
        }
        assert_eq!(
            usize::from(Request::OPERATION_COUNT),
            samples().len(),
            "OPERATION_COUNT must follow the enum"
        );
        let idempotent: [bool; 9] = [false, false, true, true, false, false, true, false, true];
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
        let big = VcpuId {
            vm: u16::MAX,
            vcpu: u16::MAX,
        };
        assert_fits(&Request::Account {
            cpu: u8::MAX,
            ticks: u64::MAX,
        });
        assert_fits(&Request::SetAffinity {
            vcpu: big,
            home_cpu: u8::MAX,
        });
        assert_fits(&Reply::Current(Some(big)));
    }

    #[test]
    fn damaged_requests_are_rejected() {
        for request in samples() {
            assert_rejects_damage(&request);
        }
    }

    #[test]
    fn fuzz() {
        fuzz_decode(0x5c4e_d01e, &samples());
    }
}
