//! The boot stub: multiboot2 header, PVH ELF note, and the 32-bit path into long mode.
//!
//! Both loaders enter in 32-bit protected mode with paging off: GRUB (multiboot2) with
//! EAX = 0x36d76289 and EBX = the boot information; QEMU's PVH loader at the address in the
//! `XEN_ELFNOTE_PHYS32_ENTRY` note with EBX = `hvm_start_info`. The stub builds boot page
//! tables (identity map of the low 4 GiB, and the first 2 GiB again at the kernel base
//! 0xffffffff80000000), turns on PAE, SSE (CR4.OSFXSR/OSXMMEXCPT, CR0.MP, not CR0.EM: the
//! precompiled `core` uses SSE), long mode and NX, and calls `kmain(info, protocol)` on the
//! bootstrap stack in the higher half. The core replaces these tables with its own in
//! `paging`.

/// Boot protocol code passed to `kmain`: multiboot2 (GRUB).
pub const PROTOCOL_MULTIBOOT2: u64 = 1;
/// Boot protocol code passed to `kmain`: PVH (QEMU `-kernel`).
pub const PROTOCOL_PVH: u64 = 2;

/// Bytes of the bootstrap processor's stack, its lowest page included: once the core's page
/// tables are live that page is left unmapped as a guard (the stack lies in .bss right above
/// the core's statics). The BSP runs guests on it; 64 KiB once overflowed, silently, into the
/// guest module's statics when VM records grew to four vCPUs (a debug build copies them on
/// the stack), so it is generous.
pub const BSP_STACK_BYTES: usize = 256 * 1024;

core::arch::global_asm!(
    r#"

    /* multiboot2 header (Multiboot2 spec 3.1): magic, architecture 0 (i386), length,
       checksum, then the terminating tag. */
    .section .multiboot2_header, "a"
    .balign 8
multiboot2_header_start:
    .long 0xe85250d6
    .long 0
    .long multiboot2_header_end - multiboot2_header_start
    .long 0x100000000 - (0xe85250d6 + (multiboot2_header_end - multiboot2_header_start))
    .balign 8
    .short 0
    .short 0
    .long 8
multiboot2_header_end:

    /* PVH entry note: XEN_ELFNOTE_PHYS32_ENTRY (18), the 32-bit physical entry point. */
    .section .note.Xen, "a", %note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long pvh_entry
    .balign 4

    .section .boot.text, "ax"
    .code32
    .global multiboot2_entry
multiboot2_entry:
    movl %ebx, %edi
    movl ${mb2}, %esi
    cmpl $0x36d76289, %eax
    je boot_common32
    xorl %esi, %esi
    jmp boot_common32

    .global pvh_entry
pvh_entry:
    movl %ebx, %edi
    movl ${pvh}, %esi

boot_common32:
    cli
    cld
    movl $boot_stack_top, %esp
    movl %edi, %ebp

    /* Zero the seven pages of boot page tables. */
    movl $boot_page_tables, %edi
    movl $(7 * 1024), %ecx
    xorl %eax, %eax
    rep stosl

    /* PML4[0] -> low PDPT, PML4[511] -> high PDPT. */
    movl $boot_pdpt_low + 3, boot_pml4
    movl $boot_pdpt_high + 3, boot_pml4 + 511 * 8
    /* Low PDPT: four PDs cover 0..4 GiB. High PDPT[510..511]: the first 2 GiB again. */
    movl $boot_pd + 3, boot_pdpt_low
    movl $boot_pd + 0x1000 + 3, boot_pdpt_low + 8
    movl $boot_pd + 0x2000 + 3, boot_pdpt_low + 16
    movl $boot_pd + 0x3000 + 3, boot_pdpt_low + 24
    movl $boot_pd + 3, boot_pdpt_high + 510 * 8
    movl $boot_pd + 0x1000 + 3, boot_pdpt_high + 511 * 8
    /* 2048 PD entries of 2 MiB pages: present, writable, large. */
    xorl %ecx, %ecx
1:
    movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %eax, boot_pd(, %ecx, 8)
    movl %ecx, %eax
    shrl $11, %eax
    movl %eax, boot_pd + 4(, %ecx, 8)
    incl %ecx
    cmpl $2048, %ecx
    jne 1b

    movl $boot_pml4, %eax
    movl %eax, %cr3
    /* CR4: PAE, OSFXSR, OSXMMEXCPT. */
    movl %cr4, %eax
    orl $((1 << 5) | (1 << 9) | (1 << 10)), %eax
    movl %eax, %cr4
    /* EFER: LME, NXE. */
    movl $0xc0000080, %ecx
    rdmsr
    orl $((1 << 8) | (1 << 11)), %eax
    wrmsr
    /* CR0: PG, WP, MP, PE; EM off; caches on (CD and NW clear: INIT leaves them as they were). */
    movl %cr0, %eax
    andl $~((1 << 2) | (1 << 29) | (1 << 30)), %eax
    orl $((1 << 31) | (1 << 16) | (1 << 1) | 1), %eax
    movl %eax, %cr0

    lgdt boot_gdt_pointer
    pushl $0x08
    pushl $boot_long_mode
    lret

    .code64
boot_long_mode:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    /* The upper halves of the registers are undefined after the mode switch. */
    movl %ebp, %edi
    movl %esi, %esi
    movabsq $kernel_entry_high, %rax
    jmp *%rax

    .section .boot.rodata, "a"
    .balign 8
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
boot_gdt_pointer:
    .short boot_gdt_pointer - boot_gdt - 1
    .long boot_gdt

    .section .boot.bss, "aw", %nobits
    .balign 4096
boot_page_tables:
boot_pml4:
    .skip 4096
boot_pdpt_low:
    .skip 4096
boot_pdpt_high:
    .skip 4096
boot_pd:
    .skip 4096 * 4
boot_stack:
    .skip 4096
boot_stack_top:

    .section .text.boot_high, "ax"
kernel_entry_high:
    movabsq $bsp_stack_top, %rsp
    xorl %ebp, %ebp
    call {kmain}
    ud2

    .section .bss.bsp_stack, "aw", %nobits
    .balign 4096
    .global bsp_stack_bottom
bsp_stack_bottom:
    .skip {stack_bytes}
bsp_stack_top:
"#,
    mb2 = const PROTOCOL_MULTIBOOT2,
    pvh = const PROTOCOL_PVH,
    stack_bytes = const BSP_STACK_BYTES,
    kmain = sym crate::kmain,
    options(att_syntax),
);
