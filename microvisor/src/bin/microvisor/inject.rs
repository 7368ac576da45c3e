//! Fault injection into a domain at a point inside its work: after the first-level trigger
//! (the target's `skip`-th request under a scenario), the target's thread is single-stepped
//! (RFLAGS.TF) for the plan's count of instructions, then the fault strikes on its live
//! context: RIP := 0, one register bit flipped, one bit of a code byte at RIP flipped, or the
//! two bytes at RIP replaced by `jmp $` (a hang). Changed code bytes are put back when the next
//! failure is detected, before recovery runs (as the papers' injector does; a microreboot
//! reloads them anyway).
//!
//! What to inject, and the record the summary reports, are `microvisor::inject`; the plain
//! fail-stop at the start of a request (`inject=failstop:DOMAIN`) stays in `domain.rs`.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use microvisor::inject::{InjectionReport, InjectionState, Kind, Plan, REGISTERS, RFLAGS, RIP};
use spin::Mutex;

use crate::paging;
use crate::trap::TrapFrame;

/// RFLAGS.TF: a debug trap after every instruction.
const TRAP_FLAG: u64 = 1 << 8;

/// An armed fault.
struct Armed {
    target: u16,
    name: &'static str,
    plan: Plan,
    seed: u64,
    /// Requests of the target still to let pass before stepping starts.
    skip: u32,
    /// The CPU whose target thread carries TF.
    stepping: Option<usize>,
    /// Instructions counted so far.
    counted: u32,
    struck: Option<Struck>,
}

#[derive(Clone, Copy)]
struct Struck {
    cpu: usize,
    tsc: u64,
    rip: u64,
    location: &'static str,
    address: u64,
    bit: u8,
    before: u64,
    after: u64,
    detected_tsc: Option<u64>,
    /// Code bytes to put back: (physical address, original byte).
    restore: [Option<(u64, u8)>; 2],
}

static ARMED: Mutex<Option<Armed>> = Mutex::new(None);
/// The armed fault's target (a domain index, or [`CORE`]), readable without the lock.
static TARGET: AtomicU32 = AtomicU32::new(u32::MAX);
/// The CPU whose core code is being single-stepped (`usize::MAX`: none), and the instructions
/// counted there: atomics, because the stepped code may hold any lock, [`ARMED`] included.
static CORE_STEPPING: AtomicUsize = AtomicUsize::new(usize::MAX);
static CORE_COUNTED: AtomicU32 = AtomicU32::new(0);

/// Stop in bochs' debugger when the fault strikes (`inject_break=1`, `cargo xtask replay
/// --debug`).
static BREAK: AtomicBool = AtomicBool::new(false);

/// Makes the fault stop in bochs' debugger when it strikes (a magic breakpoint).
pub fn set_break(on: bool) {
    BREAK.store(on, Ordering::Relaxed);
}

/// The target number of the core itself (the baseline a monolithic hypervisor would have).
pub const CORE: u16 = u16::MAX;
/// Fast check for the hot paths: something is armed and not yet struck.
static PENDING: AtomicBool = AtomicBool::new(false);

/// Arms `plan` against domain `target` (called `name`): it strikes `plan.steps` instructions
/// (at least one) into the target's request number `plan.skip + 1` from now (or, if that
/// request ends first, into its later ones on the same CPU: the count goes on).
pub fn arm(target: u16, name: &'static str, plan: Plan, seed: u64) {
    let skip = plan.skip;
    *ARMED.lock() = Some(Armed {
        target,
        name,
        plan,
        seed,
        skip,
        stepping: None,
        counted: 0,
        struck: None,
    });
    TARGET.store(u32::from(target), Ordering::Release);
    PENDING.store(true, Ordering::Release);
    log::info!(
        "fault armed in {name}: {} {}:{} after {} instructions of its request {} (seed {seed})",
        plan.kind.name(),
        plan.location,
        plan.bit,
        plan.steps,
        skip + 1
    );
}

/// The core enters `callee`'s thread on `cpu` for a request (`frame` is its context). On every
/// domain entry: without an armed fault it costs one load.
#[inline(always)]
pub fn on_enter(callee: u16, cpu: usize, frame: &mut TrapFrame) {
    if PENDING.load(Ordering::Acquire) && TARGET.load(Ordering::Acquire) == u32::from(callee) {
        on_enter_armed(callee, cpu, frame);
    }
}

