//! `koprogo run` before and after the async runtime: the checks `koprogo check`
//! makes, the launcher forked while we may still switch users, the proxy's ports
//! bound while we may still be root, directories prepared and privileges dropped,
//! the state lock, the log pipes, the supervisor's own log, the reaper, then the
//! runtime that runs [`super::supervise`]; on the way out, the logs are drained.
//! Nothing here parses a command line: the CLI hands over a loaded config.

use std::io::Write;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::logs::{self, LogPipe};
use crate::process::{launcher, privileges, reaper::Reaper};
use crate::sync::RwLockExt;

use super::Boot;

/// Why `run` did not get to supervise.
#[derive(Debug)]
pub enum BootError {
    /// The configuration or the environment is wrong; nothing was started (exit 2).
    /// One line per problem.
    Refused(Vec<String>),
    /// Something failed on the way up (exit 1).
    Failed(String),
}

/// Boots, supervises until told to stop, and shuts down; returns the exit code.
pub fn run(cfg: Config) -> Result<u8, BootError> {
    let started = Instant::now();
    // The listeners systemd kept across a restart (its fd store): adopted, so a
    // client never meets a closed port; the ones no longer configured are dropped.
    let wanted: Vec<_> = crate::proxy::server::addresses(&cfg)
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    let passed = super::fdstore::sort(super::fdstore::take_passed(), &wanted);
    let held: Vec<_> = passed.adopted.iter().map(|(a, _)| *a).collect();
    let pre = crate::check::preflight_holding(&cfg, &held);
    if !pre.problems.is_empty() {
        let mut lines: Vec<String> = pre.problems.iter().map(|e| format!("error: {e}")).collect();
        lines.push("not started: fix the problems above (koprogo check lists them too)".into());
        return Err(BootError::Refused(lines));
    }
    let (Some(bins), Some(who)) = (pre.bins, pre.who) else {
        return Err(BootError::Failed(
            "internal: preflight gave no binaries or user".into(),
        ));
    };
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o027));
    // Never the OOM killer's choice (see `process::oom`): set before the launcher
    // is forked (it inherits it) and before we drop privileges. Under the packaged
    // unit OOMScoreAdjust= has done it already; without CAP_SYS_RESOURCE (root in
    // some containers lacks it) the kernel refuses, and `status` and `check` say so.
    if crate::process::oom::read(std::process::id() as i32) != Some(crate::process::oom::SUPERVISOR)
    {
        let _ = crate::process::oom::set_self(crate::process::oom::SUPERVISOR);
    }
    // The API's own user: the launcher is forked first, before any listener, log
    // or lock is opened, while we may still switch users.
    let api =
        privileges::api_identity(&cfg).map_err(|e| BootError::Refused(vec![format!("{e:#}")]))?;
    if let Some(api) = &api {
        launcher::start(&cfg.backend.command, api.clone())
            .map_err(|e| BootError::Failed(format!("{e:#}")))?;
    }
    // Ports 80/443 are bound while we may still be root.
    let listeners = crate::proxy::server::bind(&cfg, passed.adopted)
        .map_err(|e| BootError::Refused(vec![format!("{e:#}")]))?;
    // Kept by systemd while we restart (FileDescriptorStoreMax= in the unit).
    let unstored = super::fdstore::store(listeners.iter());
    privileges::prepare_and_drop(&cfg, &who, api.as_ref())
        .map_err(|e| BootError::Failed(format!("{e:#}")))?;
    if api.is_some() {
        // Under the packaged unit we are not root: give up switching users now.
        launcher::drop_switching().map_err(|e| BootError::Failed(format!("{e:#}")))?;
    }
    let lock = privileges::lock_state(&cfg).map_err(|e| BootError::Failed(format!("{e:#}")))?;
    let settings = super::log_settings(&cfg);
    let mut pipes = Vec::new();
    for name in ["koprogo", "postgres", "api", "access"] {
        let pipe = LogPipe::start(name, &settings).map_err(|e| {
            BootError::Failed(format!(
                "cannot start the {name} log in {}: {e}",
                cfg.paths.logs.display()
            ))
        })?;
        pipes.push(pipe);
    }
    let own = pipes.remove(0);
    let access_pipe = pipes.pop();
    let access = access_pipe.as_ref().and_then(|p| p.make_writer().ok());
    let own_file = match own.make_writer() {
        Ok(w) => Arc::new(RwLock::new(Some(w))),
        Err(e) => {
            return Err(BootError::Failed(format!(
                "cannot write the supervisor log: {e}"
            )))
        }
    };
    init_tracing(own_file.clone());
    tracing::info!(
        "koprogo {} starting (pid {})",
        env!("CARGO_PKG_VERSION"),
        std::process::id()
    );
    for line in &passed.dropped {
        tracing::warn!("{line}");
    }
    if !held.is_empty() {
        let list: Vec<String> = held.iter().map(|a| a.to_string()).collect();
        tracing::info!(
            "proxy: adopted the listeners systemd kept across the restart: {}",
            list.join(", ")
        );
    }
    for line in &unstored {
        tracing::warn!("{line}");
    }
    if std::process::id() != 1 {
        // Orphans of our children come to us, not to init.
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::warn!(
                "cannot become the subreaper of our children's orphans ({e}): \
                 they go to init instead of being reaped here"
            );
        }
    }
    let code = supervise_in_runtime(
        cfg, bins, who.name, pipes, &own, started, lock, listeners, access,
    );
    // Close our side of the supervisor log so its writer drains and exits.
    {
        let mut w = own_file.write_now();
        *w = None;
    }
    let _ = own.close(Duration::from_secs(5));
    if let Some(p) = access_pipe {
        let _ = p.close(Duration::from_secs(5));
    }
    Ok(code)
}

