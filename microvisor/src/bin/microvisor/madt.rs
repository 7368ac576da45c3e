//! Finding the CPUs: the ACPI MADT, read with the `acpi` crate through the direct map.

use acpi::madt::{Madt, MadtEntry};
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
use core::ptr::NonNull;

use crate::bootinfo::AcpiRoot;
use crate::cpu::MAX_CPUS;
use crate::paging;

/// Gives the `acpi` crate access to physical memory through the direct map.
#[derive(Clone, Copy, Debug)]
struct DirectMap;

impl AcpiHandler for DirectMap {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> PhysicalMapping<Self, T> {
        let virt = paging::phys_to_virt(physical_address as u64).as_mut_ptr::<T>();
        // SAFETY: the direct map covers all physical memory the firmware tables can live in;
        // the mapping is never unmapped, so it outlives the `PhysicalMapping`.
        unsafe {
            PhysicalMapping::new(
                physical_address,
                NonNull::new(virt).expect("direct map is never null"),
                size,
                size,
                *self,
            )
        }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// The processors the MADT lists as enabled, in table order.
pub struct Processors {
    apic_ids: [u32; MAX_CPUS],
    count: usize,
    /// Enabled processors beyond [`MAX_CPUS`], which the core will not start.
    pub ignored: usize,
}

impl Processors {
    /// Local APIC IDs of the enabled processors.
    pub fn apic_ids(&self) -> &[u32] {
        &self.apic_ids[..self.count]
    }
}

/// Why the processors could not be found.
#[derive(Debug)]
pub enum MadtError {
    /// The ACPI tables could not be read.
    Acpi(acpi::AcpiError),
}

impl core::fmt::Display for MadtError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Acpi(error) => write!(f, "ACPI tables: {error:?}"),
        }
    }
}

/// Reads the MADT.
pub fn processors(root: AcpiRoot) -> Result<Processors, MadtError> {
    // SAFETY: the addresses come from the boot loader or from the BIOS search, and the
    // handler maps any physical address through the direct map.
    let tables = unsafe {
        match root {
            AcpiRoot::Rsdp(address) => AcpiTables::from_rsdp(DirectMap, address as usize),
            AcpiRoot::RootTable { revision, address } => {
                AcpiTables::from_rsdt(DirectMap, revision, address as usize)
            }
            AcpiRoot::Search => AcpiTables::search_for_rsdp_bios(DirectMap),
        }
    }
    .map_err(MadtError::Acpi)?;
    let madt = tables.find_table::<Madt>().map_err(MadtError::Acpi)?;
    let mut processors = Processors {
        apic_ids: [0; MAX_CPUS],
        count: 0,
        ignored: 0,
    };
    for entry in madt.get().entries() {
        let (apic_id, flags) = match entry {
            MadtEntry::LocalApic(entry) => (u32::from(entry.apic_id), entry.flags),
            MadtEntry::LocalX2Apic(entry) => (entry.x2apic_id, entry.flags),
            _ => continue,
        };
        // Bit 0: enabled. (Bit 1, online-capable, marks CPUs that could be hot-added; they
        // are not running and are not counted.)
        if flags & 1 == 0 {
            continue;
        }
        if processors.count < MAX_CPUS {
            processors.apic_ids[processors.count] = apic_id;
            processors.count += 1;
        } else {
            processors.ignored += 1;
        }
    }
    Ok(processors)
}
