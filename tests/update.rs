//! Application updates, end to end: a real appliance whose API server is a script
//! that runs the demo backend with `DEMO_VERSION=N` (every response says which
//! binary answered). The script is replaced the way dpkg does it (a new file
//! renamed over the old one) or `koprogo reload` is run, while two client threads
//! send requests through the HTTPS proxy on keep-alive connections. Every failed
//! request is counted and printed: the figure must be zero.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::https::Client;
use common::Appliance;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on the requests one client thread sends.
const MAX_PER_THREAD: usize = 20_000;

fn script(env: &str) -> String {
    format!("#!/bin/sh\n{env} exec @DEMO@\n")
}

/// An appliance whose backend is `DEMO_VERSION=1 demo-backend`, no rate limit.
fn appliance(start_timeout: &str) -> Appliance {
    let a = Appliance::with_backend("rate = 0\n", Some(&script("DEMO_VERSION=1")));
    let text = std::fs::read_to_string(&a.config).expect("config");
    let text = text.replace(
        "start_timeout = \"30s\"\nstop_timeout = \"35s\"",
        &format!("start_timeout = \"{start_timeout}\"\nstop_timeout = \"35s\""),
    );
    std::fs::write(&a.config, text).expect("write config");
    a
}

/// Installs a new backend the way dpkg does: write aside, then rename into place.
fn install_backend(a: &Appliance, env: &str) {
    let demo = a.path("demo-backend");
    let tmp = a.path("backend.sh.dpkg-new");
    std::fs::write(
        &tmp,
        script(env).replace("@DEMO@", &demo.display().to_string()),
    )
    .expect("write new backend");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&tmp, a.path("backend.sh")).expect("rename into place");
}

fn root_pem(a: &Appliance) -> String {
    let out = a.path("root.pem");
    let (code, o, e) = a.cli(&["ca", "export", out.to_str().expect("utf8")]);
    assert_eq!(code, 0, "ca export: {o}{e}");
    std::fs::read_to_string(out).expect("root.pem")
}

#[derive(Default, Debug)]
struct Tally {
    ok: usize,
    failed: Vec<String>,
    versions: BTreeMap<String, usize>,
    /// Versions of the last responses.
    tail: VecDeque<String>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.ok += other.ok;
        self.failed.extend(other.failed);
        for (k, v) in other.versions {
            *self.versions.entry(k).or_default() += v;
        }
        self.tail.extend(other.tail);
    }
}

/// The load: `threads` client threads, each on one keep-alive HTTPS connection
/// (reconnecting after an error), until `stop` is set (bounded).
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Tally>>,
}

impl Load {
    fn start(a: &Appliance, threads: usize) -> Load {
        let https = a.cfg().proxy.https[0].port();
        let client = Arc::new(Client::new(&root_pem(a), &[b"http/1.1"]));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|n| {
                let (client, stop) = (client.clone(), stop.clone());
                std::thread::spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime")
                        .block_on(client_loop(client, https, stop, n))
                })
            })
            .collect();
        Load { stop, threads }
    }

    fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut t = Tally::default();
        for h in self.threads {
            t.add(h.join().expect("client thread"));
        }
        t
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(client: &Client, port: u16) -> std::io::Result<Sender> {
    let tls = client.connect(port, "localhost").await?;
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(send)
}

