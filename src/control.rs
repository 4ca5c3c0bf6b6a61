//! The control socket `<run>/control.sock` (0600): one JSON request line, one JSON
//! answer line. The server side reads supervisor state and forwards commands; the
//! client side is what `koprogo status|start|stop|restart|capacity|…` use.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::config::Config;
use crate::supervisor::{Shared, StatusReport};

/// Longest request line accepted.
const MAX_REQUEST: usize = 4096;
/// The longest answer a client reads (a status with many services is a few KiB).
const MAX_ANSWER: u64 = 4 << 20;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Status,
    Start {
        service: String,
    },
    Stop {
        service: String,
    },
    Restart {
        service: String,
    },
    /// `koprogo cert renew`: renew (or order) the certificate now.
    CertRenew,
    /// `koprogo admin-password --reset`: a new superadmin password, applied now.
    AdminPasswordReset,
    /// `koprogo capacity`: the capacity report, measured now.
    Capacity,
    /// `koprogo backup create`: a backup now (then retention and the copy hook).
    BackupCreate,
    /// `koprogo backup verify [FILE]`: check `file` (default: the newest backup) and
    /// record the result for `record_as` (the encrypted original of a decrypted copy).
    BackupVerify {
        #[serde(default)]
        file: Option<PathBuf>,
        #[serde(default)]
        record_as: Option<PathBuf>,
        /// Backups accepted beyond this appliance's own (`--trust-key`, `--trust-foreign`).
        #[serde(default)]
        trust: crate::backup::auth::Trust,
    },
    /// `koprogo reload`: update the API server now (pre-update backup, new server
    /// beside the old one, switch, drain).
    Reload,
    /// `koprogo restore FILE`: `label` names it in messages; `force` skips the
    /// schema check.
    Restore {
        file: PathBuf,
        #[serde(default)]
        label: Option<String>,
        #[serde(default)]
        force: bool,
        #[serde(default)]
        trust: crate::backup::auth::Trust,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub status: Option<StatusReport>,
    #[serde(default)]
    pub capacity: Option<Box<crate::capacity::Report>>,
}

pub fn socket_path(cfg: &Config) -> PathBuf {
    cfg.paths.run.join("control.sock")
}

pub fn remove_socket(cfg: &Config) {
    let _ = std::fs::remove_file(socket_path(cfg));
}

/// Binds the socket (replacing a stale one: the state lock is ours) and serves it.
pub fn serve(cfg: &Config, shared: Arc<Shared>) -> Result<tokio::task::JoinHandle<()>> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(cfg);
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot chmod {}", path.display()))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(stream, shared).await {
                    tracing::debug!("control connection: {e:#}");
                }
            });
        }
    }))
}

async fn handle(stream: UnixStream, shared: Arc<Shared>) -> Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(r).take(MAX_REQUEST as u64);
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
        .await
        .context("request timed out")??;
    let resp = match serde_json::from_str::<Request>(line.trim()) {
        Err(e) => Response {
            ok: false,
            message: format!("bad request: {e}"),
            status: None,
            capacity: None,
        },
        Ok(Request::CertRenew) => {
            shared.tls.renew_now();
            Response {
                ok: true,
                message: "certificate renewal started: follow it with `koprogo cert status`".into(),
                status: None,
                capacity: None,
            }
        }
        Ok(Request::AdminPasswordReset) => match shared.reset_admin_password().await {
            Ok(pw) => Response {
                ok: true,
                message: pw,
                status: None,
                capacity: None,
            },
            Err(e) => Response {
                ok: false,
                message: format!("{e:#}"),
                status: None,
                capacity: None,
            },
        },
        Ok(Request::Status) => Response {
            ok: true,
            message: String::new(),
            status: Some(shared.status()),
            capacity: None,
        },
        Ok(Request::Capacity) => Response {
            ok: true,
            message: String::new(),
            status: None,
            capacity: Some(Box::new(crate::capacity::measure(&shared, false).await)),
        },
        Ok(Request::BackupCreate) => backup_response(
            shared
                .backup
                .create_now(crate::backup::Reason::Manual)
                .await,
        ),
        Ok(Request::BackupVerify {
            file,
            record_as,
            trust,
        }) => backup_response(shared.backup.verify(file, record_as, trust).await),
        Ok(Request::Restore {
            file,
            label,
            force,
            trust,
        }) => backup_response(shared.backup.restore(file, label, force, trust).await),
        Ok(Request::Reload) => {
            backup_response(shared.updater.update(crate::update::Trigger::Reload).await)
        }
        Ok(req) => {
            let (verb, service) = match &req {
                Request::Start { service } => ("start", service),
                Request::Stop { service } => ("stop", service),
                Request::Restart { service } => ("restart", service),
                Request::Status
                | Request::CertRenew
                | Request::AdminPasswordReset
                | Request::Capacity
                | Request::BackupCreate
                | Request::BackupVerify { .. }
                | Request::Reload
                | Request::Restore { .. } => ("status", &String::new()),
            };
            match shared.command(verb, service).await {
                Ok(m) => Response {
                    ok: true,
                    message: m,
                    status: None,
                    capacity: None,
                },
                Err(m) => Response {
                    ok: false,
                    message: m,
                    status: None,
                    capacity: None,
                },
            }
        }
    };
    let mut out = serde_json::to_vec(&resp)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    Ok(())
}

fn backup_response(r: Result<String>) -> Response {
    match r {
        Ok(m) => Response {
            ok: true,
            message: m,
            status: None,
            capacity: None,
        },
        Err(e) => Response {
            ok: false,
            message: format!("{e:#}"),
            status: None,
            capacity: None,
        },
    }
}

use tokio::io::AsyncReadExt;

/// Sends one request to a running supervisor (blocking; for the CLI).
pub fn request(cfg: &Config, req: &Request) -> Result<Response> {
    request_timeout(cfg, req, Some(Duration::from_secs(200)))
}

/// `request` for operations that take as long as they take (backups, restores of
/// a big site): bounded all the same, by a silence of 6 hours.
pub fn request_long(cfg: &Config, req: &Request) -> Result<Response> {
    request_timeout(cfg, req, Some(Duration::from_secs(6 * 3600)))
}

fn request_timeout(cfg: &Config, req: &Request, limit: Option<Duration>) -> Result<Response> {
    use std::io::{BufRead, Write};
    let path = socket_path(cfg);
    let mut s = std::os::unix::net::UnixStream::connect(&path).with_context(|| {
        format!(
            "koprogo is not running (no answer on {}): start it with `koprogo run` or `systemctl start koprogo`",
            path.display()
        )
    })?;
    s.set_read_timeout(limit)?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut answer = String::new();
    // The answer comes from whoever holds the socket path: bounded.
    std::io::BufReader::new(std::io::Read::take(s, MAX_ANSWER)).read_line(&mut answer)?;
    serde_json::from_str(answer.trim())
        .with_context(|| format!("unreadable answer from {}: {answer:?}", path.display()))
}
