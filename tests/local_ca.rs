//! The local root CA of a real appliance installed by an earlier version: its root
//! (no Name Constraints, loose file modes) is kept and keeps verifying the site
//! until the operator runs `koprogo ca rotate`; `check`, `status` and `cert status`
//! say so; the rotate is picked up by the running supervisor; real TLS clients
//! trusting only the old or only the new root tell which one the site uses.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::https::{runtime, Client};
use common::Appliance;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

/// The root as earlier versions made it (no Name Constraints, no EKU), owned by the
/// service user like a real install, with modes an operator may have loosened.
fn old_style_root(state: &Path, owner: Option<(u32, u32)>) -> String {
    let tls = state.join("tls");
    let ca = tls.join("ca");
    std::fs::create_dir_all(&ca).expect("mkdir");
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "KoproGo local CA (localhost)");
    dn.push(DnType::OrganizationName, "KoproGo appliance");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).expect("self-signed");
    std::fs::write(ca.join("root.key"), key.serialize_pem()).expect("key");
    std::fs::write(ca.join("root.crt"), cert.pem()).expect("crt");
    for (p, mode) in [
        (state.to_path_buf(), 0o750),
        (tls.clone(), 0o755),
        (ca.clone(), 0o755),
        (ca.join("root.key"), 0o644),
        (ca.join("root.crt"), 0o644),
    ] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&p, Some(uid), Some(gid)).expect("chown");
        }
    }
    cert.pem()
}

fn service_user() -> Option<(u32, u32)> {
    if !common::is_root() {
        return None;
    }
    let u = nix::unistd::User::from_name("koprogo")
        .expect("lookup")
        .expect("the test machine has a koprogo user");
    Some((u.uid.as_raw(), u.gid.as_raw()))
}

fn verifies(pem: &str, port: u16) -> bool {
    runtime().block_on(async {
        match Client::new(pem, &[b"http/1.1"]).get(port, "/health").await {
            Ok(r) => r.status == 200,
            Err(_) => false,
        }
    })
}

#[test]
fn an_old_install_keeps_its_root_until_ca_rotate() {
    let mut a = Appliance::new("");
    let owner = service_user();
    let state = a.path("state");
    let old_pem = old_style_root(&state, owner);
    let key = state.join("tls/ca/root.key");

    // Before the upgrade's first start, check already says what to do.
    let (_, out, err) = a.cli(&["check"]);
    assert!(
        out.contains("no name constraints") && out.contains("koprogo ca rotate"),
        "check must flag the unconstrained root:\n{out}{err}"
    );
    assert!(out.contains("root.key: mode 0644"), "{out}");

    a.start();
    a.wait_ready();
    let https = a.cfg().proxy.https[0].port();
    // Kept: PCs that imported the old root still trust the site.
    assert!(
        verifies(&old_pem, https),
        "the old root no longer verifies the site"
    );
    // The key is private now, still the service user's.
    let meta = std::fs::metadata(&key).expect("key");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(state.join("tls/ca"))
            .expect("dir")
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    if let Some((uid, _)) = owner {
        assert_eq!(meta.uid(), uid);
    }
    let (code, out, err) = a.cli(&["cert", "status", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["ca"]["constrained"], false, "{out}");
    assert!(v["ca"]["warning"]
        .as_str()
        .unwrap_or("")
        .contains("koprogo ca rotate"));
    let (_, out, _) = a.cli(&["status"]);
    assert!(
        out.contains("tls: the local root CA has no name constraints"),
        "{out}"
    );

    // The operator prepares the next root for the office PCs to import first; the
    // site keeps the old one meanwhile.
    let new = a.path("next-root.pem");
    let (code, out, err) = a.cli(&["ca", "rotate", "--prepare", new.to_str().expect("utf8")]);
    assert_eq!(code, 0, "ca rotate --prepare: {out}{err}");
    assert!(
        err.contains("permits localhost, 127.0.0.0/8, ::1/128"),
        "{err}"
    );
    let new_pem = std::fs::read_to_string(&new).expect("next root");
    assert_ne!(new_pem, old_pem);
    if let Some((uid, _)) = owner {
        let k = std::fs::metadata(state.join("tls/ca/next.key")).expect("next.key");
        assert_eq!((k.uid(), k.permissions().mode() & 0o777), (uid, 0o600));
    }
    let (_, out, _) = a.cli(&["cert", "status"]);
    assert!(out.contains("CA next"), "{out}");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        verifies(&old_pem, https),
        "--prepare must not switch the site"
    );
    assert!(!verifies(&new_pem, https));

    // The switch; the running site follows by itself.
    let (code, out, err) = a.cli(&["ca", "rotate"]);
    assert_eq!(code, 0, "ca rotate: {out}{err}");
    assert!(
        out.contains("no name constraints") && out.contains("its key is deleted"),
        "{out}"
    );
    assert!(out.contains("prepared before"), "{out}");
    let exported = a.path("exported-root.pem");
    let (code, o, e) = a.cli(&["ca", "export", exported.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{o}{e}");
    assert_eq!(std::fs::read_to_string(&exported).expect("export"), new_pem);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !verifies(&new_pem, https) {
        assert!(
            Instant::now() < deadline,
            "the site never served a certificate from the new root\n{}",
            a.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !verifies(&old_pem, https),
        "the old root still verifies the site"
    );
    let meta = std::fs::metadata(&key).expect("new key");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    if let Some((uid, _)) = owner {
        assert_eq!(
            meta.uid(),
            uid,
            "rotate ran as root but the key must be the service user's"
        );
    }
    let (code, out, err) = a.cli(&["cert", "status", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["ca"]["constrained"], true, "{out}");
    assert_eq!(v["ca"]["exported"], true, "{out}");
    assert!(v["ca"]["warning"].is_null(), "{out}");
    let (_, out, _) = a.cli(&["check"]);
    assert!(!out.contains("name constraints"), "{out}");
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}
