//! A first VMX guest: a vCPU in unrestricted real mode behind EPT, launched on the bootstrap
//! processor (Intel SDM Vol. 3C, chapters 24-27), whose hypercalls are served by the
//! hypercall domain.
//!
//! This proves the VMX path end to end on the platforms that have VMX (bochs here): VMCS set
//! up from the TRUE capability MSRs, an EPT built by the core, VMLAUNCH/VMRESUME, and a VM-exit
//! handler that saves the guest's registers. A VMCALL exit becomes a message: the core sends
//! the guest's number and arguments (RAX; RDI, RSI, RDX, R10, R8, R9) to the hypercall domain as
//! an `ipc::hypercall` request, writes the result into the guest's RAX and advances its RIP
//! only when the hypercall completed (a retried one runs the VMCALL again). The guest makes a
//! null hypercall and a memory populate, then halts; the core checks both results at the HLT
//! exit. External interrupts exit (the host keeps its timer) and the vCPU is resumed.

use microvisor::vmx::{VmxBasic, adjust_controls};
use x86_64::registers::control::{Cr0, Cr3, Cr4};
use x86_64::registers::model_specific::{GsBase, Msr};

use crate::paging;

// VMCS field encodings (SDM Vol. 3D, Appendix B).
pub(crate) const GUEST_ES_SELECTOR: u64 = 0x800;
pub(crate) const HOST_ES_SELECTOR: u64 = 0xc00;
pub(crate) const HOST_CS_SELECTOR: u64 = 0xc02;
pub(crate) const HOST_SS_SELECTOR: u64 = 0xc04;
pub(crate) const HOST_DS_SELECTOR: u64 = 0xc06;
pub(crate) const HOST_FS_SELECTOR: u64 = 0xc08;
pub(crate) const HOST_GS_SELECTOR: u64 = 0xc0a;
pub(crate) const HOST_TR_SELECTOR: u64 = 0xc0c;
pub(crate) const EPT_POINTER: u64 = 0x201a;
pub(crate) const VMCS_LINK_POINTER: u64 = 0x2800;
pub(crate) const PIN_BASED_CONTROLS: u64 = 0x4000;
pub(crate) const PROC_BASED_CONTROLS: u64 = 0x4002;
pub(crate) const EXCEPTION_BITMAP: u64 = 0x4004;
pub(crate) const EXIT_CONTROLS: u64 = 0x400c;
pub(crate) const ENTRY_CONTROLS: u64 = 0x4012;
pub(crate) const SECONDARY_CONTROLS: u64 = 0x401e;
pub(crate) const VM_INSTRUCTION_ERROR: u64 = 0x4400;
pub(crate) const EXIT_REASON: u64 = 0x4402;
pub(crate) const EXIT_INSTRUCTION_LENGTH: u64 = 0x440c;
pub(crate) const GUEST_ES_LIMIT: u64 = 0x4800;
pub(crate) const GUEST_GDTR_LIMIT: u64 = 0x4810;
pub(crate) const GUEST_IDTR_LIMIT: u64 = 0x4812;
pub(crate) const GUEST_ES_ACCESS: u64 = 0x4814;
pub(crate) const GUEST_INTERRUPTIBILITY: u64 = 0x4824;
pub(crate) const GUEST_ACTIVITY: u64 = 0x4826;
pub(crate) const HOST_SYSENTER_CS: u64 = 0x4c00;
pub(crate) const GUEST_CR0: u64 = 0x6800;
pub(crate) const GUEST_CR3: u64 = 0x6802;
pub(crate) const GUEST_CR4: u64 = 0x6804;
pub(crate) const GUEST_ES_BASE: u64 = 0x6806;
pub(crate) const GUEST_GDTR_BASE: u64 = 0x6816;
pub(crate) const GUEST_IDTR_BASE: u64 = 0x6818;
pub(crate) const GUEST_DR7: u64 = 0x681a;
pub(crate) const GUEST_RSP: u64 = 0x681c;
pub(crate) const GUEST_RIP: u64 = 0x681e;
pub(crate) const GUEST_RFLAGS: u64 = 0x6820;
pub(crate) const HOST_CR0: u64 = 0x6c00;
pub(crate) const HOST_CR3: u64 = 0x6c02;
pub(crate) const HOST_CR4: u64 = 0x6c04;
pub(crate) const HOST_FS_BASE: u64 = 0x6c06;
pub(crate) const HOST_GS_BASE: u64 = 0x6c08;
pub(crate) const HOST_TR_BASE: u64 = 0x6c0a;
pub(crate) const HOST_GDTR_BASE: u64 = 0x6c0c;
pub(crate) const HOST_IDTR_BASE: u64 = 0x6c0e;
pub(crate) const HOST_SYSENTER_ESP: u64 = 0x6c10;
pub(crate) const HOST_SYSENTER_EIP: u64 = 0x6c12;
pub(crate) const HOST_RIP: u64 = 0x6c16;

