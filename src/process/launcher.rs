//! The launcher: the one process that starts the API server as its own system user
//! (`backend.user`), apart from the supervisor's (privilege separation, as OpenSSH
//! and postfix do it).
//!
//! `run` forks it first, while it still has the privilege to switch users (root, or
//! CAP_SETUID/CAP_SETGID from the packaged unit). The launcher becomes the API user
//! at once, for good, with no capabilities and not dumpable, closes every inherited
//! descriptor but its socket, and then only does two things the supervisor asks
//! over that socket (a SOCK_SEQPACKET pair, one JSON message each way):
//! - `Spawn`: start the configured `backend.command` (the program is fixed at
//!   birth, never taken from a message) with the given arguments, environment,
//!   working directory and log pipe (passed as SCM_RIGHTS). The child is created with
//!   CLONE_PARENT: it is the supervisor's child, so the supervisor's reaper waits for
//!   it and sees its exit like any other service's.
//! - `Signal`: signal an API process (the supervisor may not: another user's). The
//!   launcher is that user and nothing more, so it cannot signal anything else.
//!
//! The supervisor then drops its own power to switch users before it reads a byte
//! from the network. The launcher exits when the supervisor goes (socket EOF, or
//! its death signal).

use std::ffi::CString;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use serde::{Deserialize, Serialize};

use super::privileges::Identity;
use crate::procfs::ProcInfo;
use crate::sync::LockExt;

/// Largest message either way (an environment is a few KiB).
const MAX_MESSAGE: usize = 256 * 1024;

#[derive(Debug, Serialize, Deserialize)]
enum Request {
    Spawn {
        args: Vec<String>,
        env: Vec<(String, String)>,
        cwd: PathBuf,
        death_signal: i32,
        /// Its `oom_score_adj`, set in the child before exec.
        #[serde(default)]
        oom_score_adj: Option<i32>,
    },
    Signal {
        pid: i32,
        signal: i32,
        group: bool,
    },
    /// What /proc says of an API process (state, CPU, oom_score_adj): under the
    /// packaged unit (`ProtectProc=invisible`) only its own user sees it.
    Inspect {
        pid: i32,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Reply {
    pid: i32,
    error: Option<String>,
    #[serde(default)]
    info: Option<ProcInfo>,
}

/// The supervisor's end.
pub struct Launcher {
    sock: Mutex<OwnedFd>,
    /// Who the API runs as.
    pub api: Identity,
    pub pid: i32,
}

static LAUNCHER: OnceLock<Launcher> = OnceLock::new();

/// The launcher, when the API runs as its own user.
pub fn get() -> Option<&'static Launcher> {
    LAUNCHER.get()
}

/// Can this process start children as another user (root, or CAP_SETUID and
/// CAP_SETGID in its permitted set)?
pub fn can_switch_users() -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    let permitted = caps::read(None, caps::CapSet::Permitted).unwrap_or_default();
    permitted.contains(&caps::Capability::CAP_SETUID)
        && permitted.contains(&caps::Capability::CAP_SETGID)
}

/// Forks the launcher for `program`, running as `api`. Call while single-threaded,
/// before any listener is opened.
pub fn start(program: &Path, api: Identity) -> Result<()> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .context("cannot create the launcher's socket pair")?;
    let supervisor = std::process::id() as i32;
    let program = CString::new(program.as_os_str().as_bytes())
        .map_err(|_| anyhow!("{}: NUL in the program path", program.display()))?;
    // SAFETY: called single-threaded (see above); the child never returns.
    match unsafe { nix::unistd::fork() }.context("cannot fork the launcher")? {
        nix::unistd::ForkResult::Child => {
            drop(ours);
            let code = match serve(theirs, &program, &api, supervisor) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("koprogo launcher: {e:#}");
                    1
                }
            };
            // SAFETY: leave without the parent's destructors.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(theirs);
            let l = Launcher {
                sock: Mutex::new(ours),
                api,
                pid: child.as_raw(),
            };
            LAUNCHER
                .set(l)
                .map_err(|_| anyhow!("the launcher was started twice"))
        }
    }
}

