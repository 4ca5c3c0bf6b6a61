//! Rotated files: owns their names (`<service>.log.<YYYYMMDD-HHMMSS[-N]>[.gz]`), listing
//! them in order, background compression (`.gz.tmp` → fsync → rename → remove the plain
//! file) and retention (count and age). Only files that parse as one of *this* service's
//! rotated names are ever touched; the current `<service>.log` never is.

use super::{LogSettings, LogStats};
use chrono::{DateTime, Local};
use flate2::write::GzEncoder;
use flate2::Compression;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Work for the background thread of one service.
#[derive(Debug)]
pub(crate) enum Job {
    /// At start: delete stale `.gz.tmp`, compress leftovers, apply retention.
    Startup,
    /// A file was just rotated: compress it (and any earlier file whose compression
    /// failed), apply retention.
    Rotated,
}

/// The time part of a rotated name; orders rotated files oldest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Stamp {
    date: u32,
    time: u32,
    n: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Plain,
    Gz,
    GzTmp,
}

/// One rotation: the plain file and/or its compressed form (both exist only briefly).
#[derive(Debug)]
pub(crate) struct Rotated {
    pub(crate) stamp: Stamp,
    pub(crate) plain: Option<PathBuf>,
    pub(crate) gz: Option<PathBuf>,
}

impl Rotated {
    fn paths(&self) -> impl Iterator<Item = &PathBuf> {
        self.plain.iter().chain(self.gz.iter())
    }
}

/// Parses `file_name` as one of `service`'s rotated files.
pub(crate) fn parse_rotated(service: &str, file_name: &str) -> Option<(Stamp, Kind)> {
    let rest = file_name.strip_prefix(service)?.strip_prefix(".log.")?;
    let (rest, kind) = if let Some(r) = rest.strip_suffix(".gz.tmp") {
        (r, Kind::GzTmp)
    } else if let Some(r) = rest.strip_suffix(".gz") {
        (r, Kind::Gz)
    } else {
        (rest, Kind::Plain)
    };
    let digits = |s: &str, len: Option<usize>| -> Option<u32> {
        let ok = !s.is_empty()
            && s.len() <= 9
            && len.is_none_or(|l| s.len() == l)
            && s.bytes().all(|b| b.is_ascii_digit());
        if ok {
            s.parse().ok()
        } else {
            None
        }
    };
    let mut parts = rest.split('-');
    let date = digits(parts.next()?, Some(8))?;
    let time = digits(parts.next()?, Some(6))?;
    let n = match parts.next() {
        Some(n) => digits(n, None)?,
        None => 0,
    };
    if parts.next().is_some() {
        return None;
    }
    Some((Stamp { date, time, n }, kind))
}

/// `path` with `suffix` appended to its file name.
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// All of `service`'s files in `dir` that parse as rotated names, with their kind.
fn list(dir: &Path, service: &str) -> io::Result<Vec<(Stamp, Kind, PathBuf)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some((stamp, kind)) = parse_rotated(service, name) {
            if entry.file_type().is_ok_and(|t| t.is_file()) {
                found.push((stamp, kind, entry.path()));
            }
        }
    }
    Ok(found)
}

/// `service`'s rotated files (ignoring `.gz.tmp`), oldest first.
pub(crate) fn rotated(dir: &Path, service: &str) -> io::Result<Vec<Rotated>> {
    let mut groups: Vec<Rotated> = Vec::new();
    let mut files = list(dir, service)?;
    files.sort_by_key(|(stamp, _, _)| *stamp);
    for (stamp, kind, path) in files {
        if groups.last().is_none_or(|g| g.stamp != stamp) {
            groups.push(Rotated {
                stamp,
                plain: None,
                gz: None,
            });
        }
        let Some(group) = groups.last_mut() else {
            continue;
        };
        match kind {
            Kind::Plain => group.plain = Some(path),
            Kind::Gz => group.gz = Some(path),
            Kind::GzTmp => {}
        }
    }
    groups.retain(|g| g.plain.is_some() || g.gz.is_some());
    Ok(groups)
}

/// A free name to rotate `service`'s current file to at `now` (local time), adding `-N`
/// when the plain, `.gz` or `.gz.tmp` form of the name is taken.
pub(crate) fn rotated_name(dir: &Path, service: &str, now: DateTime<Local>) -> PathBuf {
    let base = format!("{service}.log.{}", now.format("%Y%m%d-%H%M%S"));
    let taken = |name: &str| {
        ["", ".gz", ".gz.tmp"]
            .iter()
            .any(|s| fs::symlink_metadata(dir.join(format!("{name}{s}"))).is_ok())
    };
    if !taken(&base) {
        return dir.join(base);
    }
    let mut n = 1u32;
    loop {
        let name = format!("{base}-{n}");
        if !taken(&name) || n == u32::MAX {
            return dir.join(name);
        }
        n += 1;
    }
}

