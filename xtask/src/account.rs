//! A short human-readable account of a run, printed by `cargo xtask run` before the summary
//! line: what ran, which domains failed and how they came back, and the workload's verdict.

use serde_json::Value;

/// The account's lines, from a parsed summary.
pub fn account(summary: &Value) -> Vec<String> {
    let mut lines = vec!["---- run summary ----".to_string()];
    let text = |value: &Value| value.as_str().unwrap_or("?").to_string();
    lines.push(format!(
        "outcome {}: {} of {} CPUs online, booted by {}, TSC {} kHz",
        text(&summary["outcome"]),
        summary["cpus_online"],
        summary["cpus_expected"],
        text(&summary["boot_protocol"]),
        summary["tsc_khz"]
    ));
    if let Some(domains) = summary["domains"]
        .as_array()
        .filter(|domains| !domains.is_empty())
    {
        let listed: Vec<String> = domains
            .iter()
            .map(|domain| {
                let failures = domain["failures"].as_u64().unwrap_or(0);
                match failures {
                    0 => text(&domain["name"]),
                    n => format!(
                        "{} ({n} failures, recovered to generation {})",
                        text(&domain["name"]),
                        domain["generation"]
                    ),
                }
            })
            .collect();
        lines.push(format!("domains: {}", listed.join(", ")));
    }
    if summary["last_detection"].is_object() {
        let detection = &summary["last_detection"];
        let what = match detection["vector"].as_u64() {
            Some(vector) => format!("exception {vector}"),
            None => text(&detection["kind"]),
        };
        lines.push(format!(
            "last failure: {} in {} on CPU {} at RIP {}, while serving {}",
            what,
            text(&detection["domain"]),
            detection["cpu"],
            text(&detection["rip"]),
            text(&detection["caller"])
        ));
    }
    if summary["last_recovery"].is_object() {
        let recovery = &summary["last_recovery"];
        let tsc = &recovery["tsc"];
        lines.push(format!(
            "last recovery: {} of {}, decided by {}; TSC: decide {}, discard threads {}, release locks {}, reload image {}, total {}{}; first request served after {}",
            text(&recovery["mode"]),
            text(&recovery["domain"]),
            text(&recovery["decided_by"]),
            tsc["decide_policy"],
            tsc["discard_threads"],
            tsc["release_locks"],
            tsc["reload_image"],
            tsc["total"],
            latency(&tsc["total"], &summary["tsc_khz"]),
            tsc["until_served"]
        ));
    }
    if summary["workload"].is_object() {
        let workload = &summary["workload"];
        lines.push(format!(
            "workload {}: {}, {} requests, {} retried, {} checks",
            text(&workload["name"]),
            text(&workload["verdict"]),
            workload["requests"],
            workload["retries"],
            workload["checks"]
        ));
    }
    if let Some(name) = summary["scenario"].as_str() {
        lines.push(format!("scenario {name}:"));
        for vm in summary["vms"].as_array().into_iter().flatten() {
            let mut line = format!(
                "  VM {} ({}, {} vCPU): {}, checksum {}, {} hypercalls ({} retried after a recovery), {} VM exits, {} RAM pages backed on first touch, ran {} TSC",
                vm["vm"],
                text(&vm["guest"]),
                vm["vcpus"],
                text(&vm["verdict"]),
                text(&vm["checksum"]),
                vm["hypercalls"],
                vm["retries"],
                vm["exits"],
                vm["demand_pages"],
                vm["run_tsc"]
            );
            if let Some(gap) = vm["longest_gap_us"].as_u64() {
                line.push_str(&format!(", longest gap without service {gap} us"));
            }
            if let Some(reason) = vm["stop_reason"].as_str().filter(|r| !r.is_empty()) {
                line.push_str(&format!(" (stopped: {reason})"));
            }
            lines.push(line);
        }
    }
    if summary["failure"].is_object() {
        lines.push(format!("failure: {}", summary["failure"]));
    }
    lines
}

/// The recovery's latency in milliseconds of the machine's clock (under bochs, emulated time:
/// the TSC counts instructions), or nothing without a TSC rate.
fn latency(total: &Value, tsc_khz: &Value) -> String {
    match (total.as_f64(), tsc_khz.as_f64()) {
        (Some(total), Some(khz)) if khz > 0.0 => {
            format!(" (= {:.3} ms at {khz:.0} kHz)", total / khz)
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_failed_domains_the_recovery_and_the_workload() {
        let summary = json!({
            "outcome": "ok", "cpus_online": 2, "cpus_expected": 2, "boot_protocol": "multiboot2", "tsc_khz": 4006,
            "domains": [{"name": "memory", "generation": 2, "failures": 1}, {"name": "timer", "generation": 1, "failures": 0}],
            "last_detection": {"domain": "memory", "cpu": 0, "kind": "exception", "vector": 14, "rip": "0x0", "caller": "hypercall"},
            "last_recovery": {"domain": "memory", "mode": "microreboot", "decided_by": "recovery-manager",
                              "tsc": {"decide_policy": 1, "discard_threads": 2, "release_locks": 3, "reload_image": 4, "total": 10}},
            "workload": {"name": "synthetic-hypercalls", "verdict": "ok", "requests": 32, "retries": 1, "checks": 36},
            "failure": null
        });
        let text = account(&summary).join("\n");
        assert!(
            text.contains("memory (1 failures, recovered to generation 2), timer"),
            "{text}"
        );
        assert!(
            text.contains("exception 14 in memory on CPU 0 at RIP 0x0, while serving hypercall"),
            "{text}"
        );
        assert!(
            text.contains("microreboot of memory, decided by recovery-manager"),
            "{text}"
        );
        assert!(text.contains("total 10 (= 0.002 ms at 4006 kHz)"), "{text}");
        assert!(
            text.contains("workload synthetic-hypercalls: ok, 32 requests, 1 retried"),
            "{text}"
        );
        assert!(
            !text.lines().any(|line| line.starts_with("failure:")),
            "{text}"
        );
    }

    #[test]
    fn a_bare_failed_summary_still_reads() {
        let text =
            account(&json!({"outcome": "failed", "failure": {"kind": "no-summary"}})).join("\n");
        assert!(text.contains("outcome failed"));
        assert!(text.contains("failure: {"));
    }
}
