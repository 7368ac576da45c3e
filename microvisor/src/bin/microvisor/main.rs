//! The microvisor kernel: boots on one CPU, brings up the core platform on every CPU in the
//! ACPI MADT, and reports the run as one JSON summary line.
//!
//! Bring-up order (each step is a stage in the summary's `ran` list):
//! boot info copied out → frame allocator → the core's page tables → per-CPU GDT/TSS/IDT →
//! ACPI MADT → local APIC and its timer → application processors → every CPU ticking.
//! See `docs/architecture.md` for the whole design and `docs/boot-contract.md` for what the
//! console output promises to `xtask`.
#![no_std]
#![no_main]

mod apic;
mod boot;
mod bootinfo;
mod console;
mod cpu;
mod domain;
mod domains;
mod guest;
mod guest_state;
mod inject;
mod madt;
mod paging;
mod quota;
mod run;
mod smp;
mod trap;
mod vm;
mod vmx;
mod workload;

use core::fmt::Write;
use core::panic::PanicInfo;
use microvisor::cmdline::{self, CmdlineError};
use microvisor::memmap::{self, PhysRange};
use microvisor::summary::Failure;

use crate::console::Console;
// The memory functions `core` needs; linked for their symbols.
use microvisor_freestanding as _;

unsafe extern "C" {
    static __image_phys_start: u8;
    static __image_phys_end: u8;
}

