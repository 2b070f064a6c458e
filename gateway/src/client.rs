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

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edgegate_link::proto::{ClientId, Frame, Kind};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::debug;

use crate::auth::AuthError;
use crate::gateway::{Settings, Shared};
use crate::link::{LinkHandle, ServicePool};
use crate::listener::ListenerCtx;
use crate::metrics::Phase;
use crate::outbox::ClientHandle;

/// Who or what ended a client session. A log field and the `reason` label
/// of `edgegate_clients_closed_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent a close frame with this code.
    Client { code: u16 },
    /// The client's connection ended without a close frame (EOF, reset).
    ClientGone,
    /// The service asked to close the client with this code.
    Service { code: u16 },
    /// The gateway is draining (close 1001).
    Shutdown,
    /// Nothing (not even a pong) arrived within the heartbeat timeout.
    HeartbeatTimeout,
    /// A write did not complete within the write timeout.
    WriteTimeout,
    /// The outbound queue overflowed under the `close` policy (close 1008).
    SlowReader,
    /// A message above `max_message_bytes` (close 1009).
    MessageTooBig,
    /// A protocol violation or invalid UTF-8 (close 1002 / 1007).
    ProtocolError,
    /// The client's link stayed full past the backpressure timeout (close 1013).
    LinkBackpressure,
    /// The client's link dropped (close 1012).
    LinkLost,
    /// The service had no link up when the client arrived (close 1013).
    NoLink,
}

impl CloseReason {
    /// Every label value, so the series exist from start-up.
    pub const LABELS: [&'static str; 12] = [
        "client",
        "client_gone",
        "service",
        "shutdown",
        "heartbeat_timeout",
        "write_timeout",
        "slow_reader",
        "message_too_big",
        "protocol_error",
        "link_backpressure",
        "link_lost",
        "no_link",
    ];

    pub fn label(&self) -> &'static str {
        match self {
            CloseReason::Client { .. } => "client",
            CloseReason::ClientGone => "client_gone",
            CloseReason::Service { .. } => "service",
            CloseReason::Shutdown => "shutdown",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::SlowReader => "slow_reader",
            CloseReason::MessageTooBig => "message_too_big",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::LinkBackpressure => "link_backpressure",
            CloseReason::LinkLost => "link_lost",
            CloseReason::NoLink => "no_link",
        }
    }
}

/// Close code sent when the heartbeat times out (4000 + HTTP 408).
pub const HEARTBEAT_TIMEOUT_CODE: u16 = 4408;
/// Bound on the close handshake once a close frame is sent.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A ping due within this much is sent now rather than after another timer.
const PING_SLACK: Duration = Duration::from_millis(10);
/// Messages written between two flushes when a burst is queued.
const WRITE_BATCH: usize = 64;

/// What the upgrade decided about a client.
#[derive(Debug)]
struct Admission {
    route: String,
    service: usize,
    claims: Bytes,
}

