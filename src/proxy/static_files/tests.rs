//! Tests of the static frontend server: real files in a temporary directory, real
//! requests built with `hyper::Request::builder`, bodies collected in full.

use super::gzip::{GZ_CACHE_BUDGET, GZ_CACHE_MAX_ENTRY};
use super::response::STREAM_CHUNK;
use super::*;
use http_body_util::BodyExt;
use hyper::Request;
use std::io::Read;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tempfile::TempDir;

const SECRET: &str = "TOP-SECRET-0xDEADBEEF";
const INDEX: &str = "<!doctype html><title>INDEX</title>";

struct Site {
    tmp: TempDir,
    root: PathBuf,
    sf: StaticFiles,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

fn big_js() -> Vec<u8> {
    "console.log('koprogo app bundle');\n"
        .repeat(200)
        .into_bytes()
}

fn big_css() -> Vec<u8> {
    ".card { margin: 0 auto; padding: 1rem; color: #123456; }\n"
        .repeat(100)
        .into_bytes()
}

fn data_bin() -> Vec<u8> {
    (0..200_000u32).map(|i| (i % 251) as u8).collect()
}

fn site_with(opts: StaticOptions) -> Site {
    // No leading dot in the name, so absolute-path attempts are not stopped merely
    // by the hidden-segment rule.
    let tmp = tempfile::Builder::new().prefix("sftest").tempdir().unwrap();
    let root = tmp.path().join("dist");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(tmp.path().join("secret.txt"), SECRET).unwrap();
    std::fs::write(tmp.path().join("secret"), SECRET).unwrap();
    write(tmp.path(), "distx/secret.txt", SECRET.as_bytes());

    write(&root, "index.html", INDEX.as_bytes());
    write(&root, "fr/about/index.html", b"<p>ABOUT-FR</p>");
    write(&root, "docs.html", b"<p>DOCS-FLAT</p>");
    write(&root, "robots.txt", b"User-agent: *\n");
    write(&root, "_astro/app.abc123.js", &big_js());
    write(&root, "_astro/app.abc123.js.br", b"BROTLI-BYTES");
    write(&root, "_astro/app.abc123.js.gz", b"GZIP-BYTES");
    write(&root, "_astro/style.def456.css", &big_css());
    write(&root, "_astro/font.woff2", b"wOF2fontdata");
    write(&root, "small.css", b"body{margin:0}");
    write(&root, "big.css", &big_css());
    write(&root, "logo.png", &[0x89, b'P', b'N', b'G'].repeat(1000));
    write(
        &root,
        "service-worker.js",
        b"self.addEventListener('fetch', () => {});",
    );
    write(&root, "manifest.webmanifest", b"{\"name\":\"KoproGo\"}");
    write(&root, "manifest.json", b"{\"name\":\"KoproGo\"}");
    write(
        &root,
        "config.js",
        b"window.__ENV__ = { API_URL: 'https://api.example.org' };",
    );
    write(&root, "data.bin", &data_bin());

    // Symlinks: one inside the tree (fine), several out of it (never served).
    symlink("small.css", root.join("alias.css")).unwrap();
    symlink(tmp.path().join("secret.txt"), root.join("leak.txt")).unwrap();
    symlink("../secret", root.join("leak")).unwrap();
    symlink("..", root.join("updir")).unwrap();
    symlink(tmp.path(), root.join("leakdir")).unwrap();
    symlink("../distx/secret.txt", root.join("sib.txt")).unwrap();

    let sf = StaticFiles::new(root.clone(), opts);
    Site { tmp, root, sf }
}

fn site() -> Site {
    site_with(StaticOptions {
        config_js: "window.__ENV__ = { API_URL: \"/api/v1\" };\n".into(),
        ..StaticOptions::default()
    })
}

/// Sends one request; `None` when the URI cannot even be built (rejected by `http`).
async fn try_send(
    sf: &StaticFiles,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
) -> Option<Reply> {
    let mut b = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let (parts, ()) = b.body(()).ok()?.into_parts();
    let resp = sf.serve(&parts).await;
    let (p, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Some(Reply {
        status: p.status,
        headers: p.headers,
        body,
    })
}

async fn send(sf: &StaticFiles, method: &str, uri: &str, headers: &[(&str, &str)]) -> Reply {
    try_send(sf, method, uri, headers).await.expect("valid URI")
}

async fn get(sf: &StaticFiles, uri: &str) -> Reply {
    send(sf, "GET", uri, &[]).await
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[tokio::test]
async fn index_is_served_with_html_headers() {
    let s = site();
    let r = get(&s.sf, "/").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), INDEX);
    assert_eq!(r.header("content-type"), "text/html; charset=utf-8");
    assert_eq!(r.header("cache-control"), "no-cache");
    assert_eq!(r.header("accept-ranges"), "bytes");
    assert_eq!(r.header("content-length"), INDEX.len().to_string());
    assert!(
        r.header("etag").starts_with('"'),
        "strong etag: {}",
        r.header("etag")
    );
    assert!(!r.header("last-modified").is_empty());
    assert_eq!(get(&s.sf, "/index.html").await.text(), INDEX);
    assert!(s.sf.installed());
}

#[tokio::test]
async fn nested_page_and_trailing_slash_and_flat_html() {
    let s = site();
    for uri in [
        "/fr/about",
        "/fr/about/",
        "/fr/about/index.html",
        "/fr//about",
    ] {
        let r = get(&s.sf, uri).await;
        assert_eq!(r.status, StatusCode::OK, "{uri}");
        assert_eq!(r.text(), "<p>ABOUT-FR</p>", "{uri}");
        assert_eq!(r.header("content-type"), "text/html; charset=utf-8");
    }
    let r = get(&s.sf, "/docs").await;
    assert_eq!(r.text(), "<p>DOCS-FLAT</p>");
}

#[tokio::test]
async fn unknown_route_falls_back_to_index() {
    let s = site();
    for uri in [
        "/dashboard",
        "/buildings/42/units",
        "/fr/nope/",
        "/old-page.html",
    ] {
        let r = get(&s.sf, uri).await;
        assert_eq!(r.status, StatusCode::OK, "{uri}");
        assert_eq!(r.text(), INDEX, "{uri}");
        assert_eq!(r.header("cache-control"), "no-cache");
    }
}

#[tokio::test]
async fn missing_asset_is_404_not_html() {
    let s = site();
    for uri in [
        "/_astro/missing.js",
        "/_astro/nothing",
        "/_astro/",
        "/missing.png",
        "/fr/gone.css",
        "/a/b.js.map",
    ] {
        let r = get(&s.sf, uri).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(r.header("content-type"), "text/plain; charset=utf-8");
        assert!(!r.text().contains("INDEX"));
    }
    // A hidden file is never served, not even through the fallback.
    write(&s.root, ".env", b"DB_PASSWORD=x");
    assert_eq!(get(&s.sf, "/.env").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn no_index_means_not_installed_and_404() {
    let tmp = tempfile::tempdir().unwrap();
    let sf = StaticFiles::new(tmp.path().join("nothing"), StaticOptions::default());
    assert!(!sf.installed());
    assert_eq!(get(&sf, "/").await.status, StatusCode::NOT_FOUND);
    assert_eq!(get(&sf, "/route").await.status, StatusCode::NOT_FOUND);
    assert_eq!(get(&sf, "/health").await.status, StatusCode::OK);
}

#[tokio::test]
async fn health_answers_healthy() {
    let s = site();
    let r = get(&s.sf, "/health").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text().trim(), "healthy");
    assert!(r.header("content-type").starts_with("text/plain"));
    let r = send(&s.sf, "HEAD", "/health", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.is_empty());
}

#[tokio::test]
async fn config_js_is_generated_not_from_disk() {
    let s = site();
    let r = get(&s.sf, "/config.js?v=3").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "window.__ENV__ = { API_URL: \"/api/v1\" };\n");
    assert_eq!(
        r.header("content-type"),
        "application/javascript; charset=utf-8"
    );
    assert_eq!(r.header("cache-control"), "no-cache");
    let etag = r.header("etag").to_owned();
    let r = send(&s.sf, "GET", "/config.js", &[("if-none-match", &etag)]).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert!(r.body.is_empty());
}

#[tokio::test]
async fn etag_gives_304() {
    let s = site();
    let r = get(&s.sf, "/robots.txt").await;
    let etag = r.header("etag").to_owned();
    for inm in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"other\", {etag}"),
        "*".to_owned(),
    ] {
        let r = send(&s.sf, "GET", "/robots.txt", &[("if-none-match", &inm)]).await;
        assert_eq!(r.status, StatusCode::NOT_MODIFIED, "{inm}");
        assert!(r.body.is_empty());
        assert_eq!(r.header("etag"), etag);
        assert_eq!(r.header("cache-control"), "public, max-age=3600");
    }
    let r = send(
        &s.sf,
        "GET",
        "/robots.txt",
        &[("if-none-match", "\"stale\"")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "User-agent: *\n");
}

