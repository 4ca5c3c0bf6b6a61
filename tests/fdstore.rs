//! systemd's file-descriptor store, with the test playing systemd: it listens on
//! a NOTIFY_SOCKET of its own and keeps the descriptors `koprogo run` hands over
//! (FDSTORE=1), then passes them back to the next `koprogo run` (LISTEN_FDS,
//! LISTEN_PID, LISTEN_FDNAMES, descriptors from 3) while a client connects all the
//! time: no connection is refused across the restart, the new process adopts the
//! very same sockets (not new ones), and a socket the configuration no longer asks
//! for, or a descriptor that is no listening TCP socket, is closed (and removed from
//! the store). Real `koprogo run`, real PostgreSQL, the demo backend.

mod common;

use std::io::{IoSliceMut, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Appliance;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};

/// One notification: its text and the descriptors it carried.
struct Note {
    text: String,
    fds: Vec<OwnedFd>,
}

/// The test's NOTIFY_SOCKET.
struct Notify {
    sock: UnixDatagram,
    path: std::path::PathBuf,
}

impl Notify {
    fn new(a: &Appliance) -> Notify {
        let path = a.path("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("notify socket");
        // koprogo run drops to the service user after its first notifications.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        sock.set_nonblocking(true).expect("nonblocking");
        Notify { sock, path }
    }

    /// Every notification waiting now.
    fn drain(&self) -> Vec<Note> {
        let mut out = Vec::new();
        loop {
            let mut buf = [0u8; 4096];
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!([RawFd; 16]);
            let r = recvmsg::<UnixAddr>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            );
            let Ok(msg) = r else { break };
            let mut fds = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(v) = c {
                        // SAFETY: the kernel just installed these descriptors for us.
                        fds.extend(v.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                    }
                }
            }
            let n = msg.bytes;
            out.push(Note {
                text: String::from_utf8_lossy(&buf[..n]).into_owned(),
                fds,
            });
        }
        out
    }
}

/// systemd's store: (name, descriptor), in the order they came.
type Store = Vec<(String, OwnedFd)>;

fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.strip_prefix(key))
}

/// Applies FDSTORE / FDSTOREREMOVE notifications to `store` like systemd does
/// (a descriptor already stored is not stored twice); returns the other lines.
fn apply(store: &mut Store, notes: Vec<Note>) -> Vec<String> {
    let mut other = Vec::new();
    for n in notes {
        let name = field(&n.text, "FDNAME=").unwrap_or("stored").to_string();
        if n.text.lines().any(|l| l == "FDSTOREREMOVE=1") {
            store.retain(|(s, _)| *s != name);
            other.push(format!("FDSTOREREMOVE {name}"));
        } else if n.text.lines().any(|l| l == "FDSTORE=1") {
            for fd in n.fds {
                if !store
                    .iter()
                    .any(|(_, f)| inode(f.as_fd()) == inode(fd.as_fd()))
                {
                    store.push((name.clone(), fd));
                }
            }
        } else {
            other.push(n.text);
        }
    }
    other
}

fn inode(fd: std::os::fd::BorrowedFd<'_>) -> u64 {
    nix::sys::stat::fstat(fd.as_raw_fd()).expect("fstat").st_ino as u64
}

