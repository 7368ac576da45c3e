//! The run summary: one JSON object, the last line the core prints on its console.
//!
//! xtask and the boot tests decide pass/fail from this line (see `docs/boot-contract.md`), so
//! its fields are a contract. Written with `core::fmt` into the console: no allocation, no
//! serializer, and safe to print from an exception handler.

use core::fmt::{self, Display, Formatter, Write};

/// How the run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Everything that was asked for ran and checked out.
    Ok,
    /// Something failed; [`Summary::failure`] says what.
    Failed,
}

/// Why a run failed.
#[derive(Clone, Copy, Debug)]
pub enum Failure<'a> {
    /// A CPU exception in the core.
    Exception {
        /// Vector number.
        vector: u8,
        /// Mnemonic, e.g. `#PF`.
        name: &'a str,
        /// CPU index that took it.
        cpu: usize,
        /// Faulting instruction pointer.
        rip: u64,
        /// Error code pushed by the CPU (0 when the vector has none).
        error_code: u64,
        /// CR2 for page faults.
        cr2: Option<u64>,
    },
    /// A Rust panic in the core.
    Panic {
        /// CPU index that panicked.
        cpu: usize,
        /// The panic message (truncated by the caller if need be).
        message: &'a str,
    },
    /// A stage did not finish in time or did not check out.
    Check {
        /// Which stage.
        stage: &'a str,
        /// What went wrong.
        reason: &'a str,
    },
}

/// One domain as the summary reports it.
#[derive(Clone, Copy, Debug)]
pub struct DomainReport<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its generation (1 at boot, +1 per recovery).
    pub generation: u32,
    /// Failures detected in it.
    pub failures: u32,
}

/// The most recent failure detected in a domain.
#[derive(Clone, Copy, Debug)]
pub struct DetectionReport<'a> {
    /// The failed domain.
    pub domain: &'a str,
    /// CPU index it failed on.
    pub cpu: usize,
    /// `exception` or `panic`.
    pub kind: &'a str,
    /// Exception vector (exceptions only).
    pub vector: Option<u8>,
    /// Instruction pointer at the failure.
    pub rip: u64,
    /// Who waited on the failed domain: a domain name or `core`.
    pub caller: &'a str,
    /// TSC at detection.
    pub tsc: u64,
}

impl Display for DetectionReport<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(
            f,
            r#"{{"domain":{},"cpu":{},"kind":{},"vector":"#,
            JsonStr(self.domain),
            self.cpu,
            JsonStr(self.kind)
        )?;
        match self.vector {
            Some(vector) => write!(f, "{vector}")?,
            None => f.write_str("null")?,
        }
        write!(
            f,
            r#","rip":"{:#x}","caller":{},"tsc":{}}}"#,
            self.rip,
            JsonStr(self.caller),
            self.tsc
        )
    }
}

impl Display for DomainReport<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(
            f,
            r#"{{"name":{},"generation":{},"failures":{}}}"#,
            JsonStr(self.name),
            self.generation,
            self.failures
        )
    }
}

/// The most recent recovery of a domain, with its per-step cost (TSC ticks; instructions
/// under bochs), like the breakdowns in the ReHype and NiLiHype papers.
#[derive(Clone, Copy, Debug)]
pub struct RecoveryReport<'a> {
    /// The recovered domain.
    pub domain: &'a str,
    /// `microreset`, `microreboot` or `fail`.
    pub mode: &'a str,
    /// Who chose the mode: `recovery-manager`, or `core` (the manager itself failed, or could
    /// not answer, and the core applied its configured default).
    pub decided_by: &'a str,
    /// From detection until the recovery manager's order arrived.
    pub decide_policy: u64,
    /// Abandoning the domain's threads on every CPU.
    pub discard_threads: u64,
    /// Releasing every lock in its lock table.
    pub release_locks: u64,
    /// Verifying the pristine image and reloading code and data (microreboot only, else 0).
    pub reload_image: u64,
    /// From detection until the abandoned caller resumes.
    pub total: u64,
    /// From detection until the recovered domain completed its first request since (its start
    /// routine, the repair, runs inside that request, which is usually the abandoned call
    /// issued again): what a caller waited in all. `None` until it has served one.
    pub until_served: Option<u64>,
}

impl Display for RecoveryReport<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(
            f,
            r#"{{"domain":{},"mode":{},"decided_by":{},"tsc":{{"decide_policy":{},"discard_threads":{},"release_locks":{},"reload_image":{},"total":{},"until_served":{}}}}}"#,
            JsonStr(self.domain),
            JsonStr(self.mode),
            JsonStr(self.decided_by),
            self.decide_policy,
            self.discard_threads,
            self.release_locks,
            self.reload_image,
            self.total,
            JsonU64(self.until_served)
        )
    }
}

