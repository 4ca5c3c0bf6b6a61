//! `demo-backend`: a test double of `koprogo-api` for the supervisor's tests (not
//! shipped). It honours the same contract (see shared/koprogo-backend.md): no CLI
//! arguments, `./.env` read from the working directory (real environment wins),
//! the same environment validation (exit 1 with one line on stdout), the same
//! database pool (sqlx 0.8: a `DATABASE_URL` it refuses, a missing socket or an
//! authentication failure panic with its message, exit 101), migrations with
//! an advisory lock at every start, the `admin@koprogo.com`/`admin123` reset,
//! logs on stdout only (ANSI colour unless `NO_COLOR` is set), SIGTERM = graceful
//! drain up to 30 s (open WebSockets included) then exit 0, SIGINT/SIGQUIT = immediate exit 0.
//!
//! Routes: `GET /api/v1/health` (no database), `POST /api/v1/items` (raw text),
//! `GET /api/v1/items[/{id}]`, `POST /api/v1/secrets`, `GET /api/v1/secrets/{id}`
//! (pgcrypto with `TOTP_ENCRYPTION_KEY`), `POST /api/v1/auth/login`,
//! `GET /api/v1/echo` (method, path, query and headers as JSON), `GET /metrics`
//! (`demo_requests_total N`), `GET /mcp/sse` (a tick every 200 ms); anything else
//! is 404 JSON. Database errors are 503 JSON (unreachable) or 500 JSON.
//!
//! Test knobs, environment variables only, harmless when unset or empty:
//! - `DEMO_EXIT_AT_START=CODE`: exit at once with CODE (before anything else
//!   but reading `.env`).
//! - `DEMO_EMIT_LINES=N`: print N lines `demo line 000000001`... (9 digits) as
//!   fast as possible right after start, before validating the environment and
//!   connecting to the database (log-rotation tests).
//! - `DEMO_START_DELAY_MS=N`: sleep N ms after migrations, before listening
//!   (readiness tests).
//! - `DEMO_VERSION=TEXT`: every response carries `X-Demo-Version: TEXT` and
//!   `X-Demo-Port: PORT` (update tests tell the old binary from the new one, and
//!   the instances apart).
//! - `DEMO_NEVER_READY=1`: the health route answers 503 for ever (a new version
//!   that never becomes ready).

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};

macro_rules! log_info { ($($a:tt)*) => { $crate::log("INFO ", "32", format_args!($($a)*)) } }
macro_rules! log_warn { ($($a:tt)*) => { $crate::log("WARN ", "33", format_args!($($a)*)) } }
macro_rules! log_error { ($($a:tt)*) => { $crate::log("ERROR", "31", format_args!($($a)*)) } }

mod config;
mod db;
mod http;

static NO_COLOR: AtomicBool = AtomicBool::new(false);

/// One log line on stdout: UTC timestamp, level (coloured unless NO_COLOR), message.
/// Write errors (closed stdout) are ignored rather than panicking.
pub fn log(level: &str, colour: &str, msg: fmt::Arguments) {
    let level = if NO_COLOR.load(Ordering::Relaxed) {
        level.to_string()
    } else {
        format!("\x1b[{colour}m{level}\x1b[0m")
    };
    let line = format!("{} {level} demo_backend: {msg}\n", timestamp());
    let _ = std::io::stdout().lock().write_all(line.as_bytes());
}

/// RFC 3339 UTC time with milliseconds, without a date crate.
fn timestamp() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let (secs, days) = (now.as_secs() % 86400, (now.as_secs() / 86400) as i64);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        now.subsec_millis()
    )
}

/// A start-up error koprogo-api reports: one line on stdout, exit code 1.
fn fatal(msg: impl fmt::Display) -> ! {
    log_error!("{msg}");
    std::process::exit(1)
}

fn knob(env: &config::Env, name: &str) -> Option<u64> {
    let value = env.get(name).filter(|v| !v.trim().is_empty())?;
    match value.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => fatal(format!("{name}={value:?} is not a non-negative integer")),
    }
}