/// Entered from the boot stub on the bootstrap processor, in long mode, interrupts off.
extern "C" fn kmain(info: u64, protocol: u64) -> ! {
    Console::init();
    log::info!("microvisor {} starting", env!("CARGO_PKG_VERSION"));

    let boot = match bootinfo::parse(info, protocol) {
        Ok(boot) => boot,
        Err(error) => fail(
            "boot-info",
            format_args!("cannot use the boot information: {error}"),
        ),
    };
    run::set_protocol(boot.protocol);
    log::info!(
        "booted by {} with command line {:?}",
        boot.protocol,
        boot.cmdline()
    );
    if boot.cmdline_truncated {
        log::warn!("command line truncated");
    }
    let options = cmdline::parse(boot.cmdline(), |error| match error {
        CmdlineError::UnknownKey(key) => log::warn!("command line: unknown key {key:?} ignored"),
        CmdlineError::BadValue {
            key,
            value,
            expected,
        } => {
            log::warn!("command line: {key}={value:?} ignored, expected {expected}")
        }
    });
    run::stage("boot-info");

    // Physical memory: the usable map minus low memory (real-mode structures, the AP
    // trampoline), the kernel image and the boot modules.
    let image = PhysRange {
        start: &raw const __image_phys_start as u64,
        end: &raw const __image_phys_end as u64,
    };
    let mut reserved = [PhysRange { start: 0, end: 0 }; 18];
    reserved[0] = PhysRange {
        start: 0,
        end: 0x10_0000,
    };
    reserved[1] = image;
    for (slot, module) in reserved[2..].iter_mut().zip(boot.modules()) {
        *slot = *module;
    }
    let mut usable = [PhysRange { start: 0, end: 0 }; bootinfo::MAX_REGIONS * 2];
    let count = match memmap::usable_ranges(boot.regions(), &reserved, &mut usable) {
        Ok(count) => count,
        Err(error) => fail("frame-allocator", format_args!("memory map: {error:?}")),
    };
    let usable = &usable[..count];
    for range in usable {
        log::info!(
            "usable RAM {:#012x}..{:#012x} ({} KiB)",
            range.start,
            range.end,
            range.len() / 1024
        );
    }
    let beyond = paging::add_usable_memory(usable);
    if beyond > 0 {
        log::warn!(
            "{} MiB of RAM lie above what the frame allocator covers and stay unused",
            beyond >> 20
        );
    }
    log::info!("{} KiB free for the core", paging::free_frames() * 4);
    run::stage("frame-allocator");

    paging::init(usable.last().map_or(0, |range| range.end));
    run::stage("paging");

    let bsp_apic_id = raw_cpuid::CpuId::new()
        .get_feature_info()
        .map_or(0, |features| u32::from(features.initial_local_apic_id()));
    let bsp_index = run::register_cpu(bsp_apic_id);
    cpu::init_this_cpu(bsp_index, bsp_apic_id);
    run::mark_online(bsp_index);
    run::stage("gdt-tss-idt");

    let processors = match madt::processors(boot.acpi) {
        Ok(processors) => processors,
        Err(error) => fail(
            "acpi-madt",
            format_args!("cannot read the ACPI MADT: {error}"),
        ),
    };
    run::set_cpus_expected(processors.apic_ids().len());
    log::info!(
        "MADT lists {} enabled CPUs, APIC IDs {:?}",
        processors.apic_ids().len(),
        processors.apic_ids()
    );
    if processors.ignored > 0 {
        log::warn!(
            "{} CPUs beyond the core's limit of {} stay offline",
            processors.ignored,
            cpu::MAX_CPUS
        );
    }
    run::stage("acpi-madt");

    apic::disable_legacy_pic();
    apic::enable_this_cpu();
    let calibration = apic::calibrate();
    if !calibration.pit_answered {
        log::warn!("the PIT did not answer: timer rates are guesses");
    }
    log::info!(
        "APIC timer {} counts/ms (divide 16), TSC {} kHz, ticking at {} Hz",
        calibration.apic_per_ms,
        calibration.tsc_khz,
        apic::TIMER_HZ
    );
    apic::start_periodic_timer();
    x86_64::instructions::interrupts::enable();
    run::stage("apic-timer");

    let failed = smp::start_application_processors(processors.apic_ids(), bsp_apic_id);
    paging::drop_identity_map();
    if failed > 0 {
        fail("smp", format_args!("{failed} CPUs did not come online"));
    }
    run::stage("smp");

    // VMX root operation on every CPU (APs entered it at the end of their bring-up; a CPU in
    // VMX root blocks INIT, so the bootstrap processor goes last).
    match vmx::enter_root() {
        Ok(revision) => {
            let (in_root, _) = vmx::status();
            let online = run::cpus_registered();
            if in_root != online {
                fail(
                    "vmx-root",
                    format_args!("{in_root} of {online} CPUs entered VMX root operation"),
                );
            }
            log::info!("VMX root operation on all {in_root} CPUs (VMCS revision {revision:#x})");
            run::stage("vmx-root");
        }
        Err(unavailable) => {
            log::warn!("VMX not used: {}", unavailable.reason());
            run::record_vmx_unavailable(unavailable.reason());
        }
    }

    if !run::wait_ticks_everywhere(3, 2_000_000) {
        fail(
            "timer-all-cpus",
            format_args!("a CPU did not count 3 timer ticks within 2 s"),
        );
    }
    run::stage("timer-all-cpus");

    // Campaign runs skip what is the same in every boot (`selfcheck=0`, scenarios only).
    if options.skip_self_checks && options.scenario.is_none() {
        log::warn!("selfcheck=0 ignored: it applies to scenario boots only");
    }
    let self_checks = !options.skip_self_checks || options.scenario.is_none();
    domain::set_repairs(options.repairs.0);
    if options.repairs != cmdline::Repairs::default() {
        let names = microvisor_abi::repair::NAMES
            .iter()
            .filter(|(_, bit)| options.repairs.0 & bit != 0)
            .map(|(name, _)| *name);
        let mut list: heapless::String<160> = heapless::String::new();
        for name in names {
            let _ = list.push_str(if list.is_empty() { "" } else { "," });
            let _ = list.push_str(name);
        }
        log::warn!(
            "repairs={}: recoveries make only these repairs",
            if list.is_empty() { "none" } else { &list }
        );
    }
    domains::bring_up(
        &boot,
        options.recovery,
        options.inject,
        options.bench,
        options.scenario.is_some(),
        self_checks,
        options.check_escalation,
    );

    // The first VMX guest, once the domains that serve its hypercalls are up.
    if self_checks && vmx::status().0 > 0 && domain::find("hypercall").is_some() {
        match vm::run_first_guest() {
            Ok((registers, exits)) => {
                // NULL answered 0 (kept in BX); MEMORY_POPULATE answered a frame of the pool.
                if registers.rbx & 0xffff != 0
                    || !u32::try_from(registers.rax).is_ok_and(guest::in_pool)
                {
                    fail(
                        "vmx-guest",
                        format_args!(
                            "the guest's hypercalls returned BX {:#x}, RAX {:#x}",
                            registers.rbx, registers.rax
                        ),
                    );
                }
                log::info!(
                    "first guest ran: null hypercall -> 0, memory populate -> frame {:#x}, halted after {exits} VM exits",
                    registers.rax
                );
                run::stage("vmx-guest");
                if matches!(
                    options.bench,
                    Some(cmdline::Benchmark::Hypercall | cmdline::Benchmark::All)
                ) {
                    bench_hypercalls();
                }
            }
            Err(error) => fail(
                "vmx-guest",
                format_args!("the first guest did not run: {error}"),
            ),
        }
    }

    if let Some(scenario) = options.scenario {
        let target = match options.inject {
            Some(cmdline::InjectedFault::Failstop { domain })
                if ["scheduler", "memory", "timer", "hypercall"].contains(&domain) =>
            {
                Some(domain)
            }
            _ => None,
        };
        inject::set_break(options.inject_break);
        let stepped = match options.inject {
            Some(cmdline::InjectedFault::Stepped { domain, spec }) => {
                Some((domain, spec, options.seed))
            }
            _ => None,
        };
        let reply_fault = match options.inject {
            Some(cmdline::InjectedFault::LostReply { .. }) => Some(None),
            Some(cmdline::InjectedFault::BadReply { domain }) => Some(Some(domain)),
            _ => None,
        };
        let budget_ms = options
            .scenario_budget_s
            .map_or(SCENARIO_BUDGET_MS, |seconds| seconds * 1000);
        run_scenario(scenario, target, stepped, reply_fault, budget_ms);
    }

    if let Some(request) = options.fault {
        run::request_fault(request);
        // An application processor raises it from its idle loop; wait for the report (a hang
        // is reported once the watchdog has seen no tick for `WATCHDOG_TICKS`).
        apic::delay_us(match request.fault {
            cmdline::DeliberateFault::Hang => 10_000_000,
            _ => 2_000_000,
        });
        fail(
            "fault",
            format_args!(
                "the deliberate fault on CPU {} was not reported",
                request.cpu
            ),
        );
    }
    run::finish(None)
}

