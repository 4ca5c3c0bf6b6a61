//! Talking to systemd (READY, STATUS, STOPPING, WATCHDOG) when NOTIFY_SOCKET is set,
//! and logging the moments that matter ("all ready"). Only reads service state.

use std::future::Future;
use std::sync::Arc;

use sd_notify::NotifyState;

use super::Site;

/// One datagram to NOTIFY_SOCKET, never blocking: `sd_notify::notify` blocks while
/// the receiver's queue is full (10 datagrams by default), which stalled the
/// supervisor's runtime when the listener did not read. A full queue drops the
/// message and says so.
fn send(states: &[NotifyState]) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let msg: String = states.iter().map(|s| format!("{s}\n")).collect();
    if let Err(e) = send_to(&path, msg.as_bytes()) {
        if e.kind() == std::io::ErrorKind::WouldBlock {
            tracing::warn!(
                "sd_notify: the service manager is not reading {}: dropped {:?}",
                path.to_string_lossy(),
                msg.trim_end()
            );
        } else {
            tracing::warn!("sd_notify failed: {e}");
        }
    }
}

fn send_to(path: &std::ffi::OsStr, msg: &[u8]) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let bytes = path.as_bytes();
    // "@name" is Linux's abstract namespace.
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(path)?,
    };
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    let n = sock.send_to_addr(msg, &addr)?;
    if n != msg.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            "incomplete notification",
        ));
    }
    Ok(())
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Follows every service's state: STATUS on each change, READY=1 (once) and an
/// "all ready" log line when every service is ready, watchdog pings meanwhile.
pub async fn report(site: Arc<Site>) {
    let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    let mut next_ping = tokio::time::Instant::now() + watchdog.unwrap_or_default();
    let mut states = site.service_states();
    let mut told_ready = false;
    let mut last = String::new();
    loop {
        let summary: Vec<String> = states
            .iter()
            .map(|s| {
                let s = s.borrow();
                format!("{}: {}", s.name, s.phase)
            })
            .collect();
        let all_ready = states.iter().all(|s| s.borrow().ready());
        let text = summary.join(", ");
        if text != last {
            send(&[NotifyState::Status(&text)]);
            last = text;
        }
        if all_ready && !told_ready {
            told_ready = true;
            tracing::info!("all ready in {:.0?}", site.started().elapsed());
            send(&[NotifyState::Ready, NotifyState::Status("all ready")]);
        }
        let changed = futures_any(&mut states);
        match watchdog {
            Some(period) => {
                // A fixed schedule: state changes (a crash loop) must not postpone pings.
                tokio::select! {
                    _ = changed => {}
                    _ = tokio::time::sleep_until(next_ping) => {
                        send(&[NotifyState::Watchdog]);
                        next_ping += period;
                        if next_ping < tokio::time::Instant::now() {
                            next_ping = tokio::time::Instant::now() + period;
                        }
                    }
                }
            }
            None => changed.await,
        }
    }
}

/// Resolves when any of the watched states changes; never, once all senders are gone
/// (the services have stopped).
async fn futures_any(
    states: &mut [tokio::sync::watch::Receiver<crate::process::state::ServiceState>],
) {
    let mut waits: Vec<Option<_>> = states
        .iter_mut()
        .map(|s| Some(Box::pin(s.changed())))
        .collect();
    std::future::poll_fn(|cx| {
        for slot in waits.iter_mut() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(Ok(())) => return std::task::Poll::Ready(()),
                    std::task::Poll::Ready(Err(_)) => *slot = None,
                    std::task::Poll::Pending => {}
                }
            }
        }
        std::task::Poll::Pending
    })
    .await
}
