//! From the file as written ([`super::raw`]) to the final [`Config`]: what is
//! derived (the effective TLS mode, absolute paths resolved against the file's
//! directory, the backup directory, the parsed `postgres.url`), then
//! [`super::validate`]. Nothing is read from the disk.

use std::path::{Component, Path, PathBuf};

use super::raw::{RawConfig, RawPostgres, RawTls};
use super::{validate, Config, ConfigError, Managed, Postgres, Tls, TlsMode};

/// The final configuration of `raw`, read from `file` (layered on `managed`), checked.
pub(super) fn resolve(
    raw: RawConfig,
    file: &Path,
    managed: Option<Managed>,
) -> Result<Config, ConfigError> {
    let file = absolute(file);
    let base = file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    let RawConfig {
        domain,
        aliases,
        user,
        mut paths,
        postgres,
        mut backend,
        mut proxy,
        tls,
        logs,
        metrics,
        mut backup,
        capacity,
    } = raw;
    let mut tls = tls_of(tls);
    let (mut postgres, url) = postgres_of(postgres);
    for p in [
        &mut paths.state,
        &mut paths.logs,
        &mut paths.run,
        &mut backend.command,
        &mut proxy.frontend,
    ] {
        resolve_path(p, &base);
    }
    for p in [
        postgres.bin_dir.as_mut(),
        postgres.password_file.as_mut(),
        postgres.ca_file.as_mut(),
        tls.acme_ca_root.as_mut(),
        tls.cert.as_mut(),
        tls.key.as_mut(),
    ]
    .into_iter()
    .flatten()
    {
        resolve_path(p, &base);
    }
    if backup.dir.as_os_str().is_empty() {
        backup.dir = paths.state.join("backups");
    } else {
        resolve_path(&mut backup.dir, &base);
    }
    if let Some(e) = backup.encrypt_to.as_mut() {
        if !e.starts_with("age1") {
            let mut p = PathBuf::from(&*e);
            resolve_path(&mut p, &base);
            *e = p.display().to_string();
        }
    }
    let mut cfg = Config {
        domain,
        aliases,
        user,
        paths,
        postgres,
        backend,
        proxy,
        tls,
        logs,
        metrics,
        backup,
        capacity,
        file,
        managed,
    };
    cfg.postgres.external = validate::validate(&cfg, url.as_deref())?;
    Ok(cfg)
}

/// `[tls]` with its effective mode: as written, else "acme" when `acme_email` is
/// set, else "internal".
fn tls_of(t: RawTls) -> Tls {
    let mode = t.mode.unwrap_or(if t.acme_email.is_some() {
        TlsMode::Acme
    } else {
        TlsMode::Internal
    });
    Tls {
        mode,
        acme_email: t.acme_email,
        acme_directory: t.acme_directory,
        acme_ca_root: t.acme_ca_root,
        acme_challenge: t.acme_challenge,
        cert: t.cert,
        key: t.key,
    }
}

/// `[postgres]` without its URL (parsed once validated) and the URL as written.
fn postgres_of(p: RawPostgres) -> (Postgres, Option<String>) {
    let pg = Postgres {
        mode: p.mode,
        external: None,
        password_file: p.password_file,
        ca_file: p.ca_file,
        bin_dir: p.bin_dir,
        memory: p.memory,
        max_connections: p.max_connections,
        port: p.port,
        start_timeout: p.start_timeout,
        stop_timeout: p.stop_timeout,
        health_interval: p.health_interval,
        health_timeout: p.health_timeout,
        health_failures: p.health_failures,
        settings: p.settings,
    };
    (pg, p.url.map(|u| u.0))
}

pub(super) fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

fn resolve_path(p: &mut PathBuf, base: &Path) {
    if p.is_relative() {
        *p = normalize(&base.join(&*p));
    }
}

/// Removes `.` and `..` components lexically, so paths in messages read well.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}
