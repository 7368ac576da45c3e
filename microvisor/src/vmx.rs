//! VMX arithmetic that needs no hardware: decoding the VMX capability MSRs and choosing
//! controls from them (Intel SDM Vol. 3D, Appendix A "VMX Capability Reporting Facility").
//!
//! The kernel reads the MSRs and executes VMXON; everything here is pure and host-tested.

/// IA32_VMX_BASIC (SDM Vol. 3D, A.1), decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmxBasic {
    /// VMCS revision identifier (bits 30:0): written into the VMXON region and every VMCS.
    pub revision: u32,
    /// Bytes to allocate for the VMXON region and a VMCS (bits 44:32), at most 4096.
    pub region_bytes: u32,
    /// The TRUE_*_CTLS capability MSRs exist (bit 55) and must be used for the controls.
    pub true_controls: bool,
    /// Memory type for the VMCS and the structures it references (bits 53:50; 6 = write-back).
    pub memory_type: u8,
}

impl VmxBasic {
    /// Decodes the MSR value.
    pub const fn from_msr(value: u64) -> Self {
        Self {
            revision: (value & 0x7fff_ffff) as u32,
            region_bytes: ((value >> 32) & 0x1fff) as u32,
            true_controls: value & (1 << 55) != 0,
            memory_type: ((value >> 50) & 0xf) as u8,
        }
    }
}

/// A control the caller wants but the processor cannot set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnsupportedControls {
    /// The requested bits that must stay 0 on this processor.
    pub bits: u32,
}

/// Chooses a VM-execution, VM-exit or VM-entry control value from its capability MSR (a
/// TRUE one where IA32_VMX_BASIC bit 55 says they exist): bits 31:0 are the allowed-0
/// settings (a 1 there means the control must be 1), bits 63:32 the allowed-1 settings (a 0
/// there means it must be 0). `wanted` are the controls the caller needs; the result adds the
/// required ones. Asking for a control the processor cannot set is an error, not a silent 0.
pub const fn adjust_controls(wanted: u32, capability: u64) -> Result<u32, UnsupportedControls> {
    let must_be_one = capability as u32;
    let may_be_one = (capability >> 32) as u32;
    let unsupported = wanted & !may_be_one;
    if unsupported != 0 {
        return Err(UnsupportedControls { bits: unsupported });
    }
    Ok(wanted | must_be_one)
}

/// Applies IA32_VMX_CR0_FIXED0/1 or CR4_FIXED0/1 (SDM Vol. 3D, A.7 and A.8) to a control
/// register value: bits set in `fixed0` must be 1, bits clear in `fixed1` must be 0.
pub const fn apply_fixed_bits(value: u64, fixed0: u64, fixed1: u64) -> u64 {
    (value | fixed0) & fixed1
}

/// IA32_FEATURE_CONTROL (MSR 0x3a) bits that matter for VMXON outside SMX.
pub mod feature_control {
    /// Lock: once set, the MSR cannot be written until reset.
    pub const LOCK: u64 = 1 << 0;
    /// VMXON allowed outside SMX operation.
    pub const VMX_OUTSIDE_SMX: u64 = 1 << 2;
}

/// What to do with IA32_FEATURE_CONTROL before VMXON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureControlAction {
    /// Already locked with VMXON enabled: nothing to do.
    Ready,
    /// Unlocked: write this value (enable VMXON outside SMX, then lock).
    Write(u64),
    /// Locked by firmware with VMXON disabled: VMX cannot be used until the firmware setting
    /// changes (a BIOS option on real machines).
    DisabledByFirmware,
}

/// Decides how to prepare IA32_FEATURE_CONTROL holding `value`.
pub const fn feature_control_action(value: u64) -> FeatureControlAction {
    use feature_control::{LOCK, VMX_OUTSIDE_SMX};
    if value & LOCK == 0 {
        FeatureControlAction::Write(value | LOCK | VMX_OUTSIDE_SMX)
    } else if value & VMX_OUTSIDE_SMX != 0 {
        FeatureControlAction::Ready
    } else {
        FeatureControlAction::DisabledByFirmware
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_decodes_revision_size_and_true_controls() {
        // bochs corei7_skylake_x-style value: revision 0x1, 4096-byte regions, WB, TRUE ctls.
        let basic = VmxBasic::from_msr((1 << 55) | (6 << 50) | (0x1000 << 32) | 0x1);
        assert_eq!(
            basic,
            VmxBasic {
                revision: 1,
                region_bytes: 4096,
                true_controls: true,
                memory_type: 6
            }
        );
        assert!(!VmxBasic::from_msr(0x8000_0001).true_controls);
        assert_eq!(
            VmxBasic::from_msr(0x8000_0001).revision,
            1,
            "bit 31 is not part of the revision"
        );
    }

    #[test]
    fn controls_add_required_bits_and_refuse_unsupported_ones() {
        // Must be one: bits 1, 2; may be one: bits 0..=7.
        let capability = (0xffu64 << 32) | 0b110;
        assert_eq!(adjust_controls(0b1000_0001, capability), Ok(0b1000_0111));
        assert_eq!(
            adjust_controls(1 << 9, capability),
            Err(UnsupportedControls { bits: 1 << 9 })
        );
        assert_eq!(adjust_controls(0, capability), Ok(0b110));
    }

    #[test]
    fn fixed_bits_force_ones_and_zeros() {
        assert_eq!(apply_fixed_bits(0b0011, 0b0100, 0b1110), 0b0110);
    }

    #[test]
    fn feature_control_decisions() {
        use feature_control::{LOCK, VMX_OUTSIDE_SMX};
        assert_eq!(
            feature_control_action(0),
            FeatureControlAction::Write(LOCK | VMX_OUTSIDE_SMX)
        );
        assert_eq!(
            feature_control_action(LOCK | VMX_OUTSIDE_SMX),
            FeatureControlAction::Ready
        );
        assert_eq!(
            feature_control_action(LOCK),
            FeatureControlAction::DisabledByFirmware
        );
    }
}
