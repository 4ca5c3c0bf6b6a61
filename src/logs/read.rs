//! Reading logs for `koprogo logs`: owns [`tail`] (the last lines across the current and
//! rotated files, `.gz` included), [`follow`] (`-f`, following rename + reopen rotation)
//! and [`services`]. Read-only: never modifies a file.

use super::check_service_name;
use super::rotate::{self, Rotated};
use flate2::read::MultiGzDecoder;
use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

/// How often [`follow`] looks for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
const BLOCK: usize = 64 * 1024;

fn named(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// The services that have a log in `dir` (names of `*.log` files), sorted.
pub fn services(dir: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| named(dir, e))? {
        let entry = entry.map_err(|e| named(dir, e))?;
        let name = entry.file_name();
        let Some(service) = name.to_str().and_then(|n| n.strip_suffix(".log")) else {
            continue;
        };
        if !service.is_empty() && entry.file_type().is_ok_and(|t| t.is_file()) {
            names.push(service.to_owned());
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// The last `n` lines of `<dir>/<service>.log` (timestamps included, newlines removed),
/// taking older lines from the newest rotated files (plain or `.gz`) when the current
/// file has fewer; oldest first. `NotFound` when the service has no log at all.
pub fn tail(dir: &Path, service: &str, n: usize) -> io::Result<Vec<String>> {
    check_service_name(service)?;
    let current = dir.join(format!("{service}.log"));
    let mut found = false;
    // Newest file first; each part is in file order.
    let mut parts: Vec<Vec<String>> = Vec::new();
    let mut have = 0;
    match last_lines_plain(&current, n) {
        Ok(lines) => {
            found = true;
            have += lines.len();
            parts.push(lines);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(named(&current, e)),
    }
    if have < n || !found {
        let groups = rotate::rotated(dir, service).map_err(|e| named(dir, e))?;
        for group in groups.iter().rev() {
            found = true;
            if have >= n {
                break;
            }
            let lines = last_lines_rotated(group, n - have)?;
            have += lines.len();
            parts.push(lines);
        }
    }
    if !found {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no log for {service:?} in {}", dir.display()),
        ));
    }
    Ok(parts.into_iter().rev().flatten().collect())
}

/// The last `n` lines of one rotated file: the plain file if it is still there (it may
/// be in the middle of being compressed), else the `.gz`.
fn last_lines_rotated(group: &Rotated, n: usize) -> io::Result<Vec<String>> {
    if let Some(plain) = &group.plain {
        match last_lines_plain(plain, n) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && group.gz.is_none() => {
                let gz = rotate::with_suffix(plain, ".gz");
                return last_lines_gz(&gz, n).map_err(|e| named(&gz, e));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            other => return other.map_err(|e| named(plain, e)),
        }
    }
    match &group.gz {
        Some(gz) => last_lines_gz(gz, n).map_err(|e| named(gz, e)),
        None => Ok(Vec::new()),
    }
}

fn to_lines(data: &[u8], skip_first: bool) -> Vec<String> {
    if data.is_empty() {
        return Vec::new();
    }
    data.strip_suffix(b"\n")
        .unwrap_or(data)
        .split(|&b| b == b'\n')
        .skip(usize::from(skip_first))
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect()
}

/// The last `n` lines of a plain file, reading backwards in blocks.
fn last_lines_plain(path: &Path, n: usize) -> io::Result<Vec<String>> {
    let mut file = File::open(path)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut pos = file.metadata()?.len();
    let mut blocks: Vec<Vec<u8>> = Vec::new(); // newest first
    let mut newlines = 0;
    let mut ends_with_newline = false;
    // Stop once the data read holds `n` newlines besides the file's final one: the lines
    // after the first of them are the `n` wanted.
    while pos > 0 && newlines < n + usize::from(ends_with_newline) {
        let start = pos.saturating_sub(BLOCK as u64);
        let mut block = vec![0u8; (pos - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut block)?;
        if blocks.is_empty() {
            ends_with_newline = block.last() == Some(&b'\n');
        }
        newlines += block.iter().filter(|&&b| b == b'\n').count();
        blocks.push(block);
        pos = start;
    }
    let data: Vec<u8> = blocks.into_iter().rev().flatten().collect();
    let mut lines = to_lines(&data, pos > 0);
    let extra = lines.len().saturating_sub(n);
    lines.drain(..extra);
    Ok(lines)
}

/// The last `n` lines of a gzip file, decompressing it as a stream.
fn last_lines_gz(path: &Path, n: usize) -> io::Result<Vec<String>> {
    let mut reader = BufReader::with_capacity(BLOCK, MultiGzDecoder::new(File::open(path)?));
    let mut ring: VecDeque<String> = VecDeque::with_capacity(n.min(100_000));
    let mut line = Vec::new();
    if n == 0 {
        return Ok(Vec::new());
    }
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        if ring.len() == n {
            ring.pop_front();
        }
        ring.push_back(String::from_utf8_lossy(&line).into_owned());
    }
    Ok(ring.into())
}

/// The file being followed.
struct Followed {
    file: File,
    ino: u64,
    pos: u64,
}

impl Followed {
    fn open(path: &Path, at_end: bool) -> io::Result<Followed> {
        let mut file = File::open(path)?;
        let meta = file.metadata()?;
        let pos = if at_end { meta.len() } else { 0 };
        file.seek(SeekFrom::Start(pos))?;
        Ok(Followed {
            file,
            ino: meta.ino(),
            pos,
        })
    }

    /// Copies the complete lines added since the last call to `out`, keeping a partial
    /// last line in `pending`.
    fn drain(&mut self, pending: &mut Vec<u8>, out: &mut dyn Write) -> io::Result<()> {
        if self.file.metadata()?.len() < self.pos {
            // Truncated in place by someone else: start over.
            self.pos = self.file.seek(SeekFrom::Start(0))?;
            pending.clear();
        }
        let mut buf = vec![0u8; BLOCK];
        loop {
            let n = match self.file.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.pos += n as u64;
            pending.extend_from_slice(&buf[..n]);
            if let Some(last) = pending.iter().rposition(|&b| b == b'\n') {
                out.write_all(&pending[..=last])?;
                pending.drain(..=last);
            }
        }
    }
}

/// `koprogo logs -f`: prints the lines added to the current file from now on as they
/// arrive, polling every 200 ms, following rotation (a new inode at the path: the old file
/// is read to its end first). Waits for the file if it does not exist yet. Returns when
/// `stop()` returns true (checked every poll) or writing to `out` fails.
pub fn follow(
    dir: &Path,
    service: &str,
    out: &mut dyn Write,
    stop: &dyn Fn() -> bool,
) -> io::Result<()> {
    check_service_name(service)?;
    let path = dir.join(format!("{service}.log"));
    let mut current: Option<Followed> = None;
    let mut at_end = true;
    let mut pending = Vec::new();
    loop {
        if stop() {
            return Ok(());
        }
        if current.is_none() {
            match Followed::open(&path, at_end) {
                Ok(f) => current = Some(f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(named(&path, e)),
            }
            // A file that appears later is new: read it from its start.
            at_end = false;
        }
        let mut switched = false;
        if let Some(f) = &mut current {
            // Look at the path *before* reading: if it already names another file, the
            // writer has finished with ours, so reading to EOF gets all of it.
            let at_path = fs::metadata(&path).map(|m| m.ino()).ok();
            f.drain(&mut pending, out).map_err(|e| named(&path, e))?;
            if at_path != Some(f.ino) {
                if !pending.is_empty() {
                    pending.push(b'\n');
                    out.write_all(&pending)?;
                    pending.clear();
                }
                current = None;
                switched = at_path.is_some();
            }
        }
        out.flush()?;
        if !switched {
            std::thread::sleep(FOLLOW_POLL);
        }
    }
}
