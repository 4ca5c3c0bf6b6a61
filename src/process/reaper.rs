//! The one reaper and the one spawner. Every child of the supervisor is forked by
//! the spawner thread and reaped here with `waitpid(-1, WNOHANG)` on SIGCHLD; each
//! exit status goes to its owner by pid. Orphans re-parented to us (as PID 1 or as a
//! child subreaper) are reaped and counted. Nothing else may wait for children:
//! that is why `tokio::process` is not used.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::sync::LockExt;
use anyhow::{anyhow, Context, Result};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// How a child ended, as the reaper saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => match Signal::try_from(*s) {
                Ok(sig) => write!(f, "killed by {sig}"),
                Err(_) => write!(f, "killed by signal {s}"),
            },
        }
    }
}

impl Exit {
    pub fn success(&self) -> bool {
        *self == Exit::Code(0)
    }
}

/// Everything needed to start one child. Its `Debug` shows the environment's
/// names only: the values hold secrets (JWT key, database password).
#[derive(Clone)]
pub struct ChildSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// The complete environment: nothing is inherited.
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// Signal the kernel sends the child when the supervisor dies.
    pub death_signal: Signal,
    /// The API server: started by the launcher as `backend.user` when there is one
    /// (see `launcher`), as the supervisor's user otherwise.
    pub as_api_user: bool,
    /// Its `oom_score_adj` (see `oom`), set between fork and exec; None: inherited.
    pub oom_score_adj: Option<i32>,
}

impl std::fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("ChildSpec")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("env (names only)", &names)
            .field("cwd", &self.cwd)
            .field("death_signal", &self.death_signal)
            .field("as_api_user", &self.as_api_user)
            .field("oom_score_adj", &self.oom_score_adj)
            .finish()
    }
}

/// A started child: its pid (also its process group) and where its exit arrives.
pub struct Spawned {
    pub pid: i32,
    pub exit: oneshot::Receiver<Exit>,
}

type Registry = Arc<Mutex<HashMap<i32, oneshot::Sender<Exit>>>>;

struct Job {
    spec: ChildSpec,
    output: OwnedFd,
    reply: oneshot::Sender<Result<Spawned>>,
}

/// Handle to the spawner and reaper threads. Cheap to clone.
#[derive(Clone)]
pub struct Reaper {
    jobs: std::sync::mpsc::Sender<Job>,
    registry: Registry,
    orphans: Arc<AtomicU64>,
}

impl Reaper {
    /// Starts both threads. Must be called once, before any child exists.
    pub fn start() -> Result<Reaper> {
        let registry: Registry = Arc::default();
        let orphans = Arc::new(AtomicU64::new(0));
        let mut signals = signal_hook::iterator::Signals::new([libc::SIGCHLD])
            .context("cannot install the SIGCHLD handler")?;
        {
            let registry = registry.clone();
            let orphans = orphans.clone();
            std::thread::Builder::new()
                .name("reaper".into())
                .spawn(move || {
                    for _ in signals.forever() {
                        reap_all(&registry, &orphans);
                    }
                })
                .context("cannot start the reaper thread")?;
        }
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        {
            let registry = registry.clone();
            // The spawner thread lives as long as the process: PR_SET_PDEATHSIG fires
            // when the *thread* that forked a child exits, so forks happen only here.
            std::thread::Builder::new()
                .name("spawner".into())
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        let r = spawn_registered(&registry, job.spec, job.output);
                        let _ = job.reply.send(r);
                    }
                })
                .context("cannot start the spawner thread")?;
        }
        Ok(Reaper {
            jobs: tx,
            registry,
            orphans,
        })
    }

    /// Forks and execs `spec`, stdout and stderr to `output`, stdin /dev/null.
    pub async fn spawn(&self, spec: ChildSpec, output: OwnedFd) -> Result<Spawned> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job {
                spec,
                output,
                reply,
            })
            .map_err(|_| anyhow!("the spawner thread is gone"))?;
        rx.await
            .map_err(|_| anyhow!("the spawner thread dropped a request"))?
    }

    /// Runs `spec` to completion (e.g. initdb) and returns how it ended.
    pub async fn run(&self, spec: ChildSpec, output: OwnedFd) -> Result<Exit> {
        let s = self.spawn(spec, output).await?;
        s.exit
            .await
            .map_err(|_| anyhow!("the reaper lost child {}", s.pid))
    }

    /// Orphans (not our own children) reaped so far.
    pub fn orphans_reaped(&self) -> u64 {
        self.orphans.load(Ordering::Relaxed)
    }

    /// Children of ours still running.
    pub fn live_children(&self) -> usize {
        self.registry.locked().len()
    }
}

