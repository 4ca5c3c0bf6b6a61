//! The PostgreSQL tools an upgrade runs as children of the reaper: pg_controldata
//! (and its output, parsed), initdb and pg_upgrade with their output in the
//! postgres log, pg_upgrade's working and log directories.

use std::fs::OpenOptions;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;

use crate::config::Config;
use crate::fsutil::tree::{copy_tree, remove_tree};
use crate::postgres::cluster;
use crate::process::reaper::{ChildSpec, Exit};
use crate::process::service::ServiceIo;

/// What pg_controldata says about a data directory.
#[derive(Debug, Default, PartialEq)]
pub struct ControlData {
    pub state: Option<String>,
    pub checksums: Option<u32>,
}

pub fn parse_controldata(text: &str) -> ControlData {
    let mut c = ControlData::default();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once(':') {
            match k.trim() {
                "Database cluster state" => c.state = Some(v.trim().to_string()),
                "Data page checksum version" => c.checksums = v.trim().parse().ok(),
                _ => {}
            }
        }
    }
    c
}

pub(super) async fn controldata(
    cfg: &Config,
    io: &ServiceIo,
    bin_dir: &Path,
    data: &Path,
) -> Result<ControlData> {
    let out = cfg.paths.state.join(".pg_controldata.out");
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&out)
        .with_context(|| format!("cannot create {}", out.display()))?;
    let spec = ChildSpec {
        program: bin_dir.join("pg_controldata"),
        args: vec!["-D".into(), data.display().to_string()],
        env: cluster::base_env(cfg),
        cwd: cfg.paths.state.clone(),
        death_signal: Signal::SIGKILL,
        as_api_user: false,
        oom_score_adj: None,
    };
    let exit = io.reaper.run(spec, OwnedFd::from(file)).await?;
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    if !exit.success() {
        bail!(
            "{}/pg_controldata -D {} failed ({exit}): {}",
            bin_dir.display(),
            data.display(),
            text.trim()
        );
    }
    Ok(parse_controldata(&text))
}

/// Runs a PostgreSQL tool to completion, its output into the postgres log.
pub(super) async fn run_tool(
    cfg: &Config,
    io: &ServiceIo,
    program: PathBuf,
    args: Vec<String>,
    cwd: PathBuf,
) -> Result<Exit> {
    tracing::info!("running {} {}", program.display(), args.join(" "));
    let spec = ChildSpec {
        program,
        args,
        env: cluster::base_env(cfg),
        cwd,
        death_signal: Signal::SIGKILL,
        as_api_user: false,
        oom_score_adj: None,
    };
    io.reaper.run(spec, io.log_fd()?).await
}

pub(super) fn ensure_work_dir(work: &Path) -> Result<()> {
    if work.exists() {
        remove_tree(work)?;
    }
    std::fs::create_dir(work).with_context(|| format!("cannot create {}", work.display()))?;
    std::fs::set_permissions(work, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot chmod {}", work.display()))
}

/// Moves pg_upgrade's log directory out of the new cluster before that is removed;
/// returns where it went (or what to look at).
pub(super) fn keep_upgrade_logs(cfg: &Config, new: &Path) -> String {
    let logs = new.join("pg_upgrade_output.d");
    if !logs.exists() {
        return "pg_upgrade's messages above in that log".into();
    }
    let dest = cfg.paths.logs.join(format!(
        "pg_upgrade-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
    ));
    match std::fs::rename(&logs, &dest) {
        Ok(()) => dest.display().to_string(),
        Err(_) => match copy_tree(&logs, &dest) {
            Ok(()) => dest.display().to_string(),
            Err(_) => "pg_upgrade's messages above in that log".into(),
        },
    }
}
