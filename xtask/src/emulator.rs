//! Booting an image in QEMU or bochs: command lines, serial-console tailing, timeouts, and
//! making sure no emulator process outlives a run.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::Value;
use system_tests::{EmulatorEnd, parse_summary_line};

use crate::host::{BOCHS_BIOS, VGA_BIOS};
use crate::image::workspace_root;

/// How long the emulator may take to exit by itself after the summary line. Generous: a
/// healthy run exits at once, but bochs on a loaded 2-core machine (parallel boot tests,
/// builds) was seen to need more than 2 s to reach its `quit`.
const GRACE_AFTER_SUMMARY: Duration = Duration::from_secs(10);
/// How often the serial log is polled.
const POLL: Duration = Duration::from_millis(50);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Catches Ctrl-C, SIGTERM and SIGHUP: running boots then stop their emulators and return.
pub fn install_interrupt_handler() {
    let result = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            eprintln!("xtask: interrupted again, still stopping emulators");
        } else {
            eprintln!("xtask: interrupted, stopping");
        }
    });
    if let Err(e) = result {
        eprintln!("xtask: warning: cannot install the Ctrl-C handler: {e}");
    }
}

/// Whether Ctrl-C (or SIGTERM/SIGHUP) was received.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Which emulator to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmulatorKind {
    /// QEMU; with KVM (`-enable-kvm -cpu host`) or TCG (`-cpu max`).
    Qemu {
        /// Use KVM.
        kvm: bool,
    },
    /// bochs (boots an ISO).
    Bochs,
}

/// What to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Image {
    /// The ELF, loaded by QEMU `-kernel` (PVH), with this command line.
    Elf {
        /// The kernel ELF.
        path: PathBuf,
        /// Kernel command line.
        cmdline: String,
    },
    /// A GRUB ISO (the command line is inside its grub.cfg).
    Iso(PathBuf),
}

/// One boot.
#[derive(Clone, Debug)]
pub struct BootSpec {
    /// Emulator.
    pub kind: EmulatorKind,
    /// Image.
    pub image: Image,
    /// Number of CPUs.
    pub cpus: u32,
    /// Wall-clock limit.
    pub timeout: Duration,
    /// bochs only: emulated instructions per second of emulated time ([`bochs_ips`]).
    pub ips: u64,
}

/// bochs' `ips` for a boot with kernel command line `cmdline`: [`BOOT_IPS`] keeps boots and
/// fault-injection runs fast (every wait in a boot is emulated time); scenarios with guests
/// run at [`SCENARIO_IPS`], so that a millisecond of guest time is enough instructions for
/// what guests do in one (a ping's round trip through the control VM takes ~20k).
pub fn bochs_ips(cmdline: &str) -> u64 {
    if cmdline
        .split_whitespace()
        .any(|word| word.starts_with("scenario="))
    {
        SCENARIO_IPS
    } else {
        BOOT_IPS
    }
}

/// bochs' instructions per emulated second for boots without guests.
pub const BOOT_IPS: u64 = 4_000_000;
/// bochs' instructions per emulated second for scenarios (see `docs/guests.md`).
pub const SCENARIO_IPS: u64 = 50_000_000;

/// What a boot produced.
#[derive(Clone, Debug)]
pub struct BootResult {
    /// Serial console lines, cleaned of terminal escapes and control characters.
    pub lines: Vec<String>,
    /// The first summary line, parsed.
    pub summary: Option<Value>,
    /// How the emulator ended.
    pub end: EmulatorEnd,
    /// Wall time from spawn to end.
    pub elapsed: Duration,
}

