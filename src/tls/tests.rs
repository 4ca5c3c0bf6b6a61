//! Unit tests of the certificate store with real parts only: real rcgen certificates
//! on a temporary state directory and real TLS handshakes (tokio-rustls server with
//! [`Tls::server_config`] on 127.0.0.1, tokio-rustls client trusting only what the
//! test says). Every wait is bounded.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::config::Config;

const DOMAIN: &str = "syndic.example.be";
const ALIAS: &str = "www.syndic.example.be";

pub(super) fn config(dir: &Path, tls: &str) -> Config {
    let text = format!(
        "domain = \"{DOMAIN}\"\naliases = [\"{ALIAS}\"]\n[paths]\nstate = \"{}\"\n[tls]\n{tls}\n",
        dir.join("state").display()
    );
    Config::parse(&text, &dir.join("koprogo.toml")).expect("test config")
}

pub(super) fn fast() -> TlsTuning {
    TlsTuning {
        retry_min: Duration::from_millis(100),
        retry_max: Duration::from_millis(400),
        check_period: Duration::from_millis(500),
        files_poll: Duration::from_millis(100),
        acme_timeout: Duration::from_secs(5),
        ..TlsTuning::default()
    }
}

/// A TLS server on 127.0.0.1 answering "pong:<line>" to each line; aborted on drop.
pub(super) struct Server {
    pub(super) addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(super) async fn serve(tls: &Tls) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                if stream.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN) {
                    return;
                }
                let (r, mut w) = tokio::io::split(stream);
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if w.write_all(format!("pong:{line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let _ = w.flush().await;
                }
            });
        }
    });
    Server { addr, task }
}

/// Accepts any certificate and signature (the test inspects the certificate instead;
/// webpki could not even parse a TLS-ALPN-01 certificate's critical acmeIdentifier).
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

pub(super) type Client = tokio_rustls::client::TlsStream<TcpStream>;

/// Connects; `roots` None = accept any certificate.
pub(super) async fn connect(
    addr: SocketAddr,
    name: &str,
    roots: Option<RootCertStore>,
    alpn: &[&[u8]],
) -> anyhow::Result<Client> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut cc = match roots {
        Some(r) => builder.with_root_certificates(r).with_no_client_auth(),
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth(),
    };
    cc.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_string())?;
    let conn = tokio_rustls::TlsConnector::from(Arc::new(cc));
    Ok(tokio::time::timeout(Duration::from_secs(5), conn.connect(name, tcp)).await??)
}

pub(super) fn peer_serial(c: &Client) -> String {
    let certs = c.get_ref().1.peer_certificates().expect("peer certs");
    certinfo::CertInfo::parse(&certs[0]).expect("parse").serial
}

async fn ping(c: &mut Client, text: &str) -> String {
    c.write_all(format!("{text}\n").as_bytes())
        .await
        .expect("write");
    c.flush().await.expect("flush");
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        use tokio::io::AsyncReadExt;
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut byte))
            .await
            .expect("answer in time")
            .expect("read");
        if n == 0 || byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    String::from_utf8(line).expect("utf8")
}

pub(super) fn root_store(pem: &str) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(c.expect("pem")).expect("add root");
    }
    roots
}

pub(super) fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).expect("meta").permissions().mode() & 0o777
}

pub(super) async fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn local_ca_is_persistent_and_private() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = config(d.path(), "mode = \"internal\"");
    let a = Tls::load(&cfg).expect("first load");
    let root1 = export_root(&cfg).expect("export");
    let serial1 = a.store.primary().cert.info.serial.clone();
    drop(a);
    let b = Tls::load(&cfg).expect("second load");
    assert_eq!(export_root(&cfg).expect("export"), root1, "same root");
    assert_eq!(b.store.primary().cert.info.serial, serial1, "leaf reused");
    assert!(root1.contains("BEGIN CERTIFICATE"));
    let paths = TlsPaths::new(&cfg.paths.state);
    assert_eq!(mode_of(&paths.dir), 0o700);
    assert_eq!(mode_of(&paths.ca_dir), 0o700);
    assert_eq!(mode_of(&paths.root_key), 0o600);
    assert_eq!(mode_of(&paths.leaf), 0o600);
    let ca = local_ca::read_root(&paths).expect("read").expect("root");
    assert!(ca
        .info
        .issuer
        .starts_with(&format!("KoproGo local CA ({DOMAIN}, ")));
    let years = (ca.info.not_after - ca.info.not_before).num_days() / 365;
    assert_eq!(years, 10);
    let st = b.status();
    assert_eq!(st.mode, "internal");
    assert_eq!(st.source, "local-ca");
    assert!(st.next_renewal.is_some());
    let leaf = b.store.primary();
    let life = leaf.cert.info.lifetime().num_days();
    assert!((89..=91).contains(&life), "leaf lifetime {life} days");
}

