//! The backup file: a plain tar that any `tar` can list, laid out so that every byte
//! is checked before anything is restored.
//!
//! ```text
//! KOPROGO-BACKUP      "koprogo backup\nformat 2\n"   (first: identifies the file)
//! db.dump             pg_dump -Fc of database koprogo
//! secrets.env         <state>/secrets.env
//! uploads/…           the uploads directory (directories and regular files)
//! manifest.json       versions, row counts, and per member: name, size, sha256;
//!                     plus archive_sha256 = sha256 of every byte before its header.
//!                     Padded with spaces to a multiple of 512 bytes (no tar padding).
//! manifest.sha256     sha256 of manifest.json, hex + "\n", spaces up to 512 bytes
//! manifest.auth       "hmac-sha256 <key id> <hex>\n", spaces up to 512 bytes: who
//!                     made it (see [`super::auth`]); format 2 on, absent in format 1
//! (two or more zero blocks)
//! ```
//!
//! So a flipped byte anywhere is caught: before the manifest by `archive_sha256`,
//! in the manifest by `manifest.sha256`, in a tar header by its own checksum, and
//! after the last member by the zero check. A truncated file has no manifest.
//!
//! Tar extension headers are read by us, not by the tar crate (which reads each one
//! whole into memory): a GNU long name (`L`, what the tar crate writes for a name
//! over 100 bytes) up to [`MAX_EXTENSION`] bytes names the next member; a larger one,
//! and any other kind (PAX `x`/`g`, GNU long link `K`: we write none), is refused
//! from its header, before its data is read.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The format this koprogo writes and the newest it reads (1: before
/// `manifest.auth`; such files are read, but are not authenticated).
pub const FORMAT: u32 = 2;
pub const MAGIC_NAME: &str = "KOPROGO-BACKUP";
pub const DUMP: &str = "db.dump";
pub const SECRETS: &str = "secrets.env";
pub const UPLOADS: &str = "uploads";
pub const MANIFEST: &str = "manifest.json";
pub const MANIFEST_SUM: &str = "manifest.sha256";
pub const MANIFEST_AUTH: &str = "manifest.auth";
const BLOCK: usize = 512;
const MAX_MANIFEST: u64 = 256 << 20;
const MAX_SECRETS: u64 = 1 << 20;
/// Largest tar extension header read (a member name is at most a few KiB).
pub const MAX_EXTENSION: u64 = 64 << 10;

/// What the backup holds, written last (see the module comment).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub kind: String,
    /// RFC 3339 UTC.
    pub created: String,
    pub created_unix: i64,
    /// "scheduled", "manual" or "pre-restore".
    pub reason: String,
    pub koprogo_version: String,
    pub domain: String,
    pub postgres: PgInfo,
    /// Schema versions of the application found in the database (e.g. the max
    /// version of `_sqlx_migrations`, or `demo_schema` for the demo backend).
    #[serde(default)]
    pub schema: BTreeMap<String, i64>,
    pub uploads: UploadsInfo,
    /// Names of the keys in secrets.env (not their values).
    pub secrets: Vec<String>,
    /// sha256 of every byte of the archive before manifest.json's header.
    pub archive_sha256: String,
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PgInfo {
    pub major: u32,
    pub version: String,
    pub database: String,
    pub database_bytes: i64,
    /// Exact row count of every table, taken in the snapshot pg_dump used.
    pub tables: BTreeMap<String, i64>,
    pub rows: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UploadsInfo {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    /// Entries not backed up (symbolic links, sockets…), with the reason.
    #[serde(default)]
    pub skipped: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    /// "file" or "dir".
    pub kind: String,
    pub size: u64,
    /// Hex sha256 of the data ("" for directories).
    pub sha256: String,
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where the archive goes: a plain file, or an age stream to the recipients.
pub enum Sink {
    Plain(BufWriter<File>),
    Age(age::stream::StreamWriter<BufWriter<File>>),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Plain(w) => w.write(buf),
            Sink::Age(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.flush(),
            Sink::Age(w) => w.flush(),
        }
    }
}

impl Sink {
    /// Ends the stream (the age trailer) and returns the file, flushed.
    fn finish(self) -> io::Result<File> {
        let buf = match self {
            Sink::Plain(w) => w,
            Sink::Age(w) => w.finish()?,
        };
        buf.into_inner().map_err(|e| e.into_error())
    }
}

/// Counts and hashes what goes through to the sink (the plaintext tar stream).
struct HashWriter {
    inner: Sink,
    hasher: Sha256,
    written: u64,
}

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads exactly `remaining` bytes of `inner` (an error if it ends early: the file
/// shrank while being backed up), hashing them.
struct ExactHash<'a> {
    inner: &'a mut dyn Read,
    remaining: u64,
    hasher: Sha256,
}

impl Read for ExactHash<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file became shorter while it was being backed up",
            ));
        }
        self.hasher.update(&buf[..n]);
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Builds one backup archive.
pub struct Writer {
    builder: tar::Builder<HashWriter>,
    members: Vec<Member>,
}

