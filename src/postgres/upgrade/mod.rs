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
//!
//! Here: the record of an upgrade and [`check`] (step 1); [`steps`] runs steps 2 to
//! 6, [`settle`] ends step 6 at the following starts, [`recover`] cleans up after an
//! interrupted run, [`tools`] runs pg_controldata and the other PostgreSQL tools.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::binaries::{Binaries, DEBIAN_ROOT};
use super::cluster::{cluster_major, data_dir};
use crate::config::Config;
use crate::fsutil::write_atomic;
use crate::process::service::ServiceIo;

mod recover;
mod settle;
mod steps;
mod tools;

pub use settle::after_ready;
pub use tools::{parse_controldata, ControlData};

#[cfg(test)]
mod tests;

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

/// Step 1, and what `check` and `run` say about the cluster's major against the binaries':
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
    recover::recover(cfg)?;
    let data = data_dir(cfg);
    match cluster_major(&data) {
        None => Ok(()),
        Some(m) if m == bins.major => settle::settle(cfg, bins, io).await,
        Some(m) if m < bins.major => {
            steps::upgrade(cfg, bins, io, m).await?;
            settle::settle(cfg, bins, io).await
        }
        Some(_) => check(cfg, bins).map_err(anyhow::Error::msg),
    }
}
