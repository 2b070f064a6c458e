//! TLS: certificate loading (errors, never panics), the listener's
//! reloadable acceptor, and [`ServerTls`], a client's stream of either kind
//! (`tls_stream = "rustls" | "lean"`).
//!
//! TLS 1.2 and 1.3 only (rustls has nothing older), ALPN by the listener's
//! protocol ([`alpn`]), the ring provider's default cipher suites (all AEAD,
//! forward secret). A SIGHUP swaps in a freshly loaded server config; clients
//! already connected keep theirs.
//!
//! A certificate's expiry is read at start and at every reload
//! ([`leaf_not_after`]): logged as a warning below [`EXPIRY_WARNING`], as an
//! error once past ([`log_expiry`]), and exported per listener (the
//! `CertificateExpiry` of `metrics`). An expired certificate still loads:
//! refusing to start would turn a renewal that failed into an outage of every
//! client, including those that do not check the date.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::{error, info, warn};

use crate::config::Protocol;
use crate::wire::lean_tls::LeanTlsStream;

/// A certificate or key that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read certificate chain: {message}")]
    Certificates { path: PathBuf, message: String },
    #[error("{path}: no certificate in file")]
    NoCertificate { path: PathBuf },
    #[error("{path}: certificate {index} of the chain is not X.509: {message}")]
    NotX509 {
        path: PathBuf,
        index: usize,
        message: String,
    },
    #[error("{path}: cannot read private key: {message}")]
    Key { path: PathBuf, message: String },
    #[error("certificate {cert} and key {key} do not form a usable pair: {source}")]
    Config {
        cert: PathBuf,
        key: PathBuf,
        source: Box<rustls::Error>,
    },
}

/// Builds the rustls server config from PEM files.
///
/// # Errors
/// [`TlsError`] naming the file that could not be used.
pub fn server_config(
    cert_path: &Path,
    key_path: &Path,
    protocol: Protocol,
) -> Result<ServerConfig, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Certificates {
            path: cert_path.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_owned(),
        });
    }
    // rustls takes the chain as opaque DER and would only fail at the first
    // handshake; parse every certificate now so a bad file is a config error.
    for (index, der) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::NotX509 {
            path: cert_path.to_owned(),
            index,
            message: e.to_string(),
        })?;
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| TlsError::Key {
        path: key_path.to_owned(),
        message: e.to_string(),
    })?;
    let mut config = server_config_from(certs, key).map_err(|source| TlsError::Config {
        cert: cert_path.to_owned(),
        key: key_path.to_owned(),
        source: Box::new(source),
    })?;
    config.alpn_protocols = alpn(protocol);
    Ok(config)
}

/// When the first (leaf) certificate in `cert_path` stops being valid.
///
/// # Errors
/// [`TlsError`] naming the file when it cannot be read or parsed.
pub fn leaf_not_after(cert_path: &Path) -> Result<SystemTime, TlsError> {
    let der = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| TlsError::Certificates {
            path: cert_path.to_owned(),
            message: e.to_string(),
        })?
        .next()
        .ok_or_else(|| TlsError::NoCertificate {
            path: cert_path.to_owned(),
        })?
        .map_err(|e| TlsError::Certificates {
            path: cert_path.to_owned(),
            message: e.to_string(),
        })?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| TlsError::NotX509 {
        path: cert_path.to_owned(),
        index: 0,
        message: e.to_string(),
    })?;
    let secs = cert.validity().not_after.timestamp();
    Ok(match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH,
    })
}

/// How long before a certificate's `not_after` start and reload warn about
/// it, and the `EdgeGateCertificateExpiringSoon` alert's threshold. ACME
/// clients (certbot, lego) renew 30 days ahead, so 14 days left means the
/// renewal has been failing for more than two weeks, with time left to fix it.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// Where a certificate stands against its `not_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// More than [`EXPIRY_WARNING`] left.
    Valid { left: Duration },
    /// Less than [`EXPIRY_WARNING`] left.
    Soon { left: Duration },
    /// Past `not_after` by `ago`: clients that check the date refuse it.
    Expired { ago: Duration },
}

impl Expiry {
    pub fn at(not_after: SystemTime, now: SystemTime) -> Expiry {
        match not_after.duration_since(now) {
            Ok(left) if left >= EXPIRY_WARNING => Expiry::Valid { left },
            Ok(left) if !left.is_zero() => Expiry::Soon { left },
            Ok(_) => Expiry::Expired {
                ago: Duration::ZERO,
            },
            Err(e) => Expiry::Expired { ago: e.duration() },
        }
    }
}

/// Logs where `listener`'s certificate at `path` stands at `now`: info when
/// valid, a warning within [`EXPIRY_WARNING`] of `not_after`, an error once
/// expired. Returns the classification.
pub fn log_expiry(listener: &str, path: &Path, not_after: SystemTime, now: SystemTime) -> Expiry {
    let expiry = Expiry::at(not_after, now);
    let until = not_after_text(not_after);
    let path = path.display();
    let days = |d: Duration| d.as_secs() / 86_400;
    match expiry {
        Expiry::Valid { left } => {
            info!(listener, cert = %path, not_after = %until, days_left = days(left), "certificate valid");
        }
        Expiry::Soon { left } => {
            warn!(listener, cert = %path, not_after = %until, days_left = days(left), "certificate expires in {} day(s): renew it, then reload", days(left));
        }
        Expiry::Expired { ago } => {
            error!(listener, cert = %path, not_after = %until, days_ago = days(ago), "certificate expired: clients that check the date refuse it; renew it, then reload");
        }
    }
    expiry
}

