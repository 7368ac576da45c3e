//! Host tests of the scheduler state machine.

use super::*;
use zerocopy::FromZeros;

const A: VcpuId = VcpuId { vm: 1, vcpu: 0 };
const B: VcpuId = VcpuId { vm: 1, vcpu: 1 };
const C: VcpuId = VcpuId { vm: 2, vcpu: 0 };

fn fresh(cpus: u8) -> SchedulerState {
    let mut state = SchedulerState::new_zeroed();
    state.init(cpus);
    state
}

/// Handles `request`, checks the answer and that every invariant still holds.
#[track_caller]
fn expect(state: &mut SchedulerState, request: Request, reply: Reply) {
    assert_eq!(state.handle(request), reply, "{request:?}");
    assert_eq!(state.validate(), Ok(()), "after {request:?}");
}

/// Handles a request that must be refused with `error` and change nothing.
#[track_caller]
fn refused(state: &mut SchedulerState, request: Request, error: Error) {
    let before = state.clone();
    assert_eq!(state.handle(request), Reply::Error(error), "{request:?}");
    assert_eq!(*state, before, "a refused {request:?} changed the state");
}

fn create(state: &mut SchedulerState, vcpu: VcpuId, home_cpu: u8) {
    expect(state, Request::CreateVcpu { vcpu, home_cpu }, Reply::Done);
}

/// A state with A running on CPU 0, B queued on CPU 0, C queued on CPU 1.
fn busy() -> SchedulerState {
    let mut state = fresh(2);
    create(&mut state, A, 0);
    create(&mut state, B, 0);
    create(&mut state, C, 1);
    expect(
        &mut state,
        Request::PickNext { cpu: 0 },
        Reply::Current(Some(A)),
    );
    state
}

#[test]
fn state_layout_is_fixed() {
    assert_eq!(core::mem::size_of::<VcpuRecord>(), 16);
    assert_eq!(core::mem::size_of::<RunQueue>(), 40);
    assert_eq!(core::mem::size_of::<SchedulerState>(), 848);
}

#[test]
fn init_is_valid_and_clamps() {
    assert_eq!(fresh(4).validate(), Ok(()));
    assert_eq!(fresh(0).cpu_count, 1);
    assert_eq!(fresh(200).cpu_count, MAX_CPUS as u32);
    // Re-initialising a used state gives the same state as a fresh boot.
    let mut used = busy();
    used.init(2);
    assert_eq!(used, fresh(2));
}

#[test]
fn round_robin_on_one_cpu() {
    let mut state = busy();
    expect(
        &mut state,
        Request::PickNext { cpu: 0 },
        Reply::Current(Some(B)),
    );
    assert_eq!(state.vcpu_state(A), Some(VcpuState::Runnable));
    expect(
        &mut state,
        Request::PickNext { cpu: 0 },
        Reply::Current(Some(A)),
    );
    expect(
        &mut state,
        Request::Current { cpu: 0 },
        Reply::Current(Some(A)),
    );
    // CPU 1 is idle until it picks.
    expect(
        &mut state,
        Request::Current { cpu: 1 },
        Reply::Current(None),
    );
    expect(
        &mut state,
        Request::PickNext { cpu: 1 },
        Reply::Current(Some(C)),
    );
    // An empty runqueue keeps the current vCPU.
    expect(
        &mut state,
        Request::PickNext { cpu: 1 },
        Reply::Current(Some(C)),
    );
}

#[test]
fn yield_block_wake_account() {
    let mut state = busy();
    expect(
        &mut state,
        Request::Account { cpu: 0, ticks: 100 },
        Reply::Done,
    );
    expect(
        &mut state,
        Request::Account { cpu: 0, ticks: 50 },
        Reply::Done,
    );
    assert_eq!(state.record(A).map(|record| record.ticks), Some(150));
    expect(&mut state, Request::Yield { cpu: 0 }, Reply::Done);
    expect(
        &mut state,
        Request::Current { cpu: 0 },
        Reply::Current(None),
    );
    // Yield on an idle CPU is a no-op.
    expect(&mut state, Request::Yield { cpu: 0 }, Reply::Done);
    // FIFO: B was queued before A yielded.
    expect(
        &mut state,
        Request::PickNext { cpu: 0 },
        Reply::Current(Some(B)),
    );
    // Blocking the running vCPU frees its CPU; blocking twice is a no-op (idempotent).
    expect(&mut state, Request::Block { vcpu: B }, Reply::Done);
    expect(&mut state, Request::Block { vcpu: B }, Reply::Done);
    expect(
        &mut state,
        Request::Current { cpu: 0 },
        Reply::Current(None),
    );
    assert_eq!(state.vcpu_state(B), Some(VcpuState::Blocked));
    // Blocking a queued vCPU takes it out of the queue.
    expect(&mut state, Request::Block { vcpu: A }, Reply::Done);
    expect(
        &mut state,
        Request::PickNext { cpu: 0 },
        Reply::Current(None),
    );
    // Waking twice is a no-op (idempotent); the vCPU is queued once.
    expect(&mut state, Request::Wake { vcpu: A }, Reply::Done);
    expect(&mut state, Request::Wake { vcpu: A }, Reply::Done);
    assert_eq!(state.queues[0].length, 1);
    expect(
        &mut state,
        Request::PickNext { cpu: 0 },
        Reply::Current(Some(A)),
    );
    // Waking a running vCPU is a no-op too.
    expect(&mut state, Request::Wake { vcpu: A }, Reply::Done);
    expect(
        &mut state,
        Request::Current { cpu: 0 },
        Reply::Current(Some(A)),
    );
}