/// QEMU's arguments (docs/boot-contract.md), the serial console going to `serial`.
pub fn qemu_args(kvm: bool, image: &Image, cpus: u32, serial: &Path) -> Vec<String> {
    let mut args: Vec<String> = vec!["-machine".into(), "q35".into()];
    if kvm {
        args.extend(["-enable-kvm".into(), "-cpu".into(), "host".into()]);
    } else {
        args.extend(["-cpu".into(), "max".into()]);
    }
    args.extend(["-smp".into(), cpus.to_string(), "-m".into(), "256M".into()]);
    match image {
        Image::Elf { path, cmdline } => {
            args.extend([
                "-kernel".into(),
                path.display().to_string(),
                "-append".into(),
                cmdline.clone(),
            ]);
            let bundle = crate::image::bundle_for(path);
            if bundle.is_file() {
                args.extend(["-initrd".into(), bundle.display().to_string()]);
            }
        }
        Image::Iso(iso) => args.extend([
            "-cdrom".into(),
            iso.display().to_string(),
            "-boot".into(),
            "d".into(),
        ]),
    }
    args.extend([
        "-display".into(),
        "none".into(),
        "-serial".into(),
        format!("file:{}", serial.display()),
        "-monitor".into(),
        "none".into(),
        "-no-reboot".into(),
        "-device".into(),
        "isa-debug-exit,iobase=0xf4,iosize=0x04".into(),
    ]);
    args
}

/// The bochsrc for booting `iso` with `cpus` CPUs, files going into `run_dir`. The BIOS's
/// `fastboot` skips its "Press F12 for boot menu" wait: three seconds of emulated time, which
/// at [`SCENARIO_IPS`] cost about 5 s of wall time in every boot.
pub fn bochsrc(cpus: u32, ips: u64, iso: &Path, run_dir: &Path) -> String {
    let iso = iso.display();
    let dir = run_dir.display();
    format!(
        "megs: 256\n\
         cpu: model=corei7_skylake_x, count={cpus}, ips={ips}, reset_on_triple_fault=0\n\
         romimage: file={BOCHS_BIOS}, options=fastboot\n\
         vgaromimage: file={VGA_BIOS}\n\
         ata0-master: type=cdrom, path={iso}, status=inserted\n\
         boot: cdrom\n\
         com1: enabled=1, mode=file, dev={dir}/serial.log\n\
         display_library: term\n\
         magic_break: enabled=1\n\
         clock: sync=none\n\
         log: {dir}/bochs.log\n\
         panic: action=fatal\n\
         error: action=report\n\
         info: action=ignore\n\
         debug: action=ignore\n\
         port_e9_hack: enabled=1\n"
    )
}

