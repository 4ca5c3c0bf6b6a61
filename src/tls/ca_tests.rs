//! Tests of the local root CA's limits, with real parts: the root's Name Constraints
//! read back with x509-parser; certificates forged with the root's own key (what
//! whoever reads it could do) served by a real tokio-rustls server and refused by a
//! real rustls client (webpki enforces Name Constraints); an old-style unconstrained
//! root on disk kept, flagged and rotated; file modes of an old install tightened
//! without following symlinks. Every wait is bounded.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::constraints::{Permit, Scope};
use super::tests::{connect, fast, mode_of, peer_serial, root_store, serve, wait_for};
use super::*;

const DOMAIN: &str = "syndic.example.be";

/// domain, an alias under it, an alias elsewhere and an address alias.
fn config(dir: &Path, domain: &str) -> Config {
    let text = format!(
        "domain = \"{domain}\"\naliases = [\"www.{domain}\", \"copro-lambert.be\", \"192.0.2.7\"]\n\
         [paths]\nstate = \"{}\"\n[tls]\nmode = \"internal\"\n",
        dir.join("state").display()
    );
    Config::parse(&text, &dir.join("koprogo.toml")).expect("test config")
}

fn root_der(paths: &TlsPaths) -> CertificateDer<'static> {
    let pem = std::fs::read(&paths.root_crt).expect("read root.crt");
    CertificateDer::from_pem_slice(&pem).expect("root PEM")
}

/// A server certificate for `names` signed with the root key on disk: what whoever
/// reads `root.key` can make.
fn forge(
    paths: &TlsPaths,
    names: &[&str],
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let key_pem = std::fs::read_to_string(&paths.root_key).expect("read root.key");
    let ca_key = KeyPair::from_pem(&key_pem).expect("root key");
    let ca_der = root_der(paths);
    let issuer = Issuer::from_ca_cert_der(&ca_der, &ca_key).expect("issuer");
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("names");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&leaf_key, &issuer).expect("sign");
    let key = PrivateKeyDer::try_from(leaf_key.serialize_der()).expect("key der");
    (vec![cert.der().clone()], key)
}

/// A TLS server on 127.0.0.1 presenting `chain`; aborted on drop.
struct Forged {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Forged {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_forged(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Forged {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let sc = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(sc));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut s) = acceptor.accept(tcp).await {
                    use tokio::io::AsyncWriteExt;
                    let _ = s.write_all(b"forged\n").await;
                    let _ = s.flush().await;
                }
            });
        }
    });
    Forged { addr, task }
}

/// The first handshake with `addr` (as DOMAIN) that verifies against `pem` alone,
/// tried every 100 ms for `limit`.
async fn verified_within(
    addr: SocketAddr,
    pem: &str,
    limit: Duration,
) -> Option<super::tests::Client> {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if let Ok(c) = connect(addr, DOMAIN, Some(root_store(pem)), &[b"http/1.1"]).await {
            return Some(c);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// An install made before Name Constraints: the root as koprogo made it then (no
/// constraints, no EKU), with the loose modes an operator may have left.
fn old_style_root(paths: &TlsPaths, domain: &str) -> String {
    std::fs::create_dir_all(&paths.ca_dir).expect("mkdir ca");
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("KoproGo local CA ({domain})"));
    dn.push(DnType::OrganizationName, "KoproGo appliance");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).expect("self-signed");
    std::fs::write(&paths.root_key, key.serialize_pem()).expect("write key");
    std::fs::write(&paths.root_crt, cert.pem()).expect("write crt");
    for (p, m) in [
        (&paths.dir, 0o755),
        (&paths.ca_dir, 0o755),
        (&paths.root_key, 0o644),
        (&paths.root_crt, 0o644),
    ] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod");
    }
    cert.pem()
}

