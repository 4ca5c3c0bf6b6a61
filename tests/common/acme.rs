//! Pebble for the ACME tests: Debian's `pebble` + `pebble-challtestsrv` (a fake DNS
//! that answers 127.0.0.1 for every name) on reserved loopback ports, a certificate
//! for Pebble's own HTTPS listener made here with rcgen (the Debian package ships
//! none), and the challenge listeners the appliance's proxy would run (HTTP-01 on a
//! plain port, TLS with `Tls::server_config()` for TLS-ALPN-01 and for the tests'
//! own line-echo connections). Processes are killed in `Drop` and die with the test
//! (PR_SET_PDEATHSIG) even if it is killed. The TLS clients are in `https`.
#![allow(dead_code)]

use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use koprogo::tls::{Tls, ACME_TLS_ALPN};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use super::free_port;
use super::https::{https_get, load_roots};
use super::ports;

pub const PEBBLE: &str = "/usr/bin/pebble";
pub const CHALLTESTSRV: &str = "/usr/bin/pebble-challtestsrv";

/// Whether Pebble can be used: installed, or installed now (as root, `apt-get install
/// pebble`, serialized by a lock so parallel tests do not race on dpkg).
pub fn pebble_available() -> bool {
    if Path::new(PEBBLE).exists() && Path::new(CHALLTESTSRV).exists() {
        return true;
    }
    if !super::is_root() {
        return false;
    }
    let Ok(lock) = File::create("/tmp/koprogo-test-pebble-install.lock") else {
        return false;
    };
    let Ok(_guard) = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive) else {
        return false;
    };
    if Path::new(PEBBLE).exists() && Path::new(CHALLTESTSRV).exists() {
        return true;
    }
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", "pebble"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let _ = Command::new("apt-get")
            .args(["update", "-qq"])
            .stdin(Stdio::null())
            .status();
        install();
    }
    Path::new(PEBBLE).exists() && Path::new(CHALLTESTSRV).exists()
}

/// Pebble and its fake DNS, killed on drop.
pub struct Pebble {
    pub dir: PathBuf,
    pub directory: String,
    /// PEM root that Pebble's HTTPS listener chains to (for `tls.acme_ca_root`).
    pub listener_root: PathBuf,
    pub management: SocketAddr,
    config: PathBuf,
    dns: SocketAddr,
    pebble: Option<Child>,
    challtestsrv: Option<Child>,
    log: PathBuf,
}

