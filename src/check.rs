//! Environment checks shared by `koprogo check` and `koprogo run` (which refuses to
//! start on any problem, before creating anything): PostgreSQL binaries and version,
//! an existing cluster's version, the API binary, the service user, directories,
//! free ports; a warning for a capacity history file that cannot be read, for
//! ACME without system CA certificates, or for a local root CA without Name
//! Constraints or not covering a configured name. Each problem is one line naming what is
//! wrong and what to do. With an external database: the client tools, the password and CA files, and
//! (for `check` only, see [`external_server`]) the server itself.

use std::net::{SocketAddr, TcpListener};

use crate::config::Config;
use crate::postgres::binaries::{self, Binaries};
use crate::postgres::cluster;
use crate::postgres::external::{self, ExternalUrl, SslMode};
use crate::postgres::tls;
use crate::process::privileges::{self, Identity};

#[derive(Debug, Default)]
pub struct Preflight {
    pub bins: Option<Binaries>,
    pub who: Option<Identity>,
    /// Things that would stop `run`.
    pub problems: Vec<String>,
    /// Things found fine, for `check`'s report.
    pub notes: Vec<String>,
    /// Worth saying, not stopping `run` (e.g. the application is not installed yet).
    pub warnings: Vec<String>,
}

/// Runs every check. Creates and changes nothing.
pub fn preflight(cfg: &Config) -> Preflight {
    preflight_holding(cfg, &[])
}

/// The same for a `koprogo run` that already holds listening sockets on `held`
/// (passed by systemd across a restart): those addresses are not test-bound.
pub fn preflight_holding(cfg: &Config, held: &[SocketAddr]) -> Preflight {
    let mut p = Preflight::default();
    let frontend = cfg.proxy.frontend.join("index.html");
    if frontend.is_file() {
        p.notes
            .push(format!("frontend in {}", cfg.proxy.frontend.display()));
    } else {
        p.warnings.push(format!(
            "the KoproGo frontend is not installed: {} has no index.html (proxy.frontend in {})",
            cfg.proxy.frontend.display(),
            cfg.file.display()
        ));
    }
    p.notes
        .push(format!("TLS mode {:?}", cfg.tls.mode).to_lowercase());
    if cfg.tls.mode == crate::config::TlsMode::Acme && cfg.tls.acme_ca_root.is_none() {
        if let Some(w) = system_roots_warning() {
            p.warnings
                .push(format!("{}: tls.mode = \"acme\": {w}", cfg.file.display()));
        }
    }
    match binaries::find(cfg) {
        Ok(b) => {
            p.notes.push(format!(
                "PostgreSQL {} in {} ({})",
                b.major,
                b.dir.display(),
                b.version
            ));
            if cfg.postgres.external.is_none() {
                if let Err(e) = cluster::check_version(cfg, &b) {
                    p.problems.push(e);
                }
            }
            p.bins = Some(b);
        }
        Err(e) => p.problems.push(e),
    }
    match privileges::target_identity(cfg) {
        Ok(who) => {
            p.notes
                .push(format!("services run as {} (uid {})", who.name, who.uid));
            p.who = Some(who);
        }
        Err(e) => p.problems.push(format!("{e:#}")),
    }
    if let Some(url) = &cfg.postgres.external {
        external_files(cfg, url, &mut p);
    }
    // Who runs the API server: its own user, or the supervisor's when we cannot switch.
    let api = match privileges::api_identity(cfg) {
        Ok(Some(api)) => {
            p.notes.push(format!(
                "the API server runs as {} (uid {}), apart from the supervisor",
                api.name, api.uid
            ));
            Some(api)
        }
        Ok(None) => {
            p.notes.push(
                "the API server runs as the supervisor's user (start koprogo as root or under \
                 the packaged unit to give it its own, backend.user)"
                    .into(),
            );
            p.who.clone()
        }
        Err(e) => {
            p.problems.push(format!("{e:#}"));
            None
        }
    };
    let cmd = &cfg.backend.command;
    match std::fs::metadata(cmd) {
        Ok(m) if m.is_file() => {
            use std::os::unix::fs::PermissionsExt;
            if m.permissions().mode() & 0o111 == 0 {
                p.problems.push(format!(
                    "{}: backend.command = {}: not executable: chmod +x it",
                    cfg.file.display(),
                    cmd.display()
                ));
            } else if let Some(who) = &api {
                if let Err(e) = privileges::executable_by(cmd, who) {
                    p.problems.push(format!(
                        "{}: backend.command = {}: {e}",
                        cfg.file.display(),
                        cmd.display()
                    ));
                }
            }
        }
        _ => p.warnings.push(format!(
            "the KoproGo application is not installed: {}: backend.command = {} does not exist \
             (the appliance runs and serves its maintenance page until it appears)",
            cfg.file.display(),
            cmd.display()
        )),
    }
    if let Some(who) = &p.who {
        for (key, dir) in [
            ("paths.state", &cfg.paths.state),
            ("paths.logs", &cfg.paths.logs),
            ("paths.run", &cfg.paths.run),
        ] {
            if dir.exists() && !dir.is_dir() {
                p.problems.push(format!(
                    "{}: {key} = {}: exists and is not a directory",
                    cfg.file.display(),
                    dir.display()
                ));
            } else if let Err(e) = privileges::reachable(dir, who) {
                p.problems.push(format!(
                    "{}: {key} = {}: {e}",
                    cfg.file.display(),
                    dir.display()
                ));
            }
        }
    }
    if cfg.tls.mode == crate::config::TlsMode::Off && cfg.proxy.trusted_proxies.is_empty() {
        p.warnings.push(format!(
            "{}: tls.mode = \"off\" (behind another proxy) without proxy.trusted_proxies: every \
             client shares that proxy's address in the rate limit, the connection cap and the API's \
             login limiter; list its address, e.g. trusted_proxies = [\"10.0.0.5/32\"]",
            cfg.file.display()
        ));
    }
    // The local root CA: no Name Constraints, names it cannot certify, loose modes.
    p.warnings.extend(crate::tls::ca_warnings(cfg));
    // Readable state only (an operator's own account may not enter it).
    if std::fs::read_dir(&cfg.paths.state).is_ok() {
        if let Some(why) = crate::capacity::history::History::load(&cfg.paths.state).problem {
            p.warnings.push(why);
        }
    }
    if let Some(pid) = privileges::running_pid(cfg) {
        p.notes.push(format!(
            "koprogo is running (pid {pid}): port checks skipped"
        ));
    } else {
        // Every API instance's port and its update spare.
        let backend = cfg
            .api_ports()
            .map(|p| ("backend.port", SocketAddr::from(([127, 0, 0, 1], p))));
        let addrs = backend
            .chain(cfg.proxy.http.iter().map(|a| ("proxy.http", *a)))
            .chain(cfg.proxy.https.iter().map(|a| ("proxy.https", *a)))
            .chain(
                cfg.metrics
                    .enabled
                    .then_some(("metrics.listen", cfg.metrics.listen)),
            );
        for (key, addr) in addrs.filter(|(_, a)| !held.contains(a)) {
            if let Err(e) = TcpListener::bind(addr) {
                let fix = match e.kind() {
                    std::io::ErrorKind::AddrInUse => {
                        "another program uses it (see `ss -ltnp`): stop it or choose another port"
                    }
                    std::io::ErrorKind::PermissionDenied => {
                        "ports below 1024 need root or CAP_NET_BIND_SERVICE (the systemd unit grants it)"
                    }
                    _ => "choose an address this machine has",
                };
                p.problems.push(format!(
                    "{}: {key} = {addr}: cannot listen ({e}): {fix}",
                    cfg.file.display()
                ));
            }
        }
    }
    p
}

