//! Real TLS clients for the tests: rustls trusting only a given root (the exported
//! local CA, Pebble's roots), HTTP/1.1 or HTTP/2 by ALPN, a raw TLS stream for
//! requests no well-behaved client would send, and the one certificate verifier
//! that accepts anything (for tests that inspect what a server presented).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
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
        let roots = load_roots(root_pem);
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
        let name = ServerName::try_from(sni.to_string())
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

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Accepts any certificate and signature: the tests inspect what was served.
#[derive(Debug)]
struct AnyCert;

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_tls12_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A raw TLS connection (see `connect`).
pub type TlsConn = TlsStream<TcpStream>;

/// A root store holding every certificate of `pem` (panics on a bad one).
pub fn load_roots(pem: &str) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(c.expect("pem")).expect("root");
    }
    roots
}

/// TLS client; `roots` None = accept any certificate.
pub async fn connect(
    addr: SocketAddr,
    name: &str,
    roots: Option<RootCertStore>,
) -> anyhow::Result<TlsConn> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?;
    let mut cc = match roots {
        Some(r) => builder.with_root_certificates(r).with_no_client_auth(),
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert))
            .with_no_client_auth(),
    };
    cc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(name.to_string())?;
    let conn = tokio_rustls::TlsConnector::from(Arc::new(cc));
    Ok(tokio::time::timeout(Duration::from_secs(5), conn.connect(name, tcp)).await??)
}

/// Serial (lowercase hex) and issuer CN of the certificate a connection got.
pub fn peer(c: &TlsConn) -> (String, String) {
    let certs = c.get_ref().1.peer_certificates().expect("peer certs");
    let (_, x) = x509_parser::parse_x509_certificate(&certs[0]).expect("x509");
    let serial = x
        .tbs_certificate
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let issuer = x
        .issuer()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or("")
        .to_string();
    (serial, issuer)
}

/// Sends a line and reads the answer line.
pub async fn ping(c: &mut TlsConn, text: &str) -> anyhow::Result<String> {
    c.write_all(format!("{text}\n").as_bytes()).await?;
    c.flush().await?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut byte)).await??;
        if n == 0 || byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    Ok(String::from_utf8(line)?)
}

/// GET over HTTPS (HTTP/1.1, Connection: close); returns the body.
pub async fn https_get(addr: SocketAddr, name: &str, roots: RootCertStore, path: &str) -> String {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cc = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let sn = ServerName::try_from(name.to_string()).expect("name");
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(cc))
        .connect(sn, tcp)
        .await
        .expect("tls");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}
