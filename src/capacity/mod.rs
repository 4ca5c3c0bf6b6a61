//! Capacity: what the old deployment's monitoring scripts did every 5 minutes and
//! its daily capacity report, inside the supervisor. This module owns
//! - the report (`koprogo capacity [--json]`): RAM, CPU, load per core, disk of the
//!   state directory, PostgreSQL connections, cache hit ratio, dead tuples, the
//!   proxy's p99 latency, database size and growth, each with a level from the old
//!   scripts' thresholds ([`levels`]), and a recommendation ([`recommend`]);
//! - the database size history that growth is computed from
//!   (`<state>/capacity-history.json`, [`history`]);
//! - the watch ([`monitor`]): the same check every `capacity.interval`, a log line
//!   when a level changes (not while it stays), the last levels for Prometheus.
//!
//! The report is computed in the supervisor, which holds the proxy's counters and
//! reaches the database; the command line asks over the control socket
//! (the control socket's `capacity` request) and prints it ([`render`]).

pub mod history;
pub mod levels;
mod measure;
pub mod monitor;
pub mod recommend;
pub mod render;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use levels::{Level, Thresholds};
use measure::measure;
pub use monitor::{Monitor, View};

/// Metric names, in report order. Stable: JSON keys and Prometheus label values.
pub const METRICS: [&str; 11] = [
    "ram",
    "cpu",
    "load_per_core",
    "disk",
    "postgres_connections",
    "postgres_connections_total",
    "cache_hit_ratio",
    "dead_tuples_ratio",
    "p99_latency",
    "database_size",
    "database_growth",
];

/// One measured value and how bad it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// `None` when it could not be measured (then `detail` says why, level warn).
    pub value: Option<f64>,
    /// "%", "per core", "connections", "s", "bytes" or "bytes/day".
    pub unit: String,
    pub level: Level,
    /// `None` for values reported without a threshold (latency, size, growth).
    pub thresholds: Option<Thresholds>,
    /// What was measured, in words.
    pub detail: String,
}

impl Metric {
    fn judged(value: f64, unit: &str, t: Thresholds, detail: String) -> Metric {
        Metric {
            value: Some(value),
            unit: unit.into(),
            level: t.level(value),
            thresholds: Some(t),
            detail,
        }
    }

    /// Reported with its thresholds, but too little data to judge: level ok.
    fn unjudged(value: Option<f64>, unit: &str, t: Thresholds, detail: String) -> Metric {
        Metric {
            value,
            unit: unit.into(),
            level: Level::Ok,
            thresholds: Some(t),
            detail,
        }
    }

    fn info(value: Option<f64>, unit: &str, detail: String) -> Metric {
        Metric {
            value,
            unit: unit.into(),
            level: Level::Ok,
            thresholds: None,
            detail,
        }
    }

    /// Could not be measured: a warning (something the operator should look at).
    fn unavailable(unit: &str, t: Option<Thresholds>, why: String) -> Metric {
        Metric {
            value: None,
            unit: unit.into(),
            level: Level::Warn,
            thresholds: t,
            detail: why,
        }
    }
}

/// The machine the report was measured on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Host {
    /// MemTotal of /proc/meminfo.
    pub ram_bytes: Option<u64>,
    pub cores: u64,
}

/// `koprogo capacity --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// When it was measured (RFC 3339, UTC).
    pub time: String,
    /// The worst level of all metrics.
    pub level: Level,
    /// Keyed by the names in [`METRICS`].
    pub metrics: BTreeMap<String, Metric>,
    pub growth: history::Growth,
    /// Rows of KoproGo's `buildings` table; `None` when there is no such table (or
    /// the database did not answer).
    pub condominiums: Option<i64>,
    /// Where `condominiums` came from, or why it is missing.
    pub condominiums_source: String,
    pub host: Host,
    pub recommendation: recommend::Recommendation,
}

impl Report {
    pub fn metric(&self, name: &str) -> Option<&Metric> {
        self.metrics.get(name)
    }

    /// Exit code of `koprogo capacity`: 0 when every metric is ok, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        u8::from(self.level != Level::Ok)
    }
}
