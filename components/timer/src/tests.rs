//! Host tests of the timer heaps.

use super::*;
use ipc::hypercall::timer_cookie;
use zerocopy::FromZeros;

/// Timers initialised for `cpus` CPUs: none armed, no quota reserved.
fn blank(cpus: u8) -> Box<TimerState> {
    let mut state = Box::new(TimerState::new_zeroed());
    state.init(cpus);
    state
}

/// The VM [`fresh`] reserves a quota for, and its quota.
const GUEST_VM: u16 = 0;
const GUEST_TIMERS: u16 = 16;

/// Timers initialised for `cpus` CPUs, VM [`GUEST_VM`] holding a quota of [`GUEST_TIMERS`].
fn fresh(cpus: u8) -> Box<TimerState> {
    let mut state = blank(cpus);
    set_quota(&mut state, GUEST_VM, GUEST_TIMERS);
    state
}

#[track_caller]
fn set_quota(state: &mut TimerState, vm: u16, timers: u16) {
    assert_eq!(
        state.handle(Request::SetQuota { vm, timers }),
        Reply::Done,
        "quota of {timers} for VM {vm}"
    );
    assert_eq!(state.validate(), Ok(()));
}

/// The cookie of a guest timer of VM `vm` raising vector `VECTOR_MIN + n` (charged to `vm`).
fn guest(vm: u16, n: u8) -> u32 {
    timer_cookie(vm, 0, 32 + n)
}

#[track_caller]
fn arm(state: &mut TimerState, request: Request) -> TimerId {
    match state.handle(request) {
        Reply::Armed(id) => {
            assert_eq!(state.validate(), Ok(()));
            id
        }
        other => panic!("{request:?}: {other:?}"),
    }
}

fn one_shot(cpu: u8, deadline: u64, cookie: u32) -> Request {
    Request::SetOneShot {
        cpu,
        deadline,
        cookie,
    }
}

fn recurring(cpu: u8, deadline: u64, period: u64, cookie: u32) -> Request {
    Request::SetRecurring {
        cpu,
        deadline,
        period,
        cookie,
    }
}

#[track_caller]
fn expire(state: &mut TimerState, cpu: u8, now: u64) -> (std::vec::Vec<u32>, bool) {
    let reply = state.handle(Request::Expire { cpu, now });
    assert_eq!(state.validate(), Ok(()));
    match reply {
        Reply::Expired { cookies, more } => (cookies.to_vec(), more),
        other => panic!("expire: {other:?}"),
    }
}

#[track_caller]
fn refused(state: &mut TimerState, request: Request, error: Error) {
    let before = state.clone();
    assert_eq!(state.handle(request), Reply::Error(error), "{request:?}");
    assert!(*state == before, "a refused {request:?} changed the state");
}

#[test]
fn state_layout_is_fixed() {
    assert_eq!(core::mem::size_of::<TimerEntry>(), 24);
    assert_eq!(core::mem::size_of::<CpuTimers>(), 3104);
    assert_eq!(core::mem::size_of::<TimerState>(), 25096);
}

#[test]
fn the_state_fits_the_manifests_state_region() {
    let manifest = include_str!("../../../system.toml");
    let entry = manifest
        .split("[[domain]]")
        .find(|entry| entry.contains("name = \"timer\""))
        .expect("the manifest lists the timer domain");
    let pages: usize = entry
        .lines()
        .find_map(|line| line.trim().strip_prefix("state_pages = "))
        .and_then(|pages| pages.trim().parse().ok())
        .expect("the timer domain has state_pages");
    assert!(core::mem::size_of::<TimerState>() <= pages * 4096);
}

#[test]
fn init_is_valid_and_is_the_reboot_path() {
    let state = blank(2);
    assert_eq!(state.validate(), Ok(()));
    let mut used = fresh(2);
    arm(&mut used, one_shot(0, 5, 5));
    used.init(2);
    assert!(used == state);
}

