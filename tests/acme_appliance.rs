//! ACME end to end through the appliance: `koprogo run` with `tls.mode = "acme"`
//! against Debian's Pebble on loopback. The HTTP-01 challenge is answered by the
//! appliance's own port-80 listener, the certificate is served on its HTTPS
//! listener, and a restart reuses the stored certificate (no new order).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::acme::{pebble_available, Pebble};
use common::https::{https_get, load_roots};
use common::Appliance;

fn acme_site(challenge: &str) -> (Appliance, Pebble) {
    let a = Appliance::new("frontend = \"frontend\"\n");
    std::fs::create_dir_all(a.path("frontend")).expect("frontend");
    std::fs::write(a.path("frontend/index.html"), "<h1>KoproGo over ACME</h1>").expect("index");
    let cfg = a.cfg();
    let (http, https) = (cfg.proxy.http[0].port(), cfg.proxy.https[0].port());
    let pebble = Pebble::start(&a.path("pebble"), http, https, None);
    let text = std::fs::read_to_string(&a.config).expect("config");
    let text = text.replace("domain = \"localhost\"", "domain = \"koprogo.test\"");
    let text = format!(
        "{text}\n[tls]\nmode = \"acme\"\nacme_email = \"syndic@koprogo.test\"\nacme_directory = \"{}\"\nacme_ca_root = \"{}\"\nacme_challenge = \"{challenge}\"\n",
        pebble.directory,
        pebble.listener_root.display()
    );
    std::fs::write(&a.config, text).expect("write config");
    (a, pebble)
}

fn issued_through_the_appliance(challenge: &str) {
    if !pebble_available() {
        eprintln!(
            "skipped: Debian's pebble is not installed (scripts/test.sh installs it as root)"
        );
        return;
    }
    let (mut a, pebble) = acme_site(challenge);
    a.start();
    a.wait_ready();
    let st = a.wait_for(Duration::from_secs(60), "an ACME certificate", |s| {
        s.tls.source == "acme"
    });
    assert_eq!(st.tls.mode, "acme");
    assert!(
        st.tls.names.iter().any(|n| n == "koprogo.test"),
        "{:?}",
        st.tls
    );
    assert!(st.tls.last_error.is_none(), "{:?}", st.tls);
    let https: SocketAddr = ([127, 0, 0, 1], a.cfg().proxy.https[0].port()).into();
    let rt = common::https::runtime();
    let body = rt.block_on(async {
        let root = pebble.issuing_root().await;
        https_get(https, "koprogo.test", load_roots(&root), "/").await
    });
    assert!(body.contains("KoproGo over ACME"), "{body}");
    let orders = pebble.orders_seen();
    assert!(orders >= 1);

    // A restart serves the stored certificate and orders nothing.
    a.stop();
    a.start();
    let st = a.wait_ready();
    assert_eq!(st.tls.source, "acme");
    assert_eq!(st.tls.orders, 0, "{:?}", st.tls);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        pebble.orders_seen(),
        orders,
        "a restart must not order again"
    );
    a.stop();
    drop(pebble);
    a.assert_no_leftovers(Duration::from_secs(5));
}

#[test]
fn acme_http01_through_the_appliance() {
    issued_through_the_appliance("http-01");
}

#[test]
fn acme_tls_alpn01_through_the_appliance() {
    issued_through_the_appliance("tls-alpn-01");
}