/// How the synthetic workload ended.
#[derive(Clone, Copy, Debug)]
pub struct WorkloadReport<'a> {
    /// Which workload.
    pub name: &'a str,
    /// Every result matched its expected value.
    pub passed: bool,
    /// Requests completed (hypercalls and scheduler calls).
    pub requests: u32,
    /// Requests that had to be retried (a service restarted under them).
    pub retries: u32,
    /// Checks made on the results.
    pub checks: u32,
}

impl Display for WorkloadReport<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(
            f,
            r#"{{"name":{},"verdict":"{}","requests":{},"retries":{},"checks":{}}}"#,
            JsonStr(self.name),
            if self.passed { "ok" } else { "failed" },
            self.requests,
            self.retries,
            self.checks
        )
    }
}

/// How one guest VM of a scenario ended.
#[derive(Clone, Copy, Debug)]
pub struct VmReport<'a> {
    /// The VM's number.
    pub vm: u16,
    /// The guest kernel it ran.
    pub guest: &'a str,
    /// Its vCPUs.
    pub vcpus: u8,
    /// `passed`, `failed` (the guest's own checks), `stopped` (the core stopped it) or
    /// `unfinished`.
    pub verdict: &'a str,
    /// The checksum the guest reported.
    pub checksum: u64,
    /// Its VM exits.
    pub exits: u64,
    /// Its hypercalls that completed.
    pub hypercalls: u64,
    /// Hypercalls re-issued because a service restarted under them.
    pub retries: u64,
    /// Guest RAM pages the memory domain backed on the VM's first touch (EPT violations).
    pub demand_pages: u64,
    /// TSC from its creation to its last vCPU's exit (0 if it did not finish).
    pub run_tsc: u64,
    /// TSC when it was created (a campaign tells the VMs created after a fault by it).
    pub created_tsc: u64,
    /// Why the core stopped it, if it did.
    pub stop_reason: &'a str,
    /// The longest stretch without service the guest measured (microseconds of guest time;
    /// netbench: between two echoes), if it measured one: what a recovery cost it.
    pub longest_gap_us: Option<u64>,
}

impl VmReport<'_> {
    /// A blank report, to fill arrays with.
    pub const EMPTY: VmReport<'static> = VmReport {
        vm: 0,
        guest: "",
        vcpus: 0,
        verdict: "",
        checksum: 0,
        exits: 0,
        hypercalls: 0,
        retries: 0,
        demand_pages: 0,
        run_tsc: 0,
        created_tsc: 0,
        stop_reason: "",
        longest_gap_us: None,
    };
}

impl Display for VmReport<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(
            f,
            r#"{{"vm":{},"guest":{},"vcpus":{},"verdict":{},"checksum":"{:#018x}","exits":{},"hypercalls":{},"retries":{},"demand_pages":{},"run_tsc":{},"created_tsc":{},"stop_reason":{},"longest_gap_us":{}}}"#,
            self.vm,
            JsonStr(self.guest),
            self.vcpus,
            JsonStr(self.verdict),
            self.checksum,
            self.exits,
            self.hypercalls,
            self.retries,
            self.demand_pages,
            self.run_tsc,
            self.created_tsc,
            JsonStr(self.stop_reason),
            JsonU64(self.longest_gap_us)
        )
    }
}

/// VMX root operation across the CPUs.
#[derive(Clone, Copy, Debug)]
pub struct VmxReport<'a> {
    /// CPUs in VMX root operation.
    pub cpus_in_root: usize,
    /// VMCS revision identifier (0 if none).
    pub revision: u32,
    /// Why VMX is not used, if it is not (e.g. no VMX under QEMU's TCG).
    pub unavailable: Option<&'a str>,
}

impl Display for VmxReport<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(
            f,
            r#"{{"cpus_in_root":{},"revision":{},"unavailable":"#,
            self.cpus_in_root, self.revision
        )?;
        match self.unavailable {
            Some(reason) => write!(f, "{}}}", JsonStr(reason)),
            None => f.write_str("null}"),
        }
    }
}

/// A benchmark's result: TSC ticks per operation (instructions under bochs).
#[derive(Clone, Copy, Debug)]
pub struct BenchReport<'a> {
    /// What was measured.
    pub name: &'a str,
    /// Operations timed.
    pub samples: usize,
    /// Fastest.
    pub min: u64,
    /// Median.
    pub median: u64,
    /// 90th percentile.
    pub p90: u64,
}

