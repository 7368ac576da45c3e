//! Scheduler domain: vCPU runqueues, the per-CPU current vCPU, vCPU states and time accounting.
//!
//! Design rules:
//! - [`SchedulerState`] is the whole service state: plain data (zerocopy `FromBytes`, so any bit
//!   pattern is a value), fixed arrays, enums stored as bytes and decoded with checks, no
//!   pointers. It lives in the domain's state region and survives a microreset in place and a
//!   microreboot by reintegration.
//! - Boot is re-initialisation: [`SchedulerState::init`] is the one routine for both.
//! - [`SchedulerState::handle`] is the service: pure logic from `ipc::scheduler::Request` to
//!   `Reply`. It never panics, whatever the state holds (corrupt indices answer
//!   `Error::Inconsistent`), and a refused request changes nothing.
//! - [`SchedulerState::validate`] checks every invariant; [`SchedulerState::repair`] restores
//!   them after a failure, taking the core's per-CPU record of which vCPU is loaded as the
//!   source of truth (a NiLiHype repair), and leaves a state that validates.
//!
//! Invariants: every Runnable vCPU sits exactly once in the runqueue of its home CPU; every
//! Running vCPU is current on exactly one CPU; every current entry names a Running vCPU;
//! vCPU ids are unique; runqueue lengths and heads are in range.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

use ipc::limits::{MAX_CPUS, MAX_VCPUS};
use ipc::scheduler::{Error, Reply, Request, VcpuId};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Slot number meaning "no vCPU" in runqueues and current entries.
pub const NO_VCPU: u8 = 0xff;

/// A vCPU record's state, stored as a byte in [`VcpuRecord::state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum VcpuState {
    /// The record is unused.
    Free = 0,
    /// Waiting in its home CPU's runqueue.
    Runnable = 1,
    /// Current on one CPU.
    Running = 2,
    /// Neither queued nor running, until woken.
    Blocked = 3,
}

impl VcpuState {
    /// Decodes a stored byte.
    pub const fn from_u8(value: u8) -> Option<VcpuState> {
        match value {
            0 => Some(VcpuState::Free),
            1 => Some(VcpuState::Runnable),
            2 => Some(VcpuState::Running),
            3 => Some(VcpuState::Blocked),
            _ => None,
        }
    }
}

/// One vCPU record (16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct VcpuRecord {
    /// The VM.
    pub vm: u16,
    /// The vCPU inside the VM.
    pub vcpu: u16,
    /// A [`VcpuState`] byte.
    pub state: u8,
    /// The CPU whose runqueue it waits in.
    pub home_cpu: u8,
    /// Zero.
    pub reserved: [u8; 2],
    /// Ticks charged by `Account`.
    pub ticks: u64,
}

impl VcpuRecord {
    const FREE: VcpuRecord = VcpuRecord {
        vm: 0,
        vcpu: 0,
        state: VcpuState::Free as u8,
        home_cpu: 0,
        reserved: [0; 2],
        ticks: 0,
    };

    fn id(&self) -> VcpuId {
        VcpuId {
            vm: self.vm,
            vcpu: self.vcpu,
        }
    }

    fn state(&self) -> Option<VcpuState> {
        VcpuState::from_u8(self.state)
    }
}

/// A FIFO runqueue: a ring of record slots (40 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RunQueue {
    /// Ring of record slot numbers; `length` entries from `head`, wrapping.
    pub slots: [u8; MAX_VCPUS],
    /// Ring index of the first entry.
    pub head: u8,
    /// Number of entries.
    pub length: u8,
    /// Zero.
    pub reserved: [u8; 6],
}

impl RunQueue {
    const EMPTY: RunQueue = RunQueue {
        slots: [NO_VCPU; MAX_VCPUS],
        head: 0,
        length: 0,
        reserved: [0; 6],
    };

