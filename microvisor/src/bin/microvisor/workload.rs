//! The synthetic workload: the core plays a guest. It asks the scheduler for a vCPU, then
//! issues hypercalls through the hypercall domain (which calls memory, timer and scheduler)
//! exactly as the VM-exit path will, and checks every answer against its expected value.
//!
//! Like a guest whose RIP advances only when a hypercall completes, the core retries a
//! hypercall answered `Incomplete` (a service restarted under the hypercall domain) or
//! `PeerRestarted` (the hypercall domain itself restarted). A fault injected into any service
//! therefore shows up as retries, never as a wrong result.

use heapless::Vec;
use ipc::hypercall::{self, EntryOutcome, MulticallEntry, Reply};
use ipc::scheduler::{self, VcpuId};
use ipc::timer;
use ipc::{Response, decode, encode};
use microvisor::summary::WorkloadReport;
use microvisor_abi::Status;

use crate::domain;

const SCHEDULER: u16 = 2;
const TIMER: u16 = 4;
/// TSC ticks between the workload's one-shot timers.
const TIMER_SPACING: u64 = 10_000_000;
const HYPERCALL: u16 = 5;
/// The VM the core plays (its memory owner number; its quota is `crate::quota::WORKLOAD`).
pub const VM: u16 = 1;
const VCPU: VcpuId = VcpuId { vm: VM, vcpu: 0 };
/// Attempts per request before the workload gives up.
const ATTEMPTS: u32 = 4;
/// Frames populated one by one.
const SINGLE_FRAMES: usize = 6;

/// Why the workload stopped.
#[derive(Debug)]
pub enum WorkloadError {
    /// A request could not be completed within [`ATTEMPTS`].
    Unanswered(&'static str, Status),
    /// A reply did not decode, or the callee refused the request.
    Refused(&'static str),
    /// A result differed from its expected value.
    Mismatch(&'static str, i64),
}

impl core::fmt::Display for WorkloadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Unanswered(what, status) => write!(
                f,
                "{what}: no answer after {ATTEMPTS} attempts ({status:?})"
            ),
            Self::Refused(what) => write!(f, "{what}: refused or undecodable reply"),
            Self::Mismatch(what, value) => write!(f, "{what}: unexpected value {value}"),
        }
    }
}

struct Run {
    requests: u32,
    retries: u32,
    checks: u32,
}

impl Run {
    fn check(&mut self, what: &'static str, ok: bool, value: i64) -> Result<(), WorkloadError> {
        self.checks += 1;
        if ok {
            Ok(())
        } else {
            Err(WorkloadError::Mismatch(what, value))
        }
    }

    /// Sends one encoded request to `target`, retrying after a restart; `retry` says whether a
    /// decoded reply means "not done, send again".
    fn call<R: serde::de::DeserializeOwned>(
        &mut self,
        what: &'static str,
        target: u16,
        request: &impl serde::Serialize,
        retry: impl Fn(&R) -> bool,
    ) -> Result<R, WorkloadError> {
        let mut bytes = [0u8; ipc::MESSAGE_MAX];
        let length = encode(request, &mut bytes).map_err(|_| WorkloadError::Refused(what))?;
        let mut reply = [0u8; ipc::MESSAGE_MAX];
        let mut last = Status::Ok;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                self.retries += 1;
            }
            match domain::core_call(target, &bytes[..length], &mut reply) {
                Ok(reply_length) => {
                    let response: Response<R> =
                        decode(&reply[..reply_length]).map_err(|_| WorkloadError::Refused(what))?;
                    match response {
                        Ok(answer) if retry(&answer) => continue,
                        Ok(answer) => {
                            self.requests += 1;
                            return Ok(answer);
                        }
                        Err(_) => return Err(WorkloadError::Refused(what)),
                    }
                }
                Err(status @ Status::PeerRestarted) => last = status,
                Err(status) => return Err(WorkloadError::Unanswered(what, status)),
            }
        }
        Err(WorkloadError::Unanswered(what, last))
    }

    fn scheduler(
        &mut self,
        what: &'static str,
        request: scheduler::Request,
    ) -> Result<scheduler::Reply, WorkloadError> {
        self.call(what, SCHEDULER, &request, |_: &scheduler::Reply| false)
    }

    fn hypercall(
        &mut self,
        what: &'static str,
        number: u64,
        args: [u64; 6],
    ) -> Result<Reply, WorkloadError> {
        let request = hypercall::Request::Hypercall {
            cpu: 0,
            vm: VM,
            vcpu: VCPU.vcpu,
            number,
            args,
        };
        self.call(what, HYPERCALL, &request, |reply: &Reply| {
            *reply == Reply::Incomplete
        })
    }

    /// A hypercall that must complete; returns its value.
    fn complete(
        &mut self,
        what: &'static str,
        number: u64,
        args: [u64; 6],
    ) -> Result<i64, WorkloadError> {
        match self.hypercall(what, number, args)? {
            Reply::Complete { value } => Ok(value),
            _ => Err(WorkloadError::Refused(what)),
        }
    }
}

/// Runs the workload; the report says whether every result matched.
pub fn run() -> (WorkloadReport<'static>, Result<(), WorkloadError>) {
    let mut run = Run {
        requests: 0,
        retries: 0,
        checks: 0,
    };
    let result = steps(&mut run);
    let report = WorkloadReport {
        name: "synthetic-hypercalls",
        passed: result.is_ok(),
        requests: run.requests,
        retries: run.retries,
        checks: run.checks,
    };
    (report, result)
}

