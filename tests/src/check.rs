//! Judging one boot: the reasons a run does not match its case (none = pass).

use serde_json::Value;

use crate::catalogue::{BootCase, Emulator, Outcome};
use crate::summary::find_summary;

/// How the emulator process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmulatorEnd {
    /// It exited by itself with this status code (`None`: killed by a signal xtask did not send).
    Exited(Option<i32>),
    /// It was still running after the summary line and the grace period; xtask stopped it.
    KilledAfterSummary,
    /// bochs stopped at the kernel's final `xchg bx,bx` breakpoint after the summary, its
    /// debugger ran `quit`, and the process then died by this signal in its own teardown (seen
    /// about once in 20 runs with 4 CPUs). The machine under test had finished; the emulator
    /// crashed on its way out.
    SignalledAfterBreakpoint(i32),
    /// The case's timeout fired; xtask stopped it.
    TimedOut,
    /// xtask was interrupted (Ctrl-C, SIGTERM) and stopped it.
    Interrupted,
}

/// What a boot produced.
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    /// The serial console, split into lines (line ends removed).
    pub lines: &'a [String],
    /// How the emulator ended.
    pub end: EmulatorEnd,
}

/// The exit status the emulator has when the kernel ends a run as the contract says:
/// QEMU's isa-debug-exit turns the `0x10`/`0x11` written to port `0xf4` into 33/35; bochs
/// stops at `xchg bx,bx` and its debugger runs `quit`, exit status 0.
pub fn expected_exit_code(emulator: Emulator, outcome: Outcome) -> i32 {
    match (emulator, outcome) {
        (Emulator::Qemu, Outcome::Ok) => 33,
        (Emulator::Qemu, Outcome::Failed) => 35,
        (Emulator::Bochs, _) => 0,
    }
}

/// Returns every way `observed` differs from what `case` expects; empty means the case passed.
pub fn check(case: &BootCase, observed: &Observed<'_>) -> Vec<String> {
    let mut reasons = Vec::new();
    match observed.end {
        EmulatorEnd::TimedOut => {
            reasons.push(format!("timed out after {} s", case.timeout.as_secs()));
        }
        EmulatorEnd::Interrupted => reasons.push("interrupted".to_string()),
        _ => {}
    }
    let summary = match find_summary(observed.lines) {
        Ok(summary) => summary,
        Err(reason) => {
            reasons.push(reason);
            if let EmulatorEnd::Exited(status) = observed.end {
                reasons.push(format!(
                    "the emulator exited ({}) without a summary",
                    status_text(status)
                ));
            }
            return reasons;
        }
    };
    check_summary(case, &summary, &mut reasons);
    let has_report = observed
        .lines
        .iter()
        .any(|l| l.trim_start().starts_with("EXCEPTION"));
    if case.expect.failure.is_some() && !has_report {
        reasons.push("no serial line starts with `EXCEPTION` (the exception report)".into());
    }
    let expected = expected_exit_code(case.emulator, case.expect.outcome);
    match observed.end {
        EmulatorEnd::Exited(Some(code)) if code == expected => {}
        EmulatorEnd::Exited(status) => reasons.push(format!(
            "the emulator exited ({}) after the summary, expected exit status {expected}",
            status_text(status)
        )),
        EmulatorEnd::SignalledAfterBreakpoint(_) if case.emulator == Emulator::Bochs => {}
        EmulatorEnd::SignalledAfterBreakpoint(signal) => reasons.push(format!(
            "the emulator died by signal {signal} after the summary"
        )),
        EmulatorEnd::KilledAfterSummary => reasons.push(
            "the emulator did not exit by itself after the summary line (the kernel must end \
             the run: port 0xf4 for QEMU, `xchg bx,bx` for bochs)"
                .into(),
        ),
        EmulatorEnd::TimedOut | EmulatorEnd::Interrupted => {}
    }
    reasons
}

fn status_text(status: Option<i32>) -> String {
    match status {
        Some(code) => format!("status {code}"),
        None => "killed by a signal".to_string(),
    }
}

