//! What a supervised service is, as the service loop sees it: the [`ServiceSpec`]
//! a service implements (prepare, probe, stop plan…), the I/O it gets from the
//! supervisor ([`ServiceIo`]), the commands it obeys ([`Cmd`], [`Takeover`]) and the
//! supervisor-wide [`Shutdown`] mode.

use std::future::Future;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use nix::sys::signal::Signal;
use tokio::sync::oneshot;

use super::reaper::{ChildSpec, Reaper, Spawned};

/// Pause between readiness probes of a local child while it starts.
pub const READY_POLL: Duration = Duration::from_millis(100);

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

/// The health checks of a ready service: a probe every `interval`, each given
/// `timeout`; `failures` failed in a row end the run. After a failure the next
/// probe comes after [`RECHECK`] (or `interval`, if shorter), so a hung server is
/// declared failed in about `interval + failures × timeout + (failures − 1) × RECHECK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    pub interval: Duration,
    pub timeout: Duration,
    pub failures: u32,
}

/// The pause before the probe after a failed one.
pub const RECHECK: Duration = Duration::from_secs(1);

impl Health {
    /// The pause before the next probe, after `failures` failed in a row.
    pub fn pause(&self, failures: u32) -> Duration {
        if failures == 0 {
            self.interval
        } else {
            RECHECK.min(self.interval)
        }
    }

    /// The longest a hung server stays in service before its run ends.
    pub fn budget(&self) -> Duration {
        let f = self.failures.max(1);
        self.interval + self.timeout * f + self.pause(1) * (f - 1)
    }
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
    /// Its health checks once ready.
    fn health(&self) -> Health;
    /// Graceful stop steps; the last resort to the group always follows.
    fn stop_plan(&self) -> Vec<StopStep>;
    /// Steps for "stop now" (second signal); the last resort to the group always follows.
    fn stop_now(&self) -> Vec<StopStep>;
    /// The strongest signal it is ever sent, to its whole process group, after the
    /// stop steps and to the stragglers of a run.
    fn last_resort(&self) -> Signal {
        Signal::SIGKILL
    }
    /// After failed health checks, may it get the last resort as soon as it is
    /// seen stuck (stopped, or no CPU), instead of its whole grace?
    fn kill_when_hung(&self) -> bool {
        false
    }
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
    pub(super) fn refuse(self, why: String) {
        let _ = self.reply.send(Err((self.child, why)));
    }
}
