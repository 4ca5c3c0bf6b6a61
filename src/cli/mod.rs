//! The command line: parse, load the config, hand over to the part that does the
//! work, and turn the outcome into an exit code in one place ([`CliError::code`]).
//! Exit codes: 0 fine, 1 a problem was reported, 2 the configuration or the command
//! line is wrong, 3 `koprogo` is not running (only when its control socket cannot
//! be reached). [`commands`] holds the commands that ask the running supervisor or
//! read its files, [`ca`] the local CA commands, [`backup`] backup and restore,
//! [`print`] the human-readable tables; `run` itself is `supervisor::boot`.

pub mod backup;
mod ca;
mod commands;
mod print;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Config};
use crate::control::{ControlError, Request};
use crate::process::privileges;
use crate::supervisor::boot::{self, BootError};

/// Why a command failed, and so its exit code.
#[derive(Debug)]
pub enum CliError {
    /// A problem was reported (1).
    Failed(String),
    /// The configuration or the command line is wrong; `run` refused to start (2).
    Invalid(String),
    /// `koprogo` is not running: its control socket cannot be reached (3).
    NotRunning(String),
}

impl CliError {
    pub fn code(&self) -> u8 {
        match self {
            CliError::Failed(_) => 1,
            CliError::Invalid(_) => 2,
            CliError::NotRunning(_) => 3,
        }
    }

    fn message(&self) -> &str {
        match self {
            CliError::Failed(m) | CliError::Invalid(m) | CliError::NotRunning(m) => m,
        }
    }
}

impl From<ControlError> for CliError {
    fn from(e: ControlError) -> CliError {
        match e {
            ControlError::NotRunning(m) => CliError::NotRunning(m),
            ControlError::Failed(m) => CliError::Failed(m),
        }
    }
}

impl From<BootError> for CliError {
    fn from(e: BootError) -> CliError {
        match e {
            BootError::Refused(lines) => CliError::Invalid(lines.join("\nkoprogo: ")),
            BootError::Failed(m) => CliError::Failed(m),
        }
    }
}

/// What a command gives back: its exit code (0, or 1 after it printed a problem
/// itself), or the error to print and map.
pub type Outcome = Result<ExitCode, CliError>;

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
        trust: backup::TrustArgs,
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
        trust: backup::TrustArgs,
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
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("koprogo: {}", e.message());
            ExitCode::from(e.code())
        }
    }
}

fn dispatch(cli: Cli) -> Outcome {
    let path = config::config_path(cli.config.as_deref());
    let cfg = Config::load(&path).map_err(|e| CliError::Invalid(e.to_string()))?;
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
        privileges::drop_for_command(&cfg).map_err(|e| CliError::Invalid(format!("{e:#}")))?;
    }
    match cli.command {
        Command::Run => Ok(ExitCode::from(boot::run(cfg)?)),
        Command::Check => commands::check(&cfg),
        Command::Status { json } => commands::status(&cfg, json),
        Command::Capacity { json } => commands::capacity(&cfg, json),
        Command::Start { service } => commands::command(&cfg, Request::Start { service }),
        Command::Stop { service } => commands::command(&cfg, Request::Stop { service }),
        Command::Restart { service } => commands::command(&cfg, Request::Restart { service }),
        Command::Reload => commands::reload(&cfg),
        Command::Logs {
            service,
            follow,
            lines,
        } => commands::show_logs(&cfg, service, follow, lines),
        Command::Ca {
            command: CaCommand::Export { file },
        } => ca::export(&cfg, file),
        Command::Ca {
            command: CaCommand::Rotate { prepare, file },
        } => ca::rotate(&cfg, prepare, file),
        Command::Cert {
            command: CertCommand::Status { json },
        } => commands::cert_status(&cfg, json),
        Command::Cert {
            command: CertCommand::Renew,
        } => commands::command(&cfg, Request::CertRenew),
        Command::AdminPassword { reset } => commands::admin_password(&cfg, reset),
        Command::Psql { args } => commands::psql(&cfg, args),
        Command::Backup { command } => match command {
            BackupCommand::Create => backup::create(&cfg),
            BackupCommand::List { json } => backup::list(&cfg, json),
            BackupCommand::Verify {
                file,
                identity,
                trust,
            } => backup::verify(&cfg, file, identity, &trust),
            BackupCommand::Key => backup::key(&cfg),
        },
        Command::Restore {
            file,
            identity,
            force,
            trust,
        } => backup::restore(&cfg, file, identity, force, &trust),
    }
}
