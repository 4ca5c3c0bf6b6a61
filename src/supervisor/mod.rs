//! `koprogo run`: the process-tree owner. Boots in DESIGN.md's order (config, dirs,
//! privileges, logs, reaper, Postgres, API), reports state to systemd and the control
//! socket, and stops in reverse order on SIGTERM/SIGINT (a second one: stop now).

pub mod boot;
pub mod fdstore;
pub mod notify;
pub mod site;

pub use crate::control::StatusReport;
pub use site::{ServiceHandle, Site};

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::ApiService;
use crate::config::Config;
use crate::logs::{LogPipe, LogSettings, LogStats};
use crate::postgres::binaries::Binaries;
use crate::postgres::{Db, PostgresService};
use crate::process::reaper::Reaper;
use crate::process::service::{self, ServiceIo, ServiceSpec, Shutdown, Wiring};
use crate::process::state::ServiceState;
use crate::proxy::server::Listeners;
use crate::proxy::Proxy;
use crate::tls::Tls;

/// After the services stopped, how long to wait for the last children to be reaped.
const REAP_WAIT: Duration = Duration::from_secs(5);

/// The supervisor's own hold on a service task: how to stop it and wait for it.
struct Task {
    name: &'static str,
    stop: watch::Sender<Shutdown>,
    join: tokio::task::JoinHandle<()>,
}

/// Everything `run` found before the runtime starts.
pub struct Boot {
    pub cfg: Arc<Config>,
    pub bins: Binaries,
    pub os_user: String,
    /// The children's log pipes (postgres, api).
    pub logs: Vec<Arc<LogPipe>>,
    /// Counters of the supervisor's own log, whose pipe `main` owns.
    pub own_log: Arc<LogStats>,
    pub reaper: Reaper,
    pub lock: nix::fcntl::Flock<std::fs::File>,
    pub started: Instant,
    /// Proxy sockets, bound before privileges were dropped.
    pub listeners: Listeners,
    /// Where the access log goes.
    pub access: Option<crate::logs::PipeWriter>,
}

pub fn log_settings(cfg: &Config) -> LogSettings {
    LogSettings {
        dir: cfg.paths.logs.clone(),
        max_size: cfg.logs.max_size,
        rotate_daily: cfg.logs.rotate_daily,
        keep_files: cfg.logs.keep_files,
        max_age: cfg.logs.max_age,
        compress: cfg.logs.compress,
    }
}

