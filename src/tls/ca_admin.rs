//! The operator's side of the local root CA: `koprogo ca export` (recorded as handed
//! out), `ca rotate [--prepare]`, what `cert status`/`status --json` show of the
//! root ([`CaStatus`]) and what `koprogo check` warns about (no Name Constraints,
//! configured names it cannot certify, loose file modes). Each entry point makes
//! `<state>/tls` private first ([`super::files::tighten`]).

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::certinfo::{fingerprint_sha256, rfc3339};
use super::local_ca::{self, LocalCa};
use super::{files, TlsPaths};
use crate::config::{Config, TlsMode};
use crate::fsutil::ensure_dir;

/// The local root CA as `koprogo cert status` and `status --json` show it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CaStatus {
    /// Its name, as the office PCs' certificate stores show it.
    pub subject: String,
    pub serial: String,
    pub not_after: String,
    /// Whether it carries Name Constraints (roots made by earlier versions do not).
    pub constrained: bool,
    /// Its permitted subtrees; a DNS name covers every name under it too.
    pub permitted: Vec<String>,
    /// Configured names and machine addresses it cannot certify (left out of the
    /// site's certificate until `koprogo ca rotate`).
    pub not_covered: Vec<String>,
    /// Whether `koprogo ca export` handed it out (then it is never replaced silently).
    pub exported: bool,
    /// What the operator should do, if anything.
    pub warning: Option<String>,
    /// The root `koprogo ca rotate --prepare` made, that the next rotate switches
    /// to: its name and serial.
    #[serde(default)]
    pub next: Option<String>,
    /// SHA-256 fingerprint of the root (upper-case hex, colons), to compare with
    /// what an office PC shows (and the onboarding page, `koprogo ca export`).
    #[serde(default)]
    pub fingerprint: String,
    /// The same for the next root, when one is prepared.
    #[serde(default)]
    pub next_fingerprint: Option<String>,
}

/// `koprogo ca export`: PEM of the local root CA (created if it does not exist yet),
/// recorded as handed out so it is never replaced without the operator. (The
/// fingerprint to print beside it: [`fingerprint_sha256`] of the PEM's DER, see
/// [`pem_fingerprint`].)
pub fn export_root(cfg: &Config) -> anyhow::Result<String> {
    let paths = TlsPaths::new(&cfg.paths.state);
    ensure_dir(&paths.dir, 0o700).with_context(|| format!("creating {}", paths.dir.display()))?;
    files::tighten(&paths.dir)?;
    let ca = local_ca::load_or_create_root(&paths, cfg)?;
    local_ca::mark_exported(&paths, &ca)?;
    Ok(ca.cert_pem)
}

/// SHA-256 fingerprint (see [`fingerprint_sha256`]) of the first certificate of
/// a PEM text, e.g. what [`export_root`] returned.
pub fn pem_fingerprint(pem: &str) -> anyhow::Result<String> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("not a PEM certificate: {e}"))?;
    Ok(fingerprint_sha256(&der))
}

/// What `koprogo ca rotate` did.
#[derive(Debug)]
pub struct Rotated {
    /// The replaced root's name and serial, and whether it had Name Constraints.
    pub old: Option<(String, String, bool)>,
    /// The new root.
    pub new: CaStatus,
}

/// `koprogo ca rotate --prepare`: the root the next `ca rotate` switches to (made
/// for the configured names if there is none yet) and its PEM, for the office PCs
/// to import before the switch. The site keeps its current root.
pub fn prepare_next_root(cfg: &Config) -> anyhow::Result<(CaStatus, String)> {
    let paths = TlsPaths::new(&cfg.paths.state);
    ensure_dir(&paths.dir, 0o700).with_context(|| format!("creating {}", paths.dir.display()))?;
    files::tighten(&paths.dir)?;
    let next = local_ca::prepare_next(&paths, cfg)?;
    Ok((ca_status(&paths, &next, cfg), next.cert_pem))
}

/// `koprogo ca rotate`: the root prepared by `--prepare`, or a new one, constrained
/// to the configured names, replaces the stored one (whose key is deleted). A
/// running supervisor serves a certificate from it within `files_poll` (10 s).
/// Office PCs must trust the new root (imported before, when prepared).
pub fn rotate_root(cfg: &Config) -> anyhow::Result<Rotated> {
    let paths = TlsPaths::new(&cfg.paths.state);
    ensure_dir(&paths.dir, 0o700).with_context(|| format!("creating {}", paths.dir.display()))?;
    files::tighten(&paths.dir)?;
    let (old, new) = local_ca::rotate(&paths, cfg)?;
    Ok(Rotated {
        old: old.map(|(info, scope)| (info.issuer, info.serial, scope.is_constrained())),
        new: ca_status(&paths, &new, cfg),
    })
}

/// For `koprogo check`: what is wrong with the stored local root CA (no Name
/// Constraints, configured names it cannot certify, a key others can read), from
/// disk, creating and changing nothing.
pub fn ca_warnings(cfg: &Config) -> Vec<String> {
    if cfg.tls.mode == TlsMode::Files {
        return Vec::new();
    }
    let paths = TlsPaths::new(&cfg.paths.state);
    let mut out = Vec::new();
    if let Ok(Some(ca)) = local_ca::read_root(&paths) {
        if let Some(w) = ca_status(&paths, &ca, cfg).warning {
            out.push(format!("{}: {w}", paths.root_crt.display()));
        }
    }
    out.extend(files::loose_modes(&paths.dir));
    out
}

pub(super) fn ca_status(paths: &TlsPaths, ca: &LocalCa, cfg: &Config) -> CaStatus {
    let (_, not_covered) = ca.scope.split(&local_ca::leaf_names(cfg));
    let warning = if !ca.scope.is_constrained() {
        Some(local_ca::unconstrained_warning())
    } else if !not_covered.is_empty() {
        Some(local_ca::not_covered_warning(&not_covered))
    } else {
        None
    };
    let (next, next_fingerprint) = match local_ca::read_next(paths) {
        Ok(Some(n)) if n.info.serial != ca.info.serial => (
            Some(format!("{} (serial {})", n.info.issuer, n.info.serial)),
            Some(fingerprint_sha256(&n.cert_der)),
        ),
        _ => (None, None),
    };
    CaStatus {
        next,
        next_fingerprint,
        fingerprint: fingerprint_sha256(&ca.cert_der),
        subject: ca.info.issuer.clone(),
        serial: ca.info.serial.clone(),
        not_after: rfc3339(ca.info.not_after),
        constrained: ca.scope.is_constrained(),
        permitted: ca.scope.describe(),
        not_covered,
        exported: local_ca::exported(paths, ca),
        warning,
    }
}