impl Display for BenchReport<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(
            f,
            r#"{{"name":{},"unit":"tsc","samples":{},"min":{},"median":{},"p90":{}}}"#,
            JsonStr(self.name),
            self.samples,
            self.min,
            self.median,
            self.p90
        )
    }
}

impl<'a> BenchReport<'a> {
    /// Summarises `samples` (sorted in place). `None` if there are none.
    pub fn from_samples(name: &'a str, samples: &mut [u64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |fraction: usize| samples[(samples.len() - 1) * fraction / 100];
        Some(Self {
            name,
            samples: samples.len(),
            min: samples[0],
            median: at(50),
            p90: at(90),
        })
    }
}

/// Everything the summary line reports.
#[derive(Clone, Copy, Debug)]
pub struct Summary<'a> {
    /// How the run ended.
    pub outcome: Outcome,
    /// `multiboot2` or `pvh`.
    pub boot_protocol: &'a str,
    /// CPUs the ACPI MADT lists as enabled.
    pub cpus_expected: usize,
    /// CPUs that came up and reported in.
    pub cpus_online: usize,
    /// Local APIC ID of each online CPU, by CPU index.
    pub apic_ids: &'a [u32],
    /// Stages that ran to completion, in order.
    pub ran: &'a [&'a str],
    /// Local APIC timer interrupts counted on each CPU, by CPU index.
    pub timer_ticks: &'a [u64],
    /// Measured TSC frequency in kHz (under bochs, instructions per emulated millisecond).
    pub tsc_khz: u64,
    /// Free physical memory in KiB after boot.
    pub free_memory_kib: u64,
    /// TSC at the time of the summary.
    pub tsc: u64,
    /// The domains loaded.
    pub domains: &'a [DomainReport<'a>],
    /// The last failure detected in a domain, if any.
    pub last_detection: Option<DetectionReport<'a>>,
    /// The most recent recovery, if any.
    pub last_recovery: Option<RecoveryReport<'a>>,
    /// VMX root operation.
    pub vmx: VmxReport<'a>,
    /// The synthetic workload, if it ran.
    pub workload: Option<WorkloadReport<'a>>,
    /// The scenario the guests ran, if any.
    pub scenario: Option<&'a str>,
    /// The scenario's VMs.
    pub vms: &'a [VmReport<'a>],
    /// The benchmarks asked for on the command line (empty if none).
    pub bench: &'a [BenchReport<'a>],
    /// The fault `inject=` armed under a scenario (register, code or stepped fail-stop), and
    /// whether and where it struck.
    pub injection: Option<crate::inject::InjectionReport<'a>>,
    /// Why the run failed, if it did.
    pub failure: Option<Failure<'a>>,
}

/// A string written as a JSON string literal, escaped.
struct JsonStr<'a>(&'a str);

impl Display for JsonStr<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        for c in self.0.chars() {
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if (c as u32) < 0x20 => write!(f, "\\u{:04x}", c as u32)?,
                c => f.write_char(c)?,
            }
        }
        f.write_char('"')
    }
}

/// An optional number, written as the number or `null`.
struct JsonU64(Option<u64>);

impl Display for JsonU64 {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(value) => write!(f, "{value}"),
            None => f.write_str("null"),
        }
    }
}

/// A slice written as a JSON array of its items' `Display` forms.
struct JsonArray<'a, T>(&'a [T]);

impl<T: Display> Display for JsonArray<'_, T> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_char('[')?;
        for (index, item) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_char(',')?;
            }
            write!(f, "{item}")?;
        }
        f.write_char(']')
    }
}

impl Display for Failure<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match *self {
            Failure::Exception {
                vector,
                name,
                cpu,
                rip,
                error_code,
                cr2,
            } => {
                write!(
                    f,
                    r#"{{"kind":"exception","vector":{vector},"name":{},"cpu":{cpu},"rip":"{rip:#x}","error_code":{error_code}"#,
                    JsonStr(name)
                )?;
                if let Some(cr2) = cr2 {
                    write!(f, r#","cr2":"{cr2:#x}""#)?;
                }
                f.write_char('}')
            }
            Failure::Panic { cpu, message } => {
                write!(
                    f,
                    r#"{{"kind":"panic","cpu":{cpu},"message":{}}}"#,
                    JsonStr(message)
                )
            }
            Failure::Check { stage, reason } => {
                write!(
                    f,
                    r#"{{"kind":"check","stage":{},"reason":{}}}"#,
                    JsonStr(stage),
                    JsonStr(reason)
                )
            }
        }
    }
}

