//! Certificates as the store holds them: PEM parsing (chain and private key), the
//! key-matches-certificate check, the facts status shows (names, issuer, validity,
//! serial), name matching (wildcards, IP addresses) and the "a third of the lifetime
//! remains" renewal rule. Nothing here panics on bad input: every problem is an error
//! that says what is wrong.

use std::net::IpAddr;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use chrono::{DateTime, SecondsFormat, Utc};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use x509_parser::extensions::GeneralName;

/// Where the certificate being served comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    Acme,
    LocalCa,
    Files,
}

impl Source {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Source::Acme => "acme",
            Source::LocalCa => "local-ca",
            Source::Files => "files",
        }
    }
}

/// What status shows about one certificate (the first of its chain).
#[derive(Clone, Debug)]
pub(crate) struct CertInfo {
    /// DNS names and IP addresses (SAN, or the subject CN when there is no SAN).
    pub names: Vec<String>,
    /// The issuer's common name (or its whole DN when it has no CN).
    pub issuer: String,
    /// Lowercase hex of the serial number's DER bytes.
    pub serial: String,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
}

impl CertInfo {
    /// Reads the facts from a DER certificate.
    pub(crate) fn parse(der: &[u8]) -> anyhow::Result<CertInfo> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| anyhow!("not a valid X.509 certificate: {e}"))?;
        let mut names = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    GeneralName::DNSName(d) => names.push(d.to_ascii_lowercase()),
                    GeneralName::IPAddress(b) => {
                        if let Some(ip) = ip_from_bytes(b) {
                            names.push(ip.to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
        if names.is_empty() {
            if let Some(cn) = cert.subject().iter_common_name().next() {
                if let Ok(cn) = cn.as_str() {
                    names.push(cn.to_ascii_lowercase());
                }
            }
        }
        let issuer = cert
            .issuer()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string)
            .unwrap_or_else(|| cert.issuer().to_string());
        let serial = hex::encode(cert.tbs_certificate.raw_serial());
        let ts = |t: i64| {
            DateTime::<Utc>::from_timestamp(t, 0)
                .ok_or_else(|| anyhow!("certificate date out of range"))
        };
        Ok(CertInfo {
            names,
            issuer,
            serial,
            not_before: ts(cert.validity().not_before.timestamp())?,
            not_after: ts(cert.validity().not_after.timestamp())?,
        })
    }

    /// Total validity period.
    pub(crate) fn lifetime(&self) -> chrono::Duration {
        self.not_after - self.not_before
    }

    /// When a third of the lifetime remains: the renewal point.
    pub(crate) fn renew_at(&self) -> DateTime<Utc> {
        self.not_after - self.lifetime() / 3
    }

    pub(crate) fn expired(&self, now: DateTime<Utc>) -> bool {
        now >= self.not_after
    }

    /// Whether the certificate is valid for `name` (exact, `*.` wildcard for one
    /// label, or the same IP address however it is written).
    pub(crate) fn covers(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Ok(ip) = name.parse::<IpAddr>() {
            return self
                .names
                .iter()
                .any(|n| n.parse::<IpAddr>().is_ok_and(|m| m == ip));
        }
        self.names.iter().any(|n| {
            if *n == name {
                return true;
            }
            match n.strip_prefix("*.") {
                Some(suffix) => name
                    .split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
                None => false,
            }
        })
    }

    /// Whether every one of `names` is covered.
    pub(crate) fn covers_all(&self, names: &[String]) -> bool {
        names.iter().all(|n| self.covers(n))
    }
}

fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(b).ok().map(IpAddr::from),
        _ => None,
    }
}

/// A certificate chain with its key, ready for rustls, and its facts.
#[derive(Clone, Debug)]
pub(crate) struct Cert {
    pub certified: Arc<CertifiedKey>,
    pub info: CertInfo,
}

impl Cert {
    /// Parses a PEM chain and a PEM private key and checks that they belong together.
    /// Errors say whether the chain, the key or their pairing is at fault.
    pub(crate) fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<Cert> {
        let chain = parse_chain(chain_pem).context("certificate")?;
        let key = parse_key(key_pem).context("private key")?;
        Cert::from_der(chain, key)
    }

    /// Same from DER values.
    pub(crate) fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> anyhow::Result<Cert> {
        let first = chain
            .first()
            .ok_or_else(|| anyhow!("certificate: no certificate in the chain"))?;
        let info = CertInfo::parse(first).context("certificate")?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| anyhow!("private key: unusable ({e})"))?;
        let certified = CertifiedKey::new(chain, signing);
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                bail!("the private key does not match the certificate")
            }
            Err(e) => bail!("certificate: {e}"),
        }
        Ok(Cert {
            certified: Arc::new(certified),
            info,
        })
    }

    /// DER of the end-entity certificate.
    pub(crate) fn leaf_der(&self) -> Option<&CertificateDer<'static>> {
        self.certified.cert.first()
    }
}

/// All `CERTIFICATE` blocks of a PEM text, in order (at least one).
pub(crate) fn parse_chain(pem: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let mut chain = Vec::new();
    for item in CertificateDer::pem_slice_iter(pem) {
        chain.push(item.map_err(|e| anyhow!("bad PEM: {e}"))?);
    }
    if chain.is_empty() {
        bail!("no PEM certificate found (expected -----BEGIN CERTIFICATE-----)");
    }
    for (i, c) in chain.iter().enumerate() {
        CertInfo::parse(c).with_context(|| format!("certificate #{} of the chain", i + 1))?;
    }
    Ok(chain)
}

/// The first private key of a PEM text (PKCS#8, SEC1 or PKCS#1).
pub(crate) fn parse_key(pem: &[u8]) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            anyhow!("no PEM private key found (expected -----BEGIN PRIVATE KEY-----)")
        }
        other => anyhow!("bad PEM: {other}"),
    })
}

/// The SHA-256 fingerprint of a certificate's DER, as Windows, macOS and Firefox
/// show it: upper-case hex bytes separated by colons (`AB:CD:…`, 95 characters).
pub fn fingerprint_sha256(der: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode_upper(Sha256::digest(der))
        .as_bytes()
        .chunks(2)
        .map(|pair| String::from_utf8_lossy(pair).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

/// RFC 3339 with seconds, UTC (`2026-05-01T12:00:00Z`).
pub(crate) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// RFC 3339 with milliseconds, for attempt times.
pub(crate) fn rfc3339_ms(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(names: &[&str]) -> CertInfo {
        CertInfo {
            names: names.iter().map(|s| s.to_string()).collect(),
            issuer: String::new(),
            serial: String::new(),
            not_before: DateTime::<Utc>::from_timestamp(0, 0).unwrap_or_default(),
            not_after: DateTime::<Utc>::from_timestamp(90, 0).unwrap_or_default(),
        }
    }

    #[test]
    fn names_and_wildcards() {
        let i = info(&["example.org", "*.example.org", "::1", "127.0.0.1"]);
        assert!(i.covers("EXAMPLE.org."));
        assert!(i.covers("www.example.org"));
        assert!(!i.covers("a.b.example.org"));
        assert!(!i.covers("example.com"));
        assert!(i.covers("0:0:0:0:0:0:0:1"));
        assert!(i.covers("127.0.0.1"));
        assert!(!i.covers("127.0.0.2"));
    }

    #[test]
    fn renewal_at_two_thirds() {
        let i = info(&[]);
        assert_eq!(i.renew_at().timestamp(), 60);
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let e = parse_chain(b"hello").expect_err("no cert");
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
        let e = parse_key(b"hello").expect_err("no key");
        assert!(e.to_string().contains("no PEM private key"), "{e}");
    }
}
