//! `cargo xtask test`: every check, one verdict.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use system_tests::{Boot, BootCase, Emulator, Observed, catalogue, check};

use crate::emulator::{self, BootSpec, EmulatorKind, Image, interrupted};
use crate::host::{self, KvmFacts, Tool};
use crate::house;
use crate::image;

/// Boot tests run at the same time (the CI machines have 2 cores).
const PARALLEL_BOOTS: usize = 2;
/// Serial lines shown for a failed boot.
const TAIL_LINES: usize = 30;
/// Output lines shown (per stream) for a failed cargo step.
const STEP_OUTPUT_LINES: usize = 150;

#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
    /// Steps with their wall time and verdict, for the final table.
    steps: Vec<(String, Duration, bool)>,
}

impl Tally {
    fn record(&mut self, name: &str, elapsed: Duration, ok: bool) {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
        self.steps.push((name.to_string(), elapsed, ok));
        println!("{} {name} ({:.1} s)", verdict(ok), elapsed.as_secs_f64());
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

fn tail(text: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// Runs one command as a step, showing its output only when it fails.
fn command_step(tally: &mut Tally, name: &str, mut cmd: Command) {
    println!("==> {name}");
    let start = Instant::now();
    let ok = match cmd.stdin(Stdio::null()).output() {
        Ok(output) => {
            if !output.status.success() {
                for (stream, bytes) in [("stdout", &output.stdout), ("stderr", &output.stderr)] {
                    let text = String::from_utf8_lossy(bytes);
                    let lines = tail(&text, STEP_OUTPUT_LINES);
                    if !lines.is_empty() {
                        println!("    --- {stream} (last {} lines) ---", lines.len());
                        for line in lines {
                            println!("    {line}");
                        }
                    }
                }
                println!("    {name}: {}", output.status);
            }
            output.status.success()
        }
        Err(e) => {
            println!("    cannot run {:?}: {e}", cmd.get_program());
            false
        }
    };
    tally.record(name, start.elapsed(), ok);
}

/// Runs a step implemented in xtask itself.
fn fn_step(tally: &mut Tally, name: &str, f: impl FnOnce() -> Result<(), String>) -> bool {
    println!("==> {name}");
    let start = Instant::now();
    let result = f();
    if let Err(e) = &result {
        for line in e.lines() {
            println!("    {line}");
        }
    }
    tally.record(name, start.elapsed(), result.is_ok());
    result.is_ok()
}

/// `cargo xtask test [--quick]`.
pub fn test(quick: bool) -> ExitCode {
    let total = Instant::now();
    let mut tally = Tally::default();
    type MakeCommand = fn() -> Command;
    let steps: [(&str, MakeCommand); 3] = [
        ("rustfmt --check", || {
            let mut c = image::cargo();
            c.args(["fmt", "--all", "--", "--check"]);
            c
        }),
        ("clippy (host, workspace)", || {
            let mut c = image::cargo();
            c.args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]);
            c
        }),
        ("clippy (kernel)", || {
            let mut c = image::kernel_cargo("clippy", false);
            c.args(["--", "-D", "warnings"]);
            c
        }),
    ];
    for (name, make) in steps {
        if !interrupted() {
            command_step(&mut tally, name, make());
        }
    }
    if !interrupted() {
        fn_step(
            &mut tally,
            "house rules (crate roots: //! tagline, forbid(unsafe_code); only the probe misbehaves)",
            || {
                let problems = house::check_workspace()?;
                if problems.is_empty() {
                    Ok(())
                } else {
                    Err(problems.join("\n"))
                }
            },
        );
    }
    if !interrupted() {
        let mut c = image::cargo();
        c.args(["test", "--workspace"]);
        command_step(&mut tally, "cargo test --workspace", c);
    }
    if !interrupted() {
        boot_tests(&mut tally, quick);
    }

    println!();
    println!("step times:");
    for (name, elapsed, ok) in &tally.steps {
        println!(
            "  {:>7.1} s  {}  {name}",
            elapsed.as_secs_f64(),
            verdict(*ok)
        );
    }
    println!("  {:>7.1} s  total", total.elapsed().as_secs_f64());
    if interrupted() {
        println!("interrupted: the remaining steps did not run");
        tally.failed += 1;
    }
    println!("{} passed, {} failed", tally.passed, tally.failed);
    if tally.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

struct CaseResult {
    reasons: Vec<String>,
    lines: Vec<String>,
    elapsed: Duration,
    run_dir: Option<PathBuf>,
}

fn boot_tests(tally: &mut Tally, quick: bool) {
    let cases: Vec<BootCase> = catalogue()
        .into_iter()
        .filter(|c| !(quick && c.emulator == Emulator::Bochs))
        .collect();
    let bochs = cases.iter().any(|c| c.emulator == Emulator::Bochs);
    let tools: &[Tool] = if bochs {
        &[Tool::Qemu, Tool::Iso, Tool::Bochs]
    } else {
        &[Tool::Qemu, Tool::Iso]
    };
    let packages = if bochs {
        "system packages (QEMU, GRUB, bochs)"
    } else {
        "system packages (QEMU, GRUB)"
    };
    let packages_ok = fn_step(tally, packages, || host::ensure_tools(tools));
    let mut elf = None;
    if packages_ok && !interrupted() {
        fn_step(tally, "kernel image (debug)", || {
            elf = Some(image::build_kernel(false, true)?);
            Ok(())
        });
    }
    let Some(elf) = elf else {
        for case in &cases {
            println!(
                "FAIL boot {} (not run: no kernel image or missing packages)",
                case.name
            );
            tally.failed += 1;
        }
        return;
    };
    let (kvm, why) = KvmFacts::probe().usable();
    println!(
        "==> boot tests: {} cases, {PARALLEL_BOOTS} at a time{}; QEMU uses {}",
        cases.len(),
        if quick {
            " (--quick: bochs cases skipped)"
        } else {
            ""
        },
        if kvm {
            format!("KVM ({why})")
        } else {
            format!("TCG ({why})")
        }
    );
    emulator::prune_run_dirs(40);
    let start = Instant::now();
    let next = AtomicUsize::new(0);
    let counts = Mutex::new((0usize, 0usize));
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL_BOOTS {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(case) = cases.get(i) else { break };
                    let result = if interrupted() {
                        CaseResult {
                            reasons: vec!["not run: interrupted".into()],
                            lines: Vec::new(),
                            elapsed: Duration::ZERO,
                            run_dir: None,
                        }
                    } else {
                        run_case(case, &elf, kvm)
                    };
                    let ok = result.reasons.is_empty();
                    print_case(case, &result);
                    let mut counts = counts.lock().expect("no worker panics holding the lock");
                    if ok { counts.0 += 1 } else { counts.1 += 1 }
                }
            });
        }
    });
    let (passed, failed) = counts.into_inner().expect("workers done");
    tally.passed += passed;
    tally.failed += failed;
    tally.steps.push((
        format!("boot tests ({passed} passed, {failed} failed)"),
        start.elapsed(),
        failed == 0,
    ));
    if bochs && !interrupted() {
        let mut records = Vec::new();
        let pipeline = fn_step(
            tally,
            "campaign pipeline (scripted faults, classes, determinism)",
            || {
                records = crate::campaign::pipeline_check()?;
                Ok(())
            },
        );
        if pipeline && !interrupted() {
            fn_step(
                tally,
                "campaign report (report.md, report.html rendered by headless Chromium)",
                || {
                    host::ensure_tools(&[Tool::Browser])?;
                    let dir = image::workspace_root().join("target/campaign-pipeline");
                    let _ = std::fs::remove_dir_all(&dir);
                    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                    let text: String = records.iter().map(|record| format!("{record}\n")).collect();
                    std::fs::write(dir.join("runs.jsonl"), text).map_err(|e| e.to_string())?;
                    crate::report::report(&dir)?;
                    crate::report::check_renders(&dir)
                },
            );
        }
        if pipeline && !interrupted() {
            fn_step(
                tally,
                "campaign on Slurm (a local one-node cluster, a 2-task job array)",
                || {
                    host::ensure_tools(&[Tool::Slurm])?;
                    crate::slurm::check_local()
                },
            );
        }
    }
}

