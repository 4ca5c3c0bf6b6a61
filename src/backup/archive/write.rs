//! Writing a backup: the [`Writer`] that lays the members out, hashes each one and
//! the whole stream, and ends with the manifest, its checksum and its seal.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};

use sha2::{Digest, Sha256};

use super::format::{
    Manifest, Member, BLOCK, FORMAT, MAGIC_NAME, MANIFEST, MANIFEST_AUTH, MANIFEST_SUM,
};

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
        let mut h = header(tar::EntryType::Regular, size, mode, mtime);
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
                sha256: hex::encode(exact.hasher.finalize()),
            });
        }
        Ok(())
    }

    pub fn add_dir(&mut self, name: &str, mode: u32, mtime: u64) -> io::Result<()> {
        let mut h = header(tar::EntryType::Directory, 0, mode, mtime);
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
        key: &crate::backup::auth::Key,
    ) -> io::Result<(File, u64)> {
        manifest.archive_sha256 = hex::encode(self.builder.get_ref().hasher.clone().finalize());
        manifest.members = std::mem::take(&mut self.members);
        let mut json = serde_json::to_vec_pretty(manifest).map_err(io::Error::other)?;
        json.push(b'\n');
        pad_spaces(&mut json, BLOCK);
        let sum = hex::encode(Sha256::digest(&json));
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

/// A GNU tar header owned by root (uid and gid 0).
fn header(kind: tar::EntryType, size: u64, mode: u32, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(mtime);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn pad_spaces(v: &mut Vec<u8>, block: usize) {
    let rem = v.len() % block;
    if rem != 0 {
        v.resize(v.len() + block - rem, b' ');
    }
}
