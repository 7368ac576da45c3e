//! The recovery manager's domain binary: serves `ipc::recovery` from its policy state.
#![no_std]
#![no_main]
#![forbid(unsafe_code)]

use ipc::recovery::Request;
use microvisor_runtime::{Context, Service, StartReason};
use recovery_manager::PolicyState;
use zerocopy::FromBytes;

struct RecoveryManager;

fn state(bytes: &mut [u8]) -> &mut PolicyState {
    match PolicyState::mut_from_prefix(bytes) {
        Ok((state, _)) => state,
        Err(_) => panic!("the state region cannot hold the policy"),
    }
}

impl Service for RecoveryManager {
    fn serve(context: &mut Context, _caller: u16, request: &[u8], reply: &mut [u8]) -> usize {
        context.with_state(|_, bytes| {
            let state = state(bytes);
            ipc::serve::<Request>(request, reply, |request| state.handle(request)).unwrap_or(0)
        })
    }

    fn start(context: &mut Context, reason: StartReason) {
        // The failure history is kept across the manager's own restarts, if it is sound.
        let valid = context.with_state(|_, bytes| {
            let state = state(bytes);
            let keep = reason != StartReason::Boot && state.validate();
            if !keep {
                state.init();
            }
            keep
        });
        context.log(format_args!(
            "recovery manager start ({reason:?}): history kept: {valid}"
        ));
    }
}

microvisor_runtime::domain_entry!(RecoveryManager);