/// Gives up what the launcher needed: CAP_SETUID, CAP_SETGID (and every other
/// capability but binding low ports) from all sets. For the supervisor, once the
/// launcher runs.
pub fn drop_switching() -> Result<()> {
    use caps::{CapSet, Capability};
    let keep: caps::CapsHashSet = caps::read(None, CapSet::Permitted)
        .unwrap_or_default()
        .into_iter()
        .filter(|c| *c == Capability::CAP_NET_BIND_SERVICE)
        .collect();
    caps::clear(None, CapSet::Ambient).context("clearing ambient capabilities")?;
    caps::set(None, CapSet::Inheritable, &caps::CapsHashSet::new())
        .context("clearing inheritable capabilities")?;
    caps::set(None, CapSet::Effective, &keep).context("lowering effective capabilities")?;
    caps::set(None, CapSet::Permitted, &keep).context("lowering permitted capabilities")?;
    if caps::has_cap(None, CapSet::Permitted, Capability::CAP_SETUID).unwrap_or(true) {
        bail!("CAP_SETUID could not be dropped");
    }
    Ok(())
}

impl Launcher {
    fn ask(&self, req: &Request, fd: Option<RawFd>) -> Result<Reply> {
        let sock = self.sock.locked();
        let data = serde_json::to_vec(req)?;
        let fds = fd.map(|f| [f]);
        let cmsg: Vec<ControlMessage> = fds
            .as_ref()
            .map(|f| vec![ControlMessage::ScmRights(f)])
            .unwrap_or_default();
        sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&data)],
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|e| anyhow!("the launcher (pid {}) is gone: {e}", self.pid))?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        let n = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            recvmsg::<()>(sock.as_raw_fd(), &mut iov, None, MsgFlags::empty())
                .map_err(|e| anyhow!("the launcher (pid {}) did not answer: {e}", self.pid))?
                .bytes
        };
        if n == 0 {
            bail!("the launcher (pid {}) is gone: restart koprogo", self.pid);
        }
        serde_json::from_slice(&buf[..n]).context("the launcher's answer")
    }

    /// Starts the API server (the launcher's fixed program); its pid.
    pub fn spawn(
        &self,
        args: &[String],
        env: &[(String, String)],
        cwd: &Path,
        death_signal: i32,
        oom_score_adj: Option<i32>,
        output: &OwnedFd,
    ) -> Result<i32> {
        let r = self.ask(
            &Request::Spawn {
                args: args.to_vec(),
                env: env.to_vec(),
                cwd: cwd.to_path_buf(),
                death_signal,
                oom_score_adj,
            },
            Some(output.as_raw_fd()),
        )?;
        match r.error {
            Some(e) => bail!("{e}"),
            None => Ok(r.pid),
        }
    }

    /// What /proc says of the API process `pid` (None: gone, or not one it started).
    pub fn inspect(&self, pid: i32) -> Result<Option<ProcInfo>> {
        let r = self.ask(&Request::Inspect { pid }, None)?;
        match r.error {
            Some(e) => bail!("{e}"),
            None => Ok(r.info),
        }
    }

    /// Sends `signal` to the API process `pid` (its group when `group`).
    pub fn signal(&self, pid: i32, signal: i32, group: bool) -> Result<()> {
        let r = self.ask(&Request::Signal { pid, signal, group }, None)?;
        match r.error {
            Some(e) => bail!("{e}"),
            None => Ok(()),
        }
    }
}

