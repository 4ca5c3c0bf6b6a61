//! The running site as the rest of the process sees it: one handle ([`Site`]) over
//! the services' control channels and states, the logs' counters, TLS, the proxy's
//! counters, backups, updates and the capacity watch. Its fields are private: the
//! control socket asks through [`control::Handler`], the metrics endpoint reads
//! through [`metrics::Source`], the notifier through [`Site::service_states`].

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::{mpsc, oneshot, watch};

use crate::backup::Backups;
use crate::capacity::Monitor;
use crate::config::Config;
use crate::control::{self, OomReport, Request, Response, StatusReport, Verb};
use crate::logs::LogStats;
use crate::postgres::Db;
use crate::process::reaper::Reaper;
use crate::process::service::{Cmd, Shutdown};
use crate::process::state::{self, ServiceReport, ServiceState};
use crate::proxy::stats::ProxyStats;
use crate::tls::Tls;
use crate::update::{Trigger, Updater};

/// The control surface of one running service.
pub struct ServiceHandle {
    pub name: &'static str,
    pub cmds: mpsc::Sender<Cmd>,
    pub state: watch::Receiver<ServiceState>,
}

/// Everything a [`Site`] is made of, handed over once at boot.
pub struct Parts {
    pub services: Vec<ServiceHandle>,
    pub logs: Vec<(String, Arc<LogStats>)>,
    pub started: Instant,
    pub reaper: Reaper,
    pub stopping: watch::Receiver<Shutdown>,
    pub tls: Arc<Tls>,
    pub proxy: Arc<ProxyStats>,
    pub frontend_installed: bool,
    pub cfg: Arc<Config>,
    pub db: Db,
    pub backup: Arc<Backups>,
    pub capacity: Arc<Monitor>,
    pub updater: Arc<Updater>,
}

/// The handle on the running site.
pub struct Site {
    p: Parts,
}

impl Site {
    pub fn new(parts: Parts) -> Arc<Site> {
        Arc::new(Site { p: parts })
    }

    /// Each service's name and state channel (for the notifier).
    pub fn service_states(&self) -> Vec<watch::Receiver<ServiceState>> {
        self.p.services.iter().map(|s| s.state.clone()).collect()
    }

    /// When the supervisor started.
    pub fn started(&self) -> Instant {
        self.p.started
    }

    pub fn status(&self) -> StatusReport {
        let p = &self.p;
        let external = p.cfg.postgres.external.as_ref().map(|u| u.redacted());
        let services: Vec<ServiceReport> = p
            .services
            .iter()
            .map(|s| {
                let mut r = s.state.borrow().report();
                if s.name == "postgres" {
                    r.external = external.clone();
                }
                r
            })
            .collect();
        let own_oom = crate::process::oom::read(std::process::id() as i32);
        let values: Vec<(String, Option<i32>)> = services
            .iter()
            .filter(|s| s.pid.is_some())
            .map(|s| (s.name.clone(), s.oom_score_adj))
            .collect();
        let oom = OomReport {
            supervisor: own_oom,
            problems: crate::process::oom::problems(own_oom, &values),
        };
        StatusReport {
            oom,
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_secs: p.started.elapsed().as_secs(),
            all_ready: services.iter().all(|s| s.ready),
            stopping: *p.stopping.borrow() != Shutdown::Running,
            memory_bytes: state::process_memory(std::process::id() as i32),
            orphans_reaped: p.reaper.orphans_reaped(),
            services,
            tls: p.tls.status(),
            proxy: p.proxy.snapshot(),
            frontend_installed: p.frontend_installed,
            backup: p.backup.status(),
            update: p.updater.status(),
            logs: p
                .logs
                .iter()
                .map(|(name, stats)| {
                    let v = serde_json::to_value(stats.snapshot()).unwrap_or_default();
                    (name.clone(), v)
                })
                .collect(),
        }
    }

    /// A new superadmin password: kept in the secrets, applied to the database now.
    async fn reset_admin_password(&self) -> Result<String> {
        let pw = crate::secrets::reset_admin_password(&self.p.cfg.paths.state)?;
        crate::admin::secure_superadmin(&self.p.db, &pw).await?;
        tracing::info!("superadmin password reset by command");
        Ok(pw)
    }