fn steps(run: &mut Run) -> Result<(), WorkloadError> {
    // The scheduler gives CPU 0 a vCPU, as the VMX path will when it creates the VM.
    let created = run.scheduler(
        "create vCPU",
        scheduler::Request::CreateVcpu {
            vcpu: VCPU,
            home_cpu: 0,
        },
    )?;
    run.check("create vCPU", created == scheduler::Reply::Done, 0)?;
    let picked = run.scheduler("pick next", scheduler::Request::PickNext { cpu: 0 })?;
    run.check(
        "pick next",
        picked == scheduler::Reply::Current(Some(VCPU)),
        0,
    )?;

    let null = run.complete("null hypercall", hypercall::NULL, [0; 6])?;
    run.check("null hypercall answers 0", null == 0, null)?;

    let mut frames: Vec<u64, 16> = Vec::new();
    for _ in 0..SINGLE_FRAMES {
        let frame = run.complete("populate", hypercall::MEMORY_POPULATE, [0; 6])?;
        run.check(
            "populate gives a new frame",
            frame >= 0 && !frames.contains(&(frame as u64)),
            frame,
        )?;
        let _ = frames.push(frame as u64);
    }
    for &frame in &frames {
        let info = run.complete(
            "query frame",
            hypercall::QUERY_FRAME,
            [frame, 0, 0, 0, 0, 0],
        )?;
        let (owner, refcount) = (info & 0xffff, (info >> 16) & 0xffff);
        run.check(
            "populated frame owned by the VM, once",
            owner == i64::from(VM) && refcount == 1,
            info,
        )?;
    }

    let mut timers: Vec<i64, 4> = Vec::new();
    let mut last_deadline = 0;
    for cookie in 1..=3u64 {
        last_deadline = crate::apic::tsc() + TIMER_SPACING * cookie;
        let timer = run.complete(
            "one-shot timer",
            hypercall::TIMER_ONESHOT,
            // The vector its expiry raises (the workload's caller is no VM: nothing is taken).
            [last_deadline, hypercall::VECTOR_MIN + cookie, 0, 0, 0, 0],
        )?;
        run.check(
            "one-shot timer gets a new id",
            timer > 0 && !timers.contains(&timer),
            timer,
        )?;
        let _ = timers.push(timer);
    }

    let yielded = run.hypercall("yield", hypercall::YIELD, [0; 6])?;
    run.check("yield blocks the vCPU", yielded == Reply::Blocked, 0)?;
    let picked = run.scheduler(
        "pick next after yield",
        scheduler::Request::PickNext { cpu: 0 },
    )?;
    run.check(
        "the only vCPU runs again",
        picked == scheduler::Reply::Current(Some(VCPU)),
        0,
    )?;

    // A multicall batch of four populates: every entry completes, each with a new frame.
    let mut entries: Vec<MulticallEntry, { hypercall::MULTICALL_MAX }> = Vec::new();
    for _ in 0..4 {
        let _ = entries.push(MulticallEntry {
            number: hypercall::MEMORY_POPULATE as u16,
            args: [0, 0],
        });
    }
    let batch = hypercall::Request::Multicall {
        cpu: 0,
        vm: VM,
        vcpu: VCPU.vcpu,
        batch: 1,
        entries,
    };
    let outcome = run.call("multicall", HYPERCALL, &batch, |reply: &Reply| {
        *reply == Reply::Incomplete
    })?;
    let Reply::Multicall(outcomes) = outcome else {
        return Err(WorkloadError::Refused("multicall"));
    };
    run.check(
        "multicall answers every entry",
        outcomes.len() == 4,
        outcomes.len() as i64,
    )?;
    for outcome in outcomes {
        let EntryOutcome::Complete(frame) = outcome else {
            return Err(WorkloadError::Refused("multicall entry"));
        };
        run.check(
            "multicall populate gives a new frame",
            frame >= 0 && !frames.contains(&(frame as u64)),
            frame,
        )?;
        let _ = frames.push(frame as u64);
    }

    for &frame in &frames {
        let released =
            run.complete("release", hypercall::MEMORY_RELEASE, [frame, 0, 0, 0, 0, 0])?;
        run.check("release answers 0", released == 0, released)?;
    }
    let info = run.complete(
        "query released frame",
        hypercall::QUERY_FRAME,
        [frames[0], 0, 0, 0, 0, 0],
    )?;
    run.check("a released frame is free", info & 0xffff == 0xffff, info)?;

    // Timer expiry by notification: the timer domain programmed its earliest deadline in the
    // core; let the last one pass. The core's tick sees the deadline pass and posts DEADLINE to
    // the timer domain (delivered by an idle CPU, or at its next entry), which expires what is
    // due, so no deadline is left.
    while crate::apic::tsc() < last_deadline {
        core::hint::spin_loop();
    }
    // Expiry is asynchronous, at the granularity of the core's 100 Hz tick: ask until no
    // deadline is left, waiting two ticks between asks, for at most a second.
    let mut next = timer::Reply::Deadline(Some(last_deadline));
    for _ in 0..50 {
        next = run.call(
            "next deadline",
            TIMER,
            &timer::Request::NextDeadline { cpu: 0 },
            |_: &timer::Reply| false,
        )?;
        if next == timer::Reply::Deadline(None) {
            break;
        }
        crate::apic::delay_us(20_000);
    }
    run.check(
        "due timers expired through deadline notifications",
        next == timer::Reply::Deadline(None),
        0,
    )?;
    let fired = crate::domain::deadlines_fired();
    run.check(
        "the timer domain programmed a deadline through the core and it fired",
        fired >= 1,
        fired as i64,
    )?;
    // The workload's vCPU leaves the scheduler, so guests that come later find it empty.
    let destroyed = run.scheduler(
        "destroy vCPU",
        scheduler::Request::DestroyVcpu { vcpu: VCPU },
    )?;
    run.check(
        "the workload's vCPU is removed",
        destroyed == scheduler::Reply::Done,
        0,
    )?;
    Ok(())
}
