//! The system-call ABI between the core and its ring-3 domains: call numbers, status codes
//! and the fixed layout of every domain's address space.
//!
//! A domain enters the core with `int 0x80`: the call number in RAX, arguments in RDI, RSI,
//! RDX; results come back in RAX (a [`Status`]), RDX and R8. Message payloads never travel
//! through registers or user pointers: each domain thread owns one message buffer page at a
//! fixed address ([`message_buffer`]), and the core copies between buffers through its direct
//! map, so it never dereferences an address a domain chose.
#![no_std]
#![forbid(unsafe_code)]

pub mod guest;
pub mod manifest;

/// Interrupt vector of the system-call gate (DPL 3).
pub const SYSCALL_VECTOR: u8 = 0x80;

/// System-call numbers (RAX). Never renumber: append only.
pub mod call {
    /// Reply to the request being served (RDI = reply length, or [`NO_REPLY`](super::NO_REPLY)
    /// on a thread's first entry) and wait for the next one. Returns RAX = [`Status::Ok`](super::Status::Ok),
    /// RDX = request length, R8 = the caller's domain index, R9 = pending notification bits.
    pub const REPLY_WAIT: u64 = 0;
    /// Call domain RDI (index) expecting generation RSI, with RDX request bytes in this
    /// thread's buffer. Returns RAX = status, RDX = reply length, R8 = the callee's current
    /// generation.
    pub const CALL: u64 = 1;
    /// Write RDI bytes of this thread's buffer to the console, as one line.
    pub const LOG: u64 = 2;
    /// Report a panic: RDI bytes of this thread's buffer hold the message. Never returns.
    pub const PANIC: u64 = 3;
    /// Post notification bits RSI to domain RDI (the manifest must let the caller call it).
    /// Asynchronous: returns at once; the target sees the bits when the core next enters one
    /// of its threads. Returns RAX = status.
    pub const NOTIFY: u64 = 4;
    /// Timer domain only: program CPU RDI's next deadline to TSC RSI (0 cancels). When the
    /// CPU's clock passes it, the core posts [`notify::DEADLINE`](super::notify::DEADLINE) to
    /// the timer domain (checked on every tick of that CPU's local APIC timer).
    pub const SET_DEADLINE: u64 = 5;
    /// Timer domain only: raise virtual interrupt RDX (32..=255) in vCPU RSI of guest VM RDI
    /// (a guest timer expired). The core marks it pending, wakes the vCPU if it is blocked and
    /// injects the vector at its next VM entry with interrupts enabled. Returns RAX = status
    /// (`NoSuchTarget`: no such VM any more).
    pub const INJECT: u64 = 6;
}

/// Notification bits the core posts itself. A thread receives its domain's pending bits in
/// R9, at entry and on every return from `REPLY_WAIT`; taking them clears them.
pub mod notify {
    /// The local APIC timer ticked (posted to the timer domain on every tick of every CPU).
    pub const TICK: u64 = 1 << 0;
    /// A deadline programmed with `SET_DEADLINE` passed (posted to the timer domain).
    pub const DEADLINE: u64 = 1 << 1;
    /// Timers expired (posted by the timer domain to the hypercall domain for its records;
    /// the virtual interrupts themselves go to the core with `INJECT`).
    pub const TIMERS_EXPIRED: u64 = 1 << 2;
}

/// Why a fresh thread starts (RCX at `_start`). Only the first thread the core enters after
/// the domain was (re)started gets a reason other than [`start::JOIN`]; it runs the domain's
/// start routine (initialise, repair, or validate and reintegrate its state) before serving.
pub mod start {
    /// Another thread already ran the start routine: just serve.
    pub const JOIN: u64 = 0;
    /// First start since boot: initialise the state region.
    pub const BOOT: u64 = 1;
    /// After a microreset: state kept in place; repair it.
    pub const AFTER_MICRORESET: u64 = 2;
    /// After a microreboot: code and data are pristine; validate the kept state region and
    /// reintegrate it, or rebuild it.
    pub const AFTER_MICROREBOOT: u64 = 3;

    /// Packs RCX for a fresh thread: the start reason (bits 0-15), the repairs the core
    /// enables ([`super::repair`] bits, 16-31) and the domain's configuration word (32-63:
    /// what the core configured it with, e.g. the memory domain's pool base or the recovery
    /// manager's policy; 0 = none). The core gives the word at every start, so a restart
    /// whose state must be initialised again comes back configured as at boot.
    pub const fn pack(reason: u64, repairs: u64, config: u32) -> u64 {
        (reason & 0xffff) | ((repairs & 0xffff) << 16) | ((config as u64) << 32)
    }

