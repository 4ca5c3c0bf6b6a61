//! A person's view: headless Chromium (Debian's `chromium`) loads the site over
//! HTTPS from the appliance's local CA, imported into the browser's certificate
//! store the way an office PC would (certutil into NSS), runs the page's script
//! (which calls the API through the proxy), and takes a screenshot kept as a test
//! artifact. And the office PC's protection: a certificate for another site signed
//! with the root's own key is refused by Chromium (Name Constraints), where an
//! old-style unconstrained root lets the same forgery through.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Appliance;

const PAGE: &str = r#"<!doctype html>
<html lang="fr"><head><meta charset="utf-8"><title>KoproGo</title>
<link rel="stylesheet" href="/_astro/site.css"></head>
<body><main><h1>KoproGo</h1><p id="js">waiting for script</p><p id="api">api: unknown</p></main>
<script src="/_astro/app.js"></script></body></html>"#;
const SCRIPT: &str = r#"document.getElementById('js').textContent = 'rendered by script';
fetch('/api/v1/health').then(r => r.json()).then(j => {
  document.getElementById('api').textContent = 'api: ' + j.status;
}).catch(e => { document.getElementById('api').textContent = 'api: error ' + e; });"#;
const CSS: &str = "body{font-family:sans-serif;background:#eef3f8}h1{color:#1d4ed8}";

/// Debian's Chromium when it and certutil are installed (else the test is skipped,
/// saying why).
fn chromium_and_certutil() -> Option<PathBuf> {
    let Some(bin) = common::chromium::binary() else {
        eprintln!(
            "skipped: Debian's chromium is not installed (scripts/test.sh installs it as root)"
        );
        return None;
    };
    if !common::chromium::certutil_available() {
        eprintln!("skipped: certutil (libnss3-tools) is not installed");
        return None;
    }
    Some(bin)
}

/// Runs Chromium headless with a bounded time; returns stdout.
fn run_chromium(bin: &Path, home: &Path, args: &[String]) -> String {
    let mut child = Command::new(bin)
        .env("HOME", home)
        .args(common::chromium::FLAGS)
        .arg(format!(
            "--user-data-dir={}",
            home.join("profile").display()
        ))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut out = String::new();
    use std::io::Read;
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    out
}

#[test]
fn chromium_renders_the_site_over_https_from_the_local_ca() {
    let Some(bin) = chromium_and_certutil() else {
        return;
    };
    let mut a = Appliance::new("frontend = \"frontend\"\n");
    let f = a.path("frontend");
    std::fs::create_dir_all(f.join("_astro")).expect("mkdir");
    std::fs::write(f.join("index.html"), PAGE).expect("page");
    std::fs::write(f.join("_astro/app.js"), SCRIPT).expect("js");
    std::fs::write(f.join("_astro/site.css"), CSS).expect("css");
    a.start();
    a.wait_ready();
    let https = a.cfg().proxy.https[0].port();

    // The office PC's side: import the exported root into the browser's NSS store.
    let home = a.path("browser-home");
    let root = a.path("root.pem");
    let (code, _, err) = a.cli(&["ca", "export", root.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{err}");
    common::chromium::trust_root(&home, &root);

    let url = format!("https://localhost:{https}/");
    let dom = run_chromium(
        &bin,
        &home,
        &[
            "--virtual-time-budget=5000".into(),
            "--dump-dom".into(),
            url.clone(),
        ],
    );
    assert!(
        dom.contains("rendered by script"),
        "page script did not run: {dom}"
    );
    assert!(
        dom.contains("api: ok"),
        "the API call through the proxy failed: {dom}"
    );

    let artifacts = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let shot = artifacts.join("browser-home.png");
    let _ = std::fs::remove_file(&shot);
    run_chromium(
        &bin,
        &home,
        &[
            "--virtual-time-budget=5000".into(),
            "--window-size=1024,640".into(),
            format!("--screenshot={}", shot.display()),
            url,
        ],
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    assert!(
        png.len() > 5_000,
        "screenshot suspiciously small: {} bytes",
        png.len()
    );
    eprintln!("screenshot: {}", shot.display());
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
    // No browser left behind either.
    let marker = home.display().to_string();
    assert!(
        common::processes()
            .iter()
            .all(|(_, _, c)| !c.contains(&marker)),
        "chromium processes left"
    );
}

/// A server certificate for `name` signed with the CA key in `key_pem` (the root
/// `root_pem`): what whoever reads the root's key could make.
fn forge(root_pem: &str, key_pem: &str, name: &str) -> (String, String) {
    use rustls::pki_types::pem::PemObject;
    let ca_key = rcgen::KeyPair::from_pem(key_pem).expect("root key");
    let ca_der =
        rustls::pki_types::CertificateDer::from_pem_slice(root_pem.as_bytes()).expect("root");
    let issuer = rcgen::Issuer::from_ca_cert_der(&ca_der, &ca_key).expect("issuer");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).expect("name");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer).expect("sign");
    (cert.pem(), key.serialize_pem())
}

/// An HTTPS server on 127.0.0.1:`port` answering every request with a page saying
/// FORGED PAGE, presenting `cert_pem`; runs until `rt` is dropped.
fn serve_forged(rt: &tokio::runtime::Runtime, port: u16, cert_pem: &str, key_pem: &str) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let chain = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("cert")];
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut sc = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    sc.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(sc));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
        .expect("bind the forged site");
    rt.spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
                let body = "<html><body><h1>FORGED PAGE</h1></body></html>";
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
}

