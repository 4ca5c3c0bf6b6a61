//! Test harness: a whole appliance (real `koprogo run`, real PostgreSQL, the demo
//! backend) in a private temporary directory on free loopback ports. Every wait is
//! bounded; dropping an `Appliance` kills what is left and checks that no process
//! of its tree survives. The submodules hold what only some tests need (`acme`:
//! Pebble; `https`: TLS clients; `ports`: the port reservations every helper uses;
//! `chaos`: the fault injector and recorder of the chaos soak);
//! a test declares `mod common;` and uses what it needs.
#![allow(dead_code)]

pub mod acme;
pub mod chaos;
pub mod chromium;
pub mod https;
pub mod load;
pub mod pg;
pub mod ports;
pub mod real;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use koprogo::config::Config;
use koprogo::control::{self, Request};
use koprogo::supervisor::StatusReport;

pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

pub fn koprogo_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_koprogo"))
}

/// The demo backend, built next to the koprogo binary (`cargo build --workspace`).
pub fn demo_bin() -> PathBuf {
    let p = koprogo_bin()
        .parent()
        .map(|d| d.join("demo-backend"))
        .unwrap_or_default();
    assert!(
        p.is_file(),
        "{} is missing: build it first with `cargo build --workspace`",
        p.display()
    );
    p
}

/// A loopback port reserved for this test process (see `ports`).
pub fn free_port() -> u16 {
    ports::reserve(1, false)
}

/// Waits (bounded) for `f` to hold, from async code (`Appliance::wait_for` waits
/// on the appliance's status).
pub async fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Logs to the test output when RUST_LOG is set.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// A private appliance: a temp dir holding config, state, logs, run and a copy of
/// the demo backend (readable by the service user whatever the checkout's modes).
pub struct Appliance {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub backend_port: u16,
    pub metrics_port: u16,
    pub child: Option<Child>,
    /// Every pid seen in `status`, checked at the end.
    seen: Vec<i32>,
}

impl Appliance {
    /// `extra` is appended to the generated config (e.g. `[backend.env]` lines).
    pub fn new(extra: &str) -> Appliance {
        Self::with_backend(extra, None)
    }

