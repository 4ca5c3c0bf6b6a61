//! The control socket `<run>/control.sock` (0600): one JSON request line, one JSON
//! answer line. This module owns the protocol (what may be asked, what comes back,
//! the status report's shape); [`server`] carries requests to whatever answers them
//! (the supervisor's site handle) and [`client`] is what `koprogo status|start|stop|…`
//! use. Nothing here decides what a request does.

pub mod client;
pub mod server;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::process::state::ServiceReport;
use crate::proxy::stats::ProxySnapshot;
use crate::tls::CertStatus;

pub use client::{request, request_long, request_timeout, ControlError};
pub use server::{serve, Handler};

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

/// What `start|stop|restart SERVICE` asks of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Start,
    Stop,
    Restart,
}

impl Request {
    /// The service command this request is, if it is one.
    pub fn service_command(&self) -> Option<(Verb, &str)> {
        match self {
            Request::Start { service } => Some((Verb::Start, service)),
            Request::Stop { service } => Some((Verb::Stop, service)),
            Request::Restart { service } => Some((Verb::Restart, service)),
            _ => None,
        }
    }
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

impl Response {
    pub fn ok(message: impl Into<String>) -> Response {
        Response {
            ok: true,
            message: message.into(),
            status: None,
            capacity: None,
        }
    }

    pub fn err(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            message: message.into(),
            status: None,
            capacity: None,
        }
    }

    /// An operation's outcome: its message, or its error with the whole chain.
    pub fn from_result(r: anyhow::Result<String>) -> Response {
        match r {
            Ok(m) => Response::ok(m),
            Err(e) => Response::err(format!("{e:#}")),
        }
    }
}

/// `koprogo status --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    pub all_ready: bool,
    pub stopping: bool,
    pub memory_bytes: Option<u64>,
    pub orphans_reaped: u64,
    pub services: Vec<ServiceReport>,
    pub logs: BTreeMap<String, serde_json::Value>,
    pub tls: CertStatus,
    pub proxy: ProxySnapshot,
    /// The frontend directory holds an index.html.
    pub frontend_installed: bool,
    /// Backups: last success (time, file, size), last error, next run.
    #[serde(default)]
    pub backup: crate::backup::BackupStatus,
    /// Application updates: the watched binary, the last update, the pre-update backup.
    #[serde(default)]
    pub update: crate::update::UpdateStatus,
    /// The OOM policy: our own `oom_score_adj` and what is not as it should be.
    #[serde(default)]
    pub oom: OomReport,
}

/// The OOM policy as applied (see `process::oom`; each service's value is in its row).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OomReport {
    /// The supervisor's `oom_score_adj` (the policy: -1000).
    pub supervisor: Option<i32>,
    /// One line per process whose value is not the policy's (empty: it holds).
    pub problems: Vec<String>,
}

pub fn socket_path(cfg: &Config) -> PathBuf {
    cfg.paths.run.join("control.sock")
}

pub fn remove_socket(cfg: &Config) {
    let _ = std::fs::remove_file(socket_path(cfg));
}
