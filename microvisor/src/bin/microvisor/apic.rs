//! The local APIC (xAPIC, memory-mapped): enable, timer, IPIs; plus the legacy 8259 PICs,
//! which are remapped and masked so they can never deliver on an exception vector.
//!
//! The APIC timer and the TSC are calibrated once, on the bootstrap processor, against the
//! PIT (channel 2, gate-driven, polled through port 0x61), which QEMU, bochs and real PCs
//! all have. Register offsets: Intel SDM Vol. 3A, Table 11-1.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use x86_64::instructions::port::Port;
use x86_64::registers::model_specific::Msr;

use crate::paging;
use crate::trap::{HALT_VECTOR, SPURIOUS_VECTOR, TIMER_VECTOR};

const REG_ID: u64 = 0x20;
const REG_TPR: u64 = 0x80;
const REG_EOI: u64 = 0xb0;
const REG_SVR: u64 = 0xf0;
const REG_ESR: u64 = 0x280;
const REG_ICR_LOW: u64 = 0x300;
const REG_ICR_HIGH: u64 = 0x310;
const REG_LVT_TIMER: u64 = 0x320;
const REG_TIMER_INITIAL: u64 = 0x380;
const REG_TIMER_CURRENT: u64 = 0x390;
const REG_TIMER_DIVIDE: u64 = 0x3e0;

const IA32_APIC_BASE: u32 = 0x1b;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;

/// Timer ticks per second the core asks for.
pub const TIMER_HZ: u64 = 100;

/// Virtual address of the local APIC registers; 0 until mapped.
static BASE: AtomicU64 = AtomicU64::new(0);
/// APIC timer counts (divide-by-16) per timer period.
static TIMER_COUNT: AtomicU32 = AtomicU32::new(0);
/// TSC ticks per millisecond.
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);

fn read(register: u64) -> u32 {
    let base = BASE.load(Ordering::Relaxed);
    // SAFETY: `base` maps the local APIC page (uncached, in the direct map); `register` is
    // one of the architectural offsets above.
    unsafe { ((base + register) as *const u32).read_volatile() }
}

fn write(register: u64, value: u32) {
    let base = BASE.load(Ordering::Relaxed);
    // SAFETY: as for `read`.
    unsafe { ((base + register) as *mut u32).write_volatile(value) }
}

