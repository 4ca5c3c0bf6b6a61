//! What can happen to a running service ([`Event`]: its child exits, a command,
//! its dependency restarts, the supervisor stops), how one run ends ([`End`]), and
//! the one place that waits for the next event ([`next_event`]).

use tokio::sync::oneshot;

use super::reaper::Exit;
use super::service::Wiring;
use super::spec::{Cmd, Shutdown};

/// Something that happened to a service from outside.
pub enum Event {
    Exited(Exit),
    Cmd(Cmd),
    DepLost,
    Shutdown(Shutdown),
}

/// How one run of a service ends.
pub enum End {
    /// Its child exited on its own.
    Exited(Exit),
    /// Not ready within `start_timeout`.
    NotReadyInTime,
    /// It answered, but the setup after the first good probe failed.
    SetupFailed,
    /// `HEALTH_FAILURES` health checks failed in a row.
    Unhealthy,
    /// The service it depends on restarted.
    DependencyLost,
    /// `stop` or `restart`.
    Command(Cmd),
    /// The supervisor stops.
    Shutdown(Shutdown),
}

impl From<Event> for End {
    fn from(e: Event) -> End {
        match e {
            Event::Exited(x) => End::Exited(x),
            Event::Cmd(c) => End::Command(c),
            Event::DepLost => End::DependencyLost,
            Event::Shutdown(m) => End::Shutdown(m),
        }
    }
}

/// Commands that do not end a start in progress are answered here (None); the
/// rest come back to the caller.
pub fn absorb(name: &str, e: Event) -> Option<Event> {
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

/// The next thing that happens to a service: its child's exit, a command, the loss
/// of its dependency (`dep_gen` is the generation it started against), or shutdown.
pub async fn next_event(
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
