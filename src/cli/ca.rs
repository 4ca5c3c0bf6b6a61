//! `koprogo ca export|rotate`: the local CA's files are the service user's, so the
//! work on them is done as that user; root only writes what the operator named.
//! Each prints the root's SHA-256 fingerprint (on stderr beside a PEM on stdout),
//! the one the onboarding page (`http://<server>/ca`) and the PCs show.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{CliError, Outcome};
use crate::config::Config;
use crate::process::privileges;

pub fn export(cfg: &Config, file: Option<PathBuf>) -> Outcome {
    // The CA is read (or made, before the first boot) as the service user: its files
    // are that user's, and a link planted among them gives it nothing.
    let pem = match privileges::as_service_user(cfg, 1 << 20, || {
        crate::tls::export_root(cfg)
            .map(String::into_bytes)
            .map_err(|e| format!("{e:#}"))
    }) {
        Ok(p) => String::from_utf8_lossy(&p).into_owned(),
        Err(e) => {
            return Err(CliError::Failed(format!("{e:#}")));
        }
    };
    let fp = fingerprint(&pem)?;
    let out = write_pem(file, &pem)?;
    // Beside the PEM, never in it (stdout is the PEM only): what the office PCs
    // and the onboarding page (http://<server>/ca) show, to compare.
    eprintln!("SHA-256 fingerprint: {fp}");
    Ok(out)
}

/// The SHA-256 fingerprint of the root certificate in `pem`.
fn fingerprint(pem: &str) -> Result<String, CliError> {
    crate::tls::pem_fingerprint(pem).map_err(|e| {
        CliError::Failed(format!(
            "the local root CA's certificate cannot be read back: {e:#}"
        ))
    })
}

/// `f` against the current directory (write_atomic needs a parent directory to
/// open: a bare `root.pem` has an empty one).
fn absolute(f: &std::path::Path) -> PathBuf {
    match std::env::current_dir() {
        Ok(d) if f.is_relative() => d.join(f),
        _ => f.to_path_buf(),
    }
}

/// A root CA certificate (PEM) to `file`, or stdout.
fn write_pem(file: Option<PathBuf>, pem: &str) -> Outcome {
    match file {
        None => {
            print!("{pem}");
            Ok(ExitCode::SUCCESS)
        }
        Some(f) => match crate::fsutil::write_atomic(&absolute(&f), pem.as_bytes(), 0o644) {
            Ok(()) => {
                eprintln!(
                    "koprogo: wrote the local root CA to {} (import it as a trusted root on the office PCs)",
                    f.display()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => Err(CliError::Failed(format!(
                "cannot write {}: {e}",
                f.display()
            ))),
        },
    }
}

/// Runs `f` with the service user's effective user and group when root (restored
/// after), so the files it creates under `<state>` belong to that user and no path
/// there is followed with root's rights. (The process is not dumpable meanwhile
/// and its real uid stays root: the service user can neither trace nor signal it.)
fn with_service_user_ids<T>(
    cfg: &Config,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    use nix::unistd::{setegid, seteuid, Gid, Uid};
    if !Uid::effective().is_root() {
        return f();
    }
    let who = privileges::target_identity(cfg)?;
    setegid(who.gid).map_err(|e| anyhow::anyhow!("setegid {}: {e}", who.gid))?;
    if let Err(e) = seteuid(who.uid) {
        let _ = setegid(Gid::from_raw(0));
        return Err(anyhow::anyhow!("seteuid {}: {e}", who.uid));
    }
    let out = f();
    seteuid(Uid::from_raw(0)).map_err(|e| anyhow::anyhow!("seteuid 0: {e}"))?;
    setegid(Gid::from_raw(0)).map_err(|e| anyhow::anyhow!("setegid 0: {e}"))?;
    out
}

/// `koprogo ca rotate [--prepare] [FILE]`: the CA work as the service user.
pub fn rotate(cfg: &Config, prepare: bool, file: Option<PathBuf>) -> Outcome {
    if prepare {
        return match with_service_user_ids(cfg, || crate::tls::prepare_next_root(cfg)) {
            Ok((next, pem)) => {
                eprintln!(
                    "koprogo: next root {} (serial {}), permits {}; the site keeps its current \
                     root. Import this one on every office PC now, then run `koprogo ca rotate`.",
                    next.subject,
                    next.serial,
                    next.permitted.join(", ")
                );
                let fp = fingerprint(&pem)?;
                let out = write_pem(file, &pem)?;
                eprintln!("next root SHA-256 fingerprint: {fp}");
                Ok(out)
            }
            Err(e) => Err(CliError::Failed(format!("{e:#}"))),
        };
    }
    if file.is_some() {
        return Err(CliError::Invalid(
            "FILE goes with --prepare; after the rotate, `koprogo ca export FILE`".into(),
        ));
    }
    match with_service_user_ids(cfg, || crate::tls::rotate_root(cfg)) {
        Ok(r) => {
            match &r.old {
                Some((name, serial, constrained)) => println!(
                    "retired   {name} (serial {serial}{}); its key is deleted",
                    if *constrained {
                        ""
                    } else {
                        ", no name constraints"
                    }
                ),
                None => println!("retired   (no usable root before)"),
            }
            println!("new root  {} (serial {})", r.new.subject, r.new.serial);
            println!("permits   {}", r.new.permitted.join(", "));
            println!("expires   {}", r.new.not_after);
            println!("SHA-256   {}", r.new.fingerprint);
            println!(
                "The running koprogo serves a certificate from the new root within seconds.\n\
                 {}Remove the old root from the office PCs.",
                if r.new.exported {
                    "It is the root prepared before (ca rotate --prepare): PCs that imported it \
                     trust the site. "
                } else {
                    "Now export it (koprogo ca export FILE) and import it as a trusted root on \
                     every office PC; until then they warn about the site. "
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(CliError::Failed(format!("{e:#}"))),
    }
}
