//! Per-VM quotas (`ipc::quota`): before the core takes anything for a VM it reserves the VM's
//! share of every resource the services hold for all VMs, and it gives the reservation back
//! when the VM's memory is released (the VM stopped, ended or was destroyed).
//!
//! Mechanism, not policy: what a quota holds and whether it fits are the domains' decisions
//! (each owns its resource, its capacity and the per-VM counts, in its state region); the core
//! asks each in turn (`SetQuota`: memory for frames and grants, hypercall for event channels,
//! timer for guest timers) and, when one refuses, drops what the others accepted. Every quota
//! request is idempotent, so a domain that restarts under one is simply asked again.
//!
//! Where quotas come from: the control VM names a [`Quota`] record in `VM_CREATE` (0: the
//! AppVM default), the scenario VMs built at boot get the defaults, and the core's own boot
//! checks that play a VM (the synthetic workload, the first guest) reserve what they use.

use ipc::DomainIndex;
use ipc::hypercall as hc;
use ipc::quota::{Quota, RECORD_WORDS};
use ipc::{memory, timer};
use microvisor_abi::Status;

use crate::domain::{self, TypedCallError};

/// Bytes of a quota record in guest memory (`VM_CREATE` arg5).
pub const RECORD_BYTES: usize = RECORD_WORDS * 8;

/// What the synthetic workload holds at most as its VM: 10 frames and 3 one-shot timers.
pub const WORKLOAD: Quota = Quota {
    frames: 16,
    grants: 0,
    event_ports: 0,
    timers: 4,
};

/// What the first guest holds as its VM: the one frame it populates (kept for the run).
pub const FIRST_GUEST: Quota = Quota {
    frames: 1,
    grants: 0,
    event_ports: 0,
    timers: 0,
};

/// Tries of one quota request whose domain restarted (or was busy) under it.
const ATTEMPTS: u32 = 4;

/// Why a quota could not be reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotaError {
    /// A domain refused: the VMs' reservations together would exceed its capacity (the
    /// `&str` names the resource). Nothing is reserved.
    Unavailable(&'static str),
    /// A domain failed under the request and was recovered more often than the core retries:
    /// nothing is reserved; try again.
    Interrupted,
    /// A domain answered something unexpected (a bug in the domain, or a VM number out of
    /// range). Nothing is reserved.
    Refused(&'static str),
}

impl core::fmt::Display for QuotaError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Unavailable(what) => write!(f, "no room left to reserve its {what}"),
            Self::Interrupted => f.write_str("a service failed under the reservation"),
            Self::Refused(what) => write!(f, "the {what} quota was refused"),
        }
    }
}

/// Sends one idempotent quota request, again after a restart of its domain.
fn ask<R: serde::de::DeserializeOwned>(
    target: DomainIndex,
    request: &impl serde::Serialize,
    what: &'static str,
) -> Result<R, QuotaError> {
    for _ in 0..ATTEMPTS {
        match domain::typed_call::<R>(target as u16, request) {
            Ok(Ok(reply)) => return Ok(reply),
            Err(TypedCallError::Status(Status::PeerRestarted | Status::Busy)) => {}
            _ => return Err(QuotaError::Refused(what)),
        }
    }
    Err(QuotaError::Interrupted)
}

/// Reserves `quota` for VM `vm` in every domain, or nothing (what was reserved before a
/// refusal is dropped again). Call it before anything is taken for the VM.
pub fn reserve(vm: u16, quota: &Quota) -> Result<(), QuotaError> {
    let reserved = reserve_each(vm, quota);
    if reserved.is_err() {
        // A VM that holds nothing yet: dropping what was (or was not) reserved is harmless.
        release(vm);
    }
    reserved
}

fn reserve_each(vm: u16, quota: &Quota) -> Result<(), QuotaError> {
    let request = memory::Request::SetQuota {
        vm,
        frames: quota.frames,
        grants: quota.grants,
    };
    match ask(DomainIndex::Memory, &request, "frame and grant")? {
        memory::Reply::Done => {}
        memory::Reply::Error(memory::Error::QuotaUnavailable) => {
            return Err(QuotaError::Unavailable("frames and grants"));
        }
        _ => return Err(QuotaError::Refused("frame and grant")),
    }
    let request = hc::Request::SetQuota {
        vm,
        event_ports: quota.event_ports,
    };
    match ask(DomainIndex::Hypercall, &request, "event-port")? {
        hc::Reply::Complete { value: 0 } => {}
        hc::Reply::Error(hc::HypercallError::QuotaUnavailable) => {
            return Err(QuotaError::Unavailable("event ports"));
        }
        _ => return Err(QuotaError::Refused("event-port")),
    }
    let request = timer::Request::SetQuota {
        vm,
        timers: quota.timers,
    };
    match ask(DomainIndex::Timer, &request, "timer")? {
        timer::Reply::Done => Ok(()),
        timer::Reply::Error(timer::Error::QuotaUnavailable) => {
            Err(QuotaError::Unavailable("timers"))
        }
        _ => Err(QuotaError::Refused("timer")),
    }
}

/// Gives VM `vm`'s reservation back in every domain: the memory domain's limits go to 0 (what
/// the VM still holds, such as a frame another VM still maps, keeps counting until it is
/// freed), the hypercall domain closes the VM's channels and frees its multicall logs, the
/// timer domain cancels its timers. Idempotent; call it once the VM's frames are freed.
pub fn release(vm: u16) {
    let dropped = [
        ask::<memory::Reply>(
            DomainIndex::Memory,
            &memory::Request::DropQuota { vm },
            "frame and grant",
        )
        .is_ok_and(|reply| reply == memory::Reply::Done),
        ask::<hc::Reply>(
            DomainIndex::Hypercall,
            &hc::Request::DropQuota { vm },
            "event-port",
        )
        .is_ok_and(|reply| reply == hc::Reply::Complete { value: 0 }),
        ask::<timer::Reply>(
            DomainIndex::Timer,
            &timer::Request::DropQuota { vm },
            "timer",
        )
        .is_ok_and(|reply| reply == timer::Reply::Done),
    ];
    if dropped.contains(&false) {
        log::warn!(
            "VM {vm}: a service did not drop its quota (memory, hypercall, timer: {dropped:?})"
        );
    }
}

/// The quota a `VM_CREATE` record in guest memory describes (`None`: a limit too large for
/// its field, or a reserved word not 0).
pub fn from_record(bytes: &[u8; RECORD_BYTES]) -> Option<Quota> {
    let mut words = [0u64; RECORD_WORDS];
    for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut le = [0u8; 8];
        le.copy_from_slice(chunk);
        *word = u64::from_le_bytes(le);
    }
    Quota::from_words(&words)
}
