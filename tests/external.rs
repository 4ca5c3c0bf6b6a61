//! `[postgres] mode = "external"`, end to end: a real PostgreSQL 15 started by the
//! test (127.0.0.1, free port, SCRAM password auth) stands for the managed database
//! elsewhere; the real `koprogo run` with the demo backend uses it. No postgres
//! child, no cluster files; the API waits through an outage of the server and comes
//! back; backups, verify and restore work against it; psql and check reach it;
//! configuration mistakes are refused with exit 2. Every wait is bounded and no
//! process is left (the appliance's nor the server's).

#[path = "common/backups.rs"]
mod backups;
mod common;

use std::path::Path;
use std::time::Duration;

use common::pg::ExternalPg;
use common::Appliance;
use koprogo::process::state::Phase;

const NO_SCHEDULE: &str = "\n[backup]\nenabled = false\n";

/// An appliance whose `[postgres]` section points at `pg` (password from a file).
fn appliance_for(pg: &ExternalPg, extra: &str) -> Appliance {
    let a = Appliance::new(extra);
    let pw = a.path("db-password");
    pg.write_password_file(&pw);
    set_postgres(
        &a,
        &format!(
            "mode = \"external\"\nurl = \"{}\"\npassword_file = \"{}\"\n",
            pg.url(),
            pw.display()
        ),
    );
    a
}

/// Inserts `lines` at the top of the harness config's `[postgres]` section.
fn set_postgres(a: &Appliance, lines: &str) {
    let text = std::fs::read_to_string(&a.config).expect("config");
    std::fs::write(
        &a.config,
        text.replacen("[postgres]\n", &format!("[postgres]\n{lines}"), 1),
    )
    .expect("write config");
}

