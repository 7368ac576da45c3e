//! The virtual CPU a guest sees beyond what VMX switches by itself: which CR4 bits the core
//! keeps, how the guest's task priority (CR8, virtualized by the TPR shadow) gates virtual
//! interrupts, and which exits are instructions the virtual CPU does not offer.
//!
//! Threat model: guests are malicious. Every piece of CPU state a guest can reach is either
//! switched per vCPU (it survives the guest's exits and never reaches another VM), virtualized
//! (the guest sees its own copy, hardware the core depends on is untouched) or hidden (the
//! access exits and the core stops the VM). The full table is in `docs/threat-model.md`; the
//! kernel applies it in `guest.rs` and `guest_state.rs`. Everything here is pure and
//! host-tested (Intel SDM Vol. 3C, 25.3 and 29.1).

/// CR4 bits a guest may change itself (SDM Vol. 3A, 2.5): TSD (2), PSE (4), PAE (5), OSFXSR
/// (9), OSXMMEXCPT (10), the ones the virtual CPU's CPUID backs (TSC, FXSR, SSE; PAE is needed
/// by 64-bit mode). Every other bit is the core's: VMXE (the guest must not see or clear it),
/// OSXSAVE (XCR0 and the AVX state are not switched), PCE (performance counters), PKE (PKRU is
/// not switched), FSGSBASE, UMIP, LA57, CET, DE, MCE, PGE, SMEP, SMAP, ... A guest that writes
/// a different value to one of them exits (control-register access) and is stopped.
pub const CR4_GUEST_BITS: u64 = (1 << 2) | (1 << 4) | (1 << 5) | (1 << 9) | (1 << 10);

/// The CR4 guest/host mask: set bits are owned by the core (SDM Vol. 3C, 25.3).
pub const CR4_GUEST_HOST_MASK: u64 = !CR4_GUEST_BITS;

/// The CR4 a guest starts with and reads back for the core's bits (the read shadow): PAE,
/// OSFXSR and OSXMMEXCPT, without the VMXE that VMX forces into the real CR4.
pub const CR4_GUEST_VIEW: u64 = (1 << 5) | (1 << 9) | (1 << 10);

/// Whether a guest's `MOV CR4, value` would change a bit the core owns (it then exits).
pub const fn cr4_write_exits(value: u64) -> bool {
    (value ^ CR4_GUEST_VIEW) & CR4_GUEST_HOST_MASK != 0
}

/// Byte offset of the virtual task-priority register in the virtual-APIC page (SDM Vol. 3C,
/// 29.1.1); a guest's `MOV CR8` reads and writes bits 7:4 there when the TPR shadow is on.
pub const VTPR_OFFSET: usize = 0x80;

/// What to do with the highest pending virtual interrupt, given the guest's task priority.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TprGate {
    /// Its priority class is above the guest's TPR: inject it (when interrupts are on).
    Deliver,
    /// The guest's TPR masks it: enter with this TPR threshold, so that the guest's lowering
    /// its CR8 below the vector's class exits (TPR below threshold) and it is injected then.
    Masked {
        /// The value for the TPR-threshold VMCS field.
        threshold: u32,
    },
}

/// Decides whether `vector` may be injected while the guest's virtual TPR is `vtpr` (the byte
/// at [`VTPR_OFFSET`]): a local APIC delivers a fixed interrupt only if its priority class
/// (vector bits 7:4) is above the TPR's class (bits 7:4) (SDM Vol. 3A, 11.8.3.1). The threshold
/// of a masked vector is its class, which never exceeds the TPR's class, as VM entry requires
/// without virtual-interrupt delivery (SDM Vol. 3C, 27.2.1.1).
pub const fn tpr_gate(vector: u8, vtpr: u8) -> TprGate {
    let class = vector >> 4;
    if class > vtpr >> 4 {
        TprGate::Deliver
    } else {
        TprGate::Masked {
            threshold: class as u32,
        }
    }
}

/// A VM exit for an instruction the virtual CPU does not offer: why the core stops the VM.
/// `None` for exits the core serves (or that are not instruction exits at all).
pub const fn refused_instruction(reason: u32) -> Option<&'static str> {
    Some(match reason {
        11 => "GETSEC is not offered",
        15 => "RDPMC is not offered (the performance counters are the host's)",
        19..=27 | 50 | 53 | 59 => "VMX instructions are not offered",
        60 => "SGX (ENCLS) is not offered",
        36 | 39 => "MONITOR/MWAIT are not offered (CPUID does not advertise them)",
        55 => "XSETBV is not offered (XCR0 stays the host's; CPUID offers no XSAVE)",
        _ => return None,
    })
}

