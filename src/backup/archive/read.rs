//! Reading a backup: [`check`] verifies every byte (see the module comment of
//! [`super`]) and, when asked, extracts db.dump and the uploads while it reads.

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use anyhow::{anyhow, Context, Result};
use sha2::{Digest, Sha256};

use super::format::{
    extension, newer_format, Manifest, Member, BLOCK, DUMP, FORMAT, MAGIC_NAME, MANIFEST,
    MANIFEST_AUTH, MANIFEST_SUM, MAX_EXTENSION, MAX_MANIFEST, MAX_SECRETS, SECRETS, UPLOADS,
};

/// Hashes everything read except the last 512 bytes, so that when tar hands us the
/// manifest's entry (right after reading its 512-byte header) the hash covers
/// exactly the bytes before that header.
struct LagState {
    hasher: Sha256,
    lag: Vec<u8>,
    pos: u64,
}

struct LagReader<R> {
    inner: R,
    state: Rc<RefCell<LagState>>,
}

impl<R: Read> Read for LagReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut s = self.state.borrow_mut();
        s.pos += n as u64;
        let data = &buf[..n];
        if data.len() >= BLOCK {
            let lag = std::mem::take(&mut s.lag);
            s.hasher.update(&lag);
            s.hasher.update(&data[..data.len() - BLOCK]);
            s.lag = data[data.len() - BLOCK..].to_vec();
        } else {
            let mut all = std::mem::take(&mut s.lag);
            all.extend_from_slice(data);
            let cut = all.len().saturating_sub(BLOCK);
            s.hasher.update(&all[..cut]);
            s.lag = all[cut..].to_vec();
        }
        Ok(n)
    }
}

/// What `check` should keep while it reads.
#[derive(Default)]
pub struct Extract {
    /// Write db.dump here (a new file, 0600).
    pub dump_to: Option<PathBuf>,
    /// Recreate the uploads tree under this new directory.
    pub uploads_to: Option<PathBuf>,
}

/// A backup that passed every check.
#[derive(Debug)]
pub struct Checked {
    pub manifest: Manifest,
    /// manifest.json's exact bytes (what `manifest.auth` authenticates).
    pub manifest_raw: Vec<u8>,
    /// `manifest.auth`, parsed (None in format 1).
    pub seal: Option<crate::backup::auth::Seal>,
    /// secrets.env as stored.
    pub secrets: Vec<u8>,
    /// Size of the (plaintext) file.
    pub size: u64,
}

/// The file could not be used; the text says why and what to do.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Refused {}

/// Starts with the age header.
pub fn is_age(path: &Path) -> bool {
    let mut head = [0u8; 21];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head == b"age-encryption.org/v1"
}

/// Reads the whole file, checks every byte (see the module comment) and, when asked,
/// extracts db.dump and the uploads while reading. On any problem returns a
/// [`Refused`] (the file's fault) or another error (ours, e.g. the staging disk is
/// full); what was extracted is the caller's to remove either way.
pub fn check(path: &Path, extract: &Extract) -> Result<Checked> {
    let mut seen = Progress::default();
    let r = check_inner(path, extract, &mut seen);
    match r {
        // A newer format may lay things out differently: say so rather than "damaged".
        Err(_) if seen.magic_format > FORMAT && !seen.manifest_verified => Err(Refused(format!(
            "{}: {}",
            path.display(),
            newer_format(seen.magic_format)
        ))
        .into()),
        r => r,
    }
}

#[derive(Default)]
struct Progress {
    magic_format: u32,
    manifest_verified: bool,
}