impl Writer {
    /// Starts the archive with its identifying first member.
    pub fn new(sink: Sink) -> io::Result<Writer> {
        let mut builder = tar::Builder::new(HashWriter {
            inner: sink,
            hasher: Sha256::new(),
            written: 0,
        });
        builder.mode(tar::HeaderMode::Deterministic);
        let mut w = Writer {
            builder,
            members: Vec::new(),
        };
        let magic = format!("koprogo backup\nformat {FORMAT}\n");
        w.append(MAGIC_NAME, magic.as_bytes(), 0o644, 0, false)?;
        Ok(w)
    }

    fn append(
        &mut self,
        name: &str,
        mut data: &[u8],
        mode: u32,
        mtime: u64,
        record: bool,
    ) -> io::Result<()> {
        let size = data.len() as u64;
        self.add_file_inner(name, &mut data, size, mode, mtime, record)
    }

    /// A small member from memory.
    pub fn add_bytes(&mut self, name: &str, data: &[u8], mode: u32, mtime: u64) -> io::Result<()> {
        self.append(name, data, mode, mtime, true)
    }

    /// A regular file of exactly `size` bytes read from `src`.
    pub fn add_file(
        &mut self,
        name: &str,
        src: &mut dyn Read,
        size: u64,
        mode: u32,
        mtime: u64,
    ) -> io::Result<()> {
        self.add_file_inner(name, src, size, mode, mtime, true)
    }

    fn add_file_inner(
        &mut self,
        name: &str,
        src: &mut dyn Read,
        size: u64,
        mode: u32,
        mtime: u64,
        record: bool,
    ) -> io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(size);
        h.set_mode(mode);
        h.set_mtime(mtime);
        h.set_uid(0);
        h.set_gid(0);
        let mut exact = ExactHash {
            inner: src,
            remaining: size,
            hasher: Sha256::new(),
        };
        self.builder.append_data(&mut h, name, &mut exact)?;
        if record {
            self.members.push(Member {
                name: name.to_string(),
                kind: "file".into(),
                size,
                sha256: hex(&exact.hasher.finalize()),
            });
        }
        Ok(())
    }

    pub fn add_dir(&mut self, name: &str, mode: u32, mtime: u64) -> io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(mode);
        h.set_mtime(mtime);
        h.set_uid(0);
        h.set_gid(0);
        self.builder
            .append_data(&mut h, format!("{name}/"), io::empty())?;
        self.members.push(Member {
            name: name.to_string(),
            kind: "dir".into(),
            size: 0,
            sha256: String::new(),
        });
        Ok(())
    }

    /// Writes the manifest (completing `manifest` with the members and the archive
    /// checksum), its checksum, its authentication under `key` and the end of the
    /// archive; returns the file, flushed but not yet synced, and the plaintext size.
    pub fn finish(
        mut self,
        manifest: &mut Manifest,
        key: &super::auth::Key,
    ) -> io::Result<(File, u64)> {
        manifest.archive_sha256 = hex(&self.builder.get_ref().hasher.clone().finalize());
        manifest.members = std::mem::take(&mut self.members);
        let mut json = serde_json::to_vec_pretty(manifest).map_err(io::Error::other)?;
        json.push(b'\n');
        pad_spaces(&mut json, BLOCK);
        let sum = hex(&Sha256::digest(&json));
        self.append(
            MANIFEST,
            &json,
            0o644,
            manifest.created_unix.max(0) as u64,
            false,
        )?;
        let seal = key.seal(&json);
        for (name, text) in [(MANIFEST_SUM, format!("{sum}\n")), (MANIFEST_AUTH, seal)] {
            let mut line = text.into_bytes();
            line.resize(BLOCK, b' ');
            self.append(
                name,
                &line,
                0o644,
                manifest.created_unix.max(0) as u64,
                false,
            )?;
        }
        let hw = self.builder.into_inner()?;
        let size = hw.written;
        Ok((hw.inner.finish()?, size))
    }
}

