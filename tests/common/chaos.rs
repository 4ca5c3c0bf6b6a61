//! The chaos soak (issue 13): the real KoproGo under a realistic authenticated load
//! through the appliance's HTTPS proxy, a writer logging every acknowledged write
//! (id + content) to a file outside the appliance, and faults injected on a seeded
//! random schedule. After each fault: recovery time, acknowledged writes present
//! with their content, the site serving, no zombie, no leftover process. At the end:
//! PostgreSQL never SIGKILLed by the supervisor, the API's log holding a line for
//! every request it answered (outside the moments a kill or a full disk excuses),
//! and the figures per fault kind.
//!
//! Knobs (environment): `CHAOS_SECONDS` (150: the short run of the suite; the
//! schedule always holds every fault kind once, then random kinds until the time is
//! up), `CHAOS_SEED` (13), `CHAOS_RATE` (load requests per second, 20),
//! `CHAOS_CLIENTS` (keep-alive connections of the load, 4), `CHAOS_WRITES` (writer
//! requests per second, 2), `CHAOS_GAP` (quiet seconds between faults, `min-max`;
//! 2-4 for runs up to 5 minutes, else 10-30), `CHAOS_FAULTS` (a comma-separated subset
//! of the kinds, for debugging), `CHAOS_OUT` (where the acknowledgement log and the
//! figures go; default `target/tmp/chaos`).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::acme::{pebble_available, Pebble};
use super::https::Client;
use super::{process_states, processes, real, Appliance};

/// One request's bound (the load's clients give up and reconnect after it).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a fault may take to be survived before the soak gives up waiting (a
/// bound is checked separately, per kind).
const RECOVERY_LIMIT: Duration = Duration::from_secs(150);
/// How long the disk stays full.
const DISK_FULL_HOLD: Duration = Duration::from_secs(8);
/// How long the ACME CA stays away (besides the failed renewal it causes).
const CA_AWAY_HOLD: Duration = Duration::from_secs(5);
/// The longest a SIGSTOPped API is left stopped when the supervisor does not
/// replace it first (then SIGCONT).
const STOP_HOLD_MAX: Duration = Duration::from_secs(45);
/// The size of the state file system (tmpfs) of the disk-full fault.
const STATE_FS_MIB: u64 = 1024;

/// The fault kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    ApiKill,
    PostmasterKill,
    BackendKill,
    ApiStop,
    SupervisorKill,
    PowerCut,
    DiskFull,
    AcmeAway,
    Update,
    Backup,
    Sighup,
}

pub const KINDS: [Kind; 11] = [
    Kind::ApiKill,
    Kind::PostmasterKill,
    Kind::BackendKill,
    Kind::ApiStop,
    Kind::SupervisorKill,
    Kind::PowerCut,
    Kind::DiskFull,
    Kind::AcmeAway,
    Kind::Update,
    Kind::Backup,
    Kind::Sighup,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::ApiKill => "api-kill",
            Kind::PostmasterKill => "postmaster-kill",
            Kind::BackendKill => "pg-backend-kill",
            Kind::ApiStop => "api-sigstop",
            Kind::SupervisorKill => "supervisor-kill",
            Kind::PowerCut => "power-cut",
            Kind::DiskFull => "disk-full",
            Kind::AcmeAway => "acme-ca-away",
            Kind::Update => "update",
            Kind::Backup => "backup",
            Kind::Sighup => "sighup",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Kind::ApiKill => "SIGKILL of the API server",
            Kind::PostmasterKill => "SIGKILL of the postmaster",
            Kind::BackendKill => "SIGKILL of one PostgreSQL backend of the API's pool",
            Kind::ApiStop => "SIGSTOP of the API, SIGCONT once replaced (at most 45 s)",
            Kind::SupervisorKill => "SIGKILL of `koprogo run`, then a new `koprogo run`",
            Kind::PowerCut => "SIGKILL of the whole tree at once, then `koprogo run`",
            Kind::DiskFull => "the state file system (tmpfs) filled for 8 s, then freed",
            Kind::AcmeAway => "the ACME CA unreachable during a forced renewal, then back",
            Kind::Update => "`koprogo reload` (pre-update backup, new API beside the old)",
            Kind::Backup => "`koprogo backup create`",
            Kind::Sighup => "SIGHUP of the supervisor (an update)",
        }
    }

    fn from_name(s: &str) -> Option<Kind> {
        KINDS.iter().copied().find(|k| k.name() == s.trim())
    }

    /// The recovery bound (fault → first successful request sent after it; for the
    /// full disk, from the moment it is freed to the first acknowledged write).
    pub fn bound(self) -> Duration {
        Duration::from_secs(match self {
            // The restart back-off starts at 1 s; koprogo-api starts (migrations
            // already applied) and answers its health check within a few seconds.
            Kind::ApiKill => 15,
            // PostgreSQL's crash recovery, then the API restarted once it is ready.
            Kind::PostmasterKill => 30,
            // The postmaster resets every backend (crash recovery in place); the
            // API's pool reconnects.
            Kind::BackendKill => 20,
            // Issue 18: a stopped API is detected by the health checks (faster
            // defaults) and SIGKILLed at once, then restarted.
            Kind::ApiStop => 25,
            // A whole boot: PostgreSQL's crash recovery, the API's start.
            Kind::SupervisorKill | Kind::PowerCut => 30,
            // PostgreSQL may have crashed on the full disk: its restart back-off
            // (doubling, at most 60 s) may be 16 s when the disk is freed, then
            // crash recovery, then the API.
            Kind::DiskFull => 45,
            // Nothing stops serving in these: the next request succeeds.
            Kind::AcmeAway | Kind::Update | Kind::Backup | Kind::Sighup => 5,
        })
    }

    /// Requests may fail in its window (else every one must succeed).
    fn outage_allowed(self) -> bool {
        !matches!(
            self,
            Kind::AcmeAway | Kind::Update | Kind::Backup | Kind::Sighup
        )
    }

    /// It may leave PostgreSQL to recover from a crash at its next start.
    fn crashes_postgres(self) -> bool {
        matches!(
            self,
            Kind::PostmasterKill
                | Kind::BackendKill
                | Kind::SupervisorKill
                | Kind::PowerCut
                | Kind::DiskFull
        )
    }
}

/// splitmix64: a tiny seeded generator whose sequence never changes with a crate
/// version (the schedule of a seed is the same on every machine and every year).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn between(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// The knobs, from the environment.
#[derive(Debug, Clone)]
pub struct Knobs {
    pub seconds: u64,
    pub seed: u64,
    pub rate: f64,
    pub clients: usize,
    pub writes: f64,
    pub gap: (f64, f64),
    pub kinds: Vec<Kind>,
    pub out: PathBuf,
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

impl Knobs {
    pub fn from_env() -> Knobs {
        let seconds: u64 = env_num("CHAOS_SECONDS", 150);
        let gap = match std::env::var("CHAOS_GAP") {
            Ok(v) => {
                let (a, b) = v
                    .split_once('-')
                    .unwrap_or_else(|| panic!("CHAOS_GAP={v:?}: expected min-max seconds"));
                let a: f64 = a.trim().parse().expect("CHAOS_GAP min");
                let b: f64 = b.trim().parse().expect("CHAOS_GAP max");
                (a.min(b), a.max(b))
            }
            Err(_) if seconds <= 300 => (2.0, 4.0),
            Err(_) => (10.0, 30.0),
        };
        let kinds = match std::env::var("CHAOS_FAULTS") {
            Ok(v) if !v.trim().is_empty() => v
                .split(',')
                .map(|s| {
                    Kind::from_name(s).unwrap_or_else(|| {
                        panic!(
                            "CHAOS_FAULTS: unknown kind {s:?} (kinds: {})",
                            KINDS.map(Kind::name).join(", ")
                        )
                    })
                })
                .collect(),
            _ => KINDS.to_vec(),
        };
        let out = std::env::var_os("CHAOS_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                option_env!("CARGO_TARGET_TMPDIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(std::env::temp_dir)
                    .join("chaos")
            });
        Knobs {
            seconds,
            seed: env_num("CHAOS_SEED", 13),
            rate: env_num("CHAOS_RATE", 20.0f64).max(0.5),
            clients: env_num("CHAOS_CLIENTS", 4usize).max(1),
            writes: env_num("CHAOS_WRITES", 2.0f64).max(0.1),
            gap,
            kinds,
            out,
        }
    }
}