#[test]
fn one_shots_fire_in_deadline_order() {
    let mut state = fresh(2);
    for (deadline, cookie) in [(300, 3), (100, 1), (200, 2), (400, 4)] {
        arm(&mut state, one_shot(0, deadline, cookie));
    }
    // A guest timer (charged to VM 0's quota) beside the host's.
    arm(&mut state, one_shot(1, 50, guest(GUEST_VM, 99)));
    assert_eq!(
        state.handle(Request::NextDeadline { cpu: 0 }),
        Reply::Deadline(Some(100))
    );
    assert_eq!(expire(&mut state, 0, 99), (vec![], false));
    assert_eq!(expire(&mut state, 0, 250), (vec![1, 2], false));
    assert_eq!(
        state.handle(Request::NextDeadline { cpu: 0 }),
        Reply::Deadline(Some(300))
    );
    assert_eq!(expire(&mut state, 0, 1000), (vec![3, 4], false));
    assert_eq!(
        state.handle(Request::NextDeadline { cpu: 0 }),
        Reply::Deadline(None)
    );
    // CPU 1's timer is untouched by CPU 0's expiries.
    assert_eq!(
        expire(&mut state, 1, 50),
        (vec![guest(GUEST_VM, 99)], false)
    );
    assert_eq!(state.used[usize::from(GUEST_VM)], 0);
}

#[test]
fn recurring_timers_re_arm_and_skip_missed_periods() {
    let mut state = fresh(1);
    let id = arm(&mut state, recurring(0, 100, 10, 7));
    assert_eq!(expire(&mut state, 0, 100), (vec![7], false));
    assert_eq!(state.next_deadline(0), Some(110));
    // Far behind: fires once, re-armed at the next period after `now`.
    assert_eq!(expire(&mut state, 0, 155), (vec![7], false));
    assert_eq!(state.next_deadline(0), Some(160));
    assert_eq!(state.handle(Request::Cancel { id }), Reply::Done);
    assert_eq!(expire(&mut state, 0, 1000), (vec![], false));
}

#[test]
fn expiry_is_bounded_and_says_more() {
    let mut state = fresh(1);
    let cookies: std::vec::Vec<u32> = (0..12).map(|n| guest(GUEST_VM, n)).collect();
    for (deadline, &cookie) in cookies.iter().enumerate() {
        arm(&mut state, one_shot(0, deadline as u64, cookie));
    }
    assert_eq!(expire(&mut state, 0, 100), (cookies[..8].to_vec(), true));
    assert_eq!(expire(&mut state, 0, 100), (cookies[8..].to_vec(), false));
}

#[test]
fn cancel_is_idempotent_in_effect() {
    let mut state = fresh(2);
    let first = arm(&mut state, one_shot(1, 10, 1));
    let second = arm(&mut state, one_shot(1, 20, 2));
    assert_ne!(first, second);
    assert_eq!(state.handle(Request::Cancel { id: first }), Reply::Done);
    assert_eq!(state.validate(), Ok(()));
    // A repeat finds nothing to cancel and changes nothing.
    refused(
        &mut state,
        Request::Cancel { id: first },
        Error::UnknownTimer,
    );
    assert_eq!(expire(&mut state, 1, 100), (vec![2], false));
}

