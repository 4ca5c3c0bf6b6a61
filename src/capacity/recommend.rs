//! The plain recommendation: stay, a bigger VPS, or a separate database server.
//!
//! Two inputs, the stronger advice wins:
//! - the condominium count (rows of `buildings`) against the old capacity
//!   calculator's tiers: under 100 fit the 2 GB / 1 vCPU VPS, under 500 want 4 GB /
//!   2 vCPU, under 2000 want 8 GB / 4 vCPU, 2000 and more a separate database
//!   server. A machine reaches a tier when it has its cores and at least 90 % of
//!   its RAM (a "2 GB" VPS shows about 1.9 GiB);
//! - the measured load: a critical RAM, CPU, load, disk, pool or cache hit ratio
//!   level asks for the next tier up; on a machine already at the largest tier, a
//!   separate database server. Warnings only say what to watch; dead tuples ask for
//!   VACUUM, not for a bigger machine.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Level, Metric};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Advice {
    Stay,
    BiggerVps,
    SeparateDatabase,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recommendation {
    pub advice: Advice,
    /// One sentence.
    pub summary: String,
    /// Why, one entry per input that counted.
    pub reasons: Vec<String>,
}

/// One size of single machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    /// Condominiums it serves: fewer than this.
    pub below: i64,
    pub ram_gib: u64,
    pub vcpus: u64,
}

/// The old capacity calculator's tiers (Hetzner CPX11, CPX21, CPX31).
pub const TIERS: [Tier; 3] = [
    Tier {
        below: 100,
        ram_gib: 2,
        vcpus: 1,
    },
    Tier {
        below: 500,
        ram_gib: 4,
        vcpus: 2,
    },
    Tier {
        below: 2000,
        ram_gib: 8,
        vcpus: 4,
    },
];

/// Metrics whose critical level means the machine is too small.
const SIZING: [&str; 6] = [
    "ram",
    "cpu",
    "load_per_core",
    "disk",
    "postgres_connections",
    "cache_hit_ratio",
];

/// The largest tier this machine's RAM and cores reach (index into TIERS; 0 when
/// smaller).
fn machine_tier(ram_bytes: u64, cores: u64) -> usize {
    TIERS
        .iter()
        .rposition(|t| {
            ram_bytes as f64 >= t.ram_gib as f64 * 0.9 * (1u64 << 30) as f64 && cores >= t.vcpus
        })
        .unwrap_or(0)
}

fn tier_text(t: &Tier) -> String {
    format!("{} GB RAM, {} vCPU", t.ram_gib, t.vcpus)
}

