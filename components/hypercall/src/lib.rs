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
//! - Event channels live in [`HypercallState`] too: a channel table, a pending-port mask per
//!   VM and a byte per VM of vCPUs blocked in `EVENT_WAIT`. Pending bits are levels, not
//!   counts, so a send that stopped half-way (a wake failed) can be repeated; a send wakes the
//!   waiters before it sets the pending bit, so a refused send leaves no event behind.
//! - Event channels are charged to the VM that allocates them (`EVTCHN_ALLOC`) against its
//!   quota (`ipc::quota`): a per-VM limit the core reserves (`Request::SetQuota`, refused
//!   `QuotaUnavailable` when the VMs' committed channels would exceed the channel table) and
//!   a count of the live channels it owns. A VM at its limit is refused `QuotaExceeded`; one
//!   under it always finds a free record. The counts are derived from the channel table:
//!   every repair recounts them. `Request::DropQuota` releases a VM that is gone: its
//!   channels, pending and waiting bits, multicall logs and reservation.
//!
//! Invariants: log slots are free, in progress or done; a log's completion mask covers only its
//! entries, a done log's covers all of them; each vCPU has at most one log; stored outcomes
//! are valid. Channel records are free, unbound or bound; a live record's ends name VMs below
//! `MAX_VMS`, two different ones; the allocating end's port is in `1..EVENT_PORTS`, the
//! peer's too once bound and 0 while unbound; no two live ends share (VM, port); a VM's
//! pending mask has bits only at the ports of its live ends (so bits 0 and 63 are clear);
//! a VM's waiting byte has bits only below `MAX_VCPUS_PER_VM`; a VM's channel count is the
//! number of live channels it allocated, and the VMs' committed channels fit the table.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

use heapless::Vec;
use ipc::CallError;
use ipc::hypercall::{
    CONSOLE_MAX, EVENT_PORTS, EVENT_WAIT, EVTCHN_ALLOC, EVTCHN_BIND, EVTCHN_CLOSE, EVTCHN_SEND,
    EntryOutcome, ExitAnswer, GFN_LIMIT, GRANT, GRANT_REVOKE, GuestExit, HypercallError, MAP_GRANT,
    MEMORY_POPULATE, MEMORY_RELEASE, MULTICALL, MULTICALL_MAX, MulticallEntry, NULL, QUERY_FRAME,
    Reply, Request, TIMER_ONESHOT, UNMAP_GRANT, VECTOR_MIN, VM_EXIT, YIELD, timer_cookie,
};
use ipc::limits::{MAX_CPUS, MAX_VCPUS, MAX_VCPUS_PER_VM, MAX_VMS};
use ipc::memory::{self, FrameNumber};
use ipc::quota::{EVENT_PORT_CAPACITY, committed, reservation_fits};
use ipc::scheduler::{self, VcpuId};
use ipc::timer;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Multicall logs: one per vCPU the system can hold.
pub const MAX_LOGS: usize = MAX_VCPUS;

/// Event-channel records: the most channels open at once, over all VMs.
pub const MAX_CHANNELS: usize = ipc::limits::CHANNELS;

/// The vCPU bits a VM's waiting byte may use.
const WAITING_MASK: u8 = ((1u16 << MAX_VCPUS_PER_VM) - 1) as u8;

/// The bits a pending mask may ever use: ports `1..EVENT_PORTS`.
const PORTS_MASK: u64 = ((1u64 << EVENT_PORTS) - 1) & !1;

// A VM's waiting vCPUs are one byte; slots, channels and VMs are named by a byte in
// `StateError::code`; a pending mask is one u64 that must stay positive as an i64.
const _: () = assert!(MAX_VCPUS_PER_VM <= 8);
const _: () = assert!(MAX_LOGS <= 256 && MAX_CHANNELS <= 256 && MAX_VMS <= 256);
const _: () = assert!(EVENT_PORTS <= 63);

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

/// The state of an event-channel record, stored as a byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ChannelState {
    /// Unused.
    Free = 0,
    /// Allocated by its owner; the peer VM may bind to it.
    Unbound = 1,
    /// Both ends hold a port; either may signal the other.
    Bound = 2,
}

impl ChannelState {
    /// Decodes a stored byte.
    pub const fn from_u8(value: u8) -> Option<ChannelState> {
        match value {
            0 => Some(ChannelState::Free),
            1 => Some(ChannelState::Unbound),
            2 => Some(ChannelState::Bound),
            _ => None,
        }
    }
}

/// One end of an event channel: a VM and its port (4 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct ChannelEnd {
    /// The VM.
    pub vm: u16,
    /// Its port, `1..EVENT_PORTS` (0: none yet).
    pub port: u16,
}