fn main() {
    let env = config::Env::load();
    NO_COLOR.store(
        env.get("NO_COLOR").is_some_and(|v| !v.is_empty()),
        Ordering::Relaxed,
    );

    if let Some(code) = env
        .get("DEMO_EXIT_AT_START")
        .filter(|v| !v.trim().is_empty())
    {
        match code.trim().parse::<i32>() {
            Ok(code) => std::process::exit(code),
            Err(_) => fatal(format!("DEMO_EXIT_AT_START={code:?} is not an exit code")),
        }
    }
    if let Some(n) = knob(&env, "DEMO_EMIT_LINES") {
        let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
        for i in 1..=n {
            if writeln!(out, "demo line {i:09}").is_err() {
                break;
            }
        }
        let _ = out.flush();
    }
    let delay = knob(&env, "DEMO_START_DELAY_MS");
    let mut knobs = http::Knobs {
        port: 0,
        version: env.get("DEMO_VERSION").filter(|v| !v.is_empty()),
        never_ready: env.get("DEMO_NEVER_READY").is_some_and(|v| !v.is_empty()),
    };
    let cfg = config::validate(&env).unwrap_or_else(|e| fatal(e));
    knobs.port = cfg.port;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| fatal(format!("cannot start the async runtime: {e}")));
    // A panic inside block_on's own future (database connection) unwinds out of
    // main: exit code 101, like the real server.
    runtime.block_on(run(cfg, delay, knobs));
}

async fn run(cfg: config::Config, delay: Option<u64>, knobs: http::Knobs) {
    let pool = db::create_pool(&cfg.database_url, &cfg.pool).await;
    log_info!("connected to the database");
    db::migrate(&pool).await.unwrap_or_else(|e| fatal(e));
    db::reset_admin(&pool).await.unwrap_or_else(|e| fatal(e));
    if let Some(ms) = delay {
        log_info!("DEMO_START_DELAY_MS: waiting {ms} ms before listening");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    let listener = TcpListener::bind((cfg.host.as_str(), cfg.port))
        .await
        .unwrap_or_else(|e| fatal(format!("cannot listen on {}:{}: {e}", cfg.host, cfg.port)));
    let sig = |kind: SignalKind| {
        signal(kind).unwrap_or_else(|e| fatal(format!("cannot install a signal handler: {e}")))
    };
    let signals = [
        sig(SignalKind::terminate()),
        sig(SignalKind::interrupt()),
        sig(SignalKind::quit()),
    ];
    let addr = listener
        .local_addr()
        .map_or_else(|_| format!("{}:{}", cfg.host, cfg.port), |a| a.to_string());
    log_info!("listening on {addr}");

    let state = Arc::new(http::State {
        db: db::Db::new(pool),
        totp_key: cfg.totp_key,
        requests: AtomicU64::new(0),
        knobs,
    });
    serve(listener, state, signals).await
}

async fn serve(listener: TcpListener, state: Arc<http::State>, signals: [Signal; 3]) -> ! {
    let [mut term, mut int, mut quit] = signals;
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let state = state.clone();
                    let service = service_fn(move |req| http::handle(state.clone(), req));
                    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
                    builder.http1().timer(TokioTimer::new()).keep_alive(true);
                    let conn = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                }
                Err(e) => {
                    log_warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = term.recv() => break,
            _ = int.recv() => exit_now("SIGINT"),
            _ = quit.recv() => exit_now("SIGQUIT"),
        }
    }

    log_info!("shutting down (SIGTERM)");
    drop(listener);
    http::SHUTTING_DOWN.store(true, Ordering::Relaxed);
    tokio::select! {
        _ = async { graceful.shutdown().await; http::websockets_closed().await } => {
            log_info!("all connections drained, exiting")
        }
        _ = tokio::time::sleep(Duration::from_secs(30)) => log_warn!("drain timed out after 30 s, exiting"),
        _ = int.recv() => exit_now("SIGINT"),
        _ = quit.recv() => exit_now("SIGQUIT"),
    }
    std::process::exit(0)
}

fn exit_now(signal: &str) -> ! {
    log_info!("received {signal}: exiting now");
    std::process::exit(0)
}
