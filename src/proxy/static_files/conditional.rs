//! Validators and conditional requests: entity tags, `If-None-Match`,
//! `If-Modified-Since`, `If-Range`, HTTP dates and the `Range` header.

use std::fs::Metadata;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::header::{HeaderMap, HeaderName};

/// All values of a header joined with `, ` (None when absent or not ASCII).
pub(super) fn joined(h: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut out: Option<String> = None;
    for v in h.get_all(name) {
        let s = v.to_str().ok()?;
        match out.as_mut() {
            Some(o) => {
                o.push_str(", ");
                o.push_str(s);
            }
            None => out = Some(s.to_owned()),
        }
    }
    out
}

/// `"<mtime secs hex>.<mtime nanos hex>-<size hex><suffix>"`.
pub(super) fn strong_etag(meta: &Metadata, suffix: &str) -> String {
    let d = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or(Duration::ZERO);
    format!(
        "\"{:x}.{:x}-{:x}{suffix}\"",
        d.as_secs(),
        d.subsec_nanos(),
        meta.len()
    )
}

/// Weak comparison of `etag` against an If-None-Match list (or `*`).
pub(super) fn etag_list_matches(list: &str, etag: &str) -> bool {
    let ours = opaque(etag);
    let mut rest = list.trim();
    while !rest.is_empty() {
        rest = rest.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
        if rest.is_empty() {
            break;
        }
        if rest.starts_with('*') {
            return true;
        }
        let body = rest.strip_prefix("W/").unwrap_or(rest);
        let Some(body) = body.strip_prefix('"') else {
            return false; // malformed list: no match
        };
        let Some(end) = body.find('"') else {
            return false;
        };
        if &body[..end] == ours {
            return true;
        }
        rest = &body[end + 1..];
    }
    false
}

/// The opaque part of an entity tag (without `W/` and quotes).
fn opaque(etag: &str) -> &str {
    etag.strip_prefix("W/").unwrap_or(etag).trim_matches('"')
}

/// If-Range: a strong etag equal to ours, or exactly our Last-Modified date.
pub(super) fn if_range_matches(value: &str, etag: &str, mtime: Option<SystemTime>) -> bool {
    let v = value.trim();
    if v.starts_with("W/") {
        return false;
    }
    if v.starts_with('"') {
        return !etag.starts_with("W/") && v == etag;
    }
    match (httpdate::parse_http_date(v), mtime) {
        (Ok(d), Some(m)) => d == truncate_secs(m),
        _ => false,
    }
}

/// An HTTP date, for times httpdate can represent (1970 to 9999; it panics on others).
pub(super) fn http_date(t: SystemTime) -> Option<String> {
    let secs = t.duration_since(UNIX_EPOCH).ok()?.as_secs();
    (secs < 253_402_300_800).then(|| httpdate::fmt_http_date(t))
}

pub(super) fn truncate_secs(t: SystemTime) -> SystemTime {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => t,
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum RangeSpec {
    /// Inclusive first and last byte.
    Satisfiable(u64, u64),
    Unsatisfiable,
    /// Malformed, not bytes, or several ranges: send the whole file.
    Ignore,
}

/// Parses a `Range` header for a body of `len` bytes (one range only).
pub(super) fn parse_range(value: &str, len: u64) -> RangeSpec {
    let v = value.trim();
    let Some((unit, spec)) = v.split_once('=') else {
        return RangeSpec::Ignore;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return RangeSpec::Ignore;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeSpec::Ignore;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    if a.is_empty() {
        // Suffix range: the last n bytes.
        let Some(n) = num(b) else {
            return RangeSpec::Ignore;
        };
        if n == 0 || len == 0 {
            return RangeSpec::Unsatisfiable;
        }
        return RangeSpec::Satisfiable(len.saturating_sub(n), len - 1);
    }
    let Some(first) = num(a) else {
        return RangeSpec::Ignore;
    };
    let last = if b.is_empty() {
        None
    } else {
        match num(b) {
            Some(l) if l >= first => Some(l),
            _ => return RangeSpec::Ignore,
        }
    };
    if first >= len {
        return RangeSpec::Unsatisfiable;
    }
    let last = last.map_or(len - 1, |l| l.min(len - 1));
    RangeSpec::Satisfiable(first, last)
}
