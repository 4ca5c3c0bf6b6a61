//! What `koprogo cert status` shows: the served certificate's names, issuer,
//! validity, next renewal and last error, from the running supervisor or, when it
//! is not running, from what is on disk.

use std::sync::Arc;

use chrono::Utc;
use serde::{Deserialize, Serialize};

use super::*;
use crate::config::{Config, TlsMode};

/// What `koprogo cert status` shows. Times are RFC 3339, UTC.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CertStatus {
    /// `acme`, `internal`, `files` or `off`.
    pub mode: String,
    /// Names of the certificate served by default.
    pub names: Vec<String>,
    pub issuer: String,
    pub not_before: Option<String>,
    pub not_after: Option<String>,
    /// When the next renewal (or, while failing, the next attempt) is planned.
    pub next_renewal: Option<String>,
    /// `acme`, `local-ca`, `files`, or `none` (nothing on disk yet).
    pub source: String,
    pub last_error: Option<String>,
    pub last_attempt: Option<String>,
    pub retry_at: Option<String>,
    /// ACME orders placed since this process started.
    pub orders: u64,
    /// The local root CA (None in `files` mode or before it exists).
    #[serde(default)]
    pub ca: Option<CaStatus>,
}

/// Offline view for `koprogo cert status` when the supervisor is not running: what is
/// on disk (nothing is created; problems are reported in `last_error`).
pub fn status_from_disk(cfg: &Config) -> anyhow::Result<CertStatus> {
    let paths = TlsPaths::new(&cfg.paths.state);
    let mode = cfg.tls.mode;
    let mut error = None;
    let mut next_renewal = None;
    let entry = match mode {
        TlsMode::Files => match FilePair::from_config(cfg).and_then(|p| {
            let c = p.load()?;
            Ok((p.expiry_warning(&c), c))
        }) {
            Ok((warning, cert)) => {
                error = warning;
                Some(Entry::new(cert, Source::Files, None))
            }
            Err(e) => {
                error = Some(format!("{e:#}"));
                None
            }
        },
        TlsMode::Acme | TlsMode::Internal | TlsMode::Off => {
            let stored = if mode == TlsMode::Acme {
                acme::read_stored(&paths).unwrap_or_else(|e| {
                    error = Some(format!("{e:#}"));
                    None
                })
            } else {
                None
            };
            let chosen = stored.or_else(|| match local_ca::read_leaf(&paths) {
                Ok(l) => l.map(|c| Entry::new(c, Source::LocalCa, None)),
                Err(e) => {
                    error.get_or_insert(format!("{e:#}"));
                    None
                }
            });
            next_renewal = chosen.as_ref().map(|e| {
                let stale = mode == TlsMode::Acme
                    && (e.source != Source::Acme
                        || e.directory.as_deref() != Some(cfg.tls.acme_directory.as_str()));
                if stale {
                    Utc::now()
                } else {
                    e.cert.info.renew_at()
                }
            });
            chosen
        }
    };
    let mut st = status_of(mode, entry.as_ref());
    st.last_error = error;
    st.next_renewal = next_renewal.map(rfc3339);
    if mode != TlsMode::Files {
        if let Ok(Some(ca)) = local_ca::read_root(&paths) {
            st.ca = Some(ca_status(&paths, &ca, cfg));
        }
    }
    Ok(st)
}

pub(super) fn status_of(mode: TlsMode, entry: Option<&Arc<Entry>>) -> CertStatus {
    CertStatus {
        mode: mode_name(mode).into(),
        names: entry.map(|e| e.cert.info.names.clone()).unwrap_or_default(),
        issuer: entry
            .map(|e| e.cert.info.issuer.clone())
            .unwrap_or_default(),
        not_before: entry.map(|e| rfc3339(e.cert.info.not_before)),
        not_after: entry.map(|e| rfc3339(e.cert.info.not_after)),
        next_renewal: None,
        source: entry.map_or("none", |e| e.source.name()).into(),
        last_error: None,
        last_attempt: None,
        retry_at: None,
        orders: 0,
        ca: None,
    }
}

pub(super) fn mode_name(mode: TlsMode) -> &'static str {
    match mode {
        TlsMode::Acme => "acme",
        TlsMode::Internal => "internal",
        TlsMode::Files => "files",
        TlsMode::Off => "off",
    }
}
