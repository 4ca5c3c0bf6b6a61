//! Listeners and connections: bound before privileges are dropped, then served
//! with hyper (HTTP/1.1 and HTTP/2 by ALPN) over tokio-rustls. Guards: TLS
//! handshake and request-header timeouts (slowloris), an idle timeout, a cap on
//! connections per client IP (held by a connection's upgraded tunnel too, see
//! [`super::tunnel`]). Stop = no new connections, then a bounded drain.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::limits::ConnLimiter;
use super::tunnel::Lease;
use super::Proxy;
use crate::config::{Config, TlsMode};
use crate::tls::ACME_TLS_ALPN;

/// Bound on draining open connections at stop.
pub const DRAIN: Duration = Duration::from_secs(10);

/// Sockets bound at boot (as root if need be), served later.
pub struct Listeners {
    pub http: Vec<(SocketAddr, std::net::TcpListener)>,
    pub https: Vec<(SocketAddr, std::net::TcpListener)>,
}

/// Listen backlog: clients that arrive while no process accepts (a restart, with
/// the sockets kept by systemd) wait in it instead of being dropped. The kernel
/// caps it at net.core.somaxconn (4096 by default).
pub const BACKLOG: i32 = 1024;

/// The addresses the configuration asks for: (key, address), plain HTTP first.
pub fn addresses(cfg: &Config) -> Vec<(&'static str, SocketAddr)> {
    let mut out: Vec<(&'static str, SocketAddr)> =
        cfg.proxy.http.iter().map(|a| ("proxy.http", *a)).collect();
    if cfg.tls.mode != TlsMode::Off {
        out.extend(cfg.proxy.https.iter().map(|a| ("proxy.https", *a)));
    }
    out
}

/// Binds every configured listener, except those in `held` (listening sockets on
/// a configured address, passed back by systemd after a restart): those are used
/// as they are. An error names the key and the address.
pub fn bind(cfg: &Config, mut held: Vec<(SocketAddr, std::net::TcpListener)>) -> Result<Listeners> {
    let mut one = |key: &str, addr: SocketAddr| -> Result<(SocketAddr, std::net::TcpListener)> {
        if let Some(i) = held.iter().position(|(a, _)| *a == addr) {
            let (_, l) = held.swap_remove(i);
            l.set_nonblocking(true)?;
            // The same backlog as a new one (a socket from an older version may
            // have had less).
            let _ = listen(&l);
            tracing::debug!("proxy: {key} = {addr}: adopted the listener systemd kept");
            return Ok((l.local_addr()?, l));
        }
        let l = std::net::TcpListener::bind(addr)
            .with_context(|| format!("{}: {key} = {addr}: cannot listen", cfg.file.display()))?;
        listen(&l).with_context(|| format!("{key} = {addr}: listen({BACKLOG})"))?;
        l.set_nonblocking(true)?;
        Ok((l.local_addr()?, l))
    };
    let mut http = Vec::new();
    let mut https = Vec::new();
    for (key, addr) in addresses(cfg) {
        let l = one(key, addr)?;
        if key == "proxy.http" {
            http.push(l);
        } else {
            https.push(l);
        }
    }
    Ok(Listeners { http, https })
}

/// listen() again on a bound socket: on Linux this sets the backlog of a socket
/// that already listens.
fn listen(l: &std::net::TcpListener) -> Result<()> {
    let backlog = nix::sys::socket::Backlog::new(BACKLOG).context("backlog")?;
    nix::sys::socket::listen(l, backlog).context("listen")?;
    Ok(())
}

impl Listeners {
    /// Every listener with its address.
    pub fn iter(&self) -> impl Iterator<Item = (&SocketAddr, &std::net::TcpListener)> {
        self.http
            .iter()
            .chain(self.https.iter())
            .map(|(a, l)| (a, l))
    }
}

/// Serves every listener until `cancel` is cancelled, then drains (bounded).
pub async fn serve(proxy: Arc<Proxy>, listeners: Listeners, cancel: CancellationToken) {
    // Inside the proxy the stop travels on a watch channel: every connection task
    // polls it at each wake-up, and a watch receiver's check is lock-free where a
    // shared token's takes its mutex (two benchmark runs with the token polled per
    // connection gave about 10 % fewer keep-alive requests per CPU-second).
    let (stop_tx, mut stop) = watch::channel(false);
    tokio::spawn(async move {
        cancel.cancelled().await;
        let _ = stop_tx.send(true);
    });
    let flusher = {
        let proxy = proxy.clone();
        tokio::spawn(async move { proxy.access.run_flusher().await })
    };
    let conns = ConnLimiter::new(proxy.cfg.proxy.max_conns_per_ip);
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(proxy.cfg.proxy.header_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(250);
    let builder = Arc::new(builder);
    let acceptor = tokio_rustls::TlsAcceptor::from(proxy.tls.server_config());
    let plain_site = proxy.cfg.tls.mode == TlsMode::Off;

    let mut loops = Vec::new();
    for (secure, (addr, l)) in listeners
        .http
        .into_iter()
        .map(|l| (false, l))
        .chain(listeners.https.into_iter().map(|l| (true, l)))
    {
        let listener = match TcpListener::from_std(l) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("proxy: cannot use listener {addr}: {e}");
                continue;
            }
        };
        tracing::info!(
            "proxy: listening on {addr} ({})",
            if secure { "https" } else { "http" }
        );
        let (proxy, conns, builder, acceptor, mut stop) = (
            proxy.clone(),
            conns.clone(),
            builder.clone(),
            acceptor.clone(),
            stop.clone(),
        );
        loops.push(tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::warn!("proxy: accept on {addr}: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                    _ = stopped(&mut stop) => break,
                };
                let ip = client_key(peer.ip(), proxy.cfg.proxy.ipv6_prefix);
                let peer = super::Peer {
                    client: ip,
                    // The address the client reached: a Host naming it is ours.
                    local: tcp.local_addr().unwrap_or(addr),
                    trusted: proxy.trusted(peer.ip()),
                };
                // A trusted proxy in front carries many clients: not capped as one.
                let slot = if peer.trusted {
                    None
                } else {
                    match conns.acquire(ip) {
                        Some(s) => Some(s),
                        None => continue, // over the per-IP cap: dropped at once
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (proxy, builder, acceptor, stop) = (
                    proxy.clone(),
                    builder.clone(),
                    acceptor.clone(),
                    stop.clone(),
                );
                tokio::spawn(async move {
                    proxy.stats.connections.fetch_add(1, Ordering::Relaxed);
                    // Counted open, and the slot held, until the connection and any
                    // tunnel it upgraded to are both gone.
                    let lease = Lease::new(
                        slot,
                        proxy.stats.clone(),
                        stop.clone(),
                        proxy.cfg.proxy.tunnel_idle_timeout,
                    );
                    if secure {
                        connection_tls(proxy, builder, acceptor, tcp, peer, stop, lease).await;
                    } else {
                        let site = plain_site;
                        let idle = proxy.cfg.proxy.idle_timeout;
                        let p = proxy.clone();
                        let svc = service_fn(move |mut req: hyper::Request<_>| {
                            let p = p.clone();
                            req.extensions_mut().insert(lease.clone());
                            async move {
                                Ok::<_, Infallible>(if site {
                                    p.handle_site(req, peer, false).await
                                } else {
                                    p.handle_http(req, ip).await
                                })
                            }
                        });
                        run_conn(&builder, stop, tcp, svc, idle).await;
                    }
                });
            }
        }));
    }
    stopped(&mut stop).await;
    for l in &loops {
        l.abort();
    }
    // Each connection saw the same signal and is finishing its requests.
    let deadline = Instant::now() + DRAIN;
    while proxy.stats.open_connections.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = proxy.stats.open_connections.load(Ordering::Relaxed);
    if left > 0 {
        tracing::warn!("proxy: {left} connections still open after {DRAIN:?}: closing them");
    }
    flusher.abort();
    proxy.access.flush();
}

