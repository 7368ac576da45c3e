//! The scheduler domain's binary: serves `ipc::scheduler` from the runqueues in its state
//! region.
#![no_std]
#![no_main]
#![forbid(unsafe_code)]

use ipc::scheduler::Request;
use microvisor_runtime::{Context, Service, StartReason};
use scheduler::SchedulerState;
use zerocopy::FromBytes;

struct Scheduler;

fn state(bytes: &mut [u8]) -> &mut SchedulerState {
    match SchedulerState::mut_from_prefix(bytes) {
        Ok((state, _)) => state,
        Err(_) => panic!("the state region cannot hold the runqueues"),
    }
}

impl Service for Scheduler {
    fn serve(context: &mut Context, _caller: u16, request: &[u8], reply: &mut [u8]) -> usize {
        context.with_state(|_, bytes| {
            let state = state(bytes);
            ipc::serve::<Request>(request, reply, |request| state.handle(request)).unwrap_or(0)
        })
    }

    fn start(context: &mut Context, reason: StartReason) {
        let cpus = context.cpu_count().min(usize::from(u8::MAX)) as u8;
        let (fixes, valid) = context.with_state(|_, bytes| {
            let state = state(bytes);
            let fixes = match reason {
                StartReason::Boot => {
                    state.init(cpus);
                    0
                }
                // No vCPU is loaded on any CPU yet (guests come with the VMX slice), so there is
                // no per-CPU record to reconcile against: repair from the queues alone.
                StartReason::AfterMicroreset | StartReason::AfterMicroreboot => {
                    state.repair(None).fixes()
                }
            };
            let valid = state.validate().is_ok();
            if !valid {
                state.init(cpus);
            }
            (fixes, valid)
        });
        context.log(format_args!(
            "scheduler start ({reason:?}): {fixes} repairs, state valid: {valid}"
        ));
    }
}

microvisor_runtime::domain_entry!(Scheduler);
