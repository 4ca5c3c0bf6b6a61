//! Safe application updates: replacing the running koprogo-api by a new binary
//! without a failed request. Owns the update of the API server, from the trigger to
//! the report; the service loop keeps owning the API's child and state.
//!
//! Triggers: the program file `backend.command` changed (polled every 2 s, see
//! [`binary`]: a changed file must keep its identity 2 s and be executable, so a
//! half-written file is never started; an identical sha256 is not an update),
//! `koprogo reload`, or SIGHUP. One update runs at a time. An update:
//! 1. takes a backup (`<backup.dir>/koprogo-<UTC>-pre-update.kbk`): the new version
//!    migrates the database, so going back needs it; no backup, no update;
//! 2. starts the new API server through the one reaper on the instance's other port
//!    (its home and spare ports alternate, see `crate::backend`) while the old one
//!    serves;
//! 3. waits for it to be ready exactly like a normal start (health 200 AND the
//!    database answers, within `backend.start_timeout`), then secures the
//!    superadmin account;
//! 4. hands it to the API service loop ([`Cmd::Adopt`]), which makes it its child
//!    and publishes the new port: the proxy's routing table switches in one step;
//! 5. drains the old one (requests in flight finish; SIGTERM, `backend.stop_timeout`,
//!    then SIGKILL of its group).
//!
//! With `backend.instances` > 1, steps 2-5 run for one instance after the other
//! (rolling; the others serve meanwhile); an instance that is not ready is skipped
//! (it starts the new binary at its next start). A failure stops the roll: the
//! instances already swapped keep the new version, the rest the old one.
//!
//! If the new server exits, is not ready in time, or the service refuses it (not
//! ready itself), the new one is stopped and the old one keeps serving; the reason
//! is logged, shown by `status` (`update.last`) and returned to `koprogo reload`.

pub mod binary;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep, timeout};

use crate::backend::ApiService;
use crate::backup::{Backups, Reason};
use crate::config::Config;
use crate::process::reaper::Spawned;
use crate::process::service::{
    stop_process, Cmd, ServiceIo, ServiceSpec, Shutdown, StopHow, Takeover,
};
use crate::process::state::{Phase, ServiceState};
use crate::proxy::balance::Routes;
use crate::sync::LockExt;
use binary::{Identity, Seen, Watch};

const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
const READY_POLL: Duration = Duration::from_millis(100);
/// How long the service loop may take to answer a takeover.
const ADOPT_WAIT: Duration = Duration::from_secs(10);
/// After the proxy stopped choosing the old server, before it gets SIGTERM: a
/// request that picked it just before the switch reaches it first.
const SWITCH_GRACE: Duration = Duration::from_millis(250);

/// What started an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    BinaryChanged,
    Reload,
    Sighup,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::BinaryChanged => "binary changed",
            Trigger::Reload => "koprogo reload",
            Trigger::Sighup => "SIGHUP",
        }
    }
}

/// One finished update, as `status --json` shows it under `update.last`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UpdateRecord {
    /// RFC 3339 UTC, when it ended.
    pub time: String,
    pub trigger: String,
    /// The new API server serves.
    pub ok: bool,
    /// What happened, or why the old one kept serving.
    pub message: String,
    /// The pre-update backup (None when it could not be made).
    pub backup: Option<String>,
    /// The API servers replaced, and their replacements (instance order).
    pub old_pids: Vec<i32>,
    pub new_pids: Vec<i32>,
    /// sha256 of the binary that was started.
    pub binary_sha256: Option<String>,
    pub duration_secs: f64,
}

/// `status --json` → `update`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UpdateStatus {
    /// `backend.command`, watched for changes.
    pub binary: String,
    /// sha256 of the binary the API server was last started from by an update, or
    /// found at boot.
    pub binary_sha256: Option<String>,
    /// The step running now.
    pub running: Option<String>,
    /// A change seen and not started yet (settling, not executable, removed).
    pub pending: Option<String>,
    pub last: Option<UpdateRecord>,
    /// The newest pre-update backup: restore it (after reinstalling the previous
    /// version) to roll an update back.
    pub pre_update_backup: Option<String>,
}

/// One API instance, as the updater drives it.
pub struct Instance {
    pub api: Arc<ApiService>,
    pub cmds: mpsc::Sender<Cmd>,
    pub state: watch::Receiver<ServiceState>,
}

/// The updater of a running supervisor.
pub struct Updater {
    cfg: Arc<Config>,
    instances: Vec<Instance>,
    io: ServiceIo,
    routes: watch::Receiver<Routes>,
    backups: Arc<Backups>,
    shutdown: watch::Receiver<Shutdown>,
    one: tokio::sync::Mutex<()>,
    status: Mutex<UpdateStatus>,
    /// Identity of the binary last started by an update (or found at boot).
    applied: Mutex<Option<Identity>>,
}

