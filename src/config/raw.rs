//! `koprogo.toml` exactly as written: the serde model of every section, unknown
//! keys rejected, each key's default for a 2 GB VPS (in [`super::defaults`]).
//! Nothing here is derived or checked beyond its type: [`super::resolve`] makes
//! the final [`super::Config`] from it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::defaults::*;
use super::pg_url::redact_raw;
use super::units::{de_duration, de_size, parse_size};

/// The file as written (the final, checked form is [`super::Config`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The site's public name (certificates, CORS origin).
    #[serde(default = "default_domain")]
    pub domain: String,
    /// Other names the site answers to.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Service user the supervisor drops to when started as root.
    #[serde(default = "default_user")]
    pub user: String,
    #[serde(default)]
    pub paths: Paths,
    #[serde(default)]
    pub postgres: RawPostgres,
    #[serde(default)]
    pub backend: Backend,
    #[serde(default)]
    pub proxy: Proxy,
    #[serde(default)]
    pub tls: RawTls,
    #[serde(default)]
    pub logs: Logs,
    #[serde(default)]
    pub metrics: Metrics,
    #[serde(default)]
    pub backup: Backup,
    #[serde(default)]
    pub capacity: Capacity,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Paths {
    #[serde(default = "default_state")]
    pub state: PathBuf,
    #[serde(default = "default_logs")]
    pub logs: PathBuf,
    #[serde(default = "default_run")]
    pub run: PathBuf,
}

/// Text that may hold a password (`postgres.url` as written): Debug redacts it.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct SecretText(pub String);

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact_raw(&self.0))
    }
}

/// `postgres.mode`: the appliance's own private cluster, or a server run elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PgMode {
    /// A private cluster under `<state>/pgdata`, supervised as a child.
    #[default]
    Managed,
    /// A PostgreSQL server elsewhere (`postgres.url`): no cluster, no child.
    External,
}

