//! The current `<service>.log`, as seen from its capture thread: owns timestamping each
//! line, buffering (one big `write` per flush, never an fsync per line), rotation by size
//! and at local midnight (rename + reopen, handing the old file to the background thread),
//! and write errors: the lines are dropped and counted, the file is retried at most once
//! per second, and on recovery one `koprogo: N log lines dropped (reason)` line is written.

use super::rotate::{self, Job};
use super::{is_disk_full, LogSettings, LogStats};
use chrono::{DateTime, Local, SecondsFormat, TimeZone, Utc};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Buffered output is written once it reaches this size (and whenever the pipe is empty).
const FLUSH_AT: usize = 256 * 1024;
/// A failing file is retried at most this often.
const RETRY: Duration = Duration::from_secs(1);
/// `2026-11-24T21:40:00.123Z ` — RFC 3339 UTC with milliseconds, then a space.
const PREFIX_LEN: usize = 25;

/// Writes are failing: lines are dropped until `retry_at`, then the file is tried again.
struct Failing {
    dropped: u64,
    reason: String,
    retry_at: Instant,
}

pub(crate) struct LogFile {
    settings: LogSettings,
    service: String,
    path: PathBuf,
    stats: Arc<LogStats>,
    file: Option<File>,
    /// Bytes in the file (not counting `out`).
    size: u64,
    out: Vec<u8>,
    out_lines: u64,
    prefix: [u8; PREFIX_LEN],
    prefix_ms: i64,
    now: Instant,
    now_ms: i64,
    /// With `rotate_daily`: the next local midnight, in Unix milliseconds.
    next_midnight_ms: Option<i64>,
    failing: Option<Failing>,
    /// A rename failed: do not try rotating again before this.
    rotate_retry_at: Option<Instant>,
    jobs: Sender<Job>,
}

fn open_log(path: &Path) -> io::Result<(File, u64)> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)?;
    let size = file.metadata()?.len();
    Ok((file, size))
}

fn unix_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

/// The first local midnight strictly after `after_ms` (Unix ms). Where midnight does not
/// exist (a DST jump at 00:00) the first valid time after it.
pub(crate) fn next_local_midnight(after_ms: i64) -> i64 {
    let fallback = after_ms.saturating_add(3_600_000);
    let Some(utc) = DateTime::<Utc>::from_timestamp_millis(after_ms) else {
        return fallback;
    };
    let Some(next_day) = utc.with_timezone(&Local).date_naive().succ_opt() else {
        return fallback;
    };
    for hour in 0..4 {
        if let Some(t) = next_day
            .and_hms_opt(hour, 0, 0)
            .and_then(|naive| Local.from_local_datetime(&naive).earliest())
        {
            return t.timestamp_millis();
        }
    }
    fallback
}

