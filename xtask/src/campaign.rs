//! `cargo xtask campaign`: fault-injection campaigns. Each run boots a scenario under bochs
//! with one fault (`inject=KIND:TARGET seed=N recovery=MODE`), reads the summary and files
//! the run into the papers' outcome classes; records go to `OUT/runs.jsonl`, one JSON object
//! per line, as each run ends (a rerun skips the runs already there: campaigns resume), and
//! the per-cell rates with Wilson 95% intervals to `OUT/summary.md`.
//!
//! Every random choice of a run comes from its seed (`run_seed`), and bochs is deterministic,
//! so a record's `cmdline` replays the run.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::emulator::{self, BootSpec, EmulatorKind, Image};
use crate::host::{self, Tool};
use crate::image;

/// What a campaign can target: the four services, and the core itself (the baseline a
/// monolithic hypervisor has: a fault that manifests there ends the run).
pub const TARGETS: [&str; 5] = ["scheduler", "memory", "timer", "hypercall", "core"];
/// The fault types: the papers' three, and `hang` (an endless loop at a random point).
pub const FAULTS: [&str; 4] = ["failstop", "register", "code", "hang"];
/// The recovery modes: one pinned for every failure, or the default escalating policy
/// (microreset, then microreboot, then failed, for failures of one domain within a second).
pub const MODES: [&str; 3] = ["microreset", "microreboot", "escalate"];

/// Emulated seconds a campaign run's VMs get by default (`--budget`): a healthy 3AppVM run
/// ends well within it, a run whose VMs stall after a fault fails after it rather than after
/// the kernel's own 60 s.
pub const DEFAULT_BUDGET_S: u64 = 20;

/// What a campaign runs.
#[derive(Clone, Debug)]
pub struct Campaign {
    /// The scenario every run boots.
    pub scenario: String,
    /// CPUs of the emulated machine.
    pub cpus: u32,
    /// Target domains.
    pub targets: Vec<String>,
    /// Fault types.
    pub faults: Vec<String>,
    /// Recovery modes.
    pub modes: Vec<String>,
    /// Runs per cell (target x fault x mode).
    pub runs: u32,
    /// The campaign's seed.
    pub seed: u64,
    /// Runs at once.
    pub jobs: usize,
    /// Where the records go.
    pub out: PathBuf,
    /// Boot the release build.
    pub release: bool,
    /// Wall-clock limit of one run.
    pub timeout: Duration,
    /// Emulated seconds a run's VMs get before the kernel ends the run as stuck (`budget=`).
    pub budget_s: u64,
    /// The repair sets to run every cell under (`repairs=` of the kernel: `all`, `none` or
    /// names joined by commas): one for a plain campaign, several for a sweep.
    pub repairs: Vec<String>,
    /// Run only this slice of the plan: (task, tasks), the runs whose position in the plan
    /// is `task` modulo `tasks`, recorded in `OUT/runs-task-TASK.jsonl` (a Slurm array task).
    pub slice: Option<(u32, u32)>,
    /// `--until-ci`: keep adding runs (a round of `runs` at a time, at most `max_runs` per
    /// cell) until every cell's recovered-of-detected interval has at most this half-width.
    pub until_ci: Option<(f64, u32)>,
}

/// Expands `all` and comma-separated lists against `known`; an unknown name is an error.
pub fn parse_list(value: &str, known: &[&str], what: &str) -> Result<Vec<String>, String> {
    if value == "all" {
        return Ok(known.iter().map(|name| name.to_string()).collect());
    }
    let names: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(str::to_string)
        .collect();
    if names.is_empty() {
        return Err(format!(
            "no {what} given (one of {}, or all)",
            known.join(", ")
        ));
    }
    for name in &names {
        if !known.contains(&name.as_str()) {
            return Err(format!(
                "unknown {what} {name:?} (one of {}, or all)",
                known.join(", ")
            ));
        }
    }
    Ok(names)
}

/// One run to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunSpec {
    /// Unique within the campaign: `TARGET-FAULT-MODE-INDEX`.
    pub id: String,
    /// The scenario it boots (also in `cmdline`).
    pub scenario: String,
    /// The target domain.
    pub target: String,
    /// The fault type.
    pub fault: String,
    /// The recovery mode.
    pub mode: String,
    /// The run's seed.
    pub seed: u64,
    /// The repairs the recoveries make (`all`, `none` or names joined by commas).
    pub repairs: String,
    /// The kernel command line.
    pub cmdline: String,
}

/// The repair sets of `--repairs-sweep`: none, then the repairs of
/// `microvisor_abi::repair::NAMES` added one at a time, ending with all of them (NiLiHype's
/// incremental study, Table I).
pub fn sweep_sets() -> Vec<String> {
    let names = microvisor_abi::repair::NAMES;
    (0..=names.len())
        .map(|count| match count {
            0 => "none".to_string(),
            _ if count == names.len() => "all".to_string(),
            _ => names[..count]
                .iter()
                .map(|(name, _)| *name)
                .collect::<Vec<_>>()
                .join(","),
        })
        .collect()
}

/// The label of a record's cell in the mode column: its mode, with its repair set unless
/// that is every repair (records from before repair sets count as `all`).
pub fn cell_mode(record: &Value) -> String {
    let mode = record["mode"].as_str().unwrap_or("?");
    match record["repairs"].as_str() {
        None | Some("all") => mode.to_string(),
        Some(repairs) => format!("{mode} (repairs: {repairs})"),
    }
}

