//! Host facts and system packages: which emulators and tools exist, KVM usability, and
//! installing what is missing.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Something a Debian package provides, and how to see that it is there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// An executable on `PATH`.
    Command(&'static str),
    /// Any of these files or directories exists.
    AnyPath(&'static [&'static str]),
}

/// A Debian package the emulator and ISO steps need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Requirement {
    /// Debian 12 package name.
    pub package: &'static str,
    /// How to tell it is installed.
    pub probe: Probe,
    /// Which tool groups need it.
    pub needed_for: &'static [Tool],
}

/// Groups of host tools a command may need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    /// QEMU.
    Qemu,
    /// Building GRUB ISOs.
    Iso,
    /// bochs.
    Bochs,
    /// A headless browser, to check that campaign reports render.
    Browser,
    /// Slurm and munge, for campaigns as job arrays (and the local test cluster).
    Slurm,
}

/// Every system package xtask may use, with paths checked with `dpkg -L` on Debian 12.
pub const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        package: "qemu-system-x86",
        probe: Probe::Command("qemu-system-x86_64"),
        needed_for: &[Tool::Qemu],
    },
    Requirement {
        package: "bochs",
        probe: Probe::Command("bochs"),
        needed_for: &[Tool::Bochs],
    },
    Requirement {
        package: "bochs-term",
        probe: Probe::AnyPath(&[
            "/usr/lib/x86_64-linux-gnu/bochs/plugins/libbx_term_gui.so",
            "/usr/lib/bochs/plugins/libbx_term_gui.so",
        ]),
        needed_for: &[Tool::Bochs],
    },
    Requirement {
        package: "bochsbios",
        probe: Probe::AnyPath(&[BOCHS_BIOS]),
        needed_for: &[Tool::Bochs],
    },
    Requirement {
        package: "vgabios",
        probe: Probe::AnyPath(&[VGA_BIOS]),
        needed_for: &[Tool::Bochs],
    },
    Requirement {
        package: "grub-common",
        probe: Probe::Command("grub-mkrescue"),
        needed_for: &[Tool::Iso],
    },
    Requirement {
        package: "grub-pc-bin",
        probe: Probe::AnyPath(&["/usr/lib/grub/i386-pc/multiboot2.mod"]),
        needed_for: &[Tool::Iso],
    },
    Requirement {
        package: "xorriso",
        probe: Probe::Command("xorriso"),
        needed_for: &[Tool::Iso],
    },
    Requirement {
        package: "mtools",
        probe: Probe::Command("mformat"),
        needed_for: &[Tool::Iso],
    },
    Requirement {
        package: "binutils",
        probe: Probe::Command("objcopy"),
        needed_for: &[Tool::Iso],
    },
    Requirement {
        package: "chromium",
        probe: Probe::Command("chromium"),
        needed_for: &[Tool::Browser],
    },
    Requirement {
        package: "munge",
        probe: Probe::Command("munged"),
        needed_for: &[Tool::Slurm],
    },
    Requirement {
        package: "slurm-wlm",
        probe: Probe::Command("slurmctld"),
        needed_for: &[Tool::Slurm],
    },
];

/// bochs' BIOS image (package bochsbios).
pub const BOCHS_BIOS: &str = "/usr/share/bochs/BIOS-bochs-latest";
/// bochs' VGA BIOS image (package vgabios).
pub const VGA_BIOS: &str = "/usr/share/vgabios/vgabios.bin";
/// GRUB's BIOS platform files (package grub-pc-bin).
pub const GRUB_I386_PC: &str = "/usr/lib/grub/i386-pc";

/// The packages needed for `tools` that `is_present` says are missing, in a stable order.
pub fn missing_packages(tools: &[Tool], is_present: impl Fn(&Probe) -> bool) -> Vec<&'static str> {
    let mut missing = Vec::new();
    for req in REQUIREMENTS {
        if req.needed_for.iter().any(|t| tools.contains(t))
            && !is_present(&req.probe)
            && !missing.contains(&req.package)
        {
            missing.push(req.package);
        }
    }
    missing
}

