//! The hypercall domain's binary: serves `ipc::hypercall` (the guest ABI) by calling the
//! scheduler, memory and timer domains through the core.
#![no_std]
#![no_main]
#![forbid(unsafe_code)]

use hypercall::{HypercallState, Services};
use ipc::hypercall::{Reply, Request};
use ipc::{CallError, DomainIndex, memory, scheduler, timer};
use microvisor_runtime::{Context, StartReason, StateService, repair};

/// Retries of an idempotent service request after its domain restarted.
const RETRIES: u32 = 2;

struct Hypercall;

/// The other services, reached with typed calls through the core.
struct Peers<'a>(&'a mut Context);

impl Services for Peers<'_> {
    fn scheduler(&mut self, request: scheduler::Request) -> Result<scheduler::Reply, CallError> {
        ipc::call(self.0, DomainIndex::Scheduler, &request, RETRIES)
    }

    fn memory(&mut self, request: memory::Request) -> Result<memory::Reply, CallError> {
        ipc::call(self.0, DomainIndex::Memory, &request, RETRIES)
    }

    fn timer(&mut self, request: timer::Request) -> Result<timer::Reply, CallError> {
        ipc::call(self.0, DomainIndex::Timer, &request, RETRIES)
    }

    fn console(&mut self, vm: u16, text: &str) {
        self.0.log(format_args!("vm {vm}: {text}"));
    }
}

impl StateService for Hypercall {
    type State = HypercallState;
    type Request = Request;
    const NAME: &'static str = "hypercall";

    fn handle(context: &mut Context, state: &mut HypercallState, request: Request) -> Reply {
        state.dispatch(request, &mut Peers(context))
    }

    fn init(_: &Context, state: &mut HypercallState) {
        state.init();
    }

    fn repair(context: &Context, state: &mut HypercallState, _: StartReason) -> u32 {
        if !context.repair_enabled(repair::MULTICALL_LOG) {
            return 0;
        }
        // Keeps the multicall completion logs so a retried batch skips finished entries.
        state.repair().fixes()
    }

    fn valid(state: &HypercallState) -> bool {
        state.validate().is_ok()
    }
}

microvisor_runtime::domain_entry!(Hypercall);
