//! PostgreSQL side of the demo backend: connection at start (retries only while
//! Postgres refuses connections or is starting up, like koprogo-api's pool),
//! migrations under an advisory lock, the superadmin reset, and the queries the
//! HTTP handlers run.
//!
//! Lost connection: the demo keeps one shared client and reconnects lazily. While
//! Postgres is down (e.g. restarted under it) every request that needs the
//! database answers 503 JSON and the next one tries to reconnect once; the
//! process neither hangs nor exits, which is what the real sqlx pool does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls};

/// Schema version this binary creates and understands.
pub const SCHEMA_VERSION: i32 = 1;
/// Key of the advisory lock that serialises migrations ("koprogo" in ASCII).
const MIGRATION_LOCK: i64 = 0x006b_6f70_726f_676f;
/// The superadmin that koprogo-api resets at every start (the hole to close).
const ADMIN_EMAIL: &str = "admin@koprogo.com";
const ADMIN_PASSWORD: &str = "admin123";

/// Why a request could not be served by the database.
pub enum DbError {
    /// Postgres is unreachable or the connection died: 503.
    Unavailable(String),
    /// The query itself failed (e.g. wrong decryption key): 500.
    Failed(String),
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        let gone = e.is_closed()
            || io_error(&e).is_some()
            || e.code().is_some_and(|c| {
                [
                    SqlState::ADMIN_SHUTDOWN,
                    SqlState::CRASH_SHUTDOWN,
                    SqlState::CANNOT_CONNECT_NOW,
                ]
                .contains(c)
            });
        if gone {
            DbError::Unavailable(describe(&e))
        } else {
            DbError::Failed(describe(&e))
        }
    }
}

/// A readable one-line description (tokio-postgres' Display is only "db error").
pub fn describe(e: &tokio_postgres::Error) -> String {
    match (e.as_db_error(), io_error(e)) {
        (Some(db), _) => format!("{} ({})", db.message(), db.code().code()),
        (None, Some(io)) => format!("{e}: {io}"),
        (None, None) => e.to_string(),
    }
}

fn io_error(e: &tokio_postgres::Error) -> Option<&std::io::Error> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        source = s.source();
    }
    None
}

async fn connect_once(config: &Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            log_warn!("database connection lost: {}", describe(&e));
        }
    });
    Ok(client)
}

