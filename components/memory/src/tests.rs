//! Host tests of the frame table.

use super::*;
use zerocopy::FromZeros;

const BASE: u32 = 0x1000;

/// VMs `0..QUOTA_VMS` of [`fresh`] have quotas; together they reserve the whole pool and the
/// whole share table.
const QUOTA_VMS: u16 = 8;
const FRAMES_EACH: u32 = POOL_FRAMES as u32 / QUOTA_VMS as u32;
const GRANTS_EACH: u16 = (MAX_SHARES / QUOTA_VMS as usize) as u16;

/// A pool just initialised: no frame allocated, no quota reserved.
fn blank() -> Box<MemoryState> {
    let mut state = Box::new(MemoryState::new_zeroed());
    state.init(FrameNumber(BASE));
    state
}

/// A pool whose VMs `0..QUOTA_VMS` reserved an equal share of it.
fn fresh() -> Box<MemoryState> {
    let mut state = blank();
    for vm in 0..QUOTA_VMS {
        set_quota(&mut state, vm, FRAMES_EACH, GRANTS_EACH);
    }
    state
}

#[track_caller]
fn set_quota(state: &mut MemoryState, vm: u16, frames: u32, grants: u16) {
    expect(state, Request::SetQuota { vm, frames, grants }, Reply::Done);
}

#[track_caller]
fn expect(state: &mut MemoryState, request: Request, reply: Reply) {
    assert_eq!(state.handle(request), reply, "{request:?}");
    assert_eq!(state.validate(), Ok(()), "after {request:?}");
}

#[track_caller]
fn refused(state: &mut MemoryState, request: Request, error: Error) {
    let before = state.clone();
    assert_eq!(state.handle(request), Reply::Error(error), "{request:?}");
    assert!(*state == before, "a refused {request:?} changed the state");
}

#[track_caller]
fn allocate(state: &mut MemoryState, owner: u16) -> FrameNumber {
    match state.handle(Request::Allocate { owner }) {
        Reply::Allocated(frame) => {
            assert_eq!(state.validate(), Ok(()));
            frame
        }
        other => panic!("allocate: {other:?}"),
    }
}

fn info(state: &mut MemoryState, frame: FrameNumber) -> FrameInfo {
    match state.handle(Request::Query { frame }) {
        Reply::Frame(info) => info,
        other => panic!("query: {other:?}"),
    }
}

/// VM 1 owns two frames, the first shared with VM 2 and VM 3.
fn busy() -> (Box<MemoryState>, FrameNumber, FrameNumber) {
    let mut state = fresh();
    let shared = allocate(&mut state, 1);
    let private = allocate(&mut state, 1);
    expect(
        &mut state,
        Request::Share {
            frame: shared,
            owner: 1,
            with: 2,
        },
        Reply::Done,
    );
    expect(
        &mut state,
        Request::Share {
            frame: shared,
            owner: 1,
            with: 3,
        },
        Reply::Done,
    );
    (state, shared, private)
}

#[test]
fn state_layout_is_fixed() {
    assert_eq!(core::mem::size_of::<FrameEntry>(), 6);
    assert_eq!(core::mem::size_of::<ShareRecord>(), 8);
    assert_eq!(core::mem::size_of::<UndoLog>(), 28);
    assert_eq!(core::mem::size_of::<PendingAllocation>(), 8);
    // 7972 bytes of tables, then 8 records of 8 bytes for each of the 64 VMs.
    assert_eq!(core::mem::size_of::<MemoryState>(), 7972 + 64 * 8 * 8);
}

#[test]
fn the_state_fits_the_manifests_state_region() {
    let manifest = include_str!("../../../system.toml");
    let entry = manifest
        .split("[[domain]]")
        .find(|entry| entry.contains("name = \"memory\""))
        .expect("the manifest lists the memory domain");
    let pages: usize = entry
        .lines()
        .find_map(|line| line.trim().strip_prefix("state_pages = "))
        .and_then(|pages| pages.trim().parse().ok())
        .expect("the memory domain has state_pages");
    assert!(core::mem::size_of::<MemoryState>() <= pages * 4096);
}

#[track_caller]
fn fault_in(state: &mut MemoryState, vm: u16, gfn: u32) -> FrameNumber {
    match state.handle(Request::EptViolation { vm, gfn }) {
        Reply::Allocated(frame) => {
            assert_eq!(state.validate(), Ok(()));
            frame
        }
        other => panic!("EPT violation at {gfn:#x}: {other:?}"),
    }
}

#[test]
fn a_repeated_ept_violation_gets_the_same_frame_until_it_is_validated() {
    let mut state = fresh();
    let free = state.stats().free;
    let first = fault_in(&mut state, 1, 7);
    // The reply was lost (the domain failed after its commit): the core asks again.
    assert_eq!(fault_in(&mut state, 1, 7), first);
    assert_eq!(state.stats().free, free - 1, "a repeat took a second frame");
    assert_eq!(state.usage[1], 1);
    // Another page, or the same page of another VM, gets its own frame.
    let other_page = fault_in(&mut state, 1, 8);
    let other_vm = fault_in(&mut state, 2, 7);
    assert!(other_page != first && other_vm != first && other_page != other_vm);
    // Once validated (mapped), the record no longer counts.
    expect(&mut state, Request::Validate { frame: first }, Reply::Done);
    assert_ne!(fault_in(&mut state, 1, 7), first);
}