impl Display for Summary<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let outcome = match self.outcome {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
        };
        let ran: &[&str] = self.ran;
        write!(
            f,
            r#"{{"event":"summary","version":1,"outcome":"{outcome}","boot_protocol":{},"cpus_expected":{},"cpus_online":{},"apic_ids":{},"ran":["#,
            JsonStr(self.boot_protocol),
            self.cpus_expected,
            self.cpus_online,
            JsonArray(self.apic_ids),
        )?;
        for (index, stage) in ran.iter().enumerate() {
            if index > 0 {
                f.write_char(',')?;
            }
            write!(f, "{}", JsonStr(stage))?;
        }
        write!(
            f,
            r#"],"timer_ticks":{},"tsc_khz":{},"free_memory_kib":{},"tsc":{},"domains":{},"last_detection":"#,
            JsonArray(self.timer_ticks),
            self.tsc_khz,
            self.free_memory_kib,
            self.tsc,
            JsonArray(self.domains),
        )?;
        match &self.last_detection {
            Some(detection) => write!(f, "{detection}")?,
            None => f.write_str("null")?,
        }
        f.write_str(r#","last_recovery":"#)?;
        match &self.last_recovery {
            Some(recovery) => write!(f, "{recovery}")?,
            None => f.write_str("null")?,
        }
        write!(f, r#","vmx":{}"#, self.vmx)?;
        f.write_str(r#","workload":"#)?;
        match &self.workload {
            Some(workload) => write!(f, "{workload}")?,
            None => f.write_str("null")?,
        }
        f.write_str(r#","scenario":"#)?;
        match self.scenario {
            Some(name) => write!(f, "{}", JsonStr(name))?,
            None => f.write_str("null")?,
        }
        write!(f, r#","vms":{}"#, JsonArray(self.vms))?;
        write!(f, r#","bench":{}"#, JsonArray(self.bench))?;
        f.write_str(r#","injection":"#)?;
        match &self.injection {
            Some(injection) => write!(f, "{injection}")?,
            None => f.write_str("null")?,
        }
        f.write_str(r#","failure":"#)?;
        match &self.failure {
            Some(failure) => write!(f, "{failure}}}"),
            None => f.write_str("null}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::string::ToString;

    fn sample(failure: Option<Failure<'static>>) -> Summary<'static> {
        Summary {
            outcome: if failure.is_some() {
                Outcome::Failed
            } else {
                Outcome::Ok
            },
            boot_protocol: "pvh",
            cpus_expected: 2,
            cpus_online: 2,
            apic_ids: &[0, 1],
            ran: &["boot", "smp"],
            timer_ticks: &[5, 7],
            tsc_khz: 4000,
            free_memory_kib: 1024,
            tsc: 99,
            domains: &[DomainReport {
                name: "probe",
                generation: 3,
                failures: 2,
            }],
            last_detection: Some(DetectionReport {
                domain: "probe",
                cpu: 0,
                kind: "exception",
                vector: Some(14),
                rip: 0x4029b8,
                caller: "core",
                tsc: 5,
            }),
            last_recovery: Some(RecoveryReport {
                domain: "probe",
                mode: "microreboot",
                decided_by: "recovery-manager",
                decide_policy: 5,
                discard_threads: 10,
                release_locks: 20,
                reload_image: 300,
                total: 400,
                until_served: Some(900),
            }),
            vmx: VmxReport {
                cpus_in_root: 2,
                revision: 1,
                unavailable: None,
            },
            workload: Some(WorkloadReport {
                name: "synthetic",
                passed: true,
                requests: 30,
                retries: 1,
                checks: 40,
            }),
            scenario: Some("1vm-unixbench"),
            vms: &[VmReport {
                vm: 2,
                guest: "unixbench",
                vcpus: 2,
                verdict: "passed",
                checksum: 0xabc,
                exits: 300,
                hypercalls: 250,
                retries: 1,
                demand_pages: 9,
                run_tsc: 123_456,
                created_tsc: 1_000,
                stop_reason: "",
                longest_gap_us: Some(2_500),
            }],
            bench: &[],
            injection: None,
            failure,
        }
    }

    #[test]
    fn ok_summary_is_valid_json_with_the_contract_fields() {
        let value: Value = serde_json::from_str(&sample(None).to_string()).unwrap();
        assert_eq!(value["event"], "summary");
        assert_eq!(value["outcome"], "ok");
        assert_eq!(value["cpus_online"], 2);
        assert_eq!(value["apic_ids"], serde_json::json!([0, 1]));
        assert_eq!(value["ran"], serde_json::json!(["boot", "smp"]));
        assert_eq!(value["timer_ticks"], serde_json::json!([5, 7]));
        assert!(value["failure"].is_null());
        assert_eq!(value["domains"][0]["name"], "probe");
        assert_eq!(value["domains"][0]["generation"], 3);
        assert_eq!(value["last_detection"]["vector"], 14);
        assert_eq!(value["last_detection"]["caller"], "core");
        assert_eq!(value["last_detection"]["rip"], "0x4029b8");
        assert_eq!(value["last_recovery"]["mode"], "microreboot");
        assert_eq!(value["last_recovery"]["decided_by"], "recovery-manager");
        assert_eq!(value["workload"]["verdict"], "ok");
        assert_eq!(value["scenario"], "1vm-unixbench");
        assert_eq!(value["vms"][0]["guest"], "unixbench");
        assert_eq!(value["vms"][0]["verdict"], "passed");
        assert_eq!(value["vms"][0]["checksum"], "0x0000000000000abc");
        assert_eq!(value["vms"][0]["run_tsc"], 123_456);
        assert_eq!(value["vms"][0]["demand_pages"], 9);
        assert_eq!(value["vms"][0]["longest_gap_us"], 2_500);
        assert_eq!(value["vms"][0]["vcpus"], 2);
        assert_eq!(value["vmx"]["cpus_in_root"], 2);
        assert!(value["vmx"]["unavailable"].is_null());
        assert_eq!(value["workload"]["retries"], 1);
        assert_eq!(value["last_recovery"]["tsc"]["reload_image"], 300);
        assert_eq!(value["last_recovery"]["tsc"]["until_served"], 900);
    }

    #[test]
    fn exception_failure_serialises_every_field() {
        let failure = Failure::Exception {
            vector: 14,
            name: "#PF",
            cpu: 1,
            rip: 0xffff_ffff_8000_1234,
            error_code: 2,
            cr2: Some(0x1000),
        };
        let value: Value = serde_json::from_str(&sample(Some(failure)).to_string()).unwrap();
        assert_eq!(value["outcome"], "failed");
        let failure = &value["failure"];
        assert_eq!(failure["kind"], "exception");
        assert_eq!(failure["vector"], 14);
        assert_eq!(failure["name"], "#PF");
        assert_eq!(failure["cpu"], 1);
        assert_eq!(failure["rip"], "0xffffffff80001234");
        assert_eq!(failure["cr2"], "0x1000");
    }

    #[test]
    fn bench_statistics_and_json() {
        let mut samples = [90, 10, 50, 30, 70, 20, 40, 60, 80, 100, 55];
        let bench = BenchReport::from_samples("ipc", &mut samples).unwrap();
        assert_eq!(
            (bench.min, bench.median, bench.p90, bench.samples),
            (10, 55, 90, 11)
        );
        assert!(BenchReport::from_samples("ipc", &mut []).is_none());
        let mut summary = sample(None);
        let reports = [bench, bench];
        summary.bench = &reports;
        let value: Value = serde_json::from_str(&summary.to_string()).unwrap();
        assert_eq!(value["bench"][0]["median"], 55);
        assert_eq!(value["bench"][1]["unit"], "tsc");
        assert_eq!(
            serde_json::from_str::<Value>(&sample(None).to_string()).unwrap()["bench"],
            serde_json::json!([])
        );
    }

    #[test]
    fn panic_messages_are_escaped() {
        let failure = Failure::Panic {
            cpu: 0,
            message: "bad \"quote\" \\ and\nnewline\u{1}",
        };
        let text = sample(Some(failure)).to_string();
        assert!(!text.contains('\n'));
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            value["failure"]["message"],
            "bad \"quote\" \\ and\nnewline\u{1}"
        );
    }

    #[test]
    fn empty_lists_are_empty_arrays() {
        let mut summary = sample(Some(Failure::Check {
            stage: "smp",
            reason: "AP 2 did not start",
        }));
        summary.ran = &[];
        summary.timer_ticks = &[];
        summary.domains = &[];
        summary.last_detection = None;
        summary.last_recovery = None;
        let value: Value = serde_json::from_str(&summary.to_string()).unwrap();
        assert_eq!(value["ran"], serde_json::json!([]));
        assert_eq!(value["failure"]["stage"], "smp");
        assert_eq!(value["domains"], serde_json::json!([]));
        assert!(value["last_detection"].is_null());
    }
}
