//! The client side of the control socket, for the command line: one request, one
//! bounded answer. "Not running" means only that the socket could not be reached;
//! a silent or garbled answer from a running supervisor is another error.

use std::time::Duration;

use super::{socket_path, Request, Response};
use crate::config::Config;

/// The longest answer a client reads (a status with many services is a few KiB).
const MAX_ANSWER: u64 = 4 << 20;

/// Why a request got no answer.
#[derive(Debug)]
pub enum ControlError {
    /// Nothing listens on the socket: koprogo is not running (exit code 3).
    NotRunning(String),
    /// It is running, but the exchange failed (timeout, unreadable answer).
    Failed(String),
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlError::NotRunning(m) | ControlError::Failed(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ControlError {}

/// Sends one request to a running supervisor (blocking; for the CLI).
pub fn request(cfg: &Config, req: &Request) -> Result<Response, ControlError> {
    request_timeout(cfg, req, Duration::from_secs(200))
}

/// `request` for operations that take as long as they take (backups, restores of
/// a big site): bounded all the same, by a silence of 6 hours.
pub fn request_long(cfg: &Config, req: &Request) -> Result<Response, ControlError> {
    request_timeout(cfg, req, Duration::from_secs(6 * 3600))
}

pub fn request_timeout(
    cfg: &Config,
    req: &Request,
    limit: Duration,
) -> Result<Response, ControlError> {
    use std::io::{BufRead, Write};
    let path = socket_path(cfg);
    let mut s = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        ControlError::NotRunning(format!(
            "koprogo is not running (no answer on {}): start it with `koprogo run` or `systemctl start koprogo`: {e}",
            path.display()
        ))
    })?;
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        ControlError::Failed(format!("{what} {}: {e}", path.display()))
    };
    s.set_read_timeout(Some(limit))
        .map_err(|e| failed("cannot set a timeout on", &e))?;
    let mut line =
        serde_json::to_vec(req).map_err(|e| failed("cannot encode a request for", &e))?;
    line.push(b'\n');
    s.write_all(&line)
        .map_err(|e| failed("cannot send the request to", &e))?;
    let mut answer = String::new();
    // The answer comes from whoever holds the socket path: bounded.
    std::io::BufReader::new(std::io::Read::take(s, MAX_ANSWER))
        .read_line(&mut answer)
        .map_err(|e| failed("no answer (within the time limit) from", &e))?;
    serde_json::from_str(answer.trim()).map_err(|e| {
        ControlError::Failed(format!(
            "unreadable answer from {}: {answer:?}: {e}",
            path.display()
        ))
    })
}
