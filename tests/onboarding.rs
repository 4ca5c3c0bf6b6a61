//! Office onboarding: in `internal` TLS mode the plain-HTTP listener serves
//! `/ca`, a plain page with the local root CA's fingerprint and downloads, and only
//! that (every other path keeps its 308; `acme` and `files` modes have no page).
//! The fingerprint on the page is the one computed from the downloaded DER, the one
//! `koprogo ca export` prints and `cert status --json` shows; the page follows
//! `ca rotate --prepare` and `ca rotate`; nothing of the request (Host, query) is
//! reflected. Real Chromium with JavaScript disabled reads the page, downloads the
//! `.crt`, and a browser trusting that file loads the site over HTTPS. The real
//! KoproGo serves the same page.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::chromium::{self, Browser};
use common::https::{runtime, Client};
use common::Appliance;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};

/// One answer read off a plain TCP connection.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map_or("", |(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `method path` with `headers` (CRLF-ended lines) to 127.0.0.1:`port`.
fn send(port: u16, method: &str, path: &str, headers: &str) -> Answer {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\n{headers}Connection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end: {}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    }
}

fn get(port: u16, path: &str) -> Answer {
    send(port, "GET", path, "Host: 127.0.0.1\r\n")
}

/// What a PC shows: SHA-256 of the DER, upper-case hex pairs joined by colons.
fn fingerprint(der: &[u8]) -> String {
    let hex = hex::encode_upper(Sha256::digest(der));
    hex.as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

fn pem_der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("a PEM certificate")
        .to_vec()
}

/// The text of the element with `id` on the page (no nested markup there).
fn field(page: &str, id: &str) -> String {
    let open = format!("id=\"{id}\">");
    let start = page
        .find(&open)
        .unwrap_or_else(|| panic!("no #{id} on the page:\n{page}"))
        + open.len();
    let len = page[start..].find('<').expect("element end");
    page[start..start + len].to_string()
}

