//! Memory domain: the frame table (owner, kind, reference count, validated bit) over a pool of
//! physical frames, and sharing between VMs.
//!
//! Design rules:
//! - [`MemoryState`] is the whole service state: plain data (zerocopy `FromBytes`, so any bit
//!   pattern is a value), fixed arrays, enums stored as bytes and decoded with checks, no
//!   pointers. It lives in the domain's state region.
//! - Boot is re-initialisation: [`MemoryState::init`] is the one routine for both.
//! - [`MemoryState::handle`] is the service: pure logic from `ipc::memory::Request` to `Reply`,
//!   never panicking whatever the state holds; a refused request changes nothing.
//! - Every non-idempotent update (allocate, free, share, unshare) writes its intent into the
//!   undo log *before* touching the table and clears it after: a failure half-way leaves a log
//!   that [`MemoryState::repair`] rolls back, so the retried request starts from a consistent
//!   state (NiLiHype's undo log for reference counts). That repair costs O(1): proportional to
//!   the work in flight, not to memory size. The full O(frames) rebuild of derived fields
//!   ([`RepairScope::Full`]) is only for state that fails [`MemoryState::validate`].
//! - `EptViolation { vm, gfn }` is idempotent until the frame is validated: each VM keeps a few
//!   [`PendingAllocation`] records (guest frame -> frame), written before the allocation's
//!   transaction, so a repeat after a reply lost to a failure (the allocation committed, the
//!   domain failed before its reply reached the core) answers the same frame instead of taking
//!   a second one that nobody would ever free. A record is only a hint: it counts only while its
//!   frame is still owned by that VM, unvalidated, and it is cleared when the frame is taken
//!   again for something else.
//! - Quotas are reservations (`ipc::quota`): per VM a frame limit and a share-record limit,
//!   and the counts they are checked against (frames owned, share records of its frames). A
//!   VM at its limit is refused `QuotaExceeded`; `SetQuota` is refused `QuotaUnavailable`
//!   when the VMs' committed amounts (`max(limit, used)`) would exceed the pool or the share
//!   table, so a VM under its limit always finds a free frame and a free share slot. The
//!   counts are derived data: a full repair recounts them from the frame table and the share
//!   records (the authoritative tables); the limits are the core's and are kept.
//!
//! Invariants: a free frame has no owner, reference count 0 and is not validated; an owned
//! frame's reference count is 1 plus its share records, and its kind is `Shared` exactly when
//! that is more than 1; share records name owned frames, a VM other than the owner, once;
//! each VM's usage count is the number of frames it owns, its grant count the number of share
//! records of frames it owns; the VMs' committed frames and share records fit the pool and
//! the share table; the undo log is empty between requests.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

use ipc::limits::MAX_VMS;
use ipc::memory::{Error, FrameInfo, FrameKind, FrameNumber, MemoryStats, Reply, Request};
use ipc::quota::{FRAME_CAPACITY, GRANT_CAPACITY, committed, reservation_fits};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Frames in the pool.
pub const POOL_FRAMES: usize = ipc::limits::POOL_FRAMES;
/// Share records (frame shared with one VM) over the whole pool.
pub const MAX_SHARES: usize = ipc::limits::SHARES;
/// `owner` of a free frame.
pub const NO_OWNER: u16 = u16::MAX;

const OWNERS: usize = MAX_VMS as usize;
/// Allocations per VM remembered until validated ([`PendingAllocation`]): at least the
/// page faults one VM can have in flight at once (one per vCPU).
pub const PENDING: usize = 8;
/// `frame` of an empty [`PendingAllocation`].
pub const NO_FRAME: u32 = u32::MAX;

/// An allocation for guest frame `gfn` whose frame the core has not validated yet (8 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct PendingAllocation {
    /// The guest frame number.
    pub gfn: u32,
    /// Pool index of its frame, or [`NO_FRAME`].
    pub frame: u32,
}

impl PendingAllocation {
    /// An unused record.
    pub const EMPTY: PendingAllocation = PendingAllocation {
        gfn: 0,
        frame: NO_FRAME,
    };
}

/// One frame's entry (6 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct FrameEntry {
    /// The owning VM, or [`NO_OWNER`].
    pub owner: u16,
    /// A `FrameKind` byte.
    pub kind: u8,
    /// 1 if validated, else 0.
    pub validated: u8,
    /// 1 for the owner + 1 per share record; 0 when free.
    pub refcount: u16,
}

impl FrameEntry {
    /// The entry of a free frame.
    pub const FREE: FrameEntry = FrameEntry {
        owner: NO_OWNER,
        kind: FrameKind::Free as u8,
        validated: 0,
        refcount: 0,
    };
}

