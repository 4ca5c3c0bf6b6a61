//! The debconf-managed layer under `koprogo.toml`: the package's postinst writes
//! the answers to its questions (domain, TLS mode, ACME e-mail, SMTP) into
//! [`super::MANAGED_FILE`] beside the main file, so they never overwrite an
//! administrator's edits. Both files are read as TOML tables, each checked on its
//! own (unknown keys and wrong types name THAT file), then merged table by table:
//! a key the main file sets wins over the managed file's. The keys that took
//! effect from the managed file are returned so later errors name it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::raw::RawConfig;
use super::ConfigError;

/// The managed file of the configuration `file`: [`super::MANAGED_FILE`] in its directory.
pub(super) fn path_beside(file: &Path) -> PathBuf {
    file.parent()
        .unwrap_or_else(|| Path::new("."))
        .join(super::MANAGED_FILE)
}

/// The managed file's text, or None when it does not exist.
pub(super) fn read(path: &Path) -> Result<Option<String>, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ConfigError(format!(
            "{}: cannot read the debconf-managed configuration: {e} (it is written by the \
             package: run `dpkg-reconfigure koprogo` as root, or remove it to use only the \
             main file)",
            path.display()
        ))),
    }
}

/// `text` (the contents of `file`) as the raw model: syntax errors, unknown keys
/// and wrong types name `file`.
pub(super) fn raw_of(text: &str, file: &Path) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|e| toml_err(file, &e))
}

/// The main file (`text` of `file`) layered on the managed one (`mtext` of
/// `mfile`): the merged raw model, and the dotted keys taken from the managed file.
pub(super) fn layer(
    text: &str,
    file: &Path,
    mtext: &str,
    mfile: &Path,
) -> Result<(RawConfig, BTreeSet<String>), ConfigError> {
    // Each file on its own first: its own unknown keys and types, its name.
    raw_of(mtext, mfile)?;
    raw_of(text, file)?;
    let main: toml::Table = text.parse().map_err(|e| toml_err(file, &e))?;
    let mut merged: toml::Table = mtext.parse().map_err(|e| toml_err(mfile, &e))?;
    let mut from_managed = BTreeSet::new();
    leaves(&merged, "", &mut from_managed);
    let mut from_main = BTreeSet::new();
    leaves(&main, "", &mut from_main);
    from_managed.retain(|k| !from_main.contains(k));
    merge(&mut merged, main);
    let raw: RawConfig = toml::Value::Table(merged).try_into().map_err(|e| {
        ConfigError(format!(
            "{} layered on {}: {}",
            file.display(),
            mfile.display(),
            one_line(&e.to_string())
        ))
    })?;
    Ok((raw, from_managed))
}

/// `over`'s keys into `base`: tables merge key by key, any other value replaces.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// The dotted names of every non-table value in `t` (arrays are values).
fn leaves(t: &toml::Table, prefix: &str, out: &mut BTreeSet<String>) {
    for (k, v) in t {
        let name = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(sub) => leaves(sub, &name, out),
            _ => {
                out.insert(name);
            }
        }
    }
}

fn toml_err(file: &Path, e: &dyn std::fmt::Display) -> ConfigError {
    ConfigError(format!("{}: {}", file.display(), one_line(&e.to_string())))
}

/// A multi-line TOML error indented under its first line.
fn one_line(s: &str) -> String {
    s.trim_end().replace('\n', "\n  ")
}
