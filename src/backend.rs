//! The koprogo-api contract (../shared/koprogo-backend.md): the environment it is
//! started with, the directory it runs in, what "ready" means (its health URL answers
//! 200 AND the database answers) and how it is stopped (SIGTERM, a little over its
//! 30 s drain, then SIGKILL).
//!
//! `backend.instances` = N servers run side by side, named `api` when N = 1 and
//! `api-1` … `api-N` otherwise. Instance i (from 0) has two loopback ports: its home
//! port `backend.port + i`, and a spare one, `backend.port + N + i`, where an update
//! starts its replacement while the running one keeps serving (see `crate::update`).
//! The port its current child serves on is shared with the service loop, which
//! publishes it for the proxy.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use arc_swap::ArcSwap;
use http_body_util::Empty;
use hyper::body::Bytes;
use nix::sys::signal::Signal;

use crate::config::Config;
use crate::postgres::cluster::{APP_DB, APP_ROLE};
use crate::postgres::Db;
use crate::process::reaper::ChildSpec;
use crate::process::service::{Health, NotInstalled, ServiceIo, ServiceSpec, StopStep};
use crate::secrets::{self, Secrets};

pub struct ApiService {
    pub cfg: Arc<Config>,
    /// Read again from `<state>/secrets.env` before every start: a restore replaces
    /// that file, and the restarted server must get the restored keys (2FA and energy
    /// data are encrypted with them), not the ones read at boot.
    secrets: ArcSwap<Secrets>,
    db: Db,
    /// The port the current child listens on: home or spare (shared by rebuilds).
    port: Arc<AtomicU16>,
    /// Which instance (from 0), and its service name.
    index: u16,
    pub name: &'static str,
}

/// The service name of instance `index` (from 0).
pub fn instance_name(cfg: &Config, index: u16) -> String {
    if cfg.backend.instances <= 1 {
        "api".into()
    } else {
        format!("api-{}", index + 1)
    }
}

/// The home and spare ports of instance `index`.
pub fn ports(cfg: &Config, index: u16) -> (u16, u16) {
    let home = cfg.backend.port.saturating_add(index);
    (home, home.saturating_add(cfg.backend.instances.max(1)))
}

/// The other port of instance `index`'s pair: where a replacement of its child on
/// `current` starts.
pub fn other_port(cfg: &Config, index: u16, current: u16) -> u16 {
    let (home, spare) = ports(cfg, index);
    if current == home {
        spare
    } else {
        home
    }
}

/// Directories the API server uses, all under the state directory.
pub struct ApiDirs {
    /// Its working directory: ours, so no stray `.env` is read.
    pub work: PathBuf,
    pub uploads: PathBuf,
    pub tmp: PathBuf,
}

pub fn dirs(cfg: &Config) -> ApiDirs {
    ApiDirs {
        work: cfg.paths.state.join("api"),
        uploads: cfg.paths.state.join("uploads"),
        tmp: cfg.paths.state.join("tmp"),
    }
}

/// Makes the API's directories. When it runs as its own user (see
/// `process::launcher`), they belong to that user's group, which the supervisor
/// is in: the working directory readable (0750), uploads and temp files writable
/// (0770; no setgid bit: the unit's RestrictSUIDSGID forbids it, and the API's
/// files get its group anyway); uploads restored or written earlier by the
/// supervisor are handed to the group at every start. Otherwise all are the supervisor's own.
fn prepare_dirs(d: &ApiDirs) -> Result<()> {
    use std::os::fd::AsRawFd;
    let api_gid = crate::process::launcher::get().map(|l| l.api.gid);
    for (dir, shared, private) in [
        (&d.work, 0o750, 0o750),
        (&d.uploads, 0o770, 0o750),
        (&d.tmp, 0o770, 0o700),
    ] {
        let mode = if api_gid.is_some() { shared } else { private };
        let fd = crate::fsutil::ensure_dir_fd(dir, mode)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        if let Some(gid) = api_gid {
            nix::unistd::fchown(fd.as_raw_fd(), None, Some(gid))
                .with_context(|| format!("cannot give {} to the API's group", dir.display()))?;
        }
    }
    if let Some(gid) = api_gid {
        share_tree(&d.uploads, gid);
    }
    Ok(())
}

