//! The load generator's engine: many clients in one process, spread over
//! several source addresses (127.0.1.x) so no single address runs out of
//! ephemeral ports, driven by commands on stdin, reporting JSON lines.
//!
//! # Layout
//! - [`Target`]: where and how to connect (address, path, [`Proto`], sources).
//! - [`Conn`]: one connected client. The seam between protocols: a WebSocket
//!   client or a framed client (`docs/framed-protocol.md`: `u32` big-endian
//!   length + type + body after TLS). Everything above `Conn` is protocol-blind.
//! - [`Role`]: what a client does once connected: hold (answer pings), send
//!   timed messages at a fixed rate, or publish on command.
//! - [`Control`]: the state every client watches (sending on/off, storm and
//!   publish generations, stop), changed by the command loop in the binary.
//! - [`Shared`]: counters and the latency histogram of the whole process.
//!
//! # A client's life
//! One task per client: connect (TCP from its source address, TLS, upgrade),
//! then a session loop that reads (recording the latency of every timestamped
//! message), sends when its role says so, and watches [`Control`]. A storm
//! generation bump drops the connection and reconnects at once, retrying
//! failed attempts until it is back; a stop ends the task. A session the
//! gateway ends ends the task too, unless [`Control::reconnect`] is on: then
//! the client reconnects the same way (a handover's drain closes the old
//! process's clients with 1001, and they come back to the new one).
//!
//! # Timestamps
//! Every message a client sends starts with the wall-clock send time as a
//! `u64` big-endian count of nanoseconds since the Unix epoch, so latency can
//! be measured by a different process on the same host (fan-out) as well as
//! by the sender (echo). Latencies are recorded in microseconds. A fan-out
//! process also counts deliveries per message ([`Shared::track_messages`]):
//! the send timestamp names the publish, so a driver can tell for each publish
//! how many subscribers got it and when the last one did.
//!
//! # Memory
//! A held client is its task, the TLS connection and a WebSocket stream with
//! a small read buffer ([`WS_READ_BUFFER_BYTES`]) and no write buffer; one
//! process must hold ~19k of them under its descriptor limit.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Interval, MissedTickBehavior};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// WebSocket read buffer per client: messages here are small; tungstenite's
/// 128 KiB default would cost 2.4 GB for 19k clients.
pub const WS_READ_BUFFER_BYTES: usize = 2048;
/// Largest frame a framed client accepts.
pub const MAX_FRAME_BYTES: usize = 1 << 20;
/// Bound on one connect attempt (TCP + TLS + upgrade). A SYN dropped by a
/// full accept queue is retransmitted after 1 s, 3 s, 7 s...: 30 s leaves room.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Latency histogram range, microseconds: 1 µs to 5 min, 3 significant digits.
const HISTOGRAM_MAX_US: u64 = 300_000_000;
/// Bytes of the send timestamp at the start of every message.
pub const TIMESTAMP_BYTES: usize = 8;
/// Pause between failed reconnect attempts grows by this
/// much per attempt, up to [`RECONNECT_PAUSE_MAX`].
const RECONNECT_PAUSE_STEP: Duration = Duration::from_millis(50);
const RECONNECT_PAUSE_MAX: Duration = Duration::from_secs(1);

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

/// A TLS connector for load: no certificate checks, the protocol's ALPN
/// (`http/1.1` or `edgegate/1`), and no session resumption, so every connect
/// is a full handshake (the costly case, and the same work for every system a
/// benchmark compares).
pub fn insecure_connector(proto: Proto) -> TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![match proto {
        Proto::WebSocket => b"http/1.1".to_vec(),
        Proto::Framed => FRAMED_ALPN.to_vec(),
    }];
    config.resumption = rustls::client::Resumption::disabled();
    TlsConnector::from(Arc::new(config))
}

/// The client protocol spoken after TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// HTTP/1.1 upgrade to WebSocket on `Target::path`.
    WebSocket,
    /// EdgeGate's framed protocol (`docs/framed-protocol.md`): frames of
    /// `u32` big-endian length + type + body; Hello carries `Target::path` as
    /// the route.
    Framed,
}

/// ALPN of the framed protocol.
pub const FRAMED_ALPN: &[u8] = b"edgegate/1";

/// Frame types of the framed protocol (`docs/framed-protocol.md`).
use crate::framed as frame;

