//! The PostgreSQL URL of `postgres.url` (`[postgres] mode = "external"`): parsing
//! `postgresql://user[:password]@host[:port]/db[?key=value&…]`, its query
//! parameters and `sslmode`, and keeping the password out of every message (the
//! URL as written may not even parse). What the URL becomes at run time (the API's
//! `DATABASE_URL`, libpq's environment, a tokio-postgres configuration) is in
//! `postgres::external`.

use std::fmt;

/// Query parameters the URL may carry (the libpq names the API understands too).
const ALLOWED_PARAMS: &[&str] = &[
    "sslmode",
    "sslrootcert",
    "connect_timeout",
    "application_name",
    "options",
];

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// A parsed `postgres.url`. `Debug` and [`ExternalUrl::redacted`] never show the
/// password.
#[derive(Clone, PartialEq, Eq)]
pub struct ExternalUrl {
    pub user: String,
    pub password: Option<String>,
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub sslmode: SslMode,
    /// Query parameters, decoded, in order (sslmode included).
    pub params: Vec<(String, String)>,
}

impl fmt::Debug for ExternalUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl ExternalUrl {
    /// Parses `postgresql://user[:password]@host[:port]/dbname[?key=value&…]`;
    /// the error says what is wrong and how to write it (without the password).
    pub fn parse(raw: &str) -> Result<ExternalUrl, String> {
        let example = "write it as postgresql://USER@HOST:PORT/DATABASE?sslmode=verify-full";
        let rest = raw
            .strip_prefix("postgresql://")
            .or_else(|| raw.strip_prefix("postgres://"))
            .ok_or_else(|| format!("not a postgresql:// URL: {example}"))?;
        let (authority, tail) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(i) => (&authority[..i], &authority[i + 1..]),
            None => ("", authority),
        };
        let (user, password) = match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (userinfo, None),
        };
        let user = decode(user).ok_or("the user name has a bad %-escape")?;
        if user.is_empty() {
            return Err(format!("no user name: {example}"));
        }
        let password = match password {
            Some(p) => Some(decode(p).ok_or("the password has a bad %-escape")?),
            None => None,
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or("an IPv6 host needs its closing ']'")?;
            (h.to_string(), after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(format!(
                "no host: {example} (a server on this machine is 127.0.0.1 or localhost)"
            ));
        }
        if host.contains(',') {
            return Err("several hosts are not supported: name one (a load balancer or the primary's address)".into());
        }
        let port = match port {
            None => 5432,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("port {p:?} is not a port number (1-65535)"))?,
        };
        let (path, query) = match tail.split_once('?') {
            Some((p, q)) => (p, q),
            None => (tail, ""),
        };
        let dbname =
            decode(path.trim_start_matches('/')).ok_or("the database name has a bad %-escape")?;
        if dbname.is_empty() {
            return Err(format!("no database name: {example}"));
        }
        let mut params = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (k, v) = (
                decode(k).ok_or("a query parameter has a bad %-escape")?,
                decode(v).ok_or("a query parameter has a bad %-escape")?,
            );
            if !ALLOWED_PARAMS.contains(&k.as_str()) {
                return Err(format!(
                    "unknown query parameter {k:?}: use only {}",
                    ALLOWED_PARAMS.join(", ")
                ));
            }
            if params.iter().any(|(p, _)| *p == k) {
                return Err(format!("query parameter {k:?} is given twice"));
            }
            params.push((k, v));
        }
        let mut url = ExternalUrl {
            user,
            password,
            host,
            port,
            dbname,
            sslmode: SslMode::Prefer,
            params,
        };
        if let Some(m) = url.param("sslmode") {
            url.sslmode = SslMode::parse(m).ok_or_else(|| {
                format!(
                    "sslmode={m:?}: use disable, allow, prefer, require, verify-ca or verify-full"
                )
            })?;
        }
        if let Some(t) = url.param("connect_timeout") {
            if t.parse::<u64>().is_err() {
                return Err(format!("connect_timeout={t:?}: a number of seconds"));
            }
        }
        Ok(url)
    }

    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn host_for_url(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }

    pub fn build(&self, password: Option<&str>, extra: &[(&str, String)]) -> String {
        let mut s = format!("postgresql://{}", encode(&self.user));
        if let Some(p) = password {
            s.push(':');
            s.push_str(p);
        }
        s.push_str(&format!(
            "@{}:{}/{}",
            self.host_for_url(),
            self.port,
            encode(&self.dbname)
        ));
        let pairs: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .chain(extra.iter().map(|(k, v)| (*k, v.clone())))
            .map(|(k, v)| format!("{}={}", encode(k), encode(&v)))
            .collect();
        if !pairs.is_empty() {
            s.push('?');
            s.push_str(&pairs.join("&"));
        }
        s
    }

    /// The URL for messages and `status`: the password (if the URL has one) as `***`.
    pub fn redacted(&self) -> String {
        self.build(self.password.as_ref().map(|_| "***"), &[])
    }
}

