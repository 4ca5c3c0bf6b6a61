//! The human-readable `koprogo status` table and its backup and update lines.

use crate::control::StatusReport;

fn human_bytes(b: Option<u64>) -> String {
    use crate::config::units::{human_bytes, ByteUnits};
    b.map_or("-".into(), |b| human_bytes(b, ByteUnits::MibUp))
}

fn human_secs(s: Option<u64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 60 => format!("{s}s"),
        Some(s) if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        Some(s) if s < 86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        Some(s) => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

pub fn print_status(st: &StatusReport) {
    println!(
        "{:<10} {:<10} {:>7} {:<5} {:>8} {:>8} {:>10}  NOTE",
        "SERVICE", "STATE", "PID", "READY", "RESTARTS", "UPTIME", "MEMORY"
    );
    for s in &st.services {
        let state = s.state.as_str();
        let mut note = Vec::new();
        if let (Some(p), true) = (s.port, s.ready) {
            note.push(format!("127.0.0.1:{p}"));
        }
        if let Some(n) = s.next_start_in_secs {
            note.push(format!(
                "next try in {n:.0}s (crash loop: {} failures)",
                s.failures
            ));
        }
        if let Some(x) = &s.external {
            note.push(format!("external {x}"));
        }
        if let Some(e) = &s.last_error {
            note.push(e.clone());
        } else if let Some(e) = &s.last_exit {
            if !s.ready {
                note.push(format!("last: {e}"));
            }
        }
        println!(
            "{:<10} {:<10} {:>7} {:<5} {:>8} {:>8} {:>10}  {}",
            s.name,
            state,
            s.pid.map_or("-".into(), |p| p.to_string()),
            if s.ready { "yes" } else { "no" },
            s.restarts,
            human_secs(s.uptime_secs),
            human_bytes(s.memory_bytes),
            note.join("; ")
        );
    }
    println!(
        "koprogo {} pid {} up {}, {}; {}",
        st.version,
        st.pid,
        human_secs(Some(st.uptime_secs)),
        human_bytes(st.memory_bytes),
        if st.all_ready {
            "all ready"
        } else {
            "NOT all ready"
        }
    );
    for w in &st.oom.problems {
        println!("oom: {w}");
    }
    print_backup(&st.backup);
    print_update(&st.update);
    if let Some(w) = st.tls.ca.as_ref().and_then(|c| c.warning.as_ref()) {
        println!("tls: {w}");
    }
    for (name, v) in &st.logs {
        let dropped = v.get("lines_dropped").and_then(|x| x.as_u64()).unwrap_or(0);
        if dropped > 0 || v.get("disk_full").and_then(|x| x.as_bool()) == Some(true) {
            println!(
                "log {name}: {dropped} lines dropped{}",
                v.get("last_error")
                    .and_then(|x| x.as_str())
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            );
        }
    }
}

fn print_backup(b: &crate::backup::BackupStatus) {
    let last = match &b.last_success {
        Some(l) => format!(
            "last {} ({})",
            l.time,
            crate::backup::human_size(l.size_bytes)
        ),
        None => "no backup yet".into(),
    };
    let next = match (&b.running, &b.next_run) {
        (Some(op), _) => format!("; {op} running now"),
        (None, Some(n)) => format!("; next {n}"),
        (None, None) if !b.enabled => "; schedule off".into(),
        _ => String::new(),
    };
    println!("backup: {last}{next}");
    if let Some(e) = &b.last_error {
        println!("backup: last error: {e}");
    }
    if let Some(e) = &b.last_copy_error {
        println!("backup: copy command failed: {e}");
    }
}

fn print_update(u: &crate::update::UpdateStatus) {
    if let Some(r) = &u.running {
        println!("update: running now: {r}");
    }
    if let Some(p) = &u.pending {
        println!("update: {p}");
    }
    if let Some(l) = &u.last {
        println!(
            "update: last {} ({}): {}{}",
            l.time,
            l.trigger,
            if l.ok { "" } else { "FAILED: " },
            l.message
        );
    }
    if let Some(b) = &u.pre_update_backup {
        println!("update: pre-update backup {b} (to roll back: reinstall the previous version, then `koprogo restore {b}`)");
    }
}
