//! Hypercall domain: the guest-facing ABI (VMCALL and the other synchronous guest exits) and
//! multicall batches.
//!
//! Design rules:
//! - Guests are malicious: [`HypercallState::dispatch`] checks the caller and every argument
//!   before asking any service anything; a refused call changes nothing anywhere.
//! - The dispatcher reaches the other domains only through the [`Services`] trait: the binary
//!   implements it with IPC calls (`ipc::call`, which already retries idempotent operations
//!   after a peer restart), tests implement it with fakes. This crate links no other
//!   component.
//! - A service that fails mid-call (`PeerRestarted`, `PeerFailed`, `Busy`) makes the call
//!   `Incomplete`: the core does not advance the guest's RIP, and the guest re-issues the
//!   hypercall once the service is back (NiLiHype: "retry partially executed hypercalls").
//! - Multicall batches keep a per-entry completion log in [`HypercallState`], which lives in
//!   the state region: a retried batch (same vCPU, batch number and entries) skips the entries
//!   already completed, whether the batch stopped because a service failed or because this
//!   domain failed and was recovered (NiLiHype's multicall repair).
//!
//! Invariants: log slots are free, in progress or done; a log's completion mask covers only its
//! entries, a done log's covers all of them; each vCPU has at most one log; stored outcomes
//! are valid.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

use heapless::Vec;
use ipc::CallError;
use ipc::hypercall::{
    CONSOLE_MAX, EntryOutcome, GFN_LIMIT, GRANT, HypercallError, MAP_GRANT, MEMORY_POPULATE,
    MEMORY_RELEASE, MULTICALL, MULTICALL_MAX, MulticallEntry, NULL, QUERY_FRAME, Reply, Request,
    TIMER_ONESHOT, UNMAP_GRANT, VM_EXIT, YIELD,
};
use ipc::limits::{MAX_CPUS, MAX_VCPUS, MAX_VCPUS_PER_VM, MAX_VMS};
use ipc::memory::{self, FrameNumber};
use ipc::scheduler::{self, VcpuId};
use ipc::timer;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Multicall logs: one per vCPU the system can hold.
pub const MAX_LOGS: usize = MAX_VCPUS;

/// The other domains, as the dispatcher sees them.
pub trait Services {
    /// Calls the scheduler.
    fn scheduler(&mut self, request: scheduler::Request) -> Result<scheduler::Reply, CallError>;
    /// Calls the memory domain.
    fn memory(&mut self, request: memory::Request) -> Result<memory::Reply, CallError>;
    /// Calls the timer domain.
    fn timer(&mut self, request: timer::Request) -> Result<timer::Reply, CallError>;
    /// Writes one console line for VM `vm` (already made printable).
    fn console(&mut self, vm: u16, text: &str);
}

/// The state of a multicall log slot, stored as a byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum LogState {
    /// Unused.
    Free = 0,
    /// A batch has started and not every entry has completed.
    InProgress = 1,
    /// Every entry completed; kept so a retry after a lost reply answers the same outcomes.
    Done = 2,
}

impl LogState {
    /// Decodes a stored byte.
    pub const fn from_u8(value: u8) -> Option<LogState> {
        match value {
            0 => Some(LogState::Free),
            1 => Some(LogState::InProgress),
            2 => Some(LogState::Done),
            _ => None,
        }
    }
}

/// One vCPU's multicall completion log (96 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct MulticallLog {
    /// A [`LogState`] byte.
    pub state: u8,
    /// Entries in the batch.
    pub count: u8,
    /// Bit `i` set: entry `i` completed and its outcome is stored.
    pub completed: u8,
    /// Zero.
    pub reserved: u8,
    /// The calling VM.
    pub vm: u16,
    /// The calling vCPU.
    pub vcpu: u16,
    /// The batch number the caller gave.
    pub batch: u32,
    /// FNV-1a digest of the entries, so a different batch under a reused number starts over.
    pub digest: u32,
    /// When the log was started (for evicting the oldest done log).
    pub stamp: u32,
    /// Zero.
    pub reserved_2: u32,
    /// Per entry: 0 = completed with `values[i]`, `k` = refused with `HypercallError` `k-1`.
    pub outcomes: [u8; MULTICALL_MAX],
    /// Per entry: the completed value.
    pub values: [i64; MULTICALL_MAX],
}

