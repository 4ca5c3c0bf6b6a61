//! The demo backend against the real `koprogo-api` on `DATABASE_URL`: both parse it
//! and open their pool with sqlx 0.8, so both must refuse the same URLs with the
//! same panic (exit 101), and accept the URL the appliance writes. Every case runs
//! the demo; when ../shared/koprogo-real is here it also runs the real server with
//! the same environment and checks the two agree word for word. No PostgreSQL is
//! needed: every URL points at nothing.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Exit code and panic message (the line after "panicked at") of one run.
#[derive(Debug, PartialEq)]
struct Outcome {
    code: Option<i32>,
    panic: String,
}

/// Runs `bin` in an empty working directory (no `.env`) with a clean, otherwise
/// valid environment plus `extra`; bounded to 20 s.
fn run(bin: &Path, database_url: &str, extra: &[(&str, &str)]) -> (Outcome, String) {
    let cwd = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(bin);
    cmd.current_dir(cwd.path())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("NO_COLOR", "1")
        .env("DATABASE_URL", database_url)
        .env("JWT_SECRET", "Zq8v-3kR!pW7xL2mN9bT4yH6cJ0fG5dS")
        .env(
            "TOTP_ENCRYPTION_KEY",
            "8f3a1c9e2b7d4f6a0c5e8b1d3f7a9c2e4b6d8f0a1c3e5b7d9f2a4c6e8b0d1f3a",
        )
        .env("CORS_ALLOWED_ORIGINS", "https://localhost")
        .env("SERVER_HOST", "127.0.0.1")
        .env("SERVER_PORT", common::free_port().to_string())
        .env("ENABLE_RATE_LIMITING", "false")
        .env("SMTP_ENABLED", "false")
        .env("STORAGE_PROVIDER", "local")
        .env("UPLOAD_DIR", cwd.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} still running after 20 s with {database_url}",
                bin.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let all = format!("{}{stderr}", String::from_utf8_lossy(&out.stdout));
    let panic = stderr
        .lines()
        .skip_while(|l| !l.contains("panicked at"))
        .nth(1)
        .unwrap_or("")
        .to_string();
    (
        Outcome {
            code: out.status.code(),
            panic,
        },
        all,
    )
}

/// Runs the demo (and the real server when present) and checks the expected panic.
fn refused(url: &str, extra: &[(&str, &str)], want: &str, real: Option<&common::real::Real>) {
    let (demo, log) = run(&common::demo_bin(), url, extra);
    assert_eq!(demo.code, Some(101), "demo on {url}:\n{log}");
    assert_eq!(demo.panic, want, "demo on {url}:\n{log}");
    if let Some(r) = real {
        let (real, log) = run(&r.api, url, extra);
        assert_eq!(
            real, demo,
            "real koprogo-api on {url} disagrees with the demo:\n{log}"
        );
    }
}

/// URLs sqlx refuses before connecting anywhere: the empty host of a libpq-style
/// socket URL (what the appliance once passed), an empty value, a port out of
/// range, an unknown sslmode, a parameter that is not a number. (sqlx does not
/// check the scheme: `mysql://` is tried as Postgres by both.)
#[test]
fn demo_refuses_the_database_urls_the_real_server_refuses() {
    let real = common::real::real("demo_refuses_the_database_urls_the_real_server_refuses");
    let real = real.as_ref();
    for (url, want) in [
        (
            "postgresql://koprogo@/koprogo?host=/run/koprogo",
            "Failed to create database pool: Configuration(EmptyHost)",
        ),
        (
            "",
            "Failed to create database pool: Configuration(RelativeUrlWithoutBase)",
        ),
        (
            "postgresql://koprogo@localhost:99999/koprogo",
            "Failed to create database pool: Configuration(InvalidPort)",
        ),
        (
            "postgresql://koprogo@localhost/koprogo?sslmode=sometimes",
            "Failed to create database pool: Configuration(Configuration(\"unknown value \\\"sometimes\\\" for `ssl_mode`\"))",
        ),
        (
            "postgresql://koprogo@localhost/koprogo?statement-cache-capacity=many",
            "Failed to create database pool: Configuration(ParseIntError { kind: InvalidDigit })",
        ),
    ] {
        refused(url, &[], want, real);
    }
}

/// The URL the appliance writes for its private cluster is accepted by both: they
/// get as far as the socket, which is missing here, and fail on that at once.
#[test]
fn demo_and_real_server_accept_the_appliance_url_and_fail_on_the_missing_socket() {
    let real = common::real::real(
        "demo_and_real_server_accept_the_appliance_url_and_fail_on_the_missing_socket",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let run_dir = dir.path().join("run dir"); // a space, to exercise the encoding
    let text = format!(
        "domain = \"localhost\"\n[paths]\nstate = \"{0}/state\"\nlogs = \"{0}/logs\"\nrun = \"{1}\"\n",
        dir.path().display(),
        run_dir.display()
    );
    let cfg =
        koprogo::config::Config::parse(&text, &dir.path().join("koprogo.toml")).expect("config");
    let url = koprogo::backend::database_url(&cfg).expect("database_url");
    let t = Instant::now();
    refused(
        &url,
        &[],
        "Failed to create database pool: Io(Os { code: 2, kind: NotFound, message: \"No such file or directory\" })",
        real.as_ref(),
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

/// Connection refused is retried up to DB_POOL_ACQUIRE_TIMEOUT, then both give up
/// with the same panic: the start-up retry is sqlx's, not the demo's own.
#[test]
fn refused_connections_are_retried_until_the_acquire_timeout() {
    let real = common::real::real("refused_connections_are_retried_until_the_acquire_timeout");
    let url = format!(
        "postgresql://koprogo@127.0.0.1:{}/koprogo",
        common::free_port()
    );
    let t = Instant::now();
    let (demo, log) = run(
        &common::demo_bin(),
        &url,
        &[("DB_POOL_ACQUIRE_TIMEOUT", "2")],
    );
    let took = t.elapsed();
    assert_eq!(demo.code, Some(101), "{log}");
    assert_eq!(
        demo.panic, "Failed to create database pool: PoolTimedOut",
        "{log}"
    );
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(6),
        "retried for {took:?}, expected about 2 s"
    );
    if let Some(r) = real {
        let (real, log) = run(&r.api, &url, &[("DB_POOL_ACQUIRE_TIMEOUT", "2")]);
        assert_eq!(real, demo, "real koprogo-api disagrees:\n{log}");
    }
}
