//! The hypercall interface: a guest's VMCALL, forwarded by the core to the hypercall domain,
//! and multicall batches.
//!
//! The guest ABI (number in RAX, arguments in RDI, RSI, RDX, R10, R8, R9, result in RAX) is
//! the core's to document as a register table; this module fixes the numbers and what each
//! one does with its arguments. Arguments a call does not use must be 0 (they are reserved
//! for extensions), else the call fails with `InvalidArgument`. Guests are malicious: every
//! argument is checked before any service is asked anything.

use heapless::Vec;
use serde::{Deserialize, Serialize};

use crate::call::{Idempotence, Operation};

/// Does nothing; answers 0. For measuring the hypercall path. Idempotent.
pub const NULL: u64 = 0;
/// The calling vCPU gives up its CPU (scheduler `Yield`); answers `Blocked` so the core asks
/// the scheduler what runs next. The caller must be the CPU's current vCPU. Non-idempotent.
pub const YIELD: u64 = 1;
/// Arms a one-shot timer for the calling vCPU: arg0 = deadline (TSC), arg1 = the interrupt
/// vector ([`VECTOR_MIN`]..=255) the core injects into the vCPU when it expires (and wakes it
/// if it is blocked). Answers the timer id. Non-idempotent.
pub const TIMER_ONESHOT: u64 = 2;
/// Gives the calling VM one more frame of RAM. Answers the frame number. Non-idempotent.
pub const MEMORY_POPULATE: u64 = 3;
/// Returns one of the calling VM's unshared frames: arg0 = frame. Answers 0.
/// Non-idempotent.
pub const MEMORY_RELEASE: u64 = 4;
/// Shares one of the calling VM's frames with another VM: arg0 = frame, arg1 = peer VM.
/// Answers 0. Non-idempotent.
pub const GRANT: u64 = 5;
/// Reads a frame's entry: arg0 = frame. Answers bits 0..16 owner (0xffff when free),
/// 16..32 reference count, 32..40 kind (`memory::FrameKind` byte), bit 40 validated.
/// Idempotent.
pub const QUERY_FRAME: u64 = 6;
/// A batch of up to [`MULTICALL_MAX`] of the calls above, with a per-entry status. The core
/// reads the batch from guest memory and forwards it as [`Request::Multicall`]; a
/// [`Request::Hypercall`] with this number is refused (`BadNumber`). Entries may not be
/// multicalls. Non-idempotent, but a retried batch skips the entries already completed.
pub const MULTICALL: u64 = 7;

/// Writes text to the console: arg0 = guest-physical address, arg1 = length (1 to
/// [`CONSOLE_MAX`]). The core reads the bytes from guest memory and forwards them as
/// [`Request::Console`]; a [`Request::Hypercall`] with this number is refused (`BadNumber`).
/// Answers the length. Idempotent (a retry prints the line again).
pub const CONSOLE_WRITE: u64 = 8;
/// The calling vCPU is finished: arg0 = verdict (0 passed, 1 failed), arg1 = the checksum of
/// its work, arg2 = the longest stretch without service it measured, in microseconds (0:
/// none; the guest's claim, for the summary). The vCPU is removed from the scheduler and never runs again; answers `Blocked`.
/// Non-idempotent (a repeat finds no vCPU: still `Blocked`).
pub const VM_EXIT: u64 = 9;
/// Maps a frame the calling VM owns or was granted into its guest-physical window:
/// arg0 = frame, arg1 = guest frame number. The memory domain confirms the right and the core
/// checks again before it writes the EPT entry. Answers 0. Idempotent.
pub const MAP_GRANT: u64 = 10;
/// Unmaps a page mapped with [`MAP_GRANT`]: arg0 = guest frame number. The core refuses a
/// page that is not so mapped (`NotFound`, e.g. a double unmap). Answers 0. Idempotent.
pub const UNMAP_GRANT: u64 = 11;

