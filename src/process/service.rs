//! The life of one supervised service, as a state machine: held (stopped by
//! command), waiting for its dependency, backing off, starting (prepare, spawn, the
//! readiness gate), ready (health checks, commands, takeovers), and back — never
//! giving up. What a service *is* (its command, probes, stop signals) comes from a
//! [`ServiceSpec`]; how one run of it ends is an [`End`].
//!
//! A service may have no child at all (`prepare` returns `None`: an external
//! PostgreSQL): a run is then its probes alone, with the same readiness gate,
//! health checks, back-off and dependents; there is just nothing to signal.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep, sleep_until, timeout};

use super::backoff::{Backoff, STABLE};
use super::event::{absorb, next_event, End, Event};
use super::reaper::{signal, Exit, Spawned};
use super::state::{Phase, ServiceState};

pub use super::spec::{
    Cmd, Health, NotInstalled, ServiceIo, ServiceSpec, Shutdown, StopStep, Takeover,
};
use super::stop::stop_child;
pub use super::stop::{stop_process, StopHow};

/// A run that was ready this long before it ended resets the back-off.
const SERVED: Duration = Duration::from_secs(10);

/// The bound on one readiness probe while a service starts.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a service whose program is missing looks for it again.
const NOT_INSTALLED_POLL: Duration = Duration::from_secs(5);

/// How long a start may be refused quietly before each new reason is logged.
const QUIET_START: Duration = Duration::from_secs(3);

/// The channels a service task works with.
pub struct Wiring {
    pub io: ServiceIo,
    pub cmds: mpsc::Receiver<Cmd>,
    pub state: watch::Sender<ServiceState>,
    /// Readiness generation of the service this one depends on (None = not ready).
    pub dep: Option<watch::Receiver<Option<u64>>>,
    /// Our own readiness generation, for dependents.
    pub ready: watch::Sender<Option<u64>>,
    pub shutdown: watch::Receiver<Shutdown>,
}

/// Where the service is, decided afresh at each turn of [`run`]'s loop.
enum Next {
    /// The supervisor stops: the task returns.
    Done,
    /// Stopped by command until `start` or `restart`.
    Held,
    /// Its dependency is not ready.
    WaitingForDependency,
    /// After a failure: wait, then start.
    BackingOff(Duration),
    Starting,
}

/// One run of the service: its child (none for a remote service) since `started`.
struct Running {
    pid: Option<i32>,
    exit: oneshot::Receiver<Exit>,
    started: Instant,
    /// When it passed its readiness gate (None: never).
    ready_at: Option<Instant>,
    /// The readiness generation of the dependency it started against.
    dep_gen: Option<u64>,
    /// No child: an exit that never comes (its sender is kept for the run: a
    /// receiver whose sender is gone must not be polled again).
    _never: Option<oneshot::Sender<Exit>>,
}

/// Why the readiness gate did not open on one probe.
enum Gate {
    /// Not answering (yet): keep probing until start_timeout.
    NotYet(String),
    /// Answering, but our setup on it failed: restart.
    Setup(anyhow::Error),
}

/// The service task's own state across runs.
struct Machine<S: ServiceSpec> {
    spec: Arc<S>,
    w: Wiring,
    name: &'static str,
    /// False after `stop` until `start`/`restart`.
    want: bool,
    backoff: Backoff,
    /// Counts readiness: dependents restart when it changes.
    generation: u64,
    /// Wait this long before the next start.
    delay: Option<Duration>,
}

/// Runs the service until the supervisor shuts down.
pub async fn run<S: ServiceSpec>(spec: Arc<S>, w: Wiring) {
    let name = spec.name();
    let mut m = Machine {
        spec,
        w,
        name,
        want: true,
        backoff: Backoff::default(),
        generation: 0,
        delay: None,
    };
    loop {
        match m.next() {
            Next::Done => {
                m.w.state.send_modify(|s| s.set(Phase::Stopped, None));
                return;
            }
            Next::Held => m.held().await,
            Next::WaitingForDependency => m.wait_dependency().await,
            Next::BackingOff(d) => {
                if m.back_off(d).await && m.start_and_serve().await {
                    return;
                }
            }
            Next::Starting => {
                if m.start_and_serve().await {
                    return;
                }
            }
        }
    }
}