/// The reaper and the runtime, then `supervise`; errors from here on go to the
/// supervisor's log (exit 1).
#[allow(clippy::too_many_arguments)]
fn supervise_in_runtime(
    cfg: Config,
    bins: crate::postgres::binaries::Binaries,
    os_user: String,
    pipes: Vec<LogPipe>,
    own: &LogPipe,
    started: Instant,
    lock: nix::fcntl::Flock<std::fs::File>,
    listeners: crate::proxy::server::Listeners,
    access: Option<logs::PipeWriter>,
) -> u8 {
    let reaper = match Reaper::start() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{e:#}");
            return 1;
        }
    };
    let workers = runtime_workers();
    // One CPU: the current-thread scheduler (every task on this thread, no work
    // stealing, no cross-thread wake-ups); more: one worker per CPU.
    let built = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    };
    let runtime = match built {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return 1;
        }
    };
    if workers == 1 {
        tracing::info!("async runtime: one thread (one CPU may be used)");
    } else {
        tracing::info!(
            "async runtime: {workers} worker threads, one per CPU this process may use (at most {MAX_WORKERS})"
        );
    }
    let boot = Boot {
        cfg: Arc::new(cfg),
        bins,
        os_user,
        logs: pipes.into_iter().map(Arc::new).collect(),
        own_log: own.stats.clone(),
        reaper,
        lock,
        started,
        listeners,
        access,
    };
    let code = match runtime.block_on(super::supervise(boot)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e:#}");
            1
        }
    };
    runtime.shutdown_timeout(Duration::from_secs(2));
    code as u8
}

/// Most async worker threads the supervisor runs (its work is the proxy's).
const MAX_WORKERS: usize = 4;

/// One worker per CPU this process may use (its affinity mask and its cgroup's CPU
/// quota, as `available_parallelism` reads them), at most [`MAX_WORKERS`]. Two
/// workers on a one-CPU VPS passed each request's tasks back and forth between two
/// threads on the same core.
fn runtime_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_WORKERS))
}

/// The supervisor's own log: one formatted event per write, to stderr (the journal
/// under systemd) and to the `koprogo` log pipe.
#[derive(Clone)]
struct OwnLog(Arc<RwLock<Option<logs::PipeWriter>>>);

impl Write for OwnLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        {
            let mut g = self.0.write_now();
            if let Some(w) = g.as_mut() {
                let _ = w.write_all(buf);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_tracing(file: Arc<RwLock<Option<logs::PipeWriter>>>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KOPROGO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let writer = OwnLog(file);
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .with_writer(move || writer.clone())
        .try_init();
}
