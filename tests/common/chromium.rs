//! Headless Chromium (Debian's `chromium`) driven like a person at a keyboard: the
//! DevTools protocol on a pipe (`--remote-debugging-pipe`: commands on the browser's
//! fd 3, replies and events on its fd 4, JSON messages ended by NUL), so no port and
//! no websocket. A test opens a page, types into fields with `Input.insertText`,
//! clicks with real mouse events, reads the rendered text and takes screenshots.
//!
//! The browser lives in a private HOME (profile and NSS store, where the appliance's
//! exported root CA is imported with certutil, the way an office PC trusts it), in
//! its own process group; every wait is bounded; [`Browser::close`] asks it to quit
//! and kills the group after a bound, and dropping a [`Browser`] kills the group.
//! Only loopback is reachable: every other host name resolves to nothing.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Longest wait for one DevTools command's reply.
const CALL_LIMIT: Duration = Duration::from_secs(30);

/// Headless, no sandbox (root in CI), and nothing that reaches beyond loopback:
/// this machine's network is closed, and a test must not wait on it.
pub const FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
];

/// Debian's Chromium, if installed.
pub fn binary() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Whether certutil (libnss3-tools) can be run.
pub fn certutil_available() -> bool {
    Command::new("certutil")
        .arg("-H")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Creates the NSS store of `home` (`.pki/nssdb`) and trusts `root_pem` in it as a
/// CA for web sites.
pub fn trust_root(home: &Path, root_pem: &Path) {
    let nss = home.join(".pki/nssdb");
    std::fs::create_dir_all(&nss).expect("nssdb dir");
    let db = format!("sql:{}", nss.display());
    let ok = Command::new("certutil")
        .args(["-N", "-d", &db, "--empty-password"])
        .status()
        .expect("certutil -N");
    assert!(ok.success(), "certutil -N -d {db} failed");
    let ok = Command::new("certutil")
        .args(["-A", "-d", &db, "-t", "C,,", "-n", "KoproGo local CA", "-i"])
        .arg(root_pem)
        .status()
        .expect("certutil -A");
    assert!(ok.success(), "certutil -A {} failed", root_pem.display());
}

/// What the page reported: console lines, uncaught exceptions, failed or refused
/// requests, each as one line; and the requests that failed, for assertions.
#[derive(Default, Debug)]
pub struct PageLog {
    pub lines: Vec<String>,
    pub failed: Vec<FailedRequest>,
}

/// A request answered with a status of 400 or more, or not answered at all.
#[derive(Debug, Clone)]
pub struct FailedRequest {
    pub url: String,
    /// The HTTP status, when an answer came.
    pub status: Option<u16>,
    /// Chromium's reason (`net::ERR_…`, a blocked or CORS reason) when none came.
    pub error: String,
}

/// One headless Chromium with one page attached.
pub struct Browser {
    child: Option<Child>,
    to_browser: File,
    from_browser: Receiver<Value>,
    /// Recent `Network.requestWillBeSent` events, to name the URL of a failed request.
    requests: VecDeque<Value>,
    next_id: u64,
    session: String,
    pub home: PathBuf,
    pub log: PageLog,
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

impl Browser {
    /// Starts Chromium with a fresh profile under `home` (whose NSS store should
    /// already trust the CA) and a `width`×`height` page on about:blank.
    pub fn launch(bin: &Path, home: &Path, width: u32, height: u32) -> Browser {
        let profile = home.join("profile");
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).expect("profile dir");
        let (cmd_r, cmd_w) = pipe();
        let (evt_r, evt_w) = pipe();
        let stderr = File::create(home.join("chromium.log")).expect("chromium.log");
        let (cr, ew) = (cmd_r.as_raw_fd(), evt_w.as_raw_fd());
        let mut cmd = Command::new(bin);
        cmd.env("HOME", home)
            .args(FLAGS)
            .args([
                "--disable-extensions",
                "--remote-debugging-pipe",
                // Loopback only: any other name (the page's analytics, fonts…)
                // resolves to nothing instead of reaching the internet.
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("--window-size={width},{height}"))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0);
        // SAFETY: only async-signal-safe calls (fcntl, dup2, close) between fork and
        // exec. The pipe ends are first moved above 10 so that dup2 onto 3 and 4
        // cannot clobber one with the other, and lose O_CLOEXEC on the way.
        unsafe {
            cmd.pre_exec(move || {
                let r = libc::fcntl(cr, libc::F_DUPFD, 10);
                let w = libc::fcntl(ew, libc::F_DUPFD, 10);
                if r < 0 || w < 0 || libc::dup2(r, 3) < 0 || libc::dup2(w, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(r);
                libc::close(w);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start chromium");
        // The browser's ends now live in the child only: EOF when it exits.
        drop(cmd_r);
        drop(evt_w);
        let (tx, rx) = std::sync::mpsc::channel();
        let mut reader = File::from(evt_r);
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 64 * 1024];
            loop {
                let n = match reader.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                while let Some(end) = buf.iter().position(|&b| b == 0) {
                    let msg: Vec<u8> = buf.drain(..=end).collect();
                    if let Ok(v) = serde_json::from_slice::<Value>(&msg[..end]) {
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let mut b = Browser {
            child: Some(child),
            to_browser: File::from(cmd_w),
            from_browser: rx,
            requests: VecDeque::new(),
            next_id: 0,
            session: String::new(),
            home: home.to_path_buf(),
            log: PageLog::default(),
        };
        let target = b.call(
            "Target.createTarget",
            json!({ "url": "about:blank", "newWindow": false }),
            false,
        );
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = b.call(
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
            false,
        );
        b.session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        for domain in [
            "Page.enable",
            "Runtime.enable",
            "Network.enable",
            "Log.enable",
        ] {
            b.call(domain, json!({}), true);
        }
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
            true,
        );
        b
    }

    /// Sends one command (to the page's session when `on_page`) and waits, bounded,
    /// for its reply; panics on a protocol error.
    pub fn call(&mut self, method: &str, params: Value, on_page: bool) -> Value {
        self.try_call(method, params, on_page)
            .unwrap_or_else(|e| panic!("{method}: {e}"))
    }

    /// Like [`Browser::call`], but a protocol error (e.g. the page's context went
    /// away during a navigation) is an `Err`; no reply or a dead browser still panic.
    pub fn try_call(
        &mut self,
        method: &str,
        params: Value,
        on_page: bool,
    ) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if on_page {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(0);
        self.to_browser
            .write_all(&bytes)
            .unwrap_or_else(|e| panic!("{method}: write to chromium: {e}"));
        let deadline = Instant::now() + CALL_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.from_browser.recv_timeout(left) {
                Ok(v) if v["id"].as_u64() == Some(id) => {
                    if let Some(e) = v.get("error") {
                        return Err(e.to_string());
                    }
                    return Ok(v["result"].clone());
                }
                Ok(v) => self.event(v),
                Err(RecvTimeoutError::Timeout) => {
                    panic!("{method}: no reply from chromium within {CALL_LIMIT:?}")
                }
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "{method}: chromium went away; see {}",
                    self.home.join("chromium.log").display()
                ),
            }
        }
    }

    /// Keeps what a person debugging the test wants from an event.
    fn event(&mut self, v: Value) {
        let p = &v["params"];
        let line = match v["method"].as_str().unwrap_or_default() {
            "Runtime.consoleAPICalled" => {
                let args: Vec<String> = p["args"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|x| {
                                x.get("value")
                                    .map(|v| v.to_string())
                                    .or_else(|| x["description"].as_str().map(String::from))
                                    .unwrap_or_default()
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                format!(
                    "console.{}: {}",
                    p["type"].as_str().unwrap_or("log"),
                    args.join(" ")
                )
            }
            "Runtime.exceptionThrown" => format!(
                "exception: {}",
                p["exceptionDetails"]["exception"]["description"]
                    .as_str()
                    .or(p["exceptionDetails"]["text"].as_str())
                    .unwrap_or_default()
            ),
            "Log.entryAdded" => format!(
                "log.{}: {} {}",
                p["entry"]["level"].as_str().unwrap_or_default(),
                p["entry"]["text"].as_str().unwrap_or_default(),
                p["entry"]["url"].as_str().unwrap_or_default()
            ),
            "Network.responseReceived" => {
                let status = p["response"]["status"].as_u64().unwrap_or(0);
                if status < 400 {
                    return;
                }
                let url = p["response"]["url"].as_str().unwrap_or_default();
                self.log.failed.push(FailedRequest {
                    url: url.to_string(),
                    status: u16::try_from(status).ok(),
                    error: String::new(),
                });
                format!("http {status}: {url}")
            }
            "Network.loadingFailed" => format!(
                "request failed: {} {}{}",
                p["errorText"].as_str().unwrap_or_default(),
                p["blockedReason"].as_str().unwrap_or_default(),
                p["corsErrorStatus"]["corsError"]
                    .as_str()
                    .unwrap_or_default()
            ),
            "Network.requestWillBeSent" => {
                // Remember request ids → URLs for loadingFailed lines.
                self.requests.push_back(v);
                if self.requests.len() > 4096 {
                    self.requests.pop_front();
                }
                return;
            }
            _ => return,
        };
        let line = match v["method"].as_str() {
            Some("Network.loadingFailed") => {
                let id = p["requestId"].as_str().unwrap_or_default();
                let url = self
                    .requests
                    .iter()
                    .rev()
                    .find(|r| r["params"]["requestId"].as_str() == Some(id))
                    .and_then(|r| r["params"]["request"]["url"].as_str())
                    .unwrap_or_default();
                self.log.failed.push(FailedRequest {
                    url: url.to_string(),
                    status: None,
                    error: line.trim_start_matches("request failed: ").to_string(),
                });
                format!("{line}: {url}")
            }
            _ => line,
        };
        self.log.lines.push(line);
    }

    /// Reads the events that arrived since the last command.
    pub fn drain_events(&mut self) {
        while let Ok(v) = self.from_browser.try_recv() {
            self.event(v);
        }
    }

    /// Opens `url` in the page (returns once the navigation is committed).
    pub fn navigate(&mut self, url: &str) {
        let r = self.call("Page.navigate", json!({ "url": url }), true);
        if let Some(e) = r["errorText"].as_str() {
            panic!("navigate {url}: {e}");
        }
    }

    /// Evaluates `expr` in the page (promises awaited); its value. An exception,
    /// or a context destroyed by a navigation, gives `Err` with its description.
    pub fn eval(&mut self, expr: &str) -> Result<Value, String> {
        let r = self.try_call(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
            true,
        )?;
        if let Some(d) = r.get("exceptionDetails") {
            return Err(d["exception"]["description"]
                .as_str()
                .or(d["text"].as_str())
                .unwrap_or("exception")
                .to_string());
        }
        Ok(r["result"]["value"].clone())
    }

    /// Polls `expr` every 200 ms until it is truthy (its value) or `limit` passes
    /// (`Err` with the last value or exception). Exceptions while the page is
    /// navigating are part of waiting.
    pub fn wait_for(&mut self, expr: &str, limit: Duration) -> Result<Value, String> {
        let deadline = Instant::now() + limit;
        loop {
            let last = match self.eval(expr) {
                Ok(v) if truthy(&v) => return Ok(v),
                Ok(v) => v.to_string(),
                Err(e) => e,
            };
            if Instant::now() > deadline {
                return Err(last);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Focuses the element matching `selector` and types `text` into it the way a
    /// keyboard does (input events fire; frameworks binding the value see it).
    pub fn type_into(&mut self, selector: &str, text: &str) {
        let sel = serde_json::to_string(selector).expect("json");
        let focused = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({sel}); if (!e) return false; \
                 e.focus(); e.select && e.select(); return document.activeElement === e; }})()"
            ))
            .unwrap_or_else(|e| panic!("focus {selector}: {e}"));
        assert_eq!(
            focused,
            json!(true),
            "{selector}: not found or not focusable"
        );
        self.call("Input.insertText", json!({ "text": text }), true);
    }

    /// Clicks the middle of the element matching `selector` with the left button.
    pub fn click(&mut self, selector: &str) {
        let sel = serde_json::to_string(selector).expect("json");
        let at = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({sel}); if (!e) return null; \
                 e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
                 return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
            ))
            .unwrap_or_else(|e| panic!("locate {selector}: {e}"));
        let (x, y) = match (at[0].as_f64(), at[1].as_f64()) {
            (Some(x), Some(y)) => (x, y),
            _ => panic!("{selector}: not on the page"),
        };
        for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
                true,
            );
        }
    }

    /// Lets the browser save downloads into `dir` under the names the server
    /// suggests (`Browser.setDownloadBehavior`); see [`wait_download`].
    pub fn allow_downloads(&mut self, dir: &Path) {
        std::fs::create_dir_all(dir).expect("download dir");
        self.call(
            "Browser.setDownloadBehavior",
            json!({ "behavior": "allow", "downloadPath": dir.display().to_string() }),
            false,
        );
    }

    /// Turns the page's JavaScript off (`Emulation.setScriptExecutionDisabled`), as
    /// on a browser with scripts disabled; DevTools' own evaluation keeps working.
    pub fn disable_scripts(&mut self) {
        self.call(
            "Emulation.setScriptExecutionDisabled",
            json!({ "value": true }),
            true,
        );
    }

    /// The page's visible text (`document.body.innerText`).
    pub fn text(&mut self) -> String {
        self.eval("document.body ? document.body.innerText : ''")
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    }

    /// The page's current URL.
    pub fn url(&mut self) -> String {
        self.eval("location.href")
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default()
    }

    /// A PNG of the viewport written to `path`; its size in bytes.
    pub fn screenshot(&mut self, path: &Path) -> usize {
        let r = self.call("Page.captureScreenshot", json!({ "format": "png" }), true);
        let png = base64_decode(r["data"].as_str().expect("screenshot data"));
        assert!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
        std::fs::write(path, &png).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        png.len()
    }

    /// Asks the browser to quit, waits up to 10 s, then kills its process group.
    pub fn close(mut self) {
        let _ = self.call_quietly("Browser.close");
        let deadline = Instant::now() + Duration::from_secs(10);
        if let Some(child) = self.child.as_mut() {
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.kill();
    }

    fn call_quietly(&mut self, method: &str) -> std::io::Result<()> {
        self.next_id += 1;
        let mut bytes = json!({ "id": self.next_id, "method": method })
            .to_string()
            .into_bytes();
        bytes.push(0);
        self.to_browser.write_all(&bytes)
    }

    /// SIGKILL to the whole group (renderers, zygotes, utilities), then reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pgid = child.id() as i32;
            // SAFETY: plain syscall on the group this process created.
            unsafe { libc::killpg(pgid, libc::SIGKILL) };
            let _ = child.wait();
            // Helpers that were not our children are reparented and reaped by
            // init; wait (bounded) until the group is gone.
            let deadline = Instant::now() + Duration::from_secs(10);
            // SAFETY: signal 0 only checks whether the group still exists.
            while unsafe { libc::killpg(pgid, 0) } == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The process group id (the browser's pid).
    pub fn pgid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.kill();
    }
}

/// JS: true when `el` has a size, its middle is inside the viewport and no other
/// element (an overlay, a spinner screen) covers that point: what a person sees.
const ON_TOP: &str = "(el) => { const r = el.getBoundingClientRect(); \
    if (r.width === 0 || r.height === 0) return false; \
    const x = r.left + r.width / 2, y = r.top + r.height / 2; \
    if (x < 0 || y < 0 || x >= innerWidth || y >= innerHeight) return false; \
    const top = document.elementFromPoint(x, y); \
    return !!top && (top === el || el.contains(top)); }";

/// A JS expression: true when the element matching `selector` is seen (see
/// [`ON_TOP`]).
pub fn seen_element(selector: &str) -> String {
    let sel = serde_json::to_string(selector).expect("json");
    format!("(() => {{ const e = document.querySelector({sel}); return !!e && ({ON_TOP})(e); }})()")
}

/// A JS expression: true when some element whose own text contains `text` is seen
/// (see [`ON_TOP`]), not merely present in the DOM under an overlay.
pub fn seen_text(text: &str) -> String {
    let t = serde_json::to_string(text).expect("json");
    format!(
        "(() => {{ const on = {ON_TOP}; \
         const w = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT); \
         for (let n = w.nextNode(); n; n = w.nextNode()) {{ \
           if (n.data.includes({t}) && n.parentElement && on(n.parentElement)) return true; \
         }} return false; }})()"
    )
}

/// The bytes of `dir/name` once a download finished there (Chromium writes a
/// `.crdownload` file and renames it at the end); panics after `limit`, naming
/// what the directory held.
pub fn wait_download(dir: &Path, name: &str, limit: Duration) -> Vec<u8> {
    let path = dir.join(name);
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(bytes) = std::fs::read(&path) {
            return bytes;
        }
        if Instant::now() > deadline {
            let seen: Vec<String> = std::fs::read_dir(dir)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            panic!(
                "no download {name} in {} after {limit:?}; it holds {seen:?}",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        _ => true,
    }
}

/// Standard base64 (with padding), as DevTools sends screenshots.
pub fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = val(c).unwrap_or_else(|| panic!("not base64: {:?}", c as char));
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}
