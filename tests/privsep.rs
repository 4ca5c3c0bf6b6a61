//! Privilege separation: the API server runs as its own system user
//! (`backend.user`, koprogo-api), started by the launcher, and that user can read
//! nothing of the appliance but what the API needs. A compromised API process is
//! played here by commands run with its exact credentials. Root only (switching
//! users needs it); skipped otherwise.

#[path = "common/backups.rs"]
mod backups;
mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Appliance;

fn proc_field(pid: i32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn user(name: &str) -> nix::unistd::User {
    nix::unistd::User::from_name(name)
        .expect("getpwnam")
        .unwrap_or_else(|| panic!("the {name} user exists (scripts/deps.sh creates it)"))
}

/// `program args…` run with the API user's credentials: (exit code, stderr).
fn as_api(program: &str, args: &[&str]) -> (i32, String) {
    let api = user("koprogo-api");
    let out = Command::new(program)
        .args(args)
        .uid(api.uid.as_raw())
        .gid(api.gid.as_raw())
        .stdin(Stdio::null())
        .output()
        .expect("run as koprogo-api");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn refused(program: &str, args: &[&str], what: &str) {
    let (code, out) = as_api(program, args);
    assert_ne!(code, 0, "the API user could {what}: {out}");
}

#[test]
fn the_api_runs_as_its_own_user_and_reads_nothing_of_the_appliance() {
    if !common::is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let (api, supervisor) = (user("koprogo-api"), user("koprogo"));
    let mut a = Appliance::new("\n[backup]\nenabled = false\n");
    a.start();
    let st = a.wait_ready();
    let pid = Appliance::service(&st, "api").pid.expect("api pid");

    // Who runs what.
    let uid_of = |pid: i32| -> u32 {
        proc_field(pid, "Uid")
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .expect("uid")
    };
    assert_eq!(uid_of(pid), api.uid.as_raw(), "the API's user");
    assert_eq!(uid_of(a.pid()), supervisor.uid.as_raw(), "the supervisor's");
    assert_eq!(
        proc_field(pid, "PPid"),
        a.pid().to_string(),
        "the API is the supervisor's child (its reaper sees its exit)"
    );
    for key in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(proc_field(pid, key), "0000000000000000", "API {key}");
    }
    let launcher: Vec<i32> = common::process_states()
        .into_iter()
        .filter(|(_, _, ppid)| *ppid == a.pid())
        .map(|(p, _, _)| p)
        .filter(|p| *p != pid && uid_of(*p) == api.uid.as_raw())
        .collect();
    assert_eq!(launcher.len(), 1, "one launcher: {launcher:?}");
    for key in ["CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(
            proc_field(launcher[0], key),
            "0000000000000000",
            "launcher {key}"
        );
    }
    for key in ["CapPrm", "CapEff"] {
        assert_eq!(
            proc_field(a.pid(), key),
            "0000000000000000",
            "supervisor {key}: nothing left after dropping root"
        );
    }

    // A backup to try reading.
    let backup = backups::backup_create(&a).display().to_string();

    let state = a.path("state");
    let s = |rel: &str| state.join(rel).display().to_string();
    refused("cat", &[&s("secrets.env")], "read secrets.env");
    refused("cat", &[&s("tls/ca/root.key")], "read the CA key");
    refused("cat", &[&backup], "read a backup");
    refused("ls", &[&s("")], "list the state directory");
    refused("ls", &[&s("pgdata")], "enter the cluster");
    refused(
        "ls",
        &[&a.path("logs").display().to_string()],
        "list the logs",
    );
    let koprogo = common::koprogo_bin().display().to_string();
    let config = a.config.display().to_string();
    refused(
        &koprogo,
        &["--config", &config, "status"],
        "use the control socket",
    );
    // PostgreSQL: its own role only, never the superuser.
    let psql = glob_psql();
    let run = a.path("run").display().to_string();
    let port = a.cfg().postgres.port.to_string();
    let (code, out) = as_api(
        &psql,
        &[
            "-h", &run, "-p", &port, "-U", "postgres", "-d", "koprogo", "-Atc", "select 1",
        ],
    );
    assert_ne!(code, 0, "the API user reached the superuser: {out}");
    assert!(out.contains("authentication failed"), "{out}");
    let (code, out) = as_api(
        &psql,
        &[
            "-h",
            &run,
            "-p",
            &port,
            "-U",
            "koprogo",
            "-d",
            "koprogo",
            "-Atc",
            "select current_user",
        ],
    );
    assert_eq!((code, out.trim()), (0, "koprogo"), "its own role works");

    // What it needs: uploads and temp files, which the supervisor backs up.
    let (code, out) = as_api(
        "sh",
        &[
            "-c",
            &format!(
                "umask 007; echo hi > {}/api-file && echo hi > {}/api-tmp",
                s("uploads"),
                s("tmp")
            ),
        ],
    );
    assert_eq!(code, 0, "{out}");
    let (code, out, err) = a.cli(&["backup", "create"]);
    assert_eq!(code, 0, "a backup reads the API's uploads: {out}{err}");

    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn killing_the_supervisor_takes_the_api_and_the_launcher_along() {
    if !common::is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut a = Appliance::new("\n[backup]\nenabled = false\n");
    a.start();
    let st = a.wait_ready();
    let pid = Appliance::service(&st, "api").pid.expect("api pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let _ = a.wait_exit(Duration::from_secs(10));
    // The API's death signal cannot cross users; the launcher ends it instead.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the API (pid {pid}) outlived its supervisor"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    a.assert_no_leftovers(Duration::from_secs(10));
}

fn glob_psql() -> String {
    let mut found: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("postgresql installed")
        .flatten()
        .map(|e| e.path().join("bin/psql"))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop().expect("a psql").display().to_string()
}
