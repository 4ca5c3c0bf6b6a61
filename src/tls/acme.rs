//! `tls.mode = "acme"` with instant-acme: the account (`<state>/tls/acme/account.json`,
//! 0600, one entry per directory URL so another CA or staging gets its own account),
//! orders answered by HTTP-01 (the port-80 listener asks
//! [`Tls::http01_key_authorization`](super::Tls::http01_key_authorization)) or
//! TLS-ALPN-01 (the resolver serves the challenge certificate), and the certificate
//! with its key in one atomically written file (`<state>/tls/acme/certificate.json`,
//! 0600) that a restart reuses without contacting the CA.
//!
//! Renewal: when a third of the lifetime remains, unless the CA publishes ACME Renewal
//! Information (RFC 9773, instant-acme's `renewal_info`): then at a random point of
//! the suggested window (earlier or later), never later than a tenth of the lifetime
//! before expiry, re-asked as often as the CA's Retry-After says, and the new order
//! names the certificate it `replaces`. A CA without ARI is asked once per process.
//!
//! Trust for the directory's HTTPS: only `tls.acme_ca_root` when set (instant-acme's
//! hyper-rustls client with that single root: the first certificate of the file),
//! otherwise the system's roots through rustls-platform-verifier.

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use chrono::{DateTime, Utc};
use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier, NewOrder,
    Order, OrderStatus, RetryPolicy,
};
use rand::Rng;
use rcgen::{CertificateParams, CustomExtension, DistinguishedName, KeyPair};
use rustls::pki_types::PrivateKeyDer;
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};

#[cfg(test)]
use super::acme_account::*;
use super::acme_account::{account, forget_account};
use super::certinfo::{rfc3339, Cert, Source};
use super::store::Entry;
use super::{Tls, TlsPaths};
use crate::config::{AcmeChallenge, Config};
use crate::fsutil::{ensure_dir, write_atomic};

/// The stored certificate file.
#[derive(Serialize, Deserialize)]
struct StoredCert {
    directory: String,
    names: Vec<String>,
    obtained: String,
    /// PEM chain as the CA returned it.
    certificate: String,
    /// PEM PKCS#8 private key.
    private_key: String,
}

/// What the maintenance loop keeps between attempts.
#[derive(Default)]
pub(crate) struct Runtime {
    pub(super) account: Option<Account>,
    ari: Ari,
}

#[derive(Default)]
struct Ari {
    /// The CA's directory has no renewalInfo.
    unsupported: bool,
    /// Serial of the certificate `due` applies to.
    serial: Option<String>,
    due: Option<DateTime<Utc>>,
    next_fetch: Option<DateTime<Utc>>,
}

/// The names ordered from the CA: domain and aliases.
pub(crate) fn names(cfg: &Config) -> Vec<String> {
    let mut seen = BTreeSet::new();
    std::iter::once(&cfg.domain)
        .chain(cfg.aliases.iter())
        .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
        .filter(|n| !n.is_empty() && seen.insert(n.clone()))
        .collect()
}

/// Reads the stored certificate: `Ok(None)` when there is none.
pub(crate) fn read_stored(paths: &TlsPaths) -> anyhow::Result<Option<Arc<Entry>>> {
    let text = match std::fs::read(&paths.acme_cert) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("{}", paths.acme_cert.display())),
    };
    let stored: StoredCert = serde_json::from_slice(&text)
        .with_context(|| format!("{}: not a stored certificate", paths.acme_cert.display()))?;
    let cert = Cert::from_pem(stored.certificate.as_bytes(), stored.private_key.as_bytes())
        .with_context(|| format!("{}", paths.acme_cert.display()))?;
    Ok(Some(Entry::new(cert, Source::Acme, Some(stored.directory))))
}

