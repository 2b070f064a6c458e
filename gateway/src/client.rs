//! One client's life, in one task: TLS handshake → WebSocket upgrade + auth →
//! open on a link → session loop → close.
//!
//! Invariants:
//! - Every phase has its own bound: `handshake_timeout_secs` (TLS),
//!   `upgrade_timeout_secs` (HTTP upgrade and auth), the heartbeat timeout and
//!   `write_timeout_secs` in the session, `link_backpressure_timeout_secs`
//!   while a link is full.
//! - The handshake futures are boxed, so their state (rustls handshake,
//!   tungstenite's HTTP parser) is freed before the session starts; a test
//!   pins the size of the session future.
//! - The session loop owns one timer (`deadline`) whatever happens; no timer,
//!   spawn or allocation per message beyond the message itself.
//! - Every `select!` branch is cancel safe, and every write is bounded by the
//!   write timeout.
//! - Every session ends with one [`CloseReason`], logged and counted.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edgegate_link::proto::{ClientId, Frame, Kind, CLIENT_MESSAGE_OVERHEAD};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout, Instant, Sleep};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::debug;

use crate::close::CloseReason;
use crate::config::{Protocol, TlsStreamKind, WsCodec};
use crate::framed::FramedClient;
use crate::links::{LinkHandle, ServicePool};
use crate::metrics::Phase;
use crate::outbox::ClientHandle;
use crate::state::{Settings, Shared};
use crate::tls::{ReloadableAcceptor, ServerTls};
use crate::wire::lean_tls::LeanTlsStream;
use crate::wire::ws_stream::WsStream;

/// Bound on the close handshake once a close frame is sent.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection may hold a handshake permit before its whole
/// ClientHello has arrived. A client sends it one half round trip after the
/// accept; 500 ms covers slow mobile links.
pub const CLIENT_HELLO_WAIT: Duration = Duration::from_millis(500);
/// A slow reader's socket is full: its close frame gets this long.
const SLOW_READER_CLOSE_TIMEOUT: Duration = Duration::from_millis(100);
/// A ping due within this much is sent now rather than after another timer.
const PING_SLACK: Duration = Duration::from_millis(10);
/// Control frames (pings, pongs) a client may send per heartbeat interval
/// (`ping_interval_secs`) before it is closed with 1008. Each ping costs a
/// pong the gateway must write, and a client that floods pings without
/// reading keeps the session alive at the gateway's expense. Clients that
/// ping on their own do it every few seconds at most (browsers never do), so
/// 64 per interval (30 s by default) is far above any real client.
pub const CONTROL_FRAME_BUDGET: u16 = 64;
/// Messages written between two flushes when a burst is queued.
const WRITE_BATCH: usize = 64;

/// What the clients of one listener share.
#[derive(Debug)]
pub struct ListenerCtx {
    pub name: String,
    pub protocol: Protocol,
    /// Path → index into `services`.
    pub routes: HashMap<String, usize>,
    /// The link pools, indexed by the config's service order.
    pub services: Vec<Arc<ServicePool>>,
    pub tls: ReloadableAcceptor,
    /// Which TLS stream the clients get (`tls_stream`).
    pub tls_stream: TlsStreamKind,
    /// Which WebSocket codec the clients get (`ws_codec`).
    pub ws_codec: WsCodec,
    /// The path answered by readiness instead of routed (`health_path`).
    pub health_path: Option<Box<str>>,
    /// The handshake permits shared by every listener (see `listener::accept_loop`).
    pub permits: Arc<Semaphore>,
    pub shared: Arc<Shared>,
}

/// What the upgrade decided about a client.
#[derive(Debug)]
struct Admission {
    route: String,
    service: usize,
    claims: Bytes,
}

/// The client's TLS stream, boxed so it lives in one place.
type ClientTls = Box<ServerTls>;
/// The client's WebSocket, boxed: the rustls connection and WebSocket state
/// (~1.5 KB) live in one heap block instead of being laid out again in every
/// future that passes them along.
type ClientWs = Box<tokio_tungstenite::WebSocketStream<ServerTls>>;
/// The client's WebSocket on our own codec (`ws_codec = "edgegate"`), boxed
/// for the same reason.
type ClientEdgeWs = Box<WsStream<ServerTls>>;
/// A framed-protocol client, boxed for the same reason.
type ClientFramed = Box<FramedClient<ServerTls>>;

/// A client's message stream over its TLS stream: the WebSocket or the
/// framed codec. The session ends with a [`linger`](crate::linger) on the TLS
/// stream under it.
trait ClientStream:
    Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin
{
    /// The protocol this stream speaks (the `protocol` label).
    const PROTOCOL: Protocol;

    fn tls(&mut self) -> &mut ServerTls;
}

impl ClientStream for ClientWs {
    const PROTOCOL: Protocol = Protocol::WebSocket;

    fn tls(&mut self) -> &mut ServerTls {
        self.get_mut()
    }
}