/// Allocates an unbound event-channel port of the calling VM that VM arg0 may bind to.
/// Answers the port (1..[`EVENT_PORTS`]). Non-idempotent.
pub const EVTCHN_ALLOC: u64 = 12;
/// Binds a new port of the calling VM to port arg1 of VM arg0, which that VM allocated for
/// the caller with [`EVTCHN_ALLOC`]. Answers the caller's new port. Non-idempotent.
pub const EVTCHN_BIND: u64 = 13;
/// Signals the peer of the caller's bound port arg0: the peer VM's pending bit for its end
/// is set and its vCPU woken if it waits in [`EVENT_WAIT`]. Answers 0. Idempotent (pending
/// bits are level, not counted).
pub const EVTCHN_SEND: u64 = 14;
/// Closes the caller's port arg0 (both ends of a bound channel); pending bits of the channel
/// are dropped. Answers 0. Non-idempotent.
pub const EVTCHN_CLOSE: u64 = 15;
/// Block until an event: answers the calling VM's pending-port mask (bit *p* = port *p*) and
/// clears it; with nothing pending the vCPU blocks and the call answers 0 once it is woken (by
/// an event, or by a virtual interrupt such as its timer). Non-idempotent.
pub const EVENT_WAIT: u64 = 16;
/// Ends the sharing of the caller's frame arg0 with VM arg1 (reference count - 1). Refused
/// with `InUse` while VM arg1 still maps it. Answers 0. Non-idempotent.
pub const GRANT_REVOKE: u64 = 17;
/// Control VM only: builds a new VM from the ELF image at guest-physical arg0, arg1 bytes
/// long, named by arg2 (up to 8 ASCII bytes, little-endian), its vCPU 0 homed on CPU arg3,
/// with arg4 vCPUs (0 means 1), and the quota record (`crate::quota::RECORD_WORDS` words,
/// `Quota::to_words`) at guest-physical arg5 (0: `Quota::APP_VM`). The core reserves the
/// quota in the services before it takes anything for the VM (`QuotaUnavailable` if it does
/// not fit). The VM does not run until [`VM_START`]. Answers the new VM's number. Served by
/// the core (it owns VMX); other VMs get `PermissionDenied`. Non-idempotent.
pub const VM_CREATE: u64 = 18;
/// Control VM only: starts VM arg0 (created, not started) with the eight start parameters at
/// guest-physical arg1 (0: all zero). Answers 0. Served by the core. Non-idempotent.
pub const VM_START: u64 = 19;
/// Control VM only: VM arg0's state (see [`vm_status`]). Served by the core. Idempotent.
pub const VM_STATUS: u64 = 20;
/// Control VM only: removes VM arg0, which must not be running (created or ended); its
/// memory is returned. Answers 0. Served by the core. Non-idempotent.
pub const VM_DESTROY: u64 = 21;

/// The lowest vector a timer may inject (0..32 are exceptions).
pub const VECTOR_MIN: u64 = 32;
/// Event-channel ports per VM: 1..EVENT_PORTS (port 0 is never allocated, and bit 63 is kept
/// clear so a pending mask is never negative).
pub const EVENT_PORTS: u16 = 63;

/// What [`VM_STATUS`] answers.
pub mod vm_status {
    /// Created, not started.
    pub const CREATED: i64 = 0;
    /// Running (or runnable, or blocked).
    pub const RUNNING: i64 = 1;
    /// Exited with a passing verdict.
    pub const PASSED: i64 = 2;
    /// Exited with a failing verdict.
    pub const FAILED: i64 = 3;
    /// Stopped by the core (a fault or a forbidden exit).
    pub const STOPPED: i64 = 4;
}

/// The timer-domain cookie of a guest timer: who gets which vector when it expires.
pub const fn timer_cookie(vm: u16, vcpu: u8, vector: u8) -> u32 {
    ((vm as u32) << 16) | ((vcpu as u32) << 8) | vector as u32
}

/// The (vm, vcpu, vector) of a guest timer's cookie.
pub const fn timer_target(cookie: u32) -> (u16, u8, u8) {
    ((cookie >> 16) as u16, (cookie >> 8) as u8, cookie as u8)
}