fn check_summary(case: &BootCase, summary: &Value, reasons: &mut Vec<String>) {
    let expect = &case.expect;
    let mut expect_eq = |key: &str, want: Value| {
        let got = summary.get(key);
        if got != Some(&want) {
            reasons.push(format!("summary.{key} is {}, expected {want}", show(got)));
        }
    };
    expect_eq("outcome", expect.outcome.as_str().into());
    expect_eq("boot_protocol", expect.boot_protocol.into());
    expect_eq("cpus_expected", expect.cpus.into());
    expect_eq("cpus_online", expect.cpus.into());

    match summary.get("ran") {
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
            for stage in expect.stages {
                if !items.iter().any(|item| item == stage) {
                    reasons.push(format!("summary.ran lacks stage {stage:?}"));
                }
            }
        }
        other => reasons.push(format!(
            "summary.ran is {}, expected an array of strings",
            show(other)
        )),
    }

    if let Some(mode) = expect.recovery_mode {
        let got = summary
            .get("last_recovery")
            .and_then(|recovery| recovery.get("mode"));
        if got.and_then(Value::as_str) != Some(mode) {
            reasons.push(format!(
                "summary.last_recovery.mode is {}, expected {mode:?}",
                show(got)
            ));
        }
    }

    if let Some(domain) = expect.recovered_domain {
        let got = summary
            .get("last_recovery")
            .and_then(|recovery| recovery.get("domain"));
        if got.and_then(Value::as_str) != Some(domain) {
            reasons.push(format!(
                "summary.last_recovery.domain is {}, expected {domain:?}",
                show(got)
            ));
        }
    }

    if let Some(who) = expect.decided_by {
        let got = summary
            .get("last_recovery")
            .and_then(|recovery| recovery.get("decided_by"));
        if got.and_then(Value::as_str) != Some(who) {
            reasons.push(format!(
                "summary.last_recovery.decided_by is {}, expected {who:?}",
                show(got)
            ));
        }
    }

    if expect.vmx_root {
        let got = summary.get("vmx").and_then(|vmx| vmx.get("cpus_in_root"));
        if got.and_then(Value::as_u64) != Some(expect.cpus) {
            reasons.push(format!(
                "summary.vmx.cpus_in_root is {}, expected {}",
                show(got),
                expect.cpus
            ));
        }
        let ran = summary.get("ran").and_then(Value::as_array);
        if !ran.is_some_and(|ran| ran.iter().any(|stage| stage == "vmx-guest")) {
            reasons.push(
                "summary.ran lacks stage \"vmx-guest\" (the first VMX guest did not run)"
                    .to_string(),
            );
        }
    }

    if expect.workload_ok {
        let got = summary
            .get("workload")
            .and_then(|workload| workload.get("verdict"));
        if got.and_then(Value::as_str) != Some("ok") {
            reasons.push(format!(
                "summary.workload.verdict is {}, expected \"ok\"",
                show(got)
            ));
        }
    }

    if let Some(count) = expect.vms_passed {
        let vms = summary.get("vms").and_then(Value::as_array);
        match vms {
            Some(vms) if vms.len() == count => {
                let stopped = vms.iter().filter(|vm| vm["verdict"] == "stopped").count();
                if stopped != expect.vms_stopped {
                    reasons.push(format!(
                        "{stopped} VMs were stopped by the core, expected {}",
                        expect.vms_stopped
                    ));
                }
                let reasons_got = vms
                    .iter()
                    .filter(|vm| vm["verdict"] == "stopped")
                    .map(|vm| vm["stop_reason"].as_str().unwrap_or(""));
                for (index, (got, want)) in reasons_got.zip(expect.stop_reasons.iter()).enumerate()
                {
                    if !got.contains(want) {
                        reasons.push(format!(
                            "stopped VM #{index} was stopped because \"{got}\", expected a \
                             reason containing \"{want}\""
                        ));
                    }
                }
                for vm in vms {
                    if vm["verdict"] != "passed" && vm["verdict"] != "stopped" {
                        reasons.push(format!(
                            "VM {} ({}) ended {}, expected passed",
                            show(vm.get("vm")),
                            show(vm.get("guest")),
                            show(vm.get("verdict"))
                        ));
                    }
                }
            }
            _ => reasons.push(format!(
                "summary.vms is {}, expected {count} VMs",
                show(summary.get("vms"))
            )),
        }
    }

    if let Some(failures) = expect.probe_failures {
        let probe = summary
            .get("domains")
            .and_then(Value::as_array)
            .and_then(|domains| domains.iter().find(|domain| domain["name"] == "probe"));
        match probe {
            Some(probe) if probe["failures"] == failures && probe["generation"] == failures + 1 => {
            }
            Some(probe) => reasons.push(format!(
                "summary.domains has probe {probe}, expected {failures} failures and generation {}",
                failures + 1
            )),
            None => reasons.push("summary.domains has no probe domain".to_string()),
        }
    }

    match summary.get("timer_ticks") {
        Some(Value::Array(ticks)) => {
            if expect.timer_ticks {
                if ticks.len() as u64 != expect.cpus {
                    reasons.push(format!(
                        "summary.timer_ticks has {} entries, expected one per CPU ({})",
                        ticks.len(),
                        expect.cpus
                    ));
                }
                for (cpu, t) in ticks.iter().enumerate() {
                    if t.as_u64().is_none_or(|t| t == 0) {
                        reasons.push(format!("summary.timer_ticks[{cpu}] is {t}, expected > 0"));
                    }
                }
            }
        }
        other => reasons.push(format!(
            "summary.timer_ticks is {}, expected an array",
            show(other)
        )),
    }

    let failure = summary.get("failure");
    match (expect.failure, failure) {
        (None, Some(got @ Value::Object(_))) if expect.failed_check.is_some() => {
            let stage = expect.failed_check.unwrap_or_default();
            if got.get("kind") != Some(&Value::from("check"))
                || got.get("stage") != Some(&Value::from(stage))
            {
                reasons.push(format!(
                    "summary.failure is {got}, expected a failed check of stage {stage:?}"
                ));
            }
        }
        (None, Some(Value::Null)) if expect.failed_check.is_none() => {}
        (None, other) => reasons.push(format!(
            "summary.failure is {}, expected {}",
            show(other),
            expect
                .failed_check
                .map_or("null".to_string(), |stage| format!(
                    "a failed check of stage {stage:?}"
                ))
        )),
        (Some(want), Some(got @ Value::Object(_))) => {
            if got.get("kind") != Some(&Value::from("exception")) {
                reasons.push(format!(
                    "summary.failure.kind is {}, expected \"exception\"",
                    show(got.get("kind"))
                ));
            }
            for (key, value) in [("vector", want.vector), ("cpu", want.cpu)] {
                if got.get(key).and_then(Value::as_u64) != Some(value) {
                    reasons.push(format!(
                        "summary.failure.{key} is {}, expected {value}",
                        show(got.get(key))
                    ));
                }
            }
        }
        (Some(want), other) => reasons.push(format!(
            "summary.failure is {}, expected an exception object with vector {} on CPU {}",
            show(other),
            want.vector,
            want.cpu
        )),
    }
}

