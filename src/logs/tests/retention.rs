//! Rotated names, retention by count and age, leftovers at start.

use super::*;
use crate::logs::rotate::{apply_retention, parse_rotated, Kind};
use crate::logs::LogPipe;
use std::sync::Arc;
use std::time::SystemTime;

fn touch(dir: &Path, name: &str, age: Duration) {
    let f = File::create(dir.join(name)).unwrap();
    f.set_modified(SystemTime::now() - age).unwrap();
}

const HOUR: Duration = Duration::from_secs(3600);

#[test]
fn rotated_names_parse_only_for_their_service() {
    let p = |svc: &str, name: &str| parse_rotated(svc, name).map(|(_, k)| k);
    assert_eq!(p("api", "api.log.20260101-120000"), Some(Kind::Plain));
    assert_eq!(p("api", "api.log.20260101-120000-3.gz"), Some(Kind::Gz));
    assert_eq!(
        p("api", "api.log.20260101-120000.gz.tmp"),
        Some(Kind::GzTmp)
    );
    for bad in [
        "api.log",
        "api.log.",
        "api.log.2026010-120000",
        "api.log.20260101-120000-",
        "api.log.20260101-120000-1-2",
        "api.log.20260101-120000.bak",
        "api.log.x20260101-120000",
        "apix.log.20260101-120000",
        "api.log.20260101-120000-+1",
    ] {
        assert_eq!(p("api", bad), None, "{bad}");
    }
    assert_eq!(p("ap", "api.log.20260101-120000"), None);
    let (a, _) = parse_rotated("s", "s.log.20260101-120000-2").unwrap();
    let (b, _) = parse_rotated("s", "s.log.20260101-120000-10").unwrap();
    let (c, _) = parse_rotated("s", "s.log.20260101-120001").unwrap();
    assert!(a < b && b < c);
}

#[test]
fn retention_by_count_keeps_the_newest_and_spares_others() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rotated = [
        "api.log.20260101-000000.gz",
        "api.log.20260102-000000.gz",
        "api.log.20260103-000000-2.gz",
        "api.log.20260103-000000-10.gz",
        "api.log.20260104-000000",
        "api.log.20260105-000000",
    ];
    for name in rotated {
        touch(d, name, HOUR);
    }
    let others = [
        "api.log",
        "apix.log.20250101-000000.gz",
        "other.log.20200101-000000.gz",
        "other.log",
        "api.log.notes",
    ];
    for name in others {
        touch(d, name, 1000 * HOUR);
    }
    let report = apply_retention(d, "api", 3, 100 * HOUR, SystemTime::now()).unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.removed.len(), 3);
    let mut expected: Vec<String> = others.iter().map(|s| s.to_string()).collect();
    expected.extend(rotated[3..].iter().map(|s| s.to_string()));
    expected.sort();
    assert_eq!(names(d), expected);
}

#[test]
fn retention_by_age_deletes_old_files_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    touch(d, "db.log.20260101-000000.gz", 200 * HOUR);
    touch(d, "db.log.20260102-000000.gz", 10 * HOUR);
    // A newer name with an old mtime goes too: age is by mtime.
    touch(d, "db.log.20260103-000000", 200 * HOUR);
    touch(d, "db.log.20260104-000000.gz", HOUR);
    touch(d, "db.log", 500 * HOUR);
    touch(d, "web.log.20200101-000000.gz", 500 * HOUR);
    let report = apply_retention(d, "db", 100, 168 * HOUR, SystemTime::now()).unwrap();
    assert_eq!(report.removed.len(), 2);
    assert_eq!(
        names(d),
        [
            "db.log",
            "db.log.20260102-000000.gz",
            "db.log.20260104-000000.gz",
            "web.log.20200101-000000.gz"
        ]
    );
}

#[test]
fn pipeline_applies_retention_after_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    touch(d, "other.log.20200101-000000.gz", 1000 * HOUR);
    let mut s = settings(d, 16 * 1024);
    s.keep_files = 2;
    let pipe = LogPipe::start("ret", &s).unwrap();
    let stats = Arc::clone(&pipe.stats);
    {
        let mut w = pipe.make_writer().unwrap();
        for i in 0..5000 {
            writeln!(w, "line {i}").unwrap();
        }
    }
    use std::io::Write;
    pipe.close(Duration::from_secs(30)).unwrap();
    assert!(stats.snapshot().rotations >= 5);
    let files = names(d);
    assert_eq!(files.len(), 4, "{files:?}");
    assert!(files.contains(&"other.log.20200101-000000.gz".to_string()));
    assert!(files.contains(&"ret.log".to_string()));
    // The newest lines survive.
    let lines = all_lines(d, "ret");
    assert_eq!(body(lines.last().unwrap()), "line 4999");
}

#[test]
fn start_finishes_leftovers_from_an_earlier_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Never compressed.
    fs::write(d.join("pg.log.20260101-000000"), "one\n").unwrap();
    // Compressed, but the plain file was not removed yet.
    fs::write(d.join("pg.log.20260102-000000"), "two\n").unwrap();
    let mut gz = flate2::write::GzEncoder::new(
        File::create(d.join("pg.log.20260102-000000.gz")).unwrap(),
        flate2::Compression::default(),
    );
    std::io::Write::write_all(&mut gz, b"two\n").unwrap();
    gz.finish().unwrap();
    // Interrupted compression.
    fs::write(d.join("pg.log.20260103-000000"), "three\n").unwrap();
    fs::write(d.join("pg.log.20260103-000000.gz.tmp"), "partial").unwrap();
    // Not ours.
    fs::write(d.join("other.log.20260101-000000"), "x\n").unwrap();
    fs::write(d.join("other.log.20260101-000000.gz.tmp"), "x").unwrap();

    let pipe = LogPipe::start("pg", &settings(d, 1 << 20)).unwrap();
    pipe.close(Duration::from_secs(10)).unwrap();
    assert_eq!(
        names(d),
        [
            "other.log.20260101-000000",
            "other.log.20260101-000000.gz.tmp",
            "pg.log",
            "pg.log.20260101-000000.gz",
            "pg.log.20260102-000000.gz",
            "pg.log.20260103-000000.gz",
        ]
    );
    let content: Vec<String> = all_lines(d, "pg");
    assert_eq!(content, ["one", "two", "three"]);
}
