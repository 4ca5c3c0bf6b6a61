//! [`LogPipe`]: owns one capture — the pipe (both ends `O_CLOEXEC`), the `log-<service>`
//! thread that drains it into the current file, the `logz-<service>` background thread
//! (compression, retention), the line splitting, and [`PipeWriter`] for the supervisor's
//! own tracing output.

use super::rotate::{self, Job};
use super::writer::LogFile;
use super::{check_service_name, LogSettings, LogStats, MAX_LINE};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes read from the pipe at once.
const READ_BUF: usize = 256 * 1024;
/// After emptying the pipe, how long the capture thread lets lines gather (at most
/// 100 wake-ups a second per service; a line waits at most this long for its timestamp).
const COALESCE: Duration = Duration::from_millis(10);
/// Pipe capacity asked for (best effort), so bursts never stall a child.
const PIPE_SIZE: libc::c_int = 1024 * 1024;

/// One capture: a pipe whose write end children (and the supervisor's own tracing) write
/// into, drained by a dedicated thread into `<dir>/<service>.log`.
pub struct LogPipe {
    pub service: String,
    pub stats: Arc<LogStats>,
    write: OwnedFd,
    capture: Finisher<io::Result<()>>,
    worker: Finisher<()>,
    closing: Arc<AtomicBool>,
}

/// A thread whose end can be awaited with a timeout.
struct Finisher<T> {
    handle: JoinHandle<T>,
    done: Receiver<()>,
}

impl<T: Send + 'static> Finisher<T> {
    fn spawn(name: String, f: impl FnOnce() -> T + Send + 'static) -> io::Result<Finisher<T>> {
        let (tx, done) = mpsc::sync_channel::<()>(0);
        let handle = std::thread::Builder::new().name(name).spawn(move || {
            // Dropped when the thread ends, panic included: that wakes `wait`.
            let _done: SyncSender<()> = tx;
            f()
        })?;
        Ok(Finisher { handle, done })
    }

    /// Joins the thread if it ends before `deadline`; `None` (thread left running) if not.
    fn wait(self, deadline: Instant) -> Option<std::thread::Result<T>> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.done.recv_timeout(left) {
            Err(RecvTimeoutError::Timeout) => None,
            Ok(()) | Err(RecvTimeoutError::Disconnected) => Some(self.handle.join()),
        }
    }
}

impl LogPipe {
    /// Creates the pipe (O_CLOEXEC both ends) and starts a dedicated thread that reads the
    /// read end and writes `<dir>/<service>.log`, prefixing each line with an RFC 3339 UTC
    /// timestamp with milliseconds and a space. The file is opened O_APPEND|O_CREAT, 0640.
    pub fn start(service: &str, settings: &LogSettings) -> io::Result<LogPipe> {
        check_service_name(service)?;
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        // Best effort: an unprivileged user over its pipe quota keeps the default 64 KiB.
        if let Err(e) = nix::fcntl::fcntl(
            write.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE),
        ) {
            tracing::debug!("log pipe of {service} keeps its default size: F_SETPIPE_SZ: {e}");
        }
        let stats = Arc::new(LogStats::default());
        let (jobs, job_rx) = mpsc::channel();
        let _ = jobs.send(Job::Startup);
        let file = LogFile::open(service, settings, Arc::clone(&stats), jobs)?;
        let worker = {
            let (settings, service, stats) = (settings.clone(), service.to_owned(), stats.clone());
            Finisher::spawn(format!("logz-{service}"), move || {
                rotate::run_worker(settings, service, stats, job_rx)
            })?
        };
        let closing = Arc::new(AtomicBool::new(false));
        let capture = {
            let closing = Arc::clone(&closing);
            let read = File::from(read);
            Finisher::spawn(format!("log-{service}"), move || {
                capture(read, file, &closing)
            })?
        };
        Ok(LogPipe {
            service: service.to_owned(),
            stats,
            write,
            capture,
            worker,
            closing,
        })
    }

    /// A dup of the write end (O_CLOEXEC; `Stdio::from` puts it on the child's fd 1/2).
    pub fn writer_fd(&self) -> io::Result<OwnedFd> {
        self.write.try_clone()
    }

    /// A `Write` for tracing_subscriber's fmt layer (the supervisor's own log).
    pub fn make_writer(&self) -> io::Result<PipeWriter> {
        Ok(PipeWriter(Arc::new(File::from(self.writer_fd()?))))
    }

    /// Closes our write end and waits, bounded by `timeout`, for the thread to drain the
    /// pipe and exit (on EOF: when every write end is closed), flushing and fsyncing the
    /// file; then, within what is left of `timeout`, for pending compression.
    ///
    /// If some process still holds a write end at the deadline, returns `TimedOut`; the
    /// thread then stops by itself as soon as the pipe is empty. Compression still running
    /// at the deadline is not an error: it goes on, or is redone at the next start.
    pub fn close(self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        let LogPipe {
            service,
            stats: _,
            write,
            capture,
            worker,
            closing,
        } = self;
        drop(write);
        let result = match capture.wait(deadline) {
            None => {
                closing.store(true, Ordering::Relaxed);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "log-{service}: pipe not drained within {timeout:?} \
                         (a process still holds its write end)"
                    ),
                ));
            }
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(io::Error::other(format!("log-{service}: thread panicked"))),
        };
        let _ = worker.wait(deadline);
        result
    }
}

