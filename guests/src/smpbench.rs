//! The SMP workload's plan and golden values: every vCPU of one VM counts into a shared atomic
//! counter, writes its own words of a shared page, and populates, fills and releases a window
//! page of its own (each release an EPT shootdown while its siblings run on other CPUs); vCPU 0
//! waits for the others and checks everything they left in the VM's memory.

use crate::{Checksum, pattern};

/// Increments per vCPU when the scenario gives no count.
pub const DEFAULT_ROUNDS: u64 = 400;
/// A vCPU yields (and makes a null hypercall) every this many increments, so vCPUs sharing a
/// CPU interleave.
pub const YIELD_EVERY: u64 = 50;
/// Populate/fill/release cycles per vCPU.
pub const POPULATES: u64 = 4;
/// Words each vCPU writes into the shared page.
pub const WORDS_PER_VCPU: u64 = 16;
/// First window page the vCPUs populate (vCPU `v` uses `WINDOW_FIRST_GFN + WINDOW_OFFSET + v`).
pub const WINDOW_OFFSET: u64 = 0x40;

/// The word vCPU `vcpu` writes at index `index` of its part of the shared page.
pub fn shared_word(vcpu: u64, index: u64) -> u64 {
    pattern(0x5_0000 + vcpu, index)
}

/// What vCPU 0 reports when every check holds: the vCPU count, the counter's final value and
/// every vCPU's shared words.
pub fn golden(vcpus: u64, rounds: u64) -> u64 {
    let mut sum = Checksum::new();
    sum.add(vcpus);
    sum.add(vcpus * rounds);
    for vcpu in 0..vcpus {
        for index in 0..WORDS_PER_VCPU {
            sum.add(shared_word(vcpu, index));
        }
    }
    sum.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_values_differ_by_shape() {
        assert_ne!(golden(2, DEFAULT_ROUNDS), golden(4, DEFAULT_ROUNDS));
        assert_ne!(golden(2, DEFAULT_ROUNDS), golden(2, DEFAULT_ROUNDS + 1));
        assert_eq!(golden(3, 10), golden(3, 10));
    }

    #[test]
    fn vcpus_write_distinct_words() {
        let mut words = [0u64; 4 * WORDS_PER_VCPU as usize];
        for (slot, word) in words.iter_mut().enumerate() {
            let slot = slot as u64;
            *word = shared_word(slot / WORDS_PER_VCPU, slot % WORDS_PER_VCPU);
        }
        words.sort_unstable();
        assert!(words.windows(2).all(|pair| pair[0] != pair[1]));
    }
}
