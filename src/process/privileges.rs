//! Who the supervisor runs as, and the directories it owns. Started as root it
//! creates and chowns its directories, then drops to the service user for good
//! (PostgreSQL refuses root, and nothing else should run as root either). Started as
//! an ordinary user it stays that user. Also holds the state lock that keeps two
//! supervisors off one state directory.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use nix::unistd::{Gid, Uid, User};

use nix::fcntl::{Flock, FlockArg};

use crate::config::Config;
use crate::fsutil::ensure_dir_fd;

/// The identity the supervisor and every child run with.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

/// The service user `run` will drop to (root), or the current user.
pub fn target_identity(cfg: &Config) -> Result<Identity> {
    if Uid::effective().is_root() {
        let u = User::from_name(&cfg.user)
            .with_context(|| format!("cannot look up user {:?}", cfg.user))?
            .with_context(|| {
                format!(
                    "{}: user = {:?}: no such user: create it (adduser --system --group --home {} {}) \
                     or set `user` to an existing unprivileged account",
                    cfg.file.display(),
                    cfg.user,
                    cfg.paths.state.display(),
                    cfg.user
                )
            })?;
        if u.uid.is_root() {
            bail!(
                "{}: user = {:?} is root: name an unprivileged account",
                cfg.file.display(),
                cfg.user
            );
        }
        Ok(Identity {
            name: u.name,
            uid: u.uid,
            gid: u.gid,
        })
    } else {
        let uid = Uid::current();
        let name = User::from_uid(uid)
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| uid.to_string());
        Ok(Identity {
            name,
            uid,
            gid: Gid::current(),
        })
    }
}

/// The API server's own user (`backend.user`) when this process may start children
/// as another user (root, or CAP_SETUID/CAP_SETGID from the unit); None otherwise:
/// the API then runs as the supervisor's user.
pub fn api_identity(cfg: &Config) -> Result<Option<Identity>> {
    if !super::launcher::can_switch_users() {
        return Ok(None);
    }
    let name = &cfg.backend.user;
    let u = User::from_name(name)
        .with_context(|| format!("cannot look up user {name:?}"))?
        .with_context(|| {
            format!(
                "{}: backend.user = {name:?}: no such user: create it (adduser --system --group \
                 --no-create-home --home /nonexistent {name}; adduser {} {name})",
                cfg.file.display(),
                cfg.user
            )
        })?;
    if u.uid.is_root() || u.name == cfg.user {
        bail!(
            "{}: backend.user = {name:?} must be an unprivileged account of its own, not root \
             and not `user` ({})",
            cfg.file.display(),
            cfg.user
        );
    }
    Ok(Some(Identity {
        name: u.name,
        uid: u.uid,
        gid: u.gid,
    }))
}

/// Creates state, logs and run with their owner, then drops privileges if we are
/// root. After this nothing runs as root.
pub fn prepare_and_drop(cfg: &Config, who: &Identity, api: Option<&Identity>) -> Result<()> {
    prepare_dirs(cfg, who, api)?;
    if Uid::effective().is_root() {
        let mut groups = vec![who.gid];
        groups.extend(api.map(|a| a.gid));
        become_user_with(who, &groups)?;
        tracing::info!("running as {} (uid {})", who.name, who.uid);
    }
    Ok(())
}

/// Creates state, logs and run (0750) and, as root, gives them to `who`. With a
/// separate API user, state and run belong to its group with mode 0710: it may pass
/// through them to its own directories and PostgreSQL's socket, and list or read
/// nothing else there.
pub fn prepare_dirs(cfg: &Config, who: &Identity, api: Option<&Identity>) -> Result<()> {
    let root = Uid::effective().is_root();
    for dir in [&cfg.paths.state, &cfg.paths.logs, &cfg.paths.run] {
        let passage = api.filter(|_| dir != &cfg.paths.logs);
        let mode = if passage.is_some() { 0o710 } else { 0o750 };
        // Walked without following links the service user could plant, and chowned
        // through the descriptor of the directory that was really there.
        let fd =
            ensure_dir_fd(dir, mode).with_context(|| format!("cannot create {}", dir.display()))?;
        let gid = passage.map(|a| a.gid).unwrap_or(who.gid);
        if root {
            nix::unistd::fchown(fd.as_raw_fd(), Some(who.uid), Some(gid))
                .with_context(|| format!("cannot chown {} to {}", dir.display(), who.name))?;
        } else if passage.is_some() {
            nix::unistd::fchown(fd.as_raw_fd(), None, Some(gid)).with_context(|| {
                format!(
                    "cannot give {} to group {}: add {} to that group (adduser {} {})",
                    dir.display(),
                    cfg.backend.user,
                    who.name,
                    who.name,
                    cfg.backend.user
                )
            })?;
        }
    }
    Ok(())
}

