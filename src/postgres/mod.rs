//! The PostgreSQL service: a private cluster under `<state>/pgdata`, Unix socket only
//! in `<run>`, tuned from the memory budget. Ready means a real SQL round trip; after
//! that the application's role, database and extensions exist. Stop is a fast
//! shutdown (SIGINT), then immediate (SIGQUIT) after a bound.
//!
//! With `mode = "external"` the same [`Db`] handle reaches a server elsewhere
//! instead (see [`external`]), and the service is [`external::ExternalService`].

pub mod binaries;
pub mod cluster;
pub mod external;
pub mod stats;
pub mod tls;
pub mod tuning;
pub mod upgrade;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use postgres_protocol::escape::{escape_identifier, escape_literal};
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

use crate::config::Config;
use crate::process::reaper::ChildSpec;
use crate::process::service::{Health, ServiceIo, ServiceSpec, StopStep};
use binaries::Binaries;
use cluster::{APP_DB, APP_ROLE, RESTORE_ROLE, SUPERUSER};

/// Connections to the database: the private cluster as its superuser over the
/// socket, or (external mode) the configured server as the URL's role.
#[derive(Clone)]
pub struct Db {
    cfg: Arc<Config>,
    probe: Arc<Mutex<Option<Client>>>,
    tls: Arc<std::sync::OnceLock<tls::PgTls>>,
}

/// Extensions the application database gets from the superuser (at boot, and in a
/// restore's scratch database before the dump is replayed).
pub const EXTENSIONS: &[&str] = &["pgcrypto", "uuid-ossp", "pg_stat_statements"];

fn create_extensions_sql() -> String {
    EXTENSIONS
        .iter()
        .map(|e| format!("CREATE EXTENSION IF NOT EXISTS {};", escape_identifier(e)))
        .collect()
}

/// A libpq tool's command-line arguments and environment.
pub type Libpq = (Vec<String>, Vec<(String, String)>);

/// A readable one-line description (tokio-postgres' Display can be only "db error").
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

impl Db {
    pub fn new(cfg: Arc<Config>) -> Db {
        Db {
            cfg,
            probe: Arc::default(),
            tls: Arc::default(),
        }
    }

    /// The external server, in external mode.
    pub fn external(&self) -> Option<&external::ExternalUrl> {
        self.cfg.postgres.external.as_ref()
    }

    /// The application's database: `koprogo`, or the external URL's.
    pub fn app_db(&self) -> &str {
        self.external().map_or(APP_DB, |u| u.dbname.as_str())
    }

    /// The role the API connects as: `koprogo`, or the external URL's user.
    pub fn app_role(&self) -> &str {
        self.external().map_or(APP_ROLE, |u| u.user.as_str())
    }

    /// The owner given to scratch databases (external: whoever creates them): the
    /// role that replays backups into them.
    pub fn app_owner(&self) -> Option<&str> {
        self.external().is_none().then_some(RESTORE_ROLE)
    }

    /// The role backups are replayed as: [`RESTORE_ROLE`], or the external URL's.
    pub fn replay_role(&self) -> &str {
        self.external().map_or(RESTORE_ROLE, |u| u.user.as_str())
    }

    /// A connection for CREATE/DROP/ALTER DATABASE: the `postgres` database (the
    /// external server's application database when `postgres` is closed to us).
    pub async fn connect_admin(&self) -> Result<Client> {
        match self.connect("postgres").await {
            Ok(c) => Ok(c),
            Err(_) if self.external().is_some() => self.connect(self.app_db()).await,
            Err(e) => Err(e),
        }
    }

    /// Command-line arguments and environment for a libpq tool (pg_dump,
    /// pg_restore, psql) on database `dbname`. Passwords go in the environment.
    pub fn libpq(&self, dbname: &str) -> Result<Libpq> {
        self.libpq_as(dbname, SUPERUSER)
    }

    /// [`Db::libpq`] as [`Db::replay_role`]: never the superuser.
    pub fn libpq_replay(&self, dbname: &str) -> Result<Libpq> {
        self.libpq_as(dbname, RESTORE_ROLE)
    }