#[test]
fn every_error_path_changes_nothing() {
    let mut state = fresh(2);
    arm(&mut state, one_shot(0, 10, 1));
    refused(&mut state, one_shot(2, 10, 1), Error::BadCpu);
    refused(&mut state, recurring(9, 10, 5, 1), Error::BadCpu);
    refused(&mut state, recurring(0, 10, 0, 1), Error::BadPeriod);
    refused(
        &mut state,
        Request::Cancel { id: TimerId(0) },
        Error::UnknownTimer,
    );
    refused(
        &mut state,
        Request::Cancel { id: TimerId(77) },
        Error::UnknownTimer,
    );
    refused(
        &mut state,
        Request::Expire { cpu: 3, now: 0 },
        Error::BadCpu,
    );
    refused(
        &mut state,
        Request::NextDeadline { cpu: 200 },
        Error::BadCpu,
    );
    refused(
        &mut state,
        Request::SetQuota {
            vm: MAX_VMS,
            timers: 1,
        },
        Error::BadVm,
    );
    refused(&mut state, Request::DropQuota { vm: MAX_VMS }, Error::BadVm);
    // Host timers: the reserve of each heap, then refused.
    for index in 1..TIMER_HOST_RESERVE {
        arm(&mut state, one_shot(0, index as u64, 0));
    }
    refused(&mut state, one_shot(0, 1, 1), Error::HeapFull);
    // Guest timers: the quota, then refused.
    for index in 0..GUEST_TIMERS {
        arm(
            &mut state,
            one_shot(0, u64::from(index), guest(GUEST_VM, 0)),
        );
    }
    refused(
        &mut state,
        one_shot(0, 1, guest(GUEST_VM, 1)),
        Error::QuotaExceeded,
    );
    refused(
        &mut state,
        one_shot(1, 1, guest(3, 1)),
        Error::QuotaExceeded,
    );
    // The other CPU still has room for the host.
    arm(&mut state, one_shot(1, 1, 1));
}

#[test]
fn ids_skip_zero_and_ids_in_use() {
    let mut state = fresh(1);
    state.next_id = u32::MAX;
    let last = arm(&mut state, one_shot(0, 1, 1));
    let wrapped = arm(&mut state, one_shot(0, 1, 1));
    assert_eq!((last, wrapped), (TimerId(u32::MAX), TimerId(1)));
    state.next_id = 1;
    assert_eq!(arm(&mut state, one_shot(0, 1, 1)), TimerId(2));
}

#[test]
fn repair_re_activates_a_recurring_timer_caught_mid_expiry() {
    let mut state = fresh(1);
    arm(&mut state, recurring(0, 100, 50, 7));
    arm(&mut state, one_shot(0, 500, 8));
    // The domain fails after taking the recurring timer off the heap, before re-arming it.
    state.handle_interrupted(Request::Expire { cpu: 0, now: 120 }, 0);
    assert_eq!(state.cpus[0].length, 1);
    assert_eq!(state.validate(), Err(StateError::HandlerPending { cpu: 0 }));
    let report = state.repair();
    assert_eq!(report.timers_reactivated, 1);
    assert_eq!(state.validate(), Ok(()));
    assert_eq!(state.next_deadline(0), Some(150));
    assert_eq!(expire(&mut state, 0, 150), (vec![7], false));
    assert_eq!(state.repair(), RepairReport::default());
    // Without the repair the timer would be lost: drop the flag by hand and see.
    let mut lost = fresh(1);
    arm(&mut lost, recurring(0, 100, 50, 7));
    lost.handle_interrupted(Request::Expire { cpu: 0, now: 120 }, 0);
    lost.cpus[0].in_handler = 0;
    assert_eq!(lost.next_deadline(0), None);
}

#[test]
fn a_parked_timer_already_re_armed_is_not_duplicated() {
    let mut state = fresh(1);
    arm(&mut state, recurring(0, 100, 50, 7));
    expire(&mut state, 0, 100);
    // A failure after the re-arm but before the flag was cleared.
    state.cpus[0].in_handler = 1;
    let report = state.repair();
    assert_eq!((report.timers_reactivated, state.cpus[0].length), (0, 1));
    assert_eq!(state.validate(), Ok(()));
}