#[test]
fn a_pending_record_never_names_a_frame_taken_again() {
    let mut state = fresh();
    let first = fault_in(&mut state, 1, 7);
    expect(
        &mut state,
        Request::Free {
            frame: first,
            owner: 1,
        },
        Reply::Done,
    );
    // The freed frame is taken again by the same VM for something else, unvalidated: the old
    // record of page 7 must not hand it out a second time.
    state.next_hint = first.0 - BASE;
    let again = allocate(&mut state, 1);
    assert_eq!(again, first);
    let page_seven = fault_in(&mut state, 1, 7);
    assert_ne!(page_seven, again);
}

#[test]
fn an_interrupted_allocation_leaves_no_record_that_counts() {
    let state = fresh();
    let free = state.stats().free;
    for writes in 0..2 {
        let mut copy = state.clone();
        let _ = copy.handle_interrupted(Request::EptViolation { vm: 3, gfn: 9 }, writes);
        copy.repair(RepairScope::InFlight);
        assert_eq!(copy.validate(), Ok(()));
        assert_eq!(copy.stats().free, free);
        let frame = fault_in(&mut copy, 3, 9);
        assert_eq!(copy.stats().free, free - 1);
        assert_eq!(fault_in(&mut copy, 3, 9), frame);
    }
}

#[test]
fn more_pages_in_flight_than_records_still_never_alias() {
    let mut state = fresh();
    let frames: Vec<FrameNumber> = (0..PENDING as u32 + 4)
        .map(|gfn| fault_in(&mut state, 4, gfn))
        .collect();
    for (gfn, &frame) in frames.iter().enumerate() {
        let again = fault_in(&mut state, 4, gfn as u32);
        // Either the same frame (still remembered) or a new one: never another page's.
        assert!(again == frame || !frames.contains(&again), "page {gfn}");
    }
}

#[test]
fn init_is_valid_and_is_the_reboot_path() {
    let state = blank();
    assert_eq!(state.validate(), Ok(()));
    assert_eq!(
        state.stats(),
        MemoryStats {
            total: 1024,
            free: 1024,
            shared: 0
        }
    );
    let (mut used, _, _) = busy();
    used.init(FrameNumber(BASE));
    assert!(used == state);
}

#[test]
fn allocate_share_unshare_free() {
    let mut state = fresh();
    let frame = allocate(&mut state, 1);
    assert_eq!(frame, FrameNumber(BASE));
    assert_eq!(
        info(&mut state, frame),
        FrameInfo {
            owner: Some(1),
            kind: FrameKind::Ram,
            refcount: 1,
            validated: false
        }
    );
    expect(&mut state, Request::Validate { frame }, Reply::Done);
    expect(&mut state, Request::Validate { frame }, Reply::Done); // idempotent
    expect(
        &mut state,
        Request::Share {
            frame,
            owner: 1,
            with: 2,
        },
        Reply::Done,
    );
    assert_eq!(
        info(&mut state, frame),
        FrameInfo {
            owner: Some(1),
            kind: FrameKind::Shared,
            refcount: 2,
            validated: true
        }
    );
    assert_eq!(
        state.stats(),
        MemoryStats {
            total: 1024,
            free: 1023,
            shared: 1
        }
    );
    expect(&mut state, Request::Unshare { frame, from: 2 }, Reply::Done);
    assert_eq!(info(&mut state, frame).kind, FrameKind::Ram);
    expect(&mut state, Request::Free { frame, owner: 1 }, Reply::Done);
    assert_eq!(
        info(&mut state, frame),
        FrameInfo {
            owner: None,
            kind: FrameKind::Free,
            refcount: 0,
            validated: false
        }
    );
    assert_eq!(state.usage[1], 0);
    // The allocator moves on instead of reusing the frame at once.
    assert_eq!(allocate(&mut state, 4), FrameNumber(BASE + 1));
    assert_eq!(state.usage[4], 1);
}

#[test]
fn pool_exhaustion_and_reuse() {
    let mut state = fresh();
    let owners = POOL_FRAMES / usize::from(QUOTA_VMS);
    for index in 0..POOL_FRAMES {
        allocate(&mut state, (index / owners) as u16);
    }
    // Every VM holds its whole quota, which is the whole pool.
    for owner in 0..QUOTA_VMS {
        refused(
            &mut state,
            Request::Allocate { owner },
            Error::QuotaExceeded,
        );
    }
    let owner = (500 / owners) as u16;
    expect(
        &mut state,
        Request::Free {
            frame: FrameNumber(BASE + 500),
            owner,
        },
        Reply::Done,
    );
    assert_eq!(allocate(&mut state, owner), FrameNumber(BASE + 500));
    assert_eq!(state.usage.iter().sum::<u32>(), POOL_FRAMES as u32);
}

