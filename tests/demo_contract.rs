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

/// `bin` in `cwd` (no `.env` there) with a clean, otherwise valid environment
/// plus `extra`, listening on `port`.
fn command(
    bin: &Path,
    cwd: &Path,
    port: u16,
    database_url: &str,
    extra: &[(&str, &str)],
) -> Command {
    let mut cmd = Command::new(bin);
    cmd.current_dir(cwd)
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
        .env("SERVER_PORT", port.to_string())
        .env("ENABLE_RATE_LIMITING", "false")
        .env("SMTP_ENABLED", "false")
        .env("STORAGE_PROVIDER", "local")
        .env("UPLOAD_DIR", cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    if database_url == UNSET {
        cmd.env_remove("DATABASE_URL");
    }
    cmd
}

/// Stands for "DATABASE_URL not in the environment at all".
const UNSET: &str = "\u{0}unset";

/// Runs `bin` until it exits (bounded to 20 s).
fn run(bin: &Path, database_url: &str, extra: &[(&str, &str)]) -> (Outcome, String) {
    let cwd = tempfile::tempdir().expect("tempdir");
    let port = common::free_port();
    let mut child = command(bin, cwd.path(), port, database_url, extra)
        .spawn()
        .expect("spawn");
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

/// No DATABASE_URL at all, and URLs sqlx refuses before connecting anywhere: the empty host of a libpq-style
/// socket URL (what the appliance once passed), an empty value, a port out of
/// range, an unknown sslmode, a parameter that is not a number. (sqlx does not
/// check the scheme: `mysql://` is tried as Postgres by both.)
#[test]
fn demo_refuses_the_database_urls_the_real_server_refuses() {
    let real = common::real::real("demo_refuses_the_database_urls_the_real_server_refuses");
    let real = real.as_ref();
    for (url, want) in [
        (UNSET, "DATABASE_URL must be set: NotPresent"),
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

/// A demo backend left running; killed and reaped when dropped.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `f` until it holds, for at most `limit`.
fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// On a real PostgreSQL, through its Unix socket like the appliance: the pool is
/// sized by DB_POOL_MIN/MAX_CONNECTIONS (the capacity report counts these
/// connections), requests answer 503 JSON at once while PostgreSQL is down, and
/// the same process serves again once it is back, with the data kept.
#[test]
fn demo_pool_is_sized_by_the_environment_and_survives_a_postgres_restart() {
    let mut pg = common::pg::ExternalPg::start("kpdemo", "kpdemo");
    let url = format!(
        "postgresql://kpdemo@localhost/kpdemo?host={}&port={}",
        pg.dir.path().display(),
        pg.port
    );
    let cwd = tempfile::tempdir().expect("tempdir");
    let port = common::free_port();
    let mut cmd = command(
        &common::demo_bin(),
        cwd.path(),
        port,
        &url,
        &[
            ("DB_POOL_MAX_CONNECTIONS", "3"),
            ("DB_POOL_MIN_CONNECTIONS", "3"),
        ],
    );
    let log = cwd.path().join("demo.log");
    let out = std::fs::File::create(&log).expect("log");
    cmd.stdout(out.try_clone().expect("fd")).stderr(out);
    let mut demo = Running(cmd.spawn().expect("spawn demo"));
    let show = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually(Duration::from_secs(30), "demo listening", || {
        assert!(
            demo.0.try_wait().expect("wait").is_none(),
            "demo exited:\n{}",
            show()
        );
        common::http(port, "GET", "/api/v1/health", "").is_ok_and(|(c, _)| c == 200)
    });
    let (code, body) = common::http(port, "POST", "/api/v1/items", "kept").expect("post");
    assert_eq!(code, 201, "{body}");
    let conns = |pg: &common::pg::ExternalPg| {
        pg.sql(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'kpdemo'",
        )
    };
    eventually(Duration::from_secs(10), "3 pooled connections", || {
        conns(&pg) == "3"
    });

    pg.stop();
    let t = Instant::now();
    let (code, body) = common::http(port, "GET", "/api/v1/items", "").expect("get while down");
    assert_eq!(code, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["error"], "database unavailable", "{body}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "503 after {:?}",
        t.elapsed()
    );

    pg.run();
    eventually(Duration::from_secs(20), "served again", || {
        common::http(port, "GET", "/api/v1/items", "")
            .is_ok_and(|(c, b)| c == 200 && b.contains("\"count\":1"))
    });
    assert!(
        demo.0.try_wait().expect("wait").is_none(),
        "same process:\n{}",
        show()
    );
    // sqlx refills up to the minimum only at its next maintenance pass (every
    // min(idle_timeout, max_lifetime) = 600 s), as in the real server: here the
    // requests' connection, and never more than the maximum.
    let n: u32 = conns(&pg).parse().expect("count");
    assert!((1..=3).contains(&n), "{n} connections after the restart");

    // SIGTERM: graceful exit 0.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(demo.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let mut status = None;
    eventually(Duration::from_secs(10), "demo exits on SIGTERM", || {
        status = demo.0.try_wait().expect("wait");
        status.is_some()
    });
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", show());
}

/// The `DATABASE_URL` the appliance builds from `postgres.url` reaches a real
/// PostgreSQL through sqlx (the demo's and, when present, the real koprogo-api's):
/// a password with URL metacharacters over TCP (SCRAM), and a Unix-socket
/// directory written as libpq writes it (%-encoded host, and `?host=`).
#[test]
fn built_database_urls_with_special_characters_and_a_socket_reach_postgres() {
    let real = common::real::real(
        "built_database_urls_with_special_characters_and_a_socket_reach_postgres",
    );
    let pw = "p@ss:w/rd%";
    let pg = common::pg::ExternalPg::start("kpurl", "kpurl");
    pg.sql("postgres", &format!("ALTER ROLE kpurl PASSWORD '{pw}'"));
    let dir = pg.dir.path().display().to_string();
    let bins: Vec<_> = std::iter::once(common::demo_bin())
        .chain(real.map(|r| r.api))
        .collect();
    // A fresh database per run: the demo's and the real server's schemas differ.
    let mut runs = Vec::new();
    for (i, bin) in bins.iter().enumerate() {
        for (j, form) in ["tcp", "host", "param"].iter().enumerate() {
            let db = format!("kpurl{i}{j}");
            pg.sql("postgres", &format!("CREATE DATABASE {db} OWNER kpurl"));
            let raw = match *form {
                "tcp" => format!("postgresql://kpurl@127.0.0.1:{}/{db}", pg.port),
                "host" => format!(
                    "postgresql://kpurl@{}:{}/{db}",
                    koprogo::postgres::external::encode(&dir),
                    pg.port
                ),
                _ => format!("postgresql://kpurl@/{db}?host={dir}&port={}", pg.port),
            };
            runs.push((bin, raw));
        }
    }
    for (bin, raw) in &runs {
        let cfg = koprogo::config::Config::parse(
            &format!("[postgres]\nmode = \"external\"\nurl = \"{raw}\"\n"),
            Path::new("/etc/koprogo/url.toml"),
        )
        .expect(raw);
        let url = cfg.postgres.external.as_ref().expect("parsed");
        let database_url = url.api_url(&cfg, Some(pw));
        assert!(!database_url.contains(pw), "{database_url}");
        {
            let cwd = tempfile::tempdir().expect("tempdir");
            let port = common::free_port();
            let log = cwd.path().join("api.log");
            let out = std::fs::File::create(&log).expect("log");
            let mut cmd = command(bin, cwd.path(), port, &database_url, &[]);
            cmd.stdout(out.try_clone().expect("fd")).stderr(out);
            let mut api = Running(cmd.spawn().expect("spawn"));
            let show = || std::fs::read_to_string(&log).unwrap_or_default();
            eventually(
                Duration::from_secs(60),
                &format!("{} on {database_url}", bin.display()),
                || {
                    assert!(
                        api.0.try_wait().expect("wait").is_none(),
                        "{} exited on {database_url} (from {raw}):\n{}",
                        bin.display(),
                        show()
                    );
                    common::http(port, "GET", "/api/v1/health", "").is_ok_and(|(c, _)| c == 200)
                },
            );
            if **bin == common::demo_bin() {
                // The demo's health does not need the database; a write does.
                let (code, body) = common::http(port, "POST", "/api/v1/items", "x").expect("post");
                assert_eq!(code, 201, "{body}");
            }
        }
    }
}