/// A frame shared with one VM (8 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct ShareRecord {
    /// Pool index of the frame.
    pub frame: u32,
    /// The VM the frame is shared with.
    pub with: u16,
    /// 1 if the record is in use, else 0.
    pub in_use: u8,
    /// Zero.
    pub reserved: u8,
}

impl ShareRecord {
    const UNUSED: ShareRecord = ShareRecord {
        frame: 0,
        with: 0,
        in_use: 0,
        reserved: 0,
    };
}

/// The operation an undo log entry belongs to, stored as a byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum UndoOperation {
    /// No update in flight.
    None = 0,
    /// `Allocate`.
    Allocate = 1,
    /// `Free`.
    Free = 2,
    /// `Share`.
    Share = 3,
    /// `Unshare`.
    Unshare = 4,
}

impl UndoOperation {
    /// Decodes a stored byte.
    pub const fn from_u8(value: u8) -> Option<UndoOperation> {
        match value {
            0 => Some(UndoOperation::None),
            1 => Some(UndoOperation::Allocate),
            2 => Some(UndoOperation::Free),
            3 => Some(UndoOperation::Share),
            4 => Some(UndoOperation::Unshare),
            _ => None,
        }
    }
}

/// The undo log: the old value of everything the update in flight may change (28 bytes).
/// `usage_owner` / `old_usage` name the count the update changes: a VM's frames owned for
/// `Allocate` and `Free`, the share records of its frames for `Share` and `Unshare`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct UndoLog {
    /// An [`UndoOperation`] byte; 0 when no update is in flight.
    pub operation: u8,
    /// Zero.
    pub reserved: u8,
    /// The share record slot the update changes, or `u16::MAX`.
    pub share_slot: u16,
    /// The pool index of the frame the update changes.
    pub frame: u32,
    /// The frame's entry before the update.
    pub old_frame: FrameEntry,
    /// The VM whose usage count (frames, or share records for `Share` / `Unshare`) the
    /// update changes, or [`NO_OWNER`].
    pub usage_owner: u16,
    /// That count before the update.
    pub old_usage: u32,
    /// The share record before the update.
    pub old_share: ShareRecord,
}

impl UndoLog {
    const EMPTY: UndoLog = UndoLog {
        operation: UndoOperation::None as u8,
        reserved: 0,
        share_slot: u16::MAX,
        frame: 0,
        old_frame: FrameEntry::FREE,
        usage_owner: NO_OWNER,
        old_usage: 0,
        old_share: ShareRecord::UNUSED,
    };
}

/// The memory domain's whole state (12068 bytes), as it lies in the state region.
#[derive(Debug, Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct MemoryState {
    /// Frame number of pool index 0.
    pub base: u32,
    /// Where the next allocation starts looking (a hint; any value is safe).
    pub next_hint: u32,
    /// Frames owned, per VM.
    pub usage: [u32; OWNERS],
    /// Per VM: the most frames it may own (its reserved frame quota; 0 = none).
    pub frame_limits: [u32; OWNERS],
    /// Per VM: the most share records of its frames (its reserved grant quota).
    pub grant_limits: [u16; OWNERS],
    /// Per VM: share records of the frames it owns.
    pub grant_usage: [u16; OWNERS],
    /// Share records.
    pub shares: [ShareRecord; MAX_SHARES],
    /// The update in flight.
    pub undo: UndoLog,
    /// The frame table, by pool index.
    pub frames: [FrameEntry; POOL_FRAMES],
    /// Per VM: allocations for guest frames not validated yet (what makes `EptViolation`
    /// idempotent across a lost reply).
    pub pending: [[PendingAllocation; PENDING]; OWNERS],
}

