//! The command line: parse, load the config, hand over to the part that does the
//! work, turn the outcome into an exit code. Exit codes: 0 fine, 1 a problem was
//! reported, 2 the configuration or the command line is wrong, 3 `koprogo` is not
//! running (for commands that need it).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use crate::config::{self, Config};
use crate::control::{self, Request};
use crate::logs::{self, LogPipe};
use crate::supervisor::{self, privileges, reaper::Reaper, Boot, StatusReport};

#[derive(Parser, Debug)]
#[command(
    name = "koprogo",
    version,
    about = "The KoproGo appliance: PostgreSQL, the API server and HTTPS in one supervised process"
)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, env = "KOPROGO_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the supervisor (PID 1 in a container, or systemd's main process).
    Run,
    /// Validate the configuration and the environment; non-zero on any problem.
    Check,
    /// One row per service: state, pid, readiness, restarts, uptime, memory.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Capacity report: RAM, CPU, load, disk, PostgreSQL, latency, growth, and a
    /// recommendation. Exit 0 when every metric is ok, 1 on any warning or critical.
    Capacity {
        /// Machine-readable output (stable field names).
        #[arg(long)]
        json: bool,
    },
    /// Start a stopped service.
    Start { service: String },
    /// Stop a service (it stays stopped until `start`).
    Stop { service: String },
    /// Restart a service.
    Restart { service: String },
    /// Update the API server now: pre-update backup, the new binary started beside
    /// the running one, traffic switched once it is ready, the old one drained.
    Reload,
    /// Show service logs (all services, merged by time, when none is named).
    Logs {
        service: Option<String>,
        /// Keep printing new lines.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Lines to show first.
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: usize,
    },
    /// The local certificate authority (offices without internet).
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// The HTTPS certificate: what is served, when it renews.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// KoproGo-specific: print (or --reset) the superadmin password of admin@koprogo.com.
    AdminPassword {
        /// Generate a new one and apply it now (koprogo must be running).
        #[arg(long)]
        reset: bool,
    },
    /// Backups: database, uploads and secrets in one file (made by the running supervisor).
    Backup {
        #[command(subcommand)]
        command: BackupCommand,
    },
    /// Restore a backup: checked first, safety backup, API restarted; rolled back on failure.
    Restore {
        file: PathBuf,
        /// age identity file, for an encrypted (.kbk.age) backup.
        #[arg(long, short = 'i', value_name = "FILE")]
        identity: Option<PathBuf>,
        /// Restore even if the backup's database schema is newer than the running one.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        trust: crate::backup::cli::TrustArgs,
    },
    /// A psql shell on the private cluster (extra arguments go to psql).
    Psql {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// Make a backup now (retention and the copy hook follow).
    Create,
    /// The backups in backup.dir: name, time, size, verified.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Check a backup completely and restore it into a scratch database (default: the newest).
    Verify {
        file: Option<PathBuf>,
        /// age identity file, for an encrypted (.kbk.age) backup.
        #[arg(long, short = 'i', value_name = "FILE")]
        identity: Option<PathBuf>,
        #[command(flatten)]
        trust: crate::backup::cli::TrustArgs,
    },
    /// Print this appliance's backup key (for `--trust-key` on the machine a site moves to).
    Key,
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Write the local root CA certificate (PEM) to FILE, or stdout, for importing on office PCs.
    Export { file: Option<PathBuf> },
    /// Replace the local root CA with one limited to the configured names (the old
    /// key is deleted). With --prepare: make that root now and write it (PEM) to
    /// FILE or stdout, for the office PCs to import before the switch.
    Rotate {
        #[arg(long)]
        prepare: bool,
        file: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum CertCommand {
    /// Names, issuer, expiry, next renewal and last error of the served certificate.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Renew (or order) the certificate now.
    Renew,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = config::config_path(cli.config.as_deref());
    let cfg = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("koprogo: {e}");
            return ExitCode::from(2);
        }
    };
    // From a root shell, a command works as the service user before it touches
    // anything that user owns. `run` and `check` need root for the ports and the
    // directories; `ca export`, `backup verify` and `restore` first read or write
    // what the operator named (as root), then drop.
    let keeps_root = matches!(
        cli.command,
        Command::Run
            | Command::Check
            | Command::Ca { .. }
            | Command::Restore { .. }
            | Command::Backup {
                command: BackupCommand::Verify { .. }
            }
    );
    if !keeps_root {
        if let Err(e) = privileges::drop_for_command(&cfg) {
            eprintln!("koprogo: {e:#}");
            return ExitCode::from(2);
        }
    }
    match cli.command {
        Command::Run => run(cfg),
        Command::Check => check(&cfg),
        Command::Status { json } => status(&cfg, json),
        Command::Capacity { json } => capacity(&cfg, json),
        Command::Start { service } => command(&cfg, Request::Start { service }),
        Command::Stop { service } => command(&cfg, Request::Stop { service }),
        Command::Restart { service } => command(&cfg, Request::Restart { service }),
        Command::Reload => reload(&cfg),
        Command::Logs {
            service,
            follow,
            lines,
        } => show_logs(&cfg, service, follow, lines),
        Command::Ca {
            command: CaCommand::Export { file },
        } => ca_export(&cfg, file),
        Command::Ca {
            command: CaCommand::Rotate { prepare, file },
        } => ca_rotate(&cfg, prepare, file),
        Command::Cert {
            command: CertCommand::Status { json },
        } => cert_status(&cfg, json),
        Command::Cert {
            command: CertCommand::Renew,
        } => command(&cfg, Request::CertRenew),
        Command::AdminPassword { reset } => admin_password(&cfg, reset),
        Command::Psql { args } => psql(&cfg, args),
        Command::Backup { command } => match command {
            BackupCommand::Create => crate::backup::cli::create(&cfg),
            BackupCommand::List { json } => crate::backup::cli::list(&cfg, json),
            BackupCommand::Verify {
                file,
                identity,
                trust,
            } => crate::backup::cli::verify(&cfg, file, identity, &trust),
            BackupCommand::Key => crate::backup::cli::key(&cfg),
        },
        Command::Restore {
            file,
            identity,
            force,
            trust,
        } => crate::backup::cli::restore(&cfg, file, identity, force, &trust),
    }
}