#[test]
fn affinity_moves_queued_and_later_running_vcpus() {
    let mut state = busy();
    expect(
        &mut state,
        Request::SetAffinity {
            vcpu: B,
            home_cpu: 1,
        },
        Reply::Done,
    );
    expect(
        &mut state,
        Request::SetAffinity {
            vcpu: B,
            home_cpu: 1,
        },
        Reply::Done,
    );
    assert_eq!((state.queues[0].length, state.queues[1].length), (0, 2));
    expect(
        &mut state,
        Request::PickNext { cpu: 1 },
        Reply::Current(Some(C)),
    );
    expect(
        &mut state,
        Request::PickNext { cpu: 1 },
        Reply::Current(Some(B)),
    );
    // A runs on 0 with home 1: it keeps running and is requeued on 1.
    expect(
        &mut state,
        Request::SetAffinity {
            vcpu: A,
            home_cpu: 1,
        },
        Reply::Done,
    );
    expect(
        &mut state,
        Request::Current { cpu: 0 },
        Reply::Current(Some(A)),
    );
    expect(&mut state, Request::Yield { cpu: 0 }, Reply::Done);
    assert_eq!(state.queues[1].length, 2);
}

#[test]
fn destroy_from_every_state() {
    let mut state = busy();
    expect(&mut state, Request::DestroyVcpu { vcpu: A }, Reply::Done); // running
    expect(
        &mut state,
        Request::Current { cpu: 0 },
        Reply::Current(None),
    );
    expect(&mut state, Request::DestroyVcpu { vcpu: B }, Reply::Done); // queued
    expect(&mut state, Request::Block { vcpu: C }, Reply::Done);
    expect(&mut state, Request::DestroyVcpu { vcpu: C }, Reply::Done); // blocked
    assert_eq!(state, {
        let mut empty = fresh(2);
        empty.queues = state.queues;
        empty
    });
    assert!(state.queues.iter().all(|queue| queue.length == 0));
    // The slot is reusable.
    create(&mut state, A, 1);
}

#[test]
fn every_error_path_changes_nothing() {
    let mut state = busy();
    let unknown = VcpuId { vm: 9, vcpu: 9 };
    refused(
        &mut state,
        Request::CreateVcpu {
            vcpu: C,
            home_cpu: 0,
        },
        Error::VcpuExists,
    );
    refused(
        &mut state,
        Request::CreateVcpu {
            vcpu: unknown,
            home_cpu: 2,
        },
        Error::BadCpu,
    );
    refused(
        &mut state,
        Request::DestroyVcpu { vcpu: unknown },
        Error::UnknownVcpu,
    );
    refused(
        &mut state,
        Request::Wake { vcpu: unknown },
        Error::UnknownVcpu,
    );
    refused(
        &mut state,
        Request::Block { vcpu: unknown },
        Error::UnknownVcpu,
    );
    refused(
        &mut state,
        Request::SetAffinity {
            vcpu: unknown,
            home_cpu: 0,
        },
        Error::UnknownVcpu,
    );
    refused(
        &mut state,
        Request::SetAffinity {
            vcpu: A,
            home_cpu: 7,
        },
        Error::BadCpu,
    );
    refused(&mut state, Request::Yield { cpu: 2 }, Error::BadCpu);
    refused(&mut state, Request::PickNext { cpu: 255 }, Error::BadCpu);
    refused(&mut state, Request::Current { cpu: 8 }, Error::BadCpu);
    refused(
        &mut state,
        Request::Account { cpu: 3, ticks: 1 },
        Error::BadCpu,
    );
    refused(
        &mut state,
        Request::Account { cpu: 1, ticks: 1 },
        Error::Idle,
    );
    // A destroyed vCPU is unknown afterwards (DestroyVcpu is not idempotent).
    expect(&mut state, Request::DestroyVcpu { vcpu: B }, Reply::Done);
    refused(
        &mut state,
        Request::DestroyVcpu { vcpu: B },
        Error::UnknownVcpu,
    );
}

