//! What a service is doing right now, and the status report built from it (the
//! shape `koprogo status --json` prints). Service tasks write their state into a
//! watch channel; status, sd_notify and later the proxy only read it.

use std::time::Instant;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Not running, by command or during shutdown.
    Stopped,
    /// Waiting for the service it depends on.
    Waiting,
    /// Spawned, not yet ready.
    Starting,
    Ready,
    /// Ready before, failing health checks now.
    Unhealthy,
    /// Failed; waiting before the next attempt.
    Backoff,
    /// Its program is not installed (the appliance runs without it).
    #[serde(rename = "not-installed")]
    NotInstalled,
    Stopping,
}

impl Phase {
    /// The name status and STATUS= show (the same as in `status --json`).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Stopped => "stopped",
            Phase::Waiting => "waiting",
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Unhealthy => "unhealthy",
            Phase::Backoff => "backoff",
            Phase::NotInstalled => "not-installed",
            Phase::Stopping => "stopping",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Live state of one service, owned by its task.
#[derive(Debug, Clone)]
pub struct ServiceState {
    pub name: &'static str,
    pub phase: Phase,
    pub pid: Option<i32>,
    pub restarts: u64,
    /// Failed starts and crashes since boot (what back-off counts).
    pub failures: u64,
    pub started: Option<Instant>,
    pub ready_since: Option<Instant>,
    pub next_start: Option<Instant>,
    pub last_exit: Option<String>,
    pub last_error: Option<String>,
    /// Stopped by the operator (`koprogo stop`): stays down until `start`.
    pub held: bool,
    /// The loopback port the running child serves on (HTTP services; what the
    /// proxy routes to while the service is ready).
    pub port: Option<u16>,
    /// Children that took over from a running one (application update swaps).
    pub swaps: u64,
}

impl ServiceState {
    pub fn new(name: &'static str) -> ServiceState {
        ServiceState {
            name,
            phase: Phase::Stopped,
            pid: None,
            restarts: 0,
            failures: 0,
            started: None,
            ready_since: None,
            next_start: None,
            last_exit: None,
            last_error: None,
            held: false,
            port: None,
            swaps: 0,
        }
    }

    pub fn set(&mut self, phase: Phase, pid: Option<i32>) {
        self.phase = phase;
        self.pid = pid;
        if pid.is_none() {
            self.started = None;
            self.ready_since = None;
            self.port = None;
        }
    }

    /// A new phase within a run (its start time and readiness time are kept;
    /// `pid` is None for a service without a child).
    pub fn set_running(&mut self, phase: Phase, pid: Option<i32>) {
        self.phase = phase;
        self.pid = pid;
    }

    pub fn ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// The row `koprogo status` shows.
    pub fn report(&self) -> ServiceReport {
        let now = Instant::now();
        ServiceReport {
            name: self.name.to_string(),
            state: self.phase,
            pid: self.pid,
            ready: self.ready(),
            restarts: self.restarts,
            failures: self.failures,
            uptime_secs: self.started.map(|s| now.duration_since(s).as_secs()),
            memory_bytes: self.pid.and_then(group_memory),
            oom_score_adj: self
                .pid
                .and_then(super::reaper::inspect)
                .and_then(|i| i.oom_score_adj),
            next_start_in_secs: self
                .next_start
                .map(|t| t.saturating_duration_since(now).as_secs_f64()),
            last_exit: self.last_exit.clone(),
            last_error: self.last_error.clone(),
            external: None,
            port: self.port,
            swaps: self.swaps,
        }
    }
}

/// One row of `koprogo status --json`'s `services`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceReport {
    pub name: String,
    pub state: Phase,
    pub pid: Option<i32>,
    pub ready: bool,
    pub restarts: u64,
    pub failures: u64,
    pub uptime_secs: Option<u64>,
    /// Proportional set size of the service's whole process group.
    pub memory_bytes: Option<u64>,
    /// Its main process's `oom_score_adj` (see `process::oom`).
    #[serde(default)]
    pub oom_score_adj: Option<i32>,
    pub next_start_in_secs: Option<f64>,
    pub last_exit: Option<String>,
    pub last_error: Option<String>,
    /// A service run elsewhere (external PostgreSQL): where, password redacted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<String>,
    /// The loopback port it serves on (API instances).
    #[serde(default)]
    pub port: Option<u16>,
    /// Times a new child took over from a running one (application updates).
    #[serde(default)]
    pub swaps: u64,
}

/// Memory of every process in the process group led by `pgid`: PSS where the kernel
/// gives it (shared buffers counted once across Postgres backends), RSS otherwise.
pub fn group_memory(pgid: i32) -> Option<u64> {
    let sizes: Vec<u64> = crate::procfs::group_members(pgid)
        .into_iter()
        .filter_map(process_memory)
        .collect();
    (!sizes.is_empty()).then(|| sizes.iter().sum())
}

/// PSS (or RSS) of one process, in bytes.
pub fn process_memory(pid: i32) -> Option<u64> {
    let read = |file: &str, key: &str| -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
        let line = text.lines().find(|l| l.starts_with(key))?;
        let kb: u64 = line[key.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    };
    read("smaps_rollup", "Pss:").or_else(|| read("status", "VmRSS:"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn phase_names_are_the_json_names() {
        use super::Phase::*;
        for p in [
            Stopped,
            Waiting,
            Starting,
            Ready,
            Unhealthy,
            Backoff,
            NotInstalled,
            Stopping,
        ] {
            assert_eq!(
                serde_json::to_value(p).ok(),
                Some(serde_json::json!(p.to_string()))
            );
        }
    }
}
