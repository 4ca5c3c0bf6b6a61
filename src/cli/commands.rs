//! The commands that ask the running supervisor over the control socket (`status`,
//! `capacity`, `start|stop|restart`, `reload`, `cert`, `admin-password --reset`) or
//! read what it leaves on disk (`logs`, `admin-password`, `check`, `psql`).

use std::io::Write;
use std::process::ExitCode;

use super::print::print_status;
use super::{CliError, Outcome};
use crate::config::Config;
use crate::control::{self, ControlError, Request};
use crate::logs;

pub fn check(cfg: &Config) -> Outcome {
    let mut p = crate::check::preflight(cfg);
    let bins = p.bins.clone();
    crate::check::external_server(cfg, bins.as_ref(), &mut p);
    oom_policy(cfg, &mut p);
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
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{} problem(s) found", p.problems.len());
        Ok(ExitCode::from(1))
    }
}

/// The OOM policy as the running supervisor applied it (a warning per process not
/// as the policy wants); when none runs, whether it could be applied.
fn oom_policy(cfg: &Config, p: &mut crate::check::Preflight) {
    use crate::process::oom;
    match control::request_timeout(cfg, &Request::Status, std::time::Duration::from_secs(10)) {
        Ok(control::Response {
            status: Some(st), ..
        }) => {
            if st.oom.problems.is_empty() {
                p.notes.push(format!(
                    "OOM policy applied (supervisor {}, postmaster {}, API {})",
                    oom::SUPERVISOR,
                    oom::POSTMASTER,
                    oom::API
                ));
            }
            for w in st.oom.problems {
                p.warnings.push(format!("OOM policy: {w}"));
            }
        }
        Ok(_) | Err(_) => {
            let own = oom::read(std::process::id() as i32);
            let may_lower = caps::has_cap(
                None,
                caps::CapSet::Effective,
                caps::Capability::CAP_SYS_RESOURCE,
            )
            .unwrap_or(false);
            if !may_lower && own != Some(oom::SUPERVISOR) {
                p.warnings.push(format!(
                    "OOM policy: started this way (oom_score_adj {}, no CAP_SYS_RESOURCE), \
                     koprogo cannot set its own oom_score_adj to {} nor protect the postmaster: \
                     start it with the packaged unit (OOMScoreAdjust=-1000) or as root with that \
                     capability",
                    own.map_or("unknown".into(), |v| v.to_string()),
                    oom::SUPERVISOR
                ));
            }
        }
    }
}

pub fn status(cfg: &Config, json: bool) -> Outcome {
    let resp = match control::request(cfg, &Request::Status) {
        Ok(r) => r,
        Err(e) => {
            if json && matches!(e, ControlError::NotRunning(_)) {
                println!("{{\"running\":false,\"services\":[]}}");
            }
            return Err(e.into());
        }
    };
    let Some(st) = resp.status else {
        return Err(CliError::Failed(resp.message));
    };
    if json {
        match serde_json::to_string_pretty(&st) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                return Err(CliError::Failed(e.to_string()));
            }
        }
    } else {
        print_status(&st);
    }
    if st.all_ready {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(1))
    }
}

pub fn capacity(cfg: &Config, json: bool) -> Outcome {
    let resp = match control::request(cfg, &Request::Capacity) {
        Ok(r) => r,
        Err(e) => {
            if json && matches!(e, ControlError::NotRunning(_)) {
                println!("{{\"running\":false}}");
            }
            return Err(e.into());
        }
    };
    let Some(report) = resp.capacity else {
        return Err(CliError::Failed(format!(
            "the running supervisor gave no capacity report{}",
            if resp.message.is_empty() {
                " (is it an older version? restart it after an upgrade)".to_string()
            } else {
                format!(": {}", resp.message)
            }
        )));
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                return Err(CliError::Failed(e.to_string()));
            }
        }
    } else {
        print!("{}", crate::capacity::render::text(&report));
    }
    Ok(ExitCode::from(report.exit_code()))
}

