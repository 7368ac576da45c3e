//! Guest access to the CPU state the hypervisor must switch, virtualize or hide (see
//! `docs/threat-model.md`), for the guest kernels that test it (`fuzz`, `hostile`).
//!
//! The register accessors are what any 64-bit kernel does in ring 0. The `attempt_*`
//! functions execute an instruction the virtual CPU does not offer: the core must stop the VM,
//! so they return only if it failed to.

/// Writes CR2 (the page-fault address register; a kernel may write it).
pub fn write_cr2(value: u64) {
    // SAFETY: CR2 only records page-fault addresses; writing it changes nothing else.
    unsafe { core::arch::asm!("mov cr2, {}", in(reg) value, options(nomem, nostack)) };
}

/// Reads CR2.
pub fn read_cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 has no effect.
    unsafe { core::arch::asm!("mov {}, cr2", out(reg) value, options(nomem, nostack)) };
    value
}

/// Writes CR8 (the task priority, 0..=15; virtual interrupts at or below it are held back).
pub fn write_cr8(value: u64) {
    // SAFETY: CR8 masks interrupt classes of this vCPU only (the core's TPR shadow).
    unsafe { core::arch::asm!("mov cr8, {}", in(reg) value & 0xf, options(nomem, nostack)) };
}

/// Reads CR8.
pub fn read_cr8() -> u64 {
    let value: u64;
    // SAFETY: reading CR8 has no effect.
    unsafe { core::arch::asm!("mov {}, cr8", out(reg) value, options(nomem, nostack)) };
    value
}

/// Reads CR4 (the core shows its own bits as the guest's starting view).
pub fn read_cr4() -> u64 {
    let value: u64;
    // SAFETY: reading CR4 has no effect.
    unsafe { core::arch::asm!("mov {}, cr4", out(reg) value, options(nomem, nostack)) };
    value
}

/// Writes debug register `index` (0-3, 6 or 7; anything else is ignored).
pub fn write_debug(index: u8, value: u64) {
    // SAFETY: debug registers only arm breakpoints of this vCPU; callers keep the enabled
    // ones at addresses they never touch.
    unsafe {
        match index {
            0 => core::arch::asm!("mov dr0, {}", in(reg) value, options(nomem, nostack)),
            1 => core::arch::asm!("mov dr1, {}", in(reg) value, options(nomem, nostack)),
            2 => core::arch::asm!("mov dr2, {}", in(reg) value, options(nomem, nostack)),
            3 => core::arch::asm!("mov dr3, {}", in(reg) value, options(nomem, nostack)),
            6 => core::arch::asm!("mov dr6, {}", in(reg) value, options(nomem, nostack)),
            7 => core::arch::asm!("mov dr7, {}", in(reg) value, options(nomem, nostack)),
            _ => {}
        }
    }
}

/// Reads debug register `index` (0-3, 6 or 7; anything else reads 0).
pub fn read_debug(index: u8) -> u64 {
    let mut value = 0u64;
    // SAFETY: reading a debug register has no effect.
    unsafe {
        match index {
            0 => core::arch::asm!("mov {}, dr0", out(reg) value, options(nomem, nostack)),
            1 => core::arch::asm!("mov {}, dr1", out(reg) value, options(nomem, nostack)),
            2 => core::arch::asm!("mov {}, dr2", out(reg) value, options(nomem, nostack)),
            3 => core::arch::asm!("mov {}, dr3", out(reg) value, options(nomem, nostack)),
            6 => core::arch::asm!("mov {}, dr6", out(reg) value, options(nomem, nostack)),
            7 => core::arch::asm!("mov {}, dr7", out(reg) value, options(nomem, nostack)),
            _ => {}
        }
    }
    value
}