/// The launcher's life: become the API user, then answer until the socket closes.
fn serve(sock: OwnedFd, program: &CString, api: &Identity, supervisor: i32) -> Result<()> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .context("prctl(PR_SET_PDEATHSIG)")?;
    if nix::unistd::getppid().as_raw() != supervisor {
        return Ok(());
    }
    // Signals meant for the supervisor (a terminal's Ctrl-C, `timeout`, a group kill)
    // must not take the launcher away while the supervisor still stops the API: it
    // leaves on EOF of its socket, or with the supervisor (death signal).
    let _ = nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0));
    for sig in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGHUP,
        nix::sys::signal::Signal::SIGQUIT,
        nix::sys::signal::Signal::SIGPIPE,
    ] {
        // SAFETY: installing SIG_IGN, no handler code runs.
        let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn) };
    }
    // Only the socket stays open: no listener, log or lock of the supervisor's.
    let sock = keep_only(sock)?;
    nix::unistd::setgroups(&[api.gid]).context("setgroups")?;
    nix::unistd::setgid(api.gid).context("setgid")?;
    nix::unistd::setuid(api.uid).context("setuid")?;
    for set in [
        caps::CapSet::Ambient,
        caps::CapSet::Inheritable,
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
    ] {
        caps::clear(None, set).context("clearing capabilities")?;
    }
    if nix::unistd::setuid(nix::unistd::Uid::from_raw(0)).is_ok() {
        bail!("dropping privileges failed: root could be regained");
    }
    // Not ptrace-able by the API processes, though they are the same user.
    nix::sys::prctl::set_dumpable(false).context("prctl(PR_SET_DUMPABLE)")?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    // The API processes started, by process group. Their death signal cannot come
    // from the supervisor (the kernel checks it like a kill from another user), so
    // the launcher ends them when the supervisor is gone.
    let mut started: Vec<i32> = Vec::new();
    let end_all = |started: &[i32]| {
        for pid in started {
            // As the API user, only API processes are reachable.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(-pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    };
    loop {
        let (n, fd) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    end_all(&started);
                    bail!("reading the supervisor's request: {e}")
                }
            };
            let mut fd = None;
            for c in msg.cmsgs().into_iter().flatten() {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for f in fds {
                        // SAFETY: a descriptor just received, ours to own.
                        let owned = unsafe { OwnedFd::from_raw_fd(f) };
                        if fd.is_none() {
                            fd = Some(owned);
                        }
                    }
                }
            }
            (msg.bytes, fd)
        };
        if n == 0 {
            end_all(&started); // the supervisor is gone
            return Ok(());
        }
        let reply = match serde_json::from_slice::<Request>(&buf[..n]) {
            Ok(Request::Spawn {
                args,
                env,
                cwd,
                death_signal,
                oom_score_adj,
            }) => match fd {
                Some(out) => {
                    let child = Child {
                        death_signal,
                        oom: oom_score_adj.map(super::oom::text),
                        supervisor,
                    };
                    match spawn(program, &args, &env, &cwd, &child, &out) {
                        Ok(pid) => {
                            // Groups of processes long gone may still be listed: a kill
                            // of a reused group id can only reach this user's processes.
                            started.retain(|p| {
                                nix::sys::signal::kill(nix::unistd::Pid::from_raw(-p), None).is_ok()
                            });
                            started.push(pid);
                            Reply {
                                pid,
                                error: None,
                                info: None,
                            }
                        }
                        Err(e) => Reply {
                            pid: 0,
                            error: Some(format!("{e:#}")),
                            info: None,
                        },
                    }
                }
                None => Reply {
                    pid: 0,
                    error: Some("spawn without a log pipe".into()),
                    info: None,
                },
            },
            Ok(Request::Inspect { pid }) => {
                // Only a process of a group it started (an API server or its children).
                let info = crate::procfs::inspect(pid).filter(|i| started.contains(&i.pgid));
                Reply {
                    pid,
                    error: None,
                    info,
                }
            }
            Ok(Request::Signal { pid, signal, group }) => {
                let target = if group { -pid } else { pid };
                // As the API user, only API processes can be reached.
                let sent = nix::sys::signal::Signal::try_from(signal).and_then(|sig| {
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(target), sig)
                });
                Reply {
                    pid,
                    error: sent.err().map(|e| std::io::Error::from(e).to_string()),
                    info: None,
                }
            }
            Err(e) => Reply {
                pid: 0,
                error: Some(format!("unreadable request: {e}")),
                info: None,
            },
        };
        let data = serde_json::to_vec(&reply)?;
        sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(&data)],
            &[],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .context("answering the supervisor")?;
    }
}

/// Moves `sock` to descriptor 3 and closes every other descriptor above 2.
fn keep_only(sock: OwnedFd) -> Result<OwnedFd> {
    let raw = sock.as_raw_fd();
    let three = if raw == 3 {
        std::mem::forget(sock);
        3
    } else {
        // Onto 3 (closing whatever was there), then our copy closes.
        nix::unistd::dup3(raw, 3, nix::fcntl::OFlag::O_CLOEXEC).context("dup3")?;
        drop(sock);
        3
    };
    // SAFETY: close_range with integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32) };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("close_range");
    }
    // SAFETY: descriptor 3 is the socket, ours alone now.
    Ok(unsafe { OwnedFd::from_raw_fd(three) })
}