fn post_item(a: &Appliance, body: &str) -> i64 {
    let (code, resp) = a.http("POST", "/api/v1/items", body).expect("POST");
    assert_eq!(code, 201, "POST /api/v1/items: {resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).expect("json");
    v["id"].as_i64().expect("id")
}

/// Children of `pid` whose executable is `postgres`.
fn postgres_children(pid: i32) -> Vec<i32> {
    common::process_states()
        .into_iter()
        .filter(|(p, _, ppid)| {
            *ppid == pid
                && std::fs::read_link(format!("/proc/{p}/exe"))
                    .is_ok_and(|e| e.file_name().is_some_and(|n| n == "postgres"))
        })
        .map(|(p, _, _)| p)
        .collect()
}

#[test]
fn external_database_serves_the_api_and_the_api_waits_through_an_outage() {
    let mut pg = ExternalPg::start("kpext", "kpext");
    let mut a = appliance_for(&pg, NO_SCHEDULE);
    a.start();
    let st = a.wait_ready();

    // No PostgreSQL of ours: no child, no cluster files, the row says where it is.
    let row = Appliance::service(&st, "postgres");
    assert!(row.ready, "{row:?}");
    assert_eq!(row.pid, None, "{row:?}");
    let shown = row.external.clone().expect("external in status");
    assert!(
        shown.contains(&format!("127.0.0.1:{}/kpext", pg.port)),
        "{shown}"
    );
    assert!(
        postgres_children(a.pid()).is_empty(),
        "a postgres child runs"
    );
    assert!(
        !a.path("state/pgdata").exists(),
        "cluster files were created"
    );
    let (code, out, _) = a.cli(&["status"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("external postgresql://kpext@127.0.0.1"),
        "{out}"
    );
    assert!(!out.contains(&pg.password), "password shown: {out}");

    // The extensions were created by the owner role; the API works on that server.
    let exts = pg.app_sql("SELECT string_agg(extname, ',' ORDER BY extname) FROM pg_extension");
    assert!(
        exts.contains("pgcrypto") && exts.contains("uuid-ossp"),
        "{exts}"
    );
    let id = post_item(&a, "written through the API");
    assert_eq!(
        pg.app_sql(&format!("SELECT body FROM items WHERE id = {id}")),
        "written through the API"
    );
    // psql reaches the external server; check sees it answer.
    let (code, out, err) = a.cli(&["psql", "--", "-X", "-tAc", "SELECT count(*) FROM items"]);
    assert_eq!((code, out.trim()), (0, "1"), "{err}");
    let (code, out, _) = a.cli(&["check"]);
    assert!(
        out.contains("external database answers: PostgreSQL 15"),
        "{out}"
    );
    assert_eq!(code, 0, "{out}");
    // Metrics query the external server.
    let raw = common::http_raw(
        a.metrics_port,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    );
    assert!(raw.contains("\nkoprogo_postgres_up 1"), "{raw}");
    assert!(
        raw.contains("\nkoprogo_postgres_database_size_bytes "),
        "{raw}"
    );
    // Nothing logged the password.
    for log in ["koprogo.log", "postgres.log", "api.log"] {
        let text = std::fs::read_to_string(a.path("logs").join(log)).unwrap_or_default();
        assert!(!text.contains(&pg.password), "{log} holds the password");
    }

    // Outage: readiness drops, the API is stopped and waits for the database.
    let api_restarts = Appliance::service(&st, "api").restarts;
    pg.stop();
    let st = a.wait_for(Duration::from_secs(60), "postgres down, api waiting", |s| {
        let p = Appliance::service(s, "postgres");
        let api = Appliance::service(s, "api");
        !p.ready && api.state == Phase::Waiting
    });
    let row = Appliance::service(&st, "postgres");
    assert!(row.last_error.is_some(), "no reason shown: {row:?}");
    let (code, _, _) = a.cli(&["status"]);
    assert_eq!(code, 1, "status must say not everything is ready");

    // Back: the API starts again on it and serves the row written before.
    pg.run();
    let st = a.wait_for(Duration::from_secs(60), "all ready again", |s| s.all_ready);
    assert!(Appliance::service(&st, "api").restarts > api_restarts);
    let (code, body) = a
        .http("GET", &format!("/api/v1/items/{id}"), "")
        .expect("GET");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("written through the API"), "{body}");
    assert!(postgres_children(a.pid()).is_empty());

    a.stop();
    a.assert_no_leftovers(Duration::from_secs(10));
    pg.stop();
}

#[test]
fn backup_verify_and_restore_against_the_external_server() {
    let pg = ExternalPg::start("kpbk", "kpbk");
    let mut a = appliance_for(&pg, NO_SCHEDULE);
    a.start();
    a.wait_ready();
    let ids: Vec<i64> = (0..5).map(|i| post_item(&a, &format!("row {i}"))).collect();

    let (code, out, err) = a.cli(&["backup", "create"]);
    assert_eq!(code, 0, "backup create: {out}{err}");
    let file = out
        .split_whitespace()
        .find(|w| w.contains("/koprogo-") && w.contains(".kbk"))
        .expect("file in the message")
        .trim_end_matches(':')
        .to_string();
    assert!(out.contains("5 rows") || out.contains("rows"), "{out}");
    // The database part is a dump, not cluster files.
    let listing = std::process::Command::new("tar")
        .args(["-tf", &file])
        .output()
        .expect("tar");
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(!listing.contains("pgdata"), "{listing}");

    let (code, out, err) = a.cli(&["backup", "verify"]);
    assert_eq!(code, 0, "verify: {out}{err}");
    assert!(format!("{out}{err}").contains("good"), "{out}{err}");
    // The scratch database is gone again.
    let left = pg.sql(
        "postgres",
        "SELECT count(*) FROM pg_database WHERE datname LIKE 'koprogo\\_%'",
    );
    assert_eq!(left, "0");

    // Lose rows on the server, restore, get them back.
    pg.app_sql("DELETE FROM items");
    let (code, out, err) = a.cli(&["restore", &file]);
    assert_eq!(code, 0, "restore: {out}{err}");
    a.wait_ready();
    assert_eq!(
        pg.app_sql("SELECT count(*) FROM items"),
        ids.len().to_string()
    );
    let (code, body) = a
        .http("GET", &format!("/api/v1/items/{}", ids[3]), "")
        .expect("GET");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("row 3"), "{body}");
    assert!(!a.path("state/pgdata").exists());

    a.stop();
    a.assert_no_leftovers(Duration::from_secs(10));
}

