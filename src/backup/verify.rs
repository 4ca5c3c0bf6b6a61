//! `koprogo backup verify`: every byte checked (see `archive`), then the dump
//! restored into a scratch database and its row counts compared with the
//! manifest's, then the scratch database dropped. The outcome is kept next to the
//! file for `backup list`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::Signal;

use super::archive::{self, Extract, Manifest};
use super::create::{pg_args, row_counts};
use super::retention::{write_marker, Marker};
use super::{child, work_dir, Backups, VERIFY_DB_PREFIX};
use crate::fsutil::ensure_dir;

use crate::supervisor::reaper::ChildSpec;

pub const PG_RESTORE_LIMIT: Duration = Duration::from_secs(6 * 3600);

/// Creates database `name` (owned by the application role) and restores `dump`
/// into it, then compares its row counts with the manifest's. Returns a summary.
/// On error the database may exist: the caller drops it.
pub(crate) async fn restore_into(
    b: &Backups,
    dump: &Path,
    name: &str,
    manifest: &Manifest,
) -> Result<String> {
    let admin =
        b.db.connect_admin()
            .await
            .context("cannot connect to PostgreSQL")?;
    let owner =
        b.db.app_owner()
            .map(|o| format!(" OWNER {o}"))
            .unwrap_or_default();
    if let Err(e) = admin
        .batch_execute(&format!(
            "CREATE DATABASE \"{name}\"{owner} ENCODING 'UTF8' TEMPLATE template0"
        ))
        .await
    {
        let why = crate::postgres::describe(&e);
        match b.db.external() {
            // The scratch database lives next to the real one: the role needs CREATEDB.
            Some(url) => bail!(
                "cannot create the scratch database {name} on {}:{} ({why}): `backup verify` and `restore` \
                 load the dump into a scratch database on the server: ask the DBA to run \
                 ALTER ROLE {} CREATEDB;",
                url.host,
                url.port,
                url.user
            ),
            None => bail!("cannot create the scratch database {name}: {why}"),
        }
    }
    drop(admin);
    let jobs = crate::postgres::tuning::cores().clamp(1, 4);
    let (mut args, env) = pg_args(b, name)?;
    if b.db.external().is_some() {
        // The external role owns what it restores (a dump made by the private
        // cluster names the role koprogo), and skips what only a superuser may create.
        let list = external_toc(b, dump, &env).await?;
        args.extend([
            "--no-owner".into(),
            "--no-privileges".into(),
            "-L".into(),
            list.display().to_string(),
        ]);
    }
    args.extend([
        "--exit-on-error".into(),
        "-j".into(),
        jobs.to_string(),
        dump.display().to_string(),
    ]);
    let spec = ChildSpec {
        program: b.bins.tool("pg_restore"),
        args,
        env,
        cwd: dump.parent().unwrap_or(Path::new("/")).to_path_buf(),
        death_signal: Signal::SIGKILL,
        as_api_user: false,
    };
    let out = child::run(&b.reaper, spec, PG_RESTORE_LIMIT).await?;
    if !out.exit.success() {
        bail!("pg_restore failed ({}): {}", out.exit, out.last_line());
    }
    let c =
        b.db.connect(name)
            .await
            .with_context(|| format!("cannot connect to {name}"))?;
    let counts = row_counts(&c).await?;
    drop(c);
    let want = &manifest.postgres.tables;
    for (t, n) in want {
        match counts.get(t) {
            None => bail!("table {t} is missing after pg_restore"),
            Some(got) if got != n => {
                bail!("table {t} has {got} rows after pg_restore, the manifest says {n}")
            }
            _ => {}
        }
    }
    if let Some(extra) = counts.keys().find(|t| !want.contains_key(*t)) {
        bail!("table {extra} after pg_restore is not in the manifest");
    }
    Ok(format!(
        "{} tables, {} rows, every count as in the manifest",
        counts.len(),
        counts.values().sum::<i64>()
    ))
}

/// Extensions a dump of the private cluster holds that an external server's
/// ordinary role cannot create (not trusted); KoproGo does not need them.
const UNTRUSTED_EXTENSIONS: &[&str] = &["pg_stat_statements"];

/// A TOC line of the extension itself (`EXTENSION - NAME`) or of its comment
/// (`COMMENT - EXTENSION NAME`).
fn names_untrusted_extension(line: &str) -> bool {
    if line.starts_with(';') {
        return false;
    }
    let t: Vec<&str> = line.split_whitespace().collect();
    UNTRUSTED_EXTENSIONS.iter().any(|e| {
        t.windows(3).any(|w| w == ["EXTENSION", "-", e])
            || (t.contains(&"COMMENT") && t.windows(2).any(|w| w == ["EXTENSION", e]))
    })
}