/// How the API child is set up between clone and exec.
struct Child {
    death_signal: i32,
    /// Its oom_score_adj, as `oom::text`.
    oom: Option<Vec<u8>>,
    supervisor: i32,
}

/// Starts `program` as a child of the supervisor (CLONE_PARENT); returns its pid
/// once it has exec'd, or why it could not.
fn spawn(
    program: &CString,
    args: &[String],
    env: &[(String, String)],
    cwd: &Path,
    child: &Child,
    out: &OwnedFd,
) -> Result<i32> {
    let Child {
        death_signal,
        supervisor,
        ..
    } = *child;
    let oom = child.oom.as_deref();
    let cstr = |s: &[u8]| CString::new(s).map_err(|_| anyhow!("NUL in an argument"));
    let mut argv_c = vec![program.clone()];
    for a in args {
        argv_c.push(cstr(a.as_bytes())?);
    }
    let envp_c = env
        .iter()
        .map(|(k, v)| cstr(format!("{k}={v}").as_bytes()))
        .collect::<Result<Vec<_>>>()?;
    let cwd_c = cstr(cwd.as_os_str().as_bytes())?;
    let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = envp_c.iter().map(|c| c.as_ptr()).collect();
    envp.push(std::ptr::null());
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe2")?;
    let out_fd = out.as_raw_fd();
    let err_fd = err_w.as_raw_fd();
    // SAFETY: a fork-like clone in this single-threaded process; the child only makes
    // async-signal-safe calls on memory prepared above, then execs or _exits.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("clone");
    }
    if pid == 0 {
        // SAFETY: the child side: only raw syscalls, then exec or _exit.
        unsafe {
            let fail = |step: i32| -> ! {
                let e = *libc::__errno_location();
                let msg = [step, e];
                libc::write(err_fd, msg.as_ptr().cast(), std::mem::size_of_val(&msg));
                libc::_exit(127)
            };
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
            if null < 0 || libc::dup2(null, 0) < 0 {
                fail(1);
            }
            if libc::dup2(out_fd, 1) < 0 || libc::dup2(out_fd, 2) < 0 {
                fail(2);
            }
            if libc::setpgid(0, 0) != 0 {
                fail(3);
            }
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                death_signal as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                fail(4);
            }
            if libc::getppid() != supervisor {
                libc::_exit(1);
            }
            if libc::chdir(cwd_c.as_ptr()) != 0 {
                fail(5);
            }
            if let Some(t) = oom {
                // The launcher is not dumpable, so its /proc files are root's and
                // the child could not write its own oom_score_adj. Dumpable again:
                // what exec makes it anyway, a few instructions later.
                libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0);
                // A refusal leaves the inherited value: status and `check` show it.
                super::oom::write_in_child(t);
            }
            // The launcher ignores these; an ignored signal would stay ignored
            // across exec, and the API must stop on SIGTERM.
            for sig in [
                libc::SIGTERM,
                libc::SIGINT,
                libc::SIGHUP,
                libc::SIGQUIT,
                libc::SIGPIPE,
            ] {
                libc::signal(sig, libc::SIG_DFL);
            }
            // Group-writable: the supervisor (in the API's group) manages uploads.
            libc::umask(0o007);
            libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
            fail(6);
        }
    }
    drop(err_w);
    let mut msg = [0u8; 8];
    let n = nix::unistd::read(err_r.as_raw_fd(), &mut msg).unwrap_or(0);
    if n == 8 {
        let step = i32::from_ne_bytes([msg[0], msg[1], msg[2], msg[3]]);
        let errno = i32::from_ne_bytes([msg[4], msg[5], msg[6], msg[7]]);
        let what = match step {
            1 | 2 => "cannot set up its standard streams",
            3 => "cannot make its process group",
            4 => "cannot set its death signal",
            5 => "cannot enter its working directory",
            _ => "cannot execute it",
        };
        bail!(
            "cannot start {} as the API user: {what} ({}) in {}",
            program.to_string_lossy(),
            std::io::Error::from_raw_os_error(errno),
            cwd.display()
        );
    }
    Ok(pid as i32)
}
