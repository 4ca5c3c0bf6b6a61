//! The upgrade itself: [`upgrade`] runs the numbered steps of the module comment of
//! [`super`] in order, one method of [`Upgrade`] per step (step 1 is
//! [`super::check`]; the end of step 6 is [`super::settle`] at a later start).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::tools::{controldata, ensure_work_dir, keep_upgrade_logs, run_tool};
use super::{
    backup_dir, bin_dir_of, check, readme_path, write_marker, Marker, DISK_MARGIN, NEW_DIR,
    WORK_DIR,
};
use crate::config::Config;
use crate::fsutil::tree::{
    copy_tree, remove_in_background, remove_tree, rename, sync_dir, sync_fs, tree_size,
};
use crate::fsutil::{disk_usage, write_atomic};
use crate::postgres::binaries::Binaries;
use crate::postgres::cluster::{self, data_dir, SUPERUSER};
use crate::process::service::ServiceIo;

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

/// Upgrades the cluster (PostgreSQL `old`) to the major of `bins`.
pub(super) async fn upgrade(cfg: &Config, bins: &Binaries, io: &ServiceIo, old: u32) -> Result<()> {
    check(cfg, bins).map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    let state = &cfg.paths.state;
    let up = Upgrade {
        cfg,
        bins,
        io,
        old,
        new_major: bins.major,
        state,
        data: data_dir(cfg),
        new: state.join(NEW_DIR),
        backup: backup_dir(cfg, old),
        old_bin: bin_dir_of(bins, old),
        work: state.join(WORK_DIR),
    };
    let new_major = up.new_major;
    let _extend = StartExtender::start(format!(
        "upgrading PostgreSQL {old} to {new_major} (pg_upgrade)"
    ));
    tracing::warn!(
        "the cluster in {} is PostgreSQL {old} and the binaries are PostgreSQL {new_major}: upgrading it \
         (backup copy, pg_upgrade --link); pg_upgrade's output goes to {}",
        up.data.display(),
        up.postgres_log().display()
    );
    // A postmaster left running by an earlier supervisor would make pg_upgrade fail.
    cluster::clear_stale_pid(cfg).await?;

    let size = up.check_disk_space().await?;
    up.new_cluster().await?;
    up.pg_upgrade_check().await?;
    up.copy_old_cluster(size).await?;
    up.link().await?;
    up.swap()?;
    up.say_how_to_go_back(started)
}

/// One upgrade from `old` to `new_major`: the directories and binaries every step uses.
struct Upgrade<'a> {
    cfg: &'a Config,
    bins: &'a Binaries,
    io: &'a ServiceIo,
    old: u32,
    new_major: u32,
    state: &'a Path,
    /// The cluster (`pgdata`).
    data: PathBuf,
    /// The new cluster being built ([`NEW_DIR`]).
    new: PathBuf,
    /// The copy of the old cluster (`pgdata.<old>`).
    backup: PathBuf,
    old_bin: PathBuf,
    /// pg_upgrade's working directory ([`WORK_DIR`]).
    work: PathBuf,
}

