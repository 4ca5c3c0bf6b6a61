//! The configuration model: one TOML file, unknown keys rejected, defaults for a
//! 2 GB VPS, relative paths resolved against the file's directory. Loading never
//! touches the disk beyond reading the file; every error names the file, the key,
//! the value and what to do about it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

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

/// The whole validated configuration, paths absolute.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
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
    pub postgres: Postgres,
    #[serde(default)]
    pub backend: Backend,
    #[serde(default)]
    pub proxy: Proxy,
    #[serde(default)]
    pub tls: Tls,
    #[serde(default)]
    pub logs: Logs,
    #[serde(default)]
    pub metrics: Metrics,
    #[serde(default)]
    pub backup: Backup,
    #[serde(default)]
    pub capacity: Capacity,
    /// The file this was read from (not a key).
    #[serde(skip)]
    pub file: PathBuf,
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
pub struct SecretText(String);

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", crate::postgres::external::redact_raw(&self.0))
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Postgres {
    #[serde(default)]
    pub mode: PgMode,
    /// For mode = "external": `postgresql://user[:password]@host[:port]/db[?sslmode=…]`,
    /// as written (it may hold a password: never print it, use `external`).
    #[serde(default, rename = "url")]
    url_setting: Option<SecretText>,
    /// The parsed `url` (filled in after parsing; Debug redacts the password).
    #[serde(skip)]
    pub external: Option<crate::postgres::external::ExternalUrl>,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// `mode` as written; absent = "acme" when `acme_email` is set, else "internal".
    #[serde(default, rename = "mode")]
    mode_setting: Option<TlsMode>,
    /// The effective mode (filled in after parsing).
    #[serde(skip, default = "default_tls_mode")]
    pub mode: TlsMode,
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

impl Default for Tls {
    fn default() -> Self {
        Tls {
            mode_setting: None,
            mode: default_tls_mode(),
            acme_email: None,
            acme_directory: default_acme_directory(),
            acme_ca_root: None,
            acme_challenge: default_acme_challenge(),
            cert: None,
            key: None,
        }
    }
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

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            enabled: true,
            listen: default_metrics_listen(),
        }
    }
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

impl Default for Backup {
    fn default() -> Self {
        Backup {
            enabled: true,
            dir: PathBuf::new(),
            schedule: default_backup_schedule(),
            keep: default_backup_keep(),
            max_age: default_max_age(),
            encrypt_to: None,
            copy_command: None,
        }
    }
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

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            interval: default_capacity_interval(),
        }
    }
}

fn default_capacity_interval() -> Duration {
    Duration::from_secs(300)
}

fn default_backup_schedule() -> String {
    "02:00".into()
}
fn default_backup_keep() -> usize {
    7
}

fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9187))
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

fn default_domain() -> String {
    "localhost".into()
}
fn default_user() -> String {
    "koprogo".into()
}
fn default_state() -> PathBuf {
    "/var/lib/koprogo".into()
}
fn default_logs() -> PathBuf {
    "/var/log/koprogo".into()
}
fn default_run() -> PathBuf {
    "/run/koprogo".into()
}
fn default_max_connections() -> u32 {
    20
}
fn default_pg_port() -> u16 {
    5432
}
fn default_pg_start_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_pg_stop_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_backend_command() -> PathBuf {
    "/usr/lib/koprogo/koprogo-api".into()
}
fn default_backend_user() -> String {
    "koprogo-api".into()
}
fn default_backend_port() -> u16 {
    8081
}
fn default_health() -> String {
    "/api/v1/health".into()
}
fn default_backend_start_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_backend_stop_timeout() -> Duration {
    Duration::from_secs(35)
}
fn default_instances() -> u16 {
    1
}
/// More instances than this do not fit a single machine's connection budget.
pub const MAX_INSTANCES: u16 = 16;
fn default_pool_max() -> u32 {
    8
}
fn default_pool_min() -> u32 {
    2
}
/// `local@domain` with no spaces, no angle brackets and one `@` (what a mail
/// server takes in MAIL FROM; the API builds its sender from it).
fn is_mail_address(s: &str) -> bool {
    match s.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !s[local.len() + 1..].contains('@')
                && !s.chars().any(|c| c.is_whitespace() || "<>,;\"".contains(c))
        }
        None => false,
    }
}

