//! The answers the proxy makes itself: body helpers, JSON errors, the 502/503/413
//! for an upstream that failed, and the maintenance page while the API is not ready.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use super::upstream::Failure;
use super::Body;

const MAINTENANCE_PAGE: &str = include_str!("../../appliance/maintenance.html");
/// Seconds a client is told to wait when the API is not ready.
const RETRY_AFTER: &str = "10";

pub fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|e| match e {})
        .boxed_unsync()
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

pub fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    whole(status, content_type, Bytes::from(body))
}

/// A complete answer: status, type, length and the bytes.
pub fn whole(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let len = body.len();
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&len.to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    r
}

pub fn json_error(status: StatusCode, msg: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": msg }).to_string();
    text(status, "application/json", body)
}

/// The answer to a request the API server did not answer. Not listening: 503 (it
/// is starting, restarting or being replaced; the client may retry). A connection
/// closed without an answer while the server is up (it crashed on this request,
/// e.g. a panic in a handler): 502, logged with the request, so a bug is not shown
/// as maintenance.
pub(super) fn failed(f: Failure, limit: u64, port: u16, what: &str) -> Response<Body> {
    match f {
        Failure::TooLarge => json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request body over {limit} bytes"),
        ),
        Failure::Connect => api_unavailable(),
        Failure::Closed => {
            tracing::warn!(
                "proxy: the API server on port {port} closed the connection without answering {what} (see api.log)"
            );
            json_error(
                StatusCode::BAD_GATEWAY,
                "the API server failed to answer this request",
            )
        }
        Failure::Other(e) => {
            tracing::warn!("proxy: {what} to the API server on port {port} failed: {e}");
            json_error(StatusCode::BAD_GATEWAY, "the API server did not answer")
        }
    }
}

pub(super) fn api_unavailable() -> Response<Body> {
    let mut r = json_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "KoproGo is starting or being updated; retry shortly",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER));
    r
}

pub(super) fn maintenance() -> Response<Body> {
    let mut r = text(
        StatusCode::SERVICE_UNAVAILABLE,
        "text/html; charset=utf-8",
        MAINTENANCE_PAGE.to_string(),
    );
    let h = r.headers_mut();
    h.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
