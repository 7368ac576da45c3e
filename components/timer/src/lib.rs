//! Timer domain: per-CPU software timer heaps, one-shot and recurring timers, and their expiry.
//!
//! Design rules:
//! - [`TimerState`] is the whole service state: plain data (zerocopy `FromBytes`, so any bit
//!   pattern is a value), fixed arrays, no pointers. It lives in the domain's state region.
//! - Boot is re-initialisation: [`TimerState::init`] is the one routine for both.
//! - [`TimerState::handle`] is the service: pure logic from `ipc::timer::Request` to `Reply`,
//!   never panicking whatever the state holds; a refused request changes nothing.
//! - A recurring timer taken off its heap to fire is parked in its CPU's `handling` slot with
//!   the `in_handler` flag set until it is re-armed. A failure in between leaves the flag set,
//!   and [`TimerState::repair`] re-activates the timer instead of losing it (NiLiHype's repair
//!   of recurring timers). After a repair the binary re-programs each CPU's APIC timer from
//!   [`TimerState::next_deadline`].
//! - Guest timers are charged to VM quotas (`ipc::quota`): a timer whose cookie names a VM
//!   (`ipc::hypercall::timer_charge`: the guest timers the hypercall domain arms) counts
//!   against that VM's limit while it is armed, and is refused `QuotaExceeded` over it; any
//!   other timer comes out of each heap's host reserve (`ipc::quota::TIMER_HOST_RESERVE`).
//!   `SetQuota` is refused `QuotaUnavailable` when the VMs' committed timers would not fit
//!   one heap less that reserve (a VM may put all its timers on one CPU), so a VM under its
//!   limit always finds room on whichever CPU it arms. The per-VM counts are derived from the
//!   heaps' cookies: every repair recounts them.
//!
//! Invariants: each CPU's heap is a binary min-heap on the deadline with at most
//! [`MAX_TIMERS`] entries; timer ids are non-zero and unique over all CPUs; unserved CPUs
//! have no timers; no `in_handler` flag is set between requests; each VM's count is the
//! number of armed timers charged to it; on every CPU, the heap's length plus every VM's
//! unused quota (`limit - count`, where positive) is at most [`MAX_TIMERS`].
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

use heapless::Vec;
use ipc::hypercall::timer_charge;
use ipc::limits::{MAX_CPUS, MAX_VMS};
use ipc::quota::{TIMER_CAPACITY, TIMER_HOST_RESERVE, reservation_fits};
use ipc::timer::{EXPIRE_MAX, Error, Reply, Request, TimerId};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Timers per CPU.
pub const MAX_TIMERS: usize = ipc::limits::TIMERS_PER_CPU;

const VMS: usize = MAX_VMS as usize;

/// One armed timer (24 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct TimerEntry {
    /// When it fires next.
    pub deadline: u64,
    /// 0 for a one-shot, else the time between expiries.
    pub period: u64,
    /// Its id (never 0).
    pub id: u32,
    /// What `Expire` reports.
    pub cookie: u32,
}

impl TimerEntry {
    const EMPTY: TimerEntry = TimerEntry {
        deadline: 0,
        period: 0,
        id: 0,
        cookie: 0,
    };
}

/// One CPU's timers (3104 bytes).
#[derive(Debug, Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct CpuTimers {
    /// Binary min-heap on `deadline`, `length` entries.
    pub heap: [TimerEntry; MAX_TIMERS],
    /// Entries in the heap.
    pub length: u32,
    /// 1 while `handling` holds a recurring timer between firing and re-arming, else 0.
    pub in_handler: u32,
    /// The recurring timer being fired.
    pub handling: TimerEntry,
}

impl CpuTimers {
    const EMPTY: CpuTimers = CpuTimers {
        heap: [TimerEntry::EMPTY; MAX_TIMERS],
        length: 0,
        in_handler: 0,
        handling: TimerEntry::EMPTY,
    };

    fn entries(&self) -> Result<&[TimerEntry], Error> {
        self.heap
            .get(..self.length as usize)
            .ok_or(Error::Inconsistent)
    }

    fn push(&mut self, entry: TimerEntry) -> Result<(), Error> {
        let length = self.entries()?.len();
        if length == MAX_TIMERS {
            return Err(Error::HeapFull);
        }
        self.heap[length] = entry;
        self.length += 1;
        self.sift_up(length);
        Ok(())
    }

