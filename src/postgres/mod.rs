//! The PostgreSQL service: a private cluster under `<state>/pgdata`, Unix socket only
//! in `<run>`, tuned from the memory budget. Ready means a real SQL round trip; after
//! that the application's role, database and extensions exist. Stop is a fast
//! shutdown (SIGINT), then immediate (SIGQUIT) after a bound.

pub mod binaries;
pub mod cluster;
pub mod stats;
pub mod tuning;
pub mod upgrade;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

use crate::config::Config;
use crate::supervisor::reaper::ChildSpec;
use crate::supervisor::service::{ServiceIo, ServiceSpec, StopStep};
use binaries::Binaries;
use cluster::{APP_DB, APP_ROLE, SUPERUSER};

/// Connections to the private cluster as its superuser, over the socket.
#[derive(Clone)]
pub struct Db {
    cfg: Arc<Config>,
    probe: Arc<Mutex<Option<Client>>>,
}

impl Db {
    pub fn new(cfg: Arc<Config>) -> Db {
        Db {
            cfg,
            probe: Arc::default(),
        }
    }

    /// A new connection to `dbname` as the superuser.
    pub async fn connect(&self, dbname: &str) -> Result<Client> {
        let mut c = tokio_postgres::Config::new();
        c.host_path(&self.cfg.paths.run)
            .port(self.cfg.postgres.port)
            .user(SUPERUSER)
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
            *guard = Some(self.connect("postgres").await?);
        }
        let Some(client) = guard.as_ref() else {
            anyhow::bail!("no connection");
        };
        match client.simple_query("SELECT 1").await {
            Ok(_) => Ok(()),
            Err(e) => {
                *guard = None;
                Err(e.into())
            }
        }
    }

    /// Creates the application's role, database and extensions if missing.
    pub async fn ensure_app_database(&self) -> Result<()> {
        let admin = self
            .connect("postgres")
            .await
            .context("connecting as superuser")?;
        admin
            .batch_execute(&format!(
                "DO $$ BEGIN
                   IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
                     CREATE ROLE {APP_ROLE} LOGIN;
                   END IF;
                 END $$;"
            ))
            .await
            .context("creating the application role")?;
        let exists = admin
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&APP_DB])
            .await?
            .is_some();
        if !exists {
            admin
                .batch_execute(&format!(
                    "CREATE DATABASE {APP_DB} OWNER {APP_ROLE} ENCODING 'UTF8' TEMPLATE template0"
                ))
                .await
                .context("creating the application database")?;
            tracing::info!("created database {APP_DB} owned by {APP_ROLE}");
        }
        let app = self.connect(APP_DB).await?;
        app.batch_execute(
            "CREATE EXTENSION IF NOT EXISTS pgcrypto;
             CREATE EXTENSION IF NOT EXISTS \"uuid-ossp\";
             CREATE EXTENSION IF NOT EXISTS pg_stat_statements;",
        )
        .await
        .context("creating extensions pgcrypto, uuid-ossp, pg_stat_statements")?;
        Ok(())
    }
}

pub struct PostgresService {
    pub cfg: Arc<Config>,
    pub bins: Binaries,
    pub os_user: String,
    pub db: Db,
}

impl ServiceSpec for PostgresService {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn prepare(&self, io: &ServiceIo) -> Result<ChildSpec> {
        upgrade::prepare(&self.cfg, &self.bins, io).await?;
        cluster::ensure_initdb(&self.cfg, &self.bins, io).await?;
        cluster::write_managed_files(&self.cfg, &self.os_user)?;
        cluster::clear_stale_pid(&self.cfg).await?;
        let data = cluster::data_dir(&self.cfg);
        Ok(ChildSpec {
            program: self.bins.tool("postgres"),
            args: vec!["-D".into(), data.display().to_string()],
            env: cluster::base_env(&self.cfg),
            cwd: data,
            // Immediate shutdown if the supervisor dies: backends follow the postmaster.
            death_signal: Signal::SIGQUIT,
        })
    }

    async fn probe(&self) -> Result<()> {
        self.db.ping().await
    }

    async fn on_ready(&self) -> Result<()> {
        self.db.ensure_app_database().await?;
        upgrade::after_ready(&self.cfg, &self.db);
        Ok(())
    }

    fn start_timeout(&self) -> Duration {
        self.cfg.postgres.start_timeout
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
