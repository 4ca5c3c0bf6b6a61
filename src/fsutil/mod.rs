//! Durable file writes shared by every part that keeps state: temp file in the same
//! directory, fsync, rename, fsync of the directory. A crash leaves the old file or
//! the new one, never half of either.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

pub mod tree;
pub mod walk;

/// Writes `data` to `path` atomically with permission bits `mode`.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A fresh name, created exclusively and never through a link: whatever someone
    // planted under a guessable name is not written through.
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if let Err(e) = &result {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    result
}

/// Reads a whole file the service user may control, bounded: the last component is
/// not followed if it is a symlink (`O_NOFOLLOW`), anything but a regular file (a
/// FIFO, `/dev/zero`) is refused without blocking, and a file over `max` bytes is
/// refused instead of filling the memory.
pub fn read_bounded(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => Error::new(
                ErrorKind::InvalidData,
                "is a symbolic link, which is not followed here: replace it with the file",
            ),
            _ => e,
        })?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(Error::new(
            ErrorKind::InvalidData,
            "is not a regular file: replace it with the file",
        ));
    }
    if meta.len() > max {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("is {} bytes, more than the {max} it may have", meta.len()),
        ));
    }
    let mut data = Vec::with_capacity(meta.len() as usize);
    f.take(max + 1).read_to_end(&mut data)?;
    if data.len() as u64 > max {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("grew past the {max} bytes it may have while being read"),
        ));
    }
    Ok(data)
}

/// [`read_bounded`] as UTF-8 text.
pub fn read_bounded_string(path: &Path, max: u64) -> std::io::Result<String> {
    String::from_utf8(read_bounded(path, max)?)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "is not UTF-8 text"))
}

/// Creates `dir` if missing and sets its mode. Missing parents are created 0755, so
/// the service user can reach a directory that root created for it. The path is
/// walked without following links anyone but root (or we) could have planted
/// ([`walk::open_dir`]), and the mode is set on the directory's descriptor.
pub fn ensure_dir(dir: &Path, mode: u32) -> std::io::Result<()> {
    ensure_dir_fd(dir, mode).map(drop)
}

/// [`ensure_dir`], returning the directory's descriptor (for `fchown`, `openat`).
pub fn ensure_dir_fd(dir: &Path, mode: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsRawFd;
    let fd = walk::open_dir(dir, Some((0o755, mode)))?;
    nix::sys::stat::fchmod(
        fd.as_raw_fd(),
        nix::sys::stat::Mode::from_bits_truncate(mode),
    )?;
    Ok(fd)
}

/// Size, used and available bytes of the filesystem holding `path`, the way `df`
/// counts them: used = size - free; available = what unprivileged users may still
/// write (the root reserve excluded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskUsage {
    pub size: u64,
    pub used: u64,
    pub available: u64,
}

impl DiskUsage {
    /// Used share as `df`'s Use%: used / (used + available), 0..=1.
    pub fn used_ratio(&self) -> f64 {
        let denom = self.used + self.available;
        if denom == 0 {
            0.0
        } else {
            self.used as f64 / denom as f64
        }
    }
}

pub fn disk_usage(path: &Path) -> std::io::Result<DiskUsage> {
    let fs = nix::sys::statvfs::statvfs(path)?;
    let frag = fs.fragment_size() as u64;
    let size = fs.blocks() as u64 * frag;
    let free = fs.blocks_free() as u64 * frag;
    Ok(DiskUsage {
        size,
        used: size.saturating_sub(free),
        available: fs.blocks_available() as u64 * frag,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_write_replaces_with_mode() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("secret");
        write_atomic(&p, b"one", 0o600).expect("write");
        write_atomic(&p, b"two", 0o600).expect("rewrite");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            std::fs::read_dir(d.path()).expect("ls").count(),
            1,
            "no temp left"
        );
    }

    #[test]
    fn bounded_reads_refuse_links_devices_fifos_and_big_files() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("f");
        std::fs::write(&p, b"0123456789").expect("write");
        assert_eq!(read_bounded(&p, 10).expect("fits"), b"0123456789");
        let e = read_bounded(&p, 9).expect_err("too big");
        assert!(e.to_string().contains("more than the 9"), "{e}");
        let link = d.path().join("link");
        std::os::unix::fs::symlink("/dev/zero", &link).expect("symlink");
        let e = read_bounded(&link, 1 << 20).expect_err("symlink");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let e = read_bounded(Path::new("/dev/zero"), 1 << 20).expect_err("device");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        // Nobody writes to it: the open must not block.
        let e = read_bounded(&fifo, 10).expect_err("fifo");
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }
}