/// `koprogo reload`: waits for the whole update (the backup can take minutes).
pub fn reload(cfg: &Config) -> Outcome {
    match control::request_long(cfg, &Request::Reload) {
        Ok(r) if r.ok => {
            println!("{}", r.message);
            Ok(ExitCode::SUCCESS)
        }
        Ok(r) => Err(CliError::Failed(r.message)),
        Err(e) => Err(e.into()),
    }
}

pub fn command(cfg: &Config, req: Request) -> Outcome {
    match control::request(cfg, &req) {
        Ok(r) if r.ok => {
            println!("{}", r.message);
            Ok(ExitCode::SUCCESS)
        }
        Ok(r) => Err(CliError::Failed(r.message)),
        Err(e) => Err(e.into()),
    }
}

pub fn show_logs(cfg: &Config, service: Option<String>, follow: bool, n: usize) -> Outcome {
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
                return Err(CliError::Failed(format!(
                    "cannot list {}: {e}",
                    dir.display()
                )));
            }
        },
    };
    if let Some(s) = &service {
        if !dir.join(format!("{s}.log")).exists() {
            let known = logs::services(dir).unwrap_or_default();
            return Err(CliError::Failed(format!(
                "no log for {s:?} in {}: choose one of {}",
                dir.display(),
                known.join(", ")
            )));
        }
    }
    let single = names.len() == 1;
    // Merge the services' tails by their timestamp prefix.
    let mut lines: Vec<(String, String)> = Vec::new();
    for name in &names {
        match logs::tail(dir, name, n) {
            Ok(v) => lines.extend(v.into_iter().map(|l| (name.clone(), l))),
            Err(e) => {
                return Err(CliError::Failed(format!("cannot read the {name} log: {e}")));
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
        return Ok(ExitCode::SUCCESS);
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
    Ok(ExitCode::SUCCESS)
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

pub fn psql(cfg: &Config, args: Vec<String>) -> Outcome {
    use std::os::unix::process::CommandExt;
    let bins = match crate::postgres::binaries::find(cfg) {
        Ok(b) => b,
        Err(e) => {
            return Err(CliError::Failed(e.to_string()));
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
                    return Err(CliError::Invalid(format!("{e:#}")));
                }
            };
            cmd.envs(url.libpq_env(cfg, pw.as_deref()));
        }
    }
    let err = cmd.args(args).exec();
    Err(CliError::Failed(format!(
        "cannot run {}: {err}",
        psql.display()
    )))
}

pub fn cert_status(cfg: &Config, json: bool) -> Outcome {
    let (st, live) = match control::request(cfg, &Request::Status) {
        Ok(r) => match r.status {
            Some(s) => (s.tls, true),
            None => {
                return Err(CliError::Failed(r.message));
            }
        },
        Err(_) => match crate::tls::status_from_disk(cfg) {
            Ok(s) => (s, false),
            Err(e) => {
                return Err(CliError::Failed(format!("{e:#}")));
            }
        },
    };
    if json {
        match serde_json::to_string_pretty(&st) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                return Err(CliError::Failed(e.to_string()));
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
            if !ca.fingerprint.is_empty() {
                println!("CA SHA-256    {}", ca.fingerprint);
            }
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
                if let Some(f) = &ca.next_fingerprint {
                    println!("CA next SHA-256 {f}");
                }
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
        Ok(ExitCode::from(1))
    } else {
        Ok(ExitCode::SUCCESS)
    }
}

pub fn admin_password(cfg: &Config, reset: bool) -> Outcome {
    if reset {
        return match control::request(cfg, &Request::AdminPasswordReset) {
            Ok(r) if r.ok => {
                println!("{}", r.message);
                Ok(ExitCode::SUCCESS)
            }
            Ok(r) => Err(CliError::Failed(r.message)),
            Err(e) => Err(e.into()),
        };
    }
    match crate::secrets::read_value(&cfg.paths.state, crate::secrets::ADMIN_PASSWORD) {
        Ok(Some(pw)) => {
            println!("{pw}");
            Ok(ExitCode::SUCCESS)
        }
        Ok(None) => Err(CliError::Failed(format!(
            "no superadmin password yet in {}: start koprogo once to generate it",
            crate::secrets::path(&cfg.paths.state).display()
        ))),
        Err(e) => Err(CliError::Failed(format!("{e:#}"))),
    }
}
