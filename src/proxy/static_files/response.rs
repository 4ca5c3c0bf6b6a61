//! Responses of the static server: the [`Plan`] computed on the blocking pool and
//! its body (in memory or streamed from the open file), the small text answers
//! (404, 405, 400, `/health`), and header helpers.

use std::convert::Infallible;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use futures_util::TryStreamExt;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};
use tokio::io::AsyncReadExt;
use tokio_util::io::ReaderStream;

use super::{NO_CACHE, TEXT_PLAIN};
use crate::proxy::Body;

/// Bodies up to this size are read whole on the blocking pool; larger ones stream.
const SMALL_BODY: u64 = 64 * 1024;
/// Chunk size of streamed bodies.
pub(super) const STREAM_CHUNK: usize = 64 * 1024;

pub(super) enum BodySpec {
    Empty,
    Bytes(Bytes),
    /// An open file already positioned at the first byte to send.
    File {
        file: File,
        len: u64,
    },
}

/// A response computed on the blocking pool, turned into a hyper response outside.
pub(super) struct Plan {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: BodySpec,
}

impl Plan {
    pub(super) fn into_response(self) -> Response<Body> {
        let body = match self.body {
            BodySpec::Empty => empty_body(),
            BodySpec::Bytes(b) => full_body(b),
            BodySpec::File { file, len } => {
                let reader = tokio::fs::File::from_std(file).take(len);
                StreamBody::new(
                    ReaderStream::with_capacity(reader, STREAM_CHUNK).map_ok(Frame::data),
                )
                .boxed_unsync()
            }
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = self.status;
        *resp.headers_mut() = self.headers;
        resp
    }
}

/// Reads `count` bytes from `start` when small enough to hold in memory (`Some`),
/// else positions the file at `start` for streaming (`None`).
pub(super) fn read_body(file: &mut File, start: u64, count: u64) -> std::io::Result<Option<Bytes>> {
    if start > 0 {
        file.seek(SeekFrom::Start(start))?;
    }
    if count > SMALL_BODY {
        return Ok(None);
    }
    let mut buf = vec![0; usize::try_from(count).unwrap_or(0)];
    file.read_exact(&mut buf)?;
    Ok(Some(Bytes::from(buf)))
}

/// 64-bit FNV-1a, for the `/config.js` etag (stable across runs and builds).
pub(super) fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

pub(super) fn header_value(s: String) -> HeaderValue {
    HeaderValue::try_from(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn full_body(b: Bytes) -> Body {
    Full::new(b)
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

fn empty_body() -> Body {
    Empty::<Bytes>::new()
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

pub(super) fn plan_text(status: StatusCode, text: &'static str, head: bool) -> Plan {
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(TEXT_PLAIN));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(NO_CACHE));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(text.len()));
    let body = if head {
        BodySpec::Empty
    } else {
        BodySpec::Bytes(Bytes::from_static(text.as_bytes()))
    };
    Plan {
        status,
        headers: h,
        body,
    }
}

pub(super) fn text_response(status: StatusCode, text: &'static str, head: bool) -> Response<Body> {
    plan_text(status, text, head).into_response()
}

pub(super) fn not_found(head: bool) -> Response<Body> {
    text_response(StatusCode::NOT_FOUND, "Not Found\n", head)
}

pub(super) fn health(head: bool) -> Response<Body> {
    let mut resp = text_response(StatusCode::OK, "healthy\n", head);
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