#[tokio::test]
async fn if_modified_since_gives_304_unless_if_none_match() {
    let s = site();
    let r = get(&s.sf, "/logo.png").await;
    let lm = r.header("last-modified").to_owned();
    let r = send(&s.sf, "GET", "/logo.png", &[("if-modified-since", &lm)]).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    let old = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(1_000_000));
    let r = send(&s.sf, "GET", "/logo.png", &[("if-modified-since", &old)]).await;
    assert_eq!(r.status, StatusCode::OK);
    // If-None-Match wins: a non-matching tag means 200 even with a fresh date.
    let r = send(
        &s.sf,
        "GET",
        "/logo.png",
        &[("if-modified-since", &lm), ("if-none-match", "\"x\"")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = send(
        &s.sf,
        "GET",
        "/logo.png",
        &[("if-modified-since", "garbage")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn range_requests() {
    let s = site();
    let data = data_bin();
    let len = data.len();
    let cases: [(&str, usize, usize); 5] = [
        ("bytes=0-4", 0, 4),
        ("bytes=100000-", 100_000, len - 1),
        ("bytes=-3", len - 3, len - 1),
        ("bytes=10-9999999", 10, len - 1),
        ("bytes=0-150000", 0, 150_000),
    ];
    for (range, a, b) in cases {
        let r = send(
            &s.sf,
            "GET",
            "/data.bin",
            &[("range", range), ("accept-encoding", "gzip, br")],
        )
        .await;
        assert_eq!(r.status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            r.header("content-range"),
            format!("bytes {a}-{b}/{len}"),
            "{range}"
        );
        assert_eq!(r.header("content-length"), (b - a + 1).to_string());
        assert_eq!(&r.body[..], &data[a..=b], "{range}");
    }
    for range in ["bytes=200000-", "bytes=999999-1000000", "bytes=-0"] {
        let r = send(&s.sf, "GET", "/data.bin", &[("range", range)]).await;
        assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(r.header("content-range"), format!("bytes */{len}"));
        assert!(r.body.is_empty());
    }
    // Several ranges, other units and garbage: the whole file.
    for range in ["bytes=0-1,5-6", "items=0-1", "bytes=5-2", "bytes=abc"] {
        let r = send(&s.sf, "GET", "/data.bin", &[("range", range)]).await;
        assert_eq!(r.status, StatusCode::OK, "{range}");
        assert_eq!(r.body.len(), len);
    }
}

#[tokio::test]
async fn if_range_is_honoured() {
    let s = site();
    let r = get(&s.sf, "/data.bin").await;
    let etag = r.header("etag").to_owned();
    let lm = r.header("last-modified").to_owned();
    for ok in [etag.as_str(), lm.as_str()] {
        let r = send(
            &s.sf,
            "GET",
            "/data.bin",
            &[("range", "bytes=0-9"), ("if-range", ok)],
        )
        .await;
        assert_eq!(r.status, StatusCode::PARTIAL_CONTENT, "{ok}");
        assert_eq!(r.body.len(), 10);
    }
    let weak = format!("W/{etag}");
    let old = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(1_000_000));
    for stale in ["\"stale\"", weak.as_str(), old.as_str()] {
        let r = send(
            &s.sf,
            "GET",
            "/data.bin",
            &[("range", "bytes=0-9"), ("if-range", stale)],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{stale}");
        assert_eq!(r.body.len(), 200_000);
    }
}

#[tokio::test]
async fn precompressed_variants_follow_accept_encoding() {
    let s = site();
    let uri = "/_astro/app.abc123.js";
    let br = send(
        &s.sf,
        "GET",
        uri,
        &[("accept-encoding", "gzip, deflate, br")],
    )
    .await;
    assert_eq!(br.status, StatusCode::OK);
    assert_eq!(&br.body[..], b"BROTLI-BYTES");
    assert_eq!(br.header("content-encoding"), "br");
    assert_eq!(br.header("vary"), "accept-encoding");
    assert_eq!(
        br.header("content-type"),
        "application/javascript; charset=utf-8"
    );
    assert_eq!(br.header("content-length"), "12");

    let gz = send(&s.sf, "GET", uri, &[("accept-encoding", "gzip")]).await;
    assert_eq!(&gz.body[..], b"GZIP-BYTES");
    assert_eq!(gz.header("content-encoding"), "gzip");
    assert_eq!(gz.header("vary"), "accept-encoding");

    let q0 = send(
        &s.sf,
        "GET",
        uri,
        &[("accept-encoding", "br;q=0, gzip;q=0.5")],
    )
    .await;
    assert_eq!(&q0.body[..], b"GZIP-BYTES");
    let star = send(&s.sf, "GET", uri, &[("accept-encoding", "*")]).await;
    assert_eq!(&star.body[..], b"BROTLI-BYTES");

    let id = send(&s.sf, "GET", uri, &[]).await;
    assert_eq!(&id.body[..], &big_js()[..]);
    assert_eq!(id.header("content-encoding"), "");
    assert_eq!(id.header("vary"), "accept-encoding");

    // Every representation has its own tag; a 304 needs the right one.
    let tags = [br.header("etag"), gz.header("etag"), id.header("etag")];
    assert!(
        tags[0] != tags[1] && tags[1] != tags[2] && tags[0] != tags[2],
        "{tags:?}"
    );
    let r = send(
        &s.sf,
        "GET",
        uri,
        &[("accept-encoding", "br"), ("if-none-match", tags[0])],
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert_eq!(r.header("content-encoding"), "br");
    let r = send(
        &s.sf,
        "GET",
        uri,
        &[("accept-encoding", "br"), ("if-none-match", tags[2])],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);

    // With Range the identity bytes are used.
    let r = send(
        &s.sf,
        "GET",
        uri,
        &[("accept-encoding", "br, gzip"), ("range", "bytes=0-6")],
    )
    .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(&r.body[..], b"console");
    assert_eq!(r.header("content-encoding"), "");
}

#[tokio::test]
async fn gzip_on_the_fly_above_minimum_only() {
    let s = site();
    let css = big_css();
    let r = send(&s.sf, "GET", "/big.css", &[("accept-encoding", "gzip")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-encoding"), "gzip");
    assert_eq!(r.header("vary"), "accept-encoding");
    assert!(r.header("etag").starts_with("W/\""), "{}", r.header("etag"));
    assert_eq!(r.header("content-length"), r.body.len().to_string());
    assert!(r.body.len() < css.len() / 5);
    assert_eq!(gunzip(&r.body), css);
    // Second time from the cache: same bytes; HEAD has the same length.
    let again = send(&s.sf, "GET", "/big.css", &[("accept-encoding", "gzip")]).await;
    assert_eq!(again.body, r.body);
    let head = send(&s.sf, "HEAD", "/big.css", &[("accept-encoding", "gzip")]).await;
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), r.body.len().to_string());
    // 304 on the weak tag, without compressing.
    let etag = r.header("etag").to_owned();
    let r304 = send(
        &s.sf,
        "GET",
        "/big.css",
        &[("accept-encoding", "gzip"), ("if-none-match", &etag)],
    )
    .await;
    assert_eq!(r304.status, StatusCode::NOT_MODIFIED);

    // A changed file is compressed again (cache keyed by mtime + size), once the
    // answer kept in memory is no longer fresh.
    let newer = ".x{color:red}\n".repeat(300);
    std::fs::write(s.root.join("big.css"), &newer).unwrap();
    tokio::time::sleep(super::cache::FRESH).await;
    let r = send(&s.sf, "GET", "/big.css", &[("accept-encoding", "gzip")]).await;
    assert_eq!(gunzip(&r.body), newer.as_bytes());

    // Below the minimum, not compressible, or not accepted: identity.
    let small = send(&s.sf, "GET", "/small.css", &[("accept-encoding", "gzip")]).await;
    assert_eq!(small.header("content-encoding"), "");
    assert_eq!(&small.body[..], b"body{margin:0}");
    assert_eq!(small.header("vary"), "accept-encoding");
    let png = send(&s.sf, "GET", "/logo.png", &[("accept-encoding", "gzip")]).await;
    assert_eq!(png.header("content-encoding"), "");
    assert_eq!(png.header("vary"), "");
    let plain = send(&s.sf, "GET", "/big.css", &[("accept-encoding", "identity")]).await;
    assert_eq!(plain.header("content-encoding"), "");

    // The minimum is configurable.
    let s2 = site_with(StaticOptions {
        gzip_min: 10,
        gzip_level: 9,
        ..StaticOptions::default()
    });
    let r = send(&s2.sf, "GET", "/small.css", &[("accept-encoding", "gzip")]).await;
    assert_eq!(r.header("content-encoding"), "gzip");
    assert_eq!(gunzip(&r.body), b"body{margin:0}");
}

#[tokio::test]
async fn cache_headers_per_path_kind() {
    let s = site();
    let cases = [
        (
            "/_astro/app.abc123.js",
            "public, max-age=31536000, immutable",
        ),
        (
            "/_astro/style.def456.css",
            "public, max-age=31536000, immutable",
        ),
        ("/_astro/font.woff2", "public, max-age=31536000, immutable"),
        ("/", "no-cache"),
        ("/fr/about", "no-cache"),
        ("/some/spa/route", "no-cache"),
        ("/config.js", "no-cache"),
        ("/service-worker.js", "no-cache"),
        ("/manifest.webmanifest", "no-cache"),
        ("/manifest.json", "no-cache"),
        ("/logo.png", "public, max-age=3600"),
        ("/robots.txt", "public, max-age=3600"),
        ("/small.css", "public, max-age=3600"),
    ];
    for (uri, cc) in cases {
        let r = get(&s.sf, uri).await;
        assert_eq!(r.status, StatusCode::OK, "{uri}");
        assert_eq!(r.header("cache-control"), cc, "{uri}");
    }
    let types = [
        ("/_astro/font.woff2", "font/woff2"),
        ("/logo.png", "image/png"),
        ("/manifest.webmanifest", "application/manifest+json"),
        ("/manifest.json", "application/json"),
        ("/robots.txt", "text/plain; charset=utf-8"),
        ("/small.css", "text/css; charset=utf-8"),
        ("/data.bin", "application/octet-stream"),
    ];
    for (uri, ct) in types {
        assert_eq!(get(&s.sf, uri).await.header("content-type"), ct, "{uri}");
    }
}

#[tokio::test]
async fn head_sends_headers_only() {
    let s = site();
    for uri in ["/", "/data.bin", "/logo.png", "/config.js", "/spa/route"] {
        let g = get(&s.sf, uri).await;
        let h = send(&s.sf, "HEAD", uri, &[]).await;
        assert_eq!(h.status, StatusCode::OK, "{uri}");
        assert!(h.body.is_empty(), "{uri}");
        assert_eq!(
            h.header("content-length"),
            g.body.len().to_string(),
            "{uri}"
        );
        assert_eq!(h.header("etag"), g.header("etag"), "{uri}");
    }
}

#[tokio::test]
async fn other_methods_get_405() {
    let s = site();
    for m in ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"] {
        let r = send(&s.sf, m, "/index.html", &[]).await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{m}");
        assert_eq!(r.header("allow"), "GET, HEAD");
    }
}

#[tokio::test]
async fn large_file_is_streamed_whole() {
    let s = site();
    let r = get(&s.sf, "/data.bin").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], &data_bin()[..]);
    assert_eq!(r.header("content-length"), "200000");
    // The body of a large file is a stream, not one buffer.
    let (parts, ()) = Request::builder()
        .uri("/data.bin")
        .body(())
        .unwrap()
        .into_parts();
    let resp = s.sf.serve(&parts).await;
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.len() <= STREAM_CHUNK && first.len() < 200_000);
}

#[tokio::test]
async fn symlink_inside_the_tree_and_query_strings() {
    let s = site();
    let r = get(&s.sf, "/alias.css").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], b"body{margin:0}");
    assert_eq!(r.header("content-type"), "text/css; charset=utf-8");
    let r = get(&s.sf, "/robots.txt?x=../../secret.txt").await;
    assert_eq!(r.text(), "User-agent: *\n");
    let r = get(&s.sf, "/?..%2f..%2fsecret").await;
    assert_eq!(r.text(), INDEX);
    // A root that is itself a symlink, swapped to a new release while serving.
    let link = s.tmp.path().join("current");
    symlink(&s.root, &link).unwrap();
    let sf = StaticFiles::new(link.clone(), StaticOptions::default());
    assert_eq!(get(&sf, "/").await.text(), INDEX);
    let v2 = s.tmp.path().join("v2");
    write(&v2, "index.html", b"V2");
    std::fs::remove_file(&link).unwrap();
    symlink(&v2, &link).unwrap();
    // The answer kept in memory serves until it is no longer fresh, then the disk.
    assert_eq!(get(&sf, "/").await.text(), INDEX);
    tokio::time::sleep(super::cache::FRESH).await;
    assert_eq!(get(&sf, "/").await.text(), "V2");
}

