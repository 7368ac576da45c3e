//! The fuzzing guest: on every vCPU, rounds of seeded values written into every piece of CPU
//! state a VM may use, random hypercalls and exits, yields, and a check that it reads back
//! only its own values (`guests::fuzz`). Parameter 0 = seed, 1 = rounds, 2 = the forbidden
//! instruction to end with (0 = none: the VM must pass; otherwise the core must stop it).
#![no_std]
#![no_main]
#![forbid(unsafe_code)]

use guests::Checksum;
use guests::fuzz::{
    CALLS_PER_ROUND, DEFAULT_ROUNDS, DEFAULT_SEED, EXITS_PER_ROUND, Exit, Forbidden, GS_SLOT_WORDS,
    Rng, Tags, forbidden, gs_slots, random_call, random_exit,
};
use microvisor_guest_runtime::cpu::{self, Forbidden as Attempt};
use microvisor_guest_runtime::{
    StartInfo, Verdict, abi, call2, cpuid, hypercall, layout, port_in8, port_out8, print, read_msr,
};

/// The words the GS base and the kernel GS base point at, a pair per VM and vCPU.
static GS_SLOTS: [core::sync::atomic::AtomicU64; GS_SLOT_WORDS] =
    [const { core::sync::atomic::AtomicU64::new(0) }; GS_SLOT_WORDS];

/// Whether an answer is one the ABI allows (>= 0, or a `HypercallError` code).
fn valid(result: i64) -> bool {
    result >= 0 || abi::HypercallError::from_guest_code(result).is_some()
}

/// Writes `tags` into the registers.
fn write_all(tags: &Tags, vm: u16, vcpu: u16) {
    use core::sync::atomic::Ordering::SeqCst;
    cpu::write_cr2(tags.cr2);
    cpu::write_cr8(tags.cr8);
    for (index, &address) in tags.debug.iter().enumerate() {
        cpu::write_debug(index as u8, address);
    }
    cpu::write_debug(6, tags.dr6);
    cpu::write_debug(7, tags.dr7);
    // GS base -> the kernel-GS slot, SWAPGS (it moves into IA32_KERNEL_GS_BASE), then GS base
    // -> the GS slot.
    let (gs, kernel) = gs_slots(vm, vcpu);
    GS_SLOTS[gs].store(tags.gs_magic, SeqCst);
    GS_SLOTS[kernel].store(tags.kernel_gs_magic, SeqCst);
    cpu::set_gs_base(vcpu, slot_address(kernel));
    cpu::swapgs();
    cpu::set_gs_base(vcpu, slot_address(gs));
}

fn slot_address(slot: usize) -> u32 {
    (GS_SLOTS.as_ptr() as u64 + slot as u64 * 8) as u32
}

/// Reads the registers back and counts the ones that do not hold `tags`.
fn check_all(tags: &Tags, vm: u16, vcpu: u16, round: u64) -> u64 {
    let mut wrong = 0;
    let mut expect = |what: &str, got: u64, want: u64| {
        if got != want {
            wrong += 1;
            print(format_args!(
                "fuzz: vm {vm} vcpu {vcpu} round {round}: {what} reads {got:#x}, wrote {want:#x}"
            ));
        }
    };
    expect("CR2", cpu::read_cr2(), tags.cr2);
    expect("CR8", cpu::read_cr8(), tags.cr8);
    for (index, &address) in tags.debug.iter().enumerate() {
        expect("DR0-DR3", cpu::read_debug(index as u8), address);
    }
    expect("DR6", cpu::read_debug(6), tags.dr6);
    expect("DR7", cpu::read_debug(7), tags.dr7);
    expect(
        "the word at the GS base",
        cpu::read_gs_u64(0),
        tags.gs_magic,
    );
    cpu::swapgs();
    expect(
        "the word at KERNEL_GS_BASE",
        cpu::read_gs_u64(0),
        tags.kernel_gs_magic,
    );
    cpu::swapgs();
    wrong
}