#[test]
fn table_full() {
    let mut state = fresh(MAX_CPUS as u8);
    for index in 0..MAX_VCPUS {
        let vcpu = VcpuId {
            vm: index as u16,
            vcpu: 0,
        };
        create(&mut state, vcpu, (index % MAX_CPUS) as u8);
    }
    refused(
        &mut state,
        Request::CreateVcpu {
            vcpu: VcpuId { vm: 999, vcpu: 0 },
            home_cpu: 0,
        },
        Error::TableFull,
    );
    // All 32 in one queue fit too.
    let mut one = fresh(1);
    for index in 0..MAX_VCPUS {
        create(
            &mut one,
            VcpuId {
                vm: 0,
                vcpu: index as u16,
            },
            0,
        );
    }
    for _ in 0..3 * MAX_VCPUS {
        assert!(matches!(
            one.handle(Request::PickNext { cpu: 0 }),
            Reply::Current(Some(_))
        ));
        assert_eq!(one.validate(), Ok(()));
    }
}

/// A named corruption of a busy state and the invariant `validate` must report.
type Corruption = (&'static str, fn(&mut SchedulerState), StateError);

/// Corruptions of a busy state, each with the invariant `validate` must report.
fn corruptions() -> Vec<Corruption> {
    vec![
        ("cpu count 0", |s| s.cpu_count = 0, StateError::BadCpuCount),
        ("cpu count 9", |s| s.cpu_count = 9, StateError::BadCpuCount),
        (
            "state byte",
            |s| s.records[1].state = 7,
            StateError::BadVcpuState { slot: 1 },
        ),
        (
            "home cpu",
            |s| s.records[2].home_cpu = 5,
            StateError::BadHomeCpu { slot: 2 },
        ),
        (
            "duplicate id",
            |s| s.records[1].vcpu = 0,
            StateError::DuplicateVcpu { slot: 1 },
        ),
        (
            "queue head",
            |s| s.queues[0].head = 40,
            StateError::BadQueue { cpu: 0 },
        ),
        (
            "queue length",
            |s| s.queues[0].length = 33,
            StateError::BadQueue { cpu: 0 },
        ),
        (
            "queue of unserved cpu",
            |s| s.queues[5].length = 1,
            StateError::BadQueue { cpu: 5 },
        ),
        (
            "queue entry slot",
            |s| s.queues[1].slots[0] = 40,
            StateError::BadQueueEntry { cpu: 1 },
        ),
        (
            "queued running vCPU",
            |s| s.queues[0].slots[usize::from(s.queues[0].head)] = 0,
            StateError::BadQueueEntry { cpu: 0 },
        ),
        (
            "queued off home",
            |s| s.queues[1].slots[0] = 1,
            StateError::BadQueueEntry { cpu: 1 },
        ),
        (
            "queued twice",
            |s| {
                let head = usize::from(s.queues[0].head);
                s.queues[0].slots[head + 1] = 1;
                s.queues[0].length = 2
            },
            StateError::RunnableNotQueuedOnce { slot: 1 },
        ),
        (
            "runnable lost",
            |s| s.queues[1].length = 0,
            StateError::RunnableNotQueuedOnce { slot: 2 },
        ),
        (
            "current slot",
            |s| s.current[0] = 50,
            StateError::BadCurrent { cpu: 0 },
        ),
        (
            "current not running",
            |s| s.current[1] = 2,
            StateError::BadCurrent { cpu: 1 },
        ),
        (
            "current on unserved cpu",
            |s| s.current[4] = 0,
            StateError::BadCurrent { cpu: 4 },
        ),
        (
            "running twice",
            |s| s.current[1] = 0,
            StateError::RunningNotCurrentOnce { slot: 0 },
        ),
        (
            "running nowhere",
            |s| s.current[0] = NO_VCPU,
            StateError::RunningNotCurrentOnce { slot: 0 },
        ),
    ]
}

#[test]
fn validate_catches_corruption() {
    for (name, corrupt, error) in corruptions() {
        let mut state = busy();
        corrupt(&mut state);
        assert_eq!(state.validate(), Err(error), "{name}");
        assert!(error.code() >> 8 != 0, "{name}");
    }
}

#[test]
fn repair_fixes_every_corruption() {
    for (name, corrupt, _) in corruptions() {
        let mut state = busy();
        corrupt(&mut state);
        let report = state.repair(None);
        assert!(report.fixes() > 0, "{name}: {report:?}");
        assert_eq!(state.validate(), Ok(()), "{name}: {state:?}");
        assert_eq!(state.repair(None).fixes(), 0, "{name}: second repair");
        // The repaired scheduler keeps serving.
        for cpu in 0..2 {
            let reply = state.handle(Request::PickNext { cpu });
            assert!(matches!(reply, Reply::Current(_)), "{name}: {reply:?}");
            assert_eq!(state.validate(), Ok(()), "{name}");
        }
    }
}

#[test]
fn repair_of_consistent_state_changes_nothing() {
    let mut state = busy();
    let before = state.clone();
    assert_eq!(state.repair(None), RepairReport::default());
    assert_eq!(
        state.repair(Some(&[Some(A), None])),
        RepairReport::default()
    );
    assert_eq!(state, before);
}

#[test]
fn repair_follows_the_cores_loaded_record() {
    // The core says CPU 0 runs B (the scheduler failed half-way through a switch from A),
    // and CPU 1 runs C.
    let mut state = busy();
    let report = state.repair(Some(&[Some(B), Some(C)]));
    assert_eq!(report.currents_changed, 2);
    assert_eq!(state.validate(), Ok(()));
    assert_eq!(
        state.handle(Request::Current { cpu: 0 }),
        Reply::Current(Some(B))
    );
    assert_eq!(
        state.handle(Request::Current { cpu: 1 }),
        Reply::Current(Some(C))
    );
    assert_eq!(state.vcpu_state(A), Some(VcpuState::Runnable));
    // A is queued again, and exactly once.
    assert_eq!(
        state.queues[0].entries().unwrap().collect::<Vec<_>>(),
        vec![0]
    );
    // An unknown or doubly loaded vCPU leaves the CPU idle.
    let mut state = busy();
    state.repair(Some(&[Some(VcpuId { vm: 7, vcpu: 7 }), None]));
    assert_eq!(
        state.handle(Request::Current { cpu: 0 }),
        Reply::Current(None)
    );
    let mut state = busy();
    state.repair(Some(&[Some(C), Some(C)]));
    assert_eq!(
        state.handle(Request::Current { cpu: 1 }),
        Reply::Current(None)
    );
    assert_eq!(state.validate(), Ok(()));
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
    let vcpu = VcpuId {
        vm: (random.next() % 3) as u16,
        vcpu: (random.next() % 12) as u16,
    };
    let cpu = (random.next() % 10) as u8;
    match random.next() % 9 {
        0 => Request::CreateVcpu {
            vcpu,
            home_cpu: cpu,
        },
        1 => Request::DestroyVcpu { vcpu },
        2 => Request::Wake { vcpu },
        3 => Request::Block { vcpu },
        4 => Request::Yield { cpu },
        5 => Request::PickNext { cpu },
        6 => Request::Current { cpu },
        7 => Request::Account {
            cpu,
            ticks: random.next(),
        },
        _ => Request::SetAffinity {
            vcpu,
            home_cpu: cpu,
        },
    }
}

#[test]
fn random_operations_keep_every_invariant() {
    let mut random = XorShift(0x5eed_0001);
    let mut state = fresh(4);
    for _ in 0..20_000 {
        let request = random_request(&mut random);
        state.handle(request);
        assert_eq!(state.validate(), Ok(()), "after {request:?}");
    }
}

#[test]
fn random_bit_patterns_never_panic_and_always_repair() {
    let mut random = XorShift(0xbad_5eed);
    for round in 0..500 {
        let mut state = busy();
        let bytes = state.as_mut_bytes();
        if round % 2 == 0 {
            // A handful of flipped bits in a good state.
            for _ in 0..4 {
                let position = (random.next() % bytes.len() as u64) as usize;
                bytes[position] ^= 1 << (random.next() % 8);
            }
        } else {
            // Garbage (what an uninitialised state region holds).
            for byte in bytes.iter_mut() {
                *byte = random.next() as u8;
            }
        }
        let mut damaged = state.clone();
        for _ in 0..50 {
            damaged.handle(random_request(&mut random));
        }
        let _ = state.validate();
        state.repair(None);
        assert_eq!(state.validate(), Ok(()), "round {round}");
        assert_eq!(state.repair(None).fixes(), 0, "round {round}");
    }
}