/// The seed of run `index` of a cell: SplitMix64 of the campaign seed and the cell's names,
/// so adding a cell or runs never changes the seeds of the others.
pub fn run_seed(seed: u64, target: &str, fault: &str, mode: &str, index: u32) -> u64 {
    let mut x = seed;
    for byte in target
        .bytes()
        .chain([b'/'])
        .chain(fault.bytes())
        .chain([b'/'])
        .chain(mode.bytes())
    {
        x = (x ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    x ^= u64::from(index).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Every run of `campaign`, in order: run 0 of every cell, then run 1 of every cell, ..., so
/// that a campaign stopped half-way has about as many runs in each cell.
pub fn plan(campaign: &Campaign) -> Vec<RunSpec> {
    let mut runs = Vec::new();
    for index in 0..campaign.runs {
        for repairs in &campaign.repairs {
            for target in &campaign.targets {
                for fault in &campaign.faults {
                    for mode in &campaign.modes {
                        runs.push(spec(campaign, target, fault, mode, repairs, index));
                    }
                }
            }
        }
    }
    runs
}

/// Run `index` of cell (target, fault, mode) under the repair set `repairs`. The seed does
/// not depend on the repairs: a sweep injects the same faults under every set.
fn spec(
    campaign: &Campaign,
    target: &str,
    fault: &str,
    mode: &str,
    repairs: &str,
    index: u32,
) -> RunSpec {
    let seed = run_seed(campaign.seed, target, fault, mode, index);
    // A fail-stop names its step count (drawn from the seed as the kernel would): without
    // one, `inject=failstop:DOMAIN` is the plain fail-stop at the start of a request, which
    // the seed does not move.
    let steps = match fault {
        "failstop" => microvisor::inject::parse_spec("failstop", "")
            .map(|spec| format!("@{}", spec.resolve(seed, 0).steps))
            .unwrap_or_default(),
        _ => String::new(),
    };
    // Every repair: the plain campaign's ids and command lines; a set in a sweep is named by
    // its position among the campaign's sets.
    let (set, switch) = match campaign.repairs.iter().position(|set| set == repairs) {
        _ if repairs == "all" => (String::new(), String::new()),
        Some(position) => (format!("-r{position}"), format!(" repairs={repairs}")),
        None => ("-r?".to_string(), format!(" repairs={repairs}")),
    };
    RunSpec {
        id: format!("{target}-{fault}-{mode}{set}-{index}"),
        scenario: campaign.scenario.clone(),
        target: target.to_string(),
        fault: fault.to_string(),
        mode: mode.to_string(),
        seed,
        repairs: repairs.to_string(),
        cmdline: format!(
            "scenario={} inject={fault}:{target}{steps} seed={seed} recovery={mode} selfcheck=0 \
             budget={}{switch}",
            campaign.scenario, campaign.budget_s
        ),
    }
}

/// `--until-ci`: the next runs for every cell whose recovery rate (of detected faults) is not
/// yet known to within `half_width` (its Wilson interval is wider than twice that, or nothing
/// was detected yet): `batch` more runs of each such cell, up to `max_runs` runs per cell.
pub fn extension(
    campaign: &Campaign,
    records: &[Value],
    half_width: f64,
    batch: u32,
    max_runs: u32,
) -> Vec<RunSpec> {
    let mut more = Vec::new();
    for target in &campaign.targets {
        for fault in &campaign.faults {
            for mode in &campaign.modes {
                let cell: Vec<&Value> = records
                    .iter()
                    .filter(|r| {
                        r["target"] == *target && r["fault"] == *fault && r["mode"] == *mode
                    })
                    .collect();
                let recorded = cell.len() as u32;
                let recovered = cell.iter().filter(|r| r["class"] == "recovered").count() as u64;
                let detected = recovered
                    + cell
                        .iter()
                        .filter(|r| r["class"] == "detected-failed")
                        .count() as u64;
                let (low, high) = wilson(recovered, detected);
                let known = detected > 0 && (high - low) / 2.0 <= half_width;
                if known || recorded >= max_runs {
                    continue;
                }
                for index in recorded..(recorded + batch).min(max_runs) {
                    more.push(spec(campaign, target, fault, mode, "all", index));
                }
            }
        }
    }
    more
}

/// The outcome classes (ReHype/NiLiHype).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    /// The fault never struck: the target ran fewer instructions than the trigger counted.
    NotInjected,
    /// Nothing detected, every VM correct.
    NonManifested,
    /// Nothing detected, but a VM's checks failed (silent data corruption).
    Sdc,
    /// Detected and recovered by the success definition.
    Recovered,
    /// Detected, not recovered (a VM lost beyond what the scenario allows, or the system
    /// declared failed).
    DetectedFailed,
    /// No summary: a hang, a crash of the core, or the emulator's timeout.
    NoSummary,
}

impl Class {
    /// The name in records and tables.
    pub const fn name(self) -> &'static str {
        match self {
            Class::NotInjected => "not-injected",
            Class::NonManifested => "non-manifested",
            Class::Sdc => "sdc",
            Class::Recovered => "recovered",
            Class::DetectedFailed => "detected-failed",
            Class::NoSummary => "no-summary",
        }
    }

    /// Every class, in table order.
    pub const ALL: [Class; 6] = [
        Class::NotInjected,
        Class::NonManifested,
        Class::Sdc,
        Class::Recovered,
        Class::DetectedFailed,
        Class::NoSummary,
    ];
}

/// What a run's summary says, classified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The class.
    pub class: Class,
    /// Detected, recovered and no VM affected at all (NiLiHype's noVMF).
    pub no_vm_failure: bool,
    /// VMs whose verdict was not `passed`.
    pub vms_affected: usize,
}

