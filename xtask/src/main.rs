//! Developer tooling: builds the kernel image and GRUB ISOs, boots them in QEMU or bochs,
//! and runs every check (`cargo xtask test`).
#![forbid(unsafe_code)]

mod account;
mod bench;
mod campaign;
mod emulator;
mod host;
mod house;
mod image;
mod manifest;
mod report;
mod slurm;
mod testing;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::Value;

use emulator::{BootSpec, EmulatorKind, Image};
use host::{KvmFacts, Tool};

/// Exit status of `run` when the kernel printed no summary (hang, triple fault, emulator or
/// build error).
const EXIT_NO_SUMMARY: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Build, boot and test the microvisor."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build the kernel image (docs/boot-contract.md) and print the ELF's path.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Build the kernel image and a BIOS GRUB ISO (target/iso/) that boots it.
    Iso {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
        /// Kernel command line (space-separated key=value words).
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Put this ELF into the ISO instead of building the kernel.
        #[arg(long, value_name = "ELF")]
        kernel: Option<PathBuf>,
    },
    /// Build and boot headless; stream the serial console; the summary JSON is the last line
    /// on stdout. Exit 0: outcome ok, 1: outcome failed, 2: no summary.
    Run(RunArgs),
    /// Boot the release image with the benchmarks and print what the core measured
    /// (instruction counts under bochs; real time under QEMU/KVM where the host has VMX).
    Bench,
    /// Run every check: rustfmt, clippy (host and kernel), house rules, cargo test, boot tests.
    Test {
        /// Skip the (slower) bochs boot tests.
        #[arg(long)]
        quick: bool,
    },
    /// Run a fault-injection campaign under bochs: RUNS runs per target x fault x mode, each
    /// a scenario boot with one fault, classified and appended to OUT/runs.jsonl (a rerun
    /// resumes); the rates with Wilson 95% intervals go to OUT/summary.md.
    Campaign(CampaignArgs),
    /// Write DIR/report.md and a self-contained DIR/report.html (SVG plots) from a campaign's
    /// DIR/runs.jsonl.
    Report {
        /// The campaign's directory (its --out).
        dir: PathBuf,
    },
    /// Boot one recorded campaign run again (same command line, CPUs and profile) and say
    /// whether it ended as recorded.
    Replay {
        /// The run's id (e.g. memory-register-microreset-3).
        id: String,
        /// The campaign's directory (its --out).
        #[arg(long)]
        out: PathBuf,
        /// Run bochs with its debugger on this terminal, stopping where the fault strikes.
        #[arg(long)]
        debug: bool,
    },
}

#[derive(clap::Args, Debug)]
struct CampaignArgs {
    /// The scenario every run boots.
    #[arg(long, default_value = "3appvm")]
    scenario: String,
    /// CPUs of the emulated machine.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=8))]
    cpus: u32,
    /// Targets: scheduler, memory, timer, hypercall, core (the baseline), a comma-separated
    /// list, or all.
    #[arg(long, default_value = "all")]
    target: String,
    /// Fault types: failstop, register, code, hang, a comma-separated list, or all.
    #[arg(long, default_value = "all")]
    fault: String,
    /// Recovery modes: microreset, microreboot, a comma-separated list, or all.
    #[arg(long, default_value = "microreset")]
    mode: String,
    /// Runs per target x fault x mode.
    #[arg(long, default_value_t = 10)]
    runs: u32,
    /// The campaign's seed (every run's seed derives from it).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Runs at once (each is one bochs process).
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Where the records go (created if missing; an existing one is continued).
    #[arg(long)]
    out: PathBuf,
    /// Boot the debug build instead of the release build.
    #[arg(long)]
    debug: bool,
    /// Wall-clock limit of one run, in seconds.
    #[arg(long, default_value_t = 150)]
    timeout: u64,
    /// Emulated (TSC) seconds a run's VMs get before the kernel ends the run as stuck (adds
    /// `budget=` to every run's command line).
    #[arg(long, default_value_t = campaign::DEFAULT_BUDGET_S, value_parser = clap::value_parser!(u64).range(1..=3600))]
    budget: u64,
    /// The repairs recoveries make: `all`, `none`, or names joined by commas (quiesce,
    /// release-locks, undo-log, recount, scheduler-queues, timer-reactivation, multicall-log,
    /// reinit-invalid); adds `repairs=` to every run's command line.
    #[arg(long, default_value = "all", value_parser = parse_repairs, conflicts_with = "repairs_sweep")]
    repairs: String,
    /// Run every cell under each repair set of the incremental study: none, then the repairs
    /// added one at a time, then all (NiLiHype's Table I). The report gets a sweep table.
    #[arg(long, conflicts_with = "until_ci")]
    repairs_sweep: bool,
    /// Keep adding rounds of --runs runs to every cell until its recovered-of-detected rate's
    /// Wilson 95% interval has at most this half-width (e.g. 0.02), up to --max-runs per cell.
    #[arg(long, value_parser = parse_half_width, conflicts_with = "slurm")]
    until_ci: Option<f64>,
    /// With --until-ci: the most runs of one cell.
    #[arg(long, default_value_t = 2000, requires = "until_ci")]
    max_runs: u32,
    /// Submit the campaign to Slurm as a job array of --jobs tasks (each runs its slice, one
    /// run at a time, into OUT/runs-task-K.jsonl) instead of running it here.
    #[arg(long)]
    slurm: bool,
    /// With --slurm: wait until the whole array has finished (sbatch --wait).
    #[arg(long, requires = "slurm")]
    slurm_wait: bool,
    /// Run only the slice of the plan of this array task (set by the Slurm job script).
    #[arg(long, requires = "tasks", hide = true)]
    task: Option<u32>,
    /// The array's size (set by the Slurm job script).
    #[arg(long, requires = "task", hide = true, value_parser = clap::value_parser!(u32).range(1..))]
    tasks: Option<u32>,
}