/// A broken invariant found by [`MemoryState::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateError {
    /// The pool runs past the last frame number.
    BadBase,
    /// The undo log holds an update in flight: run [`MemoryState::repair`] first.
    UndoPending,
    /// The undo log's operation byte is invalid.
    BadUndo,
    /// A frame's kind byte is invalid.
    BadKind {
        /// Pool index.
        frame: u16,
    },
    /// A free frame has an owner, a reference count or the validated bit.
    BadFreeFrame {
        /// Pool index.
        frame: u16,
    },
    /// An owned frame's owner is out of range or its validated byte is not 0/1.
    BadOwnedFrame {
        /// Pool index.
        frame: u16,
    },
    /// An owned frame's reference count is not 1 + its share records.
    RefcountMismatch {
        /// Pool index.
        frame: u16,
    },
    /// An owned frame's kind does not match its reference count.
    KindMismatch {
        /// Pool index.
        frame: u16,
    },
    /// A share record is malformed, names a free frame, the owner itself, or a bad VM.
    BadShare {
        /// Share slot.
        slot: u16,
    },
    /// Two share records name the same frame and VM (this is the second).
    DuplicateShare {
        /// Share slot.
        slot: u16,
    },
    /// A VM's usage count differs from the frames it owns.
    UsageMismatch {
        /// The VM.
        owner: u16,
    },
    /// A VM's grant count differs from the share records of the frames it owns.
    GrantUsageMismatch {
        /// The VM.
        owner: u16,
    },
    /// The VMs' committed frames (`resource` 0) or share records (1) exceed the capacity.
    Overcommitted {
        /// 0 frames, 1 share records.
        resource: u16,
    },
}

impl StateError {
    /// A stable number for logs and `ipc::lifecycle::Reply::Invalid`: the check number in the
    /// top 4 bits, the frame, slot or VM in the low 12.
    pub const fn code(self) -> u16 {
        let (check, detail): (u16, u16) = match self {
            StateError::BadBase => (1, 0),
            StateError::UndoPending => (2, 0),
            StateError::BadUndo => (3, 0),
            StateError::BadKind { frame } => (4, frame),
            StateError::BadFreeFrame { frame } => (5, frame),
            StateError::BadOwnedFrame { frame } => (6, frame),
            StateError::RefcountMismatch { frame } => (7, frame),
            StateError::KindMismatch { frame } => (8, frame),
            StateError::BadShare { slot } => (9, slot),
            StateError::DuplicateShare { slot } => (10, slot),
            StateError::UsageMismatch { owner } => (11, owner),
            StateError::GrantUsageMismatch { owner } => (12, owner),
            StateError::Overcommitted { resource } => (13, resource),
        };
        (check << 12) | (detail & 0x0fff)
    }
}

/// How much [`MemoryState::repair`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairScope {
    /// Roll back the update in flight from the undo log: O(1). What a microreset needs: the
    /// failure interrupted at most that one update.
    InFlight,
    /// Also rebuild every derived field (reference counts, kinds, usage counts) and drop
    /// malformed entries: O(frames). For state that fails validation after a microreboot.
    Full,
}

/// What [`MemoryState::repair`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// The update rolled back from the undo log, if one was in flight.
    pub rolled_back: Option<UndoOperation>,
    /// Frame entries fixed (bad kind, owner or validated byte; free frames normalised).
    pub frames_fixed: u32,
    /// Share records dropped as malformed or duplicate.
    pub shares_dropped: u32,
    /// Reference counts or kinds recomputed.
    pub refcounts_fixed: u32,
    /// Usage counts (frames and share records per VM) recomputed.
    pub usage_fixed: u32,
    /// Quota limits lowered to what their VMs hold because the reservations no longer fit
    /// the capacity (only a corrupted state region gets there).
    pub limits_trimmed: u32,
}

impl RepairReport {
    /// Total number of fixes (0: the state was consistent).
    pub fn fixes(&self) -> u32 {
        u32::from(self.rolled_back.is_some())
            + self.frames_fixed
            + self.shares_dropped
            + self.refcounts_fixed
            + self.usage_fixed
            + self.limits_trimmed
    }
}

/// Counts the writes of an update so tests can stop it half-way, as a failure would.
struct Writes(Option<u32>);

impl Writes {
    const ALL: Writes = Writes(None);

    /// Whether the next write may happen.
    fn next(&mut self) -> Result<(), Error> {
        match &mut self.0 {
            None => Ok(()),
            Some(0) => Err(Error::Inconsistent),
            Some(left) => {
                *left -= 1;
                Ok(())
            }
        }
    }
}

impl MemoryState {
    /// Initialises (at boot, and as a microreboot's last resort) a pool whose first frame is
    /// `base` (clamped so the pool fits below frame number `u32::MAX`): every frame free.
    pub fn init(&mut self, base: FrameNumber) {
        self.base = base.0.min(u32::MAX - POOL_FRAMES as u32);
        self.next_hint = 0;
        self.usage = [0; OWNERS];
        self.frame_limits = [0; OWNERS];
        self.grant_limits = [0; OWNERS];
        self.grant_usage = [0; OWNERS];
        self.shares = [ShareRecord::UNUSED; MAX_SHARES];
        self.undo = UndoLog::EMPTY;
        self.frames = [FrameEntry::FREE; POOL_FRAMES];
        self.pending = [[PendingAllocation::EMPTY; PENDING]; OWNERS];
    }