#[test]
fn an_overcommitted_pool_still_refuses_cleanly() {
    // Only a corrupted region (before its repair) reserves more than the pool: the
    // allocator then runs dry and says so.
    let mut state = blank();
    state.frame_limits[1] = u32::MAX;
    for _ in 0..POOL_FRAMES {
        allocate_unchecked(&mut state, 1);
    }
    let before = state.clone();
    assert_eq!(
        state.handle(Request::Allocate { owner: 1 }),
        Reply::Error(Error::OutOfFrames)
    );
    assert!(*state == *before);
    assert_eq!(
        state.validate(),
        Err(StateError::Overcommitted { resource: 0 })
    );
}

fn allocate_unchecked(state: &mut MemoryState, owner: u16) -> FrameNumber {
    match state.handle(Request::Allocate { owner }) {
        Reply::Allocated(frame) => frame,
        other => panic!("allocate: {other:?}"),
    }
}

#[test]
fn every_error_path_changes_nothing() {
    let (mut state, shared, private) = busy();
    let outside = FrameNumber(BASE + POOL_FRAMES as u32);
    let free = FrameNumber(BASE + 10);
    refused(
        &mut state,
        Request::Allocate { owner: MAX_VMS },
        Error::BadOwner,
    );
    refused(
        &mut state,
        Request::Free {
            frame: outside,
            owner: 1,
        },
        Error::BadFrame,
    );
    refused(
        &mut state,
        Request::Free {
            frame: FrameNumber(BASE - 1),
            owner: 1,
        },
        Error::BadFrame,
    );
    refused(
        &mut state,
        Request::Free {
            frame: private,
            owner: 999,
        },
        Error::BadOwner,
    );
    refused(
        &mut state,
        Request::Free {
            frame: free,
            owner: 1,
        },
        Error::FrameFree,
    );
    refused(
        &mut state,
        Request::Free {
            frame: private,
            owner: 2,
        },
        Error::NotOwner,
    );
    refused(
        &mut state,
        Request::Free {
            frame: shared,
            owner: 1,
        },
        Error::StillShared,
    );
    refused(
        &mut state,
        Request::Share {
            frame: private,
            owner: 2,
            with: 3,
        },
        Error::NotOwner,
    );
    refused(
        &mut state,
        Request::Share {
            frame: private,
            owner: 1,
            with: 1,
        },
        Error::SelfShare,
    );
    refused(
        &mut state,
        Request::Share {
            frame: shared,
            owner: 1,
            with: 2,
        },
        Error::AlreadyShared,
    );
    refused(
        &mut state,
        Request::Share {
            frame: free,
            owner: 1,
            with: 2,
        },
        Error::FrameFree,
    );
    refused(
        &mut state,
        Request::Share {
            frame: private,
            owner: 1,
            with: MAX_VMS,
        },
        Error::BadOwner,
    );
    refused(
        &mut state,
        Request::Share {
            frame: outside,
            owner: 1,
            with: 2,
        },
        Error::BadFrame,
    );
    refused(
        &mut state,
        Request::Unshare {
            frame: private,
            from: 2,
        },
        Error::NotShared,
    );
    refused(
        &mut state,
        Request::Unshare {
            frame: shared,
            from: 4,
        },
        Error::NotShared,
    );
    refused(
        &mut state,
        Request::Unshare {
            frame: free,
            from: 2,
        },
        Error::FrameFree,
    );
    refused(
        &mut state,
        Request::Unshare {
            frame: shared,
            from: 700,
        },
        Error::BadOwner,
    );
    refused(
        &mut state,
        Request::Query { frame: outside },
        Error::BadFrame,
    );
    refused(
        &mut state,
        Request::Validate { frame: free },
        Error::FrameFree,
    );
    // Double free.
    expect(
        &mut state,
        Request::Free {
            frame: private,
            owner: 1,
        },
        Reply::Done,
    );
    refused(
        &mut state,
        Request::Free {
            frame: private,
            owner: 1,
        },
        Error::FrameFree,
    );
}

/// VM 0 shares frames of its own until the memory domain refuses; returns the shares made.
fn share_until_refused(state: &mut MemoryState, refusal: Error) -> usize {
    let mut shared = 0;
    for _ in 0..POOL_FRAMES {
        let frame = allocate_unchecked(state, 0);
        for with in 1..MAX_VMS {
            let request = Request::Share {
                frame,
                owner: 0,
                with,
            };
            match state.handle(request) {
                Reply::Done => shared += 1,
                Reply::Error(error) => {
                    assert_eq!(error, refusal);
                    return shared;
                }
                other => panic!("{other:?}"),
            }
        }
    }
    panic!("never refused");
}

#[test]
fn a_vm_with_the_whole_share_table_fills_it() {
    let mut state = blank();
    set_quota(&mut state, 0, 64, MAX_SHARES as u16);
    assert_eq!(
        share_until_refused(&mut state, Error::QuotaExceeded),
        MAX_SHARES
    );
    assert_eq!(state.validate(), Ok(()));
    assert_eq!(usize::from(state.grant_usage[0]), MAX_SHARES);
    // Overcommitted (a corrupted region): the table itself runs out.
    let mut state = blank();
    state.frame_limits[0] = 64;
    state.grant_limits[0] = u16::MAX;
    assert_eq!(
        share_until_refused(&mut state, Error::ShareTableFull),
        MAX_SHARES
    );
}