async fn connection_tls(
    proxy: Arc<Proxy>,
    builder: Arc<Builder<TokioExecutor>>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: super::Peer,
    stop: watch::Receiver<bool>,
    lease: Lease,
) {
    let stats = proxy.stats.clone();
    let tls = match tokio::time::timeout(proxy.cfg.proxy.header_timeout, acceptor.accept(tcp)).await
    {
        Ok(Ok(s)) => s,
        _ => {
            stats.tls_failures.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    stats.tls_handshakes.fetch_add(1, Ordering::Relaxed);
    if tls.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN) {
        return; // a TLS-ALPN-01 validation: the handshake was the whole answer
    }
    let idle = proxy.cfg.proxy.idle_timeout;
    let p = proxy.clone();
    let svc = service_fn(move |mut req: hyper::Request<_>| {
        let p = p.clone();
        req.extensions_mut().insert(lease.clone());
        async move { Ok::<_, Infallible>(p.handle_site(req, peer, true).await) }
    });
    run_conn(&builder, stop, tls, svc, idle).await;
}

async fn run_conn<IO, S>(
    builder: &Builder<TokioExecutor>,
    mut stop: watch::Receiver<bool>,
    io: IO,
    svc: S,
    idle: Duration,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<super::Body>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let activity = Activity::new();
    let io = IdleIo::new(io, activity.clone());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = &mut conn => return,
            _ = stopped(&mut stop), if !stopping => {
                stopping = true;
                // A connection accepted just before the stop whose first request
                // is still on its way: closed now, its client would get no answer
                // (a failed request in a restart). Serve that one request.
                if !activity.got_bytes() {
                    let first = tokio::time::timeout(FIRST_REQUEST, activity.first_bytes());
                    tokio::select! {
                        _ = &mut conn => return,
                        _ = first => {}
                    }
                }
                // Finish the requests in flight, take no new ones.
                conn.as_mut().graceful_shutdown();
            }
            _ = activity.quiet_for(idle) => return, // idle: drop the connection
        }
    }
}