/// A database name with a double quote in it: the SQL text names it as a quoted
/// identifier (it was pasted between quotes by hand, which broke restore's renames).
#[test]
fn a_database_name_with_a_double_quote_backs_up_verifies_and_restores() {
    let mut pg = ExternalPg::start("kpquote", "kpquote");
    pg.sql("postgres", "CREATE DATABASE \"kp\"\"quote\" OWNER kpquote");
    pg.db = "kp\"quote".into();
    let mut a = Appliance::new(NO_SCHEDULE);
    let pw = a.path("db-password");
    pg.write_password_file(&pw);
    set_postgres(
        &a,
        &format!(
            "mode = \"external\"\nurl = \"postgresql://kpquote@127.0.0.1:{}/kp%22quote\"\npassword_file = \"{}\"\n",
            pg.port,
            pw.display()
        ),
    );
    a.start();
    a.wait_ready();
    for i in 0..3 {
        post_item(&a, &format!("row {i}"));
    }
    let file = backups::backup_create(&a);
    let (code, out, err) = a.cli(&["backup", "verify"]);
    assert_eq!(code, 0, "verify: {out}{err}");
    pg.app_sql("DELETE FROM items");
    let (code, out) = backups::restore(&a, &file, &[]);
    assert_eq!(code, 0, "restore: {out}");
    a.wait_ready();
    assert_eq!(pg.app_sql("SELECT count(*) FROM items"), "3");
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(10));
}

#[test]
fn a_role_that_may_not_create_the_extensions_gets_the_dba_command() {
    let pg = ExternalPg::start("kpown", "kpdb");
    // The application role connects to a database it does not own.
    pg.sql(
        "postgres",
        "CREATE ROLE kpguest LOGIN PASSWORD 'guest-pw'; GRANT CONNECT ON DATABASE kpdb TO kpguest;",
    );
    let mut a = Appliance::new(NO_SCHEDULE);
    set_postgres(
        &a,
        &format!(
            "mode = \"external\"\nurl = \"postgresql://kpguest:guest-pw@127.0.0.1:{}/kpdb\"\n",
            pg.port
        ),
    );
    a.start();
    let st = a.wait_for(Duration::from_secs(30), "the extension error", |s| {
        Appliance::service(s, "postgres")
            .last_error
            .is_some_and(|e| e.contains("CREATE EXTENSION"))
    });
    let row = Appliance::service(&st, "postgres");
    let e = row.last_error.unwrap_or_default();
    assert!(
        e.contains("pgcrypto") && e.contains("kpguest") && e.contains("kpdb"),
        "{e}"
    );
    assert!(!e.contains("guest-pw"), "{e}");
    assert!(!Appliance::service(&st, "api").ready);
    // The DBA runs it; koprogo carries on by itself.
    pg.sql("kpdb", "CREATE EXTENSION pgcrypto; CREATE EXTENSION \"uuid-ossp\"; GRANT CREATE ON SCHEMA public TO kpguest;");
    a.wait_for(Duration::from_secs(60), "all ready after the DBA", |s| {
        s.all_ready
    });
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(10));
}

fn assert_refused(a: &Appliance, want: &[&str]) {
    let (code, out, err) = a.cli(&["run"]);
    assert_eq!(code, 2, "run must refuse: {out}{err}");
    for w in want {
        assert!(err.contains(w), "{w:?} not in: {err}");
    }
    assert!(!a.path("state").exists(), "something was created");
}

