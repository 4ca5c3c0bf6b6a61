//! The old monitoring scripts' warn/critical thresholds and how a value maps to a
//! level. "Above" thresholds are reached at or above the value (7 connections of a
//! pool of 10 warn), "below" ones strictly below it (a 95.0 % cache hit ratio is ok).

use serde::{Deserialize, Serialize};

/// How bad a value is; ordered, so the worst of several is their `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Critical,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Critical => "critical",
        }
    }

    /// 0, 1, 2 (the Prometheus gauge).
    pub fn number(self) -> f64 {
        match self {
            Level::Ok => 0.0,
            Level::Warn => 1.0,
            Level::Critical => 2.0,
        }
    }
}

/// Which side of the thresholds is bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Worse {
    /// Higher is worse: warn at `value >= warn`.
    Above,
    /// Lower is worse: warn at `value < warn`.
    Below,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    pub warn: f64,
    /// `None`: the old scripts had only a warning for this one.
    pub critical: Option<f64>,
    pub worse: Worse,
}

impl Thresholds {
    pub const fn above(warn: f64, critical: f64) -> Thresholds {
        Thresholds {
            warn,
            critical: Some(critical),
            worse: Worse::Above,
        }
    }

    pub const fn below(warn: f64, critical: f64) -> Thresholds {
        Thresholds {
            warn,
            critical: Some(critical),
            worse: Worse::Below,
        }
    }

    pub fn level(&self, v: f64) -> Level {
        let past = |t: f64| match self.worse {
            Worse::Above => v >= t,
            Worse::Below => v < t,
        };
        if self.critical.is_some_and(past) {
            Level::Critical
        } else if past(self.warn) {
            Level::Warn
        } else {
            Level::Ok
        }
    }
}

/// RAM used (MemTotal - MemAvailable), percent.
pub const RAM: Thresholds = Thresholds::above(75.0, 85.0);
/// CPU busy, percent.
pub const CPU: Thresholds = Thresholds::above(70.0, 85.0);
/// Disk used as `df` counts it, percent.
pub const DISK: Thresholds = Thresholds::above(70.0, 80.0);
/// 5-minute load average divided by the cores.
pub const LOAD_PER_CORE: Thresholds = Thresholds::above(1.5, 2.0);
/// Shared-buffer hit ratio, percent; below is bad.
pub const CACHE_HIT: Thresholds = Thresholds::below(95.0, 90.0);
/// Dead tuples / all tuples of the user tables, percent (a warning only).
pub const DEAD_TUPLES: Thresholds = Thresholds {
    warn: 20.0,
    critical: None,
    worse: Worse::Above,
};

/// The old scripts warned at 7 and went critical at 9 connections of a pool of 10:
/// 70 % and 90 % of `size`. Multiplied before dividing, so 10 gives exactly 7 and 9.
pub fn connections(size: u32) -> Thresholds {
    let size = f64::from(size);
    Thresholds::above(size * 7.0 / 10.0, size * 9.0 / 10.0)
}

/// Below this many block accesses since the statistics reset the cache hit ratio
/// says nothing (a fresh cluster): reported, level ok.
pub const MIN_BLOCK_ACCESSES: f64 = 1000.0;
/// Below this many tuples in the user tables the dead tuple ratio says nothing (a
/// nearly empty database, where one updated row is 30 %): reported, level ok.
pub const MIN_TUPLES: f64 = 1000.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn above_thresholds_are_reached_at_the_value() {
        assert_eq!(RAM.level(74.9), Level::Ok);
        assert_eq!(RAM.level(75.0), Level::Warn);
        assert_eq!(RAM.level(84.99), Level::Warn);
        assert_eq!(RAM.level(85.0), Level::Critical);
        assert_eq!(CPU.level(69.9), Level::Ok);
        assert_eq!(CPU.level(70.0), Level::Warn);
        assert_eq!(CPU.level(85.0), Level::Critical);
        assert_eq!(DISK.level(69.99), Level::Ok);
        assert_eq!(DISK.level(70.0), Level::Warn);
        assert_eq!(DISK.level(80.0), Level::Critical);
        assert_eq!(LOAD_PER_CORE.level(1.49), Level::Ok);
        assert_eq!(LOAD_PER_CORE.level(1.5), Level::Warn);
        assert_eq!(LOAD_PER_CORE.level(2.0), Level::Critical);
    }

    #[test]
    fn cache_hit_is_bad_below() {
        assert_eq!(CACHE_HIT.level(100.0), Level::Ok);
        assert_eq!(CACHE_HIT.level(95.0), Level::Ok);
        assert_eq!(CACHE_HIT.level(94.99), Level::Warn);
        assert_eq!(CACHE_HIT.level(90.0), Level::Warn);
        assert_eq!(CACHE_HIT.level(89.99), Level::Critical);
    }

    #[test]
    fn dead_tuples_only_warn() {
        assert_eq!(DEAD_TUPLES.level(19.99), Level::Ok);
        assert_eq!(DEAD_TUPLES.level(20.0), Level::Warn);
        assert_eq!(DEAD_TUPLES.level(100.0), Level::Warn);
    }

    #[test]
    fn connections_scale_with_the_pool() {
        // The old pool of 10: 7 warns, 9 is critical.
        let t = connections(10);
        assert_eq!((t.warn, t.critical), (7.0, Some(9.0)));
        assert_eq!(t.level(6.0), Level::Ok);
        assert_eq!(t.level(7.0), Level::Warn);
        assert_eq!(t.level(8.0), Level::Warn);
        assert_eq!(t.level(9.0), Level::Critical);
        // The default pool of 8: 6 warns (5.6), 8 (a full pool) is critical (7.2).
        let t = connections(8);
        assert_eq!(t.level(5.0), Level::Ok);
        assert_eq!(t.level(6.0), Level::Warn);
        assert_eq!(t.level(7.0), Level::Warn);
        assert_eq!(t.level(8.0), Level::Critical);
        // A pool of 1: its only connection is critical.
        assert_eq!(connections(1).level(0.0), Level::Ok);
        assert_eq!(connections(1).level(1.0), Level::Critical);
    }

    #[test]
    fn levels_order_and_names() {
        assert!(Level::Ok < Level::Warn && Level::Warn < Level::Critical);
        assert_eq!(
            serde_json::to_string(&Level::Critical).expect("json"),
            "\"critical\""
        );
        assert_eq!(Level::Warn.as_str(), "warn");
    }
}