#[test]
fn the_root_is_name_constrained_to_the_configured_names() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = config(d.path(), DOMAIN);
    Tls::load(&cfg).expect("load");
    let paths = TlsPaths::new(&cfg.paths.state);
    let der = root_der(&paths);
    let (_, cert) = X509Certificate::from_der(&der).expect("parse root");
    let ext = cert
        .extensions()
        .iter()
        .find(|e| matches!(e.parsed_extension(), ParsedExtension::NameConstraints(_)))
        .expect("the root carries Name Constraints");
    assert!(ext.critical, "Name Constraints must be critical (RFC 5280)");
    let ParsedExtension::NameConstraints(nc) = ext.parsed_extension() else {
        unreachable!()
    };
    assert!(nc.excluded_subtrees.is_none());
    let (mut dns, mut ips) = (Vec::new(), Vec::new());
    for s in nc.permitted_subtrees.as_ref().expect("permitted subtrees") {
        match &s.base {
            GeneralName::DNSName(n) => dns.push(n.to_string()),
            GeneralName::IPAddress(b) => ips.push(b.to_vec()),
            other => panic!("unexpected subtree {other:?}"),
        }
    }
    // www.<domain> is under <domain>: one DNS subtree covers both.
    assert_eq!(dns, [DOMAIN, "copro-lambert.be", "localhost"]);
    assert!(
        ips.contains(&vec![127, 0, 0, 0, 255, 0, 0, 0]),
        "127.0.0.0/8"
    );
    let mut v6 = [0u8; 32];
    v6[15] = 1;
    v6[16..].fill(0xff);
    assert!(ips.contains(&v6.to_vec()), "::1/128");
    assert!(
        ips.contains(&vec![192, 0, 2, 7, 255, 255, 255, 255]),
        "192.0.2.7/32"
    );
    let scope = Scope::of_cert(&der).expect("scope");
    for ip in local_ca::box_addresses() {
        assert!(scope.covers(&ip.to_string()), "machine address {ip}");
    }
    // Only for web servers; a CA for leaves only.
    let eku = cert
        .extended_key_usage()
        .expect("eku")
        .expect("the root has an EKU");
    assert!(eku.value.server_auth && !eku.value.code_signing && !eku.value.email_protection);
    let bc = cert
        .basic_constraints()
        .expect("bc")
        .expect("basic constraints");
    assert!(bc.value.ca);
    assert_eq!(bc.value.path_len_constraint, Some(0));
    // What status says.
    let st = Tls::load(&cfg).expect("reload").status();
    let ca = st.ca.expect("ca status");
    assert!(ca.constrained && ca.warning.is_none(), "{ca:?}");
    assert!(ca.permitted.contains(&"192.0.2.7/32".to_string()), "{ca:?}");
    assert!(ca
        .subject
        .starts_with(&format!("KoproGo local CA ({DOMAIN}, ")));
}

#[test]
fn dns_subtrees_cover_names_below_and_nothing_beside() {
    let p = Permit::for_name("Example.org.");
    assert!(p.covers("example.org") && p.covers("a.b.EXAMPLE.org"));
    assert!(!p.covers("badexample.org") && !p.covers("example.org.evil.com"));
    assert!(!p.covers("192.0.2.1"));
    let s = Scope::for_names(&["example.org".into(), "10.1.2.3".into()]);
    assert!(s.covers("127.9.9.9") && s.covers("::1") && s.covers("10.1.2.3"));
    assert!(!s.covers("10.1.2.4") && !s.covers("bank.example"));
    assert_eq!(
        s.describe(),
        ["example.org", "127.0.0.0/8", "::1/128", "10.1.2.3/32"]
    );
    assert!(Scope::Any.covers("bank.example"));
}

#[tokio::test]
async fn a_certificate_for_another_name_signed_by_the_root_key_is_refused() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = config(d.path(), DOMAIN);
    let tls = Tls::load(&cfg).expect("load");
    let pem = export_root(&cfg).expect("export");
    let paths = TlsPaths::new(&cfg.paths.state);
    // The site's own certificate verifies for every configured name.
    let site = serve(&tls).await;
    for name in [
        DOMAIN,
        &format!("www.{DOMAIN}"),
        "copro-lambert.be",
        "192.0.2.7",
        "localhost",
    ] {
        connect(site.addr, name, Some(root_store(&pem)), &[b"http/1.1"])
            .await
            .unwrap_or_else(|e| panic!("the site's certificate for {name}: {e:#}"));
    }
    // Forged with the root's key: a bank, an address elsewhere, a lookalike.
    for (names, sni) in [
        (&["bank.example"][..], "bank.example"),
        (&["10.20.30.40"][..], "10.20.30.40"),
        (
            &["syndic.example.be.evil.com"][..],
            "syndic.example.be.evil.com",
        ),
        // One unlisted name spoils a certificate for a listed one too.
        (&[DOMAIN, "bank.example"][..], DOMAIN),
    ] {
        let (chain, key) = forge(&paths, names);
        let srv = serve_forged(chain, key).await;
        let e = connect(srv.addr, sni, Some(root_store(&pem)), &[b"http/1.1"])
            .await
            .err()
            .unwrap_or_else(|| panic!("a forged certificate for {names:?} was accepted"));
        assert!(
            format!("{e:#}").to_lowercase().contains("nameconstraint")
                || format!("{e:?}").contains("NameConstraint"),
            "{names:?}: refused for the wrong reason: {e:#}"
        );
    }
    // DNS constraints are subtrees: a name under the domain is inside them.
    let (chain, key) = forge(&paths, &["shop.syndic.example.be"]);
    let srv = serve_forged(chain, key).await;
    connect(
        srv.addr,
        "shop.syndic.example.be",
        Some(root_store(&pem)),
        &[b"http/1.1"],
    )
    .await
    .expect("a name under the domain is inside the subtree");

    // The same forgery against an old-style root succeeds: what this change closes.
    let old = tempfile::tempdir().expect("tempdir");
    let old_cfg = config(old.path(), DOMAIN);
    let old_paths = TlsPaths::new(&old_cfg.paths.state);
    let old_pem = old_style_root(&old_paths, DOMAIN);
    let (chain, key) = forge(&old_paths, &["bank.example"]);
    let srv = serve_forged(chain, key).await;
    connect(
        srv.addr,
        "bank.example",
        Some(root_store(&old_pem)),
        &[b"http/1.1"],
    )
    .await
    .expect("an unconstrained root vouches for anything");
}