fn main(info: &StartInfo) -> Verdict {
    let (vm, vcpu) = (info.vm, info.vcpu);
    let seed = match info.params[0] {
        0 => DEFAULT_SEED,
        seed => seed,
    };
    let rounds = match info.params[1] {
        0 => DEFAULT_ROUNDS,
        rounds => rounds,
    };
    let ending = forbidden(info.params[2], seed ^ u64::from(vm));
    if vcpu == 0 {
        print(format_args!(
            "fuzz: vm {vm} starts: seed {seed:#x}, {rounds} rounds on {} vCPU(s), ending {ending:?}",
            info.vcpus
        ));
    }
    let mut sum = Checksum::new();
    let mut wrong = 0u64;
    let mut rng = Rng::new(seed, (u64::from(vm) << 16) | u64::from(vcpu));
    for round in 0..rounds {
        let tags = Tags::new(seed, vm, vcpu, round);
        write_all(&tags, vm, vcpu);
        for _ in 0..CALLS_PER_ROUND {
            let (number, args) = random_call(&mut rng, layout::WINDOW_FIRST_GFN);
            let result = hypercall(number, args);
            if !valid(result) {
                wrong += 1;
                print(format_args!(
                    "fuzz: vm {vm}: hypercall {number} {args:x?} answered {result}, no ABI value"
                ));
            }
        }
        for _ in 0..EXITS_PER_ROUND {
            match random_exit(&mut rng) {
                Exit::Cpuid(leaf, subleaf) => {
                    let first = cpuid(leaf, subleaf);
                    if cpuid(leaf, subleaf) != first {
                        wrong += 1;
                        print(format_args!("fuzz: vm {vm}: CPUID {leaf:#x} changed"));
                    }
                    first.iter().for_each(|&word| sum.add(u64::from(word)));
                }
                Exit::PortIn(port) => {
                    let value = port_in8(port);
                    if value != 0xff {
                        wrong += 1;
                        print(format_args!(
                            "fuzz: vm {vm}: port {port:#x} read {value:#x}"
                        ));
                    }
                }
                Exit::PortOut(port, value) => port_out8(port, value),
            }
        }
        cpu::invd();
        cpu::wbinvd();
        // Let other VMs and vCPUs run on this CPU, then the SSE state across one more yield.
        for _ in 0..1 + rng.below(3) {
            call2(abi::YIELD, 0, 0);
        }
        let (xmm, mxcsr, result) = cpu::sse_across_hypercall(abi::YIELD, &tags.xmm, tags.mxcsr);
        if xmm != tags.xmm || mxcsr != tags.mxcsr || result != 0 {
            wrong += 1;
            print(format_args!(
                "fuzz: vm {vm} vcpu {vcpu} round {round}: SSE state changed across a yield \
                 (MXCSR {mxcsr:#x}, wrote {:#x}; yield answered {result})",
                tags.mxcsr
            ));
        }
        wrong += check_all(&tags, vm, vcpu, round);
        sum.add(tags.cr2 ^ tags.dr7 ^ tags.gs_magic);
    }
    // Leave interrupts unmasked and no breakpoint armed.
    cpu::write_cr8(0);
    cpu::write_debug(7, 0x400);
    if wrong > 0 {
        print(format_args!(
            "fuzz: vm {vm} vcpu {vcpu}: {wrong} wrong values"
        ));
        return Verdict {
            passed: false,
            checksum: sum.0,
        };
    }
    print(format_args!(
        "fuzz: vm {vm} vcpu {vcpu}: {rounds} rounds, every value read back was its own"
    ));
    if let (Some(step), 0) = (ending, vcpu) {
        print(format_args!(
            "fuzz: vm {vm}: now {step:?}: the core must stop this VM"
        ));
        match step {
            Forbidden::ReadMsr(msr) => {
                sum.add(read_msr(msr));
            }
            Forbidden::WriteMsr(msr, value) => cpu::attempt(Attempt::WriteMsr(msr, value)),
            Forbidden::Xsetbv => cpu::attempt(Attempt::Xsetbv),
            Forbidden::Rdpmc => cpu::attempt(Attempt::Rdpmc),
            Forbidden::Cr4Osxsave => cpu::attempt(Attempt::Cr4Osxsave),
            Forbidden::Cr4Pce => cpu::attempt(Attempt::Cr4Pce),
            Forbidden::Cr4Fsgsbase => cpu::attempt(Attempt::Cr4Fsgsbase),
            Forbidden::Rdtscp => cpu::attempt(Attempt::Rdtscp),
            Forbidden::Monitor => cpu::attempt(Attempt::Monitor),
            Forbidden::Mwait => cpu::attempt(Attempt::Mwait),
            Forbidden::Vmxoff => cpu::attempt(Attempt::Vmxoff),
            Forbidden::ReadPhysical(address) => cpu::attempt(Attempt::ReadPhysical(address)),
        }
        print(format_args!("fuzz: vm {vm}: {step:?} was not stopped"));
        return Verdict {
            passed: false,
            checksum: sum.0,
        };
    }
    Verdict {
        passed: true,
        checksum: sum.0,
    }
}

microvisor_guest_runtime::guest_entry!(main);
