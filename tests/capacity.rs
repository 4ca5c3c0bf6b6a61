//! `koprogo capacity` against the real appliance (PostgreSQL, the demo backend, the
//! proxy): every metric present and plausible in text and JSON, the condominium
//! count from the `buildings` table, the Prometheus levels, threshold crossings
//! logged once by the running supervisor (and the way back to ok), and the growth
//! history surviving a restart while a corrupt history file is reported and kept.

mod common;

use std::time::{Duration, Instant};

use common::Appliance;
use serde_json::Value;

/// The watch checks every second here (the default is 5 minutes).
const FAST: &str = "\n[capacity]\ninterval = \"1s\"\n";

const METRICS: [&str; 11] = [
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

fn psql(a: &Appliance, sql: &str) -> String {
    let (code, out, err) = a.cli(&["psql", "--", "-v", "ON_ERROR_STOP=1", "-tAc", sql]);
    assert_eq!(code, 0, "psql {sql}: {out}{err}");
    out.trim().to_string()
}

fn capacity_json(a: &Appliance) -> (i32, Value) {
    let (code, out, err) = a.cli(&["capacity", "--json"]);
    assert!(
        code == 0 || code == 1,
        "capacity --json exit {code}: {out}{err}"
    );
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    (code, v)
}

fn num(v: &Value, name: &str) -> f64 {
    v["metrics"][name]["value"]
        .as_f64()
        .unwrap_or_else(|| panic!("metric {name} has no value: {:#}", v["metrics"][name]))
}

/// Lines of the supervisor's log containing `needle`.
fn log_lines(a: &Appliance, needle: &str) -> Vec<String> {
    common::all_log_lines(&a.path("logs"), "koprogo")
        .into_iter()
        .filter(|l| l.contains(needle))
        .collect()
}

fn wait_log(a: &Appliance, needle: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(l) = log_lines(a, needle).pop() {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needle:?} within {limit:?}; capacity lines: {:#?}",
            log_lines(a, "capacity")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn capacity_reports_every_metric_in_text_and_json() {
    let mut a = Appliance::new(FAST);
    let (code, _, err) = a.cli(&["capacity"]);
    assert_eq!(code, 3, "not running: {err}");
    assert!(err.contains("koprogo is not running"), "{err}");
    a.start();
    a.wait_ready();
    psql(
        &a,
        "INSERT INTO buildings (name) VALUES ('Résidence A'), ('Résidence B'), ('Résidence C')",
    );
    // Traffic through the proxy for the latency histogram.
    for _ in 0..5 {
        let raw = common::http_raw(
            a.cfg().proxy.http[0].port(),
            "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        );
        assert!(raw.starts_with("HTTP/1.1 308"), "{raw}");
    }

    let (code, out, err) = a.cli(&["capacity"]);
    assert!(code == 0 || code == 1, "capacity exit {code}: {out}{err}");
    for name in METRICS {
        assert!(out.contains(name), "{name} missing from:\n{out}");
    }
    assert!(out.contains("recommendation: "), "{out}");
    assert!(
        out.contains("condominiums: 3 rows in table buildings"),
        "{out}"
    );
    assert!(out.contains("not enough history yet"), "{out}");
    let overall = if code == 0 {
        "overall: ok"
    } else {
        "overall: "
    };
    assert!(out.contains(overall), "{out}");

    let (code, v) = capacity_json(&a);
    for name in METRICS {
        let m = &v["metrics"][name];
        assert!(m.is_object(), "{name} missing: {v:#}");
        let level = m["level"].as_str().unwrap_or("");
        assert!(["ok", "warn", "critical"].contains(&level), "{name}: {m}");
        assert!(m["unit"].is_string(), "{name}: {m}");
        assert!(m.get("thresholds").is_some(), "{name}: {m}");
        assert!(m["detail"].is_string(), "{name}: {m}");
    }
    for name in ["ram", "cpu", "disk", "cache_hit_ratio", "dead_tuples_ratio"] {
        let x = num(&v, name);
        assert!((0.0..=100.0).contains(&x), "{name} = {x}");
        assert_eq!(v["metrics"][name]["unit"], "%");
    }
    assert!(num(&v, "ram") > 0.0 && num(&v, "disk") > 0.0);
    assert!(num(&v, "load_per_core") >= 0.0);
    // The demo backend holds its pool (DB_POOL_MIN_CONNECTIONS, at least one) as the
    // API's role; a pool of 4 warns at 2.8.
    assert!(num(&v, "postgres_connections") >= 1.0, "{v:#}");
    let t = &v["metrics"]["postgres_connections"]["thresholds"];
    assert_eq!(t["warn"].as_f64(), Some(2.8), "{t}");
    assert_eq!(t["critical"].as_f64(), Some(3.6), "{t}");
    assert_eq!(t["worse"], "above");
    assert!(num(&v, "postgres_connections_total") >= 2.0, "{v:#}");
    assert_eq!(
        v["metrics"]["cache_hit_ratio"]["thresholds"]["worse"], "below",
        "{v:#}"
    );
    let p99 = num(&v, "p99_latency");
    assert!(p99 > 0.0 && p99 <= 10.0, "p99 {p99}");
    assert!(num(&v, "database_size") > 1e6);
    assert!(v["metrics"]["database_growth"]["value"].is_null(), "{v:#}");
    assert!(v["growth"]["note"]
        .as_str()
        .is_some_and(|n| n.starts_with("not enough history yet")));
    assert_eq!(v["condominiums"].as_i64(), Some(3), "{v:#}");
    assert!(v["host"]["cores"].as_u64().is_some_and(|c| c >= 1));
    let advice = v["recommendation"]["advice"].as_str().unwrap_or("");
    assert!(
        ["stay", "bigger_vps", "separate_database"].contains(&advice),
        "{v:#}"
    );
    let worst = METRICS
        .iter()
        .map(|n| v["metrics"][n]["level"].as_str().unwrap_or(""))
        .max_by_key(|l| ["ok", "warn", "critical"].iter().position(|x| x == l))
        .unwrap_or("");
    assert_eq!(v["level"].as_str(), Some(worst), "{v:#}");
    assert_eq!(
        code,
        i32::from(worst != "ok"),
        "exit code follows the level"
    );

    // The watch's levels in Prometheus once it has checked.
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let raw = common::http_raw(
            a.metrics_port,
            "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        );
        if raw.contains("koprogo_capacity_level{metric=\"ram\"}") {
            break raw
                .split_once("\r\n\r\n")
                .map(|x| x.1.to_string())
                .unwrap_or_default();
        }
        assert!(
            Instant::now() < deadline,
            "no capacity levels in /metrics: {raw}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("valid Prometheus text");
    for name in METRICS {
        let s = parsed
            .samples
            .iter()
            .find(|s| s.metric == "koprogo_capacity_level" && s.labels.get("metric") == Some(name))
            .unwrap_or_else(|| panic!("no koprogo_capacity_level for {name}"));
        match s.value {
            prometheus_parse::Value::Gauge(x) => assert!([0.0, 1.0, 2.0].contains(&x)),
            ref other => panic!("{other:?}"),
        }
    }
    assert!(parsed
        .samples
        .iter()
        .any(|s| s.metric == "koprogo_capacity_advice"));

    // PostgreSQL stopped: its metrics are unknown warnings that say why.
    let (code, out, err) = a.cli(&["stop", "postgres"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, v) = capacity_json(&a);
    assert_eq!(code, 1, "{v:#}");
    for name in ["postgres_connections", "cache_hit_ratio", "database_size"] {
        let m = &v["metrics"][name];
        assert!(m["value"].is_null() && m["level"] == "warn", "{name}: {m}");
        assert!(
            m["detail"]
                .as_str()
                .is_some_and(|d| d.contains("PostgreSQL did not answer")),
            "{m}"
        );
    }
    assert!(v["condominiums"].is_null(), "{v:#}");
    a.stop();
    let (code, out, err) = a.cli(&["capacity", "--json"]);
    assert_eq!(code, 3, "{out}{err}");
    assert_eq!(out.trim(), "{\"running\":false}");
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn capacity_threshold_crossings_are_logged_once_and_back_to_ok() {
    let mut a = Appliance::new(FAST);
    a.start();
    a.wait_ready();
    // 60 % dead tuples in a table autovacuum leaves alone: over the 20 % warning.
    psql(
        &a,
        "CREATE TABLE churn (id int) WITH (autovacuum_enabled = false);
         INSERT INTO churn SELECT generate_series(1, 10000);
         DELETE FROM churn WHERE id <= 6000;",
    );
    let line = wait_log(
        &a,
        "capacity: dead_tuples_ratio warn",
        Duration::from_secs(30),
    );
    assert!(
        line.contains("warn at 20") && line.contains("dead of"),
        "{line}"
    );
    // Several more checks while it stays over: still one line.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        log_lines(&a, "capacity: dead_tuples_ratio warn").len(),
        1,
        "{:#?}",
        log_lines(&a, "capacity")
    );
    let (code, v) = capacity_json(&a);
    assert_eq!(code, 1, "a warning: exit 1");
    assert_eq!(v["metrics"]["dead_tuples_ratio"]["level"], "warn");
    assert!(num(&v, "dead_tuples_ratio") >= 50.0, "{v:#}");
    assert!(v["recommendation"]["reasons"].as_array().is_some_and(|r| r
        .iter()
        .any(|x| x.as_str().unwrap_or("").contains("VACUUM"))));

    psql(&a, "VACUUM churn");
    wait_log(
        &a,
        "capacity: dead_tuples_ratio back to ok",
        Duration::from_secs(30),
    );
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn capacity_history_survives_a_restart_and_a_corrupt_file_is_kept() {
    let mut a = Appliance::new(FAST);
    a.start();
    a.wait_ready();
    let file = a.path("state/capacity-history.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !file.exists() {
        assert!(
            Instant::now() < deadline,
            "no {} after 30 s",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    a.stop();

    // Ten days ago the database was 1 MiB smaller (a sample the appliance would
    // have taken then).
    let text = std::fs::read_to_string(&file).expect("history");
    let mut h: Value = serde_json::from_str(&text).expect("history is JSON");
    let samples = h["samples"].as_array_mut().expect("samples");
    assert_eq!(samples.len(), 1, "one sample a day: {text}");
    let today = samples[0].clone();
    let t = today["time"].as_i64().expect("time");
    let bytes = today["database_bytes"].as_i64().expect("bytes");
    samples.insert(
        0,
        serde_json::json!({"time": t - 10 * 86400, "database_bytes": bytes - (1 << 20)}),
    );
    std::fs::write(&file, serde_json::to_vec_pretty(&h).expect("json")).expect("write");

    a.start();
    a.wait_ready();
    std::thread::sleep(Duration::from_secs(3)); // a few checks
    let (_, v) = capacity_json(&a);
    let g = &v["growth"];
    assert_eq!(g["samples"].as_u64(), Some(2), "{g:#}");
    let per_day = g["bytes_per_day"].as_f64().expect("growth per day");
    assert!(per_day > 50_000.0 && per_day < 1e7, "{g:#}");
    let per_month = g["bytes_per_month"].as_f64().expect("per month");
    assert!((per_month - 30.0 * per_day).abs() < 1.0, "{g:#}");
    assert!(
        g["days_until_disk_full"].as_f64().is_some_and(|d| d > 0.0),
        "{g:#}"
    );
    assert_eq!(v["metrics"]["database_growth"]["level"], "ok");
    let (_, out, _) = a.cli(&["capacity"]);
    assert!(
        out.contains("/day") && out.contains("disk full in"),
        "{out}"
    );
    let kept: Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("json");
    assert_eq!(kept["samples"].as_array().map(Vec::len), Some(2), "{kept}");

    // A damaged file: reported with its path and the fix, never replaced.
    let garbage = "{\"format\": 1, \"samples\": [ {\"time\": 17";
    std::fs::write(&file, garbage).expect("corrupt");
    let (code, v) = capacity_json(&a);
    assert_eq!(code, 1, "{v:#}");
    let m = &v["metrics"]["database_growth"];
    assert_eq!(m["level"], "warn", "{m}");
    let note = v["growth"]["note"].as_str().unwrap_or("");
    assert!(
        note.contains(&file.display().to_string()) && note.contains("move it away"),
        "{note}"
    );
    let (code, out, err) = a.cli(&["check"]);
    assert_eq!(code, 0, "a warning, not a problem: {out}{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("warning: ") && l.contains("capacity-history.json")),
        "{out}"
    );
    let line = wait_log(
        &a,
        "capacity: database_growth warn",
        Duration::from_secs(30),
    );
    assert!(line.contains("capacity-history.json"), "{line}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(std::fs::read_to_string(&file).expect("read"), garbage);
    a.stop();
    assert_eq!(
        std::fs::read_to_string(&file).expect("read"),
        garbage,
        "kept after the stop"
    );
    a.assert_no_leftovers(Duration::from_secs(5));
}

/// A memory cgroup of the test's own (v1 memory hierarchy, or v2 where the memory
/// controller is delegated), removed on drop; `None` where none can be made.
struct MemoryCgroup(std::path::PathBuf);

impl MemoryCgroup {
    fn create(limit: u64) -> Option<MemoryCgroup> {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let name = format!("koprogo-test-{}", std::process::id());
        for line in own.lines() {
            let mut f = line.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            let (base, file) = if controllers.split(',').any(|c| c == "memory") {
                ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")
            } else if controllers.is_empty() {
                ("/sys/fs/cgroup", "memory.max")
            } else {
                continue;
            };
            let dir = std::path::Path::new(base)
                .join(path.trim_start_matches('/'))
                .join(&name);
            if std::fs::create_dir(&dir).is_err() {
                continue;
            }
            let cg = MemoryCgroup(dir);
            if std::fs::write(cg.0.join(file), limit.to_string()).is_ok() {
                return Some(cg);
            }
        }
        None
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// PostgreSQL is tuned for the memory limit of the appliance's cgroup (a systemd
/// `MemoryMax=`, a container's limit), not for the machine's RAM: `koprogo run`
/// started in a cgroup limited to 512 MiB gives PostgreSQL an eighth of that as
/// shared_buffers. (It read the root cgroup's file, so the limit was missed.)
#[test]
fn postgres_is_tuned_for_the_memory_limit_of_our_cgroup() {
    use std::os::unix::io::AsRawFd;
    use std::os::unix::process::CommandExt;
    let Some(cg) = MemoryCgroup::create(512 << 20) else {
        eprintln!("skipped: no memory cgroup can be made here");
        return;
    };
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cg.0.join("cgroup.procs"))
        .expect("cgroup.procs");
    let fd = procs.as_raw_fd();
    let mut a = Appliance::new("");
    // The harness sets a budget of 128MB: back to the default, detected.
    let text = std::fs::read_to_string(&a.config).expect("config");
    assert!(text.contains("memory = \"128MB\""), "{text}");
    std::fs::write(
        &a.config,
        text.replace("memory = \"128MB\"", "memory = \"auto\""),
    )
    .expect("write config");
    let mut cmd = a.cmd();
    // SAFETY: only write(2) between fork and exec, on a descriptor open in the parent.
    unsafe {
        cmd.pre_exec(move || {
            // "0": the writing process itself moves into the cgroup.
            if libc::write(fd, b"0".as_ptr().cast(), 1) == 1 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    a.start_with(cmd);
    a.wait_ready();
    let conf = std::fs::read_to_string(a.path("state/pgdata/koprogo.conf")).expect("koprogo.conf");
    assert!(conf.contains("shared_buffers = 64MB\n"), "{conf}");
    assert!(conf.contains("effective_cache_size = 192MB\n"), "{conf}");
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(10));
    drop(procs);
    drop(cg);
}