/// The supervisor's main loop; returns the process exit code.
pub async fn supervise(boot: Boot) -> Result<i32> {
    let Boot {
        cfg,
        bins,
        os_user,
        logs,
        own_log,
        reaper,
        lock,
        started,
        listeners,
        access,
    } = boot;
    let secrets = crate::secrets::load_or_create(&cfg.paths.state)?;
    let db = Db::new(cfg.clone());
    let db_shared = db.clone();
    let log_of = |name: &str| logs.iter().find(|l| l.service == name).cloned();
    let (pg_log, api_log) = match (log_of("postgres"), log_of("api")) {
        (Some(p), Some(a)) => (Arc::new(p.writer_fd()?), Arc::new(a.writer_fd()?)),
        _ => anyhow::bail!("internal: log pipes missing"),
    };
    let (stopping_tx, stopping_rx) = watch::channel(Shutdown::Running);

    let backup_bins = bins.clone();
    // Managed: the private cluster as a child. External: a service without a child
    // whose runs are its probes (no initdb, no cluster files, no upgrade).
    let (pg_handle, pg_task, pg_ready) = match cfg.postgres.mode {
        crate::config::PgMode::Managed => {
            let pg = Arc::new(PostgresService {
                cfg: cfg.clone(),
                bins,
                os_user,
                db: db.clone(),
            });
            launch(pg, &reaper, pg_log, None)
        }
        crate::config::PgMode::External => {
            let pg = Arc::new(crate::postgres::external::ExternalService {
                cfg: cfg.clone(),
                db: db.clone(),
                client_major: bins.major,
            });
            launch(pg, &reaper, pg_log, None)
        }
    };
    // `backend.instances` API servers, all logging into api.log. Secrets are read
    // again before each API start (a restore replaces them).
    let api_io = ServiceIo {
        reaper: reaper.clone(),
        log: api_log.clone(),
    };
    let mut tasks = vec![pg_task];
    let mut api_handles = Vec::new();
    let mut instances = Vec::new();
    for index in 0..cfg.backend.instances.max(1) {
        let api = Arc::new(ApiService::new(
            cfg.clone(),
            secrets.clone(),
            db.clone(),
            index,
        ));
        let (handle, task, _ready) = launch(
            api.clone(),
            &reaper,
            api_log.clone(),
            Some(pg_ready.clone()),
        );
        instances.push(crate::update::Instance {
            api,
            cmds: handle.cmds.clone(),
            state: handle.state.clone(),
        });
        api_handles.push(handle);
        tasks.push(task);
    }
    let api_states: Vec<watch::Receiver<ServiceState>> =
        api_handles.iter().map(|h| h.state.clone()).collect();

    // The front door answers from the first second (maintenance until the API is ready).
    let tls = Tls::load(&cfg)?;
    // Background tasks, cancelled in three groups in the order of the stop.
    let watchers = Group::new(); // certificates, backup schedule, capacity
    let updates = Group::new(); // the binary watcher, the proxy's routes
    let last = Group::new(); // control socket, notifier, metrics
    watchers.spawn(tls.clone().maintain());
    let (routes, routes_task) = crate::proxy::balance::publish(api_states.clone());
    updates.spawn(routes_task);
    let proxy = Arc::new(Proxy::new(cfg.clone(), tls.clone(), routes.clone(), access));
    let frontend_installed = proxy.files.installed();
    if !frontend_installed {
        tracing::warn!(
            "the frontend is not installed ({} has no index.html): pages get the maintenance answer",
            cfg.proxy.frontend.display()
        );
    }
    let proxy_stop = CancellationToken::new();
    let proxy_stats = proxy.stats.clone();
    let proxy_task = tokio::spawn(crate::proxy::server::serve(
        proxy,
        listeners,
        proxy_stop.clone(),
    ));
    let backup = crate::backup::Backups::new(
        cfg.clone(),
        backup_bins,
        db_shared.clone(),
        reaper.clone(),
        pg_handle.state.clone(),
        api_handles.iter().map(|h| h.cmds.clone()).collect(),
        api_states,
    );
    watchers.spawn(backup.clone().run_scheduler());
    let updater = crate::update::Updater::new(
        cfg.clone(),
        instances,
        api_io,
        routes,
        backup.clone(),
        stopping_rx.clone(),
    );
    updates.spawn(updater.clone().watch());
    let capacity_monitor = crate::capacity::Monitor::new(crate::capacity::View {
        cfg: cfg.clone(),
        db: db_shared.clone(),
        proxy: proxy_stats.clone(),
    });
    let pg_state = pg_handle.state.clone();
    let shared = Site::new(site::Parts {
        services: std::iter::once(pg_handle).chain(api_handles).collect(),
        logs: std::iter::once(("koprogo".to_string(), own_log))
            .chain(logs.iter().map(|l| (l.service.clone(), l.stats.clone())))
            .collect(),
        started,
        reaper: reaper.clone(),
        stopping: stopping_rx,
        tls,
        proxy: proxy_stats,
        frontend_installed,
        cfg: cfg.clone(),
        db: db_shared,
        backup,
        capacity: capacity_monitor.clone(),
        updater: updater.clone(),
    });

    last.spawn(crate::control::serve(&cfg, shared.clone())?);
    if cfg.metrics.enabled {
        let l = std::net::TcpListener::bind(cfg.metrics.listen)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .with_context(|| {
                format!(
                    "{}: metrics.listen = {}: cannot listen",
                    cfg.file.display(),
                    cfg.metrics.listen
                )
            })?;
        tracing::info!("metrics on http://{}/metrics", cfg.metrics.listen);
        last.spawn(crate::metrics::serve(l, shared.clone(), proxy_stop.clone()));
    }
    last.spawn(notify::report(shared.clone()));
    watchers.spawn(capacity_monitor.run(pg_state));

    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = hup.recv() => {
                tracing::info!("SIGHUP: updating the API server (configuration changes need a restart)");
                let u = updater.clone();
                tokio::spawn(async move { let _ = u.update(crate::update::Trigger::Sighup).await; });
            }
        }
    }
    let _ = stopping_tx.send(Shutdown::Graceful);
    notify::stopping();

    // A second signal while stopping means: stop now.
    let stops: Vec<watch::Sender<Shutdown>> = tasks.iter().map(|t| t.stop.clone()).collect();
    let stopped = CancellationToken::new();
    let stop_waiting = stopped.clone();
    let hurry = tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = stop_waiting.cancelled() => return false,
        }
        tracing::warn!("second signal: stopping now");
        let _ = stopping_tx.send(Shutdown::Now);
        for s in &stops {
            let _ = s.send(Shutdown::Now);
        }
        true
    });

    // Stop accepting and drain the proxy (bounded), then the API, then Postgres.
    proxy_stop.cancel();
    let drain = crate::proxy::server::DRAIN + Duration::from_secs(1);
    if tokio::time::timeout(drain, proxy_task).await.is_err() {
        tracing::warn!("proxy: drain took longer than {drain:?}");
    }
    watchers.stop().await;
    // An update in progress stops its new server or finishes draining the old one
    // (the watcher is not cancelled before: dropping its update half-way would leave
    // a child nobody stops).
    updater
        .wait_idle(cfg.backend.stop_timeout + Duration::from_secs(10))
        .await;
    updates.stop().await;
    for t in tasks.into_iter().rev() {
        if *t.stop.borrow() == Shutdown::Running {
            let _ = t.stop.send(Shutdown::Graceful);
        }
        let _ = t.join.await;
        tracing::info!(service = t.name, "stopped");
    }
    stopped.cancel();
    let hurried = hurry.await.unwrap_or(false);
    last.stop().await;
    let deadline = Instant::now() + REAP_WAIT;
    while reaper.live_children() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = reaper.live_children();
    if left > 0 {
        tracing::error!("{left} children still not reaped at exit");
    }
    crate::control::remove_socket(&cfg);
    tracing::info!("koprogo stopped after {:.1?} of uptime", started.elapsed());
    drop(shared);
    // Our copies of the children's log pipes' write ends (here and in the updater,
    // for the servers it starts): while one lives its pipe never drains, and its
    // close below waited its whole bound (5 s of every stop, of every restart).
    drop(updater);
    drop(api_log);
    for l in logs {
        match Arc::try_unwrap(l) {
            Ok(pipe) => {
                let _ = pipe.close(Duration::from_secs(5));
            }
            Err(l) => tracing::warn!("the {} log pipe is still in use at exit", l.service),
        }
    }
    drop(lock);
    Ok(if hurried || left > 0 { 1 } else { 0 })
}

