//! Listeners: bind with an explicit backlog, and the accept loop.
//!
//! The accept loop only takes a handshake permit, accepts, checks the client
//! cap, gives the client an id and a span, and spawns its task. TLS and the
//! upgrade run in the client's own task, never here.
//!
//! Invariants:
//! - The permit is taken *before* `accept`: while every permit is in use,
//!   connections wait in the kernel's accept queue instead of piling up as
//!   half-done handshakes. This shapes reconnect storms; it does not cap
//!   clients.
//! - Beyond `max_clients` a connection is closed right after accept (no TLS
//!   work) and counted in `edgegate_clients_refused_total`.
//! - Accept errors never end the loop. EMFILE/ENFILE back off (the link
//!   crate's jittered `Backoff`, from [`ACCEPT_BACKOFF_MIN`] up to
//!   [`ACCEPT_BACKOFF_MAX`]) and are counted by kind.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edgegate_link::backoff::Backoff;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{warn, Instrument};

use crate::client::ListenerCtx;
use crate::metrics::AcceptError;
use crate::state::Refused;

/// First pause after an accept error that signals exhaustion.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause: short enough to notice freed descriptors within a second.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Binds `addr` and listens with `backlog` (Tokio's `TcpListener::bind`
/// hard-codes 1024). The kernel caps the backlog at `net.core.somaxconn`.
///
/// # Errors
/// The bind or listen error.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Sets the backlog of a socket that already listens (one inherited in a
/// handover), so a changed `backlog` applies without binding anew: on Linux
/// `listen(2)` on a listening socket only updates its accept-queue limit,
/// capped at `net.core.somaxconn` as at bind. The queue is the one socket
/// the predecessor shares, so the limit is the new one for both.
///
/// # Errors
/// The listen error.
pub fn set_backlog(listener: &TcpListener, backlog: u32) -> io::Result<()> {
    // The kernel caps any larger value at somaxconn anyway.
    let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
    socket2::SockRef::from(listener).listen(backlog)
}

/// Runs the accept loop until `stop` is cancelled.
///
/// # Cancel safety
/// Stopping through `stop` drops the listener; clients already spawned go on.
pub async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<ListenerCtx>,
    permits: Arc<Semaphore>,
    stop: CancellationToken,
) {
    let shared = ctx.shared.clone();
    let mut backoff = Backoff::new(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX, 0.5);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return, // semaphore closed: shutting down
            },
            () = stop.cancelled() => return,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = stop.cancelled() => return,
        };
        let (stream, addr) = match accepted {
            Ok(pair) => {
                backoff.reset();
                pair
            }
            Err(e) => {
                let kind = classify(&e);
                shared
                    .metrics
                    .accept_errors
                    .get_or_create(&[("kind", kind.as_str())])
                    .inc();
                if kind == AcceptError::Other {
                    // ECONNABORTED and friends concern one connection only.
                    continue;
                }
                let pause = backoff.next_delay();
                warn!(listener = %ctx.name, error = %e, backoff_ms = pause.as_millis() as u64, "accept failed; backing off");
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = stop.cancelled() => return,
                }
                continue;
            }
        };
        if let Err(refused) = shared.admission.try_take(addr.ip()) {
            match refused {
                Refused::MaxClients => shared.metrics.clients_refused.inc(),
                Refused::PerAddress => shared.metrics.clients_refused_per_address.inc(),
            };
            // Closed before any TLS work: the cheapest refusal there is.
            drop(stream);
            continue;
        }
        let id = shared.admission.next_client_id();
        let span = tracing::debug_span!("client", client.id = id, client.addr = %addr, listener = %ctx.name);
        tokio::spawn(crate::client::serve(stream, addr, id, ctx.clone(), permit).instrument(span));
    }
}

fn classify(e: &io::Error) -> AcceptError {
    match e.raw_os_error() {
        Some(libc_emfile)
            if libc_emfile == nix::libc::EMFILE || libc_emfile == nix::libc::ENFILE =>
        {
            AcceptError::Fds
        }
        Some(code) if code == nix::libc::ENOBUFS || code == nix::libc::ENOMEM => {
            AcceptError::Memory
        }
        _ => AcceptError::Other,
    }
}
