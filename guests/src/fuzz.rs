//! The fuzzing guest's plan: seeded values for every piece of CPU state a VM may use, seeded
//! random hypercalls and exits, and the instruction the VM must be stopped for.
//!
//! Every round a vCPU writes values tagged with (seed, VM, vCPU, round) into CR2, CR8,
//! DR0-DR3, DR6, DR7, XMM0-XMM15, MXCSR, the GS base and IA32_KERNEL_GS_BASE (through SWAPGS),
//! makes random hypercalls, CPUID and port exits, yields so that other VMs and vCPUs run on its
//! CPU, and reads everything back: a value that changed is another VM's (or the core's) state
//! leaking in, or its own lost at an exit. A VM told to end with a forbidden instruction
//! executes one (an MSR, XSETBV, RDPMC, an owned CR4 bit, RDTSCP, MONITOR/MWAIT, VMXOFF, MMIO
//! or unbacked memory) and must be stopped by the core; if it is not, it fails.
//!
//! Everything here is plain data, host-tested; `src/bin/fuzz.rs` executes it.

use ipc::hypercall as hc;

/// Start parameter 0: the seed (0 = [`DEFAULT_SEED`]).
pub const DEFAULT_SEED: u64 = 0x7a7a_7566_2d76_6d00;
/// Start parameter 1: rounds per vCPU (0 = [`DEFAULT_ROUNDS`]).
pub const DEFAULT_ROUNDS: u64 = 16;
/// Random hypercalls per round.
pub const CALLS_PER_ROUND: u64 = 6;
/// Random CPUID and port exits per round.
pub const EXITS_PER_ROUND: u64 = 4;

/// SplitMix64: the guest's deterministic random numbers.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` mixed with `stream` (e.g. VM, vCPU and round).
    pub fn new(seed: u64, stream: u64) -> Rng {
        let mut rng = Rng(seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        rng.next_u64();
        rng
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `bound` (> 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }
}

/// DR6 bits a guest can set and read back: B0-B3, BD, BS, BT.
pub const DR6_WRITABLE: u64 = 0xe00f;
/// DR6's value with none of them set (reserved bits read as 1).
pub const DR6_RESET: u64 = 0xffff_0ff0;

/// The values one vCPU writes in one round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tags {
    /// CR2.
    pub cr2: u64,
    /// CR8 (0..=15).
    pub cr8: u64,
    /// DR0-DR3: canonical higher-half addresses no guest touches.
    pub debug: [u64; 4],
    /// DR6.
    pub dr6: u64,
    /// DR7: breakpoints enabled on `debug`'s addresses, never I/O breakpoints, no GD.
    pub dr7: u64,
    /// MXCSR: every exception masked, random sticky flags, rounding and flush-to-zero.
    pub mxcsr: u32,
    /// XMM0-XMM15, two words each.
    pub xmm: [u64; 32],
    /// The word the GS base points at (the GS slot holds it).
    pub gs_magic: u64,
    /// The word IA32_KERNEL_GS_BASE points at (the kernel-GS slot holds it).
    pub kernel_gs_magic: u64,
}

impl Tags {
    /// The values vCPU `vcpu` of VM `vm` writes in round `round`. Round 0 raises CR8 to 15,
    /// which masks every interrupt class: were it the real TPR, the core's own timer would be
    /// masked on that CPU.
    pub fn new(seed: u64, vm: u16, vcpu: u16, round: u64) -> Tags {
        let stream = (u64::from(vm) << 48) | (u64::from(vcpu) << 40) | round;
        let mut rng = Rng::new(seed, stream);
        let cr2 = rng.next_u64();
        let cr8 = if round == 0 { 15 } else { rng.below(16) };
        let mut debug = [0u64; 4];
        for (index, address) in debug.iter_mut().enumerate() {
            // Canonical, above 0xffff_8000_0000_0000, 8-byte aligned: never mapped in a guest.
            *address =
                0xffff_8000_0000_0000 | (rng.next_u64() & 0x7fff_ffff_ffe0) | (index as u64 * 8);
        }
        let dr6 = DR6_RESET | (rng.next_u64() & DR6_WRITABLE);
        let dr7 = dr7_value(&mut rng);
        let mxcsr = 0x1f80 | (rng.next_u64() as u32 & 0xe03f);
        let mut xmm = [0u64; 32];
        xmm.iter_mut().for_each(|word| *word = rng.next_u64());
        Tags {
            cr2,
            cr8,
            debug,
            dr6,
            dr7,
            mxcsr,
            xmm,
            gs_magic: rng.next_u64(),
            kernel_gs_magic: rng.next_u64(),
        }
    }
}