    /// Serves one request. Never panics; a refused request changes nothing.
    pub fn handle(&mut self, request: Request) -> Reply {
        self.apply(request, Writes::ALL)
            .unwrap_or_else(Reply::Error)
    }

    /// Serves `request` but stops after `writes` writes to the table, as a failure would;
    /// for the tests of the undo log.
    #[cfg(test)]
    fn handle_interrupted(&mut self, request: Request, writes: u32) -> Reply {
        self.apply(request, Writes(Some(writes)))
            .unwrap_or_else(Reply::Error)
    }

    fn apply(&mut self, request: Request, mut writes: Writes) -> Result<Reply, Error> {
        match request {
            Request::Allocate { owner } => self.allocate(owner, None, &mut writes),
            Request::Free { frame, owner } => self.free(frame, owner, &mut writes),
            Request::Share { frame, owner, with } => self.share(frame, owner, with, &mut writes),
            Request::Unshare { frame, from } => self.unshare(frame, from, &mut writes),
            Request::Query { frame } => self.query(frame).map(Reply::Frame),
            Request::Validate { frame } => self.mark_validated(frame),
            Request::Stats => Ok(Reply::Stats(self.stats())),
            Request::Configure { base } => self.configure(base),
            Request::MayMap { frame, vm } => self.may_map(frame, vm),
            Request::EptViolation { vm, gfn } => self.ept_violation(vm, gfn, &mut writes),
            Request::SetQuota { vm, frames, grants } => self.set_quota(vm, frames, grants),
            Request::DropQuota { vm } => {
                // Lowering a limit needs no room: never refused (the state may even be
                // overcommitted before a repair).
                let vm = Self::vm(vm)?;
                self.frame_limits[vm] = 0;
                self.grant_limits[vm] = 0;
                Ok(Reply::Done)
            }
        }
    }

    /// Sets VM `vm`'s limits if every VM's reservation still fits (see `ipc::quota`). Two
    /// plain writes and no undo log: each limit fits on its own, so a failure between them
    /// leaves a valid state, and the core repeats the (idempotent) request.
    fn set_quota(&mut self, vm: u16, frames: u32, grants: u16) -> Result<Reply, Error> {
        let vm = Self::vm(vm)?;
        let fits = reservation_fits(&self.frame_limits, &self.usage, vm, frames, FRAME_CAPACITY)
            && reservation_fits(
                &self.grant_limits,
                &self.grant_usage,
                vm,
                u32::from(grants),
                GRANT_CAPACITY,
            );
        if !fits {
            return Err(Error::QuotaUnavailable);
        }
        self.frame_limits[vm] = frames;
        self.grant_limits[vm] = grants;
        Ok(Reply::Done)
    }

    /// Serves a guest's touch of a page with no EPT entry: guest RAM is demand-zero, so it
    /// gets a new frame; any other page is not the memory domain's to back. A repeat for the
    /// same page before its frame is validated answers the same frame.
    fn ept_violation(&mut self, vm: u16, gfn: u32, writes: &mut Writes) -> Result<Reply, Error> {
        let owner = Self::vm(vm)?;
        if gfn >= ipc::limits::GUEST_RAM_PAGES {
            return Err(Error::NotGuestRam);
        }
        if let Some(index) = self.pending_frame(owner, gfn) {
            return Ok(Reply::Allocated(FrameNumber(self.base + index as u32)));
        }
        self.allocate(vm, Some(gfn), writes)
    }

    /// The frame allocated for `owner`'s guest frame `gfn` and not validated since, if any.
    fn pending_frame(&self, owner: usize, gfn: u32) -> Option<usize> {
        self.pending[owner]
            .iter()
            .filter(|record| record.gfn == gfn && record.frame != NO_FRAME)
            .map(|record| record.frame as usize)
            .find(|&index| {
                self.frames.get(index).is_some_and(|entry| {
                    usize::from(entry.owner) == owner
                        && entry.kind == FrameKind::Ram as u8
                        && entry.validated == 0
                })
            })
    }