/// Why the core stops a VM whose guest raised exception `vector` (every exception exits; the
/// exception bitmap is all ones): the vector's mnemonic, for the summary's `stop_reason`.
pub const fn exception_reason(vector: u8) -> &'static str {
    match vector {
        0 => "it raised an exception: #DE (divide error)",
        1 => "it raised an exception: #DB (debug)",
        3 => "it raised an exception: #BP (breakpoint)",
        4 => "it raised an exception: #OF (overflow)",
        5 => "it raised an exception: #BR (bound range)",
        6 => "it raised an exception: #UD (invalid opcode)",
        7 => "it raised an exception: #NM (device not available)",
        8 => "it raised an exception: #DF (double fault)",
        10 => "it raised an exception: #TS (invalid TSS)",
        11 => "it raised an exception: #NP (segment not present)",
        12 => "it raised an exception: #SS (stack fault)",
        13 => "it raised an exception: #GP (general protection)",
        14 => "it raised an exception: #PF (page fault)",
        16 => "it raised an exception: #MF (x87 error)",
        17 => "it raised an exception: #AC (alignment check)",
        18 => "it raised an exception: #MC (machine check)",
        19 => "it raised an exception: #XM (SIMD error)",
        20 => "it raised an exception: #VE (virtualization)",
        21 => "it raised an exception: #CP (control protection)",
        _ => "it raised an exception",
    }
}

/// Exit reasons of instructions the core completes as no-ops: INVD (13) would discard the
/// host's dirty cache lines and WBINVD (54) flushes every cache the CPU shares; guest memory
/// is write-back and coherent, so neither has anything to do for a guest.
pub const fn is_cache_flush(reason: u32) -> bool {
    matches!(reason, 13 | 54)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cr4_guest_bits_are_few_and_vmxe_is_the_cores() {
        assert_eq!(CR4_GUEST_HOST_MASK & (1 << 13), 1 << 13, "VMXE is owned");
        assert_eq!(CR4_GUEST_HOST_MASK & (1 << 18), 1 << 18, "OSXSAVE is owned");
        assert_eq!(CR4_GUEST_HOST_MASK & (1 << 8), 1 << 8, "PCE is owned");
        assert_eq!(CR4_GUEST_HOST_MASK & (1 << 22), 1 << 22, "PKE is owned");
        assert_eq!(
            CR4_GUEST_HOST_MASK & (1 << 16),
            1 << 16,
            "FSGSBASE is owned"
        );
        // The view a guest starts with is all guest bits: it can write it back unchanged.
        assert_eq!(CR4_GUEST_VIEW & CR4_GUEST_HOST_MASK, 0);
        assert!(!cr4_write_exits(CR4_GUEST_VIEW));
        assert!(!cr4_write_exits(CR4_GUEST_VIEW | (1 << 2) | (1 << 4)));
        assert!(!cr4_write_exits(CR4_GUEST_VIEW & !(1 << 9)));
        assert!(cr4_write_exits(CR4_GUEST_VIEW | (1 << 18)));
        assert!(cr4_write_exits(CR4_GUEST_VIEW | (1 << 8)));
        assert!(cr4_write_exits(CR4_GUEST_VIEW | (1 << 13)));
    }

    #[test]
    fn tpr_masks_vectors_at_or_below_its_class() {
        // TPR 0 masks nothing the core injects (vectors 32.. are class 2 and up).
        assert_eq!(tpr_gate(32, 0), TprGate::Deliver);
        assert_eq!(tpr_gate(0xef, 0xd0), TprGate::Deliver);
        // The same class is masked: 0x30..0x3f under TPR 0x30..0x3f.
        assert_eq!(tpr_gate(0x3f, 0x30), TprGate::Masked { threshold: 3 });
        assert_eq!(tpr_gate(0x3f, 0x3f), TprGate::Masked { threshold: 3 });
        assert_eq!(tpr_gate(0x40, 0x3f), TprGate::Deliver);
        // CR8 = 15 masks every vector; the threshold never exceeds the TPR's class.
        for vector in 32..=255u8 {
            match tpr_gate(vector, 0xf0) {
                TprGate::Masked { threshold } => assert!(threshold <= 0xf),
                TprGate::Deliver => panic!("vector {vector} delivered under TPR 0xf0"),
            }
        }
    }

    #[test]
    fn refused_and_flushed_instructions() {
        assert!(refused_instruction(55).is_some(), "XSETBV");
        assert!(refused_instruction(15).is_some(), "RDPMC");
        assert!(refused_instruction(36).is_some() && refused_instruction(39).is_some());
        assert!(refused_instruction(20).is_some(), "VMLAUNCH");
        // Served exits are not refused here.
        for served in [0, 1, 7, 10, 12, 18, 28, 29, 30, 31, 32, 43, 48, 52] {
            assert_eq!(refused_instruction(served), None, "exit {served}");
        }
        assert!(is_cache_flush(13) && is_cache_flush(54) && !is_cache_flush(12));
    }

    #[test]
    fn exception_reasons_name_the_vector() {
        assert!(exception_reason(6).contains("#UD"));
        assert!(exception_reason(13).contains("#GP"));
        assert!(exception_reason(14).contains("#PF"));
        for vector in 0..=255u8 {
            assert!(exception_reason(vector).starts_with("it raised an exception"));
        }
    }
}
