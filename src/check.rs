//! Environment checks shared by `koprogo check` and `koprogo run` (which refuses to
//! start on any problem, before creating anything): PostgreSQL binaries and version,
//! an existing cluster's version, the API binary, the service user, directories,
//! free ports. Each problem is one line naming what is wrong and what to do.

use std::net::{SocketAddr, TcpListener};

use crate::config::Config;
use crate::postgres::binaries::{self, Binaries};
use crate::postgres::cluster;
use crate::supervisor::privileges::{self, Identity};

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
    match binaries::find(cfg) {
        Ok(b) => {
            p.notes.push(format!(
                "PostgreSQL {} in {} ({})",
                b.major,
                b.dir.display(),
                b.version
            ));
            if let Err(e) = cluster::check_version(cfg, &b) {
                p.problems.push(e);
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
            } else if let Some(who) = &p.who {
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
        for (key, addr) in addrs {
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
