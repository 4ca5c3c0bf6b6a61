//! `koprogo backup verify`: every byte checked (see `archive`) and the file
//! authenticated (see `auth`), then the dump replayed as an ordinary role into a
//! scratch database (see `restore_into`) and its row counts compared with the
//! manifest's, then the scratch database dropped. The outcome is kept next to the
//! file for `backup list`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::Signal;
use postgres_protocol::escape::escape_identifier;

use super::archive::{self, Extract, Manifest};
use super::auth::{authenticate, own_key, Origin, Trust};
use super::create::row_counts;
use super::retention::{write_marker, Marker};
use super::{child, work_dir, Backups, VERIFY_DB_PREFIX};
use crate::fsutil::ensure_dir;

use crate::process::reaper::ChildSpec;

pub const PG_RESTORE_LIMIT: Duration = Duration::from_secs(6 * 3600);

/// Creates database `name` and replays `dump` into it as [`crate::postgres::Db::replay_role`]
/// (never the superuser: a dump is SQL, and whoever can write a backup file writes
/// it), then compares its row counts with the manifest's and hands it to the
/// application's role. `foreign`: the file is not authenticated (`--trust-foreign`),
/// so even an external server's role must not be privileged. Returns a summary. On
/// error the database may exist: the caller drops it.
pub(crate) async fn restore_into(
    b: &Backups,
    dump: &Path,
    name: &str,
    manifest: &Manifest,
    foreign: bool,
) -> Result<String> {
    b.db.prepare_replay_role().await?;
    let admin =
        b.db.connect_admin()
            .await
            .context("cannot connect to PostgreSQL")?;
    let owner =
        b.db.app_owner()
            .map(|o| format!(" OWNER {}", escape_identifier(o)))
            .unwrap_or_default();
    if let Err(e) = admin
        .batch_execute(&format!(
            "CREATE DATABASE {}{owner} ENCODING 'UTF8' TEMPLATE template0",
            escape_identifier(name)
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
                escape_identifier(&url.user)
            ),
            None => bail!("cannot create the scratch database {name}: {why}"),
        }
    }
    drop(admin);
    b.db.prepare_scratch(name).await?;
    let role = b.db.replay_role().to_string();
    let c =
        b.db.connect_replay(name)
            .await
            .with_context(|| format!("cannot connect to {name} as {role}"))?;
    check_unprivileged(&c, &role, b.db.external().is_none() || foreign).await?;
    drop(c);
    let jobs = crate::postgres::tuning::cores().clamp(1, 4);
    let (mut args, env) = b.db.libpq_replay(name)?;
    // Everything belongs to the replaying role; what only a superuser may create
    // (the extensions) is left out: it exists already or is not needed.
    let list = replay_toc(b, dump, &env).await?;
    args.extend([
        "--no-owner".into(),
        "--no-privileges".into(),
        "-L".into(),
        list.display().to_string(),
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
        oom_score_adj: None,
    };
    let out = child::run(&b.reaper, spec, PG_RESTORE_LIMIT).await?;
    if !out.exit.success() {
        if let Some(line) = needs_privilege(&out.text) {
            bail!(
                "the dump needs rights the unprivileged role {role} does not have ({line}): \
                 koprogo never replays a backup as the PostgreSQL superuser, so this one cannot \
                 be restored here"
            );
        }
        bail!("pg_restore failed ({}): {}", out.exit, out.last_line());
    }
    let c =
        b.db.connect_replay(name)
            .await
            .with_context(|| format!("cannot connect to {name} as {role}"))?;
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
    b.db.hand_over(name).await?;
    Ok(format!(
        "{} tables, {} rows, every count as in the manifest",
        counts.len(),
        counts.values().sum::<i64>()
    ))
}

/// Refuses to replay as a role that is a superuser or may run programs or touch
/// files of the server (`refuse`), or says so in the log.
async fn check_unprivileged(c: &tokio_postgres::Client, role: &str, refuse: bool) -> Result<()> {
    let row = c
        .query_one(
            "SELECT r.rolsuper
                 OR pg_has_role(current_user, 'pg_execute_server_program', 'MEMBER')
                 OR pg_has_role(current_user, 'pg_write_server_files', 'MEMBER')
                 OR pg_has_role(current_user, 'pg_read_server_files', 'MEMBER')
               FROM pg_catalog.pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .map_err(|e| {
            anyhow!(
                "checking the rights of {role}: {}",
                crate::postgres::describe(&e)
            )
        })?;
    if row.get::<_, bool>(0) {
        if refuse {
            bail!(
                "the role {role} is a superuser or may run programs or read and write files on \
                 the server: koprogo does not replay a backup it cannot authenticate as such a role \
                 (make {role} an ordinary role, or restore a backup this appliance made)"
            );
        }
        tracing::warn!("replaying an authenticated backup as the privileged role {role}");
    }
    Ok(())
}

/// The first error line of a failed pg_restore that says a privilege was missing.
fn needs_privilege(text: &str) -> Option<String> {
    const SIGNS: &[&str] = &[
        "permission denied",
        "must be superuser",
        "must be owner",
        "pg_execute_server_program",
        "pg_write_server_files",
        "pg_read_server_files",
    ];
    text.lines()
        .find(|l| SIGNS.iter().any(|s| l.contains(s)))
        .map(|l| l.trim().to_string())
}

/// Extensions left out of a replay: with the private cluster, those the superuser
/// creates in the scratch database first (their comment too: only their owner may
/// change it); with an external server, those its ordinary role cannot create (not
/// trusted; KoproGo does not need them).
fn skipped_extensions(b: &Backups) -> &'static [&'static str] {
    if b.db.external().is_some() {
        &["pg_stat_statements"]
    } else {
        crate::postgres::EXTENSIONS
    }
}

