//! The configuration model: one TOML file, unknown keys rejected, defaults for a
//! 2 GB VPS, relative paths resolved against the file's directory. Loading never
//! touches the disk beyond reading the file; every error names the file, the key,
//! the value and what to do about it.
//!
//! The steps, one file each: [`raw`] (the file as written, with [`defaults`]),
//! [`resolve`] (what is derived: absolute paths, the TLS mode, the parsed
//! PostgreSQL URL of [`pg_url`]), [`validate`] (the checks), and [`units`]
//! (durations, sizes, times of day, and the byte formatter). This module depends
//! on nothing else in the crate.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod defaults;
pub mod pg_url;
mod raw;
mod resolve;
#[cfg(test)]
mod tests;
pub mod units;
mod validate;

pub use pg_url::{ExternalUrl, SslMode};
pub use raw::{
    AcmeChallenge, Backend, Backup, Capacity, Logs, MemoryBudget, Metrics, Paths, PgMode, Proxy,
    Smtp, TlsMode,
};
pub use units::{parse_duration, parse_size};
pub use validate::check_recipient_setting;

/// Where `koprogo` looks when neither `--config` nor `KOPROGO_CONFIG` is given.
pub const DEFAULT_CONFIG: &str = "/etc/koprogo/koprogo.toml";

/// Environment variables the appliance sets for the API server itself; `[backend.env]`
/// may not override them (it would silently break the contract).
pub const MANAGED_BACKEND_ENV: &[&str] = &[
    "DATABASE_URL",
    "SERVER_HOST",
    "SERVER_PORT",
    "JWT_SECRET",
    "TOTP_ENCRYPTION_KEY",
    "ENERGY_ENCRYPTION_MASTER_KEY",
    "CORS_ALLOWED_ORIGINS",
    "ENABLE_RATE_LIMITING",
    "UPLOAD_DIR",
    "STORAGE_PROVIDER",
    "TMPDIR",
    "NO_COLOR",
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// More instances than this do not fit a single machine's connection budget.
pub const MAX_INSTANCES: u16 = 16;

/// The whole validated configuration, paths absolute.
#[derive(Debug, Clone)]
pub struct Config {
    /// The site's public name (certificates, CORS origin).
    pub domain: String,
    /// Other names the site answers to.
    pub aliases: Vec<String>,
    /// Service user the supervisor drops to when started as root.
    pub user: String,
    pub paths: Paths,
    pub postgres: Postgres,
    pub backend: Backend,
    pub proxy: Proxy,
    pub tls: Tls,
    pub logs: Logs,
    pub metrics: Metrics,
    pub backup: Backup,
    pub capacity: Capacity,
    /// The file this was read from (absolute).
    pub file: PathBuf,
}

/// `[postgres]`, checked: `url` parsed into `external`.
#[derive(Debug, Clone)]
pub struct Postgres {
    pub mode: PgMode,
    /// The parsed `postgres.url` (mode = "external" only; Debug redacts the password).
    pub external: Option<ExternalUrl>,
    /// File holding the external server's password (first line); better than the URL.
    pub password_file: Option<PathBuf>,
    /// PEM roots to verify the external server's certificate with (default: the system's).
    pub ca_file: Option<PathBuf>,
    /// Directory holding `postgres`, `initdb`…; empty = newest /usr/lib/postgresql/*/bin.
    pub bin_dir: Option<PathBuf>,
    /// Memory the tuning may plan for: "auto" (the machine's RAM or cgroup limit) or a size.
    pub memory: MemoryBudget,
    pub max_connections: u32,
    /// Number used in the socket's name (`.s.PGSQL.<port>`); no TCP listener exists.
    pub port: u16,
    pub start_timeout: Duration,
    /// Bound on the fast shutdown before an immediate one.
    pub stop_timeout: Duration,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    pub health_failures: u32,
    /// Extra postgresql.conf settings, written after the managed ones.
    pub settings: BTreeMap<String, String>,
}

/// `[tls]`, checked: the effective `mode`.
#[derive(Debug, Clone)]
pub struct Tls {
    /// `mode` as written, else "acme" when `acme_email` is set, else "internal".
    pub mode: TlsMode,
    /// Contact address for the ACME account (required for mode = "acme").
    pub acme_email: Option<String>,
    pub acme_directory: String,
    /// PEM file of the root to trust for the ACME directory (an office CA, Pebble);
    /// empty = the public web roots.
    pub acme_ca_root: Option<PathBuf>,
    pub acme_challenge: AcmeChallenge,
    /// For mode = "files": PEM certificate chain and private key.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A configuration problem, already phrased for the operator.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for ConfigError {}

/// Which file to read: `--config`, then `KOPROGO_CONFIG` (clap fills both), then the default.
pub fn config_path(arg: Option<&Path>) -> PathBuf {
    arg.map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
}

impl Config {
    /// Reads, parses and validates `file`.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            ConfigError(format!(
                "{}: cannot read the configuration: {e} (pass --config FILE or set KOPROGO_CONFIG)",
                file.display()
            ))
        })?;
        Config::parse(&text, file)
    }

    /// Parses `text` as if read from `file` (relative paths resolve against its directory).
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| {
            ConfigError(format!(
                "{}: {}",
                file.display(),
                e.to_string().trim_end().replace('\n', "\n  ")
            ))
        })?;
        resolve::resolve(raw, file)
    }

    /// An error about `key = value` in this file, with what to do about it.
    fn err(&self, key: &str, value: &dyn fmt::Display, fix: &str) -> ConfigError {
        ConfigError(format!("{}: {key} = {value}: {fix}", self.file.display()))
    }

    /// Every loopback port the API servers may use: `backend.port` and the next
    /// ones, one per instance, then one spare per instance (update swaps).
    pub fn api_ports(&self) -> std::ops::Range<u16> {
        let n = self.backend.instances.max(1);
        let end = u32::from(self.backend.port) + 2 * u32::from(n);
        self.backend.port..end.min(u32::from(u16::MAX)) as u16
    }

    /// The origins the API server must accept (`CORS_ALLOWED_ORIGINS`).
    pub fn origins(&self) -> Vec<String> {
        let port = self.proxy.https.first().map(|a| a.port()).unwrap_or(443);
        let suffix = if port == 443 {
            String::new()
        } else {
            format!(":{port}")
        };
        std::iter::once(&self.domain)
            .chain(self.aliases.iter())
            .map(|h| format!("https://{h}{suffix}"))
            .collect()
    }
}
