//! The PostgreSQL URL of `postgres.url` (`[postgres] mode = "external"`): parsing
//! `postgresql://user[:password]@host[:port]/db[?key=value&…]`, its query
//! parameters and `sslmode`, and keeping the password out of every message (the
//! URL as written may not even parse). What the URL becomes at run time (the API's
//! `DATABASE_URL`, libpq's environment, a tokio-postgres configuration) is in
//! `postgres::external`.

use std::fmt;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio_postgres::config::Host;

/// What a URL component keeps as is: RFC 3986's unreserved characters.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A host name or address (an IPv6 one's colons kept, inside its brackets).
const HOST: &AsciiSet = &COMPONENT.remove(b':');

/// Query parameters the URL may carry (the libpq names the API understands too).
const ALLOWED_PARAMS: &[&str] = &[
    "sslmode",
    "sslrootcert",
    "connect_timeout",
    "application_name",
    "options",
    "host",
    "port",
    "user",
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
    /// Parses `postgresql://user[:password]@host[:port]/dbname[?key=value&…]` with
    /// tokio-postgres' parser (what our own connections use), so the forms libpq
    /// accepts work: an IPv6 host in brackets, a Unix-socket directory as a
    /// %-encoded host or as `?host=/dir`. The error says what is wrong and how to
    /// write it (without the password).
    pub fn parse(raw: &str) -> Result<ExternalUrl, String> {
        let example = "write it as postgresql://USER@HOST:PORT/DATABASE?sslmode=verify-full";
        let rest = raw
            .strip_prefix("postgresql://")
            .or_else(|| raw.strip_prefix("postgres://"))
            .ok_or_else(|| format!("not a postgresql:// URL: {example}"))?;
        let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
        // tokio-postgres decodes a bad %-escape as written: refuse it here.
        let (authority, path) =
            before_query.split_at(before_query.find('/').unwrap_or(before_query.len()));
        let userinfo = authority.find('@').map_or("", |i| &authority[..i]);
        let (user, password) = match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (userinfo, None),
        };
        decode(user).ok_or("the user name has a bad %-escape")?;
        if let Some(p) = password {
            decode(p).ok_or("the password has a bad %-escape")?;
        }
        decode(path.trim_start_matches('/')).ok_or("the database name has a bad %-escape")?;
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
        // tokio-postgres knows neither sslrootcert nor verify-*: it gets the URL
        // without our parameters, with the host, port and user ones.
        let mut text = format!("postgresql://{before_query}");
        let forwarded: Vec<String> = params
            .iter()
            .filter(|(k, _)| ["host", "port", "user"].contains(&k.as_str()))
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect();
        if !forwarded.is_empty() {
            text.push('?');
            text.push_str(&forwarded.join("&"));
        }
        let c: tokio_postgres::Config = text.parse().map_err(|e: tokio_postgres::Error| {
            // The reason is the source ("invalid value for option `port`").
            let e = std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
            if e.contains("`port`") {
                "the port is not a port number (1-65535)".to_string()
            } else if e.contains("`host`") {
                format!(
                    "the host is not valid (an IPv6 address goes in brackets, [::1]): {example}"
                )
            } else {
                format!("{e}: {example}")
            }
        })?;
        let user = c.get_user().unwrap_or("").to_string();
        if user.is_empty() {
            return Err(format!("no user name: {example}"));
        }
        let password = match c.get_password() {
            Some(p) => {
                Some(String::from_utf8(p.to_vec()).map_err(|_| "the password is not UTF-8")?)
            }
            None => None,
        };
        // `?host=` overrides the authority's host, as in libpq (the API's URL has both).
        let hosts = c.get_hosts();
        let in_authority = hosts.len() - usize::from(params.iter().any(|(k, _)| k == "host"));
        if in_authority > 1 {
            return Err("several hosts are not supported: name one (a load balancer or the primary's address)".into());
        }
        let host = match hosts.last() {
            None => {
                return Err(format!(
                    "no host: {example} (a server on this machine is 127.0.0.1 or localhost)"
                ))
            }
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(dir)) => dir
                .to_str()
                .ok_or("the socket directory is not UTF-8")?
                .to_string(),
        };
        if host.is_empty() {
            return Err(format!(
                "no host: {example} (a server on this machine is 127.0.0.1 or localhost)"
            ));
        }
        // `?port=` after the authority's port (or its default) wins, as in libpq.
        let port = match c.get_ports().last() {
            None => 5432,
            Some(0) => return Err("port 0 is not a port number (1-65535)".into()),
            Some(p) => *p,
        };
        let dbname = c.get_dbname().unwrap_or("").to_string();
        if dbname.is_empty() {
            return Err(format!("no database name: {example}"));
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
        // libpq ignores sslmode on a Unix socket: no TLS there.
        if url.is_socket() {
            url.sslmode = SslMode::Disable;
        }
        if let Some(t) = url.param("connect_timeout") {
            if t.parse::<u64>().is_err() {
                return Err(format!("connect_timeout={t:?}: a number of seconds"));
            }
        }
        Ok(url)
    }

    /// The host is a Unix-socket directory (an absolute path), not a network name.
    pub fn is_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The URL for the API (sqlx) and messages, every part %-encoded: `password`
    /// goes in as given (already encoded, or `***`), `extra` parameters last. A
    /// Unix-socket directory goes in `?host=` with `localhost` in the authority
    /// (sqlx refuses an empty host; it then uses the socket, no TCP).
    pub fn build(&self, password: Option<&str>, extra: &[(&str, String)]) -> String {
        let mut s = format!("postgresql://{}", encode(&self.user));
        if let Some(p) = password {
            s.push(':');
            s.push_str(p);
        }
        let host = if self.is_socket() {
            "localhost".to_string()
        } else if self.host.contains(':') {
            format!("[{}]", utf8_percent_encode(&self.host, HOST))
        } else {
            utf8_percent_encode(&self.host, HOST).to_string()
        };
        s.push_str(&format!("@{host}:{}/{}", self.port, encode(&self.dbname)));
        let socket = self.is_socket().then(|| ("host", self.host.clone()));
        let pairs: Vec<String> = socket
            .into_iter()
            .chain(
                self.params
                    .iter()
                    .filter(|(k, _)| !["host", "port", "user"].contains(&k.as_str()))
                    .map(|(k, v)| (k.as_str(), v.clone())),
            )
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

/// `s` %-decoded; `None` for a `%` not followed by two hex digits (which
/// percent-encoding would keep as written) or text that is not UTF-8.
fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let escapes_ok = b.iter().enumerate().all(|(i, c)| {
        *c != b'%'
            || b.get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_ok {
        return None;
    }
    percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|t| t.into_owned())
}

/// A path for a URL's query value: each segment percent-encoded, the `/` kept.
pub fn encode_path(path: &str) -> String {
    path.split('/').map(encode).collect::<Vec<_>>().join("/")
}

/// `s` for a URL component: all but RFC 3986's unreserved characters %-encoded.
pub fn encode(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
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

    #[test]
    fn ipv6_forms() {
        let u = ExternalUrl::parse("postgresql://u@[::1]/db").expect("[::1]");
        assert_eq!((u.host.as_str(), u.port), ("::1", 5432));
        let u = ExternalUrl::parse("postgresql://u@[::1]:6432/db").expect("[::1]:6432");
        assert_eq!((u.host.as_str(), u.port), ("::1", 6432));
        assert_eq!(u.build(None, &[]), "postgresql://u@[::1]:6432/db");
        let u = ExternalUrl::parse("postgresql://u@[2001:db8::5]/db?sslmode=require").expect("v6");
        assert_eq!(u.host, "2001:db8::5");
        // Without brackets it is not host "::" on port 1.
        for bad in [
            "postgresql://u@::1/db",
            "postgresql://u@[::1]x/db",
            "postgresql://u@[::1/db",
        ] {
            let e = ExternalUrl::parse(bad).expect_err(bad);
            assert!(e.contains("host") || e.contains("port"), "{bad}: {e}");
        }
    }

    #[test]
    fn unix_socket_forms() {
        for raw in [
            "postgresql://u@%2Frun%2Fpostgresql/db",
            "postgresql://u@/db?host=/run/postgresql",
            "postgresql://u@/db?host=%2Frun%2Fpostgresql",
            "postgresql:///db?host=/run/postgresql&user=u",
        ] {
            let u = ExternalUrl::parse(raw).expect(raw);
            assert_eq!(
                (u.user.as_str(), u.host.as_str(), u.dbname.as_str()),
                ("u", "/run/postgresql", "db"),
                "{raw}"
            );
            assert!(u.is_socket(), "{raw}");
            // libpq ignores sslmode on a socket.
            assert_eq!(u.sslmode, SslMode::Disable, "{raw}");
        }
        let u = ExternalUrl::parse("postgresql://u@/db?host=/run/pg&port=5433").expect("port");
        assert_eq!(u.port, 5433);
        // The API (sqlx) needs a non-empty authority host: localhost, the socket in ?host=.
        assert_eq!(
            u.build(None, &[]),
            "postgresql://u@localhost:5433/db?host=%2Frun%2Fpg"
        );
        let e = ExternalUrl::parse("postgresql:///db?host=/run/pg").expect_err("no user");
        assert!(e.contains("no user"), "{e}");
    }

    #[test]
    fn special_characters_survive_a_round_trip() {
        let pw = "p@ss:w/rd%";
        for raw in [
            "postgresql://k%2Fa@db.example.be:5433/d%20b?sslmode=require",
            "postgresql://k%2Fa@%2Frun%2Fpg%20x/d%20b",
        ] {
            let u = ExternalUrl::parse(raw).expect(raw);
            let built = u.build(Some(&encode(pw)), &[]);
            assert!(built.contains("p%40ss%3Aw%2Frd%25"), "{built}");
            let back = ExternalUrl::parse(&built).expect(&built);
            assert_eq!(back.password.as_deref(), Some(pw), "{built}");
            assert_eq!(
                (
                    back.user.as_str(),
                    back.host.as_str(),
                    back.port,
                    back.dbname.as_str()
                ),
                (u.user.as_str(), u.host.as_str(), u.port, u.dbname.as_str()),
                "{built}"
            );
        }
    }
}
