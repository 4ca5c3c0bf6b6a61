//! The private cluster on disk: initdb on first boot (into a temp dir, renamed into
//! place so an interrupted initdb never leaves a half cluster), the files we manage
//! (koprogo.conf, pg_hba.conf, pg_ident.conf), and a stale postmaster.pid left by a
//! crash or power loss.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;

use super::binaries::Binaries;
use super::tuning;
use crate::config::Config;
use crate::fsutil::write_atomic;
use crate::process::reaper::ChildSpec;
use crate::process::service::ServiceIo;

/// The cluster's superuser role; the OS user reaches it through pg_ident.conf.
pub const SUPERUSER: &str = "postgres";
/// The application's role and database.
pub const APP_ROLE: &str = "koprogo";
pub const APP_DB: &str = "koprogo";
/// The role that replays backups (`restore`, `backup verify`) into a scratch
/// database: no superuser, no membership, owner of nothing else; what it restores
/// is handed to [`APP_ROLE`] afterwards.
pub const RESTORE_ROLE: &str = "koprogo_restore";
const MANAGED_CONF: &str = "koprogo.conf";
const INCLUDE_LINE: &str = "include_if_exists = 'koprogo.conf'\t# managed by koprogo";

pub fn data_dir(cfg: &Config) -> PathBuf {
    cfg.paths.state.join("pgdata")
}

/// The major version of an existing cluster, if there is one. Root's `check` reads
/// it too: bounded, no link followed.
pub fn cluster_major(data: &Path) -> Option<u32> {
    crate::fsutil::read_bounded_string(&data.join("PG_VERSION"), 64)
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// A cluster made by another major cannot be started by these binaries; an older
/// one is upgraded at start when its binaries are still installed (see `upgrade`).
pub fn check_version(cfg: &Config, bins: &Binaries) -> Result<(), String> {
    super::upgrade::check(cfg, bins)
}

/// Creates the cluster if there is none. Returns true when it did.
pub async fn ensure_initdb(cfg: &Config, bins: &Binaries, io: &ServiceIo) -> Result<bool> {
    let data = data_dir(cfg);
    if data.join("PG_VERSION").is_file() {
        return Ok(false);
    }
    if data.exists() {
        let empty = std::fs::read_dir(&data)
            .with_context(|| format!("cannot read {}", data.display()))?
            .next()
            .is_none();
        if !empty {
            bail!(
                "{} exists but holds no PostgreSQL cluster (no PG_VERSION): move it away so koprogo can create a new one",
                data.display()
            );
        }
        std::fs::remove_dir(&data)
            .with_context(|| format!("cannot remove empty {}", data.display()))?;
    }
    let tmp = cfg.paths.state.join("pgdata.initdb");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove the leftover {}", tmp.display()))?;
    }
    tracing::info!(
        "creating the PostgreSQL {} cluster in {}",
        bins.major,
        data.display()
    );
    let spec = ChildSpec {
        program: bins.tool("initdb"),
        args: initdb_args(&tmp),
        env: base_env(cfg),
        cwd: cfg.paths.state.clone(),
        death_signal: Signal::SIGKILL,
        as_api_user: false,
        oom_score_adj: None,
    };
    let exit = io.reaper.run(spec, io.log_fd()?).await?;
    if !exit.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        bail!(
            "initdb failed ({exit}): see the postgres log ({})",
            cfg.paths.logs.join("postgres.log").display()
        );
    }
    std::fs::rename(&tmp, &data)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), data.display()))?;
    Ok(true)
}

/// initdb's arguments for a cluster in `dir`, as koprogo makes every cluster (the
/// new cluster of a major upgrade too: pg_upgrade wants the same settings).
pub fn initdb_args(dir: &Path) -> Vec<String> {
    vec![
        "-D".into(),
        dir.display().to_string(),
        "-U".into(),
        SUPERUSER.into(),
        "-E".into(),
        "UTF8".into(),
        "--locale=C.UTF-8".into(),
        "--auth-local=peer".into(),
        "--auth-host=reject".into(),
        "--no-instructions".into(),
    ]
}

