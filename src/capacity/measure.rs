//! Measuring every metric of the report, inside the supervisor: /proc for RAM, CPU
//! and load, statvfs for the disk, the mon SQL queries for PostgreSQL, the
//! proxy's histogram for p99, the history file for growth.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::history::History;
use super::levels::{self, MIN_BLOCK_ACCESSES, MIN_TUPLES};
use super::monitor::Monitor;
use super::{recommend, Host, Level, Metric, Report};
use crate::backup::human_size;

/// CPU use is measured over at least this long.
const MIN_CPU_WINDOW: Duration = Duration::from_secs(1);

/// Measures everything now. `scheduled`: this is the watch's periodic check, which
/// moves the CPU window forward and records the day's database size sample.
pub async fn measure(mon: &Monitor, scheduled: bool) -> Report {
    let now = chrono::Utc::now();
    let cores = crate::postgres::tuning::cores();
    let mut m: BTreeMap<String, Metric> = BTreeMap::new();
    let mem = crate::procfs::meminfo();
    m.insert("ram".into(), ram(mem));
    m.insert("cpu".into(), cpu(mon, scheduled).await);
    m.insert("load_per_core".into(), load(cores));
    let state = &mon.view.cfg.paths.state;
    let disk = crate::fsutil::disk_usage(state);
    m.insert(
        "disk".into(),
        match &disk {
            Ok(d) => Metric::judged(
                d.used_ratio() * 100.0,
                "%",
                levels::DISK,
                format!(
                    "{} of {} used, {} available, on the filesystem of {}",
                    human_size(d.used),
                    human_size(d.size),
                    human_size(d.available),
                    state.display()
                ),
            ),
            Err(e) => Metric::unavailable(
                "%",
                Some(levels::DISK),
                format!("statvfs {}: {e}", state.display()),
            ),
        },
    );
    let (size, condominiums, condominiums_source) = postgres(mon, &mut m).await;
    m.insert("p99_latency".into(), p99(mon, scheduled));

    let mut history = History::load(state);
    if scheduled && history.problem.is_none() {
        if let Some(bytes) = size {
            if let Err(e) = history.record(now.timestamp(), bytes) {
                history.problem = Some(e);
            }
        }
    }
    let growth = history.growth(
        now.timestamp(),
        size,
        disk.as_ref().ok().map(|d| d.available),
    );
    let mut detail = growth.note.clone();
    if let Some(days) = growth.days_until_disk_full {
        detail = format!("{detail}; the disk is full in {days:.0} days at this rate");
    }
    m.insert(
        "database_growth".into(),
        Metric {
            value: growth.bytes_per_day,
            unit: "bytes/day".into(),
            level: if growth.problem {
                Level::Warn
            } else {
                Level::Ok
            },
            thresholds: None,
            detail,
        },
    );

    let level = m.values().map(|x| x.level).max().unwrap_or(Level::Ok);
    let ram_bytes = mem.map(|(total, _)| total);
    let recommendation = recommend::advise(&m, condominiums, ram_bytes, cores);
    Report {
        time: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        level,
        metrics: m,
        growth,
        condominiums,
        condominiums_source,
        host: Host { ram_bytes, cores },
        recommendation,
    }
}

fn ram(mem: Option<(u64, u64)>) -> Metric {
    match mem {
        Some((total, avail)) if total > 0 => {
            let used = total.saturating_sub(avail);
            Metric::judged(
                used as f64 * 100.0 / total as f64,
                "%",
                levels::RAM,
                format!(
                    "{} of {} used (MemTotal - MemAvailable of the host)",
                    human_size(used),
                    human_size(total)
                ),
            )
        }
        _ => Metric::unavailable(
            "%",
            Some(levels::RAM),
            "/proc/meminfo has no MemTotal/MemAvailable".into(),
        ),
    }
}

/// CPU busy share since the watch's previous check (at least a second: measured
/// now over a second when there is none).
async fn cpu(mon: &Monitor, scheduled: bool) -> Metric {
    let unavailable =
        || Metric::unavailable("%", Some(levels::CPU), "/proc/stat has no cpu line".into());
    let base = mon.cpu_base();
    let (earlier, started) = match base {
        Some((at, times)) if at.elapsed() >= MIN_CPU_WINDOW => (times, at),
        _ => {
            let Some(t) = crate::procfs::cpu_times() else {
                return unavailable();
            };
            let at = Instant::now();
            tokio::time::sleep(MIN_CPU_WINDOW).await;
            (t, at)
        }
    };
    let Some(later) = crate::procfs::cpu_times() else {
        return unavailable();
    };
    let window = started.elapsed();
    if scheduled {
        mon.set_cpu_base(Instant::now(), later);
    }
    match later.busy_since(&earlier) {
        Some(busy) => Metric::judged(
            busy * 100.0,
            "%",
            levels::CPU,
            format!("all cores busy over the last {:.0} s", window.as_secs_f64()),
        ),
        None => unavailable(),
    }
}

fn load(cores: u64) -> Metric {
    match crate::procfs::loadavg() {
        Some([_, five, _]) => Metric::judged(
            five / cores.max(1) as f64,
            "per core",
            levels::LOAD_PER_CORE,
            format!("5-minute load average {five:.2} on {cores} core(s)"),
        ),
        None => Metric::unavailable(
            "per core",
            Some(levels::LOAD_PER_CORE),
            "/proc/loadavg unreadable".into(),
        ),
    }
}

