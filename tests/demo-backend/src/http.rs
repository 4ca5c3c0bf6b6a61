//! HTTP side of the demo backend: the routes koprogo-api's tests rely on, one log
//! line per request, and the never-ending Server-Sent-Events stream of `/mcp/sse`
//! (which ends by itself once SIGTERM is received, so the drain can finish).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::{combinators::BoxBody, BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use crate::db::{Db, DbError};

pub type RespBody = BoxBody<Bytes, Infallible>;

/// Set on SIGTERM: SSE streams end at their next tick.
pub static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);
/// Open WebSockets: the SIGTERM drain waits for them (bounded), as actix-web's
/// does for its upgraded connections, so the client or the proxy must end them.
pub static OPEN_WEBSOCKETS: AtomicU64 = AtomicU64::new(0);

/// Resolves once no WebSocket is open.
pub async fn websockets_closed() {
    while OPEN_WEBSOCKETS.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
/// Largest request body accepted (uploads go up to 50 MiB in the real API).
const MAX_BODY: usize = 64 << 20;
/// Bound on any request that touches the database, so none can hang.
const DB_TIMEOUT: Duration = Duration::from_secs(30);

pub struct State {
    pub db: Db,
    pub totp_key: String,
    pub requests: AtomicU64,
    pub knobs: Knobs,
}

/// Test knobs read at start (see main.rs).
pub struct Knobs {
    /// With `version`: `X-Demo-Port: PORT` tells the instances apart.
    pub port: u16,
    pub version: Option<String>,
    pub never_ready: bool,
}

/// The hyper service: routes, then logs `METHOD PATH STATUS TIMEms`.
pub async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let start = Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let mut resp = route(&state, req).await;
    if let Some(v) = state
        .knobs
        .version
        .as_deref()
        .and_then(|v| HeaderValue::from_str(v).ok())
    {
        resp.headers_mut().insert("x-demo-version", v);
        resp.headers_mut()
            .insert("x-demo-port", HeaderValue::from(state.knobs.port));
    }
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    log_info!("{method} {path} {} {ms:.1}ms", resp.status().as_u16());
    Ok(resp)
}

async fn route(state: &State, req: Request<Incoming>) -> Response<RespBody> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/api/v1/health") if state.knobs.never_ready => json(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"service": "koprogo-api", "status": "DEMO_NEVER_READY"}),
        ),
        (&Method::GET, "/api/v1/health") => json(
            StatusCode::OK,
            json!({"service": "koprogo-api", "status": "ok"}),
        ),
        (&Method::GET, "/api/v1/echo") => echo(&req),
        // A memory hog for the OOM tests: allocates `mib` MiB, touches every page
        // and keeps it (as a leaking API server would).
        (&Method::POST, "/api/v1/demo/hog") => hog(&req),
        (&Method::GET, "/api/v1/ws") => websocket_echo(req),
        // A handler that panics, as the real API's does on some demo data (its
        // actix worker drops the connection without an answer).
        (&Method::GET, "/api/v1/panic") => panic!("demo: this handler panics"),
        (&Method::GET, "/metrics") => {
            let n = state.requests.load(Ordering::Relaxed);
            let mut r = Response::new(full(format!("demo_requests_total {n}\n")));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        (&Method::GET, "/mcp/sse") => {
            let mut interval = tokio::time::interval(Duration::from_millis(200));
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut r = Response::new(BoxBody::new(Sse { interval, n: 0 }));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            r.headers_mut()
                .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r
        }
        _ => {
            let (method, path) = (req.method().clone(), req.uri().path().to_string());
            // The body is read before the database timeout starts: slow uploads are fine.
            let body = match method {
                Method::POST => match read_text(req).await {
                    Ok(body) => body,
                    Err(resp) => return resp,
                },
                _ => String::new(),
            };
            db_timeout(db_route(state, &method, &path, &body)).await
        }
    }
}

async fn db_timeout(
    query: impl std::future::Future<Output = Result<Response<RespBody>, DbError>>,
) -> Response<RespBody> {
    match tokio::time::timeout(DB_TIMEOUT, query).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(DbError::Unavailable(detail))) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "database unavailable", "detail": detail}),
        ),
        Ok(Err(DbError::Failed(detail))) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": "database error", "detail": detail}),
        ),
        Err(_) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "database timeout"}),
        ),
    }
}

/// Routes that need the database (and the 404 fallback); `body` is the request's.
async fn db_route(
    state: &State,
    method: &Method,
    path: &str,
    body: &str,
) -> Result<Response<RespBody>, DbError> {
    let id_in = |prefix: &str| path.strip_prefix(prefix)?.parse::<i64>().ok();
    let db = &state.db;
    Ok(match (method, path) {
        (&Method::POST, "/api/v1/items") => json(
            StatusCode::CREATED,
            json!({"id": db.insert_item(body).await?}),
        ),
        (&Method::POST, "/api/v1/secrets") => {
            let id = db.insert_secret(body, &state.totp_key).await?;
            json(StatusCode::CREATED, json!({"id": id}))
        }
        (&Method::POST, "/api/v1/auth/login") => login(db, body).await?,
        (&Method::GET, "/api/v1/items") => {
            json(StatusCode::OK, json!({"count": db.count_items().await?}))
        }
        (&Method::GET, _) => {
            if let Some(id) = id_in("/api/v1/items/") {
                match db.get_item(id).await? {
                    Some(body) => json(StatusCode::OK, json!({"id": id, "body": body})),
                    None => not_found(),
                }
            } else if let Some(id) = id_in("/api/v1/secrets/") {
                match db.get_secret(id, &state.totp_key).await? {
                    Some(text) => json(StatusCode::OK, json!({"id": id, "plaintext": text})),
                    None => not_found(),
                }
            } else {
                not_found()
            }
        }
        _ => not_found(),
    })
}

