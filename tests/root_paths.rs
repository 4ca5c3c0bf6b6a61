//! A root command never follows a path the service user can change. The service
//! user is assumed compromised: it plants symbolic links in the directories it owns
//! (or swaps a directory for a link while root works) pointing at a root-only file,
//! and root's `ca export`, `run`, `restore -i` must leave that file untouched.
//! Root only (the escalation needs root to exist); skipped otherwise.

#[path = "common/backups.rs"]
mod backups;
mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::Appliance;

/// A root-only directory with a root-only file, and what they looked like.
struct Victim {
    root_dir: tempfile::TempDir,
    dir: PathBuf,
    file: PathBuf,
    before: Vec<(String, u32, u32, u32, Vec<u8>)>,
}

fn describe(dir: &Path) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
    let mut out = vec![{
        let m = std::fs::symlink_metadata(dir).expect("victim dir");
        (".".to_string(), m.uid(), m.gid(), m.mode(), Vec::new())
    }];
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .expect("ls victim")
        .flatten()
        .map(|e| e.path())
        .collect();
    names.sort();
    for p in names {
        let m = std::fs::symlink_metadata(&p).expect("meta");
        let data = if m.is_file() {
            std::fs::read(&p).expect("read")
        } else {
            Vec::new()
        };
        out.push((
            p.file_name().expect("name").to_string_lossy().into_owned(),
            m.uid(),
            m.gid(),
            m.mode(),
            data,
        ));
    }
    out
}

impl Victim {
    fn new() -> Victim {
        Victim::with_mode(0o700)
    }

    /// With its directory in `mode` (0755: a root directory anyone may enter, /etc).
    fn with_mode(mode: u32) -> Victim {
        let d = tempfile::Builder::new()
            .prefix("victim")
            .tempdir()
            .expect("tempdir");
        let dir = d.path().join("etc");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).expect("chmod");
        let file = dir.join("shadow");
        std::fs::write(&file, b"root:$6$secret:19000::::::\n").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let before = describe(&dir);
        Victim {
            root_dir: d,
            dir,
            file,
            before,
        }
    }

    fn assert_untouched(&self, what: &str) {
        assert_eq!(
            describe(&self.dir),
            self.before,
            "{what}: root changed a file outside the appliance through a planted link"
        );
    }
}

fn service_user() -> (nix::unistd::Uid, nix::unistd::Gid) {
    let u = nix::unistd::User::from_name("koprogo")
        .expect("getpwnam")
        .expect("the koprogo user exists (scripts/deps.sh creates it)");
    (u.uid, u.gid)
}

/// `dir` created as the service user's own (as `run` leaves it).
fn owned_dir(dir: &Path) {
    let (uid, gid) = service_user();
    std::fs::create_dir_all(dir).expect("mkdir");
    nix::unistd::chown(dir, Some(uid), Some(gid)).expect("chown");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750)).expect("chmod");
}

/// Swaps `a` and `b` (a directory and a link) as fast as it can until stopped.
fn racing_renamer(a: PathBuf, b: PathBuf) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let t = std::thread::spawn(move || {
        let mut swaps = 0u64;
        while !s.load(Ordering::Relaxed) {
            if nix::fcntl::renameat2(None, &a, None, &b, nix::fcntl::RenameFlags::RENAME_EXCHANGE)
                .is_ok()
            {
                swaps += 1;
            }
        }
        swaps
    });
    (stop, t)
}