    /// The entries in order, or `None` if head or length is out of range.
    fn entries(&self) -> Option<impl Iterator<Item = u8> + '_> {
        let head = usize::from(self.head);
        let length = usize::from(self.length);
        if head >= MAX_VCPUS || length > MAX_VCPUS {
            return None;
        }
        Some((0..length).map(move |offset| self.slots[(head + offset) % MAX_VCPUS]))
    }

    fn push(&mut self, slot: u8) -> Result<(), Error> {
        let head = usize::from(self.head);
        let length = usize::from(self.length);
        if head >= MAX_VCPUS || length >= MAX_VCPUS {
            return Err(Error::Inconsistent);
        }
        self.slots[(head + length) % MAX_VCPUS] = slot;
        self.length += 1;
        Ok(())
    }

    fn pop(&mut self) -> Result<Option<u8>, Error> {
        let head = usize::from(self.head);
        if head >= MAX_VCPUS || usize::from(self.length) > MAX_VCPUS {
            return Err(Error::Inconsistent);
        }
        if self.length == 0 {
            return Ok(None);
        }
        let slot = self.slots[head];
        self.slots[head] = NO_VCPU;
        self.head = ((head + 1) % MAX_VCPUS) as u8;
        self.length -= 1;
        Ok(Some(slot))
    }

    /// Rewrites the queue from `entries` (at most `MAX_VCPUS`), head at 0.
    fn rebuild(&mut self, entries: &[u8]) {
        *self = RunQueue::EMPTY;
        for (target, &slot) in self.slots.iter_mut().zip(entries) {
            *target = slot;
        }
        self.length = entries.len().min(MAX_VCPUS) as u8;
    }

    /// Removes every occurrence of `slot`; true if there was one.
    fn remove(&mut self, slot: u8) -> Result<bool, Error> {
        let mut kept = [NO_VCPU; MAX_VCPUS];
        let mut count = 0;
        let mut found = false;
        for entry in self.entries().ok_or(Error::Inconsistent)? {
            if entry == slot {
                found = true;
            } else {
                kept[count] = entry;
                count += 1;
            }
        }
        self.rebuild(&kept[..count]);
        Ok(found)
    }
}

/// The scheduler's whole state (848 bytes), as it lies in the state region.
#[derive(Debug, Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct SchedulerState {
    /// CPUs served, `1..=MAX_CPUS`.
    pub cpu_count: u32,
    /// Zero.
    pub reserved: u32,
    /// vCPU records, indexed by slot.
    pub records: [VcpuRecord; MAX_VCPUS],
    /// Per-CPU runqueues.
    pub queues: [RunQueue; MAX_CPUS],
    /// Per-CPU current vCPU slot, or [`NO_VCPU`].
    pub current: [u8; MAX_CPUS],
}

/// A broken invariant found by [`SchedulerState::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateError {
    /// `cpu_count` is 0 or over `MAX_CPUS`.
    BadCpuCount,
    /// A record's state byte is not a [`VcpuState`].
    BadVcpuState {
        /// The record slot.
        slot: u8,
    },
    /// A record's home CPU is not served.
    BadHomeCpu {
        /// The record slot.
        slot: u8,
    },
    /// Two records carry the same vCPU id (this is the second).
    DuplicateVcpu {
        /// The record slot.
        slot: u8,
    },
    /// A runqueue's head or length is out of range, or a runqueue of an unserved CPU is not
    /// empty.
    BadQueue {
        /// The CPU.
        cpu: u8,
    },
    /// A runqueue entry is not a Runnable record whose home is that CPU.
    BadQueueEntry {
        /// The CPU.
        cpu: u8,
    },
    /// A Runnable vCPU is in no runqueue, or in more than one place.
    RunnableNotQueuedOnce {
        /// The record slot.
        slot: u8,
    },
    /// A current entry names no Running record, or an unserved CPU has a current vCPU.
    BadCurrent {
        /// The CPU.
        cpu: u8,
    },
    /// A Running vCPU is current on no CPU, or on more than one.
    RunningNotCurrentOnce {
        /// The record slot.
        slot: u8,
    },
}

