//! The memory interface: the frame table over the pool of physical frames the memory domain
//! manages (owner, kind, reference count, validated bit), and sharing between VMs.
//!
//! Owners are VM numbers `0..limits::MAX_VMS`. A frame's reference count is 1 for its owner
//! plus 1 per VM it is shared with; only the owner frees it, and only once it is no longer
//! shared. Every frame and every share record is charged to its owner's quota
//! ([`crate::quota`], `SetQuota`): a VM at its limit is refused `QuotaExceeded`.

use serde::{Deserialize, Serialize};

use crate::call::{Idempotence, Operation};

/// A physical frame number (physical address >> 12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FrameNumber(pub u32);

/// What a frame is used as.
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FrameKind {
    /// In the free pool: no owner, reference count 0, not validated.
    Free,
    /// Owned guest RAM, not shared (reference count 1).
    Ram,
    /// Owned guest RAM shared with at least one other VM (reference count > 1).
    Shared,
}

impl FrameKind {
    /// The kind stored in a raw state byte, if the byte is valid.
    pub const fn from_u8(value: u8) -> Option<FrameKind> {
        match value {
            0 => Some(FrameKind::Free),
            1 => Some(FrameKind::Ram),
            2 => Some(FrameKind::Shared),
            _ => None,
        }
    }

    /// The byte a state region stores for this kind.
    pub const fn to_u8(self) -> u8 {
        self as u8
    }
}

/// Everything the frame table knows about one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameInfo {
    /// The owning VM; `None` for a free frame.
    pub owner: Option<u16>,
    /// What the frame is used as.
    pub kind: FrameKind,
    /// 1 for the owner plus 1 per VM the frame is shared with; 0 when free.
    pub refcount: u16,
    /// Whether the frame has been validated (scrubbed and checked) so the core may map it.
    pub validated: bool,
}

/// Pool-wide counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryStats {
    /// Frames in the pool.
    pub total: u32,
    /// Frames free.
    pub free: u32,
    /// Frames shared with at least one VM besides their owner.
    pub shared: u32,
}

/// Memory requests.
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Takes a free frame for `owner`. Answer: `Allocated`. Non-idempotent: a repeat takes a
    /// second frame.
    Allocate {
        /// The VM that will own the frame.
        owner: u16,
    },
    /// Returns `owner`'s unshared frame to the pool. Answer: `Done`. Non-idempotent: a repeat
    /// answers `FrameFree` (or frees someone's new frame of the same number).
    Free {
        /// The frame.
        frame: FrameNumber,
        /// Its owner (checked).
        owner: u16,
    },
    /// Shares `owner`'s frame with VM `with` (reference count + 1). Answer: `Done`.
    /// Non-idempotent: it changes a reference count (a repeat answers `AlreadyShared`).
    Share {
        /// The frame.
        frame: FrameNumber,
        /// Its owner (checked).
        owner: u16,
        /// The VM that gains access.
        with: u16,
    },
    /// Ends the sharing of `frame` with VM `from` (reference count - 1). Answer: `Done`.
    /// Non-idempotent: it changes a reference count (a repeat answers `NotShared`).
    Unshare {
        /// The frame.
        frame: FrameNumber,
        /// The VM that loses access.
        from: u16,
    },
    /// Reads a frame's entry. Answer: `Frame`. Idempotent.
    Query {
        /// The frame.
        frame: FrameNumber,
    },
    /// Marks an owned frame validated (the core maps only validated frames into EPT).
    /// Answer: `Done`. Idempotent.
    Validate {
        /// The frame.
        frame: FrameNumber,
    },
    /// Pool-wide counts. Answer: `Stats`. Idempotent.
    Stats,
    /// Places the pool at `base` (the core's real frames for guest RAM); only while every
    /// frame is free, or when the pool is already there. Answer: `Done`. Idempotent.
    Configure {
        /// The pool's first frame.
        base: FrameNumber,
    },
    /// Whether VM `vm` may map `frame` into its guest-physical memory: it owns the frame or
    /// the owner shared it with `vm`. Answer: `Done` if so, else `Error(NotOwner)` (or
    /// `FrameFree`, `BadFrame`). The core asks this before it writes any EPT entry.
    /// Idempotent.
    MayMap {
        /// The frame.
        frame: FrameNumber,
        /// The VM that would map it.
        vm: u16,
    },
    /// The core's message for a guest's EPT violation at guest frame `gfn` (a page with no
    /// EPT entry). Guest RAM (`gfn < limits::GUEST_RAM_PAGES`) is demand-zero: the answer is
    /// `Allocated(frame)`, a new frame owned by `vm` that the core checks, scrubs and maps
    /// before the guest retries the access. Anything else answers `Error(NotGuestRam)` and the
    /// core stops the VM. Idempotent until the frame is validated: a repeat for the same `vm`
    /// and `gfn` (the first reply was lost to a failure of the memory domain) answers the same
    /// frame, so a lost reply leaks nothing. The core sends one violation per page at a time.
    EptViolation {
        /// The faulting VM (the new frame's owner).
        vm: u16,
        /// The guest frame number it touched.
        gfn: u32,
    },
    /// Reserves VM `vm`'s quota of frames and share records (`crate::quota`): from then on
    /// `Allocate`, `EptViolation` and `Share` charge `vm` (a share is charged to the frame's
    /// owner) and refuse with `QuotaExceeded` once it holds `frames` frames or `grants` share
    /// records. Replaces the VM's previous limits. Answer: `Done`, or `Error(QuotaUnavailable)`
    /// (nothing changed) if the limits every VM has reserved would no longer fit the pool or
    /// the share table. Idempotent (it sets limits, it does not add to them).
    SetQuota {
        /// The VM.
        vm: u16,
        /// The most frames it may own at once.
        frames: u32,
        /// The most share records of its frames at once.
        grants: u16,
    },
    /// Releases VM `vm`'s reservation (its limits become 0): what it still holds keeps
    /// counting against the capacity until it is freed (a frame still shared stays
    /// allocated). The core sends it once it has freed the VM's frames. Answer: `Done`.
    /// Idempotent.
    DropQuota {
        /// The VM.
        vm: u16,
    },
}