/// What to do about missing packages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstallPlan {
    /// Nothing is missing.
    Nothing,
    /// Root with apt-get: run these commands.
    Install(Vec<Vec<String>>),
    /// Cannot install: tell the user this command.
    AskUser(String),
}

/// Decides how to get `missing` installed (pure, so it is unit-tested).
pub fn install_plan(missing: &[&str], is_root: bool, has_apt_get: bool) -> InstallPlan {
    if missing.is_empty() {
        return InstallPlan::Nothing;
    }
    if is_root && has_apt_get {
        let mut install: Vec<String> = ["apt-get", "install", "-y", "--no-install-recommends"]
            .map(String::from)
            .to_vec();
        install.extend(missing.iter().map(|p| p.to_string()));
        InstallPlan::Install(vec![vec!["apt-get".into(), "update".into()], install])
    } else {
        InstallPlan::AskUser(format!(
            "sudo apt-get install -y --no-install-recommends {}",
            missing.join(" ")
        ))
    }
}

/// Finds an executable on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn probe_host(probe: &Probe) -> bool {
    match probe {
        Probe::Command(name) => which(name).is_some(),
        Probe::AnyPath(paths) => paths.iter().any(|p| Path::new(p).exists()),
    }
}

/// Makes sure the packages for `tools` are installed: installs them with apt-get when
/// running as root, otherwise fails with the command to run.
pub fn ensure_tools(tools: &[Tool]) -> Result<(), String> {
    let missing = missing_packages(tools, probe_host);
    let is_root = nix::unistd::geteuid().is_root();
    match install_plan(&missing, is_root, which("apt-get").is_some()) {
        InstallPlan::Nothing => Ok(()),
        InstallPlan::AskUser(command) => Err(format!(
            "missing system packages: {}. Install them with:\n    {command}",
            missing.join(" ")
        )),
        InstallPlan::Install(commands) => {
            eprintln!(
                "xtask: installing missing system packages: {}",
                missing.join(" ")
            );
            for argv in commands {
                eprintln!("xtask: running {}", argv.join(" "));
                let status = Command::new(&argv[0])
                    .args(&argv[1..])
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .stdin(std::process::Stdio::null())
                    .status()
                    .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
                if !status.success() {
                    return Err(format!("`{}` failed ({status})", argv.join(" ")));
                }
            }
            let still = missing_packages(tools, probe_host);
            if still.is_empty() {
                eprintln!("xtask: installed {}", missing.join(" "));
                Ok(())
            } else {
                Err(format!(
                    "still missing after apt-get install: {}",
                    still.join(" ")
                ))
            }
        }
    }
}

/// What the host offers for running QEMU with KVM and nested VMX.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvmFacts {
    /// `vmx` is among the CPU flags of `/proc/cpuinfo`.
    pub vmx: bool,
    /// `hypervisor` is among the CPU flags (this host is itself a VM).
    pub under_hypervisor: bool,
    /// `/dev/kvm` opens read-write.
    pub dev_kvm_rw: bool,
    /// The `kvm_intel` module is loaded.
    pub kvm_intel: bool,
    /// Contents of `/sys/module/kvm_intel/parameters/nested`, trimmed, if readable.
    pub nested: Option<String>,
}

