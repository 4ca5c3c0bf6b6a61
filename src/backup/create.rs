//! Making one backup: row counts and `pg_dump -Fc` in one exported snapshot (so the
//! manifest's counts are exactly what the dump holds), then the archive written to
//! a hidden temp name in the backup directory, fsynced and renamed into place. Any
//! failure (a full disk included) removes the temp file: earlier backups are never
//! touched and no partial file is left.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufWriter;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::Signal;
use tokio_postgres::Client;

use super::archive::{self, Manifest, PgInfo, Sink, UploadsInfo, Writer};
use super::retention::{write_marker, Marker};
use super::{child, work_dir, Backups, Reason};
use crate::fsutil::ensure_dir;
use crate::postgres::cluster;
use crate::process::reaper::ChildSpec;

/// Bounds on the tools (a stuck one is killed; the operation fails cleanly).
pub const PG_DUMP_LIMIT: Duration = Duration::from_secs(6 * 3600);
pub const COPY_LIMIT: Duration = Duration::from_secs(3600);

pub struct Made {
    pub path: PathBuf,
    pub size: u64,
    pub summary: String,
}

/// Tables of the application (not the catalog's, not extensions' own), as
/// `schema.table` quoted for SQL.
const TABLES_SQL: &str = "SELECT format('%I.%I', n.nspname, c.relname)
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind = 'r'
      AND n.nspname NOT IN ('pg_catalog', 'information_schema')
      AND n.nspname NOT LIKE 'pg\\_%'
      AND NOT EXISTS (SELECT 1 FROM pg_depend d
                       WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
    ORDER BY 1";

/// Exact row count of every application table.
pub async fn row_counts(c: &Client) -> Result<BTreeMap<String, i64>> {
    crate::postgres::pin_search_path(c).await?;
    let mut out = BTreeMap::new();
    for r in c.query(TABLES_SQL, &[]).await? {
        let t: String = r.get(0);
        let n: i64 = c
            .query_one(&format!("SELECT count(*) FROM ONLY {t}"), &[])
            .await
            .with_context(|| format!("counting rows of {t}"))?
            .get(0);
        out.insert(t, n);
    }
    Ok(out)
}

/// The application's schema versions: sqlx's migrations table (KoproGo) and the
/// demo backend's `demo_schema`.
pub async fn schema_versions(c: &Client) -> Result<BTreeMap<String, i64>> {
    crate::postgres::pin_search_path(c).await?;
    let mut out = BTreeMap::new();
    for (table, sql) in [
        (
            "_sqlx_migrations",
            "SELECT max(version)::bigint FROM public._sqlx_migrations",
        ),
        (
            "demo_schema",
            "SELECT max(version)::bigint FROM public.demo_schema",
        ),
    ] {
        let exists: bool = c
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL",
                &[&format!("public.{table}")],
            )
            .await?
            .get(0);
        if exists {
            if let Some(v) = c.query_one(sql, &[]).await?.get::<_, Option<i64>>(0) {
                out.insert(table.to_string(), v);
            }
        }
    }
    Ok(out)
}

/// Arguments and environment for pg_dump/pg_restore on `db`: the private
/// cluster's socket, or the external server (password in the environment only).
pub(crate) fn pg_args(b: &Backups, db: &str) -> Result<crate::postgres::Libpq> {
    b.db.libpq(db)
}

/// A clear sentence for an I/O failure while writing into `dir`.
pub(crate) fn explain_write(e: &std::io::Error, dir: &Path) -> String {
    if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        format!(
            "no space left in {} ({e}): free some space or set backup.dir to a larger disk; \
             the earlier backups are untouched",
            dir.display()
        )
    } else {
        format!("cannot write in {}: {e}", dir.display())
    }
}

/// Makes one backup file; the caller holds the operation lock.
pub(crate) async fn create(b: &Backups, reason: Reason) -> Result<Made> {
    b.postgres_ready()?;
    let cfg = &b.cfg;
    let dir = cfg.backup.dir.clone();
    ensure_dir(&dir, 0o750).with_context(|| format!("cannot create {}", dir.display()))?;
    let recipients = match &cfg.backup.encrypt_to {
        Some(s) => Some(super::crypt::recipients(s)?),
        None => None,
    };
    let work = work_dir(cfg).join(format!("create-{}", b.next_id()));
    ensure_dir(&work, 0o700).with_context(|| format!("cannot create {}", work.display()))?;
    let r = create_in(b, reason, &dir, &work, recipients).await;
    if let Err(e) = std::fs::remove_dir_all(&work) {
        tracing::warn!("cannot remove {}: {e}", work.display());
    }
    r
}

