//! A person's view: headless Chromium (Debian's `chromium`) loads the site over
//! HTTPS from the appliance's local CA, imported into the browser's certificate
//! store the way an office PC would (certutil into NSS), runs the page's script
//! (which calls the API through the proxy), and takes a screenshot kept as a test
//! artifact.

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
    let Some(bin) = common::chromium::binary() else {
        eprintln!(
            "skipped: Debian's chromium is not installed (scripts/test.sh installs it as root)"
        );
        return;
    };
    if !common::chromium::certutil_available() {
        eprintln!("skipped: certutil (libnss3-tools) is not installed");
        return;
    }
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