/// Gives every file and directory under `dir` to group `gid`, group-writable
/// (links are neither followed nor changed). Runs as the supervisor's user.
fn share_tree(dir: &std::path::Path, gid: nix::unistd::Gid) {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.file_type().is_symlink() {
            continue;
        }
        let want = if m.is_dir() {
            m.mode() | 0o070
        } else {
            m.mode() | 0o060
        } & 0o7777;
        if m.gid() != gid.as_raw() {
            let _ = nix::unistd::fchownat(
                None,
                &p,
                None,
                Some(gid),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            );
        }
        if m.mode() & 0o7777 != want {
            // Not through a link the API user may have swapped in meanwhile.
            let _ = nix::sys::stat::fchmodat(
                None,
                &p,
                nix::sys::stat::Mode::from_bits_truncate(want),
                nix::sys::stat::FchmodatFlags::NoFollowSymlink,
            );
        }
        if m.is_dir() {
            share_tree(&p, gid);
        }
    }
}

/// The API's `DATABASE_URL`: the private cluster's socket, or the external URL
/// (with its password from the URL or `postgres.password_file`).
///
/// koprogo-api parses it with sqlx 0.8 (the `url` crate), not libpq: an EMPTY host
/// (`postgresql://user@/db?host=/dir`) is refused at start with
/// `Configuration(EmptyHost)`. So the authority names `localhost`, which sqlx then
/// overrides with the `host=` socket directory (no TCP connection is made).
pub fn database_url(cfg: &Config) -> Result<String> {
    match &cfg.postgres.external {
        Some(url) => {
            let pw = crate::postgres::external::password(cfg)?;
            Ok(url.api_url(cfg, pw.as_deref()))
        }
        None => Ok(format!(
            "postgresql://{}@localhost/{}?host={}&port={}",
            crate::postgres::external::encode(APP_ROLE),
            crate::postgres::external::encode(APP_DB),
            crate::postgres::external::encode_path(&cfg.paths.run.display().to_string()),
            cfg.postgres.port
        )),
    }
}

/// The complete environment of the API server (nothing else is inherited).
pub fn environment(cfg: &Config, secrets: &Secrets, port: u16) -> Result<Vec<(String, String)>> {
    let d = dirs(cfg);
    let b = &cfg.backend;
    let workers = if b.workers == 0 {
        crate::postgres::tuning::cores().min(4) as u32
    } else {
        b.workers
    };
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("HOME".into(), d.work.display().to_string()),
        ("DATABASE_URL".into(), database_url(cfg)?),
        ("SERVER_HOST".into(), "127.0.0.1".into()),
        ("SERVER_PORT".into(), port.to_string()),
        (
            secrets::JWT_SECRET.into(),
            secrets.get(secrets::JWT_SECRET).into(),
        ),
        (
            secrets::TOTP_KEY.into(),
            secrets.get(secrets::TOTP_KEY).into(),
        ),
        (
            secrets::ENERGY_KEY.into(),
            secrets.get(secrets::ENERGY_KEY).into(),
        ),
        ("CORS_ALLOWED_ORIGINS".into(), cfg.origins().join(",")),
        ("ACTIX_WORKERS".into(), workers.to_string()),
        // Its limiter keys on the peer address, which is the proxy's: limit in the proxy.
        ("ENABLE_RATE_LIMITING".into(), "false".into()),
        ("DB_POOL_MAX_CONNECTIONS".into(), b.pool_max.to_string()),
        ("DB_POOL_MIN_CONNECTIONS".into(), b.pool_min.to_string()),
        ("STORAGE_PROVIDER".into(), "local".into()),
        ("UPLOAD_DIR".into(), d.uploads.display().to_string()),
        ("RUST_LOG".into(), b.log_level.clone()),
        ("NO_COLOR".into(), "1".into()),
        ("TMPDIR".into(), d.tmp.display().to_string()),
        ("SMTP_ENABLED".into(), b.smtp.enabled.to_string()),
    ];
    let s = &b.smtp;
    for (k, v) in [
        ("SMTP_HOST", s.host.clone()),
        ("SMTP_PORT", s.port.map(|p| p.to_string())),
        ("SMTP_USERNAME", s.username.clone()),
        ("SMTP_PASSWORD", s.password.clone()),
        ("SMTP_FROM_EMAIL", s.from_email.clone()),
        ("SMTP_FROM_NAME", s.from_name.clone()),
    ] {
        if let Some(v) = v {
            env.push((k.into(), v));
        }
    }
    env.extend(b.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok(env)
}

impl ApiService {
    /// Instance `index` (from 0). Its name is made once at boot and lives as long
    /// as the process (service names are `&'static str`).
    pub fn new(cfg: Arc<Config>, secrets: Secrets, db: Db, index: u16) -> ApiService {
        let (home, _) = ports(&cfg, index);
        let name: &'static str = Box::leak(instance_name(&cfg, index).into_boxed_str());
        ApiService {
            cfg,
            secrets: ArcSwap::from_pointee(secrets),
            db,
            port: Arc::new(AtomicU16::new(home)),
            index,
            name,
        }
    }

