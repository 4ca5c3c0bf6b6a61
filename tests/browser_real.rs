//! The real KoproGo in a real browser: the appliance runs the real `koprogo-api` and
//! serves the real Astro frontend; headless Chromium, trusting the appliance's local
//! CA through its NSS store, opens the login page over HTTPS, a syndic types their
//! e-mail and password into the form and submits it, and the dashboard shows one of
//! their buildings. Screenshots of both pages are kept in
//! `target/tmp/artifacts/` (`real-login.png`, `real-dashboard.png`).
//! Without ../shared/koprogo-real, Chromium or certutil it prints one "skipped: …" line.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::chromium::{self, Browser};
use common::real::{self, Api};

const SYNDIC: &str = "syndic@grandplace.be";
const SYNDIC_PASSWORD: &str = "syndic123";

/// Seeds the demo data as the superadmin, then, as the syndic (through the API,
/// what they would do in the application): settles the overdue expense and convenes
/// a general assembly in five days in their first building. Returns that building's
/// name, which the dashboard shows as the next meeting and as an urgent task, and the
/// syndic's first name, which it greets.
///
/// Why the expense: this build of koprogo-api panics on
/// `GET /api/v1/stats/syndic/urgent-tasks` while an expense is overdue (it decodes
/// the NUMERIC `amount` as f64, stats_repository_impl.rs:364), and the dashboard then
/// shows only an error.
fn prepare_syndic(a: &common::Appliance) -> (String, String) {
    let pw = real::admin_password(a);
    common::https::runtime().block_on(async {
        let mut admin = Api::new(a);
        assert_eq!(admin.login("admin@koprogo.com", &pw).await, 200);
        let (status, v) = admin.call("POST", "/api/v1/seed/demo", None).await;
        assert_eq!(status, 200, "seed/demo: {v}");
        let mut syndic = Api::new(a);
        assert_eq!(syndic.login(SYNDIC, SYNDIC_PASSWORD).await, 200);
        let list = syndic.get_ok("/api/v1/buildings").await;
        let buildings = real::items(&list);
        let building = buildings
            .first()
            .unwrap_or_else(|| panic!("the syndic has no building: {list}"));
        let name = building["name"]
            .as_str()
            .expect("building name")
            .to_string();
        let expenses = syndic.get_ok("/api/v1/expenses?page=1&per_page=100").await;
        for e in real::items(&expenses) {
            if e["payment_status"] == "overdue" {
                let id = e["id"].as_str().expect("expense id");
                let path = format!("/api/v1/expenses/{id}/mark-paid");
                let (status, v) = syndic.call("PUT", &path, None).await;
                assert_eq!(status, 200, "PUT {path}: {v}");
            }
        }
        let when = chrono::Utc::now() + chrono::Duration::days(5);
        let (status, v) = syndic
            .call(
                "POST",
                "/api/v1/meetings",
                Some(serde_json::json!({
                    "building_id": building["id"],
                    "meeting_type": "Ordinary",
                    "title": "Assemblée générale ordinaire",
                    "scheduled_date": when.to_rfc3339(),
                    "location": "Salle des fêtes",
                })),
            )
            .await;
        assert_eq!(status, 201, "POST /api/v1/meetings: {v}");
        let me = syndic.get_ok("/api/v1/auth/me").await;
        let first = me["first_name"].as_str().expect("first_name").to_string();
        (name, first)
    })
}

fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

/// Fails with what the page said (console, exceptions, failed requests) and its text.
fn page_failure(b: &mut Browser, what: &str, last: &str) -> ! {
    b.drain_events();
    let text = b.text();
    let url = b.url();
    panic!(
        "{what}: {last}\nat {url}\npage log:\n  {}\npage text:\n{text}",
        b.log.lines.join("\n  ")
    );
}

