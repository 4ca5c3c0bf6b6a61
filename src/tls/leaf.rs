//! The local CA's leaf certificate and revocation list: which names the leaf
//! holds and which the root may sign, issuing and reusing the leaf, the CRL the
//! leaf points to, and checking that a leaf chains to the root.

use super::certinfo::Cert;
use super::local_ca::*;
use super::TlsPaths;
use crate::config::Config;
use crate::fsutil::{ensure_dir, write_atomic};
use anyhow::{anyhow, Context};
use chrono::Utc;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    SerialNumber,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{ServerName, UnixTime};
use rustls::RootCertStore;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// The names a local-CA leaf covers: domain, aliases, localhost, loopback and the
/// box's own addresses, lowercase, without duplicates, in that order.
pub(crate) fn leaf_names(cfg: &Config) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let fixed = [cfg.domain.clone()]
        .into_iter()
        .chain(cfg.aliases.iter().cloned())
        .chain(["localhost".to_string()])
        .chain(["127.0.0.1".to_string(), "::1".to_string()])
        .chain(box_addresses().into_iter().map(|ip| ip.to_string()));
    for n in fixed {
        let n = n.trim_end_matches('.').to_ascii_lowercase();
        let key = n
            .parse::<IpAddr>()
            .map(|ip| ip.to_string())
            .unwrap_or(n.clone());
        if !n.is_empty() && seen.insert(key) {
            out.push(n);
        }
    }
    out
}

/// The leaf names `root` can certify (a leaf naming one more would be rejected
/// whole by every client); logs a warning naming the others.
pub(crate) fn servable_names(root: &LocalCa, cfg: &Config) -> Vec<String> {
    let (ok, left_out) = root.scope.split(&leaf_names(cfg));
    if !left_out.is_empty() {
        tracing::warn!("{}", not_covered_warning(&left_out));
    }
    ok
}

/// What to tell the operator about names the root does not cover.
pub(crate) fn not_covered_warning(names: &[String]) -> String {
    format!(
        "the local root CA does not cover {} (added after it was made): the site's \
         certificate leaves them out; {ROTATE_STEPS}",
        names.join(", ")
    )
}

/// How to move the office to a new root without a day of warnings.
const ROTATE_STEPS: &str = "run `koprogo ca rotate --prepare FILE`, import FILE as a trusted \
     root on every office PC, then `koprogo ca rotate` and remove the old root from the PCs \
     (README, \"Local CA\")";

/// What to tell the operator about a root without Name Constraints.
pub(crate) fn unconstrained_warning() -> String {
    format!(
        "the local root CA has no name constraints (made by an earlier koprogo): whoever \
         reads its key can certify any web site to the office PCs that trust it; {ROTATE_STEPS}"
    )
}

/// Reads the stored leaf: `Ok(None)` when there is none.
pub(crate) fn read_leaf(paths: &TlsPaths) -> anyhow::Result<Option<Cert>> {
    let pem = match crate::fsutil::read_bounded(&paths.leaf, MAX_PEM) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("{}", paths.leaf.display())),
    };
    Cert::from_pem(&pem, &pem)
        .map(Some)
        .with_context(|| format!("{}", paths.leaf.display()))
}

/// The stored leaf if it can still be served as is: it parses, chains to `ca`, covers
/// `names` and is not due for renewal. Says why in the log when it cannot.
pub(crate) fn reusable_leaf(
    paths: &TlsPaths,
    ca: &LocalCa,
    names: &[String],
    crl_url: &str,
) -> Option<Cert> {
    let leaf = match read_leaf(paths) {
        Ok(Some(l)) => l,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!("stored local-CA leaf ignored: {e:#}");
            return None;
        }
    };
    if let Err(e) = chains_to(ca, &leaf, names.first().map(String::as_str)) {
        tracing::info!("stored local-CA leaf not reused: {e:#}");
        return None;
    }
    if !leaf.info.covers_all(names) {
        tracing::info!("stored local-CA leaf does not cover every name: issuing a new one");
        return None;
    }
    if !has_crl_url(&leaf, crl_url) {
        tracing::info!(
            "stored local-CA leaf does not name {crl_url} for revocation: issuing a new one"
        );
        return None;
    }
    if Utc::now() >= leaf.info.renew_at() {
        return None;
    }
    Some(leaf)
}