    /// The port the current child serves on.
    pub fn active_port(&self) -> u16 {
        self.port.load(Ordering::Relaxed)
    }

    /// Which API instance this is (from 0).
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The secrets as they are on disk now (a restore may have replaced them).
    fn fresh_secrets(&self) -> Result<Arc<Secrets>> {
        let now = Arc::new(secrets::load_or_create(&self.cfg.paths.state)?);
        if now.values != self.secrets.load().values {
            tracing::info!(
                "secrets changed in {}: the API starts with the new ones",
                now.file.display()
            );
        }
        self.secrets.store(now.clone());
        Ok(now)
    }

    /// The command of an API server listening on `port`, with the secrets as they
    /// are on disk now.
    pub async fn prepare_on(&self, port: u16) -> Result<ChildSpec> {
        let secrets = self.fresh_secrets()?;
        let d = dirs(&self.cfg);
        prepare_dirs(&d)?;
        let cmd = &self.cfg.backend.command;
        if !cmd.is_file() {
            return Err(NotInstalled(format!(
                "the KoproGo application is not installed: {} (backend.command in {}) does not exist",
                cmd.display(),
                self.cfg.file.display()
            ))
            .into());
        }
        Ok(ChildSpec {
            program: cmd.clone(),
            args: Vec::new(),
            env: environment(&self.cfg, &secrets, port)?,
            cwd: d.work,
            death_signal: Signal::SIGKILL,
            as_api_user: true,
            // First in line for the OOM killer: it restarts in about a second.
            oom_score_adj: Some(crate::process::oom::API),
        })
    }

    /// Readiness of the server on `port`: health 200 and the database answers.
    pub async fn probe_on(&self, port: u16) -> Result<()> {
        health(port, &self.cfg.backend.health).await?;
        self.db.ping().await.context("database not reachable")
    }
}

impl ServiceSpec for ApiService {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn prepare(&self, _io: &ServiceIo) -> Result<Option<ChildSpec>> {
        self.prepare_on(self.active_port()).await.map(Some)
    }

    async fn probe(&self) -> Result<()> {
        self.probe_on(self.active_port()).await
    }

    fn port(&self) -> Option<u16> {
        Some(self.active_port())
    }

    fn switch_port(&self, port: u16) {
        self.port.store(port, Ordering::Relaxed);
    }

    async fn on_ready(&self) -> Result<()> {
        // KoproGo resets admin@koprogo.com to "admin123" at every start: close it.
        let secrets = self.secrets.load_full();
        let pw = secrets.get(secrets::ADMIN_PASSWORD);
        match crate::admin::secure_superadmin(&self.db, pw).await {
            Ok(true) => tracing::info!(
                "replaced the default password of {} (koprogo admin-password shows the new one)",
                crate::admin::ADMIN_EMAIL
            ),
            Ok(false) => tracing::debug!("no superadmin account to secure"),
            Err(e) => return Err(e.context("securing the superadmin account")),
        }
        Ok(())
    }

    fn start_timeout(&self) -> Duration {
        self.cfg.backend.start_timeout
    }

    fn health(&self) -> Health {
        let b = &self.cfg.backend;
        Health {
            interval: b.health_interval,
            timeout: b.health_timeout,
            failures: b.health_failures,
        }
    }

    /// A hung API server (failed health checks, then stopped or idle after
    /// SIGTERM) is killed at once: it restarts in about a second, and its requests
    /// are held by the proxy meanwhile.
    fn kill_when_hung(&self) -> bool {
        true
    }

    fn stop_plan(&self) -> Vec<StopStep> {
        vec![StopStep {
            signal: Signal::SIGTERM,
            group: false,
            wait: self.cfg.backend.stop_timeout,
        }]
    }

    fn stop_now(&self) -> Vec<StopStep> {
        vec![StopStep {
            signal: Signal::SIGKILL,
            group: true,
            wait: Duration::from_secs(2),
        }]
    }
}

/// `GET http://127.0.0.1:<port><path>` must answer 200.
pub async fn health(port: u16, path: &str) -> Result<()> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .with_context(|| format!("health: cannot connect to 127.0.0.1:{port}"))?;
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, format!("127.0.0.1:{port}"))
        .header(hyper::header::USER_AGENT, "koprogo-health")
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await;
    conn.abort();
    let status = resp?.status();
    if status != hyper::StatusCode::OK {
        bail!("health: {path} answered {status}");
    }
    Ok(())
}
