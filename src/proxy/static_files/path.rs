//! The request path → the list of safe, decoded segments under the root.

use hyper::StatusCode;

/// Splits and decodes the raw request path: `(segments, trailing slash)`.
/// Errors: 400 for anything unsafe or malformed, 404 for hidden segments.
pub(super) fn parse_path(raw: &str) -> Result<(Vec<String>, bool), StatusCode> {
    let rest = raw.strip_prefix('/').ok_or(StatusCode::BAD_REQUEST)?;
    let mut segs = Vec::new();
    for part in rest.split('/') {
        if part.is_empty() {
            continue;
        }
        let seg = decode_segment(part)?;
        if seg == "." || seg == ".." {
            return Err(StatusCode::BAD_REQUEST);
        }
        if seg.starts_with('.') && seg != ".well-known" {
            return Err(StatusCode::NOT_FOUND);
        }
        segs.push(seg);
    }
    let trailing = raw.ends_with('/') && !segs.is_empty();
    Ok((segs, trailing))
}

/// Percent-decodes one path segment, exactly once; 400 for a bad escape, a decoded
/// `/`, `\\`, NUL or other control byte, or non-UTF-8.
fn decode_segment(raw: &str) -> Result<String, StatusCode> {
    let out = percent_decode(raw).ok_or(StatusCode::BAD_REQUEST)?;
    if out
        .iter()
        .any(|&c| c < 0x20 || c == 0x7f || c == b'/' || c == b'\\')
    {
        return Err(StatusCode::BAD_REQUEST);
    }
    String::from_utf8(out).map_err(|_| StatusCode::BAD_REQUEST)
}

/// Strict percent-decoding: `None` unless every `%` starts an escape of two hex
/// digits (the `percent-encoding` crate alone passes a malformed one through as is).
fn percent_decode(raw: &str) -> Option<Vec<u8>> {
    let b = raw.as_bytes();
    let hex = |i: usize| b.get(i).is_some_and(u8::is_ascii_hexdigit);
    let well_formed = b
        .iter()
        .enumerate()
        .all(|(i, &c)| c != b'%' || (hex(i + 1) && hex(i + 2)));
    well_formed.then(|| percent_encoding::percent_decode(b).collect())
}