#[tokio::test]
async fn an_old_unconstrained_root_is_kept_and_flagged_until_rotated() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = config(d.path(), DOMAIN);
    let paths = TlsPaths::new(&cfg.paths.state);
    let old_pem = old_style_root(&paths, DOMAIN);
    let outside = d.path().join("outside");
    std::fs::write(&outside, "not the appliance's").expect("write");
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::os::unix::fs::symlink(&outside, paths.ca_dir.join("planted")).expect("symlink");

    assert!(
        ca_warnings(&cfg)
            .iter()
            .any(|w| w.contains("no name constraints")),
        "check must flag the old root: {:?}",
        ca_warnings(&cfg)
    );
    assert!(ca_warnings(&cfg)
        .iter()
        .any(|w| w.contains("root.key: mode 0644")));
    let tls = Tls::load_with(&cfg, fast()).expect("load");
    // Kept: the office PCs that imported it still trust the site.
    assert_eq!(export_root(&cfg).expect("export"), old_pem);
    let site = serve(&tls).await;
    let c = connect(
        site.addr,
        DOMAIN,
        Some(root_store(&old_pem)),
        &[b"http/1.1"],
    )
    .await
    .expect("the leaf chains to the old root");
    let first = peer_serial(&c);
    let ca = tls.status().ca.expect("ca status");
    assert!(!ca.constrained && ca.exported, "{ca:?}");
    assert!(
        ca.warning
            .as_deref()
            .unwrap_or("")
            .contains("koprogo ca rotate"),
        "{ca:?}"
    );
    // Private now, through descriptors: the symlink's target is left alone.
    assert_eq!(mode_of(&paths.dir), 0o700);
    assert_eq!(mode_of(&paths.ca_dir), 0o700);
    assert_eq!(mode_of(&paths.root_key), 0o600);
    assert_eq!(mode_of(&paths.root_crt), 0o600);
    assert_eq!(mode_of(&outside), 0o644, "a symlink was followed");
    assert!(ca_warnings(&cfg).iter().all(|w| !w.contains("mode")));
    let old_key = std::fs::read_to_string(&paths.root_key).expect("old key");
    let old_crl = tls.crl().expect("crl");

    // The operator rotates while the site runs; the new leaf is served within seconds.
    let task = tokio::spawn(tls.clone().maintain());
    let r = rotate_root(&cfg).expect("rotate");
    assert_eq!(r.old.as_ref().map(|o| o.2), Some(false));
    assert!(r.new.constrained && !r.new.exported && r.new.warning.is_none());
    let new_pem = std::fs::read_to_string(&paths.root_crt).expect("new root");
    assert_ne!(new_pem, old_pem);
    assert!(!std::fs::read_dir(&paths.ca_dir)
        .expect("ls")
        .flatten()
        .any(|e| e.file_name().to_string_lossy().contains(".key")
            && std::fs::read_to_string(e.path()).ok().as_deref() == Some(old_key.as_str())));
    assert!(paths
        .ca_dir
        .join(format!("retired-{}.crt", ca.serial))
        .exists());
    let addr = site.addr;
    let c = verified_within(addr, &new_pem, Duration::from_secs(10))
        .await
        .expect("the running site never served a leaf from the new root");
    assert_ne!(peer_serial(&c), first);
    assert!(
        connect(addr, DOMAIN, Some(root_store(&old_pem)), &[b"http/1.1"])
            .await
            .is_err()
    );
    let ca = tls.status().ca.expect("ca status");
    assert!(ca.constrained && ca.warning.is_none(), "{ca:?}");
    assert_ne!(
        tls.crl().expect("crl"),
        old_crl,
        "the CRL is signed by the new root"
    );
    // Not exported yet: nobody trusts it, so... exporting records it.
    export_root(&cfg).expect("export");
    assert!(tls.status().ca.expect("ca").exported);
    task.abort();
    wait_for("the task to end", Duration::from_secs(5), || {
        task.is_finished()
    })
    .await;
}

