//! KoproGo-specific: the superadmin hole. koprogo-api resets `admin@koprogo.com` to
//! the public password `admin123` at every start; after every start of the API the
//! appliance replaces it with a strong password generated once and kept in the
//! secrets (`ADMIN_PASSWORD`), hashed with bcrypt (pgcrypto's `crypt(…, gen_salt('bf'))`,
//! the `$2a$` format the API's bcrypt verifies).

use anyhow::{Context, Result};

use crate::postgres::Db;

pub const ADMIN_EMAIL: &str = "admin@koprogo.com";
/// bcrypt cost of the stored hash.
const COST: i32 = 12;

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
    let n = client
        .execute(
            "UPDATE public.users SET password_hash = crypt($1, gen_salt('bf', $2))
             WHERE email = $3",
            &[&password, &COST, &ADMIN_EMAIL],
        )
        .await
        .context("replacing the superadmin's default password")?;
    Ok(n > 0)
}
