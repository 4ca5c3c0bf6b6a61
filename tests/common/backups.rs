//! Helpers of the backup tests (tests/backup.rs, tests/backup_trust.rs): an
//! appliance with data, snapshots of what a refused restore must not change, the
//! CLI's backup commands. Included with `#[path]` next to `mod common`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::Appliance;

/// Backups are made on command only (no daily run during a test).
pub const NO_SCHEDULE: &str = "\n[backup]\nenabled = false\n";

pub fn boot(extra: &str) -> Appliance {
    let mut a = Appliance::new(extra);
    a.start();
    a.wait_ready();
    a
}

pub fn post(a: &Appliance, path: &str, body: &str) -> i64 {
    let (code, resp) = a.http("POST", path, body).expect("POST");
    assert_eq!(code, 201, "POST {path}: {resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).expect("json");
    v["id"].as_i64().expect("id")
}

pub fn get(a: &Appliance, path: &str) -> (u16, serde_json::Value) {
    let (code, resp) = a.http("GET", path, "").expect("GET");
    (code, serde_json::from_str(&resp).unwrap_or_default())
}

pub fn item_count(a: &Appliance) -> i64 {
    let (code, v) = get(a, "/api/v1/items");
    assert_eq!(code, 200, "{v}");
    v["count"].as_i64().expect("count")
}

pub fn psql(a: &Appliance, sql: &str) -> String {
    let (code, out, err) = a.cli(&["psql", "--", "-v", "ON_ERROR_STOP=1", "-tAc", sql]);
    assert_eq!(code, 0, "psql {sql}: {out}{err}");
    out.trim().to_string()
}

/// Every file under `dir`: relative path → content.
pub fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.insert(
                    format!("{}/", p.strip_prefix(root).expect("prefix").display()),
                    Vec::new(),
                );
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).expect("prefix").display().to_string();
                out.insert(rel, std::fs::read(&p).expect("read upload"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// What must not change when a restore is refused.
#[derive(Debug, PartialEq)]
pub struct Snapshot {
    pub items: i64,
    pub uploads: BTreeMap<String, Vec<u8>>,
    pub secrets: String,
    pub api_pid: Option<i32>,
}

pub fn snapshot(a: &Appliance) -> Snapshot {
    let st = a.status().expect("status");
    Snapshot {
        items: item_count(a),
        uploads: tree(&a.path("state/uploads")),
        secrets: std::fs::read_to_string(a.path("state/secrets.env")).expect("secrets"),
        api_pid: Appliance::service(&st, "api").pid,
    }
}

/// Some data: rows, a 2FA secret, two uploaded files (one in a subdirectory).
pub fn seed(a: &Appliance) -> (Vec<i64>, i64) {
    let ids = (0..25)
        .map(|i| post(a, "/api/v1/items", &format!("row {i}: {}", "é".repeat(i))))
        .collect();
    let secret = post(a, "/api/v1/secrets", "JBSWY3DPEHPK3PXP");
    let up = a.path("state/uploads");
    std::fs::create_dir_all(up.join("building-7")).expect("mkdir uploads");
    std::fs::write(up.join("statutes.pdf"), b"%PDF-1.4 statutes").expect("upload");
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(up.join("building-7").join("photo.jpg"), big).expect("upload");
    (ids, secret)
}

pub fn backup_create(a: &Appliance) -> PathBuf {
    let (code, out, err) = a.cli(&["backup", "create"]);
    assert_eq!(code, 0, "backup create: {out}{err}");
    let path = out
        .split_whitespace()
        .find(|w| w.contains("/koprogo-") && (w.contains(".kbk")))
        .expect("file in the message")
        .trim_end_matches(':')
        .to_string();
    PathBuf::from(path)
}

pub fn restore(a: &Appliance, file: &Path, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["restore", file.to_str().expect("utf8")];
    args.extend_from_slice(extra);
    let (code, out, err) = a.cli(&args);
    (code, format!("{out}{err}"))
}

/// The byte offset of member `name`'s data in a (plain) backup.
pub fn member_offset(file: &Path, name: &str) -> (u64, u64) {
    let f = std::fs::File::open(file).expect("open");
    let mut ar = tar::Archive::new(f);
    for e in ar.entries().expect("entries") {
        let e = e.expect("entry");
        if e.path_bytes().as_ref() == name.as_bytes() {
            return (e.raw_file_position(), e.size());
        }
    }
    panic!("no {name} in {}", file.display());
}
