//! Campaigns on Slurm: `cargo xtask campaign ... --slurm` turns the same plan into a job
//! array (task K runs the runs whose position in the plan is K modulo the array size, and
//! records them in `OUT/runs-task-K.jsonl`; `report` reads every such file). Nothing here
//! schedules anything: Slurm does, from the job script this writes.
//!
//! For `cargo xtask test` this also starts a one-node Slurm on localhost (Debian's munge,
//! slurmctld and slurmd, as root) with its configuration and state under `target/slurm/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::image;

/// The job script of a campaign: every array task runs `cargo xtask campaign` with the
/// campaign's arguments and its own slice.
pub fn job_script(workspace: &Path, campaign_args: &[String], tasks: u32) -> String {
    let quoted: Vec<String> = campaign_args
        .iter()
        .map(|arg| format!("'{}'", arg.replace('\'', "'\\''")))
        .collect();
    format!(
        "#!/bin/sh\n\
         # A fault-injection campaign as a Slurm job array: task K runs its slice of the plan.\n\
         set -e\n\
         cd '{}'\n\
         exec cargo xtask campaign {} --jobs 1 --task \"$SLURM_ARRAY_TASK_ID\" --tasks {tasks}\n",
        workspace.display(),
        quoted.join(" ")
    )
}

/// Writes `OUT/slurm/job.sh` and submits it as an array of `tasks` tasks (`sbatch`, with
/// `--wait` when `wait`; `conf`: a `SLURM_CONF` other than the system's). Returns sbatch's
/// output.
pub fn submit(
    out: &Path,
    campaign_args: &[String],
    tasks: u32,
    wait: bool,
    conf: Option<&Path>,
) -> Result<String, String> {
    let dir = out.join("slurm");
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let script = dir.join("job.sh");
    let workspace = image::workspace_root();
    fs::write(&script, job_script(&workspace, campaign_args, tasks))
        .map_err(|e| format!("{}: {e}", script.display()))?;
    let mut sbatch = Command::new("sbatch");
    sbatch
        .arg(format!("--array=0-{}", tasks.max(1) - 1))
        .arg("--job-name=microvisor-campaign")
        .arg("--cpus-per-task=1")
        .arg(format!("--output={}/%A_%a.log", dir.display()));
    if wait {
        sbatch.arg("--wait");
    }
    if let Some(conf) = conf {
        sbatch.env("SLURM_CONF", conf);
    }
    let output = sbatch
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run sbatch (is Slurm installed?): {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!("sbatch failed: {}", text.trim()));
    }
    Ok(text.trim().to_string())
}

/// A one-node Slurm on localhost, for tests: stopped when dropped.
pub struct LocalCluster {
    dir: PathBuf,
    /// The `SLURM_CONF` its clients need.
    pub conf: PathBuf,
}

