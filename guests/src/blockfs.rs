//! A tiny file system over a block device, and the BlkBench-like workload a guest runs on it.
//!
//! Built for a guest with no heap and a 64 KiB stack: every operation works block by block
//! through a [`Block`] on the stack, and the file system keeps no state between calls (each call
//! reads and checks block 0 again), so a device that changes under it is caught, not trusted.
//!
//! # On-disk format
//!
//! Block 0 is the superblock, in u64 words:
//!
//! | words       | contents                                                             |
//! |-------------|----------------------------------------------------------------------|
//! | 0           | [`MAGIC`]                                                            |
//! | 1           | blocks on the device when formatted                                  |
//! | 8..168      | the directory: [`MAX_FILES`] entries of 10 words                     |
//! | 192..256    | the allocation bitmap: bit `b` of word `192 + b / 64` = block `b` used |
//! | all others  | zero                                                                 |
//!
//! A directory entry is `[name, bytes, block_0, ..., block_7]`: a non-zero name (zero marks a
//! free entry, all ten words zero), the size in bytes (a multiple of 8, at most
//! [`MAX_FILE_BYTES`]), and the file's data blocks in order; the first `bytes.div_ceil(4096)`
//! are in use, the rest zero. Block 0 is always marked used. A superblock is accepted only if
//! the bitmap is exactly the set of blocks the entries use, with no block used twice and no
//! name used twice; anything else is [`FsError::Corrupt`].
//!
//! File contents are u64 words; a file of `n` bytes holds `n / 8` words, word `i` in word
//! `i % 512` of its data block `i / 512`.
//!
//! # The workload
//!
//! [`run_workload`] formats the disk and runs rounds that create, copy, read back, patch and
//! remove files whose contents are [`pattern`] words; [`golden`] computes what those reads
//! must return from the same plan without touching a file system, and a correct run reports
//! `mismatches == 0` and `checksum == golden(rounds)`.

use crate::{Checksum, pattern};

/// Words per block.
pub const BLOCK_WORDS: usize = 512;
/// Bytes per block.
pub const BLOCK_BYTES: u64 = 4096;
/// One block of data.
pub type Block = [u64; BLOCK_WORDS];

/// Blocks on the guest's RAM disk.
pub const DISK_BLOCKS: u64 = 32;
/// Superblock magic ("mvblkfs1", little-endian).
pub const MAGIC: u64 = u64::from_le_bytes(*b"mvblkfs1");
/// Directory entries.
pub const MAX_FILES: usize = 16;
/// Data blocks per file.
pub const FILE_BLOCKS: usize = 8;
/// The largest file, in bytes.
pub const MAX_FILE_BYTES: u64 = FILE_BLOCKS as u64 * BLOCK_BYTES;
/// The largest device the bitmap can describe, in blocks.
pub const MAX_BLOCKS: u64 = BITMAP_WORDS as u64 * 64;

const MAGIC_WORD: usize = 0;
const BLOCKS_WORD: usize = 1;
const DIRECTORY: usize = 8;
const ENTRY_WORDS: usize = 2 + FILE_BLOCKS;
const DIRECTORY_END: usize = DIRECTORY + MAX_FILES * ENTRY_WORDS;
const BITMAP: usize = 192;
const BITMAP_WORDS: usize = 64;

/// A disk of 4 KiB blocks.
pub trait BlockDevice {
    /// Reads block `block` into `data`; a negative device status on failure.
    fn read_block(&mut self, block: u64, data: &mut Block) -> Result<(), i64>;
    /// Writes `data` to block `block`; a negative device status on failure.
    fn write_block(&mut self, block: u64, data: &Block) -> Result<(), i64>;
    /// Blocks on the device.
    fn blocks(&self) -> u64;
}

/// Why a file-system operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsError {
    /// No free blocks or directory entries (recoverable: remove files).
    NoSpace,
    /// No file of that name.
    NotFound,
    /// A file of that name already exists.
    Exists,
    /// The file (or the device, for [`format`]) is larger than the format allows.
    TooBig,
    /// Name zero, which marks free directory entries (the caller's fault).
    BadName,
    /// A size that is not a whole number of u64 words (the caller's fault).
    Unaligned,
    /// A block or word range past the end of the file (the caller's fault).
    OutOfRange,
    /// The superblock breaks the format: the disk was damaged or never formatted.
    Corrupt,
    /// The device failed with this status.
    Device(i64),
}