impl std::str::FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ws" | "websocket" => Ok(Proto::WebSocket),
            "framed" => Ok(Proto::Framed),
            other => Err(format!("{other:?}: expected \"ws\" or \"framed\"")),
        }
    }
}

/// Where and how clients connect.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// WebSocket request path (may carry a query).
    pub path: String,
    /// Where a [`Role::Publisher`] connects instead of `path` (a pub/sub
    /// server with separate publish and subscribe endpoints, e.g. nchan).
    pub publisher_path: Option<String>,
    /// Host name sent as SNI and `Host`.
    pub server_name: String,
    pub proto: Proto,
    /// Source addresses; client `i` binds `sources[i % len]`.
    pub sources: Vec<IpAddr>,
    pub connector: TlsConnector,
}

/// One connected client. Add a protocol here and in [`connect`]; nothing
/// above this type knows which protocol it speaks.
pub enum Conn {
    Ws(WebSocketStream<TlsStream<TcpStream>>),
    Framed(Framed<TlsStream<TcpStream>, LengthDelimitedCodec>),
}

/// Why a connect or a session ended with an error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Conn {
    /// Sends one binary message (WebSocket) or frame (framed).
    ///
    /// # Errors
    /// The connection's write error.
    pub async fn send(&mut self, payload: Bytes) -> Result<(), BoxError> {
        match self {
            Conn::Ws(ws) => ws.send(Message::Binary(payload)).await?,
            Conn::Framed(f) => f.send(typed_frame(frame::BINARY, &payload)).await?,
        }
        Ok(())
    }

    /// The next data message, or how the connection ended. WebSocket pings
    /// are answered inside (tungstenite queues the pong and flushes it on
    /// this read), control frames are skipped.
    ///
    /// # Cancel safety
    /// Cancel-safe: both streams keep partial frames in their buffers.
    pub async fn recv(&mut self) -> Received {
        match self {
            Conn::Ws(ws) => loop {
                match ws.next().await {
                    Some(Ok(Message::Binary(b))) => return Received::Message(b),
                    Some(Ok(Message::Text(t))) => {
                        return Received::Message(Bytes::copy_from_slice(t.as_ref()))
                    }
                    Some(Ok(Message::Close(frame))) => {
                        return Received::Closed(frame.map(|f| u16::from(f.code)))
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Received::Failed(e.into()),
                    None => return Received::Closed(None),
                }
            },
            Conn::Framed(f) => loop {
                let mut b = match f.next().await {
                    Some(Ok(b)) => b,
                    Some(Err(e)) => return Received::Failed(e.into()),
                    None => return Received::Closed(None),
                };
                if b.is_empty() {
                    return Received::Failed("empty frame".into());
                }
                let kind = b[0];
                let body = b.split_off(1).freeze();
                match kind {
                    frame::TEXT | frame::BINARY => return Received::Message(body),
                    // Cancel safety: a pong lost to cancellation only costs a
                    // heartbeat; the gateway pings again.
                    frame::PING => {
                        if let Err(e) = f.send(typed_frame(frame::PONG, &body)).await {
                            return Received::Failed(e.into());
                        }
                    }
                    frame::CLOSE => {
                        let code = body.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
                        return Received::Closed(code);
                    }
                    _ => continue,
                }
            },
        }
    }
}

/// What [`Conn::recv`] got.
pub enum Received {
    Message(Bytes),
    /// The peer closed, with this close code if it sent one.
    Closed(Option<u16>),
    Failed(BoxError),
}

/// A framed-protocol frame body: type byte + body (the codec adds the length).
fn typed_frame(kind: u8, body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(1 + body.len());
    b.put_u8(kind);
    b.put_slice(body);
    b.freeze()
}

/// The framed protocol's opening: Hello (route, empty token), then Welcome.
async fn framed_hello(
    f: &mut Framed<TlsStream<TcpStream>, LengthDelimitedCodec>,
    route: &str,
) -> Result<(), BoxError> {
    let mut hello = BytesMut::with_capacity(1 + 2 + route.len() + 2);
    hello.put_u8(frame::HELLO);
    hello.put_u16(u16::try_from(route.len()).map_err(|_| "route longer than 65535 bytes")?);
    hello.put_slice(route.as_bytes());
    hello.put_u16(0);
    f.send(hello.freeze()).await?;
    match f.next().await {
        Some(Ok(b)) if b.first() == Some(&frame::WELCOME) => Ok(()),
        Some(Ok(b)) if b.first() == Some(&frame::CLOSE) && b.len() >= 3 => Err(format!(
            "refused with close code {}",
            u16::from_be_bytes([b[1], b[2]])
        )
        .into()),
        Some(Ok(b)) => Err(format!("expected Welcome, got frame type {:?}", b.first()).into()),
        Some(Err(e)) => Err(e.into()),
        None => Err("closed before Welcome".into()),
    }
}

