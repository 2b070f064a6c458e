//! TLS: certificate loading (errors, never panics), the listener's
//! reloadable acceptor, and [`ServerTls`], a client's stream of either kind
//! (`tls_stream = "rustls" | "lean"`).
//!
//! TLS 1.2 and 1.3 only (rustls has nothing older), ALPN by the listener's
//! protocol ([`alpn`]), the ring provider's default cipher suites (all AEAD,
//! forward secret). A SIGHUP swaps in a freshly loaded server config; clients
//! already connected keep theirs.

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

    use tokio::net::TcpStream;

    use super::{LeanTlsStream, ServerTls};

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
