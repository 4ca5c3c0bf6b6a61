//! Finding the PostgreSQL binaries (configured, or the newest under
//! /usr/lib/postgresql/*/bin) and their major version. With an external server only
//! the client tools are needed (pg_dump, pg_restore, psql: `postgresql-client-N`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::Config;

/// The oldest major the appliance supports (trusted pgcrypto/uuid-ossp need 13;
/// KoproGo is deployed on 15).
pub const MIN_MAJOR: u32 = 15;
pub const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

#[derive(Debug, Clone)]
pub struct Binaries {
    pub dir: PathBuf,
    pub major: u32,
    pub version: String,
}

impl Binaries {
    pub fn tool(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Locates the binaries and reads their version. Runs `postgres --version`, so call
/// it before the reaper starts (or from `koprogo check`).
pub fn find(cfg: &Config) -> Result<Binaries, String> {
    let external = cfg.postgres.mode == crate::config::PgMode::External;
    let (tools, package, versioned): (&[&str], &str, &str) = if external {
        (
            &["pg_dump", "pg_restore", "psql"],
            "postgresql-client",
            "pg_dump",
        )
    } else {
        (
            &["postgres", "initdb", "pg_controldata"],
            "postgresql",
            "postgres",
        )
    };
    let dir = match &cfg.postgres.bin_dir {
        Some(d) => d.clone(),
        None => newest(Path::new(DEBIAN_ROOT), versioned).ok_or_else(|| {
            format!(
                "{}: postgres.bin_dir is not set and no {} is installed under {DEBIAN_ROOT}/*/bin: \
                 install it (apt-get install {package}) or set postgres.bin_dir",
                cfg.file.display(),
                if external { "PostgreSQL client (pg_dump)" } else { "PostgreSQL" },
            )
        })?,
    };
    for tool in tools {
        if !dir.join(tool).is_file() {
            return Err(format!(
                "{}: postgres.bin_dir = {}: no `{tool}` there: install {package}-{MIN_MAJOR} or higher, or fix the path",
                cfg.file.display(),
                dir.display()
            ));
        }
    }
    let out = Command::new(dir.join(versioned))
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}/{versioned} --version: {e}", dir.display()))?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let major = parse_major(&version).ok_or_else(|| {
        format!(
            "cannot read the version from {:?} ({}/{versioned})",
            version,
            dir.display()
        )
    })?;
    if major < MIN_MAJOR {
        return Err(format!(
            "{}: PostgreSQL {major} found in {}: koprogo needs {MIN_MAJOR} or newer",
            cfg.file.display(),
            dir.display()
        ));
    }
    Ok(Binaries {
        dir,
        major,
        version,
    })
}

/// "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)" → 15.
pub fn parse_major(version: &str) -> Option<u32> {
    let v = version.split(") ").nth(1)?;
    v.split(['.', ' ']).next()?.parse().ok()
}

fn newest(root: &Path, tool: &str) -> Option<PathBuf> {
    std::fs::read_dir(root)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join(tool).is_file().then_some((major, bin))
        })
        .max_by_key(|(m, _)| *m)
        .map(|(_, b)| b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_debian_version() {
        assert_eq!(
            parse_major("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(parse_major("postgres (PostgreSQL) 17.2"), Some(17));
        assert_eq!(parse_major("garbage"), None);
    }
}
