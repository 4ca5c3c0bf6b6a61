//! PostgreSQL major upgrades of the private cluster, at start. When the binaries in
//! use (the newest installed, or `postgres.bin_dir`) are a newer major than the
//! cluster (a distribution upgrade: Debian 12 has 15, Debian 13 has 17), `prepare`
//! upgrades it with `pg_upgrade` before PostgreSQL starts:
//!
//! 1. the old major's binaries must still be installed (else `check` refuses to
//!    start with a recovery hint, before anything is touched);
//! 2. free disk space for a copy of the cluster;
//! 3. a new cluster (`pgdata.upgrade`, same superuser, encoding, locale, checksums),
//!    then `pg_upgrade --check`;
//! 4. the backup: a copy of the stopped old cluster in `pgdata.<old>` (a physical
//!    copy of a cleanly stopped cluster is exact, and the old binaries start it as
//!    it was; a `pg_dump` would need the new server to restore);
//! 5. `pg_upgrade --link`, then a swap of the directories and a marker file;
//! 6. the copy is kept until the upgraded cluster has run and stopped cleanly once
//!    (checked at the following start); the log and `pgdata.<old>.README` say how
//!    to go back meanwhile. Optimizer statistics are rebuilt in the background once
//!    the new cluster is ready (pg_upgrade does not carry them over).
//!
//! Every step is safe to interrupt: `recover` finishes or undoes what a killed run
//! left, and a failed step leaves the old cluster usable (restored from the copy when
//! pg_upgrade had already linked it).

use std::fs::OpenOptions;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use super::binaries::{Binaries, DEBIAN_ROOT};
use super::cluster::{self, cluster_major, data_dir, SUPERUSER};
use super::Db;
use crate::config::Config;
use crate::fsutil::write_atomic;
use crate::supervisor::reaper::{ChildSpec, Exit};
use crate::supervisor::service::ServiceIo;

/// The record of a finished upgrade, in the state directory.
const MARKER: &str = "pg_upgrade.json";
/// Where the new cluster is built.
const NEW_DIR: &str = "pgdata.upgrade";
/// pg_upgrade's working directory (it writes a delete script there).
const WORK_DIR: &str = "pg_upgrade.work";
/// Room beyond the copy: the new cluster's catalogs, WAL and pg_upgrade's dump.
const DISK_MARGIN: u64 = 128 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Marker {
    from: u32,
    to: u32,
    /// The copy of the cluster as it was before the upgrade.
    backup: PathBuf,
    upgraded_at: String,
    /// The upgraded cluster has been started at least once.
    started: bool,
    /// The copy has been deleted (after a clean stop of the upgraded cluster).
    backup_removed: bool,
    /// Optimizer statistics have been rebuilt.
    analyzed: bool,
}

fn marker_path(cfg: &Config) -> PathBuf {
    cfg.paths.state.join(MARKER)
}

fn backup_dir(cfg: &Config, major: u32) -> PathBuf {
    cfg.paths.state.join(format!("pgdata.{major}"))
}

fn readme_path(cfg: &Config, major: u32) -> PathBuf {
    cfg.paths.state.join(format!("pgdata.{major}.README"))
}

