//! Stopping one child: its service's stop steps (signal, grace) in order, switched
//! to the "stop now" steps when a second signal arrives, always ending with the
//! service's last resort (SIGKILL of its process group; PostgreSQL's immediate
//! shutdown, as PostgreSQL is never SIGKILLed by us); what it exited with is
//! reported.
//!
//! Every signal but SIGKILL is followed by SIGCONT (as systemd does): a stopped
//! process acts on it instead of ignoring the whole grace. A child that failed its
//! health checks ("hung") and may be killed is not given a grace it cannot use:
//! stopped (`T` in /proc) or using no CPU for [`IDLE_WINDOW`], it gets the last
//! resort at once, and its grace is at most [`HUNG_GRACE`].

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::sync::{oneshot, watch};
use tokio::time::{sleep, timeout};

use super::reaper::{inspect, signal, Exit};
use super::service::Wiring;
use super::spec::{ServiceSpec, Shutdown, StopStep};
use super::state::Phase;

/// Between an HTTP service leaving the proxy's routes and its stop signal.
const LEAVE_ROUTES: Duration = Duration::from_millis(250);

/// After the last stop step (the last resort), how long to wait for the reaper.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// The longest grace of a hung child: it failed its health checks, so it serves
/// nothing a drain could finish.
pub const HUNG_GRACE: Duration = Duration::from_secs(5);

/// A hung child that used no CPU this long after its stop signal is not stopping.
pub const IDLE_WINDOW: Duration = Duration::from_secs(1);

/// How often a hung child's state and CPU are looked at during its grace.
const HUNG_POLL: Duration = Duration::from_millis(100);

/// How one child is stopped.
#[derive(Debug, Clone)]
pub struct StopHow {
    pub plan: Vec<StopStep>,
    pub now_plan: Vec<StopStep>,
    /// The strongest signal we send (to the whole group), after the steps.
    pub last_resort: Signal,
    /// It failed its health checks and may be killed as soon as it is seen stuck.
    pub hung: bool,
}

impl StopHow {
    /// The spec's stop; `hung` when the run ended on failed health checks.
    pub fn of<S: ServiceSpec>(spec: &S, hung: bool) -> StopHow {
        StopHow {
            plan: spec.stop_plan(),
            now_plan: spec.stop_now(),
            last_resort: spec.last_resort(),
            hung: hung && spec.kill_when_hung(),
        }
    }
}

/// Sends one stop step's signal, then SIGCONT so a stopped process acts on it.
fn send(name: &str, pid: i32, sig: Signal, group: bool) {
    tracing::info!(service = name, pid, "sending {sig}");
    signal(pid, sig, group);
    if sig != Signal::SIGKILL {
        signal(pid, Signal::SIGCONT, group);
    }
}

/// Resolves when a hung child is seen stuck (stopped, or no CPU for
/// [`IDLE_WINDOW`]), with what was seen; never when it cannot be inspected.
async fn stuck(pid: i32) -> String {
    let mut idle_since: Option<(Instant, u64)> = None;
    loop {
        match inspect(pid) {
            Some(i) if i.stopped() => return format!("it is stopped (state {})", i.state),
            Some(i) => match idle_since {
                Some((t, ticks)) if i.cpu_ticks == ticks => {
                    if t.elapsed() >= IDLE_WINDOW {
                        return format!("it used no CPU for {IDLE_WINDOW:.0?}");
                    }
                }
                _ => idle_since = Some((Instant::now(), i.cpu_ticks)),
            },
            None => {}
        }
        sleep(HUNG_POLL).await;
    }
}