/// Creates the scenario's VMs and runs them on every CPU until each has a verdict; ends the
/// run failed if one is not `passed`.
fn run_scenario(
    scenario: &'static microvisor::scenario::Scenario,
    inject: Option<&str>,
    stepped: Option<(&str, microvisor::inject::Spec, u64)>,
    reply_fault: Option<Option<&str>>,
    budget_ms: u64,
) {
    use microvisor::scenario::{CONTROL_VM, FIRST_VM, home_cpu};
    if vmx::status().0 == 0 {
        fail(
            "scenario",
            format_args!(
                "scenario {} needs VMX, which this machine lacks",
                scenario.name
            ),
        );
    }
    run::record_scenario(scenario.name);
    // Frames in use that no VM of the table holds before the scenario (the first guest's
    // populated frame stays its own): the scenario must not add to them.
    let unheld_before = guest::frame_accounting().map(|(held, in_use)| in_use.saturating_sub(held));
    let cpus = run::cpus_registered();
    log::info!("scenario {}: {}", scenario.name, scenario.about);
    for (index, spec) in scenario.vms.iter().enumerate() {
        let Some(image) = domains::guest_image(spec.guest) else {
            fail(
                "scenario",
                format_args!("the boot bundle has no guest-{}.elf", spec.guest),
            );
        };
        let id = if spec.privileged {
            CONTROL_VM
        } else {
            FIRST_VM + index as u16
        };
        let mut modules: heapless::Vec<(&'static str, &'static [u8]), { MAX_MODULES }> =
            heapless::Vec::new();
        for &name in spec.modules {
            let Some(module) = domains::guest_image(name) else {
                fail(
                    "scenario",
                    format_args!("the boot bundle has no guest-{name}.elf"),
                );
            };
            if modules.push((name, module)).is_err() {
                fail("scenario", format_args!("VM {id} has too many modules"));
            }
        }
        let config = guest::VmConfig {
            id,
            guest: spec.guest,
            image,
            home_cpu: home_cpu(index, cpus),
            params: spec.params,
            privileged: spec.privileged,
            modules: &modules,
            start: true,
            vcpus: spec.vcpus,
            quota: if spec.privileged {
                ipc::quota::Quota::CONTROL_VM
            } else {
                ipc::quota::Quota::APP_VM
            },
        };
        if let Err(error) = guest::create_vm(&config) {
            fail("scenario", format_args!("creating VM {id}: {error}"));
        }
    }
    run::stage("scenario-vms-created");
    // An injected fail-stop strikes a while into the run, with every VM going.
    let injected = inject.map(|target| {
        (
            target,
            domains::inject_into_scenario(target, scenario.inject_after),
        )
    });
    // A register, code or stepped fault: armed the same way, classified by whoever reads the
    // summary (a campaign), since it may as well go unnoticed.
    if let Some((target, spec, seed)) = stepped {
        domains::arm_stepped(target, spec, seed, scenario.inject_after);
    }
    // A fault in a reply: lost (memory's, to an EPT violation), or corrupted (`Some(domain)`).
    let replied = reply_fault.map(|bad| match bad {
        None => ("memory", domains::arm_lost_reply()),
        Some(target) => (target, domains::arm_bad_reply(target)),
    });
    // A bound in TSC (emulated time under bochs) so a stuck guest cannot hang the run.
    let budget = apic::tsc_khz().max(1000) * budget_ms;
    let (declared_before, _) = crate::domain::declared_failed();
    if !guest::run_all(budget) {
        if let (declared, Some(name)) = crate::domain::declared_failed()
            && declared != declared_before
        {
            fail(
                "recovery",
                format_args!(
                    "the recovery manager declared {name} failed for good: the system cannot go on"
                ),
            );
        }
        fail(
            "scenario",
            format_args!("not every VM finished within {} s", budget_ms / 1000),
        );
    }
    let mut reports = [microvisor::summary::VmReport::EMPTY; guest::MAX_VMS];
    let count = guest::reports(&mut reports, true);
    if count == 0 {
        fail("scenario", format_args!("the VM table holds no VM"));
    }
    // A VM the scenario lists must end as it says; VMs the control VM created must pass.
    let expected = |vm: u16| {
        usize::from(vm)
            .checked_sub(usize::from(FIRST_VM))
            .and_then(|index| scenario.vms.get(index))
            .filter(|spec| !spec.privileged)
            .map_or("passed", |spec| spec.expected_verdict())
    };
    if let Some(bad) = reports[..count]
        .iter()
        .find(|report| report.verdict != expected(report.vm))
    {
        fail(
            "scenario",
            format_args!(
                "VM {} ({}) ended {}, expected {}",
                bad.vm,
                bad.guest,
                bad.verdict,
                expected(bad.vm)
            ),
        );
    }
    log::info!(
        "scenario {}: all {count} VMs ended as expected",
        scenario.name
    );
    run::stage("scenario");
    if let Some((target, (index, before))) = injected {
        domains::check_injection(target, index, before);
    }
    if let Some((target, (index, before))) = replied {
        domains::check_injection(target, index, before);
    }
    // Every frame the memory domain counts in use is held by a VM, but for those it already
    // counted before the scenario: none leaked (a lost reply of an allocation would leave one
    // owned and mapped nowhere).
    match (guest::frame_accounting(), unheld_before) {
        (Some((held, in_use)), Some(before)) if in_use == held + before => {
            log::info!(
                "frames: {in_use} in use, held by the VMs ({before} from before the scenario)"
            );
        }
        (Some((held, in_use)), Some(before)) => fail(
            "scenario",
            format_args!(
                "{} frames leaked: the memory domain counts {in_use} in use, the VMs hold {held} \
                 (and {before} were in use outside them before the scenario)",
                in_use.abs_diff(held + before)
            ),
        ),
        _ => fail(
            "scenario",
            format_args!("the memory domain did not answer its statistics"),
        ),
    }
}