/// A file as its directory entry described it when opened; stale once the file is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct File {
    name: u64,
    bytes: u64,
    blocks: [u64; FILE_BLOCKS],
}

impl File {
    /// The file's name.
    pub fn name(&self) -> u64 {
        self.name
    }

    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Size in u64 words.
    pub fn words(&self) -> u64 {
        self.bytes / 8
    }

    /// Data blocks the file uses.
    pub fn block_count(&self) -> u64 {
        self.bytes.div_ceil(BLOCK_BYTES)
    }

    fn block(&self, index: u64) -> Result<u64, FsError> {
        if index >= self.block_count() {
            return Err(FsError::OutOfRange);
        }
        Ok(self.blocks[index as usize])
    }

    /// Reads the file's data block `index` (words `index * 512..`) into `data`; returns how
    /// many of its words belong to the file (the rest are unspecified).
    pub fn read_block<D: BlockDevice + ?Sized>(
        &self,
        dev: &mut D,
        index: u64,
        data: &mut Block,
    ) -> Result<u64, FsError> {
        let block = self.block(index)?;
        dev.read_block(block, data).map_err(FsError::Device)?;
        Ok((self.words() - index * BLOCK_WORDS as u64).min(BLOCK_WORDS as u64))
    }

    /// Writes `data` as the file's data block `index`.
    pub fn write_block<D: BlockDevice + ?Sized>(
        &self,
        dev: &mut D,
        index: u64,
        data: &Block,
    ) -> Result<(), FsError> {
        let block = self.block(index)?;
        dev.write_block(block, data).map_err(FsError::Device)
    }

    /// Sets words `first..first + count` of the file to `word(i)` for each word index `i`,
    /// reading back only the blocks the range covers in part.
    pub fn write_with<D: BlockDevice + ?Sized>(
        &self,
        dev: &mut D,
        first: u64,
        count: u64,
        mut word: impl FnMut(u64) -> u64,
    ) -> Result<(), FsError> {
        let end = first.checked_add(count).ok_or(FsError::OutOfRange)?;
        if end > self.words() {
            return Err(FsError::OutOfRange);
        }
        if count == 0 {
            return Ok(());
        }
        let block_words = BLOCK_WORDS as u64;
        let mut data = [0; BLOCK_WORDS];
        for index in first / block_words..=(end - 1) / block_words {
            let start = index * block_words;
            let valid_end = (start + block_words).min(self.words());
            let (low, high) = (first.max(start), end.min(valid_end));
            if low > start || high < valid_end {
                self.read_block(dev, index, &mut data)?;
            } else {
                data = [0; BLOCK_WORDS];
            }
            for i in low..high {
                data[(i - start) as usize] = word(i);
            }
            self.write_block(dev, index, &data)?;
        }
        Ok(())
    }
}

/// Block 0, checked.
struct Superblock(Block);

impl Superblock {
    fn load<D: BlockDevice + ?Sized>(dev: &mut D) -> Result<Superblock, FsError> {
        let mut words = [0; BLOCK_WORDS];
        dev.read_block(0, &mut words).map_err(FsError::Device)?;
        let superblock = Superblock(words);
        superblock.check(dev.blocks())?;
        Ok(superblock)
    }

    fn store<D: BlockDevice + ?Sized>(&self, dev: &mut D) -> Result<(), FsError> {
        dev.write_block(0, &self.0).map_err(FsError::Device)
    }

