//! The domain runtime: entry point, system-call stubs, message buffers and panic reporting
//! for the ring-3 service domains.
//!
//! A domain binary is one line: `microvisor_runtime::domain_entry!(MyService);` where
//! `MyService` implements [`Service`]. Its threads (one per CPU) then run
//! [`run`]: serve the request the core delivered, reply, wait for the next — forever. The
//! core enters a fresh thread at `_start` with RDI = its CPU, RSI = the length of the request
//! already in its buffer, RDX = the caller's domain index; re-entering after a microreset is
//! exactly the same (restart uses the boot path).
//!
//! This crate and the core are the only places allowed `unsafe`; the component crates that
//! use it stay `#![forbid(unsafe_code)]`.
#![no_std]

use core::arch::asm;
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU64, Ordering};
use microvisor_abi::{self as abi, Status, call};

pub use microvisor_abi::MESSAGE_BYTES;
/// The repairs a recovery may make, for [`Context::repair_enabled`].
pub use microvisor_abi::repair;
// The memory functions `core` needs; linked for their symbols.
use microvisor_freestanding as _;

/// Why the domain (re)started; see [`microvisor_abi::start`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartReason {
    /// First start since boot.
    Boot,
    /// After a microreset (state kept in place).
    AfterMicroreset,
    /// After a microreboot (code and data pristine, state region kept).
    AfterMicroreboot,
}

/// A request handler: the whole of a service, as the runtime sees it.
pub trait Service {
    /// Serves one request from domain `caller`: reads `request`, writes the reply into
    /// `reply` and returns its length.
    fn serve(context: &mut Context, caller: u16, request: &[u8], reply: &mut [u8]) -> usize;

    /// Runs once per (re)start, before the first request, on the first thread the core
    /// enters: initialise, repair, or validate and reintegrate the state region.
    fn start(_context: &mut Context, _reason: StartReason) {}

    /// Handles notification `bits` (see [`microvisor_abi::notify`]), before the request the
    /// thread was entered for.
    fn notified(_context: &mut Context, _bits: u64) {}
}

/// What a thread knows about itself, and its way to the core.
pub struct Context {
    cpu: usize,
    cpu_count: usize,
    /// The generation this thread last saw of each domain (index = domain index).
    generations: [u32; 16],
    /// The repairs the core enables ([`microvisor_abi::repair`] bits).
    repairs: u64,
    /// Bytes of the state region the core mapped (at most [`abi::STATE_BYTES`]).
    state_bytes: usize,
    /// The domain's configuration word, given by the core at every start.
    config: u32,
}

/// A failed call to another domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallFailed {
    /// Why.
    pub status: Status,
    /// The callee's generation now (meaningful with `PeerRestarted`).
    pub generation: u32,
}

impl Context {
    fn new(cpu: u64, cpu_count: u64) -> Self {
        Self {
            cpu: cpu as usize,
            cpu_count: cpu_count as usize,
            generations: [1; 16],
            repairs: abi::repair::ALL,
            state_bytes: 0,
            config: 0,
        }
    }

    /// The configuration word the core gave this domain ([`abi::start::pack`]; 0 = none): what
    /// its `init` builds on, at boot and at a restart whose state must be initialised again.
    pub fn config(&self) -> u32 {
        self.config
    }

    /// Whether the core enables `repair` (an [`microvisor_abi::repair`] bit; `repairs=` on
    /// its command line): a switched-off repair is skipped, to measure what it is worth.
    pub fn repair_enabled(&self, repair: u64) -> bool {
        self.repairs & repair == repair
    }

    /// The CPU this thread serves.
    pub fn cpu(&self) -> usize {
        self.cpu
    }

    /// How many CPUs the system has (each has a thread of this domain).
    pub fn cpu_count(&self) -> usize {
        self.cpu_count
    }