/// Issues and stores a new leaf for `names` (the first one is the subject CN), valid
/// for `validity` but never past the root.
pub(crate) fn issue_leaf(
    paths: &TlsPaths,
    ca: &LocalCa,
    names: &[String],
    validity: Duration,
    crl_url: &str,
) -> anyhow::Result<Cert> {
    let key = new_key()?;
    let now = Utc::now();
    let validity = chrono::Duration::from_std(validity).unwrap_or(chrono::Duration::days(90));
    // Back-date a little against clock skew between this box and its clients.
    let backdate = (validity / 10).min(chrono::Duration::hours(1));
    let not_after = (now + validity).min(ca.info.not_after);
    let mut params = CertificateParams::new(names.to_vec())
        .map_err(|e| anyhow!("local-CA leaf names {names:?}: {e}"))?;
    let mut dn = DistinguishedName::new();
    if let Some(first) = names.first() {
        dn.push(DnType::CommonName, first.clone());
    }
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.crl_distribution_points = vec![rcgen::CrlDistributionPoint {
        uris: vec![crl_url.to_string()],
    }];
    params.not_before = asn1(now - backdate)?.to_datetime();
    params.not_after = asn1(not_after)?.to_datetime();
    params.serial_number = Some(random_serial());
    let cert = params
        .signed_by(&key, &ca.issuer()?)
        .map_err(|e| anyhow!("signing the local-CA leaf: {e}"))?;
    let file = format!("{}{}", key.serialize_pem(), cert.pem());
    ensure_dir(&paths.local_dir, 0o700)
        .with_context(|| format!("creating {}", paths.local_dir.display()))?;
    write_atomic(&paths.leaf, file.as_bytes(), 0o600)
        .with_context(|| format!("writing {}", paths.leaf.display()))?;
    let leaf = Cert::from_pem(file.as_bytes(), file.as_bytes())?;
    tracing::info!(
        serial = %leaf.info.serial,
        not_after = %leaf.info.not_after,
        "issued a local-CA certificate for {}",
        names.join(", ")
    );
    Ok(leaf)
}

/// Where the local CA's revocation list is served (plain HTTP, as RFC 5280 asks).
pub(crate) const CRL_PATH: &str = "/.well-known/koprogo/root.crl";
/// How long a CRL is valid; it is signed again well before (see `crate::tls`).
const CRL_VALIDITY_DAYS: i64 = 7;

/// The CRL distribution point written into local-CA leaves: the appliance's own
/// plain-HTTP listener (HTTPS when it has none), under `domain`.
pub(crate) fn crl_url(cfg: &Config) -> String {
    let (scheme, port, default) = match cfg.proxy.http.first() {
        Some(a) => ("http", a.port(), 80),
        None => (
            "https",
            cfg.proxy.https.first().map_or(443, |a| a.port()),
            443,
        ),
    };
    let port = if port == default {
        String::new()
    } else {
        format!(":{port}")
    };
    format!("{scheme}://{}{port}{CRL_PATH}", cfg.domain)
}

/// An empty revocation list signed by the local CA (nothing is ever revoked: a
/// leaf is replaced, not revoked), so revocation checks get an answer.
pub(crate) fn crl_der(ca: &LocalCa) -> anyhow::Result<Vec<u8>> {
    let now = Utc::now();
    let params = rcgen::CertificateRevocationListParams {
        this_update: asn1(now - chrono::Duration::hours(1))?.to_datetime(),
        next_update: asn1(now + chrono::Duration::days(CRL_VALIDITY_DAYS))?.to_datetime(),
        crl_number: SerialNumber::from(now.timestamp().max(1) as u64),
        issuing_distribution_point: None,
        revoked_certs: Vec::new(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let crl = params
        .signed_by(&ca.issuer()?)
        .map_err(|e| anyhow!("signing the local CA's revocation list: {e}"))?;
    Ok(crl.der().to_vec())
}

/// Does `leaf` name `url` as its CRL distribution point?
fn has_crl_url(leaf: &Cert, url: &str) -> bool {
    use x509_parser::extensions::{DistributionPointName, GeneralName};
    use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};
    let Some(der) = leaf.leaf_der() else {
        return false;
    };
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return false;
    };
    cert.extensions()
        .iter()
        .any(|e| match e.parsed_extension() {
            ParsedExtension::CRLDistributionPoints(points) => points.points.iter().any(|p| {
                matches!(&p.distribution_point, Some(DistributionPointName::FullName(names))
                if names.iter().any(|n| matches!(n, GeneralName::URI(u) if *u == url)))
            }),
            _ => false,
        })
}

/// Verifies, as a TLS client trusting only `ca` would, that `leaf` is valid for `name`.
pub(crate) fn chains_to(ca: &LocalCa, leaf: &Cert, name: Option<&str>) -> anyhow::Result<()> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.cert_der.clone())
        .map_err(|e| anyhow!("local root CA: {e}"))?;
    let verifier = WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| anyhow!("verifier: {e}"))?;
    let name = ServerName::try_from(name.unwrap_or("localhost").to_string())
        .map_err(|e| anyhow!("server name: {e}"))?;
    let chain = &leaf.certified.cert;
    let (end, rest) = chain
        .split_first()
        .ok_or_else(|| anyhow!("empty certificate chain"))?;
    verifier
        .verify_server_cert(end, rest, &name, &[], UnixTime::now())
        .map_err(|e| anyhow!("does not verify against the local root CA: {e}"))?;
    Ok(())
}
