//! TLS from the supervisor to an external PostgreSQL server: tokio-postgres'
//! `MakeTlsConnect` over tokio-rustls (ring; no OpenSSL), with libpq's `sslmode`
//! meanings:
//!
//! | sslmode | encrypted | certificate checked |
//! |---|---|---|
//! | `disable` | no | — |
//! | `allow`, `prefer` | if the server offers it | no |
//! | `require` | yes | no; with a CA (`ca_file`, `sslrootcert`) the chain, like libpq |
//! | `verify-ca` | yes | the chain, against the CA or the system roots |
//! | `verify-full` | yes | the chain and the host name |
//!
//! SCRAM authentication is bound to the TLS session (`SCRAM-SHA-256-PLUS` with
//! RFC 5929 `tls-server-end-point`, the hash of the server's certificate): a
//! man in the middle holding another certificate cannot relay the exchange. The
//! binding is offered whenever the server supports it (libpq's
//! `channel_binding=prefer`); `channel_binding=require` refuses a server that
//! does not.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{anyhow, Context as _, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

use super::external::{system_bundle, ExternalUrl, SslMode};

/// How the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Encryption only (libpq's `require` without a CA, `prefer`, `allow`).
    None,
    /// The chain, not the name (`verify-ca`, `require` with a CA).
    Chain,
    /// Chain and host name (`verify-full`).
    Full,
}

/// What `sslmode` (and whether a CA is configured) asks for.
pub fn check_for(mode: SslMode, has_ca: bool) -> Check {
    match mode {
        SslMode::VerifyFull => Check::Full,
        SslMode::VerifyCa => Check::Chain,
        SslMode::Require if has_ca => Check::Chain,
        _ => Check::None,
    }
}

/// A connector for tokio-postgres.
#[derive(Clone)]
pub struct PgTls {
    config: Arc<ClientConfig>,
}

impl PgTls {
    /// The connector for `url`; `ca` is `ca_file` or the URL's `sslrootcert`.
    pub fn new(url: &ExternalUrl, ca: Option<&Path>) -> Result<PgTls> {
        PgTls::checking(check_for(url.sslmode, ca.is_some()), ca)
    }

    /// The connector checking the server's certificate as `check` says.
    pub fn checking(check: Check, ca: Option<&Path>) -> Result<PgTls> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS setup")?;
        let config = match check {
            Check::None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
                .with_no_client_auth(),
            Check::Chain | Check::Full => {
                let roots = Arc::new(roots(ca)?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                    .build()
                    .map_err(|e| anyhow!("TLS verifier: {e}"))?;
                if check == Check::Full {
                    builder.with_webpki_verifier(webpki).with_no_client_auth()
                } else {
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
                        .with_no_client_auth()
                }
            }
        };
        Ok(PgTls {
            config: Arc::new(config),
        })
    }
}

/// The CA file's certificates, or the system bundle's.
fn roots(ca: Option<&Path>) -> Result<RootCertStore> {
    let file = match ca {
        Some(f) => f.to_path_buf(),
        None => system_bundle().ok_or_else(|| {
            anyhow!(
                "no system CA bundle to verify the database server with: install ca-certificates \
                 or set postgres.ca_file"
            )
        })?,
    };
    let pem = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("{}: not PEM certificates ({e})", file.display()))?;
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(certs);
    if added == 0 {
        anyhow::bail!("{}: no usable CA certificate in it", file.display());
    }
    Ok(store)
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<PgTlsConnect> {
        let name = ServerName::try_from(domain.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(PgTlsConnect {
            connector: tokio_rustls::TlsConnector::from(self.config.clone()),
            name,
        })
    }
}

pub struct PgTlsConnect {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let s = self.connector.connect(self.name, stream).await?;
            Ok(PgTlsStream(s))
        })
    }
}

pub struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.0.get_ref();
        match session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|cert| server_end_point(cert))
        {
            Some(hash) => ChannelBinding::tls_server_end_point(hash),
            None => ChannelBinding::none(),
        }
    }
}

/// RFC 5929 `tls-server-end-point` of the server's certificate: its DER hashed with
/// the hash of its signature algorithm, SHA-256 where that is MD5 or SHA-1 (what
/// PostgreSQL computes on its side). `None` for a signature without a hash of its
/// own (Ed25519: PostgreSQL has no binding for it either) or an unparsable one.
pub fn server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::oid_registry::OID_PKCS1_RSASSAPSS;
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let alg = &cert.signature_algorithm;
    if alg.algorithm == OID_PKCS1_RSASSAPSS {
        use x509_parser::signature_algorithm::SignatureAlgorithm;
        match SignatureAlgorithm::try_from(alg).ok()? {
            SignatureAlgorithm::RSASSA_PSS(params) => {
                hash_for_end_point(params.hash_algorithm_oid(), cert_der)
            }
            _ => None,
        }
    } else {
        hash_for_end_point(&alg.algorithm, cert_der)
    }
}

/// `cert_der` hashed for [`server_end_point`] by the hash `oid` names or implies.
fn hash_for_end_point(hash: &x509_parser::oid_registry::Oid, cert_der: &[u8]) -> Option<Vec<u8>> {
    use sha2::{Digest, Sha256, Sha384, Sha512};
    use x509_parser::oid_registry::*;
    let is = |oids: &[&Oid]| oids.contains(&hash);
    if is(&[
        &OID_PKCS1_SHA384WITHRSA,
        &OID_SIG_ECDSA_WITH_SHA384,
        &OID_NIST_HASH_SHA384,
    ]) {
        Some(Sha384::digest(cert_der).to_vec())
    } else if is(&[
        &OID_PKCS1_SHA512WITHRSA,
        &OID_SIG_ECDSA_WITH_SHA512,
        &OID_NIST_HASH_SHA512,
    ]) {
        Some(Sha512::digest(cert_der).to_vec())
    } else if is(&[
        &OID_PKCS1_SHA256WITHRSA,
        &OID_SIG_ECDSA_WITH_SHA256,
        &OID_NIST_HASH_SHA256,
        &OID_PKCS1_SHA1WITHRSA,
        &OID_PKCS1_MD5WITHRSAENC,
        &OID_HASH_SHA1,
    ]) {
        Some(Sha256::digest(cert_der).to_vec())
    } else {
        None
    }
}

/// `require`/`prefer` without a CA: any certificate, but the handshake's signatures
/// are still checked (the session is encrypted to whoever holds that key).
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the name is not compared.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::server_end_point;
    use sha2::{Digest, Sha256, Sha384};

    /// A self-signed certificate for `localhost` with a key of `alg` (its signature too).
    fn cert(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(alg).expect("key");
        rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert")
            .der()
            .to_vec()
    }

    #[test]
    fn the_certificate_is_hashed_with_its_signature_hash() {
        let p256 = cert(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(
            server_end_point(&p256),
            Some(Sha256::digest(&p256).to_vec())
        );
        let p384 = cert(&rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(
            server_end_point(&p384),
            Some(Sha384::digest(&p384).to_vec())
        );
        assert_eq!(server_end_point(&cert(&rcgen::PKCS_ED25519)), None);
        assert_eq!(server_end_point(b"not a certificate"), None);
    }
}
