//! `tls.mode = "files"`: the operator's certificate chain (`tls.cert`) and private key
//! (`tls.key`), PEM. Loaded and checked (parse, key matches the certificate, expiry)
//! at start; then polled by modification time, size and inode and reloaded when they
//! change. A bad file never replaces a good certificate: the last good one stays
//! served and the error names the file and the reason.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use chrono::Utc;

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
    fn of(path: &Path) -> Option<Stamp> {
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            mtime: m.mtime(),
            mtime_ns: m.mtime_nsec(),
            size: m.size(),
            ino: m.ino(),
        })
    }
}