/// Classifies a run from its summary (`None`: there was none). Success in a scenario with a
/// control VM (3AppVM, 1AppVM): at most `allowed` AppVMs affected (1 for 3AppVM, 0 else), the
/// VMs the control VM created after the fault all passed, and the control VM passed.
pub fn classify(summary: Option<&Value>, allowed: usize) -> Verdict {
    let Some(summary) = summary else {
        return Verdict {
            class: Class::NoSummary,
            no_vm_failure: false,
            vms_affected: 0,
        };
    };
    let injection = &summary["injection"];
    let vms = summary["vms"].as_array().cloned().unwrap_or_default();
    let affected: Vec<&Value> = vms.iter().filter(|vm| vm["verdict"] != "passed").collect();
    let vms_affected = affected.len();
    if injection["injected"] != Value::Bool(true) {
        return Verdict {
            class: Class::NotInjected,
            no_vm_failure: false,
            vms_affected,
        };
    }
    let injected_at = injection["tsc"].as_u64().unwrap_or(u64::MAX);
    let detection_tsc = summary["last_detection"]["tsc"].as_u64();
    let detected = injection["detection_latency"].is_u64()
        || detection_tsc.is_some_and(|tsc| tsc >= injected_at);
    let control_failed = affected.iter().any(|vm| vm["guest"] == "control");
    let created_after_failed = affected.iter().any(|vm| {
        vm["created_tsc"]
            .as_u64()
            .is_some_and(|created| created > injected_at)
    });
    // The core itself failing (an exception or panic in ring 0: the summary's `failure`) ends
    // the run, whatever the VM table said when it stopped; so does a run without VMs.
    let core_failed = matches!(
        summary["failure"]["kind"].as_str(),
        Some("exception" | "panic")
    );
    let success = !core_failed
        && !vms.is_empty()
        && !control_failed
        && !created_after_failed
        && vms_affected <= allowed;
    let class = match (detected, vms_affected == 0, success) {
        (false, true, _) => Class::NonManifested,
        (false, false, _) => Class::Sdc,
        (true, _, true) => Class::Recovered,
        (true, _, false) => Class::DetectedFailed,
    };
    Verdict {
        class,
        no_vm_failure: class == Class::Recovered && vms_affected == 0,
        vms_affected,
    }
}

/// NiLiHype's noVMF for a record: recovered, and no VM affected at all. Computed from the class
/// and the VM count rather than read from the record's flag, which records made before a core
/// failure could count as "no VM affected" (the VM table was empty) got wrong.
pub fn no_vm_failure(record: &Value) -> bool {
    record["class"] == Class::Recovered.name() && record["vms_affected"].as_u64() == Some(0)
}

/// The Wilson score interval for `successes` of `trials` at 95% confidence: (low, high).
pub fn wilson(successes: u64, trials: u64) -> (f64, f64) {
    if trials == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_963_984_540_054_f64;
    let n = trials as f64;
    let p = successes as f64 / n;
    let denominator = 1.0 + z * z / n;
    let center = (p + z * z / (2.0 * n)) / denominator;
    let margin = z * ((p * (1.0 - p) / n) + z * z / (4.0 * n * n)).sqrt() / denominator;
    ((center - margin).max(0.0), (center + margin).min(1.0))
}

/// AppVMs a scenario's success definition lets the fault affect.
fn allowed_affected(scenario: &str) -> usize {
    usize::from(scenario == "3appvm")
}

