//! VMX root operation on every CPU: the first step of the VMX slice (Intel SDM Vol. 3C,
//! 24.7 "Enabling and Entering VMX Operation").
//!
//! Each CPU checks CPUID for VMX, prepares IA32_FEATURE_CONTROL (lock with VMXON enabled, or
//! report that firmware disabled it), applies the CR0/CR4 fixed bits (CR4.VMXE among them),
//! writes the VMCS revision into a zeroed 4 KiB VMXON region and executes VMXON. Where the
//! processor has no VMX (QEMU with TCG) the run reports VMX unavailable; that is not a failure.
//! A CPU in VMX root operation blocks INIT, so the bootstrap processor enters it only after
//! every application processor has started.

use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use microvisor::vmx::{FeatureControlAction, VmxBasic, apply_fixed_bits, feature_control_action};
use x86_64::registers::control::{Cr0, Cr4, Cr4Flags};
use x86_64::registers::model_specific::Msr;

use crate::paging;

const IA32_FEATURE_CONTROL: u32 = 0x3a;
const IA32_VMX_BASIC: u32 = 0x480;
const IA32_VMX_CR0_FIXED0: u32 = 0x486;
const IA32_VMX_CR0_FIXED1: u32 = 0x487;
const IA32_VMX_CR4_FIXED0: u32 = 0x488;
const IA32_VMX_CR4_FIXED1: u32 = 0x489;

static CPUS_IN_ROOT: AtomicUsize = AtomicUsize::new(0);
static REVISION: AtomicU32 = AtomicU32::new(0);

/// Why this CPU is not in VMX root operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxUnavailable {
    /// CPUID.1:ECX.VMX is 0 (QEMU TCG, or a processor without VMX).
    NoVmx,
    /// IA32_FEATURE_CONTROL is locked with VMXON disabled (a firmware setting).
    DisabledByFirmware,
    /// The VMCS region size reported is larger than a page.
    RegionTooLarge,
    /// VMXON itself failed (VMfailInvalid or VMfailValid).
    VmxonFailed,
    /// No memory for the VMXON region.
    OutOfMemory,
}

impl VmxUnavailable {
    /// A short reason for the summary.
    pub const fn reason(self) -> &'static str {
        match self {
            Self::NoVmx => "no VMX on this processor (CPUID.1:ECX.VMX = 0)",
            Self::DisabledByFirmware => "VMX disabled by firmware (IA32_FEATURE_CONTROL locked)",
            Self::RegionTooLarge => "VMCS region larger than a page",
            Self::VmxonFailed => "VMXON failed",
            Self::OutOfMemory => "no memory for the VMXON region",
        }
    }
}

fn read_msr(index: u32) -> u64 {
    // SAFETY: only called after CPUID reported VMX, which implies these architectural MSRs
    // (IA32_FEATURE_CONTROL and the IA32_VMX_* capability MSRs) exist.
    unsafe { Msr::new(index).read() }
}

/// Puts this CPU into VMX root operation.
pub fn enter_root() -> Result<u32, VmxUnavailable> {
    let has_vmx = raw_cpuid::CpuId::new()
        .get_feature_info()
        .is_some_and(|features| features.has_vmx());
    if !has_vmx {
        return Err(VmxUnavailable::NoVmx);
    }
    match feature_control_action(read_msr(IA32_FEATURE_CONTROL)) {
        FeatureControlAction::Ready => {}
        // SAFETY: IA32_FEATURE_CONTROL is unlocked, so writing it is allowed; the value only
        // enables VMXON outside SMX and locks the MSR.
        FeatureControlAction::Write(value) => unsafe {
            Msr::new(IA32_FEATURE_CONTROL).write(value)
        },
        FeatureControlAction::DisabledByFirmware => return Err(VmxUnavailable::DisabledByFirmware),
    }
    let basic = VmxBasic::from_msr(read_msr(IA32_VMX_BASIC));
    if basic.region_bytes > 4096 {
        return Err(VmxUnavailable::RegionTooLarge);
    }
    let cr0 = apply_fixed_bits(
        Cr0::read_raw(),
        read_msr(IA32_VMX_CR0_FIXED0),
        read_msr(IA32_VMX_CR0_FIXED1),
    );
    let cr4 = apply_fixed_bits(
        Cr4::read_raw() | Cr4Flags::VIRTUAL_MACHINE_EXTENSIONS.bits(),
        read_msr(IA32_VMX_CR4_FIXED0),
        read_msr(IA32_VMX_CR4_FIXED1),
    );
    // SAFETY: the fixed-bit MSRs only force bits VMX operation requires (e.g. CR0.NE, CR0.PE,
    // CR0.PG, CR4.VMXE), all compatible with the core's long-mode setup.
    unsafe {
        Cr0::write_raw(cr0);
        Cr4::write_raw(cr4);
    }
    let region = paging::allocate_zeroed(1).ok_or(VmxUnavailable::OutOfMemory)?;
    // SAFETY: a fresh zeroed page; the first 4 bytes take the VMCS revision identifier.
    unsafe { region.as_mut_ptr::<u32>().write(basic.revision) };
    let physical = region.as_u64() - paging::PHYS_OFFSET;
    let failed: u8;
    // SAFETY: VMXON with the physical address of a page-aligned region holding the revision
    // identifier; CR0/CR4 satisfy the fixed bits and IA32_FEATURE_CONTROL allows VMXON.
    // CF or ZF set afterwards means VMXON failed and nothing changed.
    unsafe {
        core::arch::asm!("vmxon [{address}]", "setna {failed}", address = in(reg) &physical,
                         failed = out(reg_byte) failed, options(nostack));
    }
    if failed != 0 {
        return Err(VmxUnavailable::VmxonFailed);
    }
    CPUS_IN_ROOT.fetch_add(1, Ordering::AcqRel);
    REVISION.store(basic.revision, Ordering::Relaxed);
    Ok(basic.revision)
}

/// CPUs in VMX root operation, and the VMCS revision.
pub fn status() -> (usize, u32) {
    (
        CPUS_IN_ROOT.load(Ordering::Acquire),
        REVISION.load(Ordering::Relaxed),
    )
}
