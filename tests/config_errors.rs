//! Bad configuration and environment: `koprogo run` and `koprogo check` refuse with
//! one clear line naming the file, the key and the fix, exit non-zero, and create
//! or change nothing.

mod common;

use std::net::TcpListener;

use common::Appliance;

/// Runs `koprogo run` (bounded) on a config and returns (code, stderr).
fn run_refused(a: &Appliance) -> (i32, String) {
    let mut child = a
        .cmd()
        .arg("run")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            let mut err = String::new();
            use std::io::Read;
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            return (st.code().unwrap_or(-1), err);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("koprogo run did not refuse within 20 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn assert_untouched(a: &Appliance) {
    for d in ["state", "logs", "run"] {
        assert!(!a.path(d).exists(), "{d} was created despite the error");
    }
}

fn check_refuses(extra: &str, expect: &[&str]) {
    let a = Appliance::new(extra);
    let (code, err) = run_refused(&a);
    assert_ne!(code, 0, "run must fail");
    for e in expect {
        assert!(err.contains(e), "run's message lacks {e:?}:\n{err}");
    }
    assert!(
        err.contains(&a.config.display().to_string()),
        "message must name the file:\n{err}"
    );
    let (code, out, err2) = a.cli(&["check"]);
    assert_ne!(code, 0, "check must fail");
    let all = format!("{out}{err2}");
    for e in expect {
        assert!(all.contains(e), "check's message lacks {e:?}:\n{all}");
    }
    assert_untouched(&a);
}

#[test]
fn unknown_key_is_refused() {
    check_refuses(
        "[logs]\nmax_sise = \"1MiB\"\n",
        &["max_sise", "unknown field"],
    );
}

#[test]
fn wrong_type_is_refused() {
    check_refuses("[logs]\nkeep_files = \"many\"\n", &["keep_files"]);
}

#[test]
fn tunnel_idle_timeout_out_of_range_is_refused() {
    // Appended to the generated config's [proxy] table.
    check_refuses(
        "tunnel_idle_timeout = \"0s\"\n",
        &["proxy.tunnel_idle_timeout", "1s-24h"],
    );
}

#[test]
fn bad_duration_is_refused() {
    check_refuses("[logs]\nmax_age = \"7 weeks\"\n", &["max_age", "duration"]);
}

#[test]
fn missing_postgres_binaries_are_refused() {
    let a = Appliance::new("");
    // Put bin_dir into the [postgres] table by rewriting the file.
    let text = std::fs::read_to_string(&a.config).expect("read");
    let text = text.replace(
        "[postgres]\n",
        "[postgres]\nbin_dir = \"/nonexistent/pg/bin\"\n",
    );
    std::fs::write(&a.config, text).expect("write");
    let (code, err) = run_refused(&a);
    assert_ne!(code, 0);
    assert!(
        err.contains("postgres.bin_dir") && err.contains("/nonexistent/pg/bin"),
        "{err}"
    );
    assert_untouched(&a);
}

#[test]
fn missing_application_is_a_warning_not_an_error() {
    let a = Appliance::new("");
    std::fs::remove_file(a.path("demo-backend")).expect("rm");
    let (code, out, err) = a.cli(&["check"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("warning: the KoproGo application is not installed"),
        "{out}"
    );
    assert!(out.contains("backend.command"), "{out}");
    assert_untouched(&a);
}

#[test]
fn port_in_use_is_refused() {
    let a = Appliance::new("");
    let _busy = TcpListener::bind(("127.0.0.1", a.backend_port)).expect("occupy the port");
    let (code, err) = run_refused(&a);
    assert_ne!(code, 0);
    assert!(
        err.contains("backend.port") && err.contains("another program uses it"),
        "{err}"
    );
    assert_untouched(&a);
}

#[test]
fn smtp_without_host_is_refused_before_starting_anything() {
    check_refuses(
        "[backend.smtp]\nenabled = true\nport = 587\n",
        &["backend.smtp.host"],
    );
}

#[test]
fn missing_config_file_is_reported() {
    let out = std::process::Command::new(common::koprogo_bin())
        .args(["--config", "/nonexistent/koprogo.toml", "check"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/koprogo.toml") && err.contains("KOPROGO_CONFIG"),
        "{err}"
    );
}

#[test]
fn a_second_supervisor_on_the_same_state_is_refused() {
    let mut a = Appliance::new("");
    a.start();
    a.wait_ready();
    // Another run on the same state: its ports are taken, and the lock is held.
    let (code, err) = run_refused(&a);
    assert_ne!(code, 0);
    assert!(
        err.contains("in use") || err.contains("another koprogo"),
        "{err}"
    );
    assert!(a.status().expect("first still running").all_ready);
    a.stop();
    a.assert_no_leftovers(std::time::Duration::from_secs(5));
}