    /// `role` on the private cluster; the external URL's role otherwise.
    fn libpq_as(&self, dbname: &str, role: &str) -> Result<Libpq> {
        let mut env = cluster::base_env(&self.cfg);
        let args = match self.external() {
            None => vec![
                "-h".into(),
                self.cfg.paths.run.display().to_string(),
                "-p".into(),
                self.cfg.postgres.port.to_string(),
                "-U".into(),
                role.into(),
                "-d".into(),
                dbname.into(),
                "--no-password".into(),
            ],
            Some(url) => {
                let pw = external::password(&self.cfg)?;
                env.extend(url.libpq_env(&self.cfg, pw.as_deref()));
                vec!["-d".into(), dbname.into(), "--no-password".into()]
            }
        };
        Ok((args, env))
    }

    fn tls(&self, url: &external::ExternalUrl) -> Result<tls::PgTls> {
        if let Some(t) = self.tls.get() {
            return Ok(t.clone());
        }
        let t = tls::PgTls::new(url, url.ca(&self.cfg).as_deref())?;
        Ok(self.tls.get_or_init(|| t).clone())
    }

    /// A new connection to `dbname` (as the superuser, or as the external URL's role).
    pub async fn connect(&self, dbname: &str) -> Result<Client> {
        self.connect_as(dbname, SUPERUSER).await
    }

    /// A new connection to `dbname` as [`Db::replay_role`]: never the superuser.
    pub async fn connect_replay(&self, dbname: &str) -> Result<Client> {
        self.connect_as(dbname, RESTORE_ROLE).await
    }

    /// Creates [`RESTORE_ROLE`] if missing and resets it to an ordinary login role
    /// with no settings (a replayed dump may have changed its own); a no-op with an
    /// external server (the URL's role replays there).
    pub async fn prepare_replay_role(&self) -> Result<()> {
        if self.external().is_some() {
            return Ok(());
        }
        let admin = self
            .connect("postgres")
            .await
            .context("connecting as superuser")?;
        ensure_login_role(&admin, RESTORE_ROLE).await?;
        admin
            .batch_execute(&format!(
                "ALTER ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE
                   NOREPLICATION NOBYPASSRLS;
                 ALTER ROLE {role} RESET ALL;",
                role = escape_identifier(RESTORE_ROLE)
            ))
            .await
            .with_context(|| format!("preparing the role {RESTORE_ROLE}"))
    }

    /// The superuser's part of a scratch database before a replay: the extensions
    /// the application database has (only a superuser may create some of them).
    pub async fn prepare_scratch(&self, dbname: &str) -> Result<()> {
        if self.external().is_some() {
            return Ok(());
        }
        let c = self.connect(dbname).await?;
        c.batch_execute(&create_extensions_sql())
            .await
            .with_context(|| format!("creating the extensions {EXTENSIONS:?} in {dbname}"))
    }

    /// Gives what [`RESTORE_ROLE`] restored into `dbname` (and the database) to the
    /// application's role, and drops database-level settings the dump may have made
    /// (they would apply to every later session, the superuser's included). Runs no
    /// code of the dump: event triggers, the only hook on these commands, need a
    /// superuser to exist. A no-op with an external server (one role does it all).
    pub async fn hand_over(&self, dbname: &str) -> Result<()> {
        if self.external().is_some() {
            return Ok(());
        }
        let admin = self.connect("postgres").await?;
        admin
            .batch_execute(&format!(
                "ALTER DATABASE {} RESET ALL",
                escape_identifier(dbname)
            ))
            .await
            .with_context(|| format!("resetting the settings of database {dbname}"))?;
        let c = self.connect(dbname).await?;
        c.batch_execute(&format!(
            "REASSIGN OWNED BY {restore} TO {app}; DROP OWNED BY {restore};",
            restore = escape_identifier(RESTORE_ROLE),
            app = escape_identifier(APP_ROLE)
        ))
        .await
        .with_context(|| format!("handing database {dbname} to the role {APP_ROLE}"))
    }

