//! Loading the domains from the boot bundle and checking, on every boot, that they are
//! isolated: each misbehaviour of the probe domain must be caught as the probe's own fault,
//! recovered, and leave the probe serving again.

use microvisor::cmdline::{Benchmark, InjectedFault, RecoveryMode};
use microvisor::summary::BenchReport;
use microvisor_abi::Status;
use microvisor_abi::manifest::Manifest;
use tar_no_std::TarArchiveRef;

use crate::bootinfo::BootInfo;
use crate::{apic, domain, paging, run, workload};

/// The manifest, decoded once at boot; domain names borrow from it for the whole run.
static MANIFEST: spin::Once<Manifest> = spin::Once::new();

/// Reads and checks `manifest.bin` from the bundle (the rules are the ones `xtask` applied at
/// build time; a bundle that breaks them is refused).
fn read_manifest(archive: &TarArchiveRef<'static>) -> &'static Manifest {
    let Some(entry) = archive
        .entries()
        .find(|entry| entry.filename().as_str() == Ok("manifest.bin"))
    else {
        crate::fail(
            "domains",
            format_args!("the domain bundle has no manifest.bin"),
        );
    };
    match Manifest::decode(entry.data()) {
        Ok(manifest) => MANIFEST.call_once(|| manifest),
        Err(error) => crate::fail("domains", format_args!("the manifest is refused: {error}")),
    }
}

/// Probe requests that must each fault inside the probe (see `tests/probe-domain`).
const MISBEHAVIOURS: &[(u8, &str)] = &[
    (1, "write into the core's image"),
    (2, "write through the core's direct map"),
    (3, "write into its own code"),
    (4, "fail-stop (jump to 0)"),
    (5, "panic"),
];

/// Round trips timed by `bench=ipc`.
const BENCH_SAMPLES: usize = 1000;

/// Guest kernel images a bundle may hold.
const MAX_GUEST_IMAGES: usize = 8;

/// The guest kernels of the boot bundle (`guest-NAME.elf`), by name.
#[allow(clippy::type_complexity)]
static GUESTS: spin::Mutex<heapless::Vec<(heapless::String<32>, &'static [u8]), MAX_GUEST_IMAGES>> =
    spin::Mutex::new(heapless::Vec::new());

/// The guest kernel called `name`, from the boot bundle.
pub fn guest_image(name: &str) -> Option<&'static [u8]> {
    GUESTS
        .lock()
        .iter()
        .find(|(guest, _)| guest.as_str() == name)
        .map(|(_, image)| *image)
}

/// Loads every domain in the bundle and runs the isolation checks, recovering the probe by
/// `mode` after each misbehaviour; ends the run on failure. With `bench`, then times IPC
/// round trips. Without `self_checks` (a scenario boot with `selfcheck=0`), stops once the
/// domains are loaded, unless a fail-stop aimed at the probe or the recovery manager needs the
/// checks to strike in.
pub fn bring_up(
    boot: &BootInfo,
    mode: RecoveryMode,
    inject: Option<InjectedFault<'_>>,
    bench: Option<Benchmark>,
    scenario: bool,
    self_checks: bool,
    check_escalation: bool,
) {
    domain::set_recovery_mode(mode);
    let Some(module) = boot.modules().first() else {
        log::warn!("no domain bundle among the boot modules: running without domains");
        return;
    };
    let virt = paging::phys_to_virt(module.start).as_ptr::<u8>();
    // SAFETY: the module's range was reserved from the frame allocator at boot and is covered
    // by the direct map; nothing writes to it.
    let bytes: &'static [u8] = unsafe { core::slice::from_raw_parts(virt, module.len() as usize) };
    let archive = match TarArchiveRef::new(bytes) {
        Ok(archive) => archive,
        Err(error) => crate::fail(
            "domains",
            format_args!("the domain bundle is not a tar archive: {error:?}"),
        ),
    };
    let manifest = read_manifest(&archive);
    let cpus = run::cpus_registered();
    let mut probe = None;
    let mut loaded = 0u32;
    for entry in archive.entries() {
        let filename = entry.filename();
        let Ok(file) = filename.as_str() else {
            crate::fail(
                "domains",
                format_args!("a bundle entry has a non-UTF-8 name"),
            );
        };
        if file == "manifest.bin" {
            continue;
        }
        if let Some(guest) = file
            .strip_prefix("guest-")
            .and_then(|name| name.strip_suffix(".elf"))
        {
            let Ok(name) = heapless::String::try_from(guest) else {
                crate::fail(
                    "domains",
                    format_args!("guest kernel name {guest:?} is too long"),
                );
            };
            if GUESTS.lock().push((name, entry.data())).is_err() {
                crate::fail(
                    "domains",
                    format_args!("the bundle holds more than {MAX_GUEST_IMAGES} guest kernels"),
                );
            }
            log::info!("guest kernel {guest}: {} bytes of ELF", entry.data().len());
            continue;
        }
        let Some(spec) = file
            .strip_suffix(".elf")
            .and_then(|stem| manifest.find(stem))
        else {
            crate::fail(
                "domains",
                format_args!("{file:?} in the bundle is not a domain of the manifest"),
            );
        };
        let name: &'static str = spec.name.as_str();
        match domain::load(
            spec.index,
            name,
            entry.data(),
            cpus,
            spec.may_call,
            u64::from(spec.state_pages),
        ) {
            Ok(()) => {
                log::info!(
                    "domain {name} loaded as index {} ({} bytes of ELF, {} state pages, may call {:#x})",
                    spec.index,
                    entry.data().len(),
                    spec.state_pages,
                    spec.may_call
                );
                loaded |= 1 << spec.index;
                if name == "probe" {
                    probe = Some(spec.index);
                }
            }
            Err(error) => crate::fail("domains", format_args!("loading domain {name}: {error}")),
        }
    }
    if let Some(missing) = manifest
        .domains
        .iter()
        .find(|spec| loaded & (1 << spec.index) == 0)
    {
        crate::fail(
            "domains",
            format_args!(
                "the manifest lists {} but the bundle has no image of it",
                missing.name
            ),
        );
    }
    let Some(probe) = probe else {
        crate::fail("domains", format_args!("the bundle holds no probe domain"));
    };
    // The self-checks fail the probe on purpose, one failure after another: they run with
    // the first order pinned, and the boot's policy is set once they are done.
    configure_recovery_manager(domain::order_for(mode), 0);
    if let Err(why) = crate::guest::configure_pool() {
        crate::fail("domains", format_args!("guest memory pool: {why}"));
    }
    // A fail-stop aimed at the recovery manager strikes as it decides the probe's first
    // recovery: the core must restart it and still recover the probe.
    let manager_injection = match inject {
        Some(InjectedFault::Failstop {
            domain: "recovery-manager",
        }) => {
            let failures =
                domain::describe(domain::RECOVERY_MANAGER).map_or(0, |(_, _, failures)| failures);
            domain::arm_failstop(domain::RECOVERY_MANAGER, 0);
            Some(failures)
        }
        _ => None,
    };
    run::stage("domains");
    let strikes_in_checks = matches!(
        inject,
        Some(InjectedFault::Failstop {
            domain: "recovery-manager" | "probe"
        })
    );
    if !self_checks && !strikes_in_checks && bench.is_none() {
        log::info!("boot self-checks skipped (selfcheck=0)");
        set_policy(mode, probe);
        return;
    }
    check_probe(probe, mode);
    run::stage("domain-isolation");
    // The calling CPU runs the callee: every CPU enters its own thread of the probe.
    let missing = run::call_from_every_ap(probe, 2_000_000);
    if missing > 0 {
        crate::fail(
            "domain-calls-every-cpu",
            format_args!("{missing} CPUs could not call the probe on their own thread"),
        );
    }
    run::stage("domain-calls-every-cpu");
    if cpus >= 2 {
        check_quiesce(probe);
        run::stage("domain-quiesce");
    }
    set_policy(mode, probe);
    if let Some(before) = manager_injection {
        let failures =
            domain::describe(domain::RECOVERY_MANAGER).map_or(0, |(_, _, failures)| failures);
        if failures != before + 1 {
            crate::fail(
                "inject-failstop",
                format_args!(
                    "the recovery manager failed {before} -> {failures} times: the fail-stop was not hit"
                ),
            );
        }
        log::info!(
            "fail-stop injected into the recovery manager: the core restarted it and recovered the probe"
        );
        run::stage("inject-failstop");
    }
    match inject {
        Some(InjectedFault::Failstop {
            domain: "recovery-manager",
        }) => run_workload(None),
        Some(InjectedFault::Failstop { domain: "probe" }) => {
            inject_failstop(index_of("probe"));
            run::stage("inject-failstop");
            run_workload(None);
        }
        // With a scenario, a service's fail-stop strikes while the guests run (see
        // `inject_into_scenario`).
        Some(InjectedFault::Failstop { domain: _ }) if scenario => run_workload(None),
        Some(InjectedFault::Failstop { domain: target }) => run_workload(Some(target)),
        // Register, code and stepped faults strike under a scenario (`crate::inject`).
        Some(
            InjectedFault::Stepped { .. }
            | InjectedFault::LostReply { .. }
            | InjectedFault::BadReply { .. },
        ) if scenario => run_workload(None),
        Some(
            InjectedFault::Stepped { domain, .. }
            | InjectedFault::LostReply { domain }
            | InjectedFault::BadReply { domain },
        ) => crate::fail(
            "inject",
            format_args!(
                "a register, code, stepped or lost-reply fault ({domain}) needs scenario=NAME"
            ),
        ),
        None => run_workload(None),
    }
    if matches!(bench, Some(Benchmark::Ipc | Benchmark::All)) {
        bench_ipc(probe);
        run::stage("bench-ipc");
    }
    // Last, since it leaves the probe failed for good.
    if check_escalation {
        self::check_escalation(probe, mode);
        run::stage("escalation");
    }
}

fn echo(probe: u16, tag: u8) -> Result<(), Status> {
    let request = [0, tag, 0x5a, 0xa5];
    let mut reply = [0u8; 8];
    let length = domain::core_call(probe, &request, &mut reply)?;
    if reply[..length] == request {
        Ok(())
    } else {
        crate::fail(
            "domain-isolation",
            format_args!("probe echoed {:?} for {request:?}", &reply[..length]),
        )
    }
}

/// Asks the probe for its request counter (a static in its data segment).
fn probe_counter(probe: u16) -> u32 {
    let mut reply = [0u8; 4];
    match domain::core_call(probe, &[8], &mut reply) {
        Ok(4) => u32::from_le_bytes(reply),
        other => crate::fail(
            "domain-isolation",
            format_args!("the probe's counter did not answer: {other:?}"),
        ),
    }
}

fn check_probe(probe: u16, mode: RecoveryMode) {
    if let Err(status) = echo(probe, 1) {
        crate::fail(
            "domain-isolation",
            format_args!("first call to the probe failed: {status:?}"),
        );
    }
    let mut reply = [0u8; 8];
    if domain::core_call(probe, &[7], &mut reply).is_err() {
        crate::fail("domain-isolation", format_args!("the probe could not log"));
    }
    // A call the manifest does not allow is refused by the core, and the probe survives.
    match domain::core_call(probe, &[6, 0], &mut reply) {
        Ok(1) if reply[0] == Status::NoCapability as u8 => {}
        other => crate::fail(
            "domain-isolation",
            format_args!("a call without capability gave {other:?} / {:?}", reply[0]),
        ),
    }
    // Notifications are checked against the manifest like calls: the probe may notify nobody.
    match domain::core_call(probe, &[9, 2], &mut reply) {
        Ok(1) if reply[0] == Status::NoCapability as u8 => {}
        other => crate::fail(
            "domain-isolation",
            format_args!(
                "a notification without capability gave {other:?} / {:?}",
                reply[0]
            ),
        ),
    }
    let mut counter = probe_counter(probe);
    for (round, &(request, what)) in MISBEHAVIOURS.iter().enumerate() {
        let (before, failures_before) = domain::describe(probe)
            .map_or((0, 0), |(_, generation, failures)| (generation, failures));
        match domain::core_call(probe, &[request], &mut reply) {
            Err(Status::PeerRestarted) => {}
            other => crate::fail(
                "domain-isolation",
                format_args!("probe told to {what}: expected PeerRestarted, got {other:?}"),
            ),
        }
        // Exactly one failure of the probe detected and recovered. (The last detection may be
        // another domain's: a recovery manager failing as it decides this one.)
        let (after, failures) = domain::describe(probe)
            .map_or((0, 0), |(_, generation, failures)| (generation, failures));
        if after != before + 1 || failures != failures_before + 1 {
            crate::fail(
                "domain-isolation",
                format_args!(
                    "probe told to {what}: failures {failures_before} -> {failures}, generation {before} -> {after}"
                ),
            );
        }
        if let Err(status) = echo(probe, round as u8 + 2) {
            crate::fail(
                "domain-isolation",
                format_args!("probe not serving after {what}: {status:?}"),
            );
        }
        // A microreset keeps the domain's memory (the counter goes on); a microreboot reloads
        // its data from the pristine image (the counter starts again).
        let counter_before = counter;
        counter = probe_counter(probe);
        let expected = match mode {
            RecoveryMode::Escalate | RecoveryMode::Microreset => counter_before + 1,
            RecoveryMode::Microreboot => 1,
        };
        if counter != expected {
            crate::fail(
                "domain-isolation",
                format_args!(
                    "after a {} the probe's counter is {counter}, expected {expected}",
                    mode.name()
                ),
            );
        }
        log::info!(
            "probe told to {what}: caught, {}, serving again (generation {after}, counter {counter})",
            if mode == RecoveryMode::Microreboot {
                "microreboot"
            } else {
                "microreset"
            }
        );
    }
}

/// A failure while another CPU is inside the same domain: CPU 1 enters the probe and stays
/// there (request 10: a spin), then CPU 0 fails the probe (request 4: a jump to 0). The
/// recovery must take CPU 1 out before it touches the probe (CPU 1's call ends with
/// `PeerRestarted`), count one failure (CPU 1's spinning thread is not detected later as a
/// second one, a hang), and leave the probe serving on every CPU.
fn check_quiesce(probe: u16) {
    let (generation, failures) =
        domain::describe(probe).map_or((0, 0), |(_, generation, failures)| (generation, failures));
    run::start_call_on(1, probe, 10);
    wait_for_quiesce_check("CPU 1 did not enter the probe", || {
        (domain::running_on(1) == Some(probe)).then_some(())
    });
    let mut reply = [0u8; 8];
    match domain::core_call(probe, &[4], &mut reply) {
        Err(Status::PeerRestarted) => {}
        other => crate::fail(
            "domain-quiesce",
            format_args!("CPU 0 failed the probe: expected PeerRestarted, got {other:?}"),
        ),
    }
    let outcome = wait_for_quiesce_check(
        "CPU 1 is still inside the probe after its recovery",
        run::call_on_outcome,
    );
    let (generation_after, failures_after) =
        domain::describe(probe).map_or((0, 0), |(_, generation, failures)| (generation, failures));
    if outcome != Status::PeerRestarted
        || failures_after != failures + 1
        || generation_after != generation + 1
    {
        crate::fail(
            "domain-quiesce",
            format_args!(
                "CPU 1's call ended {outcome:?}; failures {failures} -> {failures_after}, generation {generation} -> {generation_after} (expected PeerRestarted, one failure)"
            ),
        );
    }
    let missing = run::call_from_every_ap(probe, 2_000_000);
    if missing > 0 || echo(probe, 0x51).is_err() {
        crate::fail(
            "domain-quiesce",
            format_args!("the probe does not serve every CPU after the recovery"),
        );
    }
    log::info!(
        "quiesce: CPU 1 was inside the probe when CPU 0 failed it: the recovery took it out (its call: PeerRestarted), one failure, every CPU served again"
    );
}

/// Polls `ready` every 100 us for up to a second; ends the run with `failure` if it never
/// gives a value.
fn wait_for_quiesce_check<T>(failure: &str, mut ready: impl FnMut() -> Option<T>) -> T {
    for _ in 0..10_000 {
        if let Some(value) = ready() {
            return value;
        }
        apic::delay_us(100);
    }
    crate::fail("domain-quiesce", format_args!("{failure}"))
}

/// Times `BENCH_SAMPLES` round trips of a 4-byte echo from the core to the probe and back
/// (system call in, switch to the probe's thread, its `REPLY_WAIT`, switch back), after a few
/// untimed warm-up calls. Under bochs the TSC counts instructions.
fn bench_ipc(probe: u16) {
    let request = [0, 1, 2, 3];
    let mut reply = [0u8; 4];
    let mut samples = [0u64; BENCH_SAMPLES];
    for _ in 0..16 {
        let _ = domain::core_call(probe, &request, &mut reply);
    }
    for sample in &mut samples {
        let start = crate::apic::tsc();
        let result = domain::core_call(probe, &request, &mut reply);
        *sample = crate::apic::tsc() - start;
        if result != Ok(4) {
            crate::fail(
                "bench-ipc",
                format_args!("an IPC round trip failed: {result:?}"),
            );
        }
    }
    if let Some(report) = BenchReport::from_samples("ipc-call-reply-core-to-domain", &mut samples) {
        log::info!(
            "IPC call+reply, core -> probe -> core, 4 bytes: median {} TSC (min {}, p90 {}) over {BENCH_SAMPLES}",
            report.median,
            report.min,
            report.p90
        );
        run::record_bench(report);
    }
}

/// The index of domain `name`, or the run fails.
/// Arms a fail-stop of service `target` to strike after `skip` more requests, for a scenario;
/// returns its index and failure count so far (for [`check_injection`]).
pub fn inject_into_scenario(target: &str, skip: u32) -> (u16, u32) {
    let index = index_of(target);
    let failures = domain::describe(index).map_or(0, |(_, _, failures)| failures);
    domain::arm_failstop(index, skip);
    log::info!(
        "fail-stop armed in {target}: it strikes on its request {}",
        skip + 1
    );
    (index, failures)
}

/// Arms `inject=lostreply:memory` for a scenario: the memory domain fails as it replies to
/// its next EPT violation. Returns its index and failures so far, for [`check_injection`].
pub fn arm_lost_reply() -> (u16, u32) {
    let index = index_of("memory");
    let failures = domain::describe(index).map_or(0, |(_, _, failures)| failures);
    domain::arm_lost_reply(index);
    log::info!("lost reply armed: memory fails as it answers its next EPT violation");
    (index, failures)
}

/// Arms `inject=badreply:DOMAIN` for a scenario: DOMAIN's next reply to the core arrives
/// corrupted. Returns its index and failures so far, for [`check_injection`].
pub fn arm_bad_reply(target: &str) -> (u16, u32) {
    let index = index_of(target);
    let failures = domain::describe(index).map_or(0, |(_, _, failures)| failures);
    domain::arm_bad_reply(index);
    log::info!("bad reply armed: {target}'s next reply to the core arrives corrupted");
    (index, failures)
}

/// Ends the run failed unless domain `index` failed exactly once more than `before`.
pub fn check_injection(target: &str, index: u16, before: u32) {
    let failures = domain::describe(index).map_or(0, |(_, _, failures)| failures);
    if failures != before + 1 {
        crate::fail(
            "inject-failstop",
            format_args!("{target} failed {before} -> {failures} times: the fail-stop was not hit"),
        );
    }
    log::info!("fault injected into {target} under running guests: detected, recovered");
    run::stage("inject-failstop");
}

/// Arms a register, code or stepped fail-stop fault in domain `target` for a scenario: it
/// strikes inside one of the target's first `max_skip + 1` requests, drawn from `seed` (see
/// `crate::inject`).
pub fn arm_stepped(target: &str, spec: microvisor::inject::Spec, seed: u64, max_skip: u32) {
    if target == "core" {
        // The core's unit of work is a VM exit: the first level counts those.
        let plan = spec.resolve(seed, max_skip);
        crate::inject::arm(crate::inject::CORE, "core", plan, seed);
        return;
    }
    let index = index_of(target);
    let name = domain::describe(index).map_or("?", |(name, _, _)| name);
    crate::inject::arm(index, name, spec.resolve(seed, max_skip), seed);
}

fn index_of(name: &str) -> u16 {
    match domain::find(name) {
        Some(index) => index,
        None => crate::fail(
            "inject-failstop",
            format_args!("no domain called {name:?} to inject into"),
        ),
    }
}

/// Runs the synthetic workload; with `inject`, a fail-stop is armed for that service's next
/// request first, and the boot checks it was detected and recovered while the workload still
/// got every result right.
fn run_workload(inject: Option<&str>) {
    // It plays a VM, so what it takes is charged to a quota like a VM's (reserved before the
    // fail-stop is armed, which must strike the workload's own requests).
    if let Err(error) = crate::quota::reserve(workload::VM, &crate::quota::WORKLOAD) {
        crate::fail("workload", format_args!("its quota: {error}"));
    }
    let injected = inject.map(|target| {
        let index = index_of(target);
        let failures = domain::describe(index).map_or(0, |(_, _, failures)| failures);
        // Let it serve two requests first, so the fault strikes with state built up that
        // recovery must keep (the workload's later checks depend on it).
        domain::arm_failstop(index, 2);
        (target, index, failures)
    });
    let (report, result) = workload::run();
    // Its frames are released and its timers have fired: VM 1 is free for a scenario.
    crate::quota::release(workload::VM);
    run::record_workload(report);
    if let Err(error) = result {
        crate::fail("workload", format_args!("{error}"));
    }
    log::info!(
        "workload: {} requests, {} retries, {} checks, all as expected",
        report.requests,
        report.retries,
        report.checks
    );
    run::stage("workload");
    if let Some((target, index, failures_before)) = injected {
        let failures = domain::describe(index).map_or(0, |(_, _, failures)| failures);
        if failures != failures_before + 1 {
            crate::fail(
                "inject-failstop",
                format_args!(
                    "{target} failed {failures_before} -> {failures} times: the fail-stop was not hit"
                ),
            );
        }
        log::info!("fail-stop injected into {target}: detected, recovered, workload correct");
        run::stage("inject-failstop");
    }
}

/// `inject=failstop:probe`: arms a fail-stop for the probe's next request, sends it one, and
/// checks the fault was detected, the probe recovered and serving again.
fn inject_failstop(index: u16) {
    let before = domain::describe(index).map_or(0, |(_, generation, _)| generation);
    domain::arm_failstop(index, 0);
    // A fail-stop strikes before the request is read, whatever it is.
    let mut reply = [0u8; 8];
    match domain::core_call(index, &[0, 0x42], &mut reply) {
        Err(Status::PeerRestarted) => {}
        other => crate::fail(
            "inject-failstop",
            format_args!("the injected call to the probe gave {other:?}, expected PeerRestarted"),
        ),
    }
    let after = domain::describe(index).map_or(0, |(_, generation, _)| generation);
    if after != before + 1 {
        crate::fail(
            "inject-failstop",
            format_args!("the probe's generation went {before} -> {after}"),
        );
    }
    if let Err(status) = echo(index, 0x43) {
        crate::fail(
            "inject-failstop",
            format_args!("the probe does not serve after recovery: {status:?}"),
        );
    }
    log::info!(
        "fail-stop injected into the probe: detected, recovered (generation {after}), serving again"
    );
}

/// Failures of one domain closer together than this escalate (`recovery=escalate`): the
/// second is microrebooted, the third declares the domain failed. A healthy system does not
/// fail at all; a service that fails again within a second of a fresh restart is not going to
/// be saved by a third.
pub const ESCALATION_WINDOW_MS: u64 = 1000;

/// Gives the recovery manager its policy: `first` for a domain's first failure in a window of
/// `window_ms` (0: no escalation, every failure gets `first`); no rate limit beyond that.
fn configure_recovery_manager(first: ipc::recovery::RecoveryOrder, window_ms: u64) {
    let window = window_ms * apic::tsc_khz();
    // The manager's configuration word from now on: initialised again, it keeps this policy.
    domain::set_config(
        domain::RECOVERY_MANAGER,
        ipc::recovery::policy_word(first, window, 0),
    );
    let request = ipc::recovery::Request::Configure {
        first,
        escalation_window_tsc: window,
        max_in_window: 0,
    };
    let answer =
        domain::typed_call::<ipc::recovery::Reply>(domain::RECOVERY_MANAGER, &request).ok();
    if answer != Some(Ok(ipc::recovery::Reply::Acknowledged)) {
        crate::fail(
            "domains",
            format_args!("the recovery manager did not take its configuration: {answer:?}"),
        );
    }
}

/// Sets the boot's policy once the self-checks are done. `recovery=microreset|microreboot`
/// pins that mode for every failure (experiments measure exactly the mode they ask for); the
/// default, `escalate`, escalates within [`ESCALATION_WINDOW_MS`], and the manager forgets the
/// probe's deliberate failures of the self-checks.
fn set_policy(mode: RecoveryMode, probe: u16) {
    if mode != RecoveryMode::Escalate {
        log::info!("recovery policy: {} for every failure", mode.name());
        return;
    }
    configure_recovery_manager(
        ipc::recovery::RecoveryOrder::Microreset,
        ESCALATION_WINDOW_MS,
    );
    let generation = domain::describe(probe).map_or(0, |(_, generation, _)| generation);
    let request = ipc::recovery::Request::Forget {
        domain: ipc::DomainId {
            index: probe,
            generation,
        },
    };
    let answer =
        domain::typed_call::<ipc::recovery::Reply>(domain::RECOVERY_MANAGER, &request).ok();
    if answer != Some(Ok(ipc::recovery::Reply::Acknowledged)) {
        crate::fail(
            "domains",
            format_args!("the recovery manager did not forget the self-checks: {answer:?}"),
        );
    }
    log::info!(
        "recovery policy: escalate (microreset, then microreboot, then failed, for failures of one domain within {ESCALATION_WINDOW_MS} ms)"
    );
}

/// `selfcheck=escalation`: the probe fails three times in a row (request 4, a jump to 0)
/// under the escalating policy: a microreset, a microreboot, then the manager declares it
/// failed, and calls to it are refused from then on.
fn check_escalation(probe: u16, mode: RecoveryMode) {
    if mode != RecoveryMode::Escalate {
        crate::fail(
            "escalation",
            format_args!(
                "selfcheck=escalation needs recovery=escalate, not {}",
                mode.name()
            ),
        );
    }
    let mut reply = [0u8; 8];
    for (expected, status) in [
        ("microreset", Status::PeerRestarted),
        ("microreboot", Status::PeerRestarted),
        ("fail", Status::PeerFailed),
    ] {
        let answer = domain::core_call(probe, &[4], &mut reply);
        let recovery = domain::recovery_report();
        let got = recovery.map(|report| (report.domain, report.mode));
        if answer != Err(status) || got != Some(("probe", expected)) {
            crate::fail(
                "escalation",
                format_args!(
                    "the probe's fail-stop gave {answer:?}, recovery {got:?}; expected {status:?} and the order {expected}"
                ),
            );
        }
    }
    match domain::core_call(probe, &[0, 1, 2, 3], &mut reply) {
        Err(Status::PeerFailed) => {}
        other => crate::fail(
            "escalation",
            format_args!("a call to the failed probe gave {other:?}, expected PeerFailed"),
        ),
    }
    log::info!(
        "escalation: the probe failed three times within {ESCALATION_WINDOW_MS} ms: microreset, microreboot, then declared failed (calls get PeerFailed)"
    );
}
