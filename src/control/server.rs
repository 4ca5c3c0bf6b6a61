//! The server side of the control socket: binds it (0600), reads one bounded
//! request line per connection, hands the parsed [`Request`] to a [`Handler`] and
//! writes its [`Response`]. What a request does is the handler's business.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::{socket_path, Request, Response};
use crate::config::Config;

/// Longest request line accepted.
const MAX_REQUEST: usize = 4096;

/// What answers control requests (the supervisor's site handle).
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Request) -> impl Future<Output = Response> + Send;
}

/// Binds the socket (replacing a stale one: the state lock is ours); the future
/// serves it.
pub fn serve<H: Handler>(
    cfg: &Config,
    handler: Arc<H>,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(cfg);
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot chmod {}", path.display()))?;
    Ok(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                if let Err(e) = connection(stream, &*handler).await {
                    tracing::debug!("control connection: {e:#}");
                }
            });
        }
    })
}

async fn connection<H: Handler>(stream: UnixStream, handler: &H) -> Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(r).take(MAX_REQUEST as u64);
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
        .await
        .context("request timed out")??;
    let resp = match serde_json::from_str::<Request>(line.trim()) {
        Err(e) => Response::err(format!("bad request: {e}")),
        Ok(req) => handler.handle(req).await,
    };
    let mut out = serde_json::to_vec(&resp)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    Ok(())
}