/// `koprogo run` with `fds` passed as systemd passes them (LISTEN_PID is the pid of
/// the process that execs koprogo, via a shell's `exec`).
/// Returns the command and the copies of the descriptors to drop once it started.
fn command(
    a: &Appliance,
    notify: &Notify,
    fds: &[(String, std::os::fd::BorrowedFd<'_>)],
) -> (Command, Vec<OwnedFd>) {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@""#)
        .arg(common::koprogo_bin())
        .arg("--config")
        .arg(&a.config)
        .env("NOTIFY_SOCKET", &notify.path);
    let mut copies = Vec::new();
    if !fds.is_empty() {
        // Out of the way of 3.. first, then onto 3.. in the child (dup2 clears
        // close-on-exec on the copy).
        let high: Vec<RawFd> = fds
            .iter()
            .map(|(_, f)| {
                nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100))
                    .expect("dup")
            })
            .collect();
        let names: Vec<&str> = fds.iter().map(|(n, _)| n.as_str()).collect();
        cmd.env("LISTEN_FDS", fds.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
        let owned: Vec<OwnedFd> = high
            .iter()
            // SAFETY: just duplicated, ours alone.
            .map(|&f| unsafe { OwnedFd::from_raw_fd(f) })
            .collect();
        let raws: Vec<RawFd> = owned.iter().map(|f| f.as_raw_fd()).collect();
        // SAFETY: dup2 is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for (i, &f) in raws.iter().enumerate() {
                    if libc::dup2(f, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        copies = owned;
    }
    (cmd, copies)
}

/// What the client saw.
#[derive(Default, Debug)]
struct Seen {
    answered: u64,
    refused: u64,
    failed: u64,
    longest: Duration,
    errors: Vec<String>,
}

/// Connects to `port` again and again (GET / over plain HTTP), until `stop`.
fn client(port: u16, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let r = (|| -> std::io::Result<String> {
                let addr: SocketAddr = ([127, 0, 0, 1], port).into();
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(60))?;
                s.set_read_timeout(Some(Duration::from_secs(90)))?;
                s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out)
            })();
            let took = t.elapsed();
            let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
            s.longest = s.longest.max(took);
            match r {
                Ok(text) if text.starts_with("HTTP/1.1 ") => s.answered += 1,
                Ok(text) => {
                    s.failed += 1;
                    let line = format!("no answer: {:?}", text.lines().next());
                    s.errors.push(line);
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => s.refused += 1,
                Err(e) => {
                    s.failed += 1;
                    s.errors.push(e.to_string());
                }
            }
            drop(s);
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

/// Socket inodes among a process's open descriptors.
fn socket_inodes(pid: i32) -> Vec<u64> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in rd.flatten() {
            if let Ok(t) = std::fs::read_link(e.path()) {
                let t = t.to_string_lossy().into_owned();
                if let Some(n) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                    if let Ok(n) = n.parse() {
                        out.push(n);
                    }
                }
            }
        }
    }
    out
}