fn check_inner(path: &Path, extract: &Extract, progress: &mut Progress) -> Result<Checked> {
    let shown = path.display().to_string();
    let refuse = |why: String| -> anyhow::Error { Refused(format!("{shown}: {why}")).into() };
    let file = File::open(path).with_context(|| {
        format!(
            "cannot read {shown} (as the user koprogo runs as): check the path and its permissions"
        )
    })?;
    let len = file
        .metadata()
        .with_context(|| format!("cannot stat {shown}"))?
        .len();
    let mut head = [0u8; 64];
    let got = (&file).read(&mut head).unwrap_or(0);
    let head = &head[..got];
    if head.starts_with(b"age-encryption.org/v1") {
        return Err(refuse(
            "encrypted with age: pass --identity FILE (the key that decrypts it)".into(),
        ));
    }
    let ours = head.starts_with(MAGIC_NAME.as_bytes());
    if !ours {
        return Err(refuse(
            "not a koprogo backup (it does not start with the KOPROGO-BACKUP member): \
             pass a file made by `koprogo backup create`"
                .into(),
        ));
    }
    let file = File::open(path).with_context(|| format!("cannot read {shown}"))?;
    let state = Rc::new(RefCell::new(LagState {
        hasher: Sha256::new(),
        lag: Vec::new(),
        pos: 0,
    }));
    let reader = LagReader {
        inner: BufReader::with_capacity(1 << 20, file),
        state: state.clone(),
    };
    let damaged = |detail: String| -> anyhow::Error {
        Refused(format!(
            "{shown}: damaged or truncated ({detail}): nothing was restored from it; \
             use another backup (`koprogo backup list`)"
        ))
        .into()
    };
    let mut archive = tar::Archive::new(reader);
    let mut seen: Vec<Member> = Vec::new();
    let mut secrets = Vec::new();
    let mut manifest_bytes: Option<(Vec<u8>, String)> = None;
    let mut manifest_sum: Option<Vec<u8>> = None;
    let mut seal: Option<crate::backup::auth::Seal> = None;
    let mut end_of_last: u64 = 0;
    let mut index = 0usize;
    if let Some(dir) = &extract.uploads_to {
        std::fs::DirBuilder::new()
            .mode(0o750)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    {
        let entries = archive
            .entries()
            .map_err(|e| damaged(format!("unreadable tar: {e}")))?
            .raw(true);
        // A GNU long name read for the member that follows it.
        let mut long_name: Option<Vec<u8>> = None;
        for entry in entries {
            let mut entry = entry.map_err(|e| damaged(e.to_string()))?;
            if let Some(kind) = extension(entry.header().entry_type()) {
                let at = entry.raw_header_position();
                let size = entry.size();
                let kind = format!(
                    "{kind} {:?}",
                    String::from_utf8_lossy(&entry.header().path_bytes())
                );
                if size > MAX_EXTENSION {
                    return Err(refuse(format!(
                        "its {kind} at byte {at} claims {size} bytes, over the {} KiB a koprogo \
                         backup ever needs: refused without reading it; not a file made by \
                         `koprogo backup create`",
                        MAX_EXTENSION >> 10
                    )));
                }
                if !entry.header().entry_type().is_gnu_longname() {
                    return Err(refuse(format!(
                        "its {kind} at byte {at} is not read (koprogo backups have none): \
                         not a file made by `koprogo backup create`"
                    )));
                }
                if long_name.is_some() {
                    return Err(damaged(format!("two long names in a row at byte {at}")));
                }
                let mut name = Vec::with_capacity(size as usize);
                entry
                    .read_to_end(&mut name)
                    .map_err(|e| damaged(e.to_string()))?;
                // GNU tar ends the name with a NUL.
                while name.last() == Some(&0) {
                    name.pop();
                }
                long_name = Some(name);
                continue;
            }
            let raw = match long_name.take() {
                Some(name) => name,
                None => entry.path_bytes().into_owned(),
            };
            let name = String::from_utf8_lossy(&raw)
                .trim_end_matches('/')
                .to_string();
            let size = entry.size();
            let kind = entry.header().entry_type();
            end_of_last = entry.raw_file_position() + size.div_ceil(BLOCK as u64) * BLOCK as u64;
            if index == 0 {
                index += 1;
                if name != MAGIC_NAME || size > 256 {
                    return Err(refuse("not a koprogo backup (no KOPROGO-BACKUP member first): pass a file made by `koprogo backup create`".into()));
                }
                let mut text = String::new();
                entry
                    .read_to_string(&mut text)
                    .map_err(|e| damaged(e.to_string()))?;
                let format = text
                    .lines()
                    .find_map(|l| l.strip_prefix("format "))
                    .and_then(|v| v.trim().parse::<u32>().ok())
                    .ok_or_else(|| damaged("unreadable KOPROGO-BACKUP member".into()))?;
                progress.magic_format = format;
                continue;
            }
            index += 1;
            if manifest_sum.is_some() && name == MANIFEST_AUTH && seal.is_none() {
                if size != BLOCK as u64 {
                    return Err(damaged("manifest.auth of the wrong size".into()));
                }
                let mut buf = Vec::with_capacity(BLOCK);
                entry
                    .read_to_end(&mut buf)
                    .map_err(|e| damaged(e.to_string()))?;
                seal = Some(
                    crate::backup::auth::parse_seal(&buf)
                        .ok_or_else(|| damaged("unreadable manifest.auth".into()))?,
                );
                continue;
            }
            if manifest_sum.is_some() {
                return Err(damaged(format!(
                    "unexpected member {name:?} after the manifest"
                )));
            }
            if name == MANIFEST && manifest_bytes.is_none() {
                // The lag hasher has consumed exactly this header past the covered bytes.
                let header_at = entry.raw_header_position();
                let covered = {
                    let s = state.borrow();
                    if s.pos != header_at + BLOCK as u64 {
                        return Err(damaged("unexpected layout before the manifest".into()));
                    }
                    hex::encode(s.hasher.clone().finalize())
                };
                if size > MAX_MANIFEST || size % BLOCK as u64 != 0 {
                    return Err(damaged(format!("manifest of {size} bytes")));
                }
                let mut buf = Vec::with_capacity(size as usize);
                entry
                    .read_to_end(&mut buf)
                    .map_err(|e| damaged(e.to_string()))?;
                manifest_bytes = Some((buf, covered));
                continue;
            }
            if name == MANIFEST_SUM && manifest_bytes.is_some() {
                if size != BLOCK as u64 {
                    return Err(damaged("manifest checksum of the wrong size".into()));
                }
                let mut buf = Vec::with_capacity(BLOCK);
                entry
                    .read_to_end(&mut buf)
                    .map_err(|e| damaged(e.to_string()))?;
                manifest_sum = Some(buf);
                continue;
            }
            if manifest_bytes.is_some() {
                return Err(damaged(format!(
                    "unexpected member {name:?} after the manifest"
                )));
            }
            let is_dir = kind == tar::EntryType::Directory;
            if !is_dir && kind != tar::EntryType::Regular {
                return Err(damaged(format!("{name}: not a regular file or directory")));
            }
            let member = if name == DUMP && !is_dir {
                let out = match &extract.dump_to {
                    Some(p) => Some(new_file(p, 0o600)?),
                    None => None,
                };
                copy_hashed(&mut entry, out, &name, &damaged)?
            } else if name == SECRETS && !is_dir {
                if size > MAX_SECRETS {
                    return Err(damaged(format!("secrets.env of {size} bytes")));
                }
                let mut h = Sha256::new();
                entry
                    .read_to_end(&mut secrets)
                    .map_err(|e| damaged(e.to_string()))?;
                h.update(&secrets);
                Member {
                    name: name.clone(),
                    kind: "file".into(),
                    size: secrets.len() as u64,
                    sha256: hex::encode(h.finalize()),
                }
            } else if name == UPLOADS && is_dir {
                Member {
                    name: name.clone(),
                    kind: "dir".into(),
                    size: 0,
                    sha256: String::new(),
                }
            } else if let Some(rel) = name.strip_prefix("uploads/") {
                let rel =
                    safe_relative(rel).ok_or_else(|| damaged(format!("unsafe path {name:?}")))?;
                let target = extract.uploads_to.as_ref().map(|d| d.join(&rel));
                if is_dir {
                    if let Some(t) = &target {
                        std::fs::DirBuilder::new()
                            .mode(0o750)
                            .recursive(true)
                            .create(t)
                            .with_context(|| format!("cannot create {}", t.display()))?;
                    }
                    Member {
                        name: name.clone(),
                        kind: "dir".into(),
                        size: 0,
                        sha256: String::new(),
                    }
                } else {
                    let mtime = entry.header().mtime().unwrap_or(0);
                    let out = match &target {
                        Some(t) => {
                            if let Some(parent) = t.parent() {
                                std::fs::DirBuilder::new()
                                    .mode(0o750)
                                    .recursive(true)
                                    .create(parent)
                                    .with_context(|| {
                                        format!("cannot create {}", parent.display())
                                    })?;
                            }
                            Some(new_file(t, 0o640)?)
                        }
                        None => None,
                    };
                    let m = copy_hashed(&mut entry, out, &name, &damaged)?;
                    if let Some(t) = &target {
                        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(t) {
                            let when =
                                std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
                            let _ = f.set_modified(when);
                        }
                    }
                    m
                }
            } else {
                return Err(refuse(format!(
                    "unexpected member {name:?}: not a koprogo backup of format {FORMAT}"
                )));
            };
            seen.push(member);
        }
        if long_name.is_some() {
            return Err(damaged("a long name with no member after it".into()));
        }
    }
    if index == 0 {
        return Err(refuse("empty or not a tar archive".into()));
    }
    let Some((manifest_raw, covered)) = manifest_bytes else {
        return Err(damaged("the manifest at its end is missing".into()));
    };
    let Some(sum) = manifest_sum else {
        return Err(damaged(
            "the manifest's checksum at its end is missing".into(),
        ));
    };
    // After the last member: zero blocks only, at least two.
    let mut rest = archive.into_inner();
    let mut tail = Vec::new();
    rest.read_to_end(&mut tail)
        .map_err(|e| damaged(e.to_string()))?;
    let consumed = state.borrow().pos;
    if consumed != len {
        return Err(damaged(format!("read {consumed} of {len} bytes")));
    }
    if len < end_of_last + 2 * BLOCK as u64 || tail.iter().any(|&b| b != 0) {
        return Err(damaged(
            "the end of the archive is missing or not zeros".into(),
        ));
    }
    let sum_text = std::str::from_utf8(&sum).unwrap_or("");
    let want = sum_text.trim_end_matches(' ').trim_end_matches('\n');
    if want.len() != 64
        || !sum_text[64..].starts_with('\n')
        || sum_text[65..].bytes().any(|b| b != b' ')
        || want != hex::encode(Sha256::digest(&manifest_raw))
    {
        return Err(damaged("manifest checksum mismatch".into()));
    }
    progress.manifest_verified = true;
    let value: serde_json::Value = serde_json::from_slice(&manifest_raw)
        .map_err(|e| damaged(format!("unreadable manifest: {e}")))?;
    let format = value.get("format").and_then(|v| v.as_u64()).unwrap_or(0);
    if format > FORMAT as u64 {
        return Err(refuse(newer_format(format as u32)));
    }
    if value.get("kind").and_then(|v| v.as_str()) != Some("koprogo-backup") {
        return Err(refuse("not a koprogo backup (manifest kind)".into()));
    }
    let manifest: Manifest =
        serde_json::from_value(value).map_err(|e| damaged(format!("unreadable manifest: {e}")))?;
    if manifest.members.len() != seen.len() {
        return Err(damaged(format!(
            "{} members found, the manifest lists {}",
            seen.len(),
            manifest.members.len()
        )));
    }
    for (got, want) in seen.iter().zip(&manifest.members) {
        if got != want {
            let why = if got.name != want.name {
                format!(
                    "found {:?} where the manifest lists {:?}",
                    got.name, want.name
                )
            } else if got.size != want.size {
                format!(
                    "{}: {} bytes, the manifest says {}",
                    got.name, got.size, want.size
                )
            } else {
                format!("{}: checksum mismatch", got.name)
            };
            return Err(damaged(why));
        }
    }
    if manifest.archive_sha256 != covered {
        return Err(damaged("archive checksum mismatch".into()));
    }
    for required in [DUMP, SECRETS] {
        if !seen.iter().any(|m| m.name == required) {
            return Err(damaged(format!("no {required} member")));
        }
    }
    if seal.is_none() && manifest.format >= 2 {
        return Err(damaged(
            "the manifest's authentication at its end is missing".into(),
        ));
    }
    Ok(Checked {
        manifest,
        manifest_raw,
        seal,
        secrets,
        size: len,
    })
}

fn new_file(p: &Path, mode: u32) -> Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(p)
        .with_context(|| format!("cannot create {}", p.display()))
}