/// Why a swap failed, and the pid of the new server if it ran.
struct Failed {
    why: String,
    new_pid: Option<i32>,
}

impl Updater {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Arc<Config>,
        instances: Vec<Instance>,
        io: ServiceIo,
        routes: watch::Receiver<Routes>,
        backups: Arc<Backups>,
        shutdown: watch::Receiver<Shutdown>,
    ) -> Arc<Updater> {
        let path = cfg.backend.command.clone();
        let applied = Identity::of(&path).ok();
        let pre_update_backup = crate::backup::retention::list(&cfg.backup.dir)
            .ok()
            .and_then(|l| {
                l.into_iter()
                    .find(|e| e.path.to_string_lossy().contains("-pre-update"))
            })
            .map(|e| e.path.display().to_string());
        let status = UpdateStatus {
            binary: path.display().to_string(),
            pre_update_backup,
            ..Default::default()
        };
        Arc::new(Updater {
            cfg,
            instances,
            io,
            routes,
            backups,
            shutdown,
            one: tokio::sync::Mutex::new(()),
            status: Mutex::new(status),
            applied: Mutex::new(applied),
        })
    }

    pub fn status(&self) -> UpdateStatus {
        self.status.locked().clone()
    }

    fn set(&self, f: impl FnOnce(&mut UpdateStatus)) {
        {
            let mut s = self.status.locked();
            f(&mut s);
        }
    }

    fn step(&self, what: impl Into<String>) {
        let what = what.into();
        tracing::info!("update: {what}");
        self.set(|s| s.running = Some(what));
    }

    /// Waits (bounded) for a running update to finish (the supervisor is stopping).
    pub async fn wait_idle(&self, limit: Duration) {
        if timeout(limit, self.one.lock()).await.is_err() {
            tracing::warn!("update: still running after {limit:?} at stop");
        }
    }

    /// Watches `backend.command` and updates when it changed and settled.
    pub async fn watch(self: Arc<Self>) {
        let path = self.cfg.backend.command.clone();
        if let Ok(h) = hash(&path).await {
            self.set(|s| s.binary_sha256 = Some(h));
        }
        let mut w = Watch::default();
        loop {
            sleep(binary::POLL).await;
            if *self.shutdown.borrow() != Shutdown::Running {
                return;
            }
            let applied = *self.applied.locked();
            match w.look(&path, applied) {
                Seen::Unchanged => self.set(|s| s.pending = None),
                Seen::Settling(why) => {
                    if self.status().pending.as_deref() != Some(why.as_str()) {
                        tracing::info!("update: {why}");
                    }
                    self.set(|s| s.pending = Some(why));
                }
                Seen::Ready(id) => {
                    self.set(|s| s.pending = None);
                    let same = match (hash(&path).await, self.status().binary_sha256) {
                        (Ok(new), Some(old)) => new == old,
                        _ => false,
                    };
                    if same {
                        tracing::info!(
                            "update: {} was replaced by an identical file: nothing to do",
                            path.display()
                        );
                        self.set_applied(id);
                        continue;
                    }
                    if !self.instances.iter().any(|i| i.state.borrow().ready()) {
                        // Nothing serves (first install, crash loop, stopped): the
                        // service starts the new file itself; there is nothing to swap.
                        tracing::info!(
                            "update: {} changed while no API server is ready: it is used at the next start",
                            path.display()
                        );
                        self.set_applied(id);
                        continue;
                    }
                    let _ = self.update(Trigger::BinaryChanged).await;
                }
            }
        }
    }

    fn set_applied(&self, id: Identity) {
        {
            let mut a = self.applied.locked();
            *a = Some(id);
        }
    }

    /// One update (see the module doc). The message says what happened; an error
    /// means the running API server was kept (or there was none to replace).
    pub async fn update(&self, trigger: Trigger) -> Result<String> {
        let _one = self.one.lock().await;
        let started = Instant::now();
        let path = self.cfg.backend.command.clone();
        let mut rec = UpdateRecord {
            trigger: trigger.as_str().into(),
            ..Default::default()
        };
        tracing::info!("update ({}): {}", trigger.as_str(), path.display());
        let r = self.run(&path, &mut rec).await;
        rec.duration_secs = started.elapsed().as_secs_f64();
        rec.time = crate::backup::utc_now();
        let msg = match &r {
            Ok(m) => m.clone(),
            Err(e) => format!("{e:#}"),
        };
        rec.ok = r.is_ok();
        rec.message = msg.clone();
        if r.is_ok() {
            tracing::info!("update: {msg}");
        } else {
            tracing::error!("update failed: {msg}");
        }
        self.set(|s| {
            s.running = None;
            if rec.backup.is_some() {
                s.pre_update_backup = rec.backup.clone();
            }
            if rec.ok {
                s.binary_sha256 = rec.binary_sha256.clone();
            }
            s.last = Some(rec);
        });
        r.map_err(|_| anyhow!(msg))
    }

    async fn run(&self, path: &std::path::Path, rec: &mut UpdateRecord) -> Result<String> {
        if *self.shutdown.borrow() != Shutdown::Running {
            bail!("koprogo is stopping: no update");
        }
        let file = self.cfg.file.display();
        let id = Identity::of(path).map_err(|e| {
            anyhow!(
                "cannot update: {} (backend.command in {file}): {e}; install the API server there",
                path.display()
            )
        })?;
        if !id.startable() {
            bail!(
                "cannot update: {} (backend.command in {file}) is not an executable file \
                 (mode {:o}): fix it with `chmod 755 {}`",
                path.display(),
                id.mode & 0o7777,
                path.display()
            );
        }
        // From here on this binary counts as seen, whatever the outcome: a broken
        // one is not retried until the file changes again.
        self.set_applied(id);
        let sha = hash(path)
            .await
            .with_context(|| format!("cannot read {}", path.display()))?;
        rec.binary_sha256 = Some(sha.clone());
        let serving: Vec<i32> = self
            .instances
            .iter()
            .filter_map(|i| {
                let st = i.state.borrow();
                (st.phase == Phase::Ready).then_some(st.pid).flatten()
            })
            .collect();
        if serving.is_empty() {
            let phase = self.instances.first().map(|i| i.state.borrow().phase);
            bail!(
                "no API server is ready (it is {phase:?}): nothing to swap; it starts \
                 the binary as it is on disk at its next start"
            );
        }
        let serving_list = serving
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ");

        self.step("pre-update backup");
        let backup = match self.backups.create_file(Reason::PreUpdate).await {
            Ok((_, f)) => f,
            Err(e) => bail!(
                "the pre-update backup failed ({e:#}): the API server was not updated \
                 (pid {serving_list} keeps serving); fix the backup, then run `koprogo reload`"
            ),
        };
        rec.backup = Some(backup.display().to_string());
        self.set(|s| s.pre_update_backup = rec.backup.clone());

        // One instance after the other: the others serve meanwhile.
        let mut done = Vec::new();
        let mut skipped = Vec::new();
        for inst in &self.instances {
            let (name, phase, pid) = {
                let st = inst.state.borrow();
                (st.name, st.phase, st.pid)
            };
            let Some(old_pid) = pid.filter(|_| phase == Phase::Ready) else {
                skipped.push(format!(
                    "{name} is not ready ({phase:?}): it starts the new binary at its next start"
                ));
                continue;
            };
            match self.swap(inst).await {
                Ok((old, new, port)) => {
                    rec.old_pids.push(old);
                    rec.new_pids.push(new);
                    done.push(format!(
                        "{name} is pid {new} on 127.0.0.1:{port} (was pid {old})"
                    ));
                }
                Err(f) => {
                    rec.new_pids.extend(f.new_pid);
                    let swapped = if done.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " (already updated: {}; they keep the new version)",
                            done.join(", ")
                        )
                    };
                    return Err(anyhow!(
                        "{name}: {}; the running API server (pid {old_pid}) keeps serving{swapped}. \
                         Pre-update backup: {} (if the new version migrated the database, the old \
                         one may refuse its next start: restore that backup). Its log: {}",
                        f.why,
                        backup.display(),
                        self.cfg.paths.logs.join("api.log").display()
                    ));
                }
            }
        }
        let mut msg = format!(
            "updated: {}; binary sha256 {}; pre-update backup: {}",
            done.join(", "),
            &sha[..12],
            backup.display()
        );
        for s in skipped {
            msg.push_str("; ");
            msg.push_str(&s);
        }
        Ok(msg)
    }

    /// Steps 2-5: the new server beside the old one, the handover, the drain.
    /// Returns (old pid, new pid, new port).
    async fn swap(&self, inst: &Instance) -> Result<(i32, i32, u16), Failed> {
        let fail = |why: String, new_pid: Option<i32>| Failed { why, new_pid };
        let api = &inst.api;
        let current = inst
            .state
            .borrow()
            .port
            .unwrap_or_else(|| api.active_port());
        let port = crate::backend::other_port(&self.cfg, api.index(), current);
        // Something else listening there would pass the health check in our place.
        if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return Err(fail(
                format!(
                    "the update port 127.0.0.1:{port} (one of the ports after backend.port in {}, \
                     see backend.instances) is in use ({e}): stop what listens there",
                    self.cfg.file.display()
                ),
                None,
            ));
        }
        let spec = api
            .prepare_on(port)
            .await
            .map_err(|e| fail(format!("cannot prepare the new API server: {e:#}"), None))?;
        let log = self
            .io
            .log_fd()
            .map_err(|e| fail(format!("cannot open the API log: {e:#}"), None))?;
        let mut new = self
            .io
            .reaper
            .spawn(spec, log)
            .await
            .map_err(|e| fail(format!("cannot start the new API server: {e:#}"), None))?;
        let pid = new.pid;
        self.step(format!(
            "new API server pid {pid} on 127.0.0.1:{port}: waiting until it is ready"
        ));

        if let Err(why) = self.gate(api, &mut new, port).await {
            if let Some(exit) = why.1 {
                // Whatever it left in its process group goes too.
                crate::process::reaper::signal(pid, nix::sys::signal::Signal::SIGKILL, true);
                return Err(fail(
                    format!("the new API server exited at start ({exit})"),
                    Some(pid),
                ));
            }
            self.stop(api, new).await;
            return Err(fail(why.0, Some(pid)));
        }

        self.step(format!("switching the proxy to pid {pid}"));
        let (reply, answer) = oneshot::channel();
        let offer = Cmd::Adopt(Takeover {
            child: new,
            port,
            reply,
        });
        if inst.cmds.send(offer).await.is_err() {
            // The service task is gone (stopping): PDEATHSIG and the final
            // SIGKILL of the supervisor's stop take care of the child.
            return Err(fail("the API service is stopping".into(), Some(pid)));
        }
        let old = match timeout(ADOPT_WAIT, answer).await {
            Ok(Ok(Ok(old))) => old,
            Ok(Ok(Err((new, why)))) => {
                self.stop(api, new).await;
                return Err(fail(
                    format!("the API service refused the new server: {why}"),
                    Some(pid),
                ));
            }
            Ok(Err(_)) | Err(_) => {
                return Err(fail(
                    "the API service did not answer the handover".into(),
                    Some(pid),
                ))
            }
        };
        let old_pid = old.pid;
        // The proxy follows the routing table: once the old port is out of it, no
        // new request goes there.
        let mut routes = self.routes.clone();
        let _ = timeout(
            Duration::from_secs(2),
            routes.wait_for(|r| !r.ready.contains(&current)),
        )
        .await;
        sleep(SWITCH_GRACE).await;
        self.step(format!("draining the old API server pid {old_pid}"));
        self.stop(api, old).await;
        Ok((old_pid, pid, port))
    }

    /// Readiness of the new server: Err((why, Some(exit))) if it exited (already
    /// reaped), Err((why, None)) if it must be stopped.
    async fn gate(
        &self,
        api: &ApiService,
        new: &mut Spawned,
        port: u16,
    ) -> Result<(), (String, Option<crate::process::reaper::Exit>)> {
        let limit = api.start_timeout();
        let deadline = Instant::now() + limit;
        let mut shutdown = self.shutdown.clone();
        loop {
            if Instant::now() >= deadline {
                return Err((
                    format!(
                        "the new API server was not ready after {}s (backend.start_timeout)",
                        limit.as_secs()
                    ),
                    None,
                ));
            }
            tokio::select! {
                biased;
                e = &mut new.exit => {
                    let exit = e.map_err(|_| ("the reaper lost the new API server".to_string(), None))?;
                    return Err((String::new(), Some(exit)));
                }
                _ = shutdown.wait_for(|s| *s != Shutdown::Running) => {
                    return Err(("koprogo is stopping".into(), None));
                }
                r = timeout(PROBE_TIMEOUT, api.probe_on(port)) => {
                    if matches!(r, Ok(Ok(()))) {
                        break;
                    }
                }
            }
            tokio::select! {
                biased;
                e = &mut new.exit => {
                    let exit = e.map_err(|_| ("the reaper lost the new API server".to_string(), None))?;
                    return Err((String::new(), Some(exit)));
                }
                _ = sleep(READY_POLL) => {}
            }
        }
        // KoproGo resets the superadmin's password at every start: close it before
        // the new server gets any traffic.
        api.on_ready()
            .await
            .map_err(|e| (format!("setup of the new API server failed: {e:#}"), None))
    }

    /// SIGTERM, the backend grace, then SIGKILL of the group (hurried by a second
    /// stop signal).
    async fn stop(&self, api: &ApiService, child: Spawned) {
        let mut exit = child.exit;
        stop_process(
            api.name(),
            child.pid,
            &mut exit,
            StopHow::of(api, false),
            self.shutdown.clone(),
            false,
        )
        .await;
    }
}

async fn hash(path: &std::path::Path) -> std::io::Result<String> {
    let p: PathBuf = path.to_path_buf();
    tokio::task::spawn_blocking(move || binary::sha256(&p))
        .await
        .map_err(std::io::Error::other)?
}
