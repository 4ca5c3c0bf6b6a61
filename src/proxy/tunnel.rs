//! Upgraded connections (HTTP 101, WebSockets above all): the client's and the API
//! server's streams spliced byte for byte, kept inside the limits of the connection
//! they came from. A tunnel holds that connection's [`Lease`] (its per-client slot
//! and its place in the open-connection count) for as long as it lives, is closed
//! after `proxy.tunnel_idle_timeout` with no byte either way, and is closed when the
//! proxy stops, so the drain does not wait for it and nothing is left open.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper::Response;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use super::limits::ConnSlot;
use super::server::{stopped, Activity, IdleIo};
use super::stats::ProxyStats;

/// Bound on closing a tunnel's two ends (a TLS close_notify, a FIN): a peer that
/// reads nothing cannot hold the close.
const CLOSE_TIME: Duration = Duration::from_secs(1);

/// One client connection's hold on the limits: counted open (and in its client's
/// per-IP slot) until the last clone is dropped, whether by the connection or by a
/// tunnel that outlives it. Handed to each request in its extensions.
#[derive(Clone)]
pub struct Lease {
    _held: Arc<Held>,
    stop: watch::Receiver<bool>,
    idle: Duration,
}

struct Held {
    _slot: Option<ConnSlot>,
    stats: Arc<ProxyStats>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.stats.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Lease {
    /// Counts a new connection open; `slot` is its client's (None for a trusted
    /// proxy), `idle` the tunnel idle timeout, `stop` the proxy's stop signal.
    pub fn new(
        slot: Option<ConnSlot>,
        stats: Arc<ProxyStats>,
        stop: watch::Receiver<bool>,
        idle: Duration,
    ) -> Lease {
        stats.open_connections.fetch_add(1, Ordering::Relaxed);
        Lease {
            _held: Arc::new(Held { _slot: slot, stats }),
            stop,
            idle,
        }
    }
}

/// Splices the client's upgraded connection and the API server's until either
/// side ends it, nothing moves for the lease's idle time, or the proxy stops.
pub async fn splice(client: OnUpgrade, upstream: Response<Incoming>, lease: Lease) {
    let (Ok(c), Ok(u)) = (client.await, hyper::upgrade::on(upstream).await) else {
        return;
    };
    let activity = Activity::new();
    let mut c = IdleIo::new(TokioIo::new(c), activity.clone());
    let mut u = TokioIo::new(u);
    let mut stop = lease.stop.clone();
    let why = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut c, &mut u) => return,
        _ = activity.quiet_for(lease.idle) => "idle",
        _ = stopped(&mut stop) => "stopping",
    };
    tracing::debug!("proxy: closing an upgraded connection ({why})");
    let close = async {
        let _ = tokio::join!(c.shutdown(), u.shutdown());
    };
    let _ = tokio::time::timeout(CLOSE_TIME, close).await;
}
