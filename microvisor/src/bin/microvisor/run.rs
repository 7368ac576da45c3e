//! What the run records and how it ends: CPUs online, timer ticks, completed stages, the
//! summary line, and the stop sequence for QEMU, bochs and real machines.

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use microvisor::cmdline::{DeliberateFault, FaultRequest};
use microvisor::summary::{
    BenchReport, DomainReport, Failure, Outcome, Summary, VmReport, VmxReport, WorkloadReport,
};
use spin::Mutex;
use x86_64::instructions::port::Port;

use crate::apic;
use crate::console::Console;
use crate::cpu::MAX_CPUS;

const MAX_STAGES: usize = 32;

struct Stages {
    names: [&'static str; MAX_STAGES],
    count: usize,
}

static STAGES: Mutex<Stages> = Mutex::new(Stages {
    names: [""; MAX_STAGES],
    count: 0,
});
static CPUS_REGISTERED: AtomicUsize = AtomicUsize::new(0);
static CPUS_EXPECTED: AtomicUsize = AtomicUsize::new(0);
static APIC_IDS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
static ONLINE: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
static TICKS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static PROTOCOL: Mutex<&'static str> = Mutex::new("unknown");
/// CPU index + 1 that must raise the deliberate fault (0: none), and which fault.
static FAULT_CPU: AtomicUsize = AtomicUsize::new(0);
static FAULT_KIND: Mutex<Option<DeliberateFault>> = Mutex::new(None);

/// Records that a stage of the boot completed.
pub fn stage(name: &'static str) {
    let mut stages = STAGES.lock();
    if stages.count < MAX_STAGES {
        let count = stages.count;
        stages.names[count] = name;
        stages.count += 1;
    } else {
        log::warn!("stage {name} not recorded: more than {MAX_STAGES} stages");
    }
    drop(stages);
    log::info!("stage done: {name}");
}

/// Records the boot protocol's name.
pub fn set_protocol(name: &'static str) {
    *PROTOCOL.lock() = name;
}

/// Records how many CPUs the MADT lists.
pub fn set_cpus_expected(count: usize) {
    CPUS_EXPECTED.store(count, Ordering::Relaxed);
}

/// Gives the CPU with `apic_id` the next CPU index.
pub fn register_cpu(apic_id: u32) -> usize {
    let index = CPUS_REGISTERED.fetch_add(1, Ordering::AcqRel);
    APIC_IDS[index].store(apic_id, Ordering::Relaxed);
    index
}

/// The local APIC ID of CPU index `cpu`, if it has registered.
pub fn apic_id(cpu: usize) -> Option<u32> {
    (cpu < cpus_registered().min(MAX_CPUS)).then(|| APIC_IDS[cpu].load(Ordering::Relaxed))
}

/// How many CPUs have an index.
pub fn cpus_registered() -> usize {
    CPUS_REGISTERED.load(Ordering::Acquire)
}

/// Marks CPU `index` online.
pub fn mark_online(index: usize) {
    ONLINE[index].store(true, Ordering::Release);
}

/// Waits up to `micros` for CPU `index` to come online.
pub fn wait_online(index: usize, micros: u64) -> bool {
    for _ in 0..micros.div_ceil(100) {
        if ONLINE[index].load(Ordering::Acquire) {
            return true;
        }
        apic::delay_us(100);
    }
    ONLINE[index].load(Ordering::Acquire)
}

fn cpus_online() -> usize {
    ONLINE
        .iter()
        .filter(|online| online.load(Ordering::Acquire))
        .count()
}

/// Counts a timer tick on this CPU (called from the timer interrupt).
pub fn count_timer_tick() {
    TICKS[crate::cpu::current_index()].fetch_add(1, Ordering::Relaxed);
}

/// Timer ticks (at [`crate::apic::TIMER_HZ`], 100 Hz: 5 s) a CPU may go without a tick of its
/// own before its watcher stops it with an NMI. Healthy code keeps interrupts off for far
/// less: the longest is a debug build's microreboot of a domain (its image's CRC), about 1 s
/// of emulated time at bochs' 4 M instructions per second.
pub const WATCHDOG_TICKS: u32 = 500;
/// Per watcher CPU: the watched CPU's tick count when last seen, and for how many of the
/// watcher's own ticks it has not moved.
static WATCH_SEEN: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static WATCH_QUIET: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];