impl<S: ServiceSpec> Machine<S> {
    fn next(&mut self) -> Next {
        if *self.w.shutdown.borrow() != Shutdown::Running {
            return Next::Done;
        }
        let want = self.want;
        self.w.state.send_if_modified(|s| {
            let changed = s.held == want;
            s.held = !want;
            changed
        });
        if !self.want {
            return Next::Held;
        }
        if let Some(dep) = self.w.dep.as_ref() {
            if dep.borrow().is_none() {
                return Next::WaitingForDependency;
            }
        }
        match self.delay.take() {
            Some(d) => Next::BackingOff(d),
            None => Next::Starting,
        }
    }

    /// Stopped by command: answer commands until one starts it again.
    async fn held(&mut self) {
        let name = self.name;
        self.w.state.send_modify(|s| s.set(Phase::Stopped, None));
        match next_event(&mut self.w, None, None).await {
            Event::Cmd(Cmd::Start(r)) | Event::Cmd(Cmd::Restart(r)) => {
                let _ = r.send(format!("{name}: starting"));
                self.want = true;
                self.delay = None;
            }
            Event::Cmd(Cmd::Stop(r)) => {
                let _ = r.send(format!("{name}: already stopped"));
            }
            Event::Cmd(Cmd::Adopt(t)) => t.refuse(format!("{name} is stopped")),
            _ => {}
        }
    }

    async fn wait_dependency(&mut self) {
        self.w.state.send_modify(|s| s.set(Phase::Waiting, None));
        let Some(mut dep) = self.w.dep.clone() else {
            return;
        };
        let ev = tokio::select! {
            r = dep.wait_for(|g| g.is_some()) => { let _ = r; None }
            e = next_event(&mut self.w, None, None) => Some(e),
        };
        if let Some(e) = ev {
            self.idle_event(e);
        }
    }

    /// Waits `d` before a start; false when an event came first (handled).
    async fn back_off(&mut self, d: Duration) -> bool {
        let until = Instant::now() + d;
        self.w.state.send_modify(|s| {
            s.set(Phase::Backoff, None);
            s.next_start = Some(until);
        });
        tracing::warn!(service = self.name, "restarting in {:.0?}", d);
        let ev = tokio::select! {
            _ = sleep_until(until.into()) => None,
            e = next_event(&mut self.w, None, None) => Some(e),
        };
        self.w.state.send_modify(|s| s.next_start = None);
        match ev {
            Some(e) => {
                self.idle_event(e);
                false
            }
            None => true,
        }
    }

    /// An event while no child runs; the loop then decides again.
    fn idle_event(&mut self, e: Event) {
        let name = self.name;
        match e {
            Event::Cmd(Cmd::Stop(r)) => {
                self.want = false;
                let _ = r.send(format!("{name}: stopped"));
            }
            Event::Cmd(Cmd::Start(r)) | Event::Cmd(Cmd::Restart(r)) => {
                self.delay = None;
                let _ = r.send(format!("{name}: starting"));
            }
            Event::Cmd(Cmd::Adopt(t)) => t.refuse(format!("{name} is not running")),
            _ => {}
        }
    }

    /// One run: start, gate on readiness, serve until it ends, end it. True when the
    /// task must return (the supervisor stops).
    async fn start_and_serve(&mut self) -> bool {
        let Some(mut run) = self.start().await else {
            return false;
        };
        if let Err(end) = self.gate(&mut run).await {
            return self.finish(run, end).await;
        }
        self.generation += 1;
        run.ready_at = Some(Instant::now());
        let pid = run.pid;
        let port = self.spec.port();
        self.w.state.send_modify(|s| {
            s.set_running(Phase::Ready, pid);
            s.last_error = None;
            s.ready_since = Some(Instant::now());
            s.port = port;
        });
        let _ = self.w.ready.send(Some(self.generation));
        tracing::info!(
            service = self.name,
            pid,
            "ready after {:.2?}",
            run.started.elapsed()
        );
        let end = self.serve(&mut run).await;
        let _ = self.w.ready.send(None);
        self.finish(run, end).await
    }