impl ClientStream for ClientEdgeWs {
    const PROTOCOL: Protocol = Protocol::WebSocket;

    fn tls(&mut self) -> &mut ServerTls {
        self.get_mut()
    }
}

impl ClientStream for ClientFramed {
    const PROTOCOL: Protocol = Protocol::Framed;

    fn tls(&mut self) -> &mut ServerTls {
        self.get_mut()
    }
}

/// Runs one client from accepted socket to close. Spawned by the accept loop
/// with a handshake permit, which is released when TLS completes (see
/// [`tls_phase`]).
///
/// Each handshake phase runs in its own boxed future that returns a boxed
/// stream: its state is freed when it ends, and only a pointer crosses into
/// the next phase.
pub async fn serve(
    stream: TcpStream,
    addr: SocketAddr,
    id: ClientId,
    ctx: Arc<ListenerCtx>,
    permit: OwnedSemaphorePermit,
) {
    // The guard owns the context and the address (no copy of either in the
    // task): what the admission is given back to, and by whom.
    let slot = ClientSlot { ctx, addr };
    let (ctx, shared) = (&slot.ctx, &slot.ctx.shared);
    let settings = shared.settings();
    let started = Instant::now();
    let _ = stream.set_nodelay(true);

    let deadline = started + settings.limits.handshake_timeout;
    let Some(tls) = Box::pin(tls_phase(stream, permit, ctx, deadline)).await else {
        return handshake_failed(shared, Phase::Tls);
    };
    let protocol = ctx.protocol;
    // The two arms differ only in the stream type. They are not folded into
    // one async fn: its arguments would be laid out again in every client's
    // task (measured +144 bytes per client).
    let reason = match protocol {
        Protocol::WebSocket => {
            let (tls, rest, admission) = match Box::pin(upgrade_phase(tls, ctx, &settings)).await {
                Ok(upgraded) => upgraded,
                Err(Ended) => return,
            };
            session_started(shared, protocol, started);
            let pool = ctx.services[admission.service].clone();
            // Bytes the client sent after its request are its first frames.
            match ctx.ws_codec {
                WsCodec::Tungstenite => {
                    let ws: ClientWs = Box::new(
                        Box::pin(tokio_tungstenite::WebSocketStream::from_partially_read(
                            *tls,
                            rest,
                            tokio_tungstenite::tungstenite::protocol::Role::Server,
                            Some(settings.ws_config),
                        ))
                        .await,
                    );
                    run_session(ws, id, slot.addr, admission, &pool, shared, &settings).await
                }
                WsCodec::Edgegate => {
                    let max = settings.limits.max_message_bytes;
                    let ws: ClientEdgeWs = Box::new(WsStream::new(*tls, rest, max));
                    run_session(ws, id, slot.addr, admission, &pool, shared, &settings).await
                }
            }
        }
        Protocol::Framed => {
            let (client, admission) = match Box::pin(hello_phase(tls, ctx, &settings)).await {
                Ok(opened) => opened,
                Err(Ended) => return,
            };
            session_started(shared, protocol, started);
            let pool = ctx.services[admission.service].clone();
            run_session(client, id, slot.addr, admission, &pool, shared, &settings).await
        }
    };
    debug!(reason = reason.label(), "client connection released");
}

/// A client's admission (one of `max_clients`, one of its address's), given
/// back when dropped: when the client task ends, however it ends — a panic
/// included.
pub(crate) struct ClientSlot {
    pub(crate) ctx: Arc<ListenerCtx>,
    pub(crate) addr: SocketAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.ctx.shared.admission.release(self.addr.ip());
    }
}

/// What a client holds while in session: its registry entry (with its link
/// binding) and its topic memberships. Dropped when the session ends —
/// or when the client task panics, when it also tells the service the
/// client is gone (1011) if the link has room — it gives them all back.
pub(crate) struct InSession<'a> {
    pub(crate) shared: &'a Shared,
    pub(crate) handle: &'a ClientHandle,
    pub(crate) link: &'a LinkHandle,
}

impl Drop for InSession<'_> {
    fn drop(&mut self) {
        let id = self.handle.id;
        self.shared.clients.remove(id);
        self.shared
            .topics
            .remove_client(self.handle, &self.shared.metrics);
        self.link.unbind();
        if std::thread::panicking() {
            let _ = self.link.tx.try_send(Frame::ClientClose {
                client: id,
                code: 1011,
                reason: "gateway internal error".to_owned(),
            });
        }
    }
}

/// The connection ended during the handshake phases: a failure was counted
/// where it was one (not for a health probe), and an answered client was
/// let go with a lingering close.
struct Ended;

/// Counts a failed handshake phase.
fn counted(shared: &Shared, phase: Phase) -> Ended {
    shared.metrics.handshake_failed(phase);
    Ended
}

fn handshake_failed(shared: &Shared, phase: Phase) {
    shared.metrics.handshake_failed(phase);
}