/// An event channel between two VMs (12 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct EventChannel {
    /// A [`ChannelState`] byte.
    pub state: u8,
    /// Zero.
    pub reserved: u8,
    /// Zero.
    pub reserved_2: u16,
    /// The end of the VM that allocated the channel (`EVTCHN_ALLOC`).
    pub owner: ChannelEnd,
    /// The end of the VM allowed to bind (`EVTCHN_BIND`); its port is 0 until it binds.
    pub peer: ChannelEnd,
}

impl EventChannel {
    const FREE: EventChannel = EventChannel {
        state: ChannelState::Free as u8,
        reserved: 0,
        reserved_2: 0,
        owner: ChannelEnd { vm: 0, port: 0 },
        peer: ChannelEnd { vm: 0, port: 0 },
    };

    /// The ends that hold a port: the owner's while unbound, both once bound, none when free
    /// (or when the state byte is invalid).
    fn live_ends(&self) -> [Option<ChannelEnd>; 2] {
        match ChannelState::from_u8(self.state) {
            Some(ChannelState::Unbound) => [Some(self.owner), None],
            Some(ChannelState::Bound) => [Some(self.owner), Some(self.peer)],
            Some(ChannelState::Free) | None => [None, None],
        }
    }

    fn holds(&self, end: ChannelEnd) -> bool {
        self.live_ends().contains(&Some(end))
    }

    /// Whether VM `vm` is at either end, bound or not (an unbound record names its peer).
    fn involves(&self, vm: u16) -> bool {
        ChannelState::from_u8(self.state).is_some_and(|state| state != ChannelState::Free)
            && (self.owner.vm == vm || self.peer.vm == vm)
    }
}

/// The pending-mask bit of `port` (none for a port out of range).
fn port_bit(port: u16) -> u64 {
    if (1..EVENT_PORTS).contains(&port) {
        1 << port
    } else {
        0
    }
}

/// The bits of a waiting byte that name no vCPU (none while `MAX_VCPUS_PER_VM` is 8, but the
/// check stays for smaller limits).
fn stray_waiting(byte: u8) -> u8 {
    byte & !WAITING_MASK
}

/// The hypercall domain's whole state (4680 bytes: two pages of state region), as it lies in
/// the state region.
#[derive(Debug, Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct HypercallState {
    /// The next log stamp.
    pub next_stamp: u32,
    /// Zero.
    pub reserved: u32,
    /// Multicall completion logs.
    pub logs: [MulticallLog; MAX_LOGS],
    /// Event-channel records.
    pub channels: [EventChannel; MAX_CHANNELS],
    /// Per VM: bit `p` set = an event is pending on its port `p`.
    pub pending: [u64; MAX_VMS as usize],
    /// Per VM: bit `v` set = its vCPU `v` blocked in `EVENT_WAIT` and is woken by the next
    /// event sent to the VM.
    pub waiting: [u8; MAX_VMS as usize],
    /// Per VM: the most live channels it may have allocated (its reserved event-port quota;
    /// 0 = none).
    pub port_limits: [u16; MAX_VMS as usize],
    /// Per VM: live channels it allocated (the owner end).
    pub ports_used: [u16; MAX_VMS as usize],
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
    /// A channel record's state byte is invalid.
    BadChannelState {
        /// The channel record.
        channel: u8,
    },
    /// A live channel's end names a VM out of range or a port out of range, its two ends name
    /// the same VM, or an unbound channel's peer port is not 0.
    BadChannelEnd {
        /// The channel record.
        channel: u8,
    },
    /// A live channel end has the same (VM, port) as an end of an earlier record.
    DuplicatePort {
        /// The channel record (the later one).
        channel: u8,
    },
    /// A VM's pending mask has a bit that is not a port of one of its live channel ends.
    BadPending {
        /// The VM.
        vm: u8,
    },
    /// A VM's waiting byte names a vCPU at or over `MAX_VCPUS_PER_VM`.
    BadWaiting {
        /// The VM.
        vm: u8,
    },
    /// A VM's channel count differs from the live channels it allocated.
    BadPortCount {
        /// The VM.
        vm: u8,
    },
    /// The VMs' committed channels exceed the channel table.
    Overcommitted,
}

