//! The memory domain's binary: serves `ipc::memory` from the frame table in its state region.
#![no_std]
#![no_main]
#![forbid(unsafe_code)]

use ipc::memory::{FrameNumber, Request};
use memory::{MemoryState, RepairScope};
use microvisor_runtime::{Context, Service, StartReason};
use zerocopy::FromBytes;

/// First frame number of the pool this domain manages (a logical pool until guests bring
/// real RAM with the VMX slice).
const POOL_BASE: u32 = 0x1_0000;

struct Memory;

fn state(bytes: &mut [u8]) -> &mut MemoryState {
    match MemoryState::mut_from_prefix(bytes) {
        Ok((state, _)) => state,
        Err(_) => panic!("the state region cannot hold the frame table"),
    }
}

impl Service for Memory {
    fn serve(context: &mut Context, _caller: u16, request: &[u8], reply: &mut [u8]) -> usize {
        context.with_state(|_, bytes| {
            let state = state(bytes);
            ipc::serve::<Request>(request, reply, |request| state.handle(request)).unwrap_or(0)
        })
    }

    fn start(context: &mut Context, reason: StartReason) {
        let (fixes, valid) = context.with_state(|_, bytes| {
            let state = state(bytes);
            let fixes = match reason {
                StartReason::Boot => {
                    state.init(FrameNumber(POOL_BASE));
                    0
                }
                // Microreset: roll back or complete the one update in flight (O(1)).
                StartReason::AfterMicroreset => state.repair(RepairScope::InFlight).fixes(),
                // Microreboot: rebuild every derived count from the kept frame table.
                StartReason::AfterMicroreboot => state.repair(RepairScope::Full).fixes(),
            };
            let valid = state.validate().is_ok();
            if !valid {
                state.init(FrameNumber(POOL_BASE));
            }
            (fixes, valid)
        });
        context.log(format_args!(
            "memory start ({reason:?}): {fixes} repairs, state valid: {valid}"
        ));
    }
}

microvisor_runtime::domain_entry!(Memory);
