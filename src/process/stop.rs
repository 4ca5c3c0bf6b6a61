//! Stopping one child: its service's stop steps (signal, grace) in order, switched
//! to the "stop now" steps when a second signal arrives, always ending with SIGKILL
//! of its process group; what it exited with is reported.

use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::{oneshot, watch};
use tokio::time::{sleep, timeout};

use super::reaper::{signal, Exit};
use super::service::Wiring;
use super::spec::{ServiceSpec, Shutdown, StopStep};
use super::state::Phase;

/// Between an HTTP service leaving the proxy's routes and its stop signal.
const LEAVE_ROUTES: Duration = Duration::from_millis(250);

/// After the last stop step (SIGKILL of the group), how long to wait for the reaper.
const KILL_WAIT: Duration = Duration::from_secs(5);

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

/// Stops the child with the spec's plan and records it in the service state.
pub(super) async fn stop_child<S: ServiceSpec>(
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
