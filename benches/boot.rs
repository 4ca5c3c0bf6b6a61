//! Boot and idle figures of the supervisor with the demo backend and a real
//! PostgreSQL: cold first boot (initdb included) and warm boot to "all ready"
//! (median of several runs), then the supervisor's idle RSS/PSS, CPU and context
//! switches over a quiet period (it must not poll busily). Run with
//! `scripts/bench.sh` (which builds the release binaries first).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::Appliance;

const RUNS: usize = 5;
const IDLE: Duration = Duration::from_secs(10);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Seconds from spawning `koprogo run` until status says all ready.
fn boot(a: &mut Appliance) -> f64 {
    let t = Instant::now();
    a.start();
    a.wait_ready();
    t.elapsed().as_secs_f64()
}

fn proc_field(pid: i32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| {
            l[key.len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Context switches of every thread of `pid`.
fn switches(pid: i32) -> u64 {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    rd.flatten()
        .map(|t| {
            let tid: i32 = t.file_name().to_string_lossy().parse().unwrap_or(0);
            let f = format!("task/{tid}/status");
            proc_field(pid, &f, "voluntary_ctxt_switches:")
                + proc_field(pid, &f, "nonvoluntary_ctxt_switches:")
        })
        .sum()
}

/// utime + stime in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(close) = stat.rfind(')') else {
        return 0;
    };
    let f: Vec<&str> = stat[close + 2..].split(' ').collect();
    let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    num(11) + num(12)
}

fn main() {
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    let mut keep = None;
    for _ in 0..RUNS {
        let mut a = Appliance::new("");
        cold.push(boot(&mut a));
        a.stop();
        keep = Some(a);
    }
    let mut a = keep.take().expect("one appliance");
    for _ in 0..RUNS {
        warm.push(boot(&mut a));
        a.stop();
    }
    println!("boot to all ready (demo backend, PostgreSQL 15, {RUNS} runs each):");
    println!(
        "  cold (initdb included): median {:.3} s  (runs: {:?})",
        median(cold.clone()),
        cold.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>()
    );
    println!(
        "  warm:                   median {:.3} s  (runs: {:?})",
        median(warm.clone()),
        warm.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>()
    );

    boot(&mut a);
    std::thread::sleep(Duration::from_secs(3));
    let pid = a.pid();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let (t0, c0) = (cpu_ticks(pid), switches(pid));
    let start = Instant::now();
    std::thread::sleep(IDLE);
    let secs = start.elapsed().as_secs_f64();
    let (t1, c1) = (cpu_ticks(pid), switches(pid));
    let rss = proc_field(pid, "status", "VmRSS:");
    let pss = proc_field(pid, "smaps_rollup", "Pss:");
    let threads = proc_field(pid, "status", "Threads:");
    println!("supervisor at idle over {secs:.0} s (all services ready, health checks every 5 s):");
    println!(
        "  RSS {:.1} MiB, PSS {:.1} MiB, {threads} threads",
        rss as f64 / 1024.0,
        pss as f64 / 1024.0
    );
    println!(
        "  CPU {:.3} % of one core ({} ticks), {:.1} context switches/s",
        (t1 - t0) as f64 / hz / secs * 100.0,
        t1 - t0,
        (c1 - c0) as f64 / secs
    );
    if let Some(st) = a.status() {
        for s in &st.services {
            println!(
                "  {}: {:.1} MiB (PSS of its process group)",
                s.name,
                s.memory_bytes.unwrap_or(0) as f64 / (1 << 20) as f64
            );
        }
    }
    a.stop();
}
