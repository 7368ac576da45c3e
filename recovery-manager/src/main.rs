//! The recovery manager's domain binary: serves `ipc::recovery` from its policy state.
#![no_std]
#![no_main]
#![forbid(unsafe_code)]

use ipc::recovery::{Reply, Request};
use microvisor_runtime::{Context, StartReason, StateService};
use recovery_manager::PolicyState;

struct RecoveryManager;

impl StateService for RecoveryManager {
    type State = PolicyState;
    type Request = Request;
    const NAME: &'static str = "recovery manager";

    fn handle(_: &mut Context, state: &mut PolicyState, request: Request) -> Reply {
        state.handle(request)
    }

    fn init(context: &Context, state: &mut PolicyState) {
        // The policy the core configured (given again at every start), not a default.
        state.init_configured(context.config());
    }

    fn repair(_: &Context, _: &mut PolicyState, _: StartReason) -> u32 {
        // The failure history is kept across the manager's own restarts when it is sound.
        0
    }

    fn valid(state: &PolicyState) -> bool {
        state.validate()
    }
}

microvisor_runtime::domain_entry!(RecoveryManager);
