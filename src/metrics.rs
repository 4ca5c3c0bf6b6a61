//! The Prometheus endpoint (`[metrics] listen`, loopback only): per service up /
//! ready / restarts / memory / CPU, proxy requests and latency, connections and TLS
//! handshakes, certificate expiry, log drops, disk, memory and load of the host,
//! PostgreSQL connections, size, cache hit ratio and dead tuples, and the levels of
//! the capacity watch's last check. Rendered on each scrape from the supervisor's
//! state (read only) and a few SQL queries.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;

use crate::control::StatusReport;
use crate::postgres::Db;
use crate::proxy::stats::ProxyStats;
use crate::proxy::stats::LATENCY_BUCKETS;
use crate::proxy::{text, Body};

/// Serves GET /metrics on `listener` until `stop` is cancelled.
/// What the endpoint reads of the running site: a read-only view.
pub trait Source: Send + Sync + 'static {
    fn status(&self) -> StatusReport;
    fn proxy(&self) -> &ProxyStats;
    /// The capacity watch's last report.
    fn last_capacity(&self) -> Option<crate::capacity::Report>;
    /// The state directory (its filesystem's usage is exported).
    fn state_dir(&self) -> &std::path::Path;
    fn db(&self) -> &Db;
}

pub async fn serve<S: Source>(
    listener: std::net::TcpListener,
    shared: Arc<S>,
    stop: CancellationToken,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("metrics: cannot use the listener: {e}");
            return;
        }
    };
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(answer(&*shared, &req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

async fn answer<S: Source>(shared: &S, req: &Request<hyper::body::Incoming>) -> Response<Body> {
    if req.method() != Method::GET || req.uri().path() != "/metrics" {
        return text(StatusCode::NOT_FOUND, "text/plain", "try /metrics\n".into());
    }
    let body = render(shared).await;
    text(
        StatusCode::OK,
        "text/plain; version=0.0.4; charset=utf-8",
        body,
    )
}

/// Writes one metric family.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.0, "{k}=\"{v}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {}", fmt_value(value));
    }
    fn one(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

/// The whole scrape.
pub async fn render<S: Source>(shared: &S) -> String {
    let st = shared.status();
    let mut o = Out(String::with_capacity(8192));
    o.one(
        "koprogo_up",
        "gauge",
        "1 while the supervisor answers.",
        1.0,
    );
    o.one(
        "koprogo_uptime_seconds",
        "gauge",
        "Seconds since the supervisor started.",
        st.uptime_secs as f64,
    );
    o.one(
        "koprogo_all_ready",
        "gauge",
        "1 when every service is ready.",
        if st.all_ready { 1.0 } else { 0.0 },
    );
    o.one(
        "koprogo_supervisor_memory_bytes",
        "gauge",
        "Proportional set size of the supervisor process.",
        st.memory_bytes.unwrap_or(0) as f64,
    );

    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let families: [(&str, &str, &str); 6] = [
        (
            "koprogo_service_up",
            "gauge",
            "1 while the service's process runs.",
        ),
        (
            "koprogo_service_ready",
            "gauge",
            "1 while the service passes its readiness checks.",
        ),
        (
            "koprogo_service_restarts_total",
            "counter",
            "Restarts since the supervisor started.",
        ),
        (
            "koprogo_service_failures_total",
            "counter",
            "Failed starts and crashes since the supervisor started.",
        ),
        (
            "koprogo_service_memory_bytes",
            "gauge",
            "PSS of the service's process group.",
        ),
        (
            "koprogo_service_cpu_seconds_total",
            "counter",
            "CPU time of the service's live processes.",
        ),
    ];
    for (i, (name, kind, help)) in families.iter().enumerate() {
        o.family(name, kind, help);
        for s in &st.services {
            let v = match i {
                0 => f64::from(u8::from(s.pid.is_some())),
                1 => f64::from(u8::from(s.ready)),
                2 => s.restarts as f64,
                3 => s.failures as f64,
                4 => s.memory_bytes.unwrap_or(0) as f64,
                _ => s.pid.map_or(0.0, |p| group_cpu_ticks(p) as f64 / hz),
            };
            o.sample(name, &[("service", &s.name)], v);
        }
    }

    // The proxy.
    let p = shared.proxy();
    let load =
        |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed) as f64;
    o.family(
        "koprogo_http_requests_total",
        "counter",
        "Requests answered by the proxy, by status class.",
    );
    for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
        o.sample(
            "koprogo_http_requests_total",
            &[("code", class)],
            load(&p.by_class[i + 1]),
        );
    }
    o.family(
        "koprogo_http_request_duration_seconds",
        "histogram",
        "Time from request head to response head.",
    );
    let mut acc = 0.0;
    for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
        acc += load(&p.latency[i]);
        o.sample(
            "koprogo_http_request_duration_seconds_bucket",
            &[("le", &fmt_value(*b))],
            acc,
        );
    }
    acc += load(&p.latency[LATENCY_BUCKETS.len()]);
    o.sample(
        "koprogo_http_request_duration_seconds_bucket",
        &[("le", "+Inf")],
        acc,
    );
    o.sample(
        "koprogo_http_request_duration_seconds_sum",
        &[],
        load(&p.latency_sum_us) / 1e6,
    );
    o.sample("koprogo_http_request_duration_seconds_count", &[], acc);
    o.one(
        "koprogo_http_rate_limited_total",
        "counter",
        "Requests refused with 429 by the per-IP rate limit.",
        load(&p.rate_limited),
    );
    o.one(
        "koprogo_http_open_connections",
        "gauge",
        "Client connections open now.",
        load(&p.open_connections),
    );
    o.one(
        "koprogo_http_connections_total",
        "counter",
        "Client connections accepted.",
        load(&p.connections),
    );
    o.one(
        "koprogo_tls_handshakes_total",
        "counter",
        "Completed TLS handshakes.",
        load(&p.tls_handshakes),
    );
    o.one(
        "koprogo_tls_handshake_failures_total",
        "counter",
        "TLS handshakes that failed or timed out.",
        load(&p.tls_failures),
    );
    o.one(
        "koprogo_http_response_bytes_total",
        "counter",
        "Response bytes (declared lengths).",
        load(&p.bytes_out),
    );

    // Certificate.
    let expiry = st
        .tls
        .not_after
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map_or(0.0, |t| t.timestamp() as f64);
    o.family(
        "koprogo_certificate_expiry_timestamp_seconds",
        "gauge",
        "When the served certificate expires (Unix time).",
    );
    o.sample(
        "koprogo_certificate_expiry_timestamp_seconds",
        &[("source", &st.tls.source)],
        expiry,
    );
    o.one(
        "koprogo_certificate_renewal_failing",
        "gauge",
        "1 while the last certificate renewal attempt failed.",
        f64::from(u8::from(st.tls.last_error.is_some())),
    );

    // Backups (the old deployment's alert expected koprogo_last_backup_timestamp_seconds).
    let last = st.backup.last_success.as_ref();
    o.one(
        "koprogo_last_backup_timestamp_seconds",
        "gauge",
        "When the newest good backup was taken (Unix time; 0 = none).",
        last.map_or(0.0, |b| b.timestamp_seconds as f64),
    );
    o.one(
        "koprogo_last_backup_size_bytes",
        "gauge",
        "Size of the newest good backup file.",
        last.map_or(0.0, |b| b.size_bytes as f64),
    );
    o.one(
        "koprogo_backup_failing",
        "gauge",
        "1 while the last backup attempt failed.",
        f64::from(u8::from(st.backup.last_error.is_some())),
    );

    // Logs.
    o.family(
        "koprogo_log_lines_dropped_total",
        "counter",
        "Log lines dropped (full disk or write errors).",
    );
    for (name, v) in &st.logs {
        let dropped = v.get("lines_dropped").and_then(|x| x.as_u64()).unwrap_or(0);
        o.sample(
            "koprogo_log_lines_dropped_total",
            &[("log", name)],
            dropped as f64,
        );
    }

    host(&mut o, shared);
    postgres(&mut o, shared).await;
    capacity(&mut o, shared);
    o.0
}

