//! The command-line side of `koprogo backup create|list|verify` and `koprogo
//! restore`: the work happens in the running supervisor (it owns the database and
//! the reaper), asked over the control socket. `list` reads the directory itself.
//! An encrypted file is decrypted here, with the operator's identity file, into a
//! hidden file of the backup directory that the supervisor then reads; the private
//! key never reaches the service.
//!
//! `--trust-key` / `--trust-foreign` (see [`crate::backup::auth`]) widen which backups
//! `restore` and `backup verify` accept; `backup key` prints this appliance's key.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};

use super::{CliError, Outcome};
use crate::backup::auth::{Key, Trust};
use crate::backup::{crypt, retention};
use crate::config::Config;
use crate::control::{self, Request};

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

fn ask(cfg: &Config, req: &Request) -> Outcome {
    match control::request_long(cfg, req) {
        Ok(r) if r.ok => {
            println!("{}", r.message);
            Ok(ExitCode::SUCCESS)
        }
        Ok(r) => Err(CliError::Failed(r.message)),
        Err(e) => Err(e.into()),
    }
}

/// Which backups besides this appliance's own are accepted.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct TrustArgs {
    /// Also accept a backup made by the appliance whose backup key this is: a file
    /// holding it (as `koprogo backup key` prints it there) or its 64 hex characters.
    #[arg(long, value_name = "FILE|HEX", conflicts_with = "trust_foreign")]
    pub trust_key: Option<String>,
    /// Accept a backup this appliance cannot authenticate (another machine's whose
    /// key is lost, or one made before backups were authenticated). Its database is
    /// still replayed as an unprivileged PostgreSQL role.
    #[arg(long)]
    pub trust_foreign: bool,
}

/// Longest key file read (a key is 64 characters and a newline).
const MAX_KEY_FILE: u64 = 4096;

impl TrustArgs {
    fn resolve(&self) -> Result<Trust, String> {
        if self.trust_foreign {
            eprintln!(
                "koprogo: --trust-foreign: a backup this appliance cannot authenticate is accepted \
                 (what it claims to be is printed below); its database is replayed as an \
                 unprivileged PostgreSQL role"
            );
            return Ok(Trust::Foreign);
        }
        let Some(arg) = &self.trust_key else {
            return Ok(Trust::Own);
        };
        let text = if Key::from_hex(arg).is_ok() && !Path::new(arg).exists() {
            arg.clone()
        } else {
            crate::fsutil::read_bounded_string(Path::new(arg), MAX_KEY_FILE).map_err(|e| {
                format!(
                    "--trust-key {arg}: cannot read it ({e}): pass the file `koprogo backup key` \
                     wrote on the other machine, or its 64 hex characters"
                )
            })?
        };
        let key = Key::from_hex(&text).map_err(|e| format!("--trust-key {arg}: {e:#}"))?;
        eprintln!(
            "koprogo: also trusting backups made with the key {}",
            key.id()
        );
        Ok(Trust::Key(text.trim().to_string()))
    }
}

/// `koprogo backup key`: this appliance's backup key on stdout, its id on stderr.
pub fn key(cfg: &Config) -> Outcome {
    let state = &cfg.paths.state;
    let hex = match crate::secrets::read_value(state, crate::secrets::BACKUP_KEY) {
        Ok(Some(v)) => v,
        Ok(None) => {
            return Err(CliError::Failed(format!(
                "{} has no {}: start koprogo once (it generates the key at boot)",
                crate::secrets::path(state).display(),
                crate::secrets::BACKUP_KEY
            )));
        }
        Err(e) => {
            return Err(CliError::Failed(format!("{e:#}")));
        }
    };
    match Key::from_hex(&hex) {
        Ok(k) => {
            println!("{hex}");
            eprintln!(
                "koprogo: backup key {} of this appliance. To move the site, restore its backups \
                 on the other machine with `koprogo restore FILE --trust-key KEYFILE`. Keep it as \
                 secret as the backups: whoever has it can make backups this appliance accepts.",
                k.id()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(CliError::Failed(format!(
            "{}: {} is malformed ({e:#})",
            crate::secrets::path(state).display(),
            crate::secrets::BACKUP_KEY
        ))),
    }
}

pub fn create(cfg: &Config) -> Outcome {
    ask(cfg, &Request::BackupCreate)
}

/// A decrypted copy in the backup directory, removed when dropped.
struct Decrypted(PathBuf);

impl Drop for Decrypted {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn decrypt_for_supervisor(
    cfg: &Config,
    file: &Path,
    input: std::fs::File,
    identity: &Path,
    identity_text: &[u8],
) -> Result<Decrypted> {
    let dir = &cfg.backup.dir;
    crate::fsutil::ensure_dir(dir, 0o750)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let dst = dir.join(format!(
        ".decrypted-{}-{:08x}.kbk",
        std::process::id(),
        rand::random::<u32>()
    ));
    let guard = Decrypted(dst.clone());
    eprintln!("koprogo: decrypting {} …", file.display());
    crypt::decrypt_opened(file, input, identity, identity_text, &dst)?;
    Ok(guard)
}

/// The file to hand to the supervisor, and a decrypted copy to remove afterwards.
/// From a root shell, what the operator named (the backup, the identity) is read as
/// root, then everything else happens as the service user (see
/// `privileges::drop_for_command`): the decrypted copy is that user's own file in
/// its backup directory, and nothing it planted there is followed by root.
fn prepare(
    cfg: &Config,
    file: &Path,
    identity: Option<&Path>,
) -> Result<(PathBuf, Option<Decrypted>), String> {
    let opened = crate::fsutil::walk::open_file(file).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!("{}: no such file", file.display())
        } else {
            e.to_string()
        }
    })?;
    let encrypted = {
        use std::os::unix::fs::FileExt;
        let mut head = [0u8; 21];
        opened.read_exact_at(&mut head, 0).is_ok() && &head == b"age-encryption.org/v1"
    };
    let id = match (encrypted, identity) {
        (true, None) => {
            return Err(format!(
                "{} is encrypted (age): pass --identity FILE, the key whose public half is backup.encrypt_to",
                file.display()
            ))
        }
        (true, Some(id)) => {
            let id = absolute(id);
            let text = crate::fsutil::walk::open_file(&id)
                .and_then(|f| {
                    use std::io::Read;
                    let mut t = Vec::new();
                    f.take(1 << 20).read_to_end(&mut t).map(|_| t)
                })
                .map_err(|e| format!("cannot read the identity file {}: {e}", id.display()))?;
            Some((id, text))
        }
        (false, _) => None,
    };
    crate::process::privileges::drop_for_command(cfg).map_err(|e| format!("{e:#}"))?;
    if let Some((id, text)) = id {
        let d =
            decrypt_for_supervisor(cfg, file, opened, &id, &text).map_err(|e| format!("{e:#}"))?;
        return Ok((d.0.clone(), Some(d)));
    }
    // The supervisor reads the file itself, as the service user.
    if let Err(e) = std::fs::File::open(file) {
        return Err(format!(
            "{}: the service user cannot read it ({e}): copy it into backup.dir ({}) or let that user read it",
            file.display(),
            cfg.backup.dir.display()
        ));
    }
    Ok((file.to_path_buf(), None))
}

