//! `koprogo restore FILE`. In order:
//! 1. read and check the whole file, extracting the dump and the uploads into a
//!    staging directory, and authenticate it (see `auth`) before replaying any of
//!    it (a refused file changes nothing: staging is removed);
//! 2. refuse a dump from a newer PostgreSQL or a database schema newer than the one
//!    the installed API runs now (`--force` skips the schema check);
//! 3. a safety backup of the current state;
//! 4. the dump replayed into a scratch database as an ordinary role (never the
//!    superuser; see `verify::restore_into`) and its row counts checked, while
//!    the API still serves the old data;
//! 5. the API stopped; secrets.env, the database (two renames in one transaction)
//!    and the uploads directory (an atomic exchange) swapped;
//! 6. the API started and waited for (bounded by backend.start_timeout); on any
//!    failure everything is swapped back and the API started on the old data.
//!
//! The replaced database and uploads are dropped only once the API is ready.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use postgres_protocol::escape::escape_identifier;
use tokio::sync::oneshot;

use super::archive::{self, Extract};
use super::auth::{authenticate, own_key, Origin, Trust};
use super::verify::{check_postgres_major, drop_database, restore_into};
use super::{work_dir, Backups, Reason, PREV_DB_PREFIX, RESTORE_DB_PREFIX};
use crate::fsutil::{ensure_dir, write_atomic};
use crate::process::service::Cmd;
use crate::process::state::Phase;

/// What has been swapped so far (to undo in reverse).
#[derive(Default)]
struct Swapped {
    secrets: Option<Vec<u8>>,
    database: bool,
    uploads: bool,
}

pub(crate) async fn restore(
    b: &Backups,
    file: &Path,
    label: &str,
    force: bool,
    trust: &Trust,
) -> Result<String> {
    b.postgres_ready()
        .map_err(|e| anyhow!("{e:#}; nothing was changed"))?;
    check_space(&b.cfg, file)?;
    let id = b.next_id();
    let stage = work_dir(&b.cfg).join(format!("restore-{id}"));
    ensure_dir(&stage, 0o700).with_context(|| format!("cannot create {}", stage.display()))?;
    let r = restore_staged(b, file, label, force, trust, &stage, &id).await;
    let keep_stage = matches!(&r, Err(e) if e.to_string().contains("ROLLBACK FAILED"));
    if !keep_stage {
        let _ = std::fs::remove_dir_all(&stage);
    }
    match &r {
        Ok(m) => tracing::info!("restore: {m}"),
        Err(e) => tracing::error!("restore: {e:#}"),
    }
    r
}

/// Room left on the staging disk beyond the staged copy (PostgreSQL and the logs
/// go on writing meanwhile).
const SPACE_MARGIN: u64 = 64 << 20;

/// The staged copy of the dump and uploads takes about the file's size: refuse
/// before writing anything when the staging disk does not have that much free.
fn check_space(cfg: &crate::config::Config, file: &Path) -> Result<()> {
    let size = std::fs::metadata(file)
        .with_context(|| format!("cannot read {}; nothing was changed", file.display()))?
        .len();
    let dir = work_dir(cfg);
    let probe = if dir.exists() {
        dir.clone()
    } else {
        cfg.paths.state.clone()
    };
    let Ok(disk) = crate::fsutil::disk_usage(&probe) else {
        return Ok(()); // cannot tell: the staging itself reports a full disk
    };
    let need = size.saturating_add(SPACE_MARGIN);
    if disk.available < need {
        bail!(
            "not enough free space in {} to stage {} ({} MiB needed, {} MiB free): free some \
             space on that disk and try again; nothing was changed",
            probe.display(),
            file.display(),
            need >> 20,
            disk.available >> 20
        );
    }
    Ok(())
}

