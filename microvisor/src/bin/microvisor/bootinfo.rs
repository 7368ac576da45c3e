//! Reading what the boot loader handed over (multiboot2 from GRUB, or PVH `hvm_start_info`
//! from QEMU) and copying it into the core's own memory.
//!
//! The loader may place its structures anywhere in RAM, even inside ranges the memory map
//! calls usable, so everything the core needs is copied out here, before a single frame is
//! handed out. Runs on the boot stub's identity map.

use microvisor::memmap::{PhysRange, RegionKind};
use multiboot2::{BootInformation, BootInformationHeader, MemoryAreaType};

use crate::boot::{PROTOCOL_MULTIBOOT2, PROTOCOL_PVH};

/// Most firmware memory-map entries kept.
pub const MAX_REGIONS: usize = 128;
/// Longest command line kept (longer ones are cut, and a warning says so).
const MAX_CMDLINE: usize = 512;

/// How to find the ACPI tables.
#[derive(Clone, Copy, Debug)]
pub enum AcpiRoot {
    /// Physical address of the RSDP structure.
    Rsdp(u64),
    /// The loader copied the RSDP for us: RSDT (revision 0) or XSDT (revision 2) address.
    RootTable {
        /// ACPI revision from the RSDP.
        revision: u8,
        /// Physical address of the RSDT or XSDT.
        address: u64,
    },
    /// Nothing handed over: search the BIOS areas.
    Search,
}

/// The boot information, copied out of loader memory.
pub struct BootInfo {
    /// `multiboot2` or `pvh`.
    pub protocol: &'static str,
    regions: [(PhysRange, RegionKind); MAX_REGIONS],
    region_count: usize,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    /// Whether the command line was longer than what was kept.
    pub cmdline_truncated: bool,
    /// Where the ACPI tables are.
    pub acpi: AcpiRoot,
    /// Boot modules: they must not be handed out as free memory.
    modules: [PhysRange; 16],
    module_count: usize,
}

/// Why the boot information could not be used.
#[derive(Debug)]
pub enum BootInfoError {
    /// The loader's magic value was not one the core knows.
    UnknownProtocol,
    /// The multiboot2 structure did not parse.
    Multiboot2(multiboot2::LoadError),
    /// `hvm_start_info` had the wrong magic.
    PvhMagic(u32),
    /// The loader gave no memory map.
    NoMemoryMap,
}

impl core::fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::UnknownProtocol => {
                f.write_str("entered without the multiboot2 magic or a PVH start info")
            }
            Self::Multiboot2(error) => {
                write!(f, "multiboot2 information does not parse: {error:?}")
            }
            Self::PvhMagic(magic) => write!(
                f,
                "hvm_start_info magic is {magic:#x}, expected {HVM_START_MAGIC:#x}"
            ),
            Self::NoMemoryMap => f.write_str("the boot loader gave no memory map"),
        }
    }
}

impl BootInfo {
    /// The firmware memory map.
    pub fn regions(&self) -> &[(PhysRange, RegionKind)] {
        &self.regions[..self.region_count]
    }

    /// The kernel command line (empty if none, or not UTF-8).
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    /// Ranges the boot modules occupy.
    pub fn modules(&self) -> &[PhysRange] {
        &self.modules[..self.module_count]
    }

    fn empty(protocol: &'static str) -> Self {
        Self {
            protocol,
            regions: [(PhysRange { start: 0, end: 0 }, RegionKind::Reserved); MAX_REGIONS],
            region_count: 0,
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
            cmdline_truncated: false,
            acpi: AcpiRoot::Search,
            modules: [PhysRange { start: 0, end: 0 }; 16],
            module_count: 0,
        }
    }

    fn push_region(&mut self, range: PhysRange, kind: RegionKind) {
        if self.region_count < MAX_REGIONS {
            self.regions[self.region_count] = (range, kind);
            self.region_count += 1;
        } else {
            log::warn!("memory map has more than {MAX_REGIONS} entries; ignoring {range:x?}");
        }
    }

    fn push_module(&mut self, range: PhysRange) {
        if self.module_count < self.modules.len() {
            self.modules[self.module_count] = range;
            self.module_count += 1;
        } else {
            log::warn!(
                "more than {} boot modules; ignoring {range:x?}",
                self.modules.len()
            );
        }
    }

    fn set_cmdline(&mut self, bytes: &[u8]) {
        let len = bytes.len().min(MAX_CMDLINE);
        self.cmdline[..len].copy_from_slice(&bytes[..len]);
        self.cmdline_len = len;
        self.cmdline_truncated = bytes.len() > MAX_CMDLINE;
    }
}

/// Parses the boot information at physical address `info` given by protocol `protocol`.
pub fn parse(info: u64, protocol: u64) -> Result<BootInfo, BootInfoError> {
    match protocol {
        PROTOCOL_MULTIBOOT2 => parse_multiboot2(info),
        PROTOCOL_PVH => parse_pvh(info),
        _ => Err(BootInfoError::UnknownProtocol),
    }
}

