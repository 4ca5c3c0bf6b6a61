//! The defaults of `koprogo.toml`, sized for a 2 GB VPS: one function per key
//! (serde's `default = "…"`) and `Default` for each section of [`super::raw`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::raw::*;

pub(super) fn default_domain() -> String {
    "localhost".into()
}
pub(super) fn default_user() -> String {
    "koprogo".into()
}
pub(super) fn default_state() -> PathBuf {
    "/var/lib/koprogo".into()
}
pub(super) fn default_logs() -> PathBuf {
    "/var/log/koprogo".into()
}
pub(super) fn default_run() -> PathBuf {
    "/run/koprogo".into()
}
pub(super) fn default_max_connections() -> u32 {
    20
}
pub(super) fn default_pg_port() -> u16 {
    5432
}
pub(super) fn default_pg_start_timeout() -> Duration {
    Duration::from_secs(600)
}
pub(super) fn default_pg_stop_timeout() -> Duration {
    Duration::from_secs(60)
}
/// Health checks. What a user of the site tolerates decides them: a page that
/// fails for a few seconds is retried; one that fails for a minute is an outage.
/// A hung API server is declared failed within about 5 + 3 × 2 + 2 × 1 = 13 s
/// (`process::spec::Health::budget`), its replacement serves a second or two
/// later; a check every 5 s costs the idle box nothing measurable, and 2 s is ten
/// times the health URL's slowest answer under the benchmark's full load.
pub(super) fn default_backend_health_interval() -> Duration {
    Duration::from_secs(5)
}
pub(super) fn default_backend_health_timeout() -> Duration {
    Duration::from_secs(2)
}
/// PostgreSQL gets more time per check: restarting it costs every connection and
/// a checkpoint, and a check under an I/O storm can take seconds.
pub(super) fn default_pg_health_interval() -> Duration {
    Duration::from_secs(5)
}
pub(super) fn default_pg_health_timeout() -> Duration {
    Duration::from_secs(5)
}
/// One failed check is a blip (a long query, a GC pause); three in a row is not.
pub(super) fn default_health_failures() -> u32 {
    3
}
pub(super) fn default_backend_command() -> PathBuf {
    "/usr/lib/koprogo/koprogo-api".into()
}
pub(super) fn default_backend_user() -> String {
    "koprogo-api".into()
}
pub(super) fn default_backend_port() -> u16 {
    8081
}
pub(super) fn default_health() -> String {
    "/api/v1/health".into()
}
pub(super) fn default_backend_start_timeout() -> Duration {
    Duration::from_secs(120)
}
pub(super) fn default_backend_stop_timeout() -> Duration {
    Duration::from_secs(35)
}
pub(super) fn default_instances() -> u16 {
    1
}
pub(super) fn default_pool_max() -> u32 {
    8
}
pub(super) fn default_pool_min() -> u32 {
    2
}

pub(super) fn default_log_level() -> String {
    "info".into()
}
pub(super) fn default_http() -> Vec<SocketAddr> {
    vec!["[::]:80"
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 80)))]
}
pub(super) fn default_https() -> Vec<SocketAddr> {
    vec!["[::]:443"
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 443)))]
}
pub(super) fn default_frontend() -> PathBuf {
    "/usr/share/koprogo/frontend".into()
}
pub(super) fn default_max_body() -> u64 {
    1 << 20
}
pub(super) fn default_max_upload() -> u64 {
    50 << 20
}
pub(super) fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
pub(super) fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
pub(super) fn default_tunnel_idle_timeout() -> Duration {
    Duration::from_secs(600)
}
pub(super) fn default_rate() -> u32 {
    500
}
pub(super) fn default_burst() -> u32 {
    1000
}
pub(super) fn default_ipv6_prefix() -> u8 {
    64
}
pub(super) fn default_max_conns_per_ip() -> u32 {
    256
}
pub(super) fn default_backend_wait() -> Duration {
    Duration::from_secs(15)
}
pub(super) fn default_hsts() -> Duration {
    Duration::from_secs(365 * 86400)
}
pub(super) fn default_acme_directory() -> String {
    "https://acme-v02.api.letsencrypt.org/directory".into()
}
pub(super) fn default_acme_challenge() -> AcmeChallenge {
    AcmeChallenge::TlsAlpn01
}
pub(super) fn default_log_max_size() -> u64 {
    10 * 1024 * 1024
}
pub(super) fn default_keep_files() -> usize {
    14
}
pub(super) fn default_max_age() -> Duration {
    Duration::from_secs(7 * 86400)
}
pub(super) fn default_true() -> bool {
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
impl Default for RawPostgres {
    fn default() -> Self {
        RawPostgres {
            mode: PgMode::Managed,
            url: None,
            password_file: None,
            ca_file: None,
            bin_dir: None,
            memory: MemoryBudget::Auto,
            max_connections: default_max_connections(),
            port: default_pg_port(),
            start_timeout: default_pg_start_timeout(),
            stop_timeout: default_pg_stop_timeout(),
            health_interval: default_pg_health_interval(),
            health_timeout: default_pg_health_timeout(),
            health_failures: default_health_failures(),
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
            health_interval: default_backend_health_interval(),
            health_timeout: default_backend_health_timeout(),
            health_failures: default_health_failures(),
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

impl Default for RawTls {
    fn default() -> Self {
        RawTls {
            mode: None,
            acme_email: None,
            acme_directory: default_acme_directory(),
            acme_ca_root: None,
            acme_challenge: default_acme_challenge(),
            cert: None,
            key: None,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            enabled: true,
            listen: default_metrics_listen(),
        }
    }
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

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            interval: default_capacity_interval(),
        }
    }
}

pub(super) fn default_capacity_interval() -> Duration {
    Duration::from_secs(300)
}

pub(super) fn default_backup_schedule() -> String {
    "02:00".into()
}

pub(super) fn default_backup_keep() -> usize {
    7
}

pub(super) fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9187))
}
