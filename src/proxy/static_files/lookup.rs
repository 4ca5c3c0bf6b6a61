//! Finding the file for a request under the root: `index.html` for directories,
//! `x.html` for extension-less names, the SPA fallback, precompressed siblings, and
//! the check that whatever is opened resolves (symlinks followed) under the
//! canonical root and is a regular file (opened non-blocking).

use std::fs::{File, Metadata};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::negotiation::extension;
use super::{Inner, ReqInfo};
use crate::sync::LockExt;

/// A regular file found under the root, already open.
pub(super) struct Found {
    /// The path as looked up (not canonical): its name decides the type.
    pub(super) path: PathBuf,
    /// Canonical path, the key of the gzip cache.
    pub(super) canon: PathBuf,
    pub(super) file: File,
    pub(super) meta: Metadata,
}

enum Lookup {
    File(Box<Found>),
    Dir,
    Missing,
    /// Exists but resolves outside the root, or is not a regular file/directory:
    /// a plain 404, never the SPA fallback.
    Forbidden,
}

impl Inner {
    /// The file for the request, the SPA fallback, or `None` (404).
    pub(super) fn find(&self, req: &ReqInfo) -> Option<Found> {
        let mut rel = PathBuf::new();
        for s in &req.segs {
            rel.push(s);
        }
        let base = self.root.join(&rel);
        if req.segs.is_empty() || req.trailing {
            if let Lookup::File(f) = self.open_checked(&base.join("index.html")) {
                return Some(*f);
            }
        } else {
            match self.open_checked(&base) {
                Lookup::File(f) => return Some(*f),
                Lookup::Dir => {
                    if let Lookup::File(f) = self.open_checked(&base.join("index.html")) {
                        return Some(*f);
                    }
                }
                Lookup::Missing => {}
                Lookup::Forbidden => return None,
            }
            let last = req.segs.last().map(String::as_str).unwrap_or_default();
            if extension(last).is_empty() {
                if let Lookup::File(f) =
                    self.open_checked(&base.with_file_name(format!("{last}.html")))
                {
                    return Some(*f);
                }
            }
        }
        // SPA fallback, but never for assets.
        let last = req.segs.last().map(String::as_str).unwrap_or_default();
        let ext = extension(last);
        let asset = req.segs.first().is_some_and(|s| s == "_astro")
            || !(ext.is_empty() || ext == "html" || ext == "htm");
        if asset {
            return None;
        }
        match self.open_checked(&self.root.join("index.html")) {
            Lookup::File(f) => Some(*f),
            _ => None,
        }
    }

    /// A precompressed sibling `<path><suffix>`, if it is a regular file in the tree.
    pub(super) fn variant(&self, path: &Path, suffix: &str) -> Option<Found> {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        match self.open_checked(Path::new(&p)) {
            Lookup::File(f) => Some(*f),
            _ => None,
        }
    }

    /// Opens `path` only if it resolves (symlinks followed) to something under the
    /// canonical root.
    fn open_checked(&self, path: &Path) -> Lookup {
        let canon = match std::fs::canonicalize(path) {
            Ok(c) => c,
            Err(_) => return Lookup::Missing,
        };
        if !self.under_root(&canon) {
            return Lookup::Forbidden;
        }
        // O_NONBLOCK: opening a FIFO must not wait for a writer.
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&canon)
        {
            Ok(f) => f,
            Err(_) => return Lookup::Missing,
        };
        match file.metadata() {
            Ok(m) if m.is_file() => Lookup::File(Box::new(Found {
                path: path.to_path_buf(),
                canon,
                file,
                meta: m,
            })),
            Ok(m) if m.is_dir() => Lookup::Dir,
            Ok(_) => Lookup::Forbidden,
            Err(_) => Lookup::Missing,
        }
    }

    fn under_root(&self, canon: &Path) -> bool {
        let lock = || self.root_canon.locked();
        if lock().as_ref().is_some_and(|root| canon.starts_with(root)) {
            return true;
        }
        // Not under the cached root: the root may have moved; look again (outside
        // the lock, it is a few syscalls).
        let fresh = std::fs::canonicalize(&self.root).ok();
        let ok = fresh.as_ref().is_some_and(|root| canon.starts_with(root));
        *lock() = fresh;
        ok
    }
}