    /// Removes the entry at heap index `index`.
    fn remove(&mut self, index: usize) -> Result<TimerEntry, Error> {
        let length = self.entries()?.len();
        if index >= length {
            return Err(Error::Inconsistent);
        }
        let removed = self.heap[index];
        let last = length - 1;
        self.heap[index] = self.heap[last];
        self.heap[last] = TimerEntry::EMPTY;
        self.length -= 1;
        if index < last {
            self.sift_down(index);
            self.sift_up(index);
        }
        Ok(removed)
    }

    fn sift_up(&mut self, mut index: usize) {
        while index > 0 {
            let parent = (index - 1) / 2;
            if self.heap[parent].deadline <= self.heap[index].deadline {
                break;
            }
            self.heap.swap(parent, index);
            index = parent;
        }
    }

    fn sift_down(&mut self, mut index: usize) {
        let length = (self.length as usize).min(MAX_TIMERS);
        loop {
            let mut smallest = index;
            for child in [2 * index + 1, 2 * index + 2] {
                if child < length && self.heap[child].deadline < self.heap[smallest].deadline {
                    smallest = child;
                }
            }
            if smallest == index {
                return;
            }
            self.heap.swap(smallest, index);
            index = smallest;
        }
    }

    fn heapify(&mut self) {
        let length = (self.length as usize).min(MAX_TIMERS);
        for index in (0..length / 2).rev() {
            self.sift_down(index);
        }
    }

    fn is_heap(&self) -> bool {
        let length = (self.length as usize).min(MAX_TIMERS);
        (1..length).all(|index| self.heap[(index - 1) / 2].deadline <= self.heap[index].deadline)
    }
}

/// The timer domain's whole state (25096 bytes), as it lies in the state region.
#[derive(Debug, Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct TimerState {
    /// CPUs served, `1..=MAX_CPUS`.
    pub cpu_count: u32,
    /// The next id to hand out (ids in use and 0 are skipped).
    pub next_id: u32,
    /// Per-CPU timers.
    pub cpus: [CpuTimers; MAX_CPUS],
    /// Per VM: the most timers charged to it that may be armed at once (its reserved quota;
    /// 0 = none).
    pub limits: [u16; VMS],
    /// Per VM: armed timers charged to it, over all CPUs.
    pub used: [u16; VMS],
}

/// A broken invariant found by [`TimerState::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateError {
    /// `cpu_count` is 0 or over `MAX_CPUS`.
    BadCpuCount,
    /// A heap's length is over [`MAX_TIMERS`], or an unserved CPU has timers.
    BadLength {
        /// The CPU.
        cpu: u8,
    },
    /// A parent's deadline is later than its child's.
    HeapOrder {
        /// The CPU.
        cpu: u8,
    },
    /// An armed timer has id 0.
    ZeroId {
        /// The CPU.
        cpu: u8,
    },
    /// Two armed timers share an id.
    DuplicateId {
        /// The id.
        id: u32,
    },
    /// An `in_handler` flag is set (a recurring timer is parked): run
    /// [`TimerState::repair`] first. Also reported for a flag byte that is not 0 or 1.
    HandlerPending {
        /// The CPU.
        cpu: u8,
    },
    /// A VM's count differs from the armed timers charged to it.
    UsageMismatch {
        /// The VM.
        vm: u8,
    },
    /// The CPU's heap could not take every VM's unused quota: a VM under its limit could be
    /// refused.
    Overcommitted {
        /// The CPU.
        cpu: u8,
    },
}

impl StateError {
    /// A stable number for logs and `ipc::lifecycle::Reply::Invalid`: the check number in the
    /// high byte, the CPU (or the id's low byte) in the low byte.
    pub const fn code(self) -> u16 {
        let (check, detail) = match self {
            StateError::BadCpuCount => (1, 0),
            StateError::BadLength { cpu } => (2, cpu),
            StateError::HeapOrder { cpu } => (3, cpu),
            StateError::ZeroId { cpu } => (4, cpu),
            StateError::DuplicateId { id } => (5, id as u8),
            StateError::HandlerPending { cpu } => (6, cpu),
            StateError::UsageMismatch { vm } => (7, vm),
            StateError::Overcommitted { cpu } => (8, cpu),
        };
        (check << 8) | detail as u16
    }
}