fn show(value: Option<&Value>) -> String {
    value.map_or_else(|| "missing".to_string(), Value::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::catalogue;
    use serde_json::json;

    fn case(name: &str) -> BootCase {
        catalogue().into_iter().find(|c| c.name == name).unwrap()
    }

    fn ok_summary(protocol: &str, cpus: u64) -> Value {
        json!({
            "event": "summary", "outcome": "ok", "boot_protocol": protocol,
            "cpus_expected": cpus, "cpus_online": cpus, "ran": if cpus >= 2 { crate::catalogue::ALL_STAGES_SMP } else { crate::catalogue::ALL_STAGES }.iter().copied().chain(["vmx-guest"]).collect::<Vec<_>>(),
            "timer_ticks": vec![5; cpus as usize], "failure": null,
            "domains": [{"name": "probe", "generation": crate::catalogue::probe_failures(cpus as u32) + 1, "failures": crate::catalogue::probe_failures(cpus as u32)}],
            "last_recovery": {"domain": "probe", "mode": "microreset", "decided_by": "recovery-manager", "tsc": {"total": 9}},
            "workload": {"name": "synthetic-hypercalls", "verdict": "ok", "requests": 32, "retries": 0, "checks": 36},
            "vmx": {"cpus_in_root": cpus, "revision": 43, "unavailable": null}
        })
    }

    fn lines(summary: &Value) -> Vec<String> {
        vec![
            "INFO microvisor starting".into(),
            "INFO all CPUs online".into(),
            summary.to_string(),
        ]
    }

    fn run(case: &BootCase, lines: &[String], end: EmulatorEnd) -> Vec<String> {
        check(case, &Observed { lines, end })
    }

    #[test]
    fn accepts_a_healthy_run() {
        let c = case("qemu-direct-2cpu");
        let reasons = run(
            &c,
            &lines(&ok_summary("pvh", 2)),
            EmulatorEnd::Exited(Some(33)),
        );
        assert!(reasons.is_empty(), "{reasons:?}");
        let c = case("bochs-iso-4cpu");
        let reasons = run(
            &c,
            &lines(&ok_summary("multiboot2", 4)),
            EmulatorEnd::Exited(Some(0)),
        );
        assert!(reasons.is_empty(), "{reasons:?}");
    }

    #[test]
    fn a_failed_check_case_wants_that_check_and_no_other() {
        let c = case("qemu-direct-2cpu-repairs-without-quiesce");
        let exit = EmulatorEnd::Exited(Some(expected_exit_code(Emulator::Qemu, Outcome::Failed)));
        let failed = |stage: &str| {
            let mut summary = ok_summary("pvh", 2);
            summary["outcome"] = json!("failed");
            summary["failure"] = json!({"kind": "check", "stage": stage, "reason": "r"});
            lines(&summary)
        };
        assert!(run(&c, &failed("domain-quiesce"), exit).is_empty());
        let reasons = run(&c, &failed("workload"), exit);
        assert!(
            reasons.iter().any(|r| r.contains("failed check of stage")),
            "{reasons:?}"
        );
        let mut healthy = ok_summary("pvh", 2);
        healthy["outcome"] = json!("failed");
        assert!(
            run(&c, &lines(&healthy), exit)
                .iter()
                .any(|r| r.contains("expected a failed check")),
            "a null failure is not the failed check"
        );
    }

    #[test]
    fn rejects_wrong_values() {
        let c = case("qemu-direct-2cpu");
        let mutations: [(&str, Value, &str); 9] = [
            ("outcome", json!("failed"), "summary.outcome"),
            (
                "boot_protocol",
                json!("multiboot2"),
                "summary.boot_protocol",
            ),
            ("cpus_online", json!(1), "summary.cpus_online"),
            ("cpus_expected", json!(4), "summary.cpus_expected"),
            ("timer_ticks", json!([5, 0]), "timer_ticks[1]"),
            ("timer_ticks", json!([5]), "1 entries"),
            ("timer_ticks", json!("many"), "expected an array"),
            ("ran", json!([1]), "summary.ran"),
            (
                "failure",
                json!({"kind": "panic", "message": "boom"}),
                "expected null",
            ),
        ];
        for (key, value, needle) in mutations {
            let mut s = ok_summary("pvh", 2);
            s[key] = value;
            let reasons = run(&c, &lines(&s), EmulatorEnd::Exited(Some(33)));
            assert!(
                reasons.iter().any(|r| r.contains(needle)),
                "{key}: {reasons:?}"
            );
        }
        let mut s = ok_summary("pvh", 2);
        s.as_object_mut().unwrap().remove("cpus_online");
        let reasons = run(&c, &lines(&s), EmulatorEnd::Exited(Some(33)));
        assert_eq!(reasons, ["summary.cpus_online is missing, expected 2"]);
    }

    #[test]
    fn rejects_missing_summary_and_reports_how_the_run_ended() {
        let c = case("qemu-direct-1cpu");
        let serial = vec!["INFO booting".to_string()];
        let reasons = run(&c, &serial, EmulatorEnd::TimedOut);
        assert!(reasons[0].contains("timed out after 60 s"), "{reasons:?}");
        assert!(reasons[1].contains("no summary"), "{reasons:?}");
        let reasons = run(&c, &serial, EmulatorEnd::Exited(Some(1)));
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("exited (status 1) without a summary"))
        );
        let reasons = run(&c, &[], EmulatorEnd::Exited(None));
        assert!(reasons.iter().any(|r| r.contains("killed by a signal")));
    }

    #[test]
    fn rejects_a_summary_that_is_not_the_last_line() {
        let c = case("qemu-direct-1cpu");
        let mut serial = lines(&ok_summary("pvh", 1));
        serial.push("WARN late line".into());
        let reasons = run(&c, &serial, EmulatorEnd::Exited(Some(33)));
        assert!(
            reasons.iter().any(|r| r.contains("not the last line")),
            "{reasons:?}"
        );
    }

    #[test]
    fn checks_how_the_emulator_ended() {
        let c = case("qemu-direct-1cpu");
        let serial = lines(&ok_summary("pvh", 1));
        let reasons = run(&c, &serial, EmulatorEnd::Exited(Some(35)));
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("expected exit status 33")),
            "{reasons:?}"
        );
        let reasons = run(&c, &serial, EmulatorEnd::KilledAfterSummary);
        assert!(
            reasons.iter().any(|r| r.contains("did not exit by itself")),
            "{reasons:?}"
        );
        // A signal after the final breakpoint is bochs' own teardown; QEMU has no such excuse.
        let reasons = run(&c, &serial, EmulatorEnd::SignalledAfterBreakpoint(11));
        assert!(
            reasons.iter().any(|r| r.contains("died by signal 11")),
            "{reasons:?}"
        );
        let bochs = case("bochs-5vm-unixbench-failstop-timer");
        let signalled = run(&bochs, &serial, EmulatorEnd::SignalledAfterBreakpoint(11));
        let exited = run(&bochs, &serial, EmulatorEnd::Exited(Some(0)));
        assert_eq!(signalled, exited);
        let killed = run(&bochs, &serial, EmulatorEnd::Exited(None));
        assert!(
            killed.iter().any(|r| r.contains("killed by a signal")),
            "{killed:?}"
        );
    }

    fn fault_summary(vector: u64, cpu: u64, cpus: u64) -> Value {
        let mut s = ok_summary("pvh", cpus);
        s["outcome"] = json!("failed");
        s["timer_ticks"] = json!([]);
        s["failure"] = json!({"kind": "exception", "vector": vector, "name": "#GP", "cpu": cpu,
                              "rip": "0xffffffff80001234", "error_code": 0});
        s
    }

    #[test]
    fn accepts_the_expected_exception() {
        let c = case("qemu-direct-2cpu-fault-gp-on-cpu1");
        let mut serial = vec!["EXCEPTION #GP vector 13 on CPU 1".to_string()];
        serial.push(fault_summary(13, 1, 2).to_string());
        let reasons = run(&c, &serial, EmulatorEnd::Exited(Some(35)));
        assert!(reasons.is_empty(), "{reasons:?}");
    }

    #[test]
    fn rejects_the_wrong_exception() {
        let c = case("qemu-direct-2cpu-fault-gp-on-cpu1");
        let summary = fault_summary(14, 0, 2).to_string();
        let serial = vec!["EXCEPTION #PF".to_string(), summary.clone()];
        let reasons = run(&c, &serial, EmulatorEnd::Exited(Some(35)));
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("failure.vector is 14, expected 13"))
        );
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("failure.cpu is 0, expected 1"))
        );
        // No EXCEPTION report on the console.
        let reasons = run(&c, &[summary], EmulatorEnd::Exited(Some(35)));
        assert!(
            reasons.iter().any(|r| r.contains("EXCEPTION")),
            "{reasons:?}"
        );
        // A healthy run is not what a fault case wants.
        let serial = vec!["EXCEPTION".to_string(), ok_summary("pvh", 2).to_string()];
        let reasons = run(&c, &serial, EmulatorEnd::Exited(Some(33)));
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("summary.outcome is \"ok\""))
        );
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("summary.failure is null"))
        );
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("expected exit status 35"))
        );
    }

    #[test]
    fn a_missing_stage_is_named() {
        let case = case("qemu-direct-2cpu");
        let mut summary = ok_summary("pvh", 2);
        summary["ran"] = json!(["boot-info", "smp"]);
        let reasons = run(&case, &lines(&summary), EmulatorEnd::Exited(Some(33)));
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("lacks stage \"domain-isolation\"")),
            "{reasons:?}"
        );
    }

    #[test]
    fn an_unrecovered_probe_fails_the_case() {
        let case = case("qemu-direct-2cpu");
        for probe in [
            json!([]),
            json!([{"name": "probe", "generation": 5, "failures": 5}]),
            json!([{"name": "probe", "generation": 4, "failures": 3}]),
        ] {
            let mut summary = ok_summary("pvh", 2);
            summary["domains"] = probe.clone();
            let reasons = run(&case, &lines(&summary), EmulatorEnd::Exited(Some(33)));
            assert!(
                reasons.iter().any(|r| r.contains("probe")),
                "{probe}: {reasons:?}"
            );
        }
    }

    #[test]
    fn the_recovery_mode_must_match() {
        let case = case("qemu-direct-2cpu-microreboot");
        let reasons = run(
            &case,
            &lines(&ok_summary("pvh", 2)),
            EmulatorEnd::Exited(Some(33)),
        );
        assert!(
            reasons.iter().any(|r| r.contains("last_recovery.mode")),
            "{reasons:?}"
        );
        let mut summary = ok_summary("pvh", 2);
        summary["last_recovery"]["mode"] = json!("microreboot");
        assert_eq!(
            run(&case, &lines(&summary), EmulatorEnd::Exited(Some(33))),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_service_case_needs_that_service_recovered_and_a_correct_workload() {
        let case = case("bochs-failstop-memory-microreboot");
        let mut summary = ok_summary("multiboot2", 2);
        summary["ran"] = json!([
            "domains",
            "domain-isolation",
            "workload",
            "inject-failstop",
            "vmx-guest"
        ]);
        summary["last_recovery"] =
            json!({"domain": "memory", "mode": "microreboot", "decided_by": "recovery-manager"});
        assert_eq!(
            run(&case, &lines(&summary), EmulatorEnd::Exited(Some(0))),
            Vec::<String>::new()
        );
        summary["last_recovery"]["domain"] = json!("timer");
        summary["workload"]["verdict"] = json!("failed");
        let reasons = run(&case, &lines(&summary), EmulatorEnd::Exited(Some(0)));
        assert!(
            reasons.iter().any(|r| r.contains("last_recovery.domain")),
            "{reasons:?}"
        );
        assert!(
            reasons.iter().any(|r| r.contains("workload.verdict")),
            "{reasons:?}"
        );
    }

    #[test]
    fn bochs_cases_need_every_cpu_in_vmx_root() {
        let case = case("bochs-iso-2cpu");
        let mut summary = ok_summary("multiboot2", 2);
        summary["ran"]
            .as_array_mut()
            .unwrap()
            .retain(|stage| stage != "vmx-guest");
        let reasons = run(&case, &lines(&summary), EmulatorEnd::Exited(Some(0)));
        assert!(
            reasons.iter().any(|r| r.contains("vmx-guest")),
            "{reasons:?}"
        );
        summary["ran"]
            .as_array_mut()
            .unwrap()
            .push(json!("vmx-guest"));
        assert_eq!(
            run(&case, &lines(&summary), EmulatorEnd::Exited(Some(0))),
            Vec::<String>::new()
        );
        summary["vmx"] = json!({"cpus_in_root": 1, "revision": 43, "unavailable": null});
        let reasons = run(&case, &lines(&summary), EmulatorEnd::Exited(Some(0)));
        assert!(
            reasons.iter().any(|r| r.contains("vmx.cpus_in_root")),
            "{reasons:?}"
        );
    }
    #[test]
    fn stopped_vms_must_be_stopped_for_their_attack() {
        let case = case("bochs-fuzz-2cpu");
        let mut summary = ok_summary("multiboot2", 2);
        summary["ran"]
            .as_array_mut()
            .unwrap()
            .extend(["scenario-vms-created", "scenario"].map(|stage| json!(stage)));
        let msr = "the hypercall domain refused a CPUID, port or MSR access";
        let vm = |verdict: &str, reason: &str| json!({"verdict": verdict, "stop_reason": reason});
        summary["vms"] = json!([
            vm("passed", ""),
            vm("passed", ""),
            vm("passed", ""),
            vm("stopped", msr),
            vm("passed", ""),
            vm("stopped", msr),
        ]);
        assert_eq!(
            run(&case, &lines(&summary), EmulatorEnd::Exited(Some(0))),
            Vec::<String>::new()
        );
        // The same count of stopped VMs, but one for another reason: the case fails.
        summary["vms"][5] = vm("stopped", "it raised an exception");
        let reasons = run(&case, &lines(&summary), EmulatorEnd::Exited(Some(0)));
        assert!(
            reasons.iter().any(|r| r.contains("stopped VM #1")),
            "{reasons:?}"
        );
    }
}
