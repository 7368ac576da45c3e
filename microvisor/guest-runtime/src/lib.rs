//! The guest runtime: entry point, VMCALL stubs, console and guest-physical memory access for
//! the guest kernels in `guests/`.
//!
//! A guest binary is `microvisor_guest_runtime::guest_entry!(main);` where
//! `fn main(info: &StartInfo) -> Verdict`. The core enters `_start` in 64-bit mode with an
//! identity map of the first 2 MiB (see `microvisor_abi::guest`); the runtime reads the start
//! information, runs `main` and reports its verdict with the `VM_EXIT` hypercall. A panic is
//! printed on the console and reported as a failed verdict.
//!
//! This crate, the core and the domain runtime are the only places allowed `unsafe`; the
//! guest kernels that use it stay `#![forbid(unsafe_code)]`.
#![no_std]

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU64, Ordering};

pub use ipc::hypercall as abi;
pub use microvisor_abi::guest::{self as layout, StartInfo};
// The memory functions `core` needs; linked for their symbols.
use microvisor_freestanding as _;

pub mod cpu;

/// How a guest's work ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Every self-check passed.
    pub passed: bool,
    /// A checksum of what the guest did (reported in the summary).
    pub checksum: u64,
}

/// Issues hypercall `number` with `args` (RDI, RSI, RDX, R10, R8, R9); returns RAX.
#[inline]
pub fn hypercall(number: u64, args: [u64; 6]) -> i64 {
    let result: u64;
    // SAFETY: VMCALL exits to the core, which changes only RAX (the result) and RIP of this
    // vCPU; every other register is preserved (docs/hypercall-abi.md).
    unsafe {
        core::arch::asm!("vmcall", inlateout("rax") number => result, in("rdi") args[0],
                         in("rsi") args[1], in("rdx") args[2], in("r10") args[3],
                         in("r8") args[4], in("r9") args[5], options(nostack));
    }
    result as i64
}

/// A hypercall with two arguments.
#[inline]
pub fn call2(number: u64, arg0: u64, arg1: u64) -> i64 {
    hypercall(number, [arg0, arg1, 0, 0, 0, 0])
}

/// CPUID: EAX, EBX, ECX, EDX for `leaf`/`subleaf`, as the hypercall domain answers them (a
/// VM exit).
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    // CPUID has no side effect; in a guest it exits to the core.
    let result = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [result.eax, result.ebx, result.ecx, result.edx]
}

/// IN AL from `port` (a VM exit; the guest's I/O space is empty: 0xff).
pub fn port_in8(port: u16) -> u8 {
    let value: u8;
    // SAFETY: a port read exits to the core (unconditional I/O exiting); no memory access.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack))
    };
    value
}

/// OUT AL to `port` (a VM exit; absorbed).
pub fn port_out8(port: u16, value: u8) {
    // SAFETY: as for `port_in8`.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack))
    };
}

/// RDMSR of `msr`. Guests have no MSRs: the hypercall domain refuses and the core stops the
/// VM, so this does not return.
pub fn read_msr(msr: u32) -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: RDMSR exits to the core (MSR bitmaps off); no memory access.
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") msr, out("eax") low, out("edx") high,
                         options(nomem, nostack));
    }
    (u64::from(high) << 32) | u64::from(low)
}