/// A DR7 that enables breakpoints (local and global bits at random) with R/W in {execute,
/// write, read-write} and lengths valid for each (execute needs length 1), bit 10 set as DR7
/// reads it, GD (13) clear so debug-register accesses do not trap.
fn dr7_value(rng: &mut Rng) -> u64 {
    let mut dr7 = 0x400 | (rng.next_u64() & 0xff);
    for breakpoint in 0..4 {
        let (rw, len) = match rng.below(3) {
            0 => (0b00, 0b00),
            1 => (0b01, rng.below(4)),
            _ => (0b11, rng.below(4)),
        };
        dr7 |= (rw | (len << 2)) << (16 + 4 * breakpoint);
    }
    dr7
}

/// Where a vCPU's GS and kernel-GS slots are in the guest's slot array (words): unique per
/// VM and vCPU, so a GS base leaking from another VM points at a slot this VM never wrote.
pub const fn gs_slots(vm: u16, vcpu: u16) -> (usize, usize) {
    let base = ((vm as usize % 32) * 4 + (vcpu as usize % 4)) * 2;
    (base, base + 1)
}

/// Words in the slot array.
pub const GS_SLOT_WORDS: usize = 32 * 4 * 2;

/// A random hypercall: (number, arguments). Memory calls stay in the window (the VM's RAM
/// holds its own code and stacks), timers far in the future, everything else at random; the
/// answer must be a value or a documented error, whatever it is.
pub fn random_call(rng: &mut Rng, window_gfn: u64) -> (u64, [u64; 6]) {
    const NUMBERS: [u64; 14] = [
        hc::NULL,
        hc::TIMER_ONESHOT,
        hc::MEMORY_POPULATE,
        hc::MEMORY_RELEASE,
        hc::GRANT,
        hc::QUERY_FRAME,
        hc::MAP_GRANT,
        hc::UNMAP_GRANT,
        hc::EVTCHN_ALLOC,
        hc::EVTCHN_SEND,
        hc::EVTCHN_CLOSE,
        hc::GRANT_REVOKE,
        hc::VM_STATUS,
        hc::VM_DESTROY,
    ];
    let number = NUMBERS[rng.below(NUMBERS.len() as u64) as usize];
    let small = |rng: &mut Rng| rng.below(72);
    let gfn = window_gfn + rng.below(hc::GFN_LIMIT.saturating_sub(window_gfn).max(1));
    let args = match number {
        hc::TIMER_ONESHOT => [
            (1 << 40) | rng.below(1 << 20),
            32 + rng.below(224),
            0,
            0,
            0,
            0,
        ],
        hc::MEMORY_POPULATE | hc::MEMORY_RELEASE | hc::UNMAP_GRANT => [gfn, 0, 0, 0, 0, 0],
        hc::GRANT | hc::MAP_GRANT | hc::GRANT_REVOKE => {
            [rng.below(1 << 12), small(rng), 0, 0, 0, 0]
        }
        hc::QUERY_FRAME => [rng.below(1 << 12), 0, 0, 0, 0, 0],
        hc::EVTCHN_ALLOC | hc::EVTCHN_SEND | hc::EVTCHN_CLOSE => [small(rng), 0, 0, 0, 0, 0],
        hc::VM_STATUS | hc::VM_DESTROY => [small(rng), 0, 0, 0, 0, 0],
        _ => [0; 6],
    };
    (number, args)
}

/// A random exit: `Cpuid(leaf, subleaf)`, `PortIn(port)` or `PortOut(port, value)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// CPUID; the same leaf must answer the same twice.
    Cpuid(u32, u32),
    /// IN AL; the guest's I/O space is empty (0xff).
    PortIn(u16),
    /// OUT AL; absorbed.
    PortOut(u16, u8),
}

