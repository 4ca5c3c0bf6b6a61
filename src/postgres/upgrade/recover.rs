//! Putting the directories back into a known state after a run that was killed or
//! failed in the middle of an upgrade: every step is safe to interrupt.

use anyhow::{Context, Result};

use super::{backup_dir, read_marker, NEW_DIR, WORK_DIR};
use crate::config::Config;
use crate::fsutil::tree::{remove_tree, rename};
use crate::postgres::cluster::{cluster_major, data_dir};

/// Puts the directories back into a known state after a run that was killed or
/// failed in the middle of an upgrade.
pub(super) fn recover(cfg: &Config) -> Result<()> {
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
