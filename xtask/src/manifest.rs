//! Reading `system.toml`, the static system manifest, and turning it into the
//! `microvisor_abi::manifest::Manifest` the core enforces (checked here at build time with
//! the same rules the core applies at boot).

use std::fs;
use std::path::Path;

use microvisor_abi::manifest::{DomainSpec, MAX_NAME, Manifest};
use serde::Deserialize;

/// `system.toml` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    domain: Vec<DomainEntry>,
}

/// One `[[domain]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainEntry {
    /// Name the core knows it by (`NAME.elf` in the bundle).
    pub name: String,
    /// Cargo package (and binary) that builds its image with the `domain` feature.
    pub package: String,
    /// Domain index.
    pub index: u16,
    /// Pages of its state region.
    pub state_pages: u16,
    /// Names of the domains it may call.
    pub may_call: Vec<String>,
}

/// The manifest: the build-side entries (with packages) and the encoded form for the core.
pub struct SystemManifest {
    /// Domains in load order.
    pub domains: Vec<DomainEntry>,
    /// What goes into the bundle as `manifest.bin`.
    pub encoded: Vec<u8>,
}

/// Reads, checks and encodes the manifest at `path`.
pub fn load(path: &Path) -> Result<SystemManifest, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses, checks and encodes manifest text.
pub fn parse(text: &str) -> Result<SystemManifest, String> {
    let file: ManifestFile = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut manifest = Manifest::default();
    for entry in &file.domain {
        let mut may_call = 0u32;
        for callee in &entry.may_call {
            let target = file
                .domain
                .iter()
                .find(|other| &other.name == callee)
                .ok_or_else(|| {
                    format!(
                        "domain {:?} may call {callee:?}, which the manifest does not list",
                        entry.name
                    )
                })?;
            may_call |= 1u32.checked_shl(u32::from(target.index)).unwrap_or(0);
        }
        let name = heapless::String::try_from(entry.name.as_str()).map_err(|_| {
            format!(
                "domain name {:?} is longer than {MAX_NAME} bytes",
                entry.name
            )
        })?;
        let spec = DomainSpec {
            name,
            index: entry.index,
            state_pages: entry.state_pages,
            may_call,
        };
        manifest.domains.push(spec).map_err(|_| {
            format!(
                "more than {} domains",
                microvisor_abi::manifest::MAX_DOMAINS
            )
        })?;
    }
    manifest.validate().map_err(|e| {
        format!(
            "{e} ({:?})",
            file.domain.get(position_of(&e)).map(|d| &d.name)
        )
    })?;
    let mut buffer = [0u8; 1024];
    let encoded = manifest
        .encode(&mut buffer)
        .map_err(|e| e.to_string())?
        .to_vec();
    Ok(SystemManifest {
        domains: file.domain,
        encoded,
    })
}

fn position_of(error: &microvisor_abi::manifest::ManifestError) -> usize {
    use microvisor_abi::manifest::ManifestError as E;
    match *error {
        E::BadIndex { position }
        | E::Duplicate { position }
        | E::EmptyName { position }
        | E::BadBudget { position }
        | E::BadCallee { position } => position,
        E::Malformed => usize::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_manifest_is_valid_and_decodes() {
        let manifest = load(&crate::image::workspace_root().join("system.toml")).unwrap();
        let decoded = Manifest::decode(&manifest.encoded).unwrap();
        assert_eq!(
            decoded.find("hypercall").map(|d| d.may_call),
            Some((1 << 2) | (1 << 3) | (1 << 4))
        );
        assert!(
            manifest
                .domains
                .iter()
                .any(|d| d.name == "probe" && d.package == "probe-domain")
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let one = |extra: &str| {
            format!(
                "[[domain]]\nname = \"a\"\npackage = \"a\"\nindex = 1\nstate_pages = 1\nmay_call = []\n{extra}"
            )
        };
        assert!(parse(&one("")).is_ok());
        let missing = parse(&one("[[domain]]\nname = \"b\"\npackage = \"b\"\nindex = 2\nstate_pages = 1\nmay_call = [\"c\"]\n")).err().unwrap();
        assert!(missing.contains("\"c\""), "{missing}");
        let duplicate = parse(&one("[[domain]]\nname = \"b\"\npackage = \"b\"\nindex = 1\nstate_pages = 1\nmay_call = []\n")).err().unwrap();
        assert!(duplicate.contains("twice"), "{duplicate}");
        let budget = parse(&one("").replace("state_pages = 1", "state_pages = 99"))
            .err()
            .unwrap();
        assert!(budget.contains("state_pages"), "{budget}");
        let typo = parse(&one("").replace("may_call", "may_cal"))
            .err()
            .unwrap();
        assert!(typo.contains("may_cal"), "{typo}");
    }
}