    /// `start|stop|restart SERVICE`. With several API instances, `api` means all of
    /// them, one after the other: a restart waits for each to be ready again before
    /// the next, so the site stays up.
    async fn command(&self, verb: Verb, service: &str) -> Result<String, String> {
        let p = &self.p;
        let group: Vec<&ServiceHandle> = if service == "api" && p.cfg.backend.instances > 1 {
            p.services
                .iter()
                .filter(|s| s.name.starts_with("api-"))
                .collect()
        } else {
            Vec::new()
        };
        if !group.is_empty() {
            let mut said = Vec::new();
            for h in group {
                said.push(self.command_one(h, verb).await?);
                if verb == Verb::Stop {
                    continue;
                }
                let mut rx = h.state.clone();
                let limit = p.cfg.backend.start_timeout + Duration::from_secs(5);
                let ready = tokio::time::timeout(limit, rx.wait_for(|s| s.ready())).await;
                if !matches!(ready, Ok(Ok(_))) {
                    return Err(format!(
                        "{}; {} was not ready within {}s: the next instances were left as they are",
                        said.join("; "),
                        h.name,
                        limit.as_secs()
                    ));
                }
            }
            return Ok(said.join("; "));
        }
        let Some(h) = p.services.iter().find(|s| s.name == service) else {
            let mut names: Vec<&str> = p.services.iter().map(|s| s.name).collect();
            if p.cfg.backend.instances > 1 {
                names.push("api (all API instances)");
            }
            return Err(format!(
                "no service {service:?}: choose one of {}",
                names.join(", ")
            ));
        };
        self.command_one(h, verb).await
    }

    async fn command_one(&self, h: &ServiceHandle, verb: Verb) -> Result<String, String> {
        let service = h.name;
        if *self.p.stopping.borrow() != Shutdown::Running {
            return Err("koprogo is shutting down".into());
        }
        let (tx, rx) = oneshot::channel();
        let cmd = match verb {
            Verb::Start => Cmd::Start(tx),
            Verb::Stop => Cmd::Stop(tx),
            Verb::Restart => Cmd::Restart(tx),
        };
        h.cmds
            .send(cmd)
            .await
            .map_err(|_| format!("{service} is not accepting commands"))?;
        // A stop may take the API's whole drain time.
        match tokio::time::timeout(Duration::from_secs(180), rx).await {
            Ok(Ok(msg)) => Ok(msg),
            Ok(Err(_)) => Err(format!("{service} dropped the command")),
            Err(_) => Err(format!("{service}: no answer within 180 s")),
        }
    }
}

impl control::Handler for Site {
    async fn handle(&self, req: Request) -> Response {
        let p = &self.p;
        if let Some((verb, service)) = req.service_command() {
            return match self.command(verb, service).await {
                Ok(m) => Response::ok(m),
                Err(m) => Response::err(m),
            };
        }
        match req {
            Request::CertRenew => {
                p.tls.renew_now();
                Response::ok("certificate renewal started: follow it with `koprogo cert status`")
            }
            Request::AdminPasswordReset => Response::from_result(self.reset_admin_password().await),
            Request::Status => Response {
                status: Some(self.status()),
                ..Response::ok("")
            },
            Request::Capacity => Response {
                capacity: Some(Box::new(p.capacity.measure(false).await)),
                ..Response::ok("")
            },
            Request::BackupCreate => {
                Response::from_result(p.backup.create_now(crate::backup::Reason::Manual).await)
            }
            Request::BackupVerify {
                file,
                record_as,
                trust,
            } => Response::from_result(p.backup.verify(file, record_as, trust).await),
            Request::Restore {
                file,
                label,
                force,
                trust,
            } => Response::from_result(p.backup.restore(file, label, force, trust).await),
            Request::Reload => Response::from_result(p.updater.update(Trigger::Reload).await),
            Request::Start { .. } | Request::Stop { .. } | Request::Restart { .. } => {
                Response::err("internal: a service command was not dispatched")
            }
        }
    }
}

impl crate::metrics::Source for Site {
    fn status(&self) -> StatusReport {
        Site::status(self)
    }
    fn proxy(&self) -> &ProxyStats {
        &self.p.proxy
    }
    fn last_capacity(&self) -> Option<crate::capacity::Report> {
        self.p.capacity.last()
    }
    fn state_dir(&self) -> &Path {
        &self.p.cfg.paths.state
    }
    fn db(&self) -> &Db {
        &self.p.db
    }
}