// ------------------------------------------------------------------ the load

/// Where the load goes: the proxy's HTTPS port, the name to ask for (SNI and Host),
/// a client trusting the root that name's certificate chains to.
#[derive(Clone)]
pub struct Target {
    pub port: u16,
    pub name: String,
    pub client: Arc<Client>,
}

/// One request as the load saw it (milliseconds since the soak's start).
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    pub start: u64,
    pub end: u64,
    pub ok: bool,
    pub write: bool,
    /// Sent by the writer (its acknowledged writes are checked with their content).
    pub writer: bool,
    /// The number in its User-Agent (`koprogo-chaos/N`), which the API logs.
    pub marker: u64,
}

/// A write the server acknowledged (2xx with the new row's id): the writer's owners.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Ack {
    pub seq: u64,
    pub id: String,
    pub last_name: String,
    pub email: String,
    pub phone: String,
    pub address: String,
    /// Milliseconds since the soak's start, when the answer came.
    pub at_ms: u64,
}

/// What the load threads and the fault loop share.
pub struct Shared {
    pub t0: Instant,
    pub t0_wall: SystemTime,
    stop: AtomicBool,
    marker: AtomicU64,
    pub outcomes: Mutex<Vec<Outcome>>,
    /// (end ms, what failed and how).
    pub failures: Mutex<Vec<(u64, String)>>,
    pub acks: Mutex<Vec<Ack>>,
    /// (table, id) of the load's own acknowledged writes.
    pub load_writes: Mutex<Vec<(&'static str, String)>>,
    ack_file: Mutex<std::fs::File>,
}

impl Shared {
    pub fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }
    fn record(&self, o: Outcome, failure: Option<String>) {
        if let Some(f) = failure {
            lock(&self.failures).push((o.end, f));
        }
        lock(&self.outcomes).push(o);
    }
    /// The end (ms) of the first successful request sent at or after `since`
    /// (only the writer's when `writer`).
    pub fn first_ok_since(&self, since: u64, writer: bool) -> Option<u64> {
        lock(&self.outcomes)
            .iter()
            .filter(|o| o.ok && o.start >= since && (!writer || o.writer))
            .map(|o| o.end)
            .min()
    }
    /// Wall-clock time of a soak time.
    pub fn wall(&self, ms: u64) -> SystemTime {
        self.t0_wall + Duration::from_millis(ms)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The demo site the workload runs against.
#[derive(Clone)]
pub struct Site {
    pub target: Target,
    /// The syndic's and the superadmin's bearer tokens (koprogo-api's expire after
    /// 15 minutes: `refresh_loop` logs in again every 10).
    tokens: Arc<Mutex<(String, String)>>,
    admin_password: String,
    pub org: String,
    pub buildings: Vec<String>,
    /// Unique per soak: in every name the load and the writer create.
    pub tag: String,
}

impl Site {
    pub fn syndic(&self) -> String {
        lock(&self.tokens).0.clone()
    }
    pub fn admin(&self) -> String {
        lock(&self.tokens).1.clone()
    }
}

/// A login: the token, or why not.
async fn login(c: &mut Conn, email: &str, password: &str) -> Result<String, String> {
    let body = serde_json::json!({ "email": email, "password": password });
    let (status, b) = c
        .request("POST", "/api/v1/auth/login", None, Some(&body), 0)
        .await?;
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
    match v["token"].as_str() {
        Some(t) if status == 200 => Ok(t.to_string()),
        _ => Err(format!("{email}: {status} {}", String::from_utf8_lossy(&b))),
    }
}

/// Logs in again every 10 minutes (every 5 s after a failure).
async fn refresh_loop(shared: Arc<Shared>, site: Site) {
    let mut conn = Conn::new(&site.target);
    let mut next = Instant::now() + Duration::from_secs(600);
    while !shared.stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if Instant::now() < next {
            continue;
        }
        let s = login(&mut conn, real::SYNDIC.0, real::SYNDIC.1).await;
        let a = login(&mut conn, "admin@koprogo.com", &site.admin_password).await;
        match (s, a) {
            (Ok(s), Ok(a)) => {
                *lock(&site.tokens) = (s, a);
                next = Instant::now() + Duration::from_secs(600);
            }
            (s, a) => {
                println!("chaos: logging in again failed ({s:?}, {a:?}); retrying in 5 s");
                next = Instant::now() + Duration::from_secs(5);
            }
        }
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// One keep-alive HTTPS connection, opened again after an error.
pub struct Conn {
    target: Target,
    send: Option<Sender>,
}

impl Conn {
    pub fn new(target: &Target) -> Conn {
        Conn {
            target: target.clone(),
            send: None,
        }
    }

    /// One request, bounded by `REQUEST_TIMEOUT`: (status, body) or what failed.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&serde_json::Value>,
        marker: u64,
    ) -> Result<(u16, Bytes), String> {
        let r = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.request_unbounded(method, path, token, body, marker),
        )
        .await;
        match r {
            Ok(Ok(x)) => Ok(x),
            Ok(Err(e)) => {
                self.send = None;
                Err(e)
            }
            Err(_) => {
                self.send = None;
                Err(format!("no answer within {}s", REQUEST_TIMEOUT.as_secs()))
            }
        }
    }

    async fn request_unbounded(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&serde_json::Value>,
        marker: u64,
    ) -> Result<(u16, Bytes), String> {
        if self.send.as_mut().is_none_or(|s| s.is_closed()) {
            self.send = None;
            let tls = self
                .target
                .client
                .connect(self.target.port, &self.target.name)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let (send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(conn);
            self.send = Some(send);
        }
        let Some(s) = self.send.as_mut() else {
            return Err("no connection".into());
        };
        s.ready()
            .await
            .map_err(|e| format!("connection closed: {e}"))?;
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("{}:{}", self.target.name, self.target.port))
            .header("user-agent", format!("koprogo-chaos/{marker}"));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let bytes = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        let req = req.body(Full::new(bytes)).map_err(|e| e.to_string())?;
        let resp = s.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    }
}

/// The `id` of a JSON answer.
fn id_of(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    match &v["id"] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The realistic mix of `scripts/bench-real.lua`: a cycle of 20 requests, 16 GETs of
/// the list endpoints and 4 POSTs creating an expense, an owner, a meeting (as the
/// syndic) and a unit (as the superadmin). (method, path, body, admin token, table.)
fn mix(
    site: &Site,
    thread: usize,
    n: u64,
) -> (
    &'static str,
    &'static str,
    Option<serde_json::Value>,
    bool,
    &'static str,
) {
    const CYCLE: [&str; 20] = [
        "buildings",
        "owners",
        "expenses",
        "meetings",
        "post_expense",
        "buildings",
        "owners",
        "expenses",
        "meetings",
        "post_owner",
        "buildings",
        "owners",
        "expenses",
        "meetings",
        "post_meeting",
        "buildings",
        "owners",
        "expenses",
        "meetings",
        "post_unit",
    ];
    const CATEGORIES: [&str; 8] = [
        "Maintenance",
        "Repairs",
        "Insurance",
        "Utilities",
        "Cleaning",
        "Administration",
        "Works",
        "Other",
    ];
    let kind = CYCLE[(n % 20) as usize];
    let b = &site.buildings[(n as usize) % site.buildings.len().max(1)];
    let id = format!("{}t{thread}n{n}", site.tag);
    match kind {
        "buildings" => ("GET", "/api/v1/buildings", None, false, ""),
        "owners" => ("GET", "/api/v1/owners", None, false, ""),
        "expenses" => ("GET", "/api/v1/expenses", None, false, ""),
        "meetings" => ("GET", "/api/v1/meetings", None, false, ""),
        "post_expense" => (
            "POST",
            "/api/v1/expenses",
            Some(serde_json::json!({
                "building_id": b,
                "category": CATEGORIES[(n % 8) as usize],
                "description": format!("Facture {id}"),
                "amount": 50.0 + (n % 900) as f64 + (n % 100) as f64 / 100.0,
                "expense_date": format!("2026-11-{:02}T10:00:00Z", 1 + n % 28),
                "supplier": "Fournisseur SA",
                "invoice_number": format!("F-{id}"),
            })),
            false,
            "expenses",
        ),
        "post_owner" => (
            "POST",
            "/api/v1/owners",
            Some(serde_json::json!({
                "first_name": "Marie",
                "last_name": format!("Dupont {id}"),
                "email": format!("{id}@bench.example.be"),
                "phone": format!("+32470{:06}", n % 1_000_000),
                "address": format!("Rue de la Loi {}", 1 + n % 200),
                "city": "Bruxelles",
                "postal_code": "1000",
                "country": "Belgique",
            })),
            false,
            "owners",
        ),
        "post_meeting" => (
            "POST",
            "/api/v1/meetings",
            Some(serde_json::json!({
                "building_id": b,
                "meeting_type": if n % 2 == 0 { "Ordinary" } else { "Extraordinary" },
                "title": format!("AG {id}"),
                "description": "Budget et travaux",
                "scheduled_date": format!("2027-{:02}-{:02}T18:30:00Z", 1 + n % 12, 1 + n % 28),
                "location": "Salle du conseil",
            })),
            false,
            "meetings",
        ),
        _ => (
            "POST",
            "/api/v1/units",
            Some(serde_json::json!({
                "organization_id": site.org,
                "building_id": b,
                "unit_number": id,
                "unit_type": "Parking",
                "floor": -1,
                "surface_area": 12.5,
                "quota": 1,
            })),
            true,
            "units",
        ),
    }
}

/// One client of the load: `rate` requests per second of the mix on one connection.
async fn client_loop(shared: Arc<Shared>, site: Site, thread: usize, rate: f64) {
    let mut conn = Conn::new(&site.target);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n: u64 = thread as u64 * 7;
    while !shared.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        let (method, path, body, admin, table) = mix(&site, thread, n);
        let token = if admin { site.admin() } else { site.syndic() };
        let marker = shared.marker.fetch_add(1, Ordering::Relaxed);
        let start = shared.now_ms();
        let r = conn
            .request(method, path, Some(&token), body.as_ref(), marker)
            .await;
        let end = shared.now_ms();
        let write = method == "POST";
        let (ok, failure) = match &r {
            Ok((s, b)) if (200..300).contains(s) => {
                if write {
                    if let Some(id) = id_of(b) {
                        lock(&shared.load_writes).push((table, id));
                    }
                }
                (true, None)
            }
            Ok((s, b)) => (
                false,
                Some(format!(
                    "{method} {path} {s}: {}",
                    String::from_utf8_lossy(&b[..b.len().min(200)])
                )),
            ),
            Err(e) => (false, Some(format!("{method} {path}: {e}"))),
        };
        shared.record(
            Outcome {
                start,
                end,
                ok,
                write,
                writer: false,
                marker,
            },
            failure,
        );
    }
}

/// The writer: owners with a unique content, one at a time; each acknowledged one
/// is appended (JSON line) to the acknowledgement log before the next is sent.
async fn writer_loop(shared: Arc<Shared>, site: Site, rate: f64) {
    let mut conn = Conn::new(&site.target);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut seq: u64 = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        seq += 1;
        let last_name = format!("Soak {seq} {}", site.tag);
        let email = format!("chaos-{}-{seq}@soak.example.be", site.tag);
        let phone = format!("+3247{:07}", seq % 10_000_000);
        let address = format!("Rue du Chaos {seq}");
        let body = serde_json::json!({
            "first_name": "Ecrit",
            "last_name": last_name,
            "email": email,
            "phone": phone,
            "address": address,
            "city": "Liège",
            "postal_code": "4000",
            "country": "Belgique",
        });
        let marker = shared.marker.fetch_add(1, Ordering::Relaxed);
        let start = shared.now_ms();
        let r = conn
            .request(
                "POST",
                "/api/v1/owners",
                Some(&site.syndic()),
                Some(&body),
                marker,
            )
            .await;
        let end = shared.now_ms();
        let (ok, failure) = match &r {
            Ok((s, b)) if (200..300).contains(s) => match id_of(b) {
                Some(id) => {
                    let ack = Ack {
                        seq,
                        id,
                        last_name,
                        email,
                        phone,
                        address,
                        at_ms: end,
                    };
                    if let Ok(line) = serde_json::to_string(&ack) {
                        let mut f = lock(&shared.ack_file);
                        let _ = writeln!(f, "{line}");
                        let _ = f.flush();
                    }
                    lock(&shared.acks).push(ack);
                    (true, None)
                }
                None => (
                    false,
                    Some(format!(
                        "writer: {s} without an id: {}",
                        String::from_utf8_lossy(b)
                    )),
                ),
            },
            Ok((s, b)) => (
                false,
                Some(format!(
                    "writer POST /api/v1/owners {s}: {}",
                    String::from_utf8_lossy(&b[..b.len().min(200)])
                )),
            ),
            Err(e) => (false, Some(format!("writer POST /api/v1/owners: {e}"))),
        };
        shared.record(
            Outcome {
                start,
                end,
                ok,
                write: true,
                writer: true,
                marker,
            },
            failure,
        );
    }
}