#[test]
fn a_corrupt_root_is_replaced_but_an_unreadable_one_is_an_error() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = config(d.path(), "mode = \"internal\"");
    let first = export_root(&cfg).expect("create");
    let paths = TlsPaths::new(&cfg.paths.state);
    // Unreadable (here: a directory where the certificate should be): a clear error,
    // and the key is left alone, since replacing a root breaks every office PC.
    std::fs::rename(&paths.root_crt, d.path().join("saved.crt")).expect("mv");
    std::fs::create_dir(&paths.root_crt).expect("mkdir");
    let e = Tls::load(&cfg).err().expect("unreadable root is an error");
    assert!(format!("{e:#}").contains("root.crt"), "{e:#}");
    assert!(paths.root_key.exists());
    std::fs::remove_dir(&paths.root_crt).expect("rmdir");
    std::fs::rename(d.path().join("saved.crt"), &paths.root_crt).expect("mv back");
    assert_eq!(export_root(&cfg).expect("same root"), first);
    // Corrupt: set aside, and a new root is made.
    std::fs::write(&paths.root_crt, "garbage").expect("write");
    let second = export_root(&cfg).expect("replaced");
    assert_ne!(second, first);
    let aside = std::fs::read_dir(&paths.ca_dir)
        .expect("ls")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".bad-"))
        .count();
    assert_eq!(aside, 2, "root.crt and root.key kept aside");
}

#[tokio::test]
async fn leaf_verifies_against_the_exported_root_only() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = config(d.path(), "mode = \"internal\"");
    let tls = Tls::load(&cfg).expect("load");
    let server = serve(&tls).await;
    let roots = || root_store(&export_root(&cfg).expect("export"));
    for name in [DOMAIN, ALIAS, "localhost", "127.0.0.1"] {
        let mut c = connect(server.addr, name, Some(roots()), &[b"h2", b"http/1.1"])
            .await
            .unwrap_or_else(|e| panic!("verified handshake for {name}: {e:#}"));
        assert_eq!(c.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "{name}");
        assert_eq!(ping(&mut c, "x").await, "pong:x");
    }
    let names = &tls.store.primary().cert.info.names;
    for ip in local_ca::box_addresses() {
        assert!(names.contains(&ip.to_string()), "{ip} in {names:?}");
    }
    let c = connect(server.addr, DOMAIN, Some(roots()), &[b"http/1.1"])
        .await
        .expect("http/1.1");
    assert_eq!(c.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    // Another root (a different state) must not verify it.
    let other = tempfile::tempdir().expect("tempdir");
    let other_root = export_root(&config(other.path(), "mode = \"internal\"")).expect("other");
    let refused = connect(server.addr, DOMAIN, Some(root_store(&other_root)), &[b"h2"]).await;
    assert!(refused.is_err(), "a foreign root must not verify the leaf");
    // A name the leaf does not cover fails verification.
    let wrong = connect(server.addr, "example.com", Some(roots()), &[b"h2"]).await;
    assert!(wrong.is_err());
}

#[tokio::test]
async fn tls_alpn_challenge_is_served_only_when_pending() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = config(d.path(), "mode = \"internal\"");
    let tls = Tls::load(&cfg).expect("load");
    let server = serve(&tls).await;
    let none = connect(server.addr, DOMAIN, None, &[ACME_TLS_ALPN]).await;
    assert!(none.is_err(), "no challenge pending: no certificate");
    let digest = [7u8; 32];
    let cert = acme_challenge_cert_for_tests(DOMAIN, &digest);
    tls.store.add_challenge(DOMAIN, cert.clone());
    let c = connect(server.addr, DOMAIN, None, &[ACME_TLS_ALPN])
        .await
        .expect("challenge handshake");
    assert_eq!(c.get_ref().1.alpn_protocol(), Some(ACME_TLS_ALPN));
    let served = &c.get_ref().1.peer_certificates().expect("certs")[0];
    assert_eq!(served, &cert.cert[0]);
    // Ordinary handshakes still get the leaf.
    let n = connect(server.addr, DOMAIN, None, &[b"h2"])
        .await
        .expect("h2");
    assert_eq!(peer_serial(&n), tls.store.primary().cert.info.serial);
    tls.store.remove_challenge(DOMAIN);
    assert!(connect(server.addr, DOMAIN, None, &[ACME_TLS_ALPN])
        .await
        .is_err());
}