const MAX_MODULES: usize = microvisor_abi::guest::MAX_MODULES;

/// How long (in TSC time) a scenario may run before it counts as stuck, unless `budget=` says.
const SCENARIO_BUDGET_MS: u64 = 60_000;

/// `bench=hypercall`: a guest's null hypercall, answered in the core, then served by the
/// hypercall domain (the VM exit becoming a message): the cost of putting a service in a domain.
fn bench_hypercalls() {
    use microvisor::summary::BenchReport;
    for (in_domain, name) in [
        (false, "null-hypercall-served-in-core"),
        (true, "null-hypercall-served-by-domain"),
    ] {
        match vm::bench_null_hypercall(in_domain) {
            Ok((mut samples, count)) => {
                if let Some(report) = BenchReport::from_samples(name, &mut samples[..count]) {
                    log::info!(
                        "{name}: median {} TSC (min {}, p90 {}) per hypercall, {} samples",
                        report.median,
                        report.min,
                        report.p90,
                        report.samples
                    );
                    run::record_bench(report);
                }
            }
            Err(error) => fail("bench-hypercall", format_args!("{name}: {error}")),
        }
    }
    run::stage("bench-hypercall");
}

/// Text of a failure message, formatted into a fixed buffer (cut if too long).
struct MessageBuffer {
    bytes: [u8; 256],
    length: usize,
}

