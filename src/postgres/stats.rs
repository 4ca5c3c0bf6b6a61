//! The statistics queries shared by the Prometheus endpoint and `koprogo capacity`:
//! client connections (all, and those of the API's role), `max_connections`, the
//! database's size, block hits/reads and live/dead tuples, and the number of
//! condominiums (KoproGo's `buildings` table, when it exists). One place, so both
//! report the same numbers.

use std::time::Duration;

use anyhow::{Context, Result};
use tokio_postgres::Client;

use super::Db;

/// How long the whole set of queries may take.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// One reading of the cluster's statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct DbStats {
    /// Client backends of every role (the supervisor's own query included).
    pub connections: i64,
    /// Client backends of the API's role (`koprogo`): what its pool holds.
    pub app_connections: i64,
    pub max_connections: u32,
    /// `pg_database_size` of the application database.
    pub size_bytes: i64,
    /// Shared-buffer hits and block reads since the statistics were reset (all databases).
    pub blks_hit: f64,
    pub blks_read: f64,
    /// Dead and live tuples of the application database's user tables.
    pub dead_tuples: f64,
    pub live_tuples: f64,
}

impl DbStats {
    /// Hits / (hits + reads); `None` before any block was accessed.
    pub fn cache_hit_ratio(&self) -> Option<f64> {
        let total = self.blks_hit + self.blks_read;
        (total > 0.0).then(|| self.blks_hit / total)
    }

    /// Dead / (dead + live); `None` while the user tables hold no tuple.
    pub fn dead_tuple_ratio(&self) -> Option<f64> {
        let total = self.dead_tuples + self.live_tuples;
        (total > 0.0).then(|| self.dead_tuples / total)
    }
}

/// Runs the queries on `c` (connected to the application database); `app_role` is
/// the role whose connections count against the API's pool.
pub async fn query(c: &Client, app_role: &str) -> Result<DbStats> {
    let row = c
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE usename = $1)
             FROM pg_stat_activity WHERE backend_type = 'client backend'",
            &[&app_role],
        )
        .await?;
    let (connections, app_connections): (i64, i64) = (row.get(0), row.get(1));
    let max: String = c.query_one("SHOW max_connections", &[]).await?.get(0);
    let max_connections = max
        .trim()
        .parse::<u32>()
        .with_context(|| format!("PostgreSQL answered max_connections = {max:?}"))?;
    let size_bytes: i64 = c
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await?
        .get(0);
    let row = c
        .query_one(
            "SELECT coalesce(sum(blks_hit), 0)::float8, coalesce(sum(blks_read), 0)::float8 FROM pg_stat_database",
            &[],
        )
        .await?;
    let (blks_hit, blks_read): (f64, f64) = (row.get(0), row.get(1));
    let row = c
        .query_one(
            "SELECT coalesce(sum(n_dead_tup), 0)::float8, coalesce(sum(n_live_tup), 0)::float8 FROM pg_stat_user_tables",
            &[],
        )
        .await?;
    let (dead_tuples, live_tuples): (f64, f64) = (row.get(0), row.get(1));
    Ok(DbStats {
        connections,
        app_connections,
        max_connections,
        size_bytes,
        blks_hit,
        blks_read,
        dead_tuples,
        live_tuples,
    })
}

/// Rows of KoproGo's `buildings` table (one per condominium); `None` when the
/// table does not exist (another API server, or one not migrated yet).
pub async fn condominiums(c: &Client) -> Result<Option<i64>> {
    let exists: bool = c
        .query_one("SELECT to_regclass('public.buildings') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let n: i64 = c
        .query_one("SELECT count(*) FROM public.buildings", &[])
        .await?
        .get(0);
    Ok(Some(n))
}

/// A new connection to the application database, the statistics and (when
/// `with_condominiums`) the condominium count, all within [`QUERY_TIMEOUT`].
pub async fn collect(db: &Db, with_condominiums: bool) -> Result<(DbStats, Option<i64>)> {
    let q = async {
        let c = db
            .connect(db.app_db())
            .await
            .with_context(|| format!("cannot connect to the database {}", db.app_db()))?;
        super::pin_search_path(&c).await?;
        let stats = query(&c, db.app_role())
            .await
            .context("statistics query failed")?;
        let condos = if with_condominiums {
            condominiums(&c)
                .await
                .context("counting the rows of table buildings failed")?
        } else {
            None
        };
        Ok::<_, anyhow::Error>((stats, condos))
    };
    tokio::time::timeout(QUERY_TIMEOUT, q)
        .await
        .map_err(|_| anyhow::anyhow!("PostgreSQL did not answer within {QUERY_TIMEOUT:?}"))?
}