/// `cert status --json`'s `ca` object.
fn ca_status(a: &Appliance) -> serde_json::Value {
    let (code, out, err) = a.cli(&["cert", "status", "--json"]);
    assert_eq!(code, 0, "cert status: {out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let ca = v["ca"].clone();
    // The text form shows the same fingerprint.
    let (code, text, err) = a.cli(&["cert", "status"]);
    assert_eq!(code, 0, "cert status: {text}{err}");
    let fp = ca["fingerprint"].as_str().expect("ca.fingerprint");
    assert!(
        text.contains(&format!("CA SHA-256    {fp}")),
        "cert status does not show the root's fingerprint {fp}:\n{text}"
    );
    ca
}

/// `koprogo ca export`: (PEM from stdout, the fingerprint from stderr).
fn export(a: &Appliance) -> (String, String) {
    let (code, out, err) = a.cli(&["ca", "export"]);
    assert_eq!(code, 0, "ca export: {out}{err}");
    assert!(out.starts_with("-----BEGIN CERTIFICATE-----"), "{out}");
    assert!(
        !out.contains("SHA-256"),
        "stdout must be the PEM only: {out}"
    );
    let fp = err
        .lines()
        .find_map(|l| l.strip_prefix("SHA-256 fingerprint: "))
        .unwrap_or_else(|| panic!("no fingerprint on stderr: {err}"))
        .to_string();
    (out, fp)
}

fn verifies(pem: &str, port: u16) -> bool {
    runtime().block_on(async {
        match Client::new(pem, &[b"http/1.1"]).get(port, "/health").await {
            Ok(r) => r.status == 200,
            Err(_) => false,
        }
    })
}

fn assert_redirects(port: u16, path: &str, to: &str) {
    let r = get(port, path);
    assert_eq!(r.status, 308, "{path}: {}", r.text());
    assert_eq!(r.header("location"), format!("{to}{path}"), "{path}");
}

#[test]
fn the_page_hands_out_the_root_over_plain_http() {
    let mut a = Appliance::new("");
    a.start();
    a.wait_ready();
    let cfg = a.cfg();
    let (http, https) = (cfg.proxy.http[0].port(), cfg.proxy.https[0].port());

    let page = get(http, "/ca");
    assert_eq!(page.status, 200, "{}", page.text());
    assert_eq!(page.header("content-type"), "text/html; charset=utf-8");
    let csp = page.header("content-security-policy");
    assert!(
        csp.starts_with("default-src 'none';") && !csp.contains("script"),
        "{csp}"
    );
    assert_eq!(page.header("x-content-type-options"), "nosniff");
    assert_eq!(page.header("cache-control"), "no-store");
    let html = page.text();
    assert!(!html.to_ascii_lowercase().contains("<script"), "{html}");
    assert!(
        html.contains(&format!("href=\"https://localhost:{https}/\"")),
        "the page must link to the configured site:\n{html}"
    );
    let fp = field(&html, "fingerprint");
    let ca = ca_status(&a);
    assert_eq!(fp, ca["fingerprint"].as_str().unwrap_or_default());
    assert_eq!(
        field(&html, "subject"),
        ca["subject"].as_str().unwrap_or("")
    );
    assert_eq!(
        field(&html, "expires"),
        format!(
            "{} (UTC)",
            &ca["not_after"].as_str().unwrap_or_default()[..10]
        )
    );
    assert!(!html.contains("id=\"next\""), "no next root yet");
    // The same page whatever the request says: Host, query, forwarded names.
    for (path, headers) in [
        ("/ca/", "Host: 127.0.0.1\r\n"),
        ("/ca?q=%3Cscript%3Eevil", "Host: evil.example\r\n"),
        (
            "/ca",
            "Host: x\"><h1>evil</h1>\r\nX-Forwarded-Host: evil.example\r\nReferer: http://evil.example/\r\n",
        ),
    ] {
        let r = send(http, "GET", path, headers);
        assert_eq!(r.status, 200, "{path} {headers}: {}", r.text());
        assert!(!r.text().contains("evil"), "{path} {headers} reflected");
        assert_eq!(r.body, page.body, "{path} {headers}: another page");
    }
    let head = send(http, "HEAD", "/ca", "Host: 127.0.0.1\r\n");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), page.body.len().to_string());
    assert!(head.body.is_empty());

    // HEAD is not a download; GET is, and is recorded as handed out.
    assert_eq!(ca["exported"], false, "{ca}");
    let head = send(http, "HEAD", "/ca/koprogo-root.crt", "Host: 127.0.0.1\r\n");
    assert_eq!(head.status, 200);
    assert_eq!(ca_status(&a)["exported"], false, "HEAD recorded a download");
    let crt = get(http, "/ca/koprogo-root.crt");
    assert_eq!(crt.status, 200);
    assert_eq!(crt.header("content-type"), "application/x-x509-ca-cert");
    assert_eq!(
        crt.header("content-disposition"),
        "attachment; filename=\"koprogo-root.crt\""
    );
    assert_eq!(crt.header("x-content-type-options"), "nosniff");
    assert_eq!(head.header("content-length"), crt.body.len().to_string());
    assert_eq!(
        ca_status(&a)["exported"],
        true,
        "the download was not recorded"
    );
    let (_, cert) = x509_parser::parse_x509_certificate(&crt.body).expect("the .crt is DER");
    assert!(cert.is_ca(), "not a CA certificate");
    assert_eq!(fingerprint(&crt.body), fp, "page vs downloaded DER");
    let pem = get(http, "/ca/koprogo-root.pem");
    assert_eq!(pem.status, 200);
    assert_eq!(pem.header("content-type"), "application/x-pem-file");
    assert_eq!(
        pem.header("content-disposition"),
        "attachment; filename=\"koprogo-root.pem\""
    );
    assert_eq!(pem_der(&pem.text()), crt.body, "PEM and DER differ");
    let (exported, export_fp) = export(&a);
    assert_eq!(exported, pem.text());
    assert_eq!(export_fp, fp, "ca export vs the page");
    assert!(
        verifies(&pem.text(), https),
        "the root does not verify the site"
    );

    // Everything else on port 80 still goes to HTTPS; other methods are refused here.
    let site = format!("https://localhost:{https}");
    for path in [
        "/",
        "/ca/x",
        "/cafe",
        "/CA",
        "/ca/koprogo-root.der",
        "/ca//",
        "/api/v1/health",
    ] {
        assert_redirects(http, path, &site);
    }
    let r = send(http, "GET", "/ca/x", "Host: evil.example\r\n");
    assert_eq!(r.header("location"), format!("{site}/ca/x"));
    for (method, path) in [
        ("POST", "/ca"),
        ("PUT", "/ca/koprogo-root.crt"),
        ("DELETE", "/ca/"),
        ("OPTIONS", "/ca/koprogo-root.pem"),
    ] {
        let r = send(http, method, path, "Host: 127.0.0.1\r\n");
        assert_eq!(r.status, 405, "{method} {path}");
        assert_eq!(r.header("allow"), "GET, HEAD", "{method} {path}");
    }
    assert_eq!(send(http, "POST", "/", "Host: 127.0.0.1\r\n").status, 308);

    // The next root, once prepared, is offered beside the current one.
    assert_eq!(get(http, "/ca/koprogo-next-root.crt").status, 404);
    let next_file = a.path("next-root.pem");
    let (code, out, err) = a.cli(&[
        "ca",
        "rotate",
        "--prepare",
        next_file.to_str().expect("utf8"),
    ]);
    assert_eq!(code, 0, "ca rotate --prepare: {out}{err}");
    let next_pem = std::fs::read_to_string(&next_file).expect("next root");
    let next_fp = fingerprint(&pem_der(&next_pem));
    assert!(
        err.contains(&format!("next root SHA-256 fingerprint: {next_fp}")),
        "{err}"
    );
    let html = get(http, "/ca").text();
    assert_eq!(field(&html, "fingerprint"), fp, "the site keeps its root");
    assert_eq!(field(&html, "next-fingerprint"), next_fp);
    assert!(html.contains("Prepared replacement root"), "{html}");
    println!(
        "MEASURE onboarding page {} bytes, {} with the next root; root DER {} bytes",
        page.body.len(),
        html.len(),
        crt.body.len()
    );
    let next_crt = get(http, "/ca/koprogo-next-root.crt");
    assert_eq!(next_crt.status, 200);
    assert_eq!(next_crt.body, pem_der(&next_pem));
    assert_eq!(
        get(http, "/ca/koprogo-next-root.pem").text(),
        next_pem,
        "next PEM"
    );

    // After the switch the page hands out the new root, as the site serves it.
    let (code, out, err) = a.cli(&["ca", "rotate"]);
    assert_eq!(code, 0, "ca rotate: {out}{err}");
    assert!(out.contains(&format!("SHA-256   {next_fp}")), "{out}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let html = get(http, "/ca").text();
        if field(&html, "fingerprint") == next_fp {
            assert!(!html.contains("id=\"next\""), "{html}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the page never followed ca rotate\n{}",
            a.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(get(http, "/ca/koprogo-root.crt").body, pem_der(&next_pem));
    assert_eq!(get(http, "/ca/koprogo-next-root.crt").status, 404);
    assert!(
        verifies(&next_pem, https),
        "the new root does not verify the site"
    );
    assert_eq!(export(&a).1, next_fp);

    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

/// The service user's ids (files it must read), when the test runs as root.
fn service_user() -> Option<(u32, u32)> {
    if !common::is_root() {
        return None;
    }
    let u = nix::unistd::User::from_name("koprogo")
        .expect("lookup")
        .expect("the test machine has a koprogo user");
    Some((u.uid.as_raw(), u.gid.as_raw()))
}

#[test]
fn acme_and_files_modes_have_no_page() {
    // acme: the local CA still exists (served until the first ACME certificate),
    // yet nothing of it is on port 80. The directory is a closed port.
    let mut a = Appliance::new("");
    let text = std::fs::read_to_string(&a.config)
        .expect("config")
        .replace("domain = \"localhost\"", "domain = \"koprogo.test\"");
    let text = format!(
        "{text}\n[tls]\nmode = \"acme\"\nacme_email = \"syndic@koprogo.test\"\n\
         acme_directory = \"https://127.0.0.1:{}/dir\"\n",
        common::free_port()
    );
    std::fs::write(&a.config, text).expect("config");
    a.start();
    a.wait_ready();
    let cfg = a.cfg();
    let site = format!("https://koprogo.test:{}", cfg.proxy.https[0].port());
    for path in [
        "/ca",
        "/ca/",
        "/ca/koprogo-root.crt",
        "/ca/koprogo-root.pem",
    ] {
        assert_redirects(cfg.proxy.http[0].port(), path, &site);
    }
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));

    // files: the operator's certificate.
    let mut a = Appliance::new("");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    for (name, body) in [("site.crt", cert.pem()), ("site.key", key.serialize_pem())] {
        let p = a.path(name);
        std::fs::write(&p, body).expect("write");
        if let Some((uid, gid)) = service_user() {
            std::os::unix::fs::chown(&p, Some(uid), Some(gid)).expect("chown");
        }
    }
    let text = std::fs::read_to_string(&a.config).expect("config");
    let text =
        format!("{text}\n[tls]\nmode = \"files\"\ncert = \"site.crt\"\nkey = \"site.key\"\n");
    std::fs::write(&a.config, text).expect("config");
    a.start();
    a.wait_ready();
    let cfg = a.cfg();
    let site = format!("https://localhost:{}", cfg.proxy.https[0].port());
    for path in ["/ca", "/ca/koprogo-root.crt"] {
        assert_redirects(cfg.proxy.http[0].port(), path, &site);
    }
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn chromium_without_javascript_downloads_the_root_then_trusts_the_site() {
    let Some(bin) = chromium::binary() else {
        eprintln!(
            "skipped: Debian's chromium is not installed (scripts/test.sh installs it as root)"
        );
        return;
    };
    if !chromium::certutil_available() {
        eprintln!("skipped: certutil (libnss3-tools) is not installed");
        return;
    }
    let mut a = Appliance::new("");
    a.start();
    a.wait_ready();
    let cfg = a.cfg();
    let (http, https) = (cfg.proxy.http[0].port(), cfg.proxy.https[0].port());
    let fp = ca_status(&a)["fingerprint"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(fp.len(), 95, "{fp}");

    // A new office PC: it does not trust the site yet.
    let downloads = a.path("downloads");
    let mut b = Browser::launch(&bin, &a.path("pc"), 1000, 1600);
    b.disable_scripts();
    b.allow_downloads(&downloads);
    let site = format!("https://localhost:{https}/api/v1/health");
    let r = b.call("Page.navigate", serde_json::json!({ "url": site }), true);
    let refused = r["errorText"].as_str().unwrap_or_default().to_string();
    assert!(refused.contains("CERT"), "an untrusted site loaded: {r}");

    // (Chromium here resolves only `localhost`; an office PC uses the server name.)
    b.navigate(&format!("http://localhost:{http}/ca"));
    b.wait_for(&chromium::seen_text(&fp), Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("the fingerprint is not shown: {e}\n{}", b.text()));
    let text = b.text();
    for step in [
        "Windows",
        "macOS",
        "Linux",
        "Firefox",
        "Android",
        "Certificate Trust Settings",
    ] {
        assert!(text.contains(step), "no {step} steps:\n{text}");
    }
    let artifacts = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts");
    let shot = artifacts.join("onboarding-page.png");
    b.screenshot(&shot);
    println!("screenshot: {}", shot.display());
    b.click("#crt");
    let der = chromium::wait_download(&downloads, "koprogo-root.crt", Duration::from_secs(30));
    b.drain_events();
    let csp: Vec<&String> = b
        .log
        .lines
        .iter()
        .filter(|l| l.contains("Content Security Policy"))
        .collect();
    assert!(csp.is_empty(), "the page breaks its own policy: {csp:?}");
    b.close();
    let (pem, export_fp) = export(&a);
    assert_eq!(der, pem_der(&pem), "the download is not the root");
    assert_eq!(fingerprint(&der), fp);
    assert_eq!(export_fp, fp);

    // The PC imports the downloaded file (as the page's Linux step says): the
    // site loads over HTTPS without a warning.
    let pc = a.path("pc-trusting");
    chromium::trust_root(&pc, &downloads.join("koprogo-root.crt"));
    let mut b = Browser::launch(&bin, &pc, 1000, 800);
    b.navigate(&site);
    b.wait_for(&chromium::seen_text("ok"), Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("the site did not load: {e}\n{}", b.text()));
    b.close();
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn the_page_works_with_the_real_koprogo() {
    let Some(r) = common::real::real("the_page_works_with_the_real_koprogo") else {
        return;
    };
    let mut a = common::real::appliance(&r, "");
    a.start();
    a.wait_for(common::real::BOOT, "all ready", |s| s.all_ready);
    let cfg = a.cfg();
    let (http, https) = (cfg.proxy.http[0].port(), cfg.proxy.https[0].port());
    let page = get(http, "/ca");
    assert_eq!(page.status, 200, "{}", page.text());
    let fp = field(&page.text(), "fingerprint");
    let crt = get(http, "/ca/koprogo-root.crt");
    assert_eq!(fingerprint(&crt.body), fp);
    let pem = get(http, "/ca/koprogo-root.pem").text();
    assert_eq!(pem_der(&pem), crt.body);
    assert_redirects(http, "/", &format!("https://localhost:{https}"));
    // The downloaded root is all an office PC needs for the real site.
    let home = runtime().block_on(async {
        Client::new(&pem, &[b"http/1.1"])
            .get(https, "/")
            .await
            .expect("https")
    });
    assert_eq!(home.status, 200);
    assert!(home.text().contains("<html"), "{}", home.text());
    assert_eq!(export(&a).1, fp);
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(10));
}
