//! Per-VM quotas: each VM's reserved share of the resources the services hold for all VMs
//! together — frames and share records (grants) in the memory domain, event-channel records
//! (event ports) in the hypercall domain, armed guest timers in the timer domain.
//!
//! Guests are malicious, and these tables are shared: without quotas a few VMs that populate
//! frames, grant pages, allocate ports or arm far-future timers until they are refused make
//! every other VM's calls fail with `NoResources`. A quota is therefore a **reservation**, not
//! a cap on a first-come pool:
//!
//! - the domain that owns a resource keeps, per VM, a limit and a use count in its state
//!   region, and accepts a VM's quota (`SetQuota`) only if the amounts it has committed to
//!   all VMs, together, stay within its capacity ([`reservation_fits`]); otherwise it answers
//!   `QuotaUnavailable` and changes nothing;
//! - a VM within its quota is guaranteed its resources, whatever the other VMs do; a VM at
//!   its quota is refused with `QuotaExceeded` (`HypercallError::QuotaExceeded` for a guest);
//! - a VM without a quota (limit 0) gets nothing: every frame, share, channel and guest timer
//!   is charged to some VM's reservation;
//! - a VM's committed amount is `max(limit, used)`: after `DropQuota` (limit 0) what it still
//!   holds (a frame another VM still maps) keeps counting until it is released, so the sum of
//!   committed amounts never exceeds the capacity.
//!
//! The core reserves a VM's quota in every domain before it builds the VM (`VM_CREATE` arg5
//! names a [`Quota`] record, 0 = [`Quota::APP_VM`]) and drops it when the VM's memory is
//! released. The defaults are sized so that [`SIZED_FOR_VMS`] VMs fit together, one of them
//! the control VM or none.
//!
//! Multicall logs and vCPUs need no quota: the scheduler holds `limits::MAX_VCPUS` vCPU
//! records, only the core creates vCPUs (on the control VM's `VM_CREATE`), and the hypercall
//! domain keeps one multicall log per vCPU (as many slots as vCPU records), reclaiming a VM's
//! logs when its quota is dropped.

use serde::{Deserialize, Serialize};

use crate::limits::{CHANNELS, POOL_FRAMES, SHARES, TIMERS_PER_CPU};

/// Frames all quotas together may reserve: the whole pool (every frame is charged to a VM;
/// the core's own boot checks run as VMs with quotas too).
pub const FRAME_CAPACITY: u32 = POOL_FRAMES as u32;
/// Share records all quotas together may reserve.
pub const GRANT_CAPACITY: u32 = SHARES as u32;
/// Event-channel records all quotas together may reserve.
pub const EVENT_PORT_CAPACITY: u32 = CHANNELS as u32;
/// Slots of each CPU's timer heap kept for timers no VM is charged for (system timers: a
/// cookie whose vector is below `hypercall::VECTOR_MIN`).
pub const TIMER_HOST_RESERVE: usize = 8;
/// Guest timers all quotas together may reserve: one heap's worth less the host's reserve
/// (a VM may arm all its timers on one CPU).
pub const TIMER_CAPACITY: u32 = (TIMERS_PER_CPU - TIMER_HOST_RESERVE) as u32;

/// How many VMs the defaults are sized for (the core's VM table): the control VM and
/// `SIZED_FOR_VMS - 1` AppVMs, or `SIZED_FOR_VMS` AppVMs, fit together.
pub const SIZED_FOR_VMS: u32 = 8;

/// Words of a quota record in guest memory (`VM_CREATE` arg5): frames, grants, event ports,
/// timers, then words that must be 0 (reserved for later limits).
pub const RECORD_WORDS: usize = 8;

/// One VM's quota: the most of each resource it may hold at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Quota {
    /// Frames it owns (memory domain): its demand-zero RAM (at most `GUEST_RAM_PAGES`), the
    /// pages the core writes at creation, and `MEMORY_POPULATE`.
    pub frames: u32,
    /// Share records of its frames (memory domain, `GRANT`): one per (frame, peer VM).
    pub grants: u16,
    /// Event channels it allocated (hypercall domain, `EVTCHN_ALLOC`; binding to a port
    /// another VM offered takes none).
    pub event_ports: u16,
    /// One-shot timers it has armed and that have not fired (timer domain,
    /// `TIMER_ONESHOT`).
    pub timers: u16,
}

impl Quota {
    /// Nothing: what a VM without a reservation may hold.
    pub const NONE: Quota = Quota {
        frames: 0,
        grants: 0,
        event_ports: 0,
        timers: 0,
    };

    /// An AppVM's default: all of its guest RAM (64 pages) plus 32 window pages; 8 grants;
    /// 4 event channels; 8 armed timers (the UnixBench-like guest arms one per round and its
    /// default 8 rounds may all be pending on a fast CPU).
    pub const APP_VM: Quota = Quota {
        frames: 96,
        grants: 8,
        event_ports: 4,
        timers: 8,
    };

    /// The control VM's default: its RAM (64 pages), a 32-block RAM disk, and a ring page
    /// and 4 block buffers for each of up to `SIZED_FOR_VMS - 1` AppVMs (35), with room to
    /// spare; grants of those rings and buffers (35); one event channel per AppVM; its poll
    /// timer.
    pub const CONTROL_VM: Quota = Quota {
        frames: 192,
        grants: 48,
        event_ports: 16,
        timers: 4,
    };

    /// The record `VM_CREATE` reads at arg5: frames, grants, event ports, timers, then
    /// zeros.
    pub const fn to_words(self) -> [u64; RECORD_WORDS] {
        [
            self.frames as u64,
            self.grants as u64,
            self.event_ports as u64,
            self.timers as u64,
            0,
            0,
            0,
            0,
        ]
    }