/// The core finished a VM exit on `cpu` (its unit of work, as a request is a domain's): with a
/// fault armed against the core, the first-level trigger counts these, then the core's code
/// on this CPU is single-stepped from here to the next VM entry (and again after each later
/// exit here, until the count is reached).
#[inline(always)]
pub fn after_vm_exit(cpu: usize) {
    if PENDING.load(Ordering::Acquire) && TARGET.load(Ordering::Acquire) == u32::from(CORE) {
        after_vm_exit_armed(cpu);
    }
}

#[cold]
#[inline(never)]
fn after_vm_exit_armed(cpu: usize) {
    {
        let mut armed = ARMED.lock();
        let Some(state) = armed.as_mut() else {
            return;
        };
        if state.struck.is_some() {
            return;
        }
        match state.stepping {
            Some(stepping) if stepping != cpu => return,
            Some(_) => {}
            None if state.skip > 0 => {
                state.skip -= 1;
                return;
            }
            None => {
                state.stepping = Some(cpu);
                CORE_STEPPING.store(cpu, Ordering::Release);
            }
        }
    }
    // SAFETY: sets RFLAGS.TF for the code that follows on this CPU: every instruction then
    // traps (#DB, on its own IST stack), and `on_core_debug_trap` counts it; the lock above is
    // released first, so the trap handler never waits for it.
    unsafe {
        core::arch::asm!("pushfq", "or qword ptr [rsp], 0x100", "popfq");
    }
}

/// Right before a VM entry on `cpu`: the core's stepping pauses (a VM entry with RFLAGS.TF set
/// would leave a pending single-step behind), to resume after the next exit.
#[inline(always)]
pub fn before_vm_entry(cpu: usize) {
    if CORE_STEPPING.load(Ordering::Acquire) == cpu {
        // SAFETY: clears RFLAGS.TF; nothing else changes.
        unsafe {
            core::arch::asm!("pushfq", "and qword ptr [rsp], ~0x100", "popfq");
        }
    }
}

/// A debug trap in ring 0 on `cpu`: counted if the core is being stepped there, and at the
/// count the fault strikes on the interrupted context. `false`: not ours (a real #DB: fatal).
pub fn on_core_debug_trap(cpu: usize, frame: &mut TrapFrame) -> bool {
    if CORE_STEPPING.load(Ordering::Acquire) != cpu {
        return false;
    }
    let counted = CORE_COUNTED.fetch_add(1, Ordering::AcqRel) + 1;
    // The interrupted code may hold the lock: then the fault waits for the next instruction.
    let Some(mut armed) = ARMED.try_lock() else {
        return true;
    };
    let Some(state) = armed.as_mut() else {
        return true;
    };
    state.counted = counted;
    if counted < state.plan.steps.max(1) {
        return true;
    }
    frame.rflags &= !TRAP_FLAG;
    CORE_STEPPING.store(usize::MAX, Ordering::Release);
    state.stepping = None;
    strike(state, cpu, frame);
    true
}

/// The core itself failed (an exception or a panic in ring 0) at `tsc`: the detection of a
/// fault injected into it. The run ends there.
pub fn on_core_failure(tsc: u64) {
    CORE_STEPPING.store(usize::MAX, Ordering::Release);
    if let Some(mut armed) = armed()
        && let Some(struck) = armed.as_mut().and_then(|state| state.struck.as_mut())
    {
        struck.detected_tsc.get_or_insert(tsc);
    }
}

#[cold]
#[inline(never)]
fn on_enter_armed(callee: u16, cpu: usize, frame: &mut TrapFrame) {
    let mut armed = ARMED.lock();
    let Some(state) = armed.as_mut() else {
        return;
    };
    if state.target != callee || state.stepping.is_some() || state.struck.is_some() {
        return;
    }
    if state.skip > 0 {
        state.skip -= 1;
        return;
    }
    // Even a count of 0 strikes at a debug trap (after the request's first instruction), so
    // that every fault lands on a context the handler can check before returning to it.
    state.stepping = Some(cpu);
    frame.rflags |= TRAP_FLAG;
}

/// What the debug-trap handler should do with a #DB from ring 3.
pub enum Step {
    /// Not ours: a real debug exception of the domain (a failure).
    NotOurs,
    /// Counted (or struck): return to the domain.
    Resume,
    /// The fault made the context one the CPU cannot return to (a non-canonical RIP or RSP):
    /// treat it as the exception the domain would raise (`frame.vector` is set).
    Faulted,
}

