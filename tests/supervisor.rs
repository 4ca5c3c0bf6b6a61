//! Supervisor core, end to end: real `koprogo run`, real PostgreSQL 15, the demo
//! backend, real signals. Each test owns a private appliance (temp dir, free ports)
//! and checks that nothing it started is left running.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::Appliance;
use nix::sys::signal::Signal;

fn secrets(a: &Appliance) -> String {
    std::fs::read_to_string(a.path("state/secrets.env")).expect("secrets.env")
}

fn write_item(a: &Appliance, body: &str) -> i64 {
    let (code, resp) = a.http("POST", "/api/v1/items", body).expect("POST item");
    assert_eq!(code, 201, "POST /api/v1/items: {resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).expect("json");
    v["id"].as_i64().expect("id")
}

fn read_item(a: &Appliance, id: i64) -> String {
    let (code, resp) = a
        .http("GET", &format!("/api/v1/items/{id}"), "")
        .expect("GET item");
    assert_eq!(code, 200, "GET item {id}: {resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).expect("json");
    v["body"].as_str().expect("body").to_string()
}

#[test]
fn first_boot_then_warm_boot_reuses_cluster_and_secrets() {
    let mut a = Appliance::new("");
    a.start();
    let st = a.wait_ready();
    assert_eq!(st.services.len(), 2);
    let s1 = secrets(&a);
    let mode = std::fs::metadata(a.path("state/secrets.env"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "secrets.env mode");
    for key in [
        "JWT_SECRET=",
        "TOTP_ENCRYPTION_KEY=",
        "ENERGY_ENCRYPTION_MASTER_KEY=",
    ] {
        assert!(s1.contains(key), "{key} missing from secrets.env");
    }
    let pgdata_mode = std::fs::metadata(a.path("state/pgdata"))
        .expect("pgdata")
        .permissions()
        .mode();
    assert_eq!(pgdata_mode & 0o777, 0o700, "pgdata mode");
    let sock = std::fs::metadata(a.path("run/control.sock")).expect("control socket");
    assert_eq!(
        sock.permissions().mode() & 0o777,
        0o600,
        "control socket mode"
    );
    let id = write_item(&a, "first boot row");
    a.stop();
    assert_eq!(a.cluster_state(), "shut down");
    a.assert_no_leftovers(Duration::from_secs(5));

    a.start();
    a.wait_ready();
    assert_eq!(secrets(&a), s1, "secrets must be kept across boots");
    assert_eq!(read_item(&a, id), "first boot row");
    let log = a.stderr();
    assert_eq!(
        log.matches("creating the PostgreSQL").count(),
        1,
        "initdb ran twice:\n{log}"
    );
    // The supervisor's own log file has the boot, with timestamps.
    let own = std::fs::read_to_string(a.path("logs/koprogo.log")).expect("koprogo.log");
    assert_eq!(own.matches("all ready in").count(), 2, "{own}");
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn sigterm_stops_in_reverse_order_and_cleanly() {
    let mut a = Appliance::new("");
    a.start();
    a.wait_ready();
    a.stop();
    let log = a.stderr();
    let api_term = log
        .find("sending SIGTERM service=\"api\"")
        .expect("api got SIGTERM");
    let api_stopped = log.find("stopped service=\"api\"").expect("api stopped");
    let pg_int = log
        .find("sending SIGINT service=\"postgres\"")
        .expect("postgres got SIGINT");
    assert!(
        api_term < api_stopped && api_stopped < pg_int,
        "stop order wrong:\n{log}"
    );
    assert_eq!(
        a.cluster_state(),
        "shut down",
        "Postgres not shut down cleanly"
    );
    assert!(
        !a.path("run/control.sock").exists(),
        "control socket left behind"
    );
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn row_survives_sigkill_of_supervisor_and_of_whole_tree() {
    let mut a = Appliance::new("");
    a.start();
    let st = a.wait_ready();
    let id = write_item(&a, "survives kill -9");
    let pg = Appliance::service(&st, "postgres").pid.expect("pg pid");
    let api = Appliance::service(&st, "api").pid.expect("api pid");

    // SIGKILL of the supervisor alone: PDEATHSIG takes the children down.
    let code = a.signal_and_wait(Signal::SIGKILL, Duration::from_secs(10));
    assert_eq!(code, 128 + 9);
    a.assert_no_leftovers(Duration::from_secs(10));
    assert!(common::processes()
        .iter()
        .all(|(p, _, _)| *p != pg && *p != api));

    a.start();
    let st = a.wait_ready();
    assert_eq!(read_item(&a, id), "survives kill -9");
    let id2 = write_item(&a, "second row");

    // SIGKILL of every process of the tree at the same moment (power-loss-like).
    let mut victims = vec![a.pid()];
    for s in &st.services {
        victims.extend(s.pid);
    }
    for p in &victims {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), Signal::SIGKILL);
    }
    a.wait_exit(Duration::from_secs(10));
    a.assert_no_leftovers(Duration::from_secs(10));
    assert!(
        a.path("state/pgdata/postmaster.pid").exists(),
        "a crash leaves postmaster.pid"
    );

    a.start();
    a.wait_ready();
    assert_eq!(read_item(&a, id), "survives kill -9");
    assert_eq!(read_item(&a, id2), "second row");
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn stale_postmaster_pid_of_another_live_process_is_handled() {
    let mut a = Appliance::new("");
    a.start();
    a.wait_ready();
    let saved =
        std::fs::read_to_string(a.path("state/pgdata/postmaster.pid")).expect("postmaster.pid");
    a.signal_and_wait(Signal::SIGKILL, Duration::from_secs(10));
    a.assert_no_leftovers(Duration::from_secs(10));
    // After a reboot the old pid may belong to anything: here, a live sleep.
    let mut other = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("sleep");
    let pidfile = a.path("state/pgdata/postmaster.pid");
    let rest: Vec<String> = saved.lines().skip(1).map(String::from).collect();
    std::fs::write(&pidfile, format!("{}\n{}\n", other.id(), rest.join("\n"))).expect("rewrite");
    a.start();
    a.wait_ready();
    a.stop();
    let _ = other.kill();
    let _ = other.wait();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn killed_api_is_restarted_and_counted() {
    let mut a = Appliance::new("");
    a.start();
    let st = a.wait_ready();
    let api = Appliance::service(&st, "api").pid.expect("api pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(api), Signal::SIGKILL).expect("kill api");
    let st = a.wait_for(Duration::from_secs(30), "api restarted", |s| {
        let x = Appliance::service(s, "api");
        x.ready && x.pid != Some(api) && x.restarts >= 1
    });
    assert!(Appliance::service(&st, "api")
        .last_exit
        .unwrap_or_default()
        .contains("SIGKILL"));
    let (code, _) = a.http("GET", "/api/v1/items", "").expect("api answers");
    assert_eq!(code, 200);
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn killed_postmaster_recovers_then_api_restarts() {
    let mut a = Appliance::new("");
    a.start();
    let st = a.wait_ready();
    let id = write_item(&a, "before postmaster crash");
    let pg = Appliance::service(&st, "postgres").pid.expect("pg pid");
    let api = Appliance::service(&st, "api").pid.expect("api pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pg), Signal::SIGKILL)
        .expect("kill postmaster");
    let st = a.wait_for(Duration::from_secs(60), "postgres and api back", |s| {
        let p = Appliance::service(s, "postgres");
        let x = Appliance::service(s, "api");
        s.all_ready && p.pid != Some(pg) && x.pid != Some(api)
    });
    assert!(Appliance::service(&st, "postgres").restarts >= 1);
    assert!(Appliance::service(&st, "api").restarts >= 1);
    let log = a.stderr();
    // The API was restarted only after Postgres was ready again.
    let crash = log
        .find("exited unexpectedly: killed by SIGKILL service=\"postgres\"")
        .expect("crash logged");
    let tail = &log[crash..];
    let pg_back = tail
        .find("service=\"postgres\"")
        .and_then(|_| tail.find("ready after"))
        .expect("pg ready again");
    let api_start = tail
        .find("started service=\"api\"")
        .expect("api started again");
    assert!(
        pg_back < api_start,
        "api started before postgres was ready:\n{tail}"
    );
    assert_eq!(read_item(&a, id), "before postmaster crash");
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn crash_loop_backs_off_and_never_gives_up() {
    let mut a = Appliance::new("[backend.env]\nDEMO_EXIT_AT_START = \"3\"\n");
    a.start();
    // 1 + 2 + 4 s of back-off: the fourth failure comes after about 7 s.
    let st = a.wait_for(Duration::from_secs(30), "four failures", |s| {
        Appliance::service(s, "api").failures >= 4
    });
    let api = Appliance::service(&st, "api");
    assert!(!api.ready);
    assert!(api.last_exit.as_deref() == Some("exit code 3"), "{api:?}");
    let (code, out, _) = a.cli(&["status"]);
    assert_eq!(code, 1, "status must fail while not all ready:\n{out}");
    assert!(out.contains("api"), "{out}");
    let log = a.stderr();
    for d in ["restarting in 1s", "restarting in 2s", "restarting in 4s"] {
        assert!(log.contains(d), "missing back-off step {d:?}:\n{log}");
    }
    // Still trying: it fails again later rather than stopping.
    let before = api.failures;
    a.wait_for(Duration::from_secs(30), "a later attempt", |s| {
        Appliance::service(s, "api").failures > before
    });
    assert!(Appliance::service(&a.status().expect("status"), "postgres").ready);
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn second_signal_stops_now() {
    let mut a = Appliance::new("");
    a.start();
    a.wait_ready();
    let pid = nix::unistd::Pid::from_raw(a.pid());
    nix::sys::signal::kill(pid, Signal::SIGTERM).expect("first");
    std::thread::sleep(Duration::from_millis(20));
    nix::sys::signal::kill(pid, Signal::SIGTERM).expect("second");
    let t = Instant::now();
    let code = a.wait_exit(Duration::from_secs(30));
    assert!(t.elapsed() < Duration::from_secs(15));
    assert_eq!(code, 1, "a hurried stop exits 1");
    assert!(a.stderr().contains("second signal: stopping now"));
    a.assert_no_leftovers(Duration::from_secs(5));
    // And the next boot is clean.
    a.start();
    a.wait_ready();
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn control_commands_stop_start_restart_logs_psql() {
    let mut a = Appliance::new("");
    a.start();
    a.wait_ready();
    let (code, out, err) = a.cli(&["stop", "api"]);
    assert_eq!(code, 0, "{out}{err}");
    let st = a.wait_for(Duration::from_secs(10), "api stopped", |s| {
        Appliance::service(s, "api").state == koprogo::process::state::Phase::Stopped
    });
    assert!(Appliance::service(&st, "api").pid.is_none());
    assert!(
        a.http("GET", "/api/v1/health", "").is_err(),
        "api must be down"
    );
    let (code, _, _) = a.cli(&["start", "api"]);
    assert_eq!(code, 0);
    a.wait_ready();
    let (code, _, err) = a.cli(&["restart", "nosuch"]);
    assert_eq!(code, 1);
    assert!(err.contains("no service \"nosuch\""), "{err}");

    let pg = Appliance::service(&a.status().expect("status"), "postgres").pid;
    let (code, _, _) = a.cli(&["restart", "postgres"]);
    assert_eq!(code, 0);
    a.wait_for(Duration::from_secs(60), "restarted postgres and api", |s| {
        s.all_ready && Appliance::service(s, "postgres").pid != pg
    });

    let (code, out, _) = a.cli(&["status", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("status json");
    for s in v["services"].as_array().expect("services") {
        for k in [
            "name",
            "state",
            "pid",
            "ready",
            "restarts",
            "uptime_secs",
            "memory_bytes",
        ] {
            assert!(s.get(k).is_some(), "status --json lacks {k}: {s}");
        }
    }
    let (code, out, _) = a.cli(&["logs", "api", "-n", "3"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 3, "{out}");
    let (code, out, _) = a.cli(&["logs", "-n", "20"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("koprogo ") && out.contains("postgres "),
        "{out}"
    );
    if common::is_root() {
        let (code, out, err) = a.cli(&[
            "psql",
            "-At",
            "-c",
            "select count(*) from pg_extension where extname in ('pgcrypto','uuid-ossp')",
        ]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(out.trim(), "2");
    }
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

/// A frozen API server (SIGSTOP: how a deadlock looks from outside) fails its
/// health checks and is then killed at once (it could not act on SIGTERM), not
/// after its 35 s stop_timeout: replaced within the default health budget (13 s)
/// plus its restart, where it took 64 s before. The old process is gone.
#[test]
fn frozen_api_fails_health_and_is_killed_at_once() {
    let mut a = Appliance::new("");
    a.start();
    let st = a.wait_ready();
    let api = Appliance::service(&st, "api").pid.expect("api pid");
    let t = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(api), Signal::SIGSTOP).expect("SIGSTOP api");
    // A request arriving while the API is failing is held (bounded by
    // proxy.backend_wait, 15 s) and answered: by the replacement, or 503 with
    // Retry-After; never left hanging.
    a.wait_for(Duration::from_secs(30), "api unhealthy", |s| {
        Appliance::service(s, "api").state == koprogo::process::state::Phase::Unhealthy
    });
    let pem = common::load::root_pem(&a);
    let https = a.cfg().proxy.https[0].port();
    let held = std::thread::spawn(move || {
        let c = common::https::Client::new(&pem, &[b"http/1.1"]);
        let t = Instant::now();
        let r = common::https::runtime().block_on(async {
            tokio::time::timeout(Duration::from_secs(40), c.get(https, "/api/v1/items")).await
        });
        (r, t.elapsed())
    });
    a.wait_for(Duration::from_secs(60), "frozen api replaced", |s| {
        let x = Appliance::service(s, "api");
        x.ready && x.pid != Some(api)
    });
    let took = t.elapsed();
    println!("frozen API replaced after {took:.1?} (was 64 s before the hung-process kill)");
    let (r, waited) = held.join().expect("held request");
    let r = r
        .expect("a request to a failing API was left hanging for 40 s")
        .expect("the held request");
    println!(
        "a request sent while the API was failing: {} after {waited:.1?}",
        r.status
    );
    assert!(
        r.status == 200 || (r.status == 503 && !r.header("retry-after").is_empty()),
        "{} {}",
        r.status,
        r.text()
    );
    assert!(waited < Duration::from_secs(18), "held {waited:?}");
    let log = a.stderr();
    assert!(log.contains("health check failed (3/3)"), "{log}");
    assert!(
        log.contains("hung: it is stopped (state T); sending SIGKILL to the process group at once"),
        "{log}"
    );
    assert!(
        !log.contains("still running"),
        "the frozen server was given its grace:\n{log}"
    );
    // The bound: the health budget (5 + 3 x 2 + 2 x 1 = 13 s), the back-off (1 s)
    // and a start, with room for a loaded CI machine; the old way took 64 s.
    assert!(took < Duration::from_secs(30), "replaced after {took:?}");
    assert!(
        !std::path::Path::new(&format!("/proc/{api}")).exists(),
        "the frozen process {api} is still there"
    );
    let (code, _) = a.http("GET", "/api/v1/items", "").expect("api answers");
    assert_eq!(code, 200);
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

/// A backend that leaves an orphan behind: `( sleep & )` re-parents the sleep to
/// the nearest subreaper, which must reap it.
const ORPHAN_SCRIPT: &str = "#!/bin/sh\n( sleep 0.3 & )\nexec @DEMO@\n";

fn orphans_are_reaped(mut a: Appliance, pid1: bool) {
    if pid1 {
        let mut cmd = std::process::Command::new("unshare");
        cmd.args(["--pid", "--fork", "--mount-proc"])
            .arg(common::koprogo_bin())
            .arg("--config")
            .arg(&a.config);
        a.start_with(cmd);
    } else {
        a.start();
    }
    a.wait_ready();
    let st = a.wait_for(Duration::from_secs(10), "an orphan reaped", |s| {
        s.orphans_reaped >= 1
    });
    if pid1 {
        assert_eq!(st.pid, 1, "koprogo is PID 1 in its namespace");
    }
    // No zombie anywhere whose parent is the supervisor.
    let sup = if pid1 {
        common::process_states()
            .into_iter()
            .find(|(_, _, ppid)| *ppid == a.pid())
            .map(|(p, _, _)| p)
            .expect("koprogo under unshare")
    } else {
        a.pid()
    };
    let zombies: Vec<_> = common::process_states()
        .into_iter()
        .filter(|(_, state, ppid)| *state == 'Z' && *ppid == sup)
        .collect();
    assert!(zombies.is_empty(), "zombies: {zombies:?}");
    // SIGTERM to koprogo itself (unshare does not forward signals).
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(sup), Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(a.wait_exit(Duration::from_secs(90)), 0, "{}", a.stderr());
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn orphans_are_reaped_as_subreaper() {
    orphans_are_reaped(Appliance::with_backend("", Some(ORPHAN_SCRIPT)), false);
}

#[test]
fn orphans_are_reaped_as_pid1() {
    if !common::is_root() {
        eprintln!("skipped: unshare --pid needs root");
        return;
    }
    orphans_are_reaped(Appliance::with_backend("", Some(ORPHAN_SCRIPT)), true);
}

#[test]
fn log_rotation_under_load_keeps_every_line_once() {
    const N: usize = 300_000;
    let mut a = Appliance::new(&format!(
        "[logs]\nmax_size = \"1MiB\"\nkeep_files = 1000\n\n[backend.env]\nDEMO_EMIT_LINES = \"{N}\"\n"
    ));
    a.start();
    a.wait_ready();
    a.stop();
    let lines = common::all_log_lines(&a.path("logs"), "api");
    let mut seen = vec![0u8; N + 1];
    for l in &lines {
        if let Some(i) = l.find("demo line ") {
            let n: usize = l[i + 10..].trim().parse().expect("line number");
            seen[n] += 1;
        }
    }
    let missing = seen[1..].iter().filter(|c| **c == 0).count();
    let doubled = seen[1..].iter().filter(|c| **c > 1).count();
    assert_eq!((missing, doubled), (0, 0), "lines missing / duplicated");
    let rotated = std::fs::read_dir(a.path("logs"))
        .expect("logs")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("api.log."))
        .count();
    assert!(rotated >= 3, "expected several rotations, got {rotated}");
    // Each line carries a timestamp.
    assert!(lines
        .iter()
        .all(|l| l.len() > 24 && l.as_bytes()[4] == b'-' && &l[23..24] == "Z"));
    a.assert_no_leftovers(Duration::from_secs(5));
}

fn environ(pid: i32) -> Vec<(String, String)> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    raw.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

fn status_field(pid: i32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find(|l| l.starts_with(key))
        .map(|l| l[key.len()..].trim().to_string())
        .unwrap_or_default()
}

#[test]
fn sd_notify_protocol_and_clean_children() {
    let mut a = Appliance::new("");
    let sock_path = a.path("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("notify socket");
    std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let listener = NotifyListener::start(sock);
    let mut cmd = a.cmd();
    cmd.env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "1000000")
        .env("LISTEN_FDS", "3")
        .env("SECRET_FROM_PARENT", "must-not-leak");
    a.start_with(cmd);
    let st = a.wait_ready();
    let deadline = Instant::now() + Duration::from_secs(10);
    let msgs = loop {
        let msgs = listener.messages();
        let seen = |what: &str| msgs.iter().any(|m| m.contains(what));
        if (seen("READY=1") && seen("WATCHDOG=1")) || Instant::now() > deadline {
            break msgs;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(msgs.iter().any(|m| m.contains("READY=1")), "{msgs:?}");
    assert!(msgs.iter().any(|m| m.contains("STATUS=")), "{msgs:?}");
    assert!(msgs.iter().any(|m| m.contains("WATCHDOG=1")), "{msgs:?}");

    for svc in ["postgres", "api"] {
        let pid = Appliance::service(&st, svc).pid.expect("pid");
        let env = environ(pid);
        for (k, _) in &env {
            assert!(
                ![
                    "NOTIFY_SOCKET",
                    "WATCHDOG_USEC",
                    "WATCHDOG_PID",
                    "LISTEN_FDS",
                    "LISTEN_PID",
                    "SECRET_FROM_PARENT"
                ]
                .contains(&k.as_str()),
                "{svc} inherited {k}"
            );
        }
        // Its own process group, a working directory we chose, no ambient caps.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let pgrp: i32 = stat[stat.rfind(')').expect(")") + 2..]
            .split(' ')
            .nth(2)
            .expect("pgrp")
            .parse()
            .expect("num");
        assert_eq!(pgrp, pid, "{svc} must lead its own process group");
        assert_eq!(
            status_field(pid, "CapAmb:"),
            "0000000000000000",
            "{svc} ambient caps"
        );
        if common::is_root() {
            let uid = status_field(pid, "Uid:");
            assert!(!uid.starts_with("0\t"), "{svc} runs as root: {uid}");
        }
        let stdin = std::fs::read_link(format!("/proc/{pid}/fd/0")).expect("fd 0");
        assert_eq!(stdin, std::path::Path::new("/dev/null"), "{svc} stdin");
    }
    let api = Appliance::service(&st, "api").pid.expect("api pid");
    let cwd = std::fs::read_link(format!("/proc/{api}/cwd")).expect("cwd");
    assert_eq!(cwd, a.path("state/api"));
    let env: std::collections::HashMap<_, _> = environ(api).into_iter().collect();
    assert_eq!(
        env.get("ENABLE_RATE_LIMITING").map(String::as_str),
        Some("false")
    );
    assert_eq!(env.get("NO_COLOR").map(String::as_str), Some("1"));
    assert_eq!(
        env.get("SERVER_HOST").map(String::as_str),
        Some("127.0.0.1")
    );
    assert!(env
        .get("DATABASE_URL")
        .is_some_and(|u| u.contains("host=") && u.contains(&a.path("run").display().to_string())));
    assert!(env
        .get("UPLOAD_DIR")
        .is_some_and(|u| u.starts_with(&a.path("state").display().to_string())));
    assert!(env
        .get("TMPDIR")
        .is_some_and(|u| u.starts_with(&a.path("state").display().to_string())));
    assert!(env
        .get("CORS_ALLOWED_ORIGINS")
        .is_some_and(|u| u.starts_with("https://localhost")));

    // STOPPING=1 on shutdown.
    let pid = nix::unistd::Pid::from_raw(a.pid());
    nix::sys::signal::kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stopping = false;
    while Instant::now() < deadline && !stopping {
        stopping = listener.messages().iter().any(|m| m.contains("STOPPING=1"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(stopping, "no STOPPING=1");
    assert_eq!(a.wait_exit(Duration::from_secs(60)), 0);
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn a_notify_socket_nobody_reads_does_not_stall_the_supervisor() {
    // The receiver's queue (10 datagrams) fills within a second with a watchdog
    // ping every 50 ms; a blocking send would freeze the supervisor there.
    let mut a = Appliance::new("");
    let sock_path = a.path("notify.sock");
    let _sock = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("notify socket");
    std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let mut cmd = a.cmd();
    cmd.env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "100000");
    a.start_with(cmd);
    a.wait_ready();
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    assert!(a.status().is_some_and(|s| s.all_ready));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "status took {:?}",
        t.elapsed()
    );
    assert!(a.stderr().contains("not reading"), "{}", a.stderr());
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn api_not_ready_in_time_is_restarted_with_backoff() {
    // The demo backend sleeps 5 s before listening; start_timeout is 2 s.
    let mut a = Appliance::new("[backend.env]\nDEMO_START_DELAY_MS = \"5000\"\n");
    let text = std::fs::read_to_string(&a.config).expect("config");
    std::fs::write(
        &a.config,
        text.replace("start_timeout = \"30s\"", "start_timeout = \"2s\""),
    )
    .expect("write");
    a.start();
    let st = a.wait_for(Duration::from_secs(30), "two failed starts", |s| {
        Appliance::service(s, "api").failures >= 2
    });
    let api = Appliance::service(&st, "api");
    assert!(!api.ready);
    assert!(
        api.last_error
            .as_deref()
            .is_some_and(|e| e.contains("not ready after 2s")),
        "{api:?}"
    );
    assert!(
        Appliance::service(&st, "postgres").ready,
        "postgres unaffected"
    );
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn runs_without_the_application_and_starts_it_once_installed() {
    let mut a = Appliance::new("");
    let bin = a.path("demo-backend");
    let parked = a.path("demo-backend.parked");
    std::fs::rename(&bin, &parked).expect("park the API binary");
    a.start();
    let st = a.wait_for(
        Duration::from_secs(30),
        "api not installed, postgres ready",
        |s| {
            Appliance::service(s, "api").state == koprogo::process::state::Phase::NotInstalled
                && Appliance::service(s, "postgres").ready
        },
    );
    let api = Appliance::service(&st, "api");
    assert!(api.last_error.unwrap_or_default().contains("not installed"));
    assert_eq!(api.failures, 0, "a missing program is not a crash loop");
    let (code, out, _) = a.cli(&["status"]);
    assert_eq!(code, 1, "not everything is ready:\n{out}");
    assert!(out.contains("not-installed"), "{out}");
    // The package brings it: it starts without a restart of the appliance.
    std::fs::rename(&parked, &bin).expect("install");
    a.wait_for(Duration::from_secs(30), "api ready once installed", |s| {
        s.all_ready
    });
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn watchdog_pings_keep_their_pace_through_a_crash_loop() {
    // A crash loop changes states every second or so; pings must not wait for calm.
    let mut a = Appliance::new("[backend.env]\nDEMO_EXIT_AT_START = \"3\"\n");
    let sock_path = a.path("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("notify socket");
    std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let listener = NotifyListener::start(sock);
    let mut cmd = a.cmd();
    cmd.env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "3000000");
    a.start_with(cmd);
    let start = Instant::now();
    // At least 9 s, and until the crash loop has run 3 times (a loaded machine
    // boots slower): bounded to 40 s.
    std::thread::sleep(Duration::from_secs(9));
    let crashed = |a: &Appliance| {
        a.status()
            .is_some_and(|st| Appliance::service(&st, "api").failures >= 3)
    };
    while !crashed(&a) && start.elapsed() < Duration::from_secs(40) {
        std::thread::sleep(Duration::from_millis(250));
    }
    let mut pings = vec![start];
    pings.extend(
        listener
            .stamped()
            .into_iter()
            .filter(|(_, m)| m.contains("WATCHDOG=1"))
            .map(|(t, _)| t),
    );
    let worst = pings
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let tail = start.elapsed()
        - pings
            .last()
            .map_or(Duration::ZERO, |p| p.duration_since(start));
    assert!(
        pings.len() >= 5,
        "only {} pings in {:?}",
        pings.len() - 1,
        start.elapsed()
    );
    assert!(
        worst.max(tail) < Duration::from_millis(2600),
        "a ping gap of {worst:?} (period 1.5 s)"
    );
    let st = a.status().expect("status");
    assert!(
        Appliance::service(&st, "api").failures >= 3,
        "the crash loop ran"
    );
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

/// Reads the notification socket from the start, as systemd does: the kernel
/// queues only `net.unix.max_dgram_qlen` (10) datagrams for a reader that waits,
/// and the supervisor drops what does not fit, so a test that read only after
/// `wait_ready` lost READY=1 behind the watchdog pings of a slow boot.
struct NotifyListener {
    msgs: std::sync::Arc<std::sync::Mutex<Vec<(Instant, String)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NotifyListener {
    fn start(sock: std::os::unix::net::UnixDatagram) -> NotifyListener {
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let msgs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (m, st) = (msgs.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    m.lock().expect("lock").push((Instant::now(), text));
                }
            }
        });
        NotifyListener {
            msgs,
            stop,
            thread: Some(thread),
        }
    }

    /// Every message so far, with the time it was read.
    fn stamped(&self) -> Vec<(Instant, String)> {
        self.msgs.lock().expect("lock").clone()
    }

    fn messages(&self) -> Vec<String> {
        self.stamped().into_iter().map(|(_, m)| m).collect()
    }
}

impl Drop for NotifyListener {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