fn default_log_level() -> String {
    "info".into()
}
fn default_http() -> Vec<SocketAddr> {
    vec!["[::]:80"
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 80)))]
}
fn default_https() -> Vec<SocketAddr> {
    vec!["[::]:443"
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 443)))]
}
fn default_frontend() -> PathBuf {
    "/usr/share/koprogo/frontend".into()
}
fn default_max_body() -> u64 {
    1 << 20
}
fn default_max_upload() -> u64 {
    50 << 20
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_tunnel_idle_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_rate() -> u32 {
    500
}
fn default_burst() -> u32 {
    1000
}
fn default_ipv6_prefix() -> u8 {
    64
}
fn default_max_conns_per_ip() -> u32 {
    256
}
fn default_backend_wait() -> Duration {
    Duration::from_secs(15)
}
fn default_hsts() -> Duration {
    Duration::from_secs(365 * 86400)
}
fn default_tls_mode() -> TlsMode {
    TlsMode::Internal
}
fn default_acme_directory() -> String {
    "https://acme-v02.api.letsencrypt.org/directory".into()
}
fn default_acme_challenge() -> AcmeChallenge {
    AcmeChallenge::TlsAlpn01
}
fn default_log_max_size() -> u64 {
    10 * 1024 * 1024
}
fn default_keep_files() -> usize {
    14
}
fn default_max_age() -> Duration {
    Duration::from_secs(7 * 86400)
}
fn default_true() -> bool {
    true
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            state: default_state(),
            logs: default_logs(),
            run: default_run(),
        }
    }
}
impl Default for Postgres {
    fn default() -> Self {
        Postgres {
            mode: PgMode::Managed,
            url_setting: None,
            external: None,
            password_file: None,
            ca_file: None,
            bin_dir: None,
            memory: MemoryBudget::Auto,
            max_connections: default_max_connections(),
            port: default_pg_port(),
            start_timeout: default_pg_start_timeout(),
            stop_timeout: default_pg_stop_timeout(),
            settings: BTreeMap::new(),
        }
    }
}
impl Default for Backend {
    fn default() -> Self {
        Backend {
            command: default_backend_command(),
            user: default_backend_user(),
            port: default_backend_port(),
            instances: default_instances(),
            health: default_health(),
            start_timeout: default_backend_start_timeout(),
            stop_timeout: default_backend_stop_timeout(),
            workers: 0,
            pool_max: default_pool_max(),
            pool_min: default_pool_min(),
            log_level: default_log_level(),
            smtp: Smtp::default(),
            env: BTreeMap::new(),
        }
    }
}
impl Default for Proxy {
    fn default() -> Self {
        Proxy {
            http: default_http(),
            https: default_https(),
            frontend: default_frontend(),
            max_body: default_max_body(),
            max_upload: default_max_upload(),
            header_timeout: default_header_timeout(),
            idle_timeout: default_idle_timeout(),
            tunnel_idle_timeout: default_tunnel_idle_timeout(),
            rate: default_rate(),
            burst: default_burst(),
            max_conns_per_ip: default_max_conns_per_ip(),
            ipv6_prefix: default_ipv6_prefix(),
            trusted_proxies: Vec::new(),
            backend_wait: default_backend_wait(),
            hsts: default_hsts(),
        }
    }
}
impl Default for Logs {
    fn default() -> Self {
        Logs {
            max_size: default_log_max_size(),
            rotate_daily: true,
            keep_files: default_keep_files(),
            max_age: default_max_age(),
            compress: true,
        }
    }
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
        let mut cfg: Config = toml::from_str(text).map_err(|e| {
            ConfigError(format!(
                "{}: {}",
                file.display(),
                e.to_string().trim_end().replace('\n', "\n  ")
            ))
        })?;
        cfg.tls.mode = cfg
            .tls
            .mode_setting
            .unwrap_or(if cfg.tls.acme_email.is_some() {
                TlsMode::Acme
            } else {
                TlsMode::Internal
            });
        let file = absolute(file);
        let base = file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        cfg.file = file;
        for p in [
            &mut cfg.paths.state,
            &mut cfg.paths.logs,
            &mut cfg.paths.run,
            &mut cfg.backend.command,
            &mut cfg.proxy.frontend,
        ] {
            resolve(p, &base);
        }
        for p in [
            cfg.postgres.bin_dir.as_mut(),
            cfg.postgres.password_file.as_mut(),
            cfg.postgres.ca_file.as_mut(),
            cfg.tls.acme_ca_root.as_mut(),
            cfg.tls.cert.as_mut(),
            cfg.tls.key.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            resolve(p, &base);
        }
        if cfg.backup.dir.as_os_str().is_empty() {
            cfg.backup.dir = cfg.paths.state.join("backups");
        } else {
            resolve(&mut cfg.backup.dir, &base);
        }
        if let Some(e) = cfg.backup.encrypt_to.as_mut() {
            if !e.starts_with("age1") {
                let mut p = PathBuf::from(&*e);
                resolve(&mut p, &base);
                *e = p.display().to_string();
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn err(&self, key: &str, value: &dyn fmt::Display, fix: &str) -> ConfigError {
        ConfigError(format!("{}: {key} = {value}: {fix}", self.file.display()))
    }

    fn validate(&mut self) -> Result<(), ConfigError> {
        if self.domain.trim().is_empty() || self.domain.contains(['/', ':', ' ']) {
            return Err(self.err(
                "domain",
                &format!("{:?}", self.domain),
                "set the site's host name, e.g. domain = \"syndic.example.be\"",
            ));
        }
        if self.user.is_empty() {
            return Err(self.err("user", &"\"\"", "name the service user, e.g. \"koprogo\""));
        }
        // A Unix socket path is limited to 107 bytes; Postgres' is the longest we make.
        let sock = self
            .paths
            .run
            .join(format!(".s.PGSQL.{}.lock", self.postgres.port));
        if sock.as_os_str().len() > 100 {
            return Err(self.err(
                "paths.run",
                &self.paths.run.display(),
                "too long for a Unix socket path (keep it under 80 characters)",
            ));
        }
        self.validate_postgres_mode()?;
        if self.postgres.max_connections < 5 {
            return Err(self.err(
                "postgres.max_connections",
                &self.postgres.max_connections,
                "use at least 5",
            ));
        }
        let b = &self.backend;
        if b.port == 0 {
            return Err(self.err("backend.port", &0, "choose a free loopback port, e.g. 8081"));
        }
        if b.instances == 0 || b.instances > MAX_INSTANCES {
            return Err(self.err(
                "backend.instances",
                &b.instances,
                &format!("use 1 to {MAX_INSTANCES} (one per core is plenty)"),
            ));
        }
        if u32::from(b.port) + 2 * u32::from(b.instances) - 1 > u32::from(u16::MAX) {
            return Err(self.err(
                "backend.port",
                &b.port,
                &format!(
                    "{} instances need the ports {}..{} (their own and their update spares): choose a lower port",
                    b.instances,
                    b.port,
                    u32::from(b.port) + 2 * u32::from(b.instances) - 1
                ),
            ));
        }
        if !b.health.starts_with('/') {
            return Err(self.err(
                "backend.health",
                &format!("{:?}", b.health),
                "must be a path starting with '/', e.g. \"/api/v1/health\"",
            ));
        }
        if b.pool_min > b.pool_max || b.pool_max == 0 {
            return Err(self.err(
                "backend.pool_max",
                &b.pool_max,
                "must be at least 1 and at least backend.pool_min",
            ));
        }
        // During an update the replacement server opens its pool while the old one
        // still holds its own: one instance more. On top, 3 connections for the
        // supervisor's probe, psql and backups (PostgreSQL's 3 superuser-reserved
        // slots, where the supervisor connects, in the private cluster).
        let peak = b.pool_max * (u32::from(b.instances) + 1);
        if peak + 3 > self.postgres.max_connections {
            return Err(self.err(
                "backend.pool_max",
                &b.pool_max,
                &format!(
                    "with backend.instances = {} the pools take up to {peak} connections during an \
                     update (one instance more while the new server starts): they must leave 3 \
                     free below postgres.max_connections ({}); lower pool_max or raise max_connections",
                    b.instances,
                    self.postgres.max_connections
                ),
            ));
        }
        for key in b.env.keys() {
            if MANAGED_BACKEND_ENV.contains(&key.as_str()) {
                return Err(self.err(
                    &format!("backend.env.{key}"),
                    &"…",
                    "this variable is managed by koprogo; remove it from [backend.env]",
                ));
            }
        }
        if b.smtp.enabled {
            let s = &b.smtp;
            // What koprogo-api's EmailService::from_env requires (it panics at boot
            // without one of them); the port defaults to 587 there.
            for (k, missing) in [
                ("host", s.host.as_deref().is_none_or(str::is_empty)),
                ("username", s.username.as_deref().is_none_or(str::is_empty)),
                ("password", s.password.as_deref().is_none_or(str::is_empty)),
                (
                    "from_email",
                    s.from_email.as_deref().is_none_or(str::is_empty),
                ),
            ] {
                if missing {
                    return Err(self.err(
                        &format!("backend.smtp.{k}"),
                        &"(missing)",
                        "required when backend.smtp.enabled = true (the API server would crash at boot)",
                    ));
                }
            }
            if let Some(from) = s.from_email.as_deref().filter(|f| !is_mail_address(f)) {
                return Err(self.err(
                    "backend.smtp.from_email",
                    &format!("{from:?}"),
                    "must be one address like \"syndic@example.be\" (no name, no spaces)",
                ));
            }
            if s.port == Some(0) {
                return Err(self.err("backend.smtp.port", &0, "must be 1-65535 (usually 587)"));
            }
        }
        let tunnel_idle = self.proxy.tunnel_idle_timeout;
        if tunnel_idle < Duration::from_secs(1) || tunnel_idle > Duration::from_secs(86400) {
            return Err(self.err(
                "proxy.tunnel_idle_timeout",
                &format!("{tunnel_idle:?}"),
                "must be 1s-24h: a WebSocket with no traffic either way for this long is \
                 closed (e.g. \"10m\"; clients that keep a socket open send pings)",
            ));
        }
        if !(32..=128).contains(&self.proxy.ipv6_prefix) {
            return Err(self.err(
                "proxy.ipv6_prefix",
                &self.proxy.ipv6_prefix,
                "must be 32-128 (64: one client per /64, what a site is usually given)",
            ));
        }
        // koprogo-api reads RUST_LOG with tracing's EnvFilter and silently falls
        // back to "info" on a value it cannot parse: refuse it here instead.
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&b.log_level) {
            return Err(self.err(
                "backend.log_level",
                &format!("{:?}", b.log_level),
                &format!("is not a log filter ({e}): use error, warn, info, debug or trace, or directives like \"info,sqlx=warn\""),
            ));
        }
        for (key, list) in [
            ("proxy.http", &self.proxy.http),
            ("proxy.https", &self.proxy.https),
        ] {
            for a in list.iter() {
                if self.api_ports().contains(&a.port())
                    && (a.ip().is_unspecified() || a.ip().is_loopback())
                {
                    return Err(self.err(
                        key,
                        a,
                        &format!(
                            "clashes with the API ports {}..{} (backend.port = {}, {} instance(s) \
                             and their update spares); pick another port",
                            b.port,
                            self.api_ports().end - 1,
                            b.port,
                            b.instances
                        ),
                    ));
                }
            }
        }
        match self.tls.mode {
            TlsMode::Acme => {
                let email = self.tls.acme_email.as_deref().unwrap_or("");
                if !email.contains('@') {
                    return Err(self.err(
                        "tls.acme_email",
                        &format!("{email:?}"),
                        "mode = \"acme\" needs a contact address, e.g. acme_email = \"syndic@example.be\"",
                    ));
                }
                if !self.tls.acme_directory.starts_with("https://") {
                    return Err(self.err(
                        "tls.acme_directory",
                        &format!("{:?}", self.tls.acme_directory),
                        "must be an https:// URL",
                    ));
                }
                if self.domain == "localhost" {
                    return Err(self.err(
                        "domain",
                        &"\"localhost\"",
                        "an ACME CA cannot issue for localhost: set the site's public name or use tls.mode = \"internal\"",
                    ));
                }
            }
            TlsMode::Files => {
                if self.tls.cert.is_none() || self.tls.key.is_none() {
                    return Err(self.err(
                        "tls.cert",
                        &"(missing)",
                        "mode = \"files\" needs tls.cert and tls.key (PEM files)",
                    ));
                }
            }
            TlsMode::Internal | TlsMode::Off => {}
        }
        if self.proxy.burst < self.proxy.rate.min(1) {
            return Err(self.err(
                "proxy.burst",
                &self.proxy.burst,
                "must be at least 1 when proxy.rate is set",
            ));
        }
        if self.proxy.max_upload < self.proxy.max_body {
            return Err(self.err(
                "proxy.max_upload",
                &self.proxy.max_upload,
                "must be at least proxy.max_body",
            ));
        }
        if self.metrics.enabled && !self.metrics.listen.ip().is_loopback() {
            return Err(self.err(
                "metrics.listen",
                &self.metrics.listen,
                "metrics have no authentication and must stay on loopback (127.0.0.1 or [::1]); \
                 scrape them through a local agent or an SSH tunnel",
            ));
        }
        if self.logs.max_size < 64 * 1024 {
            return Err(self.err("logs.max_size", &self.logs.max_size, "use at least 64KiB"));
        }
        if self.logs.keep_files == 0 {
            return Err(self.err("logs.keep_files", &0, "keep at least 1 rotated file"));
        }
        if let Err(e) = crate::backup::schedule::parse_time(&self.backup.schedule) {
            return Err(self.err(
                "backup.schedule",
                &format!("{:?}", self.backup.schedule),
                &e,
            ));
        }
        let every = self.capacity.interval;
        if every < Duration::from_secs(1) || every > Duration::from_secs(86400) {
            return Err(self.err(
                "capacity.interval",
                &format!("{every:?}"),
                "use a duration from \"1s\" to \"1d\" (the default is \"5m\")",
            ));
        }
        if self.backup.keep == 0 {
            return Err(self.err("backup.keep", &0, "keep at least 1 backup"));
        }
        if let Some(e) = &self.backup.encrypt_to {
            if let Err(why) = crate::backup::crypt::check_recipient_setting(e) {
                return Err(self.err("backup.encrypt_to", &format!("{e:?}"), &why));
            }
        }
        if let Some(c) = &self.backup.copy_command {
            if c.first().is_none_or(|p| p.trim().is_empty()) {
                return Err(self.err(
                    "backup.copy_command",
                    &format!("{c:?}"),
                    "name a program, e.g. [\"/usr/local/bin/ship-backup\"] (the file's path is appended)",
                ));
            }
        }
        Ok(())
    }

    /// `postgres.mode`, `url`, `password_file`, `ca_file` fit together; parses `url`.
    fn validate_postgres_mode(&mut self) -> Result<(), ConfigError> {
        use crate::postgres::external::{redact_raw, ExternalUrl};
        let pg = &self.postgres;
        match (pg.mode, pg.url_setting.as_ref().map(|u| u.0.as_str())) {
            (PgMode::Managed, Some(url)) => {
                return Err(self.err(
                    "postgres.url",
                    &format!("{:?}", redact_raw(url)),
                    "only used with postgres.mode = \"external\": add mode = \"external\" to [postgres] \
                     to use that server, or remove url to keep the private cluster",
                ));
            }
            (PgMode::External, None) => {
                return Err(self.err(
                    "postgres.mode",
                    &"\"external\"",
                    "needs postgres.url, e.g. url = \"postgresql://koprogo@db.example.be:5432/koprogo?sslmode=verify-full\"",
                ));
            }
            (PgMode::Managed, None) => {
                for (key, set) in [
                    ("postgres.password_file", pg.password_file.is_some()),
                    ("postgres.ca_file", pg.ca_file.is_some()),
                ] {
                    if set {
                        return Err(self.err(
                            key,
                            &"…",
                            "only used with postgres.mode = \"external\" (the private cluster needs no password or CA): remove it",
                        ));
                    }
                }
                return Ok(());
            }
            (PgMode::External, Some(_)) => {}
        }
        let raw = pg.url_setting.clone().map(|u| u.0).unwrap_or_default();
        let url = ExternalUrl::parse(&raw)
            .map_err(|why| self.err("postgres.url", &format!("{:?}", redact_raw(&raw)), &why))?;
        if url.password.is_some() && pg.password_file.is_some() {
            return Err(self.err(
                "postgres.password_file",
                &pg.password_file
                    .as_deref()
                    .unwrap_or(Path::new(""))
                    .display(),
                "the password is given twice (also in postgres.url): keep one, preferably the file",
            ));
        }
        if url.param("sslrootcert").is_some() && pg.ca_file.is_some() {
            return Err(self.err(
                "postgres.ca_file",
                &pg.ca_file.as_deref().unwrap_or(Path::new("")).display(),
                "the CA is given twice (also as sslrootcert in postgres.url): keep one",
            ));
        }
        if !pg.settings.is_empty() {
            return Err(self.err(
                "postgres.settings",
                &"{…}",
                "server settings cannot be applied to an external server: set them there and remove [postgres.settings]",
            ));
        }
        self.postgres.external = Some(url);
        Ok(())
    }

    /// The origins the API server must accept (`CORS_ALLOWED_ORIGINS`).
    /// Every loopback port the API servers may use: `backend.port` and the next
    /// ones, one per instance, then one spare per instance (update swaps).
    pub fn api_ports(&self) -> std::ops::Range<u16> {
        let n = self.backend.instances.max(1);
        let end = u32::from(self.backend.port) + 2 * u32::from(n);
        self.backend.port..end.min(u32::from(u16::MAX)) as u16
    }

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

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

fn resolve(p: &mut PathBuf, base: &Path) {
    if p.is_relative() {
        *p = normalize(&base.join(&*p));
    }
}

/// Removes `.` and `..` components lexically, so paths in messages read well.
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Parses "35s", "2m", "1h", "7d" or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (use e.g. \"30s\", \"5m\", \"7d\")"))?;
    let mult = match unit.trim() {
        "" | "s" => 1,
        "ms" => return Ok(Duration::from_millis(n)),
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86400,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} in {s:?} (use ms, s, m, h or d)"
            ))
        }
    };
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