fn acme_challenge_cert_for_tests(name: &str, digest: &[u8]) -> Arc<rustls::sign::CertifiedKey> {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).expect("params");
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).expect("cert");
    let signing = rustls::crypto::ring::sign::any_supported_type(
        &rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .expect("signing key");
    Arc::new(rustls::sign::CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    ))
}

#[tokio::test]
async fn leaf_is_renewed_when_a_third_remains_and_swapped_live() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = config(d.path(), "mode = \"internal\"");
    let tuning = TlsTuning {
        local_leaf_validity: Duration::from_secs(6),
        ..fast()
    };
    let tls = Tls::load_with(&cfg, tuning).expect("load");
    let first = tls.store.primary().cert.info.clone();
    assert!((6..=7).contains(&first.lifetime().num_seconds()));
    let server = serve(&tls).await;
    let roots = root_store(&export_root(&cfg).expect("export"));
    let mut open = connect(server.addr, DOMAIN, Some(roots.clone()), &[b"h2"])
        .await
        .expect("connect");
    assert_eq!(peer_serial(&open), first.serial);
    let task = tokio::spawn(tls.clone().maintain());
    wait_for("the leaf renewal", Duration::from_secs(15), || {
        tls.store.primary().cert.info.serial != first.serial
    })
    .await;
    let renewed_at = Utc::now();
    assert!(
        renewed_at >= first.renew_at() - chrono::Duration::milliseconds(100),
        "renewed at {renewed_at}, due {}",
        first.renew_at()
    );
    assert!(renewed_at < first.not_after, "renewed before expiry");
    let second = tls.store.primary().cert.info.serial.clone();
    // The open connection still works; new handshakes see the new certificate.
    assert_eq!(ping(&mut open, "still here").await, "pong:still here");
    let fresh = connect(server.addr, DOMAIN, Some(roots), &[b"h2"])
        .await
        .expect("verified after renewal");
    assert_eq!(peer_serial(&fresh), second);
    // Stored for the next start.
    let paths = TlsPaths::new(&cfg.paths.state);
    let on_disk = local_ca::read_leaf(&paths).expect("read").expect("leaf");
    assert!(on_disk.info.not_before >= first.not_before);
    task.abort();
}

#[test]
fn acme_mode_serves_the_local_leaf_until_a_certificate_exists() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = config(
        d.path(),
        "mode = \"acme\"\nacme_email = \"ops@example.be\"\nacme_directory = \"https://127.0.0.1:9/dir\"",
    );
    let tls = Tls::load(&cfg).expect("load without network");
    let st = tls.status();
    assert_eq!(st.mode, "acme");
    assert_eq!(st.source, "local-ca");
    assert_eq!(st.orders, 0);
    assert!(st.names.contains(&DOMAIN.to_string()));
    // A corrupt stored certificate is set aside with a warning, never fatal.
    let paths = TlsPaths::new(&cfg.paths.state);
    std::fs::create_dir_all(&paths.acme_dir).expect("mkdir");
    std::fs::write(&paths.acme_cert, b"{ not json").expect("write");
    let tls = Tls::load(&cfg).expect("load with a corrupt stored certificate");
    assert_eq!(tls.status().source, "local-ca");
    assert!(!paths.acme_cert.exists(), "moved aside");
    let aside = std::fs::read_dir(&paths.acme_dir)
        .expect("ls")
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().contains(".bad-"));
    assert!(aside, "kept as *.bad-<time>");
}

#[tokio::test]
async fn acme_failure_keeps_serving_and_backs_off() {
    let d = tempfile::tempdir().expect("tempdir");
    // Nothing listens on port 9 of loopback: every attempt fails at once.
    let cfg = config(
        d.path(),
        "mode = \"acme\"\nacme_email = \"ops@example.be\"\nacme_directory = \"https://127.0.0.1:9/dir\"",
    );
    let tls = Tls::load_with(&cfg, fast()).expect("load");
    let serial = tls.store.primary().cert.info.serial.clone();
    let task = tokio::spawn(tls.clone().maintain());
    wait_for("a failed attempt", Duration::from_secs(10), || {
        tls.status().last_error.is_some()
    })
    .await;
    let st = tls.status();
    assert!(st.retry_at.is_some() && st.last_attempt.is_some(), "{st:?}");
    let first_attempt = st.last_attempt.clone();
    wait_for("a retry", Duration::from_secs(10), || {
        tls.status().last_attempt != first_attempt
    })
    .await;
    assert_eq!(tls.store.primary().cert.info.serial, serial, "still served");
    assert_eq!(tls.status().source, "local-ca");
    task.abort();
}