/// The CPU watchdog, on every timer tick of `cpu`: each online CPU watches the next one (in
/// index order, round the ring). A watched CPU whose tick count has not moved for
/// [`WATCHDOG_TICKS`] of its watcher's ticks has interrupts off for good (a deadlock in the
/// core, a domain running with RFLAGS.IF clear): it gets an NMI, which it cannot mask, and
/// reports from there (`trap::watchdog_nmi`). One CPU has no watcher.
pub fn watchdog(cpu: usize) {
    let online = cpus_registered().min(MAX_CPUS);
    if online < 2 || cpu >= online || FINISHING.load(Ordering::Acquire) {
        return;
    }
    let watched = (cpu + 1) % online;
    if !ONLINE[watched].load(Ordering::Acquire) {
        return;
    }
    let ticks = TICKS[watched].load(Ordering::Relaxed);
    if WATCH_SEEN[cpu].swap(ticks, Ordering::Relaxed) != ticks {
        WATCH_QUIET[cpu].store(0, Ordering::Relaxed);
        return;
    }
    if WATCH_QUIET[cpu].fetch_add(1, Ordering::Relaxed) + 1 == WATCHDOG_TICKS {
        crate::apic::send_nmi(APIC_IDS[watched].load(Ordering::Relaxed));
    }
}

/// Waits up to `micros` until every online CPU has counted at least `ticks` timer ticks.
pub fn wait_ticks_everywhere(ticks: u64, micros: u64) -> bool {
    let all_ticked = || {
        (0..MAX_CPUS).all(|cpu| {
            !ONLINE[cpu].load(Ordering::Acquire) || TICKS[cpu].load(Ordering::Relaxed) >= ticks
        })
    };
    for _ in 0..micros.div_ceil(1000) {
        if all_ticked() {
            return true;
        }
        apic::delay_us(1000);
    }
    all_ticked()
}

/// Arranges for CPU `request.cpu` to raise the deliberate fault; the bootstrap processor
/// raises it at once, an application processor from its idle loop.
pub fn request_fault(request: FaultRequest) {
    *FAULT_KIND.lock() = Some(request.fault);
    FAULT_CPU.store(request.cpu + 1, Ordering::Release);
    if request.cpu == crate::cpu::current_index() {
        raise(request.fault);
    }
}

fn raise(fault: DeliberateFault) {
    log::info!("raising a deliberate {fault:?} in the core");
    // SAFETY: deliberately faulting instructions: the trap path reports them and ends the
    // run; none of them returns.
    unsafe {
        match fault {
            DeliberateFault::InvalidOpcode => core::arch::asm!("ud2", options(nostack)),
            // Nothing is mapped at 16 TiB in the lower half once the identity map is gone.
            DeliberateFault::PageFault => {
                core::arch::asm!("mov rax, [{0}]", in(reg) 0x1000_0000_0000u64, out("rax") _, options(nostack))
            }
            // A non-canonical address: #GP, not #PF.
            DeliberateFault::GeneralProtection => {
                core::arch::asm!("mov rax, [{0}]", in(reg) 0x8000_0000_0000_0000u64, out("rax") _, options(nostack))
            }
            DeliberateFault::StackOverflow => {
                let depth = overflow_stack(0);
                log::error!("the stack never overflowed ({depth} frames)");
            }
            DeliberateFault::Hang => core::arch::asm!("cli", "2:", "jmp 2b", options(nostack)),
        }
    }
}

/// Recurses with 1 KiB frames until the stack's guard page stops it (a #PF the trap path
/// reports); returns only if it does not within `u32::MAX` frames.
fn overflow_stack(depth: u64) -> u64 {
    let mut frame = [depth; 128];
    core::hint::black_box(&mut frame);
    if depth == u64::from(u32::MAX) {
        return depth;
    }
    overflow_stack(depth + 1).wrapping_add(frame[7])
}

/// Work the bootstrap processor hands to the application processors: call a domain from
/// each CPU (index + 1 of the domain; 0 = none).
static CALL_FROM_EVERY_CPU: AtomicUsize = AtomicUsize::new(0);
/// Bit `i` set: CPU `i` completed the call (and the reply checked out).
static CALLED: AtomicU64 = AtomicU64::new(0);

/// Has every application processor call domain `target` once with `request` (an echo), on
/// its own CPU; waits up to `micros`. Returns the CPUs that did not complete.
pub fn call_from_every_ap(target: u16, micros: u64) -> usize {
    CALLED.store(0, Ordering::Release);
    CALL_FROM_EVERY_CPU.store(usize::from(target) + 1, Ordering::Release);
    let registered = cpus_registered().min(64);
    let expected: u64 = (1..registered).fold(0, |mask, cpu| mask | (1 << cpu));
    for _ in 0..micros.div_ceil(100) {
        if CALLED.load(Ordering::Acquire) == expected {
            break;
        }
        apic::delay_us(100);
    }
    CALL_FROM_EVERY_CPU.store(0, Ordering::Release);
    (expected & !CALLED.load(Ordering::Acquire)).count_ones() as usize
}