/// The non-idempotent updates of a busy state, with the number of table writes each makes.
fn updates(shared: FrameNumber, private: FrameNumber) -> [(Request, u32); 6] {
    [
        (Request::Allocate { owner: 5 }, 2),
        (Request::EptViolation { vm: 6, gfn: 0x31 }, 2),
        (
            Request::Free {
                frame: private,
                owner: 1,
            },
            2,
        ),
        (
            Request::Share {
                frame: private,
                owner: 1,
                with: 7,
            },
            4,
        ),
        (
            Request::Share {
                frame: shared,
                owner: 1,
                with: 7,
            },
            4,
        ),
        (
            Request::Unshare {
                frame: shared,
                from: 2,
            },
            4,
        ),
    ]
}

#[test]
fn undo_log_rolls_back_every_interrupted_update() {
    let (reference, shared, private) = busy();
    for (request, writes) in updates(shared, private) {
        let mut completed = reference.clone();
        let expected = completed.handle(request);
        assert!(
            !matches!(expected, Reply::Error(_)),
            "{request:?}: {expected:?}"
        );
        for stop in 0..writes {
            let mut state = reference.clone();
            state.handle_interrupted(request, stop);
            assert_eq!(
                state.validate(),
                Err(StateError::UndoPending),
                "{request:?} stopped after {stop}"
            );
            let report = state.repair(RepairScope::InFlight);
            assert!(report.rolled_back.is_some(), "{request:?}");
            assert_eq!(state.validate(), Ok(()), "{request:?} stopped after {stop}");
            // Rolled back to exactly the state before the update (the allocation hint aside).
            // Only the hint and the stale old values of the (disarmed) log may differ.
            state.next_hint = reference.next_hint;
            // And an allocation's pending record, written before its transaction: it now
            // names a free frame, so it does not count.
            state.pending = reference.pending;
            assert_eq!(state.undo.operation, 0);
            state.undo = reference.undo;
            assert!(*state == *reference, "{request:?} stopped after {stop}");
            // The retry starts from a consistent state and does what the update does.
            assert_eq!(state.handle(request), expected, "{request:?} retried");
            assert!(state.frames == completed.frames && state.shares == completed.shares);
            assert!(state.usage == completed.usage, "{request:?} retried");
            assert!(
                state.grant_usage == completed.grant_usage,
                "{request:?} retried"
            );
        }
        // An update that completed leaves no log: repair changes nothing.
        let mut done = completed.clone();
        assert_eq!(done.repair(RepairScope::InFlight), RepairReport::default());
        assert!(done == completed);
    }
}

#[test]
fn a_log_written_but_not_yet_armed_is_ignored() {
    // A failure inside `begin`, before the operation byte is set: nothing was changed yet.
    let (mut state, _, private) = busy();
    let before = state.clone();
    state.undo.frame = 3;
    state.undo.old_frame = FrameEntry {
        owner: 9,
        kind: 1,
        validated: 0,
        refcount: 1,
    };
    state.undo.usage_owner = 9;
    assert_eq!(state.repair(RepairScope::InFlight).rolled_back, None);
    assert!(state.frames == before.frames && state.usage == before.usage);
    assert_eq!(info(&mut state, private).owner, Some(1));
}

