//! The proxy's counters (requests by status class, latency histogram, open
//! connections, TLS handshakes, bytes) and the access log line written for every
//! request through the log pipeline.

use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::sync::LockExt;
use serde::{Deserialize, Serialize};

/// Upper bounds of the latency histogram buckets, in seconds.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
pub struct ProxyStats {
    pub requests: AtomicU64,
    /// By status class: index 1 = 1xx … 5 = 5xx.
    pub by_class: [AtomicU64; 6],
    pub rate_limited: AtomicU64,
    pub open_connections: AtomicU64,
    pub connections: AtomicU64,
    pub tls_handshakes: AtomicU64,
    pub tls_failures: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Cumulative-free bucket counts (one per LATENCY_BUCKETS entry plus +Inf).
    pub latency: [AtomicU64; 13],
    pub latency_sum_us: AtomicU64,
}

/// A copy for `status --json` (and metrics later).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProxySnapshot {
    pub requests: u64,
    pub status_1xx: u64,
    pub status_2xx: u64,
    pub status_3xx: u64,
    pub status_4xx: u64,
    pub status_5xx: u64,
    pub rate_limited: u64,
    pub open_connections: u64,
    pub connections: u64,
    pub tls_handshakes: u64,
    pub tls_failures: u64,
    pub bytes_out: u64,
    /// Approximate 99th percentile of request latency (histogram bucket bound), seconds.
    pub p99_seconds: Option<f64>,
}

impl ProxyStats {
    pub fn record(&self, status: u16, took: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let class = usize::from(status / 100).min(5);
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// The latency histogram's bucket counts (not cumulative; the last is +Inf).
    pub fn latency_counts(&self) -> [u64; 13] {
        std::array::from_fn(|i| self.latency[i].load(Ordering::Relaxed))
    }

    pub fn snapshot(&self) -> ProxySnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let p99 = p99(&self.latency_counts());
        ProxySnapshot {
            requests: g(&self.requests),
            status_1xx: g(&self.by_class[1]),
            status_2xx: g(&self.by_class[2]),
            status_3xx: g(&self.by_class[3]),
            status_4xx: g(&self.by_class[4]),
            status_5xx: g(&self.by_class[5]),
            rate_limited: g(&self.rate_limited),
            open_connections: g(&self.open_connections),
            connections: g(&self.connections),
            tls_handshakes: g(&self.tls_handshakes),
            tls_failures: g(&self.tls_failures),
            bytes_out: g(&self.bytes_out),
            p99_seconds: p99.filter(|p| p.is_finite()),
        }
    }
}

/// The 99th percentile of bucket `counts` (as [`ProxyStats::latency_counts`]): the
/// upper bound of the bucket it falls in, infinite past the last bound; `None`
/// without requests.
pub fn p99(counts: &[u64]) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    (total > 0).then(|| {
        let want = (total as f64 * 0.99).ceil() as u64;
        let mut acc = 0;
        for (i, c) in counts.iter().enumerate() {
            acc += c;
            if acc >= want {
                return LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY);
            }
        }
        f64::INFINITY
    })
}

/// One access-log line per request, written whole into the `access` log pipe.
pub struct AccessLog {
    out: Option<Mutex<crate::logs::PipeWriter>>,
}

/// What the access log says about one request.
pub struct AccessEntry<'a> {
    pub client: IpAddr,
    pub method: &'a str,
    pub path: &'a str,
    pub version: &'a str,
    pub status: u16,
    pub bytes: u64,
    pub took: Duration,
    pub upstream: Option<Duration>,
    pub host: &'a str,
}

impl AccessLog {
    pub fn new(out: Option<crate::logs::PipeWriter>) -> AccessLog {
        AccessLog {
            out: out.map(Mutex::new),
        }
    }

    pub fn write(&self, e: &AccessEntry<'_>) {
        let Some(out) = &self.out else { return };
        let upstream = e
            .upstream
            .map(|u| format!("{:.1}ms", u.as_secs_f64() * 1000.0))
            .unwrap_or_else(|| "-".into());
        // Control characters in the path would forge log lines: escape them.
        let path: String = e.path.chars().flat_map(char::escape_default).collect();
        let host: String = e.host.chars().flat_map(char::escape_default).collect();
        let line = format!(
            "{} \"{} {} {}\" {} {} {:.1}ms upstream={} host={}\n",
            e.client,
            e.method,
            path,
            e.version,
            e.status,
            e.bytes,
            e.took.as_secs_f64() * 1000.0,
            upstream,
            host
        );
        {
            let mut w = out.locked();
            let _ = w.write_all(line.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_is_the_bound_of_its_bucket() {
        assert_eq!(p99(&[0; 13]), None);
        let mut c = [0u64; 13];
        c[0] = 100;
        assert_eq!(p99(&c), Some(0.001));
        c[0] = 98;
        c[5] = 2;
        assert_eq!(
            p99(&c),
            Some(0.05),
            "the 99th of 100 is in the 50 ms bucket"
        );
        let mut c = [0u64; 13];
        c[12] = 1;
        assert_eq!(p99(&c), Some(f64::INFINITY));
    }
}