/// Makes a fresh directory under `target/runs/` for one boot's files.
pub fn new_run_dir(label: &str) -> Result<PathBuf, String> {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let seq = SEQ.fetch_add(1, Ordering::SeqCst);
    let dir = workspace_root()
        .join("target/runs")
        .join(format!("{label}-{stamp}-{}-{seq}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// Removes all but the newest `keep` run directories.
pub fn prune_run_dirs(keep: usize) {
    let Ok(entries) = fs::read_dir(workspace_root().join("target/runs")) else {
        return;
    };
    let mut dirs: Vec<(SystemTime, PathBuf)> = entries
        .flatten()
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    dirs.sort();
    let excess = dirs.len().saturating_sub(keep);
    for (_, dir) in dirs.into_iter().take(excess) {
        let _ = fs::remove_dir_all(dir);
    }
}

/// The last few meaningful lines the emulator itself wrote (bochs.log, the emulator's
/// stderr), to show next to a failed boot: a triple fault, a bad option, a missing file.
pub fn diagnostics(run_dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for (name, skip) in [
        ("bochs.log", &[][..]),
        // bochs' startup chatter and ALSA's complaints about a missing sound card.
        (
            "emulator.stderr",
            &["ALSA lib", "00000000000i[", "Bochs connected to screen"][..],
        ),
    ] {
        let Ok(text) = fs::read_to_string(run_dir.join(name)) else {
            continue;
        };
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.is_empty() && !skip.iter().any(|s| l.starts_with(s)))
            .collect();
        out.extend(
            lines[lines.len().saturating_sub(5)..]
                .iter()
                .map(|l| format!("{name}: {l}")),
        );
    }
    out
}

/// Removes terminal escape sequences and control characters (GRUB draws its menu with
/// VT100 sequences on the serial console; lines end in `\r\n`).
pub fn clean_line(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // CSI: parameters and intermediates, then one final byte in @..~; other escape
            // sequences are two characters (ESC c, ESC 7, ...).
            '\u{1b}' => {
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// The serial lines of a boot so far.
struct Seen<'a> {
    lines: Vec<String>,
    summary: Option<Value>,
    summary_at: Option<Instant>,
    on_line: &'a mut dyn FnMut(&str, bool),
}

impl Seen<'_> {
    fn take(&mut self, new: Vec<String>) {
        for line in new {
            let parsed = if self.summary.is_none() {
                parse_summary_line(&line)
            } else {
                None
            };
            let is_summary = parsed.is_some();
            if is_summary {
                self.summary = parsed;
                self.summary_at = Some(Instant::now());
            }
            (self.on_line)(&line, is_summary);
            self.lines.push(line);
        }
    }
}

/// Splits a growing file into lines as they complete.
struct Tail {
    file: File,
    pending: Vec<u8>,
}

impl Tail {
    fn new(path: &Path) -> Result<Self, String> {
        let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Tail {
            file,
            pending: Vec::new(),
        })
    }

    /// Complete lines that arrived since the last call.
    fn poll(&mut self) -> Vec<String> {
        let _ = self.file.read_to_end(&mut self.pending);
        let mut lines = Vec::new();
        while let Some(nl) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=nl).collect();
            lines.push(clean_line(&line));
        }
        lines
    }

    /// Everything left, including a last line without a line end.
    fn finish(&mut self) -> Vec<String> {
        let mut lines = self.poll();
        if !self.pending.is_empty() {
            lines.push(clean_line(&std::mem::take(&mut self.pending)));
        }
        lines
    }
}

/// An emulator running in its own process group; the group is killed when this is dropped
/// (timeout, summary, Ctrl-C, error or panic), unless it has exited by itself.
struct Emulator {
    child: Child,
    exited: Option<ExitStatus>,
}