impl StateError {
    /// A stable number for logs and `ipc::lifecycle::Reply::Invalid`: check number in the high
    /// byte, the slot or CPU in the low byte.
    pub const fn code(self) -> u16 {
        let (check, detail) = match self {
            StateError::BadCpuCount => (1, 0),
            StateError::BadVcpuState { slot } => (2, slot),
            StateError::BadHomeCpu { slot } => (3, slot),
            StateError::DuplicateVcpu { slot } => (4, slot),
            StateError::BadQueue { cpu } => (5, cpu),
            StateError::BadQueueEntry { cpu } => (6, cpu),
            StateError::RunnableNotQueuedOnce { slot } => (7, slot),
            StateError::BadCurrent { cpu } => (8, cpu),
            StateError::RunningNotCurrentOnce { slot } => (9, slot),
        };
        (check << 8) | detail as u16
    }
}

/// What [`SchedulerState::repair`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// `cpu_count` was out of range and was inferred from the records, queues and currents.
    pub cpu_count_fixed: bool,
    /// Records with a bad state byte, or duplicating an id, were freed; bad home CPUs reset.
    pub records_fixed: u32,
    /// Current entries changed (to follow the core's record, or dropped as invalid).
    pub currents_changed: u32,
    /// vCPU states changed to match the current entries (Running <-> Runnable).
    pub states_changed: u32,
    /// Runqueue entries dropped (invalid, duplicate, not Runnable, not on their home).
    pub queue_entries_dropped: u32,
    /// Runnable vCPUs that were in no runqueue and were appended to their home one.
    pub vcpus_requeued: u32,
}

impl RepairReport {
    /// Total number of fixes (0: the state was consistent).
    pub fn fixes(&self) -> u32 {
        u32::from(self.cpu_count_fixed)
            + self.records_fixed
            + self.currents_changed
            + self.states_changed
            + self.queue_entries_dropped
            + self.vcpus_requeued
    }
}

impl SchedulerState {
    /// Initialises (at boot, and as a microreboot's last resort) for `cpu_count` CPUs
    /// (clamped to `1..=MAX_CPUS`): no vCPUs, empty runqueues, idle CPUs.
    pub fn init(&mut self, cpu_count: u8) {
        self.cpu_count = u32::from(cpu_count).clamp(1, MAX_CPUS as u32);
        self.reserved = 0;
        self.records = [VcpuRecord::FREE; MAX_VCPUS];
        self.queues = [RunQueue::EMPTY; MAX_CPUS];
        self.current = [NO_VCPU; MAX_CPUS];
    }

