//! The service user is assumed compromised: files it can plant in the state
//! directory must not hang or exhaust a root command. Each read of such a file is
//! bounded, refuses a symbolic link and anything but a regular file.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::Appliance;

/// `koprogo ARGS…` with a bound on its run time: (exit code, stdout + stderr).
fn bounded(a: &Appliance, args: &[&str]) -> (i32, String) {
    let mut child = a
        .cmd()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run koprogo");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(_st) = child.try_wait().expect("try_wait") {
            let out = child.wait_with_output().expect("output");
            return (
                out.status.code().unwrap_or(-1),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("koprogo {args:?} did not finish within 20 s (an unbounded read?)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn planted_links_devices_and_fifos_in_the_state_dir_get_clear_errors() {
    let a = Appliance::new("");
    let state = a.path("state");
    std::fs::create_dir_all(&state).expect("state dir");

    // secrets.env pointing at an endless device.
    std::os::unix::fs::symlink("/dev/zero", state.join("secrets.env")).expect("symlink");
    let (code, out) = bounded(&a, &["admin-password"]);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("secrets.env") && out.contains("symbolic link"),
        "{out}"
    );

    // … or a FIFO nobody writes to.
    std::fs::remove_file(state.join("secrets.env")).expect("rm");
    nix::unistd::mkfifo(
        &state.join("secrets.env"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .expect("mkfifo");
    // Planted by the service user: its own (root's commands work as that user).
    if common::is_root() {
        if let Ok(Some(u)) = nix::unistd::User::from_name("koprogo") {
            nix::unistd::chown(&state.join("secrets.env"), Some(u.uid), Some(u.gid))
                .expect("chown");
        }
    }
    let (code, out) = bounded(&a, &["admin-password"]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("not a regular file"), "{out}");
    std::fs::remove_file(state.join("secrets.env")).expect("rm");

    // The capacity history as a link to /dev/zero: check reports it and finishes.
    let history = koprogo::capacity::history::path(&state);
    std::os::unix::fs::symlink("/dev/zero", &history).expect("symlink");
    let (_, out) = bounded(&a, &["check"]);
    assert!(out.contains("symbolic link"), "{out}");
    assert!(
        std::fs::symlink_metadata(&history)
            .expect("still there")
            .file_type()
            .is_symlink(),
        "the planted file was replaced"
    );

    // `check` stays root (ports, directories): a FIFO as the state lock and an endless
    // PG_VERSION do not hang it.
    std::fs::remove_file(&history).expect("rm");
    nix::unistd::mkfifo(
        &state.join("koprogo.lock"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .expect("mkfifo");
    std::fs::create_dir_all(state.join("pgdata")).expect("pgdata");
    std::os::unix::fs::symlink("/dev/zero", state.join("pgdata/PG_VERSION")).expect("symlink");
    let (_, out) = bounded(&a, &["check"]);
    assert!(out.contains("configuration"), "{out}");
    a.assert_no_leftovers(Duration::from_secs(5));
}