/// Memory replies.
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The request took effect.
    Done,
    /// The frame now owned by the requester.
    Allocated(FrameNumber),
    /// A frame's entry.
    Frame(FrameInfo),
    /// Pool-wide counts.
    Stats(MemoryStats),
    /// The request was refused; nothing changed.
    Error(Error),
}

/// Why the memory domain refused a request. All but `OutOfFrames`, `ShareTableFull`,
/// `QuotaUnavailable` and `Inconsistent` are the caller's fault and not retryable as is.
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Error {
    /// The frame number is outside the pool.
    BadFrame,
    /// The owner (or `with`/`from`) is not a VM number below `limits::MAX_VMS`.
    BadOwner,
    /// The frame is free.
    FrameFree,
    /// The frame belongs to another VM.
    NotOwner,
    /// `Free` of a frame still shared with other VMs (reference count > 1).
    StillShared,
    /// `Unshare` of a frame not shared with that VM.
    NotShared,
    /// `Share` with a VM the frame is already shared with.
    AlreadyShared,
    /// `Share` of a frame with its own owner.
    SelfShare,
    /// The pool is exhausted (nobody's fault; retryable after frees).
    OutOfFrames,
    /// The share table is full (nobody's fault; retryable after unshares).
    ShareTableFull,
    /// The frame table is inconsistent (the callee's fault: recovery should validate and
    /// repair it). Retryable after repair.
    Inconsistent,
    /// `Configure` of another base while frames are allocated.
    PoolInUse,
    /// `EptViolation` outside the VM's guest RAM: nothing backs that page on demand.
    NotGuestRam,
    /// The VM holds as many frames (or share records) as its quota allows (the VM's fault;
    /// retryable after it frees some).
    QuotaExceeded,
    /// `SetQuota`: the VMs' reservations together would exceed the pool or the share table
    /// (the caller's choice of quotas; retryable after other quotas are dropped).
    QuotaUnavailable,
}

impl Request {
    /// Whether this request may be repeated after the memory domain restarted.
    pub const fn idempotence(&self) -> Idempotence {
        match self {
            Request::Query { .. }
            | Request::Validate { .. }
            | Request::Stats
            | Request::Configure { .. }
            | Request::MayMap { .. }
            | Request::SetQuota { .. }
            | Request::DropQuota { .. }
            | Request::EptViolation { .. } => Idempotence::Idempotent,
            Request::Allocate { .. }
            | Request::Free { .. }
            | Request::Share { .. }
            | Request::Unshare { .. } => Idempotence::NonIdempotent,
        }
    }

    /// The operation tag (declaration index).
    pub const fn tag(&self) -> u16 {
        match self {
            Request::Allocate { .. } => 0,
            Request::Free { .. } => 1,
            Request::Share { .. } => 2,
            Request::Unshare { .. } => 3,
            Request::Query { .. } => 4,
            Request::Validate { .. } => 5,
            Request::Stats => 6,
            Request::Configure { .. } => 7,
            Request::MayMap { .. } => 8,
            Request::EptViolation { .. } => 9,
            Request::SetQuota { .. } => 10,
            Request::DropQuota { .. } => 11,
        }
    }
}

impl Operation for Request {
    type Reply = Reply;
    const OPERATION_COUNT: u16 = 12;

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

    const F: FrameNumber = FrameNumber(0x1234);