/// Copies an entry's data (to `out` when given) while hashing it.
fn copy_hashed(
    entry: &mut dyn Read,
    out: Option<File>,
    name: &str,
    damaged: &dyn Fn(String) -> anyhow::Error,
) -> Result<Member> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut size = 0u64;
    let mut out = out.map(|f| BufWriter::with_capacity(1 << 20, f));
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(damaged(format!("{name}: {e}"))),
        };
        h.update(&buf[..n]);
        size += n as u64;
        if let Some(w) = out.as_mut() {
            w.write_all(&buf[..n])
                .map_err(|e| anyhow!("cannot write the extracted {name}: {e}"))?;
        }
    }
    if let Some(w) = out {
        let f = w
            .into_inner()
            .map_err(|e| anyhow!("cannot write the extracted {name}: {}", e.error()))?;
        f.sync_all()
            .map_err(|e| anyhow!("cannot write the extracted {name}: {e}"))?;
    }
    Ok(Member {
        name: name.to_string(),
        kind: "file".into(),
        size,
        sha256: hex::encode(h.finalize()),
    })
}

/// `a/b/c` with only normal components (no `..`, no absolute path, nothing empty).
pub(super) fn safe_relative(rel: &str) -> Option<PathBuf> {
    if rel.is_empty() || rel.contains('\0') {
        return None;
    }
    let p = Path::new(rel);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}