    /// Splits RCX at a thread's entry into the start reason, the repairs and the
    /// configuration word.
    pub const fn unpack(rcx: u64) -> (u64, u64, u32) {
        (rcx & 0xffff, (rcx >> 16) & 0xffff, (rcx >> 32) as u32)
    }
}

/// The repairs a recovery may make, each a switch (`repairs=` on the kernel command line), as
/// in NiLiHype's Table I: a campaign can turn them on one at a time and measure what each is
/// worth. The core passes the enabled set to a fresh thread in RCX ([`start::pack`]). Never
/// renumber: append only (at most 16).
pub mod repair {
    /// Core: before touching the failed domain, take every other CPU out of it (quiesce IPI).
    pub const QUIESCE: u64 = 1 << 0;
    /// Core: zero the failed domain's lock table (no lock holder survives a recovery).
    pub const RELEASE_LOCKS: u64 = 1 << 1;
    /// Memory: roll back (or complete) the update in flight from its undo log.
    pub const UNDO_LOG: u64 = 1 << 2;
    /// Memory, after a microreboot: rebuild every derived count from the frame table.
    pub const RECOUNT: u64 = 1 << 3;
    /// Scheduler: repair the run queues (vCPUs lost or duplicated mid-update).
    pub const SCHEDULER_QUEUES: u64 = 1 << 4;
    /// Timer: re-activate recurring timers caught mid-expiry.
    pub const TIMER_REACTIVATION: u64 = 1 << 5;
    /// Hypercall: keep and check the multicall completion logs, so a retried batch skips the
    /// entries that completed.
    pub const MULTICALL_LOG: u64 = 1 << 6;
    /// Every service: re-initialise state that still fails validation after its repair (the
    /// last resort; state is lost).
    pub const REINIT_INVALID: u64 = 1 << 7;

    /// Every repair, by name, in the order a sweep adds them.
    pub const NAMES: [(&str, u64); 8] = [
        ("quiesce", QUIESCE),
        ("release-locks", RELEASE_LOCKS),
        ("undo-log", UNDO_LOG),
        ("recount", RECOUNT),
        ("scheduler-queues", SCHEDULER_QUEUES),
        ("timer-reactivation", TIMER_REACTIVATION),
        ("multicall-log", MULTICALL_LOG),
        ("reinit-invalid", REINIT_INVALID),
    ];
    /// Every repair.
    pub const ALL: u64 = (1 << NAMES.len()) - 1;
    const _: () = assert!(ALL < 1 << 16, "the repairs must fit their 16 bits of RCX");

    /// The bit of the repair called `name`.
    pub fn named(name: &str) -> Option<u64> {
        NAMES
            .iter()
            .find(|(known, _)| *known == name)
            .map(|&(_, bit)| bit)
    }
}

/// R8 at a fresh thread's entry: the CPUs the domain has threads for (bits 0-31) and the bytes
/// of its state region the core mapped (bits 32-63: the manifest's `state_pages`, never more
/// than [`STATE_BYTES`]), so the runtime views no more of the region than exists.
pub mod entry {
    /// Packs the CPU count and the mapped state bytes into R8.
    pub const fn pack(cpus: u64, state_bytes: u64) -> u64 {
        (cpus & 0xffff_ffff) | (state_bytes << 32)
    }

    /// Splits R8 into the CPU count and the mapped state bytes.
    pub const fn unpack(r8: u64) -> (u64, u64) {
        (r8 & 0xffff_ffff, r8 >> 32)
    }
}

/// `REPLY_WAIT` argument on a thread's first entry: there is nothing to reply to.
pub const NO_REPLY: u64 = u64::MAX;

/// Result of a system call (RAX). Never renumber: append only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// The callee restarted since the caller last knew it (the generation moved). Retry an
    /// idempotent request; surface the rest. R8 holds the new generation.
    PeerRestarted = 1,
    /// The callee failed and is not (yet) recovered. Caller's choice: wait, or give up.
    PeerFailed = 2,
    /// The manifest does not let the caller call that domain. The caller's fault.
    NoCapability = 3,
    /// A length or argument out of range. The caller's fault.
    BadArgument = 4,
    /// The callee's thread on this CPU is already inside a call (a cycle). Caller's fault.
    Busy = 5,
    /// No such domain, or no such system call. The caller's fault.
    NoSuchTarget = 6,
}