fn parse_multiboot2(info: u64) -> Result<BootInfo, BootInfoError> {
    // SAFETY: GRUB passed this pointer with the multiboot2 magic; it is identity-mapped by the
    // boot tables and nothing has been allocated over it yet.
    let mbi = unsafe { BootInformation::load(info as *const BootInformationHeader) }
        .map_err(BootInfoError::Multiboot2)?;
    let mut boot = BootInfo::empty("multiboot2");
    let map = mbi.memory_map_tag().ok_or(BootInfoError::NoMemoryMap)?;
    for area in map.memory_areas() {
        let kind = match MemoryAreaType::from(area.typ()) {
            MemoryAreaType::Available => RegionKind::Usable,
            MemoryAreaType::AcpiAvailable => RegionKind::AcpiReclaimable,
            MemoryAreaType::ReservedHibernate => RegionKind::AcpiNvs,
            MemoryAreaType::Defective => RegionKind::Defective,
            _ => RegionKind::Reserved,
        };
        boot.push_region(
            PhysRange::from_base_len(area.start_address(), area.size()),
            kind,
        );
    }
    if let Some(tag) = mbi.command_line_tag() {
        boot.set_cmdline(tag.cmdline().unwrap_or("").as_bytes());
    }
    if let Some(tag) = mbi.rsdp_v2_tag() {
        boot.acpi = AcpiRoot::RootTable {
            revision: tag.revision(),
            address: tag.xsdt_address() as u64,
        };
    } else if let Some(tag) = mbi.rsdp_v1_tag() {
        boot.acpi = AcpiRoot::RootTable {
            revision: 0,
            address: u64::from(tag.rsdt_address() as u32),
        };
    }
    for module in mbi.module_tags() {
        boot.push_module(PhysRange {
            start: module.start_address().into(),
            end: module.end_address().into(),
        });
    }
    Ok(boot)
}

/// `hvm_start_info` (Xen `arch-x86/hvm/start_info.h`), version 1.
#[repr(C)]
#[derive(Clone, Copy)]
struct HvmStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct HvmMemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct HvmModlistEntry {
    paddr: u64,
    size: u64,
    cmdline_paddr: u64,
    reserved: u64,
}

const HVM_START_MAGIC: u32 = 0x336e_c578;

/// Reads a `T` at physical address `phys` through the boot identity map.
///
/// # Safety
/// `phys..phys + size_of::<T>()` must be readable memory below 4 GiB, and any bit pattern
/// must be a valid `T`.
unsafe fn read_phys<T: Copy>(phys: u64) -> T {
    // SAFETY: per the caller's contract; unaligned reads are allowed for loader structures.
    unsafe { (phys as *const T).read_unaligned() }
}

fn parse_pvh(info: u64) -> Result<BootInfo, BootInfoError> {
    // SAFETY: the PVH loader passed this address in EBX; plain integer fields.
    let start: HvmStartInfo = unsafe { read_phys(info) };
    if start.magic != HVM_START_MAGIC {
        return Err(BootInfoError::PvhMagic(start.magic));
    }
    let mut boot = BootInfo::empty("pvh");
    if start.version < 1 || start.memmap_entries == 0 {
        return Err(BootInfoError::NoMemoryMap);
    }
    for index in 0..u64::from(start.memmap_entries) {
        // SAFETY: the loader promises `memmap_entries` entries at `memmap_paddr`.
        let entry: HvmMemmapEntry = unsafe { read_phys(start.memmap_paddr + index * 24) };
        // E820 types: 1 RAM, 3 ACPI reclaimable, 4 ACPI NVS, 5 unusable.
        let kind = match entry.kind {
            1 => RegionKind::Usable,
            3 => RegionKind::AcpiReclaimable,
            4 => RegionKind::AcpiNvs,
            5 => RegionKind::Defective,
            _ => RegionKind::Reserved,
        };
        boot.push_region(PhysRange::from_base_len(entry.addr, entry.size), kind);
    }
    if start.cmdline_paddr != 0 {
        let mut bytes = [0u8; MAX_CMDLINE + 1];
        let mut len = 0;
        while len < bytes.len() {
            // SAFETY: a NUL-terminated string the loader placed at `cmdline_paddr`.
            let byte: u8 = unsafe { read_phys(start.cmdline_paddr + len as u64) };
            if byte == 0 {
                break;
            }
            bytes[len] = byte;
            len += 1;
        }
        boot.set_cmdline(&bytes[..len]);
    }
    boot.acpi = match start.rsdp_paddr {
        0 => AcpiRoot::Search,
        address => AcpiRoot::Rsdp(address),
    };
    for index in 0..u64::from(start.nr_modules) {
        // SAFETY: the loader promises `nr_modules` entries at `modlist_paddr`.
        let module: HvmModlistEntry = unsafe { read_phys(start.modlist_paddr + index * 32) };
        boot.push_module(PhysRange::from_base_len(module.paddr, module.size));
    }
    Ok(boot)
}
