//! Forwarding to the API server: pooled keep-alive HTTP/1.1 connections on
//! loopback, the forwarding headers (X-Forwarded-For REPLACED by the real client
//! address), hop-by-hop headers removed, bodies streamed both ways (SSE included),
//! WebSocket upgrades spliced ([`super::tunnel`]), body limits enforced (413).

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::Bytes;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::tunnel::Lease;
use super::{json_error, Body};

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// After an early 413, what may still be read and discarded of the client's body.
const LINGER_BYTES: u64 = 1 << 20;
const LINGER_TIME: Duration = Duration::from_secs(2);

/// After an early 413 (declared length over the limit): reads and discards what the
/// client is still sending, at most [`LINGER_BYTES`] within [`LINGER_TIME`], so it
/// gets to read the answer instead of a reset connection (nginx's lingering close).
/// Past either bound the body is dropped and the connection closes.
fn linger<B>(body: B)
where
    B: hyper::body::Body<Data = hyper::body::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        let mut body = Box::pin(body);
        let mut seen = 0u64;
        let drain = async {
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(data) = frame.data_ref() {
                    seen += data.len() as u64;
                    if seen > LINGER_BYTES {
                        break;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, drain).await;
    });
}

pub struct Upstream {
    client: Client<HttpConnector, Body>,
}

/// Why forwarding failed before a response came back.
pub enum Failure {
    /// Nothing was sent: the API server was not listening (safe to retry).
    Connect,
    /// The connection closed before any response (the server died or was
    /// replaced): safe to retry for a request that may be repeated.
    Closed,
    /// The request body passed the limit.
    TooLarge,
    Other(String),
}

impl Upstream {
    pub fn new() -> Upstream {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build(http);
        Upstream { client }
    }

    /// Forwards `req` from `client_ip` to the API server on 127.0.0.1:`port`;
    /// `limit` caps the request body.
    pub async fn forward<B>(
        &self,
        mut req: Request<B>,
        client_ip: IpAddr,
        limit: u64,
        port: u16,
    ) -> Result<Response<Body>, Failure>
    where
        B: hyper::body::Body<Data = hyper::body::Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            linger(req.into_body());
            return Err(Failure::TooLarge);
        }
        // An upgrade needs the connection's lease (its limits, idle time and stop
        // signal); without one the request goes on as a plain request.
        let lease = req.extensions_mut().remove::<Lease>();
        let upgrade = lease.is_some() && is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

        let (mut parts, body) = req.into_parts();
        let host = match parts.headers.get(header::HOST) {
            Some(h) => Some(h.clone()),
            None => parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        };
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let authority = match Authority::try_from(format!("127.0.0.1:{port}")) {
            Ok(a) => a,
            Err(e) => return Err(Failure::Other(format!("bad upstream address: {e}"))),
        };
        parts.uri = match Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(authority)
            .path_and_query(path)
            .build()
        {
            Ok(u) => u,
            Err(e) => return Err(Failure::Other(format!("bad path: {e}"))),
        };
        // The API sees HTTP/1.1 whatever the client spoke.
        parts.version = hyper::Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers, upgrade);
        let h = &mut parts.headers;
        h.remove("forwarded");
        h.remove("x-real-ip");
        let ip = HeaderValue::from_maybe_shared(Bytes::from(client_ip.to_string()))
            .map_err(|e| Failure::Other(e.to_string()))?;
        h.insert(HeaderName::from_static("x-forwarded-for"), ip.clone());
        h.insert(HeaderName::from_static("x-real-ip"), ip);
        h.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static("https"),
        );
        if let Some(v) = host {
            h.insert(HeaderName::from_static("x-forwarded-host"), v.clone());
            h.insert(header::HOST, v);
        }
        if upgrade {
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }

        let over = Arc::new(AtomicBool::new(false));
        let flag = over.clone();
        let body: Body = Limited::new(body, limit as usize)
            .map_err(move |e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    flag.store(true, Ordering::Relaxed);
                }
                std::io::Error::other(e)
            })
            .boxed_unsync();
        let resp = match self.client.request(Request::from_parts(parts, body)).await {
            Ok(r) => r,
            Err(e) => {
                if over.load(Ordering::Relaxed) {
                    return Err(Failure::TooLarge);
                }
                if e.is_connect() {
                    return Err(Failure::Connect);
                }
                if closed_early(&e) {
                    return Err(Failure::Closed);
                }
                return Err(Failure::Other(error_chain(&e)));
            }
        };
        let (mut parts, body) = resp.into_parts();
        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            let (Some(client_up), Some(lease)) = (client_upgrade, lease) else {
                return Ok(json_error(
                    StatusCode::BAD_GATEWAY,
                    "unexpected 101 from the API server",
                ));
            };
            let upstream_resp = Response::from_parts(parts.clone(), body);
            tokio::spawn(super::tunnel::splice(client_up, upstream_resp, lease));
            return Ok(Response::from_parts(
                parts,
                http_body_util::Empty::new()
                    .map_err(|e| match e {})
                    .boxed_unsync(),
            ));
        }
        strip_hop_by_hop(&mut parts.headers, false);
        Ok(Response::from_parts(
            parts,
            body.map_err(std::io::Error::other).boxed_unsync(),
        ))
    }
}

fn is_upgrade(h: &HeaderMap) -> bool {
    h.get(header::UPGRADE).is_some()
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .map(|s| {
                    s.split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
                })
                .unwrap_or(false)
        })
}

fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .filter(|t| !t.is_empty() && t != "upgrade")
        .collect();
    for n in named {
        h.remove(n.as_str());
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    if !keep_upgrade {
        h.remove(header::UPGRADE);
    }
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream::new()
    }
}

/// The connection ended before a response head: hyper saw an incomplete message,
/// the pooled connection was closed before the request went out (canceled), or the
/// peer reset it (a killed server with unread data sends RST).
fn closed_early(e: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind;
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = src {
        if let Some(h) = x.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return true;
            }
        }
        if let Some(io) = x.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::BrokenPipe
                    | ErrorKind::UnexpectedEof
            );
        }
        src = x.source();
    }
    false
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}
