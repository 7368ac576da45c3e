//! Building the kernel image (docs/boot-contract.md) and GRUB ISOs around it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::host::GRUB_I386_PC;

/// Rust flags for the kernel build only (docs/boot-contract.md, "Building the core image").
pub const KERNEL_RUSTFLAGS: &str = "-C panic=abort -C linker=rust-lld -C linker-flavor=ld.lld \
    -C relocation-model=static -C code-model=kernel -C no-redzone=yes \
    -C link-arg=--no-pie -C link-arg=-static -C link-arg=-nostdlib \
    -C link-arg=--build-id=none -C link-arg=-zmax-page-size=0x1000";

/// The kernel's target triple, always given explicitly so RUSTFLAGS skip build scripts.
pub const KERNEL_TARGET: &str = "x86_64-unknown-linux-gnu";

/// The kernel's own target directory (relative to the workspace root).
pub const KERNEL_TARGET_DIR: &str = "target/kernel";

/// Rust flags for domain images: freestanding, static, linked at the domain image base by the
/// runtime's linker script (ring 3 keeps the red zone: interrupts switch stacks).
pub const DOMAIN_RUSTFLAGS: &str = "-C panic=abort -C strip=debuginfo -C linker=rust-lld -C linker-flavor=ld.lld \
    -C relocation-model=static -C link-arg=--no-pie -C link-arg=-static \
    -C link-arg=-nostdlib -C link-arg=--build-id=none -C link-arg=-zmax-page-size=0x1000";

/// The domain images' own target directory (relative to the workspace root).
pub const DOMAIN_TARGET_DIR: &str = "target/domains";

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// The cargo that runs us (`$CARGO`), or `cargo` from `PATH`.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// A cargo command for the kernel: `subcommand` (`build` or `clippy`) with the kernel's
/// package, features, target, target dir and RUSTFLAGS (set for this child only).
pub fn kernel_cargo(subcommand: &str, release: bool) -> Command {
    let mut cmd = cargo();
    cmd.arg(subcommand)
        .args([
            "--package",
            "microvisor",
            "--bin",
            "microvisor",
            "--features",
            "kernel",
        ])
        .args(["--target", KERNEL_TARGET, "--target-dir", KERNEL_TARGET_DIR]);
    if release {
        cmd.arg("--release");
    }
    // CARGO_ENCODED_RUSTFLAGS would take precedence over RUSTFLAGS.
    cmd.env("RUSTFLAGS", KERNEL_RUSTFLAGS)
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    cmd
}

/// Path of the ELF that `cargo xtask build` produces.
pub fn kernel_elf(release: bool) -> PathBuf {
    let profile = if release { "release" } else { "debug" };
    workspace_root()
        .join(KERNEL_TARGET_DIR)
        .join(KERNEL_TARGET)
        .join(profile)
        .join("microvisor")
}

/// The bundle of domain images that boots with the kernel `elf` (next to it).
pub fn bundle_for(elf: &Path) -> PathBuf {
    elf.with_file_name("microvisor-domains.tar")
}

/// Runs `cmd`, capturing its output into the error when `capture` is set.
fn run_cargo(mut cmd: Command, what: &str, capture: bool) -> Result<(), String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    if capture {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    let output = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    let mut message = format!("{what} build failed ({})", output.status);
    if capture {
        message.push_str(":\n");
        message.push_str(&String::from_utf8_lossy(&output.stderr));
    }
    Err(message)
}

/// Adds one file to the bundle.
fn append(
    archive: &mut tar::Builder<fs::File>,
    name: &str,
    data: &[u8],
    bundle: &Path,
) -> Result<(), String> {
    let mut header = tar::Header::new_ustar();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    archive
        .append_data(&mut header, name, data)
        .map_err(|e| format!("{}: {e}", bundle.display()))
}