// Capability MSRs (SDM Vol. 3D, Appendix A).
pub(crate) const IA32_VMX_BASIC: u32 = 0x480;
pub(crate) const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48b;
pub(crate) const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48d;
pub(crate) const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48e;
pub(crate) const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48f;
pub(crate) const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
pub(crate) const IA32_VMX_CR0_FIXED0: u32 = 0x486;
pub(crate) const IA32_VMX_CR0_FIXED1: u32 = 0x487;
pub(crate) const IA32_VMX_CR4_FIXED0: u32 = 0x488;

/// Exit reasons used here (SDM Vol. 3D, Appendix C).
pub(crate) const EXIT_EXTERNAL_INTERRUPT: u32 = 1;
pub(crate) const EXIT_HLT: u32 = 12;
pub(crate) const EXIT_VMCALL: u32 = 18;

/// The VM number the first guest has in the services (its memory owner).
const GUEST_VM: u16 = 63;
/// The hypercall domain's index (`ipc::DomainIndex::Hypercall`).
const HYPERCALL_DOMAIN: u16 = 5;

/// Guest-physical address the guest code starts at, and the guest memory size.
pub(crate) const GUEST_ENTRY: u64 = 0x1000;
pub(crate) const GUEST_PAGES: u64 = 16;

/// The guest's general-purpose registers, saved on every VM exit (layout used by the stub).
#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct GuestRegisters {
    /// RAX.
    pub rax: u64,
    /// RBX.
    pub rbx: u64,
    /// RCX.
    pub rcx: u64,
    /// RDX.
    pub rdx: u64,
    /// RSI.
    pub rsi: u64,
    /// RDI.
    pub rdi: u64,
    /// RBP.
    pub rbp: u64,
    /// R8.
    pub r8: u64,
    /// R9.
    pub r9: u64,
    /// R10.
    pub r10: u64,
    /// R11.
    pub r11: u64,
    /// R12.
    pub r12: u64,
    /// R13.
    pub r13: u64,
    /// R14.
    pub r14: u64,
    /// R15.
    pub r15: u64,
}