/// Becomes `who` for good: groups, gid, uid, and checks root cannot be regained.
fn become_user(who: &Identity) -> Result<()> {
    become_user_with(who, &[who.gid])
}

fn become_user_with(who: &Identity, groups: &[Gid]) -> Result<()> {
    nix::unistd::setgroups(groups).context("setgroups")?;
    nix::unistd::setgid(who.gid).context("setgid")?;
    nix::unistd::setuid(who.uid).context("setuid")?;
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        bail!("dropping privileges failed: root could be regained");
    }
    Ok(())
}

/// A command run from a root shell that only needs the service user's rights:
/// become that user for good before touching anything it owns (the state, logs, run
/// and backup directories, the control socket), so a link it planted there gives it
/// nothing. Nothing to do when not root.
pub fn drop_for_command(cfg: &Config) -> Result<()> {
    if !Uid::effective().is_root() {
        return Ok(());
    }
    let who = target_identity(cfg)?;
    become_user(&who)?;
    // As `su` does: what the command runs (psql, libpq) looks in the user's home
    // (~/.postgresql, ~/.pgpass), not in root's, which it may not even enter.
    if let Ok(Some(u)) = User::from_uid(who.uid) {
        std::env::set_var("HOME", &u.dir);
    }
    std::env::set_var("USER", &who.name);
    std::env::set_var("LOGNAME", &who.name);
    Ok(())
}

/// Runs `work` as the service user and hands its output back: in a child process
/// that drops privileges first when we are root (the caller stays root, e.g. to
/// write the result where the operator asked), directly otherwise. The state, logs
/// and run directories are made first (as `run` makes them). The output is
/// bounded to `max` bytes. Only for the single-threaded command line.
pub fn as_service_user(
    cfg: &Config,
    max: usize,
    work: impl FnOnce() -> std::result::Result<Vec<u8>, String>,
) -> Result<Vec<u8>> {
    use std::io::Read;
    if !Uid::effective().is_root() {
        return work().map_err(|e| anyhow::anyhow!(e));
    }
    let who = target_identity(cfg)?;
    prepare_dirs(cfg, &who, api_identity(cfg).ok().flatten().as_ref())?;
    let (r, w) = nix::unistd::pipe().context("pipe")?;
    // SAFETY: the command line has one thread; the child only drops privileges,
    // runs `work`, writes to the pipe and exits.
    match unsafe { nix::unistd::fork() }.context("fork")? {
        nix::unistd::ForkResult::Child => {
            drop(r);
            let mut out = File::from(w);
            let (code, data) = match become_user(&who)
                .map_err(|e| format!("{e:#}"))
                .and_then(|()| work())
            {
                Ok(d) => (0, d),
                Err(e) => (1, e.into_bytes()),
            };
            let _ = out.write_all(&data);
            drop(out);
            // SAFETY: leave the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(w);
            let mut data = Vec::new();
            let read = File::from(r).take(max as u64 + 1).read_to_end(&mut data);
            let status = nix::sys::wait::waitpid(child, None).context("waitpid")?;
            read.context("reading the service user's answer")?;
            if data.len() > max {
                bail!("the answer of the service user's process is over {max} bytes");
            }
            match status {
                nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(data),
                nix::sys::wait::WaitStatus::Exited(_, _) => {
                    bail!("{}", String::from_utf8_lossy(&data))
                }
                other => bail!("the process working as {} ended with {other:?}", who.name),
            }
        }
    }
}

pub fn lock_path(cfg: &Config) -> std::path::PathBuf {
    cfg.paths.state.join("koprogo.lock")
}

/// Takes the exclusive state lock (held for the life of the returned file).
pub fn lock_state(cfg: &Config) -> Result<Flock<File>> {
    let path = lock_path(cfg);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut f = match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => locked,
        Err(_) => {
            let holder = crate::fsutil::read_bounded_string(&path, 64).unwrap_or_default();
            bail!(
            "another koprogo (pid {}) is running on {}: stop it first (koprogo status shows it)",
            holder.trim(),
            cfg.paths.state.display()
        );
        }
    };
    f.set_len(0)?;
    writeln!(f, "{}", std::process::id())?;
    Ok(f)
}

/// Is a supervisor holding the state lock right now? (Never creates the file.)
pub fn running_pid(cfg: &Config) -> Option<String> {
    let path = lock_path(cfg);
    // Root's `check` and `status` come here: no link followed, no FIFO waited on.
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&path)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    // A shared lock is released when it is dropped.
    if Flock::lock(f, FlockArg::LockSharedNonblock).is_ok() {
        None
    } else {
        Some(
            crate::fsutil::read_bounded_string(&path, 64)
                .unwrap_or_default()
                .trim()
                .to_string(),
        )
    }
}