/// Runs one client from accepted socket to close. Spawned by the accept loop
/// with a handshake permit, which is released when the upgrade completes.
pub async fn serve(stream: TcpStream, addr: SocketAddr, id: ClientId, ctx: Arc<ListenerCtx>, permit: OwnedSemaphorePermit) {
    let shared = &ctx.shared;
    let settings = shared.settings();
    let started = Instant::now();
    let _ = stream.set_nodelay(true);

    let tls = match Box::pin(timeout(settings.limits.handshake_timeout, ctx.tls.get().accept(stream))).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(error = %e, "tls handshake failed");
            shared.metrics.handshake_failed(Phase::Tls);
            shared.release_connection();
            return;
        }
        Err(_) => {
            debug!("tls handshake timed out");
            shared.metrics.handshake_failed(Phase::Tls);
            shared.release_connection();
            return;
        }
    };

    let mut admission = None;
    let mut auth_error = None;
    let upgrade = {
        let callback = |req: &Request, resp: Response| admit(req, resp, &ctx, &settings, &mut admission, &mut auth_error);
        Box::pin(timeout(
            settings.limits.upgrade_timeout,
            tokio_tungstenite::accept_hdr_async_with_config(tls, callback, Some(settings.ws_config)),
        ))
        .await
    };
    let ws = match upgrade {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            let phase = if auth_error.is_some() { Phase::Auth } else { Phase::Upgrade };
            debug!(error = %e, phase = phase.as_str(), "upgrade refused");
            shared.metrics.handshake_failed(phase);
            shared.release_connection();
            return;
        }
        Err(_) => {
            debug!("upgrade timed out");
            shared.metrics.handshake_failed(Phase::Upgrade);
            shared.release_connection();
            return;
        }
    };
    drop(permit);
    let Some(admission) = admission else {
        // The callback runs before a successful upgrade completes.
        shared.release_connection();
        return;
    };
    shared.metrics.handshake_duration.observe(started.elapsed().as_secs_f64());
    let protocol = ctx.protocol.as_str();
    shared.metrics.clients_accepted.get_or_create(&[("protocol", protocol)]).inc();
    shared.metrics.clients.get_or_create(&[("protocol", protocol)]).inc();

    let pool = ctx.services[admission.service].clone();
    let reason = run_session(ws, id, addr, admission, &pool, shared, &settings).await;
    debug!(reason = reason.label(), "client closed");
    shared.metrics.closed(ctx.protocol, &reason);
    shared.release_connection();
}

/// The upgrade callback: route, origin, token. Runs inside tungstenite's
/// handshake, before the 101 is sent.
fn admit(
    req: &Request,
    resp: Response,
    ctx: &ListenerCtx,
    settings: &Settings,
    admission: &mut Option<Admission>,
    auth_error: &mut Option<AuthError>,
) -> Result<Response, ErrorResponse> {
    let path = req.uri().path();
    let Some(&service) = ctx.routes.get(path) else {
        return Err(http_error(StatusCode::NOT_FOUND, "no route for this path"));
    };
    let header_str = |name: header::HeaderName| req.headers().get(name).and_then(|v| v.to_str().ok());
    let checked = settings
        .auth
        .check_origin(header_str(header::ORIGIN))
        .and_then(|()| settings.auth.verify(header_str(header::AUTHORIZATION), req.uri().query()));
    match checked {
        Ok(claims) => {
            *admission = Some(Admission {
                route: path.to_owned(),
                service,
                claims,
            });
            Ok(resp)
        }
        Err(e) => {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
            let mut r = http_error(status, &e.to_string());
            if status == StatusCode::UNAUTHORIZED {
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            }
            *auth_error = Some(e);
            Err(r)
        }
    }
}

fn http_error(status: StatusCode, body: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(format!("{body}\n")));
    *r.status_mut() = status;
    r
}

/// Binds the client to a link, opens it at the service, runs the session
/// loop and tells the service when it ends.
async fn run_session<S>(
    mut ws: S,
    id: ClientId,
    addr: SocketAddr,
    admission: Admission,
    pool: &ServicePool,
    shared: &Shared,
    settings: &Settings,
) -> CloseReason
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    let Some(link) = pool.pick(id) else {
        close(&mut ws, 1013, "service unavailable", settings.limits.write_timeout).await;
        return CloseReason::NoLink;
    };
    let handle = Arc::new(ClientHandle::new(
        id,
        settings.limits.outbound_queue_messages,
        settings.limits.slow_reader_policy,
    ));
    shared.clients.insert(handle.clone());
    link.bind(id);
    if shared.is_draining() {
        handle.outbox.close(CloseReason::Shutdown, 1001, "gateway draining");
    }
    let open = Frame::ClientOpen {
        client: id,
        route: admission.route,
        remote_addr: addr.to_string(),
        claims: admission.claims,
    };
    let reason = match timeout(settings.limits.link_backpressure_timeout, link.tx.send(open)).await {
        Ok(Ok(())) => session(&mut ws, &handle, &link, shared, settings).await,
        Ok(Err(_)) => {
            close(&mut ws, 1012, "service link lost", settings.limits.write_timeout).await;
            CloseReason::LinkLost
        }
        Err(_) => {
            close(&mut ws, 1013, "service busy", settings.limits.write_timeout).await;
            CloseReason::LinkBackpressure
        }
    };

    shared.clients.remove(id);
    shared.topics.remove_client(&handle, &shared.metrics);
    link.unbind(id);
    if !matches!(reason, CloseReason::LinkLost) {
        let (code, text) = match &reason {
            CloseReason::Client { code } => (*code, "client closed"),
            CloseReason::Service { code } => (*code, "service closed"),
            other => (1006, other.label()),
        };
        let frame = Frame::ClientClose {
            client: id,
            code,
            reason: text.to_owned(),
        };
        // The service must learn of the close; wait for room, bounded.
        let _ = timeout(settings.limits.link_backpressure_timeout, link.tx.send(frame)).await;
    }
    reason
}