/// The load and the writer, on a runtime of their own thread.
pub struct Load {
    pub shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(shared: Arc<Shared>, site: &Site, knobs: &Knobs) -> Load {
        let (s, site, k) = (shared.clone(), site.clone(), knobs.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("load runtime");
            rt.block_on(async move {
                let mut tasks = Vec::new();
                let per = k.rate / k.clients as f64;
                for n in 0..k.clients {
                    tasks.push(tokio::spawn(client_loop(s.clone(), site.clone(), n, per)));
                }
                tasks.push(tokio::spawn(writer_loop(s.clone(), site.clone(), k.writes)));
                tasks.push(tokio::spawn(refresh_loop(s.clone(), site.clone())));
                for t in tasks {
                    let _ = t.await;
                }
            });
        });
        Load {
            shared,
            thread: Some(thread),
        }
    }

    /// Stops the load (each client finishes its request: bounded by its timeout).
    pub fn finish(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.finish();
    }
}

// ------------------------------------------------------------------ the CA relay

/// A TCP relay in front of Pebble: the appliance's `acme_directory` points here, so
/// the CA can go away (connections refused) and come back with the same keys and
/// database (a restarted Pebble would be another CA).
pub struct Relay {
    pub port: u16,
    to: SocketAddr,
    rt: tokio::runtime::Runtime,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    pub fn new(to: SocketAddr) -> Relay {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("relay runtime");
        let mut r = Relay {
            port: super::free_port(),
            to,
            rt,
            task: None,
        };
        r.up();
        r
    }

    pub fn up(&mut self) {
        if self.task.is_some() {
            return;
        }
        let (port, to) = (self.port, self.to);
        let listener = self
            .rt
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .expect("bind the CA relay");
        self.task = Some(self.rt.spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut down, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
            }
        }));
    }

    /// Closes the listener and every relayed connection; returns once a connection
    /// is refused.
    pub fn down(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = self.rt.block_on(t);
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            assert!(Instant::now() < deadline, "the CA relay still accepts");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

// ------------------------------------------------------------------ processes

/// The pids of `root` and every descendant (by parent pid).
pub fn tree(root: i32) -> Vec<i32> {
    let states = process_states();
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(
            states
                .iter()
                .filter(|(_, _, pp)| *pp == p)
                .map(|(c, _, _)| *c),
        );
        i += 1;
    }
    out.retain(|p| states.iter().any(|(q, _, _)| q == p));
    out
}

/// Resident memory (bytes) and open file descriptors of `pid`.
pub fn rss_and_fds(pid: i32) -> (u64, usize) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (rss, fds)
}

fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// (start time in clock ticks) of a pid, to tell a reused pid from the same process.
fn starttime(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let close = stat.rfind(')')?;
    stat[close + 2..].split(' ').nth(19)?.parse().ok()
}

// ------------------------------------------------------------------ the state tmpfs

/// A tmpfs mounted at `<dir>/var` holding the state and the logs (root only).
pub struct StateFs {
    pub mount: PathBuf,
}