/// Tasks that run until their group is stopped: one token cancels them all, one
/// tracker waits until every one has returned.
struct Group {
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Group {
    fn new() -> Group {
        Group {
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }
    }

    fn spawn<F>(&self, task: F)
    where
        F: std::future::Future + Send + 'static,
    {
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = task => {}
            }
        });
    }

    /// Cancels every task of the group and waits until they have returned.
    async fn stop(&self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Starts the task of one service; returns its handle and its readiness channel.
fn launch<S: ServiceSpec>(
    spec: Arc<S>,
    reaper: &Reaper,
    log: Arc<std::os::fd::OwnedFd>,
    dep: Option<watch::Receiver<Option<u64>>>,
) -> (ServiceHandle, Task, watch::Receiver<Option<u64>>) {
    let name = spec.name();
    let (cmd_tx, cmd_rx) = mpsc::channel(8);
    let (state_tx, state_rx) = watch::channel(ServiceState::new(name));
    let (ready_tx, ready_rx) = watch::channel(None);
    let (stop_tx, stop_rx) = watch::channel(Shutdown::Running);
    let wiring = Wiring {
        io: ServiceIo {
            reaper: reaper.clone(),
            log,
        },
        cmds: cmd_rx,
        state: state_tx,
        dep,
        ready: ready_tx,
        shutdown: stop_rx,
    };
    let join = tokio::spawn(service::run(spec, wiring));
    (
        ServiceHandle {
            name,
            cmds: cmd_tx,
            state: state_rx,
        },
        Task {
            name,
            stop: stop_tx,
            join,
        },
        ready_rx,
    )
}