/// Draws a random exit.
pub fn random_exit(rng: &mut Rng) -> Exit {
    let word = rng.next_u64();
    match rng.below(3) {
        0 => {
            let leaf = match word % 4 {
                0 => (word >> 8) as u32 & 0x1f,
                1 => 0x4000_0000 | ((word >> 8) as u32 & 0xff),
                2 => 0x8000_0000 | ((word >> 8) as u32 & 0x1f),
                _ => (word >> 32) as u32,
            };
            Exit::Cpuid(leaf, (word >> 16) as u32 & 3)
        }
        1 => Exit::PortIn((word >> 16) as u16),
        _ => Exit::PortOut((word >> 16) as u16, word as u8),
    }
}

/// What a forbidden step does (the binary maps each to the guest runtime's `cpu::Forbidden`,
/// or to `read_msr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forbidden {
    /// RDMSR.
    ReadMsr(u32),
    /// WRMSR of a value.
    WriteMsr(u32, u64),
    /// XSETBV enabling AVX.
    Xsetbv,
    /// RDPMC.
    Rdpmc,
    /// Setting CR4.OSXSAVE.
    Cr4Osxsave,
    /// Setting CR4.PCE.
    Cr4Pce,
    /// Setting CR4.FSGSBASE.
    Cr4Fsgsbase,
    /// RDTSCP.
    Rdtscp,
    /// MONITOR.
    Monitor,
    /// MWAIT.
    Mwait,
    /// VMXOFF.
    Vmxoff,
    /// A read of guest-physical memory the VM has not got (MMIO or unbacked).
    ReadPhysical(u64),
}

/// The MSRs a guest must not reach: syscall entry points, the kernel GS base, PAT, TSC_AUX,
/// EFER, SPEC_CTRL, the APIC base, a performance counter and its control, the TSC.
pub const MSRS: [u32; 12] = [
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0x277,       // PAT
    0xc000_0103, // TSC_AUX
    0xc000_0080, // EFER
    0x48,        // SPEC_CTRL
    0x1b,        // APIC_BASE
    0xc1,        // PMC0
    0x186,       // PERFEVTSEL0
    0x10,        // TSC
];

/// Forbidden steps that do not depend on a random MSR or address, in a fixed order.
pub const FIXED: [Forbidden; 9] = [
    Forbidden::Xsetbv,
    Forbidden::Rdpmc,
    Forbidden::Cr4Osxsave,
    Forbidden::Cr4Pce,
    Forbidden::Cr4Fsgsbase,
    Forbidden::Rdtscp,
    Forbidden::Monitor,
    Forbidden::Mwait,
    Forbidden::Vmxoff,
];

/// Guest-physical addresses a VM has no memory at: the local APIC and I/O APIC (MMIO), 1 GiB
/// and 3 GiB (unbacked).
pub const PHYSICAL: [u64; 4] = [0xfee0_0000, 0xfec0_0000, 0x4000_0000, 0xc000_0000];

