//! The life of one supervised service: wait for its dependency, prepare, spawn,
//! gate on readiness, watch health, restart with back-off (never giving up), obey
//! control commands, and stop with its own signals and grace. What a service *is*
//! (its command, probes, stop signals) comes from a [`ServiceSpec`].
//!
//! A service may have no child at all (`prepare` returns `None`: an external
//! PostgreSQL): a run is then its probes alone, with the same readiness gate,
//! health checks, back-off and dependents; there is just nothing to signal.

use std::future::Future;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep, sleep_until, timeout};

use super::backoff::Backoff;
use super::reaper::{signal, ChildSpec, Exit, Reaper, Spawned};
use super::state::{Phase, ServiceState};

/// How often a ready service is probed, and how many failures in a row restart it.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
pub const HEALTH_FAILURES: u32 = 3;
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
const READY_POLL: Duration = Duration::from_millis(100);
/// After the last stop step (SIGKILL of the group), how long to wait for the reaper.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Between an HTTP service leaving the proxy's routes and its stop signal.
const LEAVE_ROUTES: Duration = Duration::from_millis(250);

/// How often a service whose program is missing looks for it again.
const NOT_INSTALLED_POLL: Duration = Duration::from_secs(5);

/// `prepare` error meaning: the program is not installed (not a crash).
#[derive(Debug)]
pub struct NotInstalled(pub String);

impl std::fmt::Display for NotInstalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for NotInstalled {}

/// One step of a stop: send `signal` (to the process group if `group`), wait `wait`.
#[derive(Debug, Clone, Copy)]
pub struct StopStep {
    pub signal: Signal,
    pub group: bool,
    pub wait: Duration,
}

/// What the supervisor as a whole is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    Running,
    /// Ordered, graceful stop.
    Graceful,
    /// A second signal: stop now.
    Now,
}

/// What a service is. Implemented by the Postgres and API services.
pub trait ServiceSpec: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Everything before a start (directories, initdb, config files); returns the
    /// command, or `None` when the service runs elsewhere (nothing to spawn).
    fn prepare(&self, io: &ServiceIo) -> impl Future<Output = Result<Option<ChildSpec>>> + Send;
    /// One readiness / health probe.
    fn probe(&self) -> impl Future<Output = Result<()>> + Send;
    /// Work after the first good probe and before dependents may start.
    fn on_ready(&self) -> impl Future<Output = Result<()>> + Send;
    fn start_timeout(&self) -> Duration;
    /// Pause between readiness probes while starting (a remote server is asked
    /// less often than a local child: its failed logins land in someone's log).
    fn ready_poll(&self) -> Duration {
        READY_POLL
    }
    /// Graceful stop steps; a SIGKILL of the group always follows.
    fn stop_plan(&self) -> Vec<StopStep>;
    /// Steps for "stop now" (second signal); a SIGKILL of the group always follows.
    fn stop_now(&self) -> Vec<StopStep>;
    /// The loopback port its child serves on, for an HTTP server (what the proxy
    /// routes to while the service is ready).
    fn port(&self) -> Option<u16> {
        None
    }
    /// A replacement child serves on `port` from now on (an update swap): later
    /// probes and restarts use that port.
    fn switch_port(&self, _port: u16) {}
}

/// What a service needs from the supervisor to run children.
#[derive(Clone)]
pub struct ServiceIo {
    pub reaper: Reaper,
    /// A write end of the service's log pipe.
    pub log: Arc<OwnedFd>,
}

impl ServiceIo {
    /// A new descriptor for a child's stdout/stderr.
    pub fn log_fd(&self) -> Result<OwnedFd> {
        Ok(self.log.try_clone()?)
    }
}

/// A control command for one service.
pub enum Cmd {
    Start(oneshot::Sender<String>),
    Stop(oneshot::Sender<String>),
    Restart(oneshot::Sender<String>),
    /// A replacement child, started and found ready by the updater, takes over.
    Adopt(Takeover),
}