/// One client: TCP from `source`, TLS, then the protocol's opening.
///
/// # Errors
/// Any connect, TLS or upgrade error.
pub async fn connect(target: &Target, source: IpAddr) -> Result<Conn, BoxError> {
    connect_to(target, source, &target.path).await
}

/// [`connect`] to `path` instead of `target.path`.
///
/// # Errors
/// Any connect, TLS or upgrade error.
pub async fn connect_to(target: &Target, source: IpAddr, path: &str) -> Result<Conn, BoxError> {
    let socket = if target.addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    bind_address_no_port(&socket)?;
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = socket.connect(target.addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(target.server_name.clone())?;
    let tls = target.connector.connect(name, tcp).await?;
    match target.proto {
        Proto::WebSocket => {
            let mut req = format!(
                "wss://{}:{}{}",
                target.server_name,
                target.addr.port(),
                path
            )
            .into_client_request()?;
            // Keep the Host header free of the port so proxies route it plainly.
            req.headers_mut().insert(
                "host",
                target
                    .server_name
                    .parse()
                    .expect("server name is a header value"),
            );
            let config = WebSocketConfig::default()
                .read_buffer_size(WS_READ_BUFFER_BYTES)
                .write_buffer_size(0);
            let (ws, _) =
                tokio_tungstenite::client_async_with_config(req, tls, Some(config)).await?;
            Ok(Conn::Ws(ws))
        }
        Proto::Framed => {
            let codec = LengthDelimitedCodec::builder()
                .length_field_type::<u32>()
                .big_endian()
                .max_frame_length(MAX_FRAME_BYTES)
                .new_codec();
            let mut framed = Framed::new(tls, codec);
            framed_hello(&mut framed, path).await?;
            Ok(Conn::Framed(framed))
        }
    }
}

/// Sets `IP_BIND_ADDRESS_NO_PORT`: `bind()` fixes only the source address
/// and the port is chosen at `connect()` by the whole 4-tuple. Without it each
/// `bind()` reserves a port on every address for this socket alone, and on
/// loopback the clients' ports starve other connects on the host (a proxy's
/// connections to its backend fail with EADDRNOTAVAIL).
fn bind_address_no_port(socket: &TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket descriptor, a c_int option value and its size.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::addr_of!(one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// What a client does once connected.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Role {
    /// Holds the connection, answers pings, records timestamped messages.
    Hold,
    /// Sends a timestamped message every `period` while sending is on,
    /// starting `offset` after the start so a process's senders spread out.
    Periodic { period: Duration, offset: Duration },
    /// Sends one timestamped message per publish generation, on
    /// [`Target::publisher_path`] if set; records nothing it receives (a
    /// server's replies to a publisher are not deliveries).
    Publisher,
}

/// The state every client watches. The command loop changes it; clients
/// react on their next wake-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Control {
    /// Periodic clients send while this is on.
    pub sending: bool,
    /// Bumped by a storm: every connected client drops and reconnects.
    pub storm: u64,
    /// Bumped once per publish: the publisher sends one message.
    pub publish: u64,
    /// Every client closes and ends.
    pub stop: bool,
    /// A client whose session the other side ends reconnects at once
    /// (instead of ending).
    pub reconnect: bool,
}

/// Counters of one process. `live` is a gauge, the rest count up.
#[derive(Debug, Default)]
pub struct Counters {
    /// Clients connected now.
    pub live: AtomicUsize,
    /// First connects that succeeded.
    pub connected: AtomicUsize,
    /// First connects that failed (the client gives up).
    pub failed: AtomicUsize,
    /// Sessions the other side ended (not a storm, not a stop).
    pub closed: AtomicUsize,
    /// Reconnects that succeeded (after a storm, or a close with
    /// [`Control::reconnect`]).
    pub reconnected: AtomicUsize,
    /// Reconnect attempts that failed (then retried).
    pub reconnect_failures: AtomicUsize,
    /// Timestamped messages sent and received.
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

/// Everything a process's clients share.
pub struct Shared {
    pub counters: Counters,
    /// Latency of received timestamped messages, microseconds.
    pub latency: Mutex<Histogram<u64>>,
    /// Payload size of sent messages (at least [`TIMESTAMP_BYTES`]).
    pub payload_bytes: usize,
    /// Close codes the gateway ended sessions with (0 = no code, or the
    /// connection ended without a close frame).
    pub close_codes: Mutex<std::collections::BTreeMap<u16, usize>>,
    /// Up to this many errors are printed to stderr, then only counted.
    errors_printed: AtomicUsize,
    /// Per received message (keyed by its send timestamp): deliveries and
    /// the slowest one, when [`Shared::track_messages`] turned it on.
    messages: Option<Mutex<HashMap<u64, Delivered>>>,
}

/// Deliveries of one message (one publish) in this process.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub count: u64,
    /// Latency of the last delivery, microseconds.
    pub max_us: u64,
}

impl Shared {
    pub fn new(payload_bytes: usize) -> Self {
        Self {
            counters: Counters::default(),
            latency: Mutex::new(new_histogram()),
            payload_bytes: payload_bytes.max(TIMESTAMP_BYTES),
            close_codes: Mutex::default(),
            errors_printed: AtomicUsize::new(0),
            messages: None,
        }
    }

    /// Also counts deliveries per message (fan-out: a few publishes, each
    /// delivered many times). Not for echo, where every message is distinct.
    #[must_use]
    pub fn track_messages(mut self) -> Self {
        self.messages = Some(Mutex::default());
        self
    }

    fn note_close(&self, code: u16) {
        *self
            .close_codes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(code)
            .or_default() += 1;
    }

    fn note_error(&self, what: &str, e: &dyn std::fmt::Display) {
        if self.errors_printed.fetch_add(1, Ordering::Relaxed) < 5 {
            eprintln!("edgegate-load: {what}: {e}");
        }
    }

    fn record(&self, payload: &[u8]) {
        let Some(sent) = payload.get(..TIMESTAMP_BYTES) else {
            return;
        };
        let sent = u64::from_be_bytes(sent.try_into().expect("8 bytes"));
        let us = now_unix_nanos().saturating_sub(sent) / 1000;
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        if let Some(messages) = &self.messages {
            let mut m = messages.lock().expect("messages lock");
            let d = m.entry(sent).or_default();
            d.count += 1;
            d.max_us = d.max_us.max(us);
        }
        self.latency
            .lock()
            .expect("histogram lock")
            .saturating_record(us.max(1));
    }

    /// Takes the per-message deliveries recorded since the last take, by
    /// send timestamp (empty unless [`Shared::track_messages`]).
    pub fn take_messages(&self) -> Vec<(u64, Delivered)> {
        let Some(messages) = &self.messages else {
            return Vec::new();
        };
        let mut v: Vec<_> = std::mem::take(&mut *messages.lock().expect("messages lock"))
            .into_iter()
            .collect();
        v.sort_unstable_by_key(|(sent, _)| *sent);
        v
    }

    /// Takes the histogram, leaving an empty one.
    pub fn take_latency(&self) -> Histogram<u64> {
        std::mem::replace(
            &mut *self.latency.lock().expect("histogram lock"),
            new_histogram(),
        )
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3).expect("valid histogram bounds")
}

/// Wall-clock nanoseconds since the Unix epoch.
pub fn now_unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A message of `size` bytes starting with the send timestamp.
pub fn timestamped(size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(TIMESTAMP_BYTES));
    b.put_u64(now_unix_nanos());
    b.resize(size.max(TIMESTAMP_BYTES), b'x');
    b.freeze()
}

