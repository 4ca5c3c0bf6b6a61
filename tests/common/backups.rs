//! Helpers of the backup tests (tests/backup.rs, tests/backup_trust.rs): an
//! appliance with data, snapshots of what a refused restore must not change, the
//! CLI's backup commands. Included with `#[path]` next to `mod common`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read};
use std::path::{Path, PathBuf};

use koprogo::backup::archive::{self, Manifest, Sink, Writer};
use koprogo::backup::auth::Key;
use sha2::{Digest, Sha256};

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

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Makes `file` readable by the service user (the supervisor reads it as that user).
pub fn give_to_service_user(file: &Path) {
    if crate::common::is_root() {
        let st = std::process::Command::new("chown")
            .arg("koprogo")
            .arg(file)
            .status()
            .expect("chown");
        assert!(st.success());
    }
}

/// `src` (a backup) re-packed by someone who does not have the appliance's key:
/// the same members, a correct manifest and checksums, sealed with `key`.
pub fn repack(src: &Path, dst: &Path, key: &Key) {
    let mut ar = tar::Archive::new(File::open(src).expect("open"));
    let mut w = Writer::new(Sink::Plain(BufWriter::new(
        File::create(dst).expect("create"),
    )))
    .expect("writer");
    let mut manifest: Option<Manifest> = None;
    for e in ar.entries().expect("entries") {
        let mut e = e.expect("entry");
        let name = String::from_utf8_lossy(&e.path_bytes())
            .trim_end_matches('/')
            .to_string();
        let mut data = Vec::new();
        e.read_to_end(&mut data).expect("read member");
        match name.as_str() {
            archive::MAGIC_NAME | archive::MANIFEST_SUM | archive::MANIFEST_AUTH => {}
            archive::MANIFEST => manifest = Some(serde_json::from_slice(&data).expect("manifest")),
            _ if e.header().entry_type().is_dir() => w.add_dir(&name, 0o750, 0).expect("dir"),
            _ => w
                .add_file(&name, &mut &data[..], data.len() as u64, 0o600, 0)
                .expect("file"),
        }
    }
    let mut m = manifest.expect("a manifest");
    let (f, _) = w.finish(&mut m, key).expect("finish");
    f.sync_all().expect("sync");
    give_to_service_user(dst);
}

/// `src` as a koprogo from before backup authentication wrote it: format 1, no
/// `manifest.auth`, every checksum right.
pub fn as_format_1(src: &Path, dst: &Path) {
    let mut b = std::fs::read(src).expect("read");
    let (mat, mlen) = member_offset(src, archive::MAGIC_NAME);
    let magic = &mut b[mat as usize..(mat + mlen) as usize];
    let text = String::from_utf8(magic.to_vec()).expect("utf8");
    magic.copy_from_slice(text.replace("format 2", "format 1").as_bytes());
    let (jat, jlen) = member_offset(src, archive::MANIFEST);
    let covered = hex(&Sha256::digest(&b[..jat as usize - 512]));
    let json = &mut b[jat as usize..(jat + jlen) as usize];
    let mut text = String::from_utf8(json.to_vec()).expect("utf8");
    let m: Manifest = serde_json::from_str(&text).expect("manifest");
    text = text
        .replacen("\"format\": 2,", "\"format\": 1,", 1)
        .replacen(&m.archive_sha256, &covered, 1);
    json.copy_from_slice(text.as_bytes());
    let sum = hex(&Sha256::digest(text.as_bytes()));
    let (sat, _) = member_offset(src, archive::MANIFEST_SUM);
    b[sat as usize..sat as usize + 64].copy_from_slice(sum.as_bytes());
    let (aat, _) = member_offset(src, archive::MANIFEST_AUTH);
    b.truncate(aat as usize - 512);
    b.extend_from_slice(&[0u8; 1024]);
    std::fs::write(dst, b).expect("write");
    give_to_service_user(dst);
}

/// No decrypted copy of an encrypted backup is left in the backup directory.
pub fn assert_no_decrypted_copy(a: &Appliance) {
    let names: Vec<String> = std::fs::read_dir(a.path("state/backups"))
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with(".decrypted")),
        "{names:?}"
    );
}