/// Gzips `path` into `path.gz` (via `path.gz.tmp`, fsynced, renamed) and removes `path`.
/// The `.gz` keeps the plain file's mtime so retention by age is unaffected.
pub(crate) fn compress(path: &Path) -> io::Result<PathBuf> {
    let gz = with_suffix(path, ".gz");
    let tmp = with_suffix(path, ".gz.tmp");
    let mut renamed = false;
    let result = (|| {
        let mut src = File::open(path)?;
        let mtime = src.metadata()?.modified().ok();
        let out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o640)
            .open(&tmp)?;
        let mut enc = GzEncoder::new(
            BufWriter::with_capacity(256 * 1024, out),
            Compression::fast(),
        );
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => enc.write_all(&buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let out = enc.finish()?.into_inner().map_err(|e| e.into_error())?;
        if let Some(mtime) = mtime {
            // Best effort: only retention by age depends on it.
            let _ = out.set_modified(mtime);
        }
        out.sync_all()?;
        drop(out);
        fs::rename(&tmp, &gz)?;
        renamed = true;
        if let Some(dir) = path.parent() {
            sync_dir(dir);
        }
        fs::remove_file(path)?;
        Ok(gz)
    })();
    if result.is_err() && !renamed {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Makes renames in `dir` durable (best effort).
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// What retention did: the files removed and the errors met (each naming its file).
#[derive(Debug, Default)]
pub(crate) struct Retention {
    pub(crate) removed: Vec<PathBuf>,
    pub(crate) errors: Vec<String>,
}

/// Keeps at most `keep` of `service`'s rotated files (newest by name) and deletes those
/// whose mtime is more than `max_age` before `now`.
pub(crate) fn apply_retention(
    dir: &Path,
    service: &str,
    keep: usize,
    max_age: Duration,
    now: SystemTime,
) -> io::Result<Retention> {
    let mut groups = rotated(dir, service)?;
    groups.reverse(); // newest first
    let mut report = Retention::default();
    for (i, group) in groups.iter().enumerate() {
        let mtime = group
            .paths()
            .filter_map(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
            .max();
        let too_old = mtime
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age > max_age);
        if i < keep && !too_old {
            continue;
        }
        for path in group.paths() {
            match fs::remove_file(path) {
                Ok(()) => report.removed.push(path.clone()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => report
                    .errors
                    .push(format!("deleting old log {}: {e}", path.display())),
            }
        }
    }
    Ok(report)
}

/// At start: removes stale `.gz.tmp` files (a compression interrupted by a crash; the
/// background thread is the only compressor and it is not running yet).
fn remove_stale_tmp(settings: &LogSettings, service: &str, stats: &LogStats) -> io::Result<()> {
    for (_, kind, path) in list(&settings.dir, service)? {
        if kind == Kind::GzTmp {
            if let Err(e) = fs::remove_file(&path) {
                stats.set_error(format!("deleting stale {}: {e}", path.display()));
            }
        }
    }
    Ok(())
}

/// Brings every rotated file of `service` to its final form: where a `.gz` exists next to
/// the plain file (it is renamed into place only when complete) the plain copy goes; with
/// `compress`, plain files are compressed, oldest first. Run at start and after each
/// rotation, so a compression that failed (say, on a full disk) is retried later.
fn catch_up(settings: &LogSettings, service: &str, stats: &LogStats) -> io::Result<()> {
    for group in rotated(&settings.dir, service)? {
        match (&group.plain, &group.gz) {
            (Some(plain), Some(_)) => match fs::remove_file(plain) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    stats.set_error(format!("deleting {}: {e}", plain.display()))
                }
                _ => {}
            },
            (Some(plain), None) if settings.compress => compress_reporting(plain, stats),
            _ => {}
        }
    }
    Ok(())
}

fn compress_reporting(path: &Path, stats: &LogStats) {
    match compress(path) {
        Ok(_) => {}
        // Retention may already have removed it.
        Err(e) if e.kind() == io::ErrorKind::NotFound && !path.exists() => {}
        Err(e) => stats.set_error(format!("compressing {}: {e}", path.display())),
    }
}

/// The background thread of one service: runs jobs until every sender is gone.
pub(crate) fn run_worker(
    settings: LogSettings,
    service: String,
    stats: Arc<LogStats>,
    jobs: Receiver<Job>,
) {
    for job in jobs {
        let scanned = match job {
            Job::Startup => remove_stale_tmp(&settings, &service, &stats)
                .and_then(|()| catch_up(&settings, &service, &stats)),
            Job::Rotated => catch_up(&settings, &service, &stats),
        };
        if let Err(e) = scanned {
            stats.set_error(format!(
                "scanning {} for old logs of {service}: {e}",
                settings.dir.display()
            ));
        }
        match apply_retention(
            &settings.dir,
            &service,
            settings.keep_files,
            settings.max_age,
            SystemTime::now(),
        ) {
            Ok(report) => {
                if let Some(last) = report.errors.into_iter().last() {
                    stats.set_error(last);
                }
            }
            Err(e) => stats.set_error(format!(
                "listing {} for retention of {service}: {e}",
                settings.dir.display()
            )),
        }
    }
}