/// What [`TimerState::repair`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// `cpu_count` was out of range and was inferred from the heaps.
    pub cpu_count_fixed: bool,
    /// Entries dropped: over a heap's capacity, on an unserved CPU, id 0 or a duplicate id.
    pub entries_dropped: u32,
    /// Heaps whose order had to be restored.
    pub heaps_rebuilt: u32,
    /// Recurring timers found parked in a handler and re-armed.
    pub timers_reactivated: u32,
    /// Per-VM counts recomputed from the heaps.
    pub usage_fixed: u32,
    /// Quota limits lowered to what their VMs hold because the heaps could no longer take
    /// every VM's unused quota (only a corrupted state region gets there).
    pub limits_trimmed: u32,
}

impl RepairReport {
    /// Total number of fixes (0: the state was consistent).
    pub fn fixes(&self) -> u32 {
        u32::from(self.cpu_count_fixed)
            .saturating_add(self.entries_dropped)
            .saturating_add(self.heaps_rebuilt)
            .saturating_add(self.timers_reactivated)
            .saturating_add(self.usage_fixed)
            .saturating_add(self.limits_trimmed)
    }
}

/// Lets tests stop an expiry half-way, as a failure would.
struct Steps(Option<u32>);

impl Steps {
    fn next(&mut self) -> Result<(), Error> {
        match &mut self.0 {
            None => Ok(()),
            Some(0) => Err(Error::Inconsistent),
            Some(left) => {
                *left -= 1;
                Ok(())
            }
        }
    }
}

impl TimerState {
    /// Initialises (at boot, and as a microreboot's last resort) for `cpu_count` CPUs
    /// (clamped to `1..=MAX_CPUS`): no timers.
    pub fn init(&mut self, cpu_count: u8) {
        self.cpu_count = u32::from(cpu_count).clamp(1, MAX_CPUS as u32);
        self.next_id = 1;
        self.cpus = [CpuTimers::EMPTY; MAX_CPUS];
        self.limits = [0; VMS];
        self.used = [0; VMS];
    }

    /// Serves one request. Never panics; a refused request changes nothing.
    pub fn handle(&mut self, request: Request) -> Reply {
        self.apply(request, &mut Steps(None))
            .unwrap_or_else(Reply::Error)
    }

    /// Serves `request` but stops after `steps` timers were taken off the heap for firing,
    /// as a failure would; for the tests of the repair.
    #[cfg(test)]
    fn handle_interrupted(&mut self, request: Request, steps: u32) -> Reply {
        self.apply(request, &mut Steps(Some(steps)))
            .unwrap_or_else(Reply::Error)
    }

    fn apply(&mut self, request: Request, steps: &mut Steps) -> Result<Reply, Error> {
        match request {
            Request::SetOneShot {
                cpu,
                deadline,
                cookie,
            } => self.arm(cpu, deadline, 0, cookie),
            Request::SetRecurring {
                cpu,
                deadline,
                period,
                cookie,
            } => {
                if period == 0 {
                    self.cpu(cpu)?;
                    return Err(Error::BadPeriod);
                }
                self.arm(cpu, deadline, period, cookie)
            }
            Request::Cancel { id } => self.cancel(id),
            Request::Expire { cpu, now } => self.expire(cpu, now, steps),
            Request::NextDeadline { cpu } => {
                let cpu = self.cpu(cpu)?;
                Ok(Reply::Deadline(self.next_deadline(cpu)))
            }
            Request::SetQuota { vm, timers } => self.set_quota(vm, timers),
            Request::DropQuota { vm } => self.drop_quota(vm),
        }
    }

    fn vm(vm: u16) -> Result<usize, Error> {
        if vm < MAX_VMS {
            Ok(usize::from(vm))
        } else {
            Err(Error::BadVm)
        }
    }

    /// Every VM's unused quota (`limit - used` where positive): the slots each heap must keep
    /// free so any VM under its limit finds room on any CPU.
    fn unused_quota(&self) -> u32 {
        self.limits
            .iter()
            .zip(&self.used)
            .map(|(&limit, &used)| u32::from(limit.saturating_sub(used)))
            .sum()
    }

