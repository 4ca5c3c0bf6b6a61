//! A full disk: lines are dropped and counted, children never block, and the log says so
//! once space is back. Needs root (a 1 MiB tmpfs); skipped otherwise.

use super::*;
use crate::logs::{tail, LogPipe};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;

/// Unmounts on drop (lazily if still busy), before the temporary directory goes.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn mount_tiny_tmpfs(dir: &Path) -> Option<Mount> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping full-disk test: needs root to mount a tmpfs");
        return None;
    }
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(dir)
        .status();
    if !status.is_ok_and(|s| s.success()) {
        eprintln!("skipping full-disk test: cannot mount a tmpfs here");
        return None;
    }
    Some(Mount(dir.to_owned()))
}

#[test]
fn full_disk_drops_and_counts_lines_without_blocking() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("mnt");
    fs::create_dir(&d).unwrap();
    let Some(_mount) = mount_tiny_tmpfs(&d) else {
        return;
    };
    let mut s = settings(&d, 256 * 1024);
    s.compress = false;
    let pipe = LogPipe::start("full", &s).unwrap();
    let stats = Arc::clone(&pipe.stats);

    // ~7.5 MB of log for 1 MiB of disk. The child must finish: it never blocks.
    let total = 300_000u64;
    let mut child = Command::new("sh")
        .args(["-c", &format!("seq 1 {total}")])
        .stdin(Stdio::null())
        .stdout(Stdio::from(pipe.writer_fd().unwrap()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_child(&mut child, Duration::from_secs(60));
    assert!(wait_until(Duration::from_secs(30), || {
        let s = stats.snapshot();
        s.lines_written + s.lines_dropped == total
    }));
    let snap = stats.snapshot();
    eprintln!("while full: {snap:?}");
    assert!(snap.lines_dropped > 0, "{snap:?}");
    assert!(snap.disk_full, "{snap:?}");
    let error = snap.last_error.clone().unwrap_or_default();
    assert!(
        error.contains(&d.join("full.log").display().to_string()),
        "{error}"
    );
    assert!(error.contains("No space left"), "{error}");

    // Everything that did get written is whole lines of increasing numbers.
    let numbers: Vec<u64> = all_lines(&d, "full")
        .iter()
        .map(|l| body(l).parse().unwrap())
        .collect();
    assert_eq!(numbers.len() as u64, snap.lines_written);
    assert!(numbers.windows(2).all(|w| w[0] < w[1]));

    // Free the space; after the retry delay, new lines get through with the notice.
    for g in rotate::rotated(&d, "full").unwrap() {
        fs::remove_file(g.plain.unwrap()).unwrap();
    }
    std::thread::sleep(Duration::from_millis(1100));
    let mut w = pipe.make_writer().unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        writeln!(w, "back again").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        !stats.snapshot().disk_full
    }));
    drop(w);
    pipe.close(Duration::from_secs(10)).unwrap();
    let after = stats.snapshot();
    let lines = tail(&d, "full", 1000).unwrap();
    let notice = lines
        .iter()
        .position(|l| body(l).starts_with("koprogo: "))
        .expect("no notice line");
    assert_eq!(
        body(&lines[notice]),
        format!(
            "koprogo: {} log lines dropped (No space left on device (os error 28))",
            after.lines_dropped
        )
    );
    assert_eq!(body(&lines[notice + 1]), "back again");
    assert!(lines[notice + 1..].iter().all(|l| body(l) == "back again"));
    assert!(!after.disk_full);
}