fn session_started(shared: &Shared, protocol: Protocol, started: Instant) {
    shared
        .metrics
        .handshake_duration
        .observe(started.elapsed().as_secs_f64());
    let protocol = protocol.as_str();
    shared
        .metrics
        .clients_accepted
        .get_or_create(&[("protocol", protocol)])
        .inc();
    shared
        .metrics
        .clients
        .get_or_create(&[("protocol", protocol)])
        .inc();
}

/// The TLS handshake, bounded by `handshake_timeout_secs` from accept, with
/// the handshake permit held only while the client is making progress:
///
/// - The permit taken by the accept loop covers reading the ClientHello for
///   [`CLIENT_HELLO_WAIT`]: a real client sends it at once. A connection that
///   has not sent a whole ClientHello by then gives the permit back, keeps
///   reading without one, and queues for a permit again once it has.
/// - The permit covers the handshake's CPU work and is released when TLS
///   completes, not after the upgrade: dripping HTTP headers holds no permit.
///
/// So connections that send nothing, or one byte, cannot hold every permit
/// and lock new clients out; storms are still shaped where they cost (the
/// key exchange and signature).
async fn tls_phase(
    stream: TcpStream,
    permit: OwnedSemaphorePermit,
    ctx: &ListenerCtx,
    deadline: Instant,
) -> Option<ClientTls> {
    let tls = match ctx.tls_stream {
        TlsStreamKind::Rustls => rustls_handshake(stream, permit, ctx, deadline).await?,
        TlsStreamKind::Lean => lean_handshake(stream, permit, ctx, deadline).await?,
    };
    Some(Box::new(tls))
}

/// [`tls_phase`] on tokio-rustls: its lazy acceptor reads the ClientHello.
async fn rustls_handshake(
    stream: TcpStream,
    permit: OwnedSemaphorePermit,
    ctx: &ListenerCtx,
    deadline: Instant,
) -> Option<ServerTls> {
    let mut hello =
        tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
    let (start, permit) = client_hello(&mut hello, permit, ctx, deadline).await?;
    let tls = match tokio::time::timeout_at(deadline, start.into_stream(ctx.tls.config())).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(error = %e, "tls handshake failed");
            return None;
        }
        Err(_) => {
            debug!("tls handshake timed out");
            return None;
        }
    };
    drop(permit);
    Some(ServerTls::Rustls(tls))
}

/// [`tls_phase`] on the lean stream: it holds the first record unprocessed
/// until the permit is there.
async fn lean_handshake(
    stream: TcpStream,
    permit: OwnedSemaphorePermit,
    ctx: &ListenerCtx,
    deadline: Instant,
) -> Option<ServerTls> {
    let mut tls = match LeanTlsStream::new(stream, ctx.tls.config()) {
        Ok(tls) => tls,
        Err(e) => {
            debug!(error = %e, "tls config refused");
            return None;
        }
    };
    let ((), permit) = client_hello(tls.client_hello(), permit, ctx, deadline).await?;
    match tokio::time::timeout_at(deadline, tls.handshake()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            debug!(error = %e, "tls handshake failed");
            return None;
        }
        Err(_) => {
            debug!("tls handshake timed out");
            return None;
        }
    }
    drop(permit);
    Some(ServerTls::Lean(tls))
}

/// Waits for `hello` (a whole ClientHello) holding `permit` for at most
/// [`CLIENT_HELLO_WAIT`]; past that, gives the permit back, waits on until
/// `deadline`, and queues for a permit again (see [`tls_phase`]).
async fn client_hello<T, E: std::fmt::Display>(
    hello: impl Future<Output = Result<T, E>>,
    permit: OwnedSemaphorePermit,
    ctx: &ListenerCtx,
    deadline: Instant,
) -> Option<(T, OwnedSemaphorePermit)> {
    let mut hello = std::pin::pin!(hello);
    match timeout(CLIENT_HELLO_WAIT, &mut hello).await {
        Ok(Ok(start)) => Some((start, permit)),
        Ok(Err(e)) => {
            debug!(error = %e, "client hello refused");
            None
        }
        Err(_) => {
            drop(permit);
            let start = match tokio::time::timeout_at(deadline, &mut hello).await {
                Ok(Ok(start)) => start,
                Ok(Err(e)) => {
                    debug!(error = %e, "client hello refused");
                    return None;
                }
                Err(_) => {
                    debug!("no client hello before the handshake deadline");
                    return None;
                }
            };
            let permit = tokio::time::timeout_at(deadline, ctx.permits.clone().acquire_owned())
                .await
                .ok()?
                .ok()?;
            Some((start, permit))
        }
    }
}

/// Longest request head read before the upgrade is refused with 431.
const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// Most request headers accepted (tungstenite's own limit).
const MAX_REQUEST_HEADERS: usize = 124;

/// An HTTP answer instead of an upgrade, and the phase it counts against.
struct Refusal {
    /// Boxed: a refusal is the rare path, and keeps `Result`s small.
    response: Box<ErrorResponse>,
    phase: Phase,
}