fn read_marker(cfg: &Config) -> Result<Option<Marker>> {
    let path = marker_path(cfg);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).with_context(|| {
            format!(
                "{} is not a valid upgrade record: move it away if no PostgreSQL upgrade is under way",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn write_marker(cfg: &Config, m: &Marker) -> Result<()> {
    let path = marker_path(cfg);
    let text = serde_json::to_vec_pretty(m)?;
    write_atomic(&path, &text, 0o600).with_context(|| format!("cannot write {}", path.display()))
}

fn remove_marker(cfg: &Config) -> Result<()> {
    let path = marker_path(cfg);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}

/// The bin directory of another major: next to the binaries in use when they sit in
/// a `<root>/<major>/bin` layout (Debian's /usr/lib/postgresql), else Debian's.
pub fn bin_dir_of(bins: &Binaries, major: u32) -> PathBuf {
    let sibling = bins.dir.parent().and_then(|versioned| {
        let name = versioned.file_name()?.to_str()?;
        (name.parse::<u32>().ok() == Some(bins.major) && bins.dir.ends_with("bin"))
            .then(|| {
                versioned
                    .parent()
                    .map(|root| root.join(major.to_string()).join("bin"))
            })
            .flatten()
    });
    sibling.unwrap_or_else(|| Path::new(DEBIAN_ROOT).join(major.to_string()).join("bin"))
}

/// What `check` and `run` say about the cluster's major against the binaries':
/// fine (none yet, same major, or an older one this machine can upgrade), or why
/// not and what to do. Touches nothing.
pub fn check(cfg: &Config, bins: &Binaries) -> Result<(), String> {
    let data = data_dir(cfg);
    let Some(m) = cluster_major(&data) else {
        return Ok(());
    };
    let file = cfg.file.display();
    if m > bins.major {
        return Err(format!(
            "{file}: the cluster in {} is PostgreSQL {m} but the binaries in {} are PostgreSQL {}: \
             a cluster cannot go back to an older major: install postgresql-{m} \
             (or set postgres.bin_dir to its bin directory)",
            data.display(),
            bins.dir.display(),
            bins.major
        ));
    }
    if m == bins.major {
        return Ok(());
    }
    let old = bin_dir_of(bins, m);
    let missing_old = ["postgres", "pg_ctl", "pg_controldata"]
        .into_iter()
        .find(|t| !old.join(t).is_file());
    if let Some(tool) = missing_old {
        return Err(format!(
            "{file}: the cluster in {} is PostgreSQL {m}; koprogo upgrades it to PostgreSQL {} ({}) \
             at start, but that needs the PostgreSQL {m} binaries, which are gone ({} is missing): \
             install postgresql-{m} again (apt-get install postgresql-{m}; where the distribution \
             no longer has it, from apt.postgresql.org or the offline bundle of the previous \
             koprogo release), then start koprogo and it upgrades the cluster by itself; or, to \
             stay on PostgreSQL {m}, set postgres.bin_dir = \"{}\" once it is installed. \
             The cluster itself is untouched",
            data.display(),
            bins.major,
            bins.dir.display(),
            old.join(tool).display(),
            old.display()
        ));
    }
    if !bins.tool("pg_upgrade").is_file() {
        return Err(format!(
            "{file}: the cluster in {} is PostgreSQL {m} and needs an upgrade to {}, but {} is \
             missing: reinstall postgresql-{} (apt-get install --reinstall postgresql-{})",
            data.display(),
            bins.major,
            bins.tool("pg_upgrade").display(),
            bins.major,
            bins.major
        ));
    }
    Ok(())
}

/// Before every start of PostgreSQL: finishes or undoes an interrupted upgrade,
/// upgrades an older cluster, and deletes the pre-upgrade copy once the upgraded
/// cluster has stopped cleanly.
pub async fn prepare(cfg: &Config, bins: &Binaries, io: &ServiceIo) -> Result<()> {
    recover(cfg)?;
    let data = data_dir(cfg);
    match cluster_major(&data) {
        None => Ok(()),
        Some(m) if m == bins.major => settle(cfg, bins, io).await,
        Some(m) if m < bins.major => {
            upgrade(cfg, bins, io, m).await?;
            settle(cfg, bins, io).await
        }
        Some(_) => check(cfg, bins).map_err(anyhow::Error::msg),
    }
}

/// Puts the directories back into a known state after a run that was killed or
/// failed in the middle of an upgrade.
fn recover(cfg: &Config) -> Result<()> {
    let state = &cfg.paths.state;
    let data = data_dir(cfg);
    let new = state.join(NEW_DIR);
    let marker = read_marker(cfg)?;
    if let Some(m) = &marker {
        // pg_upgrade finished; the swap was interrupted.
        if !data.exists() && new.join("PG_VERSION").is_file() {
            tracing::warn!(
                "finishing the interrupted switch to the upgraded cluster ({} -> {})",
                new.display(),
                data.display()
            );
            rename(&new, &data)?;
        }
        let linked = state.join(format!("pgdata.{}.linked", m.from));
        if linked.exists() && cluster_major(&data) == Some(m.to) {
            remove_tree(&linked)?;
        }
    } else {
        if new.exists() {
            tracing::warn!(
                "removing {} left by an interrupted PostgreSQL upgrade",
                new.display()
            );
            remove_tree(&new)?;
        }
        let control = data.join("global").join("pg_control");
        let control_old = data.join("global").join("pg_control.old");
        if control_old.is_file() && !control.exists() {
            // pg_upgrade --link had begun linking: the old cluster is disabled and
            // its files may be shared. Use the copy taken before.
            let major = cluster_major(&data).unwrap_or(0);
            let backup = backup_dir(cfg, major);
            if backup.join("global").join("pg_control").is_file() {
                tracing::warn!(
                    "an interrupted pg_upgrade --link left {} disabled: restoring it from the copy in {}",
                    data.display(),
                    backup.display()
                );
                remove_tree(&data)?;
                rename(&backup, &data)?;
            } else {
                tracing::warn!(
                    "an interrupted pg_upgrade left {} disabled and there is no copy: re-enabling it \
                     (pg_control.old -> pg_control), as pg_upgrade's documentation says",
                    data.display()
                );
                rename(&control_old, &control)?;
            }
        }
    }
    let entries =
        std::fs::read_dir(state).with_context(|| format!("cannot read {}", state.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("pgdata.") && name.ends_with(".copying") {
            tracing::warn!("removing the unfinished copy {}", entry.path().display());
            remove_tree(&entry.path())?;
        }
        if name.starts_with("pgdata.") && name.ends_with(".deleting") {
            remove_tree(&entry.path())?;
        }
    }
    let work = state.join(WORK_DIR);
    if work.exists() {
        remove_tree(&work)?;
    }
    Ok(())
}

/// The cluster is on the right major: after an upgrade, count its clean starts and
/// delete the copy once it has stopped cleanly.
async fn settle(cfg: &Config, bins: &Binaries, io: &ServiceIo) -> Result<()> {
    let Some(mut m) = read_marker(cfg)? else {
        return Ok(());
    };
    let data = data_dir(cfg);
    if cluster_major(&data) != Some(m.to) || m.to != bins.major {
        tracing::warn!(
            "{} records an upgrade to PostgreSQL {} but the cluster is not that one (went back?): \
             forgetting the record, keeping {}",
            marker_path(cfg).display(),
            m.to,
            m.backup.display()
        );
        return remove_marker(cfg);
    }
    if !m.started {
        m.started = true;
        write_marker(cfg, &m)?;
        tracing::info!(
            "first start of the upgraded cluster (PostgreSQL {}); the PostgreSQL {} copy in {} is \
             kept until its next clean start",
            m.to,
            m.from,
            m.backup.display()
        );
        return Ok(());
    }
    if m.backup_removed {
        return Ok(());
    }
    let control = controldata(cfg, io, &bins.dir, &data).await?;
    if control.state.as_deref() != Some("shut down") {
        tracing::warn!(
            "the upgraded cluster did not stop cleanly last time ({}): keeping the PostgreSQL {} copy in {}",
            control.state.as_deref().unwrap_or("state unknown"),
            m.from,
            m.backup.display()
        );
        return Ok(());
    }
    if m.backup.exists() {
        remove_in_background(&m.backup)?;
    }
    let readme = readme_path(cfg, m.from);
    if readme.exists() {
        std::fs::remove_file(&readme)
            .with_context(|| format!("cannot remove {}", readme.display()))?;
    }
    tracing::info!(
        "the upgraded cluster ran and stopped cleanly: deleted the pre-upgrade PostgreSQL {} copy {}",
        m.from,
        m.backup.display()
    );
    m.backup_removed = true;
    if m.analyzed {
        remove_marker(cfg)
    } else {
        write_marker(cfg, &m)
    }
}

/// Keeps systemd from timing the start out while an upgrade runs.
struct StartExtender(tokio::task::JoinHandle<()>);

impl StartExtender {
    fn start(status: String) -> StartExtender {
        StartExtender(tokio::spawn(async move {
            if std::env::var_os("NOTIFY_SOCKET").is_none() {
                return;
            }
            loop {
                let _ = sd_notify::notify(&[
                    sd_notify::NotifyState::ExtendTimeoutUsec(180_000_000),
                    sd_notify::NotifyState::Status(&status),
                ]);
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        }))
    }
}

impl Drop for StartExtender {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn upgrade(cfg: &Config, bins: &Binaries, io: &ServiceIo, old: u32) -> Result<()> {
    check(cfg, bins).map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    let new_major = bins.major;
    let state = &cfg.paths.state;
    let data = data_dir(cfg);
    let new = state.join(NEW_DIR);
    let backup = backup_dir(cfg, old);
    let old_bin = bin_dir_of(bins, old);
    let _extend = StartExtender::start(format!(
        "upgrading PostgreSQL {old} to {new_major} (pg_upgrade)"
    ));
    tracing::warn!(
        "the cluster in {} is PostgreSQL {old} and the binaries are PostgreSQL {new_major}: upgrading it \
         (backup copy, pg_upgrade --link); pg_upgrade's output goes to {}",
        data.display(),
        cfg.paths.logs.join("postgres.log").display()
    );
    // A postmaster left running by an earlier supervisor would make pg_upgrade fail.
    cluster::clear_stale_pid(cfg).await?;

    // Disk: room for the copy and the new cluster's own files.
    let size = {
        let data = data.clone();
        tokio::task::spawn_blocking(move || tree_size(&data))
            .await
            .context("measuring the cluster")??
    };
    let need = size + size / 10 + DISK_MARGIN;
    let free = free_bytes(state)?;
    if free < need {
        bail!(
            "not enough disk space to upgrade PostgreSQL {old} to {new_major}: {} has {} free, the \
             copy of the {} cluster and the new one need {}: free some space (or move {} to a \
             bigger disk); koprogo tries again by itself",
            state.display(),
            human(free),
            human(size),
            human(need),
            state.display()
        );
    }

    // The new cluster, made like ours, with the old one's checksum setting.
    let old_control = controldata(cfg, io, &old_bin, &data).await?;
    if new.exists() {
        remove_tree(&new)?;
    }
    let mut args = vec![
        "-D".to_string(),
        new.display().to_string(),
        "-U".into(),
        SUPERUSER.into(),
        "-E".into(),
        "UTF8".into(),
        "--locale=C.UTF-8".into(),
        "--auth-local=peer".into(),
        "--auth-host=reject".into(),
        "--no-instructions".into(),
    ];
    match old_control.checksums {
        Some(v) if v > 0 => args.push("--data-checksums".into()),
        // PostgreSQL 18's initdb enables checksums by default; pg_upgrade needs a match.
        _ if new_major >= 18 => args.push("--no-data-checksums".into()),
        _ => {}
    }
    let exit = run_tool(cfg, io, bins.tool("initdb"), args, state.clone()).await?;
    if !exit.success() {
        let _ = std::fs::remove_dir_all(&new);
        bail!(
            "upgrading PostgreSQL {old} to {new_major}: initdb of the new cluster failed ({exit}): see {}",
            cfg.paths.logs.join("postgres.log").display()
        );
    }
    // Same access rules as the old cluster (our managed files), so pg_upgrade's
    // connections as the superuser work on both.
    for f in ["pg_hba.conf", "pg_ident.conf"] {
        std::fs::copy(data.join(f), new.join(f))
            .with_context(|| format!("cannot copy {} into {}", f, new.display()))?;
    }

    let work = state.join(WORK_DIR);
    let pg_upgrade = |check: bool| {
        let mut a = vec![
            "--old-bindir".to_string(),
            old_bin.display().to_string(),
            "--new-bindir".into(),
            bins.dir.display().to_string(),
            "--old-datadir".into(),
            data.display().to_string(),
            "--new-datadir".into(),
            new.display().to_string(),
            "--username".into(),
            SUPERUSER.into(),
            "--socketdir".into(),
            cfg.paths.run.display().to_string(),
            "--link".into(),
            "--jobs".into(),
            super::tuning::cores().max(1).to_string(),
        ];
        if check {
            a.push("--check".into());
        }
        a
    };
    ensure_work_dir(&work)?;
    let exit = run_tool(
        cfg,
        io,
        bins.tool("pg_upgrade"),
        pg_upgrade(true),
        work.clone(),
    )
    .await?;
    if !exit.success() {
        let logs = keep_upgrade_logs(cfg, &new);
        let _ = std::fs::remove_dir_all(&new);
        let _ = std::fs::remove_dir_all(&work);
        bail!(
            "upgrading PostgreSQL {old} to {new_major}: pg_upgrade --check found a problem ({exit}); \
             nothing was changed. See {} and {}; fix it, or set postgres.bin_dir = \"{}\" in {} to \
             stay on PostgreSQL {old}",
            cfg.paths.logs.join("postgres.log").display(),
            logs,
            old_bin.display(),
            cfg.file.display()
        );
    }

    // The backup: a copy of the stopped cluster, complete before anything changes.
    if backup.exists() {
        tracing::warn!(
            "replacing {} (a copy from an earlier attempt)",
            backup.display()
        );
        remove_tree(&backup)?;
    }
    let copying = state.join(format!("pgdata.{old}.copying"));
    tracing::info!(
        "copying the PostgreSQL {old} cluster ({}) to {}",
        human(size),
        backup.display()
    );
    {
        let (from, to) = (data.clone(), copying.clone());
        tokio::task::spawn_blocking(move || copy_tree(&from, &to).and_then(|()| sync_fs(&to)))
            .await
            .context("copying the cluster")??;
    }
    rename(&copying, &backup)?;

    let exit = run_tool(
        cfg,
        io,
        bins.tool("pg_upgrade"),
        pg_upgrade(false),
        work.clone(),
    )
    .await?;
    if !exit.success() {
        let logs = keep_upgrade_logs(cfg, &new);
        let _ = std::fs::remove_dir_all(&new);
        let _ = std::fs::remove_dir_all(&work);
        // Linking disables the old cluster: put the copy back.
        if data.join("global").join("pg_control.old").exists() {
            remove_tree(&data)?;
            rename(&backup, &data)?;
        }
        bail!(
            "upgrading PostgreSQL {old} to {new_major}: pg_upgrade failed ({exit}); the PostgreSQL \
             {old} cluster is back as it was. See {} and {}; fix it, or set postgres.bin_dir = \"{}\" \
             in {} to stay on PostgreSQL {old}",
            cfg.paths.logs.join("postgres.log").display(),
            logs,
            old_bin.display(),
            cfg.file.display()
        );
    }
    let _ = std::fs::remove_dir_all(&work);

    // Record, then swap: pgdata (linked old) out, the new cluster in.
    let marker = Marker {
        from: old,
        to: new_major,
        backup: backup.clone(),
        upgraded_at: chrono::Utc::now().to_rfc3339(),
        started: false,
        backup_removed: false,
        analyzed: false,
    };
    write_marker(cfg, &marker)?;
    let linked = state.join(format!("pgdata.{old}.linked"));
    rename(&data, &linked)?;
    rename(&new, &data)?;
    sync_dir(state)?;
    remove_in_background(&linked)?;

    let howto = revert_instructions(cfg, old, new_major, &old_bin);
    let readme = readme_path(cfg, old);
    write_atomic(&readme, howto.as_bytes(), 0o640)
        .with_context(|| format!("cannot write {}", readme.display()))?;
    tracing::warn!(
        "PostgreSQL upgraded from {old} to {new_major} in {:.1?}. {howto}",
        started.elapsed()
    );
    Ok(())
}

fn revert_instructions(cfg: &Config, old: u32, new: u32, old_bin: &Path) -> String {
    let state = cfg.paths.state.display();
    format!(
        "The cluster as it was before the upgrade (PostgreSQL {old}) is kept in {state}/pgdata.{old} \
         until the upgraded cluster has run and stopped cleanly once, then deleted at the next \
         start. To go back to PostgreSQL {old} meanwhile (whatever was written since the upgrade is \
         lost): systemctl stop koprogo; mv {state}/pgdata {state}/pgdata.{new}.rejected; \
         mv {state}/pgdata.{old} {state}/pgdata; set postgres.bin_dir = \"{}\" in {}; \
         systemctl start koprogo. To keep the copy longer, move it out of {state} now.\n",
        old_bin.display(),
        cfg.file.display()
    )
}

/// Once the upgraded cluster is ready, in the background: update the extensions to
/// the new major's versions (`ALTER EXTENSION … UPDATE`, what pg_upgrade's
/// update_extensions.sql does) and rebuild optimizer statistics (pg_upgrade does
/// not carry them), like `vacuumdb --all --analyze-in-stages`.
pub fn after_ready(cfg: &Config, db: &Db) {
    let Ok(Some(m)) = read_marker(cfg) else {
        return;
    };
    if m.analyzed {
        return;
    }
    let (cfg, db) = (cfg.clone(), db.clone());
    tokio::spawn(async move {
        let started = Instant::now();
        match after_upgrade(&db).await {
            Ok(n) => {
                tracing::info!(
                    "extensions updated and optimizer statistics rebuilt after the upgrade ({n} databases, {:.1?})",
                    started.elapsed()
                );
                if let Ok(Some(mut m)) = read_marker(&cfg) {
                    m.analyzed = true;
                    let done = if m.backup_removed {
                        remove_marker(&cfg)
                    } else {
                        write_marker(&cfg, &m)
                    };
                    if let Err(e) = done {
                        tracing::warn!("{e:#}");
                    }
                }
            }
            Err(e) => tracing::warn!(
                "updating extensions and statistics after the upgrade failed (tried again at the next start): {e:#}"
            ),
        }
    });
}

async fn after_upgrade(db: &Db) -> Result<usize> {
    let admin = db.connect("postgres").await?;
    let rows = admin
        .query(
            "SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname",
            &[],
        )
        .await?;
    let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    for name in &names {
        let c = db.connect(name).await?;
        let outdated = c
            .query(
                "SELECT e.extname FROM pg_extension e \
                 JOIN pg_available_extensions a ON a.name = e.extname \
                 WHERE a.default_version IS DISTINCT FROM e.extversion",
                &[],
            )
            .await
            .with_context(|| format!("listing extensions in database {name}"))?;
        for row in outdated {
            let ext: String = row.get(0);
            c.batch_execute(&format!(
                "ALTER EXTENSION \"{}\" UPDATE",
                ext.replace('"', "\"\"")
            ))
            .await
            .with_context(|| format!("ALTER EXTENSION {ext} UPDATE in database {name}"))?;
            tracing::info!("extension {ext} updated in database {name}");
        }
        c.batch_execute(
            "SET vacuum_cost_delay = 0;
             SET default_statistics_target = 1; ANALYZE;
             SET default_statistics_target = 10; ANALYZE;
             RESET default_statistics_target; ANALYZE;",
        )
        .await
        .with_context(|| format!("ANALYZE in database {name}"))?;
    }
    Ok(names.len())
}

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

async fn controldata(
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
async fn run_tool(
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
    };
    io.reaper.run(spec, io.log_fd()?).await
}

fn ensure_work_dir(work: &Path) -> Result<()> {
    if work.exists() {
        remove_tree(work)?;
    }
    std::fs::create_dir(work).with_context(|| format!("cannot create {}", work.display()))?;
    std::fs::set_permissions(work, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot chmod {}", work.display()))
}

/// Moves pg_upgrade's log directory out of the new cluster before that is removed;
/// returns where it went (or what to look at).
fn keep_upgrade_logs(cfg: &Config, new: &Path) -> String {
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

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to)
        .with_context(|| format!("cannot move {} to {}", from.display(), to.display()))
}

/// Renames a tree out of the way at once and deletes it in the background (a large
/// cluster takes seconds to delete; the start does not wait). A leftover
/// `*.deleting` is removed by `recover` at the next start.
fn remove_in_background(path: &Path) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let doomed = path.with_file_name(format!("{name}.deleting"));
    rename(path, &doomed)?;
    tokio::task::spawn_blocking(move || {
        if let Err(e) = std::fs::remove_dir_all(&doomed) {
            tracing::warn!("cannot remove {}: {e}", doomed.display());
        }
    });
    Ok(())
}

fn remove_tree(path: &Path) -> Result<()> {
    std::fs::remove_dir_all(path).with_context(|| format!("cannot remove {}", path.display()))
}

/// Bytes used on disk by a directory tree.
fn tree_size(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        for entry in
            std::fs::read_dir(path).with_context(|| format!("cannot read {}", path.display()))?
        {
            let entry = entry.with_context(|| format!("cannot read {}", path.display()))?;
            total += tree_size(&entry.path())?;
        }
    }
    Ok(total)
}

/// Copies a tree (directories, files with their modes, symlinks as symlinks).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(from)
        .with_context(|| format!("cannot read {}", from.display()))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        std::fs::create_dir(to).with_context(|| format!("cannot create {}", to.display()))?;
        for entry in
            std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))?
        {
            let entry = entry.with_context(|| format!("cannot read {}", from.display()))?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        std::fs::set_permissions(to, meta.permissions())
            .with_context(|| format!("cannot chmod {}", to.display()))?;
    } else if ft.is_symlink() {
        let target = std::fs::read_link(from)
            .with_context(|| format!("cannot read the link {}", from.display()))?;
        std::os::unix::fs::symlink(&target, to)
            .with_context(|| format!("cannot create the link {}", to.display()))?;
    } else if ft.is_file() {
        std::fs::copy(from, to)
            .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    }
    // Sockets, fifos: nothing of the cluster's; skipped.
    Ok(())
}

/// Flushes the filesystem holding `path` (one syncfs instead of an fsync per file).
fn sync_fs(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let dir =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: syncfs on a descriptor we own for the duration of the call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot flush the copy {}", path.display()));
    }
    Ok(())
}

