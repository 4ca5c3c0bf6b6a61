//! KoproGo-specific: koprogo-api resets admin@koprogo.com to "admin123" at every
//! start; the appliance replaces it after every start with its own generated
//! password (`koprogo admin-password`). Tested against the demo backend, which
//! reproduces the reset.

mod common;

use std::time::Duration;

use common::Appliance;

fn login(a: &Appliance, password: &str) -> u16 {
    let body =
        serde_json::json!({ "email": "admin@koprogo.com", "password": password }).to_string();
    a.http("POST", "/api/v1/auth/login", &body)
        .expect("login")
        .0
}

#[test]
fn default_superadmin_password_is_replaced_after_every_start() {
    let mut a = Appliance::new("");
    a.start();
    a.wait_ready();
    let (code, pw, err) = a.cli(&["admin-password"]);
    assert_eq!(code, 0, "{err}");
    let pw = pw.trim().to_string();
    assert!(pw.len() >= 16, "{pw:?}");
    assert_eq!(
        login(&a, "admin123"),
        401,
        "the public default must not work"
    );
    assert_eq!(login(&a, &pw), 200);

    // The API resets it at its next start; the appliance closes it again.
    let (code, _, _) = a.cli(&["restart", "api"]);
    assert_eq!(code, 0);
    a.wait_ready();
    assert_eq!(login(&a, "admin123"), 401, "after an API restart");
    assert_eq!(login(&a, &pw), 200);

    // A reset gives a new password at once and keeps it across restarts.
    let (code, new, err) = a.cli(&["admin-password", "--reset"]);
    assert_eq!(code, 0, "{err}");
    let new = new.trim().to_string();
    assert_ne!(new, pw);
    assert_eq!(login(&a, &pw), 401);
    assert_eq!(login(&a, &new), 200);
    a.stop();
    a.start();
    a.wait_ready();
    assert_eq!(login(&a, "admin123"), 401, "after a reboot");
    assert_eq!(login(&a, &new), 200);
    let (_, shown, _) = a.cli(&["admin-password"]);
    assert_eq!(shown.trim(), new);
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

/// Only the bcrypt hash reaches PostgreSQL: with every statement logged (and its
/// parameters, PostgreSQL's default), the superadmin's password is not in the log.
#[test]
fn the_superadmin_password_never_reaches_the_database_log() {
    let mut a = Appliance::new("");
    a.start();
    a.wait_ready();
    let (code, out, err) = a.cli(&[
        "psql",
        "--",
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        "ALTER SYSTEM SET log_statement = 'all'",
        "-c",
        "SELECT pg_reload_conf()",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    std::thread::sleep(Duration::from_millis(500));
    let (code, new, err) = a.cli(&["admin-password", "--reset"]);
    assert_eq!(code, 0, "{err}");
    let new = new.trim().to_string();
    assert_eq!(login(&a, &new), 200);
    let log = common::all_log_lines(&a.path("logs"), "postgres").join("\n");
    assert!(
        log.contains("UPDATE public.users SET password_hash"),
        "the statement was not logged, so this test proves nothing:\n{log}"
    );
    assert!(!log.contains(&new), "the password is in postgres.log");
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}