impl Refusal {
    fn upgrade(status: StatusCode, body: &str) -> Self {
        Refusal {
            response: Box::new(http_error(status, body)),
            phase: Phase::Upgrade,
        }
    }

    fn with_header(mut self, name: header::HeaderName, value: &'static str) -> Self {
        self.response
            .headers_mut()
            .insert(name, header::HeaderValue::from_static(value));
        self
    }
}

/// Why the upgrade did not happen.
enum NoUpgrade {
    /// Answered with an HTTP error (a browser, a balancer's check, a bad client).
    Refused(Refusal),
    /// The connection failed or ended before a whole request arrived.
    Gone,
    /// A load balancer's probe of the listener's `health_path`, answered.
    Health(Box<ErrorResponse>),
}

/// HTTP upgrade with routing, Origin and token checks, bounded by
/// `upgrade_timeout_secs`. The request head is read and judged here, so
/// anything that is not a WebSocket upgrade gets an HTTP answer like a web
/// server's (`400`, `404`, `405`, `426`, `431`, `401`/`403` from auth, each
/// with a short body and `Connection: close`) instead of a reset; the
/// handshake itself (`create_response`) is tungstenite's. Returns the TLS
/// stream and the bytes the client sent after its request (its first
/// frames), for the listener's `ws_codec`. The error names the phase that
/// refused.
async fn upgrade_phase(
    mut tls: ClientTls,
    ctx: &ListenerCtx,
    settings: &Settings,
) -> Result<(ClientTls, Vec<u8>, Admission), Ended> {
    let opened = timeout(settings.limits.upgrade_timeout, async {
        let (request, rest) = read_request(&mut tls).await?;
        if ctx.health_path.as_deref() == Some(request.uri().path()) {
            return Err(NoUpgrade::Health(health_answer(&request, ctx)));
        }
        let (response, admission) = judge(&request, ctx, settings).map_err(NoUpgrade::Refused)?;
        let mut head = Vec::with_capacity(160);
        tokio_tungstenite::tungstenite::handshake::server::write_response(&mut head, &response)
            .map_err(|_| NoUpgrade::Gone)?;
        tls.write_all(&head).await.map_err(|_| NoUpgrade::Gone)?;
        tls.flush().await.map_err(|_| NoUpgrade::Gone)?;
        Ok::<_, NoUpgrade>((admission, rest))
    })
    .await;
    match opened {
        Ok(Ok((admission, rest))) => Ok((tls, rest, admission)),
        Ok(Err(NoUpgrade::Refused(refusal))) => {
            debug!(status = %refusal.response.status(), phase = refusal.phase.as_str(), "upgrade refused");
            // Counted before the answer, so whoever reads it sees the count.
            let failed = counted(&ctx.shared, refusal.phase);
            if let Ok(Ok(())) = timeout(CLOSE_TIMEOUT, answer(&mut tls, &refusal.response)).await {
                Box::pin(crate::linger::linger(&mut tls)).await;
            }
            Err(failed)
        }
        Ok(Err(NoUpgrade::Health(response))) => {
            // A probe, not a failed client: answered, not counted.
            if let Ok(Ok(())) = timeout(CLOSE_TIMEOUT, answer(&mut tls, &response)).await {
                Box::pin(crate::linger::linger(&mut tls)).await;
            }
            Err(Ended)
        }
        Ok(Err(NoUpgrade::Gone)) => {
            debug!("connection ended before a whole request");
            Err(counted(&ctx.shared, Phase::Upgrade))
        }
        Err(_) => {
            debug!("upgrade timed out");
            Err(counted(&ctx.shared, Phase::Upgrade))
        }
    }
}

/// Reads one request head (up to [`MAX_REQUEST_HEAD`]); returns it parsed,
/// and the bytes that followed it.
async fn read_request(tls: &mut ClientTls) -> Result<(Request, Vec<u8>), NoUpgrade> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let request = to_http_request(&parsed)?;
                return Ok((request, buf.split_off(len)));
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return Err(NoUpgrade::Refused(Refusal::upgrade(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "too many request headers",
                )))
            }
            Err(_) => {
                return Err(NoUpgrade::Refused(Refusal::upgrade(
                    StatusCode::BAD_REQUEST,
                    "malformed HTTP request",
                )))
            }
        }
        if buf.len() >= MAX_REQUEST_HEAD {
            return Err(NoUpgrade::Refused(Refusal::upgrade(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request head over 64 KiB",
            )));
        }
        buf.reserve(1024.min(MAX_REQUEST_HEAD - buf.len()));
        match tls.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return Err(NoUpgrade::Gone),
            Ok(_) => {}
        }
    }
}