/// `std::io::Write` into a [`LogPipe`] (a dup of its write end): for the supervisor's own
/// tracing output. Each `write` of at most 4 KiB (PIPE_BUF) reaches the pipe in one piece.
#[derive(Clone, Debug)]
pub struct PipeWriter(Arc<File>);

impl From<File> for PipeWriter {
    fn from(f: File) -> PipeWriter {
        PipeWriter(Arc::new(f))
    }
}

impl Write for PipeWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.0).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for PipeWriter {
    type Writer = PipeWriter;

    fn make_writer(&'a self) -> PipeWriter {
        self.clone()
    }
}

/// Waits until `fd` is readable (or hung up): `Ok(false)` on timeout.
fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let ms = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    Ok(poll(&mut [PollFd::new(fd, PollFlags::POLLIN)], ms)? > 0)
}

/// The `log-<service>` thread: drain the pipe until EOF (or, after a timed-out `close`,
/// until it is empty), then write the last partial line, flush and fsync.
fn capture(read: File, mut file: LogFile, closing: &AtomicBool) -> io::Result<()> {
    let mut buf = vec![0u8; READ_BUF];
    let mut lines = Splitter::default();
    loop {
        match wait_readable(read.as_fd(), file.poll_timeout()) {
            Ok(true) => {}
            Ok(false) => {
                if closing.load(Ordering::Relaxed) {
                    break;
                }
                file.begin_chunk();
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Cannot happen with a valid fd; never spin on it.
                file.stats().set_error(format!("polling log pipe: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        let n = match (&read).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) =>
            {
                continue
            }
            Err(e) => {
                file.stats().set_error(format!("reading log pipe: {e}"));
                break;
            }
        };
        file.begin_chunk();
        lines.feed(&buf[..n], &mut file);
        if n < buf.len() {
            // The pipe is empty for now: make what we have visible to readers.
            file.flush();
            if closing.load(Ordering::Relaxed) {
                break;
            }
            // Let the next lines gather before waking for them: a child that logs
            // every request (the API does) would otherwise cost a wake-up, a read and
            // a write per line, about 3 system calls per request on a one-CPU VPS.
            // The first line after a quiet spell is still read at once.
            std::thread::sleep(COALESCE);
        }
    }
    lines.finish(&mut file);
    file.finish()
}

/// Splits the byte stream into lines; carries a partial line between reads and cuts
/// lines longer than [`MAX_LINE`] into pieces.
#[derive(Default)]
pub(crate) struct Splitter {
    partial: Vec<u8>,
}

impl Splitter {
    pub(crate) fn feed(&mut self, mut data: &[u8], out: &mut LogFile) {
        while let Some(i) = find_newline(data) {
            if self.partial.is_empty() {
                emit(&data[..i], out);
            } else {
                self.partial.extend_from_slice(&data[..i]);
                emit(&self.partial, out);
                self.partial.clear();
            }
            data = &data[i + 1..];
        }
        if data.is_empty() {
            return;
        }
        self.partial.extend_from_slice(data);
        if self.partial.len() > MAX_LINE {
            let mut start = 0;
            while self.partial.len() - start > MAX_LINE {
                let cut = piece_end(&self.partial[start..]);
                out.line(&self.partial[start..start + cut]);
                start += cut;
            }
            self.partial.drain(..start);
        }
    }

    /// At EOF: a final partial line is written (with a newline).
    pub(crate) fn finish(&mut self, out: &mut LogFile) {
        if !self.partial.is_empty() {
            emit(&self.partial, out);
            self.partial.clear();
        }
    }
}

fn emit(mut line: &[u8], out: &mut LogFile) {
    while line.len() > MAX_LINE {
        let cut = piece_end(line);
        out.line(&line[..cut]);
        line = &line[cut..];
    }
    out.line(line);
}

/// Where to cut `s` (longer than [`MAX_LINE`]): at `MAX_LINE`, moved back (at most 3 bytes)
/// so as not to split a UTF-8 character.
pub(crate) fn piece_end(s: &[u8]) -> usize {
    (0..4)
        .map(|back| MAX_LINE - back)
        .find(|&cut| s[cut] & 0xC0 != 0x80)
        .unwrap_or(MAX_LINE)
}

/// The index of the first `\n` in `hay`, eight bytes at a time.
pub(crate) fn find_newline(hay: &[u8]) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    const NL: u64 = LO * b'\n' as u64;
    let mut chunks = hay.chunks_exact(8);
    let mut base = 0;
    for chunk in chunks.by_ref() {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word) ^ NL;
        let found = x.wrapping_sub(LO) & !x & HI;
        if found != 0 {
            return Some(base + (found.trailing_zeros() / 8) as usize);
        }
        base += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == b'\n')
        .map(|i| base + i)
}