#[tokio::test]
async fn fifo_does_not_hang() {
    let s = site();
    let ok = std::process::Command::new("mkfifo")
        .arg(s.root.join("pipe.txt"))
        .status();
    if !ok.is_ok_and(|st| st.success()) {
        return; // no mkfifo here
    }
    let r = tokio::time::timeout(Duration::from_secs(5), get(&s.sf, "/pipe.txt"))
        .await
        .expect("no hang");
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn path_traversal_attempts_all_fail() {
    let s = site();
    let abs = s.tmp.path().display().to_string();
    let abs_enc = abs.replace('/', "%2f");
    let long = format!("/{}", "a/".repeat(3000));
    let attempts: Vec<String> = vec![
        "/../secret.txt".into(),
        "/../../../../../../etc/passwd".into(),
        "/%2e%2e/secret.txt".into(),
        "/%2E%2E/secret.txt".into(),
        "/.%2e/secret.txt".into(),
        "/%2e./secret.txt".into(),
        "/..%2fsecret.txt".into(),
        "/%2e%2e%2fsecret.txt".into(),
        "/..%2Fsecret.txt".into(),
        "/..%5csecret.txt".into(),
        "/..%5Csecret.txt".into(),
        "/..\\secret.txt".into(),
        "/%252e%252e/secret.txt".into(),
        "/%252e%252e%252fsecret.txt".into(),
        "/%25%32%65%25%32%65/secret.txt".into(),
        "/secret.txt%00.html".into(),
        "/index.html%00".into(),
        "/%00/../secret.txt".into(),
        "/leak.txt".into(),
        "/leak".into(),
        "/updir/secret.txt".into(),
        "/updir/secret".into(),
        "/leakdir/secret.txt".into(),
        "/sib.txt".into(),
        "/leakdir/secret".into(),
        "/updir/distx/secret.txt".into(),
        "/leakdir/dist/../secret.txt".into(),
        format!("/{abs}/secret.txt"),
        format!("//{abs}/secret.txt"),
        format!("/%2f{abs_enc}%2fsecret.txt"),
        "/%c0%ae%c0%ae/secret.txt".into(),
        "/%ef%bc%8e%ef%bc%8e/secret.txt".into(),
        "/fr/about/../../../secret.txt".into(),
        "/fr/%2e%2e/%2e%2e/%2e%2e/secret.txt".into(),
        "/./../secret.txt".into(),
        "/_astro/../../secret.txt".into(),
        "/....//secret.txt".into(),
        "/..;/secret.txt".into(),
        "/%2e%2e%5c%2e%2e%5csecret.txt".into(),
        "/secret.txt%".into(),
        "/%zz/secret.txt".into(),
        long,
    ];
    assert!(attempts.len() >= 15);
    let mut reached = 0;
    for uri in &attempts {
        for method in ["GET", "HEAD"] {
            let headers = [("accept-encoding", "br, gzip"), ("range", "bytes=0-")];
            for hs in [&headers[..0], &headers[..]] {
                let Some(r) = try_send(&s.sf, method, uri, hs).await else {
                    // The `http` crate refused the URI itself: it never reaches us.
                    continue;
                };
                reached += 1;
                assert!(
                    matches!(
                        r.status,
                        StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND | StatusCode::URI_TOO_LONG
                    ),
                    "{method} {uri}: status {}",
                    r.status
                );
                assert!(
                    !r.text().contains("SECRET"),
                    "{method} {uri} leaked the secret"
                );
                assert!(!r.text().contains("INDEX"), "{method} {uri} got HTML");
            }
        }
    }
    assert!(
        reached >= 4 * 30,
        "only {reached} requests reached the server"
    );
    // An absolute path with no extension is an unknown route: the SPA page, never
    // the file it names.
    let r = get(&s.sf, &format!("/{abs}/secret")).await;
    assert_eq!(r.text(), INDEX);
}

#[test]
fn parse_path_rules() {
    assert_eq!(parse_path("/"), Ok((vec![], false)));
    assert_eq!(
        parse_path("/a/b/"),
        Ok((vec!["a".into(), "b".into()], true))
    );
    assert_eq!(parse_path("/a%20b"), Ok((vec!["a b".into()], false)));
    assert_eq!(parse_path("/%252e"), Ok((vec!["%2e".into()], false)));
    assert_eq!(
        parse_path("/.well-known/x"),
        Ok((vec![".well-known".into(), "x".into()], false))
    );
    assert_eq!(parse_path("/.git/config"), Err(StatusCode::NOT_FOUND));
    for bad in [
        "", "*", "/..", "/a/./b", "/%2e", "/a%2fb", "/a%5cb", "/a\\b", "/a%00", "/%ff", "/%",
        "/%4", "/%0a",
    ] {
        assert_eq!(parse_path(bad), Err(StatusCode::BAD_REQUEST), "{bad:?}");
    }
}

#[test]
fn range_parsing() {
    assert_eq!(parse_range("bytes=0-0", 10), RangeSpec::Satisfiable(0, 0));
    assert_eq!(parse_range("bytes=-20", 10), RangeSpec::Satisfiable(0, 9));
    assert_eq!(parse_range("bytes=9-", 10), RangeSpec::Satisfiable(9, 9));
    assert_eq!(
        parse_range("BYTES = 2 - 3", 10),
        RangeSpec::Satisfiable(2, 3)
    );
    assert_eq!(parse_range("bytes=10-", 10), RangeSpec::Unsatisfiable);
    assert_eq!(parse_range("bytes=0-", 0), RangeSpec::Unsatisfiable);
    assert_eq!(parse_range("bytes=-0", 10), RangeSpec::Unsatisfiable);
    assert_eq!(parse_range("bytes=+1-2", 10), RangeSpec::Ignore);
    assert_eq!(parse_range("bytes=-", 10), RangeSpec::Ignore);
    assert_eq!(parse_range("bytes=1-2,4-5", 10), RangeSpec::Ignore);
    assert_eq!(
        parse_range("bytes=99999999999999999999-", 10),
        RangeSpec::Ignore
    );
}

#[test]
fn accept_encoding_parsing() {
    assert_eq!(accepted_encodings("gzip, deflate, br, zstd"), (true, true));
    assert_eq!(accepted_encodings("gzip;q=1.0, br;q=0"), (false, true));
    assert_eq!(accepted_encodings("*;q=0.1, gzip;q=0"), (true, false));
    assert_eq!(accepted_encodings("identity"), (false, false));
    assert_eq!(accepted_encodings("BR"), (true, false));
}

#[test]
fn etag_lists() {
    assert!(etag_list_matches("\"a\"", "\"a\""));
    assert!(etag_list_matches("W/\"a\"", "\"a\""));
    assert!(etag_list_matches("\"b\", W/\"a\"", "W/\"a\""));
    assert!(etag_list_matches("*", "\"a\""));
    assert!(!etag_list_matches("\"b\", \"c\"", "\"a\""));
    assert!(!etag_list_matches("a", "\"a\""));
    assert!(!etag_list_matches("\"a", "\"a\""));
}

#[test]
fn gzip_cache_is_bounded() {
    let mut c = GzCache::default();
    let t = UNIX_EPOCH;
    let chunk = Bytes::from(vec![0u8; GZ_CACHE_MAX_ENTRY]);
    for i in 0..10 {
        c.insert(PathBuf::from(format!("/f{i}")), t, 1, chunk.clone());
        assert!(c.total <= GZ_CACHE_BUDGET);
    }
    assert!(c.get(Path::new("/f9"), t, 1).is_some());
    assert!(c.get(Path::new("/f0"), t, 1).is_none());
    assert!(c.get(Path::new("/f9"), t, 2).is_none());
    c.insert(
        "/huge".into(),
        t,
        1,
        Bytes::from(vec![0u8; GZ_CACHE_MAX_ENTRY + 1]),
    );
    assert!(c.get(Path::new("/huge"), t, 1).is_none());
}

#[tokio::test]
async fn odd_mtimes_do_not_panic() {
    let s = site();
    for (name, t) in [
        ("old.txt", UNIX_EPOCH - Duration::from_secs(86_400)),
        (
            "future.txt",
            UNIX_EPOCH + Duration::from_secs(300_000_000_000),
        ),
    ] {
        write(&s.root, name, b"odd");
        let f = std::fs::File::options()
            .write(true)
            .open(s.root.join(name))
            .unwrap();
        let stored = f.set_modified(t).and_then(|()| f.metadata()?.modified());
        if stored.ok() != Some(t) {
            continue; // the filesystem cannot store it
        }
        let uri = format!("/{name}");
        let r = get(&s.sf, &uri).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(&r.body[..], b"odd");
        assert_eq!(r.header("last-modified"), "");
        let ims = httpdate::fmt_http_date(SystemTime::now());
        let r = send(&s.sf, "GET", &uri, &[("if-modified-since", &ims)]).await;
        assert_eq!(r.status, StatusCode::OK);
    }
}

/// An answer kept in memory is the answer the disk gives: for each path and request
/// variant, a warm server (second request, from memory) and a cold one (a new server,
/// from disk) agree on status, headers and body.
#[tokio::test]
async fn answers_from_memory_are_the_disk_answers() {
    let s = site();
    let paths = [
        "/",
        "/robots.txt",
        "/big.css",
        "/small.css",
        "/alias.css",
        "/fr/about/",
        "/docs",
        "/some/route",
        "/_astro/app.abc123.js",
        "/_astro/style.def456.css",
        "/manifest.json",
    ];
    for path in paths {
        let first = get(&s.sf, path).await;
        let etag = first.header("etag").to_owned();
        let modified = first.header("last-modified").to_owned();
        let variants: Vec<(&str, Vec<(&str, &str)>)> = vec![
            ("GET", vec![]),
            ("HEAD", vec![]),
            ("GET", vec![("accept-encoding", "gzip")]),
            ("GET", vec![("accept-encoding", "br, gzip")]),
            ("HEAD", vec![("accept-encoding", "gzip")]),
            ("GET", vec![("if-none-match", etag.as_str())]),
            ("GET", vec![("if-none-match", "\"other\"")]),
            ("GET", vec![("if-modified-since", modified.as_str())]),
            (
                "GET",
                vec![("if-modified-since", "Mon, 01 Jan 2001 00:00:00 GMT")],
            ),
        ];
        for (method, headers) in &variants {
            let warm_up = send(&s.sf, method, path, headers).await;
            let warm = send(&s.sf, method, path, headers).await;
            let cold_sf = StaticFiles::new(s.root.clone(), StaticOptions::default());
            let cold = send(&cold_sf, method, path, headers).await;
            let what = format!("{method} {path} {headers:?}");
            assert_eq!(warm.status, cold.status, "{what}");
            assert_eq!(warm.headers, cold.headers, "{what}");
            assert_eq!(warm.body, cold.body, "{what}");
            assert_eq!(warm_up.body, warm.body, "{what}");
        }
    }
}

/// Within `FRESH` a kept answer does not touch the disk (the file can be gone);
/// after it, the disk decides again. A `Range` request always reads the disk.
#[tokio::test]
async fn kept_answers_live_one_freshness_period() {
    let s = site();
    assert_eq!(get(&s.sf, "/robots.txt").await.text(), "User-agent: *\n");
    std::fs::remove_file(s.root.join("robots.txt")).unwrap();
    let t = Instant::now();
    let kept = get(&s.sf, "/robots.txt").await;
    if t.elapsed() < super::cache::FRESH {
        assert_eq!(kept.status, StatusCode::OK);
        assert_eq!(kept.text(), "User-agent: *\n");
    }
    let ranged = send(&s.sf, "GET", "/robots.txt", &[("range", "bytes=0-3")]).await;
    assert_eq!(
        ranged.status,
        StatusCode::NOT_FOUND,
        "a Range reads the disk"
    );
    tokio::time::sleep(super::cache::FRESH).await;
    assert_eq!(
        get(&s.sf, "/robots.txt").await.status,
        StatusCode::NOT_FOUND
    );
}

/// However many distinct paths are asked for, the memory kept stays bounded.
#[tokio::test]
async fn kept_answers_are_bounded() {
    let s = site();
    for i in 0..1200 {
        let r = get(&s.sf, &format!("/route/{i}")).await;
        assert_eq!(r.text(), INDEX);
    }
    let (entries, bytes) = s.sf.inner.cache.locked().len_bytes();
    assert!(entries <= 512, "{entries} entries");
    assert!(bytes <= 2 * 1024 * 1024, "{bytes} bytes");
    assert!(entries > 0);
}