impl Status {
    /// Decodes RAX; unknown values are `None`.
    pub const fn from_raw(raw: u64) -> Option<Self> {
        Some(match raw {
            0 => Self::Ok,
            1 => Self::PeerRestarted,
            2 => Self::PeerFailed,
            3 => Self::NoCapability,
            4 => Self::BadArgument,
            5 => Self::Busy,
            6 => Self::NoSuchTarget,
            _ => return None,
        })
    }
}

/// Bytes of a message buffer: the largest request or reply.
pub const MESSAGE_BYTES: usize = 4096;

/// Most CPUs a domain has threads for.
pub const MAX_DOMAIN_CPUS: usize = 8;

/// Where every domain's image is linked.
pub const IMAGE_BASE: u64 = 0x0040_0000;
/// Domain heap.
pub const HEAP_BASE: u64 = 0x1000_0000;
/// The state region: kept across a microreset and a microreboot.
pub const STATE_BASE: u64 = 0x2000_0000;
/// Most pages a domain's state region may have (the manifest's `state_pages`).
pub const MAX_STATE_PAGES: u16 = 16;
/// Bytes of the largest state region; a domain's own is `state_pages` pages of it.
pub const STATE_BYTES: usize = MAX_STATE_PAGES as usize * 4096;
/// The lock table: every spin lock of the domain lives here, so recovery can release all.
pub const LOCK_TABLE_BASE: u64 = 0x2fff_0000;
/// Spin locks in the lock table (one `u64` word each, one page).
pub const LOCK_TABLE_WORDS: usize = 512;
/// First message buffer; thread `cpu` uses [`message_buffer`]`(cpu)`.
const MESSAGE_BASE: u64 = 0x3000_0000;
/// First stack; thread `cpu`'s stack ends at [`stack_top`]`(cpu)`.
const STACKS_BASE: u64 = 0x4000_0000;
/// Bytes of each thread's stack.
pub const STACK_BYTES: u64 = 64 * 1024;

/// Address of CPU `cpu`'s thread message buffer.
pub const fn message_buffer(cpu: usize) -> u64 {
    MESSAGE_BASE + cpu as u64 * 2 * MESSAGE_BYTES as u64
}

/// Lowest address of CPU `cpu`'s thread stack (a guard page lies below it).
pub const fn stack_bottom(cpu: usize) -> u64 {
    STACKS_BASE + cpu as u64 * (STACK_BYTES + 4096) + 4096
}

/// Initial stack pointer of CPU `cpu`'s thread.
pub const fn stack_top(cpu: usize) -> u64 {
    stack_bottom(cpu) + STACK_BYTES
}

// The fixed regions must not overlap, and stacks must have guard pages between them: checked
// when the crate compiles, so a layout change that breaks isolation does not build.
const _: () = {
    assert!(IMAGE_BASE < HEAP_BASE && HEAP_BASE < STATE_BASE && STATE_BASE < LOCK_TABLE_BASE);
    assert!(LOCK_TABLE_BASE + 8 * LOCK_TABLE_WORDS as u64 <= MESSAGE_BASE);
    assert!(message_buffer(MAX_DOMAIN_CPUS - 1) + MESSAGE_BYTES as u64 <= STACKS_BASE);
    assert!(stack_bottom(1) - stack_top(0) == 4096);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repairs_have_distinct_bits_and_names_and_travel_with_the_start_reason() {
        let mut seen = 0;
        for (name, bit) in repair::NAMES {
            assert_eq!(bit.count_ones(), 1, "{name}");
            assert_eq!(seen & bit, 0, "{name}");
            assert_eq!(repair::named(name), Some(bit));
            seen |= bit;
        }
        assert_eq!(seen, repair::ALL);
        assert_eq!(repair::named("everything"), None);
        let rcx = start::pack(start::AFTER_MICROREBOOT, repair::ALL, 0xdead_beef);
        assert_eq!(
            start::unpack(rcx),
            (start::AFTER_MICROREBOOT, repair::ALL, 0xdead_beef)
        );
        assert_eq!(start::unpack(start::BOOT), (start::BOOT, 0, 0));
    }

    #[test]
    fn the_state_size_travels_with_the_cpu_count() {
        let r8 = entry::pack(4, 3 * 4096);
        assert_eq!(entry::unpack(r8), (4, 3 * 4096));
        assert_eq!(
            entry::unpack(entry::pack(64, STATE_BYTES as u64)).1,
            STATE_BYTES as u64
        );
    }

    #[test]
    fn status_round_trips_and_rejects_unknown() {
        for raw in 0..7 {
            assert_eq!(Status::from_raw(raw).map(|status| status as u64), Some(raw));
        }
        assert_eq!(Status::from_raw(7), None);
    }
}