impl MulticallLog {
    const FREE: MulticallLog = MulticallLog {
        state: LogState::Free as u8,
        count: 0,
        completed: 0,
        reserved: 0,
        vm: 0,
        vcpu: 0,
        batch: 0,
        digest: 0,
        stamp: 0,
        reserved_2: 0,
        outcomes: [0; MULTICALL_MAX],
        values: [0; MULTICALL_MAX],
    };

    fn full_mask(&self) -> u8 {
        match self.count {
            0 => 0,
            count if usize::from(count) >= MULTICALL_MAX => u8::MAX,
            count => (1u8 << count) - 1,
        }
    }

    fn outcome(&self, index: usize) -> Option<EntryOutcome> {
        match self.outcomes[index] {
            0 => Some(EntryOutcome::Complete(self.values[index])),
            code => HypercallError::ALL
                .get(usize::from(code) - 1)
                .map(|&error| EntryOutcome::Error(error)),
        }
    }
}

/// The hypercall domain's whole state (3080 bytes), as it lies in the state region.
#[derive(Debug, Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct HypercallState {
    /// The next log stamp.
    pub next_stamp: u32,
    /// Zero.
    pub reserved: u32,
    /// Multicall completion logs.
    pub logs: [MulticallLog; MAX_LOGS],
}

/// A broken invariant found by [`HypercallState::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateError {
    /// A log's state byte is invalid.
    BadLogState {
        /// The log slot.
        slot: u8,
    },
    /// A log's count is over `MULTICALL_MAX`, its mask covers missing entries, or a done
    /// log's mask does not cover all entries.
    BadCompletion {
        /// The log slot.
        slot: u8,
    },
    /// A completed entry's stored outcome is not a valid outcome.
    BadOutcome {
        /// The log slot.
        slot: u8,
    },
    /// A log names a VM or vCPU out of range.
    BadCaller {
        /// The log slot.
        slot: u8,
    },
    /// Two logs belong to the same vCPU (this is the second).
    DuplicateCaller {
        /// The log slot.
        slot: u8,
    },
}

impl StateError {
    /// A stable number for logs and `ipc::lifecycle::Reply::Invalid`: the check number in the
    /// high byte, the slot in the low byte.
    pub const fn code(self) -> u16 {
        let (check, slot) = match self {
            StateError::BadLogState { slot } => (1, slot),
            StateError::BadCompletion { slot } => (2, slot),
            StateError::BadOutcome { slot } => (3, slot),
            StateError::BadCaller { slot } => (4, slot),
            StateError::DuplicateCaller { slot } => (5, slot),
        };
        (check << 8) | slot as u16
    }
}

/// What [`HypercallState::repair`] changed and kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Logs freed because they broke an invariant (their batches run again from the start).
    pub logs_dropped: u32,
    /// Batches in progress whose logs were kept, so their retries skip completed entries.
    pub batches_in_progress: u32,
}

impl RepairReport {
    /// Number of fixes (kept batches are not fixes).
    pub fn fixes(&self) -> u32 {
        self.logs_dropped
    }
}

/// One checked call, arguments decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Null,
    Yield,
    TimerOneShot { deadline: u64, cookie: u32 },
    MemoryPopulate,
    MemoryRelease { frame: FrameNumber },
    VmExit,
    MapGrant { frame: FrameNumber },
    UnmapGrant,
    Grant { frame: FrameNumber, with: u16 },
    QueryFrame { frame: FrameNumber },
}

/// How one call ended.
enum Outcome {
    Value(i64),
    /// Completed, and the calling vCPU gave up its CPU.
    Yielded,
    Refused(HypercallError),
    /// A service failed; retry the whole call later.
    Incomplete,
}

/// The calling context every call is checked against.
#[derive(Debug, Clone, Copy)]
struct Caller {
    cpu: u8,
    vm: u16,
    vcpu: u16,
}

fn caller(cpu: u8, vm: u16, vcpu: u16) -> Result<Caller, HypercallError> {
    if usize::from(cpu) < MAX_CPUS && vm < MAX_VMS && vcpu < MAX_VCPUS_PER_VM {
        Ok(Caller { cpu, vm, vcpu })
    } else {
        Err(HypercallError::BadVcpu)
    }
}