    /// The longest heap's length.
    fn longest_heap(&self) -> u32 {
        self.cpus
            .iter()
            .map(|timers| timers.length.min(MAX_TIMERS as u32))
            .max()
            .unwrap_or(0)
    }

    /// Sets VM `vm`'s limit if every VM's reservation still fits one heap less the host's
    /// reserve, and every heap can still take every VM's unused quota.
    fn set_quota(&mut self, vm: u16, timers: u16) -> Result<Reply, Error> {
        let vm = Self::vm(vm)?;
        let unused_now = u32::from(self.limits[vm].saturating_sub(self.used[vm]));
        let unused_then = u32::from(timers.saturating_sub(self.used[vm]));
        let room = self.longest_heap() + self.unused_quota() - unused_now + unused_then
            <= MAX_TIMERS as u32;
        let fits = reservation_fits(
            &self.limits,
            &self.used,
            vm,
            u32::from(timers),
            TIMER_CAPACITY,
        );
        if !(fits && room) {
            return Err(Error::QuotaUnavailable);
        }
        self.limits[vm] = timers;
        Ok(Reply::Done)
    }

    /// Cancels every timer charged to VM `vm` and sets its limit to 0.
    fn drop_quota(&mut self, vm: u16) -> Result<Reply, Error> {
        let vm_index = Self::vm(vm)?;
        for timers in self.cpus.iter_mut() {
            let length = (timers.length as usize).min(MAX_TIMERS);
            let mut kept = 0;
            for index in 0..length {
                let entry = timers.heap[index];
                if timer_charge(entry.cookie) != Some(vm) {
                    timers.heap[kept] = entry;
                    kept += 1;
                }
            }
            if kept < length {
                for entry in &mut timers.heap[kept..length] {
                    *entry = TimerEntry::EMPTY;
                }
                timers.length = kept as u32;
                timers.heapify();
            }
        }
        self.limits[vm_index] = 0;
        self.used[vm_index] = 0;
        Ok(Reply::Done)
    }

    fn cpu_count(&self) -> usize {
        (self.cpu_count as usize).min(MAX_CPUS)
    }

    fn cpu(&self, cpu: u8) -> Result<usize, Error> {
        let cpu = usize::from(cpu);
        if cpu < self.cpu_count() {
            Ok(cpu)
        } else {
            Err(Error::BadCpu)
        }
    }

    /// The earliest deadline armed on `cpu`, what its APIC timer should be programmed to.
    pub fn next_deadline(&self, cpu: usize) -> Option<u64> {
        let timers = self.cpus.get(cpu)?;
        if timers.length == 0 || timers.length as usize > MAX_TIMERS {
            return None;
        }
        Some(timers.heap[0].deadline)
    }

    /// Where timer `id` is armed: (CPU, heap index).
    fn find(&self, id: u32) -> Option<(usize, usize)> {
        self.cpus.iter().enumerate().find_map(|(cpu, timers)| {
            let length = (timers.length as usize).min(MAX_TIMERS);
            timers.heap[..length]
                .iter()
                .position(|entry| entry.id == id)
                .map(|index| (cpu, index))
        })
    }

    fn in_use(&self, id: u32) -> bool {
        self.find(id).is_some()
            || self
                .cpus
                .iter()
                .any(|timers| timers.in_handler != 0 && timers.handling.id == id)
    }

    fn allocate_id(&mut self) -> Result<u32, Error> {
        // At most MAX_CPUS * (MAX_TIMERS + 1) ids are in use, so this many tries find one.
        for _ in 0..=MAX_CPUS * (MAX_TIMERS + 1) {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            if id != 0 && !self.in_use(id) {
                return Ok(id);
            }
        }
        Err(Error::Inconsistent)
    }