core::arch::global_asm!(
    r#"
    .section .text.vmx, "ax"
    /* u64 vmx_enter(GuestRegisters *regs, u64 resume): VMLAUNCH (resume = 0) or VMRESUME.
       Returns 0 after a VM exit, 1 if the VM entry itself failed. */
    .global vmx_enter
vmx_enter:
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    pushq %rdi
    movq $0x6c14, %rax
    vmwrite %rsp, %rax
    movq %rsi, %rax
    movq 8(%rdi), %rbx
    movq 16(%rdi), %rcx
    movq 24(%rdi), %rdx
    movq 32(%rdi), %rsi
    movq 48(%rdi), %rbp
    movq 56(%rdi), %r8
    movq 64(%rdi), %r9
    movq 72(%rdi), %r10
    movq 80(%rdi), %r11
    movq 88(%rdi), %r12
    movq 96(%rdi), %r13
    movq 104(%rdi), %r14
    movq 112(%rdi), %r15
    testq %rax, %rax
    movq (%rdi), %rax
    movq 40(%rdi), %rdi
    jnz 1f
    vmlaunch
    jmp 2f
1:
    vmresume
2:
    /* VM entry failed: nothing of the guest ran. */
    popq %rdi
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    movl $1, %eax
    ret

    .global vmx_exit_stub
vmx_exit_stub:
    /* HOST_RSP points at the saved GuestRegisters pointer. */
    pushq %rax
    movq 8(%rsp), %rax
    popq (%rax)
    movq %rbx, 8(%rax)
    movq %rcx, 16(%rax)
    movq %rdx, 24(%rax)
    movq %rsi, 32(%rax)
    movq %rdi, 40(%rax)
    movq %rbp, 48(%rax)
    movq %r8, 56(%rax)
    movq %r9, 64(%rax)
    movq %r10, 72(%rax)
    movq %r11, 80(%rax)
    movq %r12, 88(%rax)
    movq %r13, 96(%rax)
    movq %r14, 104(%rax)
    movq %r15, 112(%rax)
    popq %rdi
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    xorl %eax, %eax
    ret
"#,
    options(att_syntax)
);

unsafe extern "C" {
    pub(crate) fn vmx_enter(registers: *mut GuestRegisters, resume: u64) -> u64;
    pub(crate) fn vmx_exit_stub();
}

/// Why the first guest did not run as expected.
#[derive(Clone, Copy, Debug)]
pub enum GuestError {
    /// A control this code needs is not supported (EPT, unrestricted guest, ...).
    Unsupported(&'static str),
    /// Out of memory for the VMCS, EPT or guest memory.
    OutOfMemory,
    /// VMCLEAR/VMPTRLD/VMWRITE failed.
    VmcsAccess(u64),
    /// VMLAUNCH/VMRESUME failed; the VM-instruction error number.
    EntryFailed(u64),
    /// The guest exited for an unexpected reason.
    UnexpectedExit(u32),
    /// The hypercall domain could not be reached or answered nonsense.
    Hypercall(&'static str),
}

impl core::fmt::Display for GuestError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Unsupported(what) => write!(f, "the processor lacks {what}"),
            Self::OutOfMemory => f.write_str("out of memory for the VMCS, EPT or guest memory"),
            Self::VmcsAccess(field) => write!(f, "VMCS access failed (field {field:#x})"),
            Self::EntryFailed(error) => write!(f, "VM entry failed, VM-instruction error {error}"),
            Self::UnexpectedExit(reason) => write!(f, "unexpected VM exit, reason {reason}"),
            Self::Hypercall(what) => write!(f, "hypercall forwarding failed: {what}"),
        }
    }
}

pub(crate) fn read_msr(index: u32) -> u64 {
    // SAFETY: only called in VMX root operation, where the VMX capability MSRs exist.
    unsafe { Msr::new(index).read() }
}

pub(crate) fn vmwrite(field: u64, value: u64) -> Result<(), GuestError> {
    let failed: u8;
    // SAFETY: a VMCS is current (VMPTRLD succeeded); VMWRITE changes only that VMCS.
    unsafe {
        core::arch::asm!("vmwrite {field}, {value}", "setna {failed}", field = in(reg) field,
                         value = in(reg) value, failed = out(reg_byte) failed, options(nostack));
    }
    if failed == 0 {
        Ok(())
    } else {
        Err(GuestError::VmcsAccess(field))
    }
}

pub(crate) fn vmread(field: u64) -> u64 {
    let value: u64;
    // SAFETY: a VMCS is current; VMREAD has no side effect.
    unsafe {
        core::arch::asm!("vmread {value}, {field}", field = in(reg) field, value = out(reg) value, options(nostack))
    };
    value
}