impl StateFs {
    pub fn mount(at: &Path, mib: u64) -> StateFs {
        std::fs::create_dir_all(at).expect("create the mount point");
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={mib}m,mode=0755"))
            .arg("chaos-state")
            .arg(at)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount -t tmpfs at {} failed", at.display());
        StateFs {
            mount: at.to_path_buf(),
        }
    }

    pub fn fill_path(&self) -> PathBuf {
        self.mount.join("chaos-fill")
    }

    /// Takes every free byte; returns how many.
    pub fn fill(&self) -> u64 {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(self.fill_path())
            .expect("create the fill file");
        let mut total = 0u64;
        let free = self.free();
        if free > 1 << 20 {
            let want = free - (1 << 20);
            if nix::fcntl::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                nix::fcntl::FallocateFlags::empty(),
                0,
                want as i64,
            )
            .is_ok()
            {
                total = want;
            }
        }
        use std::io::Seek;
        let _ = f.seek(std::io::SeekFrom::Start(total));
        for chunk in [64 * 1024, 4096, 512] {
            let buf = vec![0x55u8; chunk];
            while f.write_all(&buf).is_ok() {
                total += chunk as u64;
            }
        }
        let _ = f.flush();
        total
    }

    pub fn free(&self) -> u64 {
        nix::sys::statvfs::statvfs(&self.mount)
            .map(|s| s.blocks_available() * s.fragment_size())
            .unwrap_or(0)
    }

    pub fn release(&self) {
        let _ = std::fs::remove_file(self.fill_path());
    }

    fn unmount(&self) {
        let _ = std::fs::remove_file(self.fill_path());
        for args in [&["-q"][..], &["-l"][..]] {
            let ok = std::process::Command::new("umount")
                .args(args)
                .arg(&self.mount)
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for StateFs {
    fn drop(&mut self) {
        self.unmount();
    }
}

// ------------------------------------------------------------------ the soak

/// One injected fault, as measured.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: Kind,
    /// ms since the start: the fault, its end (the disk freed, the CA back, the
    /// command finished; equal to `start` for a kill), the first successful request
    /// sent after the reference point, all ready again.
    pub start: u64,
    pub end: u64,
    pub recovered: Option<u64>,
    pub ready: u64,
    pub note: String,
}

impl Fault {
    /// The recovery time: from the fault (for the full disk, from its release) to
    /// the first successful request sent after it.
    pub fn recovery_ms(&self) -> Option<u64> {
        let from = if self.kind == Kind::DiskFull {
            self.end
        } else {
            self.start
        };
        self.recovered.map(|r| r.saturating_sub(from))
    }
    /// When answered requests may lack their line in api.log: a child or the
    /// supervisor killed before the line was written or read from its pipe (the
    /// two seconds before the kill), a full disk (while it is full).
    fn log_excuse(&self) -> Option<(u64, u64)> {
        match self.kind {
            Kind::ApiKill | Kind::ApiStop | Kind::SupervisorKill | Kind::PowerCut => {
                Some((self.start.saturating_sub(2000), self.start + 1000))
            }
            Kind::DiskFull => Some((self.start.saturating_sub(1000), self.end + 2000)),
            _ => None,
        }
    }
    /// The window in which failed requests are the fault's.
    fn window(&self) -> (u64, u64) {
        (
            self.start,
            self.ready.max(self.recovered.unwrap_or(0)) + 1000,
        )
    }
}

/// The whole soak: the appliance, Pebble and its relay, the state tmpfs.
pub struct Soak {
    pub knobs: Knobs,
    pub a: Appliance,
    pub state_fs: Option<StateFs>,
    pub pebble: Option<Pebble>,
    pub relay: Option<Relay>,
    /// Pebble's files: outside the appliance's directory, so that no fault takes
    /// Pebble for a process of the appliance.
    pebble_dir: Option<tempfile::TempDir>,
    /// Process groups of the services ever seen (their leaders' pids).
    pub pgrps: HashSet<i32>,
    pub faults: Vec<Fault>,
    pub violations: Vec<String>,
    /// (ms, supervisor pid, RSS bytes, fds) after each check.
    pub samples: Vec<(u64, i32, u64, usize)>,
    pub skipped: Vec<String>,
    pub ack_log: PathBuf,
    pub boot_secs: f64,
}

impl Drop for Soak {
    fn drop(&mut self) {
        // The appliance goes before its file system is unmounted.
        if let Some(mut c) = self.a.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let marker = self.a.dir.path().display().to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let left: Vec<i32> = processes()
                .into_iter()
                .filter(|(_, g, c)| self.pgrps.contains(g) || c.contains(&marker))
                .map(|(p, _, _)| p)
                .collect();
            if left.is_empty() {
                break;
            }
            for p in left {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.relay.take();
        self.pebble.take();
        self.pebble_dir.take();
        self.state_fs.take();
    }
}

impl Soak {
    /// The appliance with the real server: no proxy rate limit (the load comes from
    /// one address), no scheduled backup (the soak makes its own), the login limiter
    /// raised; as root the state and the logs on a tmpfs; with Pebble, `acme` mode
    /// behind the relay. None (after one "skipped: …" line) without the real KoproGo.
    pub fn new(test: &str) -> Option<Soak> {
        let r = real::real(test)?;
        let knobs = Knobs::from_env();
        let mut skipped = Vec::new();
        let root = super::is_root();
        let acme = knobs.kinds.contains(&Kind::AcmeAway) && pebble_available();
        if knobs.kinds.contains(&Kind::DiskFull) && !root {
            skipped.push("disk-full: mounting a tmpfs needs root".to_string());
        }
        if knobs.kinds.contains(&Kind::AcmeAway) && !acme {
            skipped.push("acme-ca-away: Debian's pebble is not installed".to_string());
        }
        let a = real::appliance(
            &r,
            "rate = 0\nmax_conns_per_ip = 0\n\n[backup]\nenabled = false\n\n\
             [backend.env]\nLOGIN_RATE_LIMIT_MAX = \"100000\"\n",
        );
        let mut text = std::fs::read_to_string(&a.config).expect("read config");
        let state_fs = if root && knobs.kinds.contains(&Kind::DiskFull) {
            let fs = StateFs::mount(&a.path("var"), STATE_FS_MIB);
            text = text
                .replacen("state = \"state\"", "state = \"var/state\"", 1)
                .replacen("logs = \"logs\"", "logs = \"var/logs\"", 1);
            // The harness's helpers read <dir>/state and <dir>/logs.
            for d in ["state", "logs"] {
                std::os::unix::fs::symlink(format!("var/{d}"), a.path(d)).expect("symlink");
            }
            Some(fs)
        } else {
            None
        };
        let (pebble, relay, pebble_dir) = if acme {
            let cfg = a.cfg();
            let (http, https) = (cfg.proxy.http[0].port(), cfg.proxy.https[0].port());
            let dir = tempfile::Builder::new()
                .prefix("kpgchaos-pebble")
                .tempdir()
                .expect("pebble tempdir");
            let pebble = Pebble::start(dir.path(), http, https, None);
            let listen: SocketAddr = pebble
                .directory
                .trim_start_matches("https://")
                .trim_end_matches("/dir")
                .parse()
                .expect("pebble listen address");
            let relay = Relay::new(listen);
            text = text.replacen("domain = \"localhost\"", "domain = \"koprogo.test\"", 1);
            text.push_str(&format!(
                "\n[tls]\nmode = \"acme\"\nacme_email = \"syndic@koprogo.test\"\n\
                 acme_directory = \"https://127.0.0.1:{}/dir\"\nacme_ca_root = \"{}\"\n\
                 acme_challenge = \"http-01\"\n",
                relay.port,
                pebble.listener_root.display()
            ));
            (Some(pebble), Some(relay), Some(dir))
        } else {
            (None, None, None)
        };
        std::fs::write(&a.config, text).expect("write config");
        std::fs::create_dir_all(&knobs.out).expect("create CHAOS_OUT");
        let ack_log = knobs.out.join(format!(
            "acks-seed{}-{}.jsonl",
            knobs.seed,
            std::process::id()
        ));
        Some(Soak {
            knobs,
            a,
            state_fs,
            pebble,
            relay,
            pebble_dir,
            pgrps: HashSet::new(),
            faults: Vec::new(),
            violations: Vec::new(),
            samples: Vec::new(),
            skipped,
            ack_log,
            boot_secs: 0.0,
        })
    }

    pub fn kinds(&self) -> Vec<Kind> {
        self.knobs
            .kinds
            .iter()
            .copied()
            .filter(|k| match k {
                Kind::DiskFull => self.state_fs.is_some(),
                Kind::AcmeAway => self.relay.is_some(),
                _ => true,
            })
            .collect()
    }

    /// Polls status until all ready (bounded), noting the services' process groups.
    pub fn wait_ready(&mut self, limit: Duration, what: &str) -> koprogo::supervisor::StatusReport {
        let st = self.a.wait_for(limit, what, |s| s.all_ready);
        self.note_pids(&st);
        st
    }

    fn note_pids(&mut self, st: &koprogo::supervisor::StatusReport) {
        for s in &st.services {
            if let Some(p) = s.pid {
                self.pgrps.insert(p);
            }
        }
    }

    pub fn service_pid(&mut self, name: &str) -> Option<i32> {
        let st = self.a.status()?;
        self.note_pids(&st);
        st.services.iter().find(|s| s.name == name)?.pid
    }

    /// Boots, waits for the ACME certificate in acme mode, seeds the demo data and
    /// logs in: the site the load runs against.
    pub fn boot(&mut self) -> Site {
        let t = Instant::now();
        self.a.start();
        self.wait_ready(real::BOOT, "all ready (first boot)");
        self.boot_secs = t.elapsed().as_secs_f64();
        let target = if let Some(pebble) = &self.pebble {
            self.a
                .wait_for(Duration::from_secs(90), "the ACME certificate", |s| {
                    s.tls.source == "acme"
                });
            let root = super::https::runtime().block_on(pebble.issuing_root());
            Target {
                port: self.a.cfg().proxy.https[0].port(),
                name: "koprogo.test".into(),
                client: Arc::new(Client::new(&root, &[b"http/1.1"])),
            }
        } else {
            Target {
                port: self.a.cfg().proxy.https[0].port(),
                name: "localhost".into(),
                client: Arc::new(Client::new(&super::load::root_pem(&self.a), &[b"http/1.1"])),
            }
        };
        let pw = real::admin_password(&self.a);
        let tag = format!("s{}p{}", self.knobs.seed, std::process::id());
        super::https::runtime().block_on(async {
            let mut c = Conn::new(&target);
            let admin = login(&mut c, "admin@koprogo.com", &pw)
                .await
                .expect("admin login");
            let (status, body) = c
                .request("POST", "/api/v1/seed/demo", Some(&admin), None, 0)
                .await
                .expect("seed/demo");
            assert!(
                (200..300).contains(&status),
                "seed/demo: {status} {}",
                String::from_utf8_lossy(&body)
            );
            let syndic = login(&mut c, real::SYNDIC.0, real::SYNDIC.1)
                .await
                .expect("syndic login");
            let get = |(status, body): (u16, Bytes), what: &str| -> serde_json::Value {
                assert_eq!(status, 200, "{what}: {}", String::from_utf8_lossy(&body));
                serde_json::from_slice(&body).expect("JSON")
            };
            let me = get(
                c.request("GET", "/api/v1/auth/me", Some(&syndic), None, 0)
                    .await
                    .expect("me"),
                "auth/me",
            );
            let org = me["organization_id"]
                .as_str()
                .expect("the syndic's organization_id")
                .to_string();
            let list = get(
                c.request("GET", "/api/v1/buildings", Some(&syndic), None, 0)
                    .await
                    .expect("buildings"),
                "buildings",
            );
            let buildings: Vec<String> = real::items(&list)
                .iter()
                .filter(|b| b["organization_id"].as_str() == Some(org.as_str()))
                .filter_map(|b| b["id"].as_str().map(String::from))
                .collect();
            assert!(!buildings.is_empty(), "no building of {org}: {list}");
            for (who, t) in [("admin", &admin), ("syndic", &syndic)] {
                if let Some(left) = jwt_seconds_left(t) {
                    println!("chaos: the {who} token expires in {left} s");
                }
            }
            Site {
                target: target.clone(),
                tokens: Arc::new(Mutex::new((syndic, admin))),
                admin_password: pw.clone(),
                org,
                buildings,
                tag,
            }
        })
    }

    pub fn supervisor(&self) -> i32 {
        self.a.pid()
    }

    fn sample(&mut self, now: u64) {
        let pid = self.supervisor();
        let (rss, fds) = rss_and_fds(pid);
        self.samples.push((now, pid, rss, fds));
    }

    fn violation(&mut self, v: String) {
        println!("chaos: VIOLATION: {v}");
        self.violations.push(v);
    }

    // -------------------------------------------------------------- the faults

    /// Injects one fault; returns (start, end, note). Blocking.
    fn inject(&mut self, kind: Kind, shared: &Shared, rng: &mut Rng) -> (u64, u64, String) {
        let sig = |pid: i32, s: Signal| {
            let _ = kill(Pid::from_raw(pid), s);
        };
        match kind {
            Kind::ApiKill => {
                let pid = self.service_pid("api").expect("api pid");
                let t = shared.now_ms();
                sig(pid, Signal::SIGKILL);
                (t, t, format!("api pid {pid}"))
            }
            Kind::PostmasterKill => {
                let pid = self.service_pid("postgres").expect("postgres pid");
                let t = shared.now_ms();
                sig(pid, Signal::SIGKILL);
                (t, t, format!("postmaster pid {pid}"))
            }
            Kind::BackendKill => {
                let pm = self.service_pid("postgres").expect("postgres pid");
                let backends: Vec<i32> = tree(pm)
                    .into_iter()
                    .filter(|p| *p != pm && cmdline(*p).contains("[local]"))
                    .collect();
                if backends.is_empty() {
                    let t = shared.now_ms();
                    return (t, t, "no client backend to kill".into());
                }
                let b = backends[rng.below(backends.len() as u64) as usize];
                let what = cmdline(b);
                let t = shared.now_ms();
                sig(b, Signal::SIGKILL);
                (t, t, format!("backend {b} ({})", what.trim()))
            }
            Kind::ApiStop => {
                let pid = self.service_pid("api").expect("api pid");
                let born = starttime(pid);
                let t = shared.now_ms();
                sig(pid, Signal::SIGSTOP);
                // Stopped until the supervisor replaced it (the health budget
                // passed), at most STOP_HOLD_MAX.
                let deadline = Instant::now() + STOP_HOLD_MAX;
                let mut replaced = false;
                while Instant::now() < deadline {
                    if let Some(st) = self.a.status() {
                        self.note_pids(&st);
                        let api = st.services.iter().find(|s| s.name == "api");
                        if api.is_some_and(|x| x.ready && x.pid.is_some_and(|p| p != pid)) {
                            replaced = true;
                            break;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let end = shared.now_ms();
                let alive = born.is_some() && starttime(pid) == born;
                if alive {
                    sig(pid, Signal::SIGCONT);
                }
                (
                    t,
                    end,
                    format!(
                        "api pid {pid} stopped {:.1} s; {}; {}",
                        (end - t) as f64 / 1000.0,
                        if replaced {
                            "replaced by the supervisor"
                        } else {
                            "NOT replaced"
                        },
                        if alive {
                            "SIGCONT sent"
                        } else {
                            "gone when SIGCONT was due"
                        }
                    ),
                )
            }
            Kind::SupervisorKill => {
                let old = self.supervisor();
                let t = shared.now_ms();
                let code = self
                    .a
                    .signal_and_wait(Signal::SIGKILL, Duration::from_secs(10));
                // As systemd would: a new `koprogo run` at once.
                self.a.start();
                let end = shared.now_ms();
                (
                    t,
                    end,
                    format!(
                        "supervisor {old} exit {code}; new supervisor {}",
                        self.a.pid()
                    ),
                )
            }
            Kind::PowerCut => {
                let old = self.supervisor();
                let mut victims = tree(old);
                let groups = self.pgrps.clone();
                victims.extend(
                    processes()
                        .into_iter()
                        .filter(|(_, g, _)| groups.contains(g))
                        .map(|(p, _, _)| p),
                );
                victims.sort_unstable();
                victims.dedup();
                let t = shared.now_ms();
                for p in &victims {
                    sig(*p, Signal::SIGKILL);
                }
                self.a.wait_exit(Duration::from_secs(10));
                // Everything is gone before the power comes back.
                let marker = self.a.dir.path().display().to_string();
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let left: Vec<i32> = processes()
                        .into_iter()
                        .filter(|(_, g, c)| groups.contains(g) || c.contains(&marker))
                        .map(|(p, _, _)| p)
                        .collect();
                    if left.is_empty() {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "processes survive the power cut: {left:?}"
                    );
                    for p in left {
                        sig(p, Signal::SIGKILL);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                self.a.start();
                let end = shared.now_ms();
                (
                    t,
                    end,
                    format!("{} processes killed at once", victims.len()),
                )
            }
            Kind::DiskFull => {
                let fs = self.state_fs.as_ref().expect("state tmpfs");
                let t = shared.now_ms();
                let filled = fs.fill();
                let free = fs.free();
                std::thread::sleep(DISK_FULL_HOLD);
                fs.release();
                let end = shared.now_ms();
                (
                    t,
                    end,
                    format!(
                        "{} MiB filled, {free} bytes left, for {:.1} s",
                        filled >> 20,
                        (end - t) as f64 / 1000.0
                    ),
                )
            }
            Kind::AcmeAway => self.acme_away(shared),
            Kind::Update => {
                let t = shared.now_ms();
                let (code, out, err) = self.a.cli(&["reload"]);
                let end = shared.now_ms();
                if code != 0 {
                    self.violation(format!("update: koprogo reload exit {code}: {out}{err}"));
                }
                (t, end, out.trim().lines().last().unwrap_or("").to_string())
            }
            Kind::Backup => {
                let t = shared.now_ms();
                let (code, out, err) = self.a.cli(&["backup", "create"]);
                let end = shared.now_ms();
                if code != 0 {
                    self.violation(format!("backup: exit {code}: {out}{err}"));
                }
                (t, end, out.trim().lines().last().unwrap_or("").to_string())
            }
            Kind::Sighup => {
                let before = self.a.status().and_then(|s| s.update.last.map(|l| l.time));
                let t = shared.now_ms();
                sig(self.supervisor(), Signal::SIGHUP);
                let st = self.a.wait_for(
                    Duration::from_secs(120),
                    "the update SIGHUP asked for",
                    |s| {
                        s.update.running.is_none()
                            && s.update.last.as_ref().map(|l| &l.time) != before.as_ref()
                    },
                );
                let end = shared.now_ms();
                let last = st.update.last.clone();
                if !last.as_ref().is_some_and(|l| l.ok) {
                    self.violation(format!("sighup: the update failed: {last:?}"));
                }
                (t, end, last.map(|l| l.message).unwrap_or_default())
            }
        }
    }

    /// The CA away: relay down, a forced renewal fails (the site keeps its
    /// certificate, the error is shown), the CA back, a forced renewal succeeds.
    fn acme_away(&mut self, shared: &Shared) -> (u64, u64, String) {
        let before = self.a.status().expect("status").tls;
        let t = shared.now_ms();
        self.relay.as_mut().expect("relay").down();
        let (code, out, err) = self.a.cli(&["cert", "renew"]);
        if code != 0 {
            self.violation(format!(
                "acme: cert renew (CA away) exit {code}: {out}{err}"
            ));
        }
        let failed = self.a.wait_for(
            Duration::from_secs(60),
            "the renewal to fail while the CA is away",
            |s| s.tls.last_attempt != before.last_attempt && s.tls.last_error.is_some(),
        );
        if failed.tls.not_before != before.not_before || failed.tls.source != "acme" {
            self.violation(format!(
                "acme: the served certificate changed while the CA was away: {:?}",
                failed.tls
            ));
        }
        std::thread::sleep(CA_AWAY_HOLD);
        self.relay.as_mut().expect("relay").up();
        let end = shared.now_ms();
        let (code, out, err) = self.a.cli(&["cert", "renew"]);
        if code != 0 {
            self.violation(format!(
                "acme: cert renew (CA back) exit {code}: {out}{err}"
            ));
        }
        let renewed = self.a.wait_for(
            Duration::from_secs(90),
            "a renewed certificate once the CA is back",
            |s| s.tls.not_before != before.not_before && s.tls.last_error.is_none(),
        );
        (
            t,
            end,
            format!(
                "renewal failed with: {}; renewed once back (not_before {})",
                failed
                    .tls
                    .last_error
                    .unwrap_or_default()
                    .chars()
                    .take(100)
                    .collect::<String>(),
                renewed.tls.not_before.unwrap_or_default()
            ),
        )
    }

    // -------------------------------------------------------------- the checks

    /// Every acknowledged write of the writer, with its content; and the load's.
    /// Returns how many of the writer's are missing or differ.
    pub fn check_writes(&mut self, shared: &Shared, site: &Site, load_too: bool) -> usize {
        let acks = lock(&shared.acks).clone();
        let sql = format!(
            "SELECT coalesce(json_agg(json_build_object('id', id, 'last_name', last_name, \
             'email', email, 'phone', phone, 'address', address)), '[]') \
             FROM owners WHERE email LIKE 'chaos-{}-%'",
            site.tag
        );
        let rows = match self.psql(&sql) {
            Ok(out) => out,
            Err(e) => {
                self.violation(format!("writes: psql failed: {e}"));
                return acks.len();
            }
        };
        let rows: Vec<serde_json::Value> = serde_json::from_str(rows.trim()).unwrap_or_default();
        let by_id: HashMap<String, &serde_json::Value> = rows
            .iter()
            .filter_map(|r| Some((r["id"].as_str()?.to_string(), r)))
            .collect();
        let mut lost = 0;
        for a in &acks {
            let ok = by_id.get(&a.id).is_some_and(|r| {
                r["last_name"] == a.last_name.as_str()
                    && r["email"] == a.email.as_str()
                    && r["phone"] == a.phone.as_str()
                    && r["address"] == a.address.as_str()
            });
            if !ok {
                lost += 1;
                if lost <= 5 {
                    let got = by_id.get(&a.id).map(|r| r.to_string());
                    self.violation(format!(
                        "acknowledged write lost or changed: {a:?}; in the database: {got:?}"
                    ));
                }
            }
        }
        if load_too {
            let writes = lock(&shared.load_writes).clone();
            let mut by_table: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for (t, id) in writes {
                if id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                    by_table.entry(t).or_default().push(id);
                }
            }
            for (table, ids) in by_table {
                let sql = format!(
                    "CREATE TEMP TABLE acked(id uuid); INSERT INTO acked VALUES {}; \
                     SELECT count(*) FROM acked LEFT JOIN {table} t USING (id) WHERE t.id IS NULL",
                    ids.iter()
                        .map(|i| format!("('{i}')"))
                        .collect::<Vec<_>>()
                        .join(",")
                );
                match self.psql(&sql) {
                    Ok(out) => {
                        let missing: usize = out
                            .lines()
                            .rev()
                            .find_map(|l| l.trim().parse().ok())
                            .unwrap_or(usize::MAX);
                        if missing != 0 {
                            self.violation(format!(
                                "{missing} of the load's {} acknowledged writes to {table} are missing",
                                ids.len()
                            ));
                        }
                    }
                    Err(e) => self.violation(format!("load writes to {table}: psql: {e}")),
                }
            }
        }
        lost
    }

    /// `koprogo psql` with the SQL on stdin (no argument-length limit).
    fn psql(&self, sql: &str) -> Result<String, String> {
        use std::process::Stdio;
        let mut child = self
            .a
            .cmd()
            .args(["psql", "--", "-v", "ON_ERROR_STOP=1", "-qtA"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        if let Some(mut i) = child.stdin.take() {
            i.write_all(sql.as_bytes()).map_err(|e| e.to_string())?;
        }
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// The site's front page and an API list answer.
    fn check_site(&mut self, site: &Site) {
        let r = super::https::runtime().block_on(async {
            let mut c = Conn::new(&site.target);
            let home = c.request("GET", "/", None, None, 0).await;
            let api = c
                .request("GET", "/api/v1/buildings", Some(&site.syndic()), None, 0)
                .await;
            (home, api)
        });
        match r {
            (Ok((200, home)), Ok((200, _))) if String::from_utf8_lossy(&home).contains("<html") => {
            }
            (home, api) => self.violation(format!(
                "the site does not serve: / -> {:?}, /api/v1/buildings -> {:?}",
                home.map(|x| x.0),
                api.map(|x| x.0)
            )),
        }
    }

    /// No zombie below the supervisor lasting 2 s; no process of the appliance
    /// outside the current supervisor's tree (bounded wait for stragglers).
    fn check_processes(&mut self) {
        let sup = self.supervisor();
        let zombies = |tree: &[i32]| -> HashSet<(i32, i32)> {
            process_states()
                .into_iter()
                .filter(|(p, s, pp)| *s == 'Z' && (tree.contains(pp) || *p == sup))
                .map(|(p, _, pp)| (p, pp))
                .collect()
        };
        let first = zombies(&tree(sup));
        if !first.is_empty() {
            std::thread::sleep(Duration::from_secs(2));
            let again = zombies(&tree(sup));
            let kept: Vec<_> = first.intersection(&again).collect();
            if !kept.is_empty() {
                let v = format!("zombies for 2 s or more: {kept:?}");
                self.violation(v);
            }
        }
        let marker = self.a.dir.path().display().to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut mine = tree(sup);
            mine.extend(self.pebble.iter().flat_map(|p| p.pids()).map(|p| p as i32));
            let left: Vec<String> = processes()
                .into_iter()
                .filter(|(p, g, c)| {
                    (self.pgrps.contains(g) || c.contains(&marker)) && !mine.contains(p)
                })
                .map(|(p, g, c)| format!("{p} (pgrp {g}): {c}"))
                .collect();
            if left.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                self.violation(format!("processes left behind: {left:?}"));
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The fault loop, then the final checks. Returns the figures (markdown).
    pub fn run(&mut self) -> String {
        let site = self.boot();
        let kinds = self.kinds();
        println!(
            "chaos: booted in {:.1} s; seed {}, {} s, {} req/s over {} connections, writer {} /s, gaps {:?} s; faults: {}; acknowledged writes logged to {}",
            self.boot_secs,
            self.knobs.seed,
            self.knobs.seconds,
            self.knobs.rate,
            self.knobs.clients,
            self.knobs.writes,
            self.knobs.gap,
            kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(", "),
            self.ack_log.display()
        );
        for s in &self.skipped {
            println!("skipped: {s}");
        }
        let ack_file =
            std::fs::File::create(&self.ack_log).expect("create the acknowledgement log");
        let shared = Arc::new(Shared {
            t0: Instant::now(),
            t0_wall: SystemTime::now(),
            stop: AtomicBool::new(false),
            marker: AtomicU64::new(1),
            outcomes: Mutex::new(Vec::new()),
            failures: Mutex::new(Vec::new()),
            acks: Mutex::new(Vec::new()),
            load_writes: Mutex::new(Vec::new()),
            ack_file: Mutex::new(ack_file),
        });
        let mut load = Load::start(shared.clone(), &site, &self.knobs);
        std::thread::sleep(Duration::from_secs(3));
        self.sample(shared.now_ms());
        let mut rng = Rng::new(self.knobs.seed);
        let mut first_round = kinds.clone();
        rng.shuffle(&mut first_round);
        let limit = Duration::from_secs(self.knobs.seconds);
        let mut round = first_round.into_iter();
        loop {
            let kind = match round.next() {
                Some(k) => k,
                None if shared.t0.elapsed() < limit => {
                    kinds[rng.below(kinds.len() as u64) as usize]
                }
                None => break,
            };
            let gap = rng.between(self.knobs.gap.0, self.knobs.gap.1);
            std::thread::sleep(Duration::from_secs_f64(gap));
            let (start, end, note) = self.inject(kind, &shared, &mut rng);
            // Recovered: a successful request sent after the fault (after the disk
            // is freed: an acknowledged write sent after that).
            let (from, writer) = if kind == Kind::DiskFull {
                (end, true)
            } else {
                (start, false)
            };
            let deadline = Instant::now() + RECOVERY_LIMIT;
            let recovered = loop {
                if let Some(t) = shared.first_ok_since(from, writer) {
                    break Some(t);
                }
                if Instant::now() >= deadline {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            self.wait_ready(RECOVERY_LIMIT, &format!("all ready after {}", kind.name()));
            let ready = shared.now_ms();
            let f = Fault {
                kind,
                start,
                end,
                recovered,
                ready,
                note,
            };
            let rec = f.recovery_ms();
            let (w0, w1) = f.window();
            let failed = lock(&shared.outcomes)
                .iter()
                .filter(|o| !o.ok && o.start <= w1 && o.end >= w0)
                .count();
            let mut seen_kinds = Vec::new();
            for (t, f) in lock(&shared.failures).iter() {
                if *t >= w0 && *t <= w1 + REQUEST_TIMEOUT.as_millis() as u64 {
                    let short: String = f.chars().take(160).collect();
                    if seen_kinds.len() < 3 && !seen_kinds.contains(&short) {
                        seen_kinds.push(short);
                    }
                }
            }
            println!(
                "chaos: [{:6.1} s] {} #{}: {}; recovered in {}; all ready after {:.1} s; {failed} failed requests {seen_kinds:?}",
                start as f64 / 1000.0,
                kind.name(),
                self.faults.iter().filter(|x| x.kind == kind).count() + 1,
                f.note,
                rec.map(|r| format!("{:.2} s", r as f64 / 1000.0))
                    .unwrap_or_else(|| "NEVER".into()),
                (ready - start) as f64 / 1000.0,
            );
            match rec {
                None => self.violation(format!("{}: never recovered", kind.name())),
                Some(r) if Duration::from_millis(r) > kind.bound() => self.violation(format!(
                    "{}: recovery took {:.1} s, over its bound of {} s",
                    kind.name(),
                    r as f64 / 1000.0,
                    kind.bound().as_secs()
                )),
                _ => {}
            }
            if !kind.outage_allowed() && failed > 0 {
                let examples: Vec<String> = lock(&shared.failures)
                    .iter()
                    .filter(|(t, _)| *t >= w0 && *t <= w1)
                    .take(5)
                    .map(|(_, f)| f.clone())
                    .collect();
                self.violation(format!(
                    "{}: {failed} requests failed though nothing should: {examples:?}",
                    kind.name()
                ));
            }
            self.faults.push(f);
            self.check_writes(&shared, &site, false);
            self.check_site(&site);
            self.check_processes();
            self.sample(shared.now_ms());
        }
        // The end: the load stops, every write checked, a graceful stop.
        std::thread::sleep(Duration::from_secs(2));
        load.finish();
        let end_ms = shared.now_ms();
        let lost = self.check_writes(&shared, &site, true);
        self.check_site(&site);
        self.check_processes();
        self.sample(end_ms);
        self.a.stop();
        let state = self.a.cluster_state();
        if state != "shut down" {
            self.violation(format!(
                "PostgreSQL's cluster state after the stop: {state:?}"
            ));
        }
        self.check_no_postgres_sigkill();
        self.check_postgres_recoveries(&shared);
        let log_note = self.check_api_log(&shared);
        let marker = self.a.dir.path().display().to_string();
        let groups = self.pgrps.clone();
        let left: Vec<String> = processes()
            .into_iter()
            .filter(|(_, g, c)| groups.contains(g) || c.contains(&marker))
            .map(|(p, _, c)| format!("{p}: {c}"))
            .collect();
        if !left.is_empty() {
            self.violation(format!("processes left after the stop: {left:?}"));
        }
        self.figures(&shared, end_ms, lost, &log_note)
    }

    /// The supervisor never sent SIGKILL to PostgreSQL (its stop escalates to
    /// SIGKILL only when a fast and an immediate shutdown both failed).
    fn check_no_postgres_sigkill(&mut self) {
        let err = self.a.stderr();
        let bad: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("SIGKILL") && l.contains("service=\"postgres\""))
            .filter(|l| !l.contains("exited unexpectedly"))
            .collect();
        if !bad.is_empty() {
            let v = format!("the supervisor SIGKILLed PostgreSQL: {bad:?}");
            self.violation(v);
        }
    }

    /// PostgreSQL recovered from a crash only after a fault that may cause one.
    fn check_postgres_recoveries(&mut self, shared: &Shared) {
        let lines = super::all_log_lines(&self.a.path("logs"), "postgres");
        let windows: Vec<(SystemTime, SystemTime)> = self
            .faults
            .iter()
            .filter(|f| f.kind.crashes_postgres())
            .map(|f| {
                let (a, b) = f.window();
                (shared.wall(a.saturating_sub(1000)), shared.wall(b + 5000))
            })
            .collect();
        let t0 = shared.t0_wall;
        let mut bad = Vec::new();
        for l in lines {
            if !(l.contains("not properly shut down")
                || l.contains("database system was interrupted"))
            {
                continue;
            }
            let Some(t) = log_time(&l) else { continue };
            if t < t0 {
                continue;
            }
            if !windows.iter().any(|(a, b)| t >= *a && t <= *b) {
                bad.push(l);
            }
        }
        if !bad.is_empty() {
            self.violation(format!(
                "PostgreSQL recovered from a crash no fault explains: {bad:?}"
            ));
        }
    }

    /// Every request the API answered with 2xx has its line in api.log, except
    /// those answered close to a fault that may cost lines. Returns a note.
    fn check_api_log(&mut self, shared: &Shared) -> String {
        let lines = super::all_log_lines(&self.a.path("logs"), "api");
        let mut logged = HashSet::new();
        for l in &lines {
            if let Some(i) = l.find("koprogo-chaos/") {
                let n: String = l[i + 14..]
                    .chars()
                    .take_while(|c| c.is_ascii_digit())
                    .collect();
                if let Ok(n) = n.parse::<u64>() {
                    logged.insert(n);
                }
            }
        }
        let excused: Vec<(u64, u64)> = self.faults.iter().filter_map(Fault::log_excuse).collect();
        let outcomes = lock(&shared.outcomes).clone();
        let (mut expected, mut missing, mut excused_n) = (0usize, Vec::new(), 0usize);
        for o in outcomes.iter().filter(|o| o.ok) {
            if excused.iter().any(|(a, b)| o.end >= *a && o.start <= *b) {
                excused_n += 1;
                continue;
            }
            expected += 1;
            if !logged.contains(&o.marker) {
                missing.push(*o);
            }
        }
        if !missing.is_empty() {
            let v = format!(
                "{} of {expected} requests answered by the API outside kill and full-disk windows have no line in api.log; first: {:?}",
                missing.len(),
                &missing[..missing.len().min(5)]
            );
            self.violation(v);
        }
        format!(
            "{expected} answered requests checked in api.log, {} missing; {excused_n} near a kill or a full disk not required",
            missing.len()
        )
    }

    /// The figures, as a markdown table.
    fn figures(&self, shared: &Shared, end_ms: u64, lost: usize, log_note: &str) -> String {
        let outcomes = lock(&shared.outcomes).clone();
        let windows: Vec<(u64, u64)> = self.faults.iter().map(Fault::window).collect();
        let in_window = |o: &Outcome| windows.iter().any(|(a, b)| o.start <= *b && o.end >= *a);
        let mut out = String::new();
        out.push_str(
            "| fault | count | recovery min / median / max (s) | bound (s) | failed requests in its windows | acknowledged writes lost |\n|---|---|---|---|---|---|\n",
        );
        let mut kinds: Vec<Kind> = self.faults.iter().map(|f| f.kind).collect();
        kinds.sort();
        kinds.dedup();
        for k in kinds {
            let fs: Vec<&Fault> = self.faults.iter().filter(|f| f.kind == k).collect();
            let mut rec: Vec<u64> = fs.iter().filter_map(|f| f.recovery_ms()).collect();
            rec.sort_unstable();
            let never = fs.len() - rec.len();
            let s = |ms: u64| format!("{:.2}", ms as f64 / 1000.0);
            let recs = if rec.is_empty() {
                "never".to_string()
            } else {
                format!(
                    "{} / {} / {}{}",
                    s(rec[0]),
                    s(rec[rec.len() / 2]),
                    s(rec[rec.len() - 1]),
                    if never > 0 {
                        format!(" ({never} never)")
                    } else {
                        String::new()
                    }
                )
            };
            let failed = outcomes
                .iter()
                .filter(|o| {
                    !o.ok
                        && fs.iter().any(|f| {
                            let (a, b) = f.window();
                            o.start <= b && o.end >= a
                        })
                })
                .count();
            out.push_str(&format!(
                "| {} | {} | {recs} | {} | {failed} | 0 |\n",
                k.name(),
                fs.len(),
                k.bound().as_secs()
            ));
        }
        let total = outcomes.len();
        let failed = outcomes.iter().filter(|o| !o.ok).count();
        let failed_out = outcomes.iter().filter(|o| !o.ok && !in_window(o)).count();
        let acks = lock(&shared.acks).len();
        let load_writes = lock(&shared.load_writes).len();
        let (first, last) = (self.samples.first(), self.samples.last());
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        out.push('\n');
        out.push_str(&format!(
            "Overall: {:.0} s under load ({} faults); {total} requests, {failed} failed ({} in fault windows, {failed_out} outside); \
             {acks} acknowledged writes by the writer, {lost} lost; {load_writes} more by the load, all present; \
             supervisor RSS {:.1} MiB at start (pid {}), {:.1} MiB at the end (pid {}); file descriptors {} at start, {} at the end; \
             first boot {:.1} s; {log_note}.\n",
            end_ms as f64 / 1000.0,
            self.faults.len(),
            failed - failed_out,
            first.map(|s| mib(s.2)).unwrap_or(0.0),
            first.map(|s| s.1).unwrap_or(0),
            last.map(|s| mib(s.2)).unwrap_or(0.0),
            last.map(|s| s.1).unwrap_or(0),
            first.map(|s| s.3).unwrap_or(0),
            last.map(|s| s.3).unwrap_or(0),
            self.boot_secs,
        ));
        // The longest-lived supervisor: its growth is the leak figure.
        let mut by_pid: BTreeMap<i32, Vec<&(u64, i32, u64, usize)>> = BTreeMap::new();
        for s in &self.samples {
            by_pid.entry(s.1).or_default().push(s);
        }
        if let Some((pid, v)) = by_pid
            .iter()
            .max_by_key(|(_, v)| v.last().map(|l| l.0).unwrap_or(0) - v[0].0)
        {
            let (a, b) = (v[0], v[v.len() - 1]);
            out.push_str(&format!(
                "Longest-lived supervisor (pid {pid}, {:.0} s): RSS {:.1} -> {:.1} MiB, file descriptors {} -> {}.\n",
                (b.0 - a.0) as f64 / 1000.0,
                mib(a.2),
                mib(b.2),
                a.3,
                b.3
            ));
        }
        let outside: Vec<String> = lock(&shared.failures)
            .iter()
            .filter(|(t, _)| !windows.iter().any(|(a, b)| t >= a && t <= b))
            .take(10)
            .map(|(t, f)| format!("{:.1} s: {f}", *t as f64 / 1000.0))
            .collect();
        if !outside.is_empty() {
            out.push_str(&format!(
                "Failed outside fault windows (first 10): {outside:?}\n"
            ));
        }
        out
    }
}

/// The RFC 3339 stamp the log pipeline puts at the start of a line.
fn log_time(line: &str) -> Option<SystemTime> {
    let stamp = line.split_whitespace().next()?;
    let t = chrono::DateTime::parse_from_rfc3339(stamp).ok()?;
    let ms = u64::try_from(t.timestamp_millis()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
}

/// Seconds until a JWT's `exp` (None when it has none or is not a JWT).
fn jwt_seconds_left(token: &str) -> Option<i64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64url(payload)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = v["exp"].as_i64()?;
    Some(exp - chrono::Utc::now().timestamp())
}

fn base64url(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            b'=' => continue,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}
