//! The local root CA as office PCs get it from the onboarding page of the plain-HTTP
//! listener (`internal` mode): the root that signs the certificate being served
//! (so after `koprogo ca rotate` the page follows the site within `files_poll`),
//! the next root `koprogo ca rotate --prepare` made (read from disk, cached by its
//! file stamp), their SHA-256 fingerprints, and a download recorded as handed out
//! (`ca/exported`, like `koprogo ca export`) so the root is never replaced silently.

use std::sync::Arc;

use anyhow::Context;
use chrono::{DateTime, Utc};

use super::certinfo::fingerprint_sha256;
use super::files::Stamp;
use super::local_ca::{self, LocalCa, MAX_PEM};
use super::Tls;
use crate::fsutil::{read_bounded_string, write_atomic};
use crate::sync::LockExt;

/// One root certificate to hand out.
#[derive(Clone, Debug)]
pub struct RootCert {
    /// Its name, as the PCs' certificate stores show it.
    pub subject: String,
    /// Lower-case hex of the serial number (what `ca/exported` records).
    pub serial: String,
    pub not_after: DateTime<Utc>,
    /// See [`fingerprint_sha256`].
    pub fingerprint: String,
    pub der: Arc<[u8]>,
    pub pem: Arc<str>,
}

impl RootCert {
    pub(super) fn of(ca: &LocalCa) -> RootCert {
        RootCert {
            subject: ca.info.issuer.clone(),
            serial: ca.info.serial.clone(),
            not_after: ca.info.not_after,
            fingerprint: fingerprint_sha256(&ca.cert_der),
            der: Arc::from(ca.cert_der.as_ref()),
            pem: Arc::from(ca.cert_pem.as_str()),
        }
    }
}

/// What the onboarding page offers: the current root, and the prepared next one.
#[derive(Clone, Debug)]
pub struct HandOut {
    pub current: RootCert,
    pub next: Option<RootCert>,
}

/// The cached next root: the stamp of `next.crt` it was read at.
pub(super) type NextCache = Option<(Option<Stamp>, Option<RootCert>)>;

impl Tls {
    /// The roots to offer office PCs; None without a local CA (files mode, or a
    /// local CA that could not be loaded in acme mode).
    pub fn hand_out(&self) -> Option<HandOut> {
        let current = RootCert::of(self.ca.locked().as_ref()?);
        let stamp = Stamp::of(&self.paths.next_crt);
        let mut cache = self.next_root.locked();
        let next = match cache.as_ref() {
            Some((seen, next)) if *seen == stamp => next.clone(),
            _ => {
                // As `ca rotate` would take it: a readable pair (certificate and key)
                // that is still usable; anything else is not offered.
                let next = match local_ca::read_next(&self.paths) {
                    Ok(Some(n)) if local_ca::usable_next(&n) => Some(RootCert::of(&n)),
                    Ok(_) => None,
                    Err(e) => {
                        tracing::warn!(
                            "the next root CA (koprogo ca rotate --prepare) is not offered \
                             on the onboarding page: {:#}",
                            anyhow::Error::from(e)
                        );
                        None
                    }
                };
                *cache = Some((stamp, next.clone()));
                next
            }
        };
        let next = next.filter(|n| n.serial != current.serial);
        Some(HandOut { current, next })
    }

    /// Records that the root with `serial` was handed out (added to `ca/exported`
    /// under the CA lock, as `koprogo ca export` does), once per serial. Blocking
    /// (file lock and write): call it off the async workers.
    pub fn handed_out(&self, serial: &str) -> anyhow::Result<()> {
        if self.handed.locked().as_deref() == Some(serial) {
            return Ok(());
        }
        let _lock = local_ca::lock(&self.paths.ca_dir.join(".lock"))?;
        let text = match read_bounded_string(&self.paths.exported, MAX_PEM) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("reading {}", self.paths.exported.display())))
            }
        };
        if !text.lines().any(|l| l.trim() == serial) {
            let mut text = text;
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(serial);
            text.push('\n');
            write_atomic(&self.paths.exported, text.as_bytes(), 0o600)
                .with_context(|| format!("writing {}", self.paths.exported.display()))?;
            tracing::info!(
                serial,
                "the local root CA was downloaded from the onboarding page: recorded as \
                 exported (it is never replaced without `koprogo ca rotate`)"
            );
        }
        *self.handed.locked() = Some(serial.to_string());
        Ok(())
    }
}
