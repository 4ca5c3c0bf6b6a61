//! `[postgres] mode = "external"`: the database lives on a server run elsewhere (a
//! managed PostgreSQL, a Patroni cluster's primary). The appliance then runs no
//! PostgreSQL at all: no initdb, no cluster files, no upgrade, no child. What it
//! keeps is the `postgres` *service*: a child-less run whose life is its probe (a
//! real `SELECT 1` on the application's database), so the API still starts only
//! once the database answers and is stopped and started again around an outage,
//! exactly like around a restart of the private cluster.
//!
//! This module holds the URL model (parsing, the password kept out of every
//! message, the forms the API, libpq tools and tokio-postgres need) and the
//! service. TLS to the server is in [`super::tls`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::Db;
use crate::config::Config;
use crate::process::reaper::ChildSpec;
use crate::process::service::{ServiceIo, ServiceSpec, StopStep};

/// Extensions KoproGo cannot run without (trusted since PostgreSQL 13: a database
/// owner may create them).
pub const REQUIRED_EXTENSIONS: &[&str] = &["pgcrypto", "uuid-ossp"];

/// The system CA bundles looked for when no `ca_file` is given (Debian's first).
pub const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// Query parameters the URL may carry (the libpq names the API understands too).
const ALLOWED_PARAMS: &[&str] = &[
    "sslmode",
    "sslrootcert",
    "connect_timeout",
    "application_name",
    "options",
];

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// A parsed `postgres.url`. `Debug` and [`ExternalUrl::redacted`] never show the
/// password.
#[derive(Clone, PartialEq, Eq)]
pub struct ExternalUrl {
    pub user: String,
    pub password: Option<String>,
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub sslmode: SslMode,
    /// Query parameters, decoded, in order (sslmode included).
    pub params: Vec<(String, String)>,
}