/// A call the bootstrap processor hands to one application processor (boot checks):
/// `(cpu + 1) | target << 16 | request byte << 32`; 0 = none.
static CALL_ON: AtomicU64 = AtomicU64::new(0);
/// Its outcome: 0 while it runs, then 1 + the status it ended with (`Status::Ok` for a reply).
static CALL_ON_OUTCOME: AtomicU64 = AtomicU64::new(0);

/// Has application processor `cpu` call domain `target` with the one-byte request `request`
/// from its idle loop, without waiting for it: [`call_on_outcome`] says when it has returned.
pub fn start_call_on(cpu: usize, target: u16, request: u8) {
    CALL_ON_OUTCOME.store(0, Ordering::Release);
    let work = (cpu as u64 + 1) | (u64::from(target) << 16) | (u64::from(request) << 32);
    CALL_ON.store(work, Ordering::Release);
    if let Some(apic_id) = apic_id(cpu) {
        apic::send_to(apic_id, crate::trap::KICK_VECTOR);
    }
}

/// How the call started by [`start_call_on`] ended, once it has.
pub fn call_on_outcome() -> Option<microvisor_abi::Status> {
    match CALL_ON_OUTCOME.load(Ordering::Acquire) {
        0 => None,
        raw => microvisor_abi::Status::from_raw(raw - 1),
    }
}

