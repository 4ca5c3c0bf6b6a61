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

/// How long the first line of a batch waits for others before the batch is written.
pub const ACCESS_FLUSH_AFTER: Duration = Duration::from_millis(25);
/// A batch this large is written at once, by the request that filled it.
const ACCESS_FLUSH_BYTES: usize = 32 * 1024;

/// One access-log line per request, collected in memory and written to the `access`
/// log pipe in batches: at most [`ACCESS_FLUSH_AFTER`] after the first line of a batch
/// (by [`AccessLog::run_flusher`]), at once past 32 KiB, and on drop. A pipe write per
/// request woke the log thread once per request: on a one-core VPS that was two
/// context switches per request. What a SIGKILL of the supervisor can lose: the lines
/// of the last 25 ms.
pub struct AccessLog {
    out: Option<Batch>,
}

struct Batch {
    lines: Mutex<Vec<u8>>,
    /// Held while a batch is written, so batches reach the pipe in order.
    pipe: Mutex<crate::logs::PipeWriter>,
    wake: tokio::sync::Notify,
}

impl Batch {
    /// Writes what is collected so far (lines are whole: one writer, in order).
    fn flush(&self) {
        let mut pipe = self.pipe.locked();
        let data = std::mem::take(&mut *self.lines.locked());
        if !data.is_empty() {
            let _ = pipe.write_all(&data);
        }
    }
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
            out: out.map(|w| Batch {
                lines: Mutex::new(Vec::with_capacity(4096)),
                pipe: Mutex::new(w),
                wake: tokio::sync::Notify::new(),
            }),
        }
    }

    /// Adds the line of one request to the batch.
    pub fn write(&self, e: &AccessEntry<'_>) {
        let Some(out) = &self.out else { return };
        let full = {
            let mut buf = out.lines.locked();
            let first = buf.is_empty();
            format_line(&mut buf, e);
            if first {
                out.wake.notify_one();
            }
            buf.len() >= ACCESS_FLUSH_BYTES
        };
        if full {
            out.flush();
        }
    }

    /// Writes the collected lines now (at the proxy's stop).
    pub fn flush(&self) {
        if let Some(out) = &self.out {
            out.flush();
        }
    }

    /// Writes each batch [`ACCESS_FLUSH_AFTER`] after its first line; runs until dropped.
    /// Idle (no request), it sleeps without a timer.
    pub async fn run_flusher(&self) {
        let Some(out) = &self.out else {
            return std::future::pending().await;
        };
        loop {
            out.wake.notified().await;
            tokio::time::sleep(ACCESS_FLUSH_AFTER).await;
            out.flush();
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.flush();
    }
}

/// `client "METHOD path version" status bytes 1.2ms upstream=0.9ms host=name\n`, with
/// control characters (and backslashes) of the path and host escaped, so a request
/// cannot forge a log line.
fn format_line(buf: &mut Vec<u8>, e: &AccessEntry<'_>) {
    let _ = write!(buf, "{} \"{} ", e.client, e.method);
    escaped(buf, e.path);
    let _ = write!(
        buf,
        " {}\" {} {} {:.1}ms upstream=",
        e.version,
        e.status,
        e.bytes,
        e.took.as_secs_f64() * 1000.0
    );
    match e.upstream {
        Some(u) => {
            let _ = write!(buf, "{:.1}ms", u.as_secs_f64() * 1000.0);
        }
        None => buf.push(b'-'),
    }
    buf.extend_from_slice(b" host=");
    escaped(buf, e.host);
    buf.push(b'\n');
}

/// `s` as [`char::escape_default`] writes it, without allocating for the usual text
/// (printable ASCII other than the quote characters and backslash is kept as is).
fn escaped(buf: &mut Vec<u8>, s: &str) {
    let plain = |b: u8| (0x20..0x7f).contains(&b) && !matches!(b, b'\\' | b'"' | b'\'');
    if s.bytes().all(plain) {
        buf.extend_from_slice(s.as_bytes());
    } else {
        for c in s.chars().flat_map(char::escape_default) {
            let mut tmp = [0u8; 4];
            buf.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
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

    fn entry<'a>(path: &'a str, host: &'a str, upstream: Option<Duration>) -> AccessEntry<'a> {
        AccessEntry {
            client: "192.0.2.7".parse().expect("address"),
            method: "GET",
            path,
            version: "HTTP/1.1",
            status: 200,
            bytes: 1234,
            took: Duration::from_micros(1540),
            upstream,
            host,
        }
    }

    #[test]
    fn lines_escape_what_could_forge_a_line() {
        let mut buf = Vec::new();
        format_line(
            &mut buf,
            &entry("/api/v1/x", "localhost", Some(Duration::from_micros(900))),
        );
        format_line(&mut buf, &entry("/a\nb\"c\\é", "h\r", None));
        assert_eq!(
            String::from_utf8(buf).expect("utf-8"),
            "192.0.2.7 \"GET /api/v1/x HTTP/1.1\" 200 1234 1.5ms upstream=0.9ms host=localhost\n\
             192.0.2.7 \"GET /a\\nb\\\"c\\\\\\u{e9} HTTP/1.1\" 200 1234 1.5ms upstream=- host=h\\r\n"
        );
    }

    /// Reads what the pipe holds within `limit` (non-blocking read end).
    fn read_for(r: &mut std::fs::File, limit: Duration) -> String {
        use std::io::Read;
        let mut out = Vec::new();
        let end = std::time::Instant::now() + limit;
        let mut buf = [0u8; 65536];
        while std::time::Instant::now() < end {
            match r.read(&mut buf) {
                Ok(n) if n > 0 => out.extend_from_slice(&buf[..n]),
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        String::from_utf8(out).expect("utf-8")
    }

    #[tokio::test]
    async fn batches_reach_the_pipe_soon_whole_and_at_drop() {
        let (r, w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .expect("pipe");
        let mut r = std::fs::File::from(r);
        let log = std::sync::Arc::new(AccessLog::new(Some(std::fs::File::from(w).into())));
        let flusher = {
            let log = log.clone();
            tokio::spawn(async move { log.run_flusher().await })
        };
        log.write(&entry("/one", "h", None));
        log.write(&entry("/two", "h", None));
        // Not written per request: both lines go in one batch, after the wait.
        let got = tokio::task::spawn_blocking(move || {
            let first = read_for(&mut r, Duration::from_millis(5));
            let later = read_for(&mut r, ACCESS_FLUSH_AFTER * 20);
            (first, later, r)
        })
        .await
        .expect("reader");
        let (first, later, mut r) = got;
        assert_eq!(first, "", "written before the batch's wait");
        assert_eq!(later.lines().count(), 2, "{later}");
        assert!(later.contains("/one") && later.contains("/two"));
        // Past 32 KiB a batch goes at once; what is left goes at drop.
        let long = "x".repeat(1000);
        for _ in 0..40 {
            log.write(&entry(&long, "h", None));
        }
        flusher.abort();
        let _ = flusher.await;
        let now = read_for(&mut r, Duration::from_millis(5));
        assert!(
            now.len() >= ACCESS_FLUSH_BYTES && now.ends_with('\n'),
            "{}",
            now.len()
        );
        drop(std::sync::Arc::into_inner(log).expect("last reference"));
        let rest = read_for(&mut r, Duration::from_millis(5));
        assert_eq!(now.lines().count() + rest.lines().count(), 40);
    }
}
