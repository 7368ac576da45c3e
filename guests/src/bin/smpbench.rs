//! The SMP guest: every vCPU of the VM runs `main`; they meet at a barrier, count into one
//! atomic counter, write their words of a shared demand-zero page, populate/fill/release
//! window pages of their own, and vCPU 0 checks what all of them left (see
//! `guests::smpbench`). With `params[1] = 1` its last vCPU writes outside the VM's memory
//! after the barrier: the core must stop the whole VM while the other vCPUs run.
#![no_std]
#![no_main]
#![forbid(unsafe_code)]

use core::sync::atomic::{AtomicU64, Ordering};

use guests::Checksum;
use guests::smpbench::{
    DEFAULT_ROUNDS, POPULATES, WINDOW_OFFSET, WORDS_PER_VCPU, YIELD_EVERY, golden, shared_word,
};
use microvisor_guest_runtime::{
    StartInfo, Verdict, abi, call2, hypercall, layout, print, read_u64, tsc, write_u64,
};

/// Incremented by every vCPU, `rounds` times each.
static COUNTER: AtomicU64 = AtomicU64::new(0);
/// vCPUs that reached the start barrier.
static ARRIVED: AtomicU64 = AtomicU64::new(0);
/// vCPUs that finished their work.
static DONE: AtomicU64 = AtomicU64::new(0);
/// Failed checks over all vCPUs.
static FAILURES: AtomicU64 = AtomicU64::new(0);

/// `params[1]` for a VM whose last vCPU writes outside the VM's memory after the barrier.
const STRAY_WRITE: u64 = 1;

/// The shared page: demand-zero RAM between the image and the vCPU stacks.
const SHARED: u64 = layout::IMAGE_END + 0x6000;
/// How many times a waiting vCPU yields before it gives up.
const PATIENCE: u64 = 200_000;

fn fail(vcpu: u16, what: core::fmt::Arguments<'_>) {
    FAILURES.fetch_add(1, Ordering::SeqCst);
    print(format_args!("smpbench: vCPU {vcpu}: {what}"));
}

/// Yields until `done()` holds; false if it never did.
fn wait_until(done: impl Fn() -> bool) -> bool {
    for _ in 0..PATIENCE {
        if done() {
            return true;
        }
        hypercall(abi::YIELD, [0; 6]);
    }
    done()
}