#[test]
fn external_configuration_mistakes_exit_2_with_the_key_and_the_fix() {
    // A URL without mode = "external".
    let a = Appliance::new("");
    set_postgres(&a, "url = \"postgresql://k:topsecret@127.0.0.1:5999/k\"\n");
    assert_refused(&a, &["postgres.url", "mode = \"external\"", "koprogo.toml"]);
    let (_, _, err) = a.cli(&["run"]);
    assert!(!err.contains("topsecret"), "{err}");

    // A URL that does not parse.
    let a = Appliance::new("");
    set_postgres(
        &a,
        "mode = \"external\"\nurl = \"postgresql://k:topsecret@127.0.0.1:99999/k\"\n",
    );
    assert_refused(&a, &["postgres.url", "port"]);
    let (code, out, err) = a.cli(&["check"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(!err.contains("topsecret"), "{err}");

    // External without a URL.
    let a = Appliance::new("");
    set_postgres(&a, "mode = \"external\"\n");
    assert_refused(&a, &["postgres.mode", "postgres.url"]);

    // A password file that does not exist: run refuses (2), check reports it (1).
    let a = Appliance::new("");
    let missing = a.path("no-such-password");
    set_postgres(
        &a,
        &format!(
            "mode = \"external\"\nurl = \"postgresql://k@127.0.0.1:{}/k\"\npassword_file = \"{}\"\n",
            common::free_port(),
            missing.display()
        ),
    );
    assert_refused(
        &a,
        &["postgres.password_file", "no-such-password", "cannot read"],
    );
    let (code, out, _) = a.cli(&["check"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("error:") && out.contains("postgres.password_file"),
        "{out}"
    );

    // An unreachable server is only a warning for check (run would wait for it).
    let a = Appliance::new("");
    let pw = a.path("pw");
    std::fs::write(&pw, "x\n").expect("write");
    set_postgres(
        &a,
        &format!(
            "mode = \"external\"\nurl = \"postgresql://k@127.0.0.1:{}/k\"\npassword_file = \"{}\"\n",
            common::free_port(),
            pw.display()
        ),
    );
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    if common::is_root() {
        // root's own 0600 file: the service user could not read it.
        let (code, out, _) = a.cli(&["check"]);
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains("postgres.password_file") && out.contains("cannot read it"),
            "{out}"
        );
        let gid = nix::unistd::User::from_name("koprogo")
            .ok()
            .flatten()
            .expect("koprogo user")
            .gid;
        std::os::unix::fs::chown(&pw, Some(0), Some(gid.as_raw())).expect("chown");
        std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o640))
            .expect("chmod");
    }
    let (code, out, _) = a.cli(&["check"]);
    assert!(
        out.contains("warning: the external database is not reachable"),
        "{out}"
    );
    assert_eq!(code, 0, "{out}");
    assert!(!Path::new(&a.path("state")).exists());
}

/// A CA and a server certificate for `localhost` signed by it: (ca, cert, key) PEM.
fn test_pki() -> (String, String, String) {
    test_pki_signed_with(&rcgen::PKCS_ECDSA_P256_SHA256)
}

/// The same, the CA's key (hence the server certificate's signature) of `alg`.
fn test_pki_signed_with(alg: &'static rcgen::SignatureAlgorithm) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate_for(alg).expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // A subject of its own (OpenSSL takes a leaf whose issuer is its subject for self-signed).
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "koprogo test database CA");
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca_params, &ca_key);
    let key = KeyPair::generate().expect("key");
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("leaf");
    (ca.pem(), leaf.pem(), key.serialize_pem())
}

/// `koprogo check` with `[postgres]` = `lines`: (exit code, output).
fn check_with(lines: &str) -> (i32, String) {
    let a = Appliance::new("");
    set_postgres(&a, lines);
    let (code, out, err) = a.cli(&["check"]);
    (code, format!("{out}{err}"))
}