/// At stop, how long a connection that has not sent a byte yet may take to send
/// its first request (which is then served).
const FIRST_REQUEST: Duration = Duration::from_millis(500);

/// Who the client is: an IPv4 address (also when it came IPv4-mapped), or an IPv6
/// client's network of `prefix` bits (its host bits zeroed), since whoever has a
/// /64 can use any of its addresses.
pub fn client_key(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None if v6.is_loopback() => ip,
            None => {
                let bits = u32::from(prefix.min(128));
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        },
        v4 => v4,
    }
}

/// When a stream last moved a byte (read or written), shared with its watcher.
#[derive(Clone)]
pub(super) struct Activity {
    /// Milliseconds after `start`.
    last: Arc<AtomicU64>,
    start: Instant,
    /// Whether a byte was read yet, and the wake-up of who waits for the first.
    read: Arc<(std::sync::atomic::AtomicBool, tokio::sync::Notify)>,
}

impl Activity {
    /// Starts as just touched.
    pub(super) fn new() -> Activity {
        Activity {
            last: Arc::new(AtomicU64::new(0)),
            start: Instant::now(),
            read: Arc::new((
                std::sync::atomic::AtomicBool::new(false),
                tokio::sync::Notify::new(),
            )),
        }
    }

    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn touch_read(&self) {
        self.touch();
        if !self.read.0.swap(true, Ordering::Relaxed) {
            self.read.1.notify_waiters();
        }
    }

    /// Whether the peer has sent a byte yet.
    fn got_bytes(&self) -> bool {
        self.read.0.load(Ordering::Relaxed)
    }

    /// Resolves once the peer has sent a byte.
    async fn first_bytes(&self) {
        loop {
            let woken = self.read.1.notified();
            if self.got_bytes() {
                return;
            }
            woken.await;
        }
    }

    /// Resolves once nothing has moved for `idle`.
    pub(super) async fn quiet_for(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
            let quiet = self.start.elapsed().saturating_sub(last);
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    }
}

/// An I/O stream that records its [`Activity`].
pub(super) struct IdleIo<T> {
    inner: T,
    activity: Activity,
}

impl<T> IdleIo<T> {
    pub(super) fn new(inner: T, activity: Activity) -> IdleIo<T> {
        IdleIo { inner, activity }
    }

    fn touch(&self) {
        self.activity.touch();
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch_read();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Resolves once `stop` is true (or its sender is gone).
pub(super) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::client_key;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn ipv6_clients_are_their_network() {
        assert_eq!(client_key(ip("192.0.2.7"), 64), ip("192.0.2.7"));
        assert_eq!(client_key(ip("::ffff:192.0.2.7"), 64), ip("192.0.2.7"));
        assert_eq!(
            client_key(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), 64),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            client_key(ip("2001:db8:1:2:aaaa::1"), 56),
            ip("2001:db8:1::")
        );
        assert_eq!(client_key(ip("2001:db8::1"), 128), ip("2001:db8::1"));
        assert_eq!(client_key(ip("::1"), 64), ip("::1"));
    }
}