fn to_http_request(parsed: &httparse::Request<'_, '_>) -> Result<Request, NoUpgrade> {
    let bad = || {
        NoUpgrade::Refused(Refusal::upgrade(
            StatusCode::BAD_REQUEST,
            "malformed HTTP request",
        ))
    };
    let version = match parsed.version {
        Some(1) => tokio_tungstenite::tungstenite::http::Version::HTTP_11,
        _ => {
            return Err(NoUpgrade::Refused(Refusal::upgrade(
                StatusCode::BAD_REQUEST,
                "a WebSocket upgrade needs HTTP/1.1",
            )))
        }
    };
    let mut request = Request::builder()
        .method(parsed.method.ok_or_else(bad)?)
        .uri(parsed.path.ok_or_else(bad)?)
        .version(version);
    for h in parsed.headers.iter() {
        request = request.header(h.name, h.value);
    }
    request.body(()).map_err(|_| bad())
}

/// The answer to a probe of the listener's `health_path`: 200 while ready
/// for clients of the services this listener routes to, 503 (with the
/// reason) while leaving, draining, or with a service unlinked; one rule
/// with the admin endpoint's `/readyz` ([`crate::readiness`]).
fn health_answer(request: &Request, ctx: &ListenerCtx) -> Box<ErrorResponse> {
    use tokio_tungstenite::tungstenite::http::Method;
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut r = http_error(StatusCode::METHOD_NOT_ALLOWED, "a health probe is a GET");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Box::new(r);
    }
    let mut served: Vec<usize> = ctx.routes.values().copied().collect();
    served.sort_unstable();
    served.dedup();
    let pools = served.iter().map(|&i| &ctx.services[i]);
    let mut r = match crate::readiness::readiness(&ctx.shared.lifecycle, pools) {
        Ok(_) => http_error(StatusCode::OK, "ready"),
        Err(why) => http_error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("not ready: {why}"),
        ),
    };
    if request.method() == Method::HEAD {
        *r.body_mut() = None;
    }
    Box::new(r)
}

/// Route, method, upgrade headers, Origin, token: the 101 response and the
/// admission, or the HTTP answer that refuses.
fn judge(
    request: &Request,
    ctx: &ListenerCtx,
    settings: &Settings,
) -> Result<(Response, Admission), Refusal> {
    let Some(&service) = ctx.routes.get(request.uri().path()) else {
        return Err(Refusal::upgrade(
            StatusCode::NOT_FOUND,
            "no route for this path",
        ));
    };
    if request.method() != tokio_tungstenite::tungstenite::http::Method::GET {
        return Err(Refusal::upgrade(
            StatusCode::METHOD_NOT_ALLOWED,
            "a WebSocket upgrade is a GET",
        )
        .with_header(header::ALLOW, "GET"));
    }
    let header_has = |name: header::HeaderName, token: &str| {
        request
            .headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split([',', ' ']).any(|t| t.eq_ignore_ascii_case(token)))
    };
    let version_13 = request
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    if !header_has(header::UPGRADE, "websocket") || !version_13 {
        // RFC 6455 4.2.2: a version the server does not speak gets 426 and
        // the versions it does.
        return Err(Refusal::upgrade(
            StatusCode::UPGRADE_REQUIRED,
            "this path takes WebSocket (version 13) only",
        )
        .with_header(header::UPGRADE, "websocket")
        .with_header(header::SEC_WEBSOCKET_VERSION, "13"));
    }
    let response = tokio_tungstenite::tungstenite::handshake::server::create_response(request)
        .map_err(|e| {
            Refusal::upgrade(
                StatusCode::BAD_REQUEST,
                &format!("bad upgrade request: {e}"),
            )
        })?;
    let admission = admit(request, service, settings)?;
    Ok((response, admission))
}

/// Writes an HTTP error answer; the caller lingers (close_notify, FIN, discard).
async fn answer(tls: &mut ClientTls, response: &ErrorResponse) -> std::io::Result<()> {
    let body = response.body().as_deref().unwrap_or("");
    let mut text = format!(
        "HTTP/1.1 {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status(),
        body.len()
    );
    for (name, value) in response.headers() {
        if let Ok(v) = value.to_str() {
            text.push_str(&format!("{name}: {v}\r\n"));
        }
    }
    text.push_str("\r\n");
    text.push_str(body);
    tls.write_all(text.as_bytes()).await?;
    tls.flush().await
}