async fn restore_staged(
    b: &Backups,
    file: &Path,
    label: &str,
    force: bool,
    trust: &Trust,
    stage: &Path,
    id: &str,
) -> Result<String> {
    tracing::info!("restore of {label}: checking the file");
    let dump = stage.join(archive::DUMP);
    let staged_uploads = stage.join("uploads");
    let (f, d, u) = (file.to_path_buf(), dump.clone(), staged_uploads.clone());
    let checked = tokio::task::spawn_blocking(move || {
        archive::check(
            &f,
            &Extract {
                dump_to: Some(d),
                uploads_to: Some(u),
            },
        )
    })
    .await
    .map_err(|e| anyhow!("the backup reader stopped: {e}"))?
    .map_err(|e| anyhow!("refused: {e:#}; nothing was changed"))?;
    let refused = |e: anyhow::Error| anyhow!("refused: {e:#}; nothing was changed");
    let origin = own_key(&b.cfg.paths.state)
        .and_then(|own| authenticate(&checked, &own, trust, label))
        .map_err(refused)?;
    let foreign = matches!(origin, Origin::Foreign(_));
    let m = checked.manifest;
    check_postgres_major(b, &m, label).map_err(refused)?;
    crate::secrets::check_copy(&checked.secrets)
        .with_context(|| format!("{label}: its secrets.env"))
        .map_err(refused)?;
    if !force {
        let live =
            b.db.connect(b.db.app_db())
                .await
                .with_context(|| format!("cannot connect to database {}", b.db.app_db()))?;
        let now = super::create::schema_versions(&live).await?;
        drop(live);
        for (table, theirs) in &m.schema {
            if let Some(ours) = now.get(table) {
                if theirs > ours {
                    return Err(refused(anyhow!(
                        "{label}: its database schema is newer ({table} version {theirs}) than the \
                         one the installed API runs ({ours}): the API would refuse to start on it; \
                         install the API version that made it first (or pass --force to try anyway: \
                         a failed start is rolled back)"
                    )));
                }
            }
        }
    }

    tracing::info!("restore of {label}: taking a safety backup of the current state");
    let safety = super::create::create(b, Reason::PreRestore)
        .await
        .map_err(|e| anyhow!("cannot take the safety backup first: {e:#}; nothing was changed"))?;
    let safety = safety.path.display().to_string();

    let scratch = format!("{RESTORE_DB_PREFIX}{id}");
    tracing::info!("restore of {label}: restoring the database into {scratch}");
    let db_summary = match restore_into(b, &dump, &scratch, &m, foreign).await {
        Ok(s) => s,
        Err(e) => {
            drop_database(b, &scratch).await;
            bail!(
                "refused: restoring the database failed: {e:#}; nothing was changed (the API \
                 kept running; the backup is {}; safety backup: {safety})",
                origin.describe()
            );
        }
    };
    let _ = std::fs::remove_file(&dump);

    // From here on the site is down until the API is ready again.
    let phases: Vec<Phase> = b.api.iter().map(|a| a.borrow().phase).collect();
    let api_was_ready = phases.contains(&Phase::Ready);
    let api_running = phases
        .iter()
        .any(|p| !matches!(p, Phase::Stopped | Phase::NotInstalled));
    if api_running {
        tracing::info!("restore of {label}: stopping the API");
        api_command(b, Cmd::Stop).await.map_err(|e| {
            anyhow!("cannot stop the API: {e}; nothing was changed (safety backup: {safety})")
        })?;
    }
    let prev = format!("{PREV_DB_PREFIX}{id}");
    let mut swapped = Swapped::default();
    let outcome = async {
        swap_in(
            b,
            &checked.secrets,
            &scratch,
            &prev,
            &staged_uploads,
            &mut swapped,
        )
        .await?;
        if api_running {
            tracing::info!("restore of {label}: starting the API on the restored data");
            api_start_and_wait(b, api_was_ready).await?;
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if let Err(e) = outcome {
        tracing::error!("restore of {label} failed: {e:#}: rolling back");
        let rollback = async {
            if api_running {
                let _ = api_command(b, Cmd::Stop).await;
            }
            swap_back(b, &scratch, &prev, &staged_uploads, &mut swapped).await?;
            if api_running {
                api_start_and_wait(b, api_was_ready).await?;
            }
            Ok::<(), anyhow::Error>(())
        }
        .await;
        drop_database(b, &scratch).await;
        return match rollback {
            Ok(()) => Err(anyhow!(
                "restore failed: {e:#}; rolled back: the data is as before the restore and the \
                 API runs on it (safety backup: {safety})"
            )),
            Err(r) => Err(anyhow!(
                "restore failed: {e:#}; ROLLBACK FAILED: {r:#}; restore the safety backup \
                 {safety} with `koprogo restore`; the previous uploads are in {}",
                staged_uploads.display()
            )),
        };
    }
    drop_database(b, &prev).await;
    Ok(format!(
        "restored {label} ({}; made {} by koprogo {}): database: {db_summary}; uploads: {} files ({}); \
         secrets: {}; the API {}; safety backup of the state before: {safety}",
        origin.describe(),
        m.created,
        m.koprogo_version,
        m.uploads.files,
        super::human_size(m.uploads.bytes),
        m.secrets.join(", "),
        if api_running {
            "is ready on the restored data"
        } else {
            "was not running and was left so"
        },
    ))
}

async fn swap_in(
    b: &Backups,
    secrets: &[u8],
    scratch: &str,
    prev: &str,
    staged_uploads: &Path,
    s: &mut Swapped,
) -> Result<()> {
    let file = crate::secrets::path(&b.cfg.paths.state);
    let old = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
    // This appliance keeps its own backup key (a backup carries none).
    let secrets = super::auth::merge_secrets(secrets, &old)?;
    write_atomic(&file, &secrets, 0o600)
        .with_context(|| format!("cannot write {}", file.display()))?;
    s.secrets = Some(old);
    let app = b.db.app_db();
    rename_databases(b, &[(app, prev), (scratch, app)]).await?;
    s.database = true;
    exchange(&crate::backend::dirs(&b.cfg).uploads, staged_uploads)?;
    s.uploads = true;
    Ok(())
}

async fn swap_back(
    b: &Backups,
    scratch: &str,
    prev: &str,
    staged_uploads: &Path,
    s: &mut Swapped,
) -> Result<()> {
    if s.uploads {
        exchange(&crate::backend::dirs(&b.cfg).uploads, staged_uploads)?;
        s.uploads = false;
    }
    if s.database {
        let app = b.db.app_db();
        rename_databases(b, &[(app, scratch), (prev, app)]).await?;
        s.database = false;
    }
    if let Some(old) = s.secrets.take() {
        let file = crate::secrets::path(&b.cfg.paths.state);
        write_atomic(&file, &old, 0o600)
            .with_context(|| format!("cannot write {}", file.display()))?;
    }
    Ok(())
}

/// The renames of `pairs` (from, to) in one transaction.
fn rename_sql(pairs: &[(&str, &str)]) -> String {
    let mut sql = String::from("BEGIN;");
    for (from, to) in pairs {
        sql.push_str(&format!(
            "ALTER DATABASE {} RENAME TO {};",
            escape_identifier(from),
            escape_identifier(to)
        ));
    }
    sql.push_str("COMMIT;");
    sql
}

/// Renames databases in one transaction (all or none), after closing every other
/// session on them (the API is stopped; a stray `koprogo psql` is not).
async fn rename_databases(b: &Backups, pairs: &[(&str, &str)]) -> Result<()> {
    let admin =
        b.db.connect_admin()
            .await
            .context("cannot connect to PostgreSQL")?;
    let names: Vec<String> = pairs.iter().map(|(from, _)| from.to_string()).collect();
    let sql = rename_sql(pairs);
    let mut last = None;
    for _ in 0..50 {
        admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                  WHERE datname = ANY($1) AND pid <> pg_backend_pid()
                    AND pg_has_role(current_user, usesysid, 'MEMBER')",
                &[&names],
            )
            .await?;
        match admin.batch_execute(&sql).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                let _ = admin.batch_execute("ROLLBACK").await;
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Err(anyhow!(
        "cannot rename the databases {names:?}: {}",
        last.map(|e| format!("{e:#}")).unwrap_or_default()
    ))
}

/// Swaps two directories atomically (renameat2 RENAME_EXCHANGE), or with two
/// renames where the filesystem cannot. A missing `live` is created empty first.
fn exchange(live: &Path, other: &Path) -> Result<()> {
    use nix::fcntl::{renameat2, RenameFlags};
    if !live.exists() {
        ensure_dir(live, 0o750).with_context(|| format!("cannot create {}", live.display()))?;
    }
    match renameat2(None, live, None, other, RenameFlags::RENAME_EXCHANGE) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOSYS) => {
            let tmp: PathBuf = live.with_extension("swap");
            std::fs::rename(live, &tmp)
                .and_then(|()| std::fs::rename(other, live))
                .and_then(|()| std::fs::rename(&tmp, other))
                .with_context(|| format!("cannot swap {} and {}", live.display(), other.display()))
        }
        Err(e) => Err(anyhow!(
            "cannot swap {} and {}: {e}",
            live.display(),
            other.display()
        )),
    }
}

