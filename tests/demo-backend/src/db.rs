//! PostgreSQL side of the demo backend, on the same library and major version as
//! koprogo-api (sqlx 0.8, `PgPoolOptions` with the same settings as its
//! `infrastructure/database/pool.rs`): the pool at start, migrations under an
//! advisory lock, the superadmin reset, and the queries the HTTP handlers run.
//!
//! Because `DATABASE_URL` goes through the very same `PgPoolOptions::connect`, the
//! demo refuses exactly the URLs the real server refuses, with the same panic
//! (`Failed to create database pool: Configuration(EmptyHost)`, exit 101), and
//! retries at start exactly when it does: sqlx itself retries while Postgres
//! refuses connections or is starting up (SQLSTATE 57P03), up to the acquire
//! timeout; anything else (missing socket, authentication failure, unknown
//! database...) fails at once.
//!
//! Lost connections: sqlx pings an idle connection before handing it out and
//! replaces a dead one. While Postgres is down every request that needs the
//! database answers 503 JSON; once it is back the next request reconnects.

use std::time::Duration;

use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};

/// Schema version this binary creates and understands.
pub const SCHEMA_VERSION: i32 = 1;
/// Key of the advisory lock that serialises migrations ("koprogo" in ASCII).
const MIGRATION_LOCK: i64 = 0x006b_6f70_726f_676f;
/// The superadmin that koprogo-api resets at every start (the hole to close).
const ADMIN_EMAIL: &str = "admin@koprogo.com";
const ADMIN_PASSWORD: &str = "admin123";

/// Pool settings, read like koprogo-api reads them (see config.rs).
pub struct PoolSize {
    pub max_connections: u32,
    pub min_connections: u32,
    pub acquire_timeout_s: u64,
}

/// Why a request could not be served by the database.
pub enum DbError {
    /// Postgres is unreachable or the connection died: 503.
    Unavailable(String),
    /// The query itself failed (e.g. wrong decryption key): 500.
    Failed(String),
}

/// SQLSTATEs that mean "the server is gone or not taking connections": class 08
/// (connection exception), 53300 too_many_connections, 57P01 admin_shutdown,
/// 57P02 crash_shutdown, 57P03 cannot_connect_now.
fn unavailable_code(code: &str) -> bool {
    code.starts_with("08") || ["53300", "57P01", "57P02", "57P03"].contains(&code)
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        let gone = match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => db.code().is_some_and(|c| unavailable_code(&c)),
            _ => false,
        };
        if gone {
            DbError::Unavailable(describe(&e))
        } else {
            DbError::Failed(describe(&e))
        }
    }
}

/// A readable one-line description: the server's message and SQLSTATE for a
/// database error, sqlx's own text otherwise.
pub fn describe(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("{} ({code})", db.message()),
            None => db.message().to_string(),
        },
        other => other.to_string(),
    }
}

/// The pool, exactly as koprogo-api builds it. A failure panics with the real
/// server's message (its `.expect("Failed to create database pool")`): exit 101.
pub async fn create_pool(database_url: &str, size: &PoolSize) -> PgPool {
    log_info!(
        "Creating database pool: max_connections={}, min_connections={}, acquire_timeout={}s",
        size.max_connections,
        size.min_connections,
        size.acquire_timeout_s
    );
    let pool = PgPoolOptions::new()
        .max_connections(size.max_connections)
        .min_connections(size.min_connections)
        .acquire_timeout(Duration::from_secs(size.acquire_timeout_s))
        .idle_timeout(Duration::from_secs(600))
        .max_lifetime(Duration::from_secs(1800))
        .connect(database_url)
        .await;
    match pool {
        Ok(pool) => pool,
        Err(e) => {
            log_error!("cannot create the database pool: {}", describe(&e));
            panic!("Failed to create database pool: {e:?}");
        }
    }
}

