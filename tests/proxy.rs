//! The front door, end to end: a real appliance (internal CA), real TLS clients
//! trusting only the exported root, the demo backend behind the proxy, a frontend
//! directory on disk.

mod common;

use std::time::{Duration, Instant};

use common::https::{runtime, Client};
use common::Appliance;
use http_body_util::Full;
use hyper::body::Bytes;

const INDEX: &str = "<!doctype html><html><head><title>KoproGo test</title></head><body><h1>KoproGo</h1><p>frontend served by the appliance</p></body></html>";

/// An appliance with a frontend directory and `proxy_keys` in its [proxy] table.
fn site(proxy_keys: &str) -> Appliance {
    let mut keys = format!("frontend = \"frontend\"\nhsts = \"365d\"\n{proxy_keys}");
    if !keys.ends_with('\n') {
        keys.push('\n');
    }
    let a = Appliance::new(&keys);
    let f = a.path("frontend");
    std::fs::create_dir_all(f.join("fr/about")).expect("mkdir");
    std::fs::create_dir_all(f.join("_astro")).expect("mkdir");
    std::fs::write(f.join("index.html"), INDEX).expect("index");
    std::fs::write(
        f.join("fr/about/index.html"),
        "<html><body>about (fr)</body></html>",
    )
    .expect("about");
    let js = "console.log('koprogo');\n".repeat(200);
    std::fs::write(f.join("_astro/app.abc123.js"), &js).expect("js");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, js.as_bytes()).expect("gz");
    std::fs::write(f.join("_astro/app.abc123.js.gz"), gz.finish().expect("gz")).expect("gz file");
    std::fs::write(f.join("secret-neighbour.txt"), "not for you").ok();
    std::fs::write(a.path("outside-secret.txt"), "TOP SECRET OUTSIDE").expect("secret");
    a
}

fn ports(a: &Appliance) -> (u16, u16) {
    let cfg = a.cfg();
    (cfg.proxy.http[0].port(), cfg.proxy.https[0].port())
}

fn root_pem(a: &Appliance) -> String {
    let out = a.path("root.pem");
    let (code, o, e) = a.cli(&["ca", "export", out.to_str().expect("utf8")]);
    assert_eq!(code, 0, "ca export: {o}{e}");
    std::fs::read_to_string(out).expect("root.pem")
}

