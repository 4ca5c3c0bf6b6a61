//! The appliance's own certificate authority (rcgen, ECDSA P-256): a persistent root
//! (`<state>/tls/ca/root.crt` + `root.key`, 10 years, "KoproGo local CA (<domain>,
//! <date>)") that office PCs can import, constrained to the appliance's names
//! (see [`super::constraints`]), and a leaf for the domain, the aliases, `localhost`,
//! 127.0.0.1, ::1 and this box's own addresses (getifaddrs), those the root
//! covers, valid 90 days at most and never past the root. The leaf lives in
//! `<state>/tls/local/leaf.pem` (key and certificate in one file, so a crash cannot
//! pair a new key with an old certificate); a restart reuses it while it still
//! chains to the root, covers the names and has more than a third of its lifetime left.
//!
//! Replacing a root that office PCs imported breaks them, so a root is replaced on
//! its own only when it is unusable (corrupt, expiring) or was never handed out
//! (`koprogo ca export` records the serial it exported in `ca/exported`): a
//! constrained root never exported that does not cover a configured name (the
//! `domain` set after the first boot) is remade at once. Otherwise the operator
//! decides with `koprogo ca rotate` ([`rotate`]); until then the names the root does
//! not cover are left out of the leaf and status says so.

use std::fs::File;
use std::net::IpAddr;
use std::path::Path;

use anyhow::{anyhow, Context};
use chrono::{DateTime, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::CertificateDer;

use super::certinfo::{Cert, CertInfo};
use super::constraints::Scope;
use super::files::Stamp;
pub(crate) use super::leaf::*;
use super::TlsPaths;
use crate::config::Config;
use crate::fsutil::{ensure_dir, read_bounded_string, write_atomic};

/// Validity of a new root.
pub(super) const ROOT_VALIDITY_DAYS: i64 = 3650;
/// A root with less than this left is replaced (its leaves could not live long).
pub(super) const ROOT_MIN_REMAINING_DAYS: i64 = 30;

/// Bound on what is read from `<state>/tls/ca` (a PEM certificate or key is ~1 KiB).
pub(super) const MAX_PEM: u64 = 64 * 1024;

/// The loaded root: its certificate and signing key.
pub(crate) struct LocalCa {
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    pub info: CertInfo,
    /// The names it may certify.
    pub scope: Scope,
    /// `root.crt` as it was when read: a change means `koprogo ca rotate` ran.
    pub stamp: Option<Stamp>,
    key: KeyPair,
}

impl LocalCa {
    pub(super) fn issuer(&self) -> anyhow::Result<Issuer<'static, &KeyPair>> {
        Issuer::from_ca_cert_der(&self.cert_der, &self.key)
            .map_err(|e| anyhow!("local CA certificate unusable for signing: {e}"))
    }

    fn usable(&self, now: DateTime<Utc>) -> bool {
        self.info.not_after - now > chrono::Duration::days(ROOT_MIN_REMAINING_DAYS)
    }
}

/// Why the stored root cannot be used.
#[derive(Debug)]
pub(crate) enum RootError {
    /// Cannot be read (permissions, I/O): never replaced automatically.
    Io(anyhow::Error),
    /// Present but unusable (corrupt, half-written, key mismatch): replaced.
    Invalid(anyhow::Error),
}

impl From<RootError> for anyhow::Error {
    fn from(e: RootError) -> anyhow::Error {
        match e {
            RootError::Io(e) | RootError::Invalid(e) => e,
        }
    }
}