#[test]
fn a_syndic_logs_in_through_the_real_frontend_in_chromium() {
    let Some(r) = real::real("a_syndic_logs_in_through_the_real_frontend_in_chromium") else {
        return;
    };
    let Some(bin) = chromium::binary() else {
        println!(
            "skipped: Debian's chromium is not installed (scripts/test.sh installs it as root)"
        );
        return;
    };
    if !chromium::certutil_available() {
        println!("skipped: certutil (libnss3-tools) is not installed");
        return;
    }
    let mut a = real::appliance(&r, "");
    a.start();
    a.wait_for(real::BOOT, "all ready", |s| s.all_ready);
    let (building, first_name) = prepare_syndic(&a);
    let https = a.cfg().proxy.https[0].port();

    let home = a.path("browser-home");
    let root = a.path("root.pem");
    let (code, _, err) = a.cli(&["ca", "export", root.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{err}");
    chromium::trust_root(&home, &root);
    let t = Instant::now();
    let mut b = Browser::launch(&bin, &home, 1280, 900);
    let launched = t.elapsed();
    let out = artifacts();

    // The login page, rendered by its scripts: the form is a Svelte island, usable
    // once hydrated (Astro then drops the island's `ssr` attribute; a click before
    // that is a plain HTML form GET).
    let t = Instant::now();
    b.navigate(&format!("https://localhost:{https}/login"));
    let form = format!(
        "document.readyState === 'complete' \
         && !document.querySelector('astro-island[ssr]') \
         && {} && {}",
        chromium::seen_element("[data-testid=login-email]"),
        chromium::seen_element("[data-testid=login-submit]")
    );
    if let Err(e) = b.wait_for(&form, Duration::from_secs(30)) {
        page_failure(&mut b, "the login form did not render within 30 s", &e);
    }
    let form_after = t.elapsed();
    let size = b.screenshot(&out.join("real-login.png"));
    assert!(
        size > 10_000,
        "login screenshot suspiciously small: {size} bytes"
    );

    // A person types and clicks.
    b.type_into("[data-testid=login-email]", SYNDIC);
    b.type_into("[data-testid=login-password]", SYNDIC_PASSWORD);
    b.click("[data-testid=login-submit]");
    let t = Instant::now();

    // The dashboard: /syndic, loaded (no spinner), the building's name on screen
    // (not under the route guard's "Vérification des accès..." overlay).
    let dashboard = format!(
        "location.pathname.startsWith('/syndic') \
         && document.querySelector('[data-testid=syndic-dashboard]') \
         && !document.querySelector('[data-testid=syndic-dashboard-spinner]') \
         && {}",
        chromium::seen_text(&building)
    );
    if let Err(e) = b.wait_for(&dashboard, Duration::from_secs(60)) {
        let _ = b.screenshot(&out.join("real-dashboard.png"));
        page_failure(
            &mut b,
            &format!("no dashboard naming {building:?} within 60 s"),
            &e,
        )
    }
    let dashboard_after = t.elapsed();
    let text = b.text();
    assert!(
        b.eval(&chromium::seen_text(&first_name)) == Ok(serde_json::json!(true)),
        "the syndic ({first_name}) is not greeted: {text}"
    );
    let size = b.screenshot(&out.join("real-dashboard.png"));
    assert!(
        // A blank page or the route guard's spinner screen is about 11 KB.
        size > 30_000,
        "dashboard screenshot suspiciously small: {size} bytes"
    );
    b.drain_events();
    println!(
        "browser started in {launched:?}; login form usable {form_after:?} after the \
         navigation; dashboard naming {building} {dashboard_after:?} after the click; \
         screenshots in {}; page log:\n  {}",
        out.display(),
        b.log.lines.join("\n  ")
    );

    // What the proxy served the real frontend: no 5xx, no refused or blocked
    // request on our origin, and a 404 only for a file the build does not have
    // (it ships no icons/ images nor favicon.svg). Other origins (its analytics
    // script) resolve to nothing here, by design.
    let origin = format!("https://localhost:{https}/");
    let site = a.path("frontend");
    for f in &b.log.failed {
        let Some(path) = f.url.strip_prefix(&origin) else {
            continue;
        };
        let path = path.split(['?', '#']).next().unwrap_or_default();
        match f.status {
            Some(404) => assert!(
                !site.join(path).is_file(),
                "the proxy answered 404 for {path}, which the build has"
            ),
            // A fetch cut short by the page's own navigation after login.
            None if f.error.contains("ERR_ABORTED") => {}
            _ => panic!(
                "request failed: {f:?}\npage log:\n  {}",
                b.log.lines.join("\n  ")
            ),
        }
    }

    let marker = home.display().to_string();
    // Reported, not asserted: this build's service worker precaches
    // /icons/icon-192x192.png and /icons/icon-512x512.png, which it does not ship,
    // so its install fails and the browser drops it ("none"): no offline mode.
    let sw = b.eval(
        "navigator.serviceWorker.getRegistration().then(r => (r ? (r.active \
         ? 'active ' + r.active.scriptURL : r.installing ? 'installing' \
         : r.waiting ? 'waiting' : 'registered, not installed') : 'none') \
         + (navigator.serviceWorker.controller ? ', controls the page' : ''))",
    );
    println!("service worker: {sw:?}");
    let t = Instant::now();
    b.close();
    println!("browser closed in {:?}", t.elapsed());
    assert!(
        common::processes()
            .iter()
            .all(|(_, _, c)| !c.contains(&marker)),
        "chromium processes left"
    );
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(10));
}