    /// Before frame `index` goes to `owner`: no record of `owner` may name it any more, and if
    /// it backs guest frame `gfn`, a record says so (replacing one that no longer counts).
    fn note_pending(&mut self, owner: usize, index: usize, gfn: Option<u32>) {
        let frames = &self.frames;
        let records = &mut self.pending[owner];
        for record in records.iter_mut() {
            if record.frame as usize == index || gfn.is_some_and(|gfn| record.gfn == gfn) {
                *record = PendingAllocation::EMPTY;
            }
        }
        let Some(gfn) = gfn else {
            return;
        };
        let stale = |record: &PendingAllocation| {
            frames.get(record.frame as usize).is_none_or(|entry| {
                usize::from(entry.owner) != owner
                    || entry.kind != FrameKind::Ram as u8
                    || entry.validated != 0
            })
        };
        let slot = records
            .iter()
            .position(stale)
            .unwrap_or(gfn as usize % PENDING);
        records[slot] = PendingAllocation {
            gfn,
            frame: index as u32,
        };
    }

    /// Moves the pool to `base` while nothing is allocated (a no-op if it is there).
    fn configure(&mut self, base: FrameNumber) -> Result<Reply, Error> {
        if base.0 == self.base {
            return Ok(Reply::Done);
        }
        if base.0 > u32::MAX - POOL_FRAMES as u32 {
            return Err(Error::BadFrame);
        }
        if self
            .frames
            .iter()
            .any(|entry| entry.kind != FrameKind::Free as u8)
        {
            return Err(Error::PoolInUse);
        }
        self.base = base.0;
        self.next_hint = 0;
        Ok(Reply::Done)
    }

    /// `Done` if `vm` owns `frame` or the owner shared it with `vm`.
    fn may_map(&self, frame: FrameNumber, vm: u16) -> Result<Reply, Error> {
        let index = self.index(frame)?;
        Self::vm(vm)?;
        let entry = self.owned(index)?;
        if entry.owner == vm || self.find_share(index, vm).is_some() {
            Ok(Reply::Done)
        } else {
            Err(Error::NotOwner)
        }
    }

    fn index(&self, frame: FrameNumber) -> Result<usize, Error> {
        let index = frame.0.checked_sub(self.base).ok_or(Error::BadFrame)? as usize;
        if index < POOL_FRAMES {
            Ok(index)
        } else {
            Err(Error::BadFrame)
        }
    }

    fn vm(owner: u16) -> Result<usize, Error> {
        if owner < MAX_VMS {
            Ok(usize::from(owner))
        } else {
            Err(Error::BadOwner)
        }
    }

    /// The entry at `index`, checked to be owned by a valid VM.
    fn owned(&self, index: usize) -> Result<FrameEntry, Error> {
        let entry = self.frames[index];
        match FrameKind::from_u8(entry.kind) {
            None => Err(Error::Inconsistent),
            Some(FrameKind::Free) => Err(Error::FrameFree),
            Some(_) if entry.owner >= MAX_VMS || entry.refcount == 0 => Err(Error::Inconsistent),
            Some(_) => Ok(entry),
        }
    }

    fn find_share(&self, index: usize, with: u16) -> Option<usize> {
        self.shares.iter().position(|share| {
            share.in_use == 1 && share.frame as usize == index && share.with == with
        })
    }

    /// Writes the intent of an update: the old value of everything it may change.
    fn begin(
        &mut self,
        operation: UndoOperation,
        index: usize,
        share_slot: Option<usize>,
        usage_owner: Option<usize>,
    ) {
        self.undo = UndoLog {
            operation: UndoOperation::None as u8,
            reserved: 0,
            share_slot: share_slot.map_or(u16::MAX, |slot| slot as u16),
            frame: index as u32,
            old_frame: self.frames[index],
            usage_owner: usage_owner.map_or(NO_OWNER, |owner| owner as u16),
            old_usage: usage_owner.map_or(0, |owner| match operation {
                UndoOperation::Share | UndoOperation::Unshare => u32::from(self.grant_usage[owner]),
                _ => self.usage[owner],
            }),
            old_share: share_slot.map_or(ShareRecord::UNUSED, |slot| self.shares[slot]),
        };
        // The operation byte last: a log is live only once all old values are in it.
        self.undo.operation = operation as u8;
    }

    fn commit(&mut self) {
        self.undo.operation = UndoOperation::None as u8;
    }