/// Stops one child: the `how.plan` steps (`how.now_plan` when `now`, or as soon as
/// a "stop now" arrives on `shutdown`), always ending with `how.last_resort` to its
/// process group. Returns how it exited (None: not even after the last resort).
pub async fn stop_process(
    name: &str,
    pid: i32,
    exit_rx: &mut oneshot::Receiver<Exit>,
    how: StopHow,
    mut shutdown: watch::Receiver<Shutdown>,
    now: bool,
) -> Option<Exit> {
    let mut steps = if now {
        how.now_plan.clone()
    } else {
        how.plan.clone()
    };
    let mut hurried = now;
    let mut i = 0;
    let mut stuck_now = None;
    if how.hung {
        // Stopped already: a SIGTERM would only wake it to a grace it cannot use.
        if let Some(info) = inspect(pid).filter(|i| i.stopped()) {
            stuck_now = Some(format!("it is stopped (state {})", info.state));
            steps.clear();
        }
    }
    let exit = loop {
        let Some(mut step) = steps.get(i).copied() else {
            break None;
        };
        i += 1;
        if how.hung {
            step.wait = step.wait.min(HUNG_GRACE);
        }
        send(name, pid, step.signal, step.group);
        let hurry = async {
            if hurried {
                std::future::pending::<()>().await
            }
            let _ = shutdown.wait_for(|s| *s == Shutdown::Now).await;
        };
        let watch_stuck = async {
            if !how.hung {
                std::future::pending::<()>().await
            }
            stuck(pid).await
        };
        tokio::select! {
            r = &mut *exit_rx => break r.ok(),
            _ = sleep(step.wait) => {
                tracing::warn!(service = name, pid, "still running {:.0?} after {}", step.wait, step.signal);
            }
            why = watch_stuck => {
                stuck_now = Some(why);
                break None;
            }
            _ = hurry => {
                hurried = true;
                steps = how.now_plan.clone();
                i = 0;
            }
        }
    };
    let last = how.last_resort;
    let exit = match exit {
        Some(e) => Some(e),
        None => {
            match stuck_now {
                Some(why) => tracing::warn!(
                    service = name,
                    pid,
                    "hung: {why}; sending {last} to the process group at once"
                ),
                None => tracing::warn!(service = name, pid, "sending {last} to the process group"),
            }
            send_last(pid, last);
            timeout(KILL_WAIT, &mut *exit_rx)
                .await
                .ok()
                .and_then(|r| r.ok())
        }
    };
    // Whatever the main process left in its group goes too.
    send_last(pid, last);
    match exit {
        Some(e) => tracing::info!(service = name, pid, "stopped ({e})"),
        None => tracing::error!(
            service = name,
            pid,
            "did not exit even after {last}{}",
            if last == Signal::SIGKILL {
                ""
            } else {
                " (it is never sent SIGKILL: see the README, \"Self-healing\")"
            }
        ),
    }
    exit
}

/// The last resort to a child's group (and SIGCONT for anything but SIGKILL).
fn send_last(pid: i32, sig: Signal) {
    signal(pid, sig, true);
    if sig != Signal::SIGKILL {
        signal(pid, Signal::SIGCONT, true);
    }
}

