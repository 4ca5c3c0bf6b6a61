//! Backups are authenticated and never replayed as the PostgreSQL superuser: a
//! crafted, correctly-checksummed backup whose dump runs `COPY … TO PROGRAM` is
//! refused before any of it is replayed, and with `--trust-foreign` it fails on
//! missing rights instead of running the program; a backup from another appliance
//! needs that appliance's key (`--trust-key`) or `--trust-foreign`; a backup made
//! before backups were authenticated (format 1) needs `--trust-foreign`. Real
//! `koprogo run`, real PostgreSQL, the demo backend.

#[path = "common/backups.rs"]
mod backups;
mod common;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use backups::*;
use common::Appliance;
use koprogo::backup::auth::Key;

fn verify(a: &Appliance, file: &Path, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["backup", "verify", file.to_str().expect("utf8")];
    args.extend_from_slice(extra);
    let (code, out, err) = a.cli(&args);
    (code, format!("{out}{err}"))
}

fn secret_line(a: &Appliance, key: &str) -> String {
    std::fs::read_to_string(a.path("state/secrets.env"))
        .expect("secrets")
        .lines()
        .find(|l| l.starts_with(&format!("{key}=")))
        .unwrap_or("")
        .to_string()
}

fn scratch_databases(a: &Appliance) -> String {
    psql(
        a,
        "SELECT string_agg(datname, ',') FROM pg_database WHERE datname LIKE 'koprogo%'",
    )
}

