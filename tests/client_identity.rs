//! Who a client is, for the proxy's limits and for the API: an IPv6 client is its
//! /64 (`proxy.ipv6_prefix`), since whoever has a /64 can pick any address in it.
//! Several addresses of one /64 are added to the loopback interface for the test
//! (and removed after); each request comes from one of them.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::https::Client;
use common::Appliance;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

const NET: &str = "fd00:6b70:7267:1";

/// Addresses added to `lo` for the life of the guard.
struct LoAddrs(Vec<String>);

impl LoAddrs {
    fn add(hosts: &[u16]) -> Option<LoAddrs> {
        let mut added = LoAddrs(Vec::new());
        for h in hosts {
            let a = format!("{NET}::{h:x}/64");
            let st = std::process::Command::new("ip")
                .args(["-6", "addr", "add", &a, "dev", "lo", "nodad"])
                .status()
                .ok()?;
            if !st.success() {
                return None;
            }
            added.0.push(a);
        }
        Some(added)
    }
}

impl Drop for LoAddrs {
    fn drop(&mut self) {
        for a in &self.0 {
            let _ = std::process::Command::new("ip")
                .args(["-6", "addr", "del", a, "dev", "lo"])
                .status();
        }
    }
}

/// One GET over HTTPS from `from` to the proxy at `to`: (status, body).
async fn get_from(client: &Client, from: IpAddr, to: SocketAddr, path: &str) -> (u16, String) {
    let sock = tokio::net::TcpSocket::new_v6().expect("socket");
    sock.bind(SocketAddr::new(from, 0))
        .expect("bind the client address");
    let tcp = tokio::time::timeout(Duration::from_secs(10), sock.connect(to))
        .await
        .expect("connect timed out")
        .expect("connect");
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(client.config.clone())
        .connect(name, tcp)
        .await
        .expect("TLS");
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .expect("answer timed out")
        .expect("answer");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn ipv6_addresses_of_one_64_share_one_rate_limit_and_one_address_for_the_api() {
    if !common::is_root() {
        println!("skipped: adding addresses to lo needs root");
        return;
    }
    let Some(_addrs) = LoAddrs::add(&[1, 2, 3, 4, 5]) else {
        println!("skipped: cannot add IPv6 addresses to lo here");
        return;
    };
    let https = common::free_port();
    let mut a = Appliance::new("rate = 1\nburst = 3\n");
    let text = std::fs::read_to_string(&a.config).expect("config");
    let text = text.replacen(
        "https = [\"127.0.0.1:",
        &format!("https = [\"[{NET}::1]:{https}\", \"127.0.0.1:"),
        1,
    );
    std::fs::write(&a.config, text).expect("config");
    a.start();
    a.wait_ready();
    let client = Client::new(&common::load::root_pem(&a), &[b"http/1.1"]);
    let to: SocketAddr = format!("[{NET}::1]:{https}").parse().expect("addr");
    common::https::runtime().block_on(async {
        // Three requests from three addresses of the /64 use up its one bucket …
        let mut seen = Vec::new();
        for h in [2, 3, 4] {
            let from: IpAddr = format!("{NET}::{h}").parse().expect("ip");
            let (status, body) = get_from(&client, from, to, "/api/v1/echo").await;
            assert_eq!(status, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).expect("echo JSON");
            seen.push(
                v["headers"]["x-forwarded-for"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            );
        }
        // … and the API saw one client: the /64, whichever address it came from.
        assert!(
            seen.iter().all(|x| x == &format!("{NET}::")),
            "X-Forwarded-For per request: {seen:?}"
        );
        // A fourth address of the same /64 is over the rate.
        let from: IpAddr = format!("{NET}::5").parse().expect("ip");
        let (status, _) = get_from(&client, from, to, "/api/v1/echo").await;
        assert_eq!(
            status, 429,
            "another address of the same /64 was not limited"
        );
    });
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

/// `GET /api/v1/echo` on plain HTTP with `X-Forwarded-For: xff`: (status, the
/// X-Forwarded-For the API saw).
fn echo_with_xff(port: u16, xff: &str) -> (u16, String) {
    let raw = common::http_raw(
        port,
        &format!(
            "GET /api/v1/echo HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-For: {xff}\r\nConnection: close\r\n\r\n"
        ),
    );
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    let seen = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["headers"]["x-forwarded-for"].as_str().map(String::from))
        .unwrap_or_default();
    (status, seen)
}

/// Behind another proxy (`tls.mode = "off"`): without `trusted_proxies` every
/// client is that proxy (and `check` says so); with it, the client is the
/// rightmost forwarded address that is not a trusted proxy, in the API's header and
/// in the rate limit.
#[test]
fn behind_a_trusted_proxy_the_forwarded_client_counts() {
    let tls_off = "rate = 1\nburst = 2\n[tls]\nmode = \"off\"\n";
    let mut a = Appliance::new(tls_off);
    let (code, out, err) = a.cli(&["check"]);
    assert!(
        format!("{out}{err}").contains("trusted_proxies"),
        "check says nothing ({code}): {out}{err}"
    );
    a.start();
    a.wait_ready();
    let http = a.cfg().proxy.http[0].port();
    let (status, seen) = echo_with_xff(http, "203.0.113.9");
    assert_eq!(
        (status, seen.as_str()),
        (200, "127.0.0.1"),
        "untrusted peer"
    );
    a.stop();

    let mut b = Appliance::new(&format!("trusted_proxies = [\"127.0.0.0/8\"]\n{tls_off}"));
    let (_, out, err) = b.cli(&["check"]);
    assert!(
        !format!("{out}{err}").contains("trusted_proxies"),
        "{out}{err}"
    );
    b.start();
    b.wait_ready();
    let http = b.cfg().proxy.http[0].port();
    // What a client wrote left of the last untrusted hop is not believed.
    let (status, seen) = echo_with_xff(http, "6.6.6.6, 203.0.113.9, 127.0.0.2");
    assert_eq!((status, seen.as_str()), (200, "203.0.113.9"));
    let (status, _) = echo_with_xff(http, "203.0.113.9");
    assert_eq!(status, 200);
    // 203.0.113.9 has used its burst of 2; another client has its own bucket.
    let (status, _) = echo_with_xff(http, "203.0.113.9");
    assert_eq!(status, 429, "the forwarded client was not rate limited");
    let (status, seen) = echo_with_xff(http, "198.51.100.4");
    assert_eq!((status, seen.as_str()), (200, "198.51.100.4"));
    b.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
    b.assert_no_leftovers(Duration::from_secs(5));
}
