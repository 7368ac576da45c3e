//! Starting the application processors (Intel SDM Vol. 3A, 8.4.4.1: INIT-SIPI-SIPI).
//!
//! A STARTUP IPI starts a CPU in 16-bit real mode at a page below 1 MiB. The trampoline
//! below is copied to [`TRAMPOLINE_BASE`]; it goes from real mode straight to long mode
//! (PAE, EFER.LME|NXE, CR0.PE|PG at once), using the core's page tables, which keep an
//! executable identity map of the first 2 MiB during bring-up. Then it jumps to
//! [`ap_entry`] in the higher half on the stack the bootstrap processor allocated for it.
//! CPUs are started one at a time, so one trampoline page and one parameter block suffice.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::{apic, cpu, paging, run};

/// Physical address the trampoline runs at (page 8, below the EBDA and above the IVT/BDA).
const TRAMPOLINE_BASE: u64 = 0x8000;
/// Bytes of each AP's kernel stack.
const AP_STACK_BYTES: u64 = 64 * 1024;

core::arch::global_asm!(
    r#"
    .section .rodata.trampoline, "a"
    .balign 16
    .global smp_trampoline_start
smp_trampoline_start:
    .code16
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl ({base} + smp_trampoline_gdt_pointer - smp_trampoline_start)
    movl %cr4, %eax
    orl $((1 << 5) | (1 << 9) | (1 << 10)), %eax
    movl %eax, %cr4
    movl ({base} + smp_trampoline_cr3 - smp_trampoline_start), %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    rdmsr
    orl $((1 << 8) | (1 << 11)), %eax
    wrmsr
    movl %cr0, %eax
    andl $~((1 << 2) | (1 << 29) | (1 << 30)), %eax
    orl $((1 << 31) | (1 << 16) | (1 << 1) | 1), %eax
    movl %eax, %cr0
    ljmpl $0x08, $({base} + smp_trampoline_long - smp_trampoline_start)
    .code64
smp_trampoline_long:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movq ({base} + smp_trampoline_stack - smp_trampoline_start), %rsp
    movq ({base} + smp_trampoline_index - smp_trampoline_start), %rdi
    movq ({base} + smp_trampoline_entry - smp_trampoline_start), %rax
    jmp *%rax
    .balign 8
smp_trampoline_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
smp_trampoline_gdt_pointer:
    .short 23
    .long {base} + smp_trampoline_gdt - smp_trampoline_start
    .balign 8
    .global smp_trampoline_cr3
smp_trampoline_cr3:
    .quad 0
    .global smp_trampoline_stack
smp_trampoline_stack:
    .quad 0
    .global smp_trampoline_entry
smp_trampoline_entry:
    .quad 0
    .global smp_trampoline_index
smp_trampoline_index:
    .quad 0
    .global smp_trampoline_end
smp_trampoline_end:
"#,
    base = const TRAMPOLINE_BASE,
    options(att_syntax),
);

unsafe extern "C" {
    static smp_trampoline_start: u8;
    static smp_trampoline_end: u8;
    static smp_trampoline_cr3: u8;
    static smp_trampoline_stack: u8;
    static smp_trampoline_entry: u8;
    static smp_trampoline_index: u8;
}

/// Set by an AP once it runs Rust code, before anything else it does.
static AP_ALIVE: AtomicBool = AtomicBool::new(false);

/// Offset of a trampoline symbol from the trampoline's start.
fn offset_of(symbol: *const u8) -> u64 {
    symbol as u64 - &raw const smp_trampoline_start as u64
}

fn write_parameter(symbol: *const u8, value: u64) {
    let address = paging::phys_to_virt(TRAMPOLINE_BASE + offset_of(symbol));
    // SAFETY: the trampoline page is owned by the core (low memory is never handed out by
    // the frame allocator) and its parameter slots are 8-byte aligned.
    unsafe { address.as_mut_ptr::<u64>().write_volatile(value) };
}

/// Starts every processor in `apic_ids` other than the bootstrap processor (`bsp_apic_id`).
/// Returns the APIC IDs that did not come online.
pub fn start_application_processors(apic_ids: &[u32], bsp_apic_id: u32) -> usize {
    let (start, end) = (
        &raw const smp_trampoline_start,
        &raw const smp_trampoline_end,
    );
    let (cr3, stack) = (
        &raw const smp_trampoline_cr3,
        &raw const smp_trampoline_stack,
    );
    let (entry, index_slot) = (
        &raw const smp_trampoline_entry,
        &raw const smp_trampoline_index,
    );
    let length = end as usize - start as usize;
    let target = paging::phys_to_virt(TRAMPOLINE_BASE).as_mut_ptr::<u8>();
    // SAFETY: the trampoline image is `length` bytes of rodata; the target page is low memory
    // the core reserved for it and nothing else uses.
    unsafe { core::ptr::copy_nonoverlapping(start, target, length) };
    write_parameter(cr3, paging::kernel_cr3());
    write_parameter(entry, ap_entry as *const () as u64);

    let mut failed = 0;
    for &apic_id in apic_ids.iter().filter(|&&id| id != bsp_apic_id) {
        let index = run::register_cpu(apic_id);
        let Some(top) = paging::allocate_stack(AP_STACK_BYTES) else {
            log::error!("no memory for the stack of APIC {apic_id}");
            failed += 1;
            continue;
        };
        // The entry is jumped to, not called: leave the slot a return address would take.
        write_parameter(stack, top.as_u64() - 8);
        write_parameter(index_slot, index as u64);
        AP_ALIVE.store(false, Ordering::Release);
        apic::send_init(apic_id);
        apic::delay_us(10_000);
        let page = (TRAMPOLINE_BASE / 4096) as u8;
        apic::send_startup(apic_id, page);
        if !wait_alive(1_000) {
            apic::send_startup(apic_id, page);
        }
        // Wait for the CPU to be fully online (its own GDT/IDT/APIC/timer set up) before
        // reusing the trampoline's parameter block for the next one.
        if !wait_alive(1_000_000) || !run::wait_online(index, 1_000_000) {
            log::error!("CPU {index} (APIC {apic_id}) did not come online");
            failed += 1;
        }
    }
    failed
}

fn wait_alive(micros: u64) -> bool {
    let step = 100;
    for _ in 0..micros.div_ceil(step) {
        if AP_ALIVE.load(Ordering::Acquire) {
            return true;
        }
        apic::delay_us(step);
    }
    AP_ALIVE.load(Ordering::Acquire)
}

extern "C" fn ap_entry(index: u64) -> ! {
    AP_ALIVE.store(true, Ordering::Release);
    let index = index as usize;
    apic::enable_this_cpu();
    cpu::init_this_cpu(index, apic::id());
    apic::start_periodic_timer();
    if let Err(unavailable) = crate::vmx::enter_root() {
        run::record_vmx_unavailable(unavailable.reason());
    }
    run::mark_online(index);
    run::idle(index)
}
