//! Interrupt and exception entry: 256 assembly stubs, a common path that saves every
//! general-purpose register and the FPU/SSE state, and the dispatcher.
//!
//! Any exception in the core is fatal: the core is the trusted base, so an exception there
//! means a bug, and the honest response is a full report and a failed run. The report names
//! vector, mnemonic, error code, RIP, CPU and every register, then the run summary follows.

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, Ordering};
use microvisor::exception::{self, PageFaultCause};
use microvisor::summary::Failure;
use x86_64::registers::control::Cr2;

use crate::console::Console;
use crate::{apic, run};

/// Vector of the local APIC timer.
pub const TIMER_VECTOR: u8 = 0x30;
/// Vector of the IPI that makes a CPU drop its cached translations (TLB shootdown).
pub const FLUSH_TLB_VECTOR: u8 = 0xfd;
/// Interrupt vector that wakes a CPU waiting for guest work (a vCPU became runnable there).
pub const KICK_VECTOR: u8 = 0xfc;
/// Vector of the IPI that stops a CPU for good (sent when another CPU hit a fatal error).
pub const HALT_VECTOR: u8 = 0xfe;
/// Vector the local APIC uses for spurious interrupts.
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// Registers saved on entry, in stack order (lowest address first). Writing to it changes
/// what the CPU resumes: that is how the core switches between domain threads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl TrapFrame {
    /// Whether the interrupted code ran in ring 3 (a domain).
    pub fn in_user_mode(&self) -> bool {
        self.cs & 3 == 3
    }
}

/// The FPU/SSE state saved on entry (FXSAVE image), restored on exit.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
pub struct FxArea(pub [u8; 512]);

core::arch::global_asm!(
    r#"
    .section .text.trap, "ax"
    .balign 16
    .global trap_stubs
trap_stubs:
    .set vector, 0
    .rept 256
    .balign 16
    .if (vector == 8) || ((vector >= 10) && (vector <= 14)) || (vector == 17) || (vector == 21) || (vector == 29) || (vector == 30)
    pushq $vector
    .else
    pushq $0
    pushq $vector
    .endif
    jmp trap_common
    .set vector, vector + 1
    .endr

trap_common:
    /* From ring 3: switch to the core's GS base (the per-CPU block). */
    testb $3, 24(%rsp)
    jz 1f
    swapgs
1:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    /* The IST stack was 16-byte aligned; 22 quadwords later it still is. */
    subq $512, %rsp
    fxsave64 (%rsp)
    movq %rsp, %rsi
    cld
    call {dispatch}
    fxrstor64 (%rsp)
    addq $512, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    /* Back to ring 3 (the dispatcher may have switched contexts): the user GS base again. */
    testb $3, 8(%rsp)
    jz 2f
    swapgs
2:
    iretq
"#,
    dispatch = sym trap_dispatch,
    options(att_syntax),
);

unsafe extern "C" {
    static trap_stubs: [u8; 256 * 16];
}

/// Address of the entry stub of `vector`.
pub fn stub_address(vector: u8) -> u64 {
    let base = &raw const trap_stubs as u64;
    base + 16 * u64::from(vector)
}

extern "C" fn trap_dispatch(frame: &mut TrapFrame, fx: &mut FxArea) {
    let vector = frame.vector as u8;
    if frame.in_user_mode() {
        crate::domain::left_domain();
    }
    dispatch(vector, frame, fx);
    // Whatever the handler switched to: a thread discarded by a recovery does not resume.
    if frame.in_user_mode() {
        crate::domain::returning_to_domain(frame, fx);
    }
}