/// A TOC line of one of `skip` (`EXTENSION - NAME`) or of its comment
/// (`COMMENT - EXTENSION NAME`).
fn names_extension(line: &str, skip: &[&str]) -> bool {
    if line.starts_with(';') {
        return false;
    }
    // A comment's tag quotes names that need it: `COMMENT - EXTENSION "uuid-ossp"`.
    let t: Vec<&str> = line
        .split_whitespace()
        .map(|w| w.trim_matches('"'))
        .collect();
    skip.iter().any(|e| {
        t.windows(3).any(|w| w == ["EXTENSION", "-", e])
            || (t.contains(&"COMMENT") && t.windows(2).any(|w| w == ["EXTENSION", e]))
    })
}

/// `pg_restore -l` of `dump` without the entries of [`skipped_extensions`],
/// written next to the dump; returns its path.
async fn replay_toc(
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
        oom_score_adj: None,
    };
    let out = child::run(&b.reaper, spec, Duration::from_secs(600)).await?;
    if !out.exit.success() {
        bail!("pg_restore -l failed ({}): {}", out.exit, out.last_line());
    }
    let text = std::fs::read_to_string(&list)
        .with_context(|| format!("cannot read {}", list.display()))?;
    let skip = skipped_extensions(b);
    let kept: Vec<&str> = text.lines().filter(|l| !names_extension(l, skip)).collect();
    std::fs::write(&list, kept.join("\n") + "\n")
        .with_context(|| format!("cannot write {}", list.display()))?;
    Ok(list)
}

pub(crate) async fn drop_database(b: &Backups, name: &str) {
    match b.db.connect_admin().await {
        Ok(admin) => {
            if let Err(e) = admin
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    escape_identifier(name)
                ))
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

pub(crate) async fn verify(
    b: &Backups,
    file: &Path,
    record: &Path,
    trust: &Trust,
) -> Result<String> {
    b.postgres_ready()?;
    let started = Instant::now();
    let id = b.next_id();
    let stage = work_dir(&b.cfg).join(format!("verify-{id}"));
    ensure_dir(&stage, 0o700).with_context(|| format!("cannot create {}", stage.display()))?;
    let scratch = format!("{VERIFY_DB_PREFIX}{id}");
    let r = verify_in(b, file, record, trust, &stage, &scratch).await;
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
    trust: &Trust,
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
    let origin = authenticate(&checked, &own_key(&b.cfg.paths.state)?, trust, &shown)?;
    check_postgres_major(b, &checked.manifest, &shown)?;
    let keys = crate::secrets::check_copy(&checked.secrets).with_context(|| shown.clone())?;
    let foreign = matches!(origin, Origin::Foreign(_));
    let db = restore_into(b, &dump, scratch, &checked.manifest, foreign)
        .await
        .map_err(|e| anyhow!("{e:#} ({})", origin.describe()))?;
    let m = &checked.manifest;
    Ok(format!(
        "{}; made {} by koprogo {}; database: {db}; uploads: {} files ({}); secrets: {}",
        origin.describe(),
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
    fn toc_lines_of_skipped_extensions() {
        let skip = &["pg_stat_statements"];
        assert!(super::names_extension(
            "3; 3079 16385 EXTENSION - pg_stat_statements ",
            skip
        ));
        assert!(super::names_extension(
            "4270; 0 0 COMMENT - EXTENSION pg_stat_statements ",
            skip
        ));
        assert!(!super::names_extension(
            "2; 3079 16386 EXTENSION - pgcrypto ",
            skip
        ));
        assert!(super::names_extension(
            "2; 3079 16386 EXTENSION - pgcrypto ",
            crate::postgres::EXTENSIONS
        ));
        assert!(super::names_extension(
            "4271; 0 0 COMMENT - EXTENSION \"uuid-ossp\" ",
            crate::postgres::EXTENSIONS
        ));
        assert!(!super::names_extension(
            "215; 1259 16400 TABLE public items koprogo",
            skip
        ));
        assert!(!super::names_extension(
            "; EXTENSION - pg_stat_statements",
            skip
        ));
    }

    #[test]
    fn missing_privileges_are_recognised() {
        let out = "pg_restore: error: could not execute query: ERROR:  permission denied to \
                   COPY to or from an external program\nDETAIL: Only roles with privileges of \
                   the \"pg_execute_server_program\" role may COPY to or from an external program.";
        assert!(
            super::needs_privilege(out).is_some_and(|l| l.contains("permission denied to COPY"))
        );
        assert!(super::needs_privilege("pg_restore: error: relation exists").is_none());
    }
}