/// A URL as written, for an error message: whatever sits between `user:` and `@`
/// is replaced by `***` (the string may not even parse).
pub fn redact_raw(raw: &str) -> String {
    let Some(start) = raw.find("://").map(|i| i + 3) else {
        return raw.to_string();
    };
    let end = raw[start..]
        .find(['/', '?'])
        .map_or(raw.len(), |i| start + i);
    let authority = &raw[start..end];
    let Some(at) = authority.rfind('@') else {
        return raw.to_string();
    };
    match authority[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &raw[..start],
            &authority[..colon],
            &raw[start + at..]
        ),
        None => raw.to_string(),
    }
}

fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A path for a URL's query value: each segment percent-encoded, the `/` kept.
pub fn encode_path(path: &str) -> String {
    path.split('/').map(encode).collect::<Vec<_>>().join("/")
}

pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_url() {
        let u = ExternalUrl::parse(
            "postgresql://app%40x:s3cr%2Ft@db.example.be:6432/koprogo?sslmode=verify-full&application_name=kp",
        )
        .expect("valid");
        assert_eq!(u.user, "app@x");
        assert_eq!(u.password.as_deref(), Some("s3cr/t"));
        assert_eq!((u.host.as_str(), u.port), ("db.example.be", 6432));
        assert_eq!(u.dbname, "koprogo");
        assert_eq!(u.sslmode, SslMode::VerifyFull);
        let shown = u.redacted();
        assert!(!shown.contains("s3cr"), "{shown}");
        assert!(
            shown.contains("app%40x:***@db.example.be:6432/koprogo"),
            "{shown}"
        );
        assert!(!format!("{u:?}").contains("s3cr"));
    }

    #[test]
    fn defaults_and_ipv6() {
        let u = ExternalUrl::parse("postgres://k@[::1]/db").expect("valid");
        assert_eq!((u.host.as_str(), u.port), ("::1", 5432));
        assert_eq!(u.sslmode, SslMode::Prefer);
        assert_eq!(u.redacted(), "postgresql://k@[::1]:5432/db");
    }

    #[test]
    fn refuses_bad_urls() {
        for (url, why) in [
            ("mysql://a@b/c", "postgresql://"),
            ("postgresql://@b/c", "no user"),
            ("postgresql://a@/c", "no host"),
            ("postgresql://a@b:99999/c", "port"),
            ("postgresql://a@b", "no database"),
            ("postgresql://a@b/c?sslmode=on", "sslmode"),
            ("postgresql://a@b/c?foo=1", "unknown query parameter"),
            ("postgresql://a@h1,h2/c", "several hosts"),
            ("postgresql://a:%+1@h/c", "bad %-escape"),
        ] {
            let e = ExternalUrl::parse(url).expect_err(url);
            assert!(e.contains(why), "{url}: {e}");
        }
    }

    #[test]
    fn redacts_unparsable_text() {
        assert_eq!(
            redact_raw("postgresql://u:pw@h:x/d"),
            "postgresql://u:***@h:x/d"
        );
        assert_eq!(redact_raw("postgresql://u@h/d"), "postgresql://u@h/d");
        assert_eq!(redact_raw("nonsense"), "nonsense");
    }
}