/// Reads the time-stamp counter (under bochs: instructions executed).
#[inline]
pub fn tsc() -> u64 {
    // SAFETY: RDTSC only reads the counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Reads the u64 at guest-physical `address` (identity-mapped; 8-byte aligned). An address
/// outside the VM's memory is an EPT violation: the core stops the VM.
#[inline]
pub fn read_u64(address: u64) -> u64 {
    // SAFETY: the first 2 MiB are identity-mapped in every guest; an address the VM has no
    // memory at exits to the core (EPT violation) and is not a memory-safety problem of the
    // guest kernel, which only names pages it mapped itself.
    unsafe { core::ptr::read_volatile((address & !7) as *const u64) }
}

/// Writes the u64 at guest-physical `address` (see [`read_u64`]).
#[inline]
pub fn write_u64(address: u64, value: u64) {
    // SAFETY: as in `read_u64`; guest kernels write only pages they mapped for this.
    unsafe { core::ptr::write_volatile((address & !7) as *mut u64, value) }
}

/// Virtual interrupts taken since [`enable_interrupts`] (every vector counts).
static INTERRUPTS: AtomicU64 = AtomicU64::new(0);

/// The guest's IDT: 256 16-byte gates, filled by [`enable_interrupts`].
static IDT: [AtomicU64; 512] = [const { AtomicU64::new(0) }; 512];

// The handler of every vector from 32 up: count it and return. It touches no register but
// the flags (which IRETQ restores) and no stack but the interrupt frame; guests are built
// without a red zone, so the frame cannot land on live data.
core::arch::global_asm!(
    ".global microvisor_guest_interrupt",
    "microvisor_guest_interrupt:",
    "lock inc qword ptr [rip + {count}]",
    "iretq",
    count = sym INTERRUPTS,
);

unsafe extern "C" {
    fn microvisor_guest_interrupt();
}

/// Installs an IDT whose vectors 32..=255 count into [`interrupts`] and enables interrupts,
/// so the virtual interrupts the core injects (a timer's vector) are taken. Exceptions (0..32)
/// still exit to the core, which stops the VM.
pub fn enable_interrupts() {
    let handler = microvisor_guest_interrupt as *const () as u64;
    for vector in 32..256 {
        // Present, DPL 0, 64-bit interrupt gate (0x8e), code selector 0x08.
        let low =
            (handler & 0xffff) | (0x08 << 16) | (0x8e << 40) | ((handler >> 16) & 0xffff) << 48;
        IDT[vector * 2].store(low, Ordering::Relaxed);
        IDT[vector * 2 + 1].store(handler >> 32, Ordering::Relaxed);
    }
    let mut pointer = [0u8; 10];
    pointer[..2].copy_from_slice(&(4096u16 - 1).to_le_bytes());
    pointer[2..].copy_from_slice(&(IDT.as_ptr() as u64).to_le_bytes());
    // SAFETY: the IDT is a static of 256 valid gates to a handler that only counts and
    // returns; LIDT reads the 10-byte pointer; STI then lets the core's injections in.
    unsafe {
        core::arch::asm!("lidt [{}]", "sti", in(reg) pointer.as_ptr(), options(nostack));
    }
}

/// Virtual interrupts taken so far.
pub fn interrupts() -> u64 {
    INTERRUPTS.load(Ordering::Relaxed)
}

/// `EVENT_WAIT` unless an interrupt came after the caller last looked: answers the pending
/// event-channel ports (bit per port), or 0 after the vCPU was blocked and woken (by an event
/// or a virtual interrupt), or 0 at once if [`interrupts`] is no longer `seen`, or a negative
/// error.
///
/// The check and the wait happen with interrupts disabled, so an interrupt arriving in
/// between stays pending in the core, which then answers the wait at once instead of
/// blocking: no wake-up is lost. Interrupts are enabled again afterwards if they were on.
pub fn wait_for_event(seen: u64) -> i64 {
    let flags: u64;
    // SAFETY: reads RFLAGS and clears IF; nothing else changes.
    unsafe { core::arch::asm!("pushfq", "pop {}", "cli", out(reg) flags) };
    let result = if interrupts() != seen {
        0
    } else {
        hypercall(abi::EVENT_WAIT, [0; 6])
    };
    if flags & (1 << 9) != 0 {
        // SAFETY: interrupts were enabled on entry (with the IDT `enable_interrupts` set up).
        unsafe { core::arch::asm!("sti", options(nomem, nostack)) };
    }
    result
}

/// The console: `CONSOLE_WRITE` in chunks of at most `CONSOLE_MAX` bytes, one line each.
pub struct Console {
    line: [u8; abi::CONSOLE_MAX],
    length: usize,
}

impl Console {
    /// An empty line.
    pub const fn new() -> Console {
        Console {
            line: [0; abi::CONSOLE_MAX],
            length: 0,
        }
    }

    /// Sends the buffered line (if any).
    pub fn flush(&mut self) {
        if self.length > 0 {
            let address = self.line.as_ptr() as u64;
            // A retry after a recovery prints again; nothing else can fail here.
            let _ = call2(abi::CONSOLE_WRITE, address, self.length as u64);
            self.length = 0;
        }
    }
}

impl Default for Console {
    fn default() -> Self {
        Console::new()
    }
}

impl Write for Console {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for &byte in text.as_bytes() {
            if byte == b'\n' {
                self.flush();
                continue;
            }
            if self.length == self.line.len() {
                self.flush();
            }
            self.line[self.length] = byte;
            self.length += 1;
        }
        Ok(())
    }
}