/// Makes the call [`start_call_on`] handed to CPU `index`, if any.
fn serve_call_on(index: usize) {
    let work = CALL_ON.load(Ordering::Acquire);
    if work & 0xffff != index as u64 + 1
        || CALL_ON
            .compare_exchange(work, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    let (target, request) = ((work >> 16) as u16, [(work >> 32) as u8]);
    let mut reply = [0u8; 8];
    let status = match crate::domain::core_call(target, &request, &mut reply) {
        Ok(_) => microvisor_abi::Status::Ok,
        Err(status) => status,
    };
    CALL_ON_OUTCOME.store(status as u64 + 1, Ordering::Release);
}

/// The idle loop of CPU `index`: wait for interrupts, raise the deliberate fault if it is
/// this CPU's to raise, and do the calls the bootstrap processor asks for.
pub fn idle(index: usize) -> ! {
    x86_64::instructions::interrupts::enable();
    loop {
        let target = CALL_FROM_EVERY_CPU.load(Ordering::Acquire);
        if target != 0 && index < 64 && CALLED.load(Ordering::Acquire) & (1 << index) == 0 {
            let request = [0, index as u8, 0xc0, 0xde];
            let mut reply = [0u8; 4];
            let echoed = crate::domain::core_call((target - 1) as u16, &request, &mut reply)
                == Ok(4)
                && reply == request;
            if echoed {
                CALLED.fetch_or(1 << index, Ordering::AcqRel);
            } else {
                log::error!("call to domain {} from CPU {index} failed", target - 1);
            }
        }
        serve_call_on(index);
        if FAULT_CPU.load(Ordering::Acquire) == index + 1
            && let Some(fault) = *FAULT_KIND.lock()
        {
            raise(fault);
        }
        // Guests run on every CPU while a scenario is on.
        if crate::guest::running() {
            crate::guest::run_cpu(index);
        }
        // An idle CPU wakes domains that have notifications pending.
        crate::domain::deliver_notifications();
        x86_64::instructions::hlt();
    }
}

/// Stops this CPU for good.
pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

static FINISHING: AtomicBool = AtomicBool::new(false);

/// Whether the run is ending (`finish` has begun on some CPU).
pub fn finishing() -> bool {
    FINISHING.load(Ordering::Acquire)
}
/// Most benchmark results one run reports.
const MAX_BENCH: usize = 4;
static BENCH: Mutex<([Option<BenchReport<'static>>; MAX_BENCH], usize)> =
    Mutex::new(([None; MAX_BENCH], 0));
static WORKLOAD: Mutex<Option<WorkloadReport<'static>>> = Mutex::new(None);
static VMX_UNAVAILABLE: Mutex<Option<&'static str>> = Mutex::new(None);
static SCENARIO: Mutex<Option<&'static str>> = Mutex::new(None);

/// Records the scenario being run, for the summary.
pub fn record_scenario(name: &'static str) {
    *SCENARIO.lock() = Some(name);
}

/// Records why VMX is not used (the first reason any CPU gave).
pub fn record_vmx_unavailable(reason: &'static str) {
    let mut slot = VMX_UNAVAILABLE.lock();
    if slot.is_none() {
        *slot = Some(reason);
    }
}

/// Records how the synthetic workload ended, for the summary.
pub fn record_workload(report: WorkloadReport<'static>) {
    *WORKLOAD.lock() = Some(report);
}

/// Records a benchmark result for the summary.
pub fn record_bench(report: BenchReport<'static>) {
    let mut bench = BENCH.lock();
    let (reports, count) = &mut *bench;
    if let Some(slot) = reports.get_mut(*count) {
        *slot = Some(report);
        *count += 1;
    }
}

/// Prints the summary line and stops the machine: QEMU exits through isa-debug-exit, bochs
/// stops at the magic breakpoint, a real machine halts.
pub fn finish(failure: Option<Failure<'_>>) -> ! {
    x86_64::instructions::interrupts::disable();
    if FINISHING.swap(true, Ordering::AcqRel) {
        halt_forever();
    }
    // The VMs' outcomes before the other CPUs stop: one of them may hold the VM table for a
    // moment (the end of a slice), and halted there it would never let go.
    let mut vms = [VmReport::EMPTY; crate::guest::MAX_VMS];
    let vm_count = crate::guest::reports(&mut vms, false);
    apic::halt_other_cpus();
    crate::inject::log_outcome();
    let registered = CPUS_REGISTERED.load(Ordering::Acquire).min(MAX_CPUS);
    let apic_ids: [u32; MAX_CPUS] =
        core::array::from_fn(|cpu| APIC_IDS[cpu].load(Ordering::Relaxed));
    let ticks: [u64; MAX_CPUS] = core::array::from_fn(|cpu| TICKS[cpu].load(Ordering::Relaxed));
    let (stage_names, stage_count) = match STAGES.try_lock() {
        Some(stages) => (stages.names, stages.count),
        None => ([""; MAX_STAGES], 0),
    };
    let protocol = PROTOCOL.try_lock().map_or("unknown", |name| *name);
    let (bench_reports, bench_count) = match BENCH.try_lock() {
        Some(bench) => {
            let (reports, count) = *bench;
            let empty = BenchReport {
                name: "",
                samples: 0,
                min: 0,
                median: 0,
                p90: 0,
            };
            (reports.map(|report| report.unwrap_or(empty)), count)
        }
        None => (
            [BenchReport {
                name: "",
                samples: 0,
                min: 0,
                median: 0,
                p90: 0,
            }; MAX_BENCH],
            0,
        ),
    };
    let mut domains = [DomainReport {
        name: "",
        generation: 0,
        failures: 0,
    }; crate::domain::MAX_DOMAINS];
    let domain_count = crate::domain::reports(&mut domains);
    let summary = Summary {
        outcome: if failure.is_some() {
            Outcome::Failed
        } else {
            Outcome::Ok
        },
        boot_protocol: protocol,
        cpus_expected: CPUS_EXPECTED.load(Ordering::Relaxed),
        cpus_online: cpus_online(),
        apic_ids: &apic_ids[..registered],
        ran: &stage_names[..stage_count],
        timer_ticks: &ticks[..registered],
        tsc_khz: apic::tsc_khz(),
        free_memory_kib: crate::paging::free_frames() as u64 * 4,
        tsc: apic::tsc(),
        domains: &domains[..domain_count],
        last_detection: crate::domain::detection_report(),
        last_recovery: crate::domain::recovery_report(),
        vmx: {
            let (cpus_in_root, revision) = crate::vmx::status();
            VmxReport {
                cpus_in_root,
                revision,
                unavailable: VMX_UNAVAILABLE.try_lock().and_then(|reason| *reason),
            }
        },
        workload: WORKLOAD.try_lock().and_then(|workload| *workload),
        scenario: SCENARIO.try_lock().and_then(|scenario| *scenario),
        vms: &vms[..vm_count],
        bench: &bench_reports[..bench_count],
        injection: crate::inject::report(),
        failure,
    };
    let mut console = Console::lock_for_fatal();
    let _ = writeln!(console, "{summary}");
    console.drain();
    let code: u32 = if failure.is_some() { 0x11 } else { 0x10 };
    // SAFETY: port 0xf4 is QEMU's isa-debug-exit device when present and unused otherwise;
    // `xchg bx, bx` is a no-op on hardware and bochs' magic breakpoint.
    unsafe {
        Port::<u32>::new(0xf4).write(code);
        core::arch::asm!("xchg bx, bx", options(nomem, nostack));
    }
    halt_forever()
}