impl fmt::Debug for ExternalUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl ExternalUrl {
    /// Parses `postgresql://user[:password]@host[:port]/dbname[?key=value&…]`;
    /// the error says what is wrong and how to write it (without the password).
    pub fn parse(raw: &str) -> Result<ExternalUrl, String> {
        let example = "write it as postgresql://USER@HOST:PORT/DATABASE?sslmode=verify-full";
        let rest = raw
            .strip_prefix("postgresql://")
            .or_else(|| raw.strip_prefix("postgres://"))
            .ok_or_else(|| format!("not a postgresql:// URL: {example}"))?;
        let (authority, tail) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (&authority[..i], &authority[i + 1..]),
            None => ("", authority),
        };
        let (user, password) = match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (userinfo, None),
        };
        let user = decode(user).ok_or("the user name has a bad %-escape")?;
        if user.is_empty() {
            return Err(format!("no user name: {example}"));
        }
        let password = match password {
            Some(p) => Some(decode(p).ok_or("the password has a bad %-escape")?),
            None => None,
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or("an IPv6 host needs its closing ']'")?;
            (h.to_string(), after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(format!(
                "no host: {example} (a server on this machine is 127.0.0.1 or localhost)"
            ));
        }
        if host.contains(',') {
            return Err("several hosts are not supported: name one (a load balancer or the primary's address)".into());
        }
        let port = match port {
            None => 5432,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("port {p:?} is not a port number (1-65535)"))?,
        };
        let (path, query) = match tail.split_once('?') {
            Some((p, q)) => (p, q),
            None => (tail, ""),
        };
        let dbname =
            decode(path.trim_start_matches('/')).ok_or("the database name has a bad %-escape")?;
        if dbname.is_empty() {
            return Err(format!("no database name: {example}"));
        }
        let mut params = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (k, v) = (
                decode(k).ok_or("a query parameter has a bad %-escape")?,
                decode(v).ok_or("a query parameter has a bad %-escape")?,
            );
            if !ALLOWED_PARAMS.contains(&k.as_str()) {
                return Err(format!(
                    "unknown query parameter {k:?}: use only {}",
                    ALLOWED_PARAMS.join(", ")
                ));
            }
            if params.iter().any(|(p, _)| *p == k) {
                return Err(format!("query parameter {k:?} is given twice"));
            }
            params.push((k, v));
        }
        let mut url = ExternalUrl {
            user,
            password,
            host,
            port,
            dbname,
            sslmode: SslMode::Prefer,
            params,
        };
        if let Some(m) = url.param("sslmode") {
            url.sslmode = SslMode::parse(m).ok_or_else(|| {
                format!(
                    "sslmode={m:?}: use disable, allow, prefer, require, verify-ca or verify-full"
                )
            })?;
        }
        if let Some(t) = url.param("connect_timeout") {
            if t.parse::<u64>().is_err() {
                return Err(format!("connect_timeout={t:?}: a number of seconds"));
            }
        }
        Ok(url)
    }

    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn host_for_url(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }

    fn build(&self, password: Option<&str>, extra: &[(&str, String)]) -> String {
        let mut s = format!("postgresql://{}", encode(&self.user));
        if let Some(p) = password {
            s.push(':');
            s.push_str(p);
        }
        s.push_str(&format!(
            "@{}:{}/{}",
            self.host_for_url(),
            self.port,
            encode(&self.dbname)
        ));
        let pairs: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .chain(extra.iter().map(|(k, v)| (*k, v.clone())))
            .map(|(k, v)| format!("{}={}", encode(k), encode(&v)))
            .collect();
        if !pairs.is_empty() {
            s.push('?');
            s.push_str(&pairs.join("&"));
        }
        s
    }

    /// The URL for messages and `status`: the password (if the URL has one) as `***`.
    pub fn redacted(&self) -> String {
        self.build(self.password.as_ref().map(|_| "***"), &[])
    }

    /// The CA to verify the server with: `ca_file`, else the URL's `sslrootcert`.
    pub fn ca(&self, cfg: &Config) -> Option<PathBuf> {
        cfg.postgres
            .ca_file
            .clone()
            .or_else(|| self.param("sslrootcert").map(PathBuf::from))
    }

    /// The API's `DATABASE_URL`: the configured URL with the password (from the URL
    /// or `password_file`) and, for `ca_file`, `sslrootcert`.
    pub fn api_url(&self, cfg: &Config, password: Option<&str>) -> String {
        let extra: Vec<(&str, String)> = match &cfg.postgres.ca_file {
            Some(ca) => vec![("sslrootcert", ca.display().to_string())],
            None => Vec::new(),
        };
        self.build(password.map(encode).as_deref(), &extra)
    }

    /// libpq's environment for pg_dump, pg_restore and psql (the password goes in the
    /// child's environment only, never on its command line).
    pub fn libpq_env(&self, cfg: &Config, password: Option<&str>) -> Vec<(String, String)> {
        let mut env = vec![
            ("PGHOST".to_string(), self.host.clone()),
            ("PGPORT".into(), self.port.to_string()),
            ("PGUSER".into(), self.user.clone()),
            ("PGDATABASE".into(), self.dbname.clone()),
            ("PGSSLMODE".into(), self.sslmode.as_str().into()),
        ];
        if let Some(p) = password {
            env.push(("PGPASSWORD".into(), p.into()));
        }
        match self.ca(cfg) {
            Some(ca) => env.push(("PGSSLROOTCERT".into(), ca.display().to_string())),
            // libpq 15 has no "system" roots: point it at the bundle.
            None if matches!(self.sslmode, SslMode::VerifyCa | SslMode::VerifyFull) => {
                if let Some(b) = system_bundle() {
                    env.push(("PGSSLROOTCERT".into(), b.display().to_string()));
                }
            }
            None => {}
        }
        for (k, var) in [
            ("connect_timeout", "PGCONNECT_TIMEOUT"),
            ("application_name", "PGAPPNAME"),
            ("options", "PGOPTIONS"),
        ] {
            if let Some(v) = self.param(k) {
                env.push((var.into(), v.into()));
            }
        }
        env
    }

    /// A tokio-postgres configuration for database `dbname` (TLS is the caller's).
    pub fn tokio_config(&self, password: Option<&str>, dbname: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(dbname)
            .application_name(self.param("application_name").unwrap_or("koprogo"))
            .connect_timeout(Duration::from_secs(
                self.param("connect_timeout")
                    .and_then(|t| t.parse().ok())
                    .filter(|t| *t > 0)
                    .unwrap_or(5),
            ))
            .ssl_mode(match self.sslmode {
                SslMode::Disable => tokio_postgres::config::SslMode::Disable,
                SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                _ => tokio_postgres::config::SslMode::Require,
            });
        if let Some(p) = password {
            c.password(p);
        }
        if let Some(o) = self.param("options") {
            c.options(o);
        }
        c
    }
}

