//! Capture: real children, rotation under load, line splitting, flushing, closing.

use super::*;
use crate::logs::pipe::{find_newline, piece_end};
use crate::logs::writer::next_local_midnight;
use crate::logs::{LogPipe, MAX_LINE};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::Arc;

#[test]
fn child_output_rotates_compresses_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = LogPipe::start("seq", &settings(dir.path(), 256 * 1024)).unwrap();
    let stats = Arc::clone(&pipe.stats);
    let mut child = Command::new("sh")
        .args(["-c", "seq 1 200000"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(pipe.writer_fd().unwrap()))
        .stderr(Stdio::from(pipe.writer_fd().unwrap()))
        .spawn()
        .unwrap();
    wait_child(&mut child, Duration::from_secs(60));
    drop(child);
    pipe.close(Duration::from_secs(60)).unwrap();

    let snap = stats.snapshot();
    assert_eq!(snap.lines_written, 200_000, "{snap:?}");
    assert_eq!(snap.lines_dropped, 0, "{snap:?}");
    assert!(snap.rotations >= 3, "{snap:?}");
    assert!(!snap.disk_full);
    assert_eq!(snap.last_error, None);

    let files = names(dir.path());
    let gz = files.iter().filter(|n| n.ends_with(".gz")).count();
    assert_eq!(gz as u64, snap.rotations, "{files:?}");
    assert!(!files.iter().any(|n| n.ends_with(".tmp")), "{files:?}");
    let plain_rotated = files
        .iter()
        .filter(|n| n.starts_with("seq.log.") && !n.ends_with(".gz"));
    assert_eq!(plain_rotated.count(), 0, "{files:?}");

    // Each file within max_size, and the concatenation is 1..=200000 exactly once, in order.
    let mut bytes = 0;
    for path in files_in_order(dir.path(), "seq") {
        let len = read_file(&path).len() as u64;
        assert!(len <= 256 * 1024, "{path:?} has {len} bytes");
        bytes += len;
    }
    assert_eq!(bytes, snap.bytes_written);
    let numbers: Vec<u64> = all_lines(dir.path(), "seq")
        .iter()
        .map(|l| body(l).parse().unwrap())
        .collect();
    assert_eq!(numbers, (1..=200_000).collect::<Vec<u64>>());
}

#[test]
fn long_lines_are_split_and_a_final_partial_line_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = LogPipe::start("long", &settings(dir.path(), 10 << 20)).unwrap();
    let long = "a".repeat(150 * 1024);
    // Odd offset so the cut at MAX_LINE falls inside a two-byte character.
    let utf8 = format!("x{}", "é".repeat(40_000));
    {
        let mut w = File::from(pipe.writer_fd().unwrap());
        // Written in small pieces so lines span many reads.
        let all = format!("{long}\n\nshort\n{utf8}\ntail-without-newline");
        for piece in all.as_bytes().chunks(1000) {
            w.write_all(piece).unwrap();
        }
    }
    pipe.close(Duration::from_secs(10)).unwrap();
    let lines = all_lines(dir.path(), "long");
    let bodies: Vec<&str> = lines.iter().map(|l| body(l)).collect();
    assert_eq!(bodies.len(), 3 + 1 + 1 + 2 + 1, "{:?}", bodies.len());
    assert_eq!(bodies[0].len(), MAX_LINE);
    assert_eq!(bodies[1].len(), MAX_LINE);
    assert_eq!(bodies[..3].concat(), long);
    assert_eq!(bodies[3], "");
    assert_eq!(bodies[4], "short");
    assert!(bodies[5].len() <= MAX_LINE && bodies[5].len() >= MAX_LINE - 3);
    assert_eq!(bodies[5..7].concat(), utf8);
    assert_eq!(bodies[7], "tail-without-newline");
}

#[test]
fn helpers_find_newlines_and_cut_on_char_boundaries() {
    for len in 0..40 {
        for at in 0..len {
            let mut v = vec![b'x'; len];
            v[at] = b'\n';
            assert_eq!(find_newline(&v), Some(at));
            v.push(b'\n');
            assert_eq!(find_newline(&v), Some(at));
        }
        assert_eq!(find_newline(&vec![b'x'; len]), None);
    }
    // Bytes with the high bit set must not produce false matches.
    assert_eq!(
        find_newline(&[0x8a, 0x0b, 0x09, 0xff, 0x8a, 0, 1, 2, 3]),
        None
    );
    let mut s = vec![b'a'; MAX_LINE + 10];
    assert_eq!(piece_end(&s), MAX_LINE);
    s[MAX_LINE - 1] = 0xE2; // three-byte character starting just before the cut
    s[MAX_LINE] = 0x82;
    s[MAX_LINE + 1] = 0xAC;
    assert_eq!(piece_end(&s), MAX_LINE - 1);
}