#[test]
fn tls_to_the_external_server_honours_sslmode() {
    let (ca, cert, key) = test_pki();
    let pg = ExternalPg::start_tls("kptls", "kptls", &cert, &key);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).expect("write ca");
    let pw = &pg.password;
    let url = |host: &str, mode: &str| {
        format!(
            "mode = \"external\"\nurl = \"postgresql://kptls:{}@{host}:{}/kptls?sslmode={mode}\"\n",
            pw.replace(' ', "%20"),
            pg.port
        )
    };
    let with_ca = format!("ca_file = \"{}\"\n", ca_file.display());
    let answers = "external database answers: PostgreSQL 15";

    // verify-full against our CA, by name: connects (and the server takes TLS only).
    let (code, out) = check_with(&(url("localhost", "verify-full") + &with_ca));
    assert!(out.contains(answers), "{out}");
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains(pw.as_str()), "password shown: {out}");
    // The certificate is for localhost, not 127.0.0.1: verify-full refuses, verify-ca does not.
    let (code, out) = check_with(&(url("127.0.0.1", "verify-full") + &with_ca));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("refuses koprogo") && out.to_lowercase().contains("tls"),
        "{out}"
    );
    let (code, out) = check_with(&(url("127.0.0.1", "verify-ca") + &with_ca));
    assert!(out.contains(answers), "{out}");
    assert_eq!(code, 0, "{out}");
    // Not our CA (the system roots): refused.
    let (code, out) = check_with(&url("localhost", "verify-full"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("refuses koprogo"), "{out}");
    // require: encrypted, certificate not checked (libpq's meaning).
    let (code, out) = check_with(&url("127.0.0.1", "require"));
    assert!(out.contains(answers), "{out}");
    assert_eq!(code, 0, "{out}");
    // disable: the server wants TLS, so it refuses, and check says so.
    let (code, out) = check_with(&url("127.0.0.1", "disable"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("pg_hba.conf"), "{out}");

    // The server's refusals come with what to do.
    let other_db = format!(
        "mode = \"external\"\nurl = \"postgresql://kptls:{}@localhost:{}/nosuchdb?sslmode=verify-full\"\n{with_ca}",
        pw.replace(' ', "%20"),
        pg.port
    );
    let (code, out) = check_with(&other_db);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("CREATE DATABASE \"nosuchdb\" OWNER \"kptls\""),
        "{out}"
    );
    let wrong_pw = format!(
        "mode = \"external\"\nurl = \"postgresql://kptls:wrong@localhost:{}/kptls?sslmode=verify-full\"\n{with_ca}",
        pg.port
    );
    let (code, out) = check_with(&wrong_pw);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("check the password"), "{out}");
    assert!(!out.contains("wrong@"), "{out}");

    // psql (libpq) gets the same settings through its environment.
    let a = Appliance::new("");
    set_postgres(&a, &(url("localhost", "verify-full") + &with_ca));
    let (code, out, err) = a.cli(&[
        "psql",
        "--",
        "-X",
        "-tAc",
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    ]);
    assert_eq!((code, out.trim()), (0, "t"), "{err}");
}

/// SCRAM over TLS is bound to the server's certificate (`tls-server-end-point`):
/// a client requiring channel binding connects, with certificates signed with
/// SHA-256 and with SHA-384 (the hash follows the signature; PostgreSQL checks it).
#[test]
fn scram_over_tls_binds_to_the_server_certificate() {
    use koprogo::postgres::tls::{Check, PgTls};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for alg in [
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &rcgen::PKCS_ECDSA_P384_SHA384,
    ] {
        let (ca, cert, key) = test_pki_signed_with(alg);
        let pg = ExternalPg::start_tls("kpbind", "kpbind", &cert, &key);
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca).expect("write ca");
        for check in [Check::Full, Check::None] {
            let tls = PgTls::checking(check, Some(&ca_file)).expect("connector");
            let mut cfg = tokio_postgres::Config::new();
            cfg.host("localhost")
                .port(pg.port)
                .user(&pg.user)
                .password(&pg.password)
                .dbname(&pg.db)
                .channel_binding(tokio_postgres::config::ChannelBinding::Require)
                .connect_timeout(Duration::from_secs(10));
            let ssl = rt.block_on(async {
                let (client, conn) =
                    tokio::time::timeout(Duration::from_secs(20), cfg.connect(tls))
                        .await
                        .expect("connect in time")
                        .unwrap_or_else(|e| panic!("{alg:?} {check:?}: {e}"));
                tokio::spawn(conn);
                client
                    .query_one(
                        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                        &[],
                    )
                    .await
                    .expect("query")
                    .get::<_, bool>(0)
            });
            assert!(ssl, "{alg:?} {check:?}");
        }
    }
}