/// Reads a CA file without following a symlink, bounded. Anything but a readable
/// regular file (a symlink, a directory, too big) is an I/O error, never "corrupt":
/// a corrupt root is replaced, and replacing a root breaks every office PC.
pub(super) fn read_opt(path: &Path) -> Result<Option<String>, RootError> {
    match crate::fsutil::read_bounded(path, MAX_PEM) {
        Ok(b) => String::from_utf8(b)
            .map(Some)
            .map_err(|_| RootError::Invalid(anyhow!("{}: not text", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(RootError::Io(
            anyhow::Error::new(e).context(format!("{}: cannot read", path.display())),
        )),
    }
}

/// Reads the root from disk without creating anything: `Ok(None)` when it does not
/// exist yet.
pub(crate) fn read_root(paths: &TlsPaths) -> Result<Option<LocalCa>, RootError> {
    read_pair(&paths.root_crt, &paths.root_key)
}

/// The root prepared by `koprogo ca rotate --prepare`, if any.
pub(crate) fn read_next(paths: &TlsPaths) -> Result<Option<LocalCa>, RootError> {
    read_pair(&paths.next_crt, &paths.next_key)
}

fn read_pair(crt: &Path, key_path: &Path) -> Result<Option<LocalCa>, RootError> {
    let (cert_pem, key_pem) = match (read_opt(crt)?, read_opt(key_path)?) {
        (None, None) => return Ok(None),
        (Some(c), Some(k)) => (c, k),
        (None, Some(_)) => return Err(RootError::Invalid(anyhow!("{} is missing", crt.display()))),
        (Some(_), None) => {
            return Err(RootError::Invalid(anyhow!(
                "{} is missing",
                key_path.display()
            )))
        }
    };
    let invalid = |e: anyhow::Error| RootError::Invalid(e);
    let cert = Cert::from_pem(cert_pem.as_bytes(), key_pem.as_bytes())
        .with_context(|| format!("{}", crt.display()))
        .map_err(invalid)?;
    let key = KeyPair::from_pem(&key_pem)
        .map_err(|e| invalid(anyhow!("{}: unusable key: {e}", key_path.display())))?;
    let cert_der = cert
        .leaf_der()
        .cloned()
        .ok_or_else(|| invalid(anyhow!("{}: no certificate", crt.display())))?;
    let scope = Scope::of_cert(&cert_der)
        .with_context(|| format!("{}", crt.display()))
        .map_err(invalid)?;
    Ok(Some(LocalCa {
        cert_pem,
        cert_der,
        info: cert.info,
        scope,
        stamp: Stamp::of(crt),
        key,
    }))
}

/// Whether the next root (`ca rotate --prepare`) would be used by `ca rotate`.
pub(crate) fn usable_next(ca: &LocalCa) -> bool {
    ca.usable(Utc::now())
}

/// Whether `koprogo ca export` handed this root out. A root without constraints
/// predates the record: assume it was.
pub(crate) fn exported(paths: &TlsPaths, ca: &LocalCa) -> bool {
    !ca.scope.is_constrained()
        || read_bounded_string(&paths.exported, MAX_PEM)
            .is_ok_and(|s| s.lines().any(|l| l.trim() == ca.info.serial))
}

/// Records that this root was handed out (so it is never replaced silently): its
/// serial is added to `ca/exported`.
pub(crate) fn mark_exported(paths: &TlsPaths, ca: &LocalCa) -> anyhow::Result<()> {
    if exported(paths, ca) {
        return Ok(());
    }
    let mut text = read_bounded_string(&paths.exported, MAX_PEM).unwrap_or_default();
    text.push_str(&format!("{}\n", ca.info.serial));
    write_atomic(&paths.exported, text.as_bytes(), 0o600)
        .with_context(|| format!("writing {}", paths.exported.display()))
}

/// A root that was never handed out and does not cover every one of `names`:
/// nobody trusts it yet, so a new one for the current names costs nothing.
pub(crate) fn remake_silently(paths: &TlsPaths, ca: &LocalCa, names: &[String]) -> bool {
    ca.scope.is_constrained() && !ca.scope.split(names).1.is_empty() && !exported(paths, ca)
}

/// The root, created (or replaced when unusable: corrupt, expired or about to expire;
/// or never exported and not covering the configured names) under an exclusive lock
/// so `koprogo ca export` and the supervisor cannot race.
pub(crate) fn load_or_create_root(paths: &TlsPaths, cfg: &Config) -> anyhow::Result<LocalCa> {
    ensure_dir(&paths.ca_dir, 0o700)
        .with_context(|| format!("creating {}", paths.ca_dir.display()))?;
    let _lock = lock(&paths.ca_dir.join(".lock"))?;
    let now = Utc::now();
    let names = leaf_names(cfg);
    match read_root(paths) {
        Ok(Some(ca)) if ca.usable(now) && remake_silently(paths, &ca, &names) => {
            tracing::info!(
                "the local root CA (never exported) does not cover {}: replacing it with \
                 one for the configured names",
                ca.scope.split(&names).1.join(", ")
            );
            retire(paths)?;
        }
        Ok(Some(ca)) if ca.usable(now) => return Ok(ca),
        Ok(Some(ca)) => {
            tracing::warn!(
                not_after = %ca.info.not_after,
                "local root CA expires soon or has expired: creating a new one; \
                 office PCs must import the new root (koprogo ca export)"
            );
            set_aside(&paths.root_crt);
            set_aside(&paths.root_key);
        }
        Ok(None) => {}
        Err(RootError::Io(e)) => return Err(e),
        Err(RootError::Invalid(e)) => {
            tracing::warn!(
                "local root CA unusable ({e:#}): the files are kept as *.bad-<time> and a \
                 new root is created; office PCs must import it (koprogo ca export)"
            );
            set_aside(&paths.root_crt);
            set_aside(&paths.root_key);
        }
    }
    create_root(paths, cfg, &names)
}

/// `koprogo ca rotate --prepare`: the root the next rotate switches to
/// (`ca/next.crt`, `next.key`), made for the current names if there is none yet, so
/// the office can import it before the switch. Recorded as exported.
pub(crate) fn prepare_next(paths: &TlsPaths, cfg: &Config) -> anyhow::Result<LocalCa> {
    ensure_dir(&paths.ca_dir, 0o700)
        .with_context(|| format!("creating {}", paths.ca_dir.display()))?;
    let _lock = lock(&paths.ca_dir.join(".lock"))?;
    let next = match read_next(paths) {
        Ok(Some(ca)) if ca.usable(Utc::now()) => ca,
        Ok(_) | Err(RootError::Invalid(_)) => {
            remove_if_present(&paths.next_key)?;
            remove_if_present(&paths.next_crt)?;
            create_root_at(&paths.next_crt, &paths.next_key, cfg, &leaf_names(cfg))?
        }
        Err(RootError::Io(e)) => return Err(e),
    };
    mark_exported(paths, &next)?;
    Ok(next)
}

/// `koprogo ca rotate`: the prepared root (`--prepare`), or a new one for the
/// current names, replaces the stored one, whose key is deleted (with the keys of
/// roots set aside before), so nobody can sign with it any more; its certificate is
/// kept as `retired-<serial>.crt`. Returns the old root's facts (None when there
/// was none) and the new root.
pub(crate) fn rotate(
    paths: &TlsPaths,
    cfg: &Config,
) -> anyhow::Result<(Option<(CertInfo, Scope)>, LocalCa)> {
    ensure_dir(&paths.ca_dir, 0o700)
        .with_context(|| format!("creating {}", paths.ca_dir.display()))?;
    let _lock = lock(&paths.ca_dir.join(".lock"))?;
    let old = match read_root(paths) {
        Ok(Some(ca)) => Some((ca.info, ca.scope)),
        Ok(None) | Err(RootError::Invalid(_)) => None,
        Err(RootError::Io(e)) => return Err(e),
    };
    let next = match read_next(paths) {
        Ok(Some(ca)) if ca.usable(Utc::now()) => Some(ca),
        Ok(_) | Err(RootError::Invalid(_)) => None,
        Err(RootError::Io(e)) => return Err(e),
    };
    retire(paths)?;
    let new = match next {
        Some(_) => {
            // Certificate first: a crash in between leaves a root without key, which
            // the next start sets aside and replaces (never a key without its root).
            std::fs::rename(&paths.next_crt, &paths.root_crt)
                .with_context(|| format!("moving {}", paths.next_crt.display()))?;
            std::fs::rename(&paths.next_key, &paths.root_key)
                .with_context(|| format!("moving {}", paths.next_key.display()))?;
            read_root(paths)?.ok_or_else(|| anyhow!("the prepared root vanished"))?
        }
        None => create_root(paths, cfg, &leaf_names(cfg))?,
    };
    tracing::warn!(
        old = old.as_ref().map_or("none".into(), |(i, _)| i.serial.clone()),
        new = %new.info.serial,
        "local root CA rotated: office PCs must import the new root (koprogo ca export) \
         and remove the old one"
    );
    Ok((old, new))
}

/// Takes the stored root out of service: the key (and every key set aside before)
/// deleted, the certificate kept as `retired-<serial>.crt`. The caller holds the CA
/// lock.
fn retire(paths: &TlsPaths) -> anyhow::Result<()> {
    let serial = read_opt(&paths.root_crt)
        .ok()
        .flatten()
        .and_then(|pem| {
            use rustls::pki_types::pem::PemObject;
            CertificateDer::from_pem_slice(pem.as_bytes()).ok()
        })
        .and_then(|der| CertInfo::parse(&der).ok())
        .map_or_else(|| Utc::now().timestamp().to_string(), |i| i.serial);
    let dir = std::fs::read_dir(&paths.ca_dir)
        .with_context(|| format!("listing {}", paths.ca_dir.display()))?;
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "root.key" || name.starts_with("root.key.") {
            std::fs::remove_file(e.path())
                .with_context(|| format!("deleting {}", e.path().display()))?;
        }
    }
    if paths.root_crt.exists() {
        let to = paths.ca_dir.join(format!("retired-{serial}.crt"));
        std::fs::rename(&paths.root_crt, &to)
            .with_context(|| format!("moving {} to {}", paths.root_crt.display(), to.display()))?;
    }
    Ok(())
}

pub(super) fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("deleting {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn create_root(paths: &TlsPaths, cfg: &Config, names: &[String]) -> anyhow::Result<LocalCa> {
    create_root_at(&paths.root_crt, &paths.root_key, cfg, names)
}

/// A new root for `names`, written to `crt` and `key_path`.
fn create_root_at(
    crt: &Path,
    key_path: &Path,
    cfg: &Config,
    names: &[String],
) -> anyhow::Result<LocalCa> {
    let key = new_key()?;
    let now = Utc::now();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    // The date tells the office which root is the current one in a PC's store.
    dn.push(
        DnType::CommonName,
        format!(
            "KoproGo local CA ({}, {})",
            cfg.domain,
            now.format("%Y-%m-%d")
        ),
    );
    dn.push(DnType::OrganizationName, "KoproGo appliance");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // Only web servers, only our names: Windows and others honour a CA's EKU, so
    // the root cannot vouch for code or e-mail either.
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.name_constraints = Scope::for_names(names).to_rcgen();
    params.not_before = asn1(now - chrono::Duration::days(1))?.to_datetime();
    params.not_after = asn1(now + chrono::Duration::days(ROOT_VALIDITY_DAYS))?.to_datetime();
    params.serial_number = Some(random_serial());
    let cert = params
        .self_signed(&key)
        .map_err(|e| anyhow!("creating the local root CA: {e}"))?;
    // Key first: a crash before the certificate is written leaves a root that
    // read_root rejects and the next start replaces, never a certificate without key.
    write_atomic(key_path, key.serialize_pem().as_bytes(), 0o600)
        .with_context(|| format!("writing {}", key_path.display()))?;
    write_atomic(crt, cert.pem().as_bytes(), 0o600)
        .with_context(|| format!("writing {}", crt.display()))?;
    tracing::info!(path = %crt.display(), "created a local root CA");
    read_pair(crt, key_path)?.ok_or_else(|| anyhow!("{} vanished after creation", crt.display()))
}

/// Root and a servable leaf: the stored one when still good, else a new one.
pub(crate) fn prepare(
    paths: &TlsPaths,
    cfg: &Config,
    tuning: &super::TlsTuning,
) -> anyhow::Result<(LocalCa, Cert)> {
    ensure_dir(&paths.dir, 0o700).with_context(|| format!("creating {}", paths.dir.display()))?;
    let root = load_or_create_root(paths, cfg)?;
    let names = servable_names(&root, cfg);
    let url = crl_url(cfg);
    let leaf = match reusable_leaf(paths, &root, &names, &url) {
        Some(l) => l,
        None => issue_leaf(paths, &root, &names, tuning.local_leaf_validity, &url)?,
    };
    Ok((root, leaf))
}

/// This box's addresses on its interfaces that are up (getifaddrs), loopback's
/// 127.0.0.1 and ::1 included, IPv6 link-local ones left out (useless in a
/// certificate without a zone). Empty when the interfaces cannot be listed.
pub(crate) fn box_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for a in addrs.filter(|a| a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP)) {
        let Some(addr) = a.address else { continue };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            let ip = v6.ip();
            if ip.segments()[0] & 0xffc0 == 0xfe80 {
                continue;
            }
            IpAddr::V6(ip)
        } else {
            continue;
        };
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

pub(super) fn new_key() -> anyhow::Result<KeyPair> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| anyhow!("generating an ECDSA P-256 key: {e}"))
}

pub(super) fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] = (b[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&b)
}

/// chrono → x509-parser's ASN.1 time, whose `to_datetime()` is the `time` type rcgen
/// wants (so no direct dependency on the `time` crate is needed).
pub(super) fn asn1(t: DateTime<Utc>) -> anyhow::Result<x509_parser::time::ASN1Time> {
    x509_parser::time::ASN1Time::from_timestamp(t.timestamp())
        .map_err(|e| anyhow!("date {t} out of range: {e}"))
}

pub(super) fn set_aside(path: &Path) {
    if path.exists() {
        let to = path.with_extension(format!(
            "{}.bad-{}",
            path.extension().and_then(|e| e.to_str()).unwrap_or(""),
            Utc::now().timestamp()
        ));
        if let Err(e) = std::fs::rename(path, &to) {
            tracing::warn!("cannot move {} aside: {e}", path.display());
        }
    }
}

pub(super) fn lock(path: &Path) -> anyhow::Result<nix::fcntl::Flock<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow!("locking {}: {e}", path.display()))
}