/// External mode: the password file is readable and not world-readable, the CA
/// file holds certificates, the TLS setup can be built.
fn external_files(cfg: &Config, url: &ExternalUrl, p: &mut Preflight) {
    p.notes.push(format!(
        "external database {} (no local cluster)",
        url.redacted()
    ));
    if let Some(file) = &cfg.postgres.password_file {
        match external::password(cfg) {
            Ok(_) => {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(file)
                    .map(|m| m.permissions().mode() & 0o777)
                    .unwrap_or(0);
                if mode & 0o007 != 0 {
                    p.problems.push(format!(
                        "{}: postgres.password_file = {}: readable by everyone (mode {mode:o}): \
                         chmod 0640 it (owner root, group {})",
                        cfg.file.display(),
                        file.display(),
                        cfg.user
                    ));
                }
            }
            Err(e) => p.problems.push(format!("{e:#}")),
        }
    }
    // The supervisor reads these after dropping to the service user.
    if let Some(who) = &p.who {
        for (key, file) in [
            (
                "postgres.password_file",
                cfg.postgres.password_file.as_ref(),
            ),
            ("postgres.ca_file", cfg.postgres.ca_file.as_ref()),
        ] {
            let Some(file) = file.filter(|f| f.exists()) else {
                continue;
            };
            if let Err(e) = privileges::readable_by(file, who) {
                p.problems.push(format!(
                    "{}: {key} = {}: {e}",
                    cfg.file.display(),
                    file.display()
                ));
            }
        }
    }
    if url.sslmode != SslMode::Disable {
        let ca = url.ca(cfg);
        let wants_roots = tls::check_for(url.sslmode, ca.is_some()) != tls::Check::None;
        if wants_roots {
            if let Err(e) = tls::PgTls::new(url, ca.as_deref()) {
                let key = if cfg.postgres.ca_file.is_some() {
                    "postgres.ca_file"
                } else {
                    "postgres.url"
                };
                p.problems
                    .push(format!("{}: {key}: {e:#}", cfg.file.display()));
            }
        }
    }
}

