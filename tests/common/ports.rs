//! Loopback ports for the tests, shared by every test process of a run.
//!
//! A port asked of the kernel with `bind(:0)` comes from the ephemeral range
//! (`net.ipv4.ip_local_port_range`, 32768+ by default), and is released before the
//! appliance binds it: in between, another test's outgoing connection may take it as
//! its source port (CI saw `backend.port … Address already in use`). So ports are
//! taken below that range, and each one is reserved by an exclusive lock on a file of
//! its own, held until this test process exits: parallel test processes never hand
//! out the same port, and nothing else on a test box listens there.

use std::fs::File;
use std::net::{TcpListener, UdpSocket};
use std::sync::Mutex;

use nix::fcntl::{Flock, FlockArg};

/// Locks held for the life of the process (dropping a file releases its lock).
static HELD: Mutex<Vec<Flock<File>>> = Mutex::new(Vec::new());

/// The ports tests draw from: below the ephemeral range, above the well-known ones.
fn range() -> std::ops::Range<u16> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let end = low.clamp(12000, 32768);
    10000..end
}

fn lock_dir() -> std::path::PathBuf {
    let uid = nix::unistd::Uid::effective();
    let d = std::env::temp_dir().join(format!("koprogo-test-ports-{uid}"));
    std::fs::create_dir_all(&d).expect("create the test port lock directory");
    d
}

/// Reserves the port for this process, or None when another process holds it.
fn lock(dir: &std::path::Path, port: u16) -> Option<Flock<File>> {
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(port.to_string()))
        .expect("open a test port lock file");
    Flock::lock(f, FlockArg::LockExclusiveNonblock).ok()
}

fn bindable(port: u16, udp: bool) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
        && (TcpListener::bind(("::1", port)).is_ok() || TcpListener::bind("[::1]:0").is_err())
        && (!udp || UdpSocket::bind(("127.0.0.1", port)).is_ok())
}

/// The first of `n` consecutive loopback ports, free for TCP (and UDP when `udp`)
/// on 127.0.0.1 and ::1, reserved for this process until it exits.
pub fn reserve(n: u16, udp: bool) -> u16 {
    use rand::Rng;
    let dir = lock_dir();
    let r = range();
    for _ in 0..2000 {
        let first: u16 = rand::thread_rng().gen_range(r.start..r.end - n);
        let mut locks = Vec::new();
        for p in first..first + n {
            match lock(&dir, p) {
                Some(f) if bindable(p, udp) => locks.push(f),
                _ => break,
            }
        }
        if locks.len() == usize::from(n) {
            HELD.lock().unwrap_or_else(|e| e.into_inner()).extend(locks);
            return first;
        }
    }
    panic!("no {n} free consecutive loopback ports in {r:?}");
}
