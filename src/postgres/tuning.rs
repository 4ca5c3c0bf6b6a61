//! PostgreSQL settings derived from the memory budget and cores: the 2 GB VPS profile
//! KoproGo ran with, scaled. These go into the managed file `koprogo.conf`.

use crate::config::{Config, MemoryBudget};

const MB: u64 = 1 << 20;
const GB: u64 = 1 << 30;

/// The memory the tuning plans for: the configured budget, or the machine's RAM
/// (lowered to our cgroup's memory limit when one is set).
pub fn memory_budget(cfg: &Config) -> u64 {
    match cfg.postgres.memory {
        MemoryBudget::Bytes(b) => b,
        MemoryBudget::Auto => detect_memory().unwrap_or(2 * GB),
    }
}

/// Physical RAM, or the memory limit of our cgroup (or of a parent) if lower.
pub fn detect_memory() -> Option<u64> {
    let (ram, _) = crate::procfs::meminfo()?;
    Some(crate::procfs::cgroup_memory_limit().map_or(ram, |c| c.min(ram)))
}

pub fn cores() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
}

fn mb(bytes: u64) -> String {
    format!("{}MB", (bytes / MB).max(1))
}

/// `(name, value)` pairs, values already in postgresql.conf syntax.
pub fn settings(memory: u64, cores: u64, max_connections: u32) -> Vec<(&'static str, String)> {
    let shared_buffers = (memory / 8).clamp(32 * MB, 8 * GB);
    let (max_wal, min_wal) = if memory >= GB {
        ("1GB", "512MB")
    } else {
        ("256MB", "80MB")
    };
    vec![
        ("max_connections", max_connections.to_string()),
        ("shared_buffers", mb(shared_buffers)),
        ("effective_cache_size", mb(memory * 3 / 8)),
        ("maintenance_work_mem", mb((memory / 32).clamp(16 * MB, GB))),
        ("work_mem", mb((memory / 400).clamp(4 * MB, 64 * MB))),
        ("wal_buffers", mb((shared_buffers / 32).clamp(MB, 16 * MB))),
        ("max_wal_size", max_wal.into()),
        ("min_wal_size", min_wal.into()),
        ("checkpoint_completion_target", "0.9".into()),
        ("random_page_cost", "1.1".into()),
        ("effective_io_concurrency", "200".into()),
        ("default_statistics_target", "100".into()),
        (
            "max_parallel_workers_per_gather",
            (cores / 2).min(2).to_string(),
        ),
        ("log_min_duration_statement", "1000".into()),
        ("shared_preload_libraries", "'pg_stat_statements'".into()),
        // JIT needs writable+executable memory and rarely pays off for OLTP.
        ("jit", "off".into()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_gigabytes_gives_the_known_profile() {
        let s = settings(2 * GB, 1, 15);
        let get = |k: &str| s.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        assert_eq!(get("shared_buffers").as_deref(), Some("256MB"));
        assert_eq!(get("effective_cache_size").as_deref(), Some("768MB"));
        assert_eq!(get("maintenance_work_mem").as_deref(), Some("64MB"));
        assert_eq!(get("work_mem").as_deref(), Some("5MB"));
        assert_eq!(get("wal_buffers").as_deref(), Some("8MB"));
        assert_eq!(get("max_connections").as_deref(), Some("15"));
        assert_eq!(get("jit").as_deref(), Some("off"));
    }

    #[test]
    fn small_budgets_stay_sane() {
        let s = settings(128 * MB, 1, 10);
        let get = |k: &str| s.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
        assert_eq!(get("shared_buffers").as_deref(), Some("32MB"));
        assert_eq!(get("work_mem").as_deref(), Some("4MB"));
    }
}