    /// Serves one request. Never panics; a refused request changes nothing.
    pub fn handle(&mut self, request: Request) -> Reply {
        let outcome = match request {
            Request::CreateVcpu { vcpu, home_cpu } => self.create(vcpu, home_cpu),
            Request::DestroyVcpu { vcpu } => self.destroy(vcpu),
            Request::Wake { vcpu } => self.wake(vcpu),
            Request::Block { vcpu } => self.block(vcpu),
            Request::Yield { cpu } => self.yield_cpu(cpu),
            Request::PickNext { cpu } => self.pick_next(cpu),
            Request::Current { cpu } => self
                .cpu(cpu)
                .and_then(|cpu| self.current_id(cpu))
                .map(Reply::Current),
            Request::Account { cpu, ticks } => self.account(cpu, ticks),
            Request::SetAffinity { vcpu, home_cpu } => self.set_affinity(vcpu, home_cpu),
        };
        outcome.unwrap_or_else(Reply::Error)
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

    fn find(&self, id: VcpuId) -> Option<usize> {
        self.records.iter().position(|record| {
            record.state().is_some_and(|state| state != VcpuState::Free) && record.id() == id
        })
    }

    fn record_state(&self, slot: usize) -> Result<VcpuState, Error> {
        self.records[slot].state().ok_or(Error::Inconsistent)
    }

    fn home(&self, slot: usize) -> Result<usize, Error> {
        self.cpu(self.records[slot].home_cpu)
            .map_err(|_| Error::Inconsistent)
    }

    /// The CPU `slot` is current on, if any.
    fn running_on(&self, slot: usize) -> Option<usize> {
        self.current
            .iter()
            .take(self.cpu_count())
            .position(|&current| usize::from(current) == slot)
    }

    fn current_id(&self, cpu: usize) -> Result<Option<VcpuId>, Error> {
        match self.current[cpu] {
            NO_VCPU => Ok(None),
            slot => self
                .records
                .get(usize::from(slot))
                .map(|record| Some(record.id()))
                .ok_or(Error::Inconsistent),
        }
    }

    fn create(&mut self, vcpu: VcpuId, home_cpu: u8) -> Result<Reply, Error> {
        let home = self.cpu(home_cpu)?;
        if self.find(vcpu).is_some() {
            return Err(Error::VcpuExists);
        }
        let slot = self
            .records
            .iter()
            .position(|record| record.state == VcpuState::Free as u8)
            .ok_or(Error::TableFull)?;
        self.queues[home].push(slot as u8)?;
        self.records[slot] = VcpuRecord {
            vm: vcpu.vm,
            vcpu: vcpu.vcpu,
            state: VcpuState::Runnable as u8,
            home_cpu,
            reserved: [0; 2],
            ticks: 0,
        };
        Ok(Reply::Done)
    }

    /// Takes `slot` out of wherever it is scheduled (runqueue or CPU).
    fn unschedule(&mut self, slot: usize) -> Result<(), Error> {
        match self.record_state(slot)? {
            VcpuState::Runnable => {
                let home = self.home(slot)?;
                if !self.queues[home].remove(slot as u8)? {
                    return Err(Error::Inconsistent);
                }
            }
            VcpuState::Running => {
                let cpu = self.running_on(slot).ok_or(Error::Inconsistent)?;
                self.current[cpu] = NO_VCPU;
            }
            VcpuState::Blocked | VcpuState::Free => {}
        }
        Ok(())
    }

    fn destroy(&mut self, vcpu: VcpuId) -> Result<Reply, Error> {
        let slot = self.find(vcpu).ok_or(Error::UnknownVcpu)?;
        self.unschedule(slot)?;
        self.records[slot] = VcpuRecord::FREE;
        Ok(Reply::Done)
    }

    fn wake(&mut self, vcpu: VcpuId) -> Result<Reply, Error> {
        let slot = self.find(vcpu).ok_or(Error::UnknownVcpu)?;
        if self.record_state(slot)? == VcpuState::Blocked {
            let home = self.home(slot)?;
            self.queues[home].push(slot as u8)?;
            self.records[slot].state = VcpuState::Runnable as u8;
        }
        Ok(Reply::Done)
    }

    fn block(&mut self, vcpu: VcpuId) -> Result<Reply, Error> {
        let slot = self.find(vcpu).ok_or(Error::UnknownVcpu)?;
        self.unschedule(slot)?;
        self.records[slot].state = VcpuState::Blocked as u8;
        Ok(Reply::Done)
    }

    /// Puts the current vCPU of `cpu` back at the tail of its home runqueue.
    fn requeue_current(&mut self, cpu: usize) -> Result<(), Error> {
        let slot = usize::from(self.current[cpu]);
        if slot == usize::from(NO_VCPU) {
            return Ok(());
        }
        if slot >= MAX_VCPUS || self.record_state(slot)? != VcpuState::Running {
            return Err(Error::Inconsistent);
        }
        let home = self.home(slot)?;
        self.queues[home].push(slot as u8)?;
        self.records[slot].state = VcpuState::Runnable as u8;
        self.current[cpu] = NO_VCPU;
        Ok(())
    }

    fn yield_cpu(&mut self, cpu: u8) -> Result<Reply, Error> {
        let cpu = self.cpu(cpu)?;
        self.requeue_current(cpu)?;
        Ok(Reply::Done)
    }

    fn pick_next(&mut self, cpu: u8) -> Result<Reply, Error> {
        let cpu = self.cpu(cpu)?;
        // Check the head before changing anything, so a corrupt queue changes nothing.
        let head = self.queues[cpu]
            .entries()
            .ok_or(Error::Inconsistent)?
            .next();
        let Some(next) = head else {
            return self.current_id(cpu).map(Reply::Current);
        };
        let next = usize::from(next);
        if next >= MAX_VCPUS || self.record_state(next)? != VcpuState::Runnable {
            return Err(Error::Inconsistent);
        }
        self.queues[cpu].pop()?;
        self.requeue_current(cpu)?;
        self.records[next].state = VcpuState::Running as u8;
        self.current[cpu] = next as u8;
        self.current_id(cpu).map(Reply::Current)
    }

    fn account(&mut self, cpu: u8, ticks: u64) -> Result<Reply, Error> {
        let cpu = self.cpu(cpu)?;
        let slot = self.current[cpu];
        if slot == NO_VCPU {
            return Err(Error::Idle);
        }
        let record = self
            .records
            .get_mut(usize::from(slot))
            .ok_or(Error::Inconsistent)?;
        record.ticks = record.ticks.saturating_add(ticks);
        Ok(Reply::Done)
    }

    fn set_affinity(&mut self, vcpu: VcpuId, home_cpu: u8) -> Result<Reply, Error> {
        let new_home = self.cpu(home_cpu)?;
        let slot = self.find(vcpu).ok_or(Error::UnknownVcpu)?;
        if self.record_state(slot)? == VcpuState::Runnable {
            let old_home = self.home(slot)?;
            if old_home != new_home {
                if usize::from(self.queues[new_home].length) >= MAX_VCPUS {
                    return Err(Error::Inconsistent);
                }
                if !self.queues[old_home].remove(slot as u8)? {
                    return Err(Error::Inconsistent);
                }
                self.queues[new_home].push(slot as u8)?;
            }
        }
        self.records[slot].home_cpu = home_cpu;
        Ok(Reply::Done)
    }

    /// The record of `vcpu`, if it exists (for the binary's reports and for tests).
    pub fn record(&self, vcpu: VcpuId) -> Option<&VcpuRecord> {
        self.find(vcpu).map(|slot| &self.records[slot])
    }

    /// The state of `vcpu`, if it exists and its state byte is valid.
    pub fn vcpu_state(&self, vcpu: VcpuId) -> Option<VcpuState> {
        self.record(vcpu).and_then(VcpuRecord::state)
    }

    /// Checks every invariant; the first broken one is returned.
    pub fn validate(&self) -> Result<(), StateError> {
        let cpu_count = self.cpu_count as usize;
        if cpu_count == 0 || cpu_count > MAX_CPUS {
            return Err(StateError::BadCpuCount);
        }
        for (slot, record) in self.records.iter().enumerate() {
            let slot_number = slot as u8;
            let state = record
                .state()
                .ok_or(StateError::BadVcpuState { slot: slot_number })?;
            if state == VcpuState::Free {
                continue;
            }
            if usize::from(record.home_cpu) >= cpu_count {
                return Err(StateError::BadHomeCpu { slot: slot_number });
            }
            if self.records[..slot]
                .iter()
                .any(|other| other.state != VcpuState::Free as u8 && other.id() == record.id())
            {
                return Err(StateError::DuplicateVcpu { slot: slot_number });
            }
        }
        // Where each slot was seen: runqueue appearances and current appearances.
        let mut queued = [0u8; MAX_VCPUS];
        for (cpu, queue) in self.queues.iter().enumerate() {
            let cpu_number = cpu as u8;
            let entries = queue
                .entries()
                .ok_or(StateError::BadQueue { cpu: cpu_number })?;
            if cpu >= cpu_count && queue.length != 0 {
                return Err(StateError::BadQueue { cpu: cpu_number });
            }
            for slot in entries {
                let record = self
                    .records
                    .get(usize::from(slot))
                    .ok_or(StateError::BadQueueEntry { cpu: cpu_number })?;
                if record.state != VcpuState::Runnable as u8 || usize::from(record.home_cpu) != cpu
                {
                    return Err(StateError::BadQueueEntry { cpu: cpu_number });
                }
                queued[usize::from(slot)] += 1;
            }
        }
        let mut running = [0u8; MAX_VCPUS];
        for (cpu, &slot) in self.current.iter().enumerate() {
            if slot == NO_VCPU {
                continue;
            }
            let cpu_number = cpu as u8;
            let record = self
                .records
                .get(usize::from(slot))
                .ok_or(StateError::BadCurrent { cpu: cpu_number })?;
            if cpu >= cpu_count || record.state != VcpuState::Running as u8 {
                return Err(StateError::BadCurrent { cpu: cpu_number });
            }
            running[usize::from(slot)] += 1;
        }
        for (slot, record) in self.records.iter().enumerate() {
            let slot_number = slot as u8;
            let runnable = record.state == VcpuState::Runnable as u8;
            if runnable && queued[slot] != 1 {
                return Err(StateError::RunnableNotQueuedOnce { slot: slot_number });
            }
            let is_running = record.state == VcpuState::Running as u8;
            if is_running && running[slot] != 1 {
                return Err(StateError::RunningNotCurrentOnce { slot: slot_number });
            }
        }
        Ok(())
    }

    /// The repair routine after a microreset (and, before validation, after a microreboot):
    /// makes every invariant hold again while keeping as much of the schedule as is
    /// consistent.
    ///
    /// `loaded` is the core's per-CPU record of which vCPU is loaded on each CPU, the source
    /// of truth for the current entries (NiLiHype: "scheduler metadata made consistent with
    /// the per-CPU record"); `None` keeps the current entries that are consistent. After a
    /// repair, [`validate`](Self::validate) succeeds and a second repair reports no fixes.
    pub fn repair(&mut self, loaded: Option<&[Option<VcpuId>]>) -> RepairReport {
        let mut report = RepairReport::default();
        if self.cpu_count == 0 || self.cpu_count > MAX_CPUS as u32 {
            self.cpu_count = self.inferred_cpu_count();
            report.cpu_count_fixed = true;
        }
        let cpu_count = self.cpu_count();
        self.repair_records(cpu_count, &mut report);
        self.repair_currents(cpu_count, loaded, &mut report);
        self.repair_queues(cpu_count, &mut report);
        report
    }

    /// The CPU count the rest of the state implies: one past the highest CPU that is some
    /// vCPU's home, has a current vCPU or a non-empty runqueue.
    fn inferred_cpu_count(&self) -> u32 {
        let homes = self
            .records
            .iter()
            .filter(|record| record.state().is_some_and(|state| state != VcpuState::Free))
            .map(|record| usize::from(record.home_cpu))
            .filter(|&cpu| cpu < MAX_CPUS);
        let busy = (0..MAX_CPUS)
            .filter(|&cpu| self.current[cpu] != NO_VCPU || self.queues[cpu].length != 0);
        homes
            .chain(busy)
            .max()
            .map_or(1, |highest| highest as u32 + 1)
    }

    fn repair_records(&mut self, cpu_count: usize, report: &mut RepairReport) {
        for slot in 0..MAX_VCPUS {
            let record = self.records[slot];
            let state = record.state();
            let duplicate = self.records[..slot].iter().any(|other| {
                other.state().is_some_and(|s| s != VcpuState::Free) && other.id() == record.id()
            });
            match state {
                None => {
                    self.records[slot] = VcpuRecord::FREE;
                    report.records_fixed += 1;
                }
                Some(VcpuState::Free) => {}
                Some(_) if duplicate => {
                    self.records[slot] = VcpuRecord::FREE;
                    report.records_fixed += 1;
                }
                Some(_) if usize::from(record.home_cpu) >= cpu_count => {
                    self.records[slot].home_cpu = 0;
                    report.records_fixed += 1;
                }
                Some(_) => {}
            }
        }
    }

    fn repair_currents(
        &mut self,
        cpu_count: usize,
        loaded: Option<&[Option<VcpuId>]>,
        report: &mut RepairReport,
    ) {
        let mut wanted = [NO_VCPU; MAX_CPUS];
        for (cpu, target) in wanted.iter_mut().enumerate().take(cpu_count) {
            let candidate = match loaded {
                Some(loaded) => loaded
                    .get(cpu)
                    .copied()
                    .flatten()
                    .and_then(|id| self.find(id))
                    .map_or(NO_VCPU, |slot| slot as u8),
                None => {
                    let slot = self.current[cpu];
                    let keep = self
                        .records
                        .get(usize::from(slot))
                        .is_some_and(|record| record.state == VcpuState::Running as u8);
                    if keep { slot } else { NO_VCPU }
                }
            };
            // A vCPU is current on one CPU at most: the first CPU claiming it keeps it.
            *target = candidate;
        }
        for cpu in 0..MAX_CPUS {
            let slot = wanted[cpu];
            if slot != NO_VCPU && wanted[..cpu].contains(&slot) {
                wanted[cpu] = NO_VCPU;
            }
        }
        for (current, wanted) in self.current.iter_mut().zip(wanted) {
            if *current != wanted {
                *current = wanted;
                report.currents_changed += 1;
            }
        }
        for slot in 0..MAX_VCPUS {
            let is_current = self.current.contains(&(slot as u8));
            let record = &mut self.records[slot];
            let state = record.state();
            if is_current && state != Some(VcpuState::Running) {
                record.state = VcpuState::Running as u8;
                report.states_changed += 1;
            } else if !is_current && state == Some(VcpuState::Running) {
                record.state = VcpuState::Runnable as u8;
                report.states_changed += 1;
            }
        }
    }

    fn repair_queues(&mut self, cpu_count: usize, report: &mut RepairReport) {
        let mut seen = [false; MAX_VCPUS];
        for cpu in 0..MAX_CPUS {
            let queue = self.queues[cpu];
            let mut kept = [NO_VCPU; MAX_VCPUS];
            let mut count = 0;
            // A queue with a bad head or length is read as far as its ring goes.
            let length = usize::from(queue.length).min(MAX_VCPUS);
            let head = usize::from(queue.head) % MAX_VCPUS;
            let structurally_bad = queue.head != head as u8 || queue.length != length as u8;
            let mut dropped = u32::from(structurally_bad);
            for offset in 0..length {
                let slot = queue.slots[(head + offset) % MAX_VCPUS];
                let keep = cpu < cpu_count
                    && self.records.get(usize::from(slot)).is_some_and(|record| {
                        record.state == VcpuState::Runnable as u8
                            && usize::from(record.home_cpu) == cpu
                    })
                    && !seen[usize::from(slot)];
                if keep {
                    seen[usize::from(slot)] = true;
                    kept[count] = slot;
                    count += 1;
                } else {
                    dropped += 1;
                }
            }
            if dropped > 0 {
                self.queues[cpu].rebuild(&kept[..count]);
            }
            report.queue_entries_dropped += dropped;
        }
        for (slot, &seen) in seen.iter().enumerate() {
            let record = self.records[slot];
            if record.state == VcpuState::Runnable as u8 && !seen {
                // Home CPUs were repaired above; every queue has room for every vCPU.
                let home = usize::from(record.home_cpu).min(cpu_count - 1);
                if self.queues[home].push(slot as u8).is_ok() {
                    report.vcpus_requeued += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