/// A ready replacement child (started by `crate::update` through the same reaper)
/// offered to a running service. A ready service makes it its own child at once and
/// answers with the child it replaced, which the updater then drains and stops; a
/// service that is not ready gives the new child back with the reason.
pub struct Takeover {
    pub child: Spawned,
    pub port: u16,
    pub reply: oneshot::Sender<Result<Spawned, (Spawned, String)>>,
}

impl Takeover {
    fn refuse(self, why: String) {
        let _ = self.reply.send(Err((self.child, why)));
    }
}

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

enum Event {
    Exited(Exit),
    Cmd(Cmd),
    DepLost,
    Shutdown(Shutdown),
    Tick,
}

/// Runs the service until the supervisor shuts down.
pub async fn run<S: ServiceSpec>(spec: Arc<S>, mut w: Wiring) {
    let name = spec.name();
    let mut want = true;
    let mut backoff = Backoff::default();
    let mut generation = 0u64;
    let mut delay: Option<Duration> = None;
    loop {
        let stop = *w.shutdown.borrow();
        if stop != Shutdown::Running {
            w.state.send_modify(|s| s.set(Phase::Stopped, None));
            return;
        }
        w.state.send_if_modified(|s| {
            let changed = s.held == want;
            s.held = !want;
            changed
        });
        if !want {
            w.state.send_modify(|s| s.set(Phase::Stopped, None));
            match next_event(&mut w, None, None).await {
                Event::Cmd(Cmd::Start(r)) | Event::Cmd(Cmd::Restart(r)) => {
                    let _ = r.send(format!("{name}: starting"));
                    want = true;
                    delay = None;
                }
                Event::Cmd(Cmd::Stop(r)) => {
                    let _ = r.send(format!("{name}: already stopped"));
                }
                Event::Cmd(Cmd::Adopt(t)) => t.refuse(format!("{name} is stopped")),
                _ => {}
            }
            continue;
        }
        // Wait for the dependency to be ready.
        if let Some(dep) = w.dep.as_ref() {
            if dep.borrow().is_none() {
                w.state.send_modify(|s| s.set(Phase::Waiting, None));
                if let Some(e) = wait_dep(&mut w).await {
                    handle_idle(name, e, &mut want, &mut delay);
                }
                continue;
            }
        }
        if let Some(d) = delay.take() {
            let until = Instant::now() + d;
            w.state.send_modify(|s| {
                s.set(Phase::Backoff, None);
                s.next_start = Some(until);
            });
            tracing::warn!(service = name, "restarting in {:.0?}", d);
            let ev = tokio::select! {
                _ = sleep_until(until.into()) => None,
                e = next_event(&mut w, None, None) => Some(e),
            };
            w.state.send_modify(|s| s.next_start = None);
            if let Some(e) = ev {
                handle_idle(name, e, &mut want, &mut delay);
                continue;
            }
        }
        let dep_gen = w.dep.as_ref().and_then(|d| *d.borrow());

        w.state.send_modify(|s| s.set(Phase::Starting, None));
        let child = match start(&*spec, &w.io).await {
            Ok(c) => c,
            Err(e) if e.is::<NotInstalled>() => {
                // Not a failure: nothing to run yet. Look again now and then (a
                // package may install it), or at once on `start`/`restart`.
                if w.state.borrow().phase != Phase::NotInstalled {
                    tracing::warn!(service = name, "{e:#}");
                }
                w.state.send_modify(|s| {
                    s.set(Phase::NotInstalled, None);
                    s.last_error = Some(format!("{e:#}"));
                });
                tokio::select! {
                    _ = sleep(NOT_INSTALLED_POLL) => {}
                    e = next_event(&mut w, None, None) => handle_idle(name, e, &mut want, &mut delay),
                }
                continue;
            }
            Err(e) => {
                tracing::error!(service = name, "cannot start: {e:#}");
                w.state.send_modify(|s| {
                    s.last_error = Some(format!("{e:#}"));
                    s.failures += 1;
                });
                delay = Some(backoff.next_delay());
                continue;
            }
        };
        // No child (a remote service): an exit that never comes (its sender is
        // kept for the run: a receiver whose sender is gone must not be polled again).
        let mut _never: Option<oneshot::Sender<Exit>> = None;
        let (mut pid, mut exit_rx) = match child {
            Some(Spawned { pid, exit }) => (Some(pid), exit),
            None => {
                let (tx, rx) = oneshot::channel();
                _never = Some(tx);
                (None, rx)
            }
        };
        let mut started = Instant::now();
        w.state.send_modify(|s| {
            s.set_running(Phase::Starting, pid);
            s.started = Some(started);
        });
        match pid {
            Some(pid) => tracing::info!(service = name, pid, "started"),
            None => tracing::info!(service = name, "waiting for the remote server to answer"),
        }

        // Readiness gate.
        let mut setup_failed = false;
        let mut last_probe: Option<String> = None;
        let deadline = started + spec.start_timeout();
        let outcome = loop {
            if Instant::now() >= deadline {
                break Err(Event::Tick);
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
                    Ok(()) => break Ok(()),
                    Err(Gate::Setup(e)) => {
                        // The server answers but our setup on it failed: restart it.
                        w.state.send_modify(|s| s.last_error = Some(format!("{e:#}")));
                        tracing::error!(service = name, "setup after start failed: {e:#}");
                        setup_failed = true;
                        break Err(Event::Tick);
                    }
                    Err(Gate::NotYet(why)) => {
                        // Shown in status; logged once per new reason after a grace
                        // (a starting server refuses for a moment, that is normal).
                        if started.elapsed() >= QUIET_START && last_probe.as_deref() != Some(why.as_str()) {
                            tracing::warn!(service = name, "not ready yet: {why}");
                            last_probe = Some(why.clone());
                        }
                        w.state.send_if_modified(|s| {
                            let new = Some(why);
                            let changed = s.last_error != new;
                            s.last_error = new;
                            changed
                        });
                    }
                },
                e = next_event(&mut w, Some(&mut exit_rx), dep_gen) => match absorb(name, e) {
                    Some(e) => break Err(e),
                    None => continue,
                },
            }
            tokio::select! {
                _ = sleep(spec.ready_poll()) => {}
                e = next_event(&mut w, Some(&mut exit_rx), dep_gen) => if let Some(e) = absorb(name, e) {
                    break Err(e);
                },
            }
        };
        if let Err(ev) = outcome {
            let timed_out = matches!(ev, Event::Tick);
            if timed_out && !setup_failed {
                let mut msg = format!(
                    "not ready after {}s (start_timeout)",
                    spec.start_timeout().as_secs()
                );
                if let Some(why) = w.state.borrow().last_error.as_deref() {
                    msg.push_str(&format!(": {why}"));
                }
                tracing::error!(service = name, "{msg}");
                w.state.send_modify(|s| s.last_error = Some(msg));
            }
            if finish(
                &*spec,
                &mut w,
                pid,
                exit_rx,
                ev,
                &mut want,
                &mut delay,
                &mut backoff,
                started,
            )
            .await
            {
                return;
            }
            continue;
        }

        generation += 1;
        w.state.send_modify(|s| {
            s.set_running(Phase::Ready, pid);
            s.last_error = None;
            s.ready_since = Some(Instant::now());
            s.port = spec.port();
        });
        let _ = w.ready.send(Some(generation));
        tracing::info!(service = name, pid, "ready after {:.2?}", started.elapsed());

        // Watch its health until something ends this run.
        let mut failures = 0u32;
        let ev = loop {
            tokio::select! {
                _ = sleep(HEALTH_INTERVAL) => {}
                e = next_event(&mut w, Some(&mut exit_rx), dep_gen) => {
                    match e {
                        Event::Cmd(Cmd::Start(r)) => {
                            let _ = r.send(format!("{name}: already running"));
                            continue;
                        }
                        Event::Cmd(Cmd::Adopt(t)) => {
                            if failures > 0 {
                                t.refuse(format!("{name} is failing its health checks"));
                                continue;
                            }
                            // The new child is ready: it serves from now on (the proxy
                            // follows the port); the old one goes to the updater to drain.
                            let Some(old_pid) = pid else {
                                t.refuse(format!("{name} has no child to replace"));
                                continue;
                            };
                            let old = Spawned { pid: old_pid, exit: exit_rx };
                            pid = Some(t.child.pid);
                            exit_rx = t.child.exit;
                            started = Instant::now();
                            spec.switch_port(t.port);
                            w.state.send_modify(|s| {
                                s.set_running(Phase::Ready, pid);
                                s.started = Some(started);
                                s.ready_since = Some(started);
                                s.port = Some(t.port);
                                s.swaps += 1;
                            });
                            tracing::info!(service = name, pid, port = t.port, "took over from pid {}", old.pid);
                            if let Err(Ok(old)) = t.reply.send(Ok(old)) {
                                // The updater is gone: stop the old child here.
                                let mut exit = old.exit;
                                let shutdown = w.shutdown.clone();
                                stop_process(name, old.pid, &mut exit, spec.stop_plan(), spec.stop_now(), shutdown, false).await;
                            }
                            continue;
                        }
                        e => break e,
                    }
                }
            }
            let why = match timeout(PROBE_TIMEOUT, spec.probe()).await {
                Ok(Ok(())) => {
                    if failures > 0 {
                        w.state.send_modify(|s| {
                            s.set_running(Phase::Ready, pid);
                            s.last_error = None;
                        });
                    }
                    failures = 0;
                    continue;
                }
                Ok(Err(e)) => format!("{e:#}"),
                Err(_) => format!("no answer within {}s", PROBE_TIMEOUT.as_secs()),
            };
            failures += 1;
            tracing::warn!(
                service = name,
                "health check failed ({failures}/{HEALTH_FAILURES}): {why}"
            );
            w.state.send_modify(|s| {
                s.set_running(Phase::Unhealthy, pid);
                s.last_error = Some(format!("health check failed: {why}"));
            });
            if failures >= HEALTH_FAILURES {
                w.state.send_modify(|s| {
                    s.last_error = Some(format!(
                        "{HEALTH_FAILURES} health checks failed in a row: {why}"
                    ))
                });
                break Event::Tick;
            }
        };
        let _ = w.ready.send(None);
        if finish(
            &*spec,
            &mut w,
            pid,
            exit_rx,
            ev,
            &mut want,
            &mut delay,
            &mut backoff,
            started,
        )
        .await
        {
            return;
        }
    }
}