    /// Runs `f` on this context and the domain's state region, holding the domain's state
    /// lock (lock 0 of the lock table) so the domain's threads on other CPUs wait. Recovery releases the lock by
    /// clearing the table, so a thread that died holding it does not block the next one.
    pub fn with_state<R>(&mut self, f: impl FnOnce(&mut Self, &mut [u8]) -> R) -> R {
        // SAFETY: the lock table page is mapped read-write in every domain at this fixed,
        // 8-aligned address and only ever accessed atomically.
        let lock = unsafe { &*(abi::LOCK_TABLE_BASE as *const AtomicU64) };
        let owner = self.cpu as u64 + 1;
        while lock
            .compare_exchange_weak(0, owner, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        // SAFETY: the core maps `state_bytes` (the manifest's pages, at most STATE_BYTES) of the
        // state region read-write at this fixed address and told this thread so at its entry;
        // holding the state lock makes this the only reference to it among the domain's
        // threads.
        let state = unsafe {
            core::slice::from_raw_parts_mut(abi::STATE_BASE as *mut u8, self.state_bytes)
        };
        let result = f(self, state);
        lock.store(0, Ordering::Release);
        result
    }

    fn buffer(&mut self) -> &mut [u8; MESSAGE_BYTES] {
        // SAFETY: the core maps this thread's message buffer at this address in the domain, one
        // page per CPU, and only this thread (the one serving `cpu`) uses it; `&mut self`
        // guarantees no other reference from this thread is alive.
        unsafe { &mut *(abi::message_buffer(self.cpu) as *mut [u8; MESSAGE_BYTES]) }
    }

    /// Calls domain `target` (expecting `generation`) with `request`; the reply is written to
    /// `reply`. Returns the reply length.
    pub fn call(
        &mut self,
        target: u16,
        generation: u32,
        request: &[u8],
        reply: &mut [u8],
    ) -> Result<usize, CallFailed> {
        let length = request.len().min(MESSAGE_BYTES);
        self.buffer()[..length].copy_from_slice(&request[..length]);
        let (status, reply_length, new_generation, _) = syscall3(
            call::CALL,
            u64::from(target),
            u64::from(generation),
            length as u64,
        );
        let status = Status::from_raw(status).unwrap_or(Status::BadArgument);
        if status != Status::Ok {
            return Err(CallFailed {
                status,
                generation: new_generation as u32,
            });
        }
        let reply_length = (reply_length as usize).min(MESSAGE_BYTES).min(reply.len());
        reply[..reply_length].copy_from_slice(&self.buffer()[..reply_length]);
        Ok(reply_length)
    }

    /// Posts notification `bits` to domain `target` (asynchronous; the manifest must let this
    /// domain call it).
    pub fn notify(&mut self, target: u16, bits: u64) -> Result<(), Status> {
        let (status, ..) = syscall3(call::NOTIFY, u64::from(target), bits, 0);
        match Status::from_raw(status) {
            Some(Status::Ok) => Ok(()),
            Some(status) => Err(status),
            None => Err(Status::BadArgument),
        }
    }

    /// Timer domain only: programs CPU `cpu`'s next deadline (TSC; 0 cancels) in the core.
    pub fn set_deadline(&mut self, cpu: usize, deadline: u64) -> Result<(), Status> {
        let (status, ..) = syscall3(call::SET_DEADLINE, cpu as u64, deadline, 0);
        match Status::from_raw(status) {
            Some(Status::Ok) => Ok(()),
            Some(status) => Err(status),
            None => Err(Status::BadArgument),
        }
    }

    /// Timer domain only: raises virtual interrupt `vector` in vCPU `vcpu` of guest VM `vm`.
    pub fn inject(&mut self, vm: u16, vcpu: u8, vector: u8) -> Result<(), Status> {
        let (status, ..) = syscall3(
            call::INJECT,
            u64::from(vm),
            u64::from(vcpu),
            u64::from(vector),
        );
        match Status::from_raw(status) {
            Some(Status::Ok) => Ok(()),
            Some(status) => Err(status),
            None => Err(Status::BadArgument),
        }
    }

    /// The time-stamp counter.
    pub fn tsc(&self) -> u64 {
        // SAFETY: RDTSC is allowed in ring 3 (the core never sets CR4.TSD) and has no side effect.
        unsafe { core::arch::x86_64::_rdtsc() }
    }

    /// Writes one line to the console.
    pub fn log(&mut self, args: fmt::Arguments<'_>) {
        let mut writer = BufferWriter {
            buffer: self.buffer(),
            length: 0,
        };
        let _ = writer.write_fmt(args);
        let length = writer.length;
        syscall3(call::LOG, length as u64, 0, 0);
    }
}

struct BufferWriter<'a> {
    buffer: &'a mut [u8; MESSAGE_BYTES],
    length: usize,
}

impl Write for BufferWriter<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let take = text.len().min(MESSAGE_BYTES - self.length);
        self.buffer[self.length..self.length + take].copy_from_slice(&text.as_bytes()[..take]);
        self.length += take;
        Ok(())
    }
}

/// A system call with three arguments; returns RAX, RDX, R8 and R9.
fn syscall3(number: u64, first: u64, second: u64, third: u64) -> (u64, u64, u64, u64) {
    let (rax, rdx, r8, r9);
    // SAFETY: `int 0x80` enters the core's system-call gate; the core preserves every register
    // but RAX, RDX, R8 and R9 (declared as outputs) and touches no memory of this domain except
    // the thread's message buffer, which Rust code only reaches through `Context::buffer`.
    unsafe {
        asm!("int 0x80", inout("rax") number => rax, in("rdi") first, in("rsi") second,
             inout("rdx") third => rdx, out("r8") r8, out("r9") r9, options(nostack));
    }
    (rax, rdx, r8, r9)
}

