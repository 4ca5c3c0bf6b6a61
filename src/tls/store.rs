//! The certificate store behind the HTTPS listener: a rustls resolver whose
//! certificates are swapped atomically (arc-swap) while connections keep running, so a
//! renewal needs no restart and drops nothing. Per handshake:
//! - ALPN `acme-tls/1` offered → the TLS-ALPN-01 challenge certificate for the SNI
//!   name, or no certificate (the handshake fails) when none is pending;
//! - an SNI name the primary certificate does not cover but the local-CA leaf does
//!   (`localhost`, the box's addresses while an ACME certificate is primary) → the leaf;
//! - anything else, including no SNI at all (access by IP) → the primary certificate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::certinfo::{Cert, Source};
use super::ACME_TLS_ALPN;
use crate::sync::LockExt;

/// One servable certificate and where it came from.
#[derive(Debug)]
pub(crate) struct Entry {
    pub cert: Cert,
    pub source: Source,
    /// For ACME certificates: the directory URL that issued it.
    pub directory: Option<String>,
}

impl Entry {
    pub(crate) fn new(cert: Cert, source: Source, directory: Option<String>) -> Arc<Entry> {
        Arc::new(Entry {
            cert,
            source,
            directory,
        })
    }
}

/// The resolver; cheap to read on every handshake.
#[derive(Debug)]
pub(crate) struct CertStore {
    primary: ArcSwap<Entry>,
    local: ArcSwapOption<Entry>,
    challenges: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl CertStore {
    pub(crate) fn new(primary: Arc<Entry>, local: Option<Arc<Entry>>) -> CertStore {
        CertStore {
            primary: ArcSwap::new(primary),
            local: ArcSwapOption::new(local),
            challenges: Mutex::new(HashMap::new()),
        }
    }

    /// The certificate served by default.
    pub(crate) fn primary(&self) -> Arc<Entry> {
        self.primary.load_full()
    }

    /// The local-CA leaf, when this mode keeps one.
    pub(crate) fn local(&self) -> Option<Arc<Entry>> {
        self.local.load_full()
    }

    /// Replaces the default certificate; open connections keep the one they started with.
    pub(crate) fn set_primary(&self, entry: Arc<Entry>) {
        self.primary.store(entry);
    }

    /// Replaces the local-CA leaf, and the primary too while the leaf is what is served.
    pub(crate) fn set_local(&self, entry: Arc<Entry>) {
        self.local.store(Some(entry.clone()));
        self.primary.rcu(|cur| {
            if cur.source == Source::LocalCa {
                entry.clone()
            } else {
                cur.clone()
            }
        });
    }

    /// Serves `cert` to TLS-ALPN-01 validation handshakes for `name`.
    pub(crate) fn add_challenge(&self, name: &str, cert: Arc<CertifiedKey>) {
        self.challenges_lock().insert(normalize(name), cert);
    }

    pub(crate) fn remove_challenge(&self, name: &str) {
        self.challenges_lock().remove(&normalize(name));
    }

    fn challenges_lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<CertifiedKey>>> {
        self.challenges.locked()
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name().map(normalize);
        let acme = hello
            .alpn()
            .is_some_and(|mut protos| protos.any(|p| p == ACME_TLS_ALPN));
        if acme {
            let name = sni?;
            let found = self.challenges_lock().get(&name).cloned();
            if found.is_none() {
                tracing::debug!(%name, "acme-tls/1 handshake without a pending challenge");
            }
            return found;
        }
        let primary = self.primary.load();
        if let Some(name) = sni.as_deref() {
            if !primary.cert.info.covers(name) {
                if let Some(local) = self.local.load().as_ref() {
                    if local.cert.info.covers(name) {
                        return Some(local.cert.certified.clone());
                    }
                }
            }
        }
        Some(primary.cert.certified.clone())
    }
}
