//! Physical memory and the core's page tables.
//!
//! The core replaces the boot stub's tables with its own:
//! - a direct map of physical memory at [`PHYS_OFFSET`] (2 MiB pages, no-execute; the top
//!   32 MiB below 4 GiB, where the local APIC and I/O APIC live, uncached);
//! - the kernel image at `0xffffffff80000000 + physical`, mapped section by section in 4 KiB
//!   pages: text read-execute, rodata read-only, data and bss read-write, both no-execute
//!   (CR0.WP makes ring 0 honour read-only);
//! - stacks in their own region, each with an unmapped guard page below it, so an overflow
//!   faults instead of corrupting a neighbour;
//! - during SMP bring-up only, an identity map of the first 2 MiB for the AP trampoline,
//!   removed by [`drop_identity_map`] once every CPU runs in the higher half.
//!
//! Physical frames come from a bitmap ([`microvisor::frames::FrameBitmap`]) built from the
//! normalised firmware memory map; it covers the first 16 GiB.

use core::sync::atomic::{AtomicU64, Ordering};
use microvisor::frames::FrameBitmap;
use microvisor::memmap::{PAGE_SIZE, PhysRange};
use spin::Mutex;
use x86_64::registers::control::{Cr3, Cr3Flags};
use x86_64::structures::paging::{
    FrameAllocator, Mapper, OffsetPageTable, Page, PageTable, PageTableFlags as Flags, PhysFrame,
    Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

/// Where the direct map of physical memory starts.
pub const PHYS_OFFSET: u64 = 0xffff_8000_0000_0000;
/// Where the kernel image is linked (plus its physical address).
pub const KERNEL_BASE: u64 = 0xffff_ffff_8000_0000;
/// Start of the stack region.
const STACKS_BASE: u64 = 0xffff_c000_0000_0000;
const GIB: u64 = 1 << 30;
const TWO_MIB: u64 = 2 << 20;
/// Physical addresses from here to 4 GiB are mapped uncached (APIC, I/O APIC, firmware).
const MMIO_UNCACHED_START: u64 = 0xfe00_0000;

/// 16 GiB / 4 KiB / 64 bits per word.
const BITMAP_WORDS: usize = (16 * GIB / PAGE_SIZE / 64) as usize;

static FRAMES: Mutex<FrameBitmap<BITMAP_WORDS>> = Mutex::new(FrameBitmap::new());
/// Virtual base through which physical memory is reached: 0 (the boot identity map) until
/// the core's tables are live, then [`PHYS_OFFSET`].
static PHYS_BASE: AtomicU64 = AtomicU64::new(0);
static PML4_PHYS: AtomicU64 = AtomicU64::new(0);
static NEXT_STACK: AtomicU64 = AtomicU64::new(STACKS_BASE);
static MAPPER_LOCK: Mutex<()> = Mutex::new(());

unsafe extern "C" {
    static __text_start: u8;
    static __text_end: u8;
    static __rodata_start: u8;
    static __rodata_end: u8;
    static __data_start: u8;
    static __data_end: u8;
    /// The lowest page of the bootstrap processor's stack (in .bss; see `boot.rs`).
    static bsp_stack_bottom: u8;
}

/// Where physical address `phys` can be reached right now.
pub fn phys_to_virt(phys: u64) -> VirtAddr {
    VirtAddr::new(PHYS_BASE.load(Ordering::Relaxed) + phys)
}

/// The frame source handed to the `x86_64` mapper.
pub struct Frames;

// SAFETY: every frame returned comes from the bitmap, which hands out each frame once.
unsafe impl FrameAllocator<Size4KiB> for Frames {
    fn allocate_frame(&mut self) -> Option<PhysFrame> {
        let address = FRAMES.lock().allocate()?;
        Some(PhysFrame::containing_address(PhysAddr::new(address)))
    }
}

/// Frees the usable ranges into the frame pool. Returns the bytes of usable memory above
/// what the pool covers.
pub fn add_usable_memory(ranges: &[PhysRange]) -> u64 {
    let mut frames = FRAMES.lock();
    ranges
        .iter()
        .map(|range| frames.add_free_range(*range))
        .sum()
}

/// Free frames in the pool.
pub fn free_frames() -> usize {
    FRAMES.lock().free_frames()
}

/// Allocates `count` contiguous zeroed frames and returns their direct-map address.
pub fn allocate_zeroed(count: u64) -> Option<VirtAddr> {
    let phys = FRAMES.lock().allocate_contiguous(count, PAGE_SIZE)?;
    let virt = phys_to_virt(phys);
    // SAFETY: the frames were free, so nothing else refers to them; the direct map (or the
    // boot identity map) covers them.
    unsafe { core::ptr::write_bytes(virt.as_mut_ptr::<u8>(), 0, (count * PAGE_SIZE) as usize) };
    Some(virt)
}

fn mapper() -> OffsetPageTable<'static> {
    let pml4 = phys_to_virt(PML4_PHYS.load(Ordering::Acquire));
    // SAFETY: PML4_PHYS holds the core's live top-level table, reachable at `pml4`, and every
    // caller holds MAPPER_LOCK so no two mappers alias it at once.
    unsafe {
        OffsetPageTable::new(
            &mut *pml4.as_mut_ptr::<PageTable>(),
            VirtAddr::new(PHYS_BASE.load(Ordering::Relaxed)),
        )
    }
}