fn reap_all(registry: &Registry, orphans: &AtomicU64) {
    loop {
        // waitpid runs under the registry lock: the spawner holds it while forking,
        // and std's spawn itself waits for a child whose exec failed, so the reaper
        // must not take that pid from under it.
        let mut reg = registry.locked();
        let (pid, exit) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Code(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Exit::Signal(sig as i32)),
            Ok(WaitStatus::StillAlive) => return,
            Ok(_) => continue, // stopped/continued: not an exit
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return, // ECHILD: nothing left to wait for
        };
        match reg.remove(&pid.as_raw()) {
            Some(tx) => {
                let _ = tx.send(exit);
            }
            None => {
                orphans.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(pid = pid.as_raw(), %exit, "reaped an orphan");
            }
        }
    }
}

fn spawn_registered(registry: &Registry, spec: ChildSpec, output: OwnedFd) -> Result<Spawned> {
    if let (true, Some(l)) = (spec.as_api_user, super::launcher::get()) {
        // The launcher makes it our child (CLONE_PARENT); the registry is held until
        // its pid is known, so the reaper cannot take its exit first.
        let mut reg = registry.locked();
        let pid = l
            .spawn(
                &spec.args,
                &spec.env,
                &spec.cwd,
                spec.death_signal as i32,
                spec.oom_score_adj,
                &output,
            )
            .with_context(|| {
                format!(
                    "cannot start {} as {} (in {})",
                    spec.program.display(),
                    l.api.name,
                    spec.cwd.display()
                )
            })?;
        let (tx, rx) = oneshot::channel();
        reg.insert(pid, tx);
        return Ok(Spawned { pid, exit: rx });
    }
    let err_fd = output
        .try_clone()
        .context("cannot duplicate the log pipe")?;
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(output))
        .stderr(Stdio::from(err_fd))
        .process_group(0);
    let parent = std::process::id() as libc::pid_t;
    let death = spec.death_signal as libc::c_int;
    let oom = spec.oom_score_adj.map(super::oom::text);
    // SAFETY: only async-signal-safe calls (prctl, getppid, open/write/close, _exit)
    // between fork and exec, on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, death as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The supervisor may have died between fork and prctl.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            // Never hand CAP_NET_BIND_SERVICE (ambient, from the unit) to children.
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            );
            if let Some(t) = oom.as_deref() {
                // A refusal leaves the inherited value: status and `check` show it.
                super::oom::write_in_child(t);
            }
            Ok(())
        });
    }
    // Hold the registry while forking so the reaper cannot see the pid before its
    // owner is registered.
    let mut reg = registry.locked();
    let child = cmd.spawn().with_context(|| {
        format!(
            "cannot start {} (in {})",
            spec.program.display(),
            spec.cwd.display()
        )
    })?;
    let pid = child.id() as i32;
    // Dropping a std Child neither waits nor kills: the reaper owns it from here.
    drop(child);
    let (tx, rx) = oneshot::channel();
    reg.insert(pid, tx);
    Ok(Spawned { pid, exit: rx })
}

/// Sends `sig` to the child `pid`, or to its whole process group. An API server
/// running as its own user is signalled through the launcher.
pub fn signal(pid: i32, sig: Signal, group: bool) {
    let target = if group { -pid } else { pid };
    if let Err(nix::errno::Errno::EPERM) = nix::sys::signal::kill(Pid::from_raw(target), sig) {
        if let Some(l) = super::launcher::get() {
            if let Err(e) = l.signal(pid, sig as i32, group) {
                tracing::warn!("cannot signal {pid} ({sig}) through the launcher: {e:#}");
            }
        }
    }
}

/// What /proc says of the child `pid`; for an API server running as its own user
/// that the supervisor may not see (the unit's `ProtectProc=invisible`), through
/// the launcher.
pub fn inspect(pid: i32) -> Option<crate::procfs::ProcInfo> {
    if let Some(i) = crate::procfs::inspect(pid) {
        return Some(i);
    }
    let l = super::launcher::get()?;
    match l.inspect(pid) {
        Ok(i) => i,
        Err(e) => {
            tracing::debug!("cannot inspect {pid} through the launcher: {e:#}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_names_the_environment_without_its_values() {
        let spec = ChildSpec {
            program: "/usr/lib/koprogo/koprogo-api".into(),
            args: vec![],
            env: vec![("JWT_SECRET".into(), "s3cr3t-value-never-shown".into())],
            cwd: "/var/lib/koprogo/api".into(),
            death_signal: Signal::SIGKILL,
            as_api_user: false,
            oom_score_adj: None,
        };
        let text = format!("{spec:?}");
        assert!(text.contains("JWT_SECRET"), "{text}");
        assert!(!text.contains("s3cr3t"), "{text}");
    }
}
