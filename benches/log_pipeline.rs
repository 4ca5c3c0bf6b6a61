//! Throughput of the log capture pipeline (`koprogo::logs`): 500 MB of 100-byte lines
//! written into a `LogPipe` from a thread of this process (a stand-in for a fast child),
//! with 64 MiB rotation and compression on. Prints lines/s and MB/s (median of 3 runs)
//! and checks that no line was lost. Run with `cargo bench --bench log_pipeline`.

use flate2::read::MultiGzDecoder;
use koprogo::logs::{LogPipe, LogSettings};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const LINE: usize = 100;
const TOTAL_BYTES: usize = 500_000_000;
const LINES: u64 = (TOTAL_BYTES / LINE) as u64;
const RUNS: usize = 3;

/// One run: returns the seconds from the first write until every line is in the files.
fn run(dir: &Path) -> io::Result<f64> {
    let settings = LogSettings {
        max_size: 64 << 20,
        rotate_daily: false,
        keep_files: 100,
        ..LogSettings::new(dir)
    };
    let pipe = LogPipe::start("bench", &settings)?;
    let stats = pipe.stats.clone();
    let mut out = File::from(pipe.writer_fd()?);
    // 1 MiB-ish block of 100-byte lines: 99 characters and a newline.
    let per_block = 10_000;
    let mut block = Vec::with_capacity(per_block * LINE);
    for i in 0..per_block {
        let start = block.len();
        write!(block, "bench line {i:06} ")?;
        block.resize(start + LINE - 1, b'x');
        block.push(b'\n');
    }
    let started = Instant::now();
    let producer = std::thread::spawn(move || -> io::Result<()> {
        let mut left = LINES as usize;
        while left > 0 {
            let n = left.min(per_block);
            out.write_all(&block[..n * LINE])?;
            left -= n;
        }
        Ok(())
    });
    producer
        .join()
        .map_err(|_| io::Error::other("producer panicked"))??;
    let deadline = Instant::now() + Duration::from_secs(300);
    while stats.lines_written.load(Ordering::Relaxed) < LINES && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let close_started = Instant::now();
    pipe.close(Duration::from_secs(300))?;
    let snap = stats.snapshot();
    println!(
        "  run: {:.2} s pipeline, then {:.2} s close (compression), {} rotations",
        elapsed,
        close_started.elapsed().as_secs_f64(),
        snap.rotations
    );
    if snap.lines_written != LINES || snap.lines_dropped != 0 || snap.last_error.is_some() {
        return Err(io::Error::other(format!("lines lost: {snap:?}")));
    }
    let on_disk = count_lines(dir)?;
    if on_disk != LINES {
        return Err(io::Error::other(format!(
            "{on_disk} lines on disk, {LINES} written"
        )));
    }
    Ok(elapsed)
}

/// Lines in every file of `dir` (decompressing `.gz`).
fn count_lines(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let file = File::open(&path)?;
        let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
            Box::new(MultiGzDecoder::new(file))
        } else {
            Box::new(file)
        };
        let mut reader = BufReader::with_capacity(1 << 20, reader);
        loop {
            let buf = reader.fill_buf()?;
            if buf.is_empty() {
                break;
            }
            total += buf.iter().filter(|&&b| b == b'\n').count() as u64;
            let n = buf.len();
            reader.consume(n);
        }
    }
    Ok(total)
}

fn main() -> io::Result<()> {
    let base = std::env::var_os("CARGO_TARGET_TMPDIR").map_or_else(std::env::temp_dir, Into::into);
    println!(
        "log_pipeline: {} MB in {} lines of {} bytes, max_size 64 MiB, compress on",
        TOTAL_BYTES / 1_000_000,
        LINES,
        LINE
    );
    let mut times = Vec::new();
    for _ in 0..RUNS {
        let dir = tempfile::tempdir_in(&base)?;
        times.push(run(dir.path())?);
    }
    times.sort_by(f64::total_cmp);
    let median = times[RUNS / 2];
    println!(
        "median of {RUNS}: {:.2} s, {:.0} lines/s, {:.0} MB/s (input), no line lost",
        median,
        LINES as f64 / median,
        TOTAL_BYTES as f64 / 1e6 / median
    );
    Ok(())
}
