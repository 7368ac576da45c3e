//! The hypercall domain's binary: serves `ipc::hypercall` (the guest ABI) by calling the
//! scheduler, memory and timer domains through the core.
#![no_std]
#![no_main]
#![forbid(unsafe_code)]

use hypercall::{HypercallState, Services};
use ipc::{CallError, DomainIndex, Transport, hypercall::Request, memory, scheduler, timer};
use microvisor_runtime::{Context, Service, StartReason};
use zerocopy::FromBytes;

/// Retries of an idempotent service request after its domain restarted.
const RETRIES: u32 = 2;

struct Hypercall;

/// The other services, reached with typed calls through the core.
struct Peers<'a, T: Transport>(&'a mut T);

impl<T: Transport> Services for Peers<'_, T> {
    fn scheduler(&mut self, request: scheduler::Request) -> Result<scheduler::Reply, CallError> {
        ipc::call(self.0, DomainIndex::Scheduler, &request, RETRIES)
    }

    fn memory(&mut self, request: memory::Request) -> Result<memory::Reply, CallError> {
        ipc::call(self.0, DomainIndex::Memory, &request, RETRIES)
    }

    fn timer(&mut self, request: timer::Request) -> Result<timer::Reply, CallError> {
        ipc::call(self.0, DomainIndex::Timer, &request, RETRIES)
    }
}

fn state(bytes: &mut [u8]) -> &mut HypercallState {
    match HypercallState::mut_from_prefix(bytes) {
        Ok((state, _)) => state,
        Err(_) => panic!("the state region cannot hold the multicall logs"),
    }
}

impl Service for Hypercall {
    fn serve(context: &mut Context, _caller: u16, request: &[u8], reply: &mut [u8]) -> usize {
        context.with_state(|context, bytes| {
            let state = state(bytes);
            ipc::serve::<Request>(request, reply, |request| {
                state.dispatch(request, &mut Peers(context))
            })
            .unwrap_or(0)
        })
    }

    fn start(context: &mut Context, reason: StartReason) {
        let (fixes, valid) = context.with_state(|_, bytes| {
            let state = state(bytes);
            let fixes = match reason {
                StartReason::Boot => {
                    state.init();
                    0
                }
                // Keeps the multicall completion logs so a retried batch skips finished entries.
                StartReason::AfterMicroreset | StartReason::AfterMicroreboot => {
                    state.repair().fixes()
                }
            };
            let valid = state.validate().is_ok();
            if !valid {
                state.init();
            }
            (fixes, valid)
        });
        context.log(format_args!(
            "hypercall start ({reason:?}): {fixes} repairs, state valid: {valid}"
        ));
    }
}

microvisor_runtime::domain_entry!(Hypercall);
