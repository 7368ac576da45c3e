//! House rules every crate root outside the kernel must follow.

use serde_json::Value;
use std::path::PathBuf;

/// The core family: the only packages allowed `unsafe` (their crate roots are exempt). The
/// core itself, the runtime its domains link, the runtime guest kernels link (VMCALL, entry,
/// guest-physical memory access), and the memory functions they all need.
const CORE_FAMILY: &[&str] = &[
    "microvisor",
    "microvisor-runtime",
    "microvisor-guest-runtime",
    "microvisor-freestanding",
];

/// The only package allowed the runtime's `misbehave` feature (a safe wrapper around raw
/// writes and jumps: unsound by design, for the isolation checks).
const MISBEHAVING: &str = "probe-domain";

/// Packages other than [`MISBEHAVING`] that enable `microvisor-runtime`'s `misbehave` feature,
/// through one of their features or a dependency's feature list.
pub fn misbehave_problems(metadata: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    for package in metadata["packages"].as_array().into_iter().flatten() {
        let name = package["name"].as_str().unwrap_or("?");
        if name == MISBEHAVING {
            continue;
        }
        let in_features = package["features"]
            .as_object()
            .into_iter()
            .flat_map(|features| features.values())
            .flat_map(|values| values.as_array().into_iter().flatten())
            .any(|value| value == "microvisor-runtime/misbehave");
        let in_dependencies = package["dependencies"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|dependency| dependency["name"] == "microvisor-runtime")
            .flat_map(|dependency| dependency["features"].as_array().into_iter().flatten())
            .any(|feature| feature == "misbehave");
        if in_features || in_dependencies {
            problems.push(format!(
                "{name}: enables microvisor-runtime's `misbehave` feature, which only \
                 {MISBEHAVING} may"
            ));
        }
    }
    problems
}

/// Target kinds whose `src_path` is a crate root (tests, benches, examples and build
/// scripts are not checked).
const ROOT_KINDS: &[&str] = &[
    "lib",
    "rlib",
    "dylib",
    "cdylib",
    "staticlib",
    "proc-macro",
    "bin",
];

/// Problems with one crate root's text: it must start with a `//!` line and contain
/// `#![forbid(unsafe_code)]` on a line of its own.
pub fn root_file_problems(text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if !text.lines().next().is_some_and(|l| l.starts_with("//!")) {
        problems.push("does not start with a `//!` tagline".to_string());
    }
    if !text.lines().any(|l| l.trim() == "#![forbid(unsafe_code)]") {
        problems.push("lacks `#![forbid(unsafe_code)]`".to_string());
    }
    problems
}

/// The crate roots to check, from `cargo metadata --no-deps --format-version 1` output.
pub fn crate_roots(metadata: &Value) -> Vec<(String, PathBuf)> {
    let mut roots = Vec::new();
    for package in metadata["packages"].as_array().into_iter().flatten() {
        let name = package["name"].as_str().unwrap_or_default();
        if CORE_FAMILY.contains(&name) {
            continue;
        }
        for target in package["targets"].as_array().into_iter().flatten() {
            let is_root = target["kind"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|k| k.as_str().is_some_and(|k| ROOT_KINDS.contains(&k)));
            if let (true, Some(path)) = (is_root, target["src_path"].as_str()) {
                roots.push((
                    format!("{name} ({})", target["name"].as_str().unwrap_or("?")),
                    path.into(),
                ));
            }
        }
    }
    roots
}

/// Checks every workspace crate root; returns one line per problem (empty = all good).
pub fn check_workspace() -> Result<Vec<String>, String> {
    let output = crate::image::cargo()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo metadata: {e}"))?;
    if !output.status.success() {
        return Err(format!("cargo metadata failed ({})", output.status));
    }
    let metadata: Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("cargo metadata printed invalid JSON: {e}"))?;
    let roots = crate_roots(&metadata);
    if roots.is_empty() {
        return Err("cargo metadata listed no crate roots".into());
    }
    let mut problems = misbehave_problems(&metadata);
    for (name, path) in roots {
        match std::fs::read_to_string(&path) {
            Ok(text) => problems.extend(
                root_file_problems(&text)
                    .into_iter()
                    .map(|p| format!("{name}: {} {p}", path.display())),
            ),
            Err(e) => problems.push(format!("{name}: {}: {e}", path.display())),
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_the_probe_may_misbehave() {
        let metadata = json!({"packages": [
            {"name": "probe-domain", "dependencies": [],
             "features": {"domain": ["dep:microvisor-runtime", "microvisor-runtime/misbehave"]}},
            {"name": "memory", "dependencies": [], "features": {"domain": ["dep:microvisor-runtime"]}},
            {"name": "sneaky", "dependencies": [], "features": {"x": ["microvisor-runtime/misbehave"]}},
            {"name": "direct", "features": {},
             "dependencies": [{"name": "microvisor-runtime", "features": ["misbehave"]}]}
        ]});
        let problems = misbehave_problems(&metadata);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("sneaky:") && problems[1].starts_with("direct:"));
    }

    #[test]
    fn a_good_root_passes() {
        let text = "//! Does things.\n//! More.\n#![no_std]\n#![forbid(unsafe_code)]\n";
        assert!(root_file_problems(text).is_empty());
    }

    #[test]
    fn bad_roots_are_reported() {
        assert_eq!(
            root_file_problems(""),
            [
                "does not start with a `//!` tagline",
                "lacks `#![forbid(unsafe_code)]`"
            ]
        );
        let late_doc = "#![forbid(unsafe_code)]\n//! Tagline.\n";
        assert_eq!(
            root_file_problems(late_doc),
            ["does not start with a `//!` tagline"]
        );
        let commented = "//! Tagline.\n// #![forbid(unsafe_code)]\n";
        assert_eq!(
            root_file_problems(commented),
            ["lacks `#![forbid(unsafe_code)]`"]
        );
        let weaker = "//! Tagline.\n#![deny(unsafe_code)]\n";
        assert_eq!(
            root_file_problems(weaker),
            ["lacks `#![forbid(unsafe_code)]`"]
        );
    }

    #[test]
    fn roots_come_from_lib_and_bin_targets_except_the_kernel() {
        let metadata = json!({"packages": [
            {"name": "microvisor", "targets": [
                {"name": "microvisor", "kind": ["lib"], "src_path": "/w/microvisor/src/lib.rs"}]},
            {"name": "ipc", "targets": [
                {"name": "ipc", "kind": ["lib"], "src_path": "/w/ipc/src/lib.rs"},
                {"name": "golden", "kind": ["test"], "src_path": "/w/ipc/tests/golden.rs"},
                {"name": "build-script-build", "kind": ["custom-build"], "src_path": "/w/ipc/build.rs"}]},
            {"name": "xtask", "targets": [
                {"name": "xtask", "kind": ["bin"], "src_path": "/w/xtask/src/main.rs"}]}
        ]});
        let roots: Vec<_> = crate_roots(&metadata).into_iter().map(|(_, p)| p).collect();
        assert_eq!(
            roots,
            [
                PathBuf::from("/w/ipc/src/lib.rs"),
                PathBuf::from("/w/xtask/src/main.rs")
            ]
        );
    }
}
