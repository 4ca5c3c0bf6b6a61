//! Load through the proxy for the update and instance tests: client threads on
//! keep-alive HTTPS connections (reconnecting after an error), every failed
//! request counted, and which binary (`X-Demo-Version`) and instance
//! (`X-Demo-Port`) answered.
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

use super::https::Client;
use super::Appliance;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on the requests one client thread sends.
const MAX_PER_THREAD: usize = 20_000;

/// The demo backend run by a script with `env` (e.g. `DEMO_VERSION=2`).
pub fn script(env: &str) -> String {
    format!("#!/bin/sh\n{env} exec @DEMO@\n")
}

/// Installs a new backend the way dpkg does: write aside, then rename into place.
pub fn install_backend(a: &Appliance, env: &str) {
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

pub fn root_pem(a: &Appliance) -> String {
    let out = a.path("root.pem");
    let (code, o, e) = a.cli(&["ca", "export", out.to_str().expect("utf8")]);
    assert_eq!(code, 0, "ca export: {o}{e}");
    std::fs::read_to_string(out).expect("root.pem")
}

#[derive(Default, Debug)]
pub struct Tally {
    pub ok: usize,
    pub failed: Vec<String>,
    pub versions: BTreeMap<String, usize>,
    /// Answers per API port.
    pub ports: BTreeMap<String, usize>,
    /// Versions of the last responses.
    pub tail: VecDeque<String>,
    /// The `id` of every write that was answered 2xx (acknowledged writes).
    pub created: Vec<String>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.ok += other.ok;
        self.failed.extend(other.failed);
        for (k, v) in other.versions {
            *self.versions.entry(k).or_default() += v;
        }
        for (k, v) in other.ports {
            *self.ports.entry(k).or_default() += v;
        }
        self.tail.extend(other.tail);
        self.created.extend(other.created);
    }
}

/// The load: `threads` client threads, each on one keep-alive HTTPS connection
/// (reconnecting after an error), until `stop` is set (bounded).
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Tally>>,
    /// Successful requests so far, per thread.
    done: Vec<Arc<AtomicU64>>,
}

impl Load {
    /// The demo backend's load. `writes`: threads after the first alternate POST
    /// and GET (else all GET).
    pub fn start(a: &Appliance, threads: usize, writes: bool) -> Load {
        Self::start_with(
            a,
            threads,
            Arc::new(move |n, i| {
                let post = writes && n > 0 && i % 2 == 0;
                let req = hyper::Request::builder()
                    .method(if post { "POST" } else { "GET" })
                    .uri("/api/v1/items")
                    .body(Full::new(Bytes::from(if post { "load" } else { "" })))
                    .expect("request");
                (post, req)
            }),
        )
    }

    /// `threads` clients sending what `make(thread, i)` gives: (is it a write, the
    /// request; the Host header is added).
    pub fn start_with(a: &Appliance, threads: usize, make: MakeRequest) -> Load {
        let https = a.cfg().proxy.https[0].port();
        let client = Arc::new(Client::new(&root_pem(a), &[b"http/1.1"]));
        let stop = Arc::new(AtomicBool::new(false));
        let done: Vec<Arc<AtomicU64>> = (0..threads).map(|_| Arc::default()).collect();
        let threads = (0..threads)
            .map(|n| {
                let (client, stop, make) = (client.clone(), stop.clone(), make.clone());
                let ok = done[n].clone();
                std::thread::spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime")
                        .block_on(client_loop(client, https, stop, ok, n, make))
                })
            })
            .collect();
        Load {
            stop,
            threads,
            done,
        }
    }

    /// Waits until every thread has had `n` more successful requests (so its
    /// `tail` is all from now on when `n` >= 50), for at most `limit`.
    pub fn wait_each(&self, n: u64, limit: Duration) {
        let from: Vec<u64> = self
            .done
            .iter()
            .map(|d| d.load(Ordering::Relaxed))
            .collect();
        let deadline = Instant::now() + limit;
        while self
            .done
            .iter()
            .zip(&from)
            .any(|(d, f)| d.load(Ordering::Relaxed) < f + n)
        {
            assert!(
                Instant::now() < deadline,
                "not {n} more successful requests per client thread within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Successful requests so far, all threads together.
    pub fn succeeded(&self) -> u64 {
        self.done.iter().map(|d| d.load(Ordering::Relaxed)).sum()
    }

    pub fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut t = Tally::default();
        for h in self.threads {
            t.add(h.join().expect("client thread"));
        }
        t
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Makes request `i` of client thread `n`: (is it a write, the request).
pub type MakeRequest =
    Arc<dyn Fn(usize, usize) -> (bool, hyper::Request<Full<Bytes>>) + Send + Sync>;

async fn connect(client: &Client, port: u16) -> std::io::Result<Sender> {
    let tls = client.connect(port, "localhost").await?;
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(send)
}

/// One client thread: requests from `make` on one keep-alive connection.
async fn client_loop(
    client: Arc<Client>,
    port: u16,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    n: usize,
    make: MakeRequest,
) -> Tally {
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
        let (post, mut req) = make(n, i);
        if let Ok(h) = hyper::header::HeaderValue::from_str(&format!("localhost:{port}")) {
            req.headers_mut().insert(hyper::header::HOST, h);
        }
        let what = format!("{} {}", req.method(), req.uri().path());
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
            let from = resp
                .headers()
                .get("x-demo-port")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_string();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok((status, version, from, body))
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, one).await {
            Ok(Ok((status, version, from, body))) if (200..300).contains(&status) => {
                t.ok += 1;
                ok.fetch_add(1, Ordering::Relaxed);
                if post {
                    let id = serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .map(|v| v["id"].clone());
                    match id {
                        Some(serde_json::Value::String(s)) => t.created.push(s),
                        Some(serde_json::Value::Number(n)) => t.created.push(n.to_string()),
                        _ => {}
                    }
                }
                *t.ports.entry(from).or_default() += 1;
                *t.versions.entry(version.clone()).or_default() += 1;
                t.tail.push_back(version);
                if t.tail.len() > 50 {
                    t.tail.pop_front();
                }
            }
            Ok(Ok((status, _, _, body))) => t.failed.push(format!(
                "{what} {status}: {}",
                String::from_utf8_lossy(&body)
            )),
            Ok(Err(e)) => {
                t.failed.push(format!("{what}: {e}"));
                sender = None;
            }
            Err(_) => {
                t.failed.push(format!("{what}: timed out"));
                sender = None;
            }
        }
    }
    t
}

/// Prints the figures (the failed-request count is what the issue asks for).
pub fn report(what: &str, t: &Tally) {
    println!(
        "{what}: {} requests, {} failed, versions {:?}, instances {:?}",
        t.ok + t.failed.len(),
        t.failed.len(),
        t.versions,
        t.ports
    );
    for f in t.failed.iter().take(10) {
        println!("  failed: {f}");
    }
}
