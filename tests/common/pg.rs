//! A real PostgreSQL 15 server started by a test, standing for "the managed database
//! elsewhere": its own temp dir, 127.0.0.1 on a free port, password (SCRAM) auth for
//! TCP, trust on its private Unix socket for the test's own setup. Run as the
//! `koprogo` user when the test runs as root (PostgreSQL refuses root). Dropping it
//! stops the server and kills its whole process group; every wait is bounded.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct ExternalPg {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub db: String,
    child: Option<Child>,
    pgid: Option<i32>,
    /// Extra `-c` settings for the postmaster (e.g. TLS).
    settings: Vec<String>,
}

/// uid/gid of the `koprogo` user, when running as root.
fn service_ids() -> Option<(u32, u32)> {
    if !super::is_root() {
        return None;
    }
    let u = nix::unistd::User::from_name("koprogo")
        .ok()
        .flatten()
        .expect("the koprogo user exists");
    Some((u.uid.as_raw(), u.gid.as_raw()))
}

impl ExternalPg {
    /// initdb, start, and create role `user` (LOGIN, password, CREATEDB) owning
    /// database `db`.
    pub fn start(user: &str, db: &str) -> ExternalPg {
        Self::start_with(user, db, None)
    }

    /// Same, serving TLS with `(cert_pem, key_pem)`; TCP clients must then use TLS
    /// (`hostssl` only in pg_hba.conf).
    pub fn start_tls(user: &str, db: &str, cert_pem: &str, key_pem: &str) -> ExternalPg {
        Self::start_with(user, db, Some((cert_pem, key_pem)))
    }

    fn start_with(user: &str, db: &str, tls: Option<(&str, &str)>) -> ExternalPg {
        let dir = tempfile::Builder::new()
            .prefix("kpgext")
            .tempdir()
            .expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        if let Some((uid, gid)) = service_ids() {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown");
        }
        let mut pg = ExternalPg {
            port: super::free_port(),
            user: user.into(),
            password: "s3cret-Ext pass".into(),
            db: db.into(),
            child: None,
            pgid: None,
            settings: Vec::new(),
            dir,
        };
        let out = pg
            .as_service(&format!("{PG_BIN}/initdb"))
            .args(["-D"])
            .arg(pg.data())
            .args([
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-instructions",
            ])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some((cert, key)) = tls {
            let (crt, k) = (
                pg.dir.path().join("server.crt"),
                pg.dir.path().join("server.key"),
            );
            std::fs::write(&crt, cert).expect("write cert");
            std::fs::write(&k, key).expect("write key");
            std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).expect("chmod");
            let hba = pg.data().join("pg_hba.conf");
            std::fs::write(
                &hba,
                "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\nhostssl all all ::1/128 scram-sha-256\n",
            )
            .expect("write pg_hba.conf");
            if let Some((uid, gid)) = service_ids() {
                for f in [&crt, &k, &hba] {
                    std::os::unix::fs::chown(f, Some(uid), Some(gid)).expect("chown");
                }
            }
            pg.settings = vec![
                "ssl=on".into(),
                format!("ssl_cert_file={}", crt.display()),
                format!("ssl_key_file={}", k.display()),
            ];
        }
        pg.run();
        pg.sql(
            "postgres",
            &format!(
                "CREATE ROLE {user} LOGIN CREATEDB PASSWORD '{}'",
                pg.password
            ),
        );
        pg.sql("postgres", &format!("CREATE DATABASE {db} OWNER {user}"));
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn as_service(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("LC_ALL", "C.UTF-8").current_dir(self.dir.path());
        if let Some((uid, gid)) = service_ids() {
            c.uid(uid).gid(gid);
        }
        c
    }

    /// Starts the postmaster and waits (bounded) until it accepts connections.
    pub fn run(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("server log");
        if let Some((uid, gid)) = service_ids() {
            let _ =
                std::os::unix::fs::chown(self.dir.path().join("server.log"), Some(uid), Some(gid));
        }
        let mut cmd = self.as_service(&format!("{PG_BIN}/postgres"));
        for s in &self.settings {
            cmd.args(["-c", s]);
        }
        let child = cmd
            .arg("-D")
            .arg(self.data())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", &format!("port={}", self.port)])
            .args([
                "-c",
                &format!("unix_socket_directories={}", self.dir.path().display()),
            ])
            .args(["-c", "password_encryption=scram-sha-256"])
            .args(["-c", "max_connections=40"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn postgres");
        self.pgid = Some(child.id() as i32);
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new(format!("{PG_BIN}/pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the external PostgreSQL did not start: {}",
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Fast shutdown (SIGINT), bounded; then the group is killed.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(g) = self.pgid {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(g),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = child.wait();
    }

    /// `postgresql://user@127.0.0.1:port/db` (no password).
    pub fn url(&self) -> String {
        format!(
            "postgresql://{}@127.0.0.1:{}/{}",
            self.user, self.port, self.db
        )
    }

    /// SQL as the superuser over the private socket; returns psql's `-tA` output.
    pub fn sql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(format!("{PG_BIN}/psql"))
            .args(["-X", "-v", "ON_ERROR_STOP=1", "-tA", "-U", "postgres"])
            .arg("-h")
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-d", db, "-c", sql])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// SQL as the application role over TCP with its password (what the appliance sees).
    pub fn app_sql(&self, sql: &str) -> String {
        let out = Command::new(format!("{PG_BIN}/psql"))
            .args(["-X", "-v", "ON_ERROR_STOP=1", "-tA"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", &self.user, "-d", &self.db, "-c", sql])
            .env("PGPASSWORD", &self.password)
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Writes the password to `file`, readable by the service user only (root:koprogo 0640).
    pub fn write_password_file(&self, file: &Path) {
        std::fs::write(file, format!("{}\n", self.password)).expect("write password file");
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        if let Some((_, gid)) = service_ids() {
            std::os::unix::fs::chown(file, Some(0), Some(gid)).expect("chown");
        }
    }
}

impl Drop for ExternalPg {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
    }
}