/// Builds the core's page tables and switches to them. `highest_usable` is one past the
/// highest usable physical address.
pub fn init(highest_usable: u64) {
    let _guard = MAPPER_LOCK.lock();
    let pml4 = allocate_zeroed(1).expect("no frame for the PML4");
    let pml4_phys = pml4.as_u64() - PHYS_BASE.load(Ordering::Relaxed);
    PML4_PHYS.store(pml4_phys, Ordering::Release);
    // SAFETY: freshly allocated, zeroed, page-aligned frame.
    let pml4_table = unsafe { &mut *pml4.as_mut_ptr::<PageTable>() };

    // Direct map: one PD (1 GiB of 2 MiB pages) per GiB, at least 4 GiB so MMIO is covered.
    let gibs = highest_usable.div_ceil(GIB).clamp(4, 512);
    let pdpt = allocate_zeroed(1).expect("no frame for the direct-map PDPT");
    // SAFETY: as above.
    let pdpt_table = unsafe { &mut *pdpt.as_mut_ptr::<PageTable>() };
    let table_flags = Flags::PRESENT | Flags::WRITABLE;
    for gib in 0..gibs {
        let pd = allocate_zeroed(1).expect("no frame for a direct-map PD");
        // SAFETY: as above.
        let pd_table = unsafe { &mut *pd.as_mut_ptr::<PageTable>() };
        for (index, entry) in pd_table.iter_mut().enumerate() {
            let phys = gib * GIB + index as u64 * TWO_MIB;
            let mut flags = Flags::PRESENT | Flags::WRITABLE | Flags::HUGE_PAGE | Flags::NO_EXECUTE;
            if (MMIO_UNCACHED_START..4 * GIB).contains(&phys) {
                flags |= Flags::NO_CACHE | Flags::WRITE_THROUGH;
            }
            entry.set_addr(PhysAddr::new(phys), flags);
        }
        let pd_phys = pd.as_u64() - PHYS_BASE.load(Ordering::Relaxed);
        pdpt_table[gib as usize].set_addr(PhysAddr::new(pd_phys), table_flags);
    }
    let pdpt_phys = PhysAddr::new(pdpt.as_u64() - PHYS_BASE.load(Ordering::Relaxed));
    let direct_index = ((PHYS_OFFSET >> 39) & 511) as usize;
    pml4_table[direct_index].set_addr(pdpt_phys, table_flags);
    // Identity map of the first 2 MiB, executable, for the AP trampoline (see smp).
    let identity_pdpt = allocate_zeroed(1).expect("no frame for the identity PDPT");
    let identity_pd = allocate_zeroed(1).expect("no frame for the identity PD");
    // SAFETY: freshly allocated, zeroed, page-aligned frames.
    unsafe {
        (&mut *identity_pd.as_mut_ptr::<PageTable>())[0].set_addr(
            PhysAddr::new(0),
            Flags::PRESENT | Flags::WRITABLE | Flags::HUGE_PAGE,
        );
        (&mut *identity_pdpt.as_mut_ptr::<PageTable>())[0].set_addr(
            PhysAddr::new(identity_pd.as_u64() - PHYS_BASE.load(Ordering::Relaxed)),
            table_flags,
        );
    }
    pml4_table[0].set_addr(
        PhysAddr::new(identity_pdpt.as_u64() - PHYS_BASE.load(Ordering::Relaxed)),
        table_flags,
    );

    // The kernel image, section by section.
    let mut mapper = mapper();
    let sections = [
        (
            &raw const __text_start as u64,
            &raw const __text_end as u64,
            Flags::PRESENT,
        ),
        (
            &raw const __rodata_start as u64,
            &raw const __rodata_end as u64,
            Flags::PRESENT | Flags::NO_EXECUTE,
        ),
        (
            &raw const __data_start as u64,
            &raw const __data_end as u64,
            Flags::PRESENT | Flags::WRITABLE | Flags::NO_EXECUTE,
        ),
    ];
    // The BSP's stack lies in .bss right above the core's statics: its lowest page stays
    // unmapped, a guard, so an overflow faults instead of overwriting them.
    let bsp_guard = &raw const bsp_stack_bottom as u64;
    for (start, end, flags) in sections {
        for virt in (start..end)
            .step_by(PAGE_SIZE as usize)
            .filter(|&virt| virt != bsp_guard)
        {
            let page = Page::<Size4KiB>::containing_address(VirtAddr::new(virt));
            let frame = PhysFrame::containing_address(PhysAddr::new(virt - KERNEL_BASE));
            // SAFETY: maps the image's own pages to their load addresses, in new tables
            // nobody uses yet.
            unsafe { mapper.map_to(page, frame, flags, &mut Frames) }
                .expect("mapping the kernel image failed")
                .ignore();
        }
    }

    // SAFETY: the new tables map everything the core touches from here on: its image (text,
    // stack in .bss, statics) and all physical memory at PHYS_OFFSET; the boot info was copied
    // into the image before this point. Loading CR3 flushes the old non-global translations.
    unsafe {
        Cr3::write(
            PhysFrame::containing_address(PhysAddr::new(pml4_phys)),
            Cr3Flags::empty(),
        );
    }
    PHYS_BASE.store(PHYS_OFFSET, Ordering::Release);
}