/// What to do about a refused connection, by SQLSTATE ("" when nothing useful).
pub fn hint(e: &tokio_postgres::Error, url: &ExternalUrl, dbname: &str) -> String {
    use tokio_postgres::error::SqlState;
    let Some(code) = e.code() else {
        return String::new();
    };
    let user = &url.user;
    if *code == SqlState::INVALID_PASSWORD {
        format!(": check the password (postgres.password_file or the URL) of role {user}, or ask the DBA whether it exists")
    } else if *code == SqlState::INVALID_CATALOG_NAME {
        format!(": ask the DBA to run CREATE DATABASE \"{dbname}\" OWNER \"{user}\";")
    } else if *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
        format!(
            ": the server's pg_hba.conf refuses this machine or role {user} (or needs another sslmode): ask the DBA"
        )
    } else if *code == SqlState::TOO_MANY_CONNECTIONS {
        ": the server has no free connection: lower backend.pool_max or ask the DBA for more".into()
    } else {
        String::new()
    }
}

/// The first system CA bundle that exists (`SSL_CERT_FILE` first).
pub fn system_bundle() -> Option<PathBuf> {
    std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain(SYSTEM_CA_BUNDLES.iter().map(PathBuf::from))
        .find(|p| p.is_file())
}

/// The external server's password: from the URL, else the first line of
/// `postgres.password_file`, else none (trust, certificate or .pgpass auth).
pub fn password(cfg: &Config) -> Result<Option<String>> {
    let Some(url) = &cfg.postgres.external else {
        return Ok(None);
    };
    if let Some(p) = &url.password {
        return Ok(Some(p.clone()));
    }
    let Some(file) = &cfg.postgres.password_file else {
        return Ok(None);
    };
    read_password_file(file).map(Some).map_err(|e| {
        anyhow::anyhow!(
            "{}: postgres.password_file = {}: {e}",
            cfg.file.display(),
            file.display()
        )
    })
}

fn read_password_file(file: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        format!("cannot read it ({e}): create it with the database password on one line, mode 0600 or 0640 root:koprogo")
    })?;
    let pw = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if pw.is_empty() {
        return Err("its first line is empty: put the database password there".into());
    }
    Ok(pw.to_string())
}

/// A URL as written, for an error message: whatever sits between `user:` and `@`
/// is replaced by `***` (the string may not even parse).
pub fn redact_raw(raw: &str) -> String {
    let Some(start) = raw.find("://").map(|i| i + 3) else {
        return raw.to_string();
    };
    let end = raw[start..]
        .find(['/', '?'])
        .map_or(raw.len(), |i| start + i);
    let authority = &raw[start..end];
    let Some(at) = authority.rfind('@') else {
        return raw.to_string();
    };
    match authority[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &raw[..start],
            &authority[..colon],
            &raw[start + at..]
        ),
        None => raw.to_string(),
    }
}

fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A path for a URL's query value: each segment percent-encoded, the `/` kept.
pub fn encode_path(path: &str) -> String {
    path.split('/').map(encode).collect::<Vec<_>>().join("/")
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The `postgres` service in external mode: nothing to spawn; ready when the
/// application's database answers and has its extensions.
pub struct ExternalService {
    pub cfg: Arc<Config>,
    pub db: Db,
    /// Major of the installed pg_dump (a newer server makes backups fail).
    pub client_major: u32,
}

impl ServiceSpec for ExternalService {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn prepare(&self, _io: &ServiceIo) -> Result<Option<ChildSpec>> {
        // Surface a missing or empty password file as the reason, not as a probe timeout.
        password(&self.cfg)?;
        Ok(None)
    }

    async fn probe(&self) -> Result<()> {
        self.db.ping().await
    }

    async fn on_ready(&self) -> Result<()> {
        let c = self
            .db
            .connect(self.db.app_db())
            .await
            .context("connecting to the application database")?;
        ensure_extensions(&c, self.db.app_db(), &self.cfg).await?;
        let server: i32 = c
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await?
            .get(0);
        let major = (server / 10000) as u32;
        if major > self.client_major {
            tracing::warn!(
                "the external server runs PostgreSQL {major} but the installed pg_dump is {}: backups will fail until \
                 postgresql-client-{major} is installed (koprogo check says the same)",
                self.client_major
            );
        }
        Ok(())
    }

    fn start_timeout(&self) -> Duration {
        self.cfg.postgres.start_timeout
    }

    fn ready_poll(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn stop_plan(&self) -> Vec<StopStep> {
        Vec::new()
    }

    fn stop_now(&self) -> Vec<StopStep> {
        Vec::new()
    }
}

/// pgcrypto and uuid-ossp must exist in `dbname`: created when missing and the
/// role may; otherwise an error naming what the DBA must run.
pub async fn ensure_extensions(
    c: &tokio_postgres::Client,
    dbname: &str,
    cfg: &Config,
) -> Result<()> {
    let user = cfg
        .postgres
        .external
        .as_ref()
        .map_or("the application role", |u| u.user.as_str());
    for ext in REQUIRED_EXTENSIONS {
        let row = c
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = $1),
                        EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = $1)",
                &[ext],
            )
            .await?;
        let (installed, available): (bool, bool) = (row.get(0), row.get(1));
        if installed {
            continue;
        }
        if !available {
            bail!(
                "the extension {ext} is not available on the database server: install PostgreSQL's \
                 contrib modules there (Debian: postgresql-contrib; managed services: enable {ext}), then \
                 run as its owner: CREATE EXTENSION \"{ext}\"; in database {dbname}"
            );
        }
        if let Err(e) = c
            .batch_execute(&format!("CREATE EXTENSION IF NOT EXISTS \"{ext}\""))
            .await
        {
            bail!(
                "the extension {ext} is missing in database {dbname} and role {user} may not create it ({}): \
                 ask the DBA to run, in database {dbname}: CREATE EXTENSION \"{ext}\";  \
                 (or to make {user} the database's owner)",
                super::describe(&e)
            );
        }
        tracing::info!("created the extension {ext} in database {dbname}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_url() {
        let u = ExternalUrl::parse(
            "postgresql://app%40x:s3cr%2Ft@db.example.be:6432/koprogo?sslmode=verify-full&application_name=kp",
        )
        .expect("valid");
        assert_eq!(u.user, "app@x");
        assert_eq!(u.password.as_deref(), Some("s3cr/t"));
        assert_eq!((u.host.as_str(), u.port), ("db.example.be", 6432));
        assert_eq!(u.dbname, "koprogo");
        assert_eq!(u.sslmode, SslMode::VerifyFull);
        let shown = u.redacted();
        assert!(!shown.contains("s3cr"), "{shown}");
        assert!(
            shown.contains("app%40x:***@db.example.be:6432/koprogo"),
            "{shown}"
        );
        assert!(!format!("{u:?}").contains("s3cr"));
    }

    #[test]
    fn defaults_and_ipv6() {
        let u = ExternalUrl::parse("postgres://k@[::1]/db").expect("valid");
        assert_eq!((u.host.as_str(), u.port), ("::1", 5432));
        assert_eq!(u.sslmode, SslMode::Prefer);
        assert_eq!(u.redacted(), "postgresql://k@[::1]:5432/db");
    }

    #[test]
    fn refuses_bad_urls() {
        for (url, why) in [
            ("mysql://a@b/c", "postgresql://"),
            ("postgresql://@b/c", "no user"),
            ("postgresql://a@/c", "no host"),
            ("postgresql://a@b:99999/c", "port"),
            ("postgresql://a@b", "no database"),
            ("postgresql://a@b/c?sslmode=on", "sslmode"),
            ("postgresql://a@b/c?foo=1", "unknown query parameter"),
            ("postgresql://a@h1,h2/c", "several hosts"),
            ("postgresql://a:%+1@h/c", "bad %-escape"),
        ] {
            let e = ExternalUrl::parse(url).expect_err(url);
            assert!(e.contains(why), "{url}: {e}");
        }
    }

    #[test]
    fn redacts_unparsable_text() {
        assert_eq!(
            redact_raw("postgresql://u:pw@h:x/d"),
            "postgresql://u:***@h:x/d"
        );
        assert_eq!(redact_raw("postgresql://u@h/d"), "postgresql://u@h/d");
        assert_eq!(redact_raw("nonsense"), "nonsense");
    }

    #[test]
    fn api_url_carries_the_password_encoded() {
        let u = ExternalUrl::parse("postgresql://k@h:5433/d?sslmode=require").expect("valid");
        let cfg = Config::parse(
            "[postgres]\nmode = \"external\"\nurl = \"postgresql://k@h:5433/d?sslmode=require\"\nca_file = \"/ca.pem\"\n",
            Path::new("/etc/koprogo/k.toml"),
        )
        .expect("valid");
        assert_eq!(
            u.api_url(&cfg, Some("p@ss word")),
            "postgresql://k:p%40ss%20word@h:5433/d?sslmode=require&sslrootcert=%2Fca.pem"
        );
        let env = u.libpq_env(&cfg, Some("pw"));
        assert!(env.contains(&("PGPASSWORD".into(), "pw".into())));
        assert!(env.contains(&("PGSSLROOTCERT".into(), "/ca.pem".into())));
    }
}