pub fn verify(
    cfg: &Config,
    file: Option<PathBuf>,
    identity: Option<PathBuf>,
    trust: &TrustArgs,
) -> Outcome {
    let trust = match trust.resolve() {
        Ok(t) => t,
        Err(e) => {
            return Err(CliError::Failed(e.to_string()));
        }
    };
    let file = match file {
        Some(f) => absolute(&f),
        None => match crate::backup::newest(&cfg.backup.dir) {
            Ok(f) => f,
            Err(e) => {
                return Err(CliError::Failed(format!("{e:#}")));
            }
        },
    };
    let (read, guard) = match prepare(cfg, &file, identity.as_deref()) {
        Ok(x) => x,
        Err(e) => {
            return Err(CliError::Failed(e.to_string()));
        }
    };
    eprintln!("koprogo: verifying {} …", file.display());
    let code = ask(
        cfg,
        &Request::BackupVerify {
            file: Some(read),
            record_as: guard.as_ref().map(|_| file.clone()),
            trust,
        },
    );
    drop(guard);
    code
}

pub fn restore(
    cfg: &Config,
    file: PathBuf,
    identity: Option<PathBuf>,
    force: bool,
    trust: &TrustArgs,
) -> Outcome {
    let trust = match trust.resolve() {
        Ok(t) => t,
        Err(e) => {
            return Err(CliError::Failed(format!(
                "refused: {e}; nothing was changed"
            )));
        }
    };
    let file = absolute(&file);
    let (read, guard) = match prepare(cfg, &file, identity.as_deref()) {
        Ok(x) => x,
        Err(e) => {
            return Err(CliError::Failed(format!(
                "refused: {e}; nothing was changed"
            )));
        }
    };
    eprintln!(
        "koprogo: restoring {} (checks, safety backup, restore, API restart) …",
        file.display()
    );
    let code = ask(
        cfg,
        &Request::Restore {
            file: read,
            label: Some(file.display().to_string()),
            force,
            trust,
        },
    );
    drop(guard);
    code
}

#[derive(serde::Serialize)]
struct Row {
    name: String,
    path: String,
    time: String,
    size_bytes: u64,
    encrypted: bool,
    checked: Option<retention::Marker>,
}

pub fn list(cfg: &Config, json: bool) -> Outcome {
    let dir = &cfg.backup.dir;
    let entries = match retention::list(dir) {
        Ok(e) => e,
        Err(e) => {
            return Err(CliError::Failed(format!(
                "cannot list {}: {e} (run as root or as the service user)",
                dir.display()
            )));
        }
    };
    let rows: Vec<Row> = entries
        .iter()
        .map(|e| Row {
            name: e.name.clone(),
            path: e.path.display().to_string(),
            time: chrono::DateTime::<chrono::Local>::from(e.mtime)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
            size_bytes: e.size,
            encrypted: e.encrypted(),
            checked: e.marker.clone(),
        })
        .collect();
    if json {
        match serde_json::to_string_pretty(&rows) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                return Err(CliError::Failed(e.to_string()));
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        println!(
            "no backups in {} (make one with `koprogo backup create`)",
            dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<46} {:<17} {:>10}  VERIFIED",
        "NAME", "TIME (local)", "SIZE"
    );
    for (r, e) in rows.iter().zip(&entries) {
        let time = chrono::DateTime::<chrono::Local>::from(e.mtime)
            .format("%Y-%m-%d %H:%M")
            .to_string();
        let checked = match &r.checked {
            None => "-".to_string(),
            Some(m) if m.ok && m.how == "restored" => format!("yes ({})", short_date(&m.at)),
            Some(m) if m.ok => format!("checksums ({})", short_date(&m.at)),
            Some(m) => format!("FAILED ({}): {}", short_date(&m.at), m.detail),
        };
        println!(
            "{:<46} {:<17} {:>10}  {}",
            r.name,
            time,
            crate::backup::human_size(r.size_bytes),
            checked
        );
    }
    println!("{} backup(s) in {}", rows.len(), dir.display());
    Ok(ExitCode::SUCCESS)
}

fn short_date(rfc: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(rfc)
        .map(|t| {
            t.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M")
                .to_string()
        })
        .unwrap_or_else(|_| rfc.to_string())
}