/// Why the readiness gate did not open on one probe.
enum Gate {
    /// Not answering (yet): keep probing until start_timeout.
    NotYet(String),
    /// Answering, but our setup on it failed: restart.
    Setup(anyhow::Error),
}

/// How long a start may be refused quietly before each new reason is logged.
const QUIET_START: Duration = Duration::from_secs(3);

async fn start<S: ServiceSpec>(spec: &S, io: &ServiceIo) -> Result<Option<Spawned>> {
    match spec.prepare(io).await? {
        Some(cmd) => Ok(Some(io.reaper.spawn(cmd, io.log_fd()?).await?)),
        None => Ok(None),
    }
}

/// Ends one run of the child after `ev`; returns true when the service task must return.
#[allow(clippy::too_many_arguments)]
async fn finish<S: ServiceSpec>(
    spec: &S,
    w: &mut Wiring,
    pid: Option<i32>,
    exit_rx: oneshot::Receiver<Exit>,
    ev: Event,
    want: &mut bool,
    delay: &mut Option<Duration>,
    backoff: &mut Backoff,
    started: Instant,
) -> bool {
    let name = spec.name();
    let _ = w.ready.send(None);
    match ev {
        Event::Exited(exit) => {
            // Clear stragglers of its process group (e.g. backends of a killed postmaster).
            if let Some(pid) = pid {
                signal(pid, Signal::SIGKILL, true);
            }
            let stable = started.elapsed() >= super::backoff::STABLE;
            if stable {
                backoff.reset();
            }
            tracing::error!(service = name, pid, "exited unexpectedly: {exit}");
            w.state.send_modify(|s| {
                s.last_exit = Some(exit.to_string());
                s.restarts += 1;
                s.failures += 1;
                s.set(Phase::Backoff, None);
            });
            *delay = Some(backoff.next_delay());
            false
        }
        Event::Tick => {
            // Not ready in time, or unhealthy: stop it and retry after a back-off.
            stop_child(spec, w, pid, exit_rx, false).await;
            w.state.send_modify(|s| {
                s.restarts += 1;
                s.failures += 1;
            });
            *delay = Some(backoff.next_delay());
            false
        }
        Event::DepLost => {
            tracing::info!(
                service = name,
                "dependency restarted: stopping, will start again when it is ready"
            );
            stop_child(spec, w, pid, exit_rx, false).await;
            w.state.send_modify(|s| s.restarts += 1);
            false
        }
        Event::Cmd(Cmd::Stop(r)) => {
            stop_child(spec, w, pid, exit_rx, false).await;
            *want = false;
            let _ = r.send(format!("{name}: stopped"));
            false
        }
        Event::Cmd(Cmd::Restart(r)) => {
            stop_child(spec, w, pid, exit_rx, false).await;
            w.state.send_modify(|s| s.restarts += 1);
            backoff.reset();
            let _ = r.send(format!("{name}: restarting"));
            false
        }
        Event::Cmd(Cmd::Start(r)) => {
            let _ = r.send(format!("{name}: already running"));
            false
        }
        Event::Cmd(Cmd::Adopt(t)) => {
            t.refuse(format!("{name} is not ready"));
            false
        }
        Event::Shutdown(mode) => {
            stop_child(spec, w, pid, exit_rx, mode == Shutdown::Now).await;
            w.state.send_modify(|s| s.set(Phase::Stopped, None));
            true
        }
    }
}