/// `koprogo check` in external mode: connects (bounded) and compares versions.
/// An unreachable server is a warning, not a problem: the appliance starts
/// without it and waits (the API starts once it answers); a server that answers
/// but refuses us (password, missing database, extensions), or that is newer than
/// pg_dump, is a problem.
pub fn external_server(cfg: &Config, bins: Option<&Binaries>, p: &mut Preflight) {
    let Some(url) = cfg.postgres.external.clone() else {
        return;
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            p.problems.push(format!("cannot start a runtime: {e}"));
            return;
        }
    };
    let db = crate::postgres::Db::new(std::sync::Arc::new(cfg.clone()));
    let probe = async {
        let c = db.connect(db.app_db()).await?;
        let v: i32 = c
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await?
            .get(0);
        let missing: Vec<String> = c
            .query(
                "SELECT e FROM unnest($1::text[]) e WHERE e NOT IN (SELECT extname FROM pg_extension)",
                &[&external::REQUIRED_EXTENSIONS],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        Ok::<_, anyhow::Error>((v, missing))
    };
    let r = rt
        .block_on(async { tokio::time::timeout(std::time::Duration::from_secs(10), probe).await });
    match r {
        Err(_) => p.warnings.push(format!(
            "the external database {} did not answer within 10 s: koprogo starts anyway and waits for it",
            url.redacted()
        )),
        Ok(Err(e)) => {
            let text = format!("{e:#}");
            // tokio-postgres: "error connecting to server" (TCP), "timeout waiting
            // for server"; an answer of the server itself (auth, no database) is not that.
            let lower = text.to_lowercase();
            let refused = ["error connecting to server", "timeout", "timed out", "no route", "failed to lookup"]
                .iter()
                .any(|k| lower.contains(k));
            if refused {
                p.warnings.push(format!(
                    "the external database is not reachable now ({text}): koprogo starts anyway and waits for it"
                ));
            } else {
                p.problems.push(format!(
                    "the external database refuses koprogo: {text}: fix postgres.url / postgres.password_file \
                     in {} or the server's role, database and pg_hba.conf",
                    cfg.file.display()
                ));
            }
        }
        Ok(Ok((v, missing))) => {
            let major = (v / 10000) as u32;
            p.notes.push(format!(
                "external database answers: PostgreSQL {}.{} ({})",
                major,
                v % 10000,
                url.redacted()
            ));
            if let Some(b) = bins {
                if major > b.major {
                    p.problems.push(format!(
                        "the external server runs PostgreSQL {major} but pg_dump in {} is {}: pg_dump refuses \
                         newer servers, so backups would fail: apt-get install postgresql-client-{major} \
                         (and remove postgres.bin_dir if it points at {})",
                        b.dir.display(),
                        b.major,
                        b.dir.display()
                    ));
                }
            }
            if !missing.is_empty() {
                p.warnings.push(format!(
                    "extensions missing in database {}: {} (koprogo creates them at start if {} may; \
                     otherwise the DBA must run CREATE EXTENSION for each there)",
                    url.dbname,
                    missing.join(", "),
                    url.user
                ));
            }
        }
    }
}

/// Where Debian, Fedora and Alpine keep the system's CA bundle (what ACME's HTTPS
/// client trusts when `tls.acme_ca_root` is not set).
const SYSTEM_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// Why the ACME client would find no CA to verify the directory with, if so.
fn system_roots_warning() -> Option<String> {
    if std::env::var_os("SSL_CERT_FILE").is_some() || std::env::var_os("SSL_CERT_DIR").is_some() {
        return None;
    }
    roots_missing(&SYSTEM_BUNDLES)
}

fn roots_missing(bundles: &[&str]) -> Option<String> {
    if bundles
        .iter()
        .any(|f| std::fs::metadata(f).is_ok_and(|m| m.len() > 0))
    {
        return None;
    }
    Some(format!(
        "no system CA certificates ({} is missing), so the ACME directory's HTTPS cannot be \
         verified and no certificate will be ordered: apt-get install ca-certificates \
         (or set tls.acme_ca_root)",
        bundles
            .first()
            .unwrap_or(&"/etc/ssl/certs/ca-certificates.crt")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_ca_bundle_is_named_with_the_package_to_install() {
        let d = tempfile::tempdir().expect("tempdir");
        let missing = d.path().join("ca-certificates.crt");
        let missing = missing.to_str().expect("utf-8 temp path");
        let w = roots_missing(&[missing]).expect("a warning");
        assert!(
            w.contains(missing) && w.contains("apt-get install ca-certificates"),
            "{w}"
        );
        std::fs::write(missing, "").expect("write");
        assert!(
            roots_missing(&[missing]).is_some(),
            "an empty bundle trusts nothing"
        );
        std::fs::write(missing, "-----BEGIN CERTIFICATE-----\n").expect("write");
        assert_eq!(roots_missing(&[missing]), None);
    }
}
