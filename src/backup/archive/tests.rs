//! Tests of the backup file: round trips, every flipped byte, crafted tar headers.

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::Path;

use super::format::BLOCK;
use super::read::safe_relative;
use super::*;

fn manifest() -> Manifest {
    Manifest {
        format: FORMAT,
        kind: "koprogo-backup".into(),
        created: "2026-01-01T00:00:00Z".into(),
        created_unix: 1_767_225_600,
        reason: "manual".into(),
        koprogo_version: "test".into(),
        domain: "localhost".into(),
        postgres: PgInfo::default(),
        schema: BTreeMap::new(),
        uploads: UploadsInfo::default(),
        secrets: Vec::new(),
        archive_sha256: String::new(),
        members: Vec::new(),
    }
}

const SECRETS_TEXT: &str = "JWT_SECRET=0123456789abcdef0123456789abcdef0123\n\
    TOTP_ENCRYPTION_KEY=0000000000000000000000000000000000000000000000000000000000000000\n\
    ENERGY_ENCRYPTION_MASTER_KEY=1111111111111111111111111111111111111111111111111111111111111111\n";

fn write_sample(path: &Path) -> u64 {
    let f = std::fs::File::create(path).expect("create");
    let mut w = Writer::new(Sink::Plain(BufWriter::new(f))).expect("writer");
    let dump = vec![7u8; 100_000];
    w.add_file(DUMP, &mut &dump[..], dump.len() as u64, 0o600, 0)
        .expect("dump");
    w.add_bytes(SECRETS, SECRETS_TEXT.as_bytes(), 0o600, 0)
        .expect("secrets");
    w.add_dir(UPLOADS, 0o750, 0).expect("dir");
    w.add_dir("uploads/a", 0o750, 0).expect("dir");
    let long = format!("uploads/a/{}.pdf", "x".repeat(150));
    w.add_bytes(&long, b"pdf", 0o640, 0).expect("file");
    let mut m = manifest();
    let key = super::super::auth::Key::from_hex(&"5a".repeat(32)).expect("key");
    let (f, n) = w.finish(&mut m, &key).expect("finish");
    f.sync_all().expect("sync");
    n
}

#[test]
fn round_trip_and_every_flipped_byte_is_caught() {
    let d = tempfile::tempdir().expect("tempdir");
    let p = d.path().join("b.kbk");
    let n = write_sample(&p);
    assert_eq!(std::fs::metadata(&p).expect("meta").len(), n);
    let up = d.path().join("up");
    let c = check(
        &p,
        &Extract {
            dump_to: Some(d.path().join("dump")),
            uploads_to: Some(up.clone()),
        },
    )
    .expect("good file passes");
    assert_eq!(c.manifest.members.len(), 5);
    assert!(c.seal.is_some(), "format 2 carries manifest.auth");
    assert_eq!(
        std::fs::read(d.path().join("dump")).expect("dump").len(),
        100_000
    );
    let long = up.join("a").join(format!("{}.pdf", "x".repeat(150)));
    assert_eq!(std::fs::read(long).expect("long name"), b"pdf");
    assert_eq!(
        crate::secrets::check_copy(&c.secrets)
            .expect("secrets")
            .len(),
        3
    );

    // Flip one byte at a spread of offsets, padding and headers included.
    let good = std::fs::read(&p).expect("read");
    let q = d.path().join("bad.kbk");
    let step = (good.len() / 97).max(1);
    let mut offsets: Vec<usize> = (0..good.len()).step_by(step).collect();
    offsets.extend([good.len() - 1, good.len() - 1100, 600, 100_000 + 1000]);
    for at in offsets {
        let mut bad = good.clone();
        bad[at] ^= 0x20;
        std::fs::write(&q, &bad).expect("write");
        let e = check(&q, &Extract::default()).expect_err(&format!("flip at {at} accepted"));
        assert!(e.is::<Refused>(), "flip at {at}: {e:#}");
    }
    for cut in [good.len() / 2, good.len() - 1024, good.len() - 1, 100] {
        std::fs::write(&q, &good[..cut]).expect("write");
        let e = check(&q, &Extract::default()).expect_err("truncated accepted");
        assert!(
            format!("{e:#}").contains("damaged or truncated"),
            "{cut}: {e:#}"
        );
    }
    std::fs::write(&q, b"hello, not a backup").expect("write");
    let e = check(&q, &Extract::default()).expect_err("foreign accepted");
    assert!(format!("{e:#}").contains("not a koprogo backup"), "{e:#}");
}