/// Parses "10MiB", "512MB", "64k", "1G" or a bare number of bytes (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (use e.g. \"512MB\", \"10MiB\", \"2G\")"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?} (use B, KiB, MiB or GiB)"
            ))
        }
    };
    Ok(n.saturating_mul(mult))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrText {
    Num(u64),
    Text(String),
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match NumOrText::deserialize(d)? {
        NumOrText::Num(n) => Ok(Duration::from_secs(n)),
        NumOrText::Text(s) => parse_duration(&s).map_err(serde::de::Error::custom),
    }
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match NumOrText::deserialize(d)? {
        NumOrText::Num(n) => Ok(n),
        NumOrText::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(t, Path::new("/etc/koprogo/test.toml"))
    }

    #[test]
    fn defaults_fit_a_small_vps() {
        let c = parse("").expect("empty config is valid");
        assert_eq!(c.paths.state, PathBuf::from("/var/lib/koprogo"));
        assert_eq!(c.backend.stop_timeout, Duration::from_secs(35));
        assert_eq!(c.logs.max_age, Duration::from_secs(7 * 86400));
        assert_eq!(c.origins(), vec!["https://localhost".to_string()]);
    }

    #[test]
    fn relative_paths_resolve_against_the_file() {
        let c = parse("[paths]\nstate = \"../st\"\nlogs = \"l\"\n").expect("valid");
        assert_eq!(c.paths.state, PathBuf::from("/etc/st"));
        assert_eq!(c.paths.logs, PathBuf::from("/etc/koprogo/l"));
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let e = parse("[backend]\ncomand = \"x\"\n").expect_err("unknown key");
        assert!(e.0.contains("/etc/koprogo/test.toml"), "{e}");
        assert!(e.0.contains("comand"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let e = parse("[backend]\nport = \"eighty\"\n").expect_err("wrong type");
        assert!(e.0.contains("port"), "{e}");
    }

    #[test]
    fn smtp_enabled_needs_its_values() {
        let e = parse("[backend.smtp]\nenabled = true\nhost = \"h\"\n").expect_err("smtp");
        assert!(e.0.contains("backend.smtp.username"), "{e}");
        // The four koprogo-api requires; the port is optional (587 there).
        let base =
            "[backend.smtp]\nenabled = true\nhost = \"h\"\nusername = \"u\"\npassword = \"p\"\n";
        let e = parse(base).expect_err("no from_email");
        assert!(e.0.contains("backend.smtp.from_email"), "{e}");
        parse(&format!("{base}from_email = \"syndic@example.be\"\n")).expect("port optional");
        for bad in [
            "syndic",
            "Syndic <s@example.be>",
            "a@b@example.be",
            "s@",
            "s @x.be",
        ] {
            let e = parse(&format!("{base}from_email = \"{bad}\"\n")).expect_err(bad);
            assert!(e.0.contains("backend.smtp.from_email"), "{bad}: {e}");
        }
    }

    #[test]
    fn pools_leave_room_for_an_update_swap() {
        // Defaults: 8 × (1 + 1) + 3 = 19 ≤ 20.
        parse("").expect("defaults fit");
        let e = parse("[backend]\npool_max = 9\n").expect_err("9 × 2 + 3 > 20");
        assert!(e.0.contains("during an update"), "{e}");
        parse("[postgres]\nmax_connections = 21\n[backend]\npool_max = 9\n").expect("21");
    }

    #[test]
    fn log_level_must_be_a_filter() {
        parse("[backend]\nlog_level = \"info,sqlx=warn\"\n").expect("directives");
        let e = parse("[backend]\nlog_level = \"info,sqlx=loud\"\n").expect_err("bad level");
        assert!(e.0.contains("backend.log_level"), "{e}");
    }

    #[test]
    fn instances_need_ports_and_connections() {
        let c = parse("[backend]\nport = 9000\ninstances = 3\npool_max = 4\n").expect("3");
        assert_eq!(c.api_ports(), 9000..9006);
        assert_eq!(parse("").expect("default").api_ports(), 8081..8083);
        let e = parse("[backend]\ninstances = 0\n").expect_err("0");
        assert!(e.0.contains("backend.instances"), "{e}");
        let e = parse("[backend]\ninstances = 3\n").expect_err("pools");
        assert!(
            e.0.contains("backend.pool_max") && e.0.contains("instances = 3"),
            "{e}"
        );
        let e = parse("[backend]\nport = 65534\ninstances = 2\npool_max = 4\n").expect_err("ports");
        assert!(e.0.contains("backend.port"), "{e}");
        let e = parse("[backend]\nport = 9000\n[proxy]\nhttps = [\"127.0.0.1:9001\"]\n")
            .expect_err("clash with the spare port");
        assert!(e.0.contains("proxy.https"), "{e}");
    }

    #[test]
    fn managed_env_is_refused() {
        let e = parse("[backend.env]\nJWT_SECRET = \"x\"\n").expect_err("managed");
        assert!(e.0.contains("backend.env.JWT_SECRET"), "{e}");
    }

    #[test]
    fn acme_challenge_uses_the_acme_names() {
        let c = parse("[tls]\nacme_challenge = \"http-01\"\n").expect("http-01");
        assert_eq!(c.tls.acme_challenge, AcmeChallenge::Http01);
        let c = parse("[tls]\nacme_challenge = \"tls-alpn-01\"\n").expect("tls-alpn-01");
        assert_eq!(c.tls.acme_challenge, AcmeChallenge::TlsAlpn01);
        assert!(parse("[tls]\nacme_challenge = \"dns-01\"\n").is_err());
    }

    #[test]
    fn external_postgres_keys_fit_together() {
        let c = parse(
            "[postgres]\nmode = \"external\"\nurl = \"postgresql://k@db.example.be/kp?sslmode=verify-full\"\npassword_file = \"pw\"\n",
        )
        .expect("valid");
        assert_eq!(c.postgres.mode, PgMode::External);
        let u = c.postgres.external.as_ref().expect("parsed");
        assert_eq!(
            (u.host.as_str(), u.dbname.as_str()),
            ("db.example.be", "kp")
        );
        assert_eq!(
            c.postgres.password_file,
            Some(PathBuf::from("/etc/koprogo/pw"))
        );

        let e = parse("[postgres]\nurl = \"postgresql://k:hunter2@h/d\"\n").expect_err("no mode");
        assert!(
            e.0.contains("postgres.url") && e.0.contains("mode = \"external\""),
            "{e}"
        );
        assert!(!e.0.contains("hunter2"), "password shown: {e}");

        let e = parse("[postgres]\nmode = \"external\"\n").expect_err("no url");
        assert!(
            e.0.contains("postgres.mode") && e.0.contains("postgres.url"),
            "{e}"
        );

        let e = parse("[postgres]\nmode = \"external\"\nurl = \"postgresql://k:hunter2@h:x/d\"\n")
            .expect_err("bad port");
        assert!(e.0.contains("postgres.url") && e.0.contains("port"), "{e}");
        assert!(!e.0.contains("hunter2"), "password shown: {e}");

        let e = parse("[postgres]\nmode = \"external\"\nurl = \"postgresql://k:pw@h/d\"\npassword_file = \"f\"\n")
            .expect_err("two passwords");
        assert!(e.0.contains("postgres.password_file"), "{e}");

        let e = parse("[postgres]\npassword_file = \"f\"\n").expect_err("file without external");
        assert!(e.0.contains("postgres.password_file"), "{e}");

        let e = parse("[postgres]\nmode = \"cloud\"\n").expect_err("bad mode");
        assert!(e.0.contains("mode"), "{e}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size("512mb"), Ok(512 << 20));
        assert!(parse_size("ten").is_err());
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("5 weeks").is_err());
        let c = parse("[postgres]\nmemory = \"1GiB\"\nstop_timeout = \"90s\"\n").expect("valid");
        assert_eq!(c.postgres.memory, MemoryBudget::Bytes(1 << 30));
        assert_eq!(c.postgres.stop_timeout, Duration::from_secs(90));
    }

    #[test]
    fn capacity_interval() {
        assert_eq!(
            parse("").expect("default").capacity.interval,
            Duration::from_secs(300)
        );
        let c = parse("[capacity]\ninterval = \"2s\"\n").expect("2s");
        assert_eq!(c.capacity.interval, Duration::from_secs(2));
        let e = parse("[capacity]\ninterval = \"0s\"\n").expect_err("0s");
        assert!(e.0.contains("capacity.interval"), "{e}");
    }

    #[test]
    fn tunnel_idle_timeout_is_bounded() {
        let c = parse("").expect("default");
        assert_eq!(c.proxy.tunnel_idle_timeout, Duration::from_secs(600));
        let c = parse("[proxy]\ntunnel_idle_timeout = \"2s\"\n").expect("2s");
        assert_eq!(c.proxy.tunnel_idle_timeout, Duration::from_secs(2));
        for bad in ["\"0s\"", "\"500ms\"", "\"2d\""] {
            let e = parse(&format!("[proxy]\ntunnel_idle_timeout = {bad}\n")).expect_err(bad);
            assert!(
                e.0.contains("test.toml: proxy.tunnel_idle_timeout") && e.0.contains("1s-24h"),
                "{e}"
            );
        }
        let e = parse("[proxy]\ntunnel_idle_timeout = \"ten minutes\"\n").expect_err("text");
        assert!(e.0.contains("tunnel_idle_timeout"), "{e}");
    }
}
