//! Content negotiation: the type of a file from its extension, whether it is worth
//! compressing, and which encodings (br, gzip) the client's `Accept-Encoding` allows.

use std::path::Path;

use super::{JAVASCRIPT, TEXT_PLAIN};

/// The encoding of the representation sent.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Encoding {
    Identity,
    Br,
    Gzip,
}

/// Lower-case extension of a file name (`""` for none or for dotfiles).
pub(super) fn extension(name: &str) -> String {
    Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default()
}

/// Content-Type and whether it is worth compressing.
pub(super) fn content_type(ext: &str) -> (&'static str, bool) {
    match ext {
        "html" | "htm" => ("text/html; charset=utf-8", true),
        "css" => ("text/css; charset=utf-8", true),
        "js" | "mjs" | "cjs" => (JAVASCRIPT, true),
        "json" | "map" => ("application/json", true),
        "webmanifest" => ("application/manifest+json", true),
        "svg" => ("image/svg+xml", true),
        "txt" => (TEXT_PLAIN, true),
        "xml" => ("text/xml; charset=utf-8", true),
        "csv" => ("text/csv; charset=utf-8", true),
        "md" => ("text/markdown; charset=utf-8", true),
        "png" => ("image/png", false),
        "jpg" | "jpeg" => ("image/jpeg", false),
        "gif" => ("image/gif", false),
        "webp" => ("image/webp", false),
        "avif" => ("image/avif", false),
        "ico" => ("image/x-icon", false),
        "woff" => ("font/woff", false),
        "woff2" => ("font/woff2", false),
        "ttf" => ("font/ttf", false),
        "otf" => ("font/otf", false),
        "pdf" => ("application/pdf", false),
        "wasm" => ("application/wasm", false),
        "gz" => ("application/gzip", false),
        "mp4" => ("video/mp4", false),
        "webm" => ("video/webm", false),
        _ => ("application/octet-stream", false),
    }
}

/// Which of br and gzip the client accepts (q > 0, explicitly or through `*`).
pub(super) fn accepted_encodings(header: &str) -> (bool, bool) {
    let (mut br, mut gzip, mut star) = (None, None, None);
    for item in header.split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let mut q = 1.0_f32;
        for p in parts {
            if let Some((k, v)) = p.split_once('=') {
                if k.trim().eq_ignore_ascii_case("q") {
                    q = v.trim().parse().unwrap_or(0.0);
                }
            }
        }
        match coding.as_str() {
            "br" => br = Some(q),
            "gzip" | "x-gzip" => gzip = Some(q),
            "*" => star = Some(q),
            _ => {}
        }
    }
    let ok = |q: Option<f32>| q.or(star).is_some_and(|q| q > 0.0);
    (ok(br), ok(gzip))
}