    fn check(&self, device_blocks: u64) -> Result<(), FsError> {
        let words = &self.0;
        if words[MAGIC_WORD] != MAGIC || words[BLOCKS_WORD] != device_blocks {
            return Err(FsError::Corrupt);
        }
        if !(2..=MAX_BLOCKS).contains(&device_blocks) {
            return Err(FsError::Corrupt);
        }
        let reserved = (2..DIRECTORY).chain(DIRECTORY_END..BITMAP);
        if reserved
            .chain(BITMAP + BITMAP_WORDS..BLOCK_WORDS)
            .any(|word| words[word] != 0)
        {
            return Err(FsError::Corrupt);
        }
        let mut used = [0u64; BITMAP_WORDS];
        used[0] = 1;
        for slot in 0..MAX_FILES {
            let entry = self.entry_words(slot);
            let (name, bytes) = (entry[0], entry[1]);
            if name == 0 {
                if entry.iter().any(|&word| word != 0) {
                    return Err(FsError::Corrupt);
                }
                continue;
            }
            if bytes > MAX_FILE_BYTES || !bytes.is_multiple_of(8) {
                return Err(FsError::Corrupt);
            }
            if (0..slot).any(|other| self.entry_words(other)[0] == name) {
                return Err(FsError::Corrupt);
            }
            let in_use = bytes.div_ceil(BLOCK_BYTES) as usize;
            for (index, &block) in entry[2..].iter().enumerate() {
                if index >= in_use {
                    if block != 0 {
                        return Err(FsError::Corrupt);
                    }
                    continue;
                }
                if block == 0 || block >= device_blocks {
                    return Err(FsError::Corrupt);
                }
                let (word, bit) = ((block / 64) as usize, block % 64);
                if used[word] & 1 << bit != 0 {
                    return Err(FsError::Corrupt);
                }
                used[word] |= 1 << bit;
            }
        }
        if used[..] != words[BITMAP..BITMAP + BITMAP_WORDS] {
            return Err(FsError::Corrupt);
        }
        Ok(())
    }

    fn entry_words(&self, slot: usize) -> &[u64] {
        let first = DIRECTORY + slot * ENTRY_WORDS;
        &self.0[first..first + ENTRY_WORDS]
    }

    fn entry(&self, slot: usize) -> Option<File> {
        let entry = self.entry_words(slot);
        (entry[0] != 0).then(|| File {
            name: entry[0],
            bytes: entry[1],
            blocks: core::array::from_fn(|index| entry[2 + index]),
        })
    }

    fn find(&self, name: u64) -> Option<(usize, File)> {
        (0..MAX_FILES).find_map(|slot| {
            self.entry(slot)
                .filter(|file| file.name == name)
                .map(|file| (slot, file))
        })
    }

    fn set_entry(&mut self, slot: usize, file: Option<&File>) {
        let first = DIRECTORY + slot * ENTRY_WORDS;
        let entry = &mut self.0[first..first + ENTRY_WORDS];
        entry.fill(0);
        if let Some(file) = file {
            entry[0] = file.name;
            entry[1] = file.bytes;
            entry[2..].copy_from_slice(&file.blocks);
        }
    }

    fn set_used(&mut self, block: u64, used: bool) {
        let word = &mut self.0[BITMAP + (block / 64) as usize];
        if used {
            *word |= 1 << (block % 64);
        } else {
            *word &= !(1 << (block % 64));
        }
    }

    fn is_used(&self, block: u64) -> bool {
        self.0[BITMAP + (block / 64) as usize] & 1 << (block % 64) != 0
    }
}

fn check_name(name: u64) -> Result<(), FsError> {
    if name == 0 {
        Err(FsError::BadName)
    } else {
        Ok(())
    }
}

/// Writes an empty file system onto `dev` (only block 0 is written).
pub fn format<D: BlockDevice + ?Sized>(dev: &mut D) -> Result<(), FsError> {
    let blocks = dev.blocks();
    if blocks > MAX_BLOCKS {
        return Err(FsError::TooBig);
    }
    if blocks < 2 {
        return Err(FsError::NoSpace);
    }
    let mut superblock = Superblock([0; BLOCK_WORDS]);
    superblock.0[MAGIC_WORD] = MAGIC;
    superblock.0[BLOCKS_WORD] = blocks;
    superblock.set_used(0, true);
    superblock.store(dev)
}