/// Stops the child with the spec's plan and records it in the service state.
pub(super) async fn stop_child<S: ServiceSpec>(
    spec: &S,
    w: &mut Wiring,
    pid: Option<i32>,
    mut exit_rx: oneshot::Receiver<Exit>,
    now: bool,
    hung: bool,
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
    if serving && !now && !hung {
        // Out of the proxy's routing table first: a request that picked this server
        // just before reaches it before it stops listening.
        sleep(LEAVE_ROUTES).await;
    }
    let exit = stop_process(
        name,
        pid,
        &mut exit_rx,
        StopHow::of(spec, hung),
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

#[cfg(test)]
mod tests {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::Command;

    use super::*;

    /// A child in its own process group whose exit arrives on a channel (a thread
    /// waits for it: the test process has no reaper).
    fn child(script: &str) -> (i32, oneshot::Receiver<Exit>) {
        let mut c = Command::new("/bin/sh")
            .args(["-c", script])
            .process_group(0)
            .spawn()
            .expect("spawn sh");
        let pid = c.id() as i32;
        let (tx, rx) = oneshot::channel();
        std::thread::spawn(move || {
            if let Ok(st) = c.wait() {
                let e = match st.signal() {
                    Some(s) => Exit::Signal(s),
                    None => Exit::Code(st.code().unwrap_or(-1)),
                };
                let _ = tx.send(e);
            }
        });
        // Let the shell exec its program and set its traps.
        std::thread::sleep(Duration::from_millis(300));
        (pid, rx)
    }

    fn how(hung: bool, grace: Duration) -> StopHow {
        StopHow {
            plan: vec![StopStep {
                signal: Signal::SIGTERM,
                group: false,
                wait: grace,
            }],
            now_plan: vec![],
            last_resort: Signal::SIGKILL,
            hung,
        }
    }

    async fn stop(
        pid: i32,
        mut rx: oneshot::Receiver<Exit>,
        how: StopHow,
    ) -> (Option<Exit>, Duration) {
        let (_tx, shutdown) = watch::channel(Shutdown::Running);
        let t = Instant::now();
        let e = stop_process("test", pid, &mut rx, how, shutdown, false).await;
        (e, t.elapsed())
    }

    #[tokio::test]
    async fn a_hung_child_that_is_stopped_is_killed_at_once() {
        let (pid, rx) = child("exec sleep 1000");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGSTOP).expect("SIGSTOP");
        std::thread::sleep(Duration::from_millis(100));
        let (e, took) = stop(pid, rx, how(true, Duration::from_secs(30))).await;
        assert_eq!(e, Some(Exit::Signal(Signal::SIGKILL as i32)));
        assert!(took < Duration::from_secs(3), "took {took:?}");
    }

    #[tokio::test]
    async fn a_hung_child_that_ignores_sigterm_and_idles_is_killed_after_the_idle_window() {
        let (pid, rx) = child("trap '' TERM; exec sleep 1000");
        let (e, took) = stop(pid, rx, how(true, Duration::from_secs(30))).await;
        assert_eq!(e, Some(Exit::Signal(Signal::SIGKILL as i32)));
        assert!(took >= IDLE_WINDOW, "took {took:?}");
        assert!(took < HUNG_GRACE, "took {took:?}");
    }

    #[tokio::test]
    async fn a_hung_child_that_stays_busy_gets_at_most_the_hung_grace() {
        let (pid, rx) = child("trap '' TERM; while :; do :; done");
        let (e, took) = stop(pid, rx, how(true, Duration::from_secs(30))).await;
        assert_eq!(e, Some(Exit::Signal(Signal::SIGKILL as i32)));
        assert!(took >= HUNG_GRACE, "took {took:?}");
        assert!(took < HUNG_GRACE + Duration::from_secs(3), "took {took:?}");
    }

    #[tokio::test]
    async fn a_stopped_child_acts_on_its_stop_signal() {
        // Not hung (a shutdown): SIGCONT follows SIGTERM, so it ends by SIGTERM at
        // once instead of sleeping through its grace.
        let (pid, rx) = child("exec sleep 1000");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGSTOP).expect("SIGSTOP");
        std::thread::sleep(Duration::from_millis(100));
        let (e, took) = stop(pid, rx, how(false, Duration::from_secs(30))).await;
        assert_eq!(e, Some(Exit::Signal(Signal::SIGTERM as i32)));
        assert!(took < Duration::from_secs(3), "took {took:?}");
    }

    #[tokio::test]
    async fn the_last_resort_of_a_service_that_is_never_killed_is_its_own() {
        // PostgreSQL's case: after the steps, SIGQUIT (its immediate shutdown),
        // never SIGKILL.
        let (pid, rx) = child("trap 'exit 3' QUIT; trap '' TERM; while :; do sleep 0.05; done");
        let mut h = how(false, Duration::from_millis(300));
        h.last_resort = Signal::SIGQUIT;
        let (e, _) = stop(pid, rx, h).await;
        assert_eq!(e, Some(Exit::Code(3)));
    }
}