/// Handles an event that arrived while no child runs; the caller loops and re-reads
/// the shutdown state.
fn handle_idle(name: &str, e: Event, want: &mut bool, delay: &mut Option<Duration>) {
    match e {
        Event::Cmd(Cmd::Stop(r)) => {
            *want = false;
            let _ = r.send(format!("{name}: stopped"));
        }
        Event::Cmd(Cmd::Start(r)) | Event::Cmd(Cmd::Restart(r)) => {
            *delay = None;
            let _ = r.send(format!("{name}: starting"));
        }
        Event::Cmd(Cmd::Adopt(t)) => t.refuse(format!("{name} is not running")),
        _ => {}
    }
}

/// Commands that do not end a start in progress are answered here (None); the
/// rest come back to the caller.
fn absorb(name: &str, e: Event) -> Option<Event> {
    match e {
        Event::Cmd(Cmd::Start(r)) => {
            let _ = r.send(format!("{name}: starting"));
            None
        }
        Event::Cmd(Cmd::Adopt(t)) => {
            t.refuse(format!("{name} is starting, not ready yet"));
            None
        }
        e => Some(e),
    }
}

async fn wait_dep(w: &mut Wiring) -> Option<Event> {
    let mut dep = w.dep.clone()?;
    tokio::select! {
        r = dep.wait_for(|g| g.is_some()) => { let _ = r; None }
        e = next_event(w, None, None) => Some(e),
    }
}