/// The VM whose timer quota (`crate::quota`) a timer with this cookie is charged to: the
/// target VM of a guest timer, one whose expiry raises a vector (at least [`VECTOR_MIN`]) in
/// a VM below `limits::MAX_VMS`. `None` for any other cookie: a system timer, served from the
/// host's reserve of each heap.
pub const fn timer_charge(cookie: u32) -> Option<u16> {
    let (vm, _, vector) = timer_target(cookie);
    if vector as u64 >= VECTOR_MIN && vm < crate::limits::MAX_VMS {
        Some(vm)
    } else {
        None
    }
}

/// The most entries one multicall batch carries.
pub const MULTICALL_MAX: usize = 8;

/// The most bytes one [`CONSOLE_WRITE`] carries.
pub const CONSOLE_MAX: usize = 96;

/// Guest frame numbers a guest may name fit below this bound (the core checks the exact
/// window).
pub const GFN_LIMIT: u64 = 1 << 32;

/// One call of a multicall batch: a hypercall number and its two arguments (every call above
/// takes at most two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MulticallEntry {
    /// The hypercall number (one of the constants above, not [`MULTICALL`]).
    pub number: u16,
    /// arg0 and arg1.
    pub args: [u64; 2],
}

/// How one entry of a batch ended.
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryOutcome {
    /// The call completed with this value.
    Complete(i64),
    /// The call was refused with this error (nothing changed for it).
    Error(HypercallError),
}

/// Hypercall requests.
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// One hypercall, as the guest issued it. Idempotence depends on `number` (see the
    /// constants).
    Hypercall {
        /// The physical CPU the vCPU exited on.
        cpu: u8,
        /// The calling VM.
        vm: u16,
        /// The calling vCPU inside the VM.
        vcpu: u16,
        /// RAX.
        number: u64,
        /// RDI, RSI, RDX, R10, R8, R9.
        args: [u64; 6],
    },
    /// A multicall batch. Non-idempotent, but retry-safe: the dispatcher keeps a per-entry
    /// completion log keyed by (vm, vcpu, batch), so a retry skips finished entries.
    Multicall {
        /// The physical CPU the vCPU exited on.
        cpu: u8,
        /// The calling VM.
        vm: u16,
        /// The calling vCPU inside the VM.
        vcpu: u16,
        /// Names the batch: the same value when the same batch is retried, another one for
        /// the vCPU's next batch.
        batch: u32,
        /// The calls, run in order.
        entries: Vec<MulticallEntry, MULTICALL_MAX>,
    },
    /// A console line from a guest ([`CONSOLE_WRITE`]): the bytes the core read from guest
    /// memory. Idempotent.
    Console {
        /// The physical CPU the vCPU exited on.
        cpu: u8,
        /// The calling VM.
        vm: u16,
        /// The calling vCPU inside the VM.
        vcpu: u16,
        /// The text (any bytes: the dispatcher shows non-printable ones as `?`).
        text: Vec<u8, CONSOLE_MAX>,
    },
    /// A CPUID, port I/O, RDMSR or WRMSR exit: what the guest sees is the hypercall domain's
    /// answer ([`Reply::Exit`]). Idempotent (answers depend only on the exit).
    Exit {
        /// The physical CPU the vCPU exited on.
        cpu: u8,
        /// The VM.
        vm: u16,
        /// The vCPU inside the VM.
        vcpu: u16,
        /// What the guest did.
        exit: GuestExit,
    },
    /// From the core: reserves VM `vm`'s quota of event channels (`crate::quota`): from then
    /// on its `EVTCHN_ALLOC` is refused with `QuotaExceeded` while it holds `event_ports`
    /// channels it allocated. Replaces the VM's previous limit. Answer: `Complete { value: 0 }`,
    /// or `Error(QuotaUnavailable)` (nothing changed) if the limits every VM has reserved
    /// would no longer fit the channel table (`Error(BadVcpu)` for a VM number out of range).
    /// Idempotent.
    SetQuota {
        /// The VM.
        vm: u16,
        /// The most event channels it may have allocated at once.
        event_ports: u16,
    },
    /// From the core, once VM `vm` is gone: releases its reservation and what this domain
    /// still holds for it: closes every channel with an end in it, clears its pending and
    /// waiting bits, frees its vCPUs' multicall logs, and sets its limit to 0. Answer:
    /// `Complete { value: 0 }`. Idempotent.
    DropQuota {
        /// The VM.
        vm: u16,
    },
}

