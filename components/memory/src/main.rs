//! The memory domain's binary: serves `ipc::memory` from the frame table in its state region.
#![no_std]
#![no_main]
#![forbid(unsafe_code)]

use ipc::memory::{FrameNumber, Reply, Request};
use memory::{MemoryState, RepairScope};
use microvisor_runtime::{Context, StartReason, StateService, repair};

/// First frame number of the pool before the core places it (its configuration word: the
/// pool's first frame, given at every start once the core has placed the pool).
const POOL_BASE: u32 = 0x1_0000;

struct Memory;

impl StateService for Memory {
    type State = MemoryState;
    type Request = Request;
    const NAME: &'static str = "memory";

    fn handle(_: &mut Context, state: &mut MemoryState, request: Request) -> Reply {
        state.handle(request)
    }

    fn init(context: &Context, state: &mut MemoryState) {
        // Where the core placed the pool: a restart that must initialise the frame table again
        // keeps the pool where the core's frames are (the ownership in it is lost).
        let base = match context.config() {
            0 => POOL_BASE,
            base => base,
        };
        state.init(FrameNumber(base));
    }

    fn repair(context: &Context, state: &mut MemoryState, reason: StartReason) -> u32 {
        let undo = context.repair_enabled(repair::UNDO_LOG);
        let recount = context.repair_enabled(repair::RECOUNT);
        match reason {
            // Microreboot: rebuild every derived count from the kept frame table.
            StartReason::AfterMicroreboot if recount => state.repair(RepairScope::Full).fixes(),
            // Microreset: roll back or complete the one update in flight (O(1)).
            _ if undo => state.repair(RepairScope::InFlight).fixes(),
            _ => 0,
        }
    }

    fn valid(state: &MemoryState) -> bool {
        state.validate().is_ok()
    }
}

microvisor_runtime::domain_entry!(Memory);