/// `[postgres]` as written (the final form is [`super::Postgres`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPostgres {
    #[serde(default)]
    pub mode: PgMode,
    /// For mode = "external": `postgresql://user[:password]@host[:port]/db[?sslmode=…]`,
    /// as written (it may hold a password: never print it).
    #[serde(default)]
    pub url: Option<SecretText>,
    /// File holding the external server's password (first line); better than the URL.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// PEM roots to verify the external server's certificate with (default: the system's).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Directory holding `postgres`, `initdb`…; empty = newest /usr/lib/postgresql/*/bin.
    #[serde(default)]
    pub bin_dir: Option<PathBuf>,
    /// Memory the tuning may plan for: "auto" (the machine's RAM or cgroup limit) or a size.
    #[serde(default)]
    pub memory: MemoryBudget,
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Number used in the socket's name (`.s.PGSQL.<port>`); no TCP listener exists.
    #[serde(default = "default_pg_port")]
    pub port: u16,
    #[serde(default = "default_pg_start_timeout", deserialize_with = "de_duration")]
    pub start_timeout: Duration,
    /// Bound on the fast shutdown before an immediate one.
    #[serde(default = "default_pg_stop_timeout", deserialize_with = "de_duration")]
    pub stop_timeout: Duration,
    /// Pause between health checks of the running server.
    #[serde(
        default = "default_pg_health_interval",
        deserialize_with = "de_duration"
    )]
    pub health_interval: Duration,
    /// Bound on one health check (connect and `SELECT 1`).
    #[serde(
        default = "default_pg_health_timeout",
        deserialize_with = "de_duration"
    )]
    pub health_timeout: Duration,
    /// Health checks failed in a row before it is restarted.
    #[serde(default = "default_health_failures")]
    pub health_failures: u32,
    /// Extra postgresql.conf settings, written after the managed ones.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// The koprogo-api binary (no arguments are passed, by contract).
    #[serde(default = "default_backend_command")]
    pub command: PathBuf,
    /// The system user the API server runs as when koprogo starts with the privilege
    /// to switch (as root, or under the packaged unit): its own, apart from `user`.
    #[serde(default = "default_backend_user")]
    pub user: String,
    /// Loopback port it listens on (the first instance's).
    #[serde(default = "default_backend_port")]
    pub port: u16,
    /// API servers run side by side behind the proxy, on consecutive ports from
    /// `port`; the next `instances` ports are their spares for update swaps.
    #[serde(default = "default_instances")]
    pub instances: u16,
    /// Health URL path; readiness = 200 here AND the database answers.
    #[serde(default = "default_health")]
    pub health: String,
    #[serde(
        default = "default_backend_start_timeout",
        deserialize_with = "de_duration"
    )]
    pub start_timeout: Duration,
    /// Grace after SIGTERM before SIGKILL (its own drain is 30 s).
    #[serde(
        default = "default_backend_stop_timeout",
        deserialize_with = "de_duration"
    )]
    pub stop_timeout: Duration,
    /// Pause between health checks of the running server.
    #[serde(
        default = "default_backend_health_interval",
        deserialize_with = "de_duration"
    )]
    pub health_interval: Duration,
    /// Bound on one health check (the health URL, then the database).
    #[serde(
        default = "default_backend_health_timeout",
        deserialize_with = "de_duration"
    )]
    pub health_timeout: Duration,
    /// Health checks failed in a row before it is replaced.
    #[serde(default = "default_health_failures")]
    pub health_failures: u32,
    /// ACTIX_WORKERS; 0 = one per core, at most 4.
    #[serde(default)]
    pub workers: u32,
    #[serde(default = "default_pool_max")]
    pub pool_max: u32,
    #[serde(default = "default_pool_min")]
    pub pool_min: u32,
    #[serde(default = "default_log_level")]
    pub log_level: String,
    #[serde(default)]
    pub smtp: Smtp,
    /// Extra environment for the API server.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Smtp {
    #[serde(default)]
    pub enabled: bool,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub from_email: Option<String>,
    pub from_name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proxy {
    /// Plain-HTTP listeners (ACME challenges and the redirect to HTTPS).
    #[serde(default = "default_http")]
    pub http: Vec<SocketAddr>,
    /// HTTPS listeners.
    #[serde(default = "default_https")]
    pub https: Vec<SocketAddr>,
    /// The frontend: an Astro `dist/` directory.
    #[serde(default = "default_frontend")]
    pub frontend: PathBuf,
    /// Body limit for API requests that are not uploads (JSON, forms).
    #[serde(default = "default_max_body", deserialize_with = "de_size")]
    pub max_body: u64,
    /// Body limit for uploads (multipart/form-data or application/octet-stream bodies).
    #[serde(default = "default_max_upload", deserialize_with = "de_size")]
    pub max_upload: u64,
    /// Time a client gets to send its request headers (slowloris guard).
    #[serde(default = "default_header_timeout", deserialize_with = "de_duration")]
    pub header_timeout: Duration,
    /// An idle keep-alive connection is closed after this.
    #[serde(default = "default_idle_timeout", deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// An upgraded connection (a WebSocket) with no byte either way for this long is
    /// closed. It holds its client's connection slot while it lives.
    #[serde(
        default = "default_tunnel_idle_timeout",
        deserialize_with = "de_duration"
    )]
    pub tunnel_idle_timeout: Duration,
    /// Per-client-IP request rate (token bucket average, per second); 0 = no limit.
    #[serde(default = "default_rate")]
    pub rate: u32,
    /// Token bucket size.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// Open connections allowed per client IP; 0 = no limit.
    #[serde(default = "default_max_conns_per_ip")]
    pub max_conns_per_ip: u32,
    /// An IPv6 client is its network of this prefix length (one site gets a /64 and
    /// picks any address in it): in the rate limit, the connection cap, the address
    /// the API server sees (its login limiter) and the access log.
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix: u8,
    /// Proxies in front of this one (CIDRs, e.g. "10.0.0.5/32"): a connection from
    /// one of them is believed about the client (the rightmost `X-Forwarded-For`
    /// entry that is not itself a trusted proxy) and is not counted in the
    /// per-client connection cap.
    #[serde(default)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// How long an API request waits for the API server during a restart.
    #[serde(default = "default_backend_wait", deserialize_with = "de_duration")]
    pub backend_wait: Duration,
    /// Strict-Transport-Security max-age; 0 disables the header.
    #[serde(default = "default_hsts", deserialize_with = "de_duration")]
    pub hsts: Duration,
}

