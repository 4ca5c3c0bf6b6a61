//! The office onboarding page on the plain-HTTP listener, in `internal` TLS mode
//! only: `/ca` (and `/ca/`) is a plain HTML page (no script, nothing external,
//! works offline) with the local root CA's name, expiry and SHA-256 fingerprint,
//! the downloads and short install steps per system; `/ca/koprogo-root.crt` (DER)
//! and `/ca/koprogo-root.pem`, and while `koprogo ca rotate --prepare` has made
//! one, the next root as `/ca/koprogo-next-root.crt|.pem`. What it shows comes
//! from [`crate::tls::Tls::hand_out`] (the live CA, so it follows `ca rotate`) and the
//! configuration, never from the request (no Host, no query). A download
//! (GET) is recorded with [`crate::tls::Tls::handed_out`]. GET and HEAD only; every other path
//! keeps its redirect to HTTPS.

use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use super::{text, whole, Body, Proxy};
use crate::config::TlsMode;
use crate::tls::RootCert;

/// The page's path.
pub const PAGE: &str = "/ca";
const TEMPLATE: &str = include_str!("onboarding.html");
/// What the page may load: its own inline style, nothing else.
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

/// One thing served under [`PAGE`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum What {
    Page,
    /// A root as a file: the next one (else the current), DER (else PEM).
    File {
        next: bool,
        der: bool,
    },
}

fn what(path: &str) -> Option<What> {
    Some(match path {
        "/ca" | "/ca/" => What::Page,
        "/ca/koprogo-root.crt" => What::File {
            next: false,
            der: true,
        },
        "/ca/koprogo-root.pem" => What::File {
            next: false,
            der: false,
        },
        "/ca/koprogo-next-root.crt" => What::File {
            next: true,
            der: true,
        },
        "/ca/koprogo-next-root.pem" => What::File {
            next: true,
            der: false,
        },
        _ => return None,
    })
}

impl Proxy {
    /// The answer to a plain-HTTP request for the onboarding page or its files;
    /// None when `req` is not for them or the TLS mode is not `internal`.
    pub(super) async fn onboarding(&self, req: &Request<Incoming>) -> Option<Response<Body>> {
        if self.cfg.tls.mode != TlsMode::Internal {
            return None;
        }
        let what = what(req.uri().path())?;
        let mut resp = if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                "405 only GET and HEAD here\n".into(),
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        } else {
            self.onboarding_answer(what, req.method() == Method::GET)
                .await
        };
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        Some(resp)
    }

    async fn onboarding_answer(&self, what: What, get: bool) -> Response<Body> {
        let Some(roots) = self.tls.hand_out() else {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                "503 the local root CA is not available; the administrator should run \
                 `koprogo status`\n"
                    .into(),
            );
        };
        let (next, der) = match what {
            What::Page => {
                return text(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    self.onboarding_page(&roots.current, roots.next.as_ref()),
                )
            }
            What::File { next, der } => (next, der),
        };
        let root = if next {
            roots.next
        } else {
            Some(roots.current)
        };
        let Some(root) = root else {
            return text(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "404 no next root is prepared (koprogo ca rotate --prepare)\n".into(),
            );
        };
        if get {
            // Handed out: the root is never replaced without `koprogo ca rotate`.
            // Not recorded, not handed out.
            let (tls, serial) = (self.tls.clone(), root.serial.clone());
            let recorded = match tokio::task::spawn_blocking(move || tls.handed_out(&serial)).await
            {
                Ok(r) => r,
                Err(e) => Err(anyhow::anyhow!("the recording task failed: {e}")),
            };
            if let Err(e) = recorded {
                tracing::error!(
                    serial = %root.serial,
                    "onboarding page: cannot record the download of the local root CA \
                     as exported, so it is not handed out: {e:#}"
                );
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain; charset=utf-8",
                    "500 the server could not record this download; the administrator \
                     should look at `koprogo logs`\n"
                        .into(),
                );
            }
        }
        file(&root, next, der)
    }

    /// The page for `current` (and `next`): every value from the CA or the config.
    fn onboarding_page(&self, current: &RootCert, next: Option<&RootCert>) -> String {
        let port = if self.https_port == 443 {
            String::new()
        } else {
            format!(":{}", self.https_port)
        };
        let site = format!("https://{}{port}/", self.cfg.domain);
        let next = next.map(next_section).unwrap_or_default();
        render(TEMPLATE, |key| match key {
            "SITE" => Some(escape(&site)),
            "SUBJECT" => Some(escape(&current.subject)),
            "EXPIRES" => Some(escape(&expires(current))),
            "FINGERPRINT" => Some(escape(&current.fingerprint)),
            "NEXT" => Some(next.clone()),
            _ => None,
        })
    }
}

