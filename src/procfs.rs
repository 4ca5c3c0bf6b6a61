//! Reading /proc: the fields of a process's `stat` line and the members of a
//! process group (status: memory, metrics: CPU), the host's memory, load
//! averages and CPU time counters (metrics and `koprogo capacity`), and the memory
//! limit of our own cgroup (PostgreSQL's tuning), and a child's state for a stop.

use std::path::{Path, PathBuf};

/// The fields of `/proc/<pid>/stat` after the command name (which is in
/// parentheses and may hold spaces): index 0 is the state, 1 the parent pid,
/// 2 the process group, 11 utime, 12 stime.
pub fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    Some(rest.split(' ').map(String::from).collect())
}

/// The executable of `pid` (`/proc/<pid>/exe`), if it can be read.
pub fn exe(pid: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// The working directory of `pid` (`/proc/<pid>/cwd`), if it can be read.
pub fn cwd(pid: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/cwd")).ok()
}

/// Every live process whose process group is `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|pid| {
            stat_fields(*pid).and_then(|f| f.get(2).and_then(|g| g.parse::<i32>().ok()))
                == Some(pgid)
        })
        .collect()
}

/// utime + stime of `pid`, in clock ticks.
pub fn cpu_ticks(pid: i32) -> u64 {
    stat_fields(pid)
        .map(|f| {
            let n = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            n(11) + n(12)
        })
        .unwrap_or(0)
}

/// What the supervisor checks of a child it stops or reports: its state letter
/// (`T` stopped, `Z` zombie…), CPU time and OOM score adjustment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcInfo {
    pub state: char,
    pub pgid: i32,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    pub oom_score_adj: Option<i32>,
}

impl ProcInfo {
    /// Stopped by a signal (`T`) or a tracer (`t`): it cannot act on a stop signal.
    pub fn stopped(&self) -> bool {
        matches!(self.state, 'T' | 't')
    }
}

/// `pid`'s `oom_score_adj`, if it can be read.
pub fn oom_score_adj(pid: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `pid`'s [`ProcInfo`], if its /proc entry can be read.
pub fn inspect(pid: i32) -> Option<ProcInfo> {
    let f = stat_fields(pid)?;
    let n = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    Some(ProcInfo {
        state: f.first()?.chars().next()?,
        pgid: f.get(2)?.parse().ok()?,
        cpu_ticks: n(11) + n(12),
        oom_score_adj: oom_score_adj(pid),
    })
}

/// `MemTotal` and `MemAvailable` of `/proc/meminfo`, in bytes.
pub fn meminfo() -> Option<(u64, u64)> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let kb = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|v| v * 1024)
    };
    Some((kb("MemTotal:")?, kb("MemAvailable:")?))
}

/// The lowest memory limit on our own cgroup and its ancestors, in bytes: cgroup v2
/// `memory.max` and `memory.high`, cgroup v1 `memory.limit_in_bytes` (a systemd
/// `MemoryMax=`/`MemoryHigh=` on the unit or its slice, a container's limit).
/// `None` when no limit is set or cgroups cannot be read.
pub fn cgroup_memory_limit() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    memory_limit_in(&cgroup, &mountinfo)
}

/// [`cgroup_memory_limit`] from the text of `/proc/self/cgroup` and
/// `/proc/self/mountinfo` (whose mount points name the directories read).
fn memory_limit_in(cgroup: &str, mountinfo: &str) -> Option<u64> {
    let mut lowest: Option<u64> = None;
    // hierarchy-ID:controllers:path; v2 is the line with no controllers.
    for (controllers, path) in cgroup.lines().filter_map(|l| {
        let (_, rest) = l.split_once(':')?;
        rest.split_once(':')
    }) {
        let v2 = controllers.is_empty();
        if !v2 && !controllers.split(',').any(|c| c == "memory") {
            continue;
        }
        let Some(dir) = cgroup_dir(mountinfo, v2, path) else {
            continue;
        };
        let files: &[&str] = if v2 {
            &["memory.max", "memory.high"]
        } else {
            &["memory.limit_in_bytes"]
        };
        for d in dir.0.ancestors().take_while(|d| d.starts_with(&dir.1)) {
            for f in files {
                // "max" (v2) is no limit; v1's "no limit" is a huge number.
                if let Some(n) = std::fs::read_to_string(d.join(f))
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                {
                    lowest = Some(lowest.map_or(n, |l| l.min(n)));
                }
            }
        }
    }
    lowest
}

/// The directory of cgroup `path` and the mount point of its hierarchy: the v2
/// (`cgroup2`) mount, or the v1 mount with the memory controller.
fn cgroup_dir(mountinfo: &str, v2: bool, path: &str) -> Option<(PathBuf, PathBuf)> {
    mountinfo.lines().find_map(|line| {
        // ID parent major:minor root mount-point options [optional…] - type source super-options
        let (left, right) = line.split_once(" - ")?;
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (root, point) = (
            unescape(left.get(3)?),
            PathBuf::from(unescape(left.get(4)?)),
        );
        let ok = match (v2, *right.first()?) {
            (true, "cgroup2") => true,
            (false, "cgroup") => right.get(2)?.split(',').any(|o| o == "memory"),
            _ => false,
        };
        if !ok {
            return None;
        }
        // The path is from the hierarchy's root; the mount shows the part below `root`.
        let rel = Path::new(path).strip_prefix(&root).ok()?;
        Some((point.join(rel), point))
    })
}