/// The session loop: forwards client messages to the link, writes queued
/// messages to the client, keeps the heartbeat, and carries out closes.
async fn session<S>(ws: &mut S, handle: &ClientHandle, link: &LinkHandle, shared: &Shared, settings: &Settings) -> CloseReason
where
    S: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin,
{
    let limits = &settings.limits;
    let hb = &settings.heartbeat;
    let mut last_seen = Instant::now();
    let mut ping_due = last_seen + hb.ping_interval;
    // A client message waiting for room in a full link queue, and until when.
    let mut pending: Option<(Frame, Instant)> = None;
    // The one timer of this client: the earliest of ping, heartbeat timeout
    // and backpressure deadline.
    let deadline = tokio::time::sleep_until(ping_due);
    tokio::pin!(deadline);

    loop {
        // A slow reader under the `close` policy is closed without writing
        // the backlog that overflowed.
        if handle.outbox.close_request().is_some_and(|r| r.reason == CloseReason::SlowReader) {
            return slow_reader_close(ws, shared, limits.write_timeout).await;
        }
        // Write what is queued (bounded), then carry out a requested close.
        if handle.outbox.has_queued() {
            let written = tokio::select! {
                r = timeout(limits.write_timeout, write_queued(ws, handle, shared)) => Some(r),
                () = overflowed(handle) => None,
            };
            match written {
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(_))) => return CloseReason::ClientGone,
                Some(Err(_)) => return CloseReason::WriteTimeout,
                None => return slow_reader_close(ws, shared, limits.write_timeout).await,
            }
        }
        if let Some(req) = handle.outbox.close_request() {
            if req.reason == CloseReason::Shutdown {
                shared.metrics.drain_closed.inc();
            }
            close(ws, req.code, &req.text, limits.write_timeout).await;
            return req.reason;
        }

        let next = match &pending {
            Some((_, until)) => ping_due.min(*until),
            None => ping_due,
        };
        if deadline.deadline() != next {
            deadline.as_mut().reset(next);
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
                Err(_) => {
                    close(ws, 1012, "service link lost", limits.write_timeout).await;
                    return CloseReason::LinkLost;
                }
            },
            msg = ws.next(), if pending.is_none() => {
                last_seen = Instant::now();
                let msg = match msg {
                    None => return CloseReason::ClientGone,
                    Some(Ok(m)) => m,
                    Some(Err(e)) => return read_error(ws, e, limits.write_timeout).await,
                };
                let (kind, payload) = match msg {
                    Message::Text(t) => (Kind::Text, Bytes::from(t)),
                    Message::Binary(b) => (Kind::Binary, b),
                    Message::Close(frame) => {
                        let code = frame.map_or(1005, |f| u16::from(f.code));
                        // tungstenite queued the close reply; flush it, bounded.
                        let _ = timeout(CLOSE_TIMEOUT, ws.close()).await;
                        return CloseReason::Client { code };
                    }
                    // tungstenite answers pings itself; any frame counts as alive.
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                };
                shared.metrics.messages_in.inc();
                shared.metrics.bytes_in.inc_by(payload.len() as u64);
                let frame = Frame::ClientMessage { client: handle.id, kind, payload };
                match link.tx.try_send(frame) {
                    Ok(()) => {}
                    Err(tokio::sync::mpsc::error::TrySendError::Full(frame)) => {
                        // Stop reading this client until the link has room.
                        pending = Some((frame, Instant::now() + limits.link_backpressure_timeout));
                    }
                    Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                        close(ws, 1012, "service link lost", limits.write_timeout).await;
                        return CloseReason::LinkLost;
                    }
                }
            }
            () = &mut deadline => {
                let now = Instant::now();
                if pending.as_ref().is_some_and(|(_, until)| now >= *until) {
                    close(ws, 1013, "service busy", limits.write_timeout).await;
                    return CloseReason::LinkBackpressure;
                }
                if now >= ping_due {
                    let idle = now.duration_since(last_seen);
                    if idle >= hb.ping_timeout {
                        close(ws, HEARTBEAT_TIMEOUT_CODE, "heartbeat timeout", limits.write_timeout).await;
                        return CloseReason::HeartbeatTimeout;
                    }
                    ping_due = if idle + PING_SLACK >= hb.ping_interval {
                        match timeout(limits.write_timeout, ws.send(Message::Ping(Bytes::new()))).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => return CloseReason::ClientGone,
                            Err(_) => return CloseReason::WriteTimeout,
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
        if handle
            .outbox
            .close_request()
            .is_some_and(|r| r.reason == CloseReason::SlowReader)
        {
            return;
        }
        handle.outbox.ready().await;
    }
}

/// Counts a slow-reader close and tries (bounded) to tell the client.
async fn slow_reader_close<S>(ws: &mut S, shared: &Shared, write_timeout: Duration) -> CloseReason
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    shared
        .metrics
        .outbound_dropped
        .get_or_create(&[("policy", "close")])
        .inc();
    // The socket is likely full; the close frame gets a short chance only.
    close(ws, 1008, "slow reader: outbound queue full", write_timeout.min(Duration::from_millis(100))).await;
    CloseReason::SlowReader
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
        if n % WRITE_BATCH == 0 {
            ws.flush().await?;
        }
    }
    ws.flush().await
}

