//! Host tests of the frame table.

use super::*;
use zerocopy::FromZeros;

const BASE: u32 = 0x1000;

fn fresh() -> Box<MemoryState> {
    let mut state = Box::new(MemoryState::new_zeroed());
    state.init(FrameNumber(BASE));
    state
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
    assert_eq!(core::mem::size_of::<MemoryState>(), 7460);
}

#[test]
fn init_is_valid_and_is_the_reboot_path() {
    let state = fresh();
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
    for index in 0..POOL_FRAMES {
        allocate(&mut state, (index % 64) as u16);
    }
    refused(
        &mut state,
        Request::Allocate { owner: 0 },
        Error::OutOfFrames,
    );
    expect(
        &mut state,
        Request::Free {
            frame: FrameNumber(BASE + 500),
            owner: 500 % 64,
        },
        Reply::Done,
    );
    assert_eq!(allocate(&mut state, 9), FrameNumber(BASE + 500));
    assert_eq!(state.usage.iter().sum::<u32>(), POOL_FRAMES as u32);
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

#[test]
fn share_table_full() {
    let mut state = fresh();
    let mut shared = 0;
    'outer: for _ in 0..POOL_FRAMES {
        let frame = allocate(&mut state, 0);
        for with in 1..MAX_VMS {
            if shared == MAX_SHARES {
                refused(
                    &mut state,
                    Request::Share {
                        frame,
                        owner: 0,
                        with,
                    },
                    Error::ShareTableFull,
                );
                break 'outer;
            }
            expect(
                &mut state,
                Request::Share {
                    frame,
                    owner: 0,
                    with,
                },
                Reply::Done,
            );
            shared += 1;
        }
    }
    assert_eq!(shared, MAX_SHARES);
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
            3,
        ),
        (
            Request::Share {
                frame: shared,
                owner: 1,
                with: 7,
            },
            3,
        ),
        (
            Request::Unshare {
                frame: shared,
                from: 2,
            },
            3,
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
            assert_eq!(state.undo.operation, 0);
            state.undo = reference.undo;
            assert!(*state == *reference, "{request:?} stopped after {stop}");
            // The retry starts from a consistent state and does what the update does.
            assert_eq!(state.handle(request), expected, "{request:?} retried");
            assert!(state.frames == completed.frames && state.shares == completed.shares);
            assert!(state.usage == completed.usage, "{request:?} retried");
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
        // The repaired table keeps serving.
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
    for gfn in [0, 0x3f, last] {
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
fn ept_violations_stop_at_an_empty_pool() {
    let mut state = fresh();
    for _ in 0..POOL_FRAMES {
        assert!(matches!(
            state.handle(Request::EptViolation { vm: 1, gfn: 2 }),
            Reply::Allocated(_)
        ));
    }
    refused(
        &mut state,
        Request::EptViolation { vm: 1, gfn: 2 },
        Error::OutOfFrames,
    );
}
