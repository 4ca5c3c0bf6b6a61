//! The real KoproGo (`koprogo-api` and the Astro frontend from ../shared/koprogo-real,
//! built from the public repository): unpacked once per run into
//! `target/koprogo-real`, shared by every test process (nextest runs each test in its
//! own process, so the unpack goes to a private directory renamed into place).
//! Without the folder a test prints one "skipped: …" line and returns.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::https::Client;
use super::Appliance;

/// Where the unpacked server and frontend are.
pub struct Real {
    pub api: PathBuf,
    pub frontend: PathBuf,
}

/// `KOPROGO_REAL_DIR`, else the first `shared/koprogo-real` beside the checkout or
/// one of its parents (the project's layout: `<work>/<checkout>` and `<work>/shared`).
fn source_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("KOPROGO_REAL_DIR") {
        return Some(PathBuf::from(d));
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .map(|a| a.join("shared/koprogo-real"))
        .find(|d| d.join("koprogo-api.xz").is_file())
}

/// The real KoproGo, unpacked; `None` (after printing why) when it is not here.
pub fn real(test: &str) -> Option<Real> {
    let Some(src) = source_dir() else {
        println!(
            "skipped: {test} needs the real KoproGo (../shared/koprogo-real or KOPROGO_REAL_DIR), which is not on this machine"
        );
        return None;
    };
    if std::env::var_os("KOPROGO_REAL_REQUIRED").is_some() && !src.is_dir() {
        panic!(
            "KOPROGO_REAL_REQUIRED is set but {} is missing",
            src.display()
        );
    }
    Some(unpack(&src))
}