impl Upgrade<'_> {
    fn postgres_log(&self) -> PathBuf {
        self.cfg.paths.logs.join("postgres.log")
    }

    /// Step 2: room for the copy and the new cluster's own files. Returns the size
    /// of the cluster.
    async fn check_disk_space(&self) -> Result<u64> {
        let (old, new_major, state) = (self.old, self.new_major, self.state);
        let size = {
            let data = self.data.clone();
            tokio::task::spawn_blocking(move || tree_size(&data))
                .await
                .context("measuring the cluster")??
        };
        let need = size + size / 10 + DISK_MARGIN;
        let free = disk_usage(state)
            .with_context(|| format!("cannot read the free space of {}", state.display()))?
            .available;
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
        Ok(size)
    }

    /// Step 3, first half: the new cluster, made like ours, with the old one's
    /// checksum setting and our access rules.
    async fn new_cluster(&self) -> Result<()> {
        let (old, new_major, new) = (self.old, self.new_major, &self.new);
        let old_control = controldata(self.cfg, self.io, &self.old_bin, &self.data).await?;
        if new.exists() {
            remove_tree(new)?;
        }
        let mut args = cluster::initdb_args(new);
        match old_control.checksums {
            Some(v) if v > 0 => args.push("--data-checksums".into()),
            // PostgreSQL 18's initdb enables checksums by default; pg_upgrade needs a match.
            _ if new_major >= 18 => args.push("--no-data-checksums".into()),
            _ => {}
        }
        let exit = run_tool(
            self.cfg,
            self.io,
            self.bins.tool("initdb"),
            args,
            self.state.to_path_buf(),
        )
        .await?;
        if !exit.success() {
            let _ = std::fs::remove_dir_all(new);
            bail!(
                "upgrading PostgreSQL {old} to {new_major}: initdb of the new cluster failed ({exit}): see {}",
                self.postgres_log().display()
            );
        }
        // Same access rules as the old cluster (our managed files), so pg_upgrade's
        // connections as the superuser work on both.
        for f in ["pg_hba.conf", "pg_ident.conf"] {
            std::fs::copy(self.data.join(f), new.join(f))
                .with_context(|| format!("cannot copy {} into {}", f, new.display()))?;
        }
        Ok(())
    }

    /// pg_upgrade's arguments (`--link`; `--check` only checks).
    fn pg_upgrade_args(&self, check: bool) -> Vec<String> {
        let mut a = vec![
            "--old-bindir".to_string(),
            self.old_bin.display().to_string(),
            "--new-bindir".into(),
            self.bins.dir.display().to_string(),
            "--old-datadir".into(),
            self.data.display().to_string(),
            "--new-datadir".into(),
            self.new.display().to_string(),
            "--username".into(),
            SUPERUSER.into(),
            "--socketdir".into(),
            self.cfg.paths.run.display().to_string(),
            "--link".into(),
            "--jobs".into(),
            crate::postgres::tuning::cores().max(1).to_string(),
        ];
        if check {
            a.push("--check".into());
        }
        a
    }

    async fn run_pg_upgrade(&self, check: bool) -> Result<crate::process::reaper::Exit> {
        run_tool(
            self.cfg,
            self.io,
            self.bins.tool("pg_upgrade"),
            self.pg_upgrade_args(check),
            self.work.clone(),
        )
        .await
    }

    /// Step 3, second half: `pg_upgrade --check`; on a problem the new cluster goes
    /// and nothing else has changed.
    async fn pg_upgrade_check(&self) -> Result<()> {
        let (old, new_major) = (self.old, self.new_major);
        ensure_work_dir(&self.work)?;
        let exit = self.run_pg_upgrade(true).await?;
        if !exit.success() {
            let logs = keep_upgrade_logs(self.cfg, &self.new);
            let _ = std::fs::remove_dir_all(&self.new);
            let _ = std::fs::remove_dir_all(&self.work);
            bail!(
                "upgrading PostgreSQL {old} to {new_major}: pg_upgrade --check found a problem ({exit}); \
                 nothing was changed. See {} and {}; fix it, or set postgres.bin_dir = \"{}\" in {} to \
                 stay on PostgreSQL {old}",
                self.postgres_log().display(),
                logs,
                self.old_bin.display(),
                self.cfg.file.display()
            );
        }
        Ok(())
    }

    /// Step 4: the backup, a copy of the stopped cluster of `size` bytes, complete
    /// before anything changes.
    async fn copy_old_cluster(&self, size: u64) -> Result<()> {
        let (old, backup) = (self.old, &self.backup);
        if backup.exists() {
            tracing::warn!(
                "replacing {} (a copy from an earlier attempt)",
                backup.display()
            );
            remove_tree(backup)?;
        }
        let copying = self.state.join(format!("pgdata.{old}.copying"));
        tracing::info!(
            "copying the PostgreSQL {old} cluster ({}) to {}",
            human(size),
            backup.display()
        );
        {
            let (from, to) = (self.data.clone(), copying.clone());
            tokio::task::spawn_blocking(move || copy_tree(&from, &to).and_then(|()| sync_fs(&to)))
                .await
                .context("copying the cluster")??;
        }
        rename(&copying, backup)
    }

    /// Step 5, first half: `pg_upgrade --link`; on failure the copy is put back if
    /// linking had disabled the old cluster.
    async fn link(&self) -> Result<()> {
        let (old, new_major, data) = (self.old, self.new_major, &self.data);
        let exit = self.run_pg_upgrade(false).await?;
        if !exit.success() {
            let logs = keep_upgrade_logs(self.cfg, &self.new);
            let _ = std::fs::remove_dir_all(&self.new);
            let _ = std::fs::remove_dir_all(&self.work);
            // Linking disables the old cluster: put the copy back.
            if data.join("global").join("pg_control.old").exists() {
                remove_tree(data)?;
                rename(&self.backup, data)?;
            }
            bail!(
                "upgrading PostgreSQL {old} to {new_major}: pg_upgrade failed ({exit}); the PostgreSQL \
                 {old} cluster is back as it was. See {} and {}; fix it, or set postgres.bin_dir = \"{}\" \
                 in {} to stay on PostgreSQL {old}",
                self.postgres_log().display(),
                logs,
                self.old_bin.display(),
                self.cfg.file.display()
            );
        }
        let _ = std::fs::remove_dir_all(&self.work);
        Ok(())
    }

    /// Step 5, second half: record, then swap: pgdata (linked old) out, the new
    /// cluster in.
    fn swap(&self) -> Result<()> {
        let marker = Marker {
            from: self.old,
            to: self.new_major,
            backup: self.backup.clone(),
            upgraded_at: chrono::Utc::now().to_rfc3339(),
            started: false,
            backup_removed: false,
            analyzed: false,
        };
        write_marker(self.cfg, &marker)?;
        let linked = self.state.join(format!("pgdata.{}.linked", self.old));
        rename(&self.data, &linked)?;
        rename(&self.new, &self.data)?;
        sync_dir(self.state)?;
        remove_in_background(&linked)
    }

    /// Step 6, at once: the log and `pgdata.<old>.README` say how to go back while
    /// the copy is kept.
    fn say_how_to_go_back(&self, started: Instant) -> Result<()> {
        let (old, new_major) = (self.old, self.new_major);
        let howto = revert_instructions(self.cfg, old, new_major, &self.old_bin);
        let readme = readme_path(self.cfg, old);
        write_atomic(&readme, howto.as_bytes(), 0o640)
            .with_context(|| format!("cannot write {}", readme.display()))?;
        tracing::warn!(
            "PostgreSQL upgraded from {old} to {new_major} in {:.1?}. {howto}",
            started.elapsed()
        );
        Ok(())
    }
}

pub(super) fn revert_instructions(cfg: &Config, old: u32, new: u32, old_bin: &Path) -> String {
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

fn human(bytes: u64) -> String {
    use crate::config::units::{human_bytes, ByteUnits};
    human_bytes(bytes, ByteUnits::MibCeil)
}
