//! Certificates for the HTTPS front door: one store with hot swap behind a rustls
//! resolver, filled according to `tls.mode`:
//! - `acme`: a CA-signed certificate from an ACME CA (instant-acme), HTTP-01 or
//!   TLS-ALPN-01, renewed when a third of its lifetime remains (or per ARI); until the
//!   first one arrives, the local-CA leaf is served;
//! - `internal`: a leaf from the appliance's own persistent root CA (rcgen);
//! - `files`: the operator's PEM files, reloaded when they change;
//! - `off`: no HTTPS listener, but a valid configuration (the local-CA leaf) anyway.
//!
//! State lives in `<state>/tls/` (directories 0700, keys 0600, every write atomic).
//! A certificate problem never takes the site down: [`Tls::load`] needs no network and
//! always yields something to serve (except unusable operator files with nothing good
//! yet, which is a clear error naming the file); [`Tls::maintain`] keeps the current
//! certificate on any failure, records it in [`CertStatus`] and retries with back-off.

mod acme;
mod acme_account;
mod ca_admin;
#[cfg(test)]
mod ca_tests;
mod certinfo;
mod constraints;
mod files;
mod handout;
mod leaf;
mod local_ca;
mod status;
mod store;
#[cfg(test)]
mod tests;

use status::{mode_name, status_of};
pub use status::{status_from_disk, CertStatus};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, Context};
use chrono::{DateTime, Utc};
use tokio::sync::Notify;

use crate::config::{Config, TlsMode};
use crate::process::backoff::Backoff;
use crate::sync::LockExt;
use ca_admin::ca_status;
pub use ca_admin::{
    ca_warnings, export_root, pem_fingerprint, prepare_next_root, rotate_root, CaStatus, Rotated,
};
pub use certinfo::fingerprint_sha256;
use certinfo::{rfc3339, rfc3339_ms, Cert, Source};
use files::{FilePair, Stamp};
pub use handout::{HandOut, RootCert};
use local_ca::LocalCa;
use store::{CertStore, Entry};

/// The ALPN protocol of TLS-ALPN-01 validation handshakes (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Timing of the background work; [`Default`] is production, tests shorten it.
#[derive(Clone, Debug)]
pub struct TlsTuning {
    /// First wait after a failed attempt (doubles each time).
    pub retry_min: Duration,
    /// Longest wait between attempts.
    pub retry_max: Duration,
    /// Even with nothing due, look again this often (clock jumps, ARI, changed IPs).
    pub check_period: Duration,
    /// How often `files` mode looks at the files' modification times.
    pub files_poll: Duration,
    /// Bound on one whole ACME attempt (account, order, validation, download).
    pub acme_timeout: Duration,
    /// Validity of local-CA leaves (bounded by the root's own).
    pub local_leaf_validity: Duration,
}

impl Default for TlsTuning {
    fn default() -> Self {
        TlsTuning {
            retry_min: Duration::from_secs(30),
            retry_max: Duration::from_secs(3600),
            check_period: Duration::from_secs(3600),
            files_poll: Duration::from_secs(10),
            acme_timeout: Duration::from_secs(300),
            local_leaf_validity: Duration::from_secs(90 * 86400),
        }
    }
}

/// Where the files are, under `<state>/tls/`.
#[derive(Clone, Debug)]
pub(crate) struct TlsPaths {
    pub dir: PathBuf,
    pub ca_dir: PathBuf,
    pub root_crt: PathBuf,
    pub root_key: PathBuf,
    /// Serials of the roots `koprogo ca export` handed out.
    pub exported: PathBuf,
    /// The root `koprogo ca rotate --prepare` made for the next rotate.
    pub next_crt: PathBuf,
    pub next_key: PathBuf,
    pub local_dir: PathBuf,
    pub leaf: PathBuf,
    pub acme_dir: PathBuf,
    pub account: PathBuf,
    pub acme_cert: PathBuf,
}

impl TlsPaths {
    pub(crate) fn new(state: &Path) -> TlsPaths {
        let dir = state.join("tls");
        let ca_dir = dir.join("ca");
        let local_dir = dir.join("local");
        let acme_dir = dir.join("acme");
        TlsPaths {
            root_crt: ca_dir.join("root.crt"),
            root_key: ca_dir.join("root.key"),
            exported: ca_dir.join("exported"),
            next_crt: ca_dir.join("next.crt"),
            next_key: ca_dir.join("next.key"),
            leaf: local_dir.join("leaf.pem"),
            account: acme_dir.join("account.json"),
            acme_cert: acme_dir.join("certificate.json"),
            dir,
            ca_dir,
            local_dir,
            acme_dir,
        }
    }
}

