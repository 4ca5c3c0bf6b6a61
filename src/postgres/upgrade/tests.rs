//! Tests of the upgrade steps that need no PostgreSQL: the checks, the recovery of
//! interrupted runs on fake clusters, the revert instructions.

use std::path::{Path, PathBuf};

use super::recover::recover;
use super::steps::revert_instructions;
use super::*;

fn cfg_in(state: &Path) -> Config {
    let file = state.join("koprogo.toml");
    std::fs::write(
        &file,
        format!(
            "[paths]\nstate = \"{}\"\nlogs = \"{}\"\nrun = \"{}\"\n",
            state.display(),
            state.join("logs").display(),
            state.join("run").display()
        ),
    )
    .expect("write config");
    Config::load(&file).expect("config")
}

fn bins(dir: &Path, major: u32) -> Binaries {
    Binaries {
        dir: dir.to_path_buf(),
        major,
        version: format!("postgres (PostgreSQL) {major}.1"),
    }
}

fn fake_cluster(dir: &Path, major: u32) {
    std::fs::create_dir_all(dir.join("global")).expect("mkdir");
    std::fs::write(dir.join("PG_VERSION"), format!("{major}\n")).expect("PG_VERSION");
    std::fs::write(dir.join("global").join("pg_control"), b"control").expect("pg_control");
}

fn fake_bins(root: &Path, major: u32, tools: &[&str]) -> PathBuf {
    let dir = root.join(major.to_string()).join("bin");
    std::fs::create_dir_all(&dir).expect("mkdir");
    for t in tools {
        std::fs::write(dir.join(t), b"").expect("tool");
    }
    dir
}

#[test]
fn parses_controldata() {
    let text = "pg_control version number:            1300\n\
                Database cluster state:               shut down\n\
                Data page checksum version:           0\n";
    assert_eq!(
        parse_controldata(text),
        ControlData {
            state: Some("shut down".into()),
            checksums: Some(0)
        }
    );
    assert_eq!(
        parse_controldata("Database cluster state: in production\n").state,
        Some("in production".into())
    );
}

#[test]
fn old_binaries_sit_next_to_the_new_ones() {
    let b = bins(Path::new("/opt/pg/17/bin"), 17);
    assert_eq!(bin_dir_of(&b, 15), PathBuf::from("/opt/pg/15/bin"));
    let b = bins(Path::new("/usr/local/pgsql/bin"), 17);
    assert_eq!(
        bin_dir_of(&b, 15),
        PathBuf::from("/usr/lib/postgresql/15/bin")
    );
}

#[test]
fn check_refuses_without_the_old_binaries_and_names_the_fix() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = cfg_in(d.path());
    let root = d.path().join("pg");
    let new = fake_bins(&root, 17, &["postgres", "pg_upgrade"]);
    // No cluster yet, or the same major: fine.
    assert!(check(&cfg, &bins(&new, 17)).is_ok());
    fake_cluster(&data_dir(&cfg), 15);
    let err = check(&cfg, &bins(&new, 17)).expect_err("old binaries are gone");
    assert!(err.contains("koprogo.toml"), "{err}");
    assert!(err.contains("install postgresql-15 again"), "{err}");
    assert!(err.contains("15/bin/postgres is missing"), "{err}");
    fake_bins(&root, 15, &["postgres", "pg_ctl", "pg_controldata"]);
    assert!(check(&cfg, &bins(&new, 17)).is_ok());
    // A downgrade is never attempted.
    let old = root.join("15").join("bin");
    fake_cluster(&data_dir(&cfg), 17);
    let err = check(&cfg, &bins(&old, 15)).expect_err("downgrade");
    assert!(err.contains("install postgresql-17"), "{err}");
}

#[test]
fn check_wants_pg_upgrade() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = cfg_in(d.path());
    let root = d.path().join("pg");
    let new = fake_bins(&root, 17, &["postgres"]);
    fake_bins(&root, 15, &["postgres", "pg_ctl", "pg_controldata"]);
    fake_cluster(&data_dir(&cfg), 15);
    let err = check(&cfg, &bins(&new, 17)).expect_err("no pg_upgrade");
    assert!(err.contains("pg_upgrade is missing"), "{err}");
}

#[test]
fn recover_finishes_an_interrupted_swap() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = cfg_in(d.path());
    let st = d.path();
    fake_cluster(&st.join(NEW_DIR), 17);
    fake_cluster(&st.join("pgdata.15.linked"), 15);
    fake_cluster(&st.join("pgdata.15"), 15);
    write_marker(
        &cfg,
        &Marker {
            from: 15,
            to: 17,
            backup: st.join("pgdata.15"),
            upgraded_at: "now".into(),
            started: false,
            backup_removed: false,
            analyzed: false,
        },
    )
    .expect("marker");
    recover(&cfg).expect("recover");
    assert_eq!(cluster_major(&data_dir(&cfg)), Some(17));
    assert!(!st.join(NEW_DIR).exists());
    assert!(!st.join("pgdata.15.linked").exists());
    assert!(st.join("pgdata.15").exists(), "the copy is kept");
}

#[test]
fn recover_restores_the_copy_after_an_interrupted_link() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = cfg_in(d.path());
    let st = d.path();
    let data = data_dir(&cfg);
    fake_cluster(&data, 15);
    std::fs::rename(
        data.join("global").join("pg_control"),
        data.join("global").join("pg_control.old"),
    )
    .expect("disable");
    std::fs::write(data.join("half-linked"), b"x").expect("write");
    fake_cluster(&st.join("pgdata.15"), 15);
    fake_cluster(&st.join(NEW_DIR), 17);
    std::fs::create_dir_all(st.join("pgdata.15.copying")).expect("mkdir");
    recover(&cfg).expect("recover");
    assert!(data.join("global").join("pg_control").is_file());
    assert!(!data.join("half-linked").exists(), "the copy came back");
    assert!(!st.join("pgdata.15").exists());
    assert!(!st.join(NEW_DIR).exists());
    assert!(!st.join("pgdata.15.copying").exists());
}

#[test]
fn recover_reenables_an_old_cluster_without_a_copy() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = cfg_in(d.path());
    let data = data_dir(&cfg);
    fake_cluster(&data, 15);
    std::fs::rename(
        data.join("global").join("pg_control"),
        data.join("global").join("pg_control.old"),
    )
    .expect("disable");
    recover(&cfg).expect("recover");
    assert!(data.join("global").join("pg_control").is_file());
}

#[test]
fn revert_instructions_name_every_step() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = cfg_in(d.path());
    let text = revert_instructions(&cfg, 15, 17, Path::new("/usr/lib/postgresql/15/bin"));
    let st = d.path().display().to_string();
    for needle in [
        "systemctl stop koprogo".to_string(),
        format!("mv {st}/pgdata.15 {st}/pgdata"),
        "postgres.bin_dir = \"/usr/lib/postgresql/15/bin\"".to_string(),
        "koprogo.toml".to_string(),
    ] {
        assert!(text.contains(&needle), "{needle} missing in {text}");
    }
}
