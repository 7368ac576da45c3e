//! The scheduler domain's binary: serves `ipc::scheduler` from the runqueues in its state
//! region.
#![no_std]
#![no_main]
#![forbid(unsafe_code)]

use ipc::scheduler::{Reply, Request};
use microvisor_runtime::{Context, StartReason, StateService, repair};
use scheduler::SchedulerState;

struct Scheduler;

impl StateService for Scheduler {
    type State = SchedulerState;
    type Request = Request;
    const NAME: &'static str = "scheduler";

    fn handle(_: &mut Context, state: &mut SchedulerState, request: Request) -> Reply {
        state.handle(request)
    }

    fn init(context: &Context, state: &mut SchedulerState) {
        state.init(context.cpu_count().min(usize::from(u8::MAX)) as u8);
    }

    fn repair(context: &Context, state: &mut SchedulerState, _: StartReason) -> u32 {
        if !context.repair_enabled(repair::SCHEDULER_QUEUES) {
            return 0;
        }
        // No vCPU is loaded on any CPU yet (guests come with the VMX slice), so there is no
        // per-CPU record to reconcile against: repair from the queues alone.
        state.repair(None).fixes()
    }

    fn valid(state: &SchedulerState) -> bool {
        state.validate().is_ok()
    }
}

microvisor_runtime::domain_entry!(Scheduler);