async fn create_in(
    b: &Backups,
    reason: Reason,
    dir: &Path,
    work: &Path,
    recipients: Option<Vec<age::x25519::Recipient>>,
) -> Result<Made> {
    let cfg = b.cfg.clone();
    let now = chrono::Utc::now();
    let dump = work.join(archive::DUMP);

    // One snapshot for the counts and for pg_dump.
    let app = b.db.app_db().to_string();
    let client =
        b.db.connect(&app)
            .await
            .with_context(|| format!("cannot connect to database {app}"))?;
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let snapshot: String = client
        .query_one("SELECT pg_export_snapshot()", &[])
        .await?
        .get(0);
    let tables = row_counts(&client).await?;
    let schema = schema_versions(&client).await?;
    let db_bytes: i64 = client
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await?
        .get(0);
    let (mut args, env) = pg_args(b, &app)?;
    args.extend([
        "-Fc".into(),
        format!("--snapshot={snapshot}"),
        "-f".into(),
        dump.display().to_string(),
    ]);
    let spec = ChildSpec {
        program: b.bins.tool("pg_dump"),
        args,
        env,
        cwd: work.to_path_buf(),
        death_signal: Signal::SIGKILL,
        as_api_user: false,
        oom_score_adj: None,
    };
    let out = child::run(&b.reaper, spec, PG_DUMP_LIMIT).await;
    let _ = client.batch_execute("COMMIT").await;
    drop(client);
    let out = out?;
    if !out.exit.success() {
        bail!("pg_dump failed ({}): {}", out.exit, out.last_line());
    }

    let secrets_file = crate::secrets::path(&cfg.paths.state);
    let secrets = std::fs::read(&secrets_file)
        .with_context(|| format!("cannot read {}", secrets_file.display()))?;
    let (secrets, key) = super::auth::split_secrets(&secrets)
        .with_context(|| format!("{} is not usable", secrets_file.display()))?;
    let secret_keys = crate::secrets::check_copy(&secrets)
        .with_context(|| format!("{} is not usable", secrets_file.display()))?;
    let rows = tables.values().sum();
    let manifest = Manifest {
        format: archive::FORMAT,
        kind: "koprogo-backup".into(),
        created: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        created_unix: now.timestamp(),
        reason: reason.as_str().into(),
        koprogo_version: env!("CARGO_PKG_VERSION").into(),
        domain: cfg.domain.clone(),
        postgres: PgInfo {
            major: b.bins.major,
            version: b.bins.version.clone(),
            database: app.clone(),
            database_bytes: db_bytes,
            tables,
            rows,
        },
        schema,
        uploads: UploadsInfo::default(),
        secrets: secret_keys,
        archive_sha256: String::new(),
        members: Vec::new(),
    };
    let stamp = now.format("%Y%m%dT%H%M%SZ").to_string();
    let suffix = match reason {
        Reason::PreRestore => "-pre-restore",
        Reason::PreUpdate => "-pre-update",
        _ => "",
    };
    let ext = if recipients.is_some() {
        ".kbk.age"
    } else {
        ".kbk"
    };
    let uploads = crate::backend::dirs(&cfg).uploads;
    let dir2 = dir.to_path_buf();
    let (path, size, manifest) = tokio::task::spawn_blocking(move || {
        write_file(
            &dir2, &stamp, suffix, ext, &dump, &secrets, &uploads, manifest, recipients, &key,
        )
    })
    .await
    .map_err(|e| anyhow!("the backup writer stopped: {e}"))??;

    // Read back what we wrote (when we can: an encrypted file needs the identity).
    if !path.to_string_lossy().ends_with(".age") {
        let p = path.clone();
        let check =
            tokio::task::spawn_blocking(move || archive::check(&p, &archive::Extract::default()))
                .await
                .map_err(|e| anyhow!("the backup checker stopped: {e}"))?;
        if let Err(e) = check {
            let _ = std::fs::remove_file(&path);
            bail!(
                "the file just written does not read back ({e:#}): it was removed; check the disk"
            );
        }
        write_marker(
            &path,
            &Marker {
                at: super::utc_now(),
                how: "checksums".into(),
                ok: true,
                detail: "read back after writing".into(),
            },
        );
    }
    let summary = format!(
        "{} tables, {} rows, {} upload files ({}), secrets {}",
        manifest.postgres.tables.len(),
        manifest.postgres.rows,
        manifest.uploads.files,
        super::human_size(manifest.uploads.bytes),
        manifest.secrets.join(", ")
    );
    Ok(Made {
        path,
        size,
        summary,
    })
}

