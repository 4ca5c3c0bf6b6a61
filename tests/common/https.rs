//! Real TLS clients for the front door's tests: rustls trusting only a given root
//! (the exported local CA), HTTP/1.1 or HTTP/2 by ALPN, and a raw TLS stream for
//! requests no well-behaved client would send.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;

pub struct Client {
    pub config: Arc<rustls::ClientConfig>,
}

pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
    pub alpn: Option<Vec<u8>>,
    pub version: hyper::Version,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Client {
    /// Trusts only the PEM roots in `root_pem`; offers `alpn` (e.g. h2 and http/1.1).
    pub fn new(root_pem: &str, alpn: &[&[u8]]) -> Client {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_certs(root_pem) {
            roots.add(cert).expect("add root");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Client {
            config: Arc::new(config),
        }
    }

    pub async fn connect(&self, port: u16, sni: &str) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        let name = rustls::pki_types::ServerName::try_from(sni.to_string())
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await
    }

    /// One request on a new connection.
    pub async fn request(
        &self,
        port: u16,
        sni: &str,
        req: hyper::Request<Full<Bytes>>,
    ) -> std::io::Result<Reply> {
        let tls = self.connect(port, sni).await?;
        let alpn = tls.get_ref().1.alpn_protocol().map(|p| p.to_vec());
        let io = hyper_util::rt::TokioIo::new(tls);
        let resp = if alpn.as_deref() == Some(b"h2") {
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .map_err(std::io::Error::other)?;
            tokio::spawn(conn);
            send.send_request(req)
                .await
                .map_err(std::io::Error::other)?
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(conn);
            send.send_request(req)
                .await
                .map_err(std::io::Error::other)?
        };
        let version = resp.version();
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(Duration::from_secs(30), body.collect())
            .await
            .map_err(|_| std::io::Error::other("body timed out"))?
            .map_err(std::io::Error::other)?
            .to_bytes();
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
            alpn,
            version,
        })
    }

    pub async fn get(&self, port: u16, path: &str) -> std::io::Result<Reply> {
        let req = hyper::Request::get(path)
            .header("host", format!("localhost:{port}"))
            .body(Full::new(Bytes::new()))
            .map_err(std::io::Error::other)?;
        self.request(port, "localhost", req).await
    }

    /// Writes `raw` bytes as they are and reads until the server closes (bounded).
    pub async fn raw(&self, port: u16, raw: &[u8]) -> std::io::Result<String> {
        let mut tls = self.connect(port, "localhost").await?;
        tls.write_all(raw).await?;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

fn rustls_pki_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}