/// Waits (bounded) until the store holds `n` descriptors.
fn wait_store(notify: &Notify, store: &mut Store, n: usize, other: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        other.extend(apply(store, notify.drain()));
        if store.len() >= n || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn restart_with_the_fd_store_refuses_no_connection() {
    let mut a = Appliance::new("");
    let cfg = a.cfg();
    let (http, https) = (cfg.proxy.http[0], cfg.proxy.https[0]);
    let notify = Notify::new(&a);
    let mut store: Store = Vec::new();
    let mut other = Vec::new();

    // Run 1: the plain-HTTP socket comes from "systemd" (made here), HTTPS is bound
    // by koprogo itself; both are handed to the store.
    let ours = TcpListener::bind(http).expect("bind proxy.http here");
    let ours_ino = inode(ours.as_fd());
    let (cmd, copies) = command(&a, &notify, &[("proxy-http".into(), ours.as_fd())]);
    a.start_with(cmd);
    drop(copies);
    drop(ours);
    a.wait_ready();
    wait_store(&notify, &mut store, 2, &mut other);
    let names: Vec<&str> = store.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(store.len(), 2, "FDSTORE messages: {names:?} {other:?}");
    assert!(
        store.iter().any(|(_, f)| inode(f.as_fd()) == ours_ino),
        "run 1 did not adopt the socket passed to it (stored {names:?})"
    );
    let stored: Vec<u64> = store.iter().map(|(_, f)| inode(f.as_fd())).collect();
    let log = a.stderr();
    assert!(log.contains("adopted the listeners systemd kept"), "{log}");

    // A listener the configuration does not ask for, and a TCP socket that is not
    // listening, as systemd would pass back stale entries of its store.
    let stale = TcpListener::bind("127.0.0.1:0").expect("stale listener");
    let stale_addr = stale.local_addr().expect("addr");
    let stale_ino = inode(stale.as_fd());
    let idle = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    let idle_ino = inode(idle.as_fd());

    // The client runs through the whole restart.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let c = client(http.port(), stop.clone(), seen.clone());
    let https_port = https.port();
    let tcp_stop = stop.clone();
    let tcp_refused = Arc::new(Mutex::new(0u64));
    let tcp_ref = tcp_refused.clone();
    let c2 = std::thread::spawn(move || {
        while !tcp_stop.load(Ordering::Relaxed) {
            let addr: SocketAddr = ([127, 0, 0, 1], https_port).into();
            if let Err(e) = TcpStream::connect_timeout(&addr, Duration::from_secs(60)) {
                if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    *tcp_ref.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    std::thread::sleep(Duration::from_millis(500));

    // A connection accepted before the stop whose request comes just after it:
    // answered, not closed unanswered.
    let mut early = TcpStream::connect(http).expect("connect before the stop");
    early
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM run 1");
    std::thread::sleep(Duration::from_millis(50));
    let mut answer = String::new();
    let sent = early
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .and_then(|()| early.read_to_string(&mut answer));
    assert_eq!(a.wait_exit(Duration::from_secs(90)), 0, "{}", a.stderr());
    let stopped = t.elapsed();
    assert!(
        sent.is_ok() && answer.starts_with("HTTP/1.1 "),
        "a request sent just after the stop began got no answer: {sent:?} {answer:?}"
    );
    other.extend(apply(&mut store, notify.drain()));
    assert_eq!(store.len(), 2, "the store after run 1 stopped");
    let mut passed: Vec<(String, std::os::fd::BorrowedFd<'_>)> =
        store.iter().map(|(n, f)| (n.clone(), f.as_fd())).collect();
    passed.push(("proxy-stale".into(), stale.as_fd()));
    passed.push(("not-listening".into(), idle.as_fd()));
    let (cmd, copies) = command(&a, &notify, &passed);
    a.start_with(cmd);
    drop(copies);
    drop(passed);
    drop(stale);
    drop(idle);
    let st = a.wait_ready();
    let restart = t.elapsed();
    // Some requests answered by run 2.
    let before = seen.lock().unwrap_or_else(|e| e.into_inner()).answered;
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.lock().unwrap_or_else(|e| e.into_inner()).answered < before + 5
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    c.join().expect("client");
    c2.join().expect("tcp client");
    let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
    let tcp_refused = *tcp_refused.lock().unwrap_or_else(|e| e.into_inner());
    println!(
        "MEASURE fdstore restart (SIGTERM to all ready): {:.1} s, stop {:.1} s; \
         answered {}, refused {} (+{} bare TCP), failed {}, longest wait {:.1} s",
        restart.as_secs_f64(),
        stopped.as_secs_f64(),
        seen.answered,
        seen.refused,
        tcp_refused,
        seen.failed,
        seen.longest.as_secs_f64()
    );
    assert_eq!(seen.refused, 0, "refused connections: {seen:?}");
    assert_eq!(seen.failed, 0, "failed requests: {seen:?}");
    assert_eq!(tcp_refused, 0, "refused TCP connections on proxy.https");
    assert!(seen.answered > before, "run 2 answered nothing: {seen:?}");

    // Run 2 adopted the very sockets of the store, closed the stale and the
    // non-listening ones, and removed them from the store.
    wait_store(&notify, &mut store, 2, &mut other);
    let now: Vec<u64> = store.iter().map(|(_, f)| inode(f.as_fd())).collect();
    assert_eq!(now, stored, "run 2 stored other sockets than it was given");
    let log = a.stderr();
    assert!(
        log.matches("adopted the listeners systemd kept").count() >= 2,
        "{log}"
    );
    assert!(
        log.contains(&format!("the listener on {stale_addr} passed by systemd")),
        "{log}"
    );
    assert!(log.contains("not listening"), "{log}");
    assert!(
        other.iter().any(|o| o == "FDSTOREREMOVE proxy-stale"),
        "{other:?}"
    );
    assert!(
        other.iter().any(|o| o == "FDSTOREREMOVE not-listening"),
        "{other:?}"
    );
    let held = socket_inodes(a.pid());
    for ino in &stored {
        assert!(held.contains(ino), "run 2 does not hold socket {ino}");
    }
    assert!(!held.contains(&stale_ino), "run 2 kept the stale listener");
    assert!(
        !held.contains(&idle_ino),
        "run 2 kept the non-listening socket"
    );
    // No child sees LISTEN_* (nor the descriptors).
    for svc in ["postgres", "api"] {
        let pid = Appliance::service(&st, svc).pid.expect("pid");
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&env).contains("LISTEN_"),
            "{svc} inherited LISTEN_*"
        );
        let theirs = socket_inodes(pid);
        for ino in &stored {
            assert!(!theirs.contains(ino), "{svc} inherited a proxy listener");
        }
    }
    a.stop();
    drop(store);
    a.assert_no_leftovers(Duration::from_secs(5));
}
