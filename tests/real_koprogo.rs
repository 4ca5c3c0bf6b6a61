//! The real KoproGo (../shared/koprogo-real: the API server and the Astro frontend
//! built from the public repository) run by the appliance, end to end: first boot,
//! the superadmin hole, demo data, uploads, backup and restore, application updates,
//! a killed API under load, and a graceful stop with requests in flight.
//! Without ../shared/koprogo-real each test prints one "skipped: …" line.

mod common;

use std::time::Duration;

use common::real::{self, Api};

/// First boot from an empty state directory: migrations, all ready, `admin123`
/// refused, the generated superadmin password logs in over HTTPS through the proxy,
/// the real frontend and the appliance's /config.js are served.
#[test]
fn first_boot_secures_the_superadmin_and_serves_the_site() {
    let Some(r) = real::real("first_boot_secures_the_superadmin_and_serves_the_site") else {
        return;
    };
    let mut a = real::appliance(&r, "");
    a.start();
    a.wait_for(real::BOOT, "all ready", |s| s.all_ready);
    let pw = real::admin_password(&a);
    common::https::runtime().block_on(async {
        let mut api = Api::new(&a);
        assert_eq!(
            api.login("admin@koprogo.com", "admin123").await,
            401,
            "the public default password must be refused"
        );
        assert_eq!(api.login("admin@koprogo.com", &pw).await, 200);
        let me = api.get_ok("/api/v1/auth/me").await;
        assert_eq!(me["email"], "admin@koprogo.com", "{me}");
        // The real frontend, and our /config.js pointing at the same origin.
        let home = api.send("GET", "/", None).await;
        assert_eq!(home.status, 200);
        assert!(home.text().contains("<html"), "{}", home.text());
        let cfg = api.send("GET", "/config.js", None).await;
        assert_eq!(cfg.status, 200);
        assert!(cfg.text().contains("/api/v1"), "{}", cfg.text());
        let health = api.get_ok("/api/v1/health").await;
        assert_eq!(health["status"], "ok", "{health}");
    });
    // The API's log went through the pipeline, without colour codes.
    let log = common::all_log_lines(&a.path("logs"), "api").join("\n");
    assert!(log.contains("actix"), "api.log: {log}");
    assert!(!log.contains('\u{1b}'), "ANSI colours in api.log");
    a.stop();
    assert_eq!(a.cluster_state(), "shut down");
    a.assert_no_leftovers(Duration::from_secs(10));
}
