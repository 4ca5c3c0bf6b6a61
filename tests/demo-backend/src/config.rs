//! Environment of the demo backend: `./.env` loading (real environment variables
//! win) and the same start-up validation as `koprogo-api`. Every rejection is a
//! reported start-up error: one line on stdout, exit code 1, except what the real
//! server panics on (exit 101): `DATABASE_URL` unset here, and any `DATABASE_URL`
//! that sqlx refuses when the pool is created (db.rs), which this module leaves
//! to sqlx so that both refuse exactly the same URLs.

use std::collections::HashMap;

use crate::db::PoolSize;

/// The built-in JWT secret of koprogo-api, refused at start.
const DEFAULT_JWT_SECRET: &str = "your-secret-key-change-this-in-production";
/// The PUBLIC key used when `TOTP_ENCRYPTION_KEY` is unset (like the real one).
const DEFAULT_TOTP_KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// Variables from the process environment, falling back to `./.env`.
pub struct Env {
    dotenv: HashMap<String, String>,
}

impl Env {
    /// Reads `./.env` if it exists: `KEY=VALUE` lines, `#` comments, optional
    /// `export ` prefix and surrounding quotes. Unreadable or malformed lines are
    /// skipped.
    pub fn load() -> Env {
        let mut dotenv = HashMap::new();
        if let Ok(text) = std::fs::read_to_string(".env") {
            for line in text.lines() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let line = line.strip_prefix("export ").unwrap_or(line);
                let Some((key, value)) = line.split_once('=') else {
                    continue;
                };
                let value = value.trim();
                let value = ['"', '\'']
                    .iter()
                    .find_map(|q| value.strip_prefix(*q)?.strip_suffix(*q))
                    .unwrap_or(value);
                dotenv.insert(key.trim().to_string(), value.to_string());
            }
        }
        Env { dotenv }
    }

    /// The variable's value: the real environment first, then `.env`.
    pub fn get(&self, key: &str) -> Option<String> {
        std::env::var(key)
            .ok()
            .or_else(|| self.dotenv.get(key).cloned())
    }
}

/// What the server needs once validated.
pub struct Config {
    /// As given: parsed by sqlx when the pool is created, like koprogo-api.
    pub database_url: String,
    pub pool: PoolSize,
    pub host: String,
    pub port: u16,
    pub totp_key: String,
}

/// Validates the environment like koprogo-api; `Err` is the one-line reason.
pub fn validate(env: &Env) -> Result<Config, String> {
    // koprogo-api: `env::var("DATABASE_URL").expect("DATABASE_URL must be set")`.
    // Set but empty is not refused here: sqlx refuses it at pool creation.
    let Some(database_url) = env.get("DATABASE_URL") else {
        log_error!("DATABASE_URL must be set");
        panic!("DATABASE_URL must be set: NotPresent");
    };

    match env.get("JWT_SECRET") {
        None => return Err("JWT_SECRET must be set".into()),
        Some(s) if s == DEFAULT_JWT_SECRET => {
            return Err(
                "JWT_SECRET is the built-in default: generate a secret of at least 32 characters"
                    .into(),
            )
        }
        Some(s) if s.chars().count() < 32 => {
            return Err("JWT_SECRET must be at least 32 characters long".into())
        }
        Some(_) => {}
    }

    let origins = env.get("CORS_ALLOWED_ORIGINS").unwrap_or_default();
    if origins.trim().is_empty() {
        return Err("CORS_ALLOWED_ORIGINS must be set (comma-separated list of origins)".into());
    }
    for origin in origins.split(',').map(str::trim) {
        if origin == "*" {
            return Err("CORS_ALLOWED_ORIGINS must not be '*'".into());
        }
        if !(origin.starts_with("http://") || origin.starts_with("https://")) {
            return Err(format!(
                "CORS_ALLOWED_ORIGINS entry {origin:?} has no scheme (http:// or https://)"
            ));
        }
    }

    if env
        .get("SMTP_ENABLED")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    {
        for key in ["SMTP_HOST", "SMTP_PORT", "SMTP_USERNAME", "SMTP_PASSWORD"] {
            if env.get(key).is_none_or(|v| v.is_empty()) {
                return Err(format!("SMTP_ENABLED=true but {key} is not set"));
            }
        }
    }

    let host = env.get("SERVER_HOST").unwrap_or_else(|| "127.0.0.1".into());
    let port = match env.get("SERVER_PORT") {
        None => 8080,
        Some(p) => p
            .parse()
            .map_err(|_| format!("SERVER_PORT {p:?} is not a valid port"))?,
    };

    // Last, so that the warning is only logged when nothing else is wrong.
    let totp_key = match env.get("TOTP_ENCRYPTION_KEY") {
        Some(k) if k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit()) => k,
        Some(_) => {
            return Err("TOTP_ENCRYPTION_KEY must be 64 hexadecimal characters (32 bytes)".into())
        }
        None => {
            log_warn!(
                "TOTP_ENCRYPTION_KEY not set: using the PUBLIC default key, 2FA secrets are readable by anyone"
            );
            DEFAULT_TOTP_KEY.to_string()
        }
    };

    Ok(Config {
        database_url,
        pool: pool_size(env),
        host,
        port,
        totp_key,
    })
}

/// The pool settings as koprogo-api reads them (`create_pool`): a missing or
/// unparsable value falls back to its default without a word (10, 2, 30 s).
fn pool_size(env: &Env) -> PoolSize {
    fn read<T: std::str::FromStr>(env: &Env, key: &str, default: T) -> T {
        env.get(key).and_then(|v| v.parse().ok()).unwrap_or(default)
    }
    PoolSize {
        max_connections: read(env, "DB_POOL_MAX_CONNECTIONS", 10),
        min_connections: read(env, "DB_POOL_MIN_CONNECTIONS", 2),
        acquire_timeout_s: read(env, "DB_POOL_ACQUIRE_TIMEOUT", 30),
    }
}