/// Checks a call's number and arguments; unused arguments must be 0.
fn check(number: u64, args: &[u64; 6]) -> Result<Call, HypercallError> {
    let used = match number {
        NULL | YIELD => 0,
        MEMORY_RELEASE | QUERY_FRAME | MEMORY_POPULATE | UNMAP_GRANT => 1,
        TIMER_ONESHOT | GRANT | VM_EXIT | MAP_GRANT => 2,
        // MULTICALL included: a batch travels as `Request::Multicall`, never as one call.
        _ => return Err(HypercallError::BadNumber),
    };
    if args[used..].iter().any(|&arg| arg != 0) {
        return Err(HypercallError::InvalidArgument);
    }
    let frame = || {
        u32::try_from(args[0])
            .map(FrameNumber)
            .map_err(|_| HypercallError::InvalidArgument)
    };
    // Guest frame numbers: the core checks the exact window; here only their range.
    let gfn = |arg: u64| {
        if arg < GFN_LIMIT {
            Ok(())
        } else {
            Err(HypercallError::InvalidArgument)
        }
    };
    Ok(match number {
        NULL => Call::Null,
        YIELD => Call::Yield,
        MEMORY_POPULATE => {
            gfn(args[0])?;
            Call::MemoryPopulate
        }
        UNMAP_GRANT => {
            gfn(args[0])?;
            Call::UnmapGrant
        }
        MAP_GRANT => {
            gfn(args[1])?;
            Call::MapGrant { frame: frame()? }
        }
        VM_EXIT => {
            // Verdict 0 (passed) or 1 (failed); the checksum is any value.
            if args[0] > 1 {
                return Err(HypercallError::InvalidArgument);
            }
            Call::VmExit
        }
        MEMORY_RELEASE => Call::MemoryRelease { frame: frame()? },
        QUERY_FRAME => Call::QueryFrame { frame: frame()? },
        TIMER_ONESHOT => Call::TimerOneShot {
            deadline: args[0],
            cookie: u32::try_from(args[1]).map_err(|_| HypercallError::InvalidArgument)?,
        },
        _ => {
            let with = u16::try_from(args[1])
                .ok()
                .filter(|&with| with < MAX_VMS)
                .ok_or(HypercallError::InvalidArgument)?;
            Call::Grant {
                frame: frame()?,
                with,
            }
        }
    })
}

/// A transport failure: a service being recovered makes the call incomplete (retry later);
/// anything else is a bug in the wiring.
fn transport(error: CallError) -> Outcome {
    match error {
        CallError::PeerRestarted | CallError::PeerFailed | CallError::Busy => Outcome::Incomplete,
        CallError::NoCapability
        | CallError::Malformed
        | CallError::UnknownOperation
        | CallError::Oversized => Outcome::Refused(HypercallError::Internal),
    }
}

fn memory_error(error: memory::Error) -> HypercallError {
    match error {
        memory::Error::BadFrame | memory::Error::BadOwner => HypercallError::InvalidArgument,
        memory::Error::FrameFree | memory::Error::NotShared => HypercallError::NotFound,
        memory::Error::NotOwner | memory::Error::SelfShare => HypercallError::PermissionDenied,
        memory::Error::StillShared | memory::Error::AlreadyShared => HypercallError::InUse,
        memory::Error::OutOfFrames | memory::Error::ShareTableFull => HypercallError::NoResources,
        memory::Error::Inconsistent | memory::Error::PoolInUse => HypercallError::Internal,
    }
}

fn timer_error(error: timer::Error) -> HypercallError {
    match error {
        timer::Error::BadCpu => HypercallError::BadVcpu,
        timer::Error::BadPeriod => HypercallError::InvalidArgument,
        timer::Error::HeapFull => HypercallError::NoResources,
        timer::Error::UnknownTimer => HypercallError::NotFound,
        timer::Error::Inconsistent => HypercallError::Internal,
    }
}

fn scheduler_error(error: scheduler::Error) -> HypercallError {
    match error {
        scheduler::Error::BadCpu | scheduler::Error::UnknownVcpu | scheduler::Error::Idle => {
            HypercallError::BadVcpu
        }
        scheduler::Error::VcpuExists
        | scheduler::Error::TableFull
        | scheduler::Error::Inconsistent => HypercallError::Internal,
    }
}

