//! Tools the backups run (pg_dump, pg_restore, the copy hook), started through the
//! supervisor's one reaper (never `std::process::Command::output`, whose own wait
//! would race the reaper's `waitpid(-1)`), with their output captured for the log
//! and for error messages, and a time bound after which the group is killed.

use std::io::Read;
use std::time::Duration;

use anyhow::{anyhow, Result};
use nix::fcntl::OFlag;
use nix::sys::signal::Signal;

use crate::process::reaper::{signal, ChildSpec, Exit, Reaper};

/// Output kept from a tool (its last bytes).
const KEEP: usize = 64 << 10;

pub struct Output {
    pub exit: Exit,
    /// stdout and stderr, interleaved, the last 64 KiB.
    pub text: String,
}

impl Output {
    /// The last non-empty line, for one-line messages.
    pub fn last_line(&self) -> String {
        self.text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_string()
    }
}

/// Runs `spec` to completion (bounded by `limit`), logging its output lines.
pub async fn run(reaper: &Reaper, spec: ChildSpec, limit: Duration) -> Result<Output> {
    let tool = spec
        .program
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (rd, wr) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| anyhow!("cannot create a pipe for {tool}: {e}"))?;
    let spawned = reaper.spawn(spec, wr).await?;
    let pid = spawned.pid;
    let reader = tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::from(rd);
        let mut kept: Vec<u8> = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match f.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    kept.extend_from_slice(&buf[..n]);
                    if kept.len() > 2 * KEEP {
                        kept.drain(..kept.len() - KEEP);
                    }
                }
            }
        }
        if kept.len() > KEEP {
            kept.drain(..kept.len() - KEEP);
        }
        String::from_utf8_lossy(&kept).into_owned()
    });
    let mut exit_rx = spawned.exit;
    let exit = match tokio::time::timeout(limit, &mut exit_rx).await {
        Ok(Ok(e)) => e,
        Ok(Err(_)) => return Err(anyhow!("the reaper lost {tool} (pid {pid})")),
        Err(_) => {
            signal(pid, Signal::SIGKILL, true);
            let _ = tokio::time::timeout(Duration::from_secs(5), exit_rx).await;
            return Err(anyhow!(
                "{tool} did not finish within {}s: killed",
                limit.as_secs()
            ));
        }
    };
    // The pipe closes when the last holder exits; a grandchild keeping it open
    // must not hold us.
    let text = match tokio::time::timeout(Duration::from_secs(5), reader).await {
        Ok(Ok(t)) => t,
        _ => String::new(),
    };
    for line in text.lines().filter(|l| !l.trim().is_empty()).take(50) {
        if exit.success() {
            tracing::info!("{tool}: {line}");
        } else {
            tracing::warn!("{tool}: {line}");
        }
    }
    Ok(Output { exit, text })
}