impl Emulator {
    fn spawn(mut cmd: Command) -> Result<Self, String> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {program}: {e}"))?;
        Ok(Emulator {
            child,
            exited: None,
        })
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    fn signal_group(&self, signal: Signal) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = killpg(Pid::from_raw(pid), signal);
        }
    }

    /// Stops the whole process group: SIGTERM, then SIGKILL after a second.
    fn stop(&mut self) {
        if self.try_wait().is_some() {
            return;
        }
        self.signal_group(Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline && self.try_wait().is_none() {
            sleep(Duration::from_millis(20));
        }
        // Also reaches group members that outlived the leader or ignored SIGTERM.
        self.signal_group(Signal::SIGKILL);
        if self.exited.is_none() {
            self.exited = self.child.wait().ok();
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop();
    }
}

fn emulator_command(spec: &BootSpec, run_dir: &Path, serial: &Path) -> Result<Command, String> {
    let write = |name: &str, text: String| {
        let path = run_dir.join(name);
        fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok::<_, String>(path)
    };
    let mut cmd = match spec.kind {
        EmulatorKind::Qemu { kvm } => {
            let mut cmd = Command::new("qemu-system-x86_64");
            cmd.args(qemu_args(kvm, &spec.image, spec.cpus, serial));
            cmd
        }
        EmulatorKind::Bochs => {
            let Image::Iso(iso) = &spec.image else {
                return Err("bochs boots only a GRUB ISO".into());
            };
            let rc = write("bochsrc", bochsrc(spec.cpus, spec.ips, iso, run_dir))?;
            let debugger_rc = write("bochs.rc", "c\nquit\n".into())?;
            let mut cmd = Command::new("bochs");
            cmd.arg("-q")
                .arg("-f")
                .arg(rc)
                .arg("-rc")
                .arg(debugger_rc)
                .env("TERM", "dumb");
            cmd
        }
    };
    let out = File::create(run_dir.join("emulator.stdout")).map_err(|e| e.to_string())?;
    let err = File::create(run_dir.join("emulator.stderr")).map_err(|e| e.to_string())?;
    cmd.current_dir(run_dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    Ok(cmd)
}

/// Boots `spec`, files in `run_dir`; calls `on_line(line, is_summary)` for each serial line
/// as it arrives. Ends at the summary (after a grace period for the emulator to exit by
/// itself), when the emulator exits, at the timeout, or on Ctrl-C; the emulator's process
/// group never outlives this call.
pub fn boot(
    spec: &BootSpec,
    run_dir: &Path,
    on_line: &mut dyn FnMut(&str, bool),
) -> Result<BootResult, String> {
    let serial = run_dir.join("serial.log");
    File::create(&serial).map_err(|e| format!("{}: {e}", serial.display()))?;
    let mut tail = Tail::new(&serial)?;
    let cmd = emulator_command(spec, run_dir, &serial)?;
    let start = Instant::now();
    let mut emulator = Emulator::spawn(cmd)?;

    let mut seen = Seen {
        lines: Vec::new(),
        summary: None,
        summary_at: None,
        on_line,
    };
    let end = loop {
        seen.take(tail.poll());
        if let Some(status) = emulator.try_wait() {
            seen.take(tail.finish());
            break match status.signal() {
                Some(signal)
                    if seen.summary.is_some()
                        && matches!(spec.kind, EmulatorKind::Bochs)
                        && stopped_at_breakpoint(run_dir) =>
                {
                    EmulatorEnd::SignalledAfterBreakpoint(signal)
                }
                _ => EmulatorEnd::Exited(status.code()),
            };
        }
        let stop = if seen
            .summary_at
            .is_some_and(|t| t.elapsed() >= GRACE_AFTER_SUMMARY)
        {
            Some(EmulatorEnd::KilledAfterSummary)
        } else if start.elapsed() >= spec.timeout {
            Some(EmulatorEnd::TimedOut)
        } else if interrupted() {
            Some(EmulatorEnd::Interrupted)
        } else {
            None
        };
        if let Some(end) = stop {
            emulator.stop();
            seen.take(tail.finish());
            break end;
        }
        sleep(POLL);
    };
    let Seen { lines, summary, .. } = seen;
    Ok(BootResult {
        lines,
        summary,
        end,
        elapsed: start.elapsed(),
    })
}

/// Whether bochs' debugger reported the kernel's final magic breakpoint (`xchg bx,bx`) in
/// the run's `emulator.stdout`, which it prints before running the `quit` of its rc file.
fn stopped_at_breakpoint(run_dir: &Path) -> bool {
    fs::read(run_dir.join("emulator.stdout"))
        .is_ok_and(|out| out.windows(17).any(|w| w == b"Magic breakpoint\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_line_drops_escapes_and_control_characters() {
        assert_eq!(
            clean_line(b"\x1b[H\x1b[J\x1b[1;1H  Booting `microvisor'\r\n"),
            "  Booting `microvisor'"
        );
        assert_eq!(clean_line(b"\rINFO x\r\n"), "INFO x");
        assert_eq!(clean_line(b"a\tb\x07"), "a\tb");
        assert_eq!(clean_line(b"\x1bcX"), "X");
        assert_eq!(clean_line(b"caf\xc3\xa9 \xff"), "caf\u{e9} \u{fffd}");
    }

    #[test]
    fn qemu_direct_and_iso_arguments() {
        let elf = Image::Elf {
            path: "/k".into(),
            cmdline: "fault=ud".into(),
        };
        let args = qemu_args(false, &elf, 4, Path::new("/r/serial.log")).join(" ");
        assert_eq!(
            args,
            "-machine q35 -cpu max -smp 4 -m 256M -kernel /k -append fault=ud -display none \
             -serial file:/r/serial.log -monitor none -no-reboot \
             -device isa-debug-exit,iobase=0xf4,iosize=0x04"
        );
        let iso = Image::Iso("/i.iso".into());
        let args = qemu_args(true, &iso, 2, Path::new("/s")).join(" ");
        assert!(args.starts_with(
            "-machine q35 -enable-kvm -cpu host -smp 2 -m 256M -cdrom /i.iso -boot d "
        ));
    }

    #[test]
    fn scenarios_run_bochs_faster_than_plain_boots() {
        assert_eq!(bochs_ips(""), BOOT_IPS);
        assert_eq!(bochs_ips("inject=failstop:memory"), BOOT_IPS);
        assert_eq!(
            bochs_ips("scenario=3appvm inject=failstop:timer"),
            SCENARIO_IPS
        );
        assert_eq!(bochs_ips("fault=ud xscenario=3appvm"), BOOT_IPS);
        let rc = bochsrc(2, SCENARIO_IPS, Path::new("/t/x.iso"), Path::new("/t/run"));
        assert!(rc.contains("count=2, ips=50000000,"), "{rc}");
    }

    #[test]
    fn bochsrc_has_the_expected_options() {
        let rc = bochsrc(4, BOOT_IPS, Path::new("/t/x.iso"), Path::new("/t/run"));
        for line in [
            "megs: 256",
            "cpu: model=corei7_skylake_x, count=4, ips=4000000, reset_on_triple_fault=0",
            "romimage: file=/usr/share/bochs/BIOS-bochs-latest, options=fastboot",
            "vgaromimage: file=/usr/share/vgabios/vgabios.bin",
            "ata0-master: type=cdrom, path=/t/x.iso, status=inserted",
            "boot: cdrom",
            "com1: enabled=1, mode=file, dev=/t/run/serial.log",
            "display_library: term",
            "magic_break: enabled=1",
            "clock: sync=none",
            "log: /t/run/bochs.log",
            "panic: action=fatal",
            "port_e9_hack: enabled=1",
        ] {
            assert!(rc.lines().any(|l| l == line), "{line:?} missing from\n{rc}");
        }
    }

    #[test]
    fn tail_yields_complete_lines_then_the_rest() {
        let dir = new_run_dir("unit-tail").unwrap();
        let path = dir.join("serial.log");
        fs::write(&path, b"").unwrap();
        let mut tail = Tail::new(&path).unwrap();
        assert!(tail.poll().is_empty());
        fs::write(&path, b"one\r\ntw").unwrap();
        assert_eq!(tail.poll(), ["one"]);
        fs::write(&path, b"one\r\ntwo\nthr").unwrap();
        assert_eq!(tail.poll(), ["two"]);
        assert_eq!(tail.finish(), ["thr"]);
        fs::remove_dir_all(dir).unwrap();
    }

    /// `/proc/PID/stat` lines of non-zombie processes in process group `pgid`.
    fn live_group_members(pgid: u32) -> Vec<String> {
        let mut live = Vec::new();
        for entry in fs::read_dir("/proc").unwrap().flatten() {
            let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid pgrp ...
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if fields.get(2) == Some(&pgid.to_string().as_str()) && fields[0] != "Z" {
                live.push(stat.trim().to_string());
            }
        }
        live
    }

    #[test]
    fn a_killed_emulator_leaves_no_process_behind() {
        let dir = new_run_dir("unit-kill").unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 30 & sleep 30; wait"]);
        let mut emulator = Emulator::spawn(cmd).unwrap();
        let pgid = emulator.child.id();
        sleep(Duration::from_millis(100));
        emulator.stop();
        drop(emulator);
        // Orphaned members may linger as zombies until init reaps them: only live ones count.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !live_group_members(pgid).is_empty() && Instant::now() < deadline {
            sleep(Duration::from_millis(20));
        }
        assert_eq!(
            live_group_members(pgid),
            Vec::<String>::new(),
            "process group {pgid}"
        );
        fs::remove_dir_all(dir).unwrap();
    }
}
