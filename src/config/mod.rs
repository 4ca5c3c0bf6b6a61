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
//!
//! [`managed`] layers the package's debconf answers (`debconf.toml` beside the
//! main file, written by the postinst) under the main file: a key the main file
//! sets wins, table by table; each file's unknown keys and wrong types are refused
//! naming that file, and a bad value is reported in the file it came from.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod defaults;
mod managed;
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

/// The file the package writes from its debconf answers, read from the main file's
/// directory under it: the main file's keys win over it.
pub const MANAGED_FILE: &str = "debconf.toml";

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
    /// The debconf-managed file read under it, if there was one.
    pub managed: Option<Managed>,
}

/// The managed file ([`MANAGED_FILE`]) a configuration was layered on, and which of
/// its keys took effect (the main file did not set them).
#[derive(Debug, Clone)]
pub struct Managed {
    /// Its path (absolute).
    pub file: PathBuf,
    /// Dotted names (`tls.mode`, `backend.smtp.host`) of the values taken from it.
    pub keys: BTreeSet<String>,
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
    /// Reads, parses and validates `file`, layered on the managed file beside it
    /// ([`MANAGED_FILE`]) when that exists.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            ConfigError(format!(
                "{}: cannot read the configuration: {e} (pass --config FILE or set KOPROGO_CONFIG)",
                file.display()
            ))
        })?;
        let managed_path = managed::path_beside(file);
        let managed_text = managed::read(&managed_path)?;
        Config::parse_layered(
            &text,
            file,
            managed_text.as_deref().map(|t| (t, managed_path.as_path())),
        )
    }

    /// Parses `text` as if read from `file` (relative paths resolve against its
    /// directory), with no managed file.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        Config::parse_layered(text, file, None)
    }

    /// Parses `text` as if read from `file`, layered on `managed` (its text and
    /// path): every key `text` sets wins over the managed file's, table by table.
    pub fn parse_layered(
        text: &str,
        file: &Path,
        managed: Option<(&str, &Path)>,
    ) -> Result<Config, ConfigError> {
        let Some((mtext, mfile)) = managed else {
            let raw = managed::raw_of(text, file)?;
            return resolve::resolve(raw, file, None);
        };
        let (raw, keys) = managed::layer(text, file, mtext, mfile)?;
        let managed = Managed {
            file: resolve::absolute(mfile),
            keys,
        };
        resolve::resolve(raw, file, Some(managed))
    }

    /// The file `key`'s value came from: the managed file when the main file
    /// does not set it and the managed one does, else the main file.
    pub fn origin(&self, key: &str) -> &Path {
        match &self.managed {
            Some(m) if m.keys.contains(key) => &m.file,
            _ => &self.file,
        }
    }

    /// An error about `key = value` in the file it came from, with what to do about it.
    fn err(&self, key: &str, value: &dyn fmt::Display, fix: &str) -> ConfigError {
        self.err_in(key, key, value, fix)
    }

    /// An error about `key = value`, reported in the file `origin_key` came from
    /// (for a key missing in both files, the key that asked for it).
    fn err_in(
        &self,
        origin_key: &str,
        key: &str,
        value: &dyn fmt::Display,
        fix: &str,
    ) -> ConfigError {
        ConfigError(format!(
            "{}: {key} = {value}: {fix}",
            self.origin(origin_key).display()
        ))
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