/// The last `n` lines of `lines`.
fn tail(lines: &[String], n: usize) -> Vec<String> {
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// Boots runs, each from a frozen copy of the kernel built when it was made (a rebuild while
/// runs go on changes nothing in them), `jobs` bochs processes at a time.
pub struct Runner {
    elf: PathBuf,
    frozen: PathBuf,
    build: String,
    cpus: u32,
    timeout: Duration,
}

impl Runner {
    /// Builds the kernel (release or debug) and freezes a copy for runs on `cpus` CPUs, each
    /// limited to `timeout` of wall time.
    pub fn new(release: bool, cpus: u32, timeout: Duration) -> Result<Runner, String> {
        host::ensure_tools(&[Tool::Bochs, Tool::Iso])?;
        let built = image::build_kernel(release, false)?;
        let frozen = image::workspace_root()
            .join("target/campaign-kernels")
            .join(format!(
                "{}-{}",
                std::process::id(),
                NEXT_RUNNER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
        fs::create_dir_all(&frozen).map_err(|e| format!("{}: {e}", frozen.display()))?;
        let elf = frozen.join("microvisor");
        for (from, to) in [
            (built.clone(), elf.clone()),
            (image::bundle_for(&built), image::bundle_for(&elf)),
        ] {
            fs::copy(&from, &to).map_err(|e| format!("copying {}: {e}", from.display()))?;
        }
        Ok(Runner {
            elf,
            frozen,
            build: build_id(release),
            cpus,
            timeout,
        })
    }

    /// Runs `specs`, `jobs` at a time, handing each record to `on_record` as its run ends
    /// (in the order they end). Stops early on Ctrl-C: a run cut short is not handed over.
    pub fn run(
        &self,
        specs: Vec<RunSpec>,
        jobs: usize,
        mut on_record: impl FnMut(Value) -> Result<(), String>,
    ) -> Result<(), String> {
        let queue = Arc::new(Mutex::new(specs.into_iter()));
        let (sender, receiver) = mpsc::channel::<Value>();
        std::thread::scope(|scope| {
            for _ in 0..jobs.max(1) {
                let queue = Arc::clone(&queue);
                let sender = sender.clone();
                scope.spawn(move || {
                    loop {
                        if emulator::interrupted() {
                            return;
                        }
                        let Some(spec) = queue.lock().ok().and_then(|mut queue| queue.next())
                        else {
                            return;
                        };
                        let mut record = run_one(&spec, self.cpus, self.timeout, &self.elf);
                        record["build"] = json!(self.build);
                        if emulator::interrupted() || sender.send(record).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(sender);
            for record in receiver {
                on_record(record)?;
            }
            Ok(())
        })
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.frozen);
    }
}

/// Tells the frozen kernels of runners in one process apart.
static NEXT_RUNNER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Runs one spec and returns its record.
fn run_one(spec: &RunSpec, cpus: u32, timeout: Duration, elf: &Path) -> Value {
    let started = Instant::now();
    let record = |summary: Option<&Value>, lines: &[String], error: Option<String>| {
        let verdict = classify(summary, allowed_affected(&spec.scenario));
        let mut record = json!({
            "id": spec.id,
            "scenario": spec.scenario,
            "cpus": cpus,
            "target": spec.target,
            "fault": spec.fault,
            "mode": spec.mode,
            "repairs": spec.repairs,
            "seed": spec.seed,
            "cmdline": spec.cmdline,
            "class": verdict.class.name(),
            "no_vm_failure": verdict.no_vm_failure,
            "vms_affected": verdict.vms_affected,
            "wall_s": started.elapsed().as_secs_f64(),
        });
        if let Some(summary) = summary {
            record["injection"] = summary["injection"].clone();
            record["detection"] = summary["last_detection"].clone();
            record["recovery"] = summary["last_recovery"].clone();
            record["vms"] = json!(
                summary["vms"]
                    .as_array()
                    .map(|vms| vms
                        .iter()
                        .map(|vm| json!({
                            "vm": vm["vm"], "guest": vm["guest"], "verdict": vm["verdict"],
                            "retries": vm["retries"], "stop_reason": vm["stop_reason"],
                            "created_tsc": vm["created_tsc"],
                            "longest_gap_us": vm["longest_gap_us"],
                        }))
                        .collect::<Vec<_>>())
                    .unwrap_or_default()
            );
            record["failure"] = summary["failure"].clone();
        }
        if verdict.class != Class::Recovered && verdict.class != Class::NonManifested {
            record["console_tail"] = json!(tail(lines, 40));
        }
        if let Some(error) = error {
            record["error"] = json!(error);
        }
        record
    };
    let run_dir = match emulator::new_run_dir(&format!("campaign-{}", spec.id)) {
        Ok(dir) => dir,
        Err(error) => return record(None, &[], Some(error)),
    };
    let iso = run_dir.join("microvisor.iso");
    if let Err(error) = image::build_iso(elf, &spec.cmdline, &iso) {
        return record(None, &[], Some(error));
    }
    let boot = BootSpec {
        kind: EmulatorKind::Bochs,
        image: Image::Iso(iso),
        cpus,
        timeout,
        ips: emulator::bochs_ips(&spec.cmdline),
    };
    let result = emulator::boot(&boot, &run_dir, &mut |_, _| {});
    let value = match result {
        Ok(result) => record(result.summary.as_ref(), &result.lines, None),
        Err(error) => record(None, &[], Some(error)),
    };
    let _ = fs::remove_dir_all(&run_dir);
    value
}

/// The source the runs were built from: the commit, `-dirty` if the tree had changes, and the
/// profile (a record names what to check out to replay it).
fn build_id(release: bool) -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(image::workspace_root())
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|status| !status.is_empty());
    format!(
        "{commit}{}{}",
        if dirty { "-dirty" } else { "" },
        if release { " release" } else { " debug" }
    )
}

/// The record files of a campaign directory: `runs.jsonl` and every Slurm task's
/// `runs-task-K.jsonl`.
fn record_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|path| {
                    path.file_name()
                        .and_then(|name| name.to_str())
                        .is_some_and(|name| name.starts_with("runs") && name.ends_with(".jsonl"))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// The ids already recorded in a campaign directory (a campaign resumes after them).
fn done_ids(dir: &Path) -> BTreeSet<String> {
    read_records(dir)
        .unwrap_or_default()
        .iter()
        .filter_map(|record| record["id"].as_str().map(str::to_string))
        .collect()
}

/// Reads every record of a campaign directory (`runs.jsonl` and the Slurm tasks' files).
pub fn read_records(dir: &Path) -> Result<Vec<Value>, String> {
    let mut records = Vec::new();
    for path in record_files(dir) {
        let file = fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        records.extend(
            BufReader::new(file)
                .lines()
                .map_while(Result::ok)
                .filter_map(|line| serde_json::from_str::<Value>(&line).ok()),
        );
    }
    Ok(records)
}

/// Per cell (target, fault, mode): counts per class, and the recovery rate of detected runs
/// with its Wilson interval, as a Markdown table.
pub fn table(records: &[Value]) -> String {
    use std::collections::BTreeMap;
    let mut cells: BTreeMap<(String, String, String), [u64; 7]> = BTreeMap::new();
    for record in records {
        let key = (
            record["target"].as_str().unwrap_or("?").to_string(),
            record["fault"].as_str().unwrap_or("?").to_string(),
            cell_mode(record),
        );
        let counts = cells.entry(key).or_default();
        if let Some(index) = Class::ALL
            .iter()
            .position(|class| record["class"] == class.name())
        {
            counts[index] += 1;
        }
        counts[6] += u64::from(no_vm_failure(record));
    }
    let mut out = String::from(
        "| target | fault | mode | runs | not injected | non-manifested | SDC | recovered | detected, failed | no summary | recovered of detected (95% CI) | noVMF of detected |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for ((target, fault, mode), counts) in &cells {
        let runs: u64 = counts[..6].iter().sum();
        let detected = counts[3] + counts[4];
        let (low, high) = wilson(counts[3], detected);
        let rate = if detected == 0 {
            "-".to_string()
        } else {
            format!(
                "{:.1}% [{:.1}, {:.1}]",
                100.0 * counts[3] as f64 / detected as f64,
                100.0 * low,
                100.0 * high
            )
        };
        let no_vmf = if detected == 0 {
            "-".to_string()
        } else {
            format!("{:.1}%", 100.0 * counts[6] as f64 / detected as f64)
        };
        out.push_str(&format!(
            "| {target} | {fault} | {mode} | {runs} | {} | {} | {} | {} | {} | {} | {rate} | {no_vmf} |\n",
            counts[0], counts[1], counts[2], counts[3], counts[4], counts[5]
        ));
    }
    out
}

/// Runs `todo`, appending each record to `records` as its run ends, with a progress line.
fn execute(
    campaign: &Campaign,
    runner: &Runner,
    todo: Vec<RunSpec>,
    records: &Path,
) -> Result<(), String> {
    let total = todo.len();
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(records)
        .map_err(|e| format!("{}: {e}", records.display()))?;
    let started = Instant::now();
    let mut finished = 0usize;
    let mut counts = [0u64; 6];
    runner.run(todo, campaign.jobs, |record| {
        writeln!(file, "{record}").map_err(|e| format!("{}: {e}", records.display()))?;
        file.flush()
            .map_err(|e| format!("{}: {e}", records.display()))?;
        finished += 1;
        if let Some(index) = Class::ALL
            .iter()
            .position(|class| record["class"] == class.name())
        {
            counts[index] += 1;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let eta = elapsed / finished as f64 * (total - finished) as f64;
        eprintln!(
            "[{finished}/{total}] {} {} ({:.0} s); so far: {}; ETA {:.0} min",
            record["id"].as_str().unwrap_or("?"),
            record["class"].as_str().unwrap_or("?"),
            record["wall_s"].as_f64().unwrap_or(0.0),
            Class::ALL
                .iter()
                .zip(counts)
                .filter(|(_, count)| *count > 0)
                .map(|(class, count)| format!("{} {count}", class.name()))
                .collect::<Vec<_>>()
                .join(", "),
            eta / 60.0
        );
        Ok(())
    })?;
    Ok(())
}

/// Runs `campaign`: every run not yet in `OUT/runs.jsonl`, `jobs` at a time.
pub fn run(campaign: &Campaign) -> Result<(), String> {
    if microvisor::scenario::find(&campaign.scenario).is_none() {
        return Err(format!("no scenario called {:?}", campaign.scenario));
    }
    fs::create_dir_all(&campaign.out).map_err(|e| format!("{}: {e}", campaign.out.display()))?;
    let runner = Runner::new(campaign.release, campaign.cpus, campaign.timeout)?;
    let records = match campaign.slice {
        Some((task, _)) => campaign.out.join(format!("runs-task-{task}.jsonl")),
        None => campaign.out.join("runs.jsonl"),
    };
    let done = done_ids(&campaign.out);
    let todo: Vec<RunSpec> = plan(campaign)
        .into_iter()
        .enumerate()
        .filter(|(position, _)| {
            campaign
                .slice
                .is_none_or(|(task, tasks)| *position as u32 % tasks == task)
        })
        .map(|(_, spec)| spec)
        .filter(|spec| !done.contains(&spec.id))
        .collect();
    eprintln!(
        "xtask: campaign {}: {} runs to do ({} already recorded), {} at a time",
        campaign.out.display(),
        todo.len(),
        done.len(),
        campaign.jobs
    );
    execute(campaign, &runner, todo, &records)?;
    if let Some((half_width, max_runs)) = campaign.until_ci {
        loop {
            if emulator::interrupted() {
                break;
            }
            let all = read_records(&campaign.out)?;
            let more = extension(campaign, &all, half_width, campaign.runs.max(1), max_runs);
            if more.is_empty() {
                break;
            }
            eprintln!(
                "xtask: --until-ci {half_width}: {} more runs for the cells still wider",
                more.len()
            );
            execute(campaign, &runner, more, &records)?;
        }
    }
    drop(runner);
    let all = read_records(&campaign.out)?;
    let summary = format!(
        "# Campaign {}\n\n{} runs recorded in `runs.jsonl`.\n\n{}",
        campaign.out.display(),
        all.len(),
        table(&all)
    );
    fs::write(campaign.out.join("summary.md"), &summary).map_err(|e| format!("summary.md: {e}"))?;
    println!("{summary}");
    if emulator::interrupted() {
        return Err("interrupted: rerun the same command to continue".into());
    }
    Ok(())
}

/// Boots recorded run `id` of the campaign in `out` again: the same command line, CPUs and
/// profile (the build should be the recorded commit: checked out by the user). Prints both
/// records' class and injection; `Ok(true)` if they agree.
pub fn replay(id: &str, out: &Path, debug: bool) -> Result<bool, String> {
    let records = read_records(out)?;
    let recorded = records
        .iter()
        .rev()
        .find(|record| record["id"] == id)
        .ok_or(format!("{}: no run {id:?}", out.display()))?;
    let build = recorded["build"].as_str().unwrap_or("");
    let release = !build.ends_with(" debug");
    let commit = build.split(['-', ' ']).next().unwrap_or("");
    let now = build_id(release);
    if !now.starts_with(commit) || now.contains("-dirty") {
        eprintln!(
            "xtask: warning: run {id} was built from {build}, this tree is {now}: the replay \
             may differ (check out {commit} to replay it exactly)"
        );
    }
    let text = |key: &str| recorded[key].as_str().unwrap_or("").to_string();
    let spec = RunSpec {
        id: id.to_string(),
        scenario: text("scenario"),
        target: text("target"),
        fault: text("fault"),
        mode: text("mode"),
        seed: recorded["seed"].as_u64().unwrap_or(0),
        repairs: recorded["repairs"].as_str().unwrap_or("all").to_string(),
        cmdline: text("cmdline"),
    };
    let cpus = recorded["cpus"]
        .as_u64()
        .and_then(|cpus| u32::try_from(cpus).ok())
        .unwrap_or(2);
    eprintln!("xtask: replaying {id}: {} on {cpus} CPUs", spec.cmdline);
    if debug {
        return debug_replay(&spec, cpus, release).map(|()| true);
    }
    let runner = Runner::new(release, cpus, Duration::from_secs(300))?;
    let mut replayed = None;
    runner.run(vec![spec], 1, |record| {
        replayed = Some(record);
        Ok(())
    })?;
    let replayed = replayed.ok_or("the replay was interrupted")?;
    for (name, record) in [("recorded", recorded), ("replayed", &replayed)] {
        println!(
            "{name}: {} {}",
            record["class"].as_str().unwrap_or("?"),
            record["injection"]
        );
    }
    if let Some(tail) = replayed["console_tail"].as_array() {
        println!("replayed console, last lines:");
        for line in tail {
            println!("  {}", line.as_str().unwrap_or(""));
        }
    }
    Ok(recorded["class"] == replayed["class"] && recorded["injection"] == replayed["injection"])
}

/// Boots `spec` in bochs with its debugger on this terminal, stopping where the fault strikes
/// (`inject_break=1`: a magic breakpoint in the injector, the faulted context in its frame).
fn debug_replay(spec: &RunSpec, cpus: u32, release: bool) -> Result<(), String> {
    host::ensure_tools(&[Tool::Bochs, Tool::Iso])?;
    let elf = image::build_kernel(release, false)?;
    let run_dir = emulator::new_run_dir(&format!("replay-{}", spec.id))?;
    let cmdline = format!("{} inject_break=1", spec.cmdline);
    let iso = run_dir.join("microvisor.iso");
    image::build_iso(&elf, &cmdline, &iso)?;
    let rc = run_dir.join("bochsrc");
    fs::write(
        &rc,
        emulator::bochsrc(cpus, emulator::bochs_ips(&cmdline), &iso, &run_dir),
    )
    .map_err(|e| format!("{}: {e}", rc.display()))?;
    let debugger_rc = run_dir.join("bochs.rc");
    fs::write(&debugger_rc, "c\n").map_err(|e| format!("{}: {e}", debugger_rc.display()))?;
    eprintln!(
        "xtask: bochs runs to the injection and stops in its debugger there (the injector's \
         magic breakpoint; the faulted context is the trap frame on this stack). `c` goes on \
         (the next stop is the end of the run), `q` quits. Serial console: {}",
        run_dir.join("serial.log").display()
    );
    let status = std::process::Command::new("bochs")
        .arg("-q")
        .arg("-f")
        .arg(&rc)
        .arg("-rc")
        .arg(&debugger_rc)
        .env("TERM", "dumb")
        .current_dir(&run_dir)
        .status()
        .map_err(|e| format!("cannot run bochs: {e}"))?;
    eprintln!(
        "xtask: bochs exited with {status}; files in {}",
        run_dir.display()
    );
    Ok(())
}

/// Scripted runs of the campaign pipeline for `cargo xtask test` (each spec: id, command
/// line). Their outcomes are known whatever the build: a fail-stop is always detected; bit 21
/// of RFLAGS (ID) is read by nothing a domain runs, so flipping it is non-manifested; the same
/// seed twice gives the same record; every fault type strikes; an endless loop is detected as
/// a hang and recovered; a fail-stop in the core itself ends the run (detected, not
/// recovered: the monolithic baseline).
pub const PIPELINE_SPECS: [(&str, &str); 7] = [
    (
        "failstop",
        "scenario=1appvm-unixbench inject=failstop:memory@10 seed=11",
    ),
    (
        "rflags-id",
        "scenario=1appvm-unixbench inject=register:memory:rflags:21@10 seed=11",
    ),
    (
        "register-a",
        "scenario=1appvm-unixbench inject=register:memory seed=12345",
    ),
    (
        "register-b",
        "scenario=1appvm-unixbench inject=register:memory seed=12345",
    ),
    (
        "code",
        "scenario=1appvm-unixbench inject=code:timer seed=77",
    ),
    (
        "hang",
        "scenario=1appvm-unixbench inject=hang:timer@10 seed=5",
    ),
    (
        "core-failstop",
        "scenario=1appvm-unixbench inject=failstop:core@100 seed=1",
    ),
];

/// Runs [`PIPELINE_SPECS`] on the debug build and checks what each must show; returns the
/// records (for the report check).
pub fn pipeline_check() -> Result<Vec<Value>, String> {
    let runner = Runner::new(false, 2, Duration::from_secs(150))?;
    let specs = PIPELINE_SPECS
        .iter()
        .map(|(id, cmdline)| RunSpec {
            id: id.to_string(),
            scenario: "1appvm-unixbench".into(),
            target: cmdline
                .split_once(':')
                .and_then(|(_, rest)| rest.split([':', '@', ' ']).next())
                .unwrap_or("?")
                .into(),
            fault: cmdline
                .split_once("inject=")
                .and_then(|(_, rest)| rest.split(':').next())
                .unwrap_or("?")
                .into(),
            mode: "microreset".into(),
            seed: 0,
            repairs: "all".into(),
            cmdline: cmdline.to_string(),
        })
        .collect();
    let mut records = Vec::new();
    runner.run(specs, 2, |record| {
        records.push(record);
        Ok(())
    })?;
    let find = |id: &str| {
        records
            .iter()
            .find(|record| record["id"] == id)
            .ok_or(format!("run {id} has no record"))
    };
    let mut problems = Vec::new();
    let failstop = find("failstop")?;
    if !matches!(
        failstop["class"].as_str(),
        Some("recovered" | "detected-failed")
    ) || !failstop["injection"]["detection_latency"].is_u64()
    {
        problems.push(format!(
            "a fail-stop was not detected: class {}, injection {}",
            failstop["class"], failstop["injection"]
        ));
    }
    let id_flag = find("rflags-id")?;
    if id_flag["class"] != "non-manifested" || id_flag["injection"]["location"] != "rflags" {
        problems.push(format!(
            "flipping RFLAGS.ID was not non-manifested: class {}, injection {}",
            id_flag["class"], id_flag["injection"]
        ));
    }
    let comparable = |record: &Value| {
        let mut record = record.clone();
        for volatile in ["id", "wall_s", "console_tail"] {
            record.as_object_mut().map(|map| map.remove(volatile));
        }
        record
    };
    let (a, b) = (find("register-a")?, find("register-b")?);
    if comparable(a) != comparable(b) {
        problems.push(format!(
            "the same seed gave two different records:\n  {a}\n  {b}"
        ));
    }
    for record in &records {
        if record["injection"]["injected"] != true {
            problems.push(format!("run {} injected nothing: {}", record["id"], record));
        }
    }
    if find("code")?["injection"]["location"] != "code" {
        problems.push("the code fault did not flip a code byte".into());
    }
    let hang = find("hang")?;
    if hang["class"] != "recovered" || hang["detection"]["kind"] != "hang" {
        problems.push(format!(
            "an endless loop in the timer domain was not detected as a hang and recovered: \
             class {}, detection {}",
            hang["class"], hang["detection"]
        ));
    }
    let core = find("core-failstop")?;
    if core["class"] != "detected-failed" || core["failure"]["kind"] != "exception" {
        problems.push(format!(
            "a fail-stop in the core did not end the run with its exception: class {}, \
             failure {}",
            core["class"], core["failure"]
        ));
    }
    if problems.is_empty() {
        Ok(records)
    } else {
        Err(problems.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[ignore = "boots bochs seven times; `cargo xtask test` runs it as a step of its own"]
    fn pipeline() {
        if let Err(problems) = pipeline_check() {
            panic!("{problems}");
        }
    }

    /// A campaign of register faults in memory and timer, microreset, `runs` per cell.
    fn two_cells(runs: u32) -> Campaign {
        Campaign {
            scenario: "3appvm".into(),
            cpus: 2,
            targets: vec!["memory".into(), "timer".into()],
            faults: vec!["register".into()],
            modes: vec!["microreset".into()],
            runs,
            seed: 1,
            jobs: 1,
            out: PathBuf::from("x"),
            release: false,
            timeout: Duration::from_secs(1),
            budget_s: 20,
            repairs: vec!["all".into()],
            slice: None,
            until_ci: None,
        }
    }

    #[test]
    fn a_repairs_sweep_adds_one_repair_at_a_time_with_the_same_faults() {
        let sets = sweep_sets();
        assert_eq!(sets.len(), microvisor_abi::repair::NAMES.len() + 1);
        assert_eq!((sets[0].as_str(), sets[8].as_str()), ("none", "all"));
        assert_eq!(sets[2], "quiesce,release-locks");
        for set in &sets {
            assert!(microvisor::cmdline::parse_repairs(set).is_some(), "{set}");
        }
        let campaign = Campaign {
            repairs: sets.clone(),
            ..two_cells(2)
        };
        let runs = plan(&campaign);
        assert_eq!(runs.len(), 2 * 2 * sets.len());
        let ids: BTreeSet<&str> = runs.iter().map(|run| run.id.as_str()).collect();
        assert_eq!(ids.len(), runs.len(), "ids are unique");
        // Run 0 of memory under `none` and under `all`: the same fault, other repairs.
        let none = &runs[0];
        let all = runs
            .iter()
            .find(|run| run.repairs == "all" && run.target == none.target)
            .unwrap();
        assert_eq!(none.seed, all.seed);
        assert_eq!(none.id, "memory-register-microreset-r0-0");
        assert!(none.cmdline.ends_with(" repairs=none"), "{}", none.cmdline);
        // `all` keeps a plain campaign's ids and command lines.
        assert_eq!(all.id, "memory-register-microreset-0");
        assert!(!all.cmdline.contains("repairs="), "{}", all.cmdline);
    }

    #[test]
    fn until_ci_adds_runs_only_where_the_interval_is_wide() {
        let campaign = two_cells(10);
        let record = |target: &str, class: &str| json!({"target": target, "fault": "register", "mode": "microreset", "class": class});
        // memory: 300 detected, all recovered: half-width about 0.6%, known. timer: 10
        // detected, 5 recovered: half-width about 0.27, not known.
        let mut records: Vec<Value> = (0..300).map(|_| record("memory", "recovered")).collect();
        records.extend((0..5).map(|_| record("timer", "recovered")));
        records.extend((0..5).map(|_| record("timer", "detected-failed")));
        let more = extension(&campaign, &records, 0.1, 10, 400);
        assert_eq!(more.len(), 10);
        assert!(more.iter().all(|spec| spec.target == "timer"));
        assert_eq!(
            more[0].id, "timer-register-microreset-10",
            "continues after run 9"
        );
        assert_eq!(
            more[0],
            plan(&Campaign {
                runs: 11,
                ..campaign.clone()
            })[21]
        );
        // The cap: no more than max_runs per cell.
        assert_eq!(extension(&campaign, &records, 0.1, 10, 12).len(), 2);
        assert!(extension(&campaign, &records, 0.1, 10, 10).is_empty());
        // A cell with nothing detected yet needs more.
        let nothing = vec![record("memory", "non-manifested"); 5];
        assert_eq!(extension(&campaign, &nothing, 0.5, 3, 400).len(), 6);
    }

    #[test]
    fn wilson_matches_published_values() {
        // 8 of 10: (0.490, 0.943), the textbook example (Newcombe 1998, Table I style).
        let (low, high) = wilson(8, 10);
        assert!(
            (low - 0.4902).abs() < 5e-4 && (high - 0.9433).abs() < 5e-4,
            "{low} {high}"
        );
        // 0 of 10: (0, 0.278).
        let (low, high) = wilson(0, 10);
        assert!(low == 0.0 && (high - 0.2775).abs() < 5e-4, "{high}");
        assert_eq!(wilson(0, 0), (0.0, 1.0));
    }

    #[test]
    fn lists_expand_and_refuse_unknown_names() {
        assert_eq!(parse_list("all", &TARGETS, "target").unwrap().len(), 5);
        assert_eq!(
            parse_list("memory, timer", &TARGETS, "target").unwrap(),
            ["memory", "timer"]
        );
        assert!(parse_list("mem", &TARGETS, "target").is_err());
        assert!(parse_list("", &TARGETS, "target").is_err());
    }

    #[test]
    fn plans_are_seeded_per_cell() {
        let campaign = two_cells(3);
        let runs = plan(&campaign);
        assert_eq!(runs.len(), 6);
        assert_eq!(runs[0].id, "memory-register-microreset-0");
        assert_eq!(
            runs[1].id, "timer-register-microreset-0",
            "cells interleave"
        );
        assert!(runs[0].cmdline.contains("inject=register:memory"));
        assert!(runs[0].cmdline.contains("recovery=microreset"));
        assert!(
            runs[0].cmdline.ends_with(" budget=20"),
            "{}",
            runs[0].cmdline
        );
        let failstop = plan(&Campaign {
            faults: vec!["failstop".into()],
            ..campaign.clone()
        });
        assert!(
            failstop[0].cmdline.contains("inject=failstop:memory@"),
            "a campaign's fail-stop is stepped: {}",
            failstop[0].cmdline
        );
        let seeds: BTreeSet<u64> = runs.iter().map(|run| run.seed).collect();
        assert_eq!(seeds.len(), 6, "every run its own seed");
        // More runs per cell keep the seeds of the first ones.
        let more = plan(&Campaign {
            runs: 5,
            ..campaign
        });
        assert_eq!(more[0].seed, runs[0].seed);
        assert_eq!(more[5].seed, runs[5].seed);
        assert_eq!(more.len(), 10);
    }

    fn summary(injected: bool, detected: bool, verdicts: &[(&str, &str, u64)]) -> Value {
        json!({
            "injection": if injected {
                json!({"injected": true, "tsc": 1000,
                       "detection_latency": if detected { json!(50) } else { Value::Null }})
            } else {
                json!({"injected": false, "counted": 3})
            },
            "last_detection": if detected { json!({"tsc": 1050}) } else { Value::Null },
            "vms": verdicts.iter().map(|(guest, verdict, created)| json!({
                "guest": guest, "verdict": verdict, "created_tsc": created
            })).collect::<Vec<_>>(),
        })
    }

    #[test]
    fn classes_follow_the_success_definition() {
        let ok = [
            ("control", "passed", 0),
            ("netbench", "passed", 10),
            ("blkbench", "passed", 2000),
        ];
        let one_lost = [
            ("control", "passed", 0),
            ("netbench", "failed", 10),
            ("blkbench", "passed", 2000),
        ];
        let new_lost = [
            ("control", "passed", 0),
            ("netbench", "passed", 10),
            ("blkbench", "stopped", 2000),
        ];
        let class = |s: Value, allowed| classify(Some(&s), allowed).class;
        assert_eq!(classify(None, 1).class, Class::NoSummary);
        assert_eq!(class(summary(false, false, &ok), 1), Class::NotInjected);
        assert_eq!(class(summary(true, false, &ok), 1), Class::NonManifested);
        assert_eq!(class(summary(true, false, &one_lost), 1), Class::Sdc);
        assert_eq!(class(summary(true, true, &ok), 1), Class::Recovered);
        assert!(classify(Some(&summary(true, true, &ok)), 1).no_vm_failure);
        // 3AppVM allows one AppVM affected, but not the one created after the fault.
        assert_eq!(class(summary(true, true, &one_lost), 1), Class::Recovered);
        assert!(!classify(Some(&summary(true, true, &one_lost)), 1).no_vm_failure);
        assert_eq!(
            class(summary(true, true, &new_lost), 1),
            Class::DetectedFailed
        );
        // 1AppVM allows none.
        assert_eq!(
            class(summary(true, true, &one_lost), 0),
            Class::DetectedFailed
        );
        // The core failing ends the run, even with no VM reported affected; not noVMF either.
        let mut crashed = summary(true, true, &ok);
        crashed["failure"] = json!({"kind": "exception", "vector": 14});
        assert_eq!(class(crashed.clone(), 1), Class::DetectedFailed);
        assert!(!classify(Some(&crashed), 1).no_vm_failure);
        crashed["vms"] = json!([]);
        crashed["failure"] = Value::Null;
        assert_eq!(
            class(crashed, 1),
            Class::DetectedFailed,
            "no VM at all is no success"
        );
    }

    #[test]
    fn the_table_counts_and_rates() {
        let record = |class: &str, no_vmf: bool| {
            json!({"target": "memory", "fault": "register", "mode": "microreset",
                   "class": class, "no_vm_failure": no_vmf,
                   "vms_affected": u64::from(!no_vmf)})
        };
        let records = [
            record("recovered", true),
            record("recovered", false),
            record("detected-failed", false),
            record("non-manifested", false),
        ];
        let text = table(&records);
        assert!(
            text.contains("| memory | register | microreset | 4 | 0 | 1 | 0 | 2 | 1 | 0 | 66.7% ["),
            "{text}"
        );
        assert!(text.contains("| 33.3% |"), "{text}");
    }
}