/// Prints one line on the console (`println!`-like).
pub fn print(args: fmt::Arguments<'_>) {
    let mut console = Console::new();
    let _ = console.write_fmt(args);
    console.flush();
}

/// The longest stretch without service this guest measured, in microseconds of its own time
/// (0: it measured none); reported with its verdict.
static LONGEST_GAP_US: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Records the longest stretch without service the guest measured (e.g. netbench: the longest
/// time between two echoes), in microseconds: the guest-visible blackout of a recovery. It
/// goes to the core with the verdict (the third argument of `VM_EXIT`) and into the summary.
pub fn report_longest_gap_us(us: u64) {
    LONGEST_GAP_US.fetch_max(us, core::sync::atomic::Ordering::Relaxed);
}

/// Ends this vCPU with `verdict`; never returns.
pub fn exit(verdict: Verdict) -> ! {
    let gap = LONGEST_GAP_US.load(core::sync::atomic::Ordering::Relaxed);
    loop {
        let _ = hypercall(
            abi::VM_EXIT,
            [u64::from(!verdict.passed), verdict.checksum, gap, 0, 0, 0],
        );
        // The core never resumes an exited vCPU; should it, ask again.
        core::hint::spin_loop();
    }
}

/// Reads the start information the core wrote; `None` if it is missing or damaged.
pub fn start_info(address: u64) -> Option<StartInfo> {
    let mut words = [0u64; layout::start_info::WORDS];
    for (index, word) in words.iter_mut().enumerate() {
        *word = read_u64(address + index as u64 * 8);
    }
    StartInfo::from_words(&words)
}

/// Runs `main` for the entry point the macro defines, on vCPU `vcpu` (every vCPU of the VM
/// runs it; [`StartInfo::vcpu`] tells them apart).
pub fn run(start_info_address: u64, vcpu: u64, main: fn(&StartInfo) -> Verdict) -> ! {
    match start_info(start_info_address) {
        Some(mut info) if vcpu < u64::from(info.vcpus) => {
            info.vcpu = vcpu as u16;
            exit(main(&info))
        }
        Some(_) => {
            print(format_args!(
                "entered as vCPU {vcpu}, beyond the VM's vCPUs"
            ));
            exit(Verdict {
                passed: false,
                checksum: 0,
            })
        }
        None => {
            print(format_args!(
                "no start information at {start_info_address:#x}"
            ));
            exit(Verdict {
                passed: false,
                checksum: 0,
            })
        }
    }
}

/// Reports a panic on the console and exits failed.
pub fn report_panic(info: &core::panic::PanicInfo<'_>) -> ! {
    print(format_args!("panic: {}", info.message()));
    if let Some(location) = info.location() {
        print(format_args!("  at {}:{}", location.file(), location.line()));
    }
    exit(Verdict {
        passed: false,
        checksum: 0,
    })
}

/// Defines `_start`, the panic handler and the unwinding stub of a guest kernel whose work is
/// `fn main(&StartInfo) -> Verdict`.
#[macro_export]
macro_rules! guest_entry {
    ($main:path) => {
        /// Entry point: RDI = the start information's guest-physical address, RSI = this
        /// vCPU's number.
        #[unsafe(no_mangle)]
        pub extern "C" fn _start(start_info: u64, vcpu: u64) -> ! {
            $crate::run(start_info, vcpu, $main)
        }

        #[panic_handler]
        fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
            $crate::report_panic(info)
        }

        /// Never called (`panic = "abort"`), but the precompiled `core` references it.
        #[unsafe(no_mangle)]
        pub extern "C" fn rust_eh_personality() {}
    };
}