    /// Same, with `backend_cmd` instead of the demo backend (a path inside the dir).
    pub fn with_backend(extra: &str, backend_script: Option<&str>) -> Appliance {
        let dir = tempfile::Builder::new()
            .prefix("kpg")
            .tempdir()
            .expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod tempdir");
        let demo = dir.path().join("demo-backend");
        std::fs::copy(demo_bin(), &demo).expect("copy demo backend");
        std::fs::set_permissions(&demo, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let command = match backend_script {
            Some(script) => {
                let p = dir.path().join("backend.sh");
                std::fs::write(&p, script.replace("@DEMO@", &demo.display().to_string()))
                    .expect("write script");
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
                    .expect("chmod");
                p
            }
            None => demo,
        };
        // backend.port and the next ones belong to the API instances and their
        // update spares: all eight are reserved.
        let backend_port = ports::reserve(8, false);
        let (http, https) = (free_port(), free_port());
        let metrics_port = free_port();
        // max_connections = 18: the demo backend holds a real sqlx pool like
        // koprogo-api. PostgreSQL refuses the API's role once fewer than
        // superuser_reserved_connections (3) slots are free, and koprogo's own
        // connections (probe, stats, pg_dump) count too, so a rolling update of
        // `instances = 2` under load needs pool_max 4 × (2 + the spare) + 3 + 3 = 18
        // (with 12 the new instance's pool met "remaining connection slots are
        // reserved" and an update failed its 30 s readiness now and then).
        let mut text = format!(
            r#"domain = "localhost"
user = "koprogo"

[paths]
state = "state"
logs = "logs"
run = "run"

[postgres]
memory = "128MB"
max_connections = 18
start_timeout = "60s"
stop_timeout = "20s"

[backend]
command = "{}"
port = {backend_port}
start_timeout = "30s"
stop_timeout = "35s"
pool_max = 4
pool_min = 1

[metrics]
listen = "127.0.0.1:{metrics_port}"

[proxy]
http = ["127.0.0.1:{http}"]
https = ["127.0.0.1:{https}"]
"#,
            command.display()
        );
        text.push_str(extra);
        let config = dir.path().join("koprogo.toml");
        std::fs::write(&config, text).expect("write config");
        Appliance {
            dir,
            config,
            backend_port,
            metrics_port,
            child: None,
            seen: Vec::new(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn cfg(&self) -> Config {
        Config::load(&self.config).expect("test config loads")
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(koprogo_bin());
        c.arg("--config").arg(&self.config);
        c
    }

    /// `koprogo ARGS…` to completion: (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = self
            .cmd()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run koprogo");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts `koprogo run` with stderr to `<dir>/run-N.err`.
    pub fn start(&mut self) {
        self.start_with(self.cmd());
    }

    pub fn start_with(&mut self, mut cmd: Command) {
        assert!(self.child.is_none(), "already started");
        let n = std::fs::read_dir(self.dir.path())
            .map(|d| d.count())
            .unwrap_or(0);
        let err = std::fs::File::create(self.path(&format!("run-{n}.err"))).expect("stderr file");
        let child = cmd
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn koprogo run");
        self.child = Some(child);
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).expect("running")
    }

    pub fn status(&self) -> Option<StatusReport> {
        let r = control::request(&self.cfg(), &Request::Status).ok()?;
        r.status
    }

    /// Waits until `pred(status)` holds; panics with the last status after `limit`.
    pub fn wait_for(
        &mut self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&StatusReport) -> bool,
    ) -> StatusReport {
        let deadline = Instant::now() + limit;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!(
                        "koprogo exited ({st}) while waiting for {what}\n{}",
                        self.stderr()
                    );
                }
            }
            if let Some(s) = self.status() {
                for svc in &s.services {
                    if let Some(p) = svc.pid {
                        if !self.seen.contains(&p) {
                            self.seen.push(p);
                        }
                    }
                }
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out after {limit:?} waiting for {what}; last status: {last:#?}\n{}",
            self.stderr()
        );
    }

    pub fn wait_ready(&mut self) -> StatusReport {
        self.wait_for(BOOT_TIMEOUT, "all ready", |s| s.all_ready)
    }

    pub fn service(s: &StatusReport, name: &str) -> koprogo::process::state::ServiceReport {
        s.services
            .iter()
            .find(|x| x.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no service {name} in {s:#?}"))
    }

    /// Everything `koprogo run` printed on stderr, all runs.
    pub fn stderr(&self) -> String {
        let mut out = String::new();
        if let Ok(rd) = std::fs::read_dir(self.dir.path()) {
            let mut files: Vec<_> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "err"))
                .collect();
            files.sort();
            for f in files {
                out.push_str(&std::fs::read_to_string(&f).unwrap_or_default());
            }
        }
        out
    }

    /// Sends `sig` to the supervisor and waits (bounded) for it to exit.
    pub fn signal_and_wait(&mut self, sig: nix::sys::signal::Signal, limit: Duration) -> i32 {
        let pid = self.pid();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("signal koprogo");
        self.wait_exit(limit)
    }

    pub fn wait_exit(&mut self, limit: Duration) -> i32 {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                use std::os::unix::process::ExitStatusExt;
                return st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("koprogo did not exit within {limit:?}\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Graceful stop: SIGTERM, exit code 0 expected.
    pub fn stop(&mut self) {
        let code = self.signal_and_wait(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(90));
        assert_eq!(
            code,
            0,
            "koprogo exit code after SIGTERM\n{}",
            self.stderr()
        );
    }

    /// `pg_controldata`'s "Database cluster state".
    pub fn cluster_state(&self) -> String {
        let out = Command::new("/usr/lib/postgresql/15/bin/pg_controldata")
            .arg(self.path("state/pgdata"))
            .env("LC_ALL", "C")
            .output()
            .expect("pg_controldata");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with("Database cluster state:"))
            .map(|l| {
                l.trim_start_matches("Database cluster state:")
                    .trim()
                    .to_string()
            })
            .unwrap_or_default()
    }

    /// Processes of this appliance still alive: in a process group we saw, or with
    /// the temp dir on their command line. Zombies count.
    pub fn leftovers(&self) -> Vec<String> {
        let marker = self.dir.path().display().to_string();
        let mut found = Vec::new();
        for (pid, pgrp, cmdline) in processes() {
            if self.seen.contains(&pgrp) || cmdline.contains(&marker) {
                found.push(format!("{pid} (pgrp {pgrp}): {cmdline}"));
            }
        }
        found
    }

    /// Waits (bounded) until no process of the appliance is left.
    pub fn assert_no_leftovers(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let left = self.leftovers();
            if left.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                panic!("processes left behind: {left:#?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Plain HTTP/1.1 to the backend on loopback: (status, body).
    pub fn http(&self, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
        http(self.backend_port, method, path, body)
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Leave nothing behind even when a test failed half-way.
        let deadline = Instant::now() + Duration::from_secs(10);
        let marker = self.dir.path().display().to_string();
        while Instant::now() < deadline {
            let left: Vec<i32> = processes()
                .into_iter()
                .filter(|(_, g, c)| self.seen.contains(g) || c.contains(&marker))
                .map(|(p, _, _)| p)
                .collect();
            if left.is_empty() {
                break;
            }
            for p in left {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// (pid, process group, command line) of every process.
pub fn processes() -> Vec<(i32, i32, String)> {
    proc_stats()
        .into_iter()
        .map(|(pid, fields)| {
            let pgrp = fields.get(2).and_then(|s| s.parse().ok()).unwrap_or(0);
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            (pid, pgrp, cmdline)
        })
        .collect()
}

/// (pid, state letter, ppid) of every process.
pub fn process_states() -> Vec<(i32, char, i32)> {
    proc_stats()
        .into_iter()
        .map(|(pid, fields)| {
            let state = fields.first().and_then(|s| s.chars().next()).unwrap_or('?');
            let ppid = fields.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            (pid, state, ppid)
        })
        .collect()
}

/// (pid, the fields of `/proc/PID/stat` after the command name) of every process
/// that could be read.
fn proc_stats() -> Vec<(i32, Vec<String>)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let fields = stat[close + 2..].split(' ').map(String::from).collect();
        out.push((pid, fields));
    }
    out
}

/// Minimal HTTP/1.1 client (Connection: close), bounded by timeouts.
pub fn http(port: u16, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// Reads every line of `<logs>/<service>.log*`, decompressing `.gz` files.
pub fn all_log_lines(dir: &Path, service: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let prefix = format!("{service}.log");
    for e in std::fs::read_dir(dir).expect("read logs dir").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&prefix) || name.ends_with(".tmp") {
            continue;
        }
        let raw = std::fs::read(e.path()).expect("read log");
        let text = if name.ends_with(".gz") {
            let mut s = String::new();
            flate2::read::GzDecoder::new(&raw[..])
                .read_to_string(&mut s)
                .expect("gunzip");
            s
        } else {
            String::from_utf8_lossy(&raw).into_owned()
        };
        lines.extend(text.lines().map(String::from));
    }
    lines
}

/// Sends `raw` over plain TCP to 127.0.0.1:`port` and reads until close (bounded).
pub fn http_raw(port: u16, raw: &str) -> String {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.write_all(raw.as_bytes());
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}