    /// Prepares and spawns; None when there is nothing running (not installed, or
    /// the start failed: a back-off is set).
    async fn start(&mut self) -> Option<Running> {
        let name = self.name;
        let dep_gen = self.w.dep.as_ref().and_then(|d| *d.borrow());
        self.w.state.send_modify(|s| s.set(Phase::Starting, None));
        let child = match spawn(&*self.spec, &self.w.io).await {
            Ok(c) => c,
            Err(e) if e.is::<NotInstalled>() => {
                // Not a failure: nothing to run yet. Look again now and then (a
                // package may install it), or at once on `start`/`restart`.
                if self.w.state.borrow().phase != Phase::NotInstalled {
                    tracing::warn!(service = name, "{e:#}");
                }
                self.w.state.send_modify(|s| {
                    s.set(Phase::NotInstalled, None);
                    s.last_error = Some(format!("{e:#}"));
                });
                tokio::select! {
                    _ = sleep(NOT_INSTALLED_POLL) => {}
                    e = next_event(&mut self.w, None, None) => self.idle_event(e),
                }
                return None;
            }
            Err(e) => {
                tracing::error!(service = name, "cannot start: {e:#}");
                self.w.state.send_modify(|s| {
                    s.last_error = Some(format!("{e:#}"));
                    s.failures += 1;
                });
                self.delay = Some(self.backoff.next_delay());
                return None;
            }
        };
        let mut never = None;
        let (pid, exit) = match child {
            Some(Spawned { pid, exit }) => (Some(pid), exit),
            None => {
                let (tx, rx) = oneshot::channel();
                never = Some(tx);
                (None, rx)
            }
        };
        let started = Instant::now();
        self.w.state.send_modify(|s| {
            s.set_running(Phase::Starting, pid);
            s.started = Some(started);
        });
        match pid {
            Some(pid) => tracing::info!(service = name, pid, "started"),
            None => tracing::info!(service = name, "waiting for the remote server to answer"),
        }
        Some(Running {
            pid,
            exit,
            started,
            ready_at: None,
            dep_gen,
            _never: never,
        })
    }

    /// The readiness gate: probes until one passes and the setup after it is done,
    /// or the run ends first.
    async fn gate(&mut self, run: &mut Running) -> Result<(), End> {
        let name = self.name;
        let spec = self.spec.clone();
        let mut last_probe: Option<String> = None;
        let deadline = run.started + spec.start_timeout();
        loop {
            if Instant::now() >= deadline {
                let mut msg = format!(
                    "not ready after {}s (start_timeout)",
                    spec.start_timeout().as_secs()
                );
                if let Some(why) = self.w.state.borrow().last_error.as_deref() {
                    msg.push_str(&format!(": {why}"));
                }
                tracing::error!(service = name, "{msg}");
                self.w.state.send_modify(|s| s.last_error = Some(msg));
                return Err(End::NotReadyInTime);
            }
            let probe = async {
                match timeout(PROBE_TIMEOUT, spec.probe()).await {
                    Ok(Ok(())) => match spec.on_ready().await {
                        Ok(()) => Ok(()),
                        Err(e) => Err(Gate::Setup(e)),
                    },
                    Ok(Err(e)) => Err(Gate::NotYet(format!("{e:#}"))),
                    Err(_) => Err(Gate::NotYet(format!(
                        "no answer within {}s",
                        PROBE_TIMEOUT.as_secs()
                    ))),
                }
            };
            tokio::select! {
                r = probe => match r {
                    Ok(()) => return Ok(()),
                    Err(Gate::Setup(e)) => {
                        // The server answers but our setup on it failed: restart it.
                        self.w.state.send_modify(|s| s.last_error = Some(format!("{e:#}")));
                        tracing::error!(service = name, "setup after start failed: {e:#}");
                        return Err(End::SetupFailed);
                    }
                    Err(Gate::NotYet(why)) => {
                        // Shown in status; logged once per new reason after a grace
                        // (a starting server refuses for a moment, that is normal).
                        if run.started.elapsed() >= QUIET_START && last_probe.as_deref() != Some(why.as_str()) {
                            tracing::warn!(service = name, "not ready yet: {why}");
                            last_probe = Some(why.clone());
                        }
                        self.w.state.send_if_modified(|s| {
                            let new = Some(why);
                            let changed = s.last_error != new;
                            s.last_error = new;
                            changed
                        });
                    }
                },
                e = next_event(&mut self.w, Some(&mut run.exit), run.dep_gen) => {
                    if let Some(e) = absorb(name, e) {
                        return Err(e.into());
                    }
                    continue;
                }
            }
            tokio::select! {
                _ = sleep(spec.ready_poll()) => {}
                e = next_event(&mut self.w, Some(&mut run.exit), run.dep_gen) => if let Some(e) = absorb(name, e) {
                    return Err(e.into());
                },
            }
        }
    }

