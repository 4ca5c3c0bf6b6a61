//! `[postgres] mode = "external"`: the database lives on a server run elsewhere (a
//! managed PostgreSQL, a Patroni cluster's primary). The appliance then runs no
//! PostgreSQL at all: no initdb, no cluster files, no upgrade, no child. What it
//! keeps is the `postgres` *service*: a child-less run whose life is its probe (a
//! real `SELECT 1` on the application's database), so the API still starts only
//! once the database answers and is stopped and started again around an outage,
//! exactly like around a restart of the private cluster.
//!
//! This module holds what the URL becomes at run time (the forms the API, libpq
//! tools and tokio-postgres need, the password from its file) and the service. The
//! URL model itself (parsing, the password kept out of every message) belongs to
//! the configuration: [`crate::config::pg_url`], re-exported here. TLS to the
//! server is in [`super::tls`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::Db;
pub use crate::config::pg_url::{encode, encode_path, redact_raw, ExternalUrl, SslMode};
use crate::config::Config;
use crate::process::reaper::ChildSpec;
use crate::process::service::{Health, ServiceIo, ServiceSpec, StopStep};

/// Extensions KoproGo cannot run without (trusted since PostgreSQL 13: a database
/// owner may create them).
pub const REQUIRED_EXTENSIONS: &[&str] = &["pgcrypto", "uuid-ossp"];

/// The system CA bundles looked for when no `ca_file` is given (Debian's first).
pub const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

impl ExternalUrl {
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

    fn health(&self) -> Health {
        let p = &self.cfg.postgres;
        Health {
            interval: p.health_interval,
            timeout: p.health_timeout,
            failures: p.health_failures,
        }
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
            .batch_execute(&format!(
                "CREATE EXTENSION IF NOT EXISTS {}",
                postgres_protocol::escape::escape_identifier(ext)
            ))
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