    /// Takes a free frame for `owner` (for its guest frame `gfn`, from an EPT violation).
    fn allocate(
        &mut self,
        owner: u16,
        gfn: Option<u32>,
        writes: &mut Writes,
    ) -> Result<Reply, Error> {
        let vm = Self::vm(owner)?;
        if self.usage[vm] >= self.frame_limits[vm] {
            return Err(Error::QuotaExceeded);
        }
        let start = self.next_hint as usize % POOL_FRAMES;
        let index = (0..POOL_FRAMES)
            .map(|offset| (start + offset) % POOL_FRAMES)
            .find(|&index| self.frames[index].kind == FrameKind::Free as u8)
            .ok_or(Error::OutOfFrames)?;
        let usage = self.usage[vm].checked_add(1).ok_or(Error::Inconsistent)?;
        // Before the transaction: if it is rolled back, the record names a free frame and
        // does not count.
        self.note_pending(vm, index, gfn);
        self.begin(UndoOperation::Allocate, index, None, Some(vm));
        writes.next()?;
        self.frames[index] = FrameEntry {
            owner,
            kind: FrameKind::Ram as u8,
            validated: 0,
            refcount: 1,
        };
        writes.next()?;
        self.usage[vm] = usage;
        self.commit();
        self.next_hint = ((index + 1) % POOL_FRAMES) as u32;
        Ok(Reply::Allocated(FrameNumber(self.base + index as u32)))
    }

    fn free(
        &mut self,
        frame: FrameNumber,
        owner: u16,
        writes: &mut Writes,
    ) -> Result<Reply, Error> {
        let index = self.index(frame)?;
        let vm = Self::vm(owner)?;
        let entry = self.owned(index)?;
        if entry.owner != owner {
            return Err(Error::NotOwner);
        }
        if entry.refcount > 1 {
            return Err(Error::StillShared);
        }
        let usage = self.usage[vm].checked_sub(1).ok_or(Error::Inconsistent)?;
        self.begin(UndoOperation::Free, index, None, Some(vm));
        writes.next()?;
        self.frames[index] = FrameEntry::FREE;
        writes.next()?;
        self.usage[vm] = usage;
        self.commit();
        Ok(Reply::Done)
    }

    fn share(
        &mut self,
        frame: FrameNumber,
        owner: u16,
        with: u16,
        writes: &mut Writes,
    ) -> Result<Reply, Error> {
        let index = self.index(frame)?;
        Self::vm(owner)?;
        Self::vm(with)?;
        let entry = self.owned(index)?;
        if entry.owner != owner {
            return Err(Error::NotOwner);
        }
        if with == owner {
            return Err(Error::SelfShare);
        }
        if self.find_share(index, with).is_some() {
            return Err(Error::AlreadyShared);
        }
        let charged = usize::from(owner);
        if self.grant_usage[charged] >= self.grant_limits[charged] {
            return Err(Error::QuotaExceeded);
        }
        let grants = self.grant_usage[charged] + 1;
        let slot = self
            .shares
            .iter()
            .position(|share| share.in_use == 0)
            .ok_or(Error::ShareTableFull)?;
        let refcount = entry.refcount.checked_add(1).ok_or(Error::ShareTableFull)?;
        self.begin(UndoOperation::Share, index, Some(slot), Some(charged));
        writes.next()?;
        self.shares[slot] = ShareRecord {
            frame: index as u32,
            with,
            in_use: 1,
            reserved: 0,
        };
        writes.next()?;
        self.frames[index].refcount = refcount;
        writes.next()?;
        self.frames[index].kind = FrameKind::Shared as u8;
        writes.next()?;
        self.grant_usage[charged] = grants;
        self.commit();
        Ok(Reply::Done)
    }

    fn unshare(
        &mut self,
        frame: FrameNumber,
        from: u16,
        writes: &mut Writes,
    ) -> Result<Reply, Error> {
        let index = self.index(frame)?;
        Self::vm(from)?;
        let entry = self.owned(index)?;
        let slot = self.find_share(index, from).ok_or(Error::NotShared)?;
        let refcount = entry
            .refcount
            .checked_sub(1)
            .filter(|&count| count >= 1)
            .ok_or(Error::Inconsistent)?;
        // `owned` checked the owner is below MAX_VMS.
        let charged = usize::from(entry.owner);
        let grants = self.grant_usage[charged]
            .checked_sub(1)
            .ok_or(Error::Inconsistent)?;
        self.begin(UndoOperation::Unshare, index, Some(slot), Some(charged));
        writes.next()?;
        self.shares[slot] = ShareRecord::UNUSED;
        writes.next()?;
        self.frames[index].refcount = refcount;
        writes.next()?;
        self.frames[index].kind = if refcount > 1 {
            FrameKind::Shared
        } else {
            FrameKind::Ram
        } as u8;
        writes.next()?;
        self.grant_usage[charged] = grants;
        self.commit();
        Ok(Reply::Done)
    }

    fn query(&self, frame: FrameNumber) -> Result<FrameInfo, Error> {
        let index = self.index(frame)?;
        let entry = self.frames[index];
        let kind = FrameKind::from_u8(entry.kind).ok_or(Error::Inconsistent)?;
        Ok(FrameInfo {
            owner: (kind != FrameKind::Free).then_some(entry.owner),
            kind,
            refcount: entry.refcount,
            validated: entry.validated != 0,
        })
    }

