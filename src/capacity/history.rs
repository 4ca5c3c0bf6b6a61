//! The database size history: `<state>/capacity-history.json`, one sample (time,
//! size) a UTC day, the last [`KEEP_DAYS`] days, written atomically. Growth per day
//! is the change from the oldest kept sample to the size measured now.
//!
//! A file that cannot be read or parsed is never replaced: the problem is reported
//! (file, error, fix) and no sample is recorded until the operator repairs or moves
//! the file away, so history is never silently lost.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name under the state directory.
pub const FILE: &str = "capacity-history.json";
/// Samples older than this are dropped.
pub const KEEP_DAYS: i64 = 90;
/// At most this many samples are kept, whatever their times say (a clock set back).
pub const MAX_SAMPLES: usize = 120;
/// A larger file is refused unread (it cannot be ours).
const MAX_FILE_BYTES: u64 = 1 << 20;
/// The file format written by this version.
const FORMAT: u32 = 1;
const DAY: i64 = 86_400;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Unix time, seconds.
    pub time: i64,
    pub database_bytes: i64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    format: u32,
    samples: Vec<Sample>,
}

/// The history as read from disk.
#[derive(Debug, Clone)]
pub struct History {
    pub path: PathBuf,
    /// Oldest first.
    pub samples: Vec<Sample>,
    /// Why the file could not be used (then `samples` is empty and nothing is written).
    pub problem: Option<String>,
}

/// Growth of the database, as reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Growth {
    pub history_file: String,
    /// Samples in the history.
    pub samples: usize,
    /// Time of the oldest sample (RFC 3339).
    pub since: Option<String>,
    pub bytes_per_day: Option<f64>,
    /// 30 days at `bytes_per_day`.
    pub bytes_per_month: Option<f64>,
    /// Disk space available / `bytes_per_day`, when the database grows.
    pub days_until_disk_full: Option<f64>,
    /// "not enough history yet: …", "not growing", or the file's problem.
    pub note: String,
    /// The history file could not be used.
    pub problem: bool,
}

pub fn path(state: &Path) -> PathBuf {
    state.join(FILE)
}

impl History {
    /// Reads the history of `state`; a missing file is an empty history.
    pub fn load(state: &Path) -> History {
        let path = path(state);
        let fix = "repair it or move it away (koprogo leaves it untouched and records no new sample until then)";
        let problem = |why: String| History {
            samples: Vec::new(),
            problem: Some(format!(
                "{}: unreadable capacity history: {why}: {fix}",
                path.display()
            )),
            path: path.clone(),
        };
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return History {
                    path: path.clone(),
                    samples: Vec::new(),
                    problem: None,
                }
            }
            Err(e) => return problem(e.to_string()),
        };
        if meta.len() > MAX_FILE_BYTES {
            return problem(format!(
                "{} bytes, more than the {MAX_FILE_BYTES} a history can take",
                meta.len()
            ));
        }
        let text = match crate::fsutil::read_bounded_string(&path, MAX_FILE_BYTES) {
            Ok(t) => t,
            Err(e) => return problem(e.to_string()),
        };
        let parsed: FileFormat = match serde_json::from_str(&text) {
            Ok(p) => p,
            Err(e) => return problem(format!("not valid JSON of the expected shape ({e})")),
        };
        if parsed.format != FORMAT {
            return problem(format!(
                "format = {}, this koprogo reads format {FORMAT}",
                parsed.format
            ));
        }
        let mut samples = parsed.samples;
        samples.sort_by_key(|s| s.time);
        History {
            path,
            samples,
            problem: None,
        }
    }

    /// Adds today's sample unless the newest one is from the same UTC day, prunes,
    /// and writes the file. `Ok(false)`: nothing to do. Refused while the file has a
    /// problem.
    pub fn record(&mut self, now: i64, database_bytes: i64) -> Result<bool, String> {
        if let Some(p) = &self.problem {
            return Err(p.clone());
        }
        if self
            .samples
            .last()
            .is_some_and(|s| s.time.div_euclid(DAY) >= now.div_euclid(DAY))
        {
            return Ok(false);
        }
        self.samples.push(Sample {
            time: now,
            database_bytes,
        });
        self.samples.retain(|s| s.time > now - KEEP_DAYS * DAY);
        let extra = self.samples.len().saturating_sub(MAX_SAMPLES);
        self.samples.drain(..extra);
        let file = FileFormat {
            format: FORMAT,
            samples: self.samples.clone(),
        };
        let mut text = serde_json::to_vec_pretty(&file).map_err(|e| e.to_string())?;
        text.push(b'\n');
        crate::fsutil::write_atomic(&self.path, &text, 0o640).map_err(|e| {
            format!(
                "{}: cannot write the capacity history: {e}",
                self.path.display()
            )
        })?;
        Ok(true)
    }

    /// Growth from the oldest sample to `current` bytes measured `now`; days until
    /// `available` disk bytes are used up at that rate.
    pub fn growth(&self, now: i64, current: Option<i64>, available: Option<u64>) -> Growth {
        let mut g = Growth {
            history_file: self.path.display().to_string(),
            samples: self.samples.len(),
            since: self.samples.first().map(|s| rfc3339(s.time)),
            bytes_per_day: None,
            bytes_per_month: None,
            days_until_disk_full: None,
            note: String::new(),
            problem: self.problem.is_some(),
        };
        if let Some(p) = &self.problem {
            g.note = p.clone();
            return g;
        }
        let (Some(oldest), Some(current)) = (self.samples.first(), current) else {
            g.note = if current.is_none() {
                "database size unknown: growth not computed".into()
            } else {
                "not enough history yet: no sample recorded yet (one a day)".into()
            };
            return g;
        };
        let days = (now - oldest.time) as f64 / DAY as f64;
        if days < 1.0 {
            g.note = format!(
                "not enough history yet: {} sample(s) over {:.1} h, growth needs a day",
                self.samples.len(),
                days.max(0.0) * 24.0
            );
            return g;
        }
        let per_day = (current - oldest.database_bytes) as f64 / days;
        g.bytes_per_day = Some(per_day);
        g.bytes_per_month = Some(per_day * 30.0);
        if per_day > 0.0 {
            g.days_until_disk_full = available.map(|a| a as f64 / per_day);
            g.note = format!("over the last {days:.1} days");
        } else {
            g.note = format!("not growing over the last {days:.1} days");
        }
        g
    }
}