/// Loads XMM0-XMM15 (two words each) and MXCSR, makes hypercall `number` without arguments
/// (e.g. `YIELD`), and returns what the registers hold afterwards with the hypercall's
/// result. Whatever ran on this CPU in between must not have changed them.
pub fn sse_across_hypercall(number: u64, xmm: &[u64; 32], mxcsr: u32) -> ([u64; 32], u32, i64) {
    let mut after = [0u64; 32];
    let mut mxcsr_after = 0u32;
    let result: u64;
    // SAFETY: reads `xmm` and writes `after` (both 32 words) and the MXCSR slots; the
    // hypercall changes only RAX (docs/hypercall-abi.md); every XMM register is declared
    // clobbered, and MXCSR is put back to the ABI's 0x1f80 before the block ends.
    unsafe {
        core::arch::asm!(
            "ldmxcsr [{mx_in}]",
            "movdqu xmm0, [{src}]", "movdqu xmm1, [{src} + 16]",
            "movdqu xmm2, [{src} + 32]", "movdqu xmm3, [{src} + 48]",
            "movdqu xmm4, [{src} + 64]", "movdqu xmm5, [{src} + 80]",
            "movdqu xmm6, [{src} + 96]", "movdqu xmm7, [{src} + 112]",
            "movdqu xmm8, [{src} + 128]", "movdqu xmm9, [{src} + 144]",
            "movdqu xmm10, [{src} + 160]", "movdqu xmm11, [{src} + 176]",
            "movdqu xmm12, [{src} + 192]", "movdqu xmm13, [{src} + 208]",
            "movdqu xmm14, [{src} + 224]", "movdqu xmm15, [{src} + 240]",
            "vmcall",
            "movdqu [{dst}], xmm0", "movdqu [{dst} + 16], xmm1",
            "movdqu [{dst} + 32], xmm2", "movdqu [{dst} + 48], xmm3",
            "movdqu [{dst} + 64], xmm4", "movdqu [{dst} + 80], xmm5",
            "movdqu [{dst} + 96], xmm6", "movdqu [{dst} + 112], xmm7",
            "movdqu [{dst} + 128], xmm8", "movdqu [{dst} + 144], xmm9",
            "movdqu [{dst} + 160], xmm10", "movdqu [{dst} + 176], xmm11",
            "movdqu [{dst} + 192], xmm12", "movdqu [{dst} + 208], xmm13",
            "movdqu [{dst} + 224], xmm14", "movdqu [{dst} + 240], xmm15",
            "stmxcsr [{mx_out}]",
            "ldmxcsr [{mx_default}]",
            src = in(reg) xmm.as_ptr(),
            dst = in(reg) after.as_mut_ptr(),
            mx_in = in(reg) &mxcsr,
            mx_out = in(reg) &mut mxcsr_after,
            mx_default = in(reg) &0x1f80u32,
            inlateout("rax") number => result,
            in("rdi") 0u64, in("rsi") 0u64, in("rdx") 0u64,
            in("r10") 0u64, in("r8") 0u64, in("r9") 0u64,
            out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
            out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
            out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
            out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
            options(nostack),
        );
    }
    (after, mxcsr_after, result as i64)
}

/// This VM's private GDT: the boot GDT's three descriptors, then one data descriptor per vCPU
/// whose base [`set_gs_base`] sets (selector `0x20 + 8 * vcpu`).
#[repr(C, align(16))]
struct Gdt([core::sync::atomic::AtomicU64; 8]);

static GDT: Gdt = Gdt([const { core::sync::atomic::AtomicU64::new(0) }; 8]);

/// Sets this vCPU's GS base to `base` the way a 64-bit kernel without WRGSBASE can: a data
/// descriptor with that base in a GDT of the guest's own, then `MOV GS`.
pub fn set_gs_base(vcpu: u16, base: u32) {
    use core::sync::atomic::Ordering::Relaxed;
    let slot = 4 + usize::from(vcpu.min(3));
    // Null, 64-bit code (0x08), data (0x10), as the boot GDT has them.
    GDT.0[1].store(0x00af_9b00_0000_ffff, Relaxed);
    GDT.0[2].store(0x00cf_9300_0000_ffff, Relaxed);
    let base = u64::from(base);
    let descriptor = 0x00cf_9300_0000_ffff | ((base & 0xff_ffff) << 16) | ((base >> 24) << 56);
    GDT.0[slot].store(descriptor, Relaxed);
    let mut pointer = [0u8; 10];
    pointer[..2].copy_from_slice(&(8 * 8 - 1u16).to_le_bytes());
    pointer[2..].copy_from_slice(&(GDT.0.as_ptr() as u64).to_le_bytes());
    let selector = (slot * 8) as u16;
    // SAFETY: the new GDT keeps the code and data descriptors the current CS/DS/SS selectors
    // name (0x08, 0x10) at the same places, so nothing loaded changes meaning; GS gets a
    // flat data descriptor.
    unsafe {
        core::arch::asm!("lgdt [{}]", "mov gs, {:x}", in(reg) pointer.as_ptr(), in(reg) selector,
                         options(nostack));
    }
}

/// SWAPGS: exchanges the GS base with IA32_KERNEL_GS_BASE.
pub fn swapgs() {
    // SAFETY: changes only the GS base and the MSR it swaps with; the guest runtime never
    // uses GS.
    unsafe { core::arch::asm!("swapgs", options(nomem, nostack)) };
}

/// Reads the u64 at GS base + `offset` (the GS base must point at this VM's RAM).
pub fn read_gs_u64(offset: u64) -> u64 {
    let value: u64;
    // SAFETY: a read through GS; callers point GS at their own identity-mapped RAM (an
    // address outside the VM's memory exits to the core, which stops the VM).
    unsafe {
        core::arch::asm!("mov {}, gs:[{}]", out(reg) value, in(reg) offset, options(nostack, readonly))
    };
    value
}

/// INVD: the core completes it as a no-op (it would discard the host's dirty cache lines).
pub fn invd() {
    // SAFETY: in a guest, INVD always exits and the core only steps over it.
    unsafe { core::arch::asm!("invd", options(nomem, nostack)) };
}

