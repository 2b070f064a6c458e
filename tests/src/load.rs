//! The load generator's engine: many TLS WebSocket clients in one process,
//! spread over several source addresses (127.0.1.x) so no single address runs
//! out of ephemeral ports.
//!
//! Each client is one task: connect from its source address, TLS, upgrade,
//! then hold the connection and answer pings (tungstenite answers them while
//! the client reads). Connects run with bounded concurrency.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

/// Accepts any server certificate: load tests target self-signed gateways.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
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
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS connector for load: no certificate checks, ALPN http/1.1.
pub fn insecure_connector() -> TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// What to load.
#[derive(Debug, Clone)]
pub struct IdleLoad {
    pub target: SocketAddr,
    pub path: String,
    pub clients: usize,
    pub sources: Vec<IpAddr>,
    pub concurrency: usize,
}

/// Counters of a load run.
#[derive(Debug, Default)]
pub struct LoadStats {
    pub connected: AtomicUsize,
    pub failed: AtomicUsize,
    pub closed: AtomicUsize,
}

/// Opens `load.clients` idle clients and returns when all have connected or
/// failed; the clients stay open until `stop` is cancelled.
pub async fn open_idle(load: &IdleLoad, stats: Arc<LoadStats>, stop: CancellationToken) -> Duration {
    let connector = insecure_connector();
    let permits = Arc::new(Semaphore::new(load.concurrency.max(1)));
    let started = Instant::now();
    let done = Arc::new(tokio::sync::Notify::new());
    let pending = Arc::new(AtomicUsize::new(load.clients));
    for i in 0..load.clients {
        let source = load.sources[i % load.sources.len()];
        let permit = permits.clone().acquire_owned().await.expect("semaphore open");
        let (connector, stats, stop, done, pending) =
            (connector.clone(), stats.clone(), stop.clone(), done.clone(), pending.clone());
        let (target, path) = (load.target, load.path.clone());
        tokio::spawn(async move {
            let result = connect_from(source, target, &path, &connector).await;
            drop(permit);
            let ws = match result {
                Ok(ws) => {
                    stats.connected.fetch_add(1, Ordering::Relaxed);
                    Some(ws)
                }
                Err(e) => {
                    if stats.failed.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("connect failed: {e}");
                    }
                    None
                }
            };
            if pending.fetch_sub(1, Ordering::AcqRel) == 1 {
                done.notify_one();
            }
            let Some(mut ws) = ws else { return };
            loop {
                tokio::select! {
                    msg = ws.next() => match msg {
                        Some(Ok(_)) => {}
                        _ => {
                            stats.closed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    },
                    () = stop.cancelled() => return,
                }
            }
        });
    }
    if load.clients > 0 {
        done.notified().await;
    }
    started.elapsed()
}

/// One client: TCP from `source`, TLS, upgrade.
///
/// # Errors
/// Any connect, TLS or upgrade error.
pub async fn connect_from(
    source: IpAddr,
    target: SocketAddr,
    path: &str,
    connector: &TlsConnector,
) -> Result<crate::WsClient, Box<dyn std::error::Error + Send + Sync>> {
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = socket.connect(target).await?;
    let tls = connector.connect(ServerName::try_from("localhost")?, tcp).await?;
    let req = format!("wss://localhost:{}{path}", target.port()).into_client_request()?;
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::client_async_with_config(req, tls, Some(config)).await?;
    Ok(ws)
}

/// Parses `127.0.1.1-8` (a range in the last octet) or a comma list.
///
/// # Errors
/// A message naming the bad part.
pub fn parse_sources(spec: &str) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for part in spec.split(',') {
        if let Some((base, last)) = part.rsplit_once('-') {
            let first: std::net::Ipv4Addr = base.parse().map_err(|e| format!("{base}: {e}"))?;
            let last: u8 = last.parse().map_err(|e| format!("{last}: {e}"))?;
            let o = first.octets();
            for x in o[3]..=last {
                out.push(IpAddr::from([o[0], o[1], o[2], x]));
            }
        } else {
            out.push(part.parse().map_err(|e| format!("{part}: {e}"))?);
        }
    }
    if out.is_empty() {
        return Err("no source address".into());
    }
    Ok(out)
}