/// The stored certificate if it can be served; a corrupt one is moved aside (so a new
/// one is ordered) with a warning.
pub(crate) fn load_stored(paths: &TlsPaths) -> Option<Arc<Entry>> {
    match read_stored(paths) {
        Ok(Some(e)) => {
            if e.cert.info.expired(Utc::now()) {
                tracing::warn!(
                    not_after = %e.cert.info.not_after,
                    "the stored ACME certificate has expired; serving it until a new one arrives"
                );
            }
            Some(e)
        }
        Ok(None) => None,
        Err(e) if e.chain().any(|c| c.is::<std::io::Error>()) => {
            // Unreadable (permissions?) is not corrupt: leave the file alone.
            tracing::warn!("stored ACME certificate not readable: {e:#}");
            None
        }
        Err(e) => {
            let aside = paths
                .acme_cert
                .with_extension(format!("json.bad-{}", Utc::now().timestamp()));
            tracing::warn!(
                "stored ACME certificate ignored ({e:#}); moved to {} and a new one will be ordered",
                aside.display()
            );
            if let Err(e) = std::fs::rename(&paths.acme_cert, &aside) {
                tracing::warn!("cannot move {} aside: {e}", paths.acme_cert.display());
            }
            None
        }
    }
}

/// When the served certificate should be replaced: now when it is not an ACME
/// certificate from the configured directory for the configured names.
pub(crate) fn due(tls: &Tls, rt: Option<&Runtime>, now: DateTime<Utc>) -> DateTime<Utc> {
    let entry = tls.store.primary();
    let cfg = &tls.cfg;
    if entry.source != Source::Acme
        || entry.directory.as_deref() != Some(cfg.tls.acme_directory.as_str())
        || !entry.cert.info.covers_all(&names(cfg))
    {
        return now;
    }
    let info = &entry.cert.info;
    let ari = rt
        .map(|r| &r.ari)
        .filter(|a| a.serial.as_deref() == Some(info.serial.as_str()))
        .and_then(|a| a.due);
    match ari {
        Some(d) => d.min(info.not_after - info.lifetime() / 10),
        None => info.renew_at(),
    }
}

/// Asks the CA for its renewal window when it offers ARI and it is time to ask again.
pub(crate) async fn refresh_ari(tls: &Tls, rt: &mut Runtime, now: DateTime<Utc>) {
    let entry = tls.store.primary();
    if rt.ari.unsupported
        || entry.source != Source::Acme
        || entry.directory.as_deref() != Some(tls.cfg.tls.acme_directory.as_str())
    {
        return;
    }
    let serial = entry.cert.info.serial.clone();
    if rt.ari.serial.as_deref() != Some(serial.as_str()) {
        rt.ari.serial = Some(serial);
        rt.ari.due = None;
        rt.ari.next_fetch = None;
    }
    if rt.ari.next_fetch.is_some_and(|t| t > now) {
        return;
    }
    rt.ari.next_fetch =
        Some(now + chrono::Duration::from_std(tls.tuning.check_period).unwrap_or_default());
    let Some(id) = entry
        .cert
        .leaf_der()
        .and_then(|d| CertificateIdentifier::try_from(d).ok())
    else {
        // No Authority Key Identifier: ARI cannot name this certificate.
        return;
    };
    // Bounded as a whole: a CA that accepts connections but never answers must not
    // stall the maintenance loop.
    let asked = tokio::time::timeout(Duration::from_secs(30), async {
        let account = account(tls, rt).await?;
        Ok::<_, anyhow::Error>(account.renewal_info(&id).await)
    })
    .await;
    match asked {
        Ok(Ok(Ok((info, retry_after)))) => {
            let start = info.suggested_window.start.unix_timestamp();
            let end = info.suggested_window.end.unix_timestamp().max(start);
            let pick = rand::thread_rng().gen_range(start..=end);
            let due = DateTime::<Utc>::from_timestamp(pick, 0);
            let retry = retry_after.clamp(Duration::from_secs(60), Duration::from_secs(86400));
            tracing::info!(
                window_start = start,
                window_end = end,
                "ACME renewal information: renewal planned at {}",
                due.map(rfc3339).unwrap_or_default()
            );
            rt.ari.due = due;
            rt.ari.next_fetch =
                Some(now + chrono::Duration::from_std(retry).unwrap_or(chrono::Duration::hours(6)));
        }
        Ok(Ok(Err(instant_acme::Error::Unsupported(_)))) => {
            tracing::info!(
                "the ACME CA offers no renewal information: renewing when a third of the lifetime remains"
            );
            rt.ari.unsupported = true;
        }
        Ok(Ok(Err(e))) => tracing::debug!("renewal information unavailable: {e}"),
        Ok(Err(e)) => tracing::debug!("renewal information not asked: {e:#}"),
        Err(_) => tracing::debug!("renewal information: the CA did not answer in time"),
    }
}