#[test]
fn a_crafted_backup_that_runs_a_program_is_refused_and_never_runs_it() {
    let mut a = boot(NO_SCHEDULE);
    seed(&a);
    let marker = PathBuf::from(format!(
        "/tmp/koprogo-pwned-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    // A table whose CHECK calls a function that, once the rows are in, runs a
    // program: pg_dump writes the function first, then the table with its CHECK,
    // then the rows, so replaying the dump runs the program for each row.
    psql(
        &a,
        &format!(
            "CREATE FUNCTION public.trap_check(v int) RETURNS boolean LANGUAGE plpgsql
               AS $f$ BEGIN RETURN true; END $f$;
             CREATE TABLE public.trap (v int CHECK (public.trap_check(v)));
             INSERT INTO public.trap VALUES (1);
             CREATE OR REPLACE FUNCTION public.trap_check(v int) RETURNS boolean
               LANGUAGE plpgsql AS $f$ BEGIN
                 EXECUTE 'COPY (SELECT 1) TO PROGRAM ''touch {}''';
                 RETURN true;
               END $f$;",
            marker.display()
        ),
    );
    let trapped = backup_create(&a);
    psql(
        &a,
        "DROP TABLE public.trap; DROP FUNCTION public.trap_check(int);",
    );
    assert!(!marker.exists(), "making the backup ran the program");
    let dir = a.path("crafted");
    std::fs::create_dir(&dir).expect("mkdir");
    give_to_service_user(&dir);
    let attacker = Key::from_hex(&"42".repeat(32)).expect("key");
    let crafted = dir.join("crafted.kbk");
    repack(&trapped, &crafted, &attacker);
    let unsigned = dir.join("unsigned.kbk");
    as_format_1(&trapped, &unsigned);
    post(&a, "/api/v1/items", "written after the backups");
    let before = snapshot(&a);

    // Refused before any byte is replayed: not made with this appliance's key.
    for file in [&crafted, &unsigned] {
        let (code, out) = restore(&a, file, &[]);
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains("nothing was replayed") && out.contains("--trust-foreign"),
            "{out}"
        );
        assert!(out.contains("nothing was changed"), "{out}");
        let (code, out) = verify(&a, file, &[]);
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("nothing was replayed"), "{out}");
    }
    let (_, out) = restore(&a, &crafted, &[]);
    assert!(out.contains("made by another appliance"), "{out}");
    let (_, out) = restore(&a, &unsigned, &[]);
    assert!(out.contains("not authenticated"), "{out}");
    assert_eq!(snapshot(&a), before);

    // Trusted anyway, or authenticated (this appliance's own backup of the trap):
    // replayed as an ordinary role, the program is not allowed to run.
    for (file, extra) in [
        (&crafted, &["--trust-foreign"][..]),
        (&unsigned, &["--trust-foreign"][..]),
        (&trapped, &[][..]),
    ] {
        let (code, out) = verify(&a, file, extra);
        assert_eq!(code, 1, "verify {}: {out}", file.display());
        assert!(out.contains("needs rights"), "{out}");
        let (code, out) = restore(&a, file, extra);
        assert_eq!(code, 1, "restore {}: {out}", file.display());
        assert!(
            out.contains("needs rights")
                && (out.contains("permission denied") || out.contains("must be superuser"))
                && out.contains("nothing was changed"),
            "{out}"
        );
        assert!(!marker.exists(), "the dump ran a program on the server");
        let mut after = snapshot(&a);
        assert_eq!(after.api_pid, before.api_pid, "the API was stopped");
        after.api_pid = before.api_pid;
        assert_eq!(after, before);
        assert_eq!(scratch_databases(&a), "koprogo");
    }
    let _ = std::fs::remove_file(&marker);
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn a_backup_from_another_appliance_needs_its_key_or_trust_foreign() {
    // The old machine: data, a backup, its key.
    let mut old = boot(NO_SCHEDULE);
    let (ids, secret) = seed(&old);
    let want_items = item_count(&old);
    let file = backup_create(&old);
    let (code, key_hex, err) = old.cli(&["backup", "key"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("--trust-key"), "{err}");
    let key_hex = key_hex.trim().to_string();
    assert_eq!(
        secret_line(&old, "BACKUP_AUTH_KEY"),
        format!("BACKUP_AUTH_KEY={key_hex}")
    );
    // The key never travels inside a backup.
    let mut ar = tar::Archive::new(File::open(&file).expect("open"));
    for e in ar.entries().expect("entries") {
        let mut e = e.expect("entry");
        if &*e.path_bytes() == b"secrets.env" {
            let mut text = String::new();
            e.read_to_string(&mut text).expect("read");
            assert!(!text.contains("BACKUP_AUTH_KEY"), "{text}");
            assert!(text.contains("TOTP_ENCRYPTION_KEY"), "{text}");
        }
    }
    let old_secrets = std::fs::read_to_string(old.path("state/secrets.env")).expect("secrets");
    let old_format = old.path("old-format.kbk");
    as_format_1(&file, &old_format);
    old.stop();
    old.assert_no_leftovers(Duration::from_secs(5));

    // The new machine.
    let mut new = boot(NO_SCHEDULE);
    let own_key = secret_line(&new, "BACKUP_AUTH_KEY");
    assert_ne!(own_key, format!("BACKUP_AUTH_KEY={key_hex}"));
    let copy = new.path("from-old.kbk");
    std::fs::copy(&file, &copy).expect("copy");
    give_to_service_user(&copy);
    let key_file = new.path("old.key");
    std::fs::write(&key_file, format!("{key_hex}\n")).expect("key file");
    let before = snapshot(&new);

    let (code, out) = restore(&new, &copy, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("made by another appliance")
            && out.contains("--trust-key")
            && out.contains("nothing was changed"),
        "{out}"
    );
    let (code, out) = verify(&new, &copy, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("made by another appliance"), "{out}");
    // A wrong key is no better.
    let (code, out) = restore(&new, &copy, &["--trust-key", &"77".repeat(32)]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("made by another appliance"), "{out}");
    assert_eq!(snapshot(&new), before);

    // With the old machine's key: authenticated, restored.
    let key_arg = key_file.to_str().expect("utf8");
    let (code, out) = verify(&new, &copy, &["--trust-key", key_arg]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("authenticated with the trusted key"), "{out}");
    let (code, out) = restore(&new, &copy, &["--trust-key", key_arg]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("authenticated with the trusted key"), "{out}");
    new.wait_ready();
    assert_eq!(item_count(&new), want_items);
    let (code, v) = get(&new, &format!("/api/v1/items/{}", ids[3]));
    assert_eq!(code, 200, "{v}");
    let (code, v) = get(&new, &format!("/api/v1/secrets/{secret}"));
    assert_eq!(code, 200, "the 2FA key came along: {v}");
    // The old machine's keys, but the new machine keeps its own backup key.
    assert_eq!(secret_line(&new, "BACKUP_AUTH_KEY"), own_key);
    for k in [
        "JWT_SECRET",
        "TOTP_ENCRYPTION_KEY",
        "ENERGY_ENCRYPTION_MASTER_KEY",
    ] {
        assert!(
            old_secrets.contains(&secret_line(&new, k)),
            "{k} was not restored"
        );
    }
    // What was restored belongs to the application's role.
    assert_eq!(
        psql(
            &new,
            "SELECT string_agg(DISTINCT tableowner, ',') FROM pg_tables WHERE schemaname = 'public'"
        ),
        "koprogo"
    );
    assert_eq!(
        psql(
            &new,
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'koprogo'"
        ),
        "koprogo"
    );

    // A backup from before backups were authenticated: only with --trust-foreign,
    // which says what it trusts.
    psql(&new, "DELETE FROM items");
    let (code, out) = restore(&new, &old_format, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not authenticated"), "{out}");
    let (code, out) = restore(&new, &old_format, &["--trust-foreign"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("NOT authenticated") && out.contains("--trust-foreign"),
        "{out}"
    );
    new.wait_ready();
    assert_eq!(item_count(&new), want_items);
    assert_eq!(scratch_databases(&new), "koprogo");
    // This appliance's own backups still restore without any option.
    let own = backup_create(&new);
    let (code, out) = restore(&new, &own, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("made by this appliance"), "{out}");
    new.wait_ready();
    new.stop();
    new.assert_no_leftovers(Duration::from_secs(5));
}

/// The application's role owns its database (the API runs migrations as it). A
/// compromised API may set that database's search_path and put its own `count`
/// aggregate first; the supervisor counts rows as the superuser for every backup
/// and restore check, and must not run that code.
#[test]
fn the_application_role_cannot_run_code_as_the_superuser_through_backup_checks() {
    let marker = std::env::temp_dir().join(format!("koprogo-superuser-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let mut a = boot(NO_SCHEDULE);
    seed(&a);
    psql(
        &a,
        &format!(
            "SET ROLE koprogo;
             CREATE FUNCTION public.evil(int8) RETURNS int8 LANGUAGE plpgsql AS $f$
               BEGIN EXECUTE 'COPY (SELECT 1) TO PROGRAM ''touch {}'''; RETURN $1 + 1; END $f$;
             CREATE AGGREGATE public.count(*) (sfunc = public.evil, stype = int8, initcond = '0');
             ALTER DATABASE koprogo SET search_path = public, pg_catalog;",
            marker.display()
        ),
    );
    let file = backup_create(&a);
    assert!(
        !marker.exists(),
        "the role's own count(*) ran as the superuser during backup create"
    );
    let (code, out) = verify(&a, &file, &[]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = restore(&a, &file, &[]);
    assert_eq!(code, 0, "{out}");
    a.wait_ready();
    assert!(
        !marker.exists(),
        "the role's own count(*) ran as the superuser during verify or restore"
    );
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}