#[test]
fn lines_are_visible_before_close_and_tracing_writer_works() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = LogPipe::start("koprogo", &settings(dir.path(), 10 << 20)).unwrap();
    let mut w = pipe.make_writer().unwrap();
    let mut w2 = w.clone();
    let started = chrono::Utc::now();
    w.write_all(b"first line\n").unwrap();
    w2.write_all(b"second line\n").unwrap();
    // Flushed as soon as the pipe is empty, without closing anything.
    assert!(wait_until(Duration::from_secs(5), || {
        crate::logs::tail(dir.path(), "koprogo", 10).is_ok_and(|l| l.len() == 2)
    }));
    let lines = crate::logs::tail(dir.path(), "koprogo", 10).unwrap();
    assert_eq!(body(&lines[0]), "first line");
    assert_eq!(body(&lines[1]), "second line");
    let stamp = chrono::DateTime::parse_from_rfc3339(&lines[0][..24]).unwrap();
    let age = stamp.signed_duration_since(started).num_milliseconds();
    assert!((-5..5_000).contains(&age), "timestamp off by {age} ms");
    drop((w, w2));
    pipe.close(Duration::from_secs(10)).unwrap();
    let mode = fs::metadata(dir.path().join("koprogo.log")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        mode.permissions().mode() & 0o137,
        0,
        "mode {:o}",
        mode.permissions().mode()
    );
}

#[test]
fn close_is_bounded_when_a_write_end_is_still_open() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = LogPipe::start("held", &settings(dir.path(), 10 << 20)).unwrap();
    let stats = Arc::clone(&pipe.stats);
    let mut held = File::from(pipe.writer_fd().unwrap());
    // The dup is close-on-exec: children get it only through Stdio.
    let flags = nix::fcntl::fcntl(held.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
    assert!(flags & libc::FD_CLOEXEC != 0);
    held.write_all(b"before close\n").unwrap();
    let started = Instant::now();
    let err = pipe.close(Duration::from_millis(300)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(2));
    // The thread still stops by itself once the pipe is empty, with the line written.
    assert!(wait_until(Duration::from_secs(5), || {
        fs::read_to_string(dir.path().join("held.log")).is_ok_and(|s| s.contains("before close"))
    }));
    assert_eq!(stats.snapshot().lines_written, 1);
    drop(held);
}

#[test]
fn a_file_from_an_earlier_day_rotates_at_start_with_rotate_daily() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.log");
    fs::write(&path, "2020-01-01T00:00:00.000Z yesterday\n").unwrap();
    let two_days_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 24 * 3600);
    File::options()
        .append(true)
        .open(&path)
        .unwrap()
        .set_modified(two_days_ago)
        .unwrap();
    let mut s = settings(dir.path(), 10 << 20);
    s.rotate_daily = true;
    s.compress = false;
    let pipe = LogPipe::start("old", &s).unwrap();
    let stats = Arc::clone(&pipe.stats);
    assert!(wait_until(Duration::from_secs(5), || stats
        .snapshot()
        .rotations
        == 1));
    File::from(pipe.writer_fd().unwrap())
        .write_all(b"today\n")
        .unwrap();
    pipe.close(Duration::from_secs(10)).unwrap();
    let lines = all_lines(dir.path(), "old");
    assert_eq!(lines.len(), 2);
    assert!(lines[0].ends_with(" yesterday"));
    assert_eq!(body(&lines[1]), "today");
    assert_eq!(files_in_order(dir.path(), "old").len(), 2);
    assert_eq!(stats.snapshot().rotations, 1);
}

#[test]
fn next_local_midnight_is_a_local_midnight_within_a_day() {
    use chrono::{Local, TimeZone, Timelike};
    let now = chrono::Utc::now().timestamp_millis();
    for offset in [0i64, 3_600_000, 86_399_999, 40 * 86_400_000] {
        let after = now + offset;
        let m = next_local_midnight(after);
        assert!(m > after && m - after <= 26 * 3_600_000, "{after} -> {m}");
        let local = Local.timestamp_millis_opt(m).unwrap();
        assert_eq!((local.minute(), local.second()), (0, 0));
        assert!(local.hour() < 4);
    }
}

#[test]
fn bad_service_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["", "../x", "a/b", ".hidden"] {
        let err = LogPipe::start(name, &settings(dir.path(), 1024))
            .err()
            .unwrap();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }
    assert!(names(dir.path()).is_empty());
}