    /// The quota a record describes; `None` if a limit does not fit its field or a reserved
    /// word is not 0 (the core answers `InvalidArgument`). Whether it fits the capacities is
    /// the domains' decision (`QuotaUnavailable`).
    pub fn from_words(words: &[u64; RECORD_WORDS]) -> Option<Quota> {
        if words[4..].iter().any(|&word| word != 0) {
            return None;
        }
        Some(Quota {
            frames: u32::try_from(words[0]).ok()?,
            grants: u16::try_from(words[1]).ok()?,
            event_ports: u16::try_from(words[2]).ok()?,
            timers: u16::try_from(words[3]).ok()?,
        })
    }
}

/// The amount VM slots `limits` / `used` commit together: the sum of `max(limit, used)`
/// (a u64, so no bit pattern in a state region can overflow it).
pub fn committed<L, U>(limits: &[L], used: &[U]) -> u64
where
    L: Copy + Into<u32>,
    U: Copy + Into<u32>,
{
    limits
        .iter()
        .zip(used)
        .map(|(&limit, &used)| u64::from(limit.into().max(used.into())))
        .sum()
}

/// Whether VM slot `vm` may reserve `limit` units of a resource of `capacity` units: the
/// other slots' committed amounts plus `max(limit, used[vm])` stay within `capacity`.
/// Lowering a limit always fits if the state did.
pub fn reservation_fits<L, U>(
    limits: &[L],
    used: &[U],
    vm: usize,
    limit: u32,
    capacity: u32,
) -> bool
where
    L: Copy + Into<u32>,
    U: Copy + Into<u32>,
{
    let (Some(&old_limit), Some(&held)) = (limits.get(vm), used.get(vm)) else {
        return false;
    };
    let others = committed(limits, used) - u64::from(old_limit.into().max(held.into()));
    others + u64::from(limit.max(held.into())) <= u64::from(capacity)
}

// The defaults fit: the control VM and the rest AppVMs, or AppVMs only.
const _: () = {
    let control = Quota::CONTROL_VM;
    let app = Quota::APP_VM;
    let apps = SIZED_FOR_VMS - 1;
    assert!(control.frames + apps * app.frames <= FRAME_CAPACITY);
    assert!(control.grants as u32 + apps * app.grants as u32 <= GRANT_CAPACITY);
    assert!(control.event_ports as u32 + apps * app.event_ports as u32 <= EVENT_PORT_CAPACITY);
    assert!(control.timers as u32 + apps * app.timers as u32 <= TIMER_CAPACITY);
    assert!(SIZED_FOR_VMS * app.frames <= FRAME_CAPACITY);
    assert!(SIZED_FOR_VMS * app.grants as u32 <= GRANT_CAPACITY);
    assert!(SIZED_FOR_VMS * app.event_ports as u32 <= EVENT_PORT_CAPACITY);
    assert!(SIZED_FOR_VMS * app.timers as u32 <= TIMER_CAPACITY);
    // An AppVM can back all of its guest RAM and still populate window pages.
    assert!(app.frames > crate::limits::GUEST_RAM_PAGES);
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::assert_golden;

    #[test]
    fn records_round_trip_and_refuse_what_does_not_fit() {
        for quota in [Quota::NONE, Quota::APP_VM, Quota::CONTROL_VM] {
            assert_eq!(Quota::from_words(&quota.to_words()), Some(quota));
        }
        assert_eq!(Quota::APP_VM.to_words(), [96, 8, 4, 8, 0, 0, 0, 0]);
        let mut words = Quota::APP_VM.to_words();
        words[7] = 1;
        assert_eq!(Quota::from_words(&words), None);
        for (field, too_big) in [
            (0, u64::from(u32::MAX) + 1),
            (1, 0x1_0000),
            (2, 0x1_0000),
            (3, u64::MAX),
        ] {
            let mut words = Quota::APP_VM.to_words();
            words[field] = too_big;
            assert_eq!(Quota::from_words(&words), None, "field {field}");
        }
    }

    #[test]
    fn reservations_count_what_is_held_beyond_a_limit() {
        let limits = [10u16, 0, 5];
        let used = [3u16, 4, 5];
        // Committed: 10 + 4 (held without a limit) + 5.
        assert_eq!(committed(&limits, &used), 19);
        assert!(reservation_fits(&limits, &used, 1, 6, 21));
        assert!(!reservation_fits(&limits, &used, 1, 7, 21));
        // A limit under what is held commits what is held.
        assert!(reservation_fits(&limits, &used, 2, 0, 19));
        assert!(!reservation_fits(&limits, &used, 2, 0, 18));
        // Lowering always fits a state that fit.
        assert!(reservation_fits(&limits, &used, 0, 3, 19));
        // A slot out of range never fits.
        assert!(!reservation_fits(&limits, &used, 3, 0, 100));
        // No bit pattern overflows the sums.
        let huge = [u32::MAX; 4];
        assert_eq!(committed(&huge, &huge), 4 * u64::from(u32::MAX));
        assert!(!reservation_fits(&huge, &huge, 0, 0, u32::MAX));
    }

    #[test]
    fn golden_quota() {
        assert_golden(&Quota::APP_VM, &[96, 8, 4, 8]);
        assert_golden(
            &Quota {
                frames: 300,
                grants: 1,
                event_ports: 2,
                timers: 3,
            },
            &[172, 2, 1, 2, 3],
        );
    }
}