impl Pebble {
    /// Starts both processes; Pebble validates HTTP-01 on `http_port` and TLS-ALPN-01
    /// on `tls_port` of 127.0.0.1 and issues certificates valid `validity` seconds.
    pub fn start(dir: &Path, http_port: u16, tls_port: u16, validity: Option<u64>) -> Pebble {
        std::fs::create_dir_all(dir).expect("pebble dir");
        let (root, cert, key) = listener_certificate();
        let listener_root = dir.join("pebble-listener-root.pem");
        std::fs::write(&listener_root, root).expect("write root");
        std::fs::write(dir.join("pebble.crt"), cert).expect("write cert");
        std::fs::write(dir.join("pebble.key"), key).expect("write key");
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let management = SocketAddr::from(([127, 0, 0, 1], free_port()));
        // Reserved for UDP too, below the ephemeral range (see `ports`): the fake
        // DNS binds it again after a restart.
        let dns = SocketAddr::from(([127, 0, 0, 1], ports::reserve(1, true)));
        let mut conf = serde_json::json!({
            "pebble": {
                "listenAddress": listen.to_string(),
                "managementListenAddress": management.to_string(),
                "certificate": dir.join("pebble.crt"),
                "privateKey": dir.join("pebble.key"),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }
        });
        if let Some(v) = validity {
            conf["pebble"]["certificateValidityPeriod"] = v.into();
        }
        let config = dir.join("pebble-config.json");
        std::fs::write(&config, conf.to_string()).expect("write config");
        let mut p = Pebble {
            dir: dir.to_path_buf(),
            directory: format!("https://{listen}/dir"),
            listener_root,
            management,
            config,
            dns,
            pebble: None,
            challtestsrv: None,
            log: dir.join("pebble.log"),
        };
        let chall_log = File::create(dir.join("challtestsrv.log")).expect("log");
        let mut c = Command::new(CHALLTESTSRV);
        c.args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &dns.to_string()])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{}", free_port())]);
        p.challtestsrv = Some(spawn(c, chall_log));
        wait_tcp(dns, "pebble-challtestsrv DNS");
        p.start_pebble();
        p
    }

    /// (Re)starts Pebble itself with the same configuration (a fresh CA and database).
    pub fn start_pebble(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let mut c = Command::new(PEBBLE);
        c.args(["-config", &self.config.display().to_string()])
            .args(["-dnsserver", &self.dns.to_string()])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0");
        self.pebble = Some(spawn(c, log));
        let listen: SocketAddr = self
            .directory
            .trim_start_matches("https://")
            .trim_end_matches("/dir")
            .parse()
            .expect("listen addr");
        for addr in [listen, self.management] {
            let start = Instant::now();
            while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                let exited = self
                    .pebble
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                assert!(
                    exited.is_none() && start.elapsed() < Duration::from_secs(15),
                    "pebble is not listening on {addr} (exit: {exited:?}); its log:\n{}",
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Stops Pebble (the fake DNS stays).
    pub fn stop_pebble(&mut self) {
        if let Some(mut c) = self.pebble.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Pebble's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many orders Pebble has received (its log has one line per new-order).
    pub fn orders_seen(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("POST /order-plz") || l.contains("POST /new-order"))
            .count()
    }

    /// PEM of the root Pebble signs certificates with (management API).
    pub async fn issuing_root(&self) -> String {
        let roots = load_roots(&std::fs::read_to_string(&self.listener_root).expect("root"));
        https_get(self.management, "127.0.0.1", roots, "/roots/0").await
    }

    /// Pids of processes still running.
    pub fn pids(&self) -> Vec<u32> {
        [self.pebble.as_ref(), self.challtestsrv.as_ref()]
            .into_iter()
            .flatten()
            .map(Child::id)
            .collect()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in [self.pebble.take(), self.challtestsrv.take()]
            .into_iter()
            .flatten()
        {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(mut c: Command, log: File) -> Child {
    let err = log.try_clone().expect("log clone");
    c.stdin(Stdio::null()).stdout(log).stderr(err);
    // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
    unsafe {
        c.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    c.spawn().expect("spawn")
}

fn wait_tcp(addr: SocketAddr, what: &str) {
    let start = Instant::now();
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{what} did not listen on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Root, certificate and key (PEM) for Pebble's HTTPS listener on 127.0.0.1.
fn listener_certificate() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(
        rcgen::DnType::CommonName,
        "koprogo test pebble listener root",
    );
    let ca_cert = ca.self_signed(&ca_key).expect("root");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("params");
    let cert = leaf.signed_by(&key, &issuer).expect("leaf");
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// The HTTP-01 responder the proxy's port-80 listener would be; aborted on drop.
pub struct Http01 {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Http01 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn http01_listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    (l, port)
}

pub fn serve_http01(listener: TcpListener, tls: Arc<Tls>) -> Http01 {
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let tls = tls.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                let read = tokio::time::timeout(Duration::from_secs(5), async {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                })
                .await;
                if read.is_err() {
                    return;
                }
                let head = String::from_utf8_lossy(&buf);
                let path = head.split_whitespace().nth(1).unwrap_or("");
                let answer = path
                    .strip_prefix("/.well-known/acme-challenge/")
                    .and_then(|t| tls.http01_key_authorization(t));
                let resp = match answer {
                    Some(body) => format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    ),
                    None => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_string(),
                };
                let _ = tcp.write_all(resp.as_bytes()).await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    Http01 { port, task }
}

/// The HTTPS listener: TLS-ALPN-01 validations (closed after the handshake) and
/// line-echo connections for the tests; aborted on drop.
pub struct TlsServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn serve_tls(listener: TcpListener, tls: Arc<Tls>) -> TlsServer {
    let addr = listener.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(Ok(stream)) =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                else {
                    return;
                };
                if stream.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN) {
                    return;
                }
                let (r, mut w) = tokio::io::split(stream);
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if w.write_all(format!("pong:{line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let _ = w.flush().await;
                }
            });
        }
    });
    TlsServer { addr, task }
}
