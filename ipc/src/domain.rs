//! Domain identities: an index into the static manifest plus a generation that moves on
//! every restart.

use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The well-known domains of the static manifest, by index. The discriminant is the
/// [`DomainId::index`] the core uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
pub enum DomainIndex {
    /// The trusted core itself (the microvisor): the source of detections and recovery steps.
    Core = 0,
    /// The recovery manager: policy for detections, orders microreset / microreboot.
    RecoveryManager = 1,
    /// vCPU runqueues and time accounting ([`crate::scheduler`]).
    Scheduler = 2,
    /// The frame table ([`crate::memory`]).
    Memory = 3,
    /// Per-CPU software timers ([`crate::timer`]).
    Timer = 4,
    /// The guest-facing hypercall dispatcher ([`crate::hypercall`]).
    Hypercall = 5,
}

impl DomainIndex {
    /// Every well-known domain, in index order.
    pub const ALL: [DomainIndex; 6] = [
        DomainIndex::Core,
        DomainIndex::RecoveryManager,
        DomainIndex::Scheduler,
        DomainIndex::Memory,
        DomainIndex::Timer,
        DomainIndex::Hypercall,
    ];

    /// The index as carried in a [`DomainId`].
    pub const fn index(self) -> u16 {
        self as u16
    }

    /// The well-known domain at `index`, if there is one.
    pub const fn from_index(index: u16) -> Option<DomainIndex> {
        match index {
            0 => Some(DomainIndex::Core),
            1 => Some(DomainIndex::RecoveryManager),
            2 => Some(DomainIndex::Scheduler),
            3 => Some(DomainIndex::Memory),
            4 => Some(DomainIndex::Timer),
            5 => Some(DomainIndex::Hypercall),
            _ => None,
        }
    }
}

/// A domain's identity: which domain (`index`) and which incarnation of it (`generation`).
///
/// The core bumps the generation on every microreset and microreboot; a call addressed to an
/// older generation is answered [`crate::CallError::PeerRestarted`]. Packed (6 bytes, no
/// padding) so it can sit in raw shared records as well as in messages.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C, packed)]
pub struct DomainId {
    /// Index in the static manifest; see [`DomainIndex`] for the well-known ones.
    pub index: u16,
    /// Incarnation counter; starts at 0 at boot, +1 per recovery.
    pub generation: u32,
}

impl DomainId {
    /// The identity of `index` in its `generation`.
    pub const fn new(index: DomainIndex, generation: u32) -> DomainId {
        DomainId {
            index: index.index(),
            generation,
        }
    }

    /// The well-known domain this identity names, if any.
    pub const fn domain_index(self) -> Option<DomainIndex> {
        DomainIndex::from_index(self.index)
    }

    /// The identity of the next incarnation (after a recovery). Wraps at `u32::MAX`.
    pub const fn next_generation(self) -> DomainId {
        DomainId {
            index: self.index,
            generation: self.generation.wrapping_add(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode};

    #[test]
    fn index_round_trips() {
        for domain in DomainIndex::ALL {
            assert_eq!(DomainIndex::from_index(domain.index()), Some(domain));
        }
        assert_eq!(DomainIndex::from_index(6), None);
        assert_eq!(DomainIndex::Hypercall.index(), 5);
    }

    #[test]
    fn domain_id_is_six_bytes_raw_and_pinned_on_the_wire() {
        assert_eq!(core::mem::size_of::<DomainId>(), 6);
        let id = DomainId::new(DomainIndex::Memory, 300);
        assert_eq!(id.as_bytes(), &[3, 0, 44, 1, 0, 0]);
        let mut buffer = [0u8; 16];
        let length = encode(&id, &mut buffer).unwrap();
        assert_eq!(&buffer[..length], &[3, 0xac, 0x02]);
        assert_eq!(decode::<DomainId>(&buffer[..length]), Ok(id));
        assert_eq!({ id.next_generation().generation }, 301);
        assert_eq!(id.domain_index(), Some(DomainIndex::Memory));
    }
}
