//! The timer domain's binary: serves `ipc::timer` from the per-CPU heaps in its state region.
#![no_std]
#![no_main]
#![forbid(unsafe_code)]

use ipc::timer::Request;
use microvisor_runtime::{Context, Service, StartReason};
use timer::TimerState;
use zerocopy::FromBytes;

struct Timer;

fn state(bytes: &mut [u8]) -> &mut TimerState {
    match TimerState::mut_from_prefix(bytes) {
        Ok((state, _)) => state,
        Err(_) => panic!("the state region cannot hold the timer heaps"),
    }
}

impl Service for Timer {
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
                // Re-activates recurring timers caught mid-expiry (NiLiHype's repair).
                StartReason::AfterMicroreset | StartReason::AfterMicroreboot => {
                    state.repair().fixes()
                }
            };
            let valid = state.validate().is_ok();
            if !valid {
                state.init(cpus);
            }
            (fixes, valid)
        });
        context.log(format_args!(
            "timer start ({reason:?}): {fixes} repairs, state valid: {valid}"
        ));
    }
}

microvisor_runtime::domain_entry!(Timer);
