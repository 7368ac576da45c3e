//! Host tests of the dispatcher, with fake services.

use super::*;
use ipc::hypercall::CONSOLE_WRITE;
use std::panic::{AssertUnwindSafe, catch_unwind};
use zerocopy::FromZeros;

/// Fake services: a memory domain handing out frames from 100 up, a timer domain handing out
/// ids from 1 up, a scheduler whose CPU 0 runs VM 1 vCPU 0. Every call is recorded; a call can
/// be made to fail (`fail_at`: the n-th call, counted from 0) with a status, or to panic (as if
/// the hypercall domain itself failed while waiting).
#[derive(Default)]
struct Fake {
    calls: std::vec::Vec<String>,
    next_frame: u32,
    next_timer: u32,
    fail_at: Option<(usize, Option<CallError>)>,
    memory_answer: Option<memory::Reply>,
}

impl Fake {
    fn record(&mut self, call: String) -> Result<(), CallError> {
        let index = self.calls.len();
        self.calls.push(call);
        match self.fail_at {
            Some((at, Some(error))) if at == index => Err(error),
            Some((at, None)) if at == index => panic!("the hypercall domain fails"),
            _ => Ok(()),
        }
    }
}

impl Services for Fake {
    fn scheduler(&mut self, request: scheduler::Request) -> Result<scheduler::Reply, CallError> {
        self.record(format!("{request:?}"))?;
        Ok(match request {
            scheduler::Request::Current { cpu: 0 } => {
                scheduler::Reply::Current(Some(VcpuId { vm: 1, vcpu: 0 }))
            }
            scheduler::Request::Current { .. } => scheduler::Reply::Current(None),
            _ => scheduler::Reply::Done,
        })
    }

    fn memory(&mut self, request: memory::Request) -> Result<memory::Reply, CallError> {
        self.record(format!("{request:?}"))?;
        if let Some(answer) = self.memory_answer {
            return Ok(answer);
        }
        Ok(match request {
            memory::Request::Allocate { .. } => {
                self.next_frame += 1;
                memory::Reply::Allocated(FrameNumber(99 + self.next_frame))
            }
            memory::Request::Query { frame } => memory::Reply::Frame(memory::FrameInfo {
                owner: Some(1),
                kind: memory::FrameKind::Shared,
                refcount: 2,
                validated: frame.0 % 2 == 0,
            }),
            _ => memory::Reply::Done,
        })
    }

    fn timer(&mut self, request: timer::Request) -> Result<timer::Reply, CallError> {
        self.record(format!("{request:?}"))?;
        self.next_timer += 1;
        Ok(timer::Reply::Armed(ipc::timer::TimerId(self.next_timer)))
    }

    fn console(&mut self, vm: u16, text: &str) {
        let _ = self.record(format!("console vm {vm}: {text}"));
    }
}

fn fresh() -> Box<HypercallState> {
    let mut state = Box::new(HypercallState::new_zeroed());
    state.init();
    state
}

fn hypercall(number: u64, args: [u64; 6]) -> Request {
    Request::Hypercall {
        cpu: 0,
        vm: 1,
        vcpu: 0,
        number,
        args,
    }
}

fn entry(number: u64, arg0: u64, arg1: u64) -> MulticallEntry {
    MulticallEntry {
        number: number as u16,
        args: [arg0, arg1],
    }
}

fn multicall(vcpu: u16, batch: u32, entries: &[MulticallEntry]) -> Request {
    Request::Multicall {
        cpu: 0,
        vm: 1,
        vcpu,
        batch,
        entries: Vec::from_slice(entries).unwrap(),
    }
}

fn outcomes(reply: Reply) -> std::vec::Vec<EntryOutcome> {
    match reply {
        Reply::Multicall(outcomes) => outcomes.to_vec(),
        other => panic!("not a multicall reply: {other:?}"),
    }
}

#[test]
fn state_layout_is_fixed() {
    assert_eq!(core::mem::size_of::<MulticallLog>(), 96);
    assert_eq!(core::mem::size_of::<HypercallState>(), 3080);
}