    /// `role` on the private cluster; the external URL's role otherwise.
    async fn connect_as(&self, dbname: &str, role: &str) -> Result<Client> {
        if let Some(url) = self.external() {
            let pw = external::password(&self.cfg)?;
            let c = url.tokio_config(pw.as_deref(), dbname);
            let failed = |e: tokio_postgres::Error| {
                anyhow::anyhow!(
                    "database {dbname} on {}:{}: {}{}",
                    url.host,
                    url.port,
                    describe(&e),
                    external::hint(&e, url, dbname)
                )
            };
            let client = if url.sslmode == external::SslMode::Disable {
                let (client, conn) = c.connect(NoTls).await.map_err(failed)?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                client
            } else {
                let (client, conn) = c.connect(self.tls(url)?).await.map_err(failed)?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                client
            };
            return Ok(client);
        }
        let mut c = tokio_postgres::Config::new();
        c.host_path(&self.cfg.paths.run)
            .port(self.cfg.postgres.port)
            .user(role)
            .dbname(dbname)
            .application_name("koprogo")
            .connect_timeout(Duration::from_secs(5));
        let (client, conn) = c.connect(NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// `SELECT 1` over a kept connection (reconnecting when it died).
    pub async fn ping(&self) -> Result<()> {
        let mut guard = self.probe.lock().await;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            // External: the application's database itself must answer.
            let db = if self.external().is_some() {
                self.app_db()
            } else {
                "postgres"
            };
            *guard = Some(self.connect(db).await?);
        }
        let Some(client) = guard.as_ref() else {
            anyhow::bail!("no connection");
        };
        match client.simple_query("SELECT 1").await {
            Ok(_) => Ok(()),
            Err(e) => {
                *guard = None;
                Err(anyhow::anyhow!("SELECT 1: {}", describe(&e)))
            }
        }
    }

    /// `SELECT 1` over a new connection: what the kept one cannot see, that the
    /// postmaster still accepts connections (a frozen postmaster leaves its
    /// backends, and so a kept connection, working). For the private cluster's
    /// health checks: a connection every few seconds costs nothing measurable.
    pub async fn ping_new(&self) -> Result<()> {
        let client = self.connect("postgres").await?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| anyhow::anyhow!("SELECT 1: {}", describe(&e)))?;
        Ok(())
    }

    /// Creates the application's role, database and extensions if missing.
    pub async fn ensure_app_database(&self) -> Result<()> {
        let admin = self
            .connect("postgres")
            .await
            .context("connecting as superuser")?;
        ensure_login_role(&admin, APP_ROLE).await?;
        let exists = admin
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&APP_DB])
            .await?
            .is_some();
        if !exists {
            admin
                .batch_execute(&format!(
                    "CREATE DATABASE {} OWNER {} ENCODING 'UTF8' TEMPLATE template0",
                    escape_identifier(APP_DB),
                    escape_identifier(APP_ROLE)
                ))
                .await
                .context("creating the application database")?;
            tracing::info!("created database {APP_DB} owned by {APP_ROLE}");
        }
        let app = self.connect(APP_DB).await?;
        app.batch_execute(&create_extensions_sql())
            .await
            .with_context(|| format!("creating the extensions {EXTENSIONS:?}"))?;
        Ok(())
    }
}

/// Pins the session's search_path to the catalog, for a superuser connection that
/// reads a database the API's role owns: that role may set the database's
/// search_path and put its own `count` aggregate or operators first, to have them
/// run with superuser rights. (Overrides the database's setting for the session.)
pub async fn pin_search_path(c: &Client) -> Result<()> {
    c.execute(
        "SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', false)",
        &[],
    )
    .await
    .context("pinning search_path")?;
    Ok(())
}

/// `DO` block creating the login role `role` if it does not exist (a `DO` body is
/// a string, so the name is quoted as an identifier, then the body as a literal).
fn ensure_login_role_sql(role: &str) -> String {
    let body = format!(
        "BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {}) THEN \
         CREATE ROLE {} LOGIN; END IF; END",
        escape_literal(role),
        escape_identifier(role)
    );
    format!("DO {}", escape_literal(&body))
}