/// What Chromium shows for https://bank.example:`port`/ (resolved to 127.0.0.1),
/// trusting only `root` (PEM file) in a fresh profile under `home`.
fn chromium_view(bin: &Path, home: &Path, root: &Path, port: u16) -> String {
    common::chromium::trust_root(home, root);
    run_chromium(
        bin,
        home,
        &[
            "--host-resolver-rules=MAP bank.example 127.0.0.1".into(),
            "--virtual-time-budget=3000".into(),
            "--dump-dom".into(),
            format!("https://bank.example:{port}/"),
        ],
    )
}

#[test]
fn chromium_refuses_another_site_signed_by_the_local_ca_key() {
    let Some(bin) = chromium_and_certutil() else {
        return;
    };
    // The appliance's root, as `ca export` makes it (no need to run the site).
    let a = Appliance::new("");
    let root = a.path("root.pem");
    let (code, _, err) = a.cli(&["ca", "export", root.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{err}");
    let root_pem = std::fs::read_to_string(&root).expect("root");
    let key_pem = std::fs::read_to_string(a.path("state/tls/ca/root.key")).expect("the root's key");
    let rt = common::https::runtime();

    let (cert, key) = forge(&root_pem, &key_pem, "bank.example");
    let port = common::free_port();
    serve_forged(&rt, port, &cert, &key);
    let dom = chromium_view(&bin, &a.path("pc-constrained"), &root, port);
    // (Headless Chromium dumps an empty DOM for a certificate error.)
    assert!(
        !dom.contains("FORGED PAGE"),
        "Chromium showed a bank.example page signed by the local CA's key: {dom}"
    );

    // The same forgery under a root without Name Constraints (what earlier versions
    // made) is shown: the refusal above is the constraints' doing.
    let old_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "KoproGo local CA (localhost)");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let old_root = params.self_signed(&old_key).expect("old root");
    let old_root_file = a.path("old-root.pem");
    std::fs::write(&old_root_file, old_root.pem()).expect("write");
    let (cert, key) = forge(&old_root.pem(), &old_key.serialize_pem(), "bank.example");
    let port = common::free_port();
    serve_forged(&rt, port, &cert, &key);
    let dom = chromium_view(&bin, &a.path("pc-old"), &old_root_file, port);
    assert!(
        dom.contains("FORGED PAGE"),
        "the control failed: Chromium did not show the page even under an unconstrained root: {dom}"
    );
    drop(rt);
    let marker = a.path("pc-").display().to_string();
    assert!(
        common::processes()
            .iter()
            .all(|(_, _, c)| !c.contains(&marker)),
        "chromium processes left"
    );
}
