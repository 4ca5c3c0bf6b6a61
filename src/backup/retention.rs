//! The backup directory: listing (newest first, by modification time), the check
//! markers kept next to each file (`.<name>.check`), and pruning by count and age
//! that never deletes the newest good backup.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// Names of backup files: `koprogo-<UTC stamp>[-<reason>].kbk[.age]`.
pub fn is_backup_name(name: &str) -> bool {
    name.starts_with("koprogo-") && (name.ends_with(".kbk") || name.ends_with(".kbk.age"))
}

/// The outcome of the last check of a backup file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Marker {
    /// RFC 3339 UTC.
    pub at: String,
    /// "checksums" (read back after writing) or "restored" (`backup verify`: restored
    /// into a scratch database and compared).
    pub how: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    pub mtime: SystemTime,
    pub marker: Option<Marker>,
}

impl Entry {
    pub fn encrypted(&self) -> bool {
        self.name.ends_with(".age")
    }
    /// Not known to be bad.
    pub fn good(&self) -> bool {
        self.marker.as_ref().is_none_or(|m| m.ok)
    }
}

pub fn marker_path(file: &Path) -> PathBuf {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    file.with_file_name(format!(".{name}.check"))
}

pub fn read_marker(file: &Path) -> Option<Marker> {
    let text = std::fs::read(marker_path(file)).ok()?;
    serde_json::from_slice(&text).ok()
}

pub fn write_marker(file: &Path, m: &Marker) {
    let p = marker_path(file);
    if let Ok(json) = serde_json::to_vec_pretty(m) {
        if let Err(e) = crate::fsutil::write_atomic(&p, &json, 0o600) {
            tracing::warn!("cannot write {}: {e}", p.display());
        }
    }
}

/// The backups in `dir`, newest first. A missing directory is an empty list.
pub fn list(dir: &Path) -> std::io::Result<Vec<Entry>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !is_backup_name(&name) {
            continue;
        }
        let Ok(meta) = e.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        let path = e.path();
        out.push(Entry {
            marker: read_marker(&path),
            name,
            path,
            size: meta.len(),
            mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        });
    }
    out.sort_by(|a, b| b.mtime.cmp(&a.mtime).then_with(|| b.name.cmp(&a.name)));
    Ok(out)
}

/// Deletes backups beyond the `keep` newest and those older than `max_age`, never
/// `protect` (the backup just made) nor, without it, the newest good one. Returns
/// the names deleted and the problems met.
pub fn prune(
    dir: &Path,
    keep: usize,
    max_age: Duration,
    protect: Option<&Path>,
    now: SystemTime,
) -> (Vec<String>, Vec<String>) {
    let mut deleted = Vec::new();
    let mut problems = Vec::new();
    let entries = match list(dir) {
        Ok(e) => e,
        Err(e) => {
            problems.push(format!("cannot list {}: {e}", dir.display()));
            return (deleted, problems);
        }
    };
    let protected: Option<PathBuf> = match protect {
        Some(p) => Some(p.to_path_buf()),
        None => entries.iter().find(|e| e.good()).map(|e| e.path.clone()),
    };
    for (i, e) in entries.iter().enumerate() {
        if protected.as_deref() == Some(e.path.as_path()) {
            continue;
        }
        let age = now.duration_since(e.mtime).unwrap_or_default();
        if i < keep && age <= max_age {
            continue;
        }
        match std::fs::remove_file(&e.path) {
            Ok(()) => {
                let _ = std::fs::remove_file(marker_path(&e.path));
                tracing::info!(
                    "backup retention: deleted {} ({})",
                    e.name,
                    if i >= keep {
                        format!("more than {keep} backups")
                    } else {
                        format!("older than {}d", max_age.as_secs() / 86400)
                    }
                );
                deleted.push(e.name.clone());
            }
            Err(err) => problems.push(format!("cannot delete {}: {err}", e.path.display())),
        }
    }
    (deleted, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(dir: &Path, name: &str, age_days: u64, now: SystemTime) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, b"x").expect("write");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .expect("open");
        f.set_modified(now - Duration::from_secs(age_days * 86400 + 60))
            .expect("mtime");
        p
    }

    #[test]
    fn by_count_and_age_never_the_newest_good() {
        let d = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        for i in 0..10 {
            touch(d.path(), &format!("koprogo-2026010{i}T000000Z.kbk"), i, now);
        }
        std::fs::write(d.path().join("notes.txt"), b"keep me").expect("other");
        let (deleted, problems) = prune(d.path(), 3, Duration::from_secs(7 * 86400), None, now);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(deleted.len(), 7);
        assert_eq!(list(d.path()).expect("list").len(), 3);
        assert!(d.path().join("notes.txt").exists());

        // All too old: the newest good one stays, a newer damaged one does not count.
        let e = tempfile::tempdir().expect("tempdir");
        let good = touch(e.path(), "koprogo-20260101T000000Z.kbk", 30, now);
        let bad = touch(e.path(), "koprogo-20260102T000000Z.kbk", 20, now);
        write_marker(
            &bad,
            &Marker {
                at: String::new(),
                how: "restored".into(),
                ok: false,
                detail: "damaged".into(),
            },
        );
        touch(e.path(), "koprogo-20251201T000000Z.kbk", 60, now);
        let (deleted, _) = prune(e.path(), 7, Duration::from_secs(7 * 86400), None, now);
        assert_eq!(deleted.len(), 2, "{deleted:?}");
        assert!(good.exists());
        assert!(!marker_path(&bad).exists());
    }
}