/// Creates file `name` of `bytes` bytes, taking the lowest free blocks; its contents are
/// whatever the blocks held until written.
pub fn create<D: BlockDevice + ?Sized>(
    dev: &mut D,
    name: u64,
    bytes: u64,
) -> Result<File, FsError> {
    check_name(name)?;
    if bytes > MAX_FILE_BYTES {
        return Err(FsError::TooBig);
    }
    if !bytes.is_multiple_of(8) {
        return Err(FsError::Unaligned);
    }
    let mut superblock = Superblock::load(dev)?;
    if superblock.find(name).is_some() {
        return Err(FsError::Exists);
    }
    let slot = (0..MAX_FILES)
        .find(|&slot| superblock.entry(slot).is_none())
        .ok_or(FsError::NoSpace)?;
    let mut file = File {
        name,
        bytes,
        blocks: [0; FILE_BLOCKS],
    };
    let mut free = (1..dev.blocks()).filter(|&block| !superblock.is_used(block));
    for index in 0..file.block_count() as usize {
        file.blocks[index] = free.next().ok_or(FsError::NoSpace)?;
    }
    for index in 0..file.block_count() {
        superblock.set_used(file.blocks[index as usize], true);
    }
    superblock.set_entry(slot, Some(&file));
    superblock.store(dev)?;
    Ok(file)
}

/// Looks file `name` up.
pub fn open<D: BlockDevice + ?Sized>(dev: &mut D, name: u64) -> Result<File, FsError> {
    check_name(name)?;
    let superblock = Superblock::load(dev)?;
    superblock
        .find(name)
        .map(|(_, file)| file)
        .ok_or(FsError::NotFound)
}

/// Removes file `name`, freeing its blocks.
pub fn remove<D: BlockDevice + ?Sized>(dev: &mut D, name: u64) -> Result<(), FsError> {
    check_name(name)?;
    let mut superblock = Superblock::load(dev)?;
    let (slot, file) = superblock.find(name).ok_or(FsError::NotFound)?;
    for index in 0..file.block_count() {
        superblock.set_used(file.blocks[index as usize], false);
    }
    superblock.set_entry(slot, None);
    superblock.store(dev)
}

/// Creates `destination` with the size and contents of `source`, block by block.
pub fn copy<D: BlockDevice + ?Sized>(
    dev: &mut D,
    source: u64,
    destination: u64,
) -> Result<File, FsError> {
    let from = open(dev, source)?;
    let to = create(dev, destination, from.bytes)?;
    let mut data = [0; BLOCK_WORDS];
    for index in 0..from.block_count() {
        from.read_block(dev, index, &mut data)?;
        to.write_block(dev, index, &data)?;
    }
    Ok(to)
}

/// Calls `visit` with every file in directory order; returns how many there are.
pub fn list<D: BlockDevice + ?Sized>(
    dev: &mut D,
    mut visit: impl FnMut(&File),
) -> Result<u64, FsError> {
    let superblock = Superblock::load(dev)?;
    let mut count = 0;
    for file in (0..MAX_FILES).filter_map(|slot| superblock.entry(slot)) {
        visit(&file);
        count += 1;
    }
    Ok(count)
}

/// What [`run_workload`] observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadReport {
    /// Files created (copies included).
    pub files_created: u64,
    /// Device block writes (superblock included).
    pub blocks_written: u64,
    /// Device block reads (superblock included).
    pub blocks_read: u64,
    /// Words read back that differ from what was written, plus directory discrepancies.
    pub mismatches: u64,
    /// [`Checksum`] of every file word read back, in order, then the surviving directory
    /// entries' names and sizes.
    pub checksum: u64,
}

/// A file's expected contents: `pattern(seed, i)`, except words `patch_first..` (for
/// `patch_words` words), which are `pattern(patch_seed, i)`.
#[derive(Debug, Clone, Copy)]
struct Contents {
    words: u64,
    seed: u64,
    patch_seed: u64,
    patch_first: u64,
    patch_words: u64,
}

impl Contents {
    fn plain(words: u64, seed: u64) -> Contents {
        Contents {
            words,
            seed,
            patch_seed: 0,
            patch_first: 0,
            patch_words: 0,
        }
    }