/// A guest instruction the core does not emulate itself.
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestExit {
    /// CPUID with EAX = `leaf`, ECX = `subleaf`.
    Cpuid {
        /// EAX.
        leaf: u32,
        /// ECX.
        subleaf: u32,
    },
    /// IN from `port`, `size` bytes (1, 2 or 4).
    PortIn {
        /// The port.
        port: u16,
        /// Bytes.
        size: u8,
    },
    /// OUT of `value` to `port`, `size` bytes (1, 2 or 4).
    PortOut {
        /// The port.
        port: u16,
        /// Bytes.
        size: u8,
        /// The value (low `size` bytes).
        value: u32,
    },
    /// RDMSR of `msr`.
    ReadMsr {
        /// ECX.
        msr: u32,
    },
    /// WRMSR of `value` to `msr`.
    WriteMsr {
        /// ECX.
        msr: u32,
        /// EDX:EAX.
        value: u64,
    },
}

/// What the guest sees for a [`GuestExit`].
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitAnswer {
    /// CPUID's EAX, EBX, ECX, EDX.
    Cpuid([u32; 4]),
    /// The value read (IN: the low bytes of EAX; RDMSR: EDX:EAX).
    Value(u64),
    /// The write is absorbed; the guest carries on.
    Done,
    /// The access is refused: the core stops the VM (as a #GP the guest kernel cannot handle
    /// would).
    Refuse,
}

/// Hypercall replies.
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Done: RAX = `value`, the guest's RIP advances past VMCALL.
    Complete {
        /// The result.
        value: i64,
    },
    /// Refused: RAX = the error's code, RIP advances; nothing changed.
    Error(HypercallError),
    /// Done (RAX = 0, RIP advances), and the calling vCPU no longer runs: the core asks the
    /// scheduler for the next vCPU before entering a guest on this CPU.
    Blocked,
    /// A service failed (it is being recovered) before the call completed: RIP does *not*
    /// advance, so the guest re-issues the same hypercall after recovery; partial progress
    /// of a multicall is in the dispatcher's completion log.
    Incomplete,
    /// A multicall batch finished: one outcome per entry, in order. RAX = 0, RIP advances.
    Multicall(Vec<EntryOutcome, MULTICALL_MAX>),
    /// The answer to a [`Request::Exit`].
    Exit(ExitAnswer),
}

/// Why a hypercall was refused; seen by the guest as a negative code in RAX.
///
/// Declaration order is the wire format: never reorder; append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HypercallError {
    /// No such hypercall (guest's fault).
    BadNumber,
    /// The calling VM / vCPU / CPU is out of range, or not the vCPU running on that CPU
    /// (the core's or the guest's fault).
    BadVcpu,
    /// An argument is out of range, or an unused argument is not 0 (guest's fault).
    InvalidArgument,
    /// No frame, timer slot or share slot left (nobody's fault; retryable later).
    NoResources,
    /// The frame belongs to another VM, or a VM tried to share with itself (guest's fault).
    PermissionDenied,
    /// The frame is still shared and cannot be released (guest's fault).
    InUse,
    /// The frame is free or the timer does not exist (guest's fault).
    NotFound,
    /// A multicall entry that is itself a multicall (guest's fault).
    NestedMulticall,
    /// Too many multicall batches in flight on other vCPUs (nobody's fault; retryable).
    Busy,
    /// A service answered something unexpected or refused for an internal reason (a bug in
    /// a domain, not the guest's fault).
    Internal,
    /// The calling VM holds as much of the resource as its quota allows (frames, grants,
    /// event channels or armed timers; the VM's own doing; retryable after it releases
    /// some). Other VMs' use never causes it: quotas are reservations.
    QuotaExceeded,
    /// `VM_CREATE`: the quota asked for does not fit beside the quotas other VMs hold (the
    /// control VM's choice; retryable after VMs are destroyed).
    QuotaUnavailable,
}