/// `not_after` as the certificate states it ("Dec  7 23:10:56 2027 +00:00").
fn not_after_text(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(_) => 0,
    };
    x509_parser::time::ASN1Time::from_timestamp(secs)
        .map_or_else(|_| format!("{secs} s after the epoch"), |t| t.to_string())
}

/// ALPN protocols a listener offers: `http/1.1` for WebSocket, `edgegate/1`
/// for the framed protocol. A client that offers none is accepted.
pub fn alpn(protocol: Protocol) -> Vec<Vec<u8>> {
    match protocol {
        Protocol::WebSocket => vec![b"http/1.1".to_vec()],
        Protocol::Framed => vec![b"edgegate/1".to_vec()],
    }
}

/// Builds the rustls server config from parsed DER (what [`server_config`]
/// builds on; it sets the listener's ALPN).
///
/// # Errors
/// When the key does not match the certificate or is of an unsupported type.
pub fn server_config_from(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    // The client's cipher order, decided (docs/hostile-input.md, "Cipher
    // order"): every suite offered is an AEAD with forward secrecy, so no
    // choice a client makes is weak, and honouring its order lets a phone
    // without AES instructions pick ChaCha20 (as Mozilla's profiles do).
    config.ignore_client_order = false;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The acceptor a listener uses, swappable on reload.
pub struct ReloadableAcceptor {
    current: ArcSwap<ServerConfig>,
}

impl std::fmt::Debug for ReloadableAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadableAcceptor").finish_non_exhaustive()
    }
}

impl ReloadableAcceptor {
    pub fn new(config: ServerConfig) -> Self {
        Self {
            current: ArcSwap::from_pointee(config),
        }
    }

    /// The config for the next client (a cheap `Arc` clone).
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Replaces the config for clients that arrive from now on.
    pub fn replace(&self, config: ServerConfig) {
        self.current.store(Arc::new(config));
    }
}

/// A fresh self-signed certificate for `localhost`/127.0.0.1 (the demo, tests).
///
/// # Errors
/// When key generation fails.
pub fn self_signed() -> Result<(String, String), rcgen::Error> {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    Ok((cert.cert.pem(), cert.signing_key.serialize_pem()))
}

/// A client's TLS stream, of the kind its listener's `tls_stream` names.
/// One enum rather than a type parameter, so the client's code is compiled
/// once; the match per poll costs nothing next to the syscall. Both
/// variants are inline and the same size (1,224 bytes with rustls 0.23.46
/// on x86_64, checked by a test), so neither kind of client pays for the
/// other.
#[derive(Debug)]
pub enum ServerTls {
    /// tokio-rustls over rustls's buffered connection.
    Rustls(tokio_rustls::server::TlsStream<TcpStream>),
    /// [`LeanTlsStream`]: no buffer held while the client is idle.
    Lean(LeanTlsStream<TcpStream>),
}

impl ServerTls {
    /// The client's socket under the TLS layer.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            ServerTls::Rustls(s) => s.get_ref().0,
            ServerTls::Lean(s) => s.get_ref(),
        }
    }
}

impl AsyncRead for ServerTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerTls::Rustls(s) => Pin::new(s).poll_read(cx, buf),
            ServerTls::Lean(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerTls::Rustls(s) => Pin::new(s).poll_write(cx, buf),
            ServerTls::Lean(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerTls::Rustls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ServerTls::Lean(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerTls::Rustls(s) => s.is_write_vectored(),
            ServerTls::Lean(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerTls::Rustls(s) => Pin::new(s).poll_flush(cx),
            ServerTls::Lean(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerTls::Rustls(s) => Pin::new(s).poll_shutdown(cx),
            ServerTls::Lean(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::mem::size_of;
    use std::time::{Duration, SystemTime};

    use tokio::net::TcpStream;

    use super::{Expiry, LeanTlsStream, ServerTls, EXPIRY_WARNING};

    #[test]
    fn expiry_is_valid_then_soon_below_the_warning_then_expired() {
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        assert_eq!(
            Expiry::at(now + 30 * day, now),
            Expiry::Valid { left: 30 * day }
        );
        assert_eq!(
            Expiry::at(now + EXPIRY_WARNING, now),
            Expiry::Valid {
                left: EXPIRY_WARNING
            }
        );
        assert_eq!(
            Expiry::at(now + 13 * day, now),
            Expiry::Soon { left: 13 * day }
        );
        assert_eq!(
            Expiry::at(now - 2 * day, now),
            Expiry::Expired { ago: 2 * day }
        );
        assert_eq!(
            Expiry::at(now, now),
            Expiry::Expired {
                ago: Duration::ZERO
            }
        );
    }

    #[test]
    fn the_self_signed_certificates_not_after_is_read_from_the_file() {
        let dir = std::env::temp_dir().join(format!("edgegate-notafter-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, _) = super::self_signed().unwrap();
        std::fs::write(dir.join("c.pem"), cert).unwrap();
        let not_after = super::leaf_not_after(&dir.join("c.pem")).unwrap();
        // rcgen's default validity ends in 4096.
        assert!(not_after > SystemTime::now() + 365 * Duration::from_secs(86_400));
        assert!(super::not_after_text(not_after).contains("4096"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An enum as large as its larger variant: if one kind outgrows the
    /// other, every client of the smaller kind pays the difference. Box
    /// the larger one then, or make it smaller.
    #[test]
    fn both_tls_streams_are_the_same_size_so_neither_pays_for_the_other() {
        let rustls = size_of::<tokio_rustls::server::TlsStream<TcpStream>>();
        let lean = size_of::<LeanTlsStream<TcpStream>>();
        let either = size_of::<ServerTls>();
        assert!(
            either <= rustls.min(lean) + 64,
            "ServerTls {either} B, tokio-rustls {rustls} B, lean {lean} B"
        );
    }
}
