//! `cargo xtask bench`: boots the release image with a benchmark on its command line and
//! reports what the core measured.
//!
//! Under bochs the TSC counts executed instructions, so the figures are deterministic
//! instruction counts, independent of how loaded the host is. Real-time figures come only
//! from QEMU/KVM on hardware with VMX, which this command adds where the host has it.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use crate::emulator::{self, BootSpec, EmulatorKind, Image};
use crate::host::{self, KvmFacts, Tool};
use crate::image;

const BENCH_CMDLINE: &str = "bench=all";

/// Runs the benchmarks; exit 0 when every run reported its figures.
pub fn bench() -> ExitCode {
    match bench_inner() {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("xtask: bench failed: {reason}");
            ExitCode::FAILURE
        }
    }
}

fn bench_inner() -> Result<(), String> {
    host::ensure_tools(&[Tool::Bochs, Tool::Iso])?;
    let elf = image::build_kernel(true, false)?;
    let (reports, _) = boot_bench_with_rate(&elf, EmulatorKind::Bochs)?;
    println!("Release build, 1 CPU. bochs 2.7 (TSC = instructions executed, deterministic):");
    for report in &reports {
        println!(
            "  {}: median {} instructions (min {}, p90 {}, {} samples)",
            describe(report),
            report["median"],
            report["min"],
            report["p90"],
            report["samples"]
        );
    }
    let (kvm, why) = KvmFacts::probe().usable();
    if kvm {
        let (reports, tsc_khz) = boot_bench_with_rate(&elf, EmulatorKind::Qemu { kvm: true })?;
        println!("QEMU/KVM (real time, TSC {:.0} MHz):", tsc_khz / 1000.0);
        let nanoseconds = |ticks: &Value| ticks.as_f64().unwrap_or(0.0) * 1e6 / tsc_khz;
        for report in &reports {
            println!(
                "  {}: median {:.0} ns (min {:.0}, p90 {:.0})",
                describe(report),
                nanoseconds(&report["median"]),
                nanoseconds(&report["min"]),
                nanoseconds(&report["p90"])
            );
        }
    } else {
        println!("QEMU/KVM: not measured ({why}); real-time figures need hardware VMX");
    }
    Ok(())
}

/// What a benchmark measures, from its name in the summary.
fn describe(report: &Value) -> String {
    match report["name"].as_str().unwrap_or("?") {
        "ipc-call-reply-core-to-domain" => {
            "IPC call+reply, core -> domain -> core, 4-byte message".to_string()
        }
        "null-hypercall-served-in-core" => "null hypercall, VM exit served in the core".to_string(),
        "null-hypercall-served-by-domain" => {
            "null hypercall, VM exit as a message to the hypercall domain".to_string()
        }
        other => other.to_string(),
    }
}

/// Boots with the benchmarks; returns the summary's `bench` entries and the TSC rate in kHz.
fn boot_bench_with_rate(elf: &Path, kind: EmulatorKind) -> Result<(Vec<Value>, f64), String> {
    host::ensure_tools(&[match kind {
        EmulatorKind::Bochs => Tool::Bochs,
        EmulatorKind::Qemu { .. } => Tool::Qemu,
    }])?;
    let run_dir = emulator::new_run_dir("bench")?;
    let image = match kind {
        EmulatorKind::Bochs => {
            let iso = run_dir.join("microvisor.iso");
            image::build_iso(elf, BENCH_CMDLINE, &iso)?;
            Image::Iso(iso)
        }
        EmulatorKind::Qemu { .. } => Image::Elf {
            path: elf.to_path_buf(),
            cmdline: BENCH_CMDLINE.to_string(),
        },
    };
    let spec = BootSpec {
        kind,
        image,
        cpus: 1,
        timeout: Duration::from_secs(300),
        ips: emulator::bochs_ips(BENCH_CMDLINE),
    };
    let result = emulator::boot(&spec, &run_dir, &mut |_, _| {})?;
    let summary = result
        .summary
        .ok_or_else(|| format!("no summary line (run files in {})", run_dir.display()))?;
    if summary["outcome"] != "ok" {
        return Err(format!("the benchmark boot failed: {}", summary["failure"]));
    }
    let reports = summary["bench"].as_array().cloned().unwrap_or_default();
    if reports.is_empty() {
        return Err("the summary has no bench result".to_string());
    }
    let tsc_khz = summary["tsc_khz"].as_f64().unwrap_or(0.0);
    Ok((reports, tsc_khz))
}