/// A mountinfo field with its octal escapes (`\040` for a space) decoded.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|o| o.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(o)) => {
                out.push(o.iter().fold(0u8, |n, c| n.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The 1-, 5- and 15-minute load averages of `/proc/loadavg`.
pub fn loadavg() -> Option<[f64; 3]> {
    parse_loadavg(&std::fs::read_to_string("/proc/loadavg").ok()?)
}

fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut it = text.split_whitespace().map(|x| x.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// The host's CPU time counters (first line of `/proc/stat`), in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// Everything but idle and iowait.
    pub busy: u64,
    pub total: u64,
}

impl CpuTimes {
    /// Busy share of the time between `earlier` and `self`, 0..=1; `None` when
    /// no tick passed.
    pub fn busy_since(&self, earlier: &CpuTimes) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total)?;
        let busy = self.busy.checked_sub(earlier.busy)?;
        (total > 0).then(|| (busy as f64 / total as f64).min(1.0))
    }
}

pub fn cpu_times() -> Option<CpuTimes> {
    parse_cpu_times(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn parse_cpu_times(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse::<u64>().ok())
        .collect::<Option<_>>()?;
    if v.len() < 4 {
        return None;
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some(CpuTimes {
        busy: total - idle,
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_process() {
        let me = std::process::id() as i32;
        let f = stat_fields(me).expect("own stat");
        assert_eq!(exe(me), std::env::current_exe().ok());
        assert_eq!(cwd(me), std::env::current_dir().ok());
        assert!(matches!(f[0].as_str(), "R" | "S"));
        let pgid = nix::unistd::getpgrp().as_raw();
        assert!(group_members(pgid).contains(&me));
    }

    #[test]
    fn parses_host_files() {
        assert_eq!(
            parse_meminfo("MemTotal:        2000 kB\nMemFree: 1 kB\nMemAvailable:     500 kB\n"),
            Some((2000 * 1024, 500 * 1024))
        );
        assert_eq!(parse_meminfo("MemTotal: 2000 kB\n"), None);
        assert_eq!(
            parse_loadavg("0.50 1.25 2.00 1/234 5678\n"),
            Some([0.5, 1.25, 2.0])
        );
        assert_eq!(parse_loadavg("garbage"), None);
        let a = parse_cpu_times("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n").expect("cpu");
        assert_eq!(
            a,
            CpuTimes {
                busy: 200,
                total: 1000
            }
        );
        let b = CpuTimes {
            busy: 300,
            total: 1200,
        };
        assert_eq!(b.busy_since(&a), Some(0.5));
        assert_eq!(a.busy_since(&a), None);
        assert!(meminfo().is_some() && loadavg().is_some() && cpu_times().is_some());
    }

    /// A fake cgroup tree: v1 memory at `mem/`, v2 at `unified/`.
    fn fake_tree(dir: &Path, files: &[(&str, &str)]) -> String {
        for (f, v) in files {
            let p = dir.join(f);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, v).expect("write");
        }
        let d = dir.display();
        format!(
            "31 23 0:28 / {d} rw - tmpfs tmpfs rw\n\
             32 31 0:29 / {d}/cpu rw,relatime - cgroup cgroup rw,cpu\n\
             35 31 0:32 / {d}/mem rw,relatime - cgroup cgroup rw,memory\n\
             41 31 0:38 /ns {d}/unified rw,relatime - cgroup2 cgroup2 rw\n"
        )
    }

    #[test]
    fn the_lowest_memory_limit_up_our_cgroups_counts() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mountinfo = fake_tree(
            tmp.path(),
            &[
                // v1: unlimited at the root, 1 GiB on the parent, 2 GiB on ours.
                ("mem/memory.limit_in_bytes", "9223372036854771712\n"),
                ("mem/slice/memory.limit_in_bytes", "1073741824\n"),
                ("mem/slice/unit/memory.limit_in_bytes", "2147483648\n"),
                // A sibling's lower limit does not count.
                ("mem/slice/other/memory.limit_in_bytes", "1\n"),
                // v2 mounted from /ns: max on ours, high 512 MiB on its slice.
                ("unified/memory.max", "max\n"),
                ("unified/system.slice/memory.max", "max\n"),
                ("unified/system.slice/memory.high", "536870912\n"),
                ("unified/system.slice/koprogo.service/memory.max", "max\n"),
                ("cpu/slice/unit/memory.limit_in_bytes", "1\n"),
            ],
        );
        let v1 = "4:memory:/slice/unit\n1:cpu:/slice/unit\n0::/\n";
        assert_eq!(memory_limit_in(v1, &mountinfo), Some(1 << 30));
        let v2 = "0::/ns/system.slice/koprogo.service\n";
        assert_eq!(memory_limit_in(v2, &mountinfo), Some(512 << 20));
        // Both: the lowest.
        assert_eq!(
            memory_limit_in(&format!("{v1}{v2}"), &mountinfo),
            Some(512 << 20)
        );
        // No limit anywhere, or no cgroup files: none.
        assert_eq!(memory_limit_in("0::/ns/other\n", &mountinfo), None);
        assert_eq!(memory_limit_in(v1, ""), None);
        assert_eq!(unescape("/a\\040b\\"), "/a b\\");
    }
}