fn unpack(src: &Path) -> Real {
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let dest = target.join("koprogo-real");
    let xz = src.join("koprogo-api.xz");
    let tar = src.join("frontend-dist.tar.xz");
    // What was unpacked, so a newer build in the source folder is unpacked again.
    let stamp = format!("{}\n{}\n", fingerprint(&xz), fingerprint(&tar));
    let stamp_file = dest.join(".unpacked-from");
    if std::fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp.as_str()) {
        return at(&dest);
    }
    let tmp = target.join(format!("koprogo-real.tmp.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("create the unpack directory");
    let api = std::fs::File::create(tmp.join("koprogo-api")).expect("create koprogo-api");
    let st = Command::new("xz")
        .arg("-dc")
        .arg(&xz)
        .stdout(api)
        .status()
        .expect("run xz (apt-get install xz-utils)");
    assert!(st.success(), "xz -dc {} failed", xz.display());
    std::fs::set_permissions(
        tmp.join("koprogo-api"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod koprogo-api");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&tmp)
        .arg("-xJf")
        .arg(&tar)
        .stdin(Stdio::null())
        .status()
        .expect("run tar");
    assert!(st.success(), "tar -xJf {} failed", tar.display());
    std::fs::write(tmp.join(".unpacked-from"), &stamp).expect("write the stamp");
    // Another test may have won the race: theirs is as good as ours.
    let _ = std::fs::remove_dir_all(&dest);
    if std::fs::rename(&tmp, &dest).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    at(&dest)
}

fn at(dest: &Path) -> Real {
    let r = Real {
        api: dest.join("koprogo-api"),
        frontend: dest.join("frontend-dist"),
    };
    assert!(
        r.api.is_file(),
        "{} missing after unpacking",
        r.api.display()
    );
    assert!(
        r.frontend.join("index.html").is_file(),
        "{} missing after unpacking",
        r.frontend.display()
    );
    r
}

fn fingerprint(p: &Path) -> String {
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    format!(
        "{} {} {:?}",
        p.display(),
        m.len(),
        m.modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
    )
}

/// A private appliance running the real API server and serving the real frontend.
/// The server is copied into the appliance's directory as `koprogo-api` (readable
/// by the service user whatever the checkout's modes) and is `backend.command`
/// itself, as in the package, so an update test can install another binary over
/// it the way dpkg does. `extra` is appended to the config, inside `[proxy]`.
pub fn appliance(real: &Real, extra: &str) -> Appliance {
    let a = Appliance::new(&format!("{extra}\n"));
    let api = a.path("koprogo-api");
    std::fs::copy(&real.api, &api).expect("copy koprogo-api");
    std::fs::set_permissions(&api, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // The frontend: a copy the service user can read (target/ may be 0700).
    let fe = a.path("frontend");
    let st = Command::new("cp")
        .arg("-a")
        .arg(&real.frontend)
        .arg(&fe)
        .status()
        .expect("cp frontend");
    assert!(st.success(), "cp -a {} failed", real.frontend.display());
    let _ = Command::new("chmod")
        .arg("-R")
        .arg("a+rX")
        .arg(&fe)
        .status();
    let demo = a.path("demo-backend");
    let text = std::fs::read_to_string(&a.config)
        .expect("read config")
        .replacen(
            &format!("command = \"{}\"", demo.display()),
            &format!("command = \"{}\"", api.display()),
            1,
        )
        .replacen(
            "[proxy]\n",
            &format!("[proxy]\nfrontend = \"{}\"\n", fe.display()),
            1,
        );
    assert!(text.contains("koprogo-api\""), "{text}");
    std::fs::write(&a.config, text).expect("write config");
    let _ = std::fs::remove_file(demo);
    a
}

/// The HTTPS port of the proxy and a client trusting the appliance's local CA.
pub fn client(a: &Appliance) -> (u16, Client) {
    let https = a.cfg().proxy.https[0].port();
    (
        https,
        Client::new(&super::load::root_pem(a), &[b"http/1.1"]),
    )
}

/// The superadmin's generated password (`koprogo admin-password`).
pub fn admin_password(a: &Appliance) -> String {
    let (code, out, err) = a.cli(&["admin-password"]);
    assert_eq!(code, 0, "admin-password: {out}{err}");
    out.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or_default()
        .to_string()
}

pub const BOOT: Duration = Duration::from_secs(120);

/// JSON requests to the real API through the appliance's HTTPS front door.
pub struct Api {
    pub port: u16,
    pub client: Client,
    pub token: Option<String>,
}

impl Api {
    pub fn new(a: &Appliance) -> Api {
        let (port, client) = client(a);
        Api {
            port,
            client,
            token: None,
        }
    }

    /// One request; (status, body parsed as JSON or `Value::String` of the text).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let r = self
            .send(
                method,
                path,
                body.map(|b| ("application/json".to_string(), b.to_string().into_bytes())),
            )
            .await;
        let v = serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::String(r.text()));
        (r.status, v)
    }

    /// One request with a raw body of `content_type`; the whole reply.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<(String, Vec<u8>)>,
    ) -> super::https::Reply {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("localhost:{}", self.port));
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let bytes = match body {
            Some((ct, b)) => {
                req = req.header("content-type", ct);
                b
            }
            None => Vec::new(),
        };
        let req = req
            .body(http_body_util::Full::new(hyper::body::Bytes::from(bytes)))
            .expect("request");
        tokio::time::timeout(
            Duration::from_secs(60),
            self.client.request(self.port, "localhost", req),
        )
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer within 60 s"))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// Logs in; the status, and the token kept for the next calls on 200.
    pub async fn login(&mut self, email: &str, password: &str) -> u16 {
        let (status, v) = self
            .call(
                "POST",
                "/api/v1/auth/login",
                Some(serde_json::json!({ "email": email, "password": password })),
            )
            .await;
        if status == 200 {
            self.token = Some(
                v["token"]
                    .as_str()
                    .unwrap_or_else(|| panic!("login answer without a token: {v}"))
                    .to_string(),
            );
        }
        status
    }

    /// GET that must answer 200; its JSON.
    pub async fn get_ok(&self, path: &str) -> serde_json::Value {
        let (status, v) = self.call("GET", path, None).await;
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }
}

/// The items of a paginated list (`{"data":[…]}`) or of a plain array.
pub fn items(v: &serde_json::Value) -> Vec<serde_json::Value> {
    v.get("data")
        .unwrap_or(v)
        .as_array()
        .cloned()
        .unwrap_or_default()
}

pub const SYNDIC: (&str, &str) = ("syndic@grandplace.be", "syndic123");

/// Logs in as the superadmin and creates the demo data (`POST /api/v1/seed/demo`).
pub async fn seed_demo(a: &Appliance) {
    let mut admin = Api::new(a);
    let pw = admin_password(a);
    assert_eq!(admin.login("admin@koprogo.com", &pw).await, 200);
    let (status, v) = admin.call("POST", "/api/v1/seed/demo", None).await;
    assert!((200..300).contains(&status), "seed/demo: {status} {v}");
}

/// A logged-in syndic of the demo data.
pub async fn syndic(a: &Appliance) -> Api {
    let mut api = Api::new(a);
    assert_eq!(api.login(SYNDIC.0, SYNDIC.1).await, 200, "syndic login");
    api
}

/// A multipart/form-data body: text fields, then one file.
pub fn multipart(fields: &[(&str, &str)], file: (&str, &str, &[u8])) -> (String, Vec<u8>) {
    let boundary = "----koprogo-test-boundary-7d1c2f";
    let mut body = Vec::new();
    for (k, v) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n")
                .as_bytes(),
        );
    }
    let (name, mime, bytes) = file;
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\nContent-Type: {mime}\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// The mixed workload of the load tests, as a logged-in syndic: reads of the
/// buildings, owners and expenses lists, and (one request in three on the threads
/// after the first) writes creating an owner with a unique e-mail address.
pub fn workload(token: &str, tag: &str) -> super::load::MakeRequest {
    let (token, tag) = (token.to_string(), tag.to_string());
    std::sync::Arc::new(move |n, i| {
        let write = n > 0 && i % 3 == 0;
        let b = hyper::Request::builder().header("authorization", format!("Bearer {token}"));
        let req = if write {
            let body = serde_json::json!({
                "first_name": "Charge",
                "last_name": format!("Test {n}-{i}"),
                "email": format!("load-{tag}-{n}-{i}@example.be"),
                "address": "Rue de la Loi 16",
                "city": "Bruxelles",
                "postal_code": "1000",
                "country": "Belgique",
            });
            b.method("POST")
                .uri("/api/v1/owners")
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(hyper::body::Bytes::from(
                    body.to_string(),
                )))
        } else {
            let list = ["/api/v1/buildings", "/api/v1/owners", "/api/v1/expenses"][i % 3];
            b.method("GET")
                .uri(list)
                .body(http_body_util::Full::new(hyper::body::Bytes::new()))
        };
        (write, req.expect("request"))
    })
}

/// How many of `ids` (acknowledged owner creations) are in the database.
pub fn owners_present(a: &Appliance, ids: &[String]) -> usize {
    if ids.is_empty() {
        return 0;
    }
    let list = ids
        .iter()
        .map(|id| {
            assert!(
                id.chars().all(|c| c.is_ascii_hexdigit() || c == '-'),
                "not a uuid: {id}"
            );
            format!("'{id}'")
        })
        .collect::<Vec<_>>()
        .join(",");
    let sql = format!("SELECT count(*) FROM owners WHERE id IN ({list})");
    let (code, out, err) = a.cli(&["psql", "--", "-v", "ON_ERROR_STOP=1", "-tAc", &sql]);
    assert_eq!(code, 0, "psql: {out}{err}");
    out.trim().parse().unwrap_or(0)
}
