//! The physical frame allocator: one bit per 4 KiB frame, set = free.
//!
//! A bitmap (rather than a free list threaded through free frames) keeps every allocator
//! decision in memory the allocator owns, so it is testable on the host and a wild write into
//! a free frame cannot corrupt it. Set bits mean free so that a new bitmap is all zeroes and a
//! `static` one lives in `.bss`, not in the image. Frames start out in use; the boot code frees exactly the
//! usable ranges of the normalised memory map. Freeing a frame twice is reported, not ignored.

use crate::memmap::{PAGE_SIZE, PhysRange};

/// Errors from freeing frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The address is not 4 KiB aligned.
    Unaligned(u64),
    /// The frame lies above what the bitmap covers.
    OutOfRange(u64),
    /// The frame was already free (a double free, a bug in the caller).
    AlreadyFree(u64),
}

/// A bitmap frame allocator over the physical addresses `[0, WORDS * 64 * 4 KiB)`.
pub struct FrameBitmap<const WORDS: usize> {
    words: [u64; WORDS],
    free: usize,
    /// Index of the first word that may hold a free bit (a search hint).
    hint: usize,
}

impl<const WORDS: usize> Default for FrameBitmap<WORDS> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const WORDS: usize> FrameBitmap<WORDS> {
    /// Bytes of physical address space the bitmap covers.
    pub const COVERED_BYTES: u64 = WORDS as u64 * 64 * PAGE_SIZE;

    /// A bitmap with every frame in use.
    pub const fn new() -> Self {
        Self {
            words: [0; WORDS],
            free: 0,
            hint: 0,
        }
    }

    /// Marks the whole frames inside `range` free. Returns the bytes of `range` that lie
    /// above what the bitmap covers (they stay unusable), so the caller can report them.
    pub fn add_free_range(&mut self, range: PhysRange) -> u64 {
        let start = range.start.div_ceil(PAGE_SIZE);
        let end_clamped = range.end.min(Self::COVERED_BYTES);
        let end = end_clamped / PAGE_SIZE;
        for frame in start..end.max(start) {
            let (word, bit) = split(frame);
            if self.words[word] & bit == 0 {
                self.words[word] |= bit;
                self.free += 1;
            }
        }
        self.hint = 0;
        range
            .end
            .saturating_sub(range.start.max(Self::COVERED_BYTES))
    }

    /// Takes one free frame, lowest address first, and returns its physical address.
    pub fn allocate(&mut self) -> Option<u64> {
        for index in self.hint..WORDS {
            let word = self.words[index];
            if word != 0 {
                let bit = word.trailing_zeros() as u64;
                self.words[index] &= !(1 << bit);
                self.free -= 1;
                self.hint = index;
                return Some((index as u64 * 64 + bit) * PAGE_SIZE);
            }
        }
        self.hint = WORDS;
        None
    }

    /// Takes `count` physically contiguous free frames whose first address is a multiple of
    /// `align` bytes (a power of two, at least 4 KiB), lowest address first.
    pub fn allocate_contiguous(&mut self, count: u64, align: u64) -> Option<u64> {
        if count == 0 || !align.is_power_of_two() || align < PAGE_SIZE {
            return None;
        }
        let step = align / PAGE_SIZE;
        let total = WORDS as u64 * 64;
        let mut first = 0;
        while first + count <= total {
            match (first..first + count).find(|&frame| self.is_used(frame)) {
                None => {
                    for frame in first..first + count {
                        let (word, bit) = split(frame);
                        self.words[word] &= !bit;
                    }
                    self.free -= count as usize;
                    return Some(first * PAGE_SIZE);
                }
                Some(used) => first = (used + 1).div_ceil(step) * step,
            }
        }
        None
    }