pub(crate) fn allocate(pages: u64) -> Result<(u64, *mut u8), GuestError> {
    let virt = paging::allocate_zeroed(pages).ok_or(GuestError::OutOfMemory)?;
    Ok((virt.as_u64() - paging::PHYS_OFFSET, virt.as_mut_ptr::<u8>()))
}

/// Builds a 4-level EPT mapping guest-physical `0..pages*4K` read-write-execute, write-back,
/// onto the host frames at `host`. Returns the EPT pointer.
fn build_ept(host: u64, pages: u64) -> Result<u64, GuestError> {
    let (pml4, pml4_ptr) = allocate(1)?;
    let (pdpt, pdpt_ptr) = allocate(1)?;
    let (pd, pd_ptr) = allocate(1)?;
    let (pt, pt_ptr) = allocate(1)?;
    const RWX: u64 = 0b111;
    const WRITE_BACK: u64 = 6 << 3;
    // SAFETY: four fresh, zeroed, page-aligned frames viewed as 512-entry tables.
    unsafe {
        *(pml4_ptr as *mut u64) = pdpt | RWX;
        *(pdpt_ptr as *mut u64) = pd | RWX;
        *(pd_ptr as *mut u64) = pt | RWX;
        for page in 0..pages {
            *(pt_ptr as *mut u64).add(page as usize) = (host + page * 4096) | RWX | WRITE_BACK;
        }
    }
    // Write-back EPT structures, 4-level walk (SDM Vol. 3C, 24.6.11).
    Ok(pml4 | 6 | (3 << 3))
}

/// The first guest: `mov ax, 0 (NULL); vmcall; mov bx, ax; mov ax, 3 (MEMORY_POPULATE);
/// vmcall; hlt`.
const FIRST_GUEST: [u8; 16] = [
    0xb8, 0x00, 0x00, 0x0f, 0x01, 0xc1, 0x89, 0xc3, 0xb8, 0x03, 0x00, 0x0f, 0x01, 0xc1, 0xf4, 0xf4,
];

/// Null hypercalls the benchmark guest makes.
pub const BENCH_HYPERCALLS: usize = 1000;

/// The benchmark guest: `mov cx, 1000; l: xor ax, ax; vmcall; loop l; hlt`.
const BENCH_GUEST: [u8; 11] = [
    0xb9, 0xe8, 0x03, 0x31, 0xc0, 0x0f, 0x01, 0xc1, 0xe2, 0xf9, 0xf4,
];

/// Runs the first guest until it halts, serving its hypercalls with the hypercall domain;
/// returns its registers then and the number of VM exits taken (hypercalls and external
/// interrupts included).
pub fn run_first_guest() -> Result<(GuestRegisters, u32), GuestError> {
    // Its populate is charged to its VM's quota, like any guest's; the frame stays its own
    // for the run (still counted once the reservation is dropped).
    crate::quota::reserve(GUEST_VM, &crate::quota::FIRST_GUEST)
        .map_err(|_| GuestError::Hypercall("its quota could not be reserved"))?;
    set_up(&FIRST_GUEST)?;
    let ran = run(forward_hypercall);
    crate::quota::release(GUEST_VM);
    ran
}

/// Times the benchmark guest's null hypercalls, each from one VMCALL exit to the next (exit,
/// service, entry, the guest's two instructions), served in the core (`in_domain` false:
/// answered at once) or by the hypercall domain. Returns the samples in TSC ticks and how many
/// there are (one fewer than the hypercalls: each is the time between two exits).
pub fn bench_null_hypercall(
    in_domain: bool,
) -> Result<([u64; BENCH_HYPERCALLS], usize), GuestError> {
    set_up(&BENCH_GUEST)?;
    let mut samples = [0u64; BENCH_HYPERCALLS];
    let mut count = 0;
    let mut last = 0;
    run(|registers| {
        let now = crate::apic::tsc();
        if last != 0 && count < BENCH_HYPERCALLS {
            samples[count] = now - last;
            count += 1;
        }
        last = now;
        if in_domain {
            forward_hypercall(registers)
        } else {
            Ok(Some(0))
        }
    })?;
    if count + 1 < BENCH_HYPERCALLS {
        return Err(GuestError::UnexpectedExit(EXIT_HLT));
    }
    Ok((samples, count))
}