#[test]
fn moving_the_database_out_is_a_backup_and_a_restore() {
    // The site on its private cluster, with data.
    let mut old = Appliance::new(NO_SCHEDULE);
    old.start();
    old.wait_ready();
    let id = post_item(&old, "made on the private cluster");
    let (code, out, err) = old.cli(&["backup", "create"]);
    assert_eq!(code, 0, "backup create: {out}{err}");
    let file = out
        .split_whitespace()
        .find(|w| w.contains("/koprogo-") && w.contains(".kbk"))
        .expect("file in the message")
        .trim_end_matches(':')
        .to_string();
    let secrets = std::fs::read_to_string(old.path("state/secrets.env")).expect("secrets");
    let (code, key, err) = old.cli(&["backup", "key"]);
    assert_eq!(code, 0, "backup key: {err}");
    old.stop();
    old.assert_no_leftovers(Duration::from_secs(10));

    // The same site on an external server: restore there.
    let pg = ExternalPg::start("kpmove", "kpmove");
    let mut a = appliance_for(&pg, NO_SCHEDULE);
    a.start();
    a.wait_ready();
    // Another appliance's backup: authenticated with the old one's key.
    let (code, out, err) = a.cli(&["restore", &file, "--trust-key", key.trim()]);
    assert_eq!(code, 0, "restore: {out}{err}");
    a.wait_ready();
    assert_eq!(
        pg.app_sql(&format!("SELECT body FROM items WHERE id = {id}")),
        "made on the private cluster"
    );
    assert_eq!(
        pg.app_sql("SELECT tableowner FROM pg_tables WHERE tablename = 'items'"),
        "kpmove"
    );
    let (code, body) = a
        .http("GET", &format!("/api/v1/items/{id}"), "")
        .expect("GET");
    assert_eq!(code, 200, "{body}");
    // The site's keys come along; each machine keeps its own backup key.
    let without_backup_key = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.starts_with("BACKUP_AUTH_KEY="))
            .map(str::to_string)
            .collect()
    };
    let now = std::fs::read_to_string(a.path("state/secrets.env")).expect("secrets");
    assert_eq!(
        without_backup_key(&now),
        without_backup_key(&secrets),
        "the site's keys come along"
    );
    assert_ne!(now, secrets, "the new machine kept its own backup key");
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(10));
}

/// A backup this appliance cannot authenticate is not replayed by a privileged
/// role: with `--trust-foreign` and a superuser URL, the restore is refused before
/// the dump runs; the appliance's own backup still restores (with a warning).
#[test]
fn an_unauthenticated_backup_is_not_replayed_by_a_superuser_url() {
    let pg = ExternalPg::start("kpsu", "kpsu");
    pg.sql("postgres", "ALTER ROLE kpsu SUPERUSER");
    let mut a = appliance_for(&pg, NO_SCHEDULE);
    a.start();
    a.wait_ready();
    let id = post_item(&a, "before the backup");
    let own = backups::backup_create(&a);
    let unsigned = a.path("unsigned.kbk");
    backups::as_format_1(&own, &unsigned);
    post_item(&a, "after the backup");

    let (code, out) = backups::restore(&a, &unsigned, &["--trust-foreign"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("kpsu is a superuser") && out.contains("nothing was changed"),
        "{out}"
    );
    assert_eq!(pg.app_sql("SELECT count(*) FROM items"), "2");

    let (code, out) = backups::restore(&a, &own, &[]);
    assert_eq!(code, 0, "{out}");
    a.wait_ready();
    assert_eq!(pg.app_sql("SELECT count(*) FROM items"), "1");
    assert_eq!(
        pg.app_sql(&format!("SELECT body FROM items WHERE id = {id}")),
        "before the backup"
    );
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(10));
}