/// The PostgreSQL metrics; returns (database size, condominiums, their source).
async fn postgres(
    mon: &Monitor,
    m: &mut BTreeMap<String, Metric>,
) -> (Option<i64>, Option<i64>, String) {
    // Every API instance has its own pool of backend.pool_max connections.
    let instances = u32::from(mon.view.cfg.backend.instances.max(1));
    let pool = mon.view.cfg.backend.pool_max * instances;
    let pool_source = if instances > 1 {
        format!("backend.pool_max × {instances} instances")
    } else {
        "backend.pool_max".to_string()
    };
    let (st, condos) = match crate::postgres::stats::collect(&mon.view.db, true).await {
        Ok(x) => x,
        Err(e) => {
            let why = format!("PostgreSQL did not answer: {e:#}");
            for (name, unit, t) in [
                (
                    "postgres_connections",
                    "connections",
                    Some(levels::connections(pool)),
                ),
                ("postgres_connections_total", "connections", None),
                ("cache_hit_ratio", "%", Some(levels::CACHE_HIT)),
                ("dead_tuples_ratio", "%", Some(levels::DEAD_TUPLES)),
                ("database_size", "bytes", None),
            ] {
                m.insert(name.into(), Metric::unavailable(unit, t, why.clone()));
            }
            return (None, None, format!("unknown: {why}"));
        }
    };
    m.insert(
        "postgres_connections".into(),
        Metric::judged(
            st.app_connections as f64,
            "connections",
            levels::connections(pool),
            format!(
                "{} open by the API's role {} of its pool of {pool} ({pool_source})",
                st.app_connections,
                mon.view.db.app_role()
            ),
        ),
    );
    m.insert(
        "postgres_connections_total".into(),
        Metric::judged(
            st.connections as f64,
            "connections",
            levels::connections(st.max_connections),
            format!(
                "{} client connections of max_connections = {} (the API, koprogo itself, psql, backups)",
                st.connections, st.max_connections
            ),
        ),
    );
    let accesses = st.blks_hit + st.blks_read;
    let hit = st.cache_hit_ratio().map(|r| r * 100.0);
    m.insert(
        "cache_hit_ratio".into(),
        match hit {
            Some(v) if accesses >= MIN_BLOCK_ACCESSES => Metric::judged(
                v,
                "%",
                levels::CACHE_HIT,
                format!("{accesses:.0} block accesses since the statistics reset"),
            ),
            _ => Metric::unjudged(
                hit,
                "%",
                levels::CACHE_HIT,
                format!("only {accesses:.0} block accesses so far: too few to judge"),
            ),
        },
    );
    let tuples = st.dead_tuples + st.live_tuples;
    let dead = st.dead_tuple_ratio().map(|r| r * 100.0);
    let what = format!(
        "{:.0} dead of {tuples:.0} tuples in the user tables",
        st.dead_tuples
    );
    m.insert(
        "dead_tuples_ratio".into(),
        match dead {
            Some(v) if tuples >= MIN_TUPLES => Metric::judged(v, "%", levels::DEAD_TUPLES, what),
            _ => Metric::unjudged(
                dead,
                "%",
                levels::DEAD_TUPLES,
                format!("{what}: too few to judge"),
            ),
        },
    );
    m.insert(
        "database_size".into(),
        Metric::info(
            Some(st.size_bytes as f64),
            "bytes",
            format!(
                "{} (database {})",
                human_size(st.size_bytes.max(0) as u64),
                mon.view.db.app_db()
            ),
        ),
    );
    let source = match condos {
        Some(n) => format!("{n} rows in table buildings"),
        None => {
            "no buildings table in the database: the advice rests on the measured load only".into()
        }
    };
    (Some(st.size_bytes), condos, source)
}

/// p99 of the requests since the watch's previous check; since koprogo started
/// when there were none in that window (or no check yet).
fn p99(mon: &Monitor, scheduled: bool) -> Metric {
    use crate::proxy::stats::p99 as percentile;
    let now = mon.view.proxy.latency_counts();
    let base = mon.latency_base();
    if scheduled {
        mon.set_latency_base(Instant::now(), now);
    }
    let recent = base.and_then(|(at, before)| {
        let delta: [u64; 13] = std::array::from_fn(|i| now[i].saturating_sub(before[i]));
        let n: u64 = delta.iter().sum();
        (n > 0).then(|| (percentile(&delta), n, at.elapsed()))
    });
    let (p, n, window) = match recent {
        Some((p, n, age)) => (
            p,
            n,
            format!(
                "the last {:.0} s (since the watch's previous check)",
                age.as_secs_f64()
            ),
        ),
        None => (
            percentile(&now),
            now.iter().sum(),
            "koprogo's start".to_string(),
        ),
    };
    match p {
        None => Metric::info(None, "s", "no request through the proxy yet".into()),
        Some(p) if p.is_finite() => Metric::info(
            Some(p),
            "s",
            format!(
                "at most {} (bucket bound of the proxy's latency histogram), {n} requests over {window}",
                seconds(p)
            ),
        ),
        Some(_) => Metric::info(
            None,
            "s",
            format!("more than 10 s (past the histogram's last bucket), {n} requests over {window}"),
        ),
    }
}

fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1} ms", s * 1000.0)
    } else {
        format!("{s:.1} s")
    }
}