impl HypercallError {
    /// Every error, in code order.
    pub const ALL: [HypercallError; 12] = [
        HypercallError::BadNumber,
        HypercallError::BadVcpu,
        HypercallError::InvalidArgument,
        HypercallError::NoResources,
        HypercallError::PermissionDenied,
        HypercallError::InUse,
        HypercallError::NotFound,
        HypercallError::NestedMulticall,
        HypercallError::Busy,
        HypercallError::Internal,
        HypercallError::QuotaExceeded,
        HypercallError::QuotaUnavailable,
    ];

    /// The guest-visible RAX value: `-(declaration index + 1)`.
    pub const fn guest_code(self) -> i64 {
        -(self as i64) - 1
    }

    /// The error for a guest-visible code, if it is one.
    pub fn from_guest_code(code: i64) -> Option<HypercallError> {
        let index = code.checked_neg()?.checked_sub(1)?;
        HypercallError::ALL
            .get(usize::try_from(index).ok()?)
            .copied()
    }
}

impl Request {
    /// Whether this request may be repeated after the hypercall domain restarted.
    pub const fn idempotence(&self) -> Idempotence {
        match self {
            Request::Hypercall { number, .. } => match *number {
                NULL | QUERY_FRAME | MAP_GRANT | UNMAP_GRANT | EVTCHN_SEND | VM_STATUS => {
                    Idempotence::Idempotent
                }
                _ => Idempotence::NonIdempotent,
            },
            Request::Multicall { .. } => Idempotence::NonIdempotent,
            Request::Console { .. }
            | Request::Exit { .. }
            | Request::SetQuota { .. }
            | Request::DropQuota { .. } => Idempotence::Idempotent,
        }
    }

    /// The operation tag (declaration index).
    pub const fn tag(&self) -> u16 {
        match self {
            Request::Hypercall { .. } => 0,
            Request::Multicall { .. } => 1,
            Request::Console { .. } => 2,
            Request::Exit { .. } => 3,
            Request::SetQuota { .. } => 4,
            Request::DropQuota { .. } => 5,
        }
    }
}

impl Operation for Request {
    type Reply = Reply;
    const OPERATION_COUNT: u16 = 6;

    fn tag(&self) -> u16 {
        Request::tag(self)
    }

