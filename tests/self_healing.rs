//! The OOM policy, end to end (real `koprogo run`, real PostgreSQL 15, the demo
//! backend): the `oom_score_adj` of every process of the tree after boot and
//! after each restart, and memory pressure in a real memory cgroup, where the
//! kernel's OOM killer must take the API server (here the demo backend made to
//! allocate, in the API's place), never the postmaster or the supervisor.
//! The hung-API tests are in `supervisor.rs` (demo) and `real_koprogo.rs` (real).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::Appliance;
use koprogo::process::oom;
use nix::sys::signal::Signal;

/// The `oom_score_adj` of `pid`.
fn adj(pid: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/oom_score_adj: {e}"))
        .trim()
        .parse()
        .expect("a number")
}

/// The processes PostgreSQL forked (backends, checkpointer, …): the postmaster's
/// children (each is its own session leader, so not in its group).
fn postgres_children(postmaster: i32) -> Vec<i32> {
    common::process_states()
        .into_iter()
        .filter(|(_, _, ppid)| *ppid == postmaster)
        .map(|(p, _, _)| p)
        .collect()
}

/// May this process lower an `oom_score_adj` (CAP_SYS_RESOURCE, bit 24)? Root in
/// a container often may not (this machine's sandbox, some CI runners).
fn can_lower() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

/// Every value as the policy wants it, or (without the privilege to lower one)
/// what can be had: the API raised, the rest reported in status.
fn assert_policy(a: &Appliance, when: &str) {
    let st = a.status().expect("status");
    let pg = Appliance::service(&st, "postgres");
    let api = Appliance::service(&st, "api");
    let (pg_pid, api_pid) = (pg.pid.expect("pg pid"), api.pid.expect("api pid"));
    assert_eq!(api.oom_score_adj, Some(oom::API), "{when}: API in status");
    assert_eq!(adj(api_pid), oom::API, "{when}: API in /proc");
    let kids = postgres_children(pg_pid);
    assert!(!kids.is_empty(), "{when}: no PostgreSQL child found");
    for k in kids {
        assert_eq!(
            adj(k),
            oom::POSTGRES_CHILDREN,
            "{when}: PostgreSQL child {k}"
        );
    }
    if can_lower() {
        assert_eq!(st.oom.supervisor, Some(oom::SUPERVISOR), "{when}");
        assert_eq!(adj(a.pid()), oom::SUPERVISOR, "{when}: supervisor");
        assert_eq!(pg.oom_score_adj, Some(oom::POSTMASTER), "{when}: status");
        assert_eq!(adj(pg_pid), oom::POSTMASTER, "{when}: postmaster");
        assert!(st.oom.problems.is_empty(), "{when}: {:?}", st.oom.problems);
    } else {
        // Unprivileged: nothing may go below where it started; status says so.
        println!("{when}: without CAP_SYS_RESOURCE: {:?}", st.oom.problems);
        assert!(
            st.oom.problems.iter().any(|p| p.contains("supervisor")),
            "{when}: {:?}",
            st.oom.problems
        );
        assert!(
            st.oom.problems.iter().any(|p| p.contains("postgres")),
            "{when}: {:?}",
            st.oom.problems
        );
    }
}

