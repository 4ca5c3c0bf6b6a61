//! Whole directory trees: copy, measure, move, delete (at once or in the
//! background) and flush, with errors that name the path. What the PostgreSQL
//! major upgrade needs to copy a cluster aside and swap directories.

use std::path::Path;

use anyhow::{Context, Result};

/// `rename(2)`, with an error that names both paths.
pub fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to)
        .with_context(|| format!("cannot move {} to {}", from.display(), to.display()))
}

/// Renames a tree out of the way at once and deletes it in the background (a large
/// cluster takes seconds to delete; the start does not wait). A leftover
/// `*.deleting` is the caller's to remove at its next start. Runs on the tokio runtime.
pub fn remove_in_background(path: &Path) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let doomed = path.with_file_name(format!("{name}.deleting"));
    rename(path, &doomed)?;
    tokio::task::spawn_blocking(move || {
        if let Err(e) = std::fs::remove_dir_all(&doomed) {
            tracing::warn!("cannot remove {}: {e}", doomed.display());
        }
    });
    Ok(())
}

/// `rm -r`, with an error that names the path.
pub fn remove_tree(path: &Path) -> Result<()> {
    std::fs::remove_dir_all(path).with_context(|| format!("cannot remove {}", path.display()))
}

/// Bytes used on disk by a directory tree.
pub fn tree_size(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        for entry in
            std::fs::read_dir(path).with_context(|| format!("cannot read {}", path.display()))?
        {
            let entry = entry.with_context(|| format!("cannot read {}", path.display()))?;
            total += tree_size(&entry.path())?;
        }
    }
    Ok(total)
}

/// Copies a tree (directories, files with their modes, symlinks as symlinks).
pub fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(from)
        .with_context(|| format!("cannot read {}", from.display()))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        std::fs::create_dir(to).with_context(|| format!("cannot create {}", to.display()))?;
        for entry in
            std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))?
        {
            let entry = entry.with_context(|| format!("cannot read {}", from.display()))?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        std::fs::set_permissions(to, meta.permissions())
            .with_context(|| format!("cannot chmod {}", to.display()))?;
    } else if ft.is_symlink() {
        let target = std::fs::read_link(from)
            .with_context(|| format!("cannot read the link {}", from.display()))?;
        std::os::unix::fs::symlink(&target, to)
            .with_context(|| format!("cannot create the link {}", to.display()))?;
    } else if ft.is_file() {
        std::fs::copy(from, to)
            .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    }
    // Sockets, fifos: nothing of the cluster's; skipped.
    Ok(())
}

/// Flushes the filesystem holding `path` (one syncfs instead of an fsync per file).
pub fn sync_fs(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let dir =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    nix::unistd::syncfs(dir.as_raw_fd())
        .map_err(std::io::Error::from)
        .with_context(|| format!("cannot flush the copy {}", path.display()))?;
    Ok(())
}

/// Makes renames and creations in the directory `path` durable.
pub fn sync_dir(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot flush {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    #[test]
    fn copies_a_tree_with_modes_and_links() {
        let d = tempfile::tempdir().expect("tempdir");
        let from = d.path().join("a");
        std::fs::create_dir_all(from.join("sub")).expect("mkdir");
        std::fs::write(from.join("sub").join("f"), b"data").expect("write");
        std::fs::set_permissions(
            from.join("sub").join("f"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");
        std::os::unix::fs::symlink("sub/f", from.join("link")).expect("symlink");
        std::fs::set_permissions(&from, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let to = d.path().join("b");
        copy_tree(&from, &to).expect("copy");
        sync_fs(&to).expect("syncfs");
        assert_eq!(
            std::fs::read(to.join("sub").join("f")).expect("read"),
            b"data"
        );
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&to.join("sub").join("f")), 0o600);
        assert_eq!(mode(&to), 0o700);
        assert_eq!(
            std::fs::read_link(to.join("link")).expect("link"),
            PathBuf::from("sub/f")
        );
        assert!(tree_size(&to).expect("size") > 0);
    }
}