impl StateError {
    /// A stable number for logs and `ipc::lifecycle::Reply::Invalid`: the check number in the
    /// high byte, the log slot, channel record or VM in the low byte.
    pub const fn code(self) -> u16 {
        let (check, slot) = match self {
            StateError::BadLogState { slot } => (1, slot),
            StateError::BadCompletion { slot } => (2, slot),
            StateError::BadOutcome { slot } => (3, slot),
            StateError::BadCaller { slot } => (4, slot),
            StateError::DuplicateCaller { slot } => (5, slot),
            StateError::BadChannelState { channel } => (6, channel),
            StateError::BadChannelEnd { channel } => (7, channel),
            StateError::DuplicatePort { channel } => (8, channel),
            StateError::BadPending { vm } => (9, vm),
            StateError::BadWaiting { vm } => (10, vm),
            StateError::BadPortCount { vm } => (11, vm),
            StateError::Overcommitted => (12, 0),
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
    /// Channel records freed because they broke an invariant (their ports answer `NotFound`
    /// from then on).
    pub channels_freed: u32,
    /// VMs whose pending mask lost bits that named no live port of theirs.
    pub pending_masked: u32,
    /// VMs whose waiting byte lost bits that named no vCPU.
    pub waiting_masked: u32,
    /// VMs whose channel count was recomputed from the channel table.
    pub counts_fixed: u32,
    /// Quota limits lowered to what their VMs hold because the reservations no longer fit
    /// the table (only a corrupted state region gets there).
    pub limits_trimmed: u32,
}

impl RepairReport {
    /// Number of fixes (kept batches are not fixes).
    pub fn fixes(&self) -> u32 {
        self.logs_dropped
            + self.channels_freed
            + self.pending_masked
            + self.waiting_masked
            + self.counts_fixed
            + self.limits_trimmed
    }
}

/// One checked call, arguments decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Null,
    Yield,
    TimerOneShot { deadline: u64, vector: u8 },
    MemoryPopulate,
    MemoryRelease { frame: FrameNumber },
    VmExit,
    MapGrant { frame: FrameNumber },
    UnmapGrant,
    Grant { frame: FrameNumber, with: u16 },
    QueryFrame { frame: FrameNumber },
    EventChannelAlloc { remote: u16 },
    EventChannelBind { remote: u16, port: u16 },
    EventChannelSend { port: u16 },
    EventChannelClose { port: u16 },
    EventWait,
    GrantRevoke { frame: FrameNumber, peer: u16 },
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

/// Checks a call's number and arguments; unused arguments must be 0. Needs no state: what a
/// call names in the state (a port, a channel) is checked when it runs, still before any
/// service is asked.
fn check(caller: Caller, number: u64, args: &[u64; 6]) -> Result<Call, HypercallError> {
    let used = match number {
        NULL | YIELD | EVENT_WAIT => 0,
        MEMORY_RELEASE | QUERY_FRAME | MEMORY_POPULATE | UNMAP_GRANT | EVTCHN_ALLOC
        | EVTCHN_SEND | EVTCHN_CLOSE => 1,
        TIMER_ONESHOT | GRANT | MAP_GRANT | EVTCHN_BIND | GRANT_REVOKE => 2,
        // Verdict, checksum, and the longest gap without service the guest measured.
        VM_EXIT => 3,
        // MULTICALL included: a batch travels as `Request::Multicall`, never as one call.
        // CONSOLE_WRITE and the VM_* control calls are served by the core itself.
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
    // Another VM than the caller.
    let other_vm = |arg: u64| {
        u16::try_from(arg)
            .ok()
            .filter(|&vm| vm < MAX_VMS && vm != caller.vm)
            .ok_or(HypercallError::InvalidArgument)
    };
    let port = |arg: u64| {
        u16::try_from(arg)
            .ok()
            .filter(|port| (1..EVENT_PORTS).contains(port))
            .ok_or(HypercallError::InvalidArgument)
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
            vector: u8::try_from(args[1])
                .ok()
                .filter(|&vector| u64::from(vector) >= VECTOR_MIN)
                .ok_or(HypercallError::InvalidArgument)?,
        },
        GRANT => {
            let with = u16::try_from(args[1])
                .ok()
                .filter(|&with| with < MAX_VMS)
                .ok_or(HypercallError::InvalidArgument)?;
            Call::Grant {
                frame: frame()?,
                with,
            }
        }
        GRANT_REVOKE => Call::GrantRevoke {
            frame: frame()?,
            peer: other_vm(args[1])?,
        },
        EVTCHN_ALLOC => Call::EventChannelAlloc {
            remote: other_vm(args[0])?,
        },
        EVTCHN_BIND => Call::EventChannelBind {
            remote: other_vm(args[0])?,
            port: port(args[1])?,
        },
        EVTCHN_SEND => Call::EventChannelSend {
            port: port(args[0])?,
        },
        EVTCHN_CLOSE => Call::EventChannelClose {
            port: port(args[0])?,
        },
        EVENT_WAIT => Call::EventWait,
        _ => return Err(HypercallError::BadNumber),
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
        memory::Error::BadFrame | memory::Error::BadOwner | memory::Error::NotGuestRam => {
            HypercallError::InvalidArgument
        }
        memory::Error::FrameFree | memory::Error::NotShared => HypercallError::NotFound,
        memory::Error::NotOwner | memory::Error::SelfShare => HypercallError::PermissionDenied,
        memory::Error::StillShared | memory::Error::AlreadyShared => HypercallError::InUse,
        memory::Error::OutOfFrames | memory::Error::ShareTableFull => HypercallError::NoResources,
        memory::Error::QuotaExceeded => HypercallError::QuotaExceeded,
        memory::Error::Inconsistent
        | memory::Error::PoolInUse
        | memory::Error::QuotaUnavailable => HypercallError::Internal,
    }
}

fn timer_error(error: timer::Error) -> HypercallError {
    match error {
        timer::Error::BadCpu => HypercallError::BadVcpu,
        timer::Error::BadPeriod => HypercallError::InvalidArgument,
        timer::Error::HeapFull => HypercallError::NoResources,
        timer::Error::UnknownTimer => HypercallError::NotFound,
        timer::Error::QuotaExceeded => HypercallError::QuotaExceeded,
        timer::Error::Inconsistent | timer::Error::BadVm | timer::Error::QuotaUnavailable => {
            HypercallError::Internal
        }
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

/// What a memory reply that should be `Done` means for the guest.
fn memory_done(reply: Result<memory::Reply, CallError>) -> Outcome {
    match reply {
        Err(error) => transport(error),
        Ok(memory::Reply::Done) => Outcome::Value(0),
        Ok(memory::Reply::Error(error)) => Outcome::Refused(memory_error(error)),
        Ok(_) => Outcome::Refused(HypercallError::Internal),
    }
}

/// Four ASCII bytes as a CPUID register (little-endian, as CPUID returns vendor strings).
const fn ascii(text: &[u8; 4]) -> u32 {
    u32::from_le_bytes(*text)
}

/// What a guest sees for an instruction the core hands over: the virtual CPU's identity
/// (CPUID), an empty I/O space (reads all ones, writes absorbed), and no MSRs (refused: the
/// VM is stopped). Pure: the same exit always gets the same answer.
pub fn answer_exit(exit: GuestExit) -> ExitAnswer {
    match exit {
        GuestExit::Cpuid { leaf, .. } => ExitAnswer::Cpuid(match leaf {
            // Highest basic leaf; vendor "MicrovisorVM" in EBX, EDX, ECX.
            0 => [1, ascii(b"Micr"), ascii(b"orVM"), ascii(b"ovis")],
            // Family 6; ECX: hypervisor present (31); EDX: FPU, TSC, CX8, CMOV, MMX, FXSR,
            // SSE, SSE2.
            1 => [
                0x0000_0600,
                0,
                1 << 31,
                (1 << 0)
                    | (1 << 4)
                    | (1 << 8)
                    | (1 << 15)
                    | (1 << 23)
                    | (1 << 24)
                    | (1 << 25)
                    | (1 << 26),
            ],
            // The hypervisor leaf: "MicrovisorHV" in EBX, ECX, EDX.
            0x4000_0000 => [0x4000_0000, ascii(b"Micr"), ascii(b"ovis"), ascii(b"orHV")],
            0x8000_0000 => [0x8000_0001, 0, 0, 0],
            // SYSCALL (11), NX (20), long mode (29).
            0x8000_0001 => [0, 0, 0, (1 << 11) | (1 << 20) | (1 << 29)],
            _ => [0; 4],
        }),
        GuestExit::PortIn { size, .. } => match size {
            1 => ExitAnswer::Value(0xff),
            2 => ExitAnswer::Value(0xffff),
            4 => ExitAnswer::Value(0xffff_ffff),
            _ => ExitAnswer::Refuse,
        },
        GuestExit::PortOut { size, .. } => match size {
            1 | 2 | 4 => ExitAnswer::Done,
            _ => ExitAnswer::Refuse,
        },
        GuestExit::ReadMsr { .. } | GuestExit::WriteMsr { .. } => ExitAnswer::Refuse,
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
    /// Initialises (at boot, and as a microreboot's last resort): no multicall logs, no event
    /// channels, nothing pending, nobody waiting.
    pub fn init(&mut self) {
        self.next_stamp = 0;
        self.reserved = 0;
        self.logs = [MulticallLog::FREE; MAX_LOGS];
        self.channels = [EventChannel::FREE; MAX_CHANNELS];
        self.pending = [0; MAX_VMS as usize];
        self.waiting = [0; MAX_VMS as usize];
        self.port_limits = [0; MAX_VMS as usize];
        self.ports_used = [0; MAX_VMS as usize];
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
                let checked = caller(cpu, vm, vcpu)
                    .and_then(|caller| Ok((caller, check(caller, number, &args)?)));
                match checked {
                    Err(error) => Reply::Error(error),
                    Ok((caller, call)) => match self.perform(call, caller, services) {
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
            Request::Exit {
                cpu,
                vm,
                vcpu,
                exit,
            } => match caller(cpu, vm, vcpu) {
                Err(error) => Reply::Error(error),
                Ok(_) => Reply::Exit(answer_exit(exit)),
            },
            Request::SetQuota { vm, event_ports } => match self.set_quota(vm, event_ports) {
                Ok(()) => Reply::Complete { value: 0 },
                Err(error) => Reply::Error(error),
            },
            Request::DropQuota { vm } => match self.drop_quota(vm) {
                Ok(()) => Reply::Complete { value: 0 },
                Err(error) => Reply::Error(error),
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

    /// Runs one checked call against this domain's state and the services.
    fn perform(&mut self, call: Call, caller: Caller, services: &mut impl Services) -> Outcome {
        match call {
            Call::Null => Outcome::Value(0),
            Call::MemoryPopulate => {
                memory_outcome(services.memory(memory::Request::Allocate { owner: caller.vm }))
            }
            Call::MemoryRelease { frame } => {
                memory_outcome(services.memory(memory::Request::Free {
                    frame,
                    owner: caller.vm,
                }))
            }
            Call::Grant { frame, with } => {
                memory_outcome(services.memory(memory::Request::Share {
                    frame,
                    owner: caller.vm,
                    with,
                }))
            }
            Call::QueryFrame { frame } => {
                memory_outcome(services.memory(memory::Request::Query { frame }))
            }
            Call::MapGrant { frame } => memory_outcome(services.memory(memory::Request::MayMap {
                frame,
                vm: caller.vm,
            })),
            // The core owns the EPT: it refuses a page that is not mapped before asking.
            Call::UnmapGrant => Outcome::Value(0),
            Call::GrantRevoke { frame, peer } => {
                // Only the owner may end a share: the memory domain's `Unshare` does not check
                // who asks.
                match services.memory(memory::Request::Query { frame }) {
                    Err(error) => return transport(error),
                    Ok(memory::Reply::Frame(info)) => match info.owner {
                        Some(owner) if owner == caller.vm => {}
                        Some(_) => return Outcome::Refused(HypercallError::PermissionDenied),
                        None => return Outcome::Refused(HypercallError::NotFound),
                    },
                    Ok(memory::Reply::Error(error)) => {
                        return Outcome::Refused(memory_error(error));
                    }
                    Ok(_) => return Outcome::Refused(HypercallError::Internal),
                }
                memory_done(services.memory(memory::Request::Unshare { frame, from: peer }))
            }
            Call::VmExit => {
                let vcpu = VcpuId {
                    vm: caller.vm,
                    vcpu: caller.vcpu,
                };
                match services.scheduler(scheduler::Request::DestroyVcpu { vcpu }) {
                    Err(error) => transport(error),
                    // Gone already: a retried exit after a lost reply.
                    Ok(scheduler::Reply::Done)
                    | Ok(scheduler::Reply::Error(scheduler::Error::UnknownVcpu)) => {
                        self.release_vm(caller.vm);
                        Outcome::Yielded
                    }
                    Ok(scheduler::Reply::Error(error)) => Outcome::Refused(scheduler_error(error)),
                    Ok(scheduler::Reply::Current(_)) => Outcome::Refused(HypercallError::Internal),
                }
            }
            Call::TimerOneShot { deadline, vector } => {
                // vcpu < MAX_VCPUS_PER_VM <= 8 (checked in `caller`), so it fits the cookie's byte.
                let request = timer::Request::SetOneShot {
                    cpu: caller.cpu,
                    deadline,
                    cookie: timer_cookie(caller.vm, caller.vcpu as u8, vector),
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
                    Ok(scheduler::Reply::Done) => {
                        return Outcome::Refused(HypercallError::Internal);
                    }
                }
                match services.scheduler(scheduler::Request::Yield { cpu: caller.cpu }) {
                    Err(error) => transport(error),
                    Ok(scheduler::Reply::Done) => Outcome::Yielded,
                    Ok(scheduler::Reply::Error(error)) => Outcome::Refused(scheduler_error(error)),
                    Ok(scheduler::Reply::Current(_)) => Outcome::Refused(HypercallError::Internal),
                }
            }
            Call::EventChannelAlloc { remote } => self.channel_alloc(caller, remote),
            Call::EventChannelBind { remote, port } => self.channel_bind(caller, remote, port),
            Call::EventChannelSend { port } => self.channel_send(caller, port, services),
            Call::EventChannelClose { port } => self.channel_close(caller, port),
            Call::EventWait => self.event_wait(caller, services),
        }
    }

    /// The ports of VM `vm`'s live channel ends, as a pending-mask.
    fn live_ports(&self, vm: u16) -> u64 {
        self.channels
            .iter()
            .flat_map(EventChannel::live_ends)
            .flatten()
            .filter(|end| end.vm == vm)
            .fold(0, |mask, end| mask | port_bit(end.port))
    }

    /// VM `vm`'s lowest port that no live end holds.
    fn free_port(&self, vm: u16) -> Option<u16> {
        let used = self.live_ports(vm);
        (1..EVENT_PORTS).find(|&port| used & port_bit(port) == 0)
    }

    /// The live channel record with this end.
    fn channel_of(&self, end: ChannelEnd) -> Option<usize> {
        self.channels.iter().position(|channel| channel.holds(end))
    }

    /// Frees a channel record, drops the pending bits of both its ends and uncharges its
    /// owner.
    fn close_channel(&mut self, index: usize) {
        let channel = self.channels[index];
        for end in channel.live_ends().into_iter().flatten() {
            if let Some(pending) = self.pending.get_mut(usize::from(end.vm)) {
                *pending &= !port_bit(end.port);
            }
        }
        if channel.live_ends()[0].is_some()
            && let Some(count) = self.ports_used.get_mut(usize::from(channel.owner.vm))
        {
            *count = count.saturating_sub(1);
        }
        self.channels[index] = EventChannel::FREE;
    }

    /// Sets VM `vm`'s event-channel limit if every VM's reservation still fits the table.
    fn set_quota(&mut self, vm: u16, event_ports: u16) -> Result<(), HypercallError> {
        if vm >= MAX_VMS {
            return Err(HypercallError::BadVcpu);
        }
        let vm = usize::from(vm);
        if !reservation_fits(
            &self.port_limits,
            &self.ports_used,
            vm,
            u32::from(event_ports),
            EVENT_PORT_CAPACITY,
        ) {
            return Err(HypercallError::QuotaUnavailable);
        }
        self.port_limits[vm] = event_ports;
        Ok(())
    }

    /// Releases VM `vm`, which is gone: its channels (and pending and waiting bits), its
    /// vCPUs' multicall logs (slots other vCPUs need), its reservation.
    fn drop_quota(&mut self, vm: u16) -> Result<(), HypercallError> {
        if vm >= MAX_VMS {
            return Err(HypercallError::BadVcpu);
        }
        self.release_vm(vm);
        for log in self.logs.iter_mut() {
            if log.state != LogState::Free as u8 && log.vm == vm {
                *log = MulticallLog::FREE;
            }
        }
        self.port_limits[usize::from(vm)] = 0;
        Ok(())
    }

    fn channel_alloc(&mut self, caller: Caller, remote: u16) -> Outcome {
        let vm = usize::from(caller.vm);
        if self.ports_used[vm] >= self.port_limits[vm] {
            return Outcome::Refused(HypercallError::QuotaExceeded);
        }
        let free = self
            .channels
            .iter()
            .position(|channel| channel.state == ChannelState::Free as u8);
        let (Some(index), Some(port)) = (free, self.free_port(caller.vm)) else {
            return Outcome::Refused(HypercallError::NoResources);
        };
        self.channels[index] = EventChannel {
            state: ChannelState::Unbound as u8,
            owner: ChannelEnd {
                vm: caller.vm,
                port,
            },
            peer: ChannelEnd {
                vm: remote,
                port: 0,
            },
            ..EventChannel::FREE
        };
        self.ports_used[vm] += 1;
        Outcome::Value(i64::from(port))
    }

    fn channel_bind(&mut self, caller: Caller, remote: u16, remote_port: u16) -> Outcome {
        let offered = ChannelEnd {
            vm: remote,
            port: remote_port,
        };
        let Some(index) = self.channels.iter().position(|channel| {
            channel.state == ChannelState::Unbound as u8
                && channel.owner == offered
                && channel.peer.vm == caller.vm
        }) else {
            return Outcome::Refused(HypercallError::NotFound);
        };
        let Some(port) = self.free_port(caller.vm) else {
            return Outcome::Refused(HypercallError::NoResources);
        };
        let channel = &mut self.channels[index];
        channel.peer.port = port;
        channel.state = ChannelState::Bound as u8;
        Outcome::Value(i64::from(port))
    }

    /// Wakes the peer's waiting vCPUs, then marks the event pending: a send refused or cut
    /// short by a failed wake leaves no event behind, and its retry wakes the vCPUs not yet
    /// woken (a woken vCPU cannot look at its pending mask before this call ends: it needs
    /// this domain, which serves one request at a time).
    fn channel_send(&mut self, caller: Caller, port: u16, services: &mut impl Services) -> Outcome {
        let me = ChannelEnd {
            vm: caller.vm,
            port,
        };
        let Some(channel) = self
            .channel_of(me)
            .map(|index| self.channels[index])
            .filter(|channel| channel.state == ChannelState::Bound as u8)
        else {
            return Outcome::Refused(HypercallError::NotFound);
        };
        let peer = if channel.owner == me {
            channel.peer
        } else {
            channel.owner
        };
        let vm = usize::from(peer.vm);
        if vm >= usize::from(MAX_VMS) {
            // Only a state that failed validation names such a VM.
            return Outcome::Refused(HypercallError::Internal);
        }
        for vcpu in 0..MAX_VCPUS_PER_VM {
            let bit = 1u8 << vcpu;
            if self.waiting[vm] & bit == 0 {
                continue;
            }
            let vcpu = VcpuId { vm: peer.vm, vcpu };
            match services.scheduler(scheduler::Request::Wake { vcpu }) {
                Err(error) => return transport(error),
                // A vCPU that is gone (its VM stopped) waits no more either.
                Ok(scheduler::Reply::Done)
                | Ok(scheduler::Reply::Error(scheduler::Error::UnknownVcpu)) => {
                    self.waiting[vm] &= !bit;
                }
                Ok(_) => return Outcome::Refused(HypercallError::Internal),
            }
        }
        self.pending[vm] |= port_bit(peer.port);
        Outcome::Value(0)
    }

    fn channel_close(&mut self, caller: Caller, port: u16) -> Outcome {
        match self.channel_of(ChannelEnd {
            vm: caller.vm,
            port,
        }) {
            Some(index) => {
                self.close_channel(index);
                Outcome::Value(0)
            }
            None => Outcome::Refused(HypercallError::NotFound),
        }
    }

    fn event_wait(&mut self, caller: Caller, services: &mut impl Services) -> Outcome {
        let vm = usize::from(caller.vm);
        let bit = 1u8 << caller.vcpu;
        let pending = self.pending[vm] & PORTS_MASK;
        if pending != 0 {
            self.pending[vm] = 0;
            self.waiting[vm] &= !bit;
            // Bit 63 is never a port, so the mask is positive.
            return Outcome::Value(pending as i64);
        }
        // The waiting bit goes in before the block: if the reply is lost the vCPU may be
        // blocked, and a stale bit costs at most one spurious wake.
        self.waiting[vm] |= bit;
        let vcpu = VcpuId {
            vm: caller.vm,
            vcpu: caller.vcpu,
        };
        let refused = match services.scheduler(scheduler::Request::Block { vcpu }) {
            Err(error) => return transport(error),
            Ok(scheduler::Reply::Done) => return Outcome::Yielded,
            Ok(scheduler::Reply::Error(error)) => scheduler_error(error),
            Ok(scheduler::Reply::Current(_)) => HypercallError::Internal,
        };
        self.waiting[vm] &= !bit;
        Outcome::Refused(refused)
    }

    /// Forgets VM `vm`'s event state: closes every channel with an end in it (bound or
    /// offered to it) and clears its pending and waiting bits, so a later VM with the same
    /// number inherits nothing. Runs on `VM_EXIT`; whoever ends a VM otherwise (the core
    /// stopping or destroying it) must have it run too.
    pub fn release_vm(&mut self, vm: u16) {
        for index in 0..MAX_CHANNELS {
            if self.channels[index].involves(vm) {
                self.close_channel(index);
            }
        }
        if let Some(pending) = self.pending.get_mut(usize::from(vm)) {
            *pending = 0;
        }
        if let Some(waiting) = self.waiting.get_mut(usize::from(vm)) {
            *waiting = 0;
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
            let outcome = match check(caller, u64::from(entry.number), &args) {
                _ if u64::from(entry.number) == MULTICALL => {
                    Outcome::Refused(HypercallError::NestedMulticall)
                }
                // A yield, a wait or an exit deschedules the caller, and mapping changes the
                // EPT the core owns: they have no place inside a batch.
                Ok(
                    Call::Yield
                    | Call::EventWait
                    | Call::VmExit
                    | Call::MapGrant { .. }
                    | Call::UnmapGrant,
                ) => Outcome::Refused(HypercallError::InvalidArgument),
                Ok(call) => self.perform(call, caller, services),
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

    /// Checks channel record `index` against itself and the records before it.
    fn check_channel(&self, index: usize) -> Result<(), StateError> {
        let channel = &self.channels[index];
        let number = index as u8;
        let state = ChannelState::from_u8(channel.state)
            .ok_or(StateError::BadChannelState { channel: number })?;
        let peer_port_ok = match state {
            ChannelState::Free => return Ok(()),
            ChannelState::Unbound => channel.peer.port == 0,
            ChannelState::Bound => port_bit(channel.peer.port) != 0,
        };
        if channel.owner.vm >= MAX_VMS
            || channel.peer.vm >= MAX_VMS
            || channel.owner.vm == channel.peer.vm
            || port_bit(channel.owner.port) == 0
            || !peer_port_ok
        {
            return Err(StateError::BadChannelEnd { channel: number });
        }
        let duplicate = channel.live_ends().into_iter().flatten().any(|end| {
            self.channels[..index]
                .iter()
                .any(|earlier| earlier.holds(end))
        });
        if duplicate {
            return Err(StateError::DuplicatePort { channel: number });
        }
        Ok(())
    }

    /// Checks VM `vm`'s pending mask and waiting byte (against valid channel records).
    fn check_events(&self, vm: u16) -> Result<(), StateError> {
        let index = usize::from(vm);
        if self.pending[index] & !self.live_ports(vm) != 0 {
            return Err(StateError::BadPending { vm: vm as u8 });
        }
        if stray_waiting(self.waiting[index]) != 0 {
            return Err(StateError::BadWaiting { vm: vm as u8 });
        }
        Ok(())
    }

    /// Live channels each VM allocated, counted from the channel table.
    fn count_ports(&self) -> [u16; MAX_VMS as usize] {
        let mut counted = [0u16; MAX_VMS as usize];
        for channel in &self.channels {
            if channel.live_ends()[0].is_some()
                && let Some(count) = counted.get_mut(usize::from(channel.owner.vm))
            {
                *count = count.saturating_add(1);
            }
        }
        counted
    }

    /// Checks every invariant; the first broken one is returned.
    pub fn validate(&self) -> Result<(), StateError> {
        (0..MAX_LOGS).try_for_each(|slot| self.check_log(slot))?;
        (0..MAX_CHANNELS).try_for_each(|index| self.check_channel(index))?;
        (0..MAX_VMS).try_for_each(|vm| self.check_events(vm))?;
        let counted = self.count_ports();
        if let Some(vm) = (0..usize::from(MAX_VMS)).find(|&vm| self.ports_used[vm] != counted[vm]) {
            return Err(StateError::BadPortCount { vm: vm as u8 });
        }
        if committed(&self.port_limits, &self.ports_used) > u64::from(EVENT_PORT_CAPACITY) {
            return Err(StateError::Overcommitted);
        }
        Ok(())
    }

    /// The repair routine after a microreset or microreboot: frees logs and channel records
    /// that break an invariant and keeps every valid one (logs in progress or done, so retried
    /// batches skip their completed entries; channels unbound or bound); then drops pending
    /// bits that name no live port (such as those of a freed channel) and waiting bits that
    /// name no vCPU. After a repair [`validate`](Self::validate) succeeds.
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
        // In record order: a record is checked against the earlier ones, which are valid or
        // freed by then, so of two records sharing an end the later one goes.
        for index in 0..MAX_CHANNELS {
            if self.check_channel(index).is_err() {
                self.channels[index] = EventChannel::FREE;
                report.channels_freed += 1;
            }
        }
        for vm in 0..MAX_VMS {
            let index = usize::from(vm);
            let live = self.live_ports(vm);
            if self.pending[index] & !live != 0 {
                self.pending[index] &= live;
                report.pending_masked += 1;
            }
            if stray_waiting(self.waiting[index]) != 0 {
                self.waiting[index] &= WAITING_MASK;
                report.waiting_masked += 1;
            }
        }
        // The counts from the (now valid) channel table; the limits are the core's and stay,
        // unless together they no longer fit (a corrupted region): then each is lowered to
        // what its VM holds, which fits.
        let counted = self.count_ports();
        for (used, counted) in self.ports_used.iter_mut().zip(counted) {
            if *used != counted {
                *used = counted;
                report.counts_fixed += 1;
            }
        }
        if committed(&self.port_limits, &self.ports_used) > u64::from(EVENT_PORT_CAPACITY) {
            for (limit, &used) in self.port_limits.iter_mut().zip(&self.ports_used) {
                if *limit > used {
                    *limit = used;
                    report.limits_trimmed += 1;
                }
            }
        }
        report
    }
}

#[cfg(test)]
mod tests;
