//! Tests of the log pipeline with real pipes, files and processes. Every wait is bounded;
//! everything lives in temporary directories.

use super::rotate;
use super::LogSettings;
use flate2::read::MultiGzDecoder;
use std::fs::{self, File};
use std::io::Read;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

mod capture;
mod disk_full;
mod reading;
mod retention;

/// Settings for tests: no daily rotation, nothing deleted, compression on.
fn settings(dir: &Path, max_size: u64) -> LogSettings {
    LogSettings {
        dir: dir.to_owned(),
        max_size,
        rotate_daily: false,
        keep_files: 10_000,
        max_age: Duration::from_secs(365 * 24 * 3600),
        compress: true,
    }
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for `child` (bounded); kills it and fails the test on timeout.
fn wait_child(child: &mut Child, timeout: Duration) {
    let mut status = None;
    let done = wait_until(timeout, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if !done {
        let _ = child.kill();
        let _ = child.wait();
        panic!("child still running after {timeout:?}");
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "child failed: {status:?}"
    );
}

/// The whole content of a log file, decompressing `.gz`.
fn read_file(path: &Path) -> String {
    let mut data = Vec::new();
    let file = File::open(path).unwrap();
    if path.extension().is_some_and(|e| e == "gz") {
        MultiGzDecoder::new(file).read_to_end(&mut data).unwrap();
    } else {
        (&file).read_to_end(&mut data).unwrap();
    }
    String::from_utf8(data).unwrap()
}

/// Every file of `service`, oldest first: rotated (plain or `.gz`), then the current one.
fn files_in_order(dir: &Path, service: &str) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = rotate::rotated(dir, service)
        .unwrap()
        .into_iter()
        .map(|g| g.plain.or(g.gz).unwrap())
        .collect();
    let current = dir.join(format!("{service}.log"));
    if current.exists() {
        files.push(current);
    }
    files
}

/// Every line of `service`, oldest first, across all its files.
fn all_lines(dir: &Path, service: &str) -> Vec<String> {
    files_in_order(dir, service)
        .iter()
        .flat_map(|p| {
            let text = read_file(p);
            assert!(text.is_empty() || text.ends_with('\n'), "torn file {p:?}");
            text.lines().map(str::to_owned).collect::<Vec<_>>()
        })
        .collect()
}

/// The line without its timestamp, checking the prefix format
/// (`2026-11-24T21:40:00.123Z `).
fn body(line: &str) -> &str {
    assert!(line.len() >= 25, "no timestamp: {line:?}");
    let (stamp, rest) = line.split_at(25);
    assert!(stamp.ends_with("Z "), "bad timestamp: {line:?}");
    assert_eq!(&stamp[19..20], ".", "no milliseconds: {line:?}");
    chrono::DateTime::parse_from_rfc3339(&stamp[..24])
        .unwrap_or_else(|e| panic!("bad timestamp in {line:?}: {e}"));
    rest
}

/// Names of the files in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}