    fn word(&self, index: u64) -> u64 {
        if (self.patch_first..self.patch_first + self.patch_words).contains(&index) {
            pattern(self.patch_seed, index)
        } else {
            pattern(self.seed, index)
        }
    }
}

/// Files each round creates (then one copy of the first).
const ROUND_FILES: usize = 3;
/// Smallest and largest generated file, in words (3.5 KiB and 24 KiB): the most blocks live at
/// once are the previous round's survivor, three new files and a copy, 5 * 6 = 30 of 31.
const MIN_WORDS: u64 = 448;
const MAX_WORDS: u64 = 6 * 512;

/// One round: files `names[0..3]` with `contents`, `names[3]` a copy of the first, and the
/// patch applied to the second, which survives into the next round.
struct RoundPlan {
    names: [u64; ROUND_FILES + 1],
    contents: [Contents; ROUND_FILES],
    patched: Contents,
}

fn plan(round: u64) -> RoundPlan {
    let names = core::array::from_fn(|index| {
        u64::from_le_bytes(*b"file\0\0\0\0") | round << 40 | (index as u64) << 32
    });
    let contents = core::array::from_fn(|index| {
        let seed = 0x1000 + round * 8 + index as u64;
        let words = MIN_WORDS + pattern(seed, u64::MAX) % (MAX_WORDS - MIN_WORDS + 1);
        Contents::plain(words, seed)
    });
    let target: Contents = contents[1];
    let patch_seed = 0x1000 + round * 8 + 7;
    let patch_first = pattern(patch_seed, u64::MAX) % target.words;
    let patch_words =
        (1 + pattern(patch_seed, u64::MAX - 1) % 1024).min(target.words - patch_first);
    RoundPlan {
        names,
        contents,
        patched: Contents {
            patch_seed,
            patch_first,
            patch_words,
            ..target
        },
    }
}

/// A device wrapper counting reads and writes.
struct Counting<'a, D: ?Sized> {
    dev: &'a mut D,
    reads: u64,
    writes: u64,
}

impl<D: BlockDevice + ?Sized> BlockDevice for Counting<'_, D> {
    fn read_block(&mut self, block: u64, data: &mut Block) -> Result<(), i64> {
        self.reads += 1;
        self.dev.read_block(block, data)
    }

    fn write_block(&mut self, block: u64, data: &Block) -> Result<(), i64> {
        self.writes += 1;
        self.dev.write_block(block, data)
    }

    fn blocks(&self) -> u64 {
        self.dev.blocks()
    }
}

/// Reads file `name` back block by block, folding every word into `sum` and counting words
/// that differ from `expected` (and a size that differs, as one more mismatch).
fn verify<D: BlockDevice + ?Sized>(
    dev: &mut D,
    name: u64,
    expected: &Contents,
    sum: &mut Checksum,
    mismatches: &mut u64,
) -> Result<(), FsError> {
    let file = open(dev, name)?;
    if file.words() != expected.words {
        *mismatches += 1;
    }
    let mut data = [0; BLOCK_WORDS];
    for index in 0..file.block_count() {
        let valid = file.read_block(dev, index, &mut data)?;
        for (offset, &word) in (0..valid).zip(data.iter()) {
            let at = index * BLOCK_WORDS as u64 + offset;
            sum.add(word);
            if at >= expected.words || word != expected.word(at) {
                *mismatches += 1;
            }
        }
    }
    Ok(())
}