#[test]
fn ca_export_never_follows_a_planted_link_even_under_a_racing_renamer() {
    if !common::is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let victim = Victim::new();
    let a = Appliance::new("");
    let state = a.path("state");
    owned_dir(&state);

    // The TLS directory is a link to the victim before the first boot.
    std::os::unix::fs::symlink(&victim.dir, state.join("tls")).expect("symlink");
    let (code, out, err) = a.cli(&["ca", "export"]);
    victim.assert_untouched("ca export through <state>/tls -> victim");
    assert_ne!(code, 0, "{out}{err}");
    assert!(!out.contains("BEGIN CERTIFICATE"), "{out}");

    // The CA files themselves as links.
    std::fs::remove_file(state.join("tls")).expect("rm");
    owned_dir(&state.join("tls/ca"));
    for name in ["ca/root.key", "ca/root.crt"] {
        std::os::unix::fs::symlink(&victim.file, state.join("tls").join(name)).expect("ln");
    }
    std::os::unix::fs::symlink(&victim.dir, state.join("tls/local")).expect("ln");
    let _ = a.cli(&["ca", "export"]);
    victim.assert_untouched("ca export with the CA files as links");
    std::fs::remove_dir_all(state.join("tls")).expect("rm");

    // A real directory and a link swapped while root works.
    owned_dir(&state.join("tls"));
    std::os::unix::fs::symlink(&victim.dir, state.join("tls.evil")).expect("symlink");
    let (stop, t) = racing_renamer(state.join("tls"), state.join("tls.evil"));
    let mut ok = 0;
    for _ in 0..15 {
        let (code, out, _) = a.cli(&["ca", "export"]);
        if code == 0 && out.contains("BEGIN CERTIFICATE") {
            ok += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = t.join().expect("renamer");
    assert!(swaps > 100, "the renamer barely ran ({swaps} swaps)");
    victim.assert_untouched("ca export under a racing renamer");
    eprintln!("{ok}/15 exports succeeded under {swaps} swaps");

    // Without the race, an export works and leaves the CA to the service user.
    let (uid, _) = service_user();
    let tls = state.join("tls");
    if std::fs::symlink_metadata(&tls).expect("tls").is_symlink() {
        std::fs::remove_file(&tls).expect("rm link");
        std::fs::rename(state.join("tls.evil"), &tls).expect("mv");
    } else {
        std::fs::remove_file(state.join("tls.evil")).expect("rm link");
    }
    let (code, out, err) = a.cli(&["ca", "export"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("BEGIN CERTIFICATE"), "{out}");
    for e in std::fs::read_dir(tls.join("ca"))
        .expect("ls tls/ca")
        .flatten()
    {
        assert_eq!(
            e.metadata().expect("meta").uid(),
            uid.as_raw(),
            "{} is not the service user's",
            e.path().display()
        );
    }
    // …and writes where root asked (a root-only place).
    let out_file = victim.root_dir.path().join("root-ca.pem");
    let (code, _, err) = a.cli(&["ca", "export", out_file.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::metadata(&out_file).expect("written").uid(), 0);
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn run_refuses_a_state_path_through_a_link_the_service_user_owns() {
    if !common::is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    // A directory the service user may enter, like /etc: the preflight lets it pass.
    let victim = Victim::with_mode(0o755);
    std::fs::set_permissions(
        victim.root_dir.path(),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    let mut a = Appliance::new("");
    // paths.state = owned/state, where `owned` is the service user's and `state` a link.
    let owned = a.path("owned");
    owned_dir(&owned);
    std::os::unix::fs::symlink(&victim.dir, owned.join("state")).expect("symlink");
    let text = std::fs::read_to_string(&a.config).expect("config");
    std::fs::write(
        &a.config,
        text.replacen("state = \"state\"", "state = \"owned/state\"", 1),
    )
    .expect("write config");
    a.start();
    let code = a.wait_exit(Duration::from_secs(30));
    victim.assert_untouched("run with paths.state through a link");
    assert_ne!(code, 0);
    let err = a.stderr();
    assert!(
        err.contains("symbolic link") && err.contains("owned/state"),
        "{err}"
    );
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn restore_of_an_encrypted_backup_never_chowns_through_a_swapped_copy() {
    if !common::is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    use age::secrecy::ExposeSecret;
    let victim = Victim::new();
    let id = age::x25519::Identity::generate();
    let keys = tempfile::tempdir().expect("tempdir");
    // The operator's key: root's alone.
    let idf = keys.path().join("operator.key");
    std::fs::write(&idf, format!("{}\n", id.to_string().expose_secret())).expect("key");
    std::fs::set_permissions(&idf, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut a = Appliance::new(&format!(
        "\n[backup]\nenabled = false\nencrypt_to = \"{}\"\n",
        id.to_public()
    ));
    a.start();
    a.wait_ready();
    let file = backups::backup_create(&a).display().to_string();
    assert!(file.ends_with(".kbk.age"), "{file}");

    // The service user replaces every decrypted copy by a link to the victim.
    let backups = a.path("state/backups");
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let (dir, target) = (backups.clone(), victim.file.clone());
    let t = std::thread::spawn(move || {
        let mut planted = 0u64;
        while !s.load(Ordering::Relaxed) {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let is_link = e.file_type().map(|t| t.is_symlink()).unwrap_or(true);
                if name.starts_with(".decrypted") && !is_link {
                    let _ = std::fs::remove_file(e.path());
                    if std::os::unix::fs::symlink(&target, e.path()).is_ok() {
                        planted += 1;
                    }
                }
            }
        }
        planted
    });
    for args in [
        vec!["backup", "verify", file.as_str()],
        vec!["restore", file.as_str()],
    ] {
        let mut args = args.clone();
        args.extend(["--identity", idf.to_str().expect("utf8")]);
        let _ = a.cli(&args);
        victim.assert_untouched(&format!("{args:?} with its decrypted copy swapped"));
    }
    stop.store(true, Ordering::Relaxed);
    let planted = t.join().expect("replacer");
    eprintln!("{planted} links planted");
    assert!(planted > 0, "the replacer never saw a decrypted copy");
    // Without the attacker the same restore works.
    for e in std::fs::read_dir(&backups).expect("ls").flatten() {
        if e.file_name().to_string_lossy().starts_with(".decrypted") {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let (code, out, err) = a.cli(&["restore", &file, "--identity", idf.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{out}{err}");
    a.wait_ready();
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}