/// After boot, after the API is killed, after PostgreSQL restarts (and the API
/// with it): every value is the policy's; `status --json` and `check` show it.
#[test]
fn oom_scores_hold_after_boot_and_after_every_restart() {
    let mut a = Appliance::new("");
    a.start();
    let st = a.wait_ready();
    assert_policy(&a, "after boot");
    let (code, out, _) = a.cli(&["check"]);
    if can_lower() {
        assert!(
            out.contains("ok: OOM policy applied"),
            "check ({code}):\n{out}"
        );
    } else {
        assert!(
            out.contains("warning: OOM policy:"),
            "check ({code}):\n{out}"
        );
    }
    let (_, json, _) = a.cli(&["status", "--json"]);
    assert!(json.contains("\"oom_score_adj\": 700"), "{json}");

    let api = Appliance::service(&st, "api").pid.expect("api pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(api), Signal::SIGKILL).expect("kill api");
    a.wait_for(Duration::from_secs(30), "api restarted", |s| {
        let x = Appliance::service(s, "api");
        s.all_ready && x.pid.is_some_and(|p| p != api)
    });
    assert_policy(&a, "after the API was killed");

    let pg = Appliance::service(&a.status().expect("status"), "postgres")
        .pid
        .expect("pg pid");
    let (code, out, err) = a.cli(&["restart", "postgres"]);
    assert_eq!(code, 0, "restart postgres: {out}{err}");
    a.wait_for(Duration::from_secs(60), "postgres and api back", |s| {
        let p = Appliance::service(s, "postgres");
        s.all_ready && p.pid.is_some_and(|p| p != pg)
    });
    assert_policy(&a, "after PostgreSQL restarted");
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

/// A memory cgroup of our own (v2 where the memory controller is enabled, else
/// v1), removed on drop after killing what is left in it.
struct MemCgroup {
    dir: PathBuf,
    v2: bool,
}

impl MemCgroup {
    fn new(limit: u64) -> Option<MemCgroup> {
        let name = format!("koprogo-oom-test-{}", std::process::id());
        let v2_root = Path::new("/sys/fs/cgroup");
        let v2 = std::fs::read_to_string(v2_root.join("cgroup.subtree_control"))
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"));
        let dir = if v2 {
            v2_root.join(&name)
        } else {
            let v1 = Path::new("/sys/fs/cgroup/memory");
            if !v1.join("memory.limit_in_bytes").exists() {
                return None;
            }
            v1.join(&name)
        };
        std::fs::create_dir(&dir).ok()?;
        let cg = MemCgroup { dir, v2 };
        let (limit_file, swap_file) = if v2 {
            ("memory.max", "memory.swap.max")
        } else {
            ("memory.limit_in_bytes", "memory.swappiness")
        };
        std::fs::write(cg.dir.join(limit_file), limit.to_string()).expect("set the memory limit");
        // No swapping out of the pressure (the box may have swap).
        let _ = std::fs::write(cg.dir.join(swap_file), "0");
        Some(cg)
    }

    /// How many times the kernel's OOM killer killed in this cgroup.
    fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            let pids = std::fs::read_to_string(self.procs()).unwrap_or_default();
            if pids.trim().is_empty() {
                break;
            }
            for p in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Memory pressure: the appliance in a memory cgroup of 320 MiB, the API server
/// (the demo backend in its place) asked to allocate 600 MiB. The kernel kills
/// the API server: never the postmaster, never the supervisor; the API is
/// restarted, the site serves again and PostgreSQL went through no crash
/// recovery (its log says so). A row written before is there.
#[test]
fn memory_pressure_kills_the_api_never_postgres_or_the_supervisor() {
    if !common::is_root() {
        println!("skipped: memory_pressure_kills_the_api_never_postgres_or_the_supervisor needs root (a memory cgroup)");
        return;
    }
    let Some(cg) = MemCgroup::new(320 << 20) else {
        println!(
            "skipped: no memory cgroup controller (v2 memory.max or v1 /sys/fs/cgroup/memory)"
        );
        return;
    };
    let mut a = Appliance::new("");
    // The supervisor joins the cgroup before it starts anything: every child is in it.
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("echo $$ > \"$1\" && shift && exec \"$@\"")
        .arg("sh")
        .arg(cg.procs())
        .arg(common::koprogo_bin())
        .arg("--config")
        .arg(&a.config);
    a.start_with(cmd);
    let st = a.wait_ready();
    let supervisor = a.pid();
    let in_cgroup = std::fs::read_to_string(cg.procs()).expect("cgroup.procs");
    let pg = Appliance::service(&st, "postgres").pid.expect("pg pid");
    let api = Appliance::service(&st, "api").pid.expect("api pid");
    for p in [supervisor, pg, api] {
        assert!(
            in_cgroup.split_whitespace().any(|x| x == p.to_string()),
            "{p} is not in the cgroup: {in_cgroup}"
        );
    }
    let (code, body) = a
        .http("POST", "/api/v1/items", "before the pressure")
        .expect("write");
    assert_eq!(code, 201, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let id = v["id"].as_i64().expect("id");

    // The hog: the API server allocates far past the cgroup's limit.
    let answer = a.http("POST", "/api/v1/demo/hog?mib=600", "");
    assert!(
        !matches!(answer, Ok((200, _))),
        "600 MiB were allocated under a 320 MiB limit: {answer:?}"
    );
    let st = a.wait_for(Duration::from_secs(60), "the API back", |s| {
        let x = Appliance::service(s, "api");
        s.all_ready && x.pid.is_some_and(|p| p != api)
    });
    let api_now = Appliance::service(&st, "api");
    let pg_now = Appliance::service(&st, "postgres");
    println!(
        "memory pressure: OOM kills in the cgroup {}, API last exit {:?}, API restarts {}",
        cg.oom_kills(),
        api_now.last_exit,
        api_now.restarts
    );
    assert!(cg.oom_kills() >= 1, "the kernel's OOM killer never ran");
    assert!(
        api_now
            .last_exit
            .as_deref()
            .is_some_and(|e| e.contains("SIGKILL")),
        "{api_now:?}"
    );
    assert_eq!(pg_now.pid, Some(pg), "the postmaster was replaced");
    assert_eq!(pg_now.restarts, 0, "{pg_now:?}");
    assert!(
        Path::new(&format!("/proc/{pg}")).exists(),
        "postmaster gone"
    );
    assert_eq!(a.pid(), supervisor);
    let log = common::all_log_lines(&a.path("logs"), "postgres").join("\n");
    assert!(
        log.contains("database system is ready to accept connections"),
        "no PostgreSQL log:\n{log}"
    );
    for crash in [
        "terminated by signal",
        "all server processes terminated; reinitializing",
        "database system was interrupted",
        "automatic recovery in progress",
    ] {
        assert!(!log.contains(crash), "PostgreSQL crashed ({crash}):\n{log}");
    }
    let (code, body) = a
        .http("GET", &format!("/api/v1/items/{id}"), "")
        .expect("read");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("before the pressure"), "{body}");
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(10));
    drop(cg);
}

/// A frozen postmaster (SIGSTOP) is never SIGKILLed: its health checks fail, the
/// supervisor sends its fast shutdown (SIGINT) followed by SIGCONT, so it wakes,
/// shuts down cleanly and starts again; no crash recovery, no row lost.
#[test]
fn a_frozen_postmaster_is_shut_down_by_postgresql_itself_never_killed() {
    let mut a = Appliance::new("");
    // Faster checks than the defaults (5 s, 5 s, 3) to keep the test short.
    let text = std::fs::read_to_string(&a.config).expect("config");
    let text = text.replace(
        "[postgres]\n",
        "[postgres]\nhealth_interval = \"1s\"\nhealth_timeout = \"1s\"\nhealth_failures = 2\n",
    );
    std::fs::write(&a.config, text).expect("config");
    a.start();
    let st = a.wait_ready();
    let (code, body) = a
        .http("POST", "/api/v1/items", "before the freeze")
        .expect("write");
    assert_eq!(code, 201, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let id = v["id"].as_i64().expect("id");
    let pg = Appliance::service(&st, "postgres").pid.expect("pg pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pg), Signal::SIGSTOP).expect("SIGSTOP");
    let st = a.wait_for(Duration::from_secs(90), "postgres replaced", |s| {
        let p = Appliance::service(s, "postgres");
        s.all_ready && p.pid.is_some_and(|p| p != pg)
    });
    let log = a.stderr();
    assert!(log.contains("health check failed (2/2)"), "{log}");
    for line in log.lines().filter(|l| l.contains("service=\"postgres\"")) {
        assert!(
            !line.contains("SIGKILL"),
            "PostgreSQL was sent SIGKILL: {line}"
        );
    }
    let pglog = common::all_log_lines(&a.path("logs"), "postgres").join("\n");
    assert!(
        pglog.contains("received fast shutdown request"),
        "not PostgreSQL's own fast shutdown:\n{pglog}"
    );
    for crash in [
        "terminated by signal",
        "database system was interrupted",
        "automatic recovery in progress",
    ] {
        assert!(!pglog.contains(crash), "crash recovery ({crash}):\n{pglog}");
    }
    assert!(Appliance::service(&st, "postgres").restarts >= 1);
    let (code, body) = a
        .http("GET", &format!("/api/v1/items/{id}"), "")
        .expect("read");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("before the freeze"), "{body}");
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(10));
}