    fn idempotence(&self) -> Idempotence {
        Request::idempotence(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::*;

    fn entries(list: &[MulticallEntry]) -> Vec<MulticallEntry, MULTICALL_MAX> {
        Vec::from_slice(list).unwrap()
    }

    const GRANT_ENTRY: MulticallEntry = MulticallEntry {
        number: GRANT as u16,
        args: [0x40, 2],
    };

    fn samples() -> [Request; 3] {
        [
            Request::Hypercall {
                cpu: 1,
                vm: 2,
                vcpu: 0,
                number: TIMER_ONESHOT,
                args: [5000, 9, 0, 0, 0, 0],
            },
            Request::Hypercall {
                cpu: 0,
                vm: 1,
                vcpu: 1,
                number: NULL,
                args: [0; 6],
            },
            Request::Multicall {
                cpu: 0,
                vm: 1,
                vcpu: 0,
                batch: 77,
                entries: entries(&[GRANT_ENTRY, GRANT_ENTRY]),
            },
        ]
    }

    #[test]
    fn golden_requests() {
        assert_golden_request(
            &Request::Hypercall {
                cpu: 1,
                vm: 2,
                vcpu: 0,
                number: TIMER_ONESHOT,
                args: [5000, 9, 0, 0, 0, 0],
            },
            &[0, 1, 2, 0, 2, 136, 39, 9, 0, 0, 0, 0],
        );
        assert_golden_request(
            &Request::Hypercall {
                cpu: 0,
                vm: 1,
                vcpu: 1,
                number: NULL,
                args: [0; 6],
            },
            &[0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        );
        assert_golden_request(
            &Request::Multicall {
                cpu: 0,
                vm: 1,
                vcpu: 0,
                batch: 77,
                entries: entries(&[
                    GRANT_ENTRY,
                    MulticallEntry {
                        number: NULL as u16,
                        args: [0, 0],
                    },
                ]),
            },
            &[1, 0, 1, 0, 77, 2, 5, 64, 2, 0, 0, 0],
        );
    }

    #[test]
    fn golden_console() {
        assert_golden_request(
            &Request::Console {
                cpu: 1,
                vm: 2,
                vcpu: 0,
                text: Vec::from_slice(b"ok").unwrap(),
            },
            &[2, 1, 2, 0, 2, b'o', b'k'],
        );
        assert_fits(&Request::Console {
            cpu: u8::MAX,
            vm: u16::MAX,
            vcpu: u16::MAX,
            text: Vec::from_slice(&[0xff; CONSOLE_MAX]).unwrap(),
        });
    }

    #[test]
    fn golden_exits() {
        assert_golden_request(
            &Request::Exit {
                cpu: 1,
                vm: 2,
                vcpu: 0,
                exit: GuestExit::Cpuid {
                    leaf: 1,
                    subleaf: 0,
                },
            },
            &[3, 1, 2, 0, 0, 1, 0],
        );
        assert_golden_request(
            &Request::Exit {
                cpu: 0,
                vm: 2,
                vcpu: 0,
                exit: GuestExit::PortOut {
                    port: 0x80,
                    size: 1,
                    value: 7,
                },
            },
            &[3, 0, 2, 0, 2, 128, 1, 1, 7],
        );
        assert_golden(&Reply::Exit(ExitAnswer::Value(5)), &[5, 1, 5]);
        assert_golden(&Reply::Exit(ExitAnswer::Refuse), &[5, 3]);
        assert_fits(&Request::Exit {
            cpu: u8::MAX,
            vm: u16::MAX,
            vcpu: u16::MAX,
            exit: GuestExit::WriteMsr {
                msr: u32::MAX,
                value: u64::MAX,
            },
        });
        assert_fits(&Reply::Exit(ExitAnswer::Cpuid([u32::MAX; 4])));
    }

    #[test]
    fn golden_quotas() {
        assert_golden_request(
            &Request::SetQuota {
                vm: 2,
                event_ports: 4,
            },
            &[4, 2, 4],
        );
        assert_golden_request(&Request::DropQuota { vm: 2 }, &[5, 2]);
        assert_golden(&Reply::Error(HypercallError::QuotaExceeded), &[1, 10]);
        assert_golden(&Reply::Error(HypercallError::QuotaUnavailable), &[1, 11]);
    }

    #[test]
    fn timer_charges_name_guest_timers_only() {
        assert_eq!(timer_charge(timer_cookie(7, 1, 0x20)), Some(7));
        assert_eq!(timer_charge(timer_cookie(7, 1, 0x1f)), None);
        assert_eq!(
            timer_charge(timer_cookie(crate::limits::MAX_VMS, 0, 0xff)),
            None
        );
        assert_eq!(timer_charge(0), None);
    }

    #[test]
    fn golden_replies() {
        assert_golden(&Reply::Complete { value: 5 }, &[0, 10]);
        assert_golden(&Reply::Complete { value: -1 }, &[0, 1]);
        assert_golden(&Reply::Error(HypercallError::InvalidArgument), &[1, 2]);
        assert_golden(&Reply::Blocked, &[2]);
        assert_golden(&Reply::Incomplete, &[3]);
        assert_golden(
            &Reply::Multicall(
                Vec::from_slice(&[
                    EntryOutcome::Complete(0),
                    EntryOutcome::Error(HypercallError::NotFound),
                ])
                .unwrap(),
            ),
            &[4, 2, 0, 0, 1, 6],
        );
    }

    #[test]
    fn numbers_are_pinned() {
        assert_eq!(
            [
                NULL,
                YIELD,
                TIMER_ONESHOT,
                MEMORY_POPULATE,
                MEMORY_RELEASE,
                GRANT,
                QUERY_FRAME,
                MULTICALL,
                CONSOLE_WRITE,
                VM_EXIT,
                MAP_GRANT,
                UNMAP_GRANT,
                EVTCHN_ALLOC,
                EVTCHN_BIND,
                EVTCHN_SEND,
                EVTCHN_CLOSE,
                EVENT_WAIT,
                GRANT_REVOKE,
                VM_CREATE,
                VM_START,
                VM_STATUS,
                VM_DESTROY
            ],
            [
                0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21
            ]
        );
    }

    #[test]
    fn timer_cookies_round_trip() {
        assert_eq!(timer_target(timer_cookie(7, 1, 0x20)), (7, 1, 0x20));
        assert_eq!(
            timer_target(timer_cookie(u16::MAX, u8::MAX, u8::MAX)),
            (u16::MAX, 255, 255)
        );
        assert_ne!(timer_cookie(1, 0, 0x20), timer_cookie(0, 1, 0x20));
    }

    #[test]
    fn guest_codes_round_trip() {
        for error in HypercallError::ALL {
            assert!(error.guest_code() < 0);
            assert_eq!(
                HypercallError::from_guest_code(error.guest_code()),
                Some(error)
            );
        }
        assert_eq!(HypercallError::BadNumber.guest_code(), -1);
        assert_eq!(HypercallError::from_guest_code(0), None);
        assert_eq!(HypercallError::QuotaExceeded.guest_code(), -11);
        assert_eq!(HypercallError::QuotaUnavailable.guest_code(), -12);
        assert_eq!(HypercallError::from_guest_code(-13), None);
        assert_eq!(HypercallError::from_guest_code(i64::MIN), None);
        assert_eq!(HypercallError::from_guest_code(5), None);
    }

    #[test]
    fn tags_and_idempotence() {
        let [oneshot, null, multicall] = samples();
        assert_eq!((oneshot.tag(), multicall.tag()), (0, 1));
        assert_eq!(Request::OPERATION_COUNT, 6);
        let set = Request::SetQuota {
            vm: 2,
            event_ports: 4,
        };
        let drop = Request::DropQuota { vm: 2 };
        assert_eq!((set.tag(), drop.tag()), (4, 5));
        assert_eq!(set.idempotence(), Idempotence::Idempotent);
        assert_eq!(drop.idempotence(), Idempotence::Idempotent);
        assert_eq!(oneshot.idempotence(), Idempotence::NonIdempotent);
        assert_eq!(null.idempotence(), Idempotence::Idempotent);
        assert_eq!(multicall.idempotence(), Idempotence::NonIdempotent);
    }

    #[test]
    fn largest_messages_fit() {
        let entry = MulticallEntry {
            number: u16::MAX,
            args: [u64::MAX; 2],
        };
        assert_fits(&Request::Hypercall {
            cpu: u8::MAX,
            vm: u16::MAX,
            vcpu: u16::MAX,
            number: u64::MAX,
            args: [u64::MAX; 6],
        });
        assert_fits(&Request::Multicall {
            cpu: u8::MAX,
            vm: u16::MAX,
            vcpu: u16::MAX,
            batch: u32::MAX,
            entries: entries(&[entry; MULTICALL_MAX]),
        });
        assert_fits(&Reply::Multicall(
            Vec::from_slice(&[EntryOutcome::Complete(i64::MIN); MULTICALL_MAX]).unwrap(),
        ));
    }

    #[test]
    fn damaged_requests_are_rejected() {
        for request in samples() {
            assert_rejects_damage(&request);
        }
    }

    #[test]
    fn fuzz() {
        fuzz_decode(0x4c7a_11ed, &samples());
    }
}