#[test]
fn https_internal_ca_h2_redirect_and_headers() {
    let mut a = site("");
    a.start();
    a.wait_ready();
    let (http, https) = ports(&a);
    let pem = root_pem(&a);
    let rt = runtime();
    rt.block_on(async {
        let h2 = Client::new(&pem, &[b"h2", b"http/1.1"]);
        let r = h2.get(https, "/").await.expect("GET / over h2");
        assert_eq!(r.alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(r.version, hyper::Version::HTTP_2);
        assert_eq!(r.status, 200);
        assert!(r.text().contains("frontend served by the appliance"));
        assert!(r
            .header("strict-transport-security")
            .starts_with("max-age="));
        assert_eq!(r.header("x-frame-options"), "DENY");
        assert_eq!(r.header("x-content-type-options"), "nosniff");
        assert!(!r.header("referrer-policy").is_empty());

        let h1 = Client::new(&pem, &[b"http/1.1"]);
        let r = h1.get(https, "/api/v1/health").await.expect("API over h1");
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains("koprogo-api"));

        // A client that trusts nothing else fails the handshake against a stranger's root.
        let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let stranger = Client::new(&other.cert.pem(), &[b"http/1.1"]);
        assert!(
            stranger.get(https, "/").await.is_err(),
            "must not verify with another root"
        );
    });
    // Port 80: a 308 to HTTPS, path and query kept.
    let raw = common::http_raw(
        http,
        "GET /fr/about?x=1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert!(raw.starts_with("HTTP/1.1 308"), "{raw}");
    assert!(
        raw.contains(&format!("location: https://localhost:{https}/fr/about?x=1")),
        "{raw}"
    );
    // An unknown Host is not an open redirect.
    let raw = common::http_raw(
        http,
        "GET / HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    );
    assert!(
        raw.contains(&format!("location: https://localhost:{https}/")),
        "{raw}"
    );
    // Nor to an address a client made up.
    let raw = common::http_raw(
        http,
        "GET /x HTTP/1.1\r\nHost: 10.9.8.7\r\nConnection: close\r\n\r\n",
    );
    assert!(
        raw.contains(&format!("location: https://localhost:{https}/x")),
        "{raw}"
    );
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn frontend_pages_assets_cache_and_traversal() {
    let mut a = site("");
    a.start();
    a.wait_ready();
    let (_, https) = ports(&a);
    let pem = root_pem(&a);
    let c = Client::new(&pem, &[b"http/1.1"]);
    runtime().block_on(async {
        let r = c.get(https, "/fr/about").await.expect("nested");
        assert_eq!(r.status, 200);
        assert!(r.text().contains("about (fr)"));
        assert_eq!(r.header("cache-control"), "no-cache");
        let r = c.get(https, "/some/client/route").await.expect("fallback");
        assert_eq!(r.status, 200);
        assert!(r.text().contains("frontend served by the appliance"));
        let r = c.get(https, "/health").await.expect("health");
        assert_eq!((r.status, r.text().trim()), (200, "healthy"));
        let r = c.get(https, "/config.js").await.expect("config.js");
        assert!(r.text().contains("/api/v1"), "{}", r.text());
        assert_eq!(r.header("cache-control"), "no-cache");
        let r = c.get(https, "/_astro/app.abc123.js").await.expect("asset");
        assert_eq!(r.status, 200);
        assert!(r.header("cache-control").contains("immutable"));
        let etag = r.header("etag").to_string();
        assert!(!etag.is_empty());
        let req = hyper::Request::get("/_astro/app.abc123.js")
            .header("host", "localhost")
            .header("if-none-match", &etag)
            .body(Full::new(Bytes::new()))
            .expect("req");
        assert_eq!(
            c.request(https, "localhost", req)
                .await
                .expect("304")
                .status,
            304
        );
        let req = hyper::Request::get("/_astro/app.abc123.js")
            .header("host", "localhost")
            .header("range", "bytes=0-9")
            .body(Full::new(Bytes::new()))
            .expect("req");
        let r = c.request(https, "localhost", req).await.expect("range");
        assert_eq!(r.status, 206);
        assert_eq!(r.body.len(), 10);
        let req = hyper::Request::get("/_astro/app.abc123.js")
            .header("host", "localhost")
            .header("accept-encoding", "gzip")
            .body(Full::new(Bytes::new()))
            .expect("req");
        let r = c.request(https, "localhost", req).await.expect("gz");
        assert_eq!(r.header("content-encoding"), "gzip");
        let r = c
            .get(https, "/_astro/missing.js")
            .await
            .expect("missing asset");
        assert_eq!(r.status, 404);
        let r = c.get(https, "/metrics").await.expect("metrics");
        assert_eq!(r.status, 404, "the API's /metrics must never be exposed");

        for evil in [
            "/../outside-secret.txt",
            "/%2e%2e/outside-secret.txt",
            "/%2E%2E%2Foutside-secret.txt",
            "/..%2foutside-secret.txt",
            "/..%5coutside-secret.txt",
            "/..\\outside-secret.txt",
            "/%252e%252e/outside-secret.txt",
            "/fr/../../outside-secret.txt",
            "/outside-secret.txt%00.html",
            "//etc/passwd",
            "/....//outside-secret.txt",
        ] {
            let raw = c
                .raw(
                    https,
                    format!("GET {evil} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .expect("raw");
            assert!(!raw.contains("TOP SECRET"), "{evil} leaked: {raw}");
            assert!(!raw.contains("root:x:0:0"), "{evil} leaked /etc/passwd");
        }
    });
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

/// The first CPU this process may run on (Cpus_allowed_list of /proc/self/status).
fn first_allowed_cpu() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list");
    let first = list.trim().split([',', '-']).next().expect("a CPU");
    first.parse().expect("CPU number")
}

/// Started on one CPU, as on a one-vCPU VPS: the supervisor runs its async tasks on
/// one thread, and the whole proxy (WebSocket, SSE, limits) works on it.
#[test]
fn forwarded_headers_websocket_sse_and_limits() {
    let mut a = site("max_body = \"64KiB\"\nmax_upload = \"1MiB\"\n");
    let mut cmd = std::process::Command::new("taskset");
    cmd.arg("-c")
        .arg(first_allowed_cpu().to_string())
        .arg(common::koprogo_bin())
        .arg("--config")
        .arg(a.path("koprogo.toml"));
    a.start_with(cmd);
    a.wait_ready();
    let own = std::fs::read_to_string(a.path("logs/koprogo.log")).expect("koprogo.log");
    assert!(
        own.contains("async runtime: one thread (one CPU may be used)"),
        "one async thread on one CPU: {own}"
    );
    let (_, https) = ports(&a);
    let pem = root_pem(&a);
    let c = Client::new(&pem, &[b"http/1.1"]);
    runtime().block_on(async {
        let req = hyper::Request::get("/api/v1/echo")
            .header("host", format!("localhost:{https}"))
            .header("x-forwarded-for", "6.6.6.6")
            .header("x-real-ip", "6.6.6.6")
            .header("forwarded", "for=6.6.6.6")
            .body(Full::new(Bytes::new()))
            .expect("req");
        let r = c.request(https, "localhost", req).await.expect("echo");
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
        let h = &v["headers"];
        assert_eq!(
            h["x-forwarded-for"], "127.0.0.1",
            "spoofed XFF must be replaced: {v}"
        );
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["host"], format!("localhost:{https}"));
        assert_eq!(h["x-forwarded-host"], format!("localhost:{https}"));
        assert!(h.get("forwarded").is_none());

        // Host: only our names reach the API, as our canonical name and port.
        let echo_host = |host: &'static str| {
            hyper::Request::get("/api/v1/echo")
                .header("host", host)
                .body(Full::new(Bytes::new()))
                .expect("req")
        };
        for (sent, seen) in [
            ("LOCALHOST", format!("localhost:{https}")),
            ("localhost:1", format!("localhost:{https}")),
            ("127.0.0.1", format!("127.0.0.1:{https}")),
        ] {
            let r = c
                .request(https, "localhost", echo_host(sent))
                .await
                .expect("echo");
            assert_eq!(r.status, 200, "Host {sent}: {}", r.text());
            let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
            assert_eq!(v["headers"]["host"], seen.as_str(), "Host {sent}");
            assert_eq!(
                v["headers"]["x-forwarded-host"],
                seen.as_str(),
                "Host {sent}"
            );
        }
        for evil in [
            "evil.example",
            "10.9.8.7",
            "[2001:db8::1]",
            "localhost.evil.example",
            "a b",
        ] {
            let r = c
                .request(https, "localhost", echo_host(evil))
                .await
                .expect("421");
            assert_eq!(r.status, 421, "Host {evil}: {}", r.text());
            let r = c.get(https, "/").await.expect("page");
            assert_eq!(r.status, 200, "our own name still works after {evil}");
        }

        // Body limits: small for JSON, large for uploads.
        let big = "x".repeat(100 * 1024);
        let req = hyper::Request::post("/api/v1/items")
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(big.clone())))
            .expect("req");
        assert_eq!(
            c.request(https, "localhost", req)
                .await
                .expect("413")
                .status,
            413
        );
        let req = hyper::Request::post("/api/v1/items")
            .header("host", "localhost")
            .header("content-type", "application/octet-stream")
            .body(Full::new(Bytes::from(big)))
            .expect("req");
        assert_eq!(
            c.request(https, "localhost", req)
                .await
                .expect("upload")
                .status,
            201
        );

        // SSE: ticks arrive one by one, not buffered.
        let tls = c.connect(https, "localhost").await.expect("connect");
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .expect("h1");
        tokio::spawn(conn);
        let req = hyper::Request::get("/mcp/sse")
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .expect("req");
        let resp = send.send_request(req).await.expect("sse");
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let mut body = resp.into_body();
        let mut seen = Vec::new();
        let t = Instant::now();
        while seen.len() < 3 {
            use http_body_util::BodyExt;
            let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .expect("tick in time")
                .expect("frame")
                .expect("ok");
            if let Ok(d) = frame.into_data() {
                seen.push((t.elapsed(), String::from_utf8_lossy(&d).into_owned()));
            }
        }
        assert!(seen[0].1.contains("tick"), "{seen:?}");
        assert!(
            seen[2].0 >= Duration::from_millis(300),
            "events must stream: {seen:?}"
        );

        // WebSocket echo through the proxy.
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let tls = c.connect(https, "localhost").await.expect("connect");
        let (mut ws, resp) =
            tokio_tungstenite::client_async(format!("wss://localhost:{https}/api/v1/ws"), tls)
                .await
                .expect("websocket handshake");
        assert_eq!(resp.status(), 101);
        ws.send(Message::text("bonjour")).await.expect("send");
        let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo in time")
            .expect("message")
            .expect("ok");
        assert_eq!(echo.into_text().expect("text").as_str(), "bonjour");
    });
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn rate_limit_slowloris_and_maintenance() {
    let mut a = site("rate = 5\nburst = 5\nheader_timeout = \"2s\"\nbackend_wait = \"2s\"\nmax_conns_per_ip = 3\n");
    a.start();
    a.wait_ready();
    let (_, https) = ports(&a);
    let pem = root_pem(&a);
    let c = Client::new(&pem, &[b"http/1.1"]);
    runtime().block_on(async {
        let mut codes = Vec::new();
        for _ in 0..20 {
            let r = c.get(https, "/api/v1/health").await.expect("req");
            if r.status == 429 {
                assert!(!r.header("retry-after").is_empty());
            }
            codes.push(r.status);
        }
        assert!(codes.contains(&429), "{codes:?}");
        assert!(
            codes.iter().filter(|c| **c == 200).count() >= 5,
            "{codes:?}"
        );

        // Slowloris: half a request line, then nothing: closed after the header timeout.
        let mut tls = c.connect(https, "localhost").await.expect("connect");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tls.write_all(b"GET / HTTP/1.1\r\nHost: local")
            .await
            .expect("partial");
        let t = Instant::now();
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(15), tls.read_to_end(&mut buf)).await;
        assert!(r.is_ok(), "slow client not closed within 15 s");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "closed after {:?}",
            t.elapsed()
        );
    });
    std::thread::sleep(Duration::from_millis(1100)); // refill the bucket
    let (code, _, _) = a.cli(&["stop", "api"]);
    assert_eq!(code, 0);
    runtime().block_on(async {
        let r = c.get(https, "/").await.expect("page");
        assert_eq!(r.status, 503);
        assert!(r.text().contains("KoproGo"));
        assert!(!r.header("retry-after").is_empty());
        let t = Instant::now();
        let r = c.get(https, "/api/v1/items").await.expect("api");
        assert_eq!(r.status, 503);
        assert!(r.header("content-type").starts_with("application/json"));
        assert!(!r.header("retry-after").is_empty());
        assert!(
            t.elapsed() < Duration::from_secs(6),
            "bounded wait: {:?}",
            t.elapsed()
        );
    });
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn a_request_waits_through_an_api_restart() {
    let mut a = site("backend_wait = \"20s\"\n");
    a.start();
    a.wait_ready();
    let (_, https) = ports(&a);
    let pem = root_pem(&a);
    let c = Client::new(&pem, &[b"http/1.1"]);
    let cfg_path = a.config.clone();
    let restarter = std::thread::spawn(move || {
        std::process::Command::new(common::koprogo_bin())
            .args([
                "--config",
                cfg_path.to_str().expect("utf8"),
                "restart",
                "api",
            ])
            .output()
            .expect("restart")
    });
    std::thread::sleep(Duration::from_millis(30));
    let mut codes = Vec::new();
    runtime().block_on(async {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(3) {
            let r = c.get(https, "/api/v1/items").await.expect("request");
            codes.push(r.status);
        }
    });
    let out = restarter.join().expect("join");
    assert!(out.status.success());
    assert!(
        codes.iter().all(|c| *c == 200),
        "a request failed during the restart: {codes:?}"
    );
    let st = a.status().expect("status");
    assert!(Appliance::service(&st, "api").restarts >= 1);
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn ipv6_and_ipv4_listeners_serve_the_same_site() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback here");
        return;
    }
    let mut a = site("");
    let v6 = common::free_port();
    let text = std::fs::read_to_string(&a.config).expect("config");
    let https = a.cfg().proxy.https[0].port();
    let text = text.replace(
        &format!("https = [\"127.0.0.1:{https}\"]"),
        &format!("https = [\"127.0.0.1:{https}\", \"[::1]:{v6}\"]"),
    );
    std::fs::write(&a.config, text).expect("write");
    a.start();
    a.wait_ready();
    let pem = root_pem(&a);
    let c = Client::new(&pem, &[b"http/1.1"]);
    runtime().block_on(async {
        let tcp = tokio::net::TcpStream::connect(("::1", v6))
            .await
            .expect("connect [::1]");
        let name =
            tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let tls = tokio_rustls::TlsConnector::from(c.config.clone())
            .connect(name, tcp)
            .await
            .expect("TLS over IPv6 with the local CA");
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .expect("h1");
        tokio::spawn(conn);
        let req = hyper::Request::get("/api/v1/echo")
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .expect("req");
        let resp = send.send_request(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        use http_body_util::BodyExt;
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["headers"]["x-forwarded-for"], "::1", "{v}");
        let r = c.get(https, "/").await.expect("IPv4 too");
        assert_eq!(r.status, 200);
    });
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

/// A ready API server that drops one request without answering (a panic in its
/// handler: the real API does that on some demo data) gets a 502 naming the failure
/// and a warning in the supervisor's log, not the "starting, retry shortly" 503, and
/// the next request is served as usual.
#[test]
fn a_request_the_api_drops_is_a_502_not_maintenance() {
    let mut a = site("");
    a.start();
    a.wait_ready();
    let (_, https) = ports(&a);
    let c = Client::new(&root_pem(&a), &[b"http/1.1"]);
    runtime().block_on(async {
        // As a browser sends it (no Content-Length): the proxy retries it once, as
        // after an API restart, and gets no answer again.
        let raw = c
            .raw(
                https,
                b"GET /api/v1/panic HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )
            .await
            .expect("raw request");
        assert!(raw.starts_with("HTTP/1.1 502"), "{raw}");
        assert!(raw.contains("failed to answer this request"), "{raw}");
        assert!(!raw.to_ascii_lowercase().contains("retry-after"), "{raw}");
        // With `Content-Length: 0` (not retried).
        let r = c.get(https, "/api/v1/panic").await.expect("request");
        assert_eq!(r.status, 502, "{}", r.text());
        assert!(
            r.text().contains("failed to answer this request"),
            "{}",
            r.text()
        );
        assert!(
            r.header("retry-after").is_empty(),
            "no Retry-After on a 502"
        );
        let r = c.get(https, "/api/v1/health").await.expect("health");
        assert_eq!(r.status, 200, "{}", r.text());
    });
    let log = common::all_log_lines(&a.path("logs"), "koprogo").join("\n");
    assert!(
        log.contains("closed the connection without answering GET /api/v1/panic"),
        "{log}"
    );
    let st = a.status().expect("status");
    assert_eq!(
        Appliance::service(&st, "api").restarts,
        0,
        "a panicking handler is not a dead server"
    );
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}