async fn login(db: &Db, body: &str) -> Result<Response<RespBody>, DbError> {
    let creds: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let (Some(email), Some(password)) = (creds["email"].as_str(), creds["password"].as_str())
    else {
        return Ok(json(
            StatusCode::BAD_REQUEST,
            json!({"error": "expected JSON {\"email\", \"password\"}"}),
        ));
    };
    let unauthorized = || {
        json(
            StatusCode::UNAUTHORIZED,
            json!({"error": "invalid credentials"}),
        )
    };
    let Some(hash) = db.password_hash(email).await? else {
        return Ok(unauthorized());
    };
    let password = password.to_string();
    let verified = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash)).await;
    Ok(match verified {
        Ok(Ok(true)) => json(StatusCode::OK, json!({"ok": true})),
        _ => unauthorized(),
    })
}

/// The request as seen here, for proxy tests: method, path, query, headers
/// (lower-case names; repeated headers joined with ", ").
fn hog(req: &Request<Incoming>) -> Response<RespBody> {
    let mib: usize = req
        .uri()
        .query()
        .and_then(|q| q.strip_prefix("mib="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
        .min(64 * 1024);
    log_info!("hog: allocating {mib} MiB");
    for _ in 0..mib {
        // One MiB at a time, every page written: resident, not just reserved.
        let block = vec![0x5au8; 1 << 20];
        std::hint::black_box(&block);
        std::mem::forget(block);
    }
    json(StatusCode::OK, json!({ "allocated_mib": mib }))
}

fn echo(req: &Request<Incoming>) -> Response<RespBody> {
    let mut headers = serde_json::Map::new();
    for name in req.headers().keys() {
        let values: Vec<String> = req
            .headers()
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        headers.insert(name.as_str().to_string(), Value::String(values.join(", ")));
    }
    json(
        StatusCode::OK,
        json!({
            "method": req.method().as_str(),
            "path": req.uri().path(),
            "query": req.uri().query(),
            "headers": headers,
        }),
    )
}

/// Reads the body as UTF-8 text (413 over `MAX_BODY`, 400 if not storable text).
async fn read_text(req: Request<Incoming>) -> Result<String, Response<RespBody>> {
    let bad = |msg: &str| json(StatusCode::BAD_REQUEST, json!({"error": msg}));
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<LengthLimitError>() => {
            return Err(json(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": "body too large"}),
            ))
        }
        Err(_) => return Err(bad("cannot read the request body")),
    };
    match String::from_utf8(bytes.to_vec()) {
        Ok(text) if !text.contains('\0') => Ok(text),
        _ => Err(bad("body must be UTF-8 text without NUL")),
    }
}

fn full(text: String) -> RespBody {
    BoxBody::new(Full::new(Bytes::from(text)))
}

fn json(status: StatusCode, value: Value) -> Response<RespBody> {
    let mut r = Response::new(full(value.to_string()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn not_found() -> Response<RespBody> {
    json(StatusCode::NOT_FOUND, json!({"error": "not found"}))
}

/// `data: tick N\n\n` every 200 ms until the client goes away (hyper then drops
/// the body) or the server shuts down.
struct Sse {
    interval: tokio::time::Interval,
    n: u64,
}

impl Body for Sse {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        ready!(self.interval.poll_tick(cx));
        if SHUTTING_DOWN.load(Ordering::Relaxed) {
            return Poll::Ready(None);
        }
        self.n += 1;
        let event = format!("data: tick {}\n\n", self.n);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
    }
}

/// `GET /api/v1/ws`: a WebSocket that echoes every text or binary message.
fn websocket_echo(mut req: Request<Incoming>) -> Response<RespBody> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{handshake::derive_accept_key, protocol::Role, Message};
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return json(
            StatusCode::BAD_REQUEST,
            json!({"error": "not a websocket request"}),
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(up) = upgrade.await else { return };
        OPEN_WEBSOCKETS.fetch_add(1, Ordering::Relaxed);
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(up),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            let echo = matches!(msg, Message::Text(_) | Message::Binary(_));
            if matches!(msg, Message::Close(_)) || (echo && ws.send(msg).await.is_err()) {
                break;
            }
        }
        OPEN_WEBSOCKETS.fetch_sub(1, Ordering::Relaxed);
    });
    let mut r = Response::new(full(String::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert("upgrade", HeaderValue::from_static("websocket"));
    h.insert("connection", HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    r
}
