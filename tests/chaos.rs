//! The chaos soak (issue 13) with the real KoproGo: a realistic authenticated load
//! through the proxy, a writer logging every acknowledged write, and every fault
//! kind injected on a seeded schedule (tests/common/chaos.rs). The short run (about
//! 150 s of faults, seed 13) is part of the suite; `scripts/chaos.sh --minutes N`
//! runs the long one. It fails on any lost acknowledged write, any leftover process
//! or zombie, a recovery over its bound, a request failing where none may, a
//! PostgreSQL SIGKILLed by the supervisor or a log line lost outside a fault that
//! excuses it. Without ../shared/koprogo-real it prints one "skipped: …" line.

mod common;

use common::chaos::{Kind, Soak, KINDS};

#[test]
fn chaos_soak_survives_every_fault_and_loses_no_acknowledged_write() {
    let Some(mut soak) =
        Soak::new("chaos_soak_survives_every_fault_and_loses_no_acknowledged_write")
    else {
        return;
    };
    let figures = soak.run();
    println!("\n{figures}");
    let file = soak
        .knobs
        .out
        .join(format!("figures-seed{}.md", soak.knobs.seed));
    let _ = std::fs::write(&file, &figures);
    println!("chaos: figures written to {}", file.display());
    // Every kind the machine allows ran at least once.
    let ran: Vec<Kind> = soak.faults.iter().map(|f| f.kind).collect();
    for k in soak.kinds() {
        assert!(ran.contains(&k), "{} never ran", k.name());
    }
    assert!(
        soak.violations.is_empty(),
        "{} violations:\n{}\n\n{figures}",
        soak.violations.len(),
        soak.violations.join("\n")
    );
    let _ = KINDS;
}

/// Found by the soak (the long run's third `api-kill`: 32.7 s without the API). The
/// restart back-off kept doubling across isolated crashes of an API that had served,
/// ready, for tens of seconds in between (restarting in 1, 2, 4, 8, 16, 32 s), because
/// it is reset only when a run lasted a whole minute (`STABLE`). A crash after a
/// healthy run is not a crash loop: it is restarted at once, as s6 or runit would.
#[test]
fn an_api_crash_after_a_healthy_run_is_restarted_at_once() {
    use std::time::{Duration, Instant};
    let mut a = common::Appliance::new("");
    a.start();
    let mut st = a.wait_ready();
    for round in 1..=4 {
        let pid = common::Appliance::service(&st, "api").pid.expect("api pid");
        // A healthy run: ready and answering its health checks for 15 s.
        std::thread::sleep(Duration::from_secs(15));
        let t = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("SIGKILL the API");
        st = a.wait_for(Duration::from_secs(120), "the API back", |s| {
            s.all_ready
                && common::Appliance::service(s, "api")
                    .pid
                    .is_some_and(|p| p != pid)
        });
        let took = t.elapsed();
        let delays: Vec<String> = a
            .stderr()
            .lines()
            .filter(|l| l.contains("restarting in") && l.contains("service=\"api\""))
            .map(|l| l.trim().to_string())
            .collect();
        assert!(
            took < Duration::from_secs(5),
            "crash {round} after a healthy run: the API was back after {took:?}; {delays:#?}"
        );
    }
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(10));
}