impl LogFile {
    /// Opens (creating) `<dir>/<service>.log`. A full disk is not an error here: the file
    /// starts in the failing state and is retried like any failed write.
    pub(crate) fn open(
        service: &str,
        settings: &LogSettings,
        stats: Arc<LogStats>,
        jobs: Sender<Job>,
    ) -> io::Result<LogFile> {
        let path = settings.dir.join(format!("{service}.log"));
        let now = SystemTime::now();
        let mut log = LogFile {
            settings: settings.clone(),
            service: service.to_owned(),
            path,
            stats,
            file: None,
            size: 0,
            out: Vec::with_capacity(FLUSH_AT + 2 * super::MAX_LINE),
            out_lines: 0,
            prefix: [b' '; PREFIX_LEN],
            prefix_ms: i64::MIN,
            now: Instant::now(),
            now_ms: unix_ms(now),
            next_midnight_ms: None,
            failing: None,
            rotate_retry_at: None,
            jobs,
        };
        match open_log(&log.path) {
            Ok((file, size)) => {
                // A non-empty file from an earlier day rotates at the first chance.
                let since = file.metadata().and_then(|m| m.modified()).unwrap_or(now);
                log.file = Some(file);
                log.size = size;
                let base = if size > 0 { since.min(now) } else { now };
                log.schedule_midnight(unix_ms(base));
            }
            Err(e) if is_disk_full(&e) => {
                log.fail(&e, "opening", 0);
                log.schedule_midnight(log.now_ms);
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("opening {}: {e}", log.path.display()),
                ))
            }
        }
        Ok(log)
    }

    pub(crate) fn stats(&self) -> &LogStats {
        &self.stats
    }

    fn schedule_midnight(&mut self, from_ms: i64) {
        self.next_midnight_ms = self
            .settings
            .rotate_daily
            .then(|| next_local_midnight(from_ms));
    }

    /// How long the capture thread may sleep without missing a midnight rotation.
    pub(crate) fn poll_timeout(&self) -> Duration {
        const MAX: Duration = Duration::from_secs(1);
        match self.next_midnight_ms {
            Some(m) => {
                let left = m.saturating_sub(unix_ms(SystemTime::now())).max(0);
                MAX.min(Duration::from_millis(left.unsigned_abs()))
            }
            None => MAX,
        }
    }

    /// Called before the lines of each chunk read from the pipe (they share its time), and
    /// when the pipe was idle: refreshes the clock and rotates at local midnight.
    pub(crate) fn begin_chunk(&mut self) {
        self.now = Instant::now();
        self.now_ms = unix_ms(SystemTime::now());
        if self.now_ms != self.prefix_ms {
            self.prefix_ms = self.now_ms;
            if let Some(t) = DateTime::<Utc>::from_timestamp_millis(self.now_ms) {
                let text = t.to_rfc3339_opts(SecondsFormat::Millis, true);
                let bytes = text.as_bytes();
                if bytes.len() == PREFIX_LEN - 1 {
                    self.prefix[..PREFIX_LEN - 1].copy_from_slice(bytes);
                }
            }
        }
        if let Some(midnight) = self.next_midnight_ms {
            if self.now_ms >= midnight {
                if self.size + self.out.len() as u64 > 0 && self.failing.is_none() {
                    self.rotate();
                } else {
                    self.schedule_midnight(self.now_ms);
                }
            }
        }
    }

    /// Appends one line (without its newline) to the log.
    pub(crate) fn line(&mut self, content: &[u8]) {
        if self.failing.is_some() && !self.try_recover() {
            self.drop_lines(1);
            return;
        }
        let len = (PREFIX_LEN + content.len() + 1) as u64;
        let pending = self.size + self.out.len() as u64;
        if pending > 0
            && pending + len > self.settings.max_size
            && self.rotate_retry_at.is_none_or(|t| self.now >= t)
        {
            self.rotate();
            if self.failing.is_some() {
                self.drop_lines(1);
                return;
            }
        }
        self.out.extend_from_slice(&self.prefix);
        self.out.extend_from_slice(content);
        self.out.push(b'\n');
        self.out_lines += 1;
        if self.out.len() >= FLUSH_AT {
            self.flush();
        }
    }

    fn drop_lines(&mut self, n: u64) {
        self.stats.lines_dropped.fetch_add(n, Ordering::Relaxed);
        if let Some(f) = &mut self.failing {
            f.dropped += n;
        }
    }

    /// Records a failure that lost `lost` lines and enters (or stays in) the failing state.
    fn fail(&mut self, err: &io::Error, what: &str, lost: u64) {
        if is_disk_full(err) {
            self.stats.disk_full.store(true, Ordering::Relaxed);
        }
        self.stats
            .set_error(format!("{what} {}: {err}", self.path.display()));
        let retry_at = Instant::now() + RETRY;
        match &mut self.failing {
            Some(f) => {
                f.reason = err.to_string();
                f.retry_at = retry_at;
            }
            None => {
                self.failing = Some(Failing {
                    dropped: 0,
                    reason: err.to_string(),
                    retry_at,
                })
            }
        }
        self.drop_lines(lost);
    }

    /// Writes `out` to the file. On error the lines not completely written are lost: a torn
    /// last line is cut off again so every line stays whole. Returns the error and how many
    /// lines were lost; the buffer is empty afterwards either way.
    fn write_out(&mut self) -> Result<(), (io::Error, u64)> {
        let lines = std::mem::take(&mut self.out_lines);
        if self.out.is_empty() {
            return Ok(());
        }
        let Some(file) = self.file.as_mut() else {
            self.out.clear();
            return Err((io::Error::from(io::ErrorKind::NotFound), lines));
        };
        let mut done = 0;
        let mut error = None;
        while done < self.out.len() {
            match file.write(&self.out[done..]) {
                Ok(0) => {
                    error = Some(io::Error::from(io::ErrorKind::WriteZero));
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        let result = match error {
            None => {
                self.size += done as u64;
                self.stats.lines_written.fetch_add(lines, Ordering::Relaxed);
                self.stats
                    .bytes_written
                    .fetch_add(done as u64, Ordering::Relaxed);
                Ok(())
            }
            Some(e) => {
                let whole = self.out[..done]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |i| i + 1);
                if done > whole {
                    let _ = file.set_len(self.size + whole as u64);
                }
                let written = self.out[..whole].iter().filter(|&&b| b == b'\n').count() as u64;
                self.size = file
                    .metadata()
                    .map_or(self.size + whole as u64, |m| m.len());
                self.stats
                    .lines_written
                    .fetch_add(written, Ordering::Relaxed);
                self.stats
                    .bytes_written
                    .fetch_add(whole as u64, Ordering::Relaxed);
                Err((e, lines - written))
            }
        };
        self.out.clear();
        result
    }

    /// Writes out the buffer (called whenever the pipe has no more data ready).
    pub(crate) fn flush(&mut self) {
        if let Err((e, lost)) = self.write_out() {
            self.fail(&e, "writing", lost);
        }
    }

    /// In the failing state, once `retry_at` has passed: reopen the file if needed and
    /// write the "lines dropped" notice. `true` when the file works again.
    fn try_recover(&mut self) -> bool {
        let Some(failing) = &self.failing else {
            return true;
        };
        if self.now < failing.retry_at {
            return false;
        }
        let notice = format!(
            "koprogo: {} log lines dropped ({})",
            failing.dropped, failing.reason
        );
        if self.file.is_none() {
            match open_log(&self.path) {
                Ok((file, size)) => {
                    self.file = Some(file);
                    self.size = size;
                }
                Err(e) => {
                    self.fail(&e, "opening", 0);
                    return false;
                }
            }
        }
        self.out.clear();
        self.out.extend_from_slice(&self.prefix);
        self.out.extend_from_slice(notice.as_bytes());
        self.out.push(b'\n');
        self.out_lines = 1;
        if let Err((e, _)) = self.write_out() {
            // Only our notice was lost; it is not one of the children's lines.
            self.fail(&e, "writing", 0);
            return false;
        }
        self.failing = None;
        self.stats.disk_full.store(false, Ordering::Relaxed);
        true
    }

    /// Rename + reopen. The old file goes to the background thread (compression,
    /// retention). A failed rename keeps writing the current file and retries in a second.
    fn rotate(&mut self) {
        self.flush();
        let target = rotate::rotated_name(&self.settings.dir, &self.service, Local::now());
        match fs::rename(&self.path, &target) {
            Ok(()) => {
                self.rotate_retry_at = None;
                self.stats.rotations.fetch_add(1, Ordering::Relaxed);
                // The receiver is gone only if the background thread died; the rotated
                // file is then compressed at the next start.
                let _ = self.jobs.send(Job::Rotated);
            }
            // Someone deleted the current file: start a new one, nothing to rotate.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                self.stats.set_error(format!(
                    "rotating {} to {}: {e}",
                    self.path.display(),
                    target.display()
                ));
                self.rotate_retry_at = Some(self.now + RETRY);
                return;
            }
        }
        self.file = None;
        self.size = 0;
        match open_log(&self.path) {
            Ok((file, size)) => {
                self.file = Some(file);
                self.size = size;
            }
            Err(e) => self.fail(&e, "opening", 0),
        }
        self.schedule_midnight(self.now_ms);
    }

    /// At EOF: one last recovery attempt, write out, fsync.
    pub(crate) fn finish(mut self) -> io::Result<()> {
        if let Some(f) = self.failing.as_mut().filter(|f| f.dropped > 0) {
            f.retry_at = self.now;
            self.try_recover();
        }
        self.flush();
        match &self.file {
            Some(file) => file.sync_all().map_err(|e| {
                let e = io::Error::new(e.kind(), format!("fsync {}: {e}", self.path.display()));
                self.stats.set_error(e.to_string());
                e
            }),
            None => Ok(()),
        }
    }
}