    fn arm(&mut self, cpu: u8, deadline: u64, period: u64, cookie: u32) -> Result<Reply, Error> {
        let cpu = self.cpu(cpu)?;
        let length = self.cpus[cpu].entries()?.len();
        let charged = timer_charge(cookie).map(usize::from);
        match charged {
            // Within its quota a VM always finds room: its unused quota is kept free on
            // every heap.
            Some(vm) if self.used[vm] >= self.limits[vm] => return Err(Error::QuotaExceeded),
            Some(_) => {}
            // Host timers: at most the reserve per heap, and never into room a VM's unused
            // quota needs.
            None => {
                let uncharged = self.cpus[cpu].heap[..length]
                    .iter()
                    .filter(|entry| timer_charge(entry.cookie).is_none())
                    .count();
                if uncharged >= TIMER_HOST_RESERVE
                    || length as u32 + 1 + self.unused_quota() > MAX_TIMERS as u32
                {
                    return Err(Error::HeapFull);
                }
            }
        }
        if length == MAX_TIMERS {
            return Err(Error::HeapFull);
        }
        let id = self.allocate_id()?;
        self.cpus[cpu].push(TimerEntry {
            deadline,
            period,
            id,
            cookie,
        })?;
        if let Some(vm) = charged {
            self.used[vm] += 1;
        }
        Ok(Reply::Armed(TimerId(id)))
    }

    /// A charged timer left its heap for good (cancelled, or a one-shot that fired).
    fn uncharge(used: &mut [u16; VMS], cookie: u32) {
        if let Some(count) = timer_charge(cookie).and_then(|vm| used.get_mut(usize::from(vm))) {
            *count = count.saturating_sub(1);
        }
    }

    fn cancel(&mut self, id: TimerId) -> Result<Reply, Error> {
        if id.0 == 0 {
            return Err(Error::UnknownTimer);
        }
        let (cpu, index) = self.find(id.0).ok_or(Error::UnknownTimer)?;
        let removed = self.cpus[cpu].remove(index)?;
        Self::uncharge(&mut self.used, removed.cookie);
        Ok(Reply::Done)
    }

    fn expire(&mut self, cpu: u8, now: u64, steps: &mut Steps) -> Result<Reply, Error> {
        let cpu = self.cpu(cpu)?;
        let timers = &mut self.cpus[cpu];
        timers.entries()?;
        let mut cookies: Vec<u32, EXPIRE_MAX> = Vec::new();
        while !cookies.is_full() && timers.length > 0 && timers.heap[0].deadline <= now {
            let entry = timers.remove(0)?;
            if entry.period != 0 {
                timers.handling = entry;
                timers.in_handler = 1;
            } else {
                // A failure between the removal and this leaves a count one high: every
                // repair recounts.
                Self::uncharge(&mut self.used, entry.cookie);
            }
            steps.next()?;
            if let Some(missed) = (now - entry.deadline).checked_div(entry.period) {
                let deadline = entry
                    .deadline
                    .saturating_add(missed.saturating_add(1).saturating_mul(entry.period));
                // The slot freed by the removal is still free: this cannot be full.
                timers.push(TimerEntry { deadline, ..entry })?;
                timers.in_handler = 0;
            }
            // Cannot fail: checked `is_full` above.
            let _ = cookies.push(entry.cookie);
        }
        let more = timers.length > 0 && timers.heap[0].deadline <= now;
        Ok(Reply::Expired { cookies, more })
    }

