//! The static system manifest: which domains exist, their budgets, and who may call whom.
//!
//! Written by hand in `system.toml`, checked and encoded by `cargo xtask build`, carried in
//! the boot bundle as `manifest.bin` (postcard), decoded and checked again by the core, which
//! enforces it. One [`Manifest::validate`] serves both checks.

use heapless::{String, Vec};
use serde::{Deserialize, Serialize};

use crate::MAX_STATE_PAGES;

/// Most domains a manifest lists.
pub const MAX_DOMAINS: usize = 8;
/// Longest domain name.
pub const MAX_NAME: usize = 24;
/// Domain index reserved for the core.
pub const CORE_INDEX: u16 = 0;

/// One domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainSpec {
    /// Its name (`NAME.elf` in the bundle).
    pub name: String<MAX_NAME>,
    /// Its domain index (1..MAX_DOMAINS; 0 is the core).
    pub index: u16,
    /// Pages of its state region.
    pub state_pages: u16,
    /// Bit `i` set: it may call domain `i`.
    pub may_call: u32,
}

/// The whole manifest. Field and variant order is the wire format: append only.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The domains, in load order.
    pub domains: Vec<DomainSpec, MAX_DOMAINS>,
}

/// What is wrong with a manifest. Each names the domain at fault by its position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestError {
    /// A domain's index is 0 (the core's) or not below [`MAX_DOMAINS`].
    BadIndex {
        /// Position in the list.
        position: usize,
    },
    /// Two domains share an index or a name.
    Duplicate {
        /// Position of the second one.
        position: usize,
    },
    /// A domain has no name.
    EmptyName {
        /// Position in the list.
        position: usize,
    },
    /// `state_pages` is 0 or above [`MAX_STATE_PAGES`].
    BadBudget {
        /// Position in the list.
        position: usize,
    },
    /// `may_call` names an index no domain has, or the domain itself.
    BadCallee {
        /// Position in the list.
        position: usize,
    },
    /// The bytes do not decode as a manifest.
    Malformed,
}

impl core::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadIndex { position } => {
                write!(f, "domain #{position}: index must be 1..{MAX_DOMAINS}")
            }
            Self::Duplicate { position } => {
                write!(f, "domain #{position}: name or index used twice")
            }
            Self::EmptyName { position } => write!(f, "domain #{position}: empty name"),
            Self::BadBudget { position } => write!(
                f,
                "domain #{position}: state_pages must be 1..={MAX_STATE_PAGES}"
            ),
            Self::BadCallee { position } => write!(
                f,
                "domain #{position}: may_call names itself or a missing domain"
            ),
            Self::Malformed => f.write_str("the manifest bytes do not decode"),
        }
    }
}

impl Manifest {
    /// Checks every rule; the first violation is returned.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let known: u32 = self.domains.iter().fold(0, |mask, domain| {
            mask | 1u32.checked_shl(u32::from(domain.index)).unwrap_or(0)
        });
        for (position, domain) in self.domains.iter().enumerate() {
            if domain.index == CORE_INDEX || usize::from(domain.index) >= MAX_DOMAINS {
                return Err(ManifestError::BadIndex { position });
            }
            if domain.name.is_empty() {
                return Err(ManifestError::EmptyName { position });
            }
            let earlier = &self.domains[..position];
            if earlier
                .iter()
                .any(|other| other.index == domain.index || other.name == domain.name)
            {
                return Err(ManifestError::Duplicate { position });
            }
            if domain.state_pages == 0 || domain.state_pages > MAX_STATE_PAGES {
                return Err(ManifestError::BadBudget { position });
            }
            let own = 1u32 << domain.index;
            if domain.may_call & own != 0 || domain.may_call & !known != 0 {
                return Err(ManifestError::BadCallee { position });
            }
        }
        Ok(())
    }

    /// The domain called `name`.
    pub fn find(&self, name: &str) -> Option<&DomainSpec> {
        self.domains.iter().find(|domain| domain.name == name)
    }

    /// Encodes the manifest for the bundle.
    pub fn encode<'a>(&self, buffer: &'a mut [u8]) -> Result<&'a mut [u8], ManifestError> {
        postcard::to_slice(self, buffer).map_err(|_| ManifestError::Malformed)
    }

    /// Decodes and validates manifest bytes (trailing bytes are refused).
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        let (manifest, rest) =
            postcard::take_from_bytes::<Self>(bytes).map_err(|_| ManifestError::Malformed)?;
        if !rest.is_empty() {
            return Err(ManifestError::Malformed);
        }
        manifest.validate()?;
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, index: u16, may_call: u32) -> DomainSpec {
        DomainSpec {
            name: String::try_from(name).unwrap(),
            index,
            state_pages: 1,
            may_call,
        }
    }

    fn sample() -> Manifest {
        let mut manifest = Manifest::default();
        manifest.domains.push(spec("memory", 3, 0)).unwrap();
        manifest.domains.push(spec("hypercall", 5, 1 << 3)).unwrap();
        manifest
    }

    #[test]
    fn a_good_manifest_round_trips() {
        let manifest = sample();
        assert_eq!(manifest.validate(), Ok(()));
        let mut buffer = [0u8; 256];
        let length = manifest.encode(&mut buffer).unwrap().len();
        assert_eq!(Manifest::decode(&buffer[..length]), Ok(manifest.clone()));
        assert_eq!(manifest.find("hypercall").map(|d| d.index), Some(5));
    }

    #[test]
    fn each_rule_is_enforced() {
        type BreakIt = fn(&mut Manifest);
        let cases: [(BreakIt, ManifestError); 6] = [
            (
                |m| m.domains[0].index = 0,
                ManifestError::BadIndex { position: 0 },
            ),
            (
                |m| m.domains[1].index = 9,
                ManifestError::BadIndex { position: 1 },
            ),
            (
                |m| m.domains[1].name = String::try_from("memory").unwrap(),
                ManifestError::Duplicate { position: 1 },
            ),
            (
                |m| m.domains[0].state_pages = 17,
                ManifestError::BadBudget { position: 0 },
            ),
            (
                |m| m.domains[1].may_call = 1 << 4,
                ManifestError::BadCallee { position: 1 },
            ),
            (
                |m| m.domains[0].may_call = 1 << 3,
                ManifestError::BadCallee { position: 0 },
            ),
        ];
        for (break_it, error) in cases {
            let mut manifest = sample();
            break_it(&mut manifest);
            assert_eq!(manifest.validate(), Err(error));
        }
    }

    #[test]
    fn malformed_and_trailing_bytes_are_refused() {
        let mut buffer = [0u8; 256];
        let length = sample().encode(&mut buffer).unwrap().len();
        assert_eq!(
            Manifest::decode(&buffer[..length - 1]),
            Err(ManifestError::Malformed)
        );
        assert_eq!(
            Manifest::decode(&buffer[..length + 1]),
            Err(ManifestError::Malformed)
        );
        assert_eq!(Manifest::decode(&[0xff; 8]), Err(ManifestError::Malformed));
    }
}