fn sync_dir(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot flush {}", path.display()))
}

fn free_bytes(path: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(path)
        .with_context(|| format!("cannot read the free space of {}", path.display()))?;
    Ok(st.blocks_available() * st.fragment_size())
}

fn human(bytes: u64) -> String {
    use crate::config::units::{human_bytes, ByteUnits};
    human_bytes(bytes, ByteUnits::MibCeil)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_in(state: &Path) -> Config {
        let file = state.join("koprogo.toml");
        std::fs::write(
            &file,
            format!(
                "[paths]\nstate = \"{}\"\nlogs = \"{}\"\nrun = \"{}\"\n",
                state.display(),
                state.join("logs").display(),
                state.join("run").display()
            ),
        )
        .expect("write config");
        Config::load(&file).expect("config")
    }

    fn bins(dir: &Path, major: u32) -> Binaries {
        Binaries {
            dir: dir.to_path_buf(),
            major,
            version: format!("postgres (PostgreSQL) {major}.1"),
        }
    }

    fn fake_cluster(dir: &Path, major: u32) {
        std::fs::create_dir_all(dir.join("global")).expect("mkdir");
        std::fs::write(dir.join("PG_VERSION"), format!("{major}\n")).expect("PG_VERSION");
        std::fs::write(dir.join("global").join("pg_control"), b"control").expect("pg_control");
    }

    fn fake_bins(root: &Path, major: u32, tools: &[&str]) -> PathBuf {
        let dir = root.join(major.to_string()).join("bin");
        std::fs::create_dir_all(&dir).expect("mkdir");
        for t in tools {
            std::fs::write(dir.join(t), b"").expect("tool");
        }
        dir
    }

    #[test]
    fn parses_controldata() {
        let text = "pg_control version number:            1300\n\
                    Database cluster state:               shut down\n\
                    Data page checksum version:           0\n";
        assert_eq!(
            parse_controldata(text),
            ControlData {
                state: Some("shut down".into()),
                checksums: Some(0)
            }
        );
        assert_eq!(
            parse_controldata("Database cluster state: in production\n").state,
            Some("in production".into())
        );
    }

    #[test]
    fn old_binaries_sit_next_to_the_new_ones() {
        let b = bins(Path::new("/opt/pg/17/bin"), 17);
        assert_eq!(bin_dir_of(&b, 15), PathBuf::from("/opt/pg/15/bin"));
        let b = bins(Path::new("/usr/local/pgsql/bin"), 17);
        assert_eq!(
            bin_dir_of(&b, 15),
            PathBuf::from("/usr/lib/postgresql/15/bin")
        );
    }

    #[test]
    fn check_refuses_without_the_old_binaries_and_names_the_fix() {
        let d = tempfile::tempdir().expect("tempdir");
        let cfg = cfg_in(d.path());
        let root = d.path().join("pg");
        let new = fake_bins(&root, 17, &["postgres", "pg_upgrade"]);
        // No cluster yet, or the same major: fine.
        assert!(check(&cfg, &bins(&new, 17)).is_ok());
        fake_cluster(&data_dir(&cfg), 15);
        let err = check(&cfg, &bins(&new, 17)).expect_err("old binaries are gone");
        assert!(err.contains("koprogo.toml"), "{err}");
        assert!(err.contains("install postgresql-15 again"), "{err}");
        assert!(err.contains("15/bin/postgres is missing"), "{err}");
        fake_bins(&root, 15, &["postgres", "pg_ctl", "pg_controldata"]);
        assert!(check(&cfg, &bins(&new, 17)).is_ok());
        // A downgrade is never attempted.
        let old = root.join("15").join("bin");
        fake_cluster(&data_dir(&cfg), 17);
        let err = check(&cfg, &bins(&old, 15)).expect_err("downgrade");
        assert!(err.contains("install postgresql-17"), "{err}");
    }

    #[test]
    fn check_wants_pg_upgrade() {
        let d = tempfile::tempdir().expect("tempdir");
        let cfg = cfg_in(d.path());
        let root = d.path().join("pg");
        let new = fake_bins(&root, 17, &["postgres"]);
        fake_bins(&root, 15, &["postgres", "pg_ctl", "pg_controldata"]);
        fake_cluster(&data_dir(&cfg), 15);
        let err = check(&cfg, &bins(&new, 17)).expect_err("no pg_upgrade");
        assert!(err.contains("pg_upgrade is missing"), "{err}");
    }

    #[test]
    fn recover_finishes_an_interrupted_swap() {
        let d = tempfile::tempdir().expect("tempdir");
        let cfg = cfg_in(d.path());
        let st = d.path();
        fake_cluster(&st.join(NEW_DIR), 17);
        fake_cluster(&st.join("pgdata.15.linked"), 15);
        fake_cluster(&st.join("pgdata.15"), 15);
        write_marker(
            &cfg,
            &Marker {
                from: 15,
                to: 17,
                backup: st.join("pgdata.15"),
                upgraded_at: "now".into(),
                started: false,
                backup_removed: false,
                analyzed: false,
            },
        )
        .expect("marker");
        recover(&cfg).expect("recover");
        assert_eq!(cluster_major(&data_dir(&cfg)), Some(17));
        assert!(!st.join(NEW_DIR).exists());
        assert!(!st.join("pgdata.15.linked").exists());
        assert!(st.join("pgdata.15").exists(), "the copy is kept");
    }

    #[test]
    fn recover_restores_the_copy_after_an_interrupted_link() {
        let d = tempfile::tempdir().expect("tempdir");
        let cfg = cfg_in(d.path());
        let st = d.path();
        let data = data_dir(&cfg);
        fake_cluster(&data, 15);
        std::fs::rename(
            data.join("global").join("pg_control"),
            data.join("global").join("pg_control.old"),
        )
        .expect("disable");
        std::fs::write(data.join("half-linked"), b"x").expect("write");
        fake_cluster(&st.join("pgdata.15"), 15);
        fake_cluster(&st.join(NEW_DIR), 17);
        std::fs::create_dir_all(st.join("pgdata.15.copying")).expect("mkdir");
        recover(&cfg).expect("recover");
        assert!(data.join("global").join("pg_control").is_file());
        assert!(!data.join("half-linked").exists(), "the copy came back");
        assert!(!st.join("pgdata.15").exists());
        assert!(!st.join(NEW_DIR).exists());
        assert!(!st.join("pgdata.15.copying").exists());
    }

    #[test]
    fn recover_reenables_an_old_cluster_without_a_copy() {
        let d = tempfile::tempdir().expect("tempdir");
        let cfg = cfg_in(d.path());
        let data = data_dir(&cfg);
        fake_cluster(&data, 15);
        std::fs::rename(
            data.join("global").join("pg_control"),
            data.join("global").join("pg_control.old"),
        )
        .expect("disable");
        recover(&cfg).expect("recover");
        assert!(data.join("global").join("pg_control").is_file());
    }

    #[test]
    fn copies_a_tree_with_modes_and_links() {
        let d = tempfile::tempdir().expect("tempdir");
        let from = d.path().join("a");
        std::fs::create_dir_all(from.join("sub")).expect("mkdir");
        std::fs::write(from.join("sub").join("f"), b"data").expect("write");
        std::fs::set_permissions(
            from.join("sub").join("f"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");
        std::os::unix::fs::symlink("sub/f", from.join("link")).expect("symlink");
        std::fs::set_permissions(&from, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let to = d.path().join("b");
        copy_tree(&from, &to).expect("copy");
        sync_fs(&to).expect("syncfs");
        assert_eq!(
            std::fs::read(to.join("sub").join("f")).expect("read"),
            b"data"
        );
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&to.join("sub").join("f")), 0o600);
        assert_eq!(mode(&to), 0o700);
        assert_eq!(
            std::fs::read_link(to.join("link")).expect("link"),
            PathBuf::from("sub/f")
        );
        assert!(tree_size(&to).expect("size") > 0);
    }

    #[test]
    fn revert_instructions_name_every_step() {
        let d = tempfile::tempdir().expect("tempdir");
        let cfg = cfg_in(d.path());
        let text = revert_instructions(&cfg, 15, 17, Path::new("/usr/lib/postgresql/15/bin"));
        let st = d.path().display().to_string();
        for needle in [
            "systemctl stop koprogo".to_string(),
            format!("mv {st}/pgdata.15 {st}/pgdata"),
            "postgres.bin_dir = \"/usr/lib/postgresql/15/bin\"".to_string(),
            "koprogo.toml".to_string(),
        ] {
            assert!(text.contains(&needle), "{needle} missing in {text}");
        }
    }
}
