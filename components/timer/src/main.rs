//! The timer domain's binary: serves `ipc::timer` from the per-CPU heaps in its state region.
#![no_std]
#![no_main]
#![forbid(unsafe_code)]

use ipc::timer::{Reply, Request};
use microvisor_runtime::{Context, StartReason, StateService};
use timer::TimerState;

struct Timer;

impl StateService for Timer {
    type State = TimerState;
    type Request = Request;
    const NAME: &'static str = "timer";

    fn handle(_: &mut Context, state: &mut TimerState, request: Request) -> Reply {
        state.handle(request)
    }

    fn init(context: &Context, state: &mut TimerState) {
        state.init(context.cpu_count().min(usize::from(u8::MAX)) as u8);
    }

    fn repair(state: &mut TimerState, _: StartReason) -> u32 {
        // Re-activates recurring timers caught mid-expiry (NiLiHype's repair).
        state.repair().fixes()
    }

    fn valid(state: &TimerState) -> bool {
        state.validate().is_ok()
    }

    /// A timer tick (an interrupt the core turned into a notification): expire every due
    /// timer, on every CPU's heap.
    fn notified(context: &mut Context, state: &mut TimerState, bits: u64) {
        if bits & microvisor_abi::notify::TICK == 0 {
            return;
        }
        let now = context.tsc();
        for cpu in 0..context.cpu_count().min(usize::from(u8::MAX)) as u8 {
            // Each Expire answers a bounded batch; `more` says another is due.
            while let Reply::Expired { more: true, .. } = state.handle(Request::Expire { cpu, now })
            {
            }
        }
    }
}

microvisor_runtime::domain_entry!(Timer);