impl MessageBuffer {
    const fn new() -> Self {
        Self {
            bytes: [0; 256],
            length: 0,
        }
    }

    fn as_str(&self) -> &str {
        // Cut at a character boundary if the buffer filled mid-character.
        match core::str::from_utf8(&self.bytes[..self.length]) {
            Ok(text) => text,
            Err(error) => core::str::from_utf8(&self.bytes[..error.valid_up_to()]).unwrap_or(""),
        }
    }
}

impl Write for MessageBuffer {
    fn write_str(&mut self, text: &str) -> core::fmt::Result {
        let room = self.bytes.len() - self.length;
        let take = text.len().min(room);
        self.bytes[self.length..self.length + take].copy_from_slice(&text.as_bytes()[..take]);
        self.length += take;
        Ok(())
    }
}

/// Ends the run as failed at `stage`.
pub fn fail(stage: &'static str, reason: core::fmt::Arguments<'_>) -> ! {
    let mut message = MessageBuffer::new();
    let _ = message.write_fmt(reason);
    log::error!("{stage}: {}", message.as_str());
    run::finish(Some(Failure::Check {
        stage,
        reason: message.as_str(),
    }))
}

/// Never called: the kernel is built with `panic = "abort"`, but the precompiled `core`
/// still references the symbol.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    inject::on_core_failure(apic::tsc());
    let mut message = MessageBuffer::new();
    let _ = write!(message, "{}", info.message());
    if let Some(location) = info.location() {
        let _ = write!(message, " at {}:{}", location.file(), location.line());
    }
    let cpu = cpu::current_index();
    {
        let mut console = Console::lock_for_fatal();
        let _ = writeln!(console, "PANIC on CPU {cpu}: {}", message.as_str());
    }
    run::finish(Some(Failure::Panic {
        cpu,
        message: message.as_str(),
    }))
}