#[derive(Default)]
struct Progress {
    last_error: Option<String>,
    last_attempt: Option<DateTime<Utc>>,
    retry_at: Option<DateTime<Utc>>,
    next_renewal: Option<DateTime<Utc>>,
}

/// The certificate side of the proxy. Create with [`Tls::load`], run
/// [`Tls::maintain`] in a task, hand [`Tls::server_config`] to the listeners.
pub struct Tls {
    cfg: Config,
    tuning: TlsTuning,
    paths: TlsPaths,
    store: Arc<CertStore>,
    server_config: Arc<rustls::ServerConfig>,
    progress: Mutex<Progress>,
    http01: Mutex<HashMap<String, String>>,
    orders: AtomicU64,
    force: AtomicBool,
    wake: Notify,
    ca: Mutex<Option<LocalCa>>,
    /// The local CA's signed revocation list and when it was signed.
    crl: Mutex<Option<SignedCrl>>,
    files_seen: Mutex<(Option<Stamp>, Option<Stamp>)>,
    /// The next root as the onboarding page offers it (see [`handout`]).
    next_root: Mutex<handout::NextCache>,
    /// The serial the onboarding page last recorded as handed out.
    handed: Mutex<Option<String>>,
}

/// A signed revocation list: when it was signed, the serial of the root that
/// signed it, the DER.
type SignedCrl = (DateTime<Utc>, String, Arc<Vec<u8>>);

impl Tls {
    /// Loads or creates what the mode needs so a certificate can be served at once
    /// (local CA + leaf, stored ACME certificate, operator files); never touches the
    /// network. State under `<state>/tls/` (directories 0700, keys 0600, atomic writes).
    pub fn load(cfg: &Config) -> anyhow::Result<Arc<Tls>> {
        Tls::load_with(cfg, TlsTuning::default())
    }

    /// Same with tuning for tests (retry back-off, renewal check period, files poll period).
    pub fn load_with(cfg: &Config, tuning: TlsTuning) -> anyhow::Result<Arc<Tls>> {
        let paths = TlsPaths::new(&cfg.paths.state);
        // Not fatal here (a certificate problem never takes the site down): what
        // cannot be opened safely is refused again, clearly, where it is read.
        if let Err(e) = files::tighten(&paths.dir) {
            tracing::warn!("{e:#}");
        }
        let mut progress = Progress::default();
        let mut files_seen = (None, None);
        let mut ca = None;
        let (primary, local) = match cfg.tls.mode {
            TlsMode::Files => {
                let pair = FilePair::from_config(cfg)?;
                files_seen = pair.stamp();
                let cert = pair.load()?;
                if let Some(w) = pair.expiry_warning(&cert) {
                    tracing::warn!("{w}");
                    progress.last_error = Some(w);
                }
                (Entry::new(cert, Source::Files, None), None)
            }
            TlsMode::Internal | TlsMode::Off => {
                let (root, leaf) = local_ca::prepare(&paths, cfg, &tuning)?;
                ca = Some(root);
                let local = Entry::new(leaf, Source::LocalCa, None);
                (local.clone(), Some(local))
            }
            TlsMode::Acme => {
                let stored = acme::load_stored(&paths);
                match (local_ca::prepare(&paths, cfg, &tuning), stored) {
                    (Ok((root, leaf)), stored) => {
                        ca = Some(root);
                        let local = Entry::new(leaf, Source::LocalCa, None);
                        (stored.unwrap_or_else(|| local.clone()), Some(local))
                    }
                    // The stored ACME certificate is enough to serve the site.
                    (Err(e), Some(stored)) => {
                        tracing::warn!(
                            "local CA unavailable ({e:#}); serving the ACME certificate"
                        );
                        (stored, None)
                    }
                    (Err(e), None) => return Err(e),
                }
            }
        };
        let store = Arc::new(CertStore::new(primary, local));
        let server_config = server_config(store.clone())?;
        let tls = Tls {
            cfg: cfg.clone(),
            tuning,
            paths,
            store,
            server_config,
            progress: Mutex::new(progress),
            http01: Mutex::new(HashMap::new()),
            orders: AtomicU64::new(0),
            force: AtomicBool::new(false),
            wake: Notify::new(),
            ca: Mutex::new(ca),
            files_seen: Mutex::new(files_seen),
            crl: Mutex::new(None),
            next_root: Mutex::new(None),
            handed: Mutex::new(None),
        };
        let next = match cfg.tls.mode {
            TlsMode::Acme => Some(acme::due(&tls, None, Utc::now())),
            TlsMode::Internal | TlsMode::Off => tls.store.local().map(|l| l.cert.info.renew_at()),
            TlsMode::Files => None,
        };
        tls.progress_lock().next_renewal = next;
        let primary = tls.store.primary();
        tracing::info!(
            mode = mode_name(cfg.tls.mode),
            source = primary.source.name(),
            serial = %primary.cert.info.serial,
            not_after = %rfc3339(primary.cert.info.not_after),
            "TLS certificate ready for {}",
            primary.cert.info.names.join(", ")
        );
        Ok(Arc::new(tls))
    }