/// A debug trap from ring 3 on `cpu` while domain `running` runs.
pub fn on_debug_trap(cpu: usize, running: Option<u16>, frame: &mut TrapFrame) -> Step {
    if !PENDING.load(Ordering::Acquire) {
        return Step::NotOurs;
    }
    let mut armed = ARMED.lock();
    let Some(state) = armed.as_mut() else {
        return Step::NotOurs;
    };
    if state.stepping != Some(cpu) || running != Some(state.target) {
        return Step::NotOurs;
    }
    state.counted += 1;
    if state.counted < state.plan.steps {
        return Step::Resume;
    }
    frame.rflags &= !TRAP_FLAG;
    state.stepping = None;
    strike(state, cpu, frame);
    let canonical = |address: u64| {
        let top = address >> 47;
        top == 0 || top == 0x1_ffff
    };
    if !canonical(frame.rip) {
        frame.vector = 13;
        frame.error_code = 0;
        return Step::Faulted;
    }
    if !canonical(frame.rsp) {
        frame.vector = 12;
        frame.error_code = 0;
        return Step::Faulted;
    }
    Step::Resume
}

/// The fault strikes on `frame`, the target's live context on `cpu`.
fn strike(state: &mut Armed, cpu: usize, frame: &mut TrapFrame) {
    PENDING.store(false, Ordering::Release);
    let plan = state.plan;
    let rip = frame.rip;
    let mut struck = Struck {
        cpu,
        tsc: crate::apic::tsc(),
        rip,
        location: "rip",
        address: 0,
        bit: plan.bit,
        before: rip,
        after: 0,
        detected_tsc: None,
        restore: [None; 2],
    };
    match plan.kind {
        Kind::Failstop => frame.rip = 0,
        Kind::Register => {
            let register = register_mut(frame, plan.location);
            struck.before = *register;
            *register ^= 1 << plan.bit;
            struck.after = *register;
            struck.location = REGISTERS[usize::from(plan.location)];
        }
        Kind::Code => {
            let address = rip.wrapping_add(u64::from(plan.location));
            struck.location = "code";
            struck.address = address;
            match translate(address) {
                Some(physical) => {
                    let byte = paging::phys_to_virt(physical).as_mut_ptr::<u8>();
                    // SAFETY: `physical` backs a page of the domain's code (mapped in its
                    // address space, active now); the direct map covers it. The byte is put
                    // back at the next detection.
                    let before = unsafe { byte.read_volatile() };
                    let after = before ^ (1 << plan.bit);
                    // SAFETY: as above; nothing else writes domain code while it runs.
                    unsafe { byte.write_volatile(after) };
                    struck.before = u64::from(before);
                    struck.after = u64::from(after);
                    struck.restore[0] = Some((physical, before));
                }
                None => {
                    // Past the end of its code: nothing there to flip.
                    struck.before = 0;
                    struck.after = 0;
                }
            }
        }
        Kind::Hang => {
            // `jmp $`: EB FE. Each byte through its own translation (RIP may end a page).
            struck.location = "code";
            struck.address = rip;
            let mut before = [0u8; 2];
            let mut after = [0u8; 2];
            for (index, loop_byte) in [0xebu8, 0xfe].into_iter().enumerate() {
                let Some(physical) = translate(rip.wrapping_add(index as u64)) else {
                    continue;
                };
                let byte = paging::phys_to_virt(physical).as_mut_ptr::<u8>();
                // SAFETY: as for a code fault: a byte of the target's code, mapped in the
                // active address space, through the direct map; put back at the detection.
                before[index] = unsafe { byte.read_volatile() };
                // SAFETY: as above.
                unsafe { byte.write_volatile(loop_byte) };
                after[index] = loop_byte;
                struck.restore[index] = Some((physical, before[index]));
            }
            struck.before = u64::from(u16::from_le_bytes(before));
            struck.after = u64::from(u16::from_le_bytes(after));
        }
    }
    // Nothing is printed here: a console line costs the emulated time of sending it, which
    // would count as detection latency (and shift the system's timing); `log_outcome` says it
    // at the end of the run.
    state.struck = Some(struck);
    if BREAK.load(Ordering::Relaxed) {
        // SAFETY: `xchg bx, bx` exchanges a register with itself: a no-op on hardware, and
        // bochs' magic breakpoint (its debugger stops here, in the injector, with the
        // faulted context in `frame` on this stack).
        unsafe { core::arch::asm!("xchg bx, bx", options(nomem, nostack)) };
    }
}

/// The armed fault's state, if the lock can be had: at the end of a run another CPU may have
/// been halted holding it.
fn armed() -> Option<spin::MutexGuard<'static, Option<Armed>>> {
    (0..100_000).find_map(|_| ARMED.try_lock())
}