/// The framed protocol's opening: the client's Hello (route and token),
/// bounded by `upgrade_timeout_secs`, then Welcome. A refused client gets a
/// Close frame (4404 unknown route, 4401 bad token) and never reaches a service.
async fn hello_phase(
    tls: ClientTls,
    ctx: &ListenerCtx,
    settings: &Settings,
) -> Result<(ClientFramed, Admission), Ended> {
    let limits = &settings.limits;
    let mut client = Box::new(FramedClient::new(*tls, limits.max_message_bytes));
    let hello = match timeout(limits.upgrade_timeout, client.read_hello()).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(e)) => {
            debug!(error = %e, "framed hello refused");
            return Err(refuse_framed(
                client,
                counted(&ctx.shared, Phase::Upgrade),
                1002,
                "expected hello",
            )
            .await);
        }
        Err(_) => {
            debug!("framed hello timed out");
            return Err(counted(&ctx.shared, Phase::Upgrade));
        }
    };
    let Some(&service) = ctx.routes.get(&hello.route) else {
        return Err(refuse_framed(
            client,
            counted(&ctx.shared, Phase::Upgrade),
            4404,
            "no route for this path",
        )
        .await);
    };
    let bearer = (!hello.token.is_empty()).then(|| format!("Bearer {}", hello.token));
    let claims = match settings.auth.verify(bearer.as_deref(), None) {
        Ok(claims) => claims,
        Err(e) => {
            debug!(error = %e, "framed client refused");
            return Err(refuse_framed(
                client,
                counted(&ctx.shared, Phase::Auth),
                4401,
                &e.to_string(),
            )
            .await);
        }
    };
    match timeout(
        limits.upgrade_timeout,
        client.send_raw(crate::framed::welcome()),
    )
    .await
    {
        Ok(Ok(())) => Ok((
            client,
            Admission {
                route: hello.route,
                service,
                claims,
            },
        )),
        _ => Err(counted(&ctx.shared, Phase::Upgrade)),
    }
}

/// Sends a refused framed client its Close frame (bounded), then lingers.
/// The failure is counted by the caller before it is answered.
async fn refuse_framed(mut client: ClientFramed, failed: Ended, code: u16, reason: &str) -> Ended {
    if let Ok(Ok(())) = timeout(CLOSE_TIMEOUT, client.send(close_message(code, reason))).await {
        Box::pin(crate::linger::linger(client.get_mut())).await;
    }
    failed
}

fn close_message(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: crate::close::close_text(reason).to_owned().into(),
    }))
}

/// Origin and token, once the route is known: the admission, or the
/// 401/403 answer (counted against the auth phase).
fn admit(req: &Request, service: usize, settings: &Settings) -> Result<Admission, Refusal> {
    let header_str =
        |name: header::HeaderName| req.headers().get(name).and_then(|v| v.to_str().ok());
    let claims = settings
        .auth
        .check_origin(header_str(header::ORIGIN))
        .and_then(|()| {
            settings
                .auth
                .verify(header_str(header::AUTHORIZATION), req.uri().query())
        })
        .map_err(|e| {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
            let mut r = http_error(status, &e.to_string());
            if status == StatusCode::UNAUTHORIZED {
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
            }
            Refusal {
                response: Box::new(r),
                phase: Phase::Auth,
            }
        })?;
    Ok(Admission {
        route: req.uri().path().to_owned(),
        service,
        claims,
    })
}

fn http_error(status: StatusCode, body: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(format!("{body}\n")));
    *r.status_mut() = status;
    r
}

/// The one timer a client owns for its session: every bound (heartbeat,
/// write timeout, backpressure, close) re-arms it instead of creating another.
type Timer<'a> = Pin<&'a mut Sleep>;

/// Runs `fut` until `until` on the client's timer; `None` on timeout.
///
/// # Cancel safety
/// As cancel safe as `fut`.
async fn bounded<F: Future>(timer: &mut Timer<'_>, until: Instant, fut: F) -> Option<F::Output> {
    timer.as_mut().reset(until);
    tokio::select! {
        biased;
        out = fut => Some(out),
        () = timer.as_mut() => None,
    }
}

/// Binds the client to a link, opens it at the service, runs the session
/// loop and tells the service when it ends.
async fn run_session<S: ClientStream>(
    mut ws: S,
    id: ClientId,
    addr: SocketAddr,
    admission: Admission,
    pool: &ServicePool,
    shared: &Shared,
    settings: &Settings,
) -> CloseReason {
    let limits = &settings.limits;
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    let Some(link) = pool.pick() else {
        let reason = Box::pin(close(
            &mut ws,
            &mut timer,
            CloseReason::NoLink,
            limits.write_timeout,
        ))
        .await;
        return Box::pin(ended(ws, reason, shared)).await;
    };
    let handle = Arc::new(ClientHandle::new(
        id,
        link.id,
        limits.outbound_queue_messages,
        limits.slow_reader_policy,
    ));
    link.bind(&shared.clients, handle.clone());
    let in_session = InSession {
        shared,
        handle: &handle,
        link: &link,
    };
    if shared.lifecycle.is_draining() {
        handle.outbox.close(CloseReason::Shutdown);
    }
    let open = Frame::ClientOpen {
        client: id,
        route: admission.route,
        remote_addr: addr.to_string(),
        claims: admission.claims,
    };
    let until = Instant::now() + limits.link_backpressure_timeout;
    let opened = Box::pin(bounded(&mut timer, until, link.tx.send(open))).await;
    let reason = match opened {
        Some(Ok(())) => session(&mut ws, &mut timer, &handle, &link, shared, settings).await,
        Some(Err(_)) => {
            Box::pin(close(
                &mut ws,
                &mut timer,
                CloseReason::LinkLost,
                limits.write_timeout,
            ))
            .await
        }
        None => {
            let reason = CloseReason::LinkBackpressure;
            Box::pin(close(&mut ws, &mut timer, reason, limits.write_timeout)).await
        }
    };

    drop(in_session);
    if reason.tells_service() {
        let (code, text) = reason.for_service();
        let frame = Frame::ClientClose {
            client: id,
            code,
            reason: text.to_owned(),
        };
        // The service must learn of the close; wait for room, bounded.
        let until = Instant::now() + limits.link_backpressure_timeout;
        let _ = Box::pin(bounded(&mut timer, until, link.tx.send(frame))).await;
    }
    Box::pin(ended(ws, reason, shared)).await
}