    /// Background work until dropped: ACME first issuance and renewal, local-CA leaf
    /// renewal (at once when `koprogo ca rotate` replaced the root), files reload.
    pub async fn maintain(self: Arc<Self>) {
        match self.cfg.tls.mode {
            TlsMode::Files => self.files_loop().await,
            TlsMode::Acme => {
                tokio::select! {
                    _ = self.acme_loop() => {}
                    _ = self.watch_root() => {}
                }
            }
            TlsMode::Internal | TlsMode::Off => {
                tokio::select! {
                    _ = self.local_loop() => {}
                    _ = self.watch_root() => {}
                }
            }
        }
    }

    /// Wakes the renewal loop once per change of `root.crt` on disk (every
    /// `files_poll`), so a root replaced by `koprogo ca rotate` is served at once.
    async fn watch_root(&self) {
        let mut seen = files::Stamp::of(&self.paths.root_crt);
        loop {
            tokio::time::sleep(self.tuning.files_poll).await;
            let now = files::Stamp::of(&self.paths.root_crt);
            if now != seen {
                seen = now;
                self.wake.notify_one();
            }
        }
    }

    /// Whether `root.crt` on disk is no longer the root in memory.
    fn root_moved(&self) -> bool {
        let ca = self.ca.locked();
        ca.as_ref()
            .is_some_and(|c| c.stamp != files::Stamp::of(&self.paths.root_crt))
    }