/// First connection. Retries for up to 30 s while Postgres refuses connections
/// (ECONNREFUSED) or is starting up (SQLSTATE 57P03); anything else (missing
/// socket, authentication failure, unknown database...) panics at once, exit 101.
pub async fn connect_at_start(config: &Config) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut attempt = 0u32;
    loop {
        let err = match connect_once(config).await {
            Ok(client) => return client,
            Err(e) => e,
        };
        let retry = err.code() == Some(&SqlState::CANNOT_CONNECT_NOW)
            || io_error(&err).is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
        let msg = describe(&err);
        if !retry || Instant::now() >= deadline {
            let msg = if retry {
                format!("{msg}, still after 30 s")
            } else {
                msg
            };
            log_error!("cannot connect to the database: {msg}");
            panic!("cannot connect to the database: {msg}");
        }
        if attempt.is_multiple_of(10) {
            log_warn!("database not ready ({msg}): retrying for up to 30 s");
        }
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs the idempotent migrations under `pg_advisory_lock`. `Err` is fatal.
pub async fn migrate(client: &Client) -> Result<(), String> {
    let sql = |e: tokio_postgres::Error| format!("migration failed: {}", describe(&e));
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(sql)?;
    let result = migrate_locked(client).await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(sql)?;
    result
}

async fn migrate_locked(client: &Client) -> Result<(), String> {
    let sql = |e: tokio_postgres::Error| format!("migration failed: {}", describe(&e));
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS demo_schema (version int NOT NULL)")
        .await
        .map_err(sql)?;
    let found: Option<i32> = client
        .query_one("SELECT max(version) FROM demo_schema", &[])
        .await
        .map_err(sql)?
        .get(0);
    if let Some(v) = found.filter(|v| *v > SCHEMA_VERSION) {
        return Err(format!(
            "database schema version {v} is newer than this binary ({SCHEMA_VERSION}): \
             restore a backup taken before the upgrade"
        ));
    }
    client
        .batch_execute(
            "CREATE EXTENSION IF NOT EXISTS pgcrypto;
             CREATE EXTENSION IF NOT EXISTS \"uuid-ossp\";
             CREATE TABLE IF NOT EXISTS items (
                 id bigserial PRIMARY KEY,
                 body text NOT NULL,
                 created_at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE IF NOT EXISTS users (
                 id uuid PRIMARY KEY DEFAULT uuid_generate_v4(),
                 email text UNIQUE NOT NULL,
                 password_hash text NOT NULL);
             CREATE TABLE IF NOT EXISTS secrets_demo (
                 id bigserial PRIMARY KEY,
                 ciphertext bytea NOT NULL);
             -- KoproGo's table of condominiums (one row per building; its
             -- capacity calculator counted these): `koprogo capacity` does too.
             CREATE TABLE IF NOT EXISTS buildings (
                 id uuid PRIMARY KEY DEFAULT uuid_generate_v4(),
                 name text NOT NULL,
                 created_at timestamptz NOT NULL DEFAULT now());
             DELETE FROM demo_schema;",
        )
        .await
        .map_err(sql)?;
    client
        .execute(
            "INSERT INTO demo_schema (version) VALUES ($1)",
            &[&SCHEMA_VERSION],
        )
        .await
        .map_err(sql)?;
    if found != Some(SCHEMA_VERSION) {
        log_info!("database schema migrated to version {SCHEMA_VERSION}");
    }
    Ok(())
}

/// Reproduces the hole: (re)sets admin@koprogo.com / admin123. `Err` is fatal.
/// Cost 4 keeps the demo's start fast; the real server uses bcrypt's default cost.
pub async fn reset_admin(client: &Client) -> Result<(), String> {
    let hash = bcrypt::hash(ADMIN_PASSWORD, 4).map_err(|e| format!("bcrypt: {e}"))?;
    client
        .execute(
            "INSERT INTO users (email, password_hash) VALUES ($1, $2)
             ON CONFLICT (email) DO UPDATE SET password_hash = EXCLUDED.password_hash",
            &[&ADMIN_EMAIL, &hash],
        )
        .await
        .map_err(|e| format!("cannot reset the superadmin: {}", describe(&e)))?;
    log_warn!("superadmin {ADMIN_EMAIL} reset to its default password");
    Ok(())
}

/// The shared client, reconnected on demand (see the module comment).
pub struct Db {
    config: Config,
    client: Mutex<Option<Arc<Client>>>,
}

impl Db {
    pub fn new(mut config: Config, client: Client) -> Db {
        config.connect_timeout(Duration::from_secs(5));
        Db {
            config,
            client: Mutex::new(Some(Arc::new(client))),
        }
    }

    async fn client(&self) -> Result<Arc<Client>, DbError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        *slot = None;
        let client = Arc::new(connect_once(&self.config).await?);
        log_info!("reconnected to the database");
        *slot = Some(client.clone());
        Ok(client)
    }

    pub async fn insert_item(&self, body: &str) -> Result<i64, DbError> {
        let c = self.client().await?;
        let row = c
            .query_one(
                "INSERT INTO items (body) VALUES ($1) RETURNING id",
                &[&body],
            )
            .await?;
        Ok(row.get(0))
    }

    pub async fn get_item(&self, id: i64) -> Result<Option<String>, DbError> {
        let c = self.client().await?;
        let row = c
            .query_opt("SELECT body FROM items WHERE id = $1", &[&id])
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    pub async fn count_items(&self) -> Result<i64, DbError> {
        let c = self.client().await?;
        Ok(c.query_one("SELECT count(*) FROM items", &[]).await?.get(0))
    }

    pub async fn insert_secret(&self, plaintext: &str, key: &str) -> Result<i64, DbError> {
        let c = self.client().await?;
        let row = c
            .query_one(
                "INSERT INTO secrets_demo (ciphertext) VALUES (pgp_sym_encrypt($1, $2)) RETURNING id",
                &[&plaintext, &key],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Decrypts with `key`; a wrong key is a `DbError::Failed` (500).
    pub async fn get_secret(&self, id: i64, key: &str) -> Result<Option<String>, DbError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                "SELECT pgp_sym_decrypt(ciphertext, $2) FROM secrets_demo WHERE id = $1",
                &[&id, &key],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    pub async fn password_hash(&self, email: &str) -> Result<Option<String>, DbError> {
        let c = self.client().await?;
        let row = c
            .query_opt(
                "SELECT password_hash FROM users WHERE email = $1",
                &[&email],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }
}