impl CampaignArgs {
    fn campaign(&self) -> Result<campaign::Campaign, String> {
        use campaign::{FAULTS, MODES, TARGETS, parse_list};
        Ok(campaign::Campaign {
            scenario: self.scenario.clone(),
            cpus: self.cpus,
            targets: parse_list(&self.target, &TARGETS, "target")?,
            faults: parse_list(&self.fault, &FAULTS, "fault")?,
            modes: parse_list(&self.mode, &MODES, "mode")?,
            runs: self.runs,
            seed: self.seed,
            jobs: self.jobs,
            out: self.out.clone(),
            release: !self.debug,
            timeout: Duration::from_secs(self.timeout),
            budget_s: self.budget,
            repairs: if self.repairs_sweep {
                campaign::sweep_sets()
            } else {
                vec![self.repairs.clone()]
            },
            slice: self.task.zip(self.tasks),
            until_ci: self.until_ci.map(|half_width| (half_width, self.max_runs)),
        })
    }

    /// The arguments every Slurm array task repeats (the slice and --jobs are its own).
    fn forwarded(&self) -> Result<Vec<String>, String> {
        let out = std::path::absolute(&self.out).map_err(|e| format!("--out: {e}"))?;
        let mut args: Vec<String> = [
            ("--scenario", self.scenario.clone()),
            ("--cpus", self.cpus.to_string()),
            ("--target", self.target.clone()),
            ("--fault", self.fault.clone()),
            ("--mode", self.mode.clone()),
            ("--runs", self.runs.to_string()),
            ("--seed", self.seed.to_string()),
            ("--timeout", self.timeout.to_string()),
            ("--budget", self.budget.to_string()),
            ("--out", out.display().to_string()),
        ]
        .into_iter()
        .flat_map(|(flag, value)| [flag.to_string(), value])
        .collect();
        if self.debug {
            args.push("--debug".into());
        }
        if self.repairs_sweep {
            args.push("--repairs-sweep".into());
        } else {
            args.extend(["--repairs".to_string(), self.repairs.clone()]);
        }
        Ok(args)
    }
}

/// A confidence-interval half-width: a fraction in (0, 0.5].
fn parse_half_width(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value > 0.0 && value <= 0.5 => Ok(value),
        _ => Err(format!(
            "{text:?} is not a half-width in (0, 0.5], e.g. 0.02"
        )),
    }
}