/// Builds every domain image and packs them into the bundle for the kernel `elf`: a ustar
/// archive of `manifest.bin` (the checked `system.toml`) and `NAME.elf` files, one boot module for GRUB (`module2`) and QEMU (`-initrd`).
fn build_domain_bundle(elf: &Path, release: bool, capture: bool) -> Result<PathBuf, String> {
    let root = workspace_root();
    let script = root.join("microvisor/runtime/domain.ld");
    let profile = if release { "release" } else { "debug" };
    let bundle = bundle_for(elf);
    if let Some(dir) = bundle.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let manifest = crate::manifest::load(&root.join("system.toml"))?;
    let file = fs::File::create(&bundle).map_err(|e| format!("{}: {e}", bundle.display()))?;
    let mut archive = tar::Builder::new(file);
    append(&mut archive, "manifest.bin", &manifest.encoded, &bundle)?;
    for domain in &manifest.domains {
        let mut cmd = cargo();
        cmd.args([
            "build",
            "--package",
            &domain.package,
            "--bin",
            &domain.package,
            "--features",
            "domain",
        ])
        .args(["--target", KERNEL_TARGET, "--target-dir", DOMAIN_TARGET_DIR]);
        if release {
            cmd.arg("--release");
        }
        cmd.env(
            "RUSTFLAGS",
            format!("{DOMAIN_RUSTFLAGS} -C link-arg=-T{}", script.display()),
        )
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
        run_cargo(cmd, &format!("domain {}", domain.name), capture)?;
        let image_path = root
            .join(DOMAIN_TARGET_DIR)
            .join(KERNEL_TARGET)
            .join(profile)
            .join(&domain.package);
        let image = fs::read(&image_path).map_err(|e| format!("{}: {e}", image_path.display()))?;
        append(
            &mut archive,
            &format!("{}.elf", domain.name),
            &image,
            &bundle,
        )?;
    }
    for guest in GUEST_KERNELS {
        let image = build_guest(guest, capture)?;
        append(&mut archive, &format!("guest-{guest}.elf"), &image, &bundle)?;
    }
    archive
        .finish()
        .map_err(|e| format!("{}: {e}", bundle.display()))?;
    Ok(bundle)
}

/// The guest kernels (binaries of the `guests` package) every bundle carries.
pub const GUEST_KERNELS: &[&str] = microvisor::scenario::GUEST_KERNELS;

/// The guest kernels' own target directory (relative to the workspace root).
pub const GUEST_TARGET_DIR: &str = "target/guests";

/// Builds guest kernel `name` (always optimised: guests are small and run emulated) and
/// returns its ELF bytes.
fn build_guest(name: &str, capture: bool) -> Result<Vec<u8>, String> {
    let root = workspace_root();
    let script = root.join("microvisor/guest-runtime/guest.ld");
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--release",
        "--package",
        "guests",
        "--bin",
        name,
        "--features",
        "guest",
    ])
    .args(["--target", KERNEL_TARGET, "--target-dir", GUEST_TARGET_DIR])
    .env(
        "RUSTFLAGS",
        // No red zone: guests take virtual interrupts on their own stack.
        format!(
            "{DOMAIN_RUSTFLAGS} -C no-redzone=yes -C link-arg=-T{}",
            script.display()
        ),
    )
    .env_remove("CARGO_ENCODED_RUSTFLAGS");
    run_cargo(cmd, &format!("guest {name}"), capture)?;
    let path = root
        .join(GUEST_TARGET_DIR)
        .join(KERNEL_TARGET)
        .join("release")
        .join(name);
    fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Builds the kernel image and its domain bundle; returns the ELF path (the bundle is at
/// [`bundle_for`] it). With `capture`, cargo's output is kept and returned in the error;
/// otherwise it goes to our stderr.
pub fn build_kernel(release: bool, capture: bool) -> Result<PathBuf, String> {
    build_domain_bundle(&kernel_elf(release), release, capture)?;
    run_cargo(kernel_cargo("build", release), "kernel", capture)?;
    let elf = kernel_elf(release);
    if !elf.is_file() {
        return Err(format!(
            "kernel build succeeded but {} does not exist",
            elf.display()
        ));
    }
    Ok(elf)
}

/// GRUB modules the ISO needs: loading multiboot2 from an ISO 9660 CD in BIOS mode, and a
/// serial console.
const GRUB_MODULES: &str = "multiboot2 normal iso9660 biosdisk serial terminal part_msdos";

/// Rejects command lines GRUB's script parser would mangle; `key=value` words pass.
pub fn validate_cmdline(cmdline: &str) -> Result<(), String> {
    let bad: Vec<char> = cmdline
        .chars()
        .filter(|c| !(c.is_ascii_alphanumeric() || " =@,._:/+-".contains(*c)))
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "kernel command line {cmdline:?} contains characters not allowed ({}): use \
             space-separated key=value words of letters, digits and =@,._:/+-",
            bad.iter().collect::<String>()
        ))
    }
}

