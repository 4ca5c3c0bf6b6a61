//! Reading /proc: the fields of a process's `stat` line and the members of a
//! process group. Used by status (memory) and metrics (CPU).

/// The fields of `/proc/<pid>/stat` after the command name (which is in
/// parentheses and may hold spaces): index 0 is the state, 1 the parent pid,
/// 2 the process group, 11 utime, 12 stime.
pub fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    Some(rest.split(' ').map(String::from).collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_process() {
        let me = std::process::id() as i32;
        let f = stat_fields(me).expect("own stat");
        assert!(matches!(f[0].as_str(), "R" | "S"));
        let pgid = nix::unistd::getpgrp().as_raw();
        assert!(group_members(pgid).contains(&me));
    }
}