    /// Ready: health checks, commands and takeovers until the run ends.
    async fn serve(&mut self, run: &mut Running) -> End {
        let name = self.name;
        let health = self.spec.health();
        let mut failures = 0u32;
        loop {
            tokio::select! {
                _ = sleep(health.pause(failures)) => {}
                e = next_event(&mut self.w, Some(&mut run.exit), run.dep_gen) => {
                    match e {
                        Event::Cmd(Cmd::Start(r)) => {
                            let _ = r.send(format!("{name}: already running"));
                            continue;
                        }
                        Event::Cmd(Cmd::Adopt(t)) => {
                            if failures > 0 {
                                t.refuse(format!("{name} is failing its health checks"));
                            } else {
                                self.adopt(run, t).await;
                            }
                            continue;
                        }
                        e => return e.into(),
                    }
                }
            }
            let why = match timeout(health.timeout, self.spec.probe()).await {
                Ok(Ok(())) => {
                    if failures > 0 {
                        let pid = run.pid;
                        self.w.state.send_modify(|s| {
                            s.set_running(Phase::Ready, pid);
                            s.last_error = None;
                        });
                    }
                    failures = 0;
                    continue;
                }
                Ok(Err(e)) => format!("{e:#}"),
                Err(_) => format!("no answer within {:.1?}", health.timeout),
            };
            failures += 1;
            let most = health.failures;
            tracing::warn!(
                service = name,
                "health check failed ({failures}/{most}): {why}"
            );
            let pid = run.pid;
            self.w.state.send_modify(|s| {
                s.set_running(Phase::Unhealthy, pid);
                s.last_error = Some(format!("health check failed: {why}"));
            });
            if failures >= most {
                self.w.state.send_modify(|s| {
                    s.last_error = Some(format!("{most} health checks failed in a row: {why}"))
                });
                return End::Unhealthy;
            }
        }
    }

    /// A ready replacement child serves from now on (the proxy follows the port);
    /// the old one goes to the updater to drain.
    async fn adopt(&mut self, run: &mut Running, t: Takeover) {
        let name = self.name;
        let Some(old_pid) = run.pid else {
            t.refuse(format!("{name} has no child to replace"));
            return;
        };
        let Takeover { child, port, reply } = t;
        let old_exit = std::mem::replace(&mut run.exit, child.exit);
        let old = Spawned {
            pid: old_pid,
            exit: old_exit,
        };
        run.pid = Some(child.pid);
        run.started = Instant::now();
        self.spec.switch_port(port);
        let (pid, started) = (run.pid, run.started);
        self.w.state.send_modify(|s| {
            s.set_running(Phase::Ready, pid);
            s.started = Some(started);
            s.ready_since = Some(started);
            s.port = Some(port);
            s.swaps += 1;
        });
        tracing::info!(service = name, pid, port, "took over from pid {}", old.pid);
        if let Err(Ok(old)) = reply.send(Ok(old)) {
            // The updater is gone: stop the old child here.
            let mut exit = old.exit;
            let shutdown = self.w.shutdown.clone();
            stop_process(
                name,
                old.pid,
                &mut exit,
                StopHow::of(&*self.spec, false),
                shutdown,
                false,
            )
            .await;
        }
    }

