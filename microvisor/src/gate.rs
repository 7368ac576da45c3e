//! Encoding of 64-bit IDT gate descriptors (Intel SDM Vol. 3A, 6.14.1, Figure 6-8).
//!
//! The core installs raw assembly stubs for all 256 vectors, so it builds its IDT entries
//! from addresses rather than typed handler functions; this is the arithmetic, host-tested.

/// One 16-byte IDT entry, as two little-endian quadwords.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C, align(16))]
pub struct GateDescriptor {
    /// Offset 15:0, selector, IST, type/DPL/P, offset 31:16.
    pub low: u64,
    /// Offset 63:32 and reserved zero bits.
    pub high: u64,
}

impl GateDescriptor {
    /// A present 64-bit interrupt gate (IF cleared on entry) to `handler` in code segment
    /// `selector`, switching to interrupt-stack-table slot `ist` (1-7, or 0 for none), callable
    /// by software interrupts from privilege level `dpl` and more privileged levels.
    pub const fn interrupt_gate(handler: u64, selector: u16, ist: u8, dpl: u8) -> Self {
        const PRESENT: u64 = 1 << 47;
        const TYPE_INTERRUPT_GATE: u64 = 0xE << 40;
        let low = (handler & 0xffff)
            | ((selector as u64) << 16)
            | (((ist & 0x7) as u64) << 32)
            | TYPE_INTERRUPT_GATE
            | (((dpl & 0x3) as u64) << 45)
            | PRESENT
            | (((handler >> 16) & 0xffff) << 48);
        Self {
            low,
            high: handler >> 32,
        }
    }

    /// The handler address the gate points to.
    pub const fn handler(&self) -> u64 {
        (self.low & 0xffff) | ((self.low >> 48) << 16) | (self.high << 32)
    }

    /// The interrupt-stack-table slot.
    pub const fn ist(&self) -> u8 {
        ((self.low >> 32) & 0x7) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_a_known_gate() {
        // Handler 0xffffffff80101234, selector 8, IST 1, DPL 0.
        let gate = GateDescriptor::interrupt_gate(0xffff_ffff_8010_1234, 8, 1, 0);
        assert_eq!(gate.low, 0x8010_8e01_0008_1234);
        assert_eq!(gate.high, 0xffff_ffff);
        assert_eq!(gate.handler(), 0xffff_ffff_8010_1234);
        assert_eq!(gate.ist(), 1);
    }

    #[test]
    fn dpl_three_sets_both_bits() {
        let gate = GateDescriptor::interrupt_gate(0x1000, 8, 0, 3);
        assert_eq!((gate.low >> 45) & 3, 3);
        assert_eq!(gate.ist(), 0);
    }
}