/// `cargo xtask campaign`: here, or submitted to Slurm.
fn campaign_command(args: &CampaignArgs) -> Result<(), String> {
    let campaign = args.campaign()?;
    if !args.slurm {
        return campaign::run(&campaign);
    }
    // Build once before the tasks start (each would otherwise race to build the same tree).
    image::build_kernel(campaign.release, false)?;
    let tasks = u32::try_from(args.jobs.max(1)).map_err(|_| "--jobs is too large".to_string())?;
    let answer = slurm::submit(
        &campaign.out,
        &args.forwarded()?,
        tasks,
        args.slurm_wait,
        None,
    )?;
    println!("{answer}");
    if args.slurm_wait {
        report::report(&campaign.out)?;
    } else {
        println!(
            "the array runs under Slurm; when `squeue` no longer lists it: cargo xtask report {}",
            campaign.out.display()
        );
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Emulator; `auto` takes QEMU with KVM where the host has usable nested VMX, else bochs.
    #[arg(long, value_enum, default_value_t = EmulatorArg::Auto)]
    emulator: EmulatorArg,
    /// Number of CPUs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    cpus: u32,
    /// Build with the release profile (a plain `cargo xtask run`, the main job, always does).
    #[arg(long)]
    release: bool,
    /// Kernel command line (space-separated key=value words, e.g. `fault=gp@1`).
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Stop the emulator after this many seconds without a summary.
    #[arg(long, value_name = "SECS", default_value_t = 120,
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    /// How QEMU loads the image: `direct` (-kernel, PVH) or `iso` (GRUB, multiboot2). bochs
    /// always boots the ISO.
    #[arg(long, value_enum)]
    boot: Option<BootArg>,
    /// Boot this ELF instead of building the kernel.
    #[arg(long, value_name = "ELF")]
    kernel: Option<PathBuf>,
    /// Inject a fault into a domain: `failstop:DOMAIN` sets RIP to 0 inside DOMAIN while it
    /// serves a request (adds `inject=...` to the kernel command line).
    #[arg(long, value_name = "failstop:DOMAIN", value_parser = parse_inject)]
    inject: Option<String>,
    /// How the core recovers a failed domain (adds `recovery=...` to the command line).
    #[arg(long, value_enum)]
    recovery: Option<RecoveryArg>,
    /// Boot guest VMs: a named scenario (adds `scenario=...`; see docs/guests.md), or `none`.
    /// Needs VMX (bochs here). Without this, `--cmdline` and `--inject`, the run is the
    /// system's main job: `3appvm` with a fail-stop injected into the hypercall domain and
    /// recovered by microreset.
    #[arg(long, value_name = "NAME", value_parser = parse_scenario)]
    scenario: Option<String>,
}

/// The scenario of a plain `cargo xtask run`.
const DEFAULT_SCENARIO: &str = "3appvm";
/// The fault a plain `cargo xtask run` injects into it.
const DEFAULT_INJECT: &str = "failstop:hypercall";

/// Accepts the name of a scenario the core knows.
fn parse_scenario(value: &str) -> Result<String, String> {
    if value == "none" {
        return Ok(value.to_string());
    }
    match microvisor::scenario::find(value) {
        Some(scenario) => Ok(scenario.name.to_string()),
        None => Err(format!(
            "{value:?} is not a scenario; known: {}",
            microvisor::scenario::SCENARIOS
                .iter()
                .map(|scenario| scenario.name)
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum RecoveryArg {
    /// The default policy: microreset, then microreboot if the same domain fails again within
    /// a second, then declared failed.
    Escalate,
    /// Abandon the domain's threads, release its locks, keep its memory.
    Microreset,
    /// As microreset, and reload its code and data from the pristine image.
    Microreboot,
}

/// Accepts a repair set: `all`, `none`, or known repair names joined by commas.
fn parse_repairs(value: &str) -> Result<String, String> {
    match microvisor::cmdline::parse_repairs(value) {
        Some(_) => Ok(value.to_string()),
        None => Err(format!(
            "{value:?}: expected all, none, or names among {}",
            microvisor_abi::repair::NAMES
                .iter()
                .map(|(name, _)| *name)
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Accepts `failstop:DOMAIN` with a plain domain name.
fn parse_inject(value: &str) -> Result<String, String> {
    match value.split_once(':') {
        Some(("failstop", domain))
            if !domain.is_empty()
                && domain
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-') =>
        {
            Ok(value.to_string())
        }
        _ => Err(format!(
            "{value:?} is not a fault to inject: use failstop:DOMAIN, e.g. failstop:probe"
        )),
    }
}

impl RunArgs {
    /// The kernel command line: `--cmdline` plus what `--inject` and `--recovery` add.
    /// A plain `cargo xtask run`: no scenario, fault or command line chosen.
    fn is_main_job(&self) -> bool {
        self.scenario.is_none() && self.inject.is_none() && self.cmdline.trim().is_empty()
    }

    /// The main job boots the release build: its pings every millisecond need the optimised
    /// hypercall path (in a debug build a healthy run already drops pings to a full ring).
    fn release(&self) -> bool {
        self.release || self.is_main_job()
    }

    fn kernel_cmdline(&self) -> String {
        let mut words: Vec<String> = self
            .cmdline
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if self.is_main_job() {
            words.push(format!("scenario={DEFAULT_SCENARIO}"));
            words.push(format!("inject={DEFAULT_INJECT}"));
        }
        if let Some(inject) = &self.inject {
            words.push(format!("inject={inject}"));
        }
        if let Some(scenario) = self.scenario.as_ref().filter(|name| *name != "none") {
            words.push(format!("scenario={scenario}"));
        }
        match self.recovery {
            Some(RecoveryArg::Escalate) => words.push("recovery=escalate".to_string()),
            Some(RecoveryArg::Microreset) => words.push("recovery=microreset".to_string()),
            Some(RecoveryArg::Microreboot) => words.push("recovery=microreboot".to_string()),
            None => {}
        }
        words.join(" ")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum EmulatorArg {
    Auto,
    Qemu,
    Bochs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BootArg {
    Direct,
    Iso,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    emulator::install_interrupt_handler();
    match cli.command {
        Command::Build { release } => report(image::build_kernel(release, false)),
        Command::Iso {
            release,
            cmdline,
            kernel,
        } => report(iso(release, &cmdline, kernel)),
        Command::Run(args) => run(&args),
        Command::Bench => bench::bench(),
        Command::Test { quick } => testing::test(quick),
        Command::Report { dir } => match report::report(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(reason) => {
                eprintln!("xtask: error: {reason}");
                ExitCode::FAILURE
            }
        },
        Command::Replay { id, out, debug } => match campaign::replay(&id, &out, debug) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(reason) => {
                eprintln!("xtask: error: {reason}");
                ExitCode::from(EXIT_NO_SUMMARY)
            }
        },
        Command::Campaign(args) => match campaign_command(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(reason) => {
                eprintln!("xtask: error: {reason}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Prints the path on success, the error on failure.
fn report(result: Result<PathBuf, String>) -> ExitCode {
    match result {
        Ok(path) => {
            println!("{}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn iso(release: bool, cmdline: &str, kernel: Option<PathBuf>) -> Result<PathBuf, String> {
    image::validate_cmdline(cmdline)?;
    host::ensure_tools(&[Tool::Iso])?;
    let elf = match kernel {
        Some(elf) => elf,
        None => image::build_kernel(release, false)?,
    };
    let dir = image::workspace_root().join("target/iso");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let profile = if release { "release" } else { "debug" };
    let iso = dir.join(format!("microvisor-{profile}.iso"));
    let start = std::time::Instant::now();
    image::build_iso(&elf, cmdline, &iso)?;
    eprintln!(
        "xtask: ISO built in {:.2} s (kernel command line {cmdline:?})",
        start.elapsed().as_secs_f64()
    );
    Ok(iso)
}

/// Picks the emulator for `run`, explaining the choice on stderr.
fn choose_emulator(arg: EmulatorArg) -> EmulatorKind {
    let (kvm, why) = KvmFacts::probe().usable();
    match arg {
        EmulatorArg::Auto if kvm => {
            eprintln!("xtask: emulator: QEMU with KVM (auto: {why})");
            EmulatorKind::Qemu { kvm: true }
        }
        EmulatorArg::Auto => {
            eprintln!("xtask: emulator: bochs (auto: no usable KVM with nested VMX: {why})");
            EmulatorKind::Bochs
        }
        EmulatorArg::Qemu if kvm => {
            eprintln!("xtask: emulator: QEMU with KVM ({why})");
            EmulatorKind::Qemu { kvm: true }
        }
        EmulatorArg::Qemu => {
            eprintln!(
                "xtask: emulator: QEMU with TCG, `-cpu max` (no usable KVM: {why}; no VMX in the guest)"
            );
            EmulatorKind::Qemu { kvm: false }
        }
        EmulatorArg::Bochs => {
            eprintln!("xtask: emulator: bochs");
            EmulatorKind::Bochs
        }
    }
}

/// Prints `run`'s last stdout line; a closed stdout (`| head`) is not an error here.
fn print_last_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The summary line `run` prints when the kernel printed none.
fn no_summary_line(reason: &str) -> String {
    // Written by hand to keep "event" first (serde_json's map sorts keys).
    format!(
        r#"{{"event":"summary","outcome":"failed","failure":{{"kind":"no-summary","reason":{}}}}}"#,
        Value::from(reason)
    )
}

fn run(args: &RunArgs) -> ExitCode {
    match run_inner(args) {
        Ok(code) => code,
        Err(reason) => {
            eprintln!("xtask: error: {reason}");
            print_last_line(&no_summary_line(&reason));
            ExitCode::from(EXIT_NO_SUMMARY)
        }
    }
}

fn run_inner(args: &RunArgs) -> Result<ExitCode, String> {
    let cmdline = args.kernel_cmdline();
    image::validate_cmdline(&cmdline)?;
    let kind = choose_emulator(args.emulator);
    let iso = match (kind, args.boot) {
        (EmulatorKind::Bochs, Some(BootArg::Direct)) => {
            return Err(
                "bochs boots only the GRUB ISO: drop `--boot direct` or use `--emulator qemu`"
                    .into(),
            );
        }
        (EmulatorKind::Bochs, _) | (_, Some(BootArg::Iso)) => true,
        (EmulatorKind::Qemu { .. }, _) => false,
    };
    let mut tools = Vec::new();
    if let EmulatorKind::Qemu { .. } = kind {
        tools.push(Tool::Qemu);
    } else {
        tools.push(Tool::Bochs);
    }
    if iso {
        tools.push(Tool::Iso);
    }
    host::ensure_tools(&tools)?;
    let elf = match &args.kernel {
        Some(elf) => elf.clone(),
        None => image::build_kernel(args.release(), false)?,
    };
    emulator::prune_run_dirs(30);
    let run_dir = emulator::new_run_dir("run")?;
    let image = if iso {
        let iso = run_dir.join("microvisor.iso");
        image::build_iso(&elf, &cmdline, &iso)?;
        Image::Iso(iso)
    } else {
        Image::Elf {
            path: elf.clone(),
            cmdline: cmdline.clone(),
        }
    };
    let spec = BootSpec {
        kind,
        image,
        cpus: args.cpus,
        timeout: Duration::from_secs(args.timeout),
        ips: emulator::bochs_ips(&cmdline),
    };
    eprintln!(
        "xtask: booting {} with {} CPU(s), {} boot, command line {:?}, timeout {} s; files in {}",
        elf.display(),
        args.cpus,
        if iso {
            "GRUB ISO (multiboot2)"
        } else {
            "direct (PVH)"
        },
        cmdline,
        args.timeout,
        run_dir.display()
    );
    let mut summary_line = None;
    let result = emulator::boot(&spec, &run_dir, &mut |line, is_summary| {
        if is_summary {
            summary_line = Some(line.to_string());
        } else {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    })?;
    let secs = result.elapsed.as_secs_f64();
    let outcome = result
        .summary
        .as_ref()
        .and_then(|s| s.get("outcome"))
        .and_then(Value::as_str);
    let end = match result.end {
        system_tests::EmulatorEnd::Exited(Some(code)) => {
            format!("the emulator exited with status {code}")
        }
        system_tests::EmulatorEnd::Exited(None) => "the emulator was killed by a signal".into(),
        system_tests::EmulatorEnd::KilledAfterSummary => {
            "the emulator did not exit by itself after the summary; stopped it".into()
        }
        system_tests::EmulatorEnd::SignalledAfterBreakpoint(signal) => format!(
            "bochs stopped at the final breakpoint, then died by signal {signal} in its own exit"
        ),
        system_tests::EmulatorEnd::TimedOut => {
            format!("timeout after {} s; stopped the emulator", args.timeout)
        }
        system_tests::EmulatorEnd::Interrupted => "interrupted; stopped the emulator".into(),
    };
    eprintln!("xtask: {end} ({secs:.1} s)");
    if let Some(summary) = &result.summary {
        let mut out = std::io::stdout().lock();
        for line in account::account(summary) {
            let _ = writeln!(out, "{line}");
        }
    }
    match (summary_line, outcome) {
        (Some(line), Some("ok")) => {
            print_last_line(&line);
            Ok(ExitCode::SUCCESS)
        }
        (Some(line), _) => {
            print_last_line(&line);
            Ok(ExitCode::FAILURE)
        }
        (None, _) => {
            let reason = match result.end {
                system_tests::EmulatorEnd::TimedOut => format!("timeout after {} s", args.timeout),
                system_tests::EmulatorEnd::Interrupted => "interrupted".to_string(),
                system_tests::EmulatorEnd::Exited(Some(code)) => {
                    format!("emulator exited with status {code} before a summary")
                }
                _ => "emulator ended without a summary".to_string(),
            };
            eprintln!(
                "xtask: no summary line; serial log and emulator output in {}",
                run_dir.display()
            );
            for line in emulator::diagnostics(&run_dir) {
                eprintln!("xtask:   {line}");
            }
            print_last_line(&no_summary_line(&reason));
            Ok(ExitCode::from(EXIT_NO_SUMMARY))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults_and_errors() {
        let cli = Cli::try_parse_from(["xtask", "run"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!()
        };
        assert_eq!(
            (args.emulator, args.cpus, args.timeout, args.boot),
            (EmulatorArg::Auto, 2, 120, None)
        );
        assert!(Cli::try_parse_from(["xtask", "run", "--emulator", "vbox"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "run", "--cpus", "0"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "bench"]).is_ok());
        assert!(Cli::try_parse_from(["xtask", "bench", "--frobnicate"]).is_err());
    }

    #[test]
    fn the_fallback_summary_is_one_json_line() {
        let line = no_summary_line("timeout after \"120\" s");
        assert!(!line.contains('\n'));
        let parsed = system_tests::parse_summary_line(&line).unwrap();
        assert_eq!(parsed["failure"]["kind"], "no-summary");
        assert_eq!(parsed["outcome"], "failed");
        assert_eq!(parsed["failure"]["reason"], "timeout after \"120\" s");
        assert!(line.starts_with(r#"{"event":"summary","outcome":"failed","#));
    }

    #[test]
    fn inject_and_recovery_flags_join_the_command_line() {
        let cli = Cli::try_parse_from([
            "xtask",
            "run",
            "--cmdline",
            "fault=ud",
            "--inject",
            "failstop:memory",
            "--recovery",
            "microreboot",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(
            args.kernel_cmdline(),
            "fault=ud inject=failstop:memory recovery=microreboot"
        );
        for bad in ["failstop:", "flip:memory", "failstop:a b", "memory"] {
            assert!(
                Cli::try_parse_from(["xtask", "run", "--inject", bad]).is_err(),
                "{bad}"
            );
        }
        assert!(Cli::try_parse_from(["xtask", "run", "--recovery", "reboot"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "run", "--scenario", "9vm-nothing"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "run", "--scenario", "5vm-unixbench"]).is_ok());
    }

    #[test]
    fn a_plain_run_is_the_main_job_and_none_boots_without_guests() {
        let cmdline = |argv: &[&str]| {
            let Command::Run(args) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("not run")
            };
            args.kernel_cmdline()
        };
        assert_eq!(
            cmdline(&["xtask", "run"]),
            "scenario=3appvm inject=failstop:hypercall"
        );
        assert_eq!(cmdline(&["xtask", "run", "--scenario", "none"]), "");
        let Command::Run(plain) = Cli::try_parse_from(["xtask", "run"]).unwrap().command else {
            panic!("not run")
        };
        assert!(plain.release(), "the main job boots the release build");
        let Command::Run(chosen) = Cli::try_parse_from(["xtask", "run", "--scenario", "3appvm"])
            .unwrap()
            .command
        else {
            panic!("not run")
        };
        assert!(!chosen.release());
        assert_eq!(
            cmdline(&["xtask", "run", "--scenario", "3appvm"]),
            "scenario=3appvm"
        );
        assert_eq!(
            cmdline(&["xtask", "run", "--recovery", "microreboot"]),
            "scenario=3appvm inject=failstop:hypercall recovery=microreboot"
        );
    }
}