impl KvmFacts {
    /// Reads the facts from this host.
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags: Vec<&str> = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, f)| f.split_whitespace().collect())
            .unwrap_or_default();
        KvmFacts {
            vmx: flags.contains(&"vmx"),
            under_hypervisor: flags.contains(&"hypervisor"),
            dev_kvm_rw: OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok(),
            kvm_intel: Path::new("/sys/module/kvm_intel").exists(),
            nested: std::fs::read_to_string("/sys/module/kvm_intel/parameters/nested")
                .ok()
                .map(|s| s.trim().to_string()),
        }
    }

    /// Whether QEMU can use KVM here with VMX available to the guest, and why (not).
    pub fn usable(&self) -> (bool, String) {
        if !self.vmx {
            return (false, "no `vmx` flag in /proc/cpuinfo".into());
        }
        if !self.dev_kvm_rw {
            return (false, "/dev/kvm does not open read-write".into());
        }
        if !self.kvm_intel {
            return (false, "kvm_intel is not loaded".into());
        }
        match self.nested.as_deref() {
            Some("Y" | "y" | "1") => (true, "vmx, /dev/kvm and kvm_intel nested=Y".into()),
            Some(other) => (
                false,
                format!("kvm_intel nested={other}: guests would get no VMX"),
            ),
            None if !self.under_hypervisor => {
                (true, "bare metal with vmx, /dev/kvm and kvm_intel".into())
            }
            None => (
                false,
                "nested VMX state unknown on a virtual machine".into(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_missing_means_nothing_to_do() {
        let missing = missing_packages(&[Tool::Qemu, Tool::Iso, Tool::Bochs], |_| true);
        assert!(missing.is_empty());
        assert_eq!(install_plan(&missing, true, true), InstallPlan::Nothing);
    }

    #[test]
    fn only_packages_for_the_requested_tools_are_missing() {
        let none = |_: &Probe| false;
        assert_eq!(missing_packages(&[Tool::Qemu], none), ["qemu-system-x86"]);
        assert_eq!(
            missing_packages(&[Tool::Iso], none),
            [
                "grub-common",
                "grub-pc-bin",
                "xorriso",
                "mtools",
                "binutils"
            ]
        );
        assert_eq!(
            missing_packages(&[Tool::Bochs], none),
            ["bochs", "bochs-term", "bochsbios", "vgabios"]
        );
        let no_vgabios = |p: &Probe| *p != Probe::AnyPath(&[VGA_BIOS]);
        assert_eq!(
            missing_packages(&[Tool::Qemu, Tool::Bochs], no_vgabios),
            ["vgabios"]
        );
        let no_xorriso = |p: &Probe| *p != Probe::Command("xorriso");
        assert_eq!(missing_packages(&[Tool::Iso], no_xorriso), ["xorriso"]);
        assert!(missing_packages(&[Tool::Qemu], no_xorriso).is_empty());
    }

    #[test]
    fn root_with_apt_installs_exactly_the_missing_packages() {
        let plan = install_plan(&["bochs", "xorriso"], true, true);
        let InstallPlan::Install(commands) = plan else {
            panic!("{plan:?}")
        };
        assert_eq!(commands[0], ["apt-get", "update"]);
        assert_eq!(
            commands[1],
            [
                "apt-get",
                "install",
                "-y",
                "--no-install-recommends",
                "bochs",
                "xorriso"
            ]
        );
    }

    #[test]
    fn otherwise_the_user_is_told_what_to_run() {
        for (root, apt) in [(false, true), (true, false), (false, false)] {
            assert_eq!(
                install_plan(&["mtools"], root, apt),
                InstallPlan::AskUser(
                    "sudo apt-get install -y --no-install-recommends mtools".into()
                )
            );
        }
    }

    #[test]
    fn kvm_needs_vmx_dev_kvm_and_nested() {
        let good = KvmFacts {
            vmx: true,
            under_hypervisor: true,
            dev_kvm_rw: true,
            kvm_intel: true,
            nested: Some("Y".into()),
        };
        assert!(good.usable().0);
        // This machine: a software /dev/kvm without vmx.
        let here = KvmFacts {
            vmx: false,
            dev_kvm_rw: true,
            ..good.clone()
        };
        assert!(!here.usable().0);
        assert!(
            !KvmFacts {
                dev_kvm_rw: false,
                ..good.clone()
            }
            .usable()
            .0
        );
        assert!(
            !KvmFacts {
                kvm_intel: false,
                nested: None,
                ..good.clone()
            }
            .usable()
            .0
        );
        assert!(
            !KvmFacts {
                nested: Some("N".into()),
                ..good.clone()
            }
            .usable()
            .0
        );
        assert!(
            KvmFacts {
                nested: Some("1".into()),
                ..good.clone()
            }
            .usable()
            .0
        );
        let bare = KvmFacts {
            under_hypervisor: false,
            nested: None,
            ..good.clone()
        };
        assert!(bare.usable().0);
        assert!(
            !KvmFacts {
                under_hypervisor: true,
                ..bare
            }
            .usable()
            .0
        );
    }
}
