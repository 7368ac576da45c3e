//! The timer domain's binary: serves `ipc::timer` from the per-CPU heaps in its state region.
#![no_std]
#![no_main]
#![forbid(unsafe_code)]

use ipc::DomainIndex;
use ipc::timer::{Reply, Request};
use microvisor_abi::notify;
use microvisor_runtime::{Context, StartReason, StateService, repair};
use timer::TimerState;

struct Timer;

impl StateService for Timer {
    type State = TimerState;
    type Request = Request;
    const NAME: &'static str = "timer";

    fn handle(context: &mut Context, state: &mut TimerState, request: Request) -> Reply {
        let reply = state.handle(request);
        program_deadlines(context, state);
        reply
    }

    fn init(context: &Context, state: &mut TimerState) {
        state.init(cpu_count(context));
    }

    fn repair(context: &Context, state: &mut TimerState, _: StartReason) -> u32 {
        if !context.repair_enabled(repair::TIMER_REACTIVATION) {
            return 0;
        }
        // Re-activates recurring timers caught mid-expiry (NiLiHype's repair).
        state.repair().fixes()
    }

    fn valid(state: &TimerState) -> bool {
        state.validate().is_ok()
    }

    /// A deadline passed (the core turned the timer interrupt into a notification): expire
    /// every due timer on every CPU's heap, tell the hypercall domain, program the next ones.
    fn notified(context: &mut Context, state: &mut TimerState, bits: u64) {
        if bits & (notify::DEADLINE | notify::TICK) == 0 {
            return;
        }
        let now = context.tsc();
        let mut expired = 0;
        for cpu in 0..cpu_count(context) {
            // Each Expire answers a bounded batch; `more` says another is due.
            while let Reply::Expired { cookies, more } = state.handle(Request::Expire { cpu, now })
            {
                expired += cookies.len();
                for cookie in cookies {
                    // A guest timer: the core injects its vector into the vCPU (and wakes it).
                    // A VM that is gone answers NoSuchTarget: its timer simply lapses.
                    let (vm, vcpu, vector) = ipc::hypercall::timer_target(cookie);
                    if u64::from(vector) >= ipc::hypercall::VECTOR_MIN {
                        let _ = context.inject(vm, vcpu, vector);
                    }
                }
                if !more {
                    break;
                }
            }
        }
        if expired > 0 {
            let _ = context.notify(DomainIndex::Hypercall as u16, notify::TIMERS_EXPIRED);
        }
        program_deadlines(context, state);
    }
}

fn cpu_count(context: &Context) -> u8 {
    context.cpu_count().min(usize::from(u8::MAX)) as u8
}

/// Programs each CPU's earliest deadline in the core (0: none armed there).
fn program_deadlines(context: &mut Context, state: &mut TimerState) {
    for cpu in 0..cpu_count(context) {
        let deadline = match state.handle(Request::NextDeadline { cpu }) {
            Reply::Deadline(Some(deadline)) => deadline.max(1),
            _ => 0,
        };
        let _ = context.set_deadline(usize::from(cpu), deadline);
    }
}

microvisor_runtime::domain_entry!(Timer);