/// Sets up a fresh VMCS, EPT and guest memory holding `code` at [`GUEST_ENTRY`], and makes the
/// VMCS current on this CPU.
fn set_up(code: &[u8]) -> Result<(), GuestError> {
    let basic = VmxBasic::from_msr(read_msr(IA32_VMX_BASIC));
    let secondary_caps = read_msr(IA32_VMX_PROCBASED_CTLS2);
    // Secondary controls: enable EPT (bit 1), unrestricted guest (bit 7).
    let secondary = adjust_controls((1 << 1) | (1 << 7), secondary_caps)
        .map_err(|_| GuestError::Unsupported("EPT with unrestricted guest"))?;
    // Pin-based: external-interrupt exiting (bit 0), so the host keeps its timer.
    let pin = adjust_controls(1, read_msr(IA32_VMX_TRUE_PINBASED_CTLS))
        .map_err(|_| GuestError::Unsupported("external-interrupt exiting"))?;
    // Primary: HLT exiting (bit 7), secondary controls (bit 31).
    let primary = adjust_controls((1 << 7) | (1 << 31), read_msr(IA32_VMX_TRUE_PROCBASED_CTLS))
        .map_err(|_| GuestError::Unsupported("secondary controls"))?;
    // Exit: host address-space size (bit 9), acknowledge interrupt on exit off.
    let exit = adjust_controls(1 << 9, read_msr(IA32_VMX_TRUE_EXIT_CTLS))
        .map_err(|_| GuestError::Unsupported("64-bit host"))?;
    let entry = adjust_controls(0, read_msr(IA32_VMX_TRUE_ENTRY_CTLS))
        .map_err(|_| GuestError::Unsupported("entry controls"))?;

    let (vmcs, vmcs_ptr) = allocate(1)?;
    // SAFETY: a fresh page; its first 4 bytes take the VMCS revision identifier.
    unsafe { (vmcs_ptr as *mut u32).write(basic.revision) };
    let (guest_memory, guest_ptr) = allocate(GUEST_PAGES)?;
    // SAFETY: the guest memory block is GUEST_PAGES fresh pages; GUEST_ENTRY + 7 is inside.
    unsafe {
        core::ptr::copy_nonoverlapping(
            code.as_ptr(),
            guest_ptr.add(GUEST_ENTRY as usize),
            code.len(),
        )
    };
    let ept = build_ept(guest_memory, GUEST_PAGES)?;

    let failed: u8;
    // SAFETY: VMCLEAR then VMPTRLD of a page-aligned region holding the revision identifier;
    // the CPU is in VMX root operation.
    unsafe {
        core::arch::asm!("vmclear [{address}]", "vmptrld [{address}]", "setna {failed}",
                         address = in(reg) &vmcs, failed = out(reg_byte) failed, options(nostack));
    }
    if failed != 0 {
        return Err(GuestError::VmcsAccess(0));
    }

    // Controls.
    vmwrite(PIN_BASED_CONTROLS, u64::from(pin))?;
    vmwrite(PROC_BASED_CONTROLS, u64::from(primary))?;
    vmwrite(SECONDARY_CONTROLS, u64::from(secondary))?;
    vmwrite(EXIT_CONTROLS, u64::from(exit))?;
    vmwrite(ENTRY_CONTROLS, u64::from(entry))?;
    vmwrite(EXCEPTION_BITMAP, 0)?;
    vmwrite(EPT_POINTER, ept)?;
    vmwrite(VMCS_LINK_POINTER, u64::MAX)?;

    // Host state: this CPU as it runs now; VM exits land in `vmx_exit_stub`.
    let (gdtr, idtr) = (
        x86_64::instructions::tables::sgdt(),
        x86_64::instructions::tables::sidt(),
    );
    vmwrite(HOST_CR0, Cr0::read_raw())?;
    vmwrite(HOST_CR3, Cr3::read().0.start_address().as_u64())?;
    vmwrite(HOST_CR4, Cr4::read_raw())?;
    vmwrite(HOST_CS_SELECTOR, 0x08)?;
    vmwrite(HOST_SS_SELECTOR, 0x10)?;
    vmwrite(HOST_DS_SELECTOR, 0x10)?;
    vmwrite(HOST_ES_SELECTOR, 0x10)?;
    vmwrite(HOST_FS_SELECTOR, 0)?;
    vmwrite(HOST_GS_SELECTOR, 0)?;
    vmwrite(HOST_TR_SELECTOR, 0x28)?;
    vmwrite(HOST_FS_BASE, 0)?;
    vmwrite(HOST_GS_BASE, GsBase::read().as_u64())?;
    vmwrite(HOST_TR_BASE, crate::cpu::tss_base())?;
    vmwrite(HOST_GDTR_BASE, gdtr.base.as_u64())?;
    vmwrite(HOST_IDTR_BASE, idtr.base.as_u64())?;
    vmwrite(HOST_SYSENTER_CS, 0)?;
    vmwrite(HOST_SYSENTER_ESP, 0)?;
    vmwrite(HOST_SYSENTER_EIP, 0)?;
    vmwrite(HOST_RIP, vmx_exit_stub as *const () as u64)?;

    // Guest state: real mode, flat 64 KiB segments, paging and protection off (unrestricted
    // guest), CR0/CR4 as the fixed bits demand.
    const PE_PG: u64 = 1 | (1 << 31);
    let cr0_fixed0 = read_msr(IA32_VMX_CR0_FIXED0) & !PE_PG;
    let cr0 = (cr0_fixed0 | (1 << 4)) & read_msr(IA32_VMX_CR0_FIXED1);
    vmwrite(GUEST_CR0, cr0)?;
    vmwrite(GUEST_CR3, 0)?;
    vmwrite(GUEST_CR4, read_msr(IA32_VMX_CR4_FIXED0))?;
    for segment in 0..8u64 {
        // ES, CS, SS, DS, FS, GS, LDTR, TR: selector 0, base 0, limit 0xffff.
        let access = match segment {
            1 => 0x9b,     // CS: present, code, read, accessed
            6 => 0x1_0000, // LDTR: unusable
            7 => 0x8b,     // TR: present, 32-bit busy TSS
            _ => 0x93,     // data: present, read-write, accessed
        };
        vmwrite(GUEST_ES_SELECTOR + segment * 2, 0)?;
        vmwrite(GUEST_ES_BASE + segment * 2, 0)?;
        vmwrite(GUEST_ES_LIMIT + segment * 2, 0xffff)?;
        vmwrite(GUEST_ES_ACCESS + segment * 2, access)?;
    }
    vmwrite(GUEST_GDTR_BASE, 0)?;
    vmwrite(GUEST_GDTR_LIMIT, 0xffff)?;
    vmwrite(GUEST_IDTR_BASE, 0)?;
    vmwrite(GUEST_IDTR_LIMIT, 0xffff)?;
    vmwrite(GUEST_DR7, 0x400)?;
    vmwrite(GUEST_RSP, 0x8000)?;
    vmwrite(GUEST_RIP, GUEST_ENTRY)?;
    vmwrite(GUEST_RFLAGS, 0x2)?;
    vmwrite(GUEST_INTERRUPTIBILITY, 0)?;
    vmwrite(GUEST_ACTIVITY, 0)?;

    Ok(())
}