/// Latency summary and the recorded buckets (`[value_us, count]`, value =
/// highest equivalent value of the bucket) so a driver can merge processes.
pub fn histogram_json(h: &Histogram<u64>) -> serde_json::Value {
    let buckets: Vec<[u64; 2]> = h
        .iter_recorded()
        .map(|v| {
            [
                h.highest_equivalent(v.value_iterated_to()),
                v.count_at_value(),
            ]
        })
        .collect();
    serde_json::json!({
        "count": h.len(),
        "p50_us": h.value_at_quantile(0.5),
        "p90_us": h.value_at_quantile(0.9),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
        "mean_us": (h.mean() * 10.0).round() / 10.0,
        "buckets": buckets,
    })
}

/// Why a session ended.
enum SessionEnd {
    Stop,
    Storm(u64),
    Closed,
}

/// Spawns one client task. `permit` bounds the first connect only (storm
/// reconnects are deliberately unbounded).
pub fn spawn_client(
    index: usize,
    role: Role,
    target: Arc<Target>,
    shared: Arc<Shared>,
    control: watch::Receiver<Control>,
    permit: OwnedSemaphorePermit,
) {
    tokio::spawn(client(index, role, target, shared, control, permit));
}

async fn client(
    index: usize,
    role: Role,
    target: Arc<Target>,
    shared: Arc<Shared>,
    mut control: watch::Receiver<Control>,
    permit: OwnedSemaphorePermit,
) {
    let source = target.sources[index % target.sources.len()];
    let path = match (role, &target.publisher_path) {
        (Role::Publisher, Some(p)) => p.as_str(),
        _ => target.path.as_str(),
    };
    let c = &shared.counters;
    let first = tokio::time::timeout(CONNECT_TIMEOUT, connect_to(&target, source, path)).await;
    drop(permit);
    let mut conn = match first {
        Ok(Ok(conn)) => {
            c.connected.fetch_add(1, Ordering::Relaxed);
            conn
        }
        Ok(Err(e)) => {
            c.failed.fetch_add(1, Ordering::Relaxed);
            shared.note_error("connect failed", &e);
            return;
        }
        Err(_) => {
            c.failed.fetch_add(1, Ordering::Relaxed);
            shared.note_error("connect failed", &"timed out");
            return;
        }
    };
    let mut storm_seen = control.borrow().storm;
    loop {
        c.live.fetch_add(1, Ordering::Relaxed);
        let end = session(&mut conn, role, &shared, &mut control, storm_seen).await;
        c.live.fetch_sub(1, Ordering::Relaxed);
        match end {
            SessionEnd::Stop => return,
            SessionEnd::Closed => {
                c.closed.fetch_add(1, Ordering::Relaxed);
                if !control.borrow().reconnect {
                    return;
                }
                drop(conn);
                match reconnect(&target, source, path, &shared, &control).await {
                    Some(new) => conn = new,
                    None => return,
                }
            }
            SessionEnd::Storm(generation) => {
                storm_seen = generation;
                // Drop, not close: the storm models clients losing the network.
                drop(conn);
                match reconnect(&target, source, path, &shared, &control).await {
                    Some(new) => conn = new,
                    None => return,
                }
            }
        }
    }
}