/// Formats `dev` and runs `rounds` rounds. Each round creates three files of 3.5 to 24 KiB
/// with seeded sizes and contents, copies the first, reads all four back, patches a range of
/// the second and reads it again, then removes all but that second file and the previous
/// round's survivor. At the end the directory must hold exactly the last survivor, which is
/// read back once more.
pub fn run_workload<D: BlockDevice + ?Sized>(
    dev: &mut D,
    rounds: u64,
) -> Result<WorkloadReport, FsError> {
    let mut dev = Counting {
        dev,
        reads: 0,
        writes: 0,
    };
    let dev = &mut dev;
    format(dev)?;
    let (mut sum, mut mismatches, mut files_created) = (Checksum::new(), 0, 0);
    let mut survivor: Option<(u64, Contents)> = None;
    for round in 0..rounds {
        let plan = plan(round);
        for (&name, contents) in plan.names.iter().zip(&plan.contents) {
            let file = create(dev, name, contents.words * 8)?;
            file.write_with(dev, 0, contents.words, |index| contents.word(index))?;
        }
        copy(dev, plan.names[0], plan.names[ROUND_FILES])?;
        files_created += ROUND_FILES as u64 + 1;
        for (&name, contents) in plan
            .names
            .iter()
            .zip(plan.contents.iter().chain([&plan.contents[0]]))
        {
            verify(dev, name, contents, &mut sum, &mut mismatches)?;
        }
        let patched = &plan.patched;
        let second = open(dev, plan.names[1])?;
        second.write_with(dev, patched.patch_first, patched.patch_words, |index| {
            patched.word(index)
        })?;
        verify(dev, plan.names[1], patched, &mut sum, &mut mismatches)?;
        if let Some((name, _)) = survivor {
            remove(dev, name)?;
        }
        for index in [0, 2, ROUND_FILES] {
            remove(dev, plan.names[index])?;
        }
        survivor = Some((plan.names[1], *patched));
    }
    let mut found_survivor = false;
    list(dev, |file| match survivor {
        Some((name, contents)) if file.name == name && file.words() == contents.words => {
            found_survivor = true;
            sum.add(file.name);
            sum.add(file.bytes);
        }
        _ => mismatches += 1,
    })?;
    if let Some((name, contents)) = survivor {
        if found_survivor {
            verify(dev, name, &contents, &mut sum, &mut mismatches)?;
        } else {
            mismatches += 1;
        }
    }
    Ok(WorkloadReport {
        files_created,
        blocks_written: dev.writes,
        blocks_read: dev.reads,
        mismatches,
        checksum: sum.0,
    })
}