    /// Ends one run after `end`; true when the service task must return.
    async fn finish(&mut self, run: Running, end: End) -> bool {
        let name = self.name;
        let _ = self.w.ready.send(None);
        let Running {
            pid,
            exit,
            started,
            ready_at,
            ..
        } = run;
        // A run that served for a while and then ended is an isolated failure, not
        // a crash loop: the next start comes after the first delay again.
        let served = ready_at.is_some_and(|t| t.elapsed() >= SERVED) || started.elapsed() >= STABLE;
        match end {
            End::Exited(exit) => {
                // Clear stragglers of its process group (e.g. backends of a killed postmaster).
                if let Some(pid) = pid {
                    signal(pid, self.spec.last_resort(), true);
                }
                if served {
                    self.backoff.reset();
                }
                tracing::error!(service = name, pid, "exited unexpectedly: {exit}");
                self.w.state.send_modify(|s| {
                    s.last_exit = Some(exit.to_string());
                    s.restarts += 1;
                    s.failures += 1;
                    s.set(Phase::Backoff, None);
                });
                self.delay = Some(self.backoff.next_delay());
                false
            }
            End::NotReadyInTime | End::SetupFailed | End::Unhealthy => {
                // Stop it and retry after a back-off. A hung server (failed health
                // checks) is not given a grace it cannot use.
                let hung = matches!(end, End::Unhealthy);
                if hung && served {
                    self.backoff.reset();
                }
                stop_child(&*self.spec, &mut self.w, pid, exit, false, hung).await;
                self.w.state.send_modify(|s| {
                    s.restarts += 1;
                    s.failures += 1;
                });
                self.delay = Some(self.backoff.next_delay());
                false
            }
            End::DependencyLost => {
                tracing::info!(
                    service = name,
                    "dependency restarted: stopping, will start again when it is ready"
                );
                stop_child(&*self.spec, &mut self.w, pid, exit, false, false).await;
                self.w.state.send_modify(|s| s.restarts += 1);
                false
            }
            End::Command(Cmd::Stop(r)) => {
                stop_child(&*self.spec, &mut self.w, pid, exit, false, false).await;
                self.want = false;
                let _ = r.send(format!("{name}: stopped"));
                false
            }
            End::Command(Cmd::Restart(r)) => {
                stop_child(&*self.spec, &mut self.w, pid, exit, false, false).await;
                self.w.state.send_modify(|s| s.restarts += 1);
                self.backoff.reset();
                let _ = r.send(format!("{name}: restarting"));
                false
            }
            End::Command(Cmd::Start(r)) => {
                let _ = r.send(format!("{name}: already running"));
                false
            }
            End::Command(Cmd::Adopt(t)) => {
                t.refuse(format!("{name} is not ready"));
                false
            }
            End::Shutdown(mode) => {
                stop_child(
                    &*self.spec,
                    &mut self.w,
                    pid,
                    exit,
                    mode == Shutdown::Now,
                    false,
                )
                .await;
                self.w.state.send_modify(|s| s.set(Phase::Stopped, None));
                true
            }
        }
    }
}

async fn spawn<S: ServiceSpec>(spec: &S, io: &ServiceIo) -> Result<Option<Spawned>> {
    match spec.prepare(io).await? {
        Some(cmd) => Ok(Some(io.reaper.spawn(cmd, io.log_fd()?).await?)),
        None => Ok(None),
    }
}