/// Runs the current VMCS's guest until it halts, calling `on_vmcall` at every VMCALL exit:
/// `Some(value)` completes the hypercall (RAX = value, RIP past the VMCALL), `None` leaves
/// the guest on its VMCALL to run it again.
fn run(
    mut on_vmcall: impl FnMut(&GuestRegisters) -> Result<Option<i64>, GuestError>,
) -> Result<(GuestRegisters, u32), GuestError> {
    let mut registers = GuestRegisters::default();
    let mut exits = 0;
    let mut launched = false;
    // A bound, so a guest that never halts cannot hang the core.
    while exits < 100_000 {
        let entry_failed = x86_64::instructions::interrupts::without_interrupts(|| {
            // SAFETY: the current VMCS is fully set up above; `vmx_enter` saves and restores
            // the host's callee-saved registers and returns after the next VM exit.
            unsafe { vmx_enter(&mut registers, u64::from(launched)) }
        });
        if entry_failed != 0 {
            return Err(GuestError::EntryFailed(vmread(VM_INSTRUCTION_ERROR)));
        }
        launched = true;
        exits += 1;
        match (vmread(EXIT_REASON) & 0xffff) as u32 {
            // The host's own interrupt arrived while the guest ran: interrupts were re-enabled
            // when `without_interrupts` returned, so it has been served; resume the guest.
            EXIT_EXTERNAL_INTERRUPT => {}
            EXIT_VMCALL => {
                if let Some(value) = on_vmcall(&registers)? {
                    registers.rax = value as u64;
                    let rip = vmread(GUEST_RIP) + vmread(EXIT_INSTRUCTION_LENGTH);
                    vmwrite(GUEST_RIP, rip)?;
                }
            }
            EXIT_HLT => return Ok((registers, exits)),
            other => return Err(GuestError::UnexpectedExit(other)),
        }
    }
    Err(GuestError::UnexpectedExit(EXIT_EXTERNAL_INTERRUPT))
}