/// The `grub.cfg` of the boot ISO; with `bundle`, the domain bundle is loaded as a module.
pub fn grub_cfg(cmdline: &str, bundle: bool) -> String {
    let mut entry = format!("multiboot2 /boot/microvisor {cmdline}");
    entry = entry.trim_end().to_string();
    if bundle {
        entry.push_str("\n    module2 /boot/domains.tar domains");
    }
    format!(
        "set timeout=0\n\
         set default=0\n\
         serial --unit=0 --speed=115200\n\
         terminal_input serial\n\
         terminal_output serial\n\
         menuentry \"microvisor\" {{\n    {}\n    boot\n}}\n",
        entry.trim_end()
    )
}

/// Copies `elf` to `to` without its debug sections: GRUB reads every byte of the kernel file
/// through the BIOS, and the release kernel's debug information (about 7 MiB of 8) took about
/// 4 s of every bochs boot. What is loaded is the same; symbols stay in `elf` for debuggers.
fn strip_debug(elf: &Path, to: &Path) -> Result<(), String> {
    let output = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(elf)
        .arg(to)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run objcopy: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "objcopy --strip-debug {} failed ({}):\n{}",
            elf.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// Builds a BIOS GRUB ISO at `iso` that boots `elf` (without its debug sections) with `cmdline`.
pub fn build_iso(elf: &Path, cmdline: &str, iso: &Path) -> Result<(), String> {
    validate_cmdline(cmdline)?;
    let staging = iso.with_extension("root");
    let _ = fs::remove_dir_all(&staging);
    let grub_dir = staging.join("boot/grub");
    fs::create_dir_all(&grub_dir).map_err(|e| format!("{}: {e}", grub_dir.display()))?;
    strip_debug(elf, &staging.join("boot/microvisor"))?;
    let bundle = bundle_for(elf);
    let has_bundle = bundle.is_file();
    if has_bundle {
        fs::copy(&bundle, staging.join("boot/domains.tar"))
            .map_err(|e| format!("copying {}: {e}", bundle.display()))?;
    }
    fs::write(grub_dir.join("grub.cfg"), grub_cfg(cmdline, has_bundle))
        .map_err(|e| e.to_string())?;
    let output = Command::new("grub-mkrescue")
        .arg("--output")
        .arg(iso)
        .args(["--directory", GRUB_I386_PC])
        .arg(format!("--install-modules={GRUB_MODULES}"))
        .args(["--fonts=", "--locales=", "--themes="])
        .arg(&staging)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run grub-mkrescue: {e}"))?;
    let _ = fs::remove_dir_all(&staging);
    if !output.status.success() {
        return Err(format!(
            "grub-mkrescue failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grub_cfg_boots_multiboot2_on_the_serial_console() {
        let cfg = grub_cfg("fault=gp@1", false);
        for line in [
            "set timeout=0",
            "set default=0",
            "serial --unit=0 --speed=115200",
            "terminal_input serial",
            "terminal_output serial",
            "    multiboot2 /boot/microvisor fault=gp@1",
            "    boot",
        ] {
            assert!(
                cfg.lines().any(|l| l == line),
                "{line:?} missing from\n{cfg}"
            );
        }
        assert!(grub_cfg("", false).contains("    multiboot2 /boot/microvisor\n"));
        assert!(grub_cfg("", true).contains("    module2 /boot/domains.tar domains\n"));
    }

    #[test]
    fn cmdline_must_be_plain_words() {
        assert!(validate_cmdline("").is_ok());
        assert!(validate_cmdline("fault=gp@1 log=debug").is_ok());
        for bad in ["a;reboot", "x=$y", "\"q\"", "a\nb", "{x}"] {
            assert!(validate_cmdline(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn kernel_flags_match_the_contract() {
        let cmd = kernel_cargo("build", true);
        let args: Vec<_> = cmd.get_args().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "build",
                "--package",
                "microvisor",
                "--bin",
                "microvisor",
                "--features",
                "kernel",
                "--target",
                KERNEL_TARGET,
                "--target-dir",
                "target/kernel",
                "--release"
            ]
        );
        let flags: Vec<_> = KERNEL_RUSTFLAGS.split_whitespace().collect();
        assert_eq!(flags.len(), 22);
        assert!(flags.windows(2).any(|w| w == ["-C", "panic=abort"]));
        assert!(flags.windows(2).any(|w| w == ["-C", "code-model=kernel"]));
        assert!(
            kernel_elf(false).ends_with("target/kernel/x86_64-unknown-linux-gnu/debug/microvisor")
        );
    }
}