/// Does the permission `bit` (0o1 x, 0o2 w, 0o4 r) of `meta` apply to `who`?
fn may(meta: &std::fs::Metadata, who: &Identity, bit: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    if who.uid.is_root() {
        return true;
    }
    let mode = meta.mode();
    if meta.uid() == who.uid.as_raw() {
        mode & (bit << 6) != 0
    } else if meta.gid() == who.gid.as_raw() {
        mode & (bit << 3) != 0
    } else {
        mode & bit != 0
    }
}

/// Can `who` read the file `path`: every parent directory searchable and the file
/// readable for it? (Supplementary groups are not considered.)
pub fn readable_by(path: &Path, who: &Identity) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    parents_searchable(path, who, "")?;
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read it: {e}"))?;
    if !may(&meta, who, 0o4) {
        return Err(format!(
            "user {} cannot read it (owner {}:{}, mode {:o}): chown root:{} and chmod 0640 it",
            who.name,
            meta.uid(),
            meta.gid(),
            meta.mode() & 0o7777,
            who.name
        ));
    }
    Ok(())
}

/// Can `who` enter every existing parent directory of `path`? The error names the
/// first one it cannot enter, followed by `fix`.
fn parents_searchable(path: &Path, who: &Identity, fix: &str) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let mut dir = path.to_path_buf();
    while dir.pop() {
        if let Ok(meta) = std::fs::metadata(&dir) {
            if !may(&meta, who, 0o1) {
                return Err(format!(
                    "user {} cannot enter {} (mode {:o}){fix}",
                    who.name,
                    dir.display(),
                    meta.mode() & 0o7777
                ));
            }
        }
    }
    Ok(())
}

/// Can `who` run the program `path`: every parent directory searchable and the
/// file executable for it? (Writing is not needed: programs belong to root.)
pub fn executable_by(path: &Path, who: &Identity) -> Result<(), String> {
    parents_searchable(path, who, ": chmod o+x it or move the program")?;
    match std::fs::metadata(path) {
        Ok(meta) if may(&meta, who, 0o1) => Ok(()),
        Ok(_) => Err(format!("not executable by user {}: chmod o+x it", who.name)),
        Err(e) => Err(format!("cannot read it: {e}")),
    }
}

/// Can `who` search (x) every existing ancestor of `path` and write the nearest
/// existing one? Returns the first obstacle.
pub fn reachable(path: &Path, who: &Identity) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let mut existing = path.to_path_buf();
    while !existing.exists() {
        if !existing.pop() {
            break;
        }
    }
    let allowed = |meta: &std::fs::Metadata, bit: u32| may(meta, who, bit);
    let mut anc = existing.clone();
    loop {
        if let Ok(meta) = std::fs::metadata(&anc) {
            if !allowed(&meta, 0o1) {
                return Err(format!(
                    "user {} cannot enter {} (mode {:o}): chmod o+x it or choose another path",
                    who.name,
                    anc.display(),
                    meta.mode() & 0o7777
                ));
            }
        }
        if !anc.pop() {
            break;
        }
    }
    if existing == path || Uid::effective().is_root() {
        // An existing target dir is chowned by `run` when root; check write otherwise.
        if !Uid::effective().is_root() {
            if let Ok(meta) = std::fs::metadata(&existing) {
                if !allowed(&meta, 0o2) {
                    return Err(format!(
                        "{} is not writable by {}",
                        existing.display(),
                        who.name
                    ));
                }
            }
        }
    } else if let Ok(meta) = std::fs::metadata(&existing) {
        if !allowed(&meta, 0o2) {
            return Err(format!(
                "cannot create {}: {} is not writable by {}",
                path.display(),
                existing.display(),
                who.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn nobody() -> Identity {
        Identity {
            name: "nobody".into(),
            uid: Uid::from_raw(65534),
            gid: Gid::from_raw(65534),
        }
    }

    #[test]
    fn a_program_owned_by_someone_else_is_executable_without_being_writable() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let prog = d.path().join("koprogo-api");
        std::fs::write(&prog, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        if nix::unistd::Uid::effective() == nobody().uid {
            return; // the test needs the file to belong to someone else
        }
        assert_eq!(executable_by(&prog, &nobody()), Ok(()));
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o750)).expect("chmod");
        assert!(executable_by(&prog, &nobody()).is_err());
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let e = executable_by(&prog, &nobody()).expect_err("dir not searchable");
        assert!(e.contains("cannot enter"), "{e}");
    }
}