/// Counts the session's end, then lets go of the connection with a
/// lingering close (the connection still counts until it is gone).
async fn ended<S: ClientStream>(mut ws: S, reason: CloseReason, shared: &Shared) -> CloseReason {
    debug!(reason = reason.label(), "client closed");
    shared.metrics.closed(S::PROTOCOL, &reason);
    if reason.lingers() {
        Box::pin(crate::linger::linger(ws.tls())).await;
    }
    reason
}

/// The session loop: forwards client messages to the link, writes queued
/// messages to the client, keeps the heartbeat, and carries out closes.
async fn session<S>(
    ws: &mut S,
    timer: &mut Timer<'_>,
    handle: &ClientHandle,
    link: &LinkHandle,
    shared: &Shared,
    settings: &Settings,
) -> CloseReason
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    let limits = &settings.limits;
    let hb = &settings.heartbeat;
    let mut last_seen = Instant::now();
    let mut ping_due = last_seen + hb.ping_interval;
    // A client message waiting for room in a full link queue, and until when.
    let mut pending: Option<(Frame, Instant)> = None;
    // Control frames (pings, pongs) since the last heartbeat tick.
    let mut controls: u16 = 0;

    loop {
        // A slow reader under the `close` policy is closed without writing
        // the backlog that overflowed.
        if handle.outbox.overflowed() {
            return Box::pin(slow_reader_close(ws, timer, shared)).await;
        }
        // Write what is queued (bounded), then carry out a requested close.
        if handle.outbox.has_queued() {
            timer.as_mut().reset(Instant::now() + limits.write_timeout);
            let written = tokio::select! {
                biased;
                r = write_queued(ws, handle, shared) => Some(r),
                () = overflowed(handle) => None,
                () = timer.as_mut() => return CloseReason::WriteTimeout,
            };
            match written {
                Some(Ok(())) => {}
                Some(Err(_)) => return CloseReason::ClientGone,
                None => return Box::pin(slow_reader_close(ws, timer, shared)).await,
            }
        }
        if let Some(reason) = handle.outbox.close_request() {
            if reason == CloseReason::Shutdown {
                shared.metrics.drain_closed.inc();
            }
            return Box::pin(close(ws, timer, reason, limits.write_timeout)).await;
        }

        // The timer's next job: the earliest of ping and backpressure deadline.
        let next = match &pending {
            Some((_, until)) => ping_due.min(*until),
            None => ping_due,
        };
        if timer.deadline() != next {
            timer.as_mut().reset(next);
        }

        tokio::select! {
            biased;
            () = handle.outbox.ready() => {}
            permit = link.tx.reserve(), if pending.is_some() => match permit {
                Ok(permit) => {
                    if let Some((frame, _)) = pending.take() {
                        permit.send(frame);
                    }
                }
                Err(_) => return Box::pin(close(ws, timer, CloseReason::LinkLost, limits.write_timeout)).await,
            },
            msg = ws.next(), if pending.is_none() => {
                last_seen = Instant::now();
                let msg = match msg {
                    None => return CloseReason::ClientGone,
                    Some(Ok(m)) => m,
                    Some(Err(e)) => return Box::pin(read_error(ws, timer, e, limits.write_timeout)).await,
                };
                let (kind, payload) = match msg {
                    Message::Text(t) => (Kind::Text, Bytes::from(t)),
                    Message::Binary(b) => (Kind::Binary, b),
                    Message::Close(frame) => {
                        let code = frame.map_or(1005, |f| u16::from(f.code));
                        // tungstenite queued the close reply; flush it, bounded.
                        let _ = Box::pin(bounded(timer, Instant::now() + CLOSE_TIMEOUT, ws.close())).await;
                        return CloseReason::Client { code };
                    }
                    // tungstenite answers pings itself; any frame counts as
                    // alive, within the control-frame budget.
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {
                        controls = controls.saturating_add(1);
                        if controls > CONTROL_FRAME_BUDGET {
                            return Box::pin(close(ws, timer, CloseReason::ControlFlood, limits.write_timeout)).await;
                        }
                        continue;
                    }
                };
                shared.metrics.messages_in.inc();
                shared.metrics.bytes_in.inc_by(payload.len() as u64);
                if payload.len() + CLIENT_MESSAGE_OVERHEAD > link.max_frame_bytes {
                    // Within max_message_bytes but over the service's frame
                    // cap: sent, it would make the service drop the link and
                    // every client on it.
                    return Box::pin(close(ws, timer, CloseReason::MessageTooBig, limits.write_timeout)).await;
                }
                let frame = Frame::ClientMessage { client: handle.id, kind, payload };
                match link.tx.try_send(frame) {
                    Ok(()) => {}
                    Err(TrySendError::Full(frame)) => {
                        // Stop reading this client until the link has room.
                        pending = Some((frame, Instant::now() + limits.link_backpressure_timeout));
                    }
                    Err(TrySendError::Closed(_)) => {
                        return Box::pin(close(ws, timer, CloseReason::LinkLost, limits.write_timeout)).await;
                    }
                }
            }
            () = timer.as_mut() => {
                let now = Instant::now();
                if pending.as_ref().is_some_and(|(_, until)| now >= *until) {
                    return Box::pin(close(ws, timer, CloseReason::LinkBackpressure, limits.write_timeout)).await;
                }
                if now >= ping_due {
                    controls = 0;
                    let idle = now.duration_since(last_seen);
                    if idle >= hb.ping_timeout {
                        return Box::pin(close(ws, timer, CloseReason::HeartbeatTimeout, limits.write_timeout)).await;
                    }
                    ping_due = if idle + PING_SLACK >= hb.ping_interval {
                        // Boxed: a ping is rare (one per interval) and its future is large.
                        match Box::pin(bounded(timer, now + limits.write_timeout, ws.send(Message::Ping(Bytes::new())))).await {
                            Some(Ok(())) => {}
                            Some(Err(_)) => return CloseReason::ClientGone,
                            None => return CloseReason::WriteTimeout,
                        }
                        // Ping again an interval from now, or give up at the timeout.
                        (now + hb.ping_interval).min(last_seen + hb.ping_timeout)
                    } else {
                        // Heard from the client recently: the next ping is due an
                        // interval after it last spoke.
                        last_seen + hb.ping_interval
                    };
                }
            }
        }
    }
}