/// One complete attempt: account, order, challenges, certificate, storage, swap. An
/// account the CA no longer knows (a reset test CA) is forgotten and recreated at once.
pub(crate) async fn obtain(tls: &Tls, rt: &mut Runtime) -> anyhow::Result<()> {
    let directory = tls.cfg.tls.acme_directory.clone();
    obtain_inner(tls, rt)
        .await
        .with_context(|| format!("ACME CA {directory}"))
}

async fn obtain_inner(tls: &Tls, rt: &mut Runtime) -> anyhow::Result<()> {
    let current = account(tls, rt).await?;
    match order(tls, rt, &current).await {
        Err(e) if is_problem(&e, "accountDoesNotExist") => {
            tracing::warn!("the ACME CA no longer knows our account: creating a new one");
            rt.account = None;
            forget_account(tls);
            let fresh = account(tls, rt).await?;
            order(tls, rt, &fresh).await
        }
        other => other,
    }
}

async fn order(tls: &Tls, rt: &Runtime, account: &Account) -> anyhow::Result<()> {
    let cfg = &tls.cfg;
    let names = names(cfg);
    let identifiers: Vec<Identifier> = names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Identifier::Ip(ip),
            Err(_) => Identifier::Dns(n.clone()),
        })
        .collect();
    let current = tls.store.primary();
    let replaces = (!rt.ari.unsupported
        && current.source == Source::Acme
        && current.directory.as_deref() == Some(cfg.tls.acme_directory.as_str()))
    .then(|| current.cert.leaf_der())
    .flatten()
    .and_then(|d| CertificateIdentifier::try_from(d).ok());
    let mut order = match replaces {
        Some(id) => match account
            .new_order(&NewOrder::new(&identifiers).replaces(id))
            .await
        {
            Ok(o) => o,
            Err(e @ (instant_acme::Error::Unsupported(_) | instant_acme::Error::Api(_))) => {
                tracing::debug!("order with `replaces` refused ({e}); ordering without");
                account.new_order(&NewOrder::new(&identifiers)).await?
            }
            Err(e) => return Err(e).context("placing the order"),
        },
        None => account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .context("placing the order")?,
    };
    tls.orders
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        order = order.url(),
        "ACME order placed for {}",
        names.join(", ")
    );

    let (kind, ctype) = match cfg.tls.acme_challenge {
        AcmeChallenge::Http01 => ("http-01", ChallengeType::Http01),
        AcmeChallenge::TlsAlpn01 => ("tls-alpn-01", ChallengeType::TlsAlpn01),
    };
    let mut pending = Pending {
        tls,
        tokens: Vec::new(),
        names: Vec::new(),
    };
    {
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.context("fetching an authorization")?;
            let ident = authz.identifier().to_string();
            match authz.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                other => bail!("the authorization for {ident} is {other:?}"),
            }
            let mut challenge = authz
                .challenge(ctype.clone())
                .ok_or_else(|| anyhow!("the CA offers no {kind} challenge for {ident}"))?;
            let key_auth = challenge.key_authorization();
            match cfg.tls.acme_challenge {
                AcmeChallenge::Http01 => {
                    let token = challenge.token.clone();
                    tls.http01_lock()
                        .insert(token.clone(), key_auth.as_str().to_string());
                    pending.tokens.push(token);
                }
                AcmeChallenge::TlsAlpn01 => {
                    let cert = challenge_cert(&ident, key_auth.digest().as_ref())?;
                    // RFC 8738: an IP identifier is validated with its reverse name as SNI.
                    let sni = match ident.parse::<IpAddr>() {
                        Ok(ip) => reverse_name(ip),
                        Err(_) => ident.clone(),
                    };
                    tls.store.add_challenge(&sni, cert);
                    pending.names.push(sni);
                }
            }
            challenge
                .set_ready()
                .await
                .with_context(|| format!("starting the {kind} validation of {ident}"))?;
        }
    }
    let retry = RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .backoff(1.5)
        .timeout(tls.tuning.acme_timeout.min(Duration::from_secs(120)));
    let status = order
        .poll_ready(&retry)
        .await
        .with_context(|| format!("waiting for the {kind} validation"))?;
    if status != OrderStatus::Ready {
        let detail = failure_detail(&mut order).await;
        bail!("the {kind} validation failed: {detail}");
    }
    drop(pending);

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| anyhow!("generating the certificate key: {e}"))?;
    let mut params =
        CertificateParams::new(names.clone()).map_err(|e| anyhow!("names {names:?}: {e}"))?;
    params.distinguished_name = DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(|e| anyhow!("building the CSR: {e}"))?;
    order
        .finalize_csr(csr.der())
        .await
        .context("finalizing the order")?;
    let chain_pem = order
        .poll_certificate(&retry)
        .await
        .context("downloading the certificate")?;
    let key_pem = key.serialize_pem();
    let cert = Cert::from_pem(chain_pem.as_bytes(), key_pem.as_bytes())
        .context("the certificate the CA returned")?;
    if !cert.info.covers_all(&names) {
        bail!(
            "the CA returned a certificate for {:?}, not for {names:?}",
            cert.info.names
        );
    }
    let stored = StoredCert {
        directory: cfg.tls.acme_directory.clone(),
        names: names.clone(),
        obtained: rfc3339(Utc::now()),
        certificate: chain_pem,
        private_key: key_pem,
    };
    ensure_dir(&tls.paths.acme_dir, 0o700)
        .with_context(|| format!("creating {}", tls.paths.acme_dir.display()))?;
    let json = serde_json::to_vec_pretty(&stored)?;
    write_atomic(&tls.paths.acme_cert, &json, 0o600)
        .with_context(|| format!("writing {}", tls.paths.acme_cert.display()))?;
    tracing::info!(
        serial = %cert.info.serial,
        issuer = %cert.info.issuer,
        not_after = %rfc3339(cert.info.not_after),
        "ACME certificate obtained for {}",
        names.join(", ")
    );
    tls.store.set_primary(Entry::new(
        cert,
        Source::Acme,
        Some(cfg.tls.acme_directory.clone()),
    ));
    Ok(())
}

