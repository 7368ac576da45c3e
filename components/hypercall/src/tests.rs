//! Host tests of the dispatcher, with fake services.

use super::*;
use ipc::hypercall::{CONSOLE_WRITE, VM_CREATE, VM_DESTROY, VM_START, VM_STATUS, timer_target};
use std::panic::{AssertUnwindSafe, catch_unwind};
use zerocopy::FromZeros;

/// Fake services: a memory domain handing out frames from 100 up (every frame owned by VM 1
/// when queried), a timer domain handing out ids from 1 up, a scheduler whose CPU 0 runs VM 1
/// vCPU 0. Every call is recorded; a call can be made to fail (`fail_at`: the n-th call,
/// counted from 0) with a status, or to panic (as if the hypercall domain itself failed while
/// waiting); answers can be overridden (`memory_answer` for every memory request,
/// `query_answer` / `unshare_answer` for one kind, `scheduler_answer` for every scheduler
/// request but `Current`).
#[derive(Default)]
struct Fake {
    calls: std::vec::Vec<String>,
    next_frame: u32,
    next_timer: u32,
    fail_at: Option<(usize, Option<CallError>)>,
    memory_answer: Option<memory::Reply>,
    query_answer: Option<memory::Reply>,
    unshare_answer: Option<memory::Reply>,
    scheduler_answer: Option<scheduler::Reply>,
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
            _ => self.scheduler_answer.unwrap_or(scheduler::Reply::Done),
        })
    }

    fn memory(&mut self, request: memory::Request) -> Result<memory::Reply, CallError> {
        self.record(format!("{request:?}"))?;
        if let Some(answer) = self.memory_answer {
            return Ok(answer);
        }
        Ok(match request {
            memory::Request::Query { .. } if self.query_answer.is_some() => {
                self.query_answer.unwrap_or(memory::Reply::Done)
            }
            memory::Request::Unshare { .. } if self.unshare_answer.is_some() => {
                self.unshare_answer.unwrap_or(memory::Reply::Done)
            }
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

/// A state just initialised: no log, no channel, no quota.
fn blank() -> Box<HypercallState> {
    let mut state = Box::new(HypercallState::new_zeroed());
    state.init();
    state
}

/// VMs `0..QUOTA_VMS` of [`fresh`] hold an equal share of the channel table.
const QUOTA_VMS: u16 = 8;
const PORTS_EACH: u16 = (MAX_CHANNELS / QUOTA_VMS as usize) as u16;

/// A state whose VMs `0..QUOTA_VMS` reserved an equal share of the channel table.
fn fresh() -> Box<HypercallState> {
    let mut state = blank();
    for vm in 0..QUOTA_VMS {
        set_quota(&mut state, vm, PORTS_EACH);
    }
    state
}

#[track_caller]
fn set_quota(state: &mut HypercallState, vm: u16, event_ports: u16) {
    assert_eq!(
        state.dispatch(Request::SetQuota { vm, event_ports }, &mut Fake::default()),
        Reply::Complete { value: 0 },
        "quota of {event_ports} ports for VM {vm}"
    );
    assert_eq!(state.validate(), Ok(()));
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

/// A hypercall with two arguments from vCPU `vcpu` of VM `vm` (on CPU 0).
fn call_as(vm: u16, vcpu: u16, number: u64, arg0: u64, arg1: u64) -> Request {
    Request::Hypercall {
        cpu: 0,
        vm,
        vcpu,
        number,
        args: [arg0, arg1, 0, 0, 0, 0],
    }
}

/// The value of a completed call.
fn value(reply: Reply) -> i64 {
    match reply {
        Reply::Complete { value } => value,
        other => panic!("not completed: {other:?}"),
    }
}

#[test]
fn state_layout_is_fixed() {
    assert_eq!(core::mem::size_of::<MulticallLog>(), 96);
    assert_eq!(core::mem::size_of::<ChannelEnd>(), 4);
    assert_eq!(core::mem::size_of::<EventChannel>(), 12);
    assert_eq!(core::mem::size_of::<HypercallState>(), 4680);
}

#[test]
fn the_state_fits_the_manifests_state_region() {
    let manifest = include_str!("../../../system.toml");
    let entry = manifest
        .split("[[domain]]")
        .find(|entry| entry.contains("name = \"hypercall\""))
        .expect("the manifest lists the hypercall domain");
    let pages: usize = entry
        .lines()
        .find_map(|line| line.trim().strip_prefix("state_pages = "))
        .and_then(|pages| pages.trim().parse().ok())
        .expect("the hypercall domain has state_pages");
    assert!(core::mem::size_of::<HypercallState>() <= pages * 4096);
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
            hypercall(TIMER_ONESHOT, [5000, 0x20, 0, 0, 0, 0]),
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
            "SetOneShot { cpu: 0, deadline: 5000, cookie: 65568 }",
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
        (hypercall(22, [0; 6]), HypercallError::BadNumber),
        (
            hypercall(CONSOLE_WRITE, [0x5000, 4, 0, 0, 0, 0]),
            HypercallError::BadNumber,
        ),
        // The VM control calls are the core's: they never reach this domain as hypercalls.
        (
            hypercall(VM_CREATE, [0x5000, 4096, 0x61, 0, 0, 0]),
            HypercallError::BadNumber,
        ),
        (
            hypercall(VM_START, [2, 0, 0, 0, 0, 0]),
            HypercallError::BadNumber,
        ),
        (
            hypercall(VM_STATUS, [2, 0, 0, 0, 0, 0]),
            HypercallError::BadNumber,
        ),
        (
            hypercall(VM_DESTROY, [2, 0, 0, 0, 0, 0]),
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
            hypercall(TIMER_ONESHOT, [5, VECTOR_MIN - 1, 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(TIMER_ONESHOT, [5, 256, 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(TIMER_ONESHOT, [5, 0x20, 1, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        // Event channels: the remote VM must be another VM in range, ports 1..EVENT_PORTS.
        (
            hypercall(EVTCHN_ALLOC, [1, 0, 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(EVTCHN_ALLOC, [u64::from(MAX_VMS), 0, 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(EVTCHN_ALLOC, [2, 1, 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(EVTCHN_BIND, [2, 0, 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(EVTCHN_BIND, [2, u64::from(EVENT_PORTS), 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(EVTCHN_BIND, [1, 1, 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(EVTCHN_BIND, [1 << 16, 1, 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(EVTCHN_SEND, [0, 0, 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(EVTCHN_SEND, [(1 << 16) + 1, 0, 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(EVTCHN_SEND, [1, 1, 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(EVTCHN_CLOSE, [u64::from(EVENT_PORTS), 0, 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(EVENT_WAIT, [0, 0, 0, 0, 1, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(GRANT_REVOKE, [1 << 32, 2, 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(GRANT_REVOKE, [100, 1, 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(GRANT_REVOKE, [100, u64::from(MAX_VMS), 0, 0, 0, 0]),
            HypercallError::InvalidArgument,
        ),
        (
            hypercall(GRANT_REVOKE, [100, 2, 1, 0, 0, 0]),
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
        // Over its own quota: the guest's doing, and told apart from an empty pool.
        (memory::Error::QuotaExceeded, HypercallError::QuotaExceeded),
        // Only the core sets quotas: a guest call never sees this one.
        (memory::Error::QuotaUnavailable, HypercallError::Internal),
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
        let reply = state.dispatch(hypercall(TIMER_ONESHOT, [1, 0x20, 0, 0, 0, 0]), &mut fake);
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
        entry(TIMER_ONESHOT, 10, 0x30),
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
            batches_in_progress: 1,
            ..RepairReport::default()
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

/// What a corruption breaks, what `validate` says, and what `repair` fixes for it: logs
/// dropped, channels freed, pending masks and waiting bytes cut.
type Corruption = (&'static str, fn(&mut HypercallState), StateError, [u32; 4]);

fn corruptions() -> std::vec::Vec<Corruption> {
    vec![
        (
            "state byte",
            |s| s.logs[0].state = 3,
            StateError::BadLogState { slot: 0 },
            [1, 0, 0, 0],
        ),
        (
            "count",
            |s| s.logs[0].count = 9,
            StateError::BadCompletion { slot: 0 },
            [1, 0, 0, 0],
        ),
        (
            "mask beyond count",
            |s| s.logs[0].completed = 0b1_0000,
            StateError::BadCompletion { slot: 0 },
            [1, 0, 0, 0],
        ),
        (
            "done but incomplete",
            |s| s.logs[1].completed = 0b0111,
            StateError::BadCompletion { slot: 1 },
            [1, 0, 0, 0],
        ),
        (
            "outcome",
            |s| s.logs[1].outcomes[2] = 200,
            StateError::BadOutcome { slot: 1 },
            [1, 0, 0, 0],
        ),
        (
            "vm",
            |s| s.logs[0].vm = MAX_VMS,
            StateError::BadCaller { slot: 0 },
            [1, 0, 0, 0],
        ),
        (
            "vcpu",
            |s| s.logs[1].vcpu = 100,
            StateError::BadCaller { slot: 1 },
            [1, 0, 0, 0],
        ),
        (
            "duplicate caller",
            |s| s.logs[1].vcpu = 0,
            StateError::DuplicateCaller { slot: 1 },
            [1, 0, 0, 0],
        ),
        // Channel 0 is bound with an event pending at VM 2's end, so freeing it also drops
        // that pending bit; channel 1 is unbound.
        (
            "channel state byte",
            |s| s.channels[0].state = 3,
            StateError::BadChannelState { channel: 0 },
            [0, 1, 1, 0],
        ),
        (
            "owner vm",
            |s| s.channels[1].owner.vm = MAX_VMS,
            StateError::BadChannelEnd { channel: 1 },
            [0, 1, 0, 0],
        ),
        (
            "owner port 0",
            |s| s.channels[1].owner.port = 0,
            StateError::BadChannelEnd { channel: 1 },
            [0, 1, 0, 0],
        ),
        (
            "owner port 63",
            |s| s.channels[0].owner.port = EVENT_PORTS,
            StateError::BadChannelEnd { channel: 0 },
            [0, 1, 1, 0],
        ),
        (
            "peer vm",
            |s| s.channels[0].peer.vm = MAX_VMS + 1,
            StateError::BadChannelEnd { channel: 0 },
            [0, 1, 1, 0],
        ),
        (
            "both ends in one vm",
            |s| s.channels[1].peer.vm = 1,
            StateError::BadChannelEnd { channel: 1 },
            [0, 1, 0, 0],
        ),
        (
            "bound peer port",
            |s| s.channels[0].peer.port = 100,
            StateError::BadChannelEnd { channel: 0 },
            [0, 1, 1, 0],
        ),
        (
            "unbound peer port",
            |s| s.channels[1].peer.port = 4,
            StateError::BadChannelEnd { channel: 1 },
            [0, 1, 0, 0],
        ),
        (
            "duplicate owner port",
            |s| s.channels[1].owner.port = 1,
            StateError::DuplicatePort { channel: 1 },
            [0, 1, 0, 0],
        ),
        (
            "duplicate peer port",
            |s| {
                s.channels[1].state = ChannelState::Bound as u8;
                s.channels[1].peer = ChannelEnd { vm: 2, port: 1 };
            },
            StateError::DuplicatePort { channel: 1 },
            [0, 1, 0, 0],
        ),
        (
            "pending bit 0",
            |s| s.pending[2] |= 1,
            StateError::BadPending { vm: 2 },
            [0, 0, 1, 0],
        ),
        (
            "pending bit 63",
            |s| s.pending[5] = 1 << 63,
            StateError::BadPending { vm: 5 },
            [0, 0, 1, 0],
        ),
        (
            "pending on a port nobody holds",
            |s| s.pending[2] |= 1 << 7,
            StateError::BadPending { vm: 2 },
            [0, 0, 1, 0],
        ),
    ]
}

/// Log 0: vCPU 0's batch stopped after two entries; log 1: vCPU 1's batch done. Channel 0:
/// VM 1 port 1 bound to VM 2 port 1, an event pending at VM 2; channel 1: VM 1 port 2 offered
/// to VM 3, whose vCPU 0 waits for an event.
fn busy() -> Box<HypercallState> {
    let mut state = fresh();
    let mut failing = Fake {
        fail_at: Some((2, Some(CallError::PeerRestarted))),
        ..Fake::default()
    };
    state.dispatch(multicall(0, 1, &populate_batch()), &mut failing);
    state.dispatch(multicall(1, 1, &populate_batch()), &mut Fake::default());
    let mut fake = Fake::default();
    assert_eq!(
        value(state.dispatch(call_as(1, 0, EVTCHN_ALLOC, 2, 0), &mut fake)),
        1
    );
    assert_eq!(
        value(state.dispatch(call_as(2, 0, EVTCHN_BIND, 1, 1), &mut fake)),
        1
    );
    assert_eq!(
        value(state.dispatch(call_as(1, 0, EVTCHN_ALLOC, 3, 0), &mut fake)),
        2
    );
    assert_eq!(
        value(state.dispatch(call_as(1, 0, EVTCHN_SEND, 1, 0), &mut fake)),
        0
    );
    assert_eq!(
        state.dispatch(call_as(3, 0, EVENT_WAIT, 0, 0), &mut fake),
        Reply::Blocked
    );
    assert_eq!((state.pending[2], state.waiting[3]), (1 << 1, 1));
    assert_eq!(state.validate(), Ok(()));
    state
}

/// Live logs and channels.
fn live_records(state: &HypercallState) -> usize {
    let logs = state
        .logs
        .iter()
        .filter(|log| log.state != LogState::Free as u8)
        .count();
    let channels = state
        .channels
        .iter()
        .filter(|channel| channel.state != ChannelState::Free as u8)
        .count();
    logs + channels
}

#[test]
fn validate_catches_corruption() {
    let mut codes = std::collections::HashSet::new();
    for (name, corrupt, error, _) in corruptions() {
        let mut state = busy();
        corrupt(&mut state);
        assert_eq!(state.validate(), Err(error), "{name}");
        assert!(error.code() >> 8 != 0);
        codes.insert(error.code() >> 8);
    }
    assert_eq!(
        codes.len(),
        9,
        "every check but the waiting byte's is exercised"
    );
}

#[test]
fn repair_drops_only_what_is_broken() {
    for (name, corrupt, _, [logs, channels, pending, waiting]) in corruptions() {
        let mut state = busy();
        let before = live_records(&state);
        corrupt(&mut state);
        let report = state.repair();
        assert_eq!(
            (
                report.logs_dropped,
                report.channels_freed,
                report.pending_masked,
                report.waiting_masked
            ),
            (logs, channels, pending, waiting),
            "{name}"
        );
        // A freed channel leaves its owner's count one high until the repair recounts.
        assert!(report.counts_fixed <= channels, "{name}");
        assert_eq!(report.limits_trimmed, 0, "{name}");
        assert_eq!(
            report.fixes(),
            logs + channels + pending + waiting + report.counts_fixed,
            "{name}"
        );
        assert_eq!(state.validate(), Ok(()), "{name}");
        assert_eq!(
            live_records(&state),
            before - (logs + channels) as usize,
            "{name}: kept the good logs and channels"
        );
        assert_eq!(state.waiting[3], 1, "{name}: kept the waiter");
        assert_eq!(state.repair().fixes(), 0, "{name}");
    }
}

#[test]
fn waiting_bytes_name_only_vcpus() {
    for bit in 0..8u16 {
        let mut state = busy();
        state.waiting[9] = 1 << bit;
        if bit < MAX_VCPUS_PER_VM {
            assert_eq!(state.validate(), Ok(()));
        } else {
            assert_eq!(state.validate(), Err(StateError::BadWaiting { vm: 9 }));
            assert_eq!(state.repair().waiting_masked, 1);
            assert_eq!(state.waiting[9], 0);
        }
    }
    let codes: std::vec::Vec<u16> = [
        StateError::BadChannelState { channel: 3 },
        StateError::BadChannelEnd { channel: 3 },
        StateError::DuplicatePort { channel: 3 },
        StateError::BadPending { vm: 3 },
        StateError::BadWaiting { vm: 3 },
    ]
    .iter()
    .map(|error| error.code())
    .collect();
    assert_eq!(codes, [0x603, 0x703, 0x803, 0x903, 0xa03]);
    assert_eq!(StateError::DuplicateCaller { slot: 1 }.code(), 0x501);
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
        // Every event call on the damaged state, too: none may panic.
        for vm in 0..4 {
            for (number, arg0, arg1) in [
                (EVTCHN_ALLOC, (vm + 1) % 4, 0),
                (EVTCHN_BIND, (vm + 1) % 4, 1),
                (EVTCHN_SEND, 1, 0),
                (EVTCHN_SEND, 2, 0),
                (EVENT_WAIT, 0, 0),
                (EVTCHN_CLOSE, 1, 0),
            ] {
                let request = call_as(vm, 0, number, arg0.into(), arg1);
                let _ = damaged.dispatch(request, &mut Fake::default());
            }
            damaged.release_vm(vm);
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

#[test]
fn timer_cookies_name_the_vcpu_and_its_vector() {
    let mut state = fresh();
    let mut fake = Fake::default();
    let request = Request::Hypercall {
        cpu: 2,
        vm: 3,
        vcpu: 7,
        number: TIMER_ONESHOT,
        args: [9000, 0xef, 0, 0, 0, 0],
    };
    assert_eq!(value(state.dispatch(request, &mut fake)), 1);
    let cookie = timer_cookie(3, 7, 0xef);
    assert_eq!(timer_target(cookie), (3, 7, 0xef));
    assert_eq!(
        fake.calls,
        [format!(
            "SetOneShot {{ cpu: 2, deadline: 9000, cookie: {cookie} }}"
        )]
    );
    let highest = call_as(1, 0, TIMER_ONESHOT, 1, 255);
    assert_eq!(value(state.dispatch(highest, &mut fake)), 2);
}

#[test]
fn event_channels_round_trip_between_two_vms() {
    let mut state = fresh();
    let mut fake = Fake::default();
    // VM 1 offers a port to VM 2 and another to VM 3: the lowest free ports, 1 and 2.
    assert_eq!(
        value(state.dispatch(call_as(1, 0, EVTCHN_ALLOC, 2, 0), &mut fake)),
        1
    );
    assert_eq!(
        value(state.dispatch(call_as(1, 0, EVTCHN_ALLOC, 3, 0), &mut fake)),
        2
    );
    // VM 2 already holds port 1 of another channel, so its end of this one is port 2.
    assert_eq!(
        value(state.dispatch(call_as(2, 0, EVTCHN_ALLOC, 4, 0), &mut fake)),
        1
    );
    assert_eq!(
        value(state.dispatch(call_as(2, 0, EVTCHN_BIND, 1, 1), &mut fake)),
        2
    );
    assert_eq!(
        state.channels[0],
        EventChannel {
            state: ChannelState::Bound as u8,
            reserved: 0,
            reserved_2: 0,
            owner: ChannelEnd { vm: 1, port: 1 },
            peer: ChannelEnd { vm: 2, port: 2 },
        }
    );
    // VM 1 signals: VM 2's bit 2 is pending, nobody waits, so nobody is woken.
    assert_eq!(
        value(state.dispatch(call_as(1, 0, EVTCHN_SEND, 1, 0), &mut fake)),
        0
    );
    assert_eq!(state.pending[2], 1 << 2);
    assert_eq!(
        value(state.dispatch(call_as(2, 0, EVENT_WAIT, 0, 0), &mut fake)),
        1 << 2
    );
    assert_eq!(state.pending[2], 0);
    // Nothing pending: VM 2's vCPU blocks until VM 1 signals again.
    assert_eq!(
        state.dispatch(call_as(2, 0, EVENT_WAIT, 0, 0), &mut fake),
        Reply::Blocked
    );
    assert_eq!(state.waiting[2], 1);
    assert_eq!(
        value(state.dispatch(call_as(1, 0, EVTCHN_SEND, 1, 0), &mut fake)),
        0
    );
    assert_eq!(state.waiting[2], 0);
    // Woken, the vCPU re-issues its wait and finds the event.
    assert_eq!(
        value(state.dispatch(call_as(2, 0, EVENT_WAIT, 0, 0), &mut fake)),
        1 << 2
    );
    // The other way round: VM 2 signals its port 2, VM 1's port 1 is pending.
    assert_eq!(
        value(state.dispatch(call_as(2, 0, EVTCHN_SEND, 2, 0), &mut fake)),
        0
    );
    assert_eq!(state.pending[1], 1 << 1);
    assert_eq!(state.validate(), Ok(()));
    // VM 2 closes its end: the channel is gone, with VM 1's pending bit.
    assert_eq!(
        value(state.dispatch(call_as(2, 0, EVTCHN_CLOSE, 2, 0), &mut fake)),
        0
    );
    assert_eq!(state.pending[1], 0);
    assert_eq!(state.channels[0].state, ChannelState::Free as u8);
    assert_eq!(
        state.dispatch(call_as(1, 0, EVTCHN_SEND, 1, 0), &mut fake),
        Reply::Error(HypercallError::NotFound)
    );
    // The scheduler heard of one block and one wake, nothing else.
    assert_eq!(
        fake.calls,
        [
            "Block { vcpu: VcpuId { vm: 2, vcpu: 0 } }",
            "Wake { vcpu: VcpuId { vm: 2, vcpu: 0 } }",
        ]
    );
    // Port 1 of VM 1 is free again and is the next one it allocates.
    assert_eq!(
        value(state.dispatch(call_as(1, 0, EVTCHN_ALLOC, 5, 0), &mut fake)),
        1
    );
    assert_eq!(state.validate(), Ok(()));
}

#[test]
fn a_send_wakes_every_waiting_vcpu_of_the_peer() {
    let mut state = busy();
    let mut fake = Fake::default();
    // VM 3 binds VM 1's port 2; its vCPU 0 already waits, its vCPU 5 waits too.
    assert_eq!(
        value(state.dispatch(call_as(3, 0, EVTCHN_BIND, 1, 2), &mut fake)),
        1
    );
    assert_eq!(
        state.dispatch(call_as(3, 5, EVENT_WAIT, 0, 0), &mut fake),
        Reply::Blocked
    );
    assert_eq!(state.waiting[3], 0b10_0001);
    fake.calls.clear();
    assert_eq!(
        value(state.dispatch(call_as(1, 0, EVTCHN_SEND, 2, 0), &mut fake)),
        0
    );
    assert_eq!(
        fake.calls,
        [
            "Wake { vcpu: VcpuId { vm: 3, vcpu: 0 } }",
            "Wake { vcpu: VcpuId { vm: 3, vcpu: 5 } }",
        ]
    );
    assert_eq!((state.waiting[3], state.pending[3]), (0, 1 << 1));
    // The first to look takes the event; the other finds nothing and blocks again.
    assert_eq!(
        value(state.dispatch(call_as(3, 5, EVENT_WAIT, 0, 0), &mut fake)),
        1 << 1
    );
    assert_eq!(
        state.dispatch(call_as(3, 0, EVENT_WAIT, 0, 0), &mut fake),
        Reply::Blocked
    );
    assert_eq!(state.waiting[3], 1);
    assert_eq!(state.validate(), Ok(()));
}

#[test]
fn a_wait_with_events_pending_answers_the_mask_and_clears_it() {
    let mut state = busy();
    let mut fake = Fake::default();
    // VM 3's vCPU 0 waits (from `busy`); VM 3 binds, VM 1 signals, then VM 3 signals back
    // on another pair too.
    assert_eq!(
        value(state.dispatch(call_as(3, 0, EVTCHN_BIND, 1, 2), &mut fake)),
        1
    );
    assert_eq!(
        value(state.dispatch(call_as(3, 0, EVTCHN_ALLOC, 1, 0), &mut fake)),
        2
    );
    assert_eq!(
        value(state.dispatch(call_as(1, 0, EVTCHN_BIND, 3, 2), &mut fake)),
        3
    );
    assert_eq!(
        value(state.dispatch(call_as(1, 0, EVTCHN_SEND, 2, 0), &mut fake)),
        0
    );
    assert_eq!(
        value(state.dispatch(call_as(1, 0, EVTCHN_SEND, 3, 0), &mut fake)),
        0
    );
    // A send repeated before anyone looked changes nothing: the bits are levels.
    assert_eq!(
        value(state.dispatch(call_as(1, 0, EVTCHN_SEND, 3, 0), &mut fake)),
        0
    );
    assert_eq!(state.pending[3], 0b110);
    fake.calls.clear();
    assert_eq!(
        value(state.dispatch(call_as(3, 0, EVENT_WAIT, 0, 0), &mut fake)),
        0b110
    );
    assert_eq!((state.pending[3], state.waiting[3]), (0, 0));
    assert!(fake.calls.is_empty(), "{:?}", fake.calls);
    assert_eq!(state.validate(), Ok(()));
}

#[test]
fn bad_ports_and_vms_are_refused_without_state_change() {
    let mut state = busy();
    let before = state.clone();
    let mut fake = Fake::default();
    let cases = [
        // VM 1's port 2 is offered to VM 3, not bound: nothing to signal yet.
        (call_as(1, 0, EVTCHN_SEND, 2, 0), HypercallError::NotFound),
        // Ports nobody holds.
        (call_as(1, 0, EVTCHN_SEND, 9, 0), HypercallError::NotFound),
        (call_as(4, 0, EVTCHN_SEND, 1, 0), HypercallError::NotFound),
        (call_as(4, 0, EVTCHN_CLOSE, 1, 0), HypercallError::NotFound),
        (call_as(3, 0, EVTCHN_CLOSE, 2, 0), HypercallError::NotFound),
        // VM 1's port 1 is bound already; port 2 is offered to VM 3, not to VM 4 or 2.
        (call_as(2, 0, EVTCHN_BIND, 1, 1), HypercallError::NotFound),
        (call_as(3, 0, EVTCHN_BIND, 1, 1), HypercallError::NotFound),
        (call_as(4, 0, EVTCHN_BIND, 1, 2), HypercallError::NotFound),
        (call_as(2, 0, EVTCHN_BIND, 1, 2), HypercallError::NotFound),
        (call_as(3, 0, EVTCHN_BIND, 1, 9), HypercallError::NotFound),
        (call_as(3, 0, EVTCHN_BIND, 4, 2), HypercallError::NotFound),
        // Out of range before anything is looked up.
        (
            call_as(3, 0, EVTCHN_BIND, 1, 0),
            HypercallError::InvalidArgument,
        ),
        (
            call_as(1, 0, EVTCHN_CLOSE, 0, 0),
            HypercallError::InvalidArgument,
        ),
        (
            call_as(1, 0, EVTCHN_ALLOC, 1, 0),
            HypercallError::InvalidArgument,
        ),
        (
            call_as(1, 0, EVTCHN_ALLOC, u64::from(MAX_VMS), 0),
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
    assert!(*state == *before);
    assert!(fake.calls.is_empty(), "{:?}", fake.calls);
}

#[test]
fn ports_run_out() {
    // Each VM names its own ports: VM 1 may reserve more channels than it has ports.
    let mut state = blank();
    set_quota(&mut state, 1, EVENT_PORTS);
    set_quota(&mut state, 3, 1);
    let mut fake = Fake::default();
    // VM 1 offers every one of its ports to VM 2.
    for port in 1..EVENT_PORTS {
        let reply = state.dispatch(call_as(1, 0, EVTCHN_ALLOC, 2, 0), &mut fake);
        assert_eq!(value(reply), i64::from(port));
    }
    let before = state.clone();
    assert_eq!(
        state.dispatch(call_as(1, 0, EVTCHN_ALLOC, 2, 0), &mut fake),
        Reply::Error(HypercallError::NoResources)
    );
    assert!(state == before);
    // VM 3 offers a port to VM 1, which has none left to bind with.
    assert_eq!(
        value(state.dispatch(call_as(3, 0, EVTCHN_ALLOC, 1, 0), &mut fake)),
        1
    );
    let before_bind = state.clone();
    assert_eq!(
        state.dispatch(call_as(1, 0, EVTCHN_BIND, 3, 1), &mut fake),
        Reply::Error(HypercallError::NoResources)
    );
    assert!(state == before_bind);
    // The table is all reserved: VM 4 holds no quota and gets no channel.
    assert_eq!(
        state.dispatch(call_as(4, 0, EVTCHN_ALLOC, 5, 0), &mut fake),
        Reply::Error(HypercallError::QuotaExceeded)
    );
    assert_eq!(
        state.dispatch(
            Request::SetQuota {
                vm: 4,
                event_ports: 1
            },
            &mut fake
        ),
        Reply::Error(HypercallError::QuotaUnavailable)
    );
    // Closing VM 1's port 5 frees a record and a port: the bind now gets port 5.
    assert_eq!(
        value(state.dispatch(call_as(1, 0, EVTCHN_CLOSE, 5, 0), &mut fake)),
        0
    );
    assert_eq!(
        value(state.dispatch(call_as(1, 0, EVTCHN_BIND, 3, 1), &mut fake)),
        5
    );
    assert_eq!(state.validate(), Ok(()));
    assert!(fake.calls.is_empty());
}

#[test]
fn a_failed_wake_makes_the_send_incomplete_and_its_retry_delivers() {
    let mut state = busy();
    // VM 2 takes its event and waits for the next one.
    let mut fake = Fake::default();
    assert_eq!(
        value(state.dispatch(call_as(2, 0, EVENT_WAIT, 0, 0), &mut fake)),
        1 << 1
    );
    assert_eq!(
        state.dispatch(call_as(2, 0, EVENT_WAIT, 0, 0), &mut fake),
        Reply::Blocked
    );
    let send = call_as(1, 0, EVTCHN_SEND, 1, 0);
    // The scheduler is being recovered: no event is left behind, the waiter still waits.
    let mut failing = Fake {
        fail_at: Some((0, Some(CallError::PeerRestarted))),
        ..Fake::default()
    };
    let before = state.clone();
    assert_eq!(
        state.dispatch(send.clone(), &mut failing),
        Reply::Incomplete
    );
    assert!(state == before);
    // A scheduler bug is not the guest's: refused, nothing changed.
    let mut broken = Fake {
        scheduler_answer: Some(scheduler::Reply::Error(scheduler::Error::Inconsistent)),
        ..Fake::default()
    };
    assert_eq!(
        state.dispatch(send.clone(), &mut broken),
        Reply::Error(HypercallError::Internal)
    );
    assert!(state == before);
    // The guest re-issues the send: the waiter is woken and the event pending.
    let mut fake = Fake::default();
    assert_eq!(value(state.dispatch(send.clone(), &mut fake)), 0);
    assert_eq!(fake.calls, ["Wake { vcpu: VcpuId { vm: 2, vcpu: 0 } }"]);
    assert_eq!((state.pending[2], state.waiting[2]), (1 << 1, 0));
    // A waiter that is gone (its VM was stopped) is forgotten; the send completes.
    state.waiting[2] = 0b100;
    let mut gone = Fake {
        scheduler_answer: Some(scheduler::Reply::Error(scheduler::Error::UnknownVcpu)),
        ..Fake::default()
    };
    assert_eq!(value(state.dispatch(send, &mut gone)), 0);
    assert_eq!(state.waiting[2], 0);
    assert_eq!(state.validate(), Ok(()));
}

#[test]
fn a_wait_the_scheduler_cannot_serve_is_incomplete_or_refused() {
    let mut state = fresh();
    let wait = call_as(4, 2, EVENT_WAIT, 0, 0);
    // The scheduler fails mid-call: the block may have happened, so the waiting bit stays
    // (at worst one spurious wake); the guest re-issues the wait.
    let mut failing = Fake {
        fail_at: Some((0, Some(CallError::PeerFailed))),
        ..Fake::default()
    };
    assert_eq!(
        state.dispatch(wait.clone(), &mut failing),
        Reply::Incomplete
    );
    assert_eq!(state.waiting[4], 0b100);
    assert_eq!(state.validate(), Ok(()));
    // The scheduler refuses: nothing changed.
    let mut state = fresh();
    let mut refusing = Fake {
        scheduler_answer: Some(scheduler::Reply::Error(scheduler::Error::UnknownVcpu)),
        ..Fake::default()
    };
    assert_eq!(
        state.dispatch(wait, &mut refusing),
        Reply::Error(HypercallError::BadVcpu)
    );
    assert!(*state == *fresh());
}

#[test]
fn batches_refuse_waits_but_run_channel_calls_and_revokes() {
    let mut state = fresh();
    let mut fake = Fake::default();
    let batch = [
        entry(EVTCHN_ALLOC, 2, 0),
        entry(EVENT_WAIT, 0, 0),
        entry(EVTCHN_SEND, 1, 0),
        entry(GRANT_REVOKE, 100, 2),
        entry(EVTCHN_CLOSE, 1, 0),
    ];
    let reply = state.dispatch(multicall(0, 3, &batch), &mut fake);
    assert_eq!(
        outcomes(reply),
        [
            EntryOutcome::Complete(1),
            EntryOutcome::Error(HypercallError::InvalidArgument),
            // Unbound: nobody to signal.
            EntryOutcome::Error(HypercallError::NotFound),
            EntryOutcome::Complete(0),
            EntryOutcome::Complete(0),
        ]
    );
    assert_eq!(
        fake.calls,
        [
            "Query { frame: FrameNumber(100) }",
            "Unshare { frame: FrameNumber(100), from: 2 }",
        ]
    );
    assert_eq!(state.channels[0].state, ChannelState::Free as u8);
    assert_eq!(state.validate(), Ok(()));
}

#[test]
fn vm_exit_closes_the_vms_channels_and_clears_its_events() {
    let mut state = busy();
    let mut fake = Fake::default();
    // VM 4 offers a port to VM 1; VM 2 signals VM 1; VM 1's vCPU 3 is marked waiting.
    assert_eq!(
        value(state.dispatch(call_as(4, 0, EVTCHN_ALLOC, 1, 0), &mut fake)),
        1
    );
    assert_eq!(
        value(state.dispatch(call_as(2, 0, EVTCHN_SEND, 1, 0), &mut fake)),
        0
    );
    state.waiting[1] = 1 << 3;
    // An unrelated channel between VMs 5 and 6 survives.
    assert_eq!(
        value(state.dispatch(call_as(5, 0, EVTCHN_ALLOC, 6, 0), &mut fake)),
        1
    );
    assert_eq!(
        value(state.dispatch(call_as(6, 0, EVTCHN_BIND, 5, 1), &mut fake)),
        1
    );
    assert_eq!(
        value(state.dispatch(call_as(5, 0, EVTCHN_SEND, 1, 0), &mut fake)),
        0
    );
    // A scheduler that refuses the exit leaves everything in place.
    let before = state.clone();
    let mut refusing = Fake {
        scheduler_answer: Some(scheduler::Reply::Error(scheduler::Error::Inconsistent)),
        ..Fake::default()
    };
    let exit = call_as(1, 0, VM_EXIT, 0, 0x1234);
    assert_eq!(
        state.dispatch(exit.clone(), &mut refusing),
        Reply::Error(HypercallError::Internal)
    );
    assert!(state == before);
    assert_eq!(state.dispatch(exit.clone(), &mut fake), Reply::Blocked);
    // VM 1's three channels are gone (bound to 2, offered to 3, offered by 4), with VM 2's
    // pending bit and VM 1's own event state; VMs 5 and 6 keep theirs.
    let live: std::vec::Vec<_> = state
        .channels
        .iter()
        .filter(|channel| channel.state != ChannelState::Free as u8)
        .map(|channel| (channel.owner, channel.peer))
        .collect();
    assert_eq!(
        live,
        [(ChannelEnd { vm: 5, port: 1 }, ChannelEnd { vm: 6, port: 1 })]
    );
    assert_eq!(
        (state.pending[1], state.waiting[1], state.pending[2]),
        (0, 0, 0)
    );
    assert_eq!(state.pending[6], 1 << 1);
    assert_eq!(state.waiting[3], 1, "other VMs' waiters stay");
    assert_eq!(
        state.dispatch(call_as(3, 0, EVTCHN_BIND, 1, 2), &mut fake),
        Reply::Error(HypercallError::NotFound)
    );
    assert_eq!(
        state.dispatch(call_as(2, 0, EVTCHN_SEND, 1, 0), &mut fake),
        Reply::Error(HypercallError::NotFound)
    );
    assert_eq!(state.validate(), Ok(()));
    // A retried exit (the vCPU is gone already) still blocks and changes nothing more.
    let after = state.clone();
    let mut gone = Fake {
        scheduler_answer: Some(scheduler::Reply::Error(scheduler::Error::UnknownVcpu)),
        ..Fake::default()
    };
    assert_eq!(state.dispatch(exit, &mut gone), Reply::Blocked);
    assert!(state == after);
}

#[test]
fn grant_revoke_checks_the_owner_then_unshares() {
    let revoke = call_as(1, 0, GRANT_REVOKE, 100, 2);
    let frame = |owner| {
        Some(memory::Reply::Frame(memory::FrameInfo {
            owner,
            kind: memory::FrameKind::Shared,
            refcount: 2,
            validated: true,
        }))
    };
    let cases = [
        (Fake::default(), Reply::Complete { value: 0 }, 2),
        (
            Fake {
                query_answer: frame(Some(2)),
                ..Fake::default()
            },
            Reply::Error(HypercallError::PermissionDenied),
            1,
        ),
        (
            Fake {
                query_answer: frame(None),
                ..Fake::default()
            },
            Reply::Error(HypercallError::NotFound),
            1,
        ),
        (
            Fake {
                query_answer: Some(memory::Reply::Error(memory::Error::BadFrame)),
                ..Fake::default()
            },
            Reply::Error(HypercallError::InvalidArgument),
            1,
        ),
        (
            Fake {
                unshare_answer: Some(memory::Reply::Error(memory::Error::NotShared)),
                ..Fake::default()
            },
            Reply::Error(HypercallError::NotFound),
            2,
        ),
        (
            Fake {
                unshare_answer: Some(memory::Reply::Allocated(FrameNumber(5))),
                ..Fake::default()
            },
            Reply::Error(HypercallError::Internal),
            2,
        ),
        (
            Fake {
                fail_at: Some((0, Some(CallError::PeerRestarted))),
                ..Fake::default()
            },
            Reply::Incomplete,
            1,
        ),
        (
            Fake {
                fail_at: Some((1, Some(CallError::Busy))),
                ..Fake::default()
            },
            Reply::Incomplete,
            2,
        ),
    ];
    for (mut fake, expected, calls) in cases {
        let mut state = fresh();
        assert_eq!(state.dispatch(revoke.clone(), &mut fake), expected);
        assert_eq!(
            fake.calls[..calls],
            [
                "Query { frame: FrameNumber(100) }",
                "Unshare { frame: FrameNumber(100), from: 2 }",
            ][..calls],
            "{expected:?}"
        );
        assert_eq!(fake.calls.len(), calls, "{expected:?}");
        assert!(*state == *fresh());
    }
}

#[test]
fn event_state_round_trips_through_bytes() {
    let state = busy();
    // Microreboot: only the state region's bytes survive.
    let mut rebooted = HypercallState::read_from_bytes(state.as_bytes()).unwrap();
    assert!(rebooted == *state);
    assert_eq!(rebooted.validate(), Ok(()));
    assert_eq!(rebooted.repair().fixes(), 0);
    let mut fake = Fake::default();
    assert_eq!(
        value(rebooted.dispatch(call_as(2, 0, EVENT_WAIT, 0, 0), &mut fake)),
        1 << 1
    );
    assert_eq!(
        value(rebooted.dispatch(call_as(3, 0, EVTCHN_BIND, 1, 2), &mut fake)),
        1
    );
    assert_eq!(
        value(rebooted.dispatch(call_as(1, 0, EVTCHN_SEND, 2, 0), &mut fake)),
        0
    );
    assert_eq!(fake.calls, ["Wake { vcpu: VcpuId { vm: 3, vcpu: 0 } }"]);
    // `init` forgets every channel, event, waiter and quota.
    rebooted.init();
    assert!(rebooted == *blank());
    assert!(rebooted.as_bytes().iter().all(|&byte| byte == 0));
}

#[test]
fn guest_exits_get_a_fixed_virtual_machine() {
    use ipc::hypercall::{ExitAnswer, GuestExit};
    let vendor = match answer_exit(GuestExit::Cpuid {
        leaf: 0,
        subleaf: 0,
    }) {
        ExitAnswer::Cpuid([_, ebx, ecx, edx]) => [ebx, edx, ecx],
        other => panic!("CPUID answered {other:?}"),
    };
    let bytes: std::vec::Vec<u8> = vendor.iter().flat_map(|word| word.to_le_bytes()).collect();
    assert_eq!(&bytes, b"MicrovisorVM");
    let ExitAnswer::Cpuid([_, _, ecx, _]) = answer_exit(GuestExit::Cpuid {
        leaf: 1,
        subleaf: 0,
    }) else {
        panic!("no CPUID answer")
    };
    assert_ne!(ecx & (1 << 31), 0, "hypervisor bit");
    assert_eq!(
        answer_exit(GuestExit::Cpuid {
            leaf: 0x1234,
            subleaf: 9
        }),
        ExitAnswer::Cpuid([0; 4])
    );
    assert_eq!(
        answer_exit(GuestExit::PortIn {
            port: 0x60,
            size: 2
        }),
        ExitAnswer::Value(0xffff)
    );
    assert_eq!(
        answer_exit(GuestExit::PortIn {
            port: 0x60,
            size: 3
        }),
        ExitAnswer::Refuse
    );
    assert_eq!(
        answer_exit(GuestExit::PortOut {
            port: 0x80,
            size: 1,
            value: 1
        }),
        ExitAnswer::Done
    );
    assert_eq!(
        answer_exit(GuestExit::ReadMsr { msr: 0x10 }),
        ExitAnswer::Refuse
    );
}

#[test]
fn exit_requests_check_the_caller() {
    let mut state = fresh();
    let mut services = Fake::default();
    let exit = ipc::hypercall::GuestExit::Cpuid {
        leaf: 0,
        subleaf: 0,
    };
    let reply = state.dispatch(
        Request::Exit {
            cpu: 200,
            vm: 1,
            vcpu: 0,
            exit,
        },
        &mut services,
    );
    assert_eq!(reply, Reply::Error(HypercallError::BadVcpu));
    let reply = state.dispatch(
        Request::Exit {
            cpu: 0,
            vm: 1,
            vcpu: 0,
            exit,
        },
        &mut services,
    );
    assert!(matches!(reply, Reply::Exit(_)));
}

// Quotas (`ipc::quota`): event channels are charged to the VM that allocates them.

/// A fake whose timer domain refuses every timer with `error`.
struct RefusingTimer(timer::Error);

impl Services for RefusingTimer {
    fn scheduler(&mut self, _: scheduler::Request) -> Result<scheduler::Reply, CallError> {
        Ok(scheduler::Reply::Done)
    }
    fn memory(&mut self, _: memory::Request) -> Result<memory::Reply, CallError> {
        Ok(memory::Reply::Done)
    }
    fn timer(&mut self, _: timer::Request) -> Result<timer::Reply, CallError> {
        Ok(timer::Reply::Error(self.0))
    }
    fn console(&mut self, _: u16, _: &str) {}
}

/// VM `vm` allocates channels offered to `remote` until refused; returns the ports.
fn allocate_until_refused(
    state: &mut HypercallState,
    vm: u16,
    remote: u16,
    refusal: HypercallError,
) -> std::vec::Vec<i64> {
    let mut ports = std::vec::Vec::new();
    loop {
        let request = call_as(vm, 0, EVTCHN_ALLOC, u64::from(remote), 0);
        let before = state.clone();
        match state.dispatch(request, &mut Fake::default()) {
            Reply::Complete { value } => ports.push(value),
            Reply::Error(error) => {
                assert_eq!(error, refusal, "vm {vm} after {} ports", ports.len());
                assert!(*state == before, "a refused allocation changed the state");
                assert_eq!(state.validate(), Ok(()));
                return ports;
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn timer_quota_refusals_reach_the_guest_as_quota_exceeded() {
    let mut state = fresh();
    let oneshot = hypercall(TIMER_ONESHOT, [5000, 40, 0, 0, 0, 0]);
    for (error, expected) in [
        (timer::Error::QuotaExceeded, HypercallError::QuotaExceeded),
        (timer::Error::HeapFull, HypercallError::NoResources),
        (timer::Error::QuotaUnavailable, HypercallError::Internal),
        (timer::Error::BadVm, HypercallError::Internal),
    ] {
        let reply = state.dispatch(oneshot.clone(), &mut RefusingTimer(error));
        assert_eq!(reply, Reply::Error(expected), "{error:?}");
    }
    assert!(*state == *fresh());
}

#[test]
fn a_vm_without_a_quota_allocates_no_channel_but_may_bind() {
    let mut state = blank();
    set_quota(&mut state, 1, 1);
    let mut fake = Fake::default();
    assert_eq!(
        state.dispatch(call_as(2, 0, EVTCHN_ALLOC, 1, 0), &mut fake),
        Reply::Error(HypercallError::QuotaExceeded)
    );
    // Binding takes no record: the channel is charged to VM 1, which offered it.
    assert_eq!(
        value(state.dispatch(call_as(1, 0, EVTCHN_ALLOC, 2, 0), &mut fake)),
        1
    );
    assert_eq!(
        value(state.dispatch(call_as(2, 0, EVTCHN_BIND, 1, 1), &mut fake)),
        1
    );
    assert_eq!((state.ports_used[1], state.ports_used[2]), (1, 0));
    assert_eq!(state.validate(), Ok(()));
}

#[test]
fn reservations_over_the_channel_table_are_refused() {
    let mut state = blank();
    let mut fake = Fake::default();
    set_quota(&mut state, 1, MAX_CHANNELS as u16 - 4);
    set_quota(&mut state, 2, 4);
    let before = state.clone();
    for (vm, ports, error) in [
        (3, 1, HypercallError::QuotaUnavailable),
        (2, 5, HypercallError::QuotaUnavailable),
        (MAX_VMS, 0, HypercallError::BadVcpu),
    ] {
        assert_eq!(
            state.dispatch(
                Request::SetQuota {
                    vm,
                    event_ports: ports
                },
                &mut fake
            ),
            Reply::Error(error),
            "VM {vm}, {ports} ports"
        );
    }
    assert_eq!(
        state.dispatch(Request::DropQuota { vm: MAX_VMS }, &mut fake),
        Reply::Error(HypercallError::BadVcpu)
    );
    assert!(*state == *before);
    // A retry and a lower limit fit; what is freed can be reserved by another VM.
    set_quota(&mut state, 2, 4);
    set_quota(&mut state, 2, 1);
    set_quota(&mut state, 3, 3);
    assert!(fake.calls.is_empty());
}

#[test]
fn exhausting_vms_cannot_take_an_honest_vms_channels() {
    // Seven VMs reserve all but an AppVM's quota and allocate until refused; the honest VM
    // still gets every channel of its quota. Every refusal is QuotaExceeded, never
    // NoResources.
    let mut state = blank();
    let honest = 9;
    let app = ipc::quota::Quota::APP_VM.event_ports;
    set_quota(&mut state, honest, app);
    let hostile = (MAX_CHANNELS as u16 - app) / 7;
    for vm in 1..=7 {
        set_quota(&mut state, vm, hostile);
    }
    for vm in 1..=7 {
        let ports = allocate_until_refused(&mut state, vm, honest, HypercallError::QuotaExceeded);
        assert_eq!(ports.len(), usize::from(hostile));
    }
    // A batch is charged the same way.
    let batch = Request::Multicall {
        cpu: 0,
        vm: 1,
        vcpu: 0,
        batch: 1,
        entries: Vec::from_slice(&[entry(EVTCHN_ALLOC, 2, 0)]).unwrap(),
    };
    assert_eq!(
        outcomes(state.dispatch(batch, &mut Fake::default())),
        [EntryOutcome::Error(HypercallError::QuotaExceeded)]
    );
    let ports = allocate_until_refused(&mut state, honest, 1, HypercallError::QuotaExceeded);
    assert_eq!(ports, [1, 2, 3, 4]);
    // Closing one gives the slot of the quota back.
    assert_eq!(
        value(state.dispatch(call_as(honest, 0, EVTCHN_CLOSE, 2, 0), &mut Fake::default())),
        0
    );
    assert_eq!(
        allocate_until_refused(&mut state, honest, 1, HypercallError::QuotaExceeded),
        [2]
    );
}

#[test]
fn dropping_a_quota_releases_the_vm_and_its_reservation() {
    let mut state = busy();
    let mut fake = Fake::default();
    // VM 2 allocated a channel of its own and has a batch log.
    assert_eq!(
        value(state.dispatch(call_as(2, 0, EVTCHN_ALLOC, 4, 0), &mut fake)),
        2
    );
    state.dispatch(
        Request::Multicall {
            cpu: 0,
            vm: 2,
            vcpu: 0,
            batch: 1,
            entries: Vec::from_slice(&populate_batch()).unwrap(),
        },
        &mut Fake::default(),
    );
    assert!(state.log(2, 0).is_some());
    assert_eq!((state.ports_used[1], state.ports_used[2]), (2, 1));
    let drop = Request::DropQuota { vm: 2 };
    assert_eq!(
        state.dispatch(drop.clone(), &mut fake),
        Reply::Complete { value: 0 }
    );
    assert_eq!(state.validate(), Ok(()));
    // Its own channel and the one VM 1 bound to it are closed (VM 1 is uncharged for it),
    // its events and its log are gone, its limit is 0.
    assert_eq!((state.ports_used[1], state.ports_used[2]), (1, 0));
    assert_eq!((state.pending[2], state.port_limits[2]), (0, 0));
    assert!(state.log(2, 0).is_none());
    assert!(state.log(1, 0).is_some(), "other VMs' logs stay");
    assert_eq!(
        state.dispatch(call_as(2, 0, EVTCHN_ALLOC, 4, 0), &mut fake),
        Reply::Error(HypercallError::QuotaExceeded)
    );
    // Idempotent.
    let after = state.clone();
    assert_eq!(
        state.dispatch(drop, &mut fake),
        Reply::Complete { value: 0 }
    );
    assert!(state == after);
    // Its share of the table can be reserved by another VM.
    set_quota(&mut state, 20, PORTS_EACH);
    assert!(fake.calls.is_empty());
}

#[test]
fn repair_recounts_the_channels_and_keeps_the_limits() {
    let mut state = busy();
    let limits = state.port_limits;
    state.ports_used[1] = 0;
    state.ports_used[30] = 5;
    assert_eq!(state.validate(), Err(StateError::BadPortCount { vm: 1 }));
    let report = state.repair();
    assert_eq!((report.counts_fixed, report.limits_trimmed), (2, 0));
    assert_eq!(state.validate(), Ok(()));
    assert_eq!((state.ports_used[1], state.ports_used[30]), (2, 0));
    assert_eq!(state.port_limits, limits);
    // The recount is what the quota is checked against.
    let ports = allocate_until_refused(&mut state, 1, 5, HypercallError::QuotaExceeded);
    assert_eq!(ports.len(), usize::from(PORTS_EACH) - 2);
    // Reservations that no longer fit (a corrupted region) are cut to what each VM holds.
    let mut state = busy();
    state.port_limits[40] = 100;
    assert_eq!(state.validate(), Err(StateError::Overcommitted));
    let report = state.repair();
    assert!(report.limits_trimmed > 0);
    assert_eq!(state.validate(), Ok(()));
    assert_eq!((state.port_limits[1], state.port_limits[40]), (2, 0));
    set_quota(&mut state, 40, 4);
}