fn pad_spaces(v: &mut Vec<u8>, block: usize) {
    let rem = v.len() % block;
    if rem != 0 {
        v.resize(v.len() + block - rem, b' ');
    }
}

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
    pub seal: Option<super::auth::Seal>,
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
    let mut seal: Option<super::auth::Seal> = None;
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
                    super::auth::parse_seal(&buf)
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
                    hex(&s.hasher.clone().finalize())
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
                    sha256: hex(&h.finalize()),
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
        || want != hex(&Sha256::digest(&manifest_raw))
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

/// The kind of a tar extension header (it describes the member after it), or None.
fn extension(t: tar::EntryType) -> Option<&'static str> {
    if t.is_gnu_longname() {
        Some("GNU long name ('L')")
    } else if t.is_gnu_longlink() {
        Some("GNU long link name ('K')")
    } else if t.is_pax_local_extensions() {
        Some("PAX extended header ('x')")
    } else if t.is_pax_global_extensions() {
        Some("PAX global header ('g')")
    } else {
        None
    }
}

fn newer_format(n: u32) -> String {
    format!(
        "made by a newer koprogo (backup format {n}; this koprogo reads format {FORMAT} and older): \
         upgrade koprogo first, nothing was changed"
    )
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
        sha256: hex(&h.finalize()),
    })
}