/// Packs a frame's entry for `QUERY_FRAME` (see `ipc::hypercall::QUERY_FRAME`).
fn pack(info: memory::FrameInfo) -> i64 {
    let owner = u64::from(info.owner.unwrap_or(u16::MAX));
    let value = owner
        | u64::from(info.refcount) << 16
        | u64::from(info.kind.to_u8()) << 32
        | u64::from(info.validated) << 40;
    value as i64
}

/// What a memory reply means for the guest.
fn memory_outcome(reply: Result<memory::Reply, CallError>) -> Outcome {
    match reply {
        Err(error) => transport(error),
        Ok(memory::Reply::Done) => Outcome::Value(0),
        Ok(memory::Reply::Allocated(frame)) => Outcome::Value(i64::from(frame.0)),
        Ok(memory::Reply::Frame(info)) => Outcome::Value(pack(info)),
        Ok(memory::Reply::Error(error)) => Outcome::Refused(memory_error(error)),
        Ok(memory::Reply::Stats(_)) => Outcome::Refused(HypercallError::Internal),
    }
}

/// Runs one checked call against the services.
fn perform(call: Call, caller: Caller, services: &mut impl Services) -> Outcome {
    match call {
        Call::Null => Outcome::Value(0),
        Call::MemoryPopulate => {
            memory_outcome(services.memory(memory::Request::Allocate { owner: caller.vm }))
        }
        Call::MemoryRelease { frame } => memory_outcome(services.memory(memory::Request::Free {
            frame,
            owner: caller.vm,
        })),
        Call::Grant { frame, with } => memory_outcome(services.memory(memory::Request::Share {
            frame,
            owner: caller.vm,
            with,
        })),
        Call::QueryFrame { frame } => {
            memory_outcome(services.memory(memory::Request::Query { frame }))
        }
        Call::MapGrant { frame } => memory_outcome(services.memory(memory::Request::MayMap {
            frame,
            vm: caller.vm,
        })),
        // The core owns the EPT: it refuses a page that is not mapped before asking.
        Call::UnmapGrant => Outcome::Value(0),
        Call::VmExit => {
            let vcpu = VcpuId {
                vm: caller.vm,
                vcpu: caller.vcpu,
            };
            match services.scheduler(scheduler::Request::DestroyVcpu { vcpu }) {
                Err(error) => transport(error),
                // Gone already: a retried exit after a lost reply.
                Ok(scheduler::Reply::Done)
                | Ok(scheduler::Reply::Error(scheduler::Error::UnknownVcpu)) => Outcome::Yielded,
                Ok(scheduler::Reply::Error(error)) => Outcome::Refused(scheduler_error(error)),
                Ok(scheduler::Reply::Current(_)) => Outcome::Refused(HypercallError::Internal),
            }
        }
        Call::TimerOneShot { deadline, cookie } => {
            let request = timer::Request::SetOneShot {
                cpu: caller.cpu,
                deadline,
                cookie,
            };
            match services.timer(request) {
                Err(error) => transport(error),
                Ok(timer::Reply::Armed(id)) => Outcome::Value(i64::from(id.0)),
                Ok(timer::Reply::Error(error)) => Outcome::Refused(timer_error(error)),
                Ok(_) => Outcome::Refused(HypercallError::Internal),
            }
        }
        Call::Yield => {
            let me = VcpuId {
                vm: caller.vm,
                vcpu: caller.vcpu,
            };
            match services.scheduler(scheduler::Request::Current { cpu: caller.cpu }) {
                Err(error) => return transport(error),
                Ok(scheduler::Reply::Current(Some(current))) if current == me => {}
                Ok(scheduler::Reply::Current(_)) => {
                    return Outcome::Refused(HypercallError::BadVcpu);
                }
                Ok(scheduler::Reply::Error(error)) => {
                    return Outcome::Refused(scheduler_error(error));
                }
                Ok(scheduler::Reply::Done) => return Outcome::Refused(HypercallError::Internal),
            }
            match services.scheduler(scheduler::Request::Yield { cpu: caller.cpu }) {
                Err(error) => transport(error),
                Ok(scheduler::Reply::Done) => Outcome::Yielded,
                Ok(scheduler::Reply::Error(error)) => Outcome::Refused(scheduler_error(error)),
                Ok(scheduler::Reply::Current(_)) => Outcome::Refused(HypercallError::Internal),
            }
        }
    }
}

