//! The OOM policy: who the kernel's OOM killer takes when the box runs out of
//! memory. On a 2 GB VPS that is the likeliest real fault, and the choice matters:
//! the API server restarts in about a second; the postmaster takes every
//! connection with it and goes through crash recovery; the supervisor takes the
//! whole site until systemd restarts it.
//!
//! | process | `oom_score_adj` | set by |
//! |---|---:|---|
//! | supervisor (and the launcher) | -1000: never chosen | the unit's `OOMScoreAdjust=`, or itself when it starts as root |
//! | postmaster | -900: protected, yet not beyond the kernel's last resort | the reaper, between fork and exec |
//! | PostgreSQL backends and workers | 0 | PostgreSQL itself (`PG_OOM_ADJUST_FILE`/`PG_OOM_ADJUST_VALUE`) |
//! | API server | +700: first in line | the launcher's child (or the reaper), between fork and exec |
//!
//! Raising one's own value is always allowed; lowering it below the lowest value a
//! privileged process set needs CAP_SYS_RESOURCE. So the children's values work
//! under the unit (the supervisor starts at -1000, children raise theirs), and
//! without privilege only the API's rise is possible: `koprogo check` and
//! `status` say what could not be applied.

use std::fs::OpenOptions;
use std::io::Write;

/// The supervisor's value: the OOM killer never takes it.
pub const SUPERVISOR: i32 = -1000;
/// The postmaster's value: protected. Not -1000, so that a box with nothing else
/// left to kill still has a candidate instead of a kernel panic.
pub const POSTMASTER: i32 = -900;
/// What PostgreSQL sets in every process it forks (backends, checkpointer, …).
pub const POSTGRES_CHILDREN: i32 = 0;
/// The API server's value: the first the OOM killer takes (it restarts in a second).
pub const API: i32 = 700;

/// The value `pid` has now, if it can be read.
pub fn read(pid: i32) -> Option<i32> {
    crate::procfs::oom_score_adj(pid)
}

/// Sets our own value (the supervisor at boot, before it drops privileges).
pub fn set_self(value: i32) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .open("/proc/self/oom_score_adj")?;
    f.write_all(value.to_string().as_bytes())
}

/// The value a service's main process should have under the policy.
pub fn wanted(service: &str) -> Option<i32> {
    match service {
        "postgres" => Some(POSTMASTER),
        s if s == "api" || s.starts_with("api-") => Some(API),
        _ => None,
    }
}

/// The decimal text of `value`, NUL-terminated, prepared before a fork: the child
/// writes it with raw system calls only.
pub fn text(value: i32) -> Vec<u8> {
    let mut t = value.to_string().into_bytes();
    t.push(0);
    t
}

/// Writes `text` (from [`text`], without its NUL) to `/proc/self/oom_score_adj`.
/// Async-signal-safe: for the window between fork and exec. Returns false when the
/// kernel refused (the value stays inherited; status and `check` show it).
///
/// # Safety
/// Only raw system calls on memory prepared before the fork.
pub unsafe fn write_in_child(text: &[u8]) -> bool {
    let fd = libc::open(
        c"/proc/self/oom_score_adj".as_ptr(),
        libc::O_WRONLY | libc::O_CLOEXEC,
    );
    if fd < 0 {
        return false;
    }
    let len = text.len().saturating_sub(1);
    let n = libc::write(fd, text.as_ptr().cast(), len);
    libc::close(fd);
    n == len as isize
}

/// What is wrong with the values in a status report: one line per process whose
/// value is not the policy's (empty: the policy holds).
pub fn problems(supervisor: Option<i32>, services: &[(String, Option<i32>)]) -> Vec<String> {
    let mut out = Vec::new();
    match supervisor {
        Some(SUPERVISOR) => {}
        Some(v) => out.push(format!(
            "the supervisor's oom_score_adj is {v}, not {SUPERVISOR}: the kernel's OOM killer may \
             take the whole site; lowering it needs CAP_SYS_RESOURCE: start koprogo with the \
             packaged unit (OOMScoreAdjust=-1000) or as root with that capability"
        )),
        None => out.push("the supervisor's oom_score_adj cannot be read".into()),
    }
    for (name, value) in services {
        let (Some(want), Some(v)) = (wanted(name), value) else {
            continue;
        };
        if *v != want {
            out.push(format!(
                "{name}'s oom_score_adj is {v}, not {want}: {}",
                if want < 0 {
                    "lowering it needs CAP_SYS_RESOURCE, which the supervisor lacked at boot \
                     (start koprogo with the packaged unit or as root with that capability)"
                } else {
                    "the kernel refused to raise it"
                }
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_orders_the_processes() {
        const {
            assert!(
                SUPERVISOR < POSTMASTER
                    && POSTMASTER < POSTGRES_CHILDREN
                    && POSTGRES_CHILDREN < API
            )
        };
        assert_eq!(wanted("api-2"), Some(API));
        assert_eq!(wanted("postgres"), Some(POSTMASTER));
        assert_eq!(wanted("proxy"), None);
        assert_eq!(text(-900), b"-900\0");
    }

    #[test]
    fn problems_name_the_process_and_the_fix() {
        assert!(problems(
            Some(-1000),
            &[("postgres".into(), Some(-900)), ("api".into(), Some(700))]
        )
        .is_empty());
        let p = problems(
            Some(0),
            &[("postgres".into(), Some(0)), ("api".into(), None)],
        );
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("OOMScoreAdjust=-1000"), "{p:?}");
        assert!(
            p[1].contains("postgres's oom_score_adj is 0, not -900"),
            "{p:?}"
        );
    }

    #[test]
    fn a_child_raises_its_own_value() {
        // A forked child raises its value (always allowed), and the parent's is unchanged.
        let before = read(std::process::id() as i32);
        let t = text(before.unwrap_or(0).max(0) + 1);
        // SAFETY: fork in a test; the child makes raw system calls and _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            // SAFETY: raw calls then _exit.
            unsafe {
                let ok = write_in_child(&t);
                libc::_exit(if ok { 0 } else { 1 });
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        assert_eq!(read(std::process::id() as i32), before);
    }
}