/// `a/b/c` with only normal components (no `..`, no absolute path, nothing empty).
fn safe_relative(rel: &str) -> Option<PathBuf> {
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

/// Parses secrets.env as stored in a backup: the keys the data depends on must be
/// there and well-formed. Returns the key names.
pub fn check_secrets(text: &[u8]) -> Result<Vec<String>> {
    let text = std::str::from_utf8(text).map_err(|_| anyhow!("secrets.env is not UTF-8"))?;
    let mut keys = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            bail!("secrets.env: a line is not KEY=VALUE");
        };
        keys.insert(k.trim().to_string(), v.trim().to_string());
    }
    use crate::secrets::{ENERGY_KEY, JWT_SECRET, TOTP_KEY};
    for k in [JWT_SECRET, TOTP_KEY, ENERGY_KEY] {
        let Some(v) = keys.get(k) else {
            bail!("secrets.env has no {k}");
        };
        let ok = if k == JWT_SECRET {
            v.len() >= 32
        } else {
            v.len() == 64 && v.chars().all(|c| c.is_ascii_hexdigit())
        };
        if !ok {
            bail!("secrets.env: {k} is malformed");
        }
    }
    Ok(keys.into_keys().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            format: FORMAT,
            kind: "koprogo-backup".into(),
            created: "2026-01-01T00:00:00Z".into(),
            created_unix: 1_767_225_600,
            reason: "manual".into(),
            koprogo_version: "test".into(),
            domain: "localhost".into(),
            postgres: PgInfo::default(),
            schema: BTreeMap::new(),
            uploads: UploadsInfo::default(),
            secrets: Vec::new(),
            archive_sha256: String::new(),
            members: Vec::new(),
        }
    }

    const SECRETS_TEXT: &str = "JWT_SECRET=0123456789abcdef0123456789abcdef0123\n\
        TOTP_ENCRYPTION_KEY=0000000000000000000000000000000000000000000000000000000000000000\n\
        ENERGY_ENCRYPTION_MASTER_KEY=1111111111111111111111111111111111111111111111111111111111111111\n";

    fn write_sample(path: &Path) -> u64 {
        let f = std::fs::File::create(path).expect("create");
        let mut w = Writer::new(Sink::Plain(BufWriter::new(f))).expect("writer");
        let dump = vec![7u8; 100_000];
        w.add_file(DUMP, &mut &dump[..], dump.len() as u64, 0o600, 0)
            .expect("dump");
        w.add_bytes(SECRETS, SECRETS_TEXT.as_bytes(), 0o600, 0)
            .expect("secrets");
        w.add_dir(UPLOADS, 0o750, 0).expect("dir");
        w.add_dir("uploads/a", 0o750, 0).expect("dir");
        let long = format!("uploads/a/{}.pdf", "x".repeat(150));
        w.add_bytes(&long, b"pdf", 0o640, 0).expect("file");
        let mut m = manifest();
        let key = super::super::auth::Key::from_hex(&"5a".repeat(32)).expect("key");
        let (f, n) = w.finish(&mut m, &key).expect("finish");
        f.sync_all().expect("sync");
        n
    }

    #[test]
    fn round_trip_and_every_flipped_byte_is_caught() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("b.kbk");
        let n = write_sample(&p);
        assert_eq!(std::fs::metadata(&p).expect("meta").len(), n);
        let up = d.path().join("up");
        let c = check(
            &p,
            &Extract {
                dump_to: Some(d.path().join("dump")),
                uploads_to: Some(up.clone()),
            },
        )
        .expect("good file passes");
        assert_eq!(c.manifest.members.len(), 5);
        assert!(c.seal.is_some(), "format 2 carries manifest.auth");
        assert_eq!(
            std::fs::read(d.path().join("dump")).expect("dump").len(),
            100_000
        );
        let long = up.join("a").join(format!("{}.pdf", "x".repeat(150)));
        assert_eq!(std::fs::read(long).expect("long name"), b"pdf");
        assert_eq!(check_secrets(&c.secrets).expect("secrets").len(), 3);

        // Flip one byte at a spread of offsets, padding and headers included.
        let good = std::fs::read(&p).expect("read");
        let q = d.path().join("bad.kbk");
        let step = (good.len() / 97).max(1);
        let mut offsets: Vec<usize> = (0..good.len()).step_by(step).collect();
        offsets.extend([good.len() - 1, good.len() - 1100, 600, 100_000 + 1000]);
        for at in offsets {
            let mut bad = good.clone();
            bad[at] ^= 0x20;
            std::fs::write(&q, &bad).expect("write");
            let e = check(&q, &Extract::default()).expect_err(&format!("flip at {at} accepted"));
            assert!(e.is::<Refused>(), "flip at {at}: {e:#}");
        }
        for cut in [good.len() / 2, good.len() - 1024, good.len() - 1, 100] {
            std::fs::write(&q, &good[..cut]).expect("write");
            let e = check(&q, &Extract::default()).expect_err("truncated accepted");
            assert!(
                format!("{e:#}").contains("damaged or truncated"),
                "{cut}: {e:#}"
            );
        }
        std::fs::write(&q, b"hello, not a backup").expect("write");
        let e = check(&q, &Extract::default()).expect_err("foreign accepted");
        assert!(format!("{e:#}").contains("not a koprogo backup"), "{e:#}");
    }

    /// A tar header of `kind` named `name` claiming `size` bytes, then `data`.
    fn raw_member(out: &mut Vec<u8>, kind: u8, name: &str, size: u64, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_path(name).expect("name");
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        pad_zeros(out);
    }

    fn pad_zeros(v: &mut Vec<u8>) {
        let rem = v.len() % BLOCK;
        if rem != 0 {
            v.resize(v.len() + BLOCK - rem, 0);
        }
    }

    /// The first member of a real backup, then `rest`, then the end of the archive.
    fn crafted(rest: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let magic = format!("koprogo backup\nformat {FORMAT}\n");
        raw_member(
            &mut out,
            b'0',
            MAGIC_NAME,
            magic.len() as u64,
            magic.as_bytes(),
        );
        out.extend_from_slice(rest);
        out.resize(out.len() + 2 * BLOCK, 0);
        out
    }

    #[test]
    fn extension_headers_are_bounded_and_read_by_us() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("x.kbk");
        let check_bytes = |bytes: &[u8]| {
            std::fs::write(&p, bytes).expect("write");
            let e = check(&p, &Extract::default()).expect_err("crafted file accepted");
            assert!(e.is::<Refused>(), "{e:#}");
            format!("{e:#}")
        };
        // Claims larger than the bound are refused from the header alone (none of
        // these files holds the bytes it claims).
        for (kind, what) in [
            (b'x', "PAX extended header ('x')"),
            (b'g', "PAX global header ('g')"),
            (b'L', "GNU long name ('L')"),
            (b'K', "GNU long link name ('K')"),
        ] {
            let mut rest = Vec::new();
            raw_member(&mut rest, kind, "././@LongLink", 4 << 30, b"");
            let e = check_bytes(&crafted(&rest));
            assert!(
                e.contains(&p.display().to_string())
                    && e.contains(what)
                    && e.contains("at byte 1024")
                    && e.contains("claims 4294967296 bytes")
                    && e.contains("64 KiB"),
                "{e}"
            );
        }
        // Within the bound: a PAX header is still not ours.
        let mut rest = Vec::new();
        raw_member(
            &mut rest,
            b'x',
            "PaxHeaders/db.dump",
            28,
            b"28 path=uploads/../../etc/x\n",
        );
        let e = check_bytes(&crafted(&rest));
        assert!(
            e.contains("PAX extended header") && e.contains("not read"),
            "{e}"
        );
        // A long name must name a member.
        let mut rest = Vec::new();
        raw_member(&mut rest, b'L', "././@LongLink", 8, b"db.dump\0");
        let e = check_bytes(&crafted(&rest));
        assert!(e.contains("long name with no member after it"), "{e}");
        let mut rest = Vec::new();
        raw_member(&mut rest, b'L', "././@LongLink", 8, b"db.dump\0");
        raw_member(&mut rest, b'L', "././@LongLink", 8, b"db.dump\0");
        let e = check_bytes(&crafted(&rest));
        assert!(e.contains("two long names in a row"), "{e}");
        // A long name is what names the member (not the header's 100-byte field).
        let mut rest = Vec::new();
        raw_member(&mut rest, b'L', "././@LongLink", 12, b"uploads/../x");
        raw_member(&mut rest, b'0', "uploads/ok", 1, b"x");
        let e = check_bytes(&crafted(&rest));
        assert!(e.contains("unsafe path \"uploads/../x\""), "{e}");
    }

    #[test]
    fn unsafe_paths_are_refused() {
        assert!(safe_relative("a/b.pdf").is_some());
        assert!(safe_relative("../etc/passwd").is_none());
        assert!(safe_relative("/etc/passwd").is_none());
        assert!(safe_relative("a/../../x").is_none());
        assert!(safe_relative("").is_none());
    }
}