/// Reconnects until it succeeds or the process stops, counting failures.
async fn reconnect(
    target: &Target,
    source: IpAddr,
    path: &str,
    shared: &Shared,
    control: &watch::Receiver<Control>,
) -> Option<Conn> {
    let c = &shared.counters;
    let mut pause = Duration::ZERO;
    loop {
        if control.borrow().stop {
            return None;
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, connect_to(target, source, path)).await {
            Ok(Ok(conn)) => {
                c.reconnected.fetch_add(1, Ordering::Relaxed);
                return Some(conn);
            }
            Ok(Err(e)) => shared.note_error("reconnect failed", &e),
            Err(_) => shared.note_error("reconnect failed", &"timed out"),
        }
        c.reconnect_failures.fetch_add(1, Ordering::Relaxed);
        pause = (pause + RECONNECT_PAUSE_STEP).min(RECONNECT_PAUSE_MAX);
        tokio::time::sleep(pause).await;
    }
}

/// Waits for the next tick, or forever when there is no interval.
async fn tick(interval: &mut Option<Interval>) {
    match interval {
        Some(iv) => {
            iv.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// One connection's life: read and record, send per role, obey control.
async fn session(
    conn: &mut Conn,
    role: Role,
    shared: &Shared,
    control: &mut watch::Receiver<Control>,
    storm_seen: u64,
) -> SessionEnd {
    let c = &shared.counters;
    let mut published = control.borrow().publish;
    let mut interval: Option<Interval> = None;
    // React to the state as it is now, then to every change.
    let mut state = *control.borrow_and_update();
    let mut fresh = true;
    loop {
        if !fresh {
            tokio::select! {
                changed = control.changed() => {
                    if changed.is_err() {
                        return SessionEnd::Stop;
                    }
                    state = *control.borrow_and_update();
                }
                () = tick(&mut interval) => {
                    if let Err(e) = conn.send(timestamped(shared.payload_bytes)).await {
                        shared.note_error("send failed", &e);
                        return SessionEnd::Closed;
                    }
                    c.sent.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                msg = conn.recv() => match msg {
                    Received::Message(payload) => {
                        if role != Role::Publisher {
                            shared.record(&payload);
                        }
                        continue;
                    }
                    Received::Failed(e) => {
                        shared.note_error("read failed", &e);
                        shared.note_close(0);
                        return SessionEnd::Closed;
                    }
                    Received::Closed(code) => {
                        shared.note_close(code.unwrap_or(0));
                        return SessionEnd::Closed;
                    }
                },
            }
        }
        fresh = false;
        if state.stop {
            return SessionEnd::Stop;
        }
        if state.storm != storm_seen {
            return SessionEnd::Storm(state.storm);
        }
        match role {
            Role::Periodic { period, offset } => match (state.sending, interval.is_some()) {
                (true, false) => {
                    let mut iv =
                        tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
                    iv.set_missed_tick_behavior(MissedTickBehavior::Skip);
                    interval = Some(iv);
                }
                (false, true) => interval = None,
                _ => {}
            },
            Role::Publisher => {
                while published < state.publish {
                    published += 1;
                    if let Err(e) = conn.send(timestamped(shared.payload_bytes)).await {
                        shared.note_error("publish failed", &e);
                        return SessionEnd::Closed;
                    }
                    c.sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            Role::Hold => {}
        }
    }
}

/// Opens `clients` clients with at most `concurrency` first connects in
/// flight, and returns when each has connected or failed, with the time it
/// took. `role(i)` gives client `i` its role.
pub async fn open_clients(
    clients: usize,
    concurrency: usize,
    target: Arc<Target>,
    shared: Arc<Shared>,
    control: &watch::Receiver<Control>,
    role: impl Fn(usize) -> Role,
) -> Duration {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let started = Instant::now();
    for i in 0..clients {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore open");
        spawn_client(
            i,
            role(i),
            target.clone(),
            shared.clone(),
            control.clone(),
            permit,
        );
    }
    let c = &shared.counters;
    while c.connected.load(Ordering::Relaxed) + c.failed.load(Ordering::Relaxed) < clients {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    started.elapsed()
}

/// Parses `127.0.1.1-8` (a range in the last octet) or a comma list of
/// addresses and ranges.
///
/// # Errors
/// A message naming the bad part.
pub fn parse_sources(spec: &str) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((base, last)) = part.rsplit_once('-') {
            let first: std::net::Ipv4Addr = base.parse().map_err(|e| format!("{base}: {e}"))?;
            let last: u8 = last.parse().map_err(|e| format!("{last}: {e}"))?;
            let o = first.octets();
            if last < o[3] {
                return Err(format!("{part}: range ends before it starts"));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_ranges_and_lists() {
        let s = parse_sources("127.0.1.1-3,127.0.2.9").unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s[3], "127.0.2.9".parse::<IpAddr>().unwrap());
        assert!(parse_sources("127.0.1.5-2").is_err());
    }

    #[test]
    fn timestamped_messages_record_a_latency() {
        let shared = Shared::new(32);
        let m = timestamped(shared.payload_bytes);
        assert_eq!(m.len(), 32);
        shared.record(&m);
        let h = shared.take_latency();
        assert_eq!(h.len(), 1);
        assert!(h.max() < 1_000_000);
        assert!(
            shared.take_messages().is_empty(),
            "not tracked unless asked"
        );
    }

    #[test]
    fn tracked_messages_count_deliveries_per_publish() {
        let shared = Shared::new(16).track_messages();
        let a = timestamped(16);
        let mut b = BytesMut::from(&a[..]);
        let later = u64::from_be_bytes(a[..8].try_into().unwrap()) + 1;
        b[..8].copy_from_slice(&later.to_be_bytes());
        let b = b.freeze();
        for m in [&a, &b, &a, &a] {
            shared.record(m);
        }
        let m = shared.take_messages();
        let counts: Vec<u64> = m.iter().map(|(_, d)| d.count).collect();
        assert_eq!(counts, [3, 1], "sorted by send time: a then b");
        assert!(m[0].0 <= m[1].0);
        assert!(shared.take_messages().is_empty(), "taken");
    }
}