/// FNV-1a over the entries' numbers and arguments.
fn digest(entries: &[MulticallEntry]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for entry in entries {
        let words = [u64::from(entry.number), entry.args[0], entry.args[1]];
        for byte in words.iter().flat_map(|word| word.to_le_bytes()) {
            hash ^= u32::from(byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
    }
    hash
}

impl HypercallState {
    /// Initialises (at boot, and as a microreboot's last resort): no multicall logs.
    pub fn init(&mut self) {
        self.next_stamp = 0;
        self.reserved = 0;
        self.logs = [MulticallLog::FREE; MAX_LOGS];
    }

    /// Serves one request. Never panics; a refused call changes nothing.
    pub fn dispatch(&mut self, request: Request, services: &mut impl Services) -> Reply {
        match request {
            Request::Hypercall {
                cpu,
                vm,
                vcpu,
                number,
                args,
            } => {
                let checked =
                    caller(cpu, vm, vcpu).and_then(|caller| Ok((caller, check(number, &args)?)));
                match checked {
                    Err(error) => Reply::Error(error),
                    Ok((caller, call)) => match perform(call, caller, services) {
                        Outcome::Value(value) => Reply::Complete { value },
                        Outcome::Yielded => Reply::Blocked,
                        Outcome::Refused(error) => Reply::Error(error),
                        Outcome::Incomplete => Reply::Incomplete,
                    },
                }
            }
            Request::Multicall {
                cpu,
                vm,
                vcpu,
                batch,
                entries,
            } => match caller(cpu, vm, vcpu) {
                Err(error) => Reply::Error(error),
                Ok(caller) => self.multicall(caller, batch, &entries, services),
            },
            Request::Console {
                cpu,
                vm,
                vcpu,
                text,
            } => match caller(cpu, vm, vcpu) {
                Err(error) => Reply::Error(error),
                Ok(_) if text.is_empty() => Reply::Error(HypercallError::InvalidArgument),
                Ok(caller) => {
                    let mut line = [b'?'; CONSOLE_MAX];
                    for (slot, &byte) in line.iter_mut().zip(text.iter()) {
                        if byte == b' ' || byte.is_ascii_graphic() {
                            *slot = byte;
                        }
                    }
                    let line = &line[..text.len()];
                    // Printable ASCII only, so this cannot fail.
                    let text = core::str::from_utf8(line).unwrap_or("?");
                    services.console(caller.vm, text);
                    Reply::Complete {
                        value: line.len() as i64,
                    }
                }
            },
        }
    }

    /// The log slot for this batch: the vCPU's own if it holds this batch, else a fresh one
    /// (the vCPU's old slot, a free one, or the oldest done one).
    fn log_for(&mut self, caller: Caller, batch: u32, entries: &[MulticallEntry]) -> Option<usize> {
        let digest = digest(entries);
        let mine = self.logs.iter().position(|log| {
            log.state != LogState::Free as u8 && log.vm == caller.vm && log.vcpu == caller.vcpu
        });
        if let Some(slot) = mine {
            let log = &self.logs[slot];
            if log.batch == batch && log.digest == digest && usize::from(log.count) == entries.len()
            {
                return Some(slot);
            }
        }
        let slot = mine
            .or_else(|| {
                self.logs
                    .iter()
                    .position(|log| log.state == LogState::Free as u8)
            })
            .or_else(|| {
                self.logs
                    .iter()
                    .enumerate()
                    .filter(|(_, log)| log.state == LogState::Done as u8)
                    .min_by_key(|(_, log)| log.stamp)
                    .map(|(slot, _)| slot)
            })?;
        self.logs[slot] = MulticallLog {
            state: LogState::InProgress as u8,
            count: entries.len() as u8,
            vm: caller.vm,
            vcpu: caller.vcpu,
            batch,
            digest,
            stamp: self.next_stamp,
            ..MulticallLog::FREE
        };
        self.next_stamp = self.next_stamp.wrapping_add(1);
        Some(slot)
    }

    fn multicall(
        &mut self,
        caller: Caller,
        batch: u32,
        entries: &[MulticallEntry],
        services: &mut impl Services,
    ) -> Reply {
        let Some(slot) = self.log_for(caller, batch, entries) else {
            return Reply::Error(HypercallError::Busy);
        };
        for (index, entry) in entries.iter().enumerate() {
            let bit = 1u8 << index;
            if self.logs[slot].completed & bit != 0 {
                continue;
            }
            let args = [entry.args[0], entry.args[1], 0, 0, 0, 0];
            let outcome = match check(u64::from(entry.number), &args) {
                _ if u64::from(entry.number) == MULTICALL => {
                    Outcome::Refused(HypercallError::NestedMulticall)
                }
                // A yield or an exit deschedules the caller, and mapping changes the EPT the
                // core owns: they have no place inside a batch.
                Ok(Call::Yield | Call::VmExit | Call::MapGrant { .. } | Call::UnmapGrant) => {
                    Outcome::Refused(HypercallError::InvalidArgument)
                }
                Ok(call) => perform(call, caller, services),
                Err(error) => Outcome::Refused(error),
            };
            let log = &mut self.logs[slot];
            match outcome {
                Outcome::Value(value) => {
                    log.values[index] = value;
                    log.outcomes[index] = 0;
                }
                Outcome::Refused(error) => {
                    log.outcomes[index] = error as u8 + 1;
                }
                Outcome::Yielded => {
                    log.values[index] = 0;
                    log.outcomes[index] = 0;
                }
                Outcome::Incomplete => return Reply::Incomplete,
            }
            // The completion bit last: an entry counts as done only once its outcome is in.
            log.completed |= bit;
        }
        let log = &mut self.logs[slot];
        log.state = LogState::Done as u8;
        let mut outcomes: Vec<EntryOutcome, MULTICALL_MAX> = Vec::new();
        for index in 0..entries.len() {
            let outcome = log
                .outcome(index)
                .unwrap_or(EntryOutcome::Error(HypercallError::Internal));
            // Cannot fail: at most MULTICALL_MAX entries.
            let _ = outcomes.push(outcome);
        }
        Reply::Multicall(outcomes)
    }

    /// The log of `vm`/`vcpu`'s latest batch, if any (for reports and tests).
    pub fn log(&self, vm: u16, vcpu: u16) -> Option<&MulticallLog> {
        self.logs
            .iter()
            .find(|log| log.state != LogState::Free as u8 && log.vm == vm && log.vcpu == vcpu)
    }

    fn check_log(&self, slot: usize) -> Result<(), StateError> {
        let log = &self.logs[slot];
        let slot_number = slot as u8;
        let state =
            LogState::from_u8(log.state).ok_or(StateError::BadLogState { slot: slot_number })?;
        if state == LogState::Free {
            return Ok(());
        }
        let mask = log.full_mask();
        let complete = log.completed == mask;
        if usize::from(log.count) > MULTICALL_MAX
            || log.completed & !mask != 0
            || (state == LogState::Done && !complete)
        {
            return Err(StateError::BadCompletion { slot: slot_number });
        }
        let bad_outcome = (0..usize::from(log.count))
            .any(|index| log.completed & (1 << index) != 0 && log.outcome(index).is_none());
        if bad_outcome {
            return Err(StateError::BadOutcome { slot: slot_number });
        }
        if log.vm >= MAX_VMS || log.vcpu >= MAX_VCPUS_PER_VM {
            return Err(StateError::BadCaller { slot: slot_number });
        }
        let duplicate = self.logs[..slot].iter().any(|other| {
            other.state != LogState::Free as u8 && other.vm == log.vm && other.vcpu == log.vcpu
        });
        if duplicate {
            return Err(StateError::DuplicateCaller { slot: slot_number });
        }
        Ok(())
    }

    /// Checks every invariant; the first broken one is returned.
    pub fn validate(&self) -> Result<(), StateError> {
        (0..MAX_LOGS).try_for_each(|slot| self.check_log(slot))
    }

    /// The repair routine after a microreset or microreboot: frees logs that break an
    /// invariant and keeps every valid log, in progress or done, so retried batches skip
    /// their completed entries. After a repair [`validate`](Self::validate) succeeds.
    pub fn repair(&mut self) -> RepairReport {
        let mut report = RepairReport::default();
        for slot in 0..MAX_LOGS {
            if self.check_log(slot).is_err() {
                self.logs[slot] = MulticallLog::FREE;
                report.logs_dropped += 1;
            } else if self.logs[slot].state == LogState::InProgress as u8 {
                report.batches_in_progress += 1;
            }
        }
        report
    }
}

#[cfg(test)]
mod tests;