    /// Returns the frame at `address` to the pool.
    pub fn free(&mut self, address: u64) -> Result<(), FrameError> {
        if !address.is_multiple_of(PAGE_SIZE) {
            return Err(FrameError::Unaligned(address));
        }
        if address >= Self::COVERED_BYTES {
            return Err(FrameError::OutOfRange(address));
        }
        let (word, bit) = split(address / PAGE_SIZE);
        if self.words[word] & bit != 0 {
            return Err(FrameError::AlreadyFree(address));
        }
        self.words[word] |= bit;
        self.free += 1;
        self.hint = self.hint.min(word);
        Ok(())
    }

    /// Number of free frames.
    pub const fn free_frames(&self) -> usize {
        self.free
    }

    fn is_used(&self, frame: u64) -> bool {
        let (word, bit) = split(frame);
        self.words[word] & bit == 0
    }
}

const fn split(frame: u64) -> (usize, u64) {
    ((frame / 64) as usize, 1 << (frame % 64))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Small = FrameBitmap<4>; // 256 frames = 1 MiB

    #[test]
    fn starts_full_and_frees_only_whole_frames() {
        let mut bitmap = Small::new();
        assert_eq!(bitmap.allocate(), None);
        bitmap.add_free_range(PhysRange {
            start: 0x1800,
            end: 0x5000,
        });
        assert_eq!(bitmap.free_frames(), 3); // 0x2000, 0x3000, 0x4000
        assert_eq!(bitmap.allocate(), Some(0x2000));
        assert_eq!(bitmap.allocate(), Some(0x3000));
        assert_eq!(bitmap.allocate(), Some(0x4000));
        assert_eq!(bitmap.allocate(), None);
    }

    #[test]
    fn reports_memory_above_its_coverage() {
        let mut bitmap = Small::new();
        let beyond = bitmap.add_free_range(PhysRange {
            start: 0xff000,
            end: 0x110000,
        });
        assert_eq!(beyond, 0x10000);
        assert_eq!(bitmap.free_frames(), 1);
    }

    #[test]
    fn double_free_and_bad_addresses_are_errors() {
        let mut bitmap = Small::new();
        bitmap.add_free_range(PhysRange {
            start: 0,
            end: 0x2000,
        });
        let frame = bitmap.allocate().unwrap();
        assert_eq!(bitmap.free(frame), Ok(()));
        assert_eq!(bitmap.free(frame), Err(FrameError::AlreadyFree(frame)));
        assert_eq!(bitmap.free(0x123), Err(FrameError::Unaligned(0x123)));
        assert_eq!(
            bitmap.free(Small::COVERED_BYTES),
            Err(FrameError::OutOfRange(Small::COVERED_BYTES))
        );
        assert_eq!(bitmap.free_frames(), 2);
    }

    #[test]
    fn freed_frames_are_found_again_below_the_hint() {
        let mut bitmap = Small::new();
        bitmap.add_free_range(PhysRange {
            start: 0,
            end: Small::COVERED_BYTES,
        });
        let all: std::vec::Vec<u64> = core::iter::from_fn(|| bitmap.allocate()).collect();
        assert_eq!(all.len(), 256);
        bitmap.free(0x5000).unwrap();
        assert_eq!(bitmap.allocate(), Some(0x5000));
    }

    #[test]
    fn contiguous_allocation_respects_alignment_and_holes() {
        let mut bitmap = Small::new();
        bitmap.add_free_range(PhysRange {
            start: 0x1000,
            end: 0x3000,
        });
        bitmap.add_free_range(PhysRange {
            start: 0x4000,
            end: 0x10000,
        });
        let block = bitmap.allocate_contiguous(4, 0x4000).unwrap();
        assert_eq!(block, 0x4000);
        assert_eq!(bitmap.free_frames(), 2 + 12 - 4);
        assert_eq!(bitmap.allocate_contiguous(4, 0x4000), Some(0x8000));
        assert_eq!(bitmap.allocate_contiguous(5, 0x1000), None);
        assert_eq!(bitmap.allocate_contiguous(1, 3), None);
    }
}
