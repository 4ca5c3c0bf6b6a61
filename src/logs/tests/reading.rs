//! `tail`, `follow` and `services` against real rotated logs.

use super::*;
use crate::logs::{follow, services, tail, LogPipe};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[test]
fn tail_reads_across_rotated_and_compressed_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pipe = LogPipe::start("api", &settings(d, 8 * 1024)).unwrap();
    let stats = Arc::clone(&pipe.stats);
    {
        let mut w = pipe.make_writer().unwrap();
        for i in 0..2000 {
            writeln!(w, "line {i}").unwrap();
        }
    }
    pipe.close(Duration::from_secs(30)).unwrap();
    assert!(stats.snapshot().rotations >= 5);
    // Keep one rotated file uncompressed, as if its compression were still running.
    let groups = rotate::rotated(d, "api").unwrap();
    let second_newest = groups[groups.len() - 2].gz.clone().unwrap();
    let plain = second_newest.with_extension("");
    fs::write(&plain, read_file(&second_newest)).unwrap();
    fs::remove_file(&second_newest).unwrap();

    let all = all_lines(d, "api");
    assert_eq!(all.len(), 2000);
    let current_len = read_file(&d.join("api.log")).lines().count();
    for n in [0, 1, current_len, current_len + 1, 500, 1999, 2000, 5000] {
        let got = tail(d, "api", n).unwrap();
        let want = &all[all.len() - n.min(all.len())..];
        assert_eq!(got, want, "n = {n}");
    }
    let err = tail(d, "nope", 10).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert!(tail(d, "../api", 1).is_err());
    // Only rotated files left: still readable.
    fs::remove_file(d.join("api.log")).unwrap();
    assert_eq!(
        tail(d, "api", 3).unwrap(),
        &all[all.len() - current_len - 3..all.len() - current_len]
    );
}

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

#[test]
fn follow_picks_up_lines_across_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_owned();
    let mut s = settings(&d, 4096);
    s.compress = false;
    let pipe = LogPipe::start("web", &s).unwrap();
    let stats = Arc::clone(&pipe.stats);
    let out = Shared::default();
    let stop = Arc::new(AtomicBool::new(false));
    let follower = {
        let (d, mut out, stop) = (d.clone(), out.clone(), Arc::clone(&stop));
        std::thread::spawn(move || follow(&d, "web", &mut out, &|| stop.load(Ordering::Relaxed)))
    };
    let mut w = pipe.make_writer().unwrap();
    // Follow starts at the end of the file: wait until it is surely reading.
    let ready = wait_until(Duration::from_secs(10), || {
        writeln!(w, "warm-up").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        out.text().contains("warm-up")
    });
    assert!(ready, "follow printed nothing");
    // About one rotation per batch, slower than follow's 200 ms poll.
    for batch in 0..6 {
        for i in 0..100 {
            writeln!(w, "n {}", batch * 100 + i).unwrap();
        }
        std::thread::sleep(Duration::from_millis(400));
    }
    assert!(wait_until(Duration::from_secs(10), || out
        .text()
        .contains("n 599\n")));
    stop.store(true, Ordering::Relaxed);
    let started = Instant::now();
    while !follower.is_finished() && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(follower.is_finished(), "follow ignored stop");
    follower.join().unwrap().unwrap();
    drop(w);
    pipe.close(Duration::from_secs(10)).unwrap();
    assert!(stats.snapshot().rotations >= 3, "{:?}", stats.snapshot());

    let text = out.text();
    let numbers: Vec<u32> = text
        .lines()
        .map(body)
        .filter_map(|b| b.strip_prefix("n "))
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(numbers, (0..600).collect::<Vec<u32>>());
}

#[test]
fn services_lists_current_logs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for name in [
        "postgres.log",
        "api.log",
        "api.log.20260101-000000.gz",
        "notes.txt",
        ".log",
    ] {
        fs::write(d.join(name), "").unwrap();
    }
    fs::create_dir(d.join("dir.log")).unwrap();
    assert_eq!(services(d).unwrap(), ["api", "postgres"]);
}