#[test]
fn a_root_never_exported_follows_the_names_but_an_exported_one_stays() {
    let d = tempfile::tempdir().expect("tempdir");
    // The package's first boot: domain = "localhost".
    let first = config(d.path(), "localhost");
    Tls::load(&first).expect("first boot");
    let root1 = local_ca::read_root(&TlsPaths::new(&first.paths.state))
        .expect("read")
        .expect("root");
    // The operator sets the real domain: the never-exported root is remade for it.
    let cfg = config(d.path(), DOMAIN);
    let tls = Tls::load(&cfg).expect("second boot");
    let pem = export_root(&cfg).expect("export");
    assert_ne!(pem, root1.cert_pem, "remade for the new domain");
    assert!(tls.store.primary().cert.info.covers(DOMAIN));
    // Exported, then a new domain: kept (the PCs trust it), the new name left out of
    // the leaf and flagged until `ca rotate`.
    let moved = config(d.path(), "copro-neuve.be");
    let tls = Tls::load(&moved).expect("third boot");
    assert_eq!(
        export_root(&moved).expect("export"),
        pem,
        "an exported root is kept"
    );
    let leaf = &tls.store.primary().cert.info;
    assert!(
        !leaf.covers("copro-neuve.be") && leaf.covers("localhost"),
        "{:?}",
        leaf.names
    );
    let ca = tls.status().ca.expect("ca");
    assert_eq!(ca.not_covered, ["copro-neuve.be", "www.copro-neuve.be"]);
    assert!(ca
        .warning
        .as_deref()
        .unwrap_or("")
        .contains("koprogo ca rotate"));
    assert!(ca_warnings(&moved)
        .iter()
        .any(|w| w.contains("does not cover copro-neuve.be, www.copro-neuve.be")));
    let st = status_from_disk(&moved).expect("status from disk");
    assert_eq!(st.ca.expect("ca").not_covered, ca.not_covered);
}

#[tokio::test]
async fn a_prepared_root_is_imported_first_then_switched_to() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = config(d.path(), DOMAIN);
    let paths = TlsPaths::new(&cfg.paths.state);
    let tls = Tls::load_with(&cfg, fast()).expect("load");
    let task = tokio::spawn(tls.clone().maintain());
    let site = serve(&tls).await;
    let current = export_root(&cfg).expect("export");
    // The office imports the next root while the site keeps the current one.
    let (next, next_pem) = prepare_next_root(&cfg).expect("prepare");
    assert!(next.constrained && next.exported, "{next:?}");
    assert_ne!(next_pem, current);
    assert_eq!(
        prepare_next_root(&cfg).expect("again").1,
        next_pem,
        "prepared once"
    );
    let st = tls.status().ca.expect("ca");
    assert_eq!(
        st.serial,
        local_ca::read_root(&paths)
            .expect("r")
            .expect("root")
            .info
            .serial
    );
    assert!(
        st.next.as_deref().unwrap_or("").contains(&next.serial),
        "{st:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    connect(
        site.addr,
        DOMAIN,
        Some(root_store(&current)),
        &[b"http/1.1"],
    )
    .await
    .expect("still the current root until the rotate");
    // The switch: the prepared root, already trusted by the PCs that imported it.
    let r = rotate_root(&cfg).expect("rotate");
    assert_eq!(r.new.serial, next.serial);
    assert!(r.new.exported && r.new.next.is_none(), "{:?}", r.new);
    assert!(!paths.next_crt.exists() && !paths.next_key.exists());
    assert_eq!(export_root(&cfg).expect("export"), next_pem);
    verified_within(site.addr, &next_pem, Duration::from_secs(10))
        .await
        .expect("the site never switched to the prepared root");
    task.abort();
    wait_for("the task to end", Duration::from_secs(5), || {
        task.is_finished()
    })
    .await;
}

/// The machine's addresses (getifaddrs; they came from /proc/net/fib_trie and
/// if_inet6, and the set was the same here: 127.0.0.1, 192.0.2.2, ::1, fd00::2):
/// loopback's 127.0.0.1 and ::1 included, as before, no IPv6 link-local, no repeats.
#[test]
fn the_machine_addresses_include_loopback_and_no_link_local() {
    let ips = local_ca::box_addresses();
    assert!(ips.contains(&"127.0.0.1".parse().expect("ip")), "{ips:?}");
    if std::path::Path::new("/proc/sys/net/ipv6/conf/lo").exists() {
        assert!(ips.contains(&"::1".parse().expect("ip")), "{ips:?}");
    }
    assert!(
        !ips.iter().any(|ip| ip.to_string().starts_with("fe80")),
        "{ips:?}"
    );
    let mut unique = ips.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ips.len(), "{ips:?}");
}