/// The forbidden step for start parameter 2: 0 = none (the VM must pass), 1 = one drawn from
/// the seed, 2 + k = the k-th of the catalogue ([`FIXED`], then a read and a write of each of
/// [`MSRS`], then each of [`PHYSICAL`]).
pub fn forbidden(param: u64, seed: u64) -> Option<Forbidden> {
    let catalogue = FIXED.len() + 2 * MSRS.len() + PHYSICAL.len();
    let index = match param {
        0 => return None,
        1 => Rng::new(seed, 0xf0f0).below(catalogue as u64) as usize,
        k => (k - 2) as usize,
    };
    if index < FIXED.len() {
        return Some(FIXED[index]);
    }
    let index = index - FIXED.len();
    if index < 2 * MSRS.len() {
        let msr = MSRS[index / 2];
        return Some(if index.is_multiple_of(2) {
            Forbidden::ReadMsr(msr)
        } else {
            Forbidden::WriteMsr(msr, 0x5a5a_0000_0000_0001)
        });
    }
    PHYSICAL
        .get(index - 2 * MSRS.len())
        .map(|&address| Forbidden::ReadPhysical(address))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_seeded_and_differ_between_vms_vcpus_and_rounds() {
        let a = Tags::new(1, 2, 0, 3);
        assert_eq!(a, Tags::new(1, 2, 0, 3));
        assert_ne!(a, Tags::new(2, 2, 0, 3));
        assert_ne!(a.cr2, Tags::new(1, 3, 0, 3).cr2);
        assert_ne!(a.cr2, Tags::new(1, 2, 1, 3).cr2);
        assert_ne!(a.cr2, Tags::new(1, 2, 0, 4).cr2);
    }

    #[test]
    fn tags_are_values_the_registers_hold() {
        for round in 0..200 {
            let tags = Tags::new(DEFAULT_SEED, 7, (round % 4) as u16, round);
            assert!(tags.cr8 <= 15);
            for address in tags.debug {
                assert_eq!(
                    address >> 47,
                    0x1_ffff,
                    "canonical higher half: {address:#x}"
                );
                assert_eq!(address & 7, 0);
            }
            assert_eq!(tags.dr6 & !DR6_WRITABLE, DR6_RESET);
            assert_eq!(tags.dr7 & (1 << 10), 1 << 10);
            assert_eq!(tags.dr7 & (1 << 13), 0, "GD would trap every later MOV DR");
            assert_eq!(tags.dr7 & 0xb800, 0, "reserved bits read as 0");
            for breakpoint in 0..4 {
                let field = (tags.dr7 >> (16 + 4 * breakpoint)) & 0xf;
                assert_ne!(field & 3, 0b10, "no I/O breakpoints (CR4.DE is clear)");
                if field & 3 == 0 {
                    assert_eq!(field, 0, "an execute breakpoint has length 1");
                }
            }
            assert_eq!(tags.mxcsr & 0x1f80, 0x1f80, "every SSE exception masked");
            assert_eq!(tags.mxcsr & 0x40, 0, "DAZ may be unsupported");
            assert_eq!(tags.mxcsr >> 16, 0);
        }
        assert_eq!(Tags::new(5, 1, 0, 0).cr8, 15, "round 0 masks every class");
    }

    #[test]
    fn gs_slots_are_unique_per_vm_and_vcpu() {
        let mut seen = [false; GS_SLOT_WORDS];
        for vm in 0..32u16 {
            for vcpu in 0..4u16 {
                let (gs, kernel) = gs_slots(vm, vcpu);
                for slot in [gs, kernel] {
                    assert!(!seen[slot], "slot {slot} twice");
                    seen[slot] = true;
                }
            }
        }
    }

    #[test]
    fn random_calls_keep_memory_calls_in_the_window() {
        let mut rng = Rng::new(3, 4);
        let window = microvisor_abi::guest::WINDOW_FIRST_GFN;
        let mut numbers = [0u32; 32];
        for _ in 0..2000 {
            let (number, args) = random_call(&mut rng, window);
            numbers[number as usize] += 1;
            if matches!(
                number,
                hc::MEMORY_POPULATE | hc::MEMORY_RELEASE | hc::UNMAP_GRANT
            ) {
                assert!((window..hc::GFN_LIMIT).contains(&args[0]));
            }
            assert_ne!(number, hc::VM_EXIT);
            assert_ne!(number, hc::EVENT_WAIT, "would block the fuzzer");
        }
        assert!(numbers.iter().filter(|&&count| count > 0).count() >= 14);
    }

    #[test]
    fn the_catalogue_is_complete_and_seeded() {
        assert_eq!(forbidden(0, 1), None);
        assert_eq!(forbidden(2, 1), Some(Forbidden::Xsetbv));
        let total = FIXED.len() + 2 * MSRS.len() + PHYSICAL.len();
        for k in 0..total as u64 {
            assert!(forbidden(2 + k, 0).is_some(), "entry {k}");
        }
        assert_eq!(forbidden(2 + total as u64, 0), None);
        assert_eq!(forbidden(1, 9), forbidden(1, 9));
        let drawn: [Option<Forbidden>; 64] = core::array::from_fn(|seed| forbidden(1, seed as u64));
        assert!(drawn.iter().all(Option::is_some));
        assert!(drawn.windows(2).any(|pair| pair[0] != pair[1]));
    }
}