/// How the HTTPS certificate is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Let's Encrypt or another ACME CA (a local-CA certificate until the first arrives).
    Acme,
    /// The appliance's own local root CA (offices without internet).
    Internal,
    /// Operator-provided certificate and key files, reloaded when they change.
    Files,
    /// No HTTPS at all (behind another TLS terminator only).
    Off,
}

/// Which ACME challenge to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AcmeChallenge {
    #[serde(rename = "http-01", alias = "http01")]
    Http01,
    #[serde(rename = "tls-alpn-01", alias = "tls-alpn01")]
    TlsAlpn01,
}

/// `[tls]` as written (the final form is [`super::Tls`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// Absent = "acme" when `acme_email` is set, else "internal".
    #[serde(default)]
    pub mode: Option<TlsMode>,
    /// Contact address for the ACME account (required for mode = "acme").
    #[serde(default)]
    pub acme_email: Option<String>,
    #[serde(default = "default_acme_directory")]
    pub acme_directory: String,
    /// PEM file of the root to trust for the ACME directory (an office CA, Pebble);
    /// empty = the public web roots.
    #[serde(default)]
    pub acme_ca_root: Option<PathBuf>,
    #[serde(default = "default_acme_challenge")]
    pub acme_challenge: AcmeChallenge,
    /// For mode = "files": PEM certificate chain and private key.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// The Prometheus endpoint: loopback only (scrape through a local agent or a tunnel).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_metrics_listen")]
    pub listen: SocketAddr,
}

/// `[backup]`: daily backups (database, uploads, secrets) into one file each.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backup {
    /// Run the daily scheduled backup (manual `koprogo backup create` works either way).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Where backups are written; empty = `<state>/backups`.
    #[serde(default)]
    pub dir: PathBuf,
    /// Local time of the daily backup, "HH:MM".
    #[serde(default = "default_backup_schedule")]
    pub schedule: String,
    /// Backups kept at most (the newest good one is never deleted).
    #[serde(default = "default_backup_keep")]
    pub keep: usize,
    /// Backups older than this are deleted (the newest good one is never deleted).
    #[serde(default = "default_max_age", deserialize_with = "de_duration")]
    pub max_age: Duration,
    /// Encrypt each backup with age to this recipient ("age1…") or to the recipients
    /// listed in this file (one per line).
    #[serde(default)]
    pub encrypt_to: Option<String>,
    /// Program and arguments run after each successful backup, the file's path appended.
    #[serde(default)]
    pub copy_command: Option<Vec<String>>,
}

/// `[capacity]`: the running supervisor's capacity check (`koprogo capacity`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    /// How often the thresholds are checked (the old monitoring cron: 5 minutes).
    #[serde(
        default = "default_capacity_interval",
        deserialize_with = "de_duration"
    )]
    pub interval: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logs {
    #[serde(default = "default_log_max_size", deserialize_with = "de_size")]
    pub max_size: u64,
    #[serde(default = "default_true")]
    pub rotate_daily: bool,
    #[serde(default = "default_keep_files")]
    pub keep_files: usize,
    #[serde(default = "default_max_age", deserialize_with = "de_duration")]
    pub max_age: Duration,
    #[serde(default = "default_true")]
    pub compress: bool,
}

/// `postgres.memory`: "auto" or a byte size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryBudget {
    #[default]
    Auto,
    Bytes(u64),
}

impl<'de> Deserialize<'de> for MemoryBudget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "auto" {
            return Ok(MemoryBudget::Auto);
        }
        parse_size(&s)
            .map(MemoryBudget::Bytes)
            .map_err(|e| serde::de::Error::custom(format!("{e} (or \"auto\")")))
    }
}
