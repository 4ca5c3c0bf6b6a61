//! After the upgrade (the end of step 6): the copy of the old cluster is deleted
//! once the upgraded one has run and stopped cleanly, and the extensions and the
//! optimizer statistics are brought up to date in the background.

use std::time::Instant;

use anyhow::{Context, Result};

use super::tools::controldata;
use super::{marker_path, read_marker, readme_path, remove_marker, write_marker};
use crate::config::Config;
use crate::fsutil::tree::remove_in_background;
use crate::postgres::binaries::Binaries;
use crate::postgres::cluster::{cluster_major, data_dir};
use crate::postgres::Db;
use crate::process::service::ServiceIo;

/// The cluster is on the right major: after an upgrade, count its clean starts and
/// delete the copy once it has stopped cleanly.
pub(super) async fn settle(cfg: &Config, bins: &Binaries, io: &ServiceIo) -> Result<()> {
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
                "ALTER EXTENSION {} UPDATE",
                postgres_protocol::escape::escape_identifier(&ext)
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