    /// Checks every invariant; the first broken one is returned.
    pub fn validate(&self) -> Result<(), StateError> {
        let cpu_count = self.cpu_count as usize;
        if cpu_count == 0 || cpu_count > MAX_CPUS {
            return Err(StateError::BadCpuCount);
        }
        let mut ids = [0u32; MAX_CPUS * MAX_TIMERS];
        let mut count = 0;
        for (cpu, timers) in self.cpus.iter().enumerate() {
            let cpu_number = cpu as u8;
            let length = timers.length as usize;
            if length > MAX_TIMERS || (cpu >= cpu_count && length != 0) {
                return Err(StateError::BadLength { cpu: cpu_number });
            }
            if timers.in_handler != 0 {
                return Err(StateError::HandlerPending { cpu: cpu_number });
            }
            if !timers.is_heap() {
                return Err(StateError::HeapOrder { cpu: cpu_number });
            }
            for entry in &timers.heap[..length] {
                if entry.id == 0 {
                    return Err(StateError::ZeroId { cpu: cpu_number });
                }
                ids[count] = entry.id;
                count += 1;
            }
        }
        let ids = &mut ids[..count];
        ids.sort_unstable();
        if let Some(pair) = ids.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(StateError::DuplicateId { id: pair[0] });
        }
        let counted = self.count_charged();
        if let Some(vm) = (0..VMS).find(|&vm| self.used[vm] != counted[vm]) {
            return Err(StateError::UsageMismatch { vm: vm as u8 });
        }
        if let Some(cpu) = self.overcommitted_cpu() {
            return Err(StateError::Overcommitted { cpu: cpu as u8 });
        }
        Ok(())
    }

    /// Armed timers charged to each VM, counted from the heaps (the authoritative record).
    fn count_charged(&self) -> [u16; VMS] {
        let mut counted = [0u16; VMS];
        for timers in &self.cpus {
            let length = (timers.length as usize).min(MAX_TIMERS);
            for entry in &timers.heap[..length] {
                if let Some(vm) = timer_charge(entry.cookie) {
                    counted[usize::from(vm)] = counted[usize::from(vm)].saturating_add(1);
                }
            }
        }
        counted
    }

    /// A CPU whose heap cannot take every VM's unused quota, if any.
    fn overcommitted_cpu(&self) -> Option<usize> {
        let unused = self.unused_quota();
        (0..MAX_CPUS).find(|&cpu| {
            (self.cpus[cpu].length as usize).min(MAX_TIMERS) as u32 + unused > MAX_TIMERS as u32
        })
    }

    /// The repair routine after a microreset (and, before validation, after a microreboot):
    /// re-arms recurring timers parked in a handler, drops entries that cannot be kept and
    /// restores heap order. After a repair [`validate`](Self::validate) succeeds and a second
    /// repair reports no fixes.
    pub fn repair(&mut self) -> RepairReport {
        let mut report = RepairReport::default();
        if self.cpu_count == 0 || self.cpu_count > MAX_CPUS as u32 {
            let highest = (0..MAX_CPUS).rev().find(|&cpu| self.cpus[cpu].length != 0);
            self.cpu_count = highest.map_or(1, |cpu| cpu as u32 + 1);
            report.cpu_count_fixed = true;
        }
        let cpu_count = self.cpu_count();
        let mut seen = [0u32; MAX_CPUS * (MAX_TIMERS + 1)];
        let mut seen_count = 0;
        for cpu in 0..MAX_CPUS {
            let timers = &mut self.cpus[cpu];
            let length = timers.length as usize;
            let readable = if cpu < cpu_count {
                length.min(MAX_TIMERS)
            } else {
                0
            };
            report.entries_dropped = report
                .entries_dropped
                .saturating_add((length - readable) as u32);
            let mut kept = 0;
            for index in 0..readable {
                let entry = timers.heap[index];
                if entry.id == 0 || seen[..seen_count].contains(&entry.id) {
                    report.entries_dropped = report.entries_dropped.saturating_add(1);
                    continue;
                }
                seen[seen_count] = entry.id;
                seen_count += 1;
                timers.heap[kept] = entry;
                kept += 1;
            }
            for entry in &mut timers.heap[kept..] {
                *entry = TimerEntry::EMPTY;
            }
            timers.length = kept as u32;
            if !timers.is_heap() {
                timers.heapify();
                report.heaps_rebuilt += 1;
            }
        }
        for cpu in 0..MAX_CPUS {
            let timers = &mut self.cpus[cpu];
            if timers.in_handler == 0 {
                continue;
            }
            timers.in_handler = 0;
            let parked = timers.handling;
            let keep = cpu < cpu_count
                && parked.id != 0
                && parked.period != 0
                && !seen[..seen_count].contains(&parked.id);
            if keep {
                let deadline = parked.deadline.saturating_add(parked.period);
                if timers.push(TimerEntry { deadline, ..parked }).is_ok() {
                    seen[seen_count] = parked.id;
                    seen_count += 1;
                    report.timers_reactivated += 1;
                    continue;
                }
            }
            report.entries_dropped = report.entries_dropped.saturating_add(1);
        }
        // The per-VM counts from the heaps as they are now; the limits are the core's and
        // stay, unless together they no longer leave room on some heap (a corrupted region):
        // then each is lowered to what its VM holds, which always fits.
        let counted = self.count_charged();
        for (used, counted) in self.used.iter_mut().zip(counted) {
            if *used != counted {
                *used = counted;
                report.usage_fixed += 1;
            }
        }
        if self.overcommitted_cpu().is_some() {
            for (limit, &used) in self.limits.iter_mut().zip(&self.used) {
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
