//! Normalising the firmware memory map into page-aligned usable ranges.
//!
//! Firmware maps (multiboot2, PVH/E820) may list overlapping, unsorted or unaligned regions,
//! and the kernel image, boot modules and low memory must never be handed out. The functions
//! here turn a raw map plus a reserved list into disjoint, sorted, page-aligned usable ranges.

/// Size of a physical frame (4 KiB).
pub const PAGE_SIZE: u64 = 4096;

/// What the firmware says a region is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// RAM free for the OS to use.
    Usable,
    /// ACPI tables that may be reclaimed after they are read.
    AcpiReclaimable,
    /// ACPI non-volatile storage.
    AcpiNvs,
    /// Broken RAM.
    Defective,
    /// Anything else: reserved by firmware or hardware.
    Reserved,
}

/// A physical address range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhysRange {
    /// First byte of the range.
    pub start: u64,
    /// One past the last byte of the range.
    pub end: u64,
}

impl PhysRange {
    /// The range `[start, start + len)`, saturating at the top of the address space.
    pub const fn from_base_len(start: u64, len: u64) -> Self {
        Self {
            start,
            end: start.saturating_add(len),
        }
    }

    /// Bytes in the range.
    pub const fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the range holds no byte.
    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// Error from [`usable_ranges`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemmapError {
    /// More disjoint usable ranges than the output buffer holds.
    TooManyRanges,
}

/// Writes into `out` the page-aligned parts of the usable regions of `raw` that overlap no
/// non-usable region of `raw` and no range of `reserved`. Returns how many ranges were written;
/// they are sorted and disjoint.
///
/// A region listed as usable and as reserved at once is treated as reserved (firmware maps are
/// allowed to overlap; the conservative reading wins).
pub fn usable_ranges(
    raw: &[(PhysRange, RegionKind)],
    reserved: &[PhysRange],
    out: &mut [PhysRange],
) -> Result<usize, MemmapError> {
    let mut count = 0;
    for &(range, kind) in raw {
        if kind != RegionKind::Usable {
            continue;
        }
        let aligned = PhysRange {
            start: range.start.div_ceil(PAGE_SIZE).saturating_mul(PAGE_SIZE),
            end: range.end / PAGE_SIZE * PAGE_SIZE,
        };
        if aligned.is_empty() {
            continue;
        }
        count = add_range(out, count, aligned)?;
    }
    let blocked = raw
        .iter()
        .filter(|(_, kind)| *kind != RegionKind::Usable)
        .map(|(range, _)| *range)
        .chain(reserved.iter().copied());
    for block in blocked {
        // Round the blocked range outwards to whole pages.
        let block = PhysRange {
            start: block.start / PAGE_SIZE * PAGE_SIZE,
            end: block.end.div_ceil(PAGE_SIZE).saturating_mul(PAGE_SIZE),
        };
        count = subtract(out, count, block)?;
    }
    out[..count].sort_unstable_by_key(|range| range.start);
    Ok(count)
}

/// Adds `range` to the first `count` entries of `out`, merging with overlapping or touching
/// entries so the set stays disjoint.
fn add_range(
    out: &mut [PhysRange],
    mut count: usize,
    mut range: PhysRange,
) -> Result<usize, MemmapError> {
    let mut index = 0;
    while index < count {
        let other = out[index];
        if other.start <= range.end && range.start <= other.end {
            range.start = range.start.min(other.start);
            range.end = range.end.max(other.end);
            out[index] = out[count - 1];
            count -= 1;
        } else {
            index += 1;
        }
    }
    let slot = out.get_mut(count).ok_or(MemmapError::TooManyRanges)?;
    *slot = range;
    Ok(count + 1)
}

/// Removes `block` from the first `count` entries of `out`, splitting entries it cuts in two.
fn subtract(
    out: &mut [PhysRange],
    mut count: usize,
    block: PhysRange,
) -> Result<usize, MemmapError> {
    if block.is_empty() {
        return Ok(count);
    }
    let mut index = 0;
    while index < count {
        let range = out[index];
        if block.end <= range.start || range.end <= block.start {
            index += 1;
            continue;
        }
        let below = PhysRange {
            start: range.start,
            end: block.start.max(range.start),
        };
        let above = PhysRange {
            start: block.end.min(range.end),
            end: range.end,
        };
        match (below.is_empty(), above.is_empty()) {
            (true, true) => {
                out[index] = out[count - 1];
                count -= 1;
                continue;
            }
            (false, true) => out[index] = below,
            (true, false) => out[index] = above,
            (false, false) => {
                out[index] = below;
                let slot = out.get_mut(count).ok_or(MemmapError::TooManyRanges)?;
                *slot = above;
                count += 1;
            }
        }
        index += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, end: u64) -> PhysRange {
        PhysRange { start, end }
    }

    #[test]
    fn aligns_and_drops_reserved_overlap() {
        let raw = [
            (r(0, 0x9fc00), RegionKind::Usable),
            (r(0x9fc00, 0xa0000), RegionKind::Reserved),
            (r(0x100000, 0x7fe0000), RegionKind::Usable),
            (r(0xf0000, 0x100000), RegionKind::Reserved),
        ];
        let mut out = [r(0, 0); 8];
        let n = usable_ranges(&raw, &[r(0, 0x100000), r(0x100000, 0x180123)], &mut out).unwrap();
        assert_eq!(&out[..n], &[r(0x181000, 0x7fe0000)]);
    }

    #[test]
    fn splits_around_a_hole_and_sorts() {
        let raw = [
            (r(0x200000, 0x400000), RegionKind::Usable),
            (r(0x100000, 0x180000), RegionKind::Usable),
        ];
        let mut out = [r(0, 0); 8];
        let n = usable_ranges(&raw, &[r(0x300000, 0x301000)], &mut out).unwrap();
        assert_eq!(
            &out[..n],
            &[
                r(0x100000, 0x180000),
                r(0x200000, 0x300000),
                r(0x301000, 0x400000)
            ]
        );
    }

    #[test]
    fn overlapping_usable_regions_merge_and_reserved_wins() {
        let raw = [
            (r(0x100000, 0x300000), RegionKind::Usable),
            (r(0x200000, 0x500000), RegionKind::Usable),
            (r(0x280000, 0x290000), RegionKind::AcpiNvs),
        ];
        let mut out = [r(0, 0); 8];
        let n = usable_ranges(&raw, &[], &mut out).unwrap();
        assert_eq!(&out[..n], &[r(0x100000, 0x280000), r(0x290000, 0x500000)]);
    }

    #[test]
    fn too_small_output_is_an_error_not_a_truncation() {
        let raw = [
            (r(0x100000, 0x200000), RegionKind::Usable),
            (r(0x300000, 0x400000), RegionKind::Usable),
        ];
        let mut out = [r(0, 0); 1];
        assert_eq!(
            usable_ranges(&raw, &[], &mut out),
            Err(MemmapError::TooManyRanges)
        );
    }

    #[test]
    fn sub_page_regions_vanish() {
        let raw = [(r(0x1001, 0x1fff), RegionKind::Usable)];
        let mut out = [r(0, 0); 2];
        assert_eq!(usable_ranges(&raw, &[], &mut out), Ok(0));
    }
}