/// Finds and enables this CPU's local APIC (the bootstrap processor calls this first; the
/// address is the same on every CPU).
pub fn enable_this_cpu() {
    let mut apic_base = Msr::new(IA32_APIC_BASE);
    // SAFETY: IA32_APIC_BASE exists on every CPU with an APIC (checked by the caller via the
    // MADT); setting bit 11 (global enable) keeps xAPIC mode.
    let phys = unsafe {
        let value = apic_base.read();
        apic_base.write(value | (1 << 11));
        value & 0x000f_ffff_ffff_f000
    };
    BASE.store(paging::phys_to_virt(phys).as_u64(), Ordering::Release);
    write(REG_TPR, 0);
    write(REG_SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
    write(REG_ESR, 0);
}

/// This CPU's local APIC ID.
pub fn id() -> u32 {
    read(REG_ID) >> 24
}

/// Signals end of interrupt (no-op before the APIC is mapped).
pub fn end_of_interrupt() {
    if BASE.load(Ordering::Relaxed) != 0 {
        write(REG_EOI, 0);
    }
}

/// Remaps the two 8259 PICs to vectors 0x20-0x2f and masks every line.
pub fn disable_legacy_pic() {
    let mut master_command: Port<u8> = Port::new(0x20);
    let mut master_data: Port<u8> = Port::new(0x21);
    let mut slave_command: Port<u8> = Port::new(0xa0);
    let mut slave_data: Port<u8> = Port::new(0xa1);
    // SAFETY: the standard ICW1-ICW4 initialisation sequence of the PC's 8259 pair, then
    // OCW1 masking every line; nothing else in the core uses these ports.
    unsafe {
        master_command.write(0x11);
        slave_command.write(0x11);
        master_data.write(0x20);
        slave_data.write(0x28);
        master_data.write(4);
        slave_data.write(2);
        master_data.write(1);
        slave_data.write(1);
        master_data.write(0xff);
        slave_data.write(0xff);
    }
}

/// Result of calibrating against the PIT.
#[derive(Clone, Copy, Debug)]
pub struct Calibration {
    /// APIC timer counts (divide-by-16) per millisecond.
    pub apic_per_ms: u64,
    /// TSC ticks per millisecond.
    pub tsc_khz: u64,
    /// Whether the PIT answered (if not, defaults were assumed).
    pub pit_answered: bool,
}

/// Measures the APIC timer and TSC rates over 10 ms of PIT time (bootstrap processor only,
/// APIC enabled, interrupts off).
pub fn calibrate() -> Calibration {
    const PIT_HZ: u64 = 1_193_182;
    const WINDOW_MS: u64 = 10;
    let pit_count = (PIT_HZ * WINDOW_MS / 1000) as u16;
    let mut gate: Port<u8> = Port::new(0x61);
    let mut command: Port<u8> = Port::new(0x43);
    let mut channel2: Port<u8> = Port::new(0x42);
    write(REG_TIMER_DIVIDE, 0x3); // divide by 16
    write(REG_LVT_TIMER, 1 << 16); // masked, one-shot
    let mut answered = false;
    // SAFETY: port 0x61 bit 0 gates PIT channel 2, bit 1 is the speaker (kept off), bit 5
    // reads channel 2's output; 0x43/0x42 program channel 2 in mode 0 (interrupt on
    // terminal count), low byte then high byte.
    let (apic_elapsed, tsc_elapsed) = unsafe {
        let value = gate.read();
        gate.write((value & !0x02) & !0x01);
        command.write(0b1011_0000);
        channel2.write(pit_count as u8);
        channel2.write((pit_count >> 8) as u8);
        write(REG_TIMER_INITIAL, u32::MAX);
        let tsc_start = core::arch::x86_64::_rdtsc();
        gate.write((value & !0x02) | 0x01);
        for _ in 0..50_000_000u64 {
            if gate.read() & 0x20 != 0 {
                answered = true;
                break;
            }
        }
        let tsc_end = core::arch::x86_64::_rdtsc();
        let apic_elapsed = u64::from(u32::MAX - read(REG_TIMER_CURRENT));
        gate.write(value & !0x03);
        (apic_elapsed, tsc_end - tsc_start)
    };
    write(REG_TIMER_INITIAL, 0);
    let calibration = if answered {
        Calibration {
            apic_per_ms: (apic_elapsed / WINDOW_MS).max(1),
            tsc_khz: (tsc_elapsed / WINDOW_MS).max(1),
            pit_answered: true,
        }
    } else {
        // No PIT: assume a 100 MHz bus / 16 and a 1 GHz TSC, and say so in the log.
        Calibration {
            apic_per_ms: 6250,
            tsc_khz: 1_000_000,
            pit_answered: false,
        }
    };
    TSC_KHZ.store(calibration.tsc_khz, Ordering::Relaxed);
    TIMER_COUNT.store(
        (calibration.apic_per_ms * 1000 / TIMER_HZ).min(u64::from(u32::MAX)) as u32,
        Ordering::Relaxed,
    );
    calibration
}

/// Starts this CPU's periodic APIC timer at [`TIMER_HZ`] (after [`calibrate`]).
pub fn start_periodic_timer() {
    write(REG_TIMER_DIVIDE, 0x3);
    write(REG_LVT_TIMER, u32::from(TIMER_VECTOR) | (1 << 17));
    write(REG_TIMER_INITIAL, TIMER_COUNT.load(Ordering::Relaxed));
}

/// TSC ticks per millisecond, as calibrated.
pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// Reads the time-stamp counter.
pub fn tsc() -> u64 {
    // SAFETY: RDTSC has no side effects and is available on every x86-64 CPU.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Busy-waits `micros` microseconds by the calibrated TSC.
pub fn delay_us(micros: u64) {
    let end = tsc() + micros * tsc_khz() / 1000;
    while tsc() < end {
        core::hint::spin_loop();
    }
}

fn send_ipi(destination: u32, command: u32) {
    write(REG_ICR_HIGH, destination << 24);
    write(REG_ICR_LOW, command);
    for _ in 0..1_000_000 {
        if read(REG_ICR_LOW) & ICR_DELIVERY_PENDING == 0 {
            return;
        }
        core::hint::spin_loop();
    }
    log::warn!("IPI {command:#x} to APIC {destination} still pending");
}

/// Sends an NMI (delivery mode 100b, assert) to the CPU with local APIC ID `apic_id`.
pub fn send_nmi(apic_id: u32) {
    send_ipi(apic_id, 0x0000_4400);
}

/// Sends INIT (assert, level) to the CPU with local APIC ID `apic_id`.
pub fn send_init(apic_id: u32) {
    send_ipi(apic_id, 0x0000_4500);
}

/// Sends a STARTUP IPI: the target starts in real mode at `page * 4096`.
pub fn send_startup(apic_id: u32, page: u8) {
    send_ipi(apic_id, 0x0000_4600 | u32::from(page));
}

/// Sends a fixed interrupt with `vector` to the CPU with local APIC ID `apic_id`.
pub fn send_to(apic_id: u32, vector: u8) {
    if BASE.load(Ordering::Relaxed) != 0 {
        // Fixed delivery, assert, physical destination, no shorthand.
        send_ipi(apic_id, u32::from(vector) | (1 << 14));
    }
}

/// Sends a fixed interrupt with `vector` to every other CPU.
pub fn send_to_others(vector: u8) {
    if BASE.load(Ordering::Relaxed) != 0 {
        // Fixed delivery, assert, destination shorthand "all excluding self".
        send_ipi(0, u32::from(vector) | (1 << 14) | (0b11 << 18));
    }
}

/// Sends the halt IPI to every other CPU (no-op before the APIC is mapped).
pub fn halt_other_cpus() {
    send_to_others(HALT_VECTOR);
}