    fn samples() -> [Request; 12] {
        [
            Request::Allocate { owner: 2 },
            Request::Free { frame: F, owner: 2 },
            Request::Share {
                frame: F,
                owner: 2,
                with: 3,
            },
            Request::Unshare { frame: F, from: 3 },
            Request::Query { frame: F },
            Request::Validate { frame: F },
            Request::Stats,
            Request::Configure { base: F },
            Request::MayMap { frame: F, vm: 2 },
            Request::EptViolation { vm: 2, gfn: 0x3f },
            Request::SetQuota {
                vm: 2,
                frames: 96,
                grants: 8,
            },
            Request::DropQuota { vm: 2 },
        ]
    }

    #[test]
    fn golden_requests() {
        assert_golden_request(&Request::Allocate { owner: 2 }, &[0, 2]);
        assert_golden_request(&Request::Free { frame: F, owner: 2 }, &[1, 180, 36, 2]);
        assert_golden_request(
            &Request::Share {
                frame: F,
                owner: 2,
                with: 3,
            },
            &[2, 180, 36, 2, 3],
        );
        assert_golden_request(&Request::Unshare { frame: F, from: 3 }, &[3, 180, 36, 3]);
        assert_golden_request(&Request::Configure { base: F }, &[7, 180, 36]);
        assert_golden_request(&Request::MayMap { frame: F, vm: 2 }, &[8, 180, 36, 2]);
        assert_golden_request(
            &Request::EptViolation { vm: 3, gfn: 0x130 },
            &[9, 3, 176, 2],
        );
        assert_golden_request(
            &Request::Query {
                frame: FrameNumber(7),
            },
            &[4, 7],
        );
        assert_golden_request(
            &Request::Validate {
                frame: FrameNumber(u32::MAX),
            },
            &[5, 255, 255, 255, 255, 15],
        );
        assert_golden_request(&Request::Stats, &[6]);
        assert_golden_request(
            &Request::SetQuota {
                vm: 3,
                frames: 200,
                grants: 8,
            },
            &[10, 3, 200, 1, 8],
        );
        assert_golden_request(&Request::DropQuota { vm: 3 }, &[11, 3]);
    }

    #[test]
    fn golden_replies() {
        assert_golden(&Reply::Done, &[0]);
        assert_golden(&Reply::Allocated(FrameNumber(0x100)), &[1, 128, 2]);
        assert_golden(
            &Reply::Frame(FrameInfo {
                owner: Some(2),
                kind: FrameKind::Shared,
                refcount: 3,
                validated: true,
            }),
            &[2, 1, 2, 2, 3, 1],
        );
        assert_golden(
            &Reply::Frame(FrameInfo {
                owner: None,
                kind: FrameKind::Free,
                refcount: 0,
                validated: false,
            }),
            &[2, 0, 0, 0, 0],
        );
        assert_golden(
            &Reply::Stats(MemoryStats {
                total: 1024,
                free: 1000,
                shared: 4,
            }),
            &[3, 128, 8, 232, 7, 4],
        );
        assert_golden(&Reply::Error(Error::StillShared), &[4, 4]);
        assert_golden(&Reply::Error(Error::Inconsistent), &[4, 10]);
        assert_golden(&Reply::Error(Error::PoolInUse), &[4, 11]);
        assert_golden(&Reply::Error(Error::NotGuestRam), &[4, 12]);
        assert_golden(&Reply::Error(Error::QuotaExceeded), &[4, 13]);
        assert_golden(&Reply::Error(Error::QuotaUnavailable), &[4, 14]);
    }

    #[test]
    fn tags_and_idempotence() {
        for (index, request) in samples().iter().enumerate() {
            assert_eq!(usize::from(request.tag()), index);
        }
        assert_eq!(usize::from(Request::OPERATION_COUNT), samples().len());
        let idempotent = [
            false, false, false, false, true, true, true, true, true, true, true, true,
        ];
        for (request, expected) in samples().iter().zip(idempotent) {
            assert_eq!(
                request.idempotence() == Idempotence::Idempotent,
                expected,
                "{request:?}"
            );
        }
    }

    #[test]
    fn kind_bytes_round_trip() {
        for kind in [FrameKind::Free, FrameKind::Ram, FrameKind::Shared] {
            assert_eq!(FrameKind::from_u8(kind.to_u8()), Some(kind));
        }
        assert_eq!(FrameKind::from_u8(3), None);
    }

    #[test]
    fn largest_messages_fit() {
        let frame = FrameNumber(u32::MAX);
        assert_fits(&Request::Share {
            frame,
            owner: u16::MAX,
            with: u16::MAX,
        });
        assert_fits(&Reply::Frame(FrameInfo {
            owner: Some(u16::MAX),
            kind: FrameKind::Shared,
            refcount: u16::MAX,
            validated: true,
        }));
        assert_fits(&Request::SetQuota {
            vm: u16::MAX,
            frames: u32::MAX,
            grants: u16::MAX,
        });
        assert_fits(&Reply::Stats(MemoryStats {
            total: u32::MAX,
            free: u32::MAX,
            shared: u32::MAX,
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
        fuzz_decode(0x3e30_5eed, &samples());
    }
}