type Corruption = (&'static str, fn(&mut MemoryState), StateError);

fn corruptions() -> Vec<Corruption> {
    vec![
        ("base", |s| s.base = u32::MAX - 5, StateError::BadBase),
        (
            "undo pending",
            |s| s.undo.operation = 2,
            StateError::UndoPending,
        ),
        ("undo byte", |s| s.undo.operation = 9, StateError::BadUndo),
        (
            "kind byte",
            |s| s.frames[1].kind = 7,
            StateError::BadKind { frame: 1 },
        ),
        (
            "free frame owned",
            |s| s.frames[5].owner = 2,
            StateError::BadFreeFrame { frame: 5 },
        ),
        (
            "free frame validated",
            |s| s.frames[6].validated = 1,
            StateError::BadFreeFrame { frame: 6 },
        ),
        (
            "owner out of range",
            |s| s.frames[1].owner = 100,
            StateError::BadOwnedFrame { frame: 1 },
        ),
        (
            "validated byte",
            |s| s.frames[1].validated = 3,
            StateError::BadOwnedFrame { frame: 1 },
        ),
        (
            "refcount up",
            |s| s.frames[0].refcount = 4,
            StateError::RefcountMismatch { frame: 0 },
        ),
        (
            "refcount down",
            |s| s.frames[1].refcount = 0,
            StateError::RefcountMismatch { frame: 1 },
        ),
        (
            "kind vs refcount",
            |s| s.frames[1].kind = FrameKind::Shared as u8,
            StateError::KindMismatch { frame: 1 },
        ),
        (
            "share in_use byte",
            |s| s.shares[0].in_use = 2,
            StateError::BadShare { slot: 0 },
        ),
        (
            "share of free frame",
            |s| s.shares[0].frame = 9,
            StateError::BadShare { slot: 0 },
        ),
        (
            "share beyond pool",
            |s| s.shares[0].frame = 5000,
            StateError::BadShare { slot: 0 },
        ),
        (
            "share with owner",
            |s| s.shares[1].with = 1,
            StateError::BadShare { slot: 1 },
        ),
        (
            "share with bad VM",
            |s| s.shares[1].with = 64,
            StateError::BadShare { slot: 1 },
        ),
        (
            "duplicate share",
            |s| s.shares[1].with = 2,
            StateError::DuplicateShare { slot: 1 },
        ),
        (
            "share lost",
            |s| s.shares[1].in_use = 0,
            StateError::RefcountMismatch { frame: 0 },
        ),
        (
            "usage",
            |s| s.usage[1] = 3,
            StateError::UsageMismatch { owner: 1 },
        ),
        (
            "usage of nobody",
            |s| s.usage[40] = 1,
            StateError::UsageMismatch { owner: 40 },
        ),
        (
            "grant usage",
            |s| s.grant_usage[1] = 1,
            StateError::GrantUsageMismatch { owner: 1 },
        ),
        (
            "grant usage of nobody",
            |s| s.grant_usage[9] = 3,
            StateError::GrantUsageMismatch { owner: 9 },
        ),
        (
            "frames overcommitted",
            |s| s.frame_limits[20] = 1,
            StateError::Overcommitted { resource: 0 },
        ),
        (
            "share records overcommitted",
            |s| s.grant_limits[1] = 500,
            StateError::Overcommitted { resource: 1 },
        ),
    ]
}

#[test]
fn validate_catches_corruption() {
    for (name, corrupt, error) in corruptions() {
        let (mut state, _, _) = busy();
        corrupt(&mut state);
        assert_eq!(state.validate(), Err(error), "{name}");
        assert!(error.code() >> 12 != 0, "{name}");
    }
}

#[test]
fn full_repair_fixes_every_corruption() {
    for (name, corrupt, _) in corruptions() {
        let (mut state, _, _) = busy();
        corrupt(&mut state);
        let report = state.repair(RepairScope::Full);
        assert!(report.fixes() > 0, "{name}: {report:?}");
        assert_eq!(state.validate(), Ok(()), "{name}");
        assert_eq!(
            state.repair(RepairScope::Full).fixes(),
            0,
            "{name}: second repair"
        );
        // The repaired table keeps serving (a trimmed reservation is made again).
        set_quota(&mut state, 6, 1, 0);
        let frame = allocate(&mut state, 6);
        expect(&mut state, Request::Free { frame, owner: 6 }, Reply::Done);
    }
}

#[test]
fn full_repair_recomputes_counts_from_the_share_records() {
    let (mut state, shared, _) = busy();
    state.frames[0].refcount = 1;
    state.frames[0].kind = FrameKind::Ram as u8;
    state.usage[1] = 0;
    let report = state.repair(RepairScope::Full);
    assert_eq!((report.refcounts_fixed, report.usage_fixed), (1, 1));
    assert_eq!(info(&mut state, shared).refcount, 3);
    assert_eq!(state.usage[1], 2);
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn random_request(random: &mut XorShift) -> Request {
    let frame = FrameNumber(BASE - 2 + (random.next() % 40) as u32);
    let owner = (random.next() % 6) as u16;
    let with = (random.next() % 6) as u16;
    match random.next() % 8 {
        0 | 1 => Request::Allocate { owner },
        7 => Request::EptViolation {
            vm: owner,
            gfn: (random.next() % 80) as u32,
        },
        2 => Request::Free { frame, owner },
        3 => Request::Share { frame, owner, with },
        4 => Request::Unshare { frame, from: with },
        5 => Request::Query { frame },
        _ => Request::Validate { frame },
    }
}

#[test]
fn random_operations_keep_every_invariant() {
    let mut random = XorShift(0x3e3_0001);
    let mut state = fresh();
    for _ in 0..20_000 {
        let request = random_request(&mut random);
        state.handle(request);
        assert_eq!(state.validate(), Ok(()), "after {request:?}");
    }
}

#[test]
fn random_interruptions_always_roll_back() {
    let mut random = XorShift(0x1e7_0002);
    let mut state = fresh();
    for _ in 0..5_000 {
        let request = random_request(&mut random);
        let before = state.clone();
        state.handle_interrupted(request, (random.next() % 4) as u32);
        state.repair(RepairScope::InFlight);
        state.next_hint = before.next_hint;
        // Either the update completed (it made fewer writes than allowed) or it is undone.
        if state.validate().is_err() || state.undo.operation != 0 {
            panic!("{request:?} left an inconsistent state");
        }
    }
}

#[test]
fn random_bit_patterns_never_panic_and_always_repair() {
    let mut random = XorShift(0xbad_3e3);
    for round in 0..200 {
        let (mut state, _, _) = busy();
        let bytes = state.as_mut_bytes();
        if round % 2 == 0 {
            for _ in 0..6 {
                let position = (random.next() % bytes.len() as u64) as usize;
                bytes[position] ^= 1 << (random.next() % 8);
            }
        } else {
            for byte in bytes.iter_mut() {
                *byte = random.next() as u8;
            }
        }
        let mut damaged = state.clone();
        for _ in 0..50 {
            damaged.handle(random_request(&mut random));
        }
        let _ = state.validate();
        state.repair(RepairScope::Full);
        assert_eq!(state.validate(), Ok(()), "round {round}");
        assert_eq!(state.repair(RepairScope::Full).fixes(), 0, "round {round}");
    }
}

#[test]
fn the_pool_moves_only_while_empty() {
    let mut state = fresh();
    let base = state.base;
    expect(
        &mut state,
        Request::Configure {
            base: FrameNumber(base),
        },
        Reply::Done,
    );
    expect(
        &mut state,
        Request::Configure {
            base: FrameNumber(0x2_0000),
        },
        Reply::Done,
    );
    let frame = allocate(&mut state, 2);
    assert_eq!(frame.0 >> 12, 0x20);
    refused(
        &mut state,
        Request::Configure {
            base: FrameNumber(0x3_0000),
        },
        Error::PoolInUse,
    );
    refused(
        &mut state,
        Request::Configure {
            base: FrameNumber(u32::MAX),
        },
        Error::BadFrame,
    );
    expect(
        &mut state,
        Request::Configure {
            base: FrameNumber(0x2_0000),
        },
        Reply::Done,
    );
}

#[test]
fn may_map_only_owned_or_shared_frames() {
    let mut state = fresh();
    let frame = allocate(&mut state, 2);
    expect(&mut state, Request::MayMap { frame, vm: 2 }, Reply::Done);
    refused(
        &mut state,
        Request::MayMap { frame, vm: 3 },
        Error::NotOwner,
    );
    expect(
        &mut state,
        Request::Share {
            frame,
            owner: 2,
            with: 3,
        },
        Reply::Done,
    );
    expect(&mut state, Request::MayMap { frame, vm: 3 }, Reply::Done);
    refused(
        &mut state,
        Request::MayMap { frame, vm: 4 },
        Error::NotOwner,
    );
    refused(
        &mut state,
        Request::MayMap { frame, vm: MAX_VMS },
        Error::BadOwner,
    );
    let free = FrameNumber(frame.0 + 1);
    refused(
        &mut state,
        Request::MayMap { frame: free, vm: 2 },
        Error::FrameFree,
    );
    refused(
        &mut state,
        Request::MayMap {
            frame: FrameNumber(1),
            vm: 2,
        },
        Error::BadFrame,
    );
}

#[test]
fn ept_violations_back_guest_ram_on_demand_and_nothing_else() {
    let mut state = fresh();
    let last = ipc::limits::GUEST_RAM_PAGES - 1;
    for gfn in [0, 0x20, last] {
        let frame = match state.handle(Request::EptViolation { vm: 4, gfn }) {
            Reply::Allocated(frame) => frame,
            other => panic!("gfn {gfn:#x}: {other:?}"),
        };
        assert_eq!(state.validate(), Ok(()));
        let entry = info(&mut state, frame);
        assert_eq!(entry.owner, Some(4));
        assert_eq!(entry.kind, FrameKind::Ram);
        assert!(!entry.validated, "the core validates after scrubbing");
        expect(&mut state, Request::MayMap { frame, vm: 4 }, Reply::Done);
    }
    assert_eq!(state.usage[4], 3);
    // The window, above the identity map, and the far end: not RAM, so not backed.
    for gfn in [ipc::limits::GUEST_RAM_PAGES, 0x100, 0x1ff, 0x200, u32::MAX] {
        refused(
            &mut state,
            Request::EptViolation { vm: 4, gfn },
            Error::NotGuestRam,
        );
    }
    refused(
        &mut state,
        Request::EptViolation {
            vm: ipc::limits::MAX_VMS,
            gfn: 0,
        },
        Error::BadOwner,
    );
}

#[test]
fn ept_violations_stop_at_the_quota() {
    let mut state = fresh();
    // The same page again and again, each time validated (mapped) in between, so each
    // violation takes a new frame.
    for _ in 0..FRAMES_EACH {
        let frame = fault_in(&mut state, 1, 2);
        expect(&mut state, Request::Validate { frame }, Reply::Done);
    }
    refused(
        &mut state,
        Request::EptViolation { vm: 1, gfn: 2 },
        Error::QuotaExceeded,
    );
    // Not RAM is not RAM, quota or not.
    refused(
        &mut state,
        Request::EptViolation { vm: 1, gfn: 0x100 },
        Error::NotGuestRam,
    );
}

// Quotas (`ipc::quota`): reservations, per-VM exhaustion, repair, drop.

use ipc::quota::{FRAME_CAPACITY, GRANT_CAPACITY, Quota};

#[track_caller]
fn reserve(state: &mut MemoryState, vm: u16, quota: Quota) {
    set_quota(state, vm, quota.frames, quota.grants);
}

/// Allocates for `vm` until refused; returns the frames and checks the refusal.
fn allocate_until_refused(state: &mut MemoryState, vm: u16, refusal: Error) -> Vec<FrameNumber> {
    let mut frames = Vec::new();
    loop {
        match state.handle(Request::Allocate { owner: vm }) {
            Reply::Allocated(frame) => frames.push(frame),
            Reply::Error(error) => {
                assert_eq!(error, refusal, "vm {vm} after {} frames", frames.len());
                assert_eq!(state.validate(), Ok(()));
                return frames;
            }
            other => panic!("{other:?}"),
        }
    }
}

/// Shares `frames` with VM `with` until refused; returns the shares made.
fn grant_until_refused(
    state: &mut MemoryState,
    owner: u16,
    frames: &[FrameNumber],
    with: u16,
    refusal: Error,
) -> usize {
    for (made, &frame) in frames.iter().enumerate() {
        match state.handle(Request::Share { frame, owner, with }) {
            Reply::Done => {}
            Reply::Error(error) => {
                assert_eq!(error, refusal, "vm {owner} after {made} shares");
                return made;
            }
            other => panic!("{other:?}"),
        }
    }
    panic!("vm {owner}: never refused");
}

#[test]
fn a_vm_without_a_quota_gets_nothing() {
    let mut state = blank();
    refused(
        &mut state,
        Request::Allocate { owner: 3 },
        Error::QuotaExceeded,
    );
    refused(
        &mut state,
        Request::EptViolation { vm: 3, gfn: 0 },
        Error::QuotaExceeded,
    );
    reserve(
        &mut state,
        3,
        Quota {
            grants: 0,
            ..Quota::APP_VM
        },
    );
    let frame = allocate(&mut state, 3);
    refused(
        &mut state,
        Request::Share {
            frame,
            owner: 3,
            with: 4,
        },
        Error::QuotaExceeded,
    );
}

#[test]
fn reservations_over_the_capacity_are_refused() {
    let mut state = blank();
    set_quota(&mut state, 1, FRAME_CAPACITY - 100, 100);
    set_quota(&mut state, 2, 100, 28);
    // Nothing is left: a third VM cannot reserve even one frame or one share.
    refused(
        &mut state,
        Request::SetQuota {
            vm: 3,
            frames: 1,
            grants: 0,
        },
        Error::QuotaUnavailable,
    );
    refused(
        &mut state,
        Request::SetQuota {
            vm: 3,
            frames: 0,
            grants: 1,
        },
        Error::QuotaUnavailable,
    );
    refused(
        &mut state,
        Request::SetQuota {
            vm: 2,
            frames: 101,
            grants: 28,
        },
        Error::QuotaUnavailable,
    );
    refused(
        &mut state,
        Request::SetQuota {
            vm: MAX_VMS,
            frames: 0,
            grants: 0,
        },
        Error::BadOwner,
    );
    // Setting the same limits again (a retry) and lowering them always work.
    set_quota(&mut state, 2, 100, 28);
    set_quota(&mut state, 2, 50, 20);
    set_quota(&mut state, 3, 50, 8);
    assert_eq!(
        ipc::quota::committed(&state.frame_limits, &state.usage),
        u64::from(FRAME_CAPACITY)
    );
    assert_eq!(
        ipc::quota::committed(&state.grant_limits, &state.grant_usage),
        u64::from(GRANT_CAPACITY)
    );
}

#[test]
fn exhausting_vms_cannot_take_an_honest_vms_quota() {
    // Seven VMs reserve everything but an AppVM's quota and exhaust it; the eighth, honest
    // VM still gets every frame and share of its quota, and they are refused only as
    // QuotaExceeded, never OutOfFrames or ShareTableFull.
    let mut state = blank();
    let honest = 9;
    reserve(&mut state, honest, Quota::APP_VM);
    let hostile_frames = (FRAME_CAPACITY - Quota::APP_VM.frames) / 7;
    let hostile_grants = (GRANT_CAPACITY as u16 - Quota::APP_VM.grants) / 7;
    for vm in 1..=7 {
        set_quota(&mut state, vm, hostile_frames, hostile_grants);
    }
    for vm in 1..=7 {
        let frames = allocate_until_refused(&mut state, vm, Error::QuotaExceeded);
        assert_eq!(frames.len() as u32, hostile_frames);
        let shares = grant_until_refused(&mut state, vm, &frames, honest, Error::QuotaExceeded);
        assert_eq!(shares, usize::from(hostile_grants));
    }
    let frames = allocate_until_refused(&mut state, honest, Error::QuotaExceeded);
    assert_eq!(frames.len() as u32, Quota::APP_VM.frames);
    let shares = grant_until_refused(&mut state, honest, &frames, 1, Error::QuotaExceeded);
    assert_eq!(shares, usize::from(Quota::APP_VM.grants));
    // Demand paging is charged to the same quota.
    refused(
        &mut state,
        Request::EptViolation { vm: honest, gfn: 0 },
        Error::QuotaExceeded,
    );
    // Within its quota again after a free (and an unshare).
    let last = *frames.last().unwrap();
    expect(
        &mut state,
        Request::Free {
            frame: last,
            owner: honest,
        },
        Reply::Done,
    );
    assert!(matches!(
        state.handle(Request::EptViolation { vm: honest, gfn: 0 }),
        Reply::Allocated(_)
    ));
    expect(
        &mut state,
        Request::Unshare {
            frame: frames[0],
            from: 1,
        },
        Reply::Done,
    );
    expect(
        &mut state,
        Request::Share {
            frame: frames[0],
            owner: honest,
            with: 2,
        },
        Reply::Done,
    );
}

#[test]
fn dropping_a_quota_releases_the_reservation_but_not_what_is_held() {
    let mut state = blank();
    set_quota(&mut state, 1, 600, 64);
    set_quota(&mut state, 2, FRAME_CAPACITY - 600, 64);
    let held = allocate_until_refused(&mut state, 1, Error::QuotaExceeded);
    // VM 1 frees all but 10 frames, of which one stays shared, then its quota is dropped.
    for &frame in &held[10..] {
        expect(&mut state, Request::Free { frame, owner: 1 }, Reply::Done);
    }
    expect(
        &mut state,
        Request::Share {
            frame: held[0],
            owner: 1,
            with: 2,
        },
        Reply::Done,
    );
    expect(&mut state, Request::DropQuota { vm: 1 }, Reply::Done);
    expect(&mut state, Request::DropQuota { vm: 1 }, Reply::Done); // idempotent
    assert_eq!((state.frame_limits[1], state.grant_limits[1]), (0, 0));
    refused(
        &mut state,
        Request::Allocate { owner: 1 },
        Error::QuotaExceeded,
    );
    // The released reservation is free for another VM, less what VM 1 still holds.
    refused(
        &mut state,
        Request::SetQuota {
            vm: 3,
            frames: 591,
            grants: 63,
        },
        Error::QuotaUnavailable,
    );
    refused(
        &mut state,
        Request::SetQuota {
            vm: 3,
            frames: 590,
            grants: 64,
        },
        Error::QuotaUnavailable,
    );
    set_quota(&mut state, 3, 590, 63);
    // Once VM 1's last frames go, so does the rest of its reservation.
    expect(
        &mut state,
        Request::Unshare {
            frame: held[0],
            from: 2,
        },
        Reply::Done,
    );
    for &frame in &held[..10] {
        expect(&mut state, Request::Free { frame, owner: 1 }, Reply::Done);
    }
    set_quota(&mut state, 3, 600, 64);
    refused(
        &mut state,
        Request::DropQuota { vm: MAX_VMS },
        Error::BadOwner,
    );
}

#[test]
fn full_repair_rebuilds_the_counts_and_keeps_the_limits() {
    let (mut state, shared, private) = busy();
    let limits = (state.frame_limits, state.grant_limits);
    state.usage[1] = 77;
    state.grant_usage[1] = 0;
    state.grant_usage[5] = 9;
    assert_eq!(
        state.validate(),
        Err(StateError::UsageMismatch { owner: 1 })
    );
    let report = state.repair(RepairScope::Full);
    assert_eq!(report.usage_fixed, 3);
    assert_eq!(report.limits_trimmed, 0);
    assert_eq!(state.validate(), Ok(()));
    assert_eq!(
        (state.usage[1], state.grant_usage[1], state.grant_usage[5]),
        (2, 2, 0)
    );
    assert!((state.frame_limits, state.grant_limits) == limits);
    // The rebuilt counts are the ones the quota is checked against.
    for with in 3..=GRANTS_EACH {
        let frame = if with == 3 {
            private
        } else {
            allocate(&mut state, 1)
        };
        expect(
            &mut state,
            Request::Share {
                frame,
                owner: 1,
                with: if with == 3 { 4 } else { 2 },
            },
            Reply::Done,
        );
    }
    assert_eq!(state.grant_usage[1], GRANTS_EACH);
    let frame = allocate(&mut state, 1);
    refused(
        &mut state,
        Request::Share {
            frame,
            owner: 1,
            with: 2,
        },
        Error::QuotaExceeded,
    );
    let _ = shared;
}

#[test]
fn full_repair_trims_reservations_that_no_longer_fit() {
    let (mut state, _, _) = busy();
    state.frame_limits[30] = 900;
    state.grant_limits[31] = 900;
    let report = state.repair(RepairScope::Full);
    assert!(report.limits_trimmed > 0);
    assert_eq!(state.validate(), Ok(()));
    // Every limit is now at most what its VM holds: VM 1 keeps its two frames and shares.
    assert_eq!((state.frame_limits[1], state.grant_limits[1]), (2, 2));
    assert_eq!((state.frame_limits[30], state.grant_limits[31]), (0, 0));
    refused(
        &mut state,
        Request::Allocate { owner: 1 },
        Error::QuotaExceeded,
    );
    // The core can reserve again.
    set_quota(&mut state, 30, 96, 8);
}
