//! The front door against testssl.sh (Debian's `testssl.sh`), as an auditor would
//! scan it: protocols, ciphers and their order, certificate chain (trusting the
//! exported local root), revocation information (the CRL the appliance serves),
//! known vulnerabilities. Any finding of severity MEDIUM or above fails, except
//! BREACH on a static page (see below); the LOW/INFO ones are printed.

mod common;

use std::time::Duration;

use common::Appliance;

#[test]
fn testssl_finds_nothing_medium_or_above() {
    if std::process::Command::new("testssl")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("skipped: testssl (apt-get install testssl.sh) is not installed");
        return;
    }
    let mut a = Appliance::new("");
    a.start();
    a.wait_ready();
    let root = a.path("root.pem");
    std::fs::write(&root, common::load::root_pem(&a)).expect("root.pem");
    let https = a.cfg().proxy.https[0].port();
    let json = a.path("testssl.json");
    let out = std::process::Command::new("timeout")
        .args([
            "600",
            "testssl",
            "--quiet",
            "--color",
            "0",
            "--warnings",
            "off",
        ])
        .arg("--add-ca")
        .arg(&root)
        .arg("--jsonfile")
        .arg(&json)
        .args(["--ip", "127.0.0.1"])
        .arg(format!("localhost:{https}"))
        .output()
        .expect("run testssl");
    let findings: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&json).unwrap_or_else(|e| {
            panic!(
                "no testssl JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        }))
        .expect("testssl JSON");
    assert!(
        findings.len() > 50,
        "too few findings to be a scan: {findings:?}"
    );
    let mut bad = Vec::new();
    for f in &findings {
        let (sev, id, text) = (
            f["severity"].as_str().unwrap_or(""),
            f["id"].as_str().unwrap_or(""),
            f["finding"].as_str().unwrap_or(""),
        );
        match sev {
            "OK" | "INFO" | "DEBUG" => {}
            // BREACH needs a secret and attacker-controlled text in one compressed
            // response. testssl looks at "/" only: a static page with neither. The
            // API's answers (tokens) are never compressed by the proxy: checked below.
            "MEDIUM" if id == "BREACH" && text.contains("only supplied '/' tested") => {
                println!("accepted: {sev} {id}: {text}")
            }
            "LOW" | "WARN" => println!("noted: {sev} {id}: {text}"),
            _ => bad.push(format!("{sev} {id}: {text}")),
        }
    }
    assert!(bad.is_empty(), "testssl findings:\n{}", bad.join("\n"));
    for (id, want) in [
        ("cipher_order", "server"),
        ("cert_chain_of_trust", "passed"),
        (
            "cert_crlDistributionPoints",
            "/.well-known/koprogo/root.crl",
        ),
    ] {
        let f = findings
            .iter()
            .find(|f| f["id"].as_str().is_some_and(|i| i.starts_with(id)))
            .unwrap_or_else(|| panic!("no {id} in the scan"));
        let text = f["finding"].as_str().unwrap_or("");
        assert!(text.contains(want), "{id}: {text}");
    }
    // No compression of API answers: BREACH has nothing to read there.
    let client = common::https::Client::new(
        &std::fs::read_to_string(&root).expect("root"),
        &[b"http/1.1"],
    );
    common::https::runtime().block_on(async {
        let req = hyper::Request::post("/api/v1/auth/login")
            .header("host", format!("localhost:{https}"))
            .header("accept-encoding", "gzip, br")
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(hyper::body::Bytes::from(
                r#"{"email":"admin@koprogo.com","password":"wrong-password"}"#,
            )))
            .expect("request");
        let r = client
            .request(https, "localhost", req)
            .await
            .expect("login");
        assert!(
            r.header("content-encoding").is_empty(),
            "compressed API answer"
        );
    });
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}
