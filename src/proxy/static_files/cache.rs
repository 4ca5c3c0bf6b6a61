//! Small answers of the static server kept in memory: the `200` of a file (or of its
//! compressed form) of at most 64 KiB, keyed by the request's path and the encodings it
//! accepts, reused without touching the disk for [`FRESH`] after it was planned, then
//! planned again from disk (metadata, symlink and root checks included). Bounded in
//! bytes and entries. A frontend replaced on disk is served within [`FRESH`].
//!
//! What a hit answers is what [`super::Inner::plan`] would: `304` for a matching
//! `If-None-Match` (else `If-Modified-Since`), the headers alone for `HEAD`, else the
//! body. Requests with `Range` never use it.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use hyper::body::Bytes;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::StatusCode;

use super::conditional::{etag_list_matches, truncate_secs};
use super::response::{BodySpec, Plan};
use super::ReqInfo;

/// How long a planned answer is reused before the disk is looked at again.
pub(super) const FRESH: Duration = Duration::from_secs(1);
/// Largest body kept.
const MAX_BODY: usize = 64 * 1024;
/// Bound on all bodies kept.
const MAX_BYTES: usize = 2 * 1024 * 1024;
/// Bound on entries (each also holds its headers).
const MAX_ENTRIES: usize = 512;

#[derive(Hash, PartialEq, Eq, Clone)]
pub(super) struct Key {
    path: String,
    trailing: bool,
    br: bool,
    gzip: bool,
}

impl Key {
    /// None for a request the cache does not answer (a `Range`).
    pub(super) fn of(req: &ReqInfo) -> Option<Key> {
        if req.range.is_some() {
            return None;
        }
        Some(Key {
            path: req.segs.join("/"),
            trailing: req.trailing,
            br: req.accept_br,
            gzip: req.accept_gzip,
        })
    }
}

struct Entry {
    /// The `200`'s headers without `Content-Length`.
    headers: HeaderMap,
    body: Bytes,
    etag: String,
    modified: Option<SystemTime>,
    planned: Instant,
}

#[derive(Default)]
pub(super) struct FileCache {
    map: HashMap<Key, Entry>,
    bytes: usize,
}

impl FileCache {
    /// The answer to `req` from memory, if its entry is fresh.
    pub(super) fn answer(&self, key: &Key, req: &ReqInfo, now: Instant) -> Option<Plan> {
        let e = self.map.get(key)?;
        if now.saturating_duration_since(e.planned) >= FRESH {
            return None;
        }
        let mut headers = e.headers.clone();
        let not_modified = match (&req.if_none_match, &req.if_modified_since) {
            (Some(inm), _) => etag_list_matches(inm, &e.etag),
            (None, Some(ims)) => match (httpdate::parse_http_date(ims), e.modified) {
                (Ok(since), Some(m)) => truncate_secs(m) <= since,
                _ => false,
            },
            (None, None) => false,
        };
        if not_modified {
            return Some(Plan {
                status: StatusCode::NOT_MODIFIED,
                headers,
                body: BodySpec::Empty,
            });
        }
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(e.body.len()));
        let body = if req.head {
            BodySpec::Empty
        } else {
            BodySpec::Bytes(e.body.clone())
        };
        Some(Plan {
            status: StatusCode::OK,
            headers,
            body,
        })
    }

    /// Keeps `plan` for `key` if it is a whole `200` small enough (planned at `now`).
    pub(super) fn keep(&mut self, key: Key, req: &ReqInfo, plan: &Plan, now: Instant) {
        let BodySpec::Bytes(body) = &plan.body else {
            return;
        };
        if plan.status != StatusCode::OK || req.head || body.len() > MAX_BODY {
            return;
        }
        let Some(etag) = plan
            .headers
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
        else {
            return;
        };
        let modified = plan
            .headers
            .get(header::LAST_MODIFIED)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok());
        let mut headers = plan.headers.clone();
        headers.remove(header::CONTENT_LENGTH);
        if let Some(old) = self.map.remove(&key) {
            self.bytes -= old.body.len();
        }
        // Room: drop the stalest entries first (a full scan; the map is small).
        while !self.map.is_empty()
            && (self.bytes + body.len() > MAX_BYTES || self.map.len() >= MAX_ENTRIES)
        {
            let Some(stalest) = self
                .map
                .iter()
                .min_by_key(|(_, e)| e.planned)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(e) = self.map.remove(&stalest) {
                self.bytes -= e.body.len();
            }
        }
        self.bytes += body.len();
        self.map.insert(
            key,
            Entry {
                headers,
                body: body.clone(),
                etag,
                modified,
                planned: now,
            },
        );
    }

    #[cfg(test)]
    pub(super) fn len_bytes(&self) -> (usize, usize) {
        (self.map.len(), self.bytes)
    }
}