/// Runs the idempotent migrations under `pg_advisory_lock`, on one connection
/// (the lock belongs to the session). `Err` is fatal.
pub async fn migrate(pool: &PgPool) -> Result<(), String> {
    let sql = |e: sqlx::Error| format!("migration failed: {}", describe(&e));
    let mut conn = pool.acquire().await.map_err(sql)?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await
        .map_err(sql)?;
    let result = migrate_locked(&mut conn).await;
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await
        .map_err(sql)?;
    result
}

async fn migrate_locked(conn: &mut PgConnection) -> Result<(), String> {
    let sql = |e: sqlx::Error| format!("migration failed: {}", describe(&e));
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS demo_schema (version int NOT NULL)")
        .execute(&mut *conn)
        .await
        .map_err(sql)?;
    let found: Option<i32> = sqlx::query_scalar("SELECT max(version) FROM demo_schema")
        .fetch_one(&mut *conn)
        .await
        .map_err(sql)?;
    if let Some(v) = found.filter(|v| *v > SCHEMA_VERSION) {
        return Err(format!(
            "database schema version {v} is newer than this binary ({SCHEMA_VERSION}): \
             restore a backup taken before the upgrade"
        ));
    }
    sqlx::raw_sql(
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
    .execute(&mut *conn)
    .await
    .map_err(sql)?;
    sqlx::query("INSERT INTO demo_schema (version) VALUES ($1)")
        .bind(SCHEMA_VERSION)
        .execute(&mut *conn)
        .await
        .map_err(sql)?;
    if found != Some(SCHEMA_VERSION) {
        log_info!("database schema migrated to version {SCHEMA_VERSION}");
    }
    Ok(())
}

/// Reproduces the hole: (re)sets admin@koprogo.com / admin123. `Err` is fatal.
/// Cost 4 keeps the demo's start fast; the real server uses bcrypt's default cost.
pub async fn reset_admin(pool: &PgPool) -> Result<(), String> {
    let hash = bcrypt::hash(ADMIN_PASSWORD, 4).map_err(|e| format!("bcrypt: {e}"))?;
    sqlx::query(
        "INSERT INTO users (email, password_hash) VALUES ($1, $2)
         ON CONFLICT (email) DO UPDATE SET password_hash = EXCLUDED.password_hash",
    )
    .bind(ADMIN_EMAIL)
    .bind(hash)
    .execute(pool)
    .await
    .map_err(|e| format!("cannot reset the superadmin: {}", describe(&e)))?;
    log_warn!("superadmin {ADMIN_EMAIL} reset to its default password");
    Ok(())
}

/// The queries the HTTP handlers run, on the shared pool.
pub struct Db {
    pool: PgPool,
}

impl Db {
    pub fn new(pool: PgPool) -> Db {
        Db { pool }
    }

    pub async fn insert_item(&self, body: &str) -> Result<i64, DbError> {
        Ok(
            sqlx::query_scalar("INSERT INTO items (body) VALUES ($1) RETURNING id")
                .bind(body)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    pub async fn get_item(&self, id: i64) -> Result<Option<String>, DbError> {
        Ok(sqlx::query_scalar("SELECT body FROM items WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn count_items(&self) -> Result<i64, DbError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM items")
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn insert_secret(&self, plaintext: &str, key: &str) -> Result<i64, DbError> {
        Ok(sqlx::query_scalar(
            "INSERT INTO secrets_demo (ciphertext) VALUES (pgp_sym_encrypt($1, $2)) RETURNING id",
        )
        .bind(plaintext)
        .bind(key)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Decrypts with `key`; a wrong key is a `DbError::Failed` (500).
    pub async fn get_secret(&self, id: i64, key: &str) -> Result<Option<String>, DbError> {
        Ok(sqlx::query_scalar(
            "SELECT pgp_sym_decrypt(ciphertext, $2) FROM secrets_demo WHERE id = $1",
        )
        .bind(id)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?)
    }

    pub async fn password_hash(&self, email: &str) -> Result<Option<String>, DbError> {
        Ok(
            sqlx::query_scalar("SELECT password_hash FROM users WHERE email = $1")
                .bind(email)
                .fetch_optional(&self.pool)
                .await?,
        )
    }
}
