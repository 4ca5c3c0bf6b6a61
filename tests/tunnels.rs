//! Upgraded connections (WebSockets) through the front door stay inside its limits:
//! a real appliance, real TLS clients, the demo backend's echo WebSocket (whose
//! SIGTERM drain waits for open WebSockets, as actix-web's does). A tunnel keeps its
//! client's connection slot while it lives, is closed when idle, and is closed when
//! the appliance stops.

mod common;

use std::time::{Duration, Instant};

use common::https::{runtime, Client};
use common::Appliance;
use futures_util::{SinkExt, StreamExt};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TlsStream<tokio::net::TcpStream>>;

/// A running appliance with `proxy_keys` in [proxy], its HTTPS port and a client
/// trusting its local root.
fn boot(proxy_keys: &str) -> (Appliance, u16, Client) {
    let mut a = Appliance::new(proxy_keys);
    a.start();
    a.wait_ready();
    let out = a.path("root.pem");
    let (code, o, e) = a.cli(&["ca", "export", out.to_str().expect("utf8")]);
    assert_eq!(code, 0, "ca export: {o}{e}");
    let pem = std::fs::read_to_string(out).expect("root.pem");
    let https = a.cfg().proxy.https[0].port();
    (a, https, Client::new(&pem, &[b"http/1.1"]))
}

/// A WebSocket to the demo backend's echo through the proxy.
async fn websocket(c: &Client, port: u16) -> Result<Ws, String> {
    let tls = tokio::time::timeout(Duration::from_secs(5), c.connect(port, "localhost"))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS: {e}"))?;
    let url = format!("wss://localhost:{port}/api/v1/ws");
    let (ws, resp) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::client_async(url, tls),
    )
    .await
    .map_err(|_| "WebSocket handshake timed out".to_string())?
    .map_err(|e| format!("WebSocket handshake: {e}"))?;
    assert_eq!(resp.status(), 101);
    Ok(ws)
}

/// Sends `text` and expects it back (bounded).
async fn echo(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
    let back = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo in time")
        .expect("a message")
        .expect("not an error");
    assert_eq!(back.into_text().expect("text").as_str(), text);
}

/// Waits (bounded by `limit`) until the server ends the WebSocket; returns when.
async fn closed_within(ws: &mut Ws, limit: Duration) -> Duration {
    let t = Instant::now();
    match tokio::time::timeout(limit, ws.next()).await {
        Err(_) => panic!("the WebSocket is still open after {limit:?}"),
        Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => t.elapsed(),
        Ok(Some(Ok(m))) => panic!("unexpected message {m:?}"),
    }
}

fn open_connections(a: &Appliance) -> u64 {
    a.status().expect("status").proxy.open_connections
}

/// Waits (bounded) until the proxy counts `n` open connections.
fn wait_open_connections(a: &Appliance, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_connections(a) != n {
        assert!(
            Instant::now() < deadline,
            "open connections: {} (want {n})",
            open_connections(a)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// With `max_conns_per_ip = 3`, three open WebSockets fill the client's slots: a
/// fourth connection is refused while they stay open and accepted once one closes.
#[test]
fn websockets_keep_their_connection_slot_until_closed() {
    let (mut a, https, c) = boot("max_conns_per_ip = 3\n");
    let rt = runtime();
    let mut open: Vec<Ws> = rt.block_on(async {
        let mut open = Vec::new();
        for i in 0..3 {
            let mut ws = websocket(&c, https)
                .await
                .expect("websocket within the cap");
            echo(&mut ws, &format!("hello {i}")).await;
            open.push(ws);
        }
        open
    });
    // Counted open as long as they live (also in status and metrics).
    wait_open_connections(&a, 3);
    rt.block_on(async {
        let refused = websocket(&c, https).await;
        assert!(
            refused.is_err(),
            "a fourth connection from the same address was accepted with three WebSockets open"
        );
        for (i, ws) in open.iter_mut().enumerate() {
            echo(ws, &format!("still here {i}")).await;
        }
        let mut first = open.remove(0);
        first.close(None).await.expect("close");
        closed_within(&mut first, Duration::from_secs(5)).await;
        drop(first); // the client's end of the TCP connection too
                     // The slot comes back once the proxy has seen the close.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut ws = loop {
            match websocket(&c, https).await {
                Ok(ws) => break ws,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("not yet: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("no slot after a WebSocket closed: {e}"),
            }
        };
        echo(&mut ws, "in the freed slot").await;
        open.push(ws);
    });
    assert_eq!(open_connections(&a), 3);
    drop(open);
    wait_open_connections(&a, 0);
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

/// `proxy.tunnel_idle_timeout`: a WebSocket silent both ways is closed after it,
/// while one that talks stays open well past it.
#[test]
fn an_idle_websocket_is_closed_and_a_chatty_one_stays() {
    let idle_timeout = Duration::from_secs(2);
    let (mut a, https, c) = boot("tunnel_idle_timeout = \"2s\"\n");
    let rt = runtime();
    rt.block_on(async {
        let mut quiet = websocket(&c, https).await.expect("quiet websocket");
        let mut chatty = websocket(&c, https).await.expect("chatty websocket");
        echo(&mut quiet, "one message, then silence").await;
        let talk = async {
            let t = Instant::now();
            let mut n = 0;
            while t.elapsed() < 3 * idle_timeout {
                echo(&mut chatty, &format!("tick {n}")).await;
                n += 1;
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            n
        };
        let (ticks, after) = tokio::join!(talk, closed_within(&mut quiet, 4 * idle_timeout));
        eprintln!(
            "the quiet WebSocket closed after {after:?}; the chatty one echoed {ticks} ticks"
        );
        assert!(
            after >= idle_timeout - Duration::from_millis(100),
            "closed before its idle timeout: {after:?}"
        );
        echo(&mut chatty, "still open").await;
        drop(chatty);
    });
    wait_open_connections(&a, 0);
    a.stop();
    a.assert_no_leftovers(Duration::from_secs(5));
}

/// SIGTERM with a WebSocket open: the proxy closes it at once (the client sees it
/// closed), so the API server's drain does not wait 30 s for it and the whole stop
/// stays short.
#[test]
fn sigterm_closes_open_websockets_and_stops_promptly() {
    let (mut a, https, c) = boot("");
    let rt = runtime();
    let mut ws = rt.block_on(async {
        let mut ws = websocket(&c, https).await.expect("websocket");
        echo(&mut ws, "before the stop").await;
        ws
    });
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let seen = rt.block_on(closed_within(&mut ws, Duration::from_secs(10)));
    let code = a.wait_exit(Duration::from_secs(60));
    let stop = t.elapsed();
    eprintln!("WebSocket closed {seen:?} after SIGTERM; koprogo exited after {stop:?}");
    assert_eq!(code, 0, "exit code after SIGTERM\n{}", a.stderr());
    assert!(
        seen < Duration::from_secs(3),
        "the WebSocket stayed open {seen:?}"
    );
    // Without the proxy closing it the API's drain waits 30 s for the WebSocket.
    assert!(stop < Duration::from_secs(20), "stop took {stop:?}");
    let api_log = common::all_log_lines(&a.path("logs"), "api").join("\n");
    assert!(
        api_log.contains("all connections drained"),
        "the API's drain did not finish: {api_log}"
    );
    a.assert_no_leftovers(Duration::from_secs(5));
}