/// Thread 0 reads (GET); the others alternate a write (POST) and a read.
async fn client_loop(client: Arc<Client>, port: u16, stop: Arc<AtomicBool>, n: usize) -> Tally {
    let mut t = Tally::default();
    let mut sender: Option<Sender> = None;
    let deadline = Instant::now() + Duration::from_secs(180);
    for i in 0..MAX_PER_THREAD {
        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
            break;
        }
        let s = match sender.as_mut() {
            Some(s) => s,
            None => match connect(&client, port).await {
                Ok(s) => sender.insert(s),
                Err(e) => {
                    t.failed.push(format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let post = n > 0 && i % 2 == 0;
        let req = hyper::Request::builder()
            .method(if post { "POST" } else { "GET" })
            .uri("/api/v1/items")
            .header("host", format!("localhost:{port}"))
            .body(Full::new(Bytes::from(if post { "load" } else { "" })))
            .expect("request");
        let one = async {
            if s.ready().await.is_err() {
                return Err("connection closed".to_string());
            }
            let resp = s.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let version = resp
                .headers()
                .get("x-demo-version")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_string();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok((status, version, body))
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, one).await {
            Ok(Ok((status, version, _))) if (200..300).contains(&status) => {
                t.ok += 1;
                *t.versions.entry(version.clone()).or_default() += 1;
                t.tail.push_back(version);
                if t.tail.len() > 50 {
                    t.tail.pop_front();
                }
            }
            Ok(Ok((status, _, body))) => t.failed.push(format!(
                "{} {status}: {}",
                if post { "POST" } else { "GET" },
                String::from_utf8_lossy(&body)
            )),
            Ok(Err(e)) => {
                t.failed.push(e);
                sender = None;
            }
            Err(_) => {
                t.failed.push("timed out".into());
                sender = None;
            }
        }
    }
    t
}

fn report(what: &str, t: &Tally) {
    println!(
        "{what}: {} requests, {} failed, versions {:?}",
        t.ok + t.failed.len(),
        t.failed.len(),
        t.versions
    );
    for f in t.failed.iter().take(10) {
        println!("  failed: {f}");
    }
}

fn api(a: &Appliance) -> koprogo::supervisor::state::ServiceReport {
    Appliance::service(&a.status().expect("status"), "api")
}

#[test]
fn update_swap_under_load_fails_no_request_and_names_the_backup() {
    let mut a = appliance("30s");
    a.start();
    a.wait_ready();
    let before = api(&a);
    let load = Load::start(&a, 2);
    std::thread::sleep(Duration::from_millis(500));
    install_backend(&a, "DEMO_VERSION=2");
    let st = a.wait_for(Duration::from_secs(90), "the update", |s| {
        s.update.last.is_some()
    });
    // A little more traffic on the new server, then stop.
    std::thread::sleep(Duration::from_millis(1000));
    let t = load.finish();
    report("update swap under load", &t);
    let last = st.update.last.clone().expect("last update");
    assert!(last.ok, "the update failed: {last:#?}\n{}", a.stderr());
    assert_eq!(last.trigger, "binary changed");
    assert!(t.ok > 200, "too little traffic to mean anything: {t:?}");
    assert_eq!(t.failed.len(), 0, "failed requests during the swap");
    assert!(t.versions.get("1").copied().unwrap_or(0) > 0, "{t:?}");
    assert!(t.versions.get("2").copied().unwrap_or(0) > 0, "{t:?}");
    assert!(
        t.tail.iter().all(|v| v == "2"),
        "after the swap the old binary still answered: {:?}",
        t.tail
    );

    // The new process serves, on the spare port; the old one is gone.
    let now = api(&a);
    assert!(now.ready);
    assert_ne!(now.pid, before.pid);
    assert_eq!(now.port, Some(a.backend_port + 1));
    assert_eq!(now.swaps, 1);
    assert_eq!(last.old_pids, before.pid.into_iter().collect::<Vec<_>>());
    assert_eq!(last.new_pids, now.pid.into_iter().collect::<Vec<_>>());
    let old = before.pid.expect("old pid");
    assert!(
        !std::path::Path::new(&format!("/proc/{old}")).exists(),
        "the old API server {old} still runs"
    );

    // The pre-update backup exists, and status (JSON and text) names it.
    let file = st.update.pre_update_backup.clone().expect("pre-update backup");
    assert_eq!(last.backup.as_deref(), Some(file.as_str()));
    assert!(file.contains("-pre-update"), "{file}");
    assert!(std::path::Path::new(&file).is_file(), "{file} is missing");
    let (_, text, _) = a.cli(&["status"]);
    assert!(text.contains(&file), "status does not name {file}:\n{text}");
    let (_, json, _) = a.cli(&["status", "--json"]);
    assert!(json.contains(&file), "status --json does not name {file}");

    // Another update, by command this time, swaps back to the home port.
    install_backend(&a, "DEMO_VERSION=3");
    let (code, out, err) = a.cli(&["reload"]);
    assert_eq!(code, 0, "reload: {out}{err}");
    assert!(out.contains("updated"), "{out}");
    let now = api(&a);
    assert_eq!(now.port, Some(a.backend_port));
    let (code, _, _) = a.cli(&["status"]);
    assert_eq!(code, 0);
    let (status, body) = a.http("GET", "/api/v1/health", "").expect("health on home port");
    assert_eq!(status, 200, "{body}");
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn a_broken_new_binary_leaves_the_old_one_serving() {
    let mut a = appliance("6s");
    a.start();
    a.wait_ready();
    let before = api(&a);

    // 1. A new binary that exits at once, installed and applied by `koprogo reload`.
    let load = Load::start(&a, 2);
    std::thread::sleep(Duration::from_millis(300));
    install_backend(&a, "DEMO_VERSION=2 DEMO_EXIT_AT_START=3");
    let (code, out, err) = a.cli(&["reload"]);
    std::thread::sleep(Duration::from_millis(300));
    let t = load.finish();
    report("new binary exits at start", &t);
    assert_eq!(code, 1, "reload of a broken binary must fail: {out}{err}");
    assert!(
        err.contains("exited at start (exit code 3)") && err.contains("keeps serving"),
        "{err}"
    );
    assert_eq!(t.failed.len(), 0, "failed requests");
    assert_eq!(t.versions.keys().collect::<Vec<_>>(), ["1"], "{t:?}");
    let st = a.status().expect("status");
    let last = st.update.last.clone().expect("last");
    assert!(!last.ok);
    assert!(last.message.contains("exit code 3"), "{last:#?}");
    assert!(last.backup.as_deref().is_some_and(|b| std::path::Path::new(b).is_file()));
    let now = Appliance::service(&st, "api");
    assert!(now.ready);
    assert_eq!(now.pid, before.pid, "the old server must keep serving");
    let (_, text, _) = a.cli(&["status"]);
    assert!(text.contains("FAILED") && text.contains("exit code 3"), "{text}");

    // 2. A new binary that never becomes ready, noticed by the watcher.
    let load = Load::start(&a, 2);
    std::thread::sleep(Duration::from_millis(300));
    install_backend(&a, "DEMO_VERSION=2 DEMO_NEVER_READY=1");
    let st = a.wait_for(Duration::from_secs(90), "the second update", |s| {
        s.update
            .last
            .as_ref()
            .is_some_and(|l| l.trigger == "binary changed")
    });
    std::thread::sleep(Duration::from_millis(300));
    let t = load.finish();
    report("new binary never ready", &t);
    let last = st.update.last.clone().expect("last");
    assert!(!last.ok);
    assert!(
        last.message.contains("not ready after 6s"),
        "{}",
        last.message
    );
    assert_eq!(t.failed.len(), 0, "failed requests");
    assert_eq!(t.versions.keys().collect::<Vec<_>>(), ["1"], "{t:?}");
    let now = api(&a);
    assert!(now.ready);
    assert_eq!(now.pid, before.pid);
    // The never-ready server was stopped.
    let new = *last.new_pids.first().expect("new pid");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{new}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!std::path::Path::new(&format!("/proc/{new}")).exists());
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}