/// The checksum a correct [`run_workload`] of `rounds` rounds reports, from the plan alone.
pub fn golden(rounds: u64) -> u64 {
    let mut sum = Checksum::new();
    let fold = |sum: &mut Checksum, contents: &Contents| {
        (0..contents.words).for_each(|index| sum.add(contents.word(index)));
    };
    let mut survivor = None;
    for round in 0..rounds {
        let plan = plan(round);
        for contents in plan.contents.iter().chain([&plan.contents[0]]) {
            fold(&mut sum, contents);
        }
        fold(&mut sum, &plan.patched);
        survivor = Some((plan.names[1], plan.patched));
    }
    if let Some((name, contents)) = survivor {
        sum.add(name);
        sum.add(contents.words * 8);
        fold(&mut sum, &contents);
    }
    sum.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A RAM disk of up to 64 blocks, with faults to inject.
    struct RamDisk {
        data: [Block; 64],
        blocks: u64,
        /// Flip the low bit of this word of this block on every read of it.
        flip_on_read: Option<(u64, usize)>,
        /// Fail reads of this block with this status.
        fail_read: Option<(u64, i64)>,
    }

    impl RamDisk {
        fn new(blocks: u64) -> RamDisk {
            RamDisk {
                data: [[0xdead_beef; BLOCK_WORDS]; 64],
                blocks,
                flip_on_read: None,
                fail_read: None,
            }
        }
    }

    impl BlockDevice for RamDisk {
        fn read_block(&mut self, block: u64, data: &mut Block) -> Result<(), i64> {
            assert!(block < self.blocks, "read past the end");
            if let Some((bad, status)) = self.fail_read
                && bad == block
            {
                return Err(status);
            }
            *data = self.data[block as usize];
            if let Some((bad, word)) = self.flip_on_read
                && bad == block
            {
                data[word] ^= 1;
            }
            Ok(())
        }

        fn write_block(&mut self, block: u64, data: &Block) -> Result<(), i64> {
            assert!(block < self.blocks, "write past the end");
            self.data[block as usize] = *data;
            Ok(())
        }

        fn blocks(&self) -> u64 {
            self.blocks
        }
    }

    fn formatted() -> RamDisk {
        let mut disk = RamDisk::new(DISK_BLOCKS);
        format(&mut disk).unwrap();
        disk
    }

    fn read_word(disk: &mut RamDisk, name: u64, index: u64) -> u64 {
        let file = open(disk, name).unwrap();
        let mut data = [0; BLOCK_WORDS];
        file.read_block(disk, index / 512, &mut data).unwrap();
        data[(index % 512) as usize]
    }

    #[test]
    fn files_are_created_found_and_removed() {
        let mut disk = formatted();
        let file = create(&mut disk, 7, 3 * 4096 + 8).unwrap();
        assert_eq!(
            (file.name(), file.bytes(), file.words(), file.block_count()),
            (7, 12296, 1537, 4)
        );
        assert_eq!(open(&mut disk, 7), Ok(file));
        assert_eq!(create(&mut disk, 7, 8), Err(FsError::Exists));
        assert_eq!(open(&mut disk, 8), Err(FsError::NotFound));
        assert_eq!(remove(&mut disk, 8), Err(FsError::NotFound));
        remove(&mut disk, 7).unwrap();
        assert_eq!(open(&mut disk, 7), Err(FsError::NotFound));
        assert_eq!(list(&mut disk, |_| panic!("not empty")), Ok(0));
    }

    #[test]
    fn bad_arguments_are_refused() {
        let mut disk = formatted();
        assert_eq!(create(&mut disk, 0, 8), Err(FsError::BadName));
        assert_eq!(
            create(&mut disk, 1, MAX_FILE_BYTES + 8),
            Err(FsError::TooBig)
        );
        assert_eq!(create(&mut disk, 1, 12), Err(FsError::Unaligned));
        let file = create(&mut disk, 1, 4096 + 8).unwrap();
        let mut data = [0; BLOCK_WORDS];
        assert_eq!(
            file.read_block(&mut disk, 2, &mut data),
            Err(FsError::OutOfRange)
        );
        assert_eq!(
            file.write_with(&mut disk, 500, 14, |_| 0),
            Err(FsError::OutOfRange)
        );
        assert_eq!(
            file.write_with(&mut disk, u64::MAX, 2, |_| 0),
            Err(FsError::OutOfRange)
        );
        assert_eq!(format(&mut RamDisk::new(1)), Err(FsError::NoSpace));
    }

    #[test]
    fn space_runs_out_and_comes_back() {
        let mut disk = formatted();
        // 31 data blocks: three full-size files fit, a fourth does not.
        for name in 1..=3 {
            create(&mut disk, name, MAX_FILE_BYTES).unwrap();
        }
        assert_eq!(create(&mut disk, 4, MAX_FILE_BYTES), Err(FsError::NoSpace));
        create(&mut disk, 4, 7 * 4096).unwrap();
        assert_eq!(create(&mut disk, 5, 8), Err(FsError::NoSpace));
        remove(&mut disk, 2).unwrap();
        create(&mut disk, 5, MAX_FILE_BYTES).unwrap();
        // Directory entries run out too.
        let mut disk = formatted();
        for name in 1..=MAX_FILES as u64 {
            create(&mut disk, name, 0).unwrap();
        }
        assert_eq!(create(&mut disk, 99, 0), Err(FsError::NoSpace));
    }

    #[test]
    fn partial_writes_keep_the_neighbouring_words() {
        let mut disk = formatted();
        let file = create(&mut disk, 1, 3 * 4096).unwrap();
        file.write_with(&mut disk, 0, file.words(), |index| index)
            .unwrap();
        file.write_with(&mut disk, 500, 600, |index| index + 1_000_000)
            .unwrap();
        for (index, expected) in [
            (0, 0),
            (499, 499),
            (500, 1_000_500),
            (1099, 1_001_099),
            (1100, 1100),
            (1535, 1535),
        ] {
            assert_eq!(read_word(&mut disk, 1, index), expected, "word {index}");
        }
    }

    #[test]
    fn a_copy_has_the_same_contents_in_other_blocks() {
        let mut disk = formatted();
        let source = create(&mut disk, 1, 2 * 4096 + 16).unwrap();
        source
            .write_with(&mut disk, 0, source.words(), |index| pattern(5, index))
            .unwrap();
        let copied = copy(&mut disk, 1, 2).unwrap();
        assert_eq!(copied.bytes(), source.bytes());
        source
            .write_with(&mut disk, 0, source.words(), |_| 0)
            .unwrap();
        for index in 0..copied.words() {
            assert_eq!(read_word(&mut disk, 2, index), pattern(5, index));
        }
        assert_eq!(copy(&mut disk, 3, 4), Err(FsError::NotFound));
        assert_eq!(copy(&mut disk, 1, 2), Err(FsError::Exists));
    }

    #[test]
    fn a_damaged_superblock_is_corrupt() {
        let damages: [fn(&mut Block); 6] = [
            |words| words[MAGIC_WORD] ^= 1,
            |words| words[BLOCKS_WORD] = 64,
            |words| words[3] = 1,                           // reserved word
            |words| words[BITMAP] &= !2,                    // a used block marked free
            |words| words[DIRECTORY + ENTRY_WORDS + 2] = 1, // second file shares block 1
            |words| words[DIRECTORY + 2 * ENTRY_WORDS] = 1, // a free entry named like the first
        ];
        for damage in damages {
            let mut disk = formatted();
            create(&mut disk, 1, 4096).unwrap();
            create(&mut disk, 2, 4096).unwrap();
            damage(&mut disk.data[0]);
            assert_eq!(open(&mut disk, 1), Err(FsError::Corrupt));
            assert_eq!(create(&mut disk, 3, 8), Err(FsError::Corrupt));
        }
        assert_eq!(
            open(&mut RamDisk::new(DISK_BLOCKS), 1),
            Err(FsError::Corrupt)
        );
    }

    #[test]
    fn device_errors_are_passed_on() {
        let mut disk = formatted();
        disk.fail_read = Some((0, -5));
        assert_eq!(open(&mut disk, 1), Err(FsError::Device(-5)));
    }

    #[test]
    fn the_workload_on_a_ram_disk_matches_golden() {
        for rounds in [0, 1, 2, 12] {
            let mut disk = RamDisk::new(DISK_BLOCKS);
            let report = run_workload(&mut disk, rounds).unwrap();
            assert_eq!(report.mismatches, 0, "{rounds} rounds");
            assert_eq!(report.checksum, golden(rounds), "{rounds} rounds");
            assert_eq!(report.files_created, 4 * rounds);
            // At least every data block written once and read back once.
            assert!(report.blocks_written > 4 * rounds);
            assert!(report.blocks_read >= 5 * rounds);
        }
        assert_ne!(golden(3), golden(4));
    }

    #[test]
    fn the_plan_fits_the_disk_and_varies() {
        let mut largest = 0;
        let mut sizes = [false; 7];
        for round in 0..200 {
            let plan = plan(round);
            let blocks: [u64; ROUND_FILES] =
                core::array::from_fn(|index| plan.contents[index].words.div_ceil(512));
            largest = largest.max(blocks.iter().max().copied().unwrap());
            blocks
                .iter()
                .for_each(|&count| sizes[count as usize] = true);
            assert!(plan.patched.patch_words > 0);
            assert!(plan.patched.patch_first + plan.patched.patch_words <= plan.patched.words);
        }
        // The survivor, three files and a copy fit in the data blocks.
        assert!(5 * largest < DISK_BLOCKS);
        assert_eq!(sizes, [false, true, true, true, true, true, true]);
    }

    #[test]
    fn a_corrupted_data_block_is_detected() {
        let mut disk = RamDisk::new(DISK_BLOCKS);
        disk.flip_on_read = Some((2, 17));
        let report = run_workload(&mut disk, 3).unwrap();
        assert!(report.mismatches > 0);
        assert_ne!(report.checksum, golden(3));
    }

    #[test]
    fn a_corrupted_superblock_stops_the_workload() {
        let mut disk = RamDisk::new(DISK_BLOCKS);
        disk.flip_on_read = Some((0, BITMAP));
        assert_eq!(run_workload(&mut disk, 1), Err(FsError::Corrupt));
    }
}