/// Removes the challenge answers of one order when it is done, however it ends.
struct Pending<'a> {
    tls: &'a Tls,
    tokens: Vec<String>,
    names: Vec<String>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let mut map = self.tls.http01_lock();
        for t in &self.tokens {
            map.remove(t);
        }
        drop(map);
        for n in &self.names {
            self.tls.store.remove_challenge(n);
        }
    }
}

/// The self-signed certificate of RFC 8737 carrying the key authorization digest.
fn challenge_cert(name: &str, digest: &[u8]) -> anyhow::Result<Arc<CertifiedKey>> {
    if digest.len() != 32 {
        bail!(
            "unexpected key authorization digest length {}",
            digest.len()
        );
    }
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| anyhow!("generating the challenge key: {e}"))?;
    let mut params = CertificateParams::new(vec![name.to_string()])
        .map_err(|e| anyhow!("challenge certificate for {name}: {e}"))?;
    params.distinguished_name = DistinguishedName::new();
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
    let cert = params
        .self_signed(&key)
        .map_err(|e| anyhow!("challenge certificate for {name}: {e}"))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
        key.serialize_der().into(),
    ))
    .map_err(|e| anyhow!("challenge key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}

/// `4.3.2.1.in-addr.arpa` / nibble `….ip6.arpa` name of an address (RFC 8738).
fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut out = String::new();
            for b in v6.octets().iter().rev() {
                out.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            out + "ip6.arpa"
        }
    }
}