#[allow(clippy::too_many_arguments)]
fn write_file(
    dir: &Path,
    stamp: &str,
    suffix: &str,
    ext: &str,
    dump: &Path,
    secrets: &[u8],
    uploads: &Path,
    mut manifest: Manifest,
    recipients: Option<Vec<age::x25519::Recipient>>,
    key: &super::auth::Key,
) -> Result<(PathBuf, u64, Manifest)> {
    let mut name = format!("koprogo-{stamp}{suffix}{ext}");
    let mut n = 1;
    while dir.join(&name).exists() {
        n += 1;
        name = format!("koprogo-{stamp}{suffix}-{n}{ext}");
    }
    let part = dir.join(format!(".{name}.part"));
    let fin = dir.join(&name);
    let r = (|| -> Result<u64> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&part)
            .map_err(|e| anyhow!(explain_write(&e, dir)))?;
        let sink = match &recipients {
            Some(r) => Sink::Age(super::crypt::encrypt(r, file)?),
            None => Sink::Plain(BufWriter::with_capacity(1 << 20, file)),
        };
        let io = |e: std::io::Error| anyhow!(explain_write(&e, dir));
        let mut w = Writer::new(sink).map_err(io)?;
        let mut df = File::open(dump).with_context(|| format!("cannot read {}", dump.display()))?;
        let meta = df.metadata()?;
        w.add_file(
            archive::DUMP,
            &mut df,
            meta.len(),
            0o600,
            meta.mtime().max(0) as u64,
        )
        .map_err(io)?;
        w.add_bytes(
            archive::SECRETS,
            secrets,
            0o600,
            manifest.created_unix.max(0) as u64,
        )
        .map_err(io)?;
        if uploads.is_dir() {
            add_uploads(&mut w, uploads, &mut manifest.uploads, dir)?;
        }
        let (file, size) = w.finish(&mut manifest, key).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&part, &fin).map_err(io)?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(size)
    })();
    match r {
        Ok(_) => {
            let size = std::fs::metadata(&fin).map(|m| m.len()).unwrap_or(0);
            Ok((fin, size, manifest))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            Err(e)
        }
    }
}

/// The uploads tree, directories first in name order; symbolic links and special
/// files are skipped (and listed in the manifest).
fn add_uploads(w: &mut Writer, root: &Path, info: &mut UploadsInfo, out_dir: &Path) -> Result<()> {
    let io = |e: std::io::Error| anyhow!(explain_write(&e, out_dir));
    let meta =
        std::fs::metadata(root).with_context(|| format!("cannot read {}", root.display()))?;
    w.add_dir(archive::UPLOADS, 0o750, meta.mtime().max(0) as u64)
        .map_err(io)?;
    let mut stack = vec![(root.to_path_buf(), archive::UPLOADS.to_string())];
    while let Some((dir, prefix)) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        let mut subdirs = Vec::new();
        for e in entries {
            let name = format!("{prefix}/{}", e.file_name().to_string_lossy());
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                let m = e.metadata().map(|m| m.mtime()).unwrap_or(0);
                w.add_dir(&name, 0o750, m.max(0) as u64).map_err(io)?;
                info.dirs += 1;
                subdirs.push((e.path(), name));
            } else if ft.is_file() {
                let mut f = match File::open(e.path()) {
                    Ok(f) => f,
                    // Deleted since listed: not part of this backup.
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(err) => return Err(anyhow!("cannot read {}: {err}", e.path().display())),
                };
                let m = f.metadata()?;
                w.add_file(&name, &mut f, m.len(), 0o640, m.mtime().max(0) as u64)
                    .map_err(|err| {
                        if err.kind() == std::io::ErrorKind::UnexpectedEof {
                            anyhow!("{}: {err}; make the backup again", e.path().display())
                        } else {
                            io(err)
                        }
                    })?;
                info.files += 1;
                info.bytes += m.len();
            } else {
                tracing::warn!(
                    "backup: skipping {} (not a regular file or directory)",
                    e.path().display()
                );
                info.skipped
                    .push(format!("{name}: not a regular file or directory"));
            }
        }
        // Depth-first, in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(())
}

/// Runs `backup.copy_command` with the file's path appended. Failure is reported,
/// the backup stays.
pub(crate) async fn copy_hook(b: &Backups, cmd: &[String], file: &Path) -> Result<(), String> {
    let Some((program, args)) = cmd.split_first() else {
        return Err("backup.copy_command is empty".into());
    };
    let mut args = args.to_vec();
    args.push(file.display().to_string());
    let mut env = cluster::base_env(&b.cfg);
    env.push(("KOPROGO_BACKUP_FILE".into(), file.display().to_string()));
    let spec = ChildSpec {
        program: PathBuf::from(program),
        args,
        env,
        cwd: b.cfg.backup.dir.clone(),
        death_signal: Signal::SIGKILL,
        as_api_user: false,
        oom_score_adj: None,
    };
    match child::run(&b.reaper, spec, COPY_LIMIT).await {
        Ok(out) if out.exit.success() => {
            tracing::info!("backup copy command succeeded for {}", file.display());
            Ok(())
        }
        Ok(out) => {
            let msg = format!(
                "{program} {} ({}): {}",
                file.display(),
                out.exit,
                out.last_line()
            );
            tracing::error!("backup copy command failed: {msg}");
            Err(msg)
        }
        Err(e) => {
            let msg = format!("{program}: {e:#}");
            tracing::error!("backup copy command failed: {msg}");
            Err(msg)
        }
    }
}