pub fn rfc3339(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| unix.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_790_000_000;

    #[test]
    fn one_sample_a_day_kept_90_days() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut h = History::load(d.path());
        assert!(h.samples.is_empty() && h.problem.is_none());
        assert_eq!(h.record(T0, 100), Ok(true));
        assert_eq!(h.record(T0 + 60, 200), Ok(false), "same day");
        for day in 1..=100 {
            assert_eq!(h.record(T0 + day * DAY, 100 + day), Ok(true));
        }
        let h = History::load(d.path());
        assert!(h.samples.len() <= 90, "{}", h.samples.len());
        assert_eq!(h.samples.last().map(|s| s.database_bytes), Some(200));
        assert!(h.samples[0].time > T0 + 100 * DAY - KEEP_DAYS * DAY);
        let names: Vec<_> = std::fs::read_dir(d.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temp file left: {names:?}");
    }

    #[test]
    fn growth_needs_a_day() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut h = History::load(d.path());
        let g = h.growth(T0, Some(1000), Some(1 << 30));
        assert!(g.note.starts_with("not enough history yet"), "{g:?}");
        h.record(T0, 1000).expect("record");
        let g = h.growth(T0 + 3600, Some(2000), Some(1 << 30));
        assert!(g.note.starts_with("not enough history yet"), "{g:?}");
        assert_eq!(g.bytes_per_day, None);
        // Ten days later, 10 MiB more: 1 MiB a day; 1 GiB available = 1024 days.
        let g = h.growth(T0 + 10 * DAY, Some(1000 + 10 * (1 << 20)), Some(1 << 30));
        assert_eq!(g.bytes_per_day, Some((1 << 20) as f64));
        assert_eq!(g.bytes_per_month, Some(30.0 * (1 << 20) as f64));
        assert_eq!(g.days_until_disk_full, Some(1024.0));
        // Shrinking: no date for a full disk.
        let g = h.growth(T0 + 10 * DAY, Some(500), Some(1 << 30));
        assert!(g.note.starts_with("not growing"), "{g:?}");
        assert_eq!(g.days_until_disk_full, None);
    }

    #[test]
    fn a_corrupt_file_is_reported_and_kept() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = path(d.path());
        std::fs::write(&p, "{\"format\":1,\"samples\":[{\"time\":1,").expect("write");
        let mut h = History::load(d.path());
        let why = h.problem.clone().expect("a problem");
        assert!(why.contains(&p.display().to_string()), "{why}");
        assert!(why.contains("move it away"), "{why}");
        assert!(h.record(T0, 1).is_err());
        let g = h.growth(T0, Some(1), Some(1));
        assert!(g.problem && g.note == why, "{g:?}");
        assert_eq!(
            std::fs::read_to_string(&p).expect("read"),
            "{\"format\":1,\"samples\":[{\"time\":1,"
        );
        std::fs::write(&p, "{\"format\":7,\"samples\":[]}").expect("write");
        let why = History::load(d.path()).problem.expect("newer format");
        assert!(why.contains("format = 7"), "{why}");
    }
}