pub(super) fn self_signed(names: &[&str], days: i64) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("params");
    let now = Utc::now();
    params.not_before =
        x509_parser::time::ASN1Time::from_timestamp((now - chrono::Duration::days(1)).timestamp())
            .expect("time")
            .to_datetime();
    params.not_after = x509_parser::time::ASN1Time::from_timestamp(
        (now + chrono::Duration::days(days)).timestamp(),
    )
    .expect("time")
    .to_datetime();
    let cert = params.self_signed(&key).expect("cert");
    (cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn files_mode_reloads_and_keeps_the_last_good_certificate() {
    let d = tempfile::tempdir().expect("tempdir");
    let cert_path = d.path().join("site.crt");
    let key_path = d.path().join("site.key");
    let (c1, k1) = self_signed(&[DOMAIN], 30);
    std::fs::write(&cert_path, &c1).expect("write");
    std::fs::write(&key_path, &k1).expect("write");
    let cfg = config(
        d.path(),
        "mode = \"files\"\ncert = \"site.crt\"\nkey = \"site.key\"",
    );
    let tls = Tls::load_with(&cfg, fast()).expect("load");
    let st = tls.status();
    assert_eq!((st.mode.as_str(), st.source.as_str()), ("files", "files"));
    assert_eq!(st.last_error, None);
    let first = tls.store.primary().cert.info.serial.clone();
    let server = serve(&tls).await;
    let task = tokio::spawn(tls.clone().maintain());

    // A broken certificate file: the old one stays, the error names the file.
    std::fs::write(&cert_path, "garbage").expect("write");
    wait_for("the bad-file error", Duration::from_secs(5), || {
        tls.status().last_error.is_some()
    })
    .await;
    let err = tls.status().last_error.unwrap_or_default();
    assert!(
        err.contains("tls.cert") && err.contains("site.crt"),
        "{err}"
    );
    let c = connect(server.addr, DOMAIN, None, &[b"h2"])
        .await
        .expect("tls");
    assert_eq!(peer_serial(&c), first, "last good certificate still served");

    // A certificate that does not match the key: named too.
    let (c2, k2) = self_signed(&[DOMAIN, ALIAS], 30);
    std::fs::write(&cert_path, &c2).expect("write");
    wait_for("the mismatch error", Duration::from_secs(5), || {
        tls.status()
            .last_error
            .is_some_and(|e| e.contains("does not match"))
    })
    .await;
    assert_eq!(tls.store.primary().cert.info.serial, first);

    // The matching key arrives: reloaded, error cleared, new handshakes see it.
    std::fs::write(&key_path, &k2).expect("write");
    wait_for("the reload", Duration::from_secs(5), || {
        tls.store.primary().cert.info.serial != first
    })
    .await;
    assert_eq!(tls.status().last_error, None);
    let c = connect(server.addr, ALIAS, None, &[b"h2"])
        .await
        .expect("tls");
    assert_eq!(peer_serial(&c), tls.store.primary().cert.info.serial);
    task.abort();
}

#[test]
fn files_mode_refuses_to_start_on_bad_files() {
    let d = tempfile::tempdir().expect("tempdir");
    let (c1, _) = self_signed(&[DOMAIN], 30);
    let (_, k2) = self_signed(&[DOMAIN], 30);
    std::fs::write(d.path().join("site.crt"), &c1).expect("write");
    std::fs::write(d.path().join("site.key"), "nope").expect("write");
    let cfg = config(
        d.path(),
        "mode = \"files\"\ncert = \"site.crt\"\nkey = \"site.key\"",
    );
    let e = Tls::load(&cfg).err().expect("bad key is an error");
    let msg = format!("{e:#}");
    assert!(msg.contains("tls.key") && msg.contains("site.key"), "{msg}");
    std::fs::write(d.path().join("site.key"), &k2).expect("write");
    let msg = format!("{:#}", Tls::load(&cfg).err().expect("mismatch"));
    assert!(msg.contains("does not match"), "{msg}");
    std::fs::remove_file(d.path().join("site.crt")).expect("rm");
    let msg = format!("{:#}", Tls::load(&cfg).err().expect("missing"));
    assert!(
        msg.contains("tls.cert") && msg.contains("site.crt"),
        "{msg}"
    );
    // An expired certificate is still served, with a warning.
    let (c3, k3) = self_signed(&[DOMAIN], -1);
    std::fs::write(d.path().join("site.crt"), &c3).expect("write");
    std::fs::write(d.path().join("site.key"), &k3).expect("write");
    let tls = Tls::load(&cfg).expect("expired still loads");
    let w = tls.status().last_error.unwrap_or_default();
    assert!(w.contains("expired"), "{w}");
}

#[test]
fn status_from_disk_reports_what_is_stored() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = config(d.path(), "mode = \"internal\"");
    let st = status_from_disk(&cfg).expect("status");
    assert_eq!(st.source, "none");
    assert!(!cfg.paths.state.join("tls").exists(), "nothing created");
    let tls = Tls::load(&cfg).expect("load");
    let live = tls.status();
    let st = status_from_disk(&cfg).expect("status");
    assert_eq!(st.source, "local-ca");
    assert_eq!(st.names, live.names);
    assert_eq!(st.not_after, live.not_after);
    assert_eq!(st.next_renewal, live.next_renewal);
    assert!(st
        .issuer
        .starts_with(&format!("KoproGo local CA ({DOMAIN}, ")));
    assert_eq!(st.ca, live.ca, "the local CA as the running one shows it");

    // Acme mode: the stored ACME certificate wins over the leaf.
    let acme_cfg = config(
        d.path(),
        "mode = \"acme\"\nacme_email = \"ops@example.be\"\nacme_directory = \"https://127.0.0.1:9/dir\"",
    );
    let st = status_from_disk(&acme_cfg).expect("status");
    assert_eq!((st.mode.as_str(), st.source.as_str()), ("acme", "local-ca"));
    let (c, k) = self_signed(&[DOMAIN, ALIAS], 60);
    let stored = serde_json::json!({
        "directory": "https://127.0.0.1:9/dir",
        "names": [DOMAIN, ALIAS],
        "obtained": "2026-01-01T00:00:00Z",
        "certificate": c,
        "private_key": k,
    });
    let paths = TlsPaths::new(&cfg.paths.state);
    std::fs::create_dir_all(&paths.acme_dir).expect("mkdir");
    std::fs::write(&paths.acme_cert, stored.to_string()).expect("write");
    let st = status_from_disk(&acme_cfg).expect("status");
    assert_eq!(st.source, "acme");
    assert!(st.names.contains(&ALIAS.to_string()));
    let tls = Tls::load(&acme_cfg).expect("load");
    assert_eq!(
        tls.status().source,
        "acme",
        "the stored certificate is reused"
    );
    let round: CertStatus =
        serde_json::from_str(&serde_json::to_string(&st).expect("json")).expect("parse");
    assert_eq!(round, st);

    // Files mode with a bad file: the error is in last_error, not a failure.
    let files_cfg = config(
        d.path(),
        "mode = \"files\"\ncert = \"no.crt\"\nkey = \"no.key\"",
    );
    let st = status_from_disk(&files_cfg).expect("status");
    assert_eq!(st.source, "none");
    assert!(st.last_error.unwrap_or_default().contains("no.crt"));
}

#[test]
fn off_mode_still_has_a_valid_server_config() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = config(d.path(), "mode = \"off\"");
    let tls = Tls::load(&cfg).expect("load");
    assert_eq!(tls.status().mode, "off");
    assert_eq!(tls.status().source, "local-ca");
    let sc = tls.server_config();
    assert_eq!(
        sc.alpn_protocols,
        vec![b"h2".to_vec(), b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()]
    );
}

#[test]
fn http01_answers_only_pending_tokens() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = config(d.path(), "mode = \"internal\"");
    let tls = Tls::load(&cfg).expect("load");
    assert_eq!(tls.http01_key_authorization("abc"), None);
    tls.http01_lock().insert("abc".into(), "abc.thumb".into());
    assert_eq!(
        tls.http01_key_authorization("abc").as_deref(),
        Some("abc.thumb")
    );
}

#[test]
fn backoff_doubles_up_to_the_cap() {
    let t = TlsTuning::default();
    let mut b = Backoff::between(t.retry_min, t.retry_max);
    let waits: Vec<u64> = (0..10).map(|_| b.next_delay().as_secs()).collect();
    assert_eq!(waits, [30, 60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]);
    b.reset();
    assert_eq!(b.next_delay().as_secs(), 30);
}