/// Sends the command to every API instance, one after the other.
async fn api_command(
    b: &Backups,
    make: fn(oneshot::Sender<String>) -> Cmd,
) -> Result<String, String> {
    let mut said = Vec::new();
    for cmds in &b.api_cmds {
        let (tx, rx) = oneshot::channel();
        cmds.send(make(tx)).await.map_err(|_| {
            "the API service is not accepting commands (shutting down?)".to_string()
        })?;
        match tokio::time::timeout(Duration::from_secs(180), rx).await {
            Ok(Ok(m)) => said.push(m),
            Ok(Err(_)) => return Err("the API service dropped the command".into()),
            Err(_) => return Err("the API service did not answer within 180 s".into()),
        }
    }
    Ok(said.join("; "))
}

/// Starts the API and, when it was ready before, waits until every instance is
/// ready again: a crash or `backend.start_timeout` without readiness is a failure.
async fn api_start_and_wait(b: &Backups, wait: bool) -> Result<()> {
    let failures: Vec<u64> = b.api.iter().map(|a| a.borrow().failures).collect();
    api_command(b, Cmd::Start).await.map_err(|e| anyhow!(e))?;
    if !wait {
        return Ok(());
    }
    let limit = b.cfg.backend.start_timeout + Duration::from_secs(5);
    for (rx, failures) in b.api.iter().zip(failures) {
        let mut rx = rx.clone();
        let r = tokio::time::timeout(
            limit,
            rx.wait_for(|s| {
                s.phase == Phase::Ready || s.failures > failures || s.phase == Phase::NotInstalled
            }),
        )
        .await;
        match r {
            Ok(Ok(s)) if s.phase == Phase::Ready => {}
            Ok(Ok(s)) => {
                let why = s
                    .last_error
                    .clone()
                    .or_else(|| s.last_exit.clone())
                    .unwrap_or_else(|| format!("{:?}", s.phase));
                return Err(anyhow!(
                    "the API did not start ({why}; its log: {})",
                    b.cfg.paths.logs.join("api.log").display()
                ));
            }
            Ok(Err(_)) => return Err(anyhow!("the API service is gone (shutting down?)")),
            Err(_) => {
                return Err(anyhow!(
                    "the API was not ready within {}s (backend.start_timeout)",
                    limit.as_secs()
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::rename_sql;

    #[test]
    fn database_names_are_quoted_as_identifiers() {
        assert_eq!(
            rename_sql(&[("ko\"pro", "koprogo_prev_1"), ("a b", "ko\"pro")]),
            "BEGIN;ALTER DATABASE \"ko\"\"pro\" RENAME TO \"koprogo_prev_1\";\
             ALTER DATABASE \"a b\" RENAME TO \"ko\"\"pro\";COMMIT;"
        );
    }
}