fn check(cfg: &Config) -> ExitCode {
    let mut p = crate::check::preflight(cfg);
    let bins = p.bins.clone();
    crate::check::external_server(cfg, bins.as_ref(), &mut p);
    println!("ok: configuration {}", cfg.file.display());
    for n in &p.notes {
        println!("ok: {n}");
    }
    for w in &p.warnings {
        println!("warning: {w}");
    }
    for e in &p.problems {
        println!("error: {e}");
    }
    if p.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("{} problem(s) found", p.problems.len());
        ExitCode::from(1)
    }
}

fn run(cfg: Config) -> ExitCode {
    let started = Instant::now();
    let pre = crate::check::preflight(&cfg);
    if !pre.problems.is_empty() {
        for e in &pre.problems {
            eprintln!("koprogo: error: {e}");
        }
        eprintln!("koprogo: not started: fix the problems above (koprogo check lists them too)");
        return ExitCode::from(2);
    }
    let (Some(bins), Some(who)) = (pre.bins, pre.who) else {
        eprintln!("koprogo: internal: preflight gave no binaries or user");
        return ExitCode::from(1);
    };
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o027));
    // The API's own user: the launcher is forked first, before any listener, log
    // or lock is opened, while we may still switch users.
    let api = match privileges::api_identity(&cfg) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("koprogo: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Some(api) = &api {
        if let Err(e) = supervisor::launcher::start(&cfg.backend.command, api.clone()) {
            eprintln!("koprogo: {e:#}");
            return ExitCode::from(1);
        }
    }
    // Ports 80/443 are bound while we may still be root.
    let listeners = match crate::proxy::server::bind(&cfg) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("koprogo: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = privileges::prepare_and_drop(&cfg, &who, api.as_ref()) {
        eprintln!("koprogo: {e:#}");
        return ExitCode::from(1);
    }
    if api.is_some() {
        // Under the packaged unit we are not root: give up switching users now.
        if let Err(e) = supervisor::launcher::drop_switching() {
            eprintln!("koprogo: {e:#}");
            return ExitCode::from(1);
        }
    }
    let lock = match privileges::lock_state(&cfg) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("koprogo: {e:#}");
            return ExitCode::from(1);
        }
    };
    let settings = supervisor::log_settings(&cfg);
    let mut pipes = Vec::new();
    for name in ["koprogo", "postgres", "api", "access"] {
        match LogPipe::start(name, &settings) {
            Ok(p) => pipes.push(p),
            Err(e) => {
                eprintln!(
                    "koprogo: cannot start the {name} log in {}: {e}",
                    cfg.paths.logs.display()
                );
                return ExitCode::from(1);
            }
        }
    }
    let own = pipes.remove(0);
    let access_pipe = pipes.pop();
    let access = access_pipe.as_ref().and_then(|p| p.make_writer().ok());
    let own_file = match own.make_writer() {
        Ok(w) => Arc::new(RwLock::new(Some(w))),
        Err(e) => {
            eprintln!("koprogo: cannot write the supervisor log: {e}");
            return ExitCode::from(1);
        }
    };
    init_tracing(own_file.clone());
    tracing::info!(
        "koprogo {} starting (pid {})",
        env!("CARGO_PKG_VERSION"),
        std::process::id()
    );
    if std::process::id() != 1 {
        // Orphans of our children come to us, not to init.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    }
    let reaper = match Reaper::start() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{e:#}");
            return ExitCode::from(1);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let boot = Boot {
        cfg: Arc::new(cfg),
        bins,
        os_user: who.name,
        logs: pipes.into_iter().map(Arc::new).collect(),
        own_log: own.stats.clone(),
        reaper,
        lock,
        started,
        listeners,
        access,
    };
    let code = match runtime.block_on(supervisor::supervise(boot)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e:#}");
            1
        }
    };
    runtime.shutdown_timeout(Duration::from_secs(2));
    // Close our side of the supervisor log so its writer drains and exits.
    if let Ok(mut w) = own_file.write() {
        *w = None;
    }
    let _ = own.close(Duration::from_secs(5));
    if let Some(p) = access_pipe {
        let _ = p.close(Duration::from_secs(5));
    }
    ExitCode::from(code as u8)
}