/// The recommendation for these metrics, condominium count, machine RAM and cores.
pub fn advise(
    metrics: &BTreeMap<String, Metric>,
    condominiums: Option<i64>,
    ram_bytes: Option<u64>,
    cores: u64,
) -> Recommendation {
    let here = ram_bytes.map_or(0, |r| machine_tier(r, cores));
    let mut reasons = Vec::new();
    let mut advice = Advice::Stay;
    let mut want = here;
    match condominiums {
        Some(n) if n >= TIERS[TIERS.len() - 1].below => {
            advice = Advice::SeparateDatabase;
            reasons.push(format!(
                "{n} condominiums: from 2000 the old capacity tiers move the database to its own server"
            ));
        }
        Some(n) => {
            let need = TIERS.iter().position(|t| n < t.below).unwrap_or(0);
            let t = &TIERS[need];
            if need > here {
                advice = Advice::BiggerVps;
                want = need;
                reasons.push(format!(
                    "{n} condominiums: the old capacity tiers put up to {} on {} and this machine is smaller",
                    t.below - 1,
                    tier_text(t)
                ));
            } else {
                reasons.push(format!(
                    "{n} condominiums: within this machine's tier (up to {} on {})",
                    t.below - 1,
                    tier_text(t)
                ));
            }
        }
        None => reasons.push(
            "condominium count unknown (no buildings table): advice from the measured load only"
                .into(),
        ),
    }
    let critical: Vec<&str> = SIZING
        .iter()
        .copied()
        .filter(|n| metrics.get(*n).is_some_and(|m| m.level == Level::Critical))
        .collect();
    if !critical.is_empty() {
        if here + 1 >= TIERS.len() {
            advice = advice.max(Advice::SeparateDatabase);
            reasons.push(format!(
                "critical: {} on a machine already at the largest single-machine tier ({})",
                critical.join(", "),
                tier_text(&TIERS[TIERS.len() - 1])
            ));
        } else {
            advice = advice.max(Advice::BiggerVps);
            want = want.max(here + 1);
            reasons.push(format!(
                "critical: {}: this machine is too small for its load",
                critical.join(", ")
            ));
        }
    }
    let warned: Vec<&str> = SIZING
        .iter()
        .copied()
        .filter(|n| metrics.get(*n).is_some_and(|m| m.level == Level::Warn))
        .collect();
    if !warned.is_empty() {
        reasons.push(format!("watch: {} at warning level", warned.join(", ")));
    }
    if metrics
        .get("dead_tuples_ratio")
        .is_some_and(|m| m.level != Level::Ok)
    {
        reasons.push(
            "dead tuples: autovacuum is behind; run VACUUM ANALYZE (koprogo psql), not a sizing problem"
                .into(),
        );
    }
    let summary = match advice {
        Advice::Stay => "stay: this machine is big enough".to_string(),
        Advice::BiggerVps => format!(
            "move to a bigger VPS: at least {}",
            tier_text(&TIERS[want.min(TIERS.len() - 1)])
        ),
        Advice::SeparateDatabase => {
            "move PostgreSQL to a separate database server (or a managed one)".to_string()
        }
    };
    Recommendation {
        advice,
        summary,
        reasons,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    /// What a "2 GB" VPS reports as MemTotal.
    const VPS_2GB: u64 = 1_950 * (1 << 20);

    fn with(levels: &[(&str, Level)]) -> BTreeMap<String, Metric> {
        levels
            .iter()
            .map(|(n, l)| {
                (
                    n.to_string(),
                    Metric {
                        value: Some(1.0),
                        unit: "%".into(),
                        level: *l,
                        thresholds: None,
                        detail: String::new(),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn tiers_by_condominium_count() {
        let ok = with(&[("ram", Level::Ok)]);
        let r = advise(&ok, Some(99), Some(VPS_2GB), 1);
        assert_eq!(r.advice, Advice::Stay, "{r:?}");
        let r = advise(&ok, Some(100), Some(VPS_2GB), 1);
        assert_eq!(r.advice, Advice::BiggerVps, "{r:?}");
        assert!(r.summary.contains("4 GB RAM, 2 vCPU"), "{r:?}");
        let r = advise(&ok, Some(499), Some(4 * GIB), 2);
        assert_eq!(r.advice, Advice::Stay, "{r:?}");
        let r = advise(&ok, Some(500), Some(4 * GIB), 2);
        assert_eq!(r.advice, Advice::BiggerVps, "{r:?}");
        assert!(r.summary.contains("8 GB RAM, 4 vCPU"), "{r:?}");
        let r = advise(&ok, Some(500), Some(VPS_2GB), 1);
        assert!(r.summary.contains("8 GB"), "the tier for the count: {r:?}");
        let r = advise(&ok, Some(1999), Some(16 * GIB), 8);
        assert_eq!(r.advice, Advice::Stay, "{r:?}");
        let r = advise(&ok, Some(2000), Some(16 * GIB), 8);
        assert_eq!(r.advice, Advice::SeparateDatabase, "{r:?}");
    }

    #[test]
    fn measured_load_alone() {
        let r = advise(&with(&[("cpu", Level::Warn)]), None, Some(VPS_2GB), 1);
        assert_eq!(r.advice, Advice::Stay, "{r:?}");
        assert!(r.reasons.iter().any(|x| x.contains("no buildings table")));
        assert!(r.reasons.iter().any(|x| x.contains("watch: cpu")));
        let r = advise(&with(&[("ram", Level::Critical)]), None, Some(VPS_2GB), 1);
        assert_eq!(r.advice, Advice::BiggerVps, "{r:?}");
        assert!(r.summary.contains("4 GB"), "{r:?}");
        let r = advise(
            &with(&[("load_per_core", Level::Critical)]),
            None,
            Some(4 * GIB),
            2,
        );
        assert!(r.summary.contains("8 GB"), "{r:?}");
        let r = advise(
            &with(&[("disk", Level::Critical)]),
            Some(10),
            Some(8 * GIB),
            4,
        );
        assert_eq!(r.advice, Advice::SeparateDatabase, "{r:?}");
    }

    #[test]
    fn the_stronger_advice_wins_and_vacuum_is_not_sizing() {
        let m = with(&[("cpu", Level::Critical), ("dead_tuples_ratio", Level::Warn)]);
        let r = advise(&m, Some(2500), Some(VPS_2GB), 1);
        assert_eq!(r.advice, Advice::SeparateDatabase, "{r:?}");
        let r = advise(
            &with(&[("dead_tuples_ratio", Level::Warn)]),
            Some(5),
            Some(VPS_2GB),
            1,
        );
        assert_eq!(r.advice, Advice::Stay, "{r:?}");
        assert!(r.reasons.iter().any(|x| x.contains("VACUUM")), "{r:?}");
    }

    #[test]
    fn machine_tiers_allow_for_reported_ram_and_need_the_cores() {
        assert_eq!(machine_tier(512 << 20, 1), 0);
        assert_eq!(machine_tier(VPS_2GB, 1), 0);
        assert_eq!(machine_tier(3_800 * (1 << 20), 2), 1);
        assert_eq!(machine_tier(7_500 * (1 << 20), 4), 2);
        assert_eq!(machine_tier(64 * GIB, 16), 2);
        // Plenty of RAM but 2 cores: the 2-vCPU tier.
        assert_eq!(machine_tier(24 * GIB, 2), 1);
        let r = advise(
            &with(&[("cpu", Level::Critical)]),
            Some(3),
            Some(24 * GIB),
            2,
        );
        assert_eq!(r.advice, Advice::BiggerVps, "{r:?}");
        assert!(r.summary.contains("8 GB RAM, 4 vCPU"), "{r:?}");
    }
}