#[test]
fn each_hypercall_reaches_its_service() {
    let mut state = fresh();
    let mut fake = Fake::default();
    let cases = [
        (hypercall(NULL, [0; 6]), Reply::Complete { value: 0 }),
        (
            hypercall(MEMORY_POPULATE, [0; 6]),
            Reply::Complete { value: 100 },
        ),
        (
            hypercall(MEMORY_RELEASE, [100, 0, 0, 0, 0, 0]),
            Reply::Complete { value: 0 },
        ),
        (
            hypercall(GRANT, [100, 2, 0, 0, 0, 0]),
            Reply::Complete { value: 0 },
        ),
        (
            hypercall(TIMER_ONESHOT, [5000, 9, 0, 0, 0, 0]),
            Reply::Complete { value: 1 },
        ),
        (
            hypercall(QUERY_FRAME, [100, 0, 0, 0, 0, 0]),
            Reply::Complete {
                value: 1 | 2 << 16 | 2 << 32 | 1 << 40,
            },
        ),
        (hypercall(YIELD, [0; 6]), Reply::Blocked),
    ];
    for (request, expected) in cases {
        assert_eq!(
            state.dispatch(request.clone(), &mut fake),
            expected,
            "{request:?}"
        );
    }
    assert_eq!(
        fake.calls,
        [
            "Allocate { owner: 1 }",
            "Free { frame: FrameNumber(100), owner: 1 }",
            "Share { frame: FrameNumber(100), owner: 1, with: 2 }",
            "SetOneShot { cpu: 0, deadline: 5000, cookie: 9 }",
            "Query { frame: FrameNumber(100) }",
            "Current { cpu: 0 }",
            "Yield { cpu: 0 }",
        ]
    );
    // The dispatcher's state is untouched by single hypercalls.
    assert!(*state == *fresh());
}

