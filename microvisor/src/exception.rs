//! Names of the x86 exception vectors and decoding of their error codes (Intel SDM Vol. 3A,
//! 6.15 "Exception and Interrupt Reference").

/// Mnemonic and description of an exception vector (0-31), or `None` for other vectors.
pub const fn name(vector: u8) -> Option<(&'static str, &'static str)> {
    Some(match vector {
        0 => ("#DE", "divide error"),
        1 => ("#DB", "debug"),
        2 => ("NMI", "non-maskable interrupt"),
        3 => ("#BP", "breakpoint"),
        4 => ("#OF", "overflow"),
        5 => ("#BR", "bound range exceeded"),
        6 => ("#UD", "invalid opcode"),
        7 => ("#NM", "device not available"),
        8 => ("#DF", "double fault"),
        10 => ("#TS", "invalid TSS"),
        11 => ("#NP", "segment not present"),
        12 => ("#SS", "stack-segment fault"),
        13 => ("#GP", "general protection"),
        14 => ("#PF", "page fault"),
        16 => ("#MF", "x87 floating-point error"),
        17 => ("#AC", "alignment check"),
        18 => ("#MC", "machine check"),
        19 => ("#XM", "SIMD floating-point exception"),
        20 => ("#VE", "virtualization exception"),
        21 => ("#CP", "control protection"),
        28 => ("#HV", "hypervisor injection"),
        29 => ("#VC", "VMM communication"),
        30 => ("#SX", "security exception"),
        9 | 15 | 22..=27 | 31 => ("#RES", "reserved vector"),
        _ => return None,
    })
}

/// Whether the CPU pushes an error code for this exception vector.
pub const fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// The bits of a page-fault error code, spelled out (SDM Vol. 3A, Figure 4-12).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFaultCause {
    /// The page was present (a protection violation) rather than not present.
    pub present: bool,
    /// The access was a write.
    pub write: bool,
    /// The access came from user mode (CPL 3).
    pub user: bool,
    /// A reserved bit was set in a paging-structure entry.
    pub reserved_bit: bool,
    /// The access was an instruction fetch.
    pub instruction_fetch: bool,
}

impl PageFaultCause {
    /// Decodes a page-fault error code.
    pub const fn from_error_code(code: u64) -> Self {
        Self {
            present: code & 1 != 0,
            write: code & 2 != 0,
            user: code & 4 != 0,
            reserved_bit: code & 8 != 0,
            instruction_fetch: code & 16 != 0,
        }
    }
}

impl core::fmt::Display for PageFaultCause {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let access = if self.instruction_fetch {
            "instruction fetch"
        } else if self.write {
            "write"
        } else {
            "read"
        };
        let mode = if self.user { "user" } else { "supervisor" };
        let why = if self.reserved_bit {
            "reserved bit set"
        } else if self.present {
            "protection violation"
        } else {
            "page not present"
        };
        write!(f, "{mode} {access}, {why}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_exception_vector_has_a_name_and_others_none() {
        for vector in 0..32 {
            assert!(name(vector).is_some(), "vector {vector}");
        }
        assert_eq!(name(32), None);
        assert_eq!(name(6).unwrap().0, "#UD");
        assert_eq!(name(14).unwrap().0, "#PF");
    }

    #[test]
    fn error_code_vectors() {
        let with: std::vec::Vec<u8> = (0..32).filter(|&v| has_error_code(v)).collect();
        assert_eq!(with, [8, 10, 11, 12, 13, 14, 17, 21, 29, 30]);
    }

    #[test]
    fn page_fault_decoding() {
        let cause = PageFaultCause::from_error_code(0b10);
        assert!(cause.write && !cause.present && !cause.user);
        assert_eq!(
            std::format!("{cause}"),
            "supervisor write, page not present"
        );
        assert_eq!(
            std::format!("{}", PageFaultCause::from_error_code(0b10101)),
            "user instruction fetch, protection violation"
        );
    }
}