/// Creates the login role `role` (a constant of ours) if it does not exist.
async fn ensure_login_role(admin: &Client, role: &str) -> Result<()> {
    admin
        .batch_execute(&ensure_login_role_sql(role))
        .await
        .with_context(|| format!("creating the role {role}"))
}

pub struct PostgresService {
    pub cfg: Arc<Config>,
    pub bins: Binaries,
    pub os_user: String,
    pub db: Db,
}

/// The postmaster's environment: the base one, plus PostgreSQL's documented OOM
/// switch (`PG_OOM_ADJUST_FILE`/`PG_OOM_ADJUST_VALUE`, "Linux Memory Overcommit"):
/// every process it forks writes the value into its own file, so the backends are
/// not protected like the postmaster.
fn postmaster_env(cfg: &Config) -> Vec<(String, String)> {
    let mut env = cluster::base_env(cfg);
    env.push((
        "PG_OOM_ADJUST_FILE".into(),
        "/proc/self/oom_score_adj".into(),
    ));
    env.push((
        "PG_OOM_ADJUST_VALUE".into(),
        crate::process::oom::POSTGRES_CHILDREN.to_string(),
    ));
    env
}

impl ServiceSpec for PostgresService {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn prepare(&self, io: &ServiceIo) -> Result<Option<ChildSpec>> {
        upgrade::prepare(&self.cfg, &self.bins, io).await?;
        cluster::ensure_initdb(&self.cfg, &self.bins, io).await?;
        cluster::write_managed_files(&self.cfg, &self.os_user)?;
        cluster::clear_stale_pid(&self.cfg).await?;
        let data = cluster::data_dir(&self.cfg);
        Ok(Some(ChildSpec {
            program: self.bins.tool("postgres"),
            args: vec!["-D".into(), data.display().to_string()],
            env: postmaster_env(&self.cfg),
            cwd: data,
            // Immediate shutdown if the supervisor dies: backends follow the postmaster.
            death_signal: Signal::SIGQUIT,
            as_api_user: false,
            // Protected; its backends set their own back to 0 (postmaster_env).
            oom_score_adj: Some(crate::process::oom::POSTMASTER),
        }))
    }

    /// A new connection each time: a postmaster that stopped accepting them
    /// (frozen, stuck) is found even while its backends still answer.
    async fn probe(&self) -> Result<()> {
        self.db.ping_new().await
    }

    async fn on_ready(&self) -> Result<()> {
        self.db.ensure_app_database().await?;
        upgrade::after_ready(&self.cfg, &self.db);
        Ok(())
    }

    fn start_timeout(&self) -> Duration {
        self.cfg.postgres.start_timeout
    }

    fn health(&self) -> Health {
        let p = &self.cfg.postgres;
        Health {
            interval: p.health_interval,
            timeout: p.health_timeout,
            failures: p.health_failures,
        }
    }

    /// Never SIGKILL: a killed postmaster leaves shared memory and backends behind
    /// and the next start does crash recovery. Its own immediate shutdown (SIGQUIT)
    /// is the strongest we send; a postmaster that ignores even that is left
    /// running, the error logged, and the next start refused by its own lock
    /// (`postmaster.pid`) rather than run two servers on one data directory.
    fn last_resort(&self) -> Signal {
        Signal::SIGQUIT
    }

    fn stop_plan(&self) -> Vec<StopStep> {
        vec![
            StopStep {
                signal: Signal::SIGINT,
                group: false,
                wait: self.cfg.postgres.stop_timeout,
            },
            StopStep {
                signal: Signal::SIGQUIT,
                group: false,
                wait: Duration::from_secs(10),
            },
        ]
    }

    fn stop_now(&self) -> Vec<StopStep> {
        vec![StopStep {
            signal: Signal::SIGQUIT,
            group: false,
            wait: Duration::from_secs(5),
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_sql_text_are_quoted() {
        assert_eq!(
            ensure_login_role_sql("ko\"pro'x"),
            "DO 'BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = ''ko\"pro''''x'') \
             THEN CREATE ROLE \"ko\"\"pro''x\" LOGIN; END IF; END'"
        );
        assert!(create_extensions_sql().contains("CREATE EXTENSION IF NOT EXISTS \"uuid-ossp\";"));
    }
}
