//! Application updates, end to end: a real appliance whose API server is a script
//! that runs the demo backend with `DEMO_VERSION=N` (every response says which
//! binary answered). The script is replaced the way dpkg does it (a new file
//! renamed over the old one) or `koprogo reload` is run, while two client threads
//! send requests through the HTTPS proxy on keep-alive connections. Every failed
//! request is counted and printed: the figure must be zero.

mod common;

use std::time::{Duration, Instant};

use common::load::{install_backend, report, script, Load};
use common::Appliance;

/// An appliance whose backend is `DEMO_VERSION=1 demo-backend`, no rate limit.
fn appliance(start_timeout: &str) -> Appliance {
    let a = Appliance::with_backend("rate = 0\n", Some(&script("DEMO_VERSION=1")));
    let text = std::fs::read_to_string(&a.config).expect("config");
    let text = text.replace(
        "start_timeout = \"30s\"\nstop_timeout = \"35s\"",
        &format!("start_timeout = \"{start_timeout}\"\nstop_timeout = \"35s\""),
    );
    std::fs::write(&a.config, text).expect("write config");
    a
}

fn api(a: &Appliance) -> koprogo::process::state::ServiceReport {
    Appliance::service(&a.status().expect("status"), "api")
}

#[test]
fn update_swap_under_load_fails_no_request_and_names_the_backup() {
    let mut a = appliance("30s");
    a.start();
    a.wait_ready();
    let before = api(&a);
    let load = Load::start(&a, 2, true);
    std::thread::sleep(Duration::from_millis(500));
    install_backend(&a, "DEMO_VERSION=2");
    let st = a.wait_for(Duration::from_secs(90), "the update", |s| {
        s.update.last.is_some()
    });
    // A little more traffic on the new server, then stop.
    std::thread::sleep(Duration::from_millis(1000));
    let t = load.finish();
    report("update swap under load", &t);
    let last = st.update.last.clone().expect("last update");
    assert!(last.ok, "the update failed: {last:#?}\n{}", a.stderr());
    assert_eq!(last.trigger, "binary changed");
    assert!(t.ok > 200, "too little traffic to mean anything: {t:?}");
    assert_eq!(t.failed.len(), 0, "failed requests during the swap");
    assert!(t.versions.get("1").copied().unwrap_or(0) > 0, "{t:?}");
    assert!(t.versions.get("2").copied().unwrap_or(0) > 0, "{t:?}");
    assert!(
        t.tail.iter().all(|v| v == "2"),
        "after the swap the old binary still answered: {:?}",
        t.tail
    );

    // The new process serves, on the spare port; the old one is gone.
    let now = api(&a);
    assert!(now.ready);
    assert_ne!(now.pid, before.pid);
    assert_eq!(now.port, Some(a.backend_port + 1));
    assert_eq!(now.swaps, 1);
    assert_eq!(last.old_pids, before.pid.into_iter().collect::<Vec<_>>());
    assert_eq!(last.new_pids, now.pid.into_iter().collect::<Vec<_>>());
    let old = before.pid.expect("old pid");
    assert!(
        !std::path::Path::new(&format!("/proc/{old}")).exists(),
        "the old API server {old} still runs"
    );

    // The pre-update backup exists, and status (JSON and text) names it.
    let file = st
        .update
        .pre_update_backup
        .clone()
        .expect("pre-update backup");
    assert_eq!(last.backup.as_deref(), Some(file.as_str()));
    assert!(file.contains("-pre-update"), "{file}");
    assert!(std::path::Path::new(&file).is_file(), "{file} is missing");
    let (_, text, _) = a.cli(&["status"]);
    println!("{text}");
    assert!(text.contains(&file), "status does not name {file}:\n{text}");
    let (_, json, _) = a.cli(&["status", "--json"]);
    assert!(json.contains(&file), "status --json does not name {file}");

    // Another update, by command this time and under load again, swaps back to
    // the home port (where the proxy's pool had connections to the first server).
    let load = Load::start(&a, 2, true);
    std::thread::sleep(Duration::from_millis(500));
    install_backend(&a, "DEMO_VERSION=3");
    let (code, out, err) = a.cli(&["reload"]);
    std::thread::sleep(Duration::from_millis(1000));
    let t = load.finish();
    report("second swap (koprogo reload) under load", &t);
    assert_eq!(code, 0, "reload: {out}{err}");
    assert!(out.contains("updated"), "{out}");
    assert_eq!(t.failed.len(), 0, "failed requests during the second swap");
    assert!(t.tail.iter().all(|v| v == "3"), "{:?}", t.tail);
    let now = api(&a);
    assert_eq!(now.port, Some(a.backend_port));
    assert_eq!(now.swaps, 2);
    let (code, _, _) = a.cli(&["status"]);
    assert_eq!(code, 0);
    let (status, body) = a
        .http("GET", "/api/v1/health", "")
        .expect("health on home port");
    assert_eq!(status, 200, "{body}");
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn a_broken_new_binary_leaves_the_old_one_serving() {
    let mut a = appliance("6s");
    a.start();
    a.wait_ready();
    let before = api(&a);

    // 1. A new binary that exits at once, installed and applied by `koprogo reload`.
    let load = Load::start(&a, 2, true);
    std::thread::sleep(Duration::from_millis(300));
    install_backend(&a, "DEMO_VERSION=2 DEMO_EXIT_AT_START=3");
    let (code, out, err) = a.cli(&["reload"]);
    std::thread::sleep(Duration::from_millis(300));
    let t = load.finish();
    report("new binary exits at start", &t);
    assert_eq!(code, 1, "reload of a broken binary must fail: {out}{err}");
    assert!(
        err.contains("exited at start (exit code 3)") && err.contains("keeps serving"),
        "{err}"
    );
    assert_eq!(t.failed.len(), 0, "failed requests");
    assert_eq!(t.versions.keys().collect::<Vec<_>>(), ["1"], "{t:?}");
    let st = a.status().expect("status");
    let last = st.update.last.clone().expect("last");
    assert!(!last.ok);
    assert!(last.message.contains("exit code 3"), "{last:#?}");
    assert!(last
        .backup
        .as_deref()
        .is_some_and(|b| std::path::Path::new(b).is_file()));
    let now = Appliance::service(&st, "api");
    assert!(now.ready);
    assert_eq!(now.pid, before.pid, "the old server must keep serving");
    let (_, text, _) = a.cli(&["status"]);
    assert!(
        text.contains("FAILED") && text.contains("exit code 3"),
        "{text}"
    );

    // 2. A new binary that never becomes ready, noticed by the watcher.
    let load = Load::start(&a, 2, true);
    std::thread::sleep(Duration::from_millis(300));
    install_backend(&a, "DEMO_VERSION=2 DEMO_NEVER_READY=1");
    let st = a.wait_for(Duration::from_secs(90), "the second update", |s| {
        s.update
            .last
            .as_ref()
            .is_some_and(|l| l.trigger == "binary changed")
    });
    std::thread::sleep(Duration::from_millis(300));
    let t = load.finish();
    report("new binary never ready", &t);
    let last = st.update.last.clone().expect("last");
    assert!(!last.ok);
    assert!(
        last.message.contains("not ready after 6s"),
        "{}",
        last.message
    );
    assert_eq!(t.failed.len(), 0, "failed requests");
    assert_eq!(t.versions.keys().collect::<Vec<_>>(), ["1"], "{t:?}");
    let now = api(&a);
    assert!(now.ready);
    assert_eq!(now.pid, before.pid);
    // The never-ready server was stopped.
    let new = *last.new_pids.first().expect("new pid");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{new}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!std::path::Path::new(&format!("/proc/{new}")).exists());

    // 3. SIGTERM while an update waits for its new server: a clean stop, nothing left.
    install_backend(&a, "DEMO_VERSION=4 DEMO_NEVER_READY=1");
    let cfg = a.config.clone();
    let reload = std::thread::spawn(move || {
        std::process::Command::new(common::koprogo_bin())
            .arg("--config")
            .arg(cfg)
            .arg("reload")
            .output()
            .expect("reload")
    });
    a.wait_for(Duration::from_secs(60), "the update waiting", |s| {
        s.update
            .running
            .as_deref()
            .is_some_and(|r| r.contains("waiting until it is ready"))
    });
    a.stop();
    let out = reload.join().expect("reload thread");
    assert!(
        !out.status.success(),
        "an interrupted update is not a success"
    );
    a.assert_no_leftovers(Duration::from_secs(5));
}