/// A tar header of `kind` named `name` claiming `size` bytes, then `data`.
fn raw_member(out: &mut Vec<u8>, kind: u8, name: &str, size: u64, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_path(name).expect("name");
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    pad_zeros(out);
}

fn pad_zeros(v: &mut Vec<u8>) {
    let rem = v.len() % BLOCK;
    if rem != 0 {
        v.resize(v.len() + BLOCK - rem, 0);
    }
}

/// The first member of a real backup, then `rest`, then the end of the archive.
fn crafted(rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let magic = format!("koprogo backup\nformat {FORMAT}\n");
    raw_member(
        &mut out,
        b'0',
        MAGIC_NAME,
        magic.len() as u64,
        magic.as_bytes(),
    );
    out.extend_from_slice(rest);
    out.resize(out.len() + 2 * BLOCK, 0);
    out
}

#[test]
fn extension_headers_are_bounded_and_read_by_us() {
    let d = tempfile::tempdir().expect("tempdir");
    let p = d.path().join("x.kbk");
    let check_bytes = |bytes: &[u8]| {
        std::fs::write(&p, bytes).expect("write");
        let e = check(&p, &Extract::default()).expect_err("crafted file accepted");
        assert!(e.is::<Refused>(), "{e:#}");
        format!("{e:#}")
    };
    // Claims larger than the bound are refused from the header alone (none of
    // these files holds the bytes it claims).
    for (kind, what) in [
        (b'x', "PAX extended header ('x')"),
        (b'g', "PAX global header ('g')"),
        (b'L', "GNU long name ('L')"),
        (b'K', "GNU long link name ('K')"),
    ] {
        let mut rest = Vec::new();
        raw_member(&mut rest, kind, "././@LongLink", 4 << 30, b"");
        let e = check_bytes(&crafted(&rest));
        assert!(
            e.contains(&p.display().to_string())
                && e.contains(what)
                && e.contains("at byte 1024")
                && e.contains("claims 4294967296 bytes")
                && e.contains("64 KiB"),
            "{e}"
        );
    }
    // Within the bound: a PAX header is still not ours.
    let mut rest = Vec::new();
    raw_member(
        &mut rest,
        b'x',
        "PaxHeaders/db.dump",
        28,
        b"28 path=uploads/../../etc/x\n",
    );
    let e = check_bytes(&crafted(&rest));
    assert!(
        e.contains("PAX extended header") && e.contains("not read"),
        "{e}"
    );
    // A long name must name a member.
    let mut rest = Vec::new();
    raw_member(&mut rest, b'L', "././@LongLink", 8, b"db.dump\0");
    let e = check_bytes(&crafted(&rest));
    assert!(e.contains("long name with no member after it"), "{e}");
    let mut rest = Vec::new();
    raw_member(&mut rest, b'L', "././@LongLink", 8, b"db.dump\0");
    raw_member(&mut rest, b'L', "././@LongLink", 8, b"db.dump\0");
    let e = check_bytes(&crafted(&rest));
    assert!(e.contains("two long names in a row"), "{e}");
    // A long name is what names the member (not the header's 100-byte field).
    let mut rest = Vec::new();
    raw_member(&mut rest, b'L', "././@LongLink", 12, b"uploads/../x");
    raw_member(&mut rest, b'0', "uploads/ok", 1, b"x");
    let e = check_bytes(&crafted(&rest));
    assert!(e.contains("unsafe path \"uploads/../x\""), "{e}");
}

#[test]
fn unsafe_paths_are_refused() {
    assert!(safe_relative("a/b.pdf").is_some());
    assert!(safe_relative("../etc/passwd").is_none());
    assert!(safe_relative("/etc/passwd").is_none());
    assert!(safe_relative("a/../../x").is_none());
    assert!(safe_relative("").is_none());
}
