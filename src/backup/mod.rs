//! Backups and restore. One backup is one file, `<backup.dir>/koprogo-<UTC>.kbk`
//! (0600; `.kbk.age` when encrypted to `backup.encrypt_to`): a tar holding the
//! database (`pg_dump -Fc`), the uploads and secrets.env, with a manifest of
//! versions, row counts and checksums (see [`archive`]), authenticated with the
//! appliance's backup key (see [`auth`]). The supervisor makes them
//! (daily at `backup.schedule`, or on `koprogo backup create`), checks them
//! (`backup verify`: restored into a scratch database) and restores them
//! (`koprogo restore FILE`, with a safety backup first and a rollback on failure).
//! A dump is only replayed once its file is authenticated (or explicitly trusted),
//! and then as an ordinary PostgreSQL role, never the superuser.
//! Children (pg_dump, pg_restore, the copy hook) go through the one reaper.
//!
//! One operation runs at a time; the others wait their turn.

pub mod archive;
pub mod auth;
pub mod child;
pub mod create;
pub mod crypt;
pub mod restore;
pub mod retention;
pub mod schedule;
pub mod verify;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use postgres_protocol::escape::escape_identifier;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::postgres::binaries::Binaries;
use crate::postgres::Db;
use crate::process::reaper::Reaper;
use crate::process::service::Cmd;
use crate::process::state::{Phase, ServiceState};
use crate::sync::LockExt;

/// Scratch databases: `verify` restores into `koprogo_verify_*`, `restore` into
/// `koprogo_restore_*`; the database a restore replaced is `koprogo_prev_*` until
/// the API is ready on the new one.
pub const VERIFY_DB_PREFIX: &str = "koprogo_verify_";
pub const RESTORE_DB_PREFIX: &str = "koprogo_restore_";
pub const PREV_DB_PREFIX: &str = "koprogo_prev_";

/// A failed scheduled backup is tried again after this (until the next daily run).
const RETRY_AFTER: Duration = Duration::from_secs(3600);
/// When the newest backup is older than a day at boot (the machine was off at the
/// scheduled time), one is made after this much uptime.
const CATCH_UP_AFTER: Duration = Duration::from_secs(15 * 60);

/// Why a backup is made (part of its manifest; pre-restore ones are also named so).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Scheduled,
    Manual,
    PreRestore,
    /// Before an application update swaps the API server (its migrations make a
    /// rollback need this backup).
    PreUpdate,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Scheduled => "scheduled",
            Reason::Manual => "manual",
            Reason::PreRestore => "pre-restore",
            Reason::PreUpdate => "pre-update",
        }
    }
}

/// The last good backup, as `status --json` shows it (`timestamp_seconds` is what
/// `koprogo_last_backup_timestamp_seconds` exports).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LastBackup {
    pub file: String,
    pub size_bytes: u64,
    /// RFC 3339 UTC.
    pub time: String,
    pub timestamp_seconds: i64,
    /// How long it took (None when only found on disk at boot).
    pub duration_secs: Option<f64>,
}

/// `status --json` → `backup`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BackupStatus {
    /// The daily schedule runs.
    pub enabled: bool,
    pub dir: String,
    pub schedule: String,
    pub encrypted: bool,
    /// RFC 3339 local time of the next scheduled backup.
    pub next_run: Option<String>,
    pub next_run_unix: Option<i64>,
    /// The operation running now ("backup", "verify", "restore").
    pub running: Option<String>,
    pub last_success: Option<LastBackup>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    /// The copy hook's last failure (the backup itself was kept).
    pub last_copy_error: Option<String>,
    /// Backup files in the directory.
    pub count: usize,
}