/// A thread's life: run the start routine if the core says so, serve the first request,
/// then reply-and-wait forever.
pub fn run<S: Service>(
    cpu: u64,
    request_length: u64,
    caller: u64,
    reason: u64,
    cpu_count: u64,
    notifications: u64,
) -> ! {
    let (cpu_count, state_bytes) = abi::entry::unpack(cpu_count);
    let mut context = Context::new(cpu, cpu_count);
    context.state_bytes = (state_bytes as usize).min(abi::STATE_BYTES);
    let (reason, repairs, config) = abi::start::unpack(reason);
    context.repairs = repairs;
    context.config = config;
    let reason = match reason {
        abi::start::BOOT => Some(StartReason::Boot),
        abi::start::AFTER_MICRORESET => Some(StartReason::AfterMicroreset),
        abi::start::AFTER_MICROREBOOT => Some(StartReason::AfterMicroreboot),
        _ => None,
    };
    // Allocated (and zeroed) once per thread, not per request: only the bytes in use move.
    let mut request = [0u8; MESSAGE_BYTES];
    let mut reply = [0u8; MESSAGE_BYTES];
    let mut length = (request_length as usize).min(MESSAGE_BYTES);
    let mut caller = caller as u16;
    // The first request waits in the message buffer; take it out before the start routine,
    // which may use the buffer (to log, or to call other domains).
    request[..length].copy_from_slice(&context.buffer()[..length]);
    if let Some(reason) = reason {
        S::start(&mut context, reason);
    }
    if notifications != 0 {
        S::notified(&mut context, notifications);
    }
    loop {
        let request_length = length;
        // An empty request is the core delivering notifications only: nothing to serve.
        let reply_length = if request_length == 0 {
            0
        } else {
            S::serve(&mut context, caller, &request[..request_length], &mut reply)
                .min(MESSAGE_BYTES)
        };
        context.buffer()[..reply_length].copy_from_slice(&reply[..reply_length]);
        let (_, next_length, next_caller, notifications) =
            syscall3(call::REPLY_WAIT, reply_length as u64, 0, 0);
        length = (next_length as usize).min(MESSAGE_BYTES);
        caller = next_caller as u16;
        request[..length].copy_from_slice(&context.buffer()[..length]);
        if notifications != 0 {
            S::notified(&mut context, notifications);
        }
    }
}

/// Reports a panic to the core, which suspends the domain and starts recovery.
pub fn report_panic(cpu: u64, info: &core::panic::PanicInfo<'_>) -> ! {
    let mut context = Context::new(cpu, 1);
    let mut writer = BufferWriter {
        buffer: context.buffer(),
        length: 0,
    };
    let _ = write!(writer, "{}", info.message());
    if let Some(location) = info.location() {
        let _ = write!(writer, " at {}:{}", location.file(), location.line());
    }
    let length = writer.length;
    loop {
        syscall3(call::PANIC, length as u64, 0, 0);
    }
}

/// Which CPU's thread is running: read from the stack pointer, since every thread's stack
/// lies at a fixed place ([`microvisor_abi::stack_bottom`]).
pub fn current_cpu() -> u64 {
    let rsp: u64;
    // SAFETY: reads RSP; no memory access.
    unsafe { asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags)) };
    (0..abi::MAX_DOMAIN_CPUS as u64)
        .find(|&cpu| {
            (abi::stack_bottom(cpu as usize)..=abi::stack_top(cpu as usize)).contains(&rsp)
        })
        .unwrap_or(0)
}

/// Declares a domain binary: its entry point and panic handler, serving with `$service`.
#[macro_export]
macro_rules! domain_entry {
    ($service:ty) => {
        /// Entry point of every thread of this domain (see `microvisor_runtime`).
        #[unsafe(no_mangle)]
        pub extern "C" fn _start(
            cpu: u64,
            request_length: u64,
            caller: u64,
            reason: u64,
            cpu_count: u64,
            notifications: u64,
        ) -> ! {
            $crate::run::<$service>(
                cpu,
                request_length,
                caller,
                reason,
                cpu_count,
                notifications,
            )
        }

        #[panic_handler]
        fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
            $crate::report_panic($crate::current_cpu(), info)
        }

        /// Never called (`panic = "abort"`), but the precompiled `core` references it.
        #[unsafe(no_mangle)]
        pub extern "C" fn rust_eh_personality() {}
    };
}

/// A service whose whole state is one plain-data value in the state region.
///
/// The domain binaries of the services are this trait plus `domain_entry!`: the runtime does
/// the locking, the typed view of the region, decoding, encoding and the start sequence
/// (initialise at boot; after a recovery, repair and validate the kept state, and initialise
/// it again only if it cannot be trusted).
pub trait StateService {
    /// The state's type (plain data: any bit pattern is a value, validated before use).
    type State: zerocopy::FromBytes + zerocopy::IntoBytes + zerocopy::KnownLayout;
    /// The interface it serves.
    type Request: ipc::Operation;
    /// Its name in log lines.
    const NAME: &'static str;