/// Copies the core's upper-half PML4 entries (direct map, stacks, kernel image) into the
/// address space `pml4`, without the user bit: a domain's tables map the core, but ring 3
/// cannot touch it. The core creates every upper-half PML4 entry it will ever use before the
/// first domain is loaded, so sharing the entries shares all later mappings too.
pub fn share_kernel_half(pml4: u64) {
    let _guard = MAPPER_LOCK.lock();
    let kernel = phys_to_virt(PML4_PHYS.load(Ordering::Acquire)).as_ptr::<PageTable>();
    let target = phys_to_virt(pml4).as_mut_ptr::<PageTable>();
    // SAFETY: both are live top-level tables; the target is a fresh domain table nobody else
    // uses yet; we hold the mapper lock.
    unsafe {
        for index in 256..512 {
            (&mut *target)[index] = (&*kernel)[index].clone();
        }
    }
}

/// Physical address of the core's top-level page table (for APs to load).
pub fn kernel_cr3() -> u64 {
    PML4_PHYS.load(Ordering::Acquire)
}

/// Removes the low identity map once no CPU needs it; afterwards a null or low pointer
/// dereference in the core faults.
pub fn drop_identity_map() {
    let _guard = MAPPER_LOCK.lock();
    let pml4 = phys_to_virt(PML4_PHYS.load(Ordering::Acquire));
    // SAFETY: the PML4 is live and we hold the mapper lock; entry 0 is the trampoline's
    // identity map, which no CPU uses once all are online. Its two frames are left allocated.
    unsafe { (&mut *pml4.as_mut_ptr::<PageTable>())[0].set_unused() };
    // This CPU flushes; the others get a shootdown IPI, so no CPU keeps a stale translation
    // that would hide a wild low pointer from fault detection.
    x86_64::instructions::tlb::flush_all();
    crate::apic::send_to_others(crate::trap::FLUSH_TLB_VECTOR);
}

/// Allocates a stack of `bytes` (rounded up to pages) below an unmapped guard page and
/// returns its top (16-byte aligned, ready for RSP).
pub fn allocate_stack(bytes: u64) -> Option<VirtAddr> {
    let pages = bytes.div_ceil(PAGE_SIZE);
    let slot = NEXT_STACK.fetch_add((pages + 1) * PAGE_SIZE, Ordering::Relaxed);
    let bottom = slot + PAGE_SIZE; // `slot` itself is the guard page.
    let _guard = MAPPER_LOCK.lock();
    let mut mapper = mapper();
    for index in 0..pages {
        let frame_virt = allocate_zeroed(1)?;
        let frame = PhysFrame::containing_address(PhysAddr::new(
            frame_virt.as_u64() - PHYS_BASE.load(Ordering::Relaxed),
        ));
        let page = Page::<Size4KiB>::containing_address(VirtAddr::new(bottom + index * PAGE_SIZE));
        let flags = Flags::PRESENT | Flags::WRITABLE | Flags::NO_EXECUTE;
        // SAFETY: the stack region's addresses are handed out once each by NEXT_STACK, so the
        // page is unmapped; the frame is fresh.
        unsafe { mapper.map_to(page, frame, flags, &mut Frames) }
            .ok()?
            .flush();
    }
    Some(VirtAddr::new(bottom + pages * PAGE_SIZE))
}