/// Maps a read error to a close code sent to the client and a reason.
async fn read_error<S>(ws: &mut S, e: WsError, write_timeout: Duration) -> CloseReason
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
            close(ws, 1009, "message too big", write_timeout).await;
            CloseReason::MessageTooBig
        }
        WsError::Utf8(_) => {
            close(ws, 1007, "invalid utf-8", write_timeout).await;
            CloseReason::ProtocolError
        }
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => CloseReason::ClientGone,
        WsError::Protocol(_) | WsError::Capacity(_) => {
            close(ws, 1002, "protocol error", write_timeout).await;
            CloseReason::ProtocolError
        }
        _ => CloseReason::ClientGone,
    }
}

/// Sends a close frame, bounded; the socket is dropped after.
async fn close<S>(ws: &mut S, code: u16, reason: &str, write_timeout: Duration)
where
    S: Sink<Message, Error = WsError> + Unpin,
{
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_owned().into(),
    };
    let _ = timeout(write_timeout.min(CLOSE_TIMEOUT), ws.send(Message::Close(Some(frame)))).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reason_labels_are_listed() {
        let all = [
            CloseReason::Client { code: 1000 },
            CloseReason::ClientGone,
            CloseReason::Service { code: 4000 },
            CloseReason::Shutdown,
            CloseReason::HeartbeatTimeout,
            CloseReason::WriteTimeout,
            CloseReason::SlowReader,
            CloseReason::MessageTooBig,
            CloseReason::ProtocolError,
            CloseReason::LinkBackpressure,
            CloseReason::LinkLost,
            CloseReason::NoLink,
        ];
        for r in all {
            assert!(CloseReason::LABELS.contains(&r.label()), "{r:?}");
        }
    }
}