fn dispatch(vector: u8, frame: &mut TrapFrame, fx: &mut FxArea) {
    match vector {
        // The watchdog's NMI (or a real one): a CPU that took no timer tick for too long.
        2 => watchdog_nmi(frame, fx),
        // An exception in a domain is that domain's failure, not the core's (unless it is the
        // debug trap of the fault injector single-stepping it: see `domain::fault`).
        0..32 if frame.in_user_mode() => crate::domain::fault(frame, fx),
        // A debug trap of the core's own code, single-stepped by the fault injector.
        1 if crate::inject::on_core_debug_trap(crate::cpu::current_index(), frame) => {}
        0..32 => fatal_exception(frame),
        microvisor_abi::SYSCALL_VECTOR => crate::domain::syscall(frame, fx),
        TIMER_VECTOR => {
            run::count_timer_tick();
            run::watchdog(crate::cpu::current_index());
            // The timer domain's programmed deadline, checked on every tick: when it passes,
            // the interrupt becomes a DEADLINE notification to the timer domain.
            crate::domain::check_deadline(crate::cpu::current_index(), apic::tsc());
            apic::end_of_interrupt();
            // A tick that interrupts a domain checks its call's deadline (hang detection).
            if frame.in_user_mode() {
                crate::domain::check_hang(frame, fx);
            }
        }
        HALT_VECTOR => run::halt_forever(),
        FLUSH_TLB_VECTOR => {
            x86_64::instructions::tlb::flush_all();
            apic::end_of_interrupt();
        }
        // The interrupt itself is the point: it ends a HLT or a guest slice's wait.
        KICK_VECTOR => apic::end_of_interrupt(),
        // Leave a failed domain: done on the way out (`domain::returning_to_domain`).
        crate::domain::QUIESCE_VECTOR => apic::end_of_interrupt(),
        SPURIOUS_VECTOR => {}
        _ => {
            // Nothing else is routed to the core yet; acknowledge and carry on.
            apic::end_of_interrupt();
        }
    }
}

/// An NMI, which the CPU watchdog sends to a CPU that took no timer tick for
/// [`run::WATCHDOG_TICKS`]: in ring 3 the running domain is hung with interrupts off, and is
/// recovered like any hung domain; in ring 0 the core itself is stuck, and the run ends with
/// its report (nothing below the core can recover it).
fn watchdog_nmi(frame: &mut TrapFrame, fx: &mut FxArea) {
    if frame.in_user_mode() {
        crate::domain::hung(frame, fx, "no timer tick (watchdog NMI)");
        return;
    }
    if !REPORTING.load(Ordering::Acquire) {
        let _ = writeln!(
            Console::lock_for_fatal(),
            "WATCHDOG: CPU {} took no timer tick for {} ticks of another CPU: stopped by an NMI at RIP {:#x}",
            crate::cpu::current_index(),
            run::WATCHDOG_TICKS,
            frame.rip
        );
    }
    fatal_exception(frame)
}

static REPORTING: AtomicBool = AtomicBool::new(false);

fn fatal_exception(frame: &TrapFrame) -> ! {
    crate::inject::on_core_failure(apic::tsc());
    // One report per run: a second CPU faulting meanwhile just stops.
    if REPORTING.swap(true, Ordering::AcqRel) {
        run::halt_forever();
    }
    apic::halt_other_cpus();
    let cpu = crate::cpu::current_index();
    let vector = frame.vector as u8;
    let (mnemonic, description) = exception::name(vector).unwrap_or(("?", "unknown"));
    let cr2 = (vector == 14).then(Cr2::read_raw);
    {
        let mut console = Console::lock_for_fatal();
        let f = &mut *console;
        let _ = writeln!(
            f,
            "EXCEPTION on CPU {cpu}: vector {vector} ({mnemonic} {description}), error code {:#x}, RIP {:#018x}",
            frame.error_code, frame.rip
        );
        if let Some(address) = cr2 {
            let cause = PageFaultCause::from_error_code(frame.error_code);
            let _ = writeln!(f, "  page fault at CR2 {address:#018x}: {cause}");
        }
        let _ = writeln!(
            f,
            "  CS {:#06x} SS {:#06x} RFLAGS {:#018x} RSP {:#018x}",
            frame.cs, frame.ss, frame.rflags, frame.rsp
        );
        let registers = [
            ("RAX", frame.rax),
            ("RBX", frame.rbx),
            ("RCX", frame.rcx),
            ("RDX", frame.rdx),
            ("RSI", frame.rsi),
            ("RDI", frame.rdi),
            ("RBP", frame.rbp),
            ("R8 ", frame.r8),
            ("R9 ", frame.r9),
            ("R10", frame.r10),
            ("R11", frame.r11),
            ("R12", frame.r12),
            ("R13", frame.r13),
            ("R14", frame.r14),
            ("R15", frame.r15),
        ];
        for row in registers.chunks(4) {
            let _ = f.write_str(" ");
            for (name, value) in row {
                let _ = write!(f, " {name} {value:#018x}");
            }
            let _ = f.write_str("\n");
        }
    }
    run::finish(Some(Failure::Exception {
        vector,
        name: mnemonic,
        cpu,
        rip: frame.rip,
        error_code: frame.error_code,
        cr2,
    }))
}