fn print_case(case: &BootCase, result: &CaseResult) {
    let mut out = std::io::stdout().lock();
    let ok = result.reasons.is_empty();
    let _ = writeln!(
        out,
        "{} boot {} ({:.1} s)",
        verdict(ok),
        case.name,
        result.elapsed.as_secs_f64()
    );
    if ok {
        return;
    }
    for reason in &result.reasons {
        let _ = writeln!(out, "    - {reason}");
    }
    let lines = &result.lines[result.lines.len().saturating_sub(TAIL_LINES)..];
    if let Some(dir) = &result.run_dir {
        let (n, dir) = (lines.len(), dir.display());
        let _ = writeln!(out, "    last {n} serial lines (files in {dir}):");
    }
    for line in lines {
        let _ = writeln!(out, "    | {line}");
    }
    if let Some(dir) = &result.run_dir {
        for line in emulator::diagnostics(dir) {
            let _ = writeln!(out, "    {line}");
        }
    }
    let _ = out.flush();
}

fn run_case(case: &BootCase, elf: &Path, kvm: bool) -> CaseResult {
    let failed = |reason: String, run_dir: Option<PathBuf>| CaseResult {
        reasons: vec![reason],
        lines: Vec::new(),
        elapsed: Duration::ZERO,
        run_dir,
    };
    let run_dir = match emulator::new_run_dir(case.name) {
        Ok(dir) => dir,
        Err(e) => return failed(e, None),
    };
    let image = match case.boot {
        Boot::Direct => Image::Elf {
            path: elf.to_path_buf(),
            cmdline: case.cmdline.to_string(),
        },
        Boot::Iso => {
            let iso = run_dir.join("microvisor.iso");
            if let Err(e) = image::build_iso(elf, case.cmdline, &iso) {
                return failed(e, Some(run_dir));
            }
            Image::Iso(iso)
        }
    };
    let kind = match case.emulator {
        Emulator::Qemu => EmulatorKind::Qemu { kvm },
        Emulator::Bochs => EmulatorKind::Bochs,
    };
    let spec = BootSpec {
        kind,
        image,
        cpus: case.cpus,
        timeout: case.timeout,
        ips: emulator::bochs_ips(case.cmdline),
    };
    match emulator::boot(&spec, &run_dir, &mut |_, _| {}) {
        Ok(result) => {
            let reasons = check(
                case,
                &Observed {
                    lines: &result.lines,
                    end: result.end,
                },
            );
            let keep = !reasons.is_empty();
            if !keep {
                let _ = std::fs::remove_dir_all(&run_dir);
            }
            CaseResult {
                reasons,
                lines: result.lines,
                elapsed: result.elapsed,
                run_dir: keep.then_some(run_dir),
            }
        }
        Err(e) => failed(e, Some(run_dir)),
    }
}