/// The levels of the capacity watch's last check (none before the first one).
fn capacity<S: Source>(o: &mut Out, shared: &S) {
    let Some(r) = shared.last_capacity() else {
        return;
    };
    o.family(
        "koprogo_capacity_level",
        "gauge",
        "Level of each capacity metric at the last check: 0 ok, 1 warn, 2 critical.",
    );
    for name in crate::capacity::METRICS {
        if let Some(m) = r.metric(name) {
            o.sample(
                "koprogo_capacity_level",
                &[("metric", name)],
                m.level.number(),
            );
        }
    }
    let advice = match r.recommendation.advice {
        crate::capacity::recommend::Advice::Stay => 0.0,
        crate::capacity::recommend::Advice::BiggerVps => 1.0,
        crate::capacity::recommend::Advice::SeparateDatabase => 2.0,
    };
    o.one(
        "koprogo_capacity_advice",
        "gauge",
        "Recommendation at the last check: 0 stay, 1 bigger VPS, 2 separate database server.",
        advice,
    );
    if let Some(v) = r.growth.bytes_per_day {
        o.one(
            "koprogo_postgres_database_growth_bytes_per_day",
            "gauge",
            "Growth of the koprogo database over the capacity history.",
            v,
        );
    }
}

/// Disk of the state directory, memory and load of the host.
fn host<S: Source>(o: &mut Out, shared: &S) {
    if let Ok(d) = crate::fsutil::disk_usage(shared.state_dir()) {
        o.one(
            "koprogo_disk_size_bytes",
            "gauge",
            "Size of the filesystem holding the state directory.",
            d.size as f64,
        );
        o.one(
            "koprogo_disk_available_bytes",
            "gauge",
            "Bytes available to unprivileged users on that filesystem.",
            d.available as f64,
        );
    }
    if let Some((total, avail)) = crate::procfs::meminfo() {
        o.one(
            "koprogo_memory_total_bytes",
            "gauge",
            "Host RAM.",
            total as f64,
        );
        o.one(
            "koprogo_memory_available_bytes",
            "gauge",
            "Host RAM available.",
            avail as f64,
        );
    }
    if let Some([l1, _, _]) = crate::procfs::loadavg() {
        o.one(
            "koprogo_load1",
            "gauge",
            "1-minute load average of the host.",
            l1,
        );
    }
    o.one(
        "koprogo_cpu_cores",
        "gauge",
        "CPU cores available.",
        crate::postgres::tuning::cores() as f64,
    );
}

