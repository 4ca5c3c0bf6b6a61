//! Backups and restore, end to end: real `koprogo run`, real PostgreSQL 15, the demo
//! backend (rows, 2FA secrets encrypted with pgcrypto under TOTP_ENCRYPTION_KEY),
//! files in the uploads directory. Each test owns a private appliance and checks
//! that nothing it started is left running.

#[path = "common/backups.rs"]
mod backups;
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use backups::*;
use common::Appliance;
use sha2::{Digest, Sha256};

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).expect("meta").permissions().mode() & 0o777
}

#[test]
fn backup_wipe_restore_round_trip() {
    let mut a = boot(NO_SCHEDULE);
    let (ids, secret) = seed(&a);
    let before = snapshot(&a);
    let t = Instant::now();
    let file = backup_create(&a);
    let backup_secs = t.elapsed().as_secs_f64();
    assert!(
        file.starts_with(a.path("state/backups")),
        "{}",
        file.display()
    );
    assert_eq!(mode(&file), 0o600, "backup file mode");
    let names: Vec<String> = std::fs::read_dir(a.path("state/backups"))
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.ends_with(".part")), "{names:?}");
    let st = a.status().expect("status").backup;
    let last = st.last_success.expect("last success in status");
    assert_eq!(PathBuf::from(&last.file), file);
    assert!(
        last.timestamp_seconds > 0 && last.size_bytes > 300_000,
        "{last:?}"
    );
    // A plain tar: the system's tar lists it.
    let out = std::process::Command::new("tar")
        .arg("tf")
        .arg(&file)
        .output()
        .expect("tar");
    let listing = String::from_utf8_lossy(&out.stdout);
    for m in [
        "KOPROGO-BACKUP",
        "db.dump",
        "secrets.env",
        "uploads/building-7/photo.jpg",
        "manifest.json",
    ] {
        assert!(listing.contains(m), "{m} missing from:\n{listing}");
    }
    let (code, out, _) = a.cli(&["backup", "list"]);
    assert_eq!(code, 0);
    assert!(out.contains("checksums"), "{out}");

    // Wipe: rows, uploads, secrets (the API restarted on new keys cannot decrypt).
    psql(&a, "DELETE FROM items; DELETE FROM secrets_demo;");
    for e in std::fs::read_dir(a.path("state/uploads"))
        .expect("ls")
        .flatten()
    {
        let p = e.path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p).expect("rm");
        } else {
            std::fs::remove_file(&p).expect("rm");
        }
    }
    let kept: String = before
        .secrets
        .lines()
        .filter(|l| !l.starts_with("TOTP_ENCRYPTION_KEY") && !l.starts_with("JWT_SECRET"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(a.path("state/secrets.env"), kept).expect("replace secrets");
    let (code, out, err) = a.cli(&["restart", "api"]);
    assert_eq!(code, 0, "{out}{err}");
    a.wait_ready();
    assert_ne!(
        std::fs::read_to_string(a.path("state/secrets.env")).expect("secrets"),
        before.secrets,
        "new keys were generated"
    );
    assert_eq!(item_count(&a), 0);

    let t = Instant::now();
    let (code, out) = restore(&a, &file, &[]);
    let restore_secs = t.elapsed().as_secs_f64();
    assert_eq!(code, 0, "restore: {out}");
    assert!(out.contains("safety backup"), "{out}");
    a.wait_ready();
    let after = snapshot(&a);
    assert_eq!(after.items, before.items);
    assert_eq!(
        after.uploads, before.uploads,
        "uploads restored identically"
    );
    assert_eq!(
        after.secrets, before.secrets,
        "secrets restored identically"
    );
    for (i, id) in ids.iter().enumerate() {
        let (code, v) = get(&a, &format!("/api/v1/items/{id}"));
        assert_eq!(code, 200);
        assert_eq!(v["body"], format!("row {i}: {}", "é".repeat(i)));
    }
    let (code, v) = get(&a, &format!("/api/v1/secrets/{secret}"));
    assert_eq!(
        code, 200,
        "2FA secret must decrypt with the restored key: {v}"
    );
    assert_eq!(v["plaintext"], "JBSWY3DPEHPK3PXP");
    // Nothing left over: no scratch database, no staging, the safety backup exists.
    let dbs = psql(
        &a,
        "SELECT string_agg(datname, ',') FROM pg_database WHERE datname LIKE 'koprogo%'",
    );
    assert_eq!(dbs, "koprogo");
    assert!(!a
        .path("state/backup-work")
        .read_dir()
        .is_ok_and(|mut d| d.next().is_some()));
    let (_, list, _) = a.cli(&["backup", "list"]);
    assert!(list.contains("pre-restore"), "{list}");
    eprintln!("figures: small backup {backup_secs:.2}s, restore {restore_secs:.2}s");
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn damaged_foreign_and_newer_files_are_refused_and_nothing_changes() {
    let mut a = boot(NO_SCHEDULE);
    seed(&a);
    let good = backup_create(&a);
    let bytes = std::fs::read(&good).expect("read backup");
    let dir = a.path("bad");
    std::fs::create_dir(&dir).expect("mkdir");
    // Data written after the backup must survive every refusal.
    post(&a, "/api/v1/items", "after the backup");
    let before = snapshot(&a);

    let truncated = dir.join("truncated.kbk");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    let flipped = dir.join("flipped.kbk");
    let (at, len) = member_offset(&good, "db.dump");
    let mut b = bytes.clone();
    b[(at + len / 2) as usize] ^= 0x01;
    std::fs::write(&flipped, &b).expect("write");
    let foreign = dir.join("foreign.kbk");
    let out = std::process::Command::new("tar")
        .arg("cf")
        .arg(&foreign)
        .arg("-C")
        .arg(a.path(""))
        .arg("koprogo.toml")
        .output()
        .expect("tar");
    assert!(out.status.success());
    let text = dir.join("notes.kbk");
    std::fs::write(&text, "not a backup at all\n").expect("write");
    // A manifest claiming a newer format (its checksum made to match, as a newer
    // koprogo would write it).
    let newer = dir.join("newer.kbk");
    let (mat, mlen) = member_offset(&good, "manifest.json");
    let (sat, _) = member_offset(&good, "manifest.sha256");
    let mut b = bytes.clone();
    let manifest = &mut b[mat as usize..(mat + mlen) as usize];
    let textm = String::from_utf8(manifest.to_vec()).expect("utf8");
    let patched = textm.replacen("\"format\": 2,", "\"format\": 9,", 1);
    assert_ne!(patched, textm);
    let patched = patched.into_bytes();
    manifest.copy_from_slice(&patched);
    let sum: String = Sha256::digest(&patched)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect();
    b[sat as usize..sat as usize + 64].copy_from_slice(sum.as_bytes());
    std::fs::write(&newer, &b).expect("write");

    for (file, expect) in [
        (&truncated, "damaged or truncated"),
        (&flipped, "checksum mismatch"),
        (&foreign, "not a koprogo backup"),
        (&text, "not a koprogo backup"),
        (&newer, "newer koprogo"),
    ] {
        let (code, out) = restore(&a, file, &[]);
        assert_eq!(code, 1, "{}: {out}", file.display());
        assert!(
            out.contains(expect),
            "{}: expected {expect:?} in: {out}",
            file.display()
        );
        assert!(out.contains("nothing was changed"), "{out}");
        assert_eq!(snapshot(&a), before, "{} changed something", file.display());
    }

    // A backup of a newer database schema than the running API's.
    psql(&a, "UPDATE demo_schema SET version = 99");
    let newer_schema = backup_create(&a);
    psql(&a, "UPDATE demo_schema SET version = 1");
    let (code, out) = restore(&a, &newer_schema, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("schema is newer"), "{out}");
    assert_eq!(snapshot(&a), before);
    // Only two backups were made; no safety backup for a refused file.
    let (_, list, _) = a.cli(&["backup", "list"]);
    assert!(!list.contains("pre-restore"), "{list}");
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn a_restore_whose_api_never_becomes_ready_is_rolled_back() {
    let mut a = boot(NO_SCHEDULE);
    seed(&a);
    psql(&a, "UPDATE demo_schema SET version = 99");
    let poisoned = backup_create(&a);
    psql(&a, "UPDATE demo_schema SET version = 1");
    post(
        &a,
        "/api/v1/items",
        "written after the backup, kept by the rollback",
    );
    let before = snapshot(&a);
    let t = Instant::now();
    // --force skips the schema check: the demo API exits 1 on schema 99.
    let (code, out) = restore(&a, &poisoned, &["--force"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("rolled back"), "{out}");
    assert!(!out.contains("ROLLBACK FAILED"), "{out}");
    let st = a.wait_ready();
    let mut after = snapshot(&a);
    assert_ne!(after.api_pid, before.api_pid, "the API was restarted");
    after.api_pid = before.api_pid;
    assert_eq!(after, before, "the data is as before the restore");
    assert_eq!(psql(&a, "SELECT max(version) FROM demo_schema"), "1");
    let dbs = psql(
        &a,
        "SELECT string_agg(datname, ',') FROM pg_database WHERE datname LIKE 'koprogo%'",
    );
    assert_eq!(dbs, "koprogo");
    let api_log = std::fs::read_to_string(a.path("logs/api.log")).expect("api log");
    assert!(api_log.contains("newer than this binary"), "{api_log}");
    eprintln!(
        "rollback took {:.1}s; api restarts {}",
        t.elapsed().as_secs_f64(),
        Appliance::service(&st, "api").restarts
    );
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn verify_good_and_corrupted_backups() {
    let mut a = boot(NO_SCHEDULE);
    seed(&a);
    let good = backup_create(&a);
    let (code, out, err) = a.cli(&["backup", "verify"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("every count as in the manifest"), "{out}");
    let (_, list, _) = a.cli(&["backup", "list"]);
    assert!(list.contains("yes ("), "{list}");

    // A damaged copy in the backup directory.
    let mut bytes = std::fs::read(&good).expect("read");
    let (at, len) = member_offset(&good, "db.dump");
    bytes[(at + len - 3) as usize] ^= 0x40;
    let bad = a.path("state/backups/koprogo-20000101T000000Z.kbk");
    std::fs::write(&bad, &bytes).expect("write");
    let (code, out, err) = a.cli(&["backup", "verify", bad.to_str().expect("utf8")]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("damaged"), "{err}");
    let (_, list, _) = a.cli(&["backup", "list"]);
    assert!(list.contains("FAILED"), "{list}");
    let dbs = psql(
        &a,
        "SELECT string_agg(datname, ',') FROM pg_database WHERE datname LIKE 'koprogo%'",
    );
    assert_eq!(dbs, "koprogo", "scratch databases dropped");
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

fn set_age(p: &Path, days: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .expect("open");
    f.set_modified(SystemTime::now() - Duration::from_secs(days * 86400 + 600))
        .expect("set mtime");
}

#[test]
fn retention_by_count_and_age_keeps_the_newest_good_one_and_copy_hook_failures_show() {
    // A daily time far from now, so the schedule is on but never fires here.
    let later = chrono::Local::now() + chrono::Duration::hours(12);
    let extra = format!(
        "\n[backup]\nschedule = \"{}\"\nkeep = 3\nmax_age = \"2d\"\ncopy_command = [\"/bin/false\"]\n",
        later.format("%H:%M")
    );
    let mut a = boot(&extra);
    let st = a.status().expect("status").backup;
    assert!(st.enabled && st.next_run.is_some(), "{st:?}");
    seed(&a);
    let first = backup_create(&a);
    let dir = a.path("state/backups");
    // Copies aged 1, 3, 4, 5 and 10 days.
    let mut old = Vec::new();
    for (i, days) in [1u64, 3, 4, 5, 10].iter().enumerate() {
        let p = dir.join(format!("koprogo-2000010{i}T000000Z.kbk"));
        std::fs::copy(&first, &p).expect("copy");
        set_age(&p, *days);
        old.push(p);
    }
    set_age(&first, 1);
    let st = a.status().expect("status").backup;
    assert!(
        st.last_copy_error.is_some(),
        "failing copy hook shows: {st:?}"
    );
    let newest = backup_create(&a);
    let left: Vec<String> = koprogo::backup::retention::list(&dir)
        .expect("list")
        .into_iter()
        .map(|e| e.name)
        .collect();
    // Kept: the new one and those at most 2 days old (first, 2000-01-00's copy).
    assert_eq!(left.len(), 3, "{left:?}");
    assert!(
        newest.exists() && first.exists() && old[0].exists(),
        "{left:?}"
    );
    assert!(old[1..].iter().all(|p| !p.exists()), "{left:?}");

    // All too old: the newest good backup is still never deleted.
    for e in koprogo::backup::retention::list(&dir).expect("list") {
        set_age(&e.path, 30);
    }
    let (deleted, _) = koprogo::backup::retention::prune(
        &dir,
        3,
        Duration::from_secs(2 * 86400),
        None,
        SystemTime::now(),
    );
    assert_eq!(deleted.len(), 2, "{deleted:?}");
    assert_eq!(
        koprogo::backup::retention::list(&dir).expect("list").len(),
        1
    );
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

/// Unmounts the tmpfs even when the test fails.
struct Mount(PathBuf);

impl Mount {
    /// A tmpfs of `size` (e.g. "2m") at `dir`, owned by the service user; unmounted
    /// when dropped.
    fn tmpfs(dir: &Path, size: &str, mode: &str) -> Mount {
        let who = nix::unistd::User::from_name("koprogo")
            .expect("getpwnam")
            .expect("user koprogo");
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!(
                "size={size},mode={mode},uid={},gid={}",
                who.uid, who.gid
            ))
            .arg("tmpfs")
            .arg(dir)
            .status()
            .expect("mount");
        assert!(st.success(), "mount tmpfs");
        Mount(dir.to_path_buf())
    }
}
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn full_disk_during_backup_leaves_earlier_backups_and_no_partial_file() {
    if !common::is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let mut a = Appliance::new("\n[backup]\nenabled = false\ndir = \"bk\"\n");
    let bk = a.path("bk");
    std::fs::create_dir(&bk).expect("mkdir");
    let _mount = Mount::tmpfs(&bk, "2m", "0750");
    a.start();
    a.wait_ready();
    post(&a, "/api/v1/items", "small");
    let first = backup_create(&a);
    let first_bytes = std::fs::read(&first).expect("read");
    // About 6 MB of incompressible rows: the next backup cannot fit in 2 MiB.
    psql(
        &a,
        "INSERT INTO items (body) SELECT encode(gen_random_bytes(1024), 'base64') FROM generate_series(1, 6000)",
    );
    let (code, out, err) = a.cli(&["backup", "create"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("no space left"), "{err}");
    assert!(err.contains("earlier backups are untouched"), "{err}");
    let names: Vec<String> = std::fs::read_dir(&bk)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.contains(".part")),
        "partial file left: {names:?}"
    );
    assert_eq!(
        std::fs::read(&first).expect("read"),
        first_bytes,
        "earlier backup intact"
    );
    let st = a.status().expect("status").backup;
    assert!(st.last_error.is_some_and(|e| e.contains("no space left")));
    let (code, out, err) = a.cli(&["backup", "verify", first.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{out}{err}");
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn encrypted_backup_round_trip_with_an_age_identity() {
    use age::secrecy::ExposeSecret;
    let id = age::x25519::Identity::generate();
    let dir = tempfile::tempdir().expect("tempdir");
    let idf = dir.path().join("operator.key");
    std::fs::write(&idf, format!("{}\n", id.to_string().expose_secret())).expect("key");
    let copied = dir.path().join("offsite");
    std::fs::create_dir(&copied).expect("mkdir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&copied, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let extra = format!(
        "\n[backup]\nenabled = false\nencrypt_to = \"{}\"\ncopy_command = [\"/bin/cp\", \"-t\", \"{}\"]\n",
        id.to_public(),
        copied.display()
    );
    let mut a = boot(&extra);
    let (_, secret) = seed(&a);
    let before = snapshot(&a);
    let file = backup_create(&a);
    assert!(
        file.to_string_lossy().ends_with(".kbk.age"),
        "{}",
        file.display()
    );
    let raw = std::fs::read(&file).expect("read");
    assert!(raw.starts_with(b"age-encryption.org/v1"));
    assert!(!raw.windows(8).any(|w| w == b"db.dump\0"), "not in clear");
    let copy = copied.join(file.file_name().expect("name"));
    assert_eq!(std::fs::read(&copy).expect("copied by the hook"), raw);

    let (code, _, err) = a.cli(&["backup", "verify"]);
    assert_eq!(code, 1);
    assert!(err.contains("--identity"), "{err}");
    let (code, out, err) = a.cli(&[
        "backup",
        "verify",
        "--identity",
        idf.to_str().expect("utf8"),
    ]);
    assert_eq!(code, 0, "{out}{err}");

    psql(&a, "DELETE FROM items; DELETE FROM secrets_demo;");
    std::fs::remove_file(a.path("state/uploads/statutes.pdf")).expect("rm");
    let (code, out) = restore(&a, &copy, &["--identity", idf.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{out}");
    a.wait_ready();
    let mut after = snapshot(&a);
    after.api_pid = before.api_pid;
    assert_eq!(after, before);
    let (code, v) = get(&a, &format!("/api/v1/secrets/{secret}"));
    assert_eq!(
        (code, v["plaintext"].as_str()),
        (200, Some("JBSWY3DPEHPK3PXP"))
    );
    assert_no_decrypted_copy(&a);
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

/// A restore checks the staging disk first: a file larger than the free space is
/// refused before anything is written, with the directory and both figures named.
#[test]
fn restore_without_room_to_stage_is_refused_before_anything_changes() {
    if !common::is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let mut a = boot(NO_SCHEDULE);
    seed(&a);
    let file = backup_create(&a);
    let before = snapshot(&a);
    // The staging directory on an 8 MiB disk: less than the file and the margin.
    let work = a.path("state/backup-work");
    std::fs::create_dir_all(&work).expect("mkdir");
    let _mount = Mount::tmpfs(&work, "8m", "0700");
    let (code, out) = restore(&a, &file, &[]);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("not enough free space")
            && out.contains("backup-work")
            && out.contains("nothing was changed"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_dir(&work).expect("ls").count(),
        0,
        "something was staged"
    );
    let after = snapshot(&a);
    assert_eq!(after.items, before.items);
    assert_eq!(after.uploads, before.uploads);
    assert_eq!(after.secrets, before.secrets);
    assert_eq!(after.api_pid, before.api_pid, "the API was restarted");
    drop(_mount);
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

/// A tar header of type `kind` named `name` claiming `size` bytes (its data, if
/// any, is the caller's to append).
fn tar_header(kind: u8, name: &str, size: u64) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_path(name).expect("name");
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    h.as_bytes().to_vec()
}

/// The supervisor's resident memory: (now, peak since the last reset), KiB.
fn rss_kib(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS/VmHWM")
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Tar extension headers in a restore file are read by koprogo, bounded: a PAX
/// header claiming 4 GiB (not even in the file) and a GNU long name of 64 MiB are
/// refused from their header, at once and without the supervisor's memory growing,
/// by `restore`, `backup verify` and `backup verify -i` (encrypted), and nothing
/// changes. A backup with a long upload name (a long-name header of our own) still
/// verifies.
#[test]
fn oversized_tar_extension_headers_are_refused_before_reading() {
    let mut a = boot(NO_SCHEDULE);
    seed(&a);
    let long = format!("{}.pdf", "procès-verbal ".repeat(12));
    std::fs::write(a.path("state/uploads").join(&long), b"%PDF long name").expect("upload");
    let good = backup_create(&a);
    let (code, out, err) = a.cli(&["backup", "verify", good.to_str().expect("utf8")]);
    assert_eq!(
        code,
        0,
        "a backup with a {}-byte name: {out}{err}",
        long.len()
    );
    let before = snapshot(&a);

    // The genuine first member (KOPROGO-BACKUP: header and one data block).
    let bytes = std::fs::read(&good).expect("read backup");
    let head = &bytes[..1024];
    let dir = a.path("bad");
    std::fs::create_dir(&dir).expect("mkdir");
    let pax = dir.join("pax.kbk");
    let mut b = head.to_vec();
    b.extend(tar_header(b'x', "PaxHeaders/db.dump", 4 << 30));
    b.resize(b.len() + 1024, 0);
    std::fs::write(&pax, &b).expect("write");
    let longname = dir.join("longname.kbk");
    let mut b = head.to_vec();
    b.extend(tar_header(b'L', "././@LongLink", 64 << 20));
    b.resize(b.len() + (64 << 20), b'a');
    b.extend(tar_header(b'0', "db.dump", 0));
    b.resize(b.len() + 1024, 0);
    std::fs::write(&longname, &b).expect("write");
    // The PAX one encrypted to an operator's key.
    let id = age::x25519::Identity::generate();
    let idf = dir.join("operator.key");
    {
        use age::secrecy::ExposeSecret;
        std::fs::write(&idf, format!("{}\n", id.to_string().expose_secret())).expect("key");
    }
    let sealed = dir.join("pax.kbk.age");
    let recipient = id.to_public();
    let enc = age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
        .expect("encryptor");
    let mut w = enc
        .wrap_output(std::fs::File::create(&sealed).expect("create"))
        .expect("age");
    std::io::Write::write_all(&mut w, &std::fs::read(&pax).expect("read")).expect("encrypt");
    w.finish().expect("finish");

    // Peak memory of the supervisor (which reads the files) from here on.
    let pid = a.pid();
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset VmHWM");
    let (rss_before, _) = rss_kib(pid);
    let (p, l, s, i) = (
        pax.to_str().expect("utf8"),
        longname.to_str().expect("utf8"),
        sealed.to_str().expect("utf8"),
        idf.to_str().expect("utf8"),
    );
    for (args, file, what, claim) in [
        (
            vec!["restore", p],
            p,
            "PAX extended header ('x')",
            "4294967296",
        ),
        (vec!["restore", l], l, "GNU long name ('L')", "67108864"),
        (
            vec!["backup", "verify", p],
            p,
            "PAX extended header",
            "4294967296",
        ),
        (vec!["backup", "verify", l], l, "GNU long name", "67108864"),
        (
            vec!["backup", "verify", "-i", i, s],
            "",
            "PAX extended header",
            "4294967296",
        ),
        (
            vec!["restore", "-i", i, s],
            "",
            "PAX extended header",
            "4294967296",
        ),
    ] {
        let t = Instant::now();
        let (code, out, err) = a.cli(&args);
        let took = t.elapsed();
        let text = format!("{out}{err}");
        assert_eq!(code, 1, "{args:?}: {text}");
        assert!(
            text.contains(file)
                && text.contains(what)
                && text.contains("at byte 1024")
                && text.contains(&format!("claims {claim} bytes"))
                && text.contains("64 KiB"),
            "{args:?}: {text}"
        );
        if args[0] == "restore" {
            assert!(text.contains("nothing was changed"), "{args:?}: {text}");
        }
        assert!(took < Duration::from_secs(10), "{args:?} took {took:?}");
        assert_eq!(snapshot(&a), before, "{args:?} changed something");
    }
    let (rss_after, peak) = rss_kib(pid);
    eprintln!(
        "supervisor RSS {rss_before} KiB before, {rss_after} KiB after, peak {peak} KiB while \
         refusing the crafted files"
    );
    assert!(
        peak < rss_before + 16 * 1024,
        "the supervisor's peak RSS grew by {} KiB",
        peak - rss_before
    );
    assert_no_decrypted_copy(&a);
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}
