//! The proxy's listening sockets across restarts, through systemd's file-descriptor
//! store (`FileDescriptorStoreMax=` in the unit): at start, the sockets systemd passes
//! back (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`, descriptors from 3) are checked
//! (a listening TCP socket) and matched to `proxy.http`/`proxy.https` by address;
//! the ones the configuration no longer asks for are closed and removed from the
//! store (`FDSTOREREMOVE=1`). After binding, every listener is handed to the store
//! (`FDSTORE=1`, a datagram to `NOTIFY_SOCKET` carrying the descriptor), so while
//! `koprogo run` restarts systemd keeps the sockets open and clients wait in the
//! backlog instead of being refused. Owns nothing else; without `NOTIFY_SOCKET` and
//! `LISTEN_FDS` (a terminal, PID 1 of a container) it does nothing.

use std::io::IoSlice;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    getsockname, getsockopt, sendmsg, socket, sockopt, AddressFamily, ControlMessage, MsgFlags,
    SockFlag, SockType, SockaddrStorage, UnixAddr,
};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;
/// More than the unit's `FileDescriptorStoreMax=` allows is not from systemd.
const MAX_FDS: usize = 64;

/// A descriptor systemd passed, with the name it was stored under.
#[derive(Debug)]
pub struct Passed {
    pub name: String,
    pub fd: OwnedFd,
}

/// Takes the descriptors passed by systemd and removes `LISTEN_*` from our
/// environment (no child ever sees them). Each descriptor is made close-on-exec.
/// Call first thing, while single-threaded. Descriptors meant for another process
/// (`LISTEN_PID` not ours) are left alone.
pub fn take_passed() -> Vec<Passed> {
    let fds = std::env::var("LISTEN_FDS").ok();
    let pid = std::env::var("LISTEN_PID").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    for k in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    let (Some(fds), Some(pid)) = (fds, pid) else {
        return Vec::new();
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        eprintln!("koprogo: LISTEN_PID={pid} is not this process: its LISTEN_FDS={fds} ignored");
        return Vec::new();
    }
    let n = match fds.trim().parse::<usize>() {
        Ok(n) if n <= MAX_FDS => n,
        _ => {
            eprintln!(
                "koprogo: LISTEN_FDS={fds} is not a count of at most {MAX_FDS} descriptors: ignored"
            );
            return Vec::new();
        }
    };
    let names: Vec<String> = names
        .map(|s| s.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let raw = FIRST_FD + i as RawFd;
        // Only descriptors that are open: a wrong count must not make us own (and
        // later close) a descriptor of ours.
        if nix::fcntl::fcntl(raw, nix::fcntl::FcntlArg::F_GETFD).is_err() {
            eprintln!("koprogo: LISTEN_FDS={n} but descriptor {raw} is not open: ignored");
            continue;
        }
        let _ = nix::fcntl::fcntl(
            raw,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        // SAFETY: systemd passed descriptor `raw` to this process (LISTEN_PID is
        // ours), it is open, and nothing else in the process owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let name = names
            .get(i)
            .cloned()
            .unwrap_or_else(|| "unknown".to_string());
        out.push(Passed { name, fd });
    }
    out
}

/// What to do with the passed descriptors, given the addresses the configuration
/// asks for.
pub struct Sorted {
    /// Listening TCP sockets on a wanted address: adopted, not bound again.
    pub adopted: Vec<(SocketAddr, TcpListener)>,
    /// One line per descriptor closed, and why (logged once logging is up).
    pub dropped: Vec<String>,
}

/// Sorts the passed descriptors: a listening TCP socket on an address of `wanted`
/// is adopted; everything else is closed and removed from systemd's store.
pub fn sort(passed: Vec<Passed>, wanted: &[SocketAddr]) -> Sorted {
    let mut adopted: Vec<(SocketAddr, TcpListener)> = Vec::new();
    let mut keep: Vec<String> = Vec::new();
    let mut dropped = Vec::new();
    let mut remove = Vec::new();
    for p in passed {
        match listening_addr(p.fd.as_fd()) {
            Err(why) => {
                dropped.push(format!(
                    "descriptor {} ({}) passed by systemd is refused: {why}; closed",
                    p.fd.as_raw_fd(),
                    p.name
                ));
                remove.push(p.name);
            }
            Ok((addr, v6only)) => {
                let want = wanted.iter().find(|w| same_addr(w, &addr));
                let taken = adopted.iter().any(|(a, _)| same_addr(a, &addr));
                match want {
                    Some(w) if !taken && v6only == fresh_v6only(w) => {
                        keep.push(p.name);
                        adopted.push((*w, TcpListener::from(p.fd)));
                    }
                    Some(_) if !taken => {
                        dropped.push(format!(
                            "the listener on {addr} passed by systemd has IPV6_V6ONLY={v6only}, \
                             a new one would have {} (net.ipv6.bindv6only): closed, bound again",
                            !v6only
                        ));
                        remove.push(p.name);
                    }
                    _ => {
                        dropped.push(format!(
                            "the listener on {addr} passed by systemd ({}) is not in proxy.http or \
                             proxy.https (any more): closed and removed from systemd's store",
                            p.name
                        ));
                        remove.push(p.name);
                    }
                }
            }
        }
    }
    // A name an adopted socket also carries is not removed (that would drop it too).
    remove.sort();
    remove.dedup();
    for name in remove.into_iter().filter(|n| !keep.contains(n)) {
        if let Err(e) = notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), None) {
            dropped.push(format!(
                "cannot tell systemd to drop {name} from its store: {e}"
            ));
        }
    }
    Sorted { adopted, dropped }
}