/// `pg_restore -l` of `dump` without the entries of [`UNTRUSTED_EXTENSIONS`],
/// written next to the dump; returns its path.
async fn external_toc(
    b: &Backups,
    dump: &Path,
    env: &[(String, String)],
) -> Result<std::path::PathBuf> {
    let list = dump.with_extension("toc");
    let spec = ChildSpec {
        program: b.bins.tool("pg_restore"),
        args: vec![
            "-l".into(),
            "-f".into(),
            list.display().to_string(),
            dump.display().to_string(),
        ],
        env: env.to_vec(),
        cwd: dump.parent().unwrap_or(Path::new("/")).to_path_buf(),
        death_signal: Signal::SIGKILL,
        as_api_user: false,
    };
    let out = child::run(&b.reaper, spec, Duration::from_secs(600)).await?;
    if !out.exit.success() {
        bail!("pg_restore -l failed ({}): {}", out.exit, out.last_line());
    }
    let text = std::fs::read_to_string(&list)
        .with_context(|| format!("cannot read {}", list.display()))?;
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !names_untrusted_extension(l))
        .collect();
    std::fs::write(&list, kept.join("\n") + "\n")
        .with_context(|| format!("cannot write {}", list.display()))?;
    Ok(list)
}

pub(crate) async fn drop_database(b: &Backups, name: &str) {
    match b.db.connect_admin().await {
        Ok(admin) => {
            if let Err(e) = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .await
            {
                tracing::warn!("cannot drop the scratch database {name}: {e:#}");
            }
        }
        Err(e) => tracing::warn!("cannot drop the scratch database {name}: {e:#}"),
    }
}

/// Refuses a dump pg_restore here cannot read.
pub(crate) fn check_postgres_major(b: &Backups, m: &Manifest, file: &str) -> Result<()> {
    if m.postgres.major > b.bins.major {
        bail!(
            "{file}: made with PostgreSQL {} but this cluster is {}: pg_restore {} cannot read it; \
             restore it on a machine with PostgreSQL {} or newer",
            m.postgres.major,
            b.bins.major,
            b.bins.major,
            m.postgres.major
        );
    }
    Ok(())
}

pub(crate) async fn verify(b: &Backups, file: &Path, record: &Path) -> Result<String> {
    b.postgres_ready()?;
    let started = Instant::now();
    let id = b.next_id();
    let stage = work_dir(&b.cfg).join(format!("verify-{id}"));
    ensure_dir(&stage, 0o700).with_context(|| format!("cannot create {}", stage.display()))?;
    let scratch = format!("{VERIFY_DB_PREFIX}{id}");
    let r = verify_in(b, file, record, &stage, &scratch).await;
    drop_database(b, &scratch).await;
    let _ = std::fs::remove_dir_all(&stage);
    let shown = record.display().to_string();
    let marker = |ok: bool, detail: String| Marker {
        at: super::utc_now(),
        how: "restored".into(),
        ok,
        detail,
    };
    match r {
        Ok(summary) => {
            let msg = format!(
                "{shown}: good ({summary}; checked in {:.1}s)",
                started.elapsed().as_secs_f64()
            );
            write_marker(record, &marker(true, summary));
            tracing::info!("backup verify: {msg}");
            Ok(msg)
        }
        Err(e) => {
            // A file we could not even open is not marked (it may not be ours).
            if record.exists() {
                write_marker(record, &marker(false, format!("{e:#}")));
            }
            tracing::error!("backup verify: {shown}: {e:#}");
            Err(e)
        }
    }
}

async fn verify_in(
    b: &Backups,
    file: &Path,
    record: &Path,
    stage: &Path,
    scratch: &str,
) -> Result<String> {
    let dump = stage.join(archive::DUMP);
    let (f, d) = (file.to_path_buf(), dump.clone());
    let checked = tokio::task::spawn_blocking(move || {
        archive::check(
            &f,
            &Extract {
                dump_to: Some(d),
                uploads_to: None,
            },
        )
    })
    .await
    .map_err(|e| anyhow!("the backup reader stopped: {e}"))??;
    let shown = record.display().to_string();
    check_postgres_major(b, &checked.manifest, &shown)?;
    let keys = archive::check_secrets(&checked.secrets).with_context(|| shown.clone())?;
    let db = restore_into(b, &dump, scratch, &checked.manifest).await?;
    let m = &checked.manifest;
    Ok(format!(
        "made {} by koprogo {}; database: {db}; uploads: {} files ({}); secrets: {}",
        m.created,
        m.koprogo_version,
        m.uploads.files,
        super::human_size(m.uploads.bytes),
        keys.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn toc_lines_of_untrusted_extensions() {
        assert!(super::names_untrusted_extension(
            "3; 3079 16385 EXTENSION - pg_stat_statements "
        ));
        assert!(super::names_untrusted_extension(
            "4270; 0 0 COMMENT - EXTENSION pg_stat_statements "
        ));
        assert!(!super::names_untrusted_extension(
            "2; 3079 16386 EXTENSION - pgcrypto "
        ));
        assert!(!super::names_untrusted_extension(
            "215; 1259 16400 TABLE public items koprogo"
        ));
        assert!(!super::names_untrusted_extension(
            "; EXTENSION - pg_stat_statements"
        ));
    }
}