/// WBINVD: the core completes it as a no-op.
pub fn wbinvd() {
    // SAFETY: in a guest, WBINVD exits (WBINVD exiting) and the core only steps over it.
    unsafe { core::arch::asm!("wbinvd", options(nomem, nostack)) };
}

/// An instruction or access the virtual CPU does not offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forbidden {
    /// WRMSR of (MSR, value).
    WriteMsr(u32, u64),
    /// XSETBV XCR0 := x87 | SSE | AVX.
    Xsetbv,
    /// RDPMC of counter 0.
    Rdpmc,
    /// MOV to CR4 setting OSXSAVE (18).
    Cr4Osxsave,
    /// MOV to CR4 setting PCE (8).
    Cr4Pce,
    /// MOV to CR4 setting FSGSBASE (16).
    Cr4Fsgsbase,
    /// RDTSCP (no TSC_AUX for guests: #UD).
    Rdtscp,
    /// MONITOR on a RAM address.
    Monitor,
    /// MWAIT.
    Mwait,
    /// VMXOFF.
    Vmxoff,
    /// A read of guest-physical `address` (above the VM's RAM: MMIO or unbacked), through a
    /// 2 MiB mapping the guest adds to its own page tables.
    ReadPhysical(u64),
}

/// A page directory for guest-physical 1-4 GiB, for [`Forbidden::ReadPhysical`].
#[repr(C, align(4096))]
struct PageDirectory([core::sync::atomic::AtomicU64; 512]);

static HIGH_PD: PageDirectory =
    PageDirectory([const { core::sync::atomic::AtomicU64::new(0) }; 512]);

/// Executes `what`. The core must stop the VM; this returns only if it did not.
pub fn attempt(what: Forbidden) {
    // SAFETY: each instruction below either exits to the core, which stops the VM, or raises
    // an exception, which stops it too; none touches memory of the guest kernel but the
    // page-table entries `ReadPhysical` adds for an address range nothing else uses.
    unsafe {
        match what {
            Forbidden::WriteMsr(msr, value) => core::arch::asm!(
                "wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
                options(nomem, nostack)),
            Forbidden::Xsetbv => core::arch::asm!(
                "xsetbv", in("ecx") 0u32, in("eax") 7u32, in("edx") 0u32, options(nomem, nostack)),
            Forbidden::Rdpmc => core::arch::asm!(
                "rdpmc", in("ecx") 0u32, out("eax") _, out("edx") _, options(nomem, nostack)),
            Forbidden::Cr4Osxsave => write_cr4(read_cr4() | (1 << 18)),
            Forbidden::Cr4Pce => write_cr4(read_cr4() | (1 << 8)),
            Forbidden::Cr4Fsgsbase => write_cr4(read_cr4() | (1 << 16)),
            Forbidden::Rdtscp => core::arch::asm!(
                "rdtscp", out("eax") _, out("edx") _, out("ecx") _, options(nomem, nostack)),
            Forbidden::Monitor => core::arch::asm!(
                "monitor", in("rax") crate::layout::START_INFO, in("ecx") 0u32, in("edx") 0u32,
                options(nostack)),
            Forbidden::Mwait => core::arch::asm!(
                "mwait", in("eax") 0u32, in("ecx") 0u32, options(nomem, nostack)),
            Forbidden::Vmxoff => core::arch::asm!("vmxoff", options(nomem, nostack)),
            Forbidden::ReadPhysical(address) => {
                map_high(address);
                core::hint::black_box(core::ptr::read_volatile(address as *const u64));
            }
        }
    }
}

/// MOV to CR4.
fn write_cr4(value: u64) {
    // SAFETY: only reached from `attempt`: every value written there changes a bit the core
    // owns, which exits before it takes effect.
    unsafe { core::arch::asm!("mov cr4, {}", in(reg) value, options(nomem, nostack)) };
}

/// Identity-maps the 2 MiB around guest-physical `address` (1-4 GiB) in the guest's own page
/// tables (PML4 -> its PDPT, entry `address >> 30` -> [`HIGH_PD`]).
fn map_high(address: u64) {
    use core::sync::atomic::Ordering::SeqCst;
    let gib = (address >> 30) & 511;
    let large = address & !0x1f_ffff;
    HIGH_PD.0[((address >> 21) & 511) as usize].store(large | 0x83, SeqCst);
    let pdpt = crate::read_u64(crate::layout::PML4) & 0x000f_ffff_ffff_f000;
    crate::write_u64(pdpt + gib * 8, (HIGH_PD.0.as_ptr() as u64) | 0x3);
    // SAFETY: reloading CR3 with its own value flushes this vCPU's translations.
    unsafe {
        core::arch::asm!("mov {tmp}, cr3", "mov cr3, {tmp}", tmp = out(reg) _, options(nostack));
    }
}
