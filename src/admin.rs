//! KoproGo-specific: the superadmin hole. koprogo-api resets `admin@koprogo.com` to
//! the public password `admin123` at every start; after every start of the API the
//! appliance replaces it with a strong password generated once and kept in the
//! secrets (`ADMIN_PASSWORD`). The bcrypt hash (the cost koprogo-api uses) is made
//! here: only the hash reaches PostgreSQL, so no statement log can show the password.

use anyhow::{Context, Result};

use crate::postgres::Db;

pub const ADMIN_EMAIL: &str = "admin@koprogo.com";
/// bcrypt cost of the stored hash (koprogo-api's `bcrypt::DEFAULT_COST`).
const COST: u32 = 12;

/// Sets the superadmin's password hash. Returns false when the schema has no such
/// table/user (another application, or migrations not run): nothing to fix then.
pub async fn secure_superadmin(db: &Db, password: &str) -> Result<bool> {
    let client = db
        .connect(db.app_db())
        .await
        .context("connecting to the application database")?;
    let exists = client
        .query_one(
            "SELECT to_regclass('public.users') IS NOT NULL
                AND EXISTS (SELECT 1 FROM information_schema.columns
                            WHERE table_schema = 'public' AND table_name = 'users'
                              AND column_name = 'password_hash')",
            &[],
        )
        .await?
        .get::<_, bool>(0);
    if !exists {
        return Ok(false);
    }
    // A quarter of a second of CPU: off the runtime's workers.
    let pw = password.to_string();
    let hash = tokio::task::spawn_blocking(move || bcrypt::hash(pw, COST))
        .await
        .context("hashing the superadmin's password")?
        .context("hashing the superadmin's password")?;
    let n = client
        .execute(
            "UPDATE public.users SET password_hash = $1 WHERE email = $2",
            &[&hash, &ADMIN_EMAIL],
        )
        .await
        .context("replacing the superadmin's default password")?;
    Ok(n > 0)
}