type Corruption = (&'static str, fn(&mut TimerState), StateError);

fn corruptions() -> std::vec::Vec<Corruption> {
    vec![
        ("cpu count", |s| s.cpu_count = 0, StateError::BadCpuCount),
        (
            "cpu count high",
            |s| s.cpu_count = 30,
            StateError::BadCpuCount,
        ),
        (
            "length",
            |s| s.cpus[0].length = MAX_TIMERS as u32 + 1,
            StateError::BadLength { cpu: 0 },
        ),
        (
            "unserved cpu",
            |s| s.cpus[3].length = 1,
            StateError::BadLength { cpu: 3 },
        ),
        (
            "heap order",
            |s| s.cpus[0].heap[0].deadline = 1_000_000,
            StateError::HeapOrder { cpu: 0 },
        ),
        (
            "zero id",
            |s| s.cpus[1].heap[0].id = 0,
            StateError::ZeroId { cpu: 1 },
        ),
        (
            "duplicate id",
            |s| s.cpus[1].heap[0].id = s.cpus[0].heap[1].id,
            StateError::DuplicateId { id: 2 },
        ),
        (
            "handler flag",
            |s| s.cpus[1].in_handler = 5,
            StateError::HandlerPending { cpu: 1 },
        ),
        (
            "count of a VM",
            |s| s.used[usize::from(GUEST_VM)] = 1,
            StateError::UsageMismatch { vm: 0 },
        ),
        (
            "count of nobody",
            |s| s.used[9] = 4,
            StateError::UsageMismatch { vm: 9 },
        ),
        (
            "overcommitted",
            |s| s.limits[20] = MAX_TIMERS as u16,
            StateError::Overcommitted { cpu: 0 },
        ),
    ]
}

fn busy() -> Box<TimerState> {
    let mut state = fresh(2);
    for deadline in [10, 20, 30, 40] {
        arm(&mut state, one_shot(0, deadline, 0));
    }
    arm(&mut state, recurring(1, 15, 5, 1));
    arm(&mut state, one_shot(1, 25, 2));
    arm(&mut state, one_shot(1, 35, guest(GUEST_VM, 3)));
    arm(&mut state, one_shot(0, 45, guest(GUEST_VM, 4)));
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
fn repair_fixes_every_corruption() {
    for (name, corrupt, _) in corruptions() {
        let mut state = busy();
        corrupt(&mut state);
        let report = state.repair();
        assert!(report.fixes() > 0, "{name}: {report:?}");
        assert_eq!(state.validate(), Ok(()), "{name}");
        assert_eq!(state.repair().fixes(), 0, "{name}: second repair");
        arm(&mut state, one_shot(0, 1, 1));
        expire(&mut state, 0, 1000);
    }
}

// Quotas (`ipc::quota`): reservations, per-VM exhaustion, repair, drop.

use ipc::quota::{Quota, TIMER_CAPACITY};

/// Arms far-future guest timers of `vm` on `cpu` until refused; returns how many.
fn arm_until_refused(state: &mut TimerState, vm: u16, cpu: u8, refusal: Error) -> u16 {
    let mut armed = 0;
    loop {
        match state.handle(one_shot(cpu, u64::MAX / 2, guest(vm, 7))) {
            Reply::Armed(_) => armed += 1,
            Reply::Error(error) => {
                assert_eq!(error, refusal, "vm {vm} after {armed} timers");
                assert_eq!(state.validate(), Ok(()));
                return armed;
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_vm_without_a_quota_arms_no_guest_timer() {
    let mut state = blank(1);
    refused(
        &mut state,
        one_shot(0, 5, guest(4, 0)),
        Error::QuotaExceeded,
    );
    // Vectors below 32 are no guest timer: the host's reserve.
    arm(&mut state, one_shot(0, 5, timer_cookie(4, 0, 31)));
}

#[test]
fn reservations_over_one_heap_are_refused() {
    let mut state = blank(4);
    set_quota(&mut state, 1, TIMER_CAPACITY as u16 - 8);
    set_quota(&mut state, 2, 8);
    refused(
        &mut state,
        Request::SetQuota { vm: 3, timers: 1 },
        Error::QuotaUnavailable,
    );
    refused(
        &mut state,
        Request::SetQuota { vm: 2, timers: 9 },
        Error::QuotaUnavailable,
    );
    // A retry and a lower limit always fit; what is freed can be reserved by another VM.
    set_quota(&mut state, 2, 8);
    set_quota(&mut state, 2, 5);
    set_quota(&mut state, 3, 3);
    // The capacity is one heap's, whatever the number of CPUs.
    assert_eq!(TIMER_CAPACITY as usize, MAX_TIMERS - TIMER_HOST_RESERVE);
}

#[test]
fn exhausting_vms_cannot_take_an_honest_vms_timers() {
    // Every VM reserves a share of one heap; the hostile ones arm far-future timers on the
    // honest VM's CPU until refused, the host fills its reserve there too: the honest VM
    // still arms its whole quota on that CPU, and every refusal is QuotaExceeded.
    let mut state = blank(2);
    let honest = 9;
    let app = Quota::APP_VM.timers;
    set_quota(&mut state, honest, app);
    let hostile = (TIMER_CAPACITY as u16 - app) / 7;
    for vm in 1..=7 {
        set_quota(&mut state, vm, hostile);
    }
    for vm in 1..=7 {
        assert_eq!(
            arm_until_refused(&mut state, vm, 0, Error::QuotaExceeded),
            hostile
        );
    }
    for index in 0..TIMER_HOST_RESERVE {
        arm(&mut state, one_shot(0, index as u64 + 1000, 1));
    }
    refused(&mut state, one_shot(0, 1, 1), Error::HeapFull);
    assert_eq!(
        arm_until_refused(&mut state, honest, 0, Error::QuotaExceeded),
        app
    );
    assert!(state.cpus[0].length as usize <= MAX_TIMERS);
    // A timer that fires gives its slot of the quota back.
    let mut honest_state = blank(1);
    set_quota(&mut honest_state, honest, 2);
    arm(&mut honest_state, one_shot(0, 10, guest(honest, 0)));
    arm(&mut honest_state, one_shot(0, u64::MAX, guest(honest, 0)));
    refused(
        &mut honest_state,
        one_shot(0, 5, guest(honest, 0)),
        Error::QuotaExceeded,
    );
    expire(&mut honest_state, 0, 10);
    arm(&mut honest_state, one_shot(0, 20, guest(honest, 0)));
    // And so does a cancelled one.
    assert_eq!(
        honest_state.handle(Request::Cancel { id: TimerId(2) }),
        Reply::Done
    );
    assert_eq!(honest_state.validate(), Ok(()));
    assert_eq!(honest_state.used[usize::from(honest)], 1);
}

#[test]
fn dropping_a_quota_cancels_its_timers_and_releases_the_reservation() {
    let mut state = blank(2);
    set_quota(&mut state, 1, 100);
    set_quota(&mut state, 2, 20);
    assert_eq!(
        arm_until_refused(&mut state, 1, 0, Error::QuotaExceeded),
        100
    );
    arm(&mut state, one_shot(1, 50, guest(2, 0)));
    arm(&mut state, one_shot(0, 60, 5));
    refused(
        &mut state,
        Request::SetQuota { vm: 3, timers: 1 },
        Error::QuotaUnavailable,
    );
    assert_eq!(state.handle(Request::DropQuota { vm: 1 }), Reply::Done);
    assert_eq!(state.validate(), Ok(()));
    assert_eq!(state.handle(Request::DropQuota { vm: 1 }), Reply::Done); // idempotent
    assert_eq!((state.limits[1], state.used[1]), (0, 0));
    // VM 2's timer and the host's stay; VM 1 arms nothing more.
    assert_eq!(state.cpus[0].length, 1);
    assert_eq!(state.cpus[1].length, 1);
    refused(
        &mut state,
        one_shot(0, 5, guest(1, 0)),
        Error::QuotaExceeded,
    );
    set_quota(&mut state, 3, 100);
    assert_eq!(expire(&mut state, 1, 50), (vec![guest(2, 0)], false));
}

#[test]
fn repair_recounts_the_quotas_from_the_heaps() {
    let mut state = busy();
    let limits = state.limits;
    // An expiry interrupted after it took a guest one-shot off its heap, before the count.
    state.used[usize::from(GUEST_VM)] += 1;
    state.used[30] = 3;
    assert_eq!(state.validate(), Err(StateError::UsageMismatch { vm: 0 }));
    let report = state.repair();
    assert_eq!(report.usage_fixed, 2);
    assert_eq!(state.validate(), Ok(()));
    assert_eq!(state.used[usize::from(GUEST_VM)], 2);
    assert_eq!(state.limits, limits);
    assert_eq!(
        arm_until_refused(&mut state, GUEST_VM, 1, Error::QuotaExceeded),
        GUEST_TIMERS - 2
    );
    // An expiry of a guest timer stopped half-way: repaired to the right count.
    let mut state = fresh(1);
    arm(&mut state, one_shot(0, 10, guest(GUEST_VM, 0)));
    arm(&mut state, one_shot(0, 20, guest(GUEST_VM, 1)));
    state.handle_interrupted(Request::Expire { cpu: 0, now: 30 }, 1);
    state.repair();
    assert_eq!(state.validate(), Ok(()));
    assert_eq!(
        state.used[usize::from(GUEST_VM)],
        state.cpus[0].length as u16
    );
}

#[test]
fn repair_trims_reservations_that_no_longer_fit() {
    let mut state = busy();
    state.limits[40] = 500;
    let report = state.repair();
    assert!(report.limits_trimmed > 0);
    assert_eq!(state.validate(), Ok(()));
    assert_eq!(state.limits[40], 0);
    assert_eq!(state.limits[usize::from(GUEST_VM)], 2);
    set_quota(&mut state, 40, 8);
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

fn random_request(random: &mut XorShift, now: u64) -> Request {
    let cpu = (random.next() % 4) as u8;
    let deadline = now + random.next() % 200;
    match random.next() % 6 {
        0 | 1 => one_shot(cpu, deadline, random.next() as u32),
        2 => recurring(cpu, deadline, random.next() % 50, random.next() as u32),
        3 => Request::Cancel {
            id: TimerId((random.next() % 80) as u32),
        },
        4 => Request::Expire { cpu, now },
        _ => Request::NextDeadline { cpu },
    }
}

#[test]
fn random_operations_keep_every_invariant() {
    let mut random = XorShift(0x7173_0001);
    let mut state = fresh(3);
    let mut now = 0;
    for _ in 0..20_000 {
        now += random.next() % 5;
        let request = random_request(&mut random, now);
        if let Reply::Expired { cookies, .. } = state.handle(request) {
            assert!(cookies.len() <= EXPIRE_MAX);
        }
        assert_eq!(state.validate(), Ok(()), "after {request:?}");
    }
}

#[test]
fn random_interrupted_expiries_always_repair_without_losing_recurring_timers() {
    let mut random = XorShift(0x1e7_7173);
    let mut state = fresh(1);
    let mut now = 0;
    for _ in 0..3_000 {
        now += random.next() % 20;
        let recurring_before = state.cpus[0].heap[..state.cpus[0].length as usize]
            .iter()
            .filter(|entry| entry.period != 0)
            .count();
        if random.next().is_multiple_of(3) {
            state.handle_interrupted(Request::Expire { cpu: 0, now }, (random.next() % 3) as u32);
            state.repair();
            let recurring_after = state.cpus[0].heap[..state.cpus[0].length as usize]
                .iter()
                .filter(|entry| entry.period != 0)
                .count();
            assert_eq!(recurring_before, recurring_after);
        } else {
            state.handle(random_request(&mut random, now));
        }
        assert_eq!(state.validate(), Ok(()));
    }
}

#[test]
fn random_bit_patterns_never_panic_and_always_repair() {
    let mut random = XorShift(0xbad_7173);
    for round in 0..200 {
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
        for _ in 0..50 {
            damaged.handle(random_request(&mut random, 100));
        }
        let _ = state.validate();
        state.repair();
        assert_eq!(state.validate(), Ok(()), "round {round}");
        assert_eq!(state.repair().fixes(), 0, "round {round}");
    }
}