/// The minimal environment for Postgres tools.
pub fn base_env(cfg: &Config) -> Vec<(String, String)> {
    vec![
        ("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("LC_ALL".into(), "C.UTF-8".into()),
        ("PGTZ".into(), "UTC".into()),
        ("HOME".into(), cfg.paths.state.display().to_string()),
    ]
}

/// Writes the managed settings and access files; run before every start.
pub fn write_managed_files(cfg: &Config, os_user: &str) -> Result<()> {
    let data = data_dir(cfg);
    let memory = tuning::memory_budget(cfg);
    let mut conf = String::from(
        "# Managed by koprogo: rewritten at every start. Put your own settings in\n\
         # [postgres.settings] of koprogo.toml, not here.\n",
    );
    let run = cfg.paths.run.display().to_string();
    // The API server as its own user reaches the socket through its group (peer
    // authentication then maps it to the application role only, see pg_ident).
    let api = crate::process::launcher::get().map(|l| l.api.name.clone());
    let fixed: Vec<(&str, String)> = vec![
        ("listen_addresses", "''".into()),
        ("port", cfg.postgres.port.to_string()),
        ("unix_socket_directories", quote(&run)),
        (
            "unix_socket_permissions",
            if api.is_some() { "0770" } else { "0700" }.into(),
        ),
        ("unix_socket_group", quote(api.as_deref().unwrap_or(""))),
        ("logging_collector", "off".into()),
        ("log_destination", "'stderr'".into()),
        ("log_line_prefix", "'[%p] %q%u@%d '".into()),
        ("log_timezone", "'UTC'".into()),
        ("superuser_reserved_connections", "3".into()),
    ];
    for (k, v) in fixed.into_iter().chain(tuning::settings(
        memory,
        tuning::cores(),
        cfg.postgres.max_connections,
    )) {
        conf.push_str(&format!("{k} = {v}\n"));
    }
    for (k, v) in &cfg.postgres.settings {
        if k.is_empty()
            || !k
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        {
            bail!(
                "{}: postgres.settings.{k}: not a PostgreSQL setting name",
                cfg.file.display()
            );
        }
        conf.push_str(&format!("{k} = {}\n", quote(v)));
    }
    write_atomic(&data.join(MANAGED_CONF), conf.as_bytes(), 0o600)
        .with_context(|| format!("cannot write {}", data.join(MANAGED_CONF).display()))?;

    let main_conf = data.join("postgresql.conf");
    let text = std::fs::read_to_string(&main_conf)
        .with_context(|| format!("cannot read {}", main_conf.display()))?;
    if !text.lines().any(|l| l.trim() == INCLUDE_LINE) {
        let new = format!("{}\n{INCLUDE_LINE}\n", text.trim_end());
        write_atomic(&main_conf, new.as_bytes(), 0o600)
            .with_context(|| format!("cannot write {}", main_conf.display()))?;
    }

    let hba = "# Managed by koprogo: rewritten at every start.\n\
               # Unix socket only (there is no TCP listener); peer identity mapped in pg_ident.conf.\n\
               local all all peer map=koprogo\n";
    write_atomic(&data.join("pg_hba.conf"), hba.as_bytes(), 0o600)?;
    let mut ident = String::from("# Managed by koprogo: rewritten at every start.\n");
    for os in [os_user, "root"] {
        for role in [SUPERUSER, APP_ROLE, RESTORE_ROLE] {
            ident.push_str(&format!("koprogo {os} {role}\n"));
        }
    }
    // The API server's own user (see process::launcher): its role only.
    if let Some(l) = crate::process::launcher::get() {
        ident.push_str(&format!("koprogo {} {APP_ROLE}\n", l.api.name));
    }
    write_atomic(&data.join("pg_ident.conf"), ident.as_bytes(), 0o600)?;
    Ok(())
}

fn quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
}

/// Deals with a postmaster.pid left behind. Our own state lock is held, so a live
/// postmaster on this data directory is an orphan of a previous supervisor: it is
/// asked to stop (fast, then immediate). A pid that now belongs to another process is
/// removed, since Postgres would refuse to start over it; a dead pid is left to
/// Postgres' own stale-lock handling.
pub async fn clear_stale_pid(cfg: &Config) -> Result<()> {
    let data = data_dir(cfg);
    let pidfile = data.join("postmaster.pid");
    let Ok(text) = std::fs::read_to_string(&pidfile) else {
        return Ok(());
    };
    let pid: i32 = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    if pid > 0 && is_our_postmaster(pid, &data) {
        tracing::warn!(
            pid,
            "a postmaster from an earlier run is still running on {}: stopping it",
            data.display()
        );
        for (sig, secs) in [
            (Signal::SIGINT, 30u64),
            (Signal::SIGQUIT, 10),
            (Signal::SIGKILL, 5),
        ] {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
            while std::time::Instant::now() < deadline && is_our_postmaster(pid, &data) {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            if !is_our_postmaster(pid, &data) {
                break;
            }
        }
        if is_our_postmaster(pid, &data) {
            bail!(
                "the old postmaster {pid} on {} does not stop: stop it by hand",
                data.display()
            );
        }
    }
    // A dead pid is left for Postgres, which also checks that no old backend still
    // holds the shared memory. A live pid that is not ours is a reused pid (reboot,
    // new container): Postgres would refuse to start over it.
    let alive = pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    if alive && pidfile.exists() {
        tracing::warn!(
            pid,
            "removing the stale {} (pid {pid} is another process now)",
            pidfile.display()
        );
        std::fs::remove_file(&pidfile)
            .with_context(|| format!("cannot remove the stale {}", pidfile.display()))?;
    }
    Ok(())
}

/// Is `pid` a live postgres whose working directory is `data`?
fn is_our_postmaster(pid: i32, data: &Path) -> bool {
    let exe_is_postgres =
        crate::procfs::exe(pid).is_some_and(|p| p.file_name().is_some_and(|n| n == "postgres"));
    let cwd = crate::procfs::cwd(pid);
    let data = std::fs::canonicalize(data).unwrap_or_else(|_| data.to_path_buf());
    exe_is_postgres && cwd.as_deref() == Some(data.as_path())
}