    /// Serves one decoded request (may call other domains through `context`).
    fn handle(
        context: &mut Context,
        state: &mut Self::State,
        request: Self::Request,
    ) -> <Self::Request as ipc::Operation>::Reply;
    /// Boot-time (and fallback) initialisation.
    fn init(context: &Context, state: &mut Self::State);
    /// Repair after a microreset or microreboot, making only the repairs `context` enables
    /// ([`Context::repair_enabled`]); returns the number of fixes.
    fn repair(context: &Context, state: &mut Self::State, reason: StartReason) -> u32;
    /// Whether the state can be trusted.
    fn valid(state: &Self::State) -> bool;
    /// Handles notification `bits` (with the state lock held).
    fn notified(_context: &mut Context, _state: &mut Self::State, _bits: u64) {}
}

fn state_of<T: zerocopy::FromBytes + zerocopy::IntoBytes + zerocopy::KnownLayout>(
    bytes: &mut [u8],
) -> &mut T {
    match T::mut_from_prefix(bytes) {
        Ok((state, _)) => state,
        Err(_) => panic!("the state region cannot hold this domain's state"),
    }
}

impl<T: StateService> Service for T {
    fn serve(context: &mut Context, _caller: u16, request: &[u8], reply: &mut [u8]) -> usize {
        context.with_state(|context, bytes| {
            let state = state_of::<T::State>(bytes);
            ipc::serve::<T::Request>(request, reply, |request| T::handle(context, state, request))
                .unwrap_or(0)
        })
    }

    fn start(context: &mut Context, reason: StartReason) {
        let (fixes, valid) = context.with_state(|context, bytes| {
            let state = state_of::<T::State>(bytes);
            let fixes = match reason {
                StartReason::Boot => {
                    T::init(context, state);
                    0
                }
                _ => T::repair(context, state, reason),
            };
            let valid = T::valid(state);
            // The last resort, unless switched off: then the service goes on with state it
            // cannot trust (what the repairs sweep measures).
            if !valid && context.repair_enabled(abi::repair::REINIT_INVALID) {
                T::init(context, state);
            }
            (fixes, valid)
        });
        context.log(format_args!(
            "{} start ({reason:?}): {fixes} repairs, state valid: {valid}",
            T::NAME
        ));
    }

    fn notified(context: &mut Context, bits: u64) {
        context
            .with_state(|context, bytes| T::notified(context, state_of::<T::State>(bytes), bits));
    }
}

/// Calls to other domains with the `ipc` crate's typed client: the core's status codes
/// become [`ipc::CallError`]s, and the generation of each peer is tracked so a restart shows
/// up as `PeerRestarted` once (the typed client then retries idempotent requests).
impl ipc::Transport for Context {
    fn call(
        &mut self,
        peer: ipc::DomainIndex,
        request: &[u8],
        reply: &mut [u8; ipc::MESSAGE_MAX],
    ) -> Result<usize, ipc::CallError> {
        let index = peer as u16;
        let slot = usize::from(index) % self.generations.len();
        match Context::call(self, index, self.generations[slot], request, reply) {
            Ok(length) => Ok(length),
            Err(failed) => {
                if failed.status == Status::PeerRestarted {
                    self.generations[slot] = failed.generation;
                }
                Err(match failed.status {
                    Status::PeerRestarted => ipc::CallError::PeerRestarted,
                    Status::PeerFailed => ipc::CallError::PeerFailed,
                    Status::Busy => ipc::CallError::Busy,
                    Status::BadArgument => ipc::CallError::Oversized,
                    Status::Ok | Status::NoCapability | Status::NoSuchTarget => {
                        ipc::CallError::NoCapability
                    }
                })
            }
        }
    }
}

/// Deliberate misbehaviour, for the isolation and fault tests only (the probe domain). Each
/// of these is a bug the core must catch as the calling domain's fault.
#[cfg(feature = "misbehave")]
pub mod probe {
    /// Writes `value` at `address` in this domain's address space.
    pub fn write_u64(address: u64, value: u64) {
        // SAFETY: not sound by design: the probe domain uses it to show that a write outside
        // the domain's own regions faults in the domain and is recovered, never corrupting
        // the core or another domain.
        unsafe { core::ptr::write_volatile(address as *mut u64, value) };
    }

    /// Jumps to `address` (a fail-stop when it is 0).
    pub fn jump_to(address: u64) -> ! {
        // SAFETY: not sound by design, as above: the core must catch the resulting fault.
        unsafe { core::arch::asm!("jmp {}", in(reg) address, options(noreturn)) }
    }
}