    fn mark_validated(&mut self, frame: FrameNumber) -> Result<Reply, Error> {
        let index = self.index(frame)?;
        self.owned(index)?;
        self.frames[index].validated = 1;
        Ok(Reply::Done)
    }

    /// Pool-wide counts.
    pub fn stats(&self) -> MemoryStats {
        let mut stats = MemoryStats {
            total: POOL_FRAMES as u32,
            free: 0,
            shared: 0,
        };
        for entry in &self.frames {
            if entry.kind == FrameKind::Free as u8 {
                stats.free += 1;
            } else if entry.kind == FrameKind::Shared as u8 {
                stats.shared += 1;
            }
        }
        stats
    }

    /// Checks every invariant; the first broken one is returned. O(frames + shares).
    pub fn validate(&self) -> Result<(), StateError> {
        if self.base > u32::MAX - POOL_FRAMES as u32 {
            return Err(StateError::BadBase);
        }
        match UndoOperation::from_u8(self.undo.operation) {
            None => return Err(StateError::BadUndo),
            Some(UndoOperation::None) => {}
            Some(_) => return Err(StateError::UndoPending),
        }
        let mut references = [1u16; POOL_FRAMES];
        let mut grants = [0u16; OWNERS];
        for (slot, share) in self.shares.iter().enumerate() {
            let slot_number = slot as u16;
            match share.in_use {
                0 => continue,
                1 => {}
                _ => return Err(StateError::BadShare { slot: slot_number }),
            }
            let index = share.frame as usize;
            let entry = self
                .frames
                .get(index)
                .ok_or(StateError::BadShare { slot: slot_number })?;
            let owned = entry.kind != FrameKind::Free as u8;
            if !owned || share.with >= MAX_VMS || share.with == entry.owner {
                return Err(StateError::BadShare { slot: slot_number });
            }
            if self.shares[..slot].iter().any(|other| {
                other.in_use == 1 && other.frame == share.frame && other.with == share.with
            }) {
                return Err(StateError::DuplicateShare { slot: slot_number });
            }
            references[index] = references[index].saturating_add(1);
            if let Some(count) = grants.get_mut(usize::from(entry.owner)) {
                *count = count.saturating_add(1);
            }
        }
        let mut owned = [0u32; OWNERS];
        for (index, entry) in self.frames.iter().enumerate() {
            let frame = index as u16;
            match FrameKind::from_u8(entry.kind) {
                None => return Err(StateError::BadKind { frame }),
                Some(FrameKind::Free) => {
                    if *entry != FrameEntry::FREE {
                        return Err(StateError::BadFreeFrame { frame });
                    }
                }
                Some(kind) => {
                    if entry.owner >= MAX_VMS || entry.validated > 1 {
                        return Err(StateError::BadOwnedFrame { frame });
                    }
                    if entry.refcount != references[index] {
                        return Err(StateError::RefcountMismatch { frame });
                    }
                    if (kind == FrameKind::Shared) != (entry.refcount > 1) {
                        return Err(StateError::KindMismatch { frame });
                    }
                    owned[usize::from(entry.owner)] += 1;
                }
            }
        }
        for (owner, (&usage, &counted)) in self.usage.iter().zip(&owned).enumerate() {
            if usage != counted {
                return Err(StateError::UsageMismatch {
                    owner: owner as u16,
                });
            }
        }
        for (owner, (&usage, &counted)) in self.grant_usage.iter().zip(&grants).enumerate() {
            if usage != counted {
                return Err(StateError::GrantUsageMismatch {
                    owner: owner as u16,
                });
            }
        }
        if committed(&self.frame_limits, &self.usage) > u64::from(FRAME_CAPACITY) {
            return Err(StateError::Overcommitted { resource: 0 });
        }
        if committed(&self.grant_limits, &self.grant_usage) > u64::from(GRANT_CAPACITY) {
            return Err(StateError::Overcommitted { resource: 1 });
        }
        Ok(())
    }

    /// The repair routine: rolls back the update in flight from the undo log and, with
    /// [`RepairScope::Full`], rebuilds every derived field. After a full repair
    /// [`validate`](Self::validate) succeeds; after an in-flight repair it succeeds if the
    /// state was consistent before the interrupted update.
    pub fn repair(&mut self, scope: RepairScope) -> RepairReport {
        let mut report = RepairReport::default();
        self.roll_back(&mut report);
        if scope == RepairScope::Full {
            self.rebuild(&mut report);
        }
        report
    }

