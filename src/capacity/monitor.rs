//! The capacity watch inside `koprogo run`: every `capacity.interval` (5 minutes,
//! like the old scripts' cron) it measures the report, logs each metric whose level
//! changed (a warning or error line when it gets worse, an info line when it is back
//! to ok; nothing while a level stays), records the day's database size, and keeps
//! the last report for the Prometheus endpoint. The first check waits until
//! PostgreSQL has been ready once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{Level, Metric, Report};
use crate::config::Config;
use crate::postgres::Db;
use crate::process::state::ServiceState;
use crate::procfs::CpuTimes;
use crate::proxy::stats::ProxyStats;
use crate::sync::LockExt;

/// The proxy's latency bucket counts at some instant.
pub type LatencyCounts = [u64; 13];

/// What the capacity watch reads of the running site (read-only).
pub struct View {
    pub cfg: Arc<Config>,
    pub db: Db,
    pub proxy: Arc<ProxyStats>,
}

pub struct Monitor {
    pub(super) view: View,
    cpu_base: Mutex<Option<(Instant, CpuTimes)>>,
    latency_base: Mutex<Option<(Instant, LatencyCounts)>>,
    last: Mutex<Option<Report>>,
}

impl Monitor {
    pub fn new(view: View) -> Arc<Monitor> {
        Arc::new(Monitor {
            view,
            cpu_base: Mutex::default(),
            latency_base: Mutex::default(),
            last: Mutex::default(),
        })
    }

    /// Measures the report now (see [`super::measure`]).
    pub async fn measure(&self, scheduled: bool) -> Report {
        super::measure(self, scheduled).await
    }

    /// Where the CPU window of the next measurement starts.
    pub fn cpu_base(&self) -> Option<(Instant, CpuTimes)> {
        *self.cpu_base.locked()
    }

    pub fn set_cpu_base(&self, at: Instant, t: CpuTimes) {
        {
            let mut g = self.cpu_base.locked();
            *g = Some((at, t));
        }
    }

    /// The proxy's latency histogram at the previous periodic check.
    pub fn latency_base(&self) -> Option<(Instant, LatencyCounts)> {
        *self.latency_base.locked()
    }

    pub fn set_latency_base(&self, at: Instant, c: LatencyCounts) {
        {
            let mut g = self.latency_base.locked();
            *g = Some((at, c));
        }
    }

    /// The report of the last periodic check.
    pub fn last(&self) -> Option<Report> {
        self.last.locked().clone()
    }

    /// The watch loop; runs until the task is aborted. `postgres`: its state (the
    /// first check waits until it has been ready once).
    pub async fn run(self: Arc<Self>, mut postgres: tokio::sync::watch::Receiver<ServiceState>) {
        let every = self.view.cfg.capacity.interval;
        // Not during boot: PostgreSQL not answering yet is no capacity problem.
        let _ = postgres.wait_for(|s| s.ready()).await;
        tracing::info!("capacity: checking every {every:?}");
        let mut levels: BTreeMap<String, Level> = BTreeMap::new();
        let mut advice = super::recommend::Advice::Stay;
        loop {
            tokio::time::sleep(every).await;
            let report = self.measure(true).await;
            for (name, m) in &report.metrics {
                let before = levels.insert(name.clone(), m.level).unwrap_or(Level::Ok);
                log_change(name, before, m);
            }
            let now = report.recommendation.advice;
            if now != advice {
                let r = &report.recommendation;
                if now == super::recommend::Advice::Stay {
                    tracing::info!("capacity: recommendation back to: {}", r.summary);
                } else {
                    tracing::warn!(
                        "capacity: recommendation: {} ({})",
                        r.summary,
                        r.reasons.join("; ")
                    );
                }
                advice = now;
            }
            {
                let mut g = self.last.locked();
                *g = Some(report);
            }
        }
    }
}

/// One line when `name` changed level from `before` to `m.level`.
fn log_change(name: &str, before: Level, m: &Metric) {
    if before == m.level {
        return;
    }
    let line = describe(name, m);
    match m.level {
        Level::Critical => tracing::error!("capacity: {line}"),
        Level::Warn => tracing::warn!("capacity: {line}"),
        Level::Ok => tracing::info!("capacity: {name} back to ok: {}", value_text(m)),
    }
}

/// "ram critical: 87.2 % (warn at 75, critical at 85): 1.6 GiB of 1.9 GiB used".
pub fn describe(name: &str, m: &Metric) -> String {
    let limits = m
        .thresholds
        .map_or(String::new(), |t| format!(" ({})", thresholds_text(&t)));
    format!(
        "{name} {}: {}{limits}: {}",
        m.level.as_str(),
        value_text(m),
        m.detail
    )
}

/// "warn at 75, critical at 85" / "warn below 95, critical below 90" / "warn at 20".
pub fn thresholds_text(t: &super::Thresholds) -> String {
    let side = match t.worse {
        super::levels::Worse::Above => "at",
        super::levels::Worse::Below => "below",
    };
    match t.critical {
        Some(c) => format!("warn {side} {}, critical {side} {c}", t.warn),
        None => format!("warn {side} {}", t.warn),
    }
}

pub fn value_text(m: &Metric) -> String {
    match m.value {
        None => "unknown".into(),
        Some(v) => match m.unit.as_str() {
            "bytes" => crate::backup::human_size(v.max(0.0) as u64),
            "bytes/day" => format!("{}/day", signed_size(v)),
            "s" => format!("{:.1} ms", v * 1000.0),
            "%" => format!("{v:.1} %"),
            "per core" => format!("{v:.2} per core"),
            "connections" => format!("{v:.0}"),
            u => format!("{v} {u}"),
        },
    }
}

pub fn signed_size(v: f64) -> String {
    let s = crate::backup::human_size(v.abs() as u64);
    if v < 0.0 {
        format!("-{s}")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capacity::levels;

    #[test]
    fn log_lines_name_value_thresholds_and_detail() {
        let m = Metric::judged(87.25, "%", levels::RAM, "1.6 GiB of 1.9 GiB used".into());
        assert_eq!(
            describe("ram", &m),
            "ram critical: 87.2 % (warn at 75, critical at 85): 1.6 GiB of 1.9 GiB used"
        );
        let m = Metric::judged(92.0, "%", levels::CACHE_HIT, "d".into());
        assert_eq!(
            describe("cache_hit_ratio", &m),
            "cache_hit_ratio warn: 92.0 % (warn below 95, critical below 90): d"
        );
        let m = Metric::unavailable("connections", None, "PostgreSQL did not answer".into());
        assert_eq!(
            describe("postgres_connections_total", &m),
            "postgres_connections_total warn: unknown: PostgreSQL did not answer"
        );
        let m = Metric::info(Some(-2048.0), "bytes/day", String::new());
        assert_eq!(value_text(&m), "-2.0 KiB/day");
        let m = Metric::info(Some(0.0025), "s", String::new());
        assert_eq!(value_text(&m), "2.5 ms");
    }
}