    /// rustls ServerConfig: TLS 1.2 and 1.3 only, ALPN `h2`, `http/1.1`, `acme-tls/1`,
    /// certificate chosen per handshake by the hot-swapping resolver (a handshake that
    /// negotiates `acme-tls/1` is a validation: close the connection after it).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server_config.clone()
    }

    /// For the port-80 listener: key authorization for
    /// `/.well-known/acme-challenge/<token>`, if an HTTP-01 challenge is pending.
    pub fn http01_key_authorization(&self, token: &str) -> Option<String> {
        self.http01_lock().get(token).cloned()
    }

    /// The path of the local CA's revocation list on the appliance's listeners.
    pub const CRL_PATH: &'static str = local_ca::CRL_PATH;

    /// The local CA's revocation list (DER; empty: leaves are replaced, never
    /// revoked), signed again once a day; None without a local CA (files mode).
    pub fn crl(&self) -> Option<Arc<Vec<u8>>> {
        let now = Utc::now();
        let mut cached = self.crl.locked();
        let ca = self.ca.locked();
        let ca = ca.as_ref()?;
        if let Some((at, serial, der)) = cached.as_ref() {
            // Signed by this root (not one rotated away) less than a day ago?
            if now - *at < chrono::Duration::days(1) && *serial == ca.info.serial {
                return Some(der.clone());
            }
        }
        match local_ca::crl_der(ca) {
            Ok(der) => {
                let der = Arc::new(der);
                *cached = Some((now, ca.info.serial.clone(), der.clone()));
                Some(der)
            }
            Err(e) => {
                tracing::warn!("{e:#}");
                cached.as_ref().map(|(_, _, d)| d.clone())
            }
        }
    }

    /// What is served and how its renewal goes.
    pub fn status(&self) -> CertStatus {
        let primary = self.store.primary();
        let p = self.progress_lock();
        let mut st = status_of(self.cfg.tls.mode, Some(&primary));
        st.next_renewal = p.next_renewal.map(rfc3339);
        st.last_error = p.last_error.clone();
        st.last_attempt = p.last_attempt.map(rfc3339_ms);
        st.retry_at = p.retry_at.map(rfc3339_ms);
        st.orders = self.orders.load(Ordering::Relaxed);
        let ca = self.ca.locked();
        st.ca = ca.as_ref().map(|ca| ca_status(&self.paths, ca, &self.cfg));
        st
    }

    /// Wakes [`Tls::maintain`] to renew (or order, or reload) now, even during back-off.
    pub fn renew_now(&self) {
        self.force.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    fn progress_lock(&self) -> MutexGuard<'_, Progress> {
        self.progress.locked()
    }

    fn http01_lock(&self) -> MutexGuard<'_, HashMap<String, String>> {
        self.http01.locked()
    }

    async fn sleep_until(&self, at: DateTime<Utc>) {
        let d = (at - Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_millis(50));
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.wake.notified() => {}
        }
    }

    fn check_later(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        now + chrono::Duration::from_std(self.tuning.check_period)
            .unwrap_or(chrono::Duration::hours(1))
    }

    /// Renews the local-CA leaf when it is due, no longer covers every name the root
    /// can certify (a new address), the root on disk changed (`koprogo ca rotate`) or
    /// must be remade (never exported, a name it does not cover), or `force`; returns
    /// when to look again.
    fn local_tick(&self, force: bool, backoff: &mut Backoff) -> DateTime<Utc> {
        let now = Utc::now();
        let names = local_ca::leaf_names(&self.cfg);
        let (servable, remake) = {
            let ca = self.ca.locked();
            match ca.as_ref() {
                Some(ca) => (
                    ca.scope.split(&names).0,
                    local_ca::remake_silently(&self.paths, ca, &names),
                ),
                None => (names.clone(), true),
            }
        };
        let due = match self.store.local() {
            _ if remake || self.root_moved() => now,
            Some(e) if e.cert.info.covers_all(&servable) => e.cert.info.renew_at(),
            _ => now,
        };
        if !force && due > now {
            return due;
        }
        match self.renew_local() {
            Ok(leaf) => {
                backoff.reset();
                if self.cfg.tls.mode != TlsMode::Acme {
                    let mut p = self.progress_lock();
                    p.last_error = None;
                    p.retry_at = None;
                    p.last_attempt = Some(now);
                }
                let next = leaf.info.renew_at();
                self.store
                    .set_local(Entry::new(leaf, Source::LocalCa, None));
                next
            }
            Err(e) => {
                let wait = backoff.next_delay();
                tracing::warn!("local-CA certificate renewal failed: {e:#}; retrying in {wait:?}");
                if self.cfg.tls.mode != TlsMode::Acme {
                    let mut p = self.progress_lock();
                    p.last_error = Some(format!("{e:#}"));
                    p.last_attempt = Some(now);
                    p.retry_at = Some(now + chrono_dur(wait));
                }
                now + chrono_dur(wait)
            }
        }
    }

    /// A new leaf from the root on disk (read again: `koprogo ca rotate` may have
    /// replaced it; created or remade when it must be) for the names it covers.
    fn renew_local(&self) -> anyhow::Result<Cert> {
        let mut ca = self.ca.locked();
        let root = local_ca::load_or_create_root(&self.paths, &self.cfg)?;
        let leaf = local_ca::issue_leaf(
            &self.paths,
            &root,
            &local_ca::servable_names(&root, &self.cfg),
            self.tuning.local_leaf_validity,
            &local_ca::crl_url(&self.cfg),
        )?;
        *ca = Some(root);
        Ok(leaf)
    }

    async fn local_loop(&self) {
        let mut backoff = Backoff::between(self.tuning.retry_min, self.tuning.retry_max);
        loop {
            let force = self.force.swap(false, Ordering::SeqCst);
            let next = self.local_tick(force, &mut backoff);
            let now = Utc::now();
            self.progress_lock().next_renewal = Some(next);
            self.sleep_until(next.min(self.check_later(now))).await;
        }
    }

    async fn acme_loop(&self) {
        let mut rt = acme::Runtime::default();
        let mut backoff = Backoff::between(self.tuning.retry_min, self.tuning.retry_max);
        let mut local_backoff = Backoff::between(self.tuning.retry_min, self.tuning.retry_max);
        // An operator's `cert renew` stays wanted until an order succeeds.
        let mut wanted = false;
        loop {
            let forced = self.force.swap(false, Ordering::SeqCst);
            wanted |= forced;
            let local_next = self.local_tick(false, &mut local_backoff);
            let now = Utc::now();
            acme::refresh_ari(self, &mut rt, now).await;
            let due = acme::due(self, Some(&rt), now);
            let retry_at = self.progress_lock().retry_at;
            let may_retry = retry_at.is_none_or(|r| r <= now);
            if forced || ((wanted || due <= now) && may_retry) {
                self.progress_lock().last_attempt = Some(now);
                let attempt = self.acme_attempt(&mut rt).await;
                match attempt {
                    Ok(()) => {
                        wanted = false;
                        backoff.reset();
                        let mut p = self.progress_lock();
                        p.last_error = None;
                        p.retry_at = None;
                    }
                    Err(e) => {
                        let wait = backoff.next_delay();
                        let at = Utc::now() + chrono_dur(wait);
                        tracing::warn!(
                            "ACME certificate attempt failed: {e:#}; keeping the current \
                             certificate, next attempt in {wait:?}"
                        );
                        let mut p = self.progress_lock();
                        p.last_error = Some(format!("{e:#}"));
                        p.retry_at = Some(at);
                        p.next_renewal = Some(at);
                    }
                }
                continue;
            }
            let next = if wanted || due <= now {
                retry_at.unwrap_or(now)
            } else {
                due
            };
            self.progress_lock().next_renewal = Some(next);
            self.sleep_until(next.min(local_next).min(self.check_later(now)))
                .await;
        }
    }

    /// One bounded ACME attempt; a certificate that is due at once counts as a failure
    /// (ordering again right away would loop against the CA's rate limits).
    async fn acme_attempt(&self, rt: &mut acme::Runtime) -> anyhow::Result<()> {
        let limit = self.tuning.acme_timeout;
        tokio::time::timeout(limit, acme::obtain(self, rt))
            .await
            .map_err(|_| anyhow!("the ACME CA did not complete the order within {limit:?}"))??;
        let now = Utc::now();
        if acme::due(self, Some(rt), now) <= now {
            return Err(anyhow!(
                "the ACME CA issued a certificate that is already due for renewal"
            ));
        }
        Ok(())
    }

    async fn files_loop(&self) {
        let Ok(pair) = FilePair::from_config(&self.cfg) else {
            return;
        };
        loop {
            self.sleep_until(Utc::now() + chrono_dur(self.tuning.files_poll))
                .await;
            let forced = self.force.swap(false, Ordering::SeqCst);
            let stamp = pair.stamp();
            {
                let mut seen = self.files_seen.locked();
                if *seen == stamp && !forced {
                    continue;
                }
                *seen = stamp;
            }
            let now = Utc::now();
            let loaded = pair.load();
            let mut p = self.progress_lock();
            p.last_attempt = Some(now);
            match loaded {
                Ok(cert) => {
                    let warning = pair.expiry_warning(&cert);
                    tracing::info!(
                        serial = %cert.info.serial,
                        not_after = %rfc3339(cert.info.not_after),
                        "reloaded tls.cert {} and tls.key {}",
                        pair.cert.display(),
                        pair.key.display()
                    );
                    if let Some(w) = &warning {
                        tracing::warn!("{w}");
                    }
                    self.store
                        .set_primary(Entry::new(cert, Source::Files, None));
                    p.last_error = warning;
                }
                Err(e) => {
                    tracing::warn!("{e:#}; keeping the previous certificate");
                    p.last_error = Some(format!("{e:#}; the previous certificate is still served"));
                }
            }
        }
    }
}

fn server_config(store: Arc<CertStore>) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut sc = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(store);
    sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
    // Our cipher suite order (strongest first), not the client's.
    sc.ignore_client_order = true;
    match rustls::crypto::ring::Ticketer::new() {
        Ok(t) => sc.ticketer = t,
        Err(e) => tracing::warn!("TLS session tickets disabled: {e}"),
    }
    Ok(Arc::new(sc))
}

fn chrono_dur(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::hours(1))
}
