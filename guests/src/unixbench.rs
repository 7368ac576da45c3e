//! The UnixBench-like workload: hypercall- and memory-heavy rounds (populate, write and read
//! back a page, query it, alias it with map/unmap, a multicall batch, a one-shot timer,
//! release, yield, and refused calls), every result checked, all folded into a checksum.
//!
//! The guest folds what it *observed* into its checksum in the order of [`Observation`]s;
//! [`golden`] folds what it *must* observe. Frame numbers differ from run to run and are not
//! folded in; everything else is deterministic.

use ipc::hypercall::HypercallError;

use crate::{Checksum, pattern};

/// Rounds when the scenario gives none (parameter 0).
pub const DEFAULT_ROUNDS: u64 = 8;

/// Words of the test page written and read back each round.
pub const PAGE_WORDS: u64 = 512;

/// Guest frames (from the window's start) the rounds cycle through for populated pages.
pub const POPULATE_SLOTS: u64 = 16;

/// Offset (in frames, from the window's start) of the alias mapping of the round's page.
pub const ALIAS_OFFSET: u64 = 32;

/// The sum of the round's page pattern.
pub fn page_sum(round: u64) -> u64 {
    (0..PAGE_WORDS).fold(0u64, |sum, index| sum.wrapping_add(pattern(round, index)))
}

/// `QUERY_FRAME`'s answer for an unshared RAM frame of `vm` (validated: the core checked and
/// scrubbed it before mapping it).
pub fn query_value(vm: u16) -> i64 {
    (u64::from(vm) | 1 << 16 | 1 << 32 | 1 << 40) as i64
}

/// What one round must observe, in the order the guest folds its observations in.
pub fn expected_round(vm: u16, round: u64) -> [i64; 16] {
    let sum = page_sum(round) as i64;
    [
        0,                                            // NULL
        1,                                     // MEMORY_POPULATE answered a frame (folded as 1)
        sum,                                   // the page read back
        query_value(vm),                       // QUERY_FRAME of it
        0,                                     // MAP_GRANT of it at the alias
        sum,                                   // the page read through the alias
        0,                                     // UNMAP_GRANT of the alias
        HypercallError::NotFound.guest_code(), // UNMAP_GRANT again (double unmap)
        0,                                     // MULTICALL itself
        0,                                     // entry: NULL
        query_value(vm),                       // entry: QUERY_FRAME
        HypercallError::InvalidArgument.guest_code(), // entry: QUERY_FRAME of frame 0 (outside the pool)
        HypercallError::NestedMulticall.guest_code(), // entry: a nested MULTICALL
        1, // TIMER_ONESHOT answered a timer id (folded as 1)
        0, // MEMORY_RELEASE
        0, // YIELD
    ]
}

/// Refused calls after the rounds: an unknown number, a non-zero unused argument.
pub const EPILOGUE: [i64; 2] = [
    HypercallError::BadNumber.guest_code(),
    HypercallError::InvalidArgument.guest_code(),
];

/// The checksum a correct run of `rounds` rounds by VM `vm` reports.
pub fn golden(vm: u16, rounds: u64) -> u64 {
    let mut sum = Checksum::new();
    for round in 0..rounds {
        for value in expected_round(vm, round) {
            sum.add(value as u64);
        }
    }
    for value in EPILOGUE {
        sum.add(value as u64);
    }
    sum.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_depends_on_vm_and_rounds() {
        assert_ne!(golden(2, 8), golden(3, 8));
        assert_ne!(golden(2, 8), golden(2, 7));
        assert_eq!(golden(2, 8), golden(2, 8));
    }

    #[test]
    fn query_value_matches_the_documented_packing() {
        // owner 2, reference count 1, kind Ram (1), validated.
        assert_eq!(query_value(2), 0x101_0001_0002);
    }

    #[test]
    fn a_round_page_sum_is_not_trivial() {
        assert_ne!(page_sum(0), 0);
        assert_ne!(page_sum(0), page_sum(1));
    }
}