/// Connections, size, cache hit ratio and dead tuples, by SQL (bounded; the queries
/// are shared with `koprogo capacity` in `postgres::stats`).
async fn postgres<S: Source>(o: &mut Out, shared: &S) {
    match crate::postgres::stats::collect(shared.db(), false).await {
        Ok((st, _)) => {
            o.one(
                "koprogo_postgres_up",
                "gauge",
                "1 when the metrics queries succeeded.",
                1.0,
            );
            o.one(
                "koprogo_postgres_connections",
                "gauge",
                "Client connections to PostgreSQL.",
                st.connections as f64,
            );
            o.one(
                "koprogo_postgres_app_connections",
                "gauge",
                "Client connections of the API's role (its pool).",
                st.app_connections as f64,
            );
            o.one(
                "koprogo_postgres_max_connections",
                "gauge",
                "PostgreSQL max_connections.",
                f64::from(st.max_connections),
            );
            o.one(
                "koprogo_postgres_database_size_bytes",
                "gauge",
                "Size of the koprogo database.",
                st.size_bytes as f64,
            );
            o.one(
                "koprogo_postgres_cache_hit_ratio",
                "gauge",
                "Share of block reads served from shared buffers since the statistics reset.",
                st.cache_hit_ratio().unwrap_or(1.0),
            );
            o.one(
                "koprogo_postgres_dead_tuples",
                "gauge",
                "Dead tuples in user tables.",
                st.dead_tuples,
            );
            o.one(
                "koprogo_postgres_dead_tuple_ratio",
                "gauge",
                "Dead tuples / (dead + live) in user tables.",
                st.dead_tuple_ratio().unwrap_or(0.0),
            );
        }
        Err(_) => o.one(
            "koprogo_postgres_up",
            "gauge",
            "1 when the metrics queries succeeded.",
            0.0,
        ),
    }
}

/// utime + stime of every live process in the process group `pgid`.
fn group_cpu_ticks(pgid: i32) -> u64 {
    crate::procfs::group_members(pgid)
        .into_iter()
        .map(crate::procfs::cpu_ticks)
        .sum()
}
