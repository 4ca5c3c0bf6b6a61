//! `[backend] instances = 2`, end to end: two demo API servers behind the HTTPS
//! proxy, both getting traffic; one killed with SIGKILL under load loses no GET
//! (the proxy retries it on the other) and is restarted; `koprogo restart api`
//! restarts both one at a time under reads and writes; an update rolls over both.
//! Failed requests are counted and printed.

mod common;

use std::time::Duration;

use common::load::{install_backend, report, script, Load};
use common::Appliance;

fn two_instances() -> Appliance {
    let a = Appliance::with_backend("rate = 0\n", Some(&script("DEMO_VERSION=1")));
    let text = std::fs::read_to_string(&a.config).expect("config");
    let text = text.replace("pool_min = 1\n", "pool_min = 1\ninstances = 2\n");
    std::fs::write(&a.config, text).expect("write config");
    a
}

fn row(a: &Appliance, name: &str) -> koprogo::process::state::ServiceReport {
    Appliance::service(&a.status().expect("status"), name)
}

#[test]
fn two_instances_share_the_load_survive_a_kill_restart_and_update_in_turn() {
    let mut a = two_instances();
    a.start();
    let st = a.wait_ready();
    let base = a.backend_port;
    let names: Vec<&str> = st.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["postgres", "api-1", "api-2"]);
    assert_eq!(row(&a, "api-1").port, Some(base));
    assert_eq!(row(&a, "api-2").port, Some(base + 1));
    let (_, text, _) = a.cli(&["status"]);
    assert!(text.contains("api-1") && text.contains("api-2"), "{text}");

    // 1. SIGKILL of one instance under GET load.
    let victim = row(&a, "api-1");
    let load = Load::start(&a, 2, false);
    std::thread::sleep(Duration::from_millis(1500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim.pid.expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill api-1");
    a.wait_for(Duration::from_secs(60), "api-1 restarted", |s| {
        let r = Appliance::service(s, "api-1");
        r.ready && r.pid != victim.pid && r.restarts > victim.restarts
    });
    std::thread::sleep(Duration::from_millis(1000));
    let t = load.finish();
    report("SIGKILL of api-1 under GET load", &t);
    assert_eq!(t.failed.len(), 0, "GET requests lost to the SIGKILL");
    for p in [base, base + 1] {
        assert!(
            t.ports.get(&p.to_string()).copied().unwrap_or(0) > 50,
            "instance on port {p} got (almost) no traffic: {:?}",
            t.ports
        );
    }

    // 2. `restart api`: both, one after the other, under reads and writes.
    let before = (row(&a, "api-1").pid, row(&a, "api-2").pid);
    let load = Load::start(&a, 2, true);
    std::thread::sleep(Duration::from_millis(500));
    let (code, out, err) = a.cli(&["restart", "api"]);
    std::thread::sleep(Duration::from_millis(500));
    let t = load.finish();
    report("restart api (2 instances, one at a time)", &t);
    assert_eq!(code, 0, "restart api: {out}{err}");
    assert_eq!(
        t.failed.len(),
        0,
        "failed requests during the rolling restart"
    );
    let after = (row(&a, "api-1").pid, row(&a, "api-2").pid);
    assert_ne!(after.0, before.0);
    assert_ne!(after.1, before.1);

    // 3. An update rolls over both instances onto their spare ports.
    let load = Load::start(&a, 2, true);
    std::thread::sleep(Duration::from_millis(500));
    install_backend(&a, "DEMO_VERSION=2");
    let (code, out, err) = a.cli(&["reload"]);
    // Every client's last 50 answers come after the update (a fixed pause was too
    // short for that on a loaded machine).
    load.wait_each(60, Duration::from_secs(30));
    let t = load.finish();
    report("rolling update of 2 instances", &t);
    assert_eq!(code, 0, "reload: {out}{err}");
    assert_eq!(
        t.failed.len(),
        0,
        "failed requests during the rolling update"
    );
    assert!(t.tail.iter().all(|v| v == "2"), "{:?}", t.tail);
    assert_eq!(row(&a, "api-1").port, Some(base + 2));
    assert_eq!(row(&a, "api-2").port, Some(base + 3));
    let st = a.status().expect("status");
    assert_eq!(st.update.last.as_ref().map(|l| l.new_pids.len()), Some(2));
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}