/// A VMCALL exit as a message: sends the guest's hypercall to the hypercall domain. Returns
/// the value for the guest's RAX when the hypercall completed (a refusal becomes its error
/// code), or `None` when it must be retried (the guest's RIP stays on its VMCALL).
fn forward_hypercall(registers: &GuestRegisters) -> Result<Option<i64>, GuestError> {
    use ipc::hypercall::{Reply, Request};
    let request = Request::Hypercall {
        cpu: 0,
        vm: GUEST_VM,
        vcpu: 0,
        number: registers.rax,
        args: [
            registers.rdi,
            registers.rsi,
            registers.rdx,
            registers.r10,
            registers.r8,
            registers.r9,
        ],
    };
    use crate::domain::TypedCallError;
    let answer = match crate::domain::typed_call::<Reply>(HYPERCALL_DOMAIN, &request) {
        Ok(answer) => answer,
        Err(TypedCallError::Encode) => {
            return Err(GuestError::Hypercall("request does not encode"));
        }
        // The hypercall domain restarted under the call (or answered a reply that does not
        // decode, and was recovered for it): the guest runs its VMCALL again.
        Err(TypedCallError::Status(microvisor_abi::Status::PeerRestarted)) => return Ok(None),
        Err(TypedCallError::Status(_)) => {
            return Err(GuestError::Hypercall("hypercall domain unreachable"));
        }
    };
    Ok(match answer {
        Ok(Reply::Complete { value }) => Some(value),
        // Refused: the documented error code, -(index + 1) (docs/hypercall-abi.md).
        Ok(Reply::Error(error)) => Some(error.guest_code()),
        // YIELD completed; there is one vCPU, so it simply continues.
        Ok(Reply::Blocked) => Some(0),
        // A service restarted under the hypercall domain: the VMCALL runs again.
        Ok(Reply::Incomplete) => None,
        // Not an answer to a single hypercall: the hypercall domain misbehaved.
        Ok(Reply::Multicall(_) | Reply::Exit(_)) | Err(_) => {
            Some(ipc::hypercall::HypercallError::Internal.guest_code())
        }
    })
}