impl LocalCluster {
    /// Starts munged (if it is not running), slurmctld and slurmd with a configuration in
    /// `target/slurm/`, and waits until the node is idle.
    pub fn start() -> Result<LocalCluster, String> {
        let dir = image::workspace_root().join("target/slurm");
        // Daemons a previous run left behind (it was killed) would hold the ports.
        stop_daemons(&dir);
        let _ = fs::remove_dir_all(&dir);
        for sub in ["state", "spool", "log"] {
            fs::create_dir_all(dir.join(sub)).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let conf = dir.join("slurm.conf");
        let d = dir.display();
        fs::write(
            &conf,
            format!(
                "ClusterName=microvisor-test\nSlurmctldHost=localhost\nSlurmUser=root\n\
                 SlurmdUser=root\nAuthType=auth/munge\nCredType=cred/munge\n\
                 StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\n\
                 SlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd.pid\n\
                 SlurmctldLogFile={d}/log/slurmctld.log\nSlurmdLogFile={d}/log/slurmd.log\n\
                 ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
                 JobAcctGatherType=jobacct_gather/none\nSelectType=select/cons_tres\n\
                 SelectTypeParameters=CR_CPU\nReturnToService=2\nMpiDefault=none\n\
                 NodeName=localhost CPUs={cpus} State=UNKNOWN\n\
                 PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP\n"
            ),
        )
        .map_err(|e| format!("{}: {e}", conf.display()))?;
        if !running("munged") {
            let _ = fs::create_dir_all("/run/munge");
            let _ = Command::new("chown")
                .args(["munge:munge", "/run/munge"])
                .status();
            let status = Command::new("munged")
                .arg("--force")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|e| format!("cannot start munged: {e}"))?;
            if !status.success() {
                return Err(format!("munged exited with {status}"));
            }
        }
        let cluster = LocalCluster { dir, conf };
        for daemon in ["slurmctld", "slurmd"] {
            let status = Command::new(daemon)
                .arg("-f")
                .arg(&cluster.conf)
                .env("SLURM_CONF", &cluster.conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|e| format!("cannot start {daemon}: {e}"))?;
            if !status.success() {
                return Err(format!(
                    "{daemon} exited with {status} (log in {})",
                    cluster.dir.join("log").display()
                ));
            }
        }
        let started = Instant::now();
        loop {
            let sinfo = Command::new("sinfo")
                .args(["--noheader", "--format=%t"])
                .env("SLURM_CONF", &cluster.conf)
                .output()
                .map_err(|e| format!("cannot run sinfo: {e}"))?;
            if String::from_utf8_lossy(&sinfo.stdout).trim() == "idle" {
                return Ok(cluster);
            }
            if started.elapsed() > Duration::from_secs(60) {
                return Err(format!(
                    "the local Slurm node is not idle after 60 s (sinfo: {}; logs in {})",
                    String::from_utf8_lossy(&sinfo.stdout).trim(),
                    cluster.dir.join("log").display()
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        stop_daemons(&self.dir);
    }
}

/// Stops the slurmd and slurmctld whose pid files are in `dir`, and waits for them to go.
fn stop_daemons(dir: &Path) {
    for pid_file in ["slurmd.pid", "slurmctld.pid"] {
        let Ok(pid) = fs::read_to_string(dir.join(pid_file)) else {
            continue;
        };
        let pid = pid.trim().to_string();
        let _ = Command::new("kill")
            .arg(&pid)
            .stderr(Stdio::null())
            .status();
        for _ in 0..50 {
            let alive = Command::new("kill")
                .args(["-0", &pid])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success());
            if !alive {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// For `cargo xtask test`: a small campaign through a local one-node Slurm: two array tasks,
/// one run each, records in their own files, merged by the report.
pub fn check_local() -> Result<(), String> {
    let cluster = LocalCluster::start()?;
    let out = image::workspace_root().join("target/campaign-slurm");
    let _ = fs::remove_dir_all(&out);
    let args: Vec<String> = [
        "--scenario",
        "1appvm-unixbench",
        "--cpus",
        "2",
        "--target",
        "memory",
        "--fault",
        "register,failstop",
        "--mode",
        "microreset",
        "--runs",
        "1",
        "--seed",
        "3",
        "--timeout",
        "150",
        "--debug",
        "--out",
    ]
    .iter()
    .map(|arg| arg.to_string())
    .chain([out.display().to_string()])
    .collect();
    submit(&out, &args, 2, true, Some(&cluster.conf))?;
    let mut problems = Vec::new();
    for task in 0..2 {
        let file = out.join(format!("runs-task-{task}.jsonl"));
        let lines = fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .count();
        if lines != 1 {
            problems.push(format!("{} holds {lines} records, not 1", file.display()));
        }
    }
    let records = crate::campaign::read_records(&out)?;
    let mut ids: Vec<&str> = records.iter().filter_map(|r| r["id"].as_str()).collect();
    ids.sort_unstable();
    if ids
        != [
            "memory-failstop-microreset-0",
            "memory-register-microreset-0",
        ]
    {
        problems.push(format!("the array recorded runs {ids:?}"));
    }
    if problems.is_empty() {
        crate::report::report(&out)
    } else {
        let logs = out.join("slurm");
        Err(format!(
            "{} (task logs in {})",
            problems.join("; "),
            logs.display()
        ))
    }
}

/// Whether a process called `name` runs.
fn running(name: &str) -> bool {
    Command::new("pgrep")
        .args(["-x", name])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[ignore = "starts Slurm daemons and boots bochs; `cargo xtask test` runs it as a step"]
    fn a_campaign_runs_through_a_local_slurm() {
        if let Err(problem) = check_local() {
            panic!("{problem}");
        }
    }

    #[test]
    fn the_job_script_runs_its_slice() {
        let script = job_script(
            Path::new("/src/microvisor"),
            &[
                "--scenario".into(),
                "3appvm".into(),
                "--out".into(),
                "it's".into(),
            ],
            8,
        );
        assert!(script.starts_with("#!/bin/sh\n"));
        assert!(script.contains("cd '/src/microvisor'\n"));
        assert!(script.contains(
            "exec cargo xtask campaign '--scenario' '3appvm' '--out' 'it'\\''s' --jobs 1 \
             --task \"$SLURM_ARRAY_TASK_ID\" --tasks 8\n"
        ));
    }
}
