//! Guest kernels: the control VM and the self-checking workloads (UnixBench-, BlkBench- and
//! NetBench-like), and the plans and golden values they check themselves against.
//!
//! Each guest binary in `src/bin/` runs in its own VMX guest and talks to the system only
//! through hypercalls (`microvisor-guest-runtime`). What it must observe is computed here, on
//! plain data, so the host tests pin it and the guest compares what it saw with it.
#![no_std]
#![forbid(unsafe_code)]

pub mod blockfs;
pub mod control;
pub mod fuzz;
pub mod hostile;
pub mod netbench;
pub mod ring;
pub mod smpbench;
pub mod unixbench;

/// Guest-physical memory, word by word: the rings' [`ring::Memory`] inside a guest (guest
/// builds only; host tests use arrays).
#[cfg(feature = "guest")]
pub struct GuestMemory;

#[cfg(feature = "guest")]
impl ring::Memory for GuestMemory {
    fn read(&self, address: u64) -> u64 {
        microvisor_guest_runtime::read_u64(address)
    }

    fn write(&mut self, address: u64, value: u64) {
        microvisor_guest_runtime::write_u64(address, value)
    }
}

/// FNV-1a over 64-bit words: the checksum guests report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checksum(pub u64);

impl Checksum {
    /// The empty checksum.
    pub const fn new() -> Checksum {
        Checksum(0xcbf2_9ce4_8422_2325)
    }

    /// Folds one word in.
    pub fn add(&mut self, word: u64) {
        for byte in word.to_le_bytes() {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

impl Default for Checksum {
    fn default() -> Self {
        Checksum::new()
    }
}

/// The pattern word `index` of a test page in round `round` (xorshift of both).
pub fn pattern(round: u64, index: u64) -> u64 {
    let mut x = (round << 32) ^ index ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_is_fnv1a_of_the_bytes() {
        let mut sum = Checksum::new();
        sum.add(0);
        // FNV-1a 64 of eight zero bytes (computed independently).
        assert_eq!(sum.0, 0xa8c7_f832_281a_39c5);
        let mut other = Checksum::new();
        other.add(1);
        assert_ne!(sum, other);
    }

    #[test]
    fn patterns_differ_by_round_and_index() {
        assert_ne!(pattern(0, 0), pattern(1, 0));
        assert_ne!(pattern(0, 0), pattern(0, 1));
        assert_eq!(pattern(3, 7), pattern(3, 7));
    }
}
