//! The Prometheus endpoint: parses with a real Prometheus text parser, carries the
//! families operators alert on, and listens on loopback only.

mod common;

use std::time::Duration;

use common::Appliance;

fn scrape(a: &Appliance) -> String {
    let raw = common::http_raw(
        a.metrics_port,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    );
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    raw.split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default()
}

fn value(scrape: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
    let s = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .unwrap_or_else(|| panic!("no sample {name} {label:?}"));
    match s.value {
        prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Untyped(v) => v,
        _ => f64::NAN,
    }
}

#[test]
fn metrics_parse_and_stay_on_loopback() {
    let mut a = Appliance::new("");
    a.start();
    a.wait_ready();
    // Some proxy traffic to count.
    let https = a.cfg().proxy.https[0].port();
    let _ = common::http_raw(
        a.cfg().proxy.http[0].port(),
        "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    let _ = https;
    let text = scrape(&a);
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    assert_eq!(value(&parsed, "koprogo_up", None), 1.0);
    assert_eq!(
        value(
            &parsed,
            "koprogo_service_ready",
            Some(("service", "postgres"))
        ),
        1.0
    );
    assert_eq!(
        value(&parsed, "koprogo_service_ready", Some(("service", "api"))),
        1.0
    );
    assert!(
        value(
            &parsed,
            "koprogo_service_memory_bytes",
            Some(("service", "postgres"))
        ) > 1e6
    );
    assert_eq!(value(&parsed, "koprogo_postgres_up", None), 1.0);
    assert!(value(&parsed, "koprogo_postgres_database_size_bytes", None) > 1e6);
    let ratio = value(&parsed, "koprogo_postgres_cache_hit_ratio", None);
    assert!((0.0..=1.0).contains(&ratio));
    assert!(
        value(
            &parsed,
            "koprogo_http_requests_total",
            Some(("code", "3xx"))
        ) >= 1.0
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        value(
            &parsed,
            "koprogo_certificate_expiry_timestamp_seconds",
            None
        ) > now
    );
    assert!(value(&parsed, "koprogo_disk_available_bytes", None) > 0.0);
    assert!(parsed
        .docs
        .contains_key("koprogo_http_request_duration_seconds"));

    // Listening on 127.0.0.1 only (IPv4 table of listening sockets).
    let port_hex = format!(":{:04X}", a.metrics_port);
    let tcp = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let listeners: Vec<&str> = tcp
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|local| local.ends_with(&port_hex))
        })
        .filter(|l| l.split_whitespace().nth(3) == Some("0A"))
        .collect();
    assert!(!listeners.is_empty(), "metrics socket not found");
    for l in listeners {
        let local = l.split_whitespace().nth(1).unwrap_or("");
        assert!(
            local.starts_with("0100007F:"),
            "metrics must listen on 127.0.0.1 only: {l}"
        );
    }
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn a_public_metrics_address_is_refused() {
    let a = Appliance::new("");
    let text = std::fs::read_to_string(&a.config).expect("config");
    let port = a.metrics_port;
    std::fs::write(
        &a.config,
        text.replace(
            &format!("listen = \"127.0.0.1:{port}\""),
            &format!("listen = \"0.0.0.0:{port}\""),
        ),
    )
    .expect("write");
    let (code, out, err) = a.cli(&["check"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("metrics.listen") && err.contains("loopback"),
        "{err}"
    );
}