/// Why an order became invalid, from the order and its authorizations' challenges.
async fn failure_detail(order: &mut Order) -> String {
    let mut out = Vec::new();
    if let Some(p) = &order.state().error {
        out.push(p.to_string());
    }
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        if let Ok(state) = authz.refresh().await {
            let ident = state.identifier().to_string();
            for c in &state.challenges {
                if let Some(p) = &c.error {
                    out.push(format!("{ident}: {p}"));
                }
            }
        }
    }
    let mut seen = HashSet::new();
    out.retain(|s| seen.insert(s.clone()));
    if out.is_empty() {
        "the order is invalid (the CA gave no detail)".into()
    } else {
        out.join("; ")
    }
}

/// Whether `e` carries an ACME problem of this type (`urn:ietf:params:acme:error:<kind>`).
fn is_problem(e: &anyhow::Error, kind: &str) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<instant_acme::Error>(),
            Some(instant_acme::Error::Api(p))
                if p.r#type.as_deref().is_some_and(|t| t.ends_with(&format!(":{kind}")))
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_names_follow_rfc_8738() {
        let v4: IpAddr = "192.0.2.7".parse().expect("ip");
        assert_eq!(reverse_name(v4), "7.2.0.192.in-addr.arpa");
        let v6: IpAddr = "2001:db8::1".parse().expect("ip");
        assert_eq!(
            reverse_name(v6),
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
        );
    }

    #[test]
    fn renewal_follows_ari_when_known_and_the_third_rule_otherwise() {
        let d = tempfile::tempdir().expect("tempdir");
        let dir = "https://127.0.0.1:9/dir";
        let cfg = crate::tls::tests::config(
            d.path(),
            &format!("mode = \"acme\"\nacme_email = \"a@b.be\"\nacme_directory = \"{dir}\""),
        );
        let (c, k) =
            crate::tls::tests::self_signed(&["syndic.example.be", "www.syndic.example.be"], 60);
        let stored = StoredCert {
            directory: dir.into(),
            names: vec![],
            obtained: String::new(),
            certificate: c,
            private_key: k,
        };
        let paths = TlsPaths::new(&cfg.paths.state);
        write_book(&paths, &AccountBook::default()).expect("acme dir");
        std::fs::write(&paths.acme_cert, serde_json::to_vec(&stored).expect("json"))
            .expect("write");
        let tls = Tls::load(&cfg).expect("load");
        let info = tls.store.primary().cert.info.clone();
        let now = Utc::now();
        assert_eq!(due(&tls, None, now), info.renew_at());
        let mut rt = Runtime::default();
        rt.ari.serial = Some(info.serial.clone());
        rt.ari.due = Some(now + chrono::Duration::days(1));
        assert_eq!(due(&tls, Some(&rt), now), now + chrono::Duration::days(1));
        rt.ari.due = Some(info.not_after);
        assert_eq!(
            due(&tls, Some(&rt), now),
            info.not_after - info.lifetime() / 10,
            "never later than a tenth of the lifetime before expiry"
        );
        rt.ari.serial = Some("other".into());
        assert_eq!(due(&tls, Some(&rt), now), info.renew_at());
        // Another directory (staging → production): due now.
        let other = crate::tls::tests::config(
            d.path(),
            "mode = \"acme\"\nacme_email = \"a@b.be\"\nacme_directory = \"https://127.0.0.1:9/other\"",
        );
        let tls = Tls::load(&other).expect("load");
        assert_eq!(due(&tls, None, now), now);
    }

    #[test]
    fn names_are_domain_then_aliases_without_duplicates() {
        let cfg = Config::parse(
            "domain = \"Example.org\"\naliases = [\"www.example.org\", \"example.org.\"]\n",
            std::path::Path::new("/etc/koprogo/k.toml"),
        )
        .expect("config");
        assert_eq!(names(&cfg), ["example.org", "www.example.org"]);
    }
}