/// The supervisor's own log: one formatted event per write, to stderr (the journal
/// under systemd) and to the `koprogo` log pipe.
#[derive(Clone)]
struct OwnLog(Arc<RwLock<Option<logs::PipeWriter>>>);

impl Write for OwnLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        if let Ok(mut g) = self.0.write() {
            if let Some(w) = g.as_mut() {
                let _ = w.write_all(buf);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_tracing(file: Arc<RwLock<Option<logs::PipeWriter>>>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KOPROGO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let writer = OwnLog(file);
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .with_writer(move || writer.clone())
        .try_init();
}

fn status(cfg: &Config, json: bool) -> ExitCode {
    let resp = match control::request(cfg, &Request::Status) {
        Ok(r) => r,
        Err(e) => {
            if json {
                println!("{{\"running\":false,\"services\":[]}}");
            }
            eprintln!("koprogo: {e:#}");
            return ExitCode::from(3);
        }
    };
    let Some(st) = resp.status else {
        eprintln!("koprogo: {}", resp.message);
        return ExitCode::from(1);
    };
    if json {
        match serde_json::to_string_pretty(&st) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("koprogo: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        print_status(&st);
    }
    if st.all_ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn capacity(cfg: &Config, json: bool) -> ExitCode {
    let resp = match control::request(cfg, &Request::Capacity) {
        Ok(r) => r,
        Err(e) => {
            if json {
                println!("{{\"running\":false}}");
            }
            eprintln!("koprogo: {e:#}");
            return ExitCode::from(3);
        }
    };
    let Some(report) = resp.capacity else {
        eprintln!(
            "koprogo: the running supervisor gave no capacity report{}",
            if resp.message.is_empty() {
                " (is it an older version? restart it after an upgrade)".to_string()
            } else {
                format!(": {}", resp.message)
            }
        );
        return ExitCode::from(1);
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("koprogo: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        print!("{}", crate::capacity::render::text(&report));
    }
    ExitCode::from(report.exit_code())
}

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

fn print_status(st: &StatusReport) {
    println!(
        "{:<10} {:<10} {:>7} {:<5} {:>8} {:>8} {:>10}  NOTE",
        "SERVICE", "STATE", "PID", "READY", "RESTARTS", "UPTIME", "MEMORY"
    );
    for s in &st.services {
        let state = serde_json::to_value(s.state)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
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

/// `koprogo reload`: waits for the whole update (the backup can take minutes).
fn reload(cfg: &Config) -> ExitCode {
    match control::request_long(cfg, &Request::Reload) {
        Ok(r) if r.ok => {
            println!("{}", r.message);
            ExitCode::SUCCESS
        }
        Ok(r) => {
            eprintln!("koprogo: {}", r.message);
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("koprogo: {e:#}");
            ExitCode::from(3)
        }
    }
}

fn command(cfg: &Config, req: Request) -> ExitCode {
    match control::request(cfg, &req) {
        Ok(r) if r.ok => {
            println!("{}", r.message);
            ExitCode::SUCCESS
        }
        Ok(r) => {
            eprintln!("koprogo: {}", r.message);
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("koprogo: {e:#}");
            ExitCode::from(3)
        }
    }
}

fn show_logs(cfg: &Config, service: Option<String>, follow: bool, n: usize) -> ExitCode {
    let dir = &cfg.paths.logs;
    // Every API instance (api-1, api-2, …) writes into api.log.
    let service = service.map(|s| {
        let instance = s
            .strip_prefix("api-")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if instance {
            "api".to_string()
        } else {
            s
        }
    });
    let names = match &service {
        Some(s) => vec![s.clone()],
        None => match logs::services(dir) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("koprogo: cannot list {}: {e}", dir.display());
                return ExitCode::from(1);
            }
        },
    };
    if let Some(s) = &service {
        if !dir.join(format!("{s}.log")).exists() {
            let known = logs::services(dir).unwrap_or_default();
            eprintln!(
                "koprogo: no log for {s:?} in {}: choose one of {}",
                dir.display(),
                known.join(", ")
            );
            return ExitCode::from(1);
        }
    }
    let single = names.len() == 1;
    // Merge the services' tails by their timestamp prefix.
    let mut lines: Vec<(String, String)> = Vec::new();
    for name in &names {
        match logs::tail(dir, name, n) {
            Ok(v) => lines.extend(v.into_iter().map(|l| (name.clone(), l))),
            Err(e) => {
                eprintln!("koprogo: cannot read the {name} log: {e}");
                return ExitCode::from(1);
            }
        }
    }
    lines.sort_by(|a, b| a.1.get(..24).cmp(&b.1.get(..24)));
    let skip = lines.len().saturating_sub(n);
    let mut out = std::io::stdout().lock();
    for (name, l) in lines.into_iter().skip(skip) {
        let _ = if single {
            writeln!(out, "{l}")
        } else {
            writeln!(out, "{name:<8} | {l}")
        };
    }
    drop(out);
    if !follow {
        return ExitCode::SUCCESS;
    }
    let handles: Vec<_> = names
        .into_iter()
        .map(|name| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut w = Prefixed {
                    prefix: if single {
                        String::new()
                    } else {
                        format!("{name:<8} | ")
                    },
                    buf: Vec::new(),
                };
                let _ = logs::follow(&dir, &name, &mut w, &|| false);
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    ExitCode::SUCCESS
}

/// Writes whole lines to stdout with a prefix (the service name).
struct Prefixed {
    prefix: String,
    buf: Vec<u8>,
}

impl Write for Prefixed {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        while let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=i).collect();
            let mut out = std::io::stdout().lock();
            out.write_all(self.prefix.as_bytes())?;
            out.write_all(&line)?;
            out.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn psql(cfg: &Config, args: Vec<String>) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let bins = match crate::postgres::binaries::find(cfg) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("koprogo: {e}");
            return ExitCode::from(1);
        }
    };
    let psql = bins.tool("psql");
    let mut cmd = std::process::Command::new(&psql);
    match &cfg.postgres.external {
        None => {
            cmd.arg("-h")
                .arg(&cfg.paths.run)
                .arg("-p")
                .arg(cfg.postgres.port.to_string())
                .arg("-U")
                .arg(crate::postgres::cluster::SUPERUSER)
                .arg("-d")
                .arg(crate::postgres::cluster::APP_DB);
        }
        Some(url) => {
            // The external server: libpq's environment (the password never in argv).
            let pw = match crate::postgres::external::password(cfg) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("koprogo: {e:#}");
                    return ExitCode::from(2);
                }
            };
            cmd.envs(url.libpq_env(cfg, pw.as_deref()));
        }
    }
    let err = cmd.args(args).exec();
    eprintln!("koprogo: cannot run {}: {err}", psql.display());
    ExitCode::from(1)
}

fn ca_export(cfg: &Config, file: Option<PathBuf>) -> ExitCode {
    // The CA is read (or made, before the first boot) as the service user: its files
    // are that user's, and a link planted among them gives it nothing.
    let pem = match privileges::as_service_user(cfg, 1 << 20, || {
        crate::tls::export_root(cfg)
            .map(String::into_bytes)
            .map_err(|e| format!("{e:#}"))
    }) {
        Ok(p) => String::from_utf8_lossy(&p).into_owned(),
        Err(e) => {
            eprintln!("koprogo: {e:#}");
            return ExitCode::from(1);
        }
    };
    write_pem(file, &pem)
}

/// `f` against the current directory (write_atomic needs a parent directory to
/// open: a bare `root.pem` has an empty one).
fn absolute(f: &std::path::Path) -> PathBuf {
    match std::env::current_dir() {
        Ok(d) if f.is_relative() => d.join(f),
        _ => f.to_path_buf(),
    }
}

/// A root CA certificate (PEM) to `file`, or stdout.
fn write_pem(file: Option<PathBuf>, pem: &str) -> ExitCode {
    match file {
        None => {
            print!("{pem}");
            ExitCode::SUCCESS
        }
        Some(f) => match crate::fsutil::write_atomic(&absolute(&f), pem.as_bytes(), 0o644) {
            Ok(()) => {
                eprintln!(
                    "koprogo: wrote the local root CA to {} (import it as a trusted root on the office PCs)",
                    f.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("koprogo: cannot write {}: {e}", f.display());
                ExitCode::from(1)
            }
        },
    }
}

/// Runs `f` with the service user's effective user and group when root (restored
/// after), so the files it creates under `<state>` belong to that user and no path
/// there is followed with root's rights. (The process is not dumpable meanwhile
/// and its real uid stays root: the service user can neither trace nor signal it.)
fn with_service_user_ids<T>(
    cfg: &Config,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    use nix::unistd::{setegid, seteuid, Gid, Uid};
    if !Uid::effective().is_root() {
        return f();
    }
    let who = privileges::target_identity(cfg)?;
    setegid(who.gid).map_err(|e| anyhow::anyhow!("setegid {}: {e}", who.gid))?;
    if let Err(e) = seteuid(who.uid) {
        let _ = setegid(Gid::from_raw(0));
        return Err(anyhow::anyhow!("seteuid {}: {e}", who.uid));
    }
    let out = f();
    seteuid(Uid::from_raw(0)).map_err(|e| anyhow::anyhow!("seteuid 0: {e}"))?;
    setegid(Gid::from_raw(0)).map_err(|e| anyhow::anyhow!("setegid 0: {e}"))?;
    out
}

/// `koprogo ca rotate [--prepare] [FILE]`: the CA work as the service user.
fn ca_rotate(cfg: &Config, prepare: bool, file: Option<PathBuf>) -> ExitCode {
    if prepare {
        return match with_service_user_ids(cfg, || crate::tls::prepare_next_root(cfg)) {
            Ok((next, pem)) => {
                eprintln!(
                    "koprogo: next root {} (serial {}), permits {}; the site keeps its current \
                     root. Import this one on every office PC now, then run `koprogo ca rotate`.",
                    next.subject,
                    next.serial,
                    next.permitted.join(", ")
                );
                write_pem(file, &pem)
            }
            Err(e) => {
                eprintln!("koprogo: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    if file.is_some() {
        eprintln!("koprogo: FILE goes with --prepare; after the rotate, `koprogo ca export FILE`");
        return ExitCode::from(2);
    }
    match with_service_user_ids(cfg, || crate::tls::rotate_root(cfg)) {
        Ok(r) => {
            match &r.old {
                Some((name, serial, constrained)) => println!(
                    "retired   {name} (serial {serial}{}); its key is deleted",
                    if *constrained {
                        ""
                    } else {
                        ", no name constraints"
                    }
                ),
                None => println!("retired   (no usable root before)"),
            }
            println!("new root  {} (serial {})", r.new.subject, r.new.serial);
            println!("permits   {}", r.new.permitted.join(", "));
            println!("expires   {}", r.new.not_after);
            println!(
                "The running koprogo serves a certificate from the new root within seconds.\n\
                 {}Remove the old root from the office PCs.",
                if r.new.exported {
                    "It is the root prepared before (ca rotate --prepare): PCs that imported it \
                     trust the site. "
                } else {
                    "Now export it (koprogo ca export FILE) and import it as a trusted root on \
                     every office PC; until then they warn about the site. "
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("koprogo: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn cert_status(cfg: &Config, json: bool) -> ExitCode {
    let (st, live) = match control::request(cfg, &Request::Status) {
        Ok(r) => match r.status {
            Some(s) => (s.tls, true),
            None => {
                eprintln!("koprogo: {}", r.message);
                return ExitCode::from(1);
            }
        },
        Err(_) => match crate::tls::status_from_disk(cfg) {
            Ok(s) => (s, false),
            Err(e) => {
                eprintln!("koprogo: {e:#}");
                return ExitCode::from(1);
            }
        },
    };
    if json {
        match serde_json::to_string_pretty(&st) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("koprogo: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        let dash = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
        println!("mode          {}", st.mode);
        println!("source        {}", st.source);
        println!("names         {}", st.names.join(", "));
        println!("issuer        {}", st.issuer);
        println!("valid from    {}", dash(&st.not_before));
        println!("expires       {}", dash(&st.not_after));
        println!("next renewal  {}", dash(&st.next_renewal));
        if let Some(e) = &st.last_error {
            println!("last error    {e}");
            println!("retry at      {}", dash(&st.retry_at));
        }
        if let Some(ca) = &st.ca {
            println!("local CA      {} (serial {})", ca.subject, ca.serial);
            println!(
                "CA permits    {}",
                if ca.constrained {
                    ca.permitted.join(", ")
                } else {
                    "ANY name (no name constraints)".into()
                }
            );
            if let Some(n) = &ca.next {
                println!("CA next       {n} (prepared; `koprogo ca rotate` switches to it)");
            }
            if let Some(w) = &ca.warning {
                println!("CA warning    {w}");
            }
        }
        if !live {
            println!("(koprogo is not running: read from disk)");
        }
    }
    if st.last_error.is_some() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn admin_password(cfg: &Config, reset: bool) -> ExitCode {
    if reset {
        return match control::request(cfg, &Request::AdminPasswordReset) {
            Ok(r) if r.ok => {
                println!("{}", r.message);
                ExitCode::SUCCESS
            }
            Ok(r) => {
                eprintln!("koprogo: {}", r.message);
                ExitCode::from(1)
            }
            Err(e) => {
                eprintln!("koprogo: {e:#}");
                ExitCode::from(3)
            }
        };
    }
    match crate::secrets::read_value(&cfg.paths.state, crate::secrets::ADMIN_PASSWORD) {
        Ok(Some(pw)) => {
            println!("{pw}");
            ExitCode::SUCCESS
        }
        Ok(None) => {
            eprintln!(
                "koprogo: no superadmin password yet in {}: start koprogo once to generate it",
                crate::secrets::path(&cfg.paths.state).display()
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("koprogo: {e:#}");
            ExitCode::from(1)
        }
    }
}
