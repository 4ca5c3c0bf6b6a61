//! The API service, with its secrets read again from `<state>/secrets.env` before
//! every start: a restore replaces that file, and the restarted API server must get
//! the restored keys (2FA and energy data are encrypted with them), not the ones the
//! supervisor read at boot. Everything else is [`ApiService`]'s.
//!
//! (This belongs in `ApiService::prepare` itself; it is a wrapper only to keep the
//! backup work out of files owned by others.)

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use arc_swap::ArcSwap;

use crate::backend::ApiService;
use crate::process::reaper::ChildSpec;
use crate::process::service::{ServiceIo, ServiceSpec, StopStep};

pub struct FreshSecrets {
    inner: ArcSwap<ApiService>,
}

impl FreshSecrets {
    pub fn new(api: ApiService) -> FreshSecrets {
        FreshSecrets {
            inner: ArcSwap::from_pointee(api),
        }
    }
}

impl ServiceSpec for FreshSecrets {
    fn name(&self) -> &'static str {
        self.inner.load().name
    }

    async fn prepare(&self, _io: &ServiceIo) -> Result<Option<ChildSpec>> {
        let port = self.inner.load().active_port();
        self.prepare_on(port).await.map(Some)
    }

    async fn probe(&self) -> Result<()> {
        self.inner.load_full().probe().await
    }

    async fn on_ready(&self) -> Result<()> {
        self.inner.load_full().on_ready().await
    }

    fn start_timeout(&self) -> Duration {
        self.inner.load().start_timeout()
    }

    fn stop_plan(&self) -> Vec<StopStep> {
        self.inner.load().stop_plan()
    }

    fn stop_now(&self) -> Vec<StopStep> {
        self.inner.load().stop_now()
    }

    fn port(&self) -> Option<u16> {
        self.inner.load().port()
    }

    fn switch_port(&self, port: u16) {
        self.inner.load().switch_port(port)
    }
}

impl FreshSecrets {
    /// The API server's command on `port`, with the secrets as they are on disk now.
    pub async fn prepare_on(&self, port: u16) -> Result<ChildSpec> {
        let cur = self.inner.load_full();
        let secrets = crate::secrets::load_or_create(&cur.cfg.paths.state)?;
        if secrets.values != cur.secrets.values {
            tracing::info!(
                "secrets changed in {}: the API starts with the new ones",
                secrets.file.display()
            );
        }
        let next = Arc::new(ApiService {
            cfg: cur.cfg.clone(),
            secrets,
            db: cur.db.clone(),
            port: cur.port.clone(),
            index: cur.index,
            name: cur.name,
        });
        self.inner.store(next.clone());
        next.prepare_on(port).await
    }

    /// Readiness of the API server on `port`.
    pub async fn probe_on(&self, port: u16) -> Result<()> {
        self.inner.load_full().probe_on(port).await
    }

    /// The port the current child serves on.
    pub fn active_port(&self) -> u16 {
        self.inner.load().active_port()
    }

    /// Which API instance this is (from 0).
    pub fn index(&self) -> u16 {
        self.inner.load().index
    }
}