/// Says on the console where the fault struck (or that it did not), at the end of the run.
pub fn log_outcome() {
    let Some(armed) = armed() else {
        return;
    };
    let Some(state) = armed.as_ref() else {
        return;
    };
    let Some(struck) = state.struck else {
        log::warn!(
            "INJECT {} into {}: not injected ({} of {} instructions counted)",
            state.plan.kind.name(),
            state.name,
            state.counted,
            state.plan.steps
        );
        return;
    };
    log::warn!(
        "INJECT {} into {} on CPU {} after {} instructions of its request {}: {} bit {} \
         {:#x} -> {:#x} at RIP {:#x}; detection latency {:?} TSC ticks",
        state.plan.kind.name(),
        state.name,
        struck.cpu,
        state.plan.steps,
        state.plan.skip + 1,
        struck.location,
        struck.bit,
        struck.before,
        struck.after,
        struck.rip,
        struck.detected_tsc.map(|tsc| tsc - struck.tsc)
    );
}

/// The field of `frame` holding register `index` of [`REGISTERS`].
fn register_mut(frame: &mut TrapFrame, index: u8) -> &mut u64 {
    match index {
        0 => &mut frame.rax,
        1 => &mut frame.rbx,
        2 => &mut frame.rcx,
        3 => &mut frame.rdx,
        4 => &mut frame.rsi,
        5 => &mut frame.rdi,
        6 => &mut frame.rbp,
        7 => &mut frame.rsp,
        8 => &mut frame.r8,
        9 => &mut frame.r9,
        10 => &mut frame.r10,
        11 => &mut frame.r11,
        12 => &mut frame.r12,
        13 => &mut frame.r13,
        14 => &mut frame.r14,
        15 => &mut frame.r15,
        RFLAGS => &mut frame.rflags,
        RIP => &mut frame.rip,
        _ => &mut frame.rax,
    }
}

/// The physical address `virtual_address` maps to in the active address space (the domain's,
/// while it runs), if it is mapped.
fn translate(virtual_address: u64) -> Option<u64> {
    let (cr3, _) = x86_64::registers::control::Cr3::read_raw();
    let mut table = cr3.start_address().as_u64();
    for level in (1..=4).rev() {
        let index = (virtual_address >> (12 + 9 * (level - 1))) & 0x1ff;
        let entry_address = paging::phys_to_virt(table + index * 8).as_ptr::<u64>();
        // SAFETY: `table` is a page-table page of the active hierarchy (CR3 and the entries
        // below it); the direct map covers all physical memory.
        let entry = unsafe { entry_address.read_volatile() };
        if entry & 1 == 0 {
            return None;
        }
        let frame = entry & 0x000f_ffff_ffff_f000;
        // A large page at level 3 (1 GiB) or 2 (2 MiB).
        if level > 1 && level < 4 && entry & (1 << 7) != 0 {
            let size = 1u64 << (12 + 9 * (level - 1));
            return Some((frame & !(size - 1)) | (virtual_address & (size - 1)));
        }
        if level == 1 {
            return Some(frame | (virtual_address & 0xfff));
        }
        table = frame;
    }
    None
}

/// A failure was detected in domain `failed` at `tsc`: the first after the fault is its
/// detection; a flipped code byte is put back before recovery runs; a target that fails
/// while being stepped is stepped again from its next request.
pub fn on_detection(failed: u16, tsc: u64) {
    let mut armed = ARMED.lock();
    let Some(state) = armed.as_mut() else {
        return;
    };
    if state.target == failed && state.struck.is_none() {
        state.stepping = None;
    }
    if let Some(struck) = state.struck.as_mut() {
        if struck.detected_tsc.is_none() {
            struck.detected_tsc = Some(tsc);
        }
        for (physical, byte) in struck.restore.iter_mut().filter_map(Option::take) {
            // SAFETY: a byte this module changed, in the domain's code page.
            unsafe {
                paging::phys_to_virt(physical)
                    .as_mut_ptr::<u8>()
                    .write_volatile(byte)
            };
        }
    }
}

/// The injection record for the summary, if a fault was armed.
pub fn report() -> Option<InjectionReport<'static>> {
    let armed = armed()?;
    let state = armed.as_ref()?;
    Some(InjectionReport {
        kind: state.plan.kind,
        domain: state.name,
        seed: state.seed,
        skip: state.plan.skip,
        steps: state.plan.steps,
        state: match state.struck {
            None => InjectionState::NotInjected {
                counted: state.counted,
            },
            Some(struck) => InjectionState::Injected {
                cpu: struck.cpu,
                tsc: struck.tsc,
                rip: struck.rip,
                location: struck.location,
                address: struck.address,
                bit: struck.bit,
                before: struck.before,
                after: struck.after,
                detected_tsc: struck.detected_tsc,
            },
        },
    })
}