/// The name a listener on `addr` is stored under: stable across restarts, unique
/// per address (`:` is the separator of `LISTEN_FDNAMES`, so it becomes `_`).
fn name_of(addr: &SocketAddr) -> String {
    format!("proxy-{}", addr.to_string().replace(':', "_"))
}

/// Hands every listener to systemd's store, when there is one (`NOTIFY_SOCKET`).
/// Returns one line per listener that could not be stored (a restart would then
/// refuse connections on it for a moment).
pub fn store<'a>(
    listeners: impl Iterator<Item = (&'a SocketAddr, &'a TcpListener)>,
) -> Vec<String> {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return Vec::new();
    }
    let mut problems = Vec::new();
    for (addr, l) in listeners {
        let name = name_of(addr);
        if let Err(e) = notify(&format!("FDSTORE=1\nFDNAME={name}"), Some(l.as_fd())) {
            problems.push(format!(
                "cannot hand the listener on {addr} to systemd's store ({e}): a restart \
                 refuses connections on it until the new process listens"
            ));
        }
    }
    problems
}

/// Is `fd` a listening TCP socket? Its local address and IPV6_V6ONLY.
fn listening_addr(fd: BorrowedFd<'_>) -> Result<(SocketAddr, bool), String> {
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| format!("fstat: {e}"))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err("not a socket".into());
    }
    let ty = getsockopt(&fd, sockopt::SockType).map_err(|e| format!("SO_TYPE: {e}"))?;
    if ty != SockType::Stream {
        return Err(format!("a {ty:?} socket, not a TCP one"));
    }
    let local: SockaddrStorage =
        getsockname(fd.as_raw_fd()).map_err(|e| format!("getsockname: {e}"))?;
    let (addr, v6) = if let Some(a) = local.as_sockaddr_in() {
        (SocketAddr::from((a.ip(), a.port())), false)
    } else if let Some(a) = local.as_sockaddr_in6() {
        (
            SocketAddr::V6(std::net::SocketAddrV6::new(
                a.ip(),
                a.port(),
                0,
                a.scope_id(),
            )),
            true,
        )
    } else {
        return Err("not an IPv4 or IPv6 socket".into());
    };
    if !getsockopt(&fd, sockopt::AcceptConn).map_err(|e| format!("SO_ACCEPTCONN: {e}"))? {
        return Err(format!("a TCP socket on {addr} that is not listening"));
    }
    let v6only = v6 && getsockopt(&fd, sockopt::Ipv6V6Only).unwrap_or(false);
    Ok((addr, v6only))
}

fn same_addr(a: &SocketAddr, b: &SocketAddr) -> bool {
    match (a, b) {
        (SocketAddr::V6(x), SocketAddr::V6(y)) => {
            x.ip() == y.ip() && x.port() == y.port() && x.scope_id() == y.scope_id()
        }
        _ => a == b,
    }
}

/// IPV6_V6ONLY of a socket `proxy::server::bind` would bind on `addr` now: the
/// system's default (net.ipv6.bindv6only), false for IPv4.
fn fresh_v6only(addr: &SocketAddr) -> bool {
    addr.is_ipv6()
        && std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only")
            .map(|s| s.trim() == "1")
            .unwrap_or(false)
}

/// One datagram to `NOTIFY_SOCKET`, with `fd` attached (SCM_RIGHTS) if given. Never
/// blocks: a full queue is retried for at most a second, then it is an error.
fn notify(msg: &str, fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let bytes = path.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => UnixAddr::new_abstract(name),
        None => UnixAddr::new(bytes),
    }
    .map_err(std::io::Error::from)?;
    let sock = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(std::io::Error::from)?;
    let raw: Vec<RawFd> = fd.map(|f| f.as_raw_fd()).into_iter().collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
    let iov = [IoSlice::new(msg.as_bytes())];
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match sendmsg(
            sock.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            Some(&addr),
        ) {
            Ok(n) if n == msg.len() => return Ok(()),
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "incomplete notification",
                ))
            }
            Err(nix::errno::Errno::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_fdnames() {
        for a in [
            "0.0.0.0:80",
            "[::]:443",
            "[fe80::1%2]:8443",
            "127.0.0.1:8080",
        ] {
            let a: SocketAddr = a.parse().expect("address");
            let n = name_of(&a);
            assert!(!n.contains(':') && n.len() < 255, "{n}");
            assert!(n.bytes().all(|b| b.is_ascii_graphic()), "{n}");
        }
    }

    #[test]
    fn a_listening_socket_is_recognised_and_others_refused() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        assert_eq!(listening_addr(l.as_fd()), Ok((addr, false)));
        let f = std::fs::File::open("/dev/null").expect("/dev/null");
        assert_eq!(listening_addr(f.as_fd()), Err("not a socket".to_string()));
        let u = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        assert!(listening_addr(u.as_fd()).is_err());
    }

    #[test]
    fn sort_adopts_wanted_and_drops_the_rest() {
        let a = TcpListener::bind("127.0.0.1:0").expect("bind");
        let b = TcpListener::bind("127.0.0.1:0").expect("bind");
        let (aa, ba) = (a.local_addr().expect("a"), b.local_addr().expect("b"));
        let passed = vec![
            Passed {
                name: "x".into(),
                fd: OwnedFd::from(a),
            },
            Passed {
                name: "y".into(),
                fd: OwnedFd::from(b),
            },
        ];
        let s = sort(passed, &[aa]);
        assert_eq!(s.adopted.len(), 1);
        assert_eq!(s.adopted[0].0, aa);
        assert_eq!(s.dropped.len(), 1, "{:?}", s.dropped);
        assert!(s.dropped[0].contains(&ba.to_string()), "{:?}", s.dropped);
    }
}
