//! The text form of the report (`koprogo capacity` without `--json`).

use std::fmt::Write as _;

use super::monitor::{signed_size, thresholds_text, value_text};
use super::{Report, METRICS};

pub fn text(r: &Report) -> String {
    let mut o = String::new();
    let ram = r
        .host
        .ram_bytes
        .map_or("unknown RAM".into(), crate::backup::human_size);
    let _ = writeln!(
        o,
        "capacity at {} ({} core(s), {ram} RAM)\n",
        r.time, r.host.cores
    );
    let _ = writeln!(
        o,
        "{:<27} {:>18}  {:<8}  {:<36}  DETAIL",
        "METRIC", "VALUE", "LEVEL", "THRESHOLDS"
    );
    for name in METRICS {
        let Some(m) = r.metric(name) else {
            let _ = writeln!(o, "{name:<27} {:>18}  {:<8}", "missing", "warn");
            continue;
        };
        let t = m.thresholds.map_or("-".into(), |t| thresholds_text(&t));
        let _ = writeln!(
            o,
            "{name:<27} {:>18}  {:<8}  {t:<36}  {}",
            value_text(m),
            m.level.as_str(),
            m.detail
        );
    }
    let g = &r.growth;
    let _ = writeln!(o);
    match (g.bytes_per_day, g.bytes_per_month) {
        (Some(d), Some(mo)) => {
            let full = g.days_until_disk_full.map_or(String::new(), |n| {
                format!(", disk full in {n:.0} days at this rate")
            });
            let _ = writeln!(
                o,
                "database growth: {}/day, {}/month ({}{full})",
                signed_size(d),
                signed_size(mo),
                g.note
            );
        }
        _ => {
            let _ = writeln!(o, "database growth: {}", g.note);
        }
    }
    let _ = writeln!(
        o,
        "history: {} sample(s){} in {}",
        g.samples,
        g.since
            .as_deref()
            .map_or(String::new(), |s| format!(" since {s}")),
        g.history_file
    );
    let _ = writeln!(o, "condominiums: {}", r.condominiums_source);
    let _ = writeln!(o, "\nrecommendation: {}", r.recommendation.summary);
    for why in &r.recommendation.reasons {
        let _ = writeln!(o, "  - {why}");
    }
    let _ = writeln!(
        o,
        "\noverall: {} (exit code {}: 0 = every metric ok, 1 = a warning or critical level)",
        r.level.as_str(),
        r.exit_code()
    );
    o
}