    fn roll_back(&mut self, report: &mut RepairReport) {
        let log = self.undo;
        match UndoOperation::from_u8(log.operation) {
            Some(UndoOperation::None) => return,
            None => report.frames_fixed += 1,
            Some(operation) => {
                if let Some(entry) = self.frames.get_mut(log.frame as usize) {
                    *entry = log.old_frame;
                }
                if let Some(share) = self.shares.get_mut(usize::from(log.share_slot)) {
                    *share = log.old_share;
                }
                let owner = usize::from(log.usage_owner);
                match operation {
                    UndoOperation::Share | UndoOperation::Unshare => {
                        if let Some(usage) = self.grant_usage.get_mut(owner) {
                            *usage = u16::try_from(log.old_usage).unwrap_or(u16::MAX);
                        }
                    }
                    _ => {
                        if let Some(usage) = self.usage.get_mut(owner) {
                            *usage = log.old_usage;
                        }
                    }
                }
                report.rolled_back = Some(operation);
            }
        }
        self.undo = UndoLog::EMPTY;
    }

    fn rebuild(&mut self, report: &mut RepairReport) {
        if self.base > u32::MAX - POOL_FRAMES as u32 {
            self.base = u32::MAX - POOL_FRAMES as u32;
            report.frames_fixed += 1;
        }
        for entry in self.frames.iter_mut() {
            let owned = entry.kind != FrameKind::Free as u8 && entry.owner < MAX_VMS;
            let fixed = if owned {
                FrameEntry {
                    validated: entry.validated.min(1),
                    ..*entry
                }
            } else {
                FrameEntry::FREE
            };
            if fixed != *entry {
                *entry = fixed;
                report.frames_fixed += 1;
            }
        }
        let mut references = [1u16; POOL_FRAMES];
        let mut grants = [0u16; OWNERS];
        for slot in 0..MAX_SHARES {
            let share = self.shares[slot];
            if share.in_use == 0 {
                if share != ShareRecord::UNUSED {
                    self.shares[slot] = ShareRecord::UNUSED;
                }
                continue;
            }
            let index = share.frame as usize;
            let valid = share.in_use == 1
                && self.frames.get(index).is_some_and(|entry| {
                    entry.kind != FrameKind::Free as u8
                        && share.with < MAX_VMS
                        && share.with != entry.owner
                })
                && !self.shares[..slot].iter().any(|other| {
                    other.in_use == 1 && other.frame == share.frame && other.with == share.with
                });
            if valid {
                references[index] = references[index].saturating_add(1);
                // A valid record names an owned frame, whose owner is below MAX_VMS.
                if let Some(count) = grants.get_mut(usize::from(self.frames[index].owner)) {
                    *count = count.saturating_add(1);
                }
            } else {
                self.shares[slot] = ShareRecord::UNUSED;
                report.shares_dropped += 1;
            }
        }
        let mut owned = [0u32; OWNERS];
        for (entry, &references) in self.frames.iter_mut().zip(&references) {
            if entry.kind == FrameKind::Free as u8 {
                continue;
            }
            let kind = if references > 1 {
                FrameKind::Shared
            } else {
                FrameKind::Ram
            } as u8;
            if entry.refcount != references || entry.kind != kind {
                entry.refcount = references;
                entry.kind = kind;
                report.refcounts_fixed += 1;
            }
            owned[usize::from(entry.owner)] += 1;
        }
        for (usage, counted) in self.usage.iter_mut().zip(owned) {
            if *usage != counted {
                *usage = counted;
                report.usage_fixed += 1;
            }
        }
        for (usage, counted) in self.grant_usage.iter_mut().zip(grants) {
            if *usage != counted {
                *usage = counted;
                report.usage_fixed += 1;
            }
        }
        // The limits are the core's, not derived data: kept as they are unless together they
        // no longer fit (a corrupted region), then lowered to what each VM holds, which fits.
        if committed(&self.frame_limits, &self.usage) > u64::from(FRAME_CAPACITY) {
            for (limit, &used) in self.frame_limits.iter_mut().zip(&self.usage) {
                if *limit > used {
                    *limit = used;
                    report.limits_trimmed += 1;
                }
            }
        }
        if committed(&self.grant_limits, &self.grant_usage) > u64::from(GRANT_CAPACITY) {
            for (limit, &used) in self.grant_limits.iter_mut().zip(&self.grant_usage) {
                if *limit > used {
                    *limit = used;
                    report.limits_trimmed += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
