//! Directories opened by root without following a path the service user can change.
//!
//! A path is walked one component at a time from `/` (or the working directory) with
//! `openat(O_DIRECTORY | O_NOFOLLOW)`, so what the caller gets is a descriptor of
//! the directory that was really there, which `fchown`/`fchmod`/`openat` then use:
//! nothing is looked up by name twice. A symbolic link is followed only where nobody
//! but root (or the caller itself) could have made it: in a directory owned by root
//! or the caller and writable by its owner alone (`/var/run -> /run`); anywhere else
//! it is refused. Missing directories can
//! be created on the way (`mkdirat`), never through a link.

use std::ffi::{CString, OsStr};
use std::io::{Error, ErrorKind, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Symbolic links followed in one walk, as the kernel's own limit.
const MAX_LINKS: usize = 40;

fn cstr(name: &OsStr) -> Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| Error::new(ErrorKind::InvalidInput, "NUL in path"))
}

/// `openat(dir, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | extra)`.
fn open_nofollow(dir: &OwnedFd, name: &OsStr, extra: libc::c_int) -> Result<OwnedFd> {
    let c = cstr(name)?;
    // SAFETY: openat with a valid descriptor and a NUL-terminated name.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | extra,
        )
    };
    if fd < 0 {
        return Err(Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_at(dir: &OwnedFd, name: &OsStr) -> Result<OwnedFd> {
    open_nofollow(dir, name, libc::O_DIRECTORY)
}

fn open_start(absolute: bool) -> Result<OwnedFd> {
    let start = if absolute { c"/" } else { c"." };
    // SAFETY: open of a constant path.
    let fd = unsafe {
        libc::open(
            start.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// May a link found in `dir` be followed: only root (or we ourselves) could have put
/// it there.
fn trusted(dir: &OwnedFd) -> Result<bool> {
    let st = nix::sys::stat::fstat(dir.as_raw_fd())?;
    let owner = st.st_uid == 0 || st.st_uid == nix::unistd::Uid::effective().as_raw();
    Ok(owner && st.st_mode & 0o022 == 0)
}

fn readlink_at(dir: &OwnedFd, name: &OsStr) -> Result<PathBuf> {
    Ok(PathBuf::from(nix::fcntl::readlinkat(
        Some(dir.as_raw_fd()),
        name,
    )?))
}

fn is_symlink_at(dir: &OwnedFd, name: &OsStr) -> bool {
    nix::sys::stat::fstatat(
        Some(dir.as_raw_fd()),
        name,
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK)
    .unwrap_or(false)
}

/// Opens the directory `path` (creating missing ones with `create`'s mode when
/// given: `parents` for the ones on the way, `last` for `path` itself).
pub fn open_dir(path: &Path, create: Option<(u32, u32)>) -> Result<OwnedFd> {
    let mut todo: Vec<std::ffi::OsString> = Vec::new();
    let mut links = 0;
    let mut dir = open_start(path.is_absolute())?;
    // The components left, last first (so `pop` gives the next one).
    let push_path = |todo: &mut Vec<std::ffi::OsString>, p: &Path| {
        for c in p.components().rev() {
            match c {
                Component::Normal(n) => todo.push(n.to_os_string()),
                Component::ParentDir => todo.push("..".into()),
                Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            }
        }
    };
    push_path(&mut todo, path);
    let mut seen = PathBuf::from(if path.is_absolute() { "/" } else { "." });
    while let Some(name) = todo.pop() {
        let last = todo.is_empty();
        match open_at(&dir, &name) {
            Ok(fd) => {
                dir = fd;
                seen.push(&name);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create.is_some() => {
                let (parents, mode) = create.unwrap_or((0o755, 0o755));
                let mode = if last { mode } else { parents };
                match nix::sys::stat::mkdirat(
                    Some(dir.as_raw_fd()),
                    name.as_os_str(),
                    nix::sys::stat::Mode::from_bits_truncate(mode),
                ) {
                    Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                    Err(e) => {
                        return Err(Error::other(format!(
                            "cannot create {}: {e}",
                            seen.join(&name).display()
                        )))
                    }
                }
                todo.push(name);
            }
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR))
                    && is_symlink_at(&dir, &name) =>
            {
                let at = seen.join(&name);
                if !trusted(&dir)? {
                    return Err(Error::new(
                        ErrorKind::PermissionDenied,
                        format!(
                            "{} is a symbolic link in a directory that a user other than root \
                             can change: not followed; replace it with a real directory",
                            at.display()
                        ),
                    ));
                }
                links += 1;
                if links > MAX_LINKS {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        format!("{}: too many symbolic links", path.display()),
                    ));
                }
                let target = readlink_at(&dir, &name)?;
                if target.is_absolute() {
                    dir = open_start(true)?;
                    seen = PathBuf::from("/");
                }
                push_path(&mut todo, &target);
            }
            Err(e) => {
                return Err(Error::new(
                    e.kind(),
                    format!("{}: {e}", seen.join(&name).display()),
                ))
            }
        }
    }
    Ok(dir)
}

/// Opens the regular file `path` for reading, under the same rule as [`open_dir`]:
/// its directory is walked without untrusted links, and the file itself is not a
/// link unless that directory is root's (or ours). FIFOs and devices are refused
/// without blocking.
pub fn open_file(path: &Path) -> Result<std::fs::File> {
    let mut path = path.to_path_buf();
    for _ in 0..MAX_LINKS {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{}: not a file name", path.display()),
            ));
        };
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        let dir = open_dir(parent, None)?;
        let fd = match open_nofollow(&dir, name, libc::O_NONBLOCK) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                if !trusted(&dir)? {
                    return Err(Error::new(
                        ErrorKind::PermissionDenied,
                        format!(
                            "{} is a symbolic link in a directory that a user other than root \
                             can change: not followed; name the file itself",
                            path.display()
                        ),
                    ));
                }
                let target = readlink_at(&dir, name)?;
                path = parent.join(target);
                continue;
            }
            Err(e) => return Err(Error::new(e.kind(), format!("{}: {e}", path.display()))),
        };
        let f = std::fs::File::from(fd);
        if !f.metadata()?.is_file() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("{}: not a regular file", path.display()),
            ));
        }
        return Ok(f);
    }
    Err(Error::new(
        ErrorKind::InvalidInput,
        format!("{}: too many symbolic links", path.display()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_followed_only_where_root_alone_could_make_them() {
        let d = tempfile::tempdir().expect("tempdir");
        let real = d.path().join("real");
        std::fs::create_dir(&real).expect("mkdir");
        std::fs::write(real.join("mark"), b"x").expect("write");
        let fd = open_dir(&d.path().join("a/b"), Some((0o755, 0o700))).expect("create");
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).expect("fstat");
        assert_eq!(st.st_mode & 0o777, 0o700);
        assert!(d.path().join("a/b").is_dir());
        // A link in a directory someone else may write: refused.
        std::os::unix::fs::symlink(&real, d.path().join("a/link")).expect("symlink");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.path().join("a"), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        let e = open_dir(&d.path().join("a/link"), None).expect_err("untrusted link");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let e = open_dir(&d.path().join("a/link/sub"), Some((0o755, 0o755)))
            .expect_err("nothing created through the link");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(!real.join("sub").exists());
        let e = open_file(&d.path().join("a/link/mark")).expect_err("file behind a link");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        std::os::unix::fs::symlink(real.join("mark"), d.path().join("a/flink")).expect("ln");
        let e = open_file(&d.path().join("a/flink")).expect_err("link to a file");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert!(open_file(&real.join("mark")).is_ok());
        // /proc/self is a link in a root-owned directory nobody else writes.
        if nix::unistd::Uid::effective().is_root() {
            std::fs::set_permissions(d.path().join("a"), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
            let fd = open_dir(&d.path().join("a/link"), None).expect("root's own link");
            let st = nix::sys::stat::fstat(fd.as_raw_fd()).expect("fstat");
            let real_st = nix::sys::stat::stat(&real).expect("stat");
            assert_eq!(st.st_ino, real_st.st_ino);
        }
    }
}
