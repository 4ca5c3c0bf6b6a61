//! The checks of a resolved [`Config`], in a fixed order (the first problem is the
//! one reported): each error names the file, the key, the value and the fix.
//! Also `postgres.mode` with its URL (parsed here) and `backup.encrypt_to`.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use super::pg_url::{redact_raw, ExternalUrl};
use super::units::parse_time;
use super::{Config, ConfigError, PgMode, TlsMode, MANAGED_BACKEND_ENV, MAX_INSTANCES};

/// Every check, in order; returns the parsed `postgres.url` (`url`, as written).
pub(super) fn validate(
    cfg: &Config,
    url: Option<&str>,
) -> Result<Option<ExternalUrl>, ConfigError> {
    if cfg.domain.trim().is_empty() || cfg.domain.contains(['/', ':', ' ']) {
        return Err(cfg.err(
            "domain",
            &format!("{:?}", cfg.domain),
            "set the site's host name, e.g. domain = \"syndic.example.be\"",
        ));
    }
    if cfg.user.is_empty() {
        return Err(cfg.err("user", &"\"\"", "name the service user, e.g. \"koprogo\""));
    }
    // A Unix socket path is limited to 107 bytes; Postgres' is the longest we make.
    let sock = cfg
        .paths
        .run
        .join(format!(".s.PGSQL.{}.lock", cfg.postgres.port));
    if sock.as_os_str().len() > 100 {
        return Err(cfg.err(
            "paths.run",
            &cfg.paths.run.display(),
            "too long for a Unix socket path (keep it under 80 characters)",
        ));
    }
    let external = postgres_mode(cfg, url)?;
    if cfg.postgres.max_connections < 5 {
        return Err(cfg.err(
            "postgres.max_connections",
            &cfg.postgres.max_connections,
            "use at least 5",
        ));
    }
    let b = &cfg.backend;
    if b.port == 0 {
        return Err(cfg.err("backend.port", &0, "choose a free loopback port, e.g. 8081"));
    }
    if b.instances == 0 || b.instances > MAX_INSTANCES {
        return Err(cfg.err(
            "backend.instances",
            &b.instances,
            &format!("use 1 to {MAX_INSTANCES} (one per core is plenty)"),
        ));
    }
    if u32::from(b.port) + 2 * u32::from(b.instances) - 1 > u32::from(u16::MAX) {
        return Err(cfg.err(
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
        return Err(cfg.err(
            "backend.health",
            &format!("{:?}", b.health),
            "must be a path starting with '/', e.g. \"/api/v1/health\"",
        ));
    }
    health_checks(
        cfg,
        "backend",
        (b.health_interval, b.health_timeout, b.health_failures),
    )?;
    health_checks(
        cfg,
        "postgres",
        (
            cfg.postgres.health_interval,
            cfg.postgres.health_timeout,
            cfg.postgres.health_failures,
        ),
    )?;
    if b.pool_min > b.pool_max || b.pool_max == 0 {
        return Err(cfg.err(
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
    if peak + 3 > cfg.postgres.max_connections {
        return Err(cfg.err(
            "backend.pool_max",
            &b.pool_max,
            &format!(
                "with backend.instances = {} the pools take up to {peak} connections during an \
                 update (one instance more while the new server starts): they must leave 3 \
                 free below postgres.max_connections ({}); lower pool_max or raise max_connections",
                b.instances, cfg.postgres.max_connections
            ),
        ));
    }
    for key in b.env.keys() {
        if MANAGED_BACKEND_ENV.contains(&key.as_str()) {
            return Err(cfg.err(
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
                return Err(cfg.err_in(
                    "backend.smtp.enabled",
                    &format!("backend.smtp.{k}"),
                    &"(missing)",
                    "required when backend.smtp.enabled = true (the API server would crash at boot)",
                ));
            }
        }
        if let Some(from) = s.from_email.as_deref().filter(|f| !is_mail_address(f)) {
            return Err(cfg.err(
                "backend.smtp.from_email",
                &format!("{from:?}"),
                "must be one address like \"syndic@example.be\" (no name, no spaces)",
            ));
        }
        if s.port == Some(0) {
            return Err(cfg.err("backend.smtp.port", &0, "must be 1-65535 (usually 587)"));
        }
    }
    let tunnel_idle = cfg.proxy.tunnel_idle_timeout;
    if tunnel_idle < Duration::from_secs(1) || tunnel_idle > Duration::from_secs(86400) {
        return Err(cfg.err(
            "proxy.tunnel_idle_timeout",
            &format!("{tunnel_idle:?}"),
            "must be 1s-24h: a WebSocket with no traffic either way for this long is \
             closed (e.g. \"10m\"; clients that keep a socket open send pings)",
        ));
    }
    if !(32..=128).contains(&cfg.proxy.ipv6_prefix) {
        return Err(cfg.err(
            "proxy.ipv6_prefix",
            &cfg.proxy.ipv6_prefix,
            "must be 32-128 (64: one client per /64, what a site is usually given)",
        ));
    }
    // koprogo-api reads RUST_LOG with tracing's EnvFilter and silently falls
    // back to "info" on a value it cannot parse: refuse it here instead.
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&b.log_level) {
        return Err(cfg.err(
            "backend.log_level",
            &format!("{:?}", b.log_level),
            &format!("is not a log filter ({e}): use error, warn, info, debug or trace, or directives like \"info,sqlx=warn\""),
        ));
    }
    for (key, list) in [
        ("proxy.http", &cfg.proxy.http),
        ("proxy.https", &cfg.proxy.https),
    ] {
        for a in list.iter() {
            if cfg.api_ports().contains(&a.port())
                && (a.ip().is_unspecified() || a.ip().is_loopback())
            {
                return Err(cfg.err(
                    key,
                    a,
                    &format!(
                        "clashes with the API ports {}..{} (backend.port = {}, {} instance(s) \
                         and their update spares); pick another port",
                        b.port,
                        cfg.api_ports().end - 1,
                        b.port,
                        b.instances
                    ),
                ));
            }
        }
    }
    match cfg.tls.mode {
        TlsMode::Acme => {
            let email = cfg.tls.acme_email.as_deref().unwrap_or("");
            if !email.contains('@') {
                let origin = if cfg.tls.acme_email.is_some() {
                    "tls.acme_email"
                } else {
                    "tls.mode"
                };
                return Err(cfg.err_in(
                    origin,
                    "tls.acme_email",
                    &format!("{email:?}"),
                    "mode = \"acme\" needs a contact address, e.g. acme_email = \"syndic@example.be\"",
                ));
            }
            if !cfg.tls.acme_directory.starts_with("https://") {
                return Err(cfg.err(
                    "tls.acme_directory",
                    &format!("{:?}", cfg.tls.acme_directory),
                    "must be an https:// URL",
                ));
            }
            if cfg.domain == "localhost" {
                return Err(cfg.err(
                    "domain",
                    &"\"localhost\"",
                    "an ACME CA cannot issue for localhost: set the site's public name or use tls.mode = \"internal\"",
                ));
            }
        }
        TlsMode::Files => {
            if cfg.tls.cert.is_none() || cfg.tls.key.is_none() {
                return Err(cfg.err(
                    "tls.cert",
                    &"(missing)",
                    "mode = \"files\" needs tls.cert and tls.key (PEM files)",
                ));
            }
        }
        TlsMode::Internal | TlsMode::Off => {}
    }
    if cfg.proxy.burst < cfg.proxy.rate.min(1) {
        return Err(cfg.err(
            "proxy.burst",
            &cfg.proxy.burst,
            "must be at least 1 when proxy.rate is set",
        ));
    }
    if cfg.proxy.max_upload < cfg.proxy.max_body {
        return Err(cfg.err(
            "proxy.max_upload",
            &cfg.proxy.max_upload,
            "must be at least proxy.max_body",
        ));
    }
    if cfg.metrics.enabled && !cfg.metrics.listen.ip().is_loopback() {
        return Err(cfg.err(
            "metrics.listen",
            &cfg.metrics.listen,
            "metrics have no authentication and must stay on loopback (127.0.0.1 or [::1]); \
             scrape them through a local agent or an SSH tunnel",
        ));
    }
    if cfg.logs.max_size < 64 * 1024 {
        return Err(cfg.err("logs.max_size", &cfg.logs.max_size, "use at least 64KiB"));
    }
    if cfg.logs.keep_files == 0 {
        return Err(cfg.err("logs.keep_files", &0, "keep at least 1 rotated file"));
    }
    if let Err(e) = parse_time(&cfg.backup.schedule) {
        return Err(cfg.err("backup.schedule", &format!("{:?}", cfg.backup.schedule), &e));
    }
    let every = cfg.capacity.interval;
    if every < Duration::from_secs(1) || every > Duration::from_secs(86400) {
        return Err(cfg.err(
            "capacity.interval",
            &format!("{every:?}"),
            "use a duration from \"1s\" to \"1d\" (the default is \"5m\")",
        ));
    }
    if cfg.backup.keep == 0 {
        return Err(cfg.err("backup.keep", &0, "keep at least 1 backup"));
    }
    if let Some(e) = &cfg.backup.encrypt_to {
        if let Err(why) = check_recipient_setting(e) {
            return Err(cfg.err("backup.encrypt_to", &format!("{e:?}"), &why));
        }
    }
    if let Some(c) = &cfg.backup.copy_command {
        if c.first().is_none_or(|p| p.trim().is_empty()) {
            return Err(cfg.err(
                "backup.copy_command",
                &format!("{c:?}"),
                "name a program, e.g. [\"/usr/local/bin/ship-backup\"] (the file's path is appended)",
            ));
        }
    }
    Ok(external)
}

/// `postgres.mode`, `url`, `password_file`, `ca_file` fit together; parses `url`.
fn postgres_mode(cfg: &Config, url: Option<&str>) -> Result<Option<ExternalUrl>, ConfigError> {
    let pg = &cfg.postgres;
    match (pg.mode, url) {
        (PgMode::Managed, Some(url)) => {
            return Err(cfg.err(
                "postgres.url",
                &format!("{:?}", redact_raw(url)),
                "only used with postgres.mode = \"external\": add mode = \"external\" to [postgres] \
                 to use that server, or remove url to keep the private cluster",
            ));
        }
        (PgMode::External, None) => {
            return Err(cfg.err(
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
                    return Err(cfg.err(
                        key,
                        &"…",
                        "only used with postgres.mode = \"external\" (the private cluster needs no password or CA): remove it",
                    ));
                }
            }
            return Ok(None);
        }
        (PgMode::External, Some(_)) => {}
    }
    let raw = url.unwrap_or_default();
    let url = ExternalUrl::parse(raw)
        .map_err(|why| cfg.err("postgres.url", &format!("{:?}", redact_raw(raw)), &why))?;
    if url.password.is_some() && pg.password_file.is_some() {
        return Err(cfg.err(
            "postgres.password_file",
            &pg.password_file
                .as_deref()
                .unwrap_or(Path::new(""))
                .display(),
            "the password is given twice (also in postgres.url): keep one, preferably the file",
        ));
    }
    if url.param("sslrootcert").is_some() && pg.ca_file.is_some() {
        return Err(cfg.err(
            "postgres.ca_file",
            &pg.ca_file.as_deref().unwrap_or(Path::new("")).display(),
            "the CA is given twice (also as sslrootcert in postgres.url): keep one",
        ));
    }
    if !pg.settings.is_empty() {
        return Err(cfg.err(
            "postgres.settings",
            &"{…}",
            "server settings cannot be applied to an external server: set them there and remove [postgres.settings]",
        ));
    }
    Ok(Some(url))
}

/// `backup.encrypt_to` at config load: a recipient must parse; a file is only
/// checked when a backup is made (loading the config reads nothing else).
pub fn check_recipient_setting(setting: &str) -> Result<(), String> {
    if setting.starts_with("age1") {
        age::x25519::Recipient::from_str(setting)
            .map(|_| ())
            .map_err(|e| {
                format!("not a valid age recipient ({e}): paste the public key printed by `age-keygen`, or name a file of recipients")
            })
    } else if setting.trim().is_empty() {
        Err(
            "empty: remove the key, or set an age recipient (\"age1…\") or a file of recipients"
                .into(),
        )
    } else {
        Ok(())
    }
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

/// `<section>.health_interval`, `health_timeout` and `health_failures`: checks
/// often enough to notice, seldom enough not to be the load, bounded enough to end.
fn health_checks(
    cfg: &Config,
    section: &str,
    (interval, timeout, failures): (Duration, Duration, u32),
) -> Result<(), ConfigError> {
    let tenth = Duration::from_millis(100);
    if interval < tenth || interval > Duration::from_secs(3600) {
        return Err(cfg.err(
            &format!("{section}.health_interval"),
            &format!("{interval:?}"),
            "use 100ms to 1h (default \"5s\")",
        ));
    }
    if timeout < tenth || timeout > Duration::from_secs(60) {
        return Err(cfg.err(
            &format!("{section}.health_timeout"),
            &format!("{timeout:?}"),
            "use 100ms to 60s (default \"2s\" for the backend, \"5s\" for postgres)",
        ));
    }
    if failures == 0 || failures > 100 {
        return Err(cfg.err(
            &format!("{section}.health_failures"),
            &failures,
            "use 1 to 100 failed checks in a row (default 3)",
        ));
    }
    Ok(())
}
