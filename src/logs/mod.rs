//! Log capture pipeline: owns everything between a child's stdout/stderr and the files
//! under `<logs>`. This file holds the shared types (settings and counters) and the
//! public surface; the work is split into:
//!
//! - `pipe.rs`   — [`LogPipe`]: the pipe, its `log-<service>` capture thread, line
//!   splitting, [`PipeWriter`];
//! - `writer.rs` — the current `<service>.log`: timestamps, buffering, size/daily rotation,
//!   disk-error handling (drop and count, never block);
//! - `rotate.rs` — rotated file names, and the `logz-<service>` background thread:
//!   compression, retention;
//! - `read.rs`   — [`tail`], [`follow`], [`services`] for `koprogo logs`.
//!
//! Invariant ("Logs lose nothing", DESIGN.md): rotation is rename + reopen, every line goes
//! whole into exactly one file, and a failing disk drops and counts lines (and says so in
//! the log once it recovers) instead of blocking the children.
//!
//! Nothing in this module may emit `tracing` events from the capture threads: the
//! supervisor's own tracing output goes through one of these pipes, so a capture thread
//! logging into its own pipe could deadlock. Errors go to [`LogStats::last_error`].

use crate::sync::LockExt;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

mod pipe;
mod read;
mod rotate;
mod writer;

#[cfg(test)]
mod tests;

pub use pipe::{LogPipe, PipeWriter};
pub use read::{follow, services, tail};

/// Longest line content (bytes, without the newline) written as one log line; longer
/// lines are split into pieces of at most this size, each with its own timestamp.
pub const MAX_LINE: usize = 64 * 1024;

/// Settings from the config's `[logs]` section.
#[derive(Clone, Debug)]
pub struct LogSettings {
    /// The `<logs>` directory; it exists already.
    pub dir: PathBuf,
    /// Rotate when the current file would exceed this many bytes (default 10 MiB).
    pub max_size: u64,
    /// Also rotate at local midnight (`chrono::Local`) when the file is non-empty.
    pub rotate_daily: bool,
    /// Rotated files kept per service, newest first (default 14).
    pub keep_files: usize,
    /// Rotated files whose mtime is older than this are deleted (default 7 days).
    pub max_age: Duration,
    /// Gzip rotated files in a background thread (default true).
    pub compress: bool,
}

impl LogSettings {
    /// The defaults (10 MiB, daily, 14 files, 7 days, compressed) for `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> LogSettings {
        LogSettings {
            dir: dir.into(),
            max_size: 10 * 1024 * 1024,
            rotate_daily: true,
            keep_files: 14,
            max_age: Duration::from_secs(7 * 24 * 3600),
            compress: true,
        }
    }
}

/// Counters shared with status/metrics. All atomics; cheap to read at any time.
#[derive(Debug, Default)]
pub struct LogStats {
    /// Lines written into log files (including the "lines dropped" notices).
    pub lines_written: AtomicU64,
    /// Bytes written into log files (timestamps included).
    pub bytes_written: AtomicU64,
    /// Lines lost because the file could not be written (full disk, I/O error).
    pub lines_dropped: AtomicU64,
    /// Rotations of the current file.
    pub rotations: AtomicU64,
    /// Set while writes fail with ENOSPC/EDQUOT; cleared when a write succeeds again.
    pub disk_full: AtomicBool,
    /// The last error met (writing, rotating, compressing, deleting), naming the file.
    pub last_error: Mutex<Option<String>>,
}

/// A copy of [`LogStats`] at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LogStatsSnapshot {
    pub lines_written: u64,
    pub bytes_written: u64,
    pub lines_dropped: u64,
    pub rotations: u64,
    pub disk_full: bool,
    pub last_error: Option<String>,
}

impl LogStats {
    /// Reads every counter (each one atomically; the set is not one transaction).
    pub fn snapshot(&self) -> LogStatsSnapshot {
        LogStatsSnapshot {
            lines_written: self.lines_written.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            lines_dropped: self.lines_dropped.load(Ordering::Relaxed),
            rotations: self.rotations.load(Ordering::Relaxed),
            disk_full: self.disk_full.load(Ordering::Relaxed),
            last_error: self.last_error_guard().clone(),
        }
    }

    pub(crate) fn set_error(&self, message: String) {
        *self.last_error_guard() = Some(message);
    }

    fn last_error_guard(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // A panic while holding this lock cannot leave the Option half-written.
        self.last_error.locked()
    }
}

/// `true` for the errors that mean "the disk (or the quota) is full".
pub(crate) fn is_disk_full(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Service names become file names: no path separators, no leading dot, not empty.
pub(crate) fn check_service_name(service: &str) -> std::io::Result<()> {
    if service.is_empty() || service.starts_with('.') || service.contains(['/', '\0']) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "invalid service name {service:?}: it names a file, so it must be non-empty, \
                 without '/' and not start with '.'"
            ),
        ));
    }
    Ok(())
}
