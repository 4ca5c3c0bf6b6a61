//! The API server's program file as the updater sees it: its identity (device,
//! inode, size, modification time, mode: what changes when dpkg renames a new file
//! into place or anything rewrites it), whether it may be started (a regular,
//! executable file whose identity has not moved for [`STABLE`], so a half-written
//! file is never started) and its sha256 (shown in status; an identical file is not
//! an update).

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// How often the file is looked at.
pub const POLL: Duration = Duration::from_secs(2);
/// How long a changed file must keep the same identity before it is started.
pub const STABLE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub mode: u32,
}

impl Identity {
    /// The identity of `path` (following symbolic links, as exec does).
    pub fn of(path: &Path) -> std::io::Result<Identity> {
        let m = std::fs::metadata(path)?;
        Ok(Identity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            mode: m.mode(),
        })
    }

    /// A regular file with an execute bit.
    pub fn startable(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFREG && self.mode & 0o111 != 0
    }
}

/// Hex sha256 of the file's content.
pub fn sha256(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// What the watcher concluded from one look at the file.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// Same as the binary last started.
    Unchanged,
    /// Changed, not stable for long enough yet (or not startable): wait.
    Settling(String),
    /// Changed and stable: start it.
    Ready(Identity),
}

/// Follows one file: `applied` is the identity of the binary last started.
#[derive(Debug, Default)]
pub struct Watch {
    candidate: Option<(Option<Identity>, std::time::Instant)>,
}

impl Watch {
    pub fn look(&mut self, path: &Path, applied: Option<Identity>) -> Seen {
        let now = Identity::of(path).ok();
        if now == applied {
            self.candidate = None;
            return Seen::Unchanged;
        }
        match self.candidate {
            Some((c, since)) if c == now => {
                let Some(id) = now else {
                    return Seen::Settling(format!(
                        "{} was removed: the running API server keeps serving",
                        path.display()
                    ));
                };
                if !id.startable() {
                    return Seen::Settling(format!(
                        "{} changed but is not an executable file (mode {:o}): waiting",
                        path.display(),
                        id.mode & 0o7777
                    ));
                }
                if since.elapsed() < STABLE {
                    return Seen::Settling(format!(
                        "{} changed: waiting for it to stay unchanged for {}s",
                        path.display(),
                        STABLE.as_secs()
                    ));
                }
                Seen::Ready(id)
            }
            _ => {
                self.candidate = Some((now, std::time::Instant::now()));
                Seen::Settling(format!(
                    "{} changed: waiting for it to stay unchanged for {}s",
                    path.display(),
                    STABLE.as_secs()
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_rename_is_seen_and_must_settle_and_be_executable() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("koprogo-api");
        std::fs::write(&p, b"#!/bin/sh\necho one\n").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let first = Identity::of(&p).expect("stat");
        assert!(first.startable());
        let mut w = Watch::default();
        assert_eq!(w.look(&p, Some(first)), Seen::Unchanged);

        // dpkg's way: a new file renamed over the old one, not executable at first.
        let tmp = d.path().join("koprogo-api.dpkg-new");
        std::fs::write(&tmp, b"#!/bin/sh\necho two\n").expect("write");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::fs::rename(&tmp, &p).expect("rename");
        assert!(matches!(w.look(&p, Some(first)), Seen::Settling(_)));
        assert!(
            matches!(w.look(&p, Some(first)), Seen::Settling(m) if m.contains("not an executable"))
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        // The mode changed: the wait starts again.
        assert!(
            matches!(w.look(&p, Some(first)), Seen::Settling(m) if m.contains("unchanged for"))
        );
        std::thread::sleep(STABLE + Duration::from_millis(100));
        let Seen::Ready(id) = w.look(&p, Some(first)) else {
            panic!("a settled executable is ready");
        };
        assert_ne!(id, first);
        assert_eq!(w.look(&p, Some(id)), Seen::Unchanged);
        assert_eq!(sha256(&p).expect("hash").len(), 64);
    }
}