/// Completes when the outbox overflowed under the `close` policy.
///
/// # Cancel safety
/// Cancel safe.
async fn overflowed(handle: &ClientHandle) {
    loop {
        if handle.outbox.overflowed() {
            return;
        }
        handle.outbox.ready().await;
    }
}

/// Counts a slow-reader close and tries (briefly) to tell the client.
async fn slow_reader_close<S>(ws: &mut S, timer: &mut Timer<'_>, shared: &Shared) -> CloseReason
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    shared
        .metrics
        .outbound_dropped
        .get_or_create(&[("policy", "close")])
        .inc();
    // The socket is likely full; the close frame gets a short chance only.
    close(
        ws,
        timer,
        CloseReason::SlowReader,
        SLOW_READER_CLOSE_TIMEOUT,
    )
    .await
}

/// Writes queued messages, flushing every [`WRITE_BATCH`] and at the end.
async fn write_queued<S>(ws: &mut S, handle: &ClientHandle, shared: &Shared) -> Result<(), WsError>
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    let mut n = 0usize;
    while let Some(msg) = handle.outbox.pop() {
        let len = match &msg {
            Message::Text(t) => t.len(),
            Message::Binary(b) => b.len(),
            _ => 0,
        };
        ws.feed(msg).await?;
        shared.metrics.messages_out.inc();
        shared.metrics.bytes_out.inc_by(len as u64);
        n += 1;
        if n.is_multiple_of(WRITE_BATCH) {
            ws.flush().await?;
        }
    }
    ws.flush().await
}

/// Maps a read error to a close code sent to the client and a reason.
async fn read_error<S>(
    ws: &mut S,
    timer: &mut Timer<'_>,
    e: WsError,
    write_timeout: Duration,
) -> CloseReason
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
            close(ws, timer, CloseReason::MessageTooBig, write_timeout).await
        }
        WsError::Utf8(_) => close(ws, timer, CloseReason::InvalidUtf8, write_timeout).await,
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => CloseReason::ClientGone,
        WsError::Protocol(_) | WsError::Capacity(_) => {
            close(ws, timer, CloseReason::ProtocolError, write_timeout).await
        }
        _ => CloseReason::ClientGone,
    }
}

/// Sends the close frame of `reason` (if it has one), bounded, and returns
/// `reason`; the socket is dropped after.
async fn close<S>(
    ws: &mut S,
    timer: &mut Timer<'_>,
    reason: CloseReason,
    write_timeout: Duration,
) -> CloseReason
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    if let Some((code, text)) = reason.frame() {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: text.to_owned().into(),
        };
        let until = Instant::now() + write_timeout.min(CLOSE_TIMEOUT);
        let _ = bounded(timer, until, ws.send(Message::Close(Some(frame)))).await;
    }
    reason
}