/// The backup machinery of a running supervisor.
pub struct Backups {
    pub(crate) cfg: Arc<Config>,
    pub(crate) bins: Binaries,
    pub(crate) db: Db,
    pub(crate) reaper: Reaper,
    pub(crate) postgres: watch::Receiver<ServiceState>,
    /// Every API instance (a restore stops and starts them all).
    pub(crate) api_cmds: Vec<mpsc::Sender<Cmd>>,
    pub(crate) api: Vec<watch::Receiver<ServiceState>>,
    op: tokio::sync::Mutex<()>,
    status: Mutex<BackupStatus>,
    seq: AtomicU64,
}

pub fn utc_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Sizes of files and directories: B, KiB, MiB or GiB.
pub fn human_size(b: u64) -> String {
    crate::config::units::human_bytes(b, crate::config::units::ByteUnits::All)
}

/// Where operations stage files (same filesystem as the uploads, for the swap).
pub fn work_dir(cfg: &Config) -> PathBuf {
    cfg.paths.state.join("backup-work")
}

impl Backups {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Arc<Config>,
        bins: Binaries,
        db: Db,
        reaper: Reaper,
        postgres: watch::Receiver<ServiceState>,
        api_cmds: Vec<mpsc::Sender<Cmd>>,
        api: Vec<watch::Receiver<ServiceState>>,
    ) -> Arc<Backups> {
        let b = &cfg.backup;
        let mut st = BackupStatus {
            enabled: b.enabled,
            dir: b.dir.display().to_string(),
            schedule: b.schedule.clone(),
            encrypted: b.encrypt_to.is_some(),
            ..Default::default()
        };
        if let Ok(list) = retention::list(&b.dir) {
            st.count = list.len();
            if let Some(e) = list.iter().find(|e| e.good()) {
                st.last_success = Some(LastBackup {
                    file: e.path.display().to_string(),
                    size_bytes: e.size,
                    time: rfc3339(e.mtime),
                    timestamp_seconds: unix(e.mtime),
                    duration_secs: None,
                });
            }
        }
        Arc::new(Backups {
            cfg,
            bins,
            db,
            reaper,
            postgres,
            api_cmds,
            api,
            op: tokio::sync::Mutex::new(()),
            status: Mutex::new(st),
            seq: AtomicU64::new(0),
        })
    }

    pub fn status(&self) -> BackupStatus {
        self.status.locked().clone()
    }

    fn set_status(&self, f: impl FnOnce(&mut BackupStatus)) {
        {
            let mut s = self.status.locked();
            f(&mut s);
        }
    }

    /// A number unique within this supervisor's life, for scratch names.
    pub(crate) fn next_id(&self) -> String {
        format!(
            "{}_{}",
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed)
        )
    }

    pub(crate) fn postgres_ready(&self) -> Result<()> {
        let st = self.postgres.borrow();
        if st.phase != Phase::Ready {
            anyhow::bail!(
                "PostgreSQL is not ready (it is {:?}): try again once `koprogo status` shows it ready",
                st.phase
            );
        }
        Ok(())
    }

    /// Runs `op` alone (operations queue behind each other), showing it in status.
    async fn exclusive<T>(
        &self,
        what: &str,
        op: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let _guard = self.op.lock().await;
        self.set_status(|s| s.running = Some(what.to_string()));
        let r = op.await;
        self.set_status(|s| s.running = None);
        r
    }

    /// `koprogo backup create` and the schedule: a backup, then retention and the
    /// copy hook. Returns the message for the operator.
    pub async fn create_now(&self, reason: Reason) -> Result<String> {
        self.create_file(reason).await.map(|(msg, _)| msg)
    }

    /// `create_now`, also returning the file written.
    pub async fn create_file(&self, reason: Reason) -> Result<(String, PathBuf)> {
        let started = Instant::now();
        let r = self
            .exclusive("backup", async {
                let made = create::create(self, reason).await?;
                let (pruned, problems) = retention::prune(
                    &self.cfg.backup.dir,
                    self.cfg.backup.keep,
                    self.cfg.backup.max_age,
                    Some(&made.path),
                    SystemTime::now(),
                );
                for p in &problems {
                    tracing::warn!("backup retention: {p}");
                }
                let copy = match &self.cfg.backup.copy_command {
                    Some(cmd) => Some(create::copy_hook(self, cmd, &made.path).await),
                    None => None,
                };
                Ok((made, pruned, copy))
            })
            .await;
        match r {
            Ok((made, pruned, copy)) => {
                let secs = started.elapsed().as_secs_f64();
                let now = SystemTime::now();
                let count = retention::list(&self.cfg.backup.dir)
                    .map(|l| l.len())
                    .unwrap_or(0);
                self.set_status(|s| {
                    s.last_success = Some(LastBackup {
                        file: made.path.display().to_string(),
                        size_bytes: made.size,
                        time: rfc3339(now),
                        timestamp_seconds: unix(now),
                        duration_secs: Some(secs),
                    });
                    s.last_error = None;
                    s.last_error_at = None;
                    s.count = count;
                    if let Some(c) = &copy {
                        s.last_copy_error = c.as_ref().err().cloned();
                    }
                });
                let mut msg = format!(
                    "backup written: {} ({}, {:.1}s): {}",
                    made.path.display(),
                    human_size(made.size),
                    secs,
                    made.summary
                );
                if !pruned.is_empty() {
                    msg.push_str(&format!("; retention deleted {}", pruned.join(", ")));
                }
                match copy {
                    Some(Ok(())) => msg.push_str("; copy command succeeded"),
                    Some(Err(e)) => msg.push_str(&format!("; copy command FAILED: {e}")),
                    None => {}
                }
                tracing::info!("{msg}");
                Ok((msg, made.path))
            }
            Err(e) => {
                let msg = format!("backup failed: {e:#}");
                tracing::error!("{msg}");
                self.set_status(|s| {
                    s.last_error = Some(msg.clone());
                    s.last_error_at = Some(utc_now());
                });
                Err(anyhow::anyhow!(msg))
            }
        }
    }

    /// `koprogo backup verify [FILE]`: `file` is read, the result is recorded for
    /// `record_as` (the encrypted original of a decrypted copy) or `file`.
    pub async fn verify(
        &self,
        file: Option<PathBuf>,
        record_as: Option<PathBuf>,
        trust: auth::Trust,
    ) -> Result<String> {
        self.exclusive("verify", async {
            let file = match file {
                Some(f) => f,
                None => newest(&self.cfg.backup.dir)?,
            };
            let record = record_as.unwrap_or_else(|| file.clone());
            verify::verify(self, &file, &record, &trust).await
        })
        .await
    }

    /// `koprogo restore FILE`.
    pub async fn restore(
        &self,
        file: PathBuf,
        label: Option<String>,
        force: bool,
        trust: auth::Trust,
    ) -> Result<String> {
        let label = label.unwrap_or_else(|| file.display().to_string());
        self.exclusive(
            "restore",
            restore::restore(self, &file, &label, force, &trust),
        )
        .await
    }

    /// The daily schedule (and the boot-time cleanup of what a crash left).
    pub async fn run_scheduler(self: Arc<Self>) {
        self.cleanup_at_boot().await;
        if !self.cfg.backup.enabled {
            tracing::info!("scheduled backups are off (backup.enabled = false)");
            return;
        }
        let Ok((h, m)) = schedule::parse_time(&self.cfg.backup.schedule) else {
            return;
        };
        let booted = Instant::now();
        let stale = self
            .status()
            .last_success
            .is_none_or(|l| unix(SystemTime::now()) - l.timestamp_seconds > 86400);
        let mut catch_up = stale.then(|| booted + CATCH_UP_AFTER);
        let mut retry: Option<Instant> = None;
        loop {
            let daily = schedule::next_local(h, m);
            let until_daily = (daily - chrono::Local::now()).to_std().unwrap_or_default();
            let mut due = Instant::now() + until_daily;
            for t in [catch_up, retry].into_iter().flatten() {
                due = due.min(t);
            }
            let when = chrono::Local::now()
                + chrono::Duration::from_std(due.saturating_duration_since(Instant::now()))
                    .unwrap_or_default();
            self.set_status(|s| {
                s.next_run = Some(when.to_rfc3339_opts(chrono::SecondsFormat::Secs, false));
                s.next_run_unix = Some(when.timestamp());
            });
            // Sleep in short steps: the wall clock may jump (suspend, NTP, DST).
            loop {
                let now = Instant::now();
                if now >= due || chrono::Local::now() >= daily {
                    break;
                }
                tokio::time::sleep((due - now).min(Duration::from_secs(60))).await;
            }
            catch_up = None;
            match self.create_now(Reason::Scheduled).await {
                Ok(_) => retry = None,
                Err(_) => {
                    tracing::warn!(
                        "the scheduled backup failed: trying again in {} min",
                        RETRY_AFTER.as_secs() / 60
                    );
                    retry = Some(Instant::now() + RETRY_AFTER);
                }
            }
        }
    }

    /// Removes what an interrupted run left: staging directories, partial files,
    /// scratch databases. A replaced database (`koprogo_prev_*`) is left alone and
    /// reported: it may be the only copy of the data before an interrupted restore.
    async fn cleanup_at_boot(&self) {
        let work = work_dir(&self.cfg);
        if work.exists() {
            if let Err(e) = std::fs::remove_dir_all(&work) {
                tracing::warn!("cannot remove {}: {e}", work.display());
            }
        }
        if let Ok(rd) = std::fs::read_dir(&self.cfg.backup.dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(".koprogo-") && name.ends_with(".part") {
                    tracing::info!("removing the partial backup {name} left by an interrupted run");
                    let _ = std::fs::remove_file(e.path());
                }
                // A decrypted copy whose `koprogo` command was killed (a day gives
                // any running restore time to finish).
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|a| a > Duration::from_secs(86400));
                if name.starts_with(".decrypted-") && old {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let mut pg = self.postgres.clone();
        if pg.wait_for(|s| s.phase == Phase::Ready).await.is_err() {
            return;
        }
        let Ok(admin) = self.db.connect_admin().await else {
            return;
        };
        // An external server may be shared by several appliances: only our role's
        // scratch databases, and never one in use (no FORCE): it may be another
        // node's running verify.
        let external = self.db.external().is_some();
        let sql = if external {
            "SELECT datname FROM pg_database WHERE datname LIKE 'koprogo\\_%' \
               AND pg_get_userbyid(datdba) = current_user"
        } else {
            "SELECT datname FROM pg_database WHERE datname LIKE 'koprogo\\_%'"
        };
        let force = if external { "" } else { " WITH (FORCE)" };
        let Ok(rows) = admin.query(sql, &[]).await else {
            return;
        };
        for r in rows {
            let name: String = r.get(0);
            if name.starts_with(VERIFY_DB_PREFIX) || name.starts_with(RESTORE_DB_PREFIX) {
                tracing::info!("dropping the scratch database {name} left by an interrupted run");
                let _ = admin
                    .batch_execute(&format!(
                        "DROP DATABASE IF EXISTS {}{force}",
                        escape_identifier(&name)
                    ))
                    .await;
            } else if name.starts_with(PREV_DB_PREFIX) {
                tracing::warn!(
                    "database {name} is the data a restore replaced and was not cleaned up \
                     (interrupted restore?): check the site, then drop it with `koprogo psql`"
                );
            }
        }
    }
}

/// The newest backup in `dir`.
pub fn newest(dir: &Path) -> Result<PathBuf> {
    let list =
        retention::list(dir).map_err(|e| anyhow::anyhow!("cannot list {}: {e}", dir.display()))?;
    list.first().map(|e| e.path.clone()).ok_or_else(|| {
        anyhow::anyhow!(
            "no backup in {}: make one with `koprogo backup create`",
            dir.display()
        )
    })
}