/// A root as a download (attachment, so a browser saves it or offers to install it).
fn file(root: &RootCert, next: bool, der: bool) -> Response<Body> {
    let stem = if next {
        "koprogo-next-root"
    } else {
        "koprogo-root"
    };
    let (mut r, name) = if der {
        let body = Bytes::copy_from_slice(&root.der);
        let r = whole(StatusCode::OK, "application/x-x509-ca-cert", body);
        (r, format!("{stem}.crt"))
    } else {
        let body = Bytes::copy_from_slice(root.pem.as_bytes());
        (
            whole(StatusCode::OK, "application/x-pem-file", body),
            format!("{stem}.pem"),
        )
    };
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    r
}

fn expires(root: &RootCert) -> String {
    root.not_after.format("%Y-%m-%d (UTC)").to_string()
}

/// The prepared next root, clearly set apart from the current one.
fn next_section(next: &RootCert) -> String {
    format!(
        r#"
<section id="next" class="next">
<h2>Prepared replacement root: install it too</h2>
<p>Your administrator prepared the root that will replace the one above (with
<code>koprogo ca rotate</code>). Install it now, the same way, next to the current one
(on iPhone and iPad, turn on its full trust too): after the switch this device keeps working
without a warning. Remove the old root after the switch.</p>
<dl>
  <dt>Name</dt><dd id="next-subject">{}</dd>
  <dt>Valid until</dt><dd id="next-expires">{}</dd>
  <dt>SHA-256 fingerprint</dt><dd><code class="fp" id="next-fingerprint">{}</code></dd>
</dl>
<p class="get"><a id="next-crt" href="/ca/koprogo-next-root.crt" download>Download koprogo-next-root.crt</a>
<a id="next-pem" href="/ca/koprogo-next-root.pem" download>koprogo-next-root.pem (Linux)</a></p>
</section>
"#,
        escape(&next.subject),
        escape(&expires(next)),
        escape(&next.fingerprint),
    )
}

/// `template` with each `{{KEY}}` replaced by `value(KEY)`, in one pass (a value
/// is never read as a template); an unknown key is left as it is.
fn render(template: &str, value: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(template.len() + 1024);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after
            .find("}}")
            .and_then(|end| Some((end, value(&after[..end])?)))
        {
            Some((end, v)) => {
                out.push_str(&v);
                rest = &after[end + 2..];
            }
            None => {
                out.push_str("{{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Text for HTML (element content and quoted attribute values).
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(what("/ca"), Some(What::Page));
        assert_eq!(what("/ca/"), Some(What::Page));
        assert_eq!(
            what("/ca/koprogo-next-root.pem"),
            Some(What::File {
                next: true,
                der: false
            })
        );
        for p in [
            "/",
            "/ca/x",
            "/cafe",
            "/CA",
            "/ca/koprogo-root.crt/",
            "/ca//",
        ] {
            assert_eq!(what(p), None, "{p}");
        }
    }

    #[test]
    fn render_is_one_pass_and_escapes() {
        let v = |k: &str| match k {
            "A" => Some(escape("<b x=\"{{B}}\">&'")),
            "B" => Some("no".to_string()),
            _ => None,
        };
        assert_eq!(
            render("x{{A}}y{{C}}z{{B}}{{", v),
            "x&lt;b x=&quot;{{B}}&quot;&gt;&amp;&#39;y{{C}}zno{{"
        );
    }

    #[test]
    fn the_template_has_every_value_and_nothing_external() {
        for key in ["SITE", "SUBJECT", "EXPIRES", "FINGERPRINT", "NEXT"] {
            assert!(TEMPLATE.contains(&format!("{{{{{key}}}}}")), "{key}");
        }
        let lower = TEMPLATE.to_ascii_lowercase();
        for banned in [
            "<script", "<img", "<link", "<iframe", "<form", "src=", "@import", "url(",
        ] {
            assert!(!lower.contains(banned), "{banned}");
        }
        // Every link is ours: the downloads, or the configured site.
        for (i, _) in lower.match_indices("href=\"") {
            let target = &TEMPLATE[i + 6..];
            assert!(
                target.starts_with("/ca/") || target.starts_with("{{SITE}}"),
                "{}",
                &target[..target.len().min(40)]
            );
        }
    }
}