#[test]
fn bad_calls_are_refused_before_any_service_is_asked() {
    let mut state = fresh();
    let mut fake = Fake::default();
    let bad_caller = |cpu, vm, vcpu| Request::Hypercall {
        cpu,
        vm,
        vcpu,
        number: NULL,
        args: [0; 6],
    };
    let cases = [
        (hypercall(12, [0; 6]), HypercallError::BadNumber),
        (
            hypercall(CONSOLE_WRITE, [0x5000, 4, 0, 0, 0, 0]),
            HypercallError::BadNumber,
        ),
        (hypercall(u64::MAX, [0; 6]), HypercallError::BadNumber),
        (hypercall(MULTICALL, [0; 6]), HypercallError::BadNumber),
        (bad_caller(8, 1, 0), HypercallError::BadVcpu),
        (bad_caller(0, MAX_VMS, 0), HypercallError::BadVcpu),
        (bad_caller(0, 1, MAX_VCPUS_PER_VM), HypercallError::BadVcpu),
        (
            hypercall(NULL, [0, 0, 0, 0, 0, 1]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(MEMORY_POPULATE, [1 << 32, 0, 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(MEMORY_POPULATE, [0x100, 1, 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(VM_EXIT, [2, 0, 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(MAP_GRANT, [5, 1 << 32, 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(UNMAP_GRANT, [1 << 40, 0, 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(MEMORY_RELEASE, [1 << 32, 0, 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(MEMORY_RELEASE, [5, 1, 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(GRANT, [5, u64::from(MAX_VMS), 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(GRANT, [5, 1 << 16, 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(TIMER_ONESHOT, [5, 1 << 32, 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(QUERY_FRAME, [u64::MAX, 0, 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
    ];
    for (request, error) in cases {
        assert_eq!(
            state.dispatch(request.clone(), &mut fake),
            Reply::Error(error),
            "{request:?}"
        );
    }
    assert!(fake.calls.is_empty(), "{:?}", fake.calls);
    let batch = multicall(0, 1, &[entry(NULL, 0, 0)]);
    let Request::Multicall { entries, .. } = batch else {
        unreachable!()
    };
    let bad_batch = Request::Multicall {
        cpu: 0,
        vm: 99,
        vcpu: 0,
        batch: 1,
        entries,
    };
    assert_eq!(
        state.dispatch(bad_batch, &mut fake),
        Reply::Error(HypercallError::BadVcpu)
    );
    assert!(*state == *fresh());
}

#[test]
fn yield_from_a_vcpu_that_is_not_running_is_refused() {
    let mut state = fresh();
    let mut fake = Fake::default();
    let other = Request::Hypercall {
        cpu: 0,
        vm: 1,
        vcpu: 1,
        number: YIELD,
        args: [0; 6],
    };
    assert_eq!(
        state.dispatch(other, &mut fake),
        Reply::Error(HypercallError::BadVcpu)
    );
    assert_eq!(fake.calls, ["Current { cpu: 0 }"]);
}

#[test]
fn service_errors_become_guest_errors() {
    let mut state = fresh();
    let cases = [
        (memory::Error::NotOwner, HypercallError::PermissionDenied),
        (memory::Error::StillShared, HypercallError::InUse),
        (memory::Error::FrameFree, HypercallError::NotFound),
        (memory::Error::OutOfFrames, HypercallError::NoResources),
        (memory::Error::SelfShare, HypercallError::PermissionDenied),
        (memory::Error::Inconsistent, HypercallError::Internal),
    ];
    for (error, expected) in cases {
        let mut fake = Fake {
            memory_answer: Some(memory::Reply::Error(error)),
            ..Fake::default()
        };
        let reply = state.dispatch(hypercall(MEMORY_RELEASE, [7, 0, 0, 0, 0, 0]), &mut fake);
        assert_eq!(reply, Reply::Error(expected), "{error:?}");
    }
    // A reply of the wrong kind is the service's bug, not the guest's.
    let mut fake = Fake {
        memory_answer: Some(memory::Reply::Done),
        ..Fake::default()
    };
    let reply = state.dispatch(hypercall(QUERY_FRAME, [7, 0, 0, 0, 0, 0]), &mut fake);
    assert_eq!(reply, Reply::Complete { value: 0 });
    let mut fake = Fake {
        memory_answer: Some(memory::Reply::Stats(memory::MemoryStats {
            total: 0,
            free: 0,
            shared: 0,
        })),
        ..Fake::default()
    };
    let reply = state.dispatch(hypercall(MEMORY_POPULATE, [0; 6]), &mut fake);
    assert_eq!(reply, Reply::Error(HypercallError::Internal));
}

#[test]
fn a_failed_service_makes_the_call_incomplete() {
    let mut state = fresh();
    for (error, expected) in [
        (CallError::PeerRestarted, Reply::Incomplete),
        (CallError::PeerFailed, Reply::Incomplete),
        (CallError::Busy, Reply::Incomplete),
        (
            CallError::NoCapability,
            Reply::Error(HypercallError::Internal),
        ),
        (CallError::Malformed, Reply::Error(HypercallError::Internal)),
    ] {
        let mut fake = Fake {
            fail_at: Some((0, Some(error))),
            ..Fake::default()
        };
        let reply = state.dispatch(hypercall(TIMER_ONESHOT, [1, 1, 0, 0, 0, 0]), &mut fake);
        assert_eq!(reply, expected, "{error:?}");
    }
}

fn populate_batch() -> [MulticallEntry; 4] {
    [entry(MEMORY_POPULATE, 0, 0); 4]
}

#[test]
fn multicall_runs_every_entry_with_its_own_status() {
    let mut state = fresh();
    let mut fake = Fake::default();
    let batch = [
        entry(MEMORY_POPULATE, 0, 0),
        entry(99, 0, 0),
        entry(MULTICALL, 0, 0),
        entry(YIELD, 0, 0),
        entry(TIMER_ONESHOT, 10, 3),
        entry(GRANT, 100, 1 << 20),
    ];
    let reply = state.dispatch(multicall(0, 7, &batch), &mut fake);
    assert_eq!(
        outcomes(reply),
        [
            EntryOutcome::Complete(100),
            EntryOutcome::Error(HypercallError::BadNumber),
            EntryOutcome::Error(HypercallError::NestedMulticall),
            EntryOutcome::Error(HypercallError::InvalidArgument),
            EntryOutcome::Complete(1),
            EntryOutcome::Error(HypercallError::InvalidArgument),
        ]
    );
    assert_eq!(fake.calls.len(), 2);
    assert_eq!(state.validate(), Ok(()));
    assert_eq!(
        state.log(1, 0).map(|log| log.state),
        Some(LogState::Done as u8)
    );
}

#[test]
fn a_retried_batch_skips_entries_completed_before_a_service_failed() {
    let mut state = fresh();
    // The memory domain fails on the third allocation.
    let mut fake = Fake {
        fail_at: Some((2, Some(CallError::PeerRestarted))),
        ..Fake::default()
    };
    let request = multicall(0, 42, &populate_batch());
    assert_eq!(
        state.dispatch(request.clone(), &mut fake),
        Reply::Incomplete
    );
    assert_eq!(state.log(1, 0).map(|log| log.completed), Some(0b0011));
    assert_eq!(state.validate(), Ok(()));
    // The guest re-issues the same batch after recovery: entries 0 and 1 are not repeated.
    fake.fail_at = None;
    let reply = state.dispatch(request.clone(), &mut fake);
    assert_eq!(
        outcomes(reply),
        [100, 101, 102, 103].map(EntryOutcome::Complete).to_vec()
    );
    assert_eq!(
        fake.calls.len(),
        3 + 2,
        "two allocations before, the failed one, two after"
    );
    assert_eq!(fake.next_frame, 4, "four frames allocated in all, not six");
    // A retry after the reply was lost answers the same outcomes and calls nothing.
    let reply = state.dispatch(request, &mut fake);
    assert_eq!(outcomes(reply).len(), 4);
    assert_eq!(fake.calls.len(), 5);
    // The vCPU's next batch starts over.
    let reply = state.dispatch(multicall(0, 43, &populate_batch()), &mut fake);
    assert_eq!(outcomes(reply)[0], EntryOutcome::Complete(104));
}

#[test]
fn a_retried_batch_skips_entries_completed_before_the_domain_itself_failed() {
    let mut state = fresh();
    // The hypercall domain fails (panics) while waiting for the third allocation.
    let mut fake = Fake {
        fail_at: Some((2, None)),
        ..Fake::default()
    };
    let request = multicall(0, 5, &populate_batch());
    let failed = catch_unwind(AssertUnwindSafe(|| {
        state.dispatch(request.clone(), &mut fake)
    }));
    assert!(failed.is_err());
    // Microreset: the state stays in place; the repair keeps the batch in progress.
    let report = state.repair();
    assert_eq!(
        report,
        RepairReport {
            logs_dropped: 0,
            batches_in_progress: 1
        }
    );
    assert_eq!(state.validate(), Ok(()));
    // Microreboot: the state region is all that survives; a copy of its bytes stands for it.
    let mut rebooted = HypercallState::read_from_bytes(state.as_bytes()).unwrap();
    assert_eq!(rebooted.validate(), Ok(()));
    fake.fail_at = None;
    let reply = rebooted.dispatch(request, &mut fake);
    assert_eq!(
        outcomes(reply),
        [100, 101, 102, 103].map(EntryOutcome::Complete).to_vec()
    );
    // The allocation the failure interrupted was issued again (the memory domain's undo log
    // is what makes that safe); the two completed ones were not.
    assert_eq!(fake.calls.len(), 3 + 2);
}

#[test]
fn a_reused_batch_number_with_other_entries_starts_over() {
    let mut state = fresh();
    let mut fake = Fake::default();
    state.dispatch(multicall(0, 9, &populate_batch()), &mut fake);
    let other = [entry(NULL, 0, 0), entry(MEMORY_POPULATE, 0, 0)];
    let reply = state.dispatch(multicall(0, 9, &other), &mut fake);
    assert_eq!(
        outcomes(reply),
        [EntryOutcome::Complete(0), EntryOutcome::Complete(104)]
    );
}

#[test]
fn logs_are_per_vcpu_and_bounded() {
    let mut state = fresh();
    // Fill every log with a batch left in progress (its service fails at once).
    let mut callers = std::vec::Vec::new();
    for vm in 0..MAX_VMS {
        for vcpu in 0..MAX_VCPUS_PER_VM {
            callers.push((vm, vcpu));
        }
    }
    for &(vm, vcpu) in callers.iter().take(MAX_LOGS) {
        let mut fake = Fake {
            fail_at: Some((0, Some(CallError::PeerRestarted))),
            ..Fake::default()
        };
        let request = Request::Multicall {
            cpu: 0,
            vm,
            vcpu,
            batch: 1,
            entries: Vec::from_slice(&populate_batch()).unwrap(),
        };
        assert_eq!(state.dispatch(request, &mut fake), Reply::Incomplete);
    }
    let (vm, vcpu) = callers[MAX_LOGS];
    let one_more = Request::Multicall {
        cpu: 0,
        vm,
        vcpu,
        batch: 1,
        entries: Vec::from_slice(&populate_batch()).unwrap(),
    };
    let mut fake = Fake::default();
    let before = state.clone();
    assert_eq!(
        state.dispatch(one_more.clone(), &mut fake),
        Reply::Error(HypercallError::Busy)
    );
    assert!(state == before);
    // Once one batch finishes, its done log can be evicted for a new vCPU.
    let (first_vm, first_vcpu) = callers[0];
    let finish = Request::Multicall {
        cpu: 0,
        vm: first_vm,
        vcpu: first_vcpu,
        batch: 1,
        entries: Vec::from_slice(&populate_batch()).unwrap(),
    };
    assert_eq!(outcomes(state.dispatch(finish, &mut fake)).len(), 4);
    assert_eq!(outcomes(state.dispatch(one_more, &mut fake)).len(), 4);
    assert_eq!(state.validate(), Ok(()));
}

type Corruption = (&'static str, fn(&mut HypercallState), StateError);

fn corruptions() -> std::vec::Vec<Corruption> {
    vec![
        (
            "state byte",
            |s| s.logs[0].state = 3,
            StateError::BadLogState { slot: 0 },
        ),
        (
            "count",
            |s| s.logs[0].count = 9,
            StateError::BadCompletion { slot: 0 },
        ),
        (
            "mask beyond count",
            |s| s.logs[0].completed = 0b1_0000,
            StateError::BadCompletion { slot: 0 },
        ),
        (
            "done but incomplete",
            |s| s.logs[1].completed = 0b0111,
            StateError::BadCompletion { slot: 1 },
        ),
        (
            "outcome",
            |s| s.logs[1].outcomes[2] = 200,
            StateError::BadOutcome { slot: 1 },
        ),
        (
            "vm",
            |s| s.logs[0].vm = MAX_VMS,
            StateError::BadCaller { slot: 0 },
        ),
        (
            "vcpu",
            |s| s.logs[1].vcpu = 100,
            StateError::BadCaller { slot: 1 },
        ),
        (
            "duplicate caller",
            |s| s.logs[1].vcpu = 0,
            StateError::DuplicateCaller { slot: 1 },
        ),
    ]
}

/// Log 0: vCPU 0's batch stopped after two entries; log 1: vCPU 1's batch done.
fn busy() -> Box<HypercallState> {
    let mut state = fresh();
    let mut failing = Fake {
        fail_at: Some((2, Some(CallError::PeerRestarted))),
        ..Fake::default()
    };
    state.dispatch(multicall(0, 1, &populate_batch()), &mut failing);
    state.dispatch(multicall(1, 1, &populate_batch()), &mut Fake::default());
    assert_eq!(state.validate(), Ok(()));
    state
}

#[test]
fn validate_catches_corruption() {
    for (name, corrupt, error) in corruptions() {
        let mut state = busy();
        corrupt(&mut state);
        assert_eq!(state.validate(), Err(error), "{name}");
        assert!(error.code() >> 8 != 0);
    }
}

#[test]
fn repair_drops_only_broken_logs() {
    for (name, corrupt, error) in corruptions() {
        let mut state = busy();
        corrupt(&mut state);
        let report = state.repair();
        assert_eq!(report.logs_dropped, 1, "{name}");
        assert_eq!(state.validate(), Ok(()), "{name}");
        let (StateError::BadLogState { slot }
        | StateError::BadCompletion { slot }
        | StateError::BadOutcome { slot }
        | StateError::BadCaller { slot }
        | StateError::DuplicateCaller { slot }) = error;
        let other = 1 - usize::from(slot);
        assert_ne!(
            state.logs[other].state,
            LogState::Free as u8,
            "{name}: kept the good log"
        );
        assert_eq!(state.repair().fixes(), 0, "{name}");
    }
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

#[test]
fn random_bit_patterns_never_panic_and_always_repair() {
    let mut random = XorShift(0xbad_4c11);
    for round in 0..300 {
        let mut state = busy();
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
        for vcpu in 0..3 {
            let _ = damaged.dispatch(multicall(vcpu, 1, &populate_batch()), &mut Fake::default());
        }
        let _ = state.validate();
        state.repair();
        assert_eq!(state.validate(), Ok(()), "round {round}");
        assert_eq!(state.repair().fixes(), 0, "round {round}");
    }
}

#[test]
fn console_lines_are_made_printable_and_empty_ones_refused() {
    let mut state = fresh();
    let mut fake = Fake::default();
    let request = |text: &[u8]| Request::Console {
        cpu: 0,
        vm: 3,
        vcpu: 0,
        text: Vec::from_slice(text).unwrap(),
    };
    assert_eq!(
        state.dispatch(request(b"ok \x1b[2J\n"), &mut fake),
        Reply::Complete { value: 8 }
    );
    assert_eq!(fake.calls, ["console vm 3: ok ?[2J?"]);
    assert_eq!(
        state.dispatch(request(b""), &mut fake),
        Reply::Error(HypercallError::InvalidArgument)
    );
    assert_eq!(fake.calls.len(), 1);
}

#[test]
fn vm_exit_removes_the_vcpu_and_a_retry_still_blocks() {
    let mut state = fresh();
    let mut fake = Fake::default();
    let exit = Request::Hypercall {
        cpu: 0,
        vm: 1,
        vcpu: 0,
        number: VM_EXIT,
        args: [0, 0xabc, 0, 0, 0, 0],
    };
    assert_eq!(state.dispatch(exit, &mut fake), Reply::Blocked);
    assert_eq!(
        fake.calls,
        ["DestroyVcpu { vcpu: VcpuId { vm: 1, vcpu: 0 } }"]
    );
}

#[test]
fn map_grant_asks_the_memory_domain_and_batches_refuse_ept_changes() {
    let mut state = fresh();
    let mut fake = Fake::default();
    let map = Request::Hypercall {
        cpu: 0,
        vm: 1,
        vcpu: 0,
        number: MAP_GRANT,
        args: [0x10005, 0x120, 0, 0, 0, 0],
    };
    assert_eq!(state.dispatch(map, &mut fake), Reply::Complete { value: 0 });
    assert_eq!(fake.calls, ["MayMap { frame: FrameNumber(65541), vm: 1 }"]);
    let batch = multicall(
        0,
        1,
        &[
            entry(MAP_GRANT, 0x10005, 0x120),
            entry(UNMAP_GRANT, 0x120, 0),
        ],
    );
    assert_eq!(
        state.dispatch(batch, &mut fake),
        Reply::Multicall(
            Vec::from_slice(&[
                EntryOutcome::Error(HypercallError::InvalidArgument),
                EntryOutcome::Error(HypercallError::InvalidArgument)
            ])
            .unwrap()
        )
    );
    assert_eq!(fake.calls.len(), 1);
}