/// The next thing that happens to a service: its child's exit, a command, the loss
/// of its dependency (`dep_gen` is the generation it started against), or shutdown.
async fn next_event(
    w: &mut Wiring,
    exit: Option<&mut oneshot::Receiver<Exit>>,
    dep_gen: Option<u64>,
) -> Event {
    let mut dep = w.dep.clone();
    let dep_lost = async {
        match (dep.as_mut(), dep_gen) {
            (Some(d), Some(g)) => {
                let _ = d.wait_for(|now| *now != Some(g)).await;
            }
            _ => std::future::pending::<()>().await,
        }
    };
    let exited = async {
        match exit {
            Some(rx) => match rx.await {
                Ok(e) => e,
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    };
    let mut shutdown = w.shutdown.clone();
    tokio::select! {
        biased;
        e = exited => Event::Exited(e),
        r = shutdown.wait_for(|s| *s != Shutdown::Running) => {
            Event::Shutdown(r.map(|s| *s).unwrap_or(Shutdown::Now))
        }
        Some(c) = w.cmds.recv() => Event::Cmd(c),
        _ = dep_lost => Event::DepLost,
    }
}

/// Stops the child with the spec's plan and records it in the service state.
async fn stop_child<S: ServiceSpec>(
    spec: &S,
    w: &mut Wiring,
    pid: Option<i32>,
    mut exit_rx: oneshot::Receiver<Exit>,
    now: bool,
) {
    let name = spec.name();
    let Some(pid) = pid else {
        // Nothing of ours runs: the run simply ends.
        w.state.send_modify(|s| s.set(Phase::Stopped, None));
        return;
    };
    let serving = w.state.borrow().ready() && spec.port().is_some();
    w.state
        .send_modify(|s| s.set_running(Phase::Stopping, Some(pid)));
    if serving && !now {
        // Out of the proxy's routing table first: a request that picked this server
        // just before reaches it before it stops listening.
        sleep(LEAVE_ROUTES).await;
    }
    let exit = stop_process(
        name,
        pid,
        &mut exit_rx,
        spec.stop_plan(),
        spec.stop_now(),
        w.shutdown.clone(),
        now,
    )
    .await;
    w.state.send_modify(|s| {
        if let Some(e) = exit {
            s.last_exit = Some(e.to_string());
        }
        s.set(Phase::Stopped, None);
    });
}

/// Stops one child: the `plan` steps (`now_plan` when `now`, or as soon as a "stop
/// now" arrives on `shutdown`), always ending with SIGKILL of its process group.
/// Returns how it exited (None: not even after SIGKILL).
pub async fn stop_process(
    name: &str,
    pid: i32,
    exit_rx: &mut oneshot::Receiver<Exit>,
    plan: Vec<StopStep>,
    now_plan: Vec<StopStep>,
    mut shutdown: watch::Receiver<Shutdown>,
    now: bool,
) -> Option<Exit> {
    let mut steps = if now { now_plan.clone() } else { plan };
    let mut hurried = now;
    let mut i = 0;
    let exit = loop {
        let Some(step) = steps.get(i).copied() else {
            break None;
        };
        i += 1;
        tracing::info!(service = name, pid, "sending {}", step.signal);
        signal(pid, step.signal, step.group);
        let hurry = async {
            if hurried {
                std::future::pending::<()>().await
            }
            let _ = shutdown.wait_for(|s| *s == Shutdown::Now).await;
        };
        tokio::select! {
            r = &mut *exit_rx => break r.ok(),
            _ = sleep(step.wait) => {
                tracing::warn!(service = name, pid, "still running {:.0?} after {}", step.wait, step.signal);
            }
            _ = hurry => {
                hurried = true;
                steps = now_plan.clone();
                i = 0;
            }
        }
    };
    let exit = match exit {
        Some(e) => Some(e),
        None => {
            tracing::warn!(service = name, pid, "sending SIGKILL to the process group");
            signal(pid, Signal::SIGKILL, true);
            timeout(KILL_WAIT, &mut *exit_rx)
                .await
                .ok()
                .and_then(|r| r.ok())
        }
    };
    // Whatever the main process left in its group goes too.
    signal(pid, Signal::SIGKILL, true);
    match exit {
        Some(e) => tracing::info!(service = name, pid, "stopped ({e})"),
        None => tracing::error!(service = name, pid, "did not exit even after SIGKILL"),
    }
    exit
}
