//! Per-CPU state: the per-CPU block (found through GS base), GDT, TSS with IST stacks, IDT.
//!
//! Each CPU gets its own GDT, TSS and IDT in a block of frames the core allocates at
//! bring-up. Every gate switches to an interrupt stack (IST): the precompiled `core` uses the
//! red zone, so ring 0 must never take an interrupt on the stack it was running on.
//! IST1 serves external interrupts and IPIs, IST2 ordinary exceptions, IST3 the exceptions that
//! can strike at any time or with a broken stack (NMI, #DF, #MC).

use core::mem::size_of;
use microvisor::gate::GateDescriptor;
use x86_64::VirtAddr;
use x86_64::instructions::segmentation::{CS, SS, Segment};
use x86_64::instructions::tables::{lidt, load_tss};
use x86_64::registers::model_specific::GsBase;
use x86_64::structures::DescriptorTablePointer;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;

use crate::paging;

/// Most CPUs the core brings up.
pub const MAX_CPUS: usize = 64;

/// Bytes of each interrupt stack.
const IST_STACK_BYTES: u64 = 16 * 1024;

/// Kernel code selector (GDT slot 1).
pub const KERNEL_CODE: SegmentSelector = SegmentSelector(0x08);

/// The interrupt descriptor table: 256 gates.
#[repr(C, align(16))]
pub struct Idt([GateDescriptor; 256]);

/// Everything one CPU owns. `index` must stay the first field: the trap path reads it at
/// `gs:[0]`.
#[repr(C)]
pub struct PerCpu {
    /// CPU index: 0 is the bootstrap processor, then MADT order.
    pub index: usize,
    /// Local APIC ID.
    pub apic_id: u32,
    tss: TaskStateSegment,
    gdt: GlobalDescriptorTable<8>,
    idt: Idt,
}

/// Index of the CPU running this code; 0 before the per-CPU block is installed.
pub fn current_index() -> usize {
    let base = GsBase::read();
    if base.is_null() {
        return 0;
    }
    // SAFETY: a non-zero GS base is only ever set by `init_this_cpu`, to a `PerCpu` block
    // that lives for the rest of the run.
    unsafe { (*base.as_ptr::<PerCpu>()).index }
}

/// Address of this CPU's TSS (the VMCS host state needs it).
pub fn tss_base() -> u64 {
    GsBase::read().as_u64() + core::mem::offset_of!(PerCpu, tss) as u64
}

/// Builds and loads this CPU's per-CPU block, GDT, TSS and IDT, and points GS base at the
/// block. `index` is the CPU index, `apic_id` its local APIC ID.
pub fn init_this_cpu(index: usize, apic_id: u32) {
    let frames = size_of::<PerCpu>().div_ceil(4096) as u64;
    let block = paging::allocate_zeroed(frames).expect("out of memory for a per-CPU block");
    let percpu_ptr = block.as_mut_ptr::<PerCpu>();

    let mut tss = TaskStateSegment::new();
    let mut stacks = tss.interrupt_stack_table;
    for slot in &mut stacks[..3] {
        *slot = paging::allocate_stack(IST_STACK_BYTES).expect("out of memory for an IST stack");
    }
    tss.interrupt_stack_table = stacks;
    let idt = Idt(core::array::from_fn(|vector| {
        let ist = match vector {
            2 | 8 | 18 => 3,
            0..32 => 2,
            _ => 1,
        };
        // Only the system-call gate may be raised from ring 3 with `int`.
        let dpl = if vector == usize::from(microvisor_abi::SYSCALL_VECTOR) {
            3
        } else {
            0
        };
        GateDescriptor::interrupt_gate(
            crate::trap::stub_address(vector as u8),
            KERNEL_CODE.0,
            ist,
            dpl,
        )
    }));

    // SAFETY: `block` is freshly allocated, zeroed, large enough and suitably aligned (page
    // aligned) for a `PerCpu`, and nothing else refers to it.
    let percpu: &'static mut PerCpu = unsafe {
        percpu_ptr.write(PerCpu {
            index,
            apic_id,
            tss,
            gdt: GlobalDescriptorTable::new(),
            idt,
        });
        &mut *percpu_ptr
    };
    // Split the block into its parts; each lives as long as the block, i.e. forever.
    let PerCpu { tss, gdt, idt, .. } = percpu;
    let tss: &'static TaskStateSegment = tss;
    let code = gdt.append(Descriptor::kernel_code_segment());
    let data = gdt.append(Descriptor::kernel_data_segment());
    // User segments in SYSRET order (user data, then user code) for the ring-3 domains.
    gdt.append(Descriptor::user_data_segment());
    gdt.append(Descriptor::user_code_segment());
    let tss_selector = gdt.append(Descriptor::tss_segment(tss));
    assert_eq!(code, KERNEL_CODE, "GDT layout changed");
    let gdt: &'static GlobalDescriptorTable<8> = gdt;
    gdt.load();
    let idt_pointer = DescriptorTablePointer {
        limit: (size_of::<Idt>() - 1) as u16,
        base: VirtAddr::from_ptr(idt),
    };
    // SAFETY: the selectors index the GDT just loaded; the IDT gates point at the trap stubs
    // with valid IST slots; GS base points at a `PerCpu` that lives forever.
    unsafe {
        CS::set_reg(code);
        SS::set_reg(data);
        load_tss(tss_selector);
        lidt(&idt_pointer);
        GsBase::write(VirtAddr::from_ptr(percpu_ptr));
    }
}
