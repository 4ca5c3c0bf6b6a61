//! Files of the TLS state. `tls.mode = "files"`: the operator's certificate chain
//! (`tls.cert`) and private key (`tls.key`), PEM. Loaded and checked (parse, key
//! matches the certificate, expiry) at start; then polled by modification time, size
//! and inode and reloaded when they change. A bad file never replaces a good
//! certificate: the last good one stays served and the error names the file and the
//! reason. And the modes of `<state>/tls` ([`tighten`]): directories 0700, files
//! 0600, checked and fixed through descriptors, never following a symlink.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use chrono::Utc;
use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, Mode, SFlag};

use super::certinfo::{parse_chain, parse_key, rfc3339, Cert};
use crate::config::Config;

/// The two files of this mode.
#[derive(Clone, Debug)]
pub(crate) struct FilePair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl FilePair {
    pub(crate) fn from_config(cfg: &Config) -> anyhow::Result<FilePair> {
        match (&cfg.tls.cert, &cfg.tls.key) {
            (Some(cert), Some(key)) => Ok(FilePair {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => Err(anyhow!(
                "tls.mode = \"files\" needs tls.cert and tls.key (PEM files)"
            )),
        }
    }

    /// Reads and checks both files; the error names the file at fault.
    pub(crate) fn load(&self) -> anyhow::Result<Cert> {
        let chain_pem = std::fs::read(&self.cert)
            .with_context(|| format!("tls.cert {}: cannot read", self.cert.display()))?;
        let key_pem = std::fs::read(&self.key)
            .with_context(|| format!("tls.key {}: cannot read", self.key.display()))?;
        let chain =
            parse_chain(&chain_pem).with_context(|| format!("tls.cert {}", self.cert.display()))?;
        let key = parse_key(&key_pem).with_context(|| format!("tls.key {}", self.key.display()))?;
        Cert::from_der(chain, key).map_err(|e| {
            anyhow!(
                "tls.key {} and tls.cert {}: {e:#}",
                self.key.display(),
                self.cert.display()
            )
        })
    }

    /// A warning when the certificate has expired (it is still served).
    pub(crate) fn expiry_warning(&self, cert: &Cert) -> Option<String> {
        cert.info.expired(Utc::now()).then(|| {
            format!(
                "tls.cert {}: the certificate expired at {}; it is still served, replace the file",
                self.cert.display(),
                rfc3339(cert.info.not_after)
            )
        })
    }

    /// What identifies the current content of both files.
    pub(crate) fn stamp(&self) -> (Option<Stamp>, Option<Stamp>) {
        (Stamp::of(&self.cert), Stamp::of(&self.key))
    }
}

/// Modification time, size and inode of a file (None when it cannot be read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stamp {
    mtime: i64,
    mtime_ns: i64,
    size: u64,
    ino: u64,
}

impl Stamp {
    pub(crate) fn of(path: &Path) -> Option<Stamp> {
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            mtime: m.mtime(),
            mtime_ns: m.mtime_nsec(),
            size: m.size(),
            ino: m.ino(),
        })
    }
}

/// Makes `<state>/tls` (`dir`) private for an install made before the rule (or
/// loosened by hand): group and other bits are cleared on every directory and file
/// below it (so the API server's own user reads no key, whatever its groups), each
/// fix logged. Directories are opened `O_NOFOLLOW | O_DIRECTORY`, files `openat`
/// relative to them with `O_NOFOLLOW`, modes changed with `fchmod` on the open
/// descriptor: a symlink planted there is never followed, so root running this
/// cannot be made to change another file. No `dir`: nothing to do.
pub(crate) fn tighten(dir: &Path) -> anyhow::Result<()> {
    for fix in walk(dir, true)? {
        tracing::warn!("{fix}");
    }
    Ok(())
}

/// For `koprogo check`: what [`tighten`] would fix (nothing changed; a directory this
/// user cannot open reports nothing).
pub(crate) fn loose_modes(dir: &Path) -> Vec<String> {
    walk(dir, false).unwrap_or_default()
}

/// How deep below `<state>/tls` files are (`ca/root.key` is one level down).
const MAX_DEPTH: usize = 2;

fn walk(dir: &Path, fix: bool) -> anyhow::Result<Vec<String>> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let d = match Dir::open(dir, flags, Mode::empty()) {
        Ok(d) => d,
        Err(Errno::ENOENT) => return Ok(Vec::new()),
        Err(Errno::ELOOP | Errno::ENOTDIR) => {
            return Err(anyhow!(
                "{}: not a directory (a symbolic link?): move it away; koprogo makes a new one",
                dir.display()
            ))
        }
        Err(e) => return Err(anyhow!("{}: cannot open: {e}", dir.display())),
    };
    let mut out = Vec::new();
    walk_dir(d, dir, 0, fix, &mut out);
    Ok(out)
}

fn walk_dir(mut d: Dir, path: &Path, depth: usize, fix: bool, out: &mut Vec<String>) {
    let fd = d.as_raw_fd();
    private(fd, path, 0o700, fix, out);
    let names: Vec<CString> = d
        .iter()
        .flatten()
        .map(|e| e.file_name().to_owned())
        .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
        .collect();
    for name in names {
        let child = path.join(OsStr::from_bytes(name.as_bytes()));
        let Ok(st) = fstatat(Some(fd), name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) else {
            continue;
        };
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFDIR && depth < MAX_DEPTH {
            let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            if let Ok(sub) = Dir::openat(Some(fd), name.as_c_str(), flags, Mode::empty()) {
                walk_dir(sub, &child, depth + 1, fix, out);
            }
        } else if kind == SFlag::S_IFREG {
            let flags = OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_NOCTTY
                | OFlag::O_CLOEXEC;
            if let Ok(raw) = nix::fcntl::openat(Some(fd), name.as_c_str(), flags, Mode::empty()) {
                // SAFETY: openat just returned this descriptor; nothing else owns it.
                let file = unsafe { OwnedFd::from_raw_fd(raw) };
                private(file.as_raw_fd(), &child, 0o600, fix, out);
            }
        }
    }
}

/// Clears the group and other bits of an open directory or regular file.
fn private(fd: std::os::fd::RawFd, path: &Path, want: u32, fix: bool, out: &mut Vec<String>) {
    let Ok(st) = fstat(fd) else {
        return;
    };
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    if kind != SFlag::S_IFDIR && kind != SFlag::S_IFREG {
        return;
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o077 == 0 {
        return;
    }
    let new = mode & 0o700;
    if !fix {
        out.push(format!(
            "{}: mode {mode:04o}, others may read it: koprogo sets {want:04o} at its next start \
             (or chmod {want:o} it)",
            path.display()
        ));
        return;
    }
    match fchmod(fd, Mode::from_bits_truncate(new)) {
        Ok(()) => out.push(format!(
            "{}: mode {mode:04o} tightened to {new:04o} (nothing in the TLS state is for \
             other users)",
            path.display()
        )),
        Err(e) => out.push(format!(
            "{}: mode {mode:04o}, cannot tighten it ({e}): chmod {want:o} it",
            path.display()
        )),
    }
}