fn main(info: &StartInfo) -> Verdict {
    let vcpu = info.vcpu;
    let vcpus = u64::from(info.vcpus);
    let rounds = match info.params[0] {
        0 => DEFAULT_ROUNDS,
        rounds => rounds,
    };
    if vcpu == 0 {
        print(format_args!(
            "smpbench: vm {} starts {vcpus} vCPUs, {rounds} rounds each",
            info.vm
        ));
    }
    ARRIVED.fetch_add(1, Ordering::SeqCst);
    if !wait_until(|| ARRIVED.load(Ordering::SeqCst) == vcpus) {
        fail(vcpu, format_args!("the other vCPUs never arrived"));
    }
    if info.params[1] == STRAY_WRITE && u64::from(vcpu) == vcpus - 1 {
        // The core must stop the whole VM, its siblings on other CPUs included.
        print(format_args!(
            "smpbench: vm {} vCPU {vcpu} writes outside the VM's memory",
            info.vm
        ));
        write_u64(
            (layout::WINDOW_FIRST_GFN + layout::WINDOW_PAGES - 1) * 4096,
            1,
        );
        fail(vcpu, format_args!("the stray write went through"));
    }
    // Its words of the shared page (every vCPU's first touch races the others').
    let mine = SHARED + u64::from(vcpu) * WORDS_PER_VCPU * 8;
    for index in 0..WORDS_PER_VCPU {
        write_u64(mine + index * 8, shared_word(u64::from(vcpu), index));
    }
    let gfn = layout::WINDOW_FIRST_GFN + WINDOW_OFFSET + u64::from(vcpu);
    for round in 0..rounds {
        COUNTER.fetch_add(1, Ordering::SeqCst);
        if round % YIELD_EVERY == 0 {
            let null = hypercall(abi::NULL, [0; 6]);
            if null != 0 {
                fail(vcpu, format_args!("null hypercall answered {null}"));
            }
            hypercall(abi::YIELD, [0; 6]);
        }
        if round % (rounds / POPULATES).max(1) == 0 {
            populate_fill_release(vcpu, gfn, round);
        }
    }
    own_timer(vcpu, info.tsc_khz);
    DONE.fetch_add(1, Ordering::SeqCst);
    if vcpu != 0 {
        return Verdict {
            passed: FAILURES.load(Ordering::SeqCst) == 0,
            checksum: 0,
        };
    }
    if !wait_until(|| DONE.load(Ordering::SeqCst) == vcpus) {
        fail(vcpu, format_args!("the other vCPUs never finished"));
    }
    let mut sum = Checksum::new();
    sum.add(vcpus);
    let count = COUNTER.load(Ordering::SeqCst);
    sum.add(count);
    if count != vcpus * rounds {
        fail(
            vcpu,
            format_args!("counter {count}, expected {}", vcpus * rounds),
        );
    }
    for other in 0..vcpus {
        for index in 0..WORDS_PER_VCPU {
            let word = read_u64(SHARED + (other * WORDS_PER_VCPU + index) * 8);
            sum.add(word);
            if word != shared_word(other, index) {
                fail(
                    vcpu,
                    format_args!("vCPU {other}'s word {index} reads {word:#x}"),
                );
            }
        }
    }
    let passed = FAILURES.load(Ordering::SeqCst) == 0 && sum.0 == golden(vcpus, rounds);
    print(format_args!(
        "smpbench: vm {} {} with {vcpus} vCPUs, counter {count}, checksum {:#018x}",
        info.vm,
        if passed { "passed" } else { "FAILED" },
        sum.0
    ));
    Verdict {
        passed,
        checksum: sum.0,
    }
}

/// Arms a one-shot timer 1 ms ahead for this vCPU and blocks in `EVENT_WAIT` until it has
/// fired. Interrupts stay off, so the vector stays pending and `EVENT_WAIT` answers at once
/// from then on; were the vector raised in another vCPU, this one would sleep forever (and
/// the run fail): the timer and the wake-up must reach exactly the vCPU that armed it.
fn own_timer(vcpu: u16, tsc_khz: u64) {
    let deadline = tsc() + tsc_khz.max(1);
    let timer = call2(
        abi::TIMER_ONESHOT,
        deadline,
        abi::VECTOR_MIN + u64::from(vcpu),
    );
    if timer < 0 {
        fail(vcpu, format_args!("TIMER_ONESHOT answered {timer}"));
        return;
    }
    while tsc() < deadline {
        let woken = hypercall(abi::EVENT_WAIT, [0; 6]);
        if woken < 0 {
            fail(vcpu, format_args!("EVENT_WAIT answered {woken}"));
            return;
        }
    }
    // The deadline passed: the vector is pending (or about to be), so this returns.
    let woken = hypercall(abi::EVENT_WAIT, [0; 6]);
    if woken < 0 {
        fail(
            vcpu,
            format_args!("EVENT_WAIT after the deadline answered {woken}"),
        );
    }
}

/// Populates window page `gfn`, fills and checks it, and releases it: the release removes an
/// EPT entry while sibling vCPUs may be running on other CPUs.
fn populate_fill_release(vcpu: u16, gfn: u64, round: u64) {
    let frame = call2(abi::MEMORY_POPULATE, gfn, 0);
    if frame <= 0 {
        fail(vcpu, format_args!("populate of {gfn:#x} answered {frame}"));
        return;
    }
    let page = gfn * 4096;
    for index in 0..8 {
        write_u64(page + index * 512, round ^ index);
    }
    for index in 0..8 {
        let word = read_u64(page + index * 512);
        if word != round ^ index {
            fail(
                vcpu,
                format_args!("populated page word {index} reads {word:#x}"),
            );
        }
    }
    let released = call2(abi::MEMORY_RELEASE, frame as u64, 0);
    if released != 0 {
        fail(vcpu, format_args!("release answered {released}"));
    }
}

microvisor_guest_runtime::guest_entry!(main);
