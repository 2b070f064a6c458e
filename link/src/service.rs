//! The service side of links: accept gateways, keep links healthy, turn
//! frames into [`Event`]s and queue the service's frames back.
//!
//! A backend written in Rust calls [`Service::start`] with its listener, reads
//! [`Event`]s from one channel (all links together) and answers with
//! [`Service::send`] and [`Service::publish`].
//!
//! # A link's stages
//!
//! 1. **accept**: the accept loop takes a link permit (`max_links`) and spawns
//!    the link task. Accept errors back off ([`Backoff`], 5 ms doubling to
//!    500 ms) and never end the loop.
//! 2. **hello**: the gateway's `Hello` must arrive within `ping_timeout`; a
//!    wrong version gets `Goaway` code 1, any other first frame `Goaway` code 2.
//!    The service answers with its own `Hello`, registers the link and emits
//!    [`Event::LinkUp`].
//! 3. **up**: a reader (the link task) and a writer (a second task) run until
//!    the link ends. The reader answers pings through the writer and turns
//!    client frames into events. The writer ([`crate::writer`], the same as
//!    on the gateway's end) sends queued frames and a `Ping`
//!    every `ping_interval`.
//! 4. **down**: the link is unregistered (sends to it fail from then on), a
//!    closing `Goaway` is written (after what is queued) when there is one
//!    to say, and
//!    [`Event::LinkDown`] is emitted exactly once.
//!
//! # Bounds
//!
//! - Events: one channel of `event_queue_events`. When the application is
//!   slow, link readers wait, TCP fills, and the gateway's own link queues
//!   push back on its clients.
//! - Frames to a gateway: `link_queue_frames` per link; [`Service::send`]
//!   waits for room.
//! - Liveness: a link on which nothing arrives for `ping_timeout` is dropped;
//!   a write that does not finish within `ping_timeout` drops the link too.
//! - Links: at most `max_links` at once; more connections are closed at accept.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::{sleep, timeout, Instant};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::backoff::Backoff;
use crate::goaway::{End, Goaway};
use crate::hello::{self, HelloError};
use crate::proto::{
    ClientId, CodecError, Frame, FrameCodec, Kind, MAX_FRAME_BYTES, MIN_FRAME_BYTES,
};
use crate::writer::{LinkWriter, Pongs, WriterConfig};

/// Id the service gives each accepted link, unique for the life of the [`Service`].
pub type LinkId = u64;

/// First pause after a failed `accept` (e.g. EMFILE) before trying again;
/// it doubles while accepts keep failing.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause: short enough to notice freed descriptors within a second.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// How a [`Service`] runs its links.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServiceConfig {
    /// Name sent in the service's `Hello`; gateways log it.
    pub name: String,
    /// Cap on the length field of frames the service reads, said in its
    /// `Hello` so gateways never send larger ones (a client message that
    /// would need more is refused for that client alone). What the service
    /// sends is checked against each gateway's own cap from its `Hello`.
    /// At least [`MIN_FRAME_BYTES`].
    pub max_frame_bytes: usize,
    /// How often the service pings each link, whatever the traffic.
    pub ping_interval: Duration,
    /// A link on which nothing arrives for this long is dropped; also the
    /// bound on the hello exchange and on any single write.
    pub ping_timeout: Duration,
    /// Frames queued per link before [`Service::send`] waits (at least 1).
    pub link_queue_frames: usize,
    /// Events queued before link readers wait for the application (at least 1).
    pub event_queue_events: usize,
    /// Most links at once (at least 1); further connections are closed at accept.
    pub max_links: usize,
}

impl ServiceConfig {
    /// A config named `name` with defaults sized for a handful of gateways:
    /// 16 MiB frames, ping every 10 s, drop after 30 s of silence, 1024 frames
    /// per link queue, 1024 queued events, 256 links.
    pub fn new(name: impl Into<String>) -> Self {
        ServiceConfig {
            name: name.into(),
            max_frame_bytes: MAX_FRAME_BYTES,
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(30),
            link_queue_frames: 1024,
            event_queue_events: 1024,
            max_links: 256,
        }
    }
}

/// What happened on the service's links, in order per link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A gateway finished the hello exchange; frames can be sent to `link`.
    LinkUp {
        /// The new link.
        link: LinkId,
        /// Name from the gateway's `Hello`; links with the same name belong to
        /// the same gateway.
        gateway: String,
    },
    /// The link has ended: treat it as a close of every client opened on it.
    /// Emitted exactly once per [`Event::LinkUp`].
    LinkDown {
        /// The link that ended.
        link: LinkId,
    },
    /// A client connected through the gateway.
    Open {
        /// The link the client is bound to for its whole life.
        link: LinkId,
        /// The client's id on that link.
        client: ClientId,
        /// The route the client came in on.
        route: String,
        /// The client's address as `ip:port`.
        remote_addr: String,
        /// Verified auth claims as JSON object bytes (`{}` without auth).
        claims: Bytes,
    },
    /// A client sent a message.
    Message {
        /// The client's link.
        link: LinkId,
        /// The client.
        client: ClientId,
        /// Text or binary.
        kind: Kind,
        /// The message.
        payload: Bytes,
    },
    /// A client has gone.
    Close {
        /// The client's link.
        link: LinkId,
        /// The client.
        client: ClientId,
        /// WebSocket close code.
        code: u16,
        /// WebSocket close reason.
        reason: String,
    },
}

/// Why a frame could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The link is not up (never was, or has ended).
    #[error("link {0} is down")]
    LinkDown(LinkId),
    /// Only gateway-bound client frames may be sent by a service; hello,
    /// ping, pong and goaway belong to the runner.
    #[error("a service may not send {0} frames")]
    NotAllowed(&'static str),
    /// The frame cannot be encoded within the configured limits.
    #[error("frame cannot be sent: {0}")]
    Codec(#[from] CodecError),
}

/// Handle to a running service; cheap to clone.
#[derive(Clone, Debug)]
pub struct Service {
    shared: Arc<Shared>,
}

/// State shared by the handle, the accept loop and the link tasks.
#[derive(Debug)]
struct Shared {
    /// Links that finished the hello exchange and have not ended.
    links: Mutex<HashMap<LinkId, UpLink>>,
    /// Source of link ids.
    next_link: AtomicU64,
    /// The listener's address, for callers that bound port 0.
    local_addr: SocketAddr,
}

impl Shared {
    fn links(&self) -> MutexGuard<'_, HashMap<LinkId, UpLink>> {
        // No code panics while holding the lock, so the map is consistent
        // even if the lock was poisoned.
        self.links.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One up link as seen by senders.
#[derive(Debug)]
struct UpLink {
    /// Name from the gateway's `Hello`.
    gateway: Arc<str>,
    /// The largest frame the gateway accepts, from its `Hello`.
    max_frame_bytes: usize,
    /// The link's bounded frame queue, drained by its writer.
    frames: mpsc::Sender<Frame>,
}

impl UpLink {
    /// Refuses a frame of `len` bytes above the gateway's cap.
    fn fits(&self, len: usize) -> Result<(), SendError> {
        if len > self.max_frame_bytes {
            return Err(CodecError::FrameTooLarge {
                len,
                max: self.max_frame_bytes,
            }
            .into());
        }
        Ok(())
    }
}

impl Service {
    /// Starts the accept loop on `listener`; returns a handle and the stream
    /// of events of all links.
    ///
    /// The event stream ends once `shutdown` is cancelled and every link has
    /// said `Goaway` and emitted its [`Event::LinkDown`]. Dropping the
    /// receiver ends every link.
    ///
    /// # Errors
    ///
    /// Fails when `max_frame_bytes` is below the protocol's minimum or the
    /// listener's local address cannot be read.
    ///
    /// # Panics
    ///
    /// Panics when called outside a Tokio runtime.
    pub fn start(
        listener: TcpListener,
        config: ServiceConfig,
        shutdown: CancellationToken,
    ) -> io::Result<(Service, mpsc::Receiver<Event>)> {
        if config.max_frame_bytes < MIN_FRAME_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "max_frame_bytes {} is below the link protocol's minimum {MIN_FRAME_BYTES}",
                    config.max_frame_bytes
                ),
            ));
        }
        let local_addr = listener.local_addr()?;
        let (events_tx, events_rx) = mpsc::channel(config.event_queue_events.max(1));
        let shared = Arc::new(Shared {
            links: Mutex::new(HashMap::new()),
            next_link: AtomicU64::new(1),
            local_addr,
        });
        let permits = Arc::new(Semaphore::new(config.max_links.max(1)));
        let ctx = LinkCtx {
            shared: Arc::clone(&shared),
            config: Arc::new(config),
            events: events_tx,
            shutdown,
        };
        tokio::spawn(
            accept_loop(listener, ctx, permits)
                .instrument(tracing::info_span!("service", service.addr = %local_addr)),
        );
        Ok((Service { shared }, events_rx))
    }

    /// Queues `frame` on `link`, waiting while the link's queue is full.
    ///
    /// Allowed frames: `ClientMessage`, `ClientClose`, `Subscribe`,
    /// `Unsubscribe`, `Publish`.
    ///
    /// # Errors
    ///
    /// [`SendError::LinkDown`] when the link is not up,
    /// [`SendError::NotAllowed`] for frames the runner owns, and
    /// [`SendError::Codec`] when the frame exceeds the gateway's cap (from
    /// its `Hello`) or a string exceeds 65535 bytes.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if cancelled, the frame was not queued.
    pub async fn send(&self, link: LinkId, frame: Frame) -> Result<(), SendError> {
        let len = Self::check(&frame)?;
        let queue = {
            let links = self.shared.links();
            let up = links.get(&link).ok_or(SendError::LinkDown(link))?;
            up.fits(len)?;
            up.frames.clone()
        };
        queue
            .send(frame)
            .await
            .map_err(|_| SendError::LinkDown(link))
    }

    /// Publishes to `topic` on every gateway: one `Publish` per distinct
    /// gateway name, on that gateway's up link with the lowest id, so a fleet
    /// of gateways each fans out once and publishes stay in order while that
    /// link lives.
    ///
    /// Publishing with no link up succeeds: there is no subscriber anywhere.
    ///
    /// # Errors
    ///
    /// [`SendError::Codec`] when the frame cannot be encoded, before anything
    /// is queued, or when it exceeds a gateway's cap (that gateway is
    /// skipped). [`SendError::LinkDown`] naming the first link that ended
    /// before its frame was queued. Either way the other gateways still got
    /// theirs.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: if cancelled, some gateways may have the frame and
    /// others not.
    pub async fn publish(&self, topic: &str, kind: Kind, payload: Bytes) -> Result<(), SendError> {
        let frame = Frame::Publish {
            topic: topic.to_owned(),
            kind,
            payload,
        };
        let len = Self::check(&frame)?;
        let mut first_failure = None;
        let targets: Vec<(LinkId, mpsc::Sender<Frame>)> = {
            let links = self.shared.links();
            let mut per_gateway: BTreeMap<&str, (LinkId, &UpLink)> = BTreeMap::new();
            for (id, up) in links.iter() {
                let lowest = per_gateway.entry(&up.gateway).or_insert((*id, up));
                if *id < lowest.0 {
                    *lowest = (*id, up);
                }
            }
            per_gateway
                .into_values()
                .filter_map(|(id, up)| match up.fits(len) {
                    Ok(()) => Some((id, up.frames.clone())),
                    Err(error) => {
                        debug!(link.id = id, %error, "publish skipped a gateway whose frame cap is smaller");
                        first_failure.get_or_insert(error);
                        None
                    }
                })
                .collect()
        };
        for (link, queue) in targets {
            if queue.send(frame.clone()).await.is_err() {
                debug!(link.id = link, "publish skipped a link that went down");
                first_failure.get_or_insert(SendError::LinkDown(link));
            }
        }
        match first_failure {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// The address the service listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// Refuses frames the runner owns and frames that cannot be encoded;
    /// returns the frame's length field.
    fn check(frame: &Frame) -> Result<usize, SendError> {
        match frame {
            Frame::ClientMessage { .. }
            | Frame::ClientClose { .. }
            | Frame::Subscribe { .. }
            | Frame::Unsubscribe { .. }
            | Frame::Publish { .. } => {}
            _ => return Err(SendError::NotAllowed(frame.type_name())),
        }
        Ok(frame.wire_len()?)
    }
}

/// What every link task needs; cloned per link.
#[derive(Clone)]
struct LinkCtx {
    shared: Arc<Shared>,
    config: Arc<ServiceConfig>,
    /// Held by the accept loop and every link task, so the receiver ends when
    /// all of them have.
    events: mpsc::Sender<Event>,
    shutdown: CancellationToken,
}

async fn accept_loop(listener: TcpListener, ctx: LinkCtx, permits: Arc<Semaphore>) {
    info!(service.name = %ctx.config.name, "service listening for links");
    let mut backoff = Backoff::new(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX, 0.5);
    loop {
        let accepted = tokio::select! {
            biased;
            () = ctx.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff.reset();
                accepted
            }
            Err(error) => {
                let pause = backoff.next_delay();
                warn!(%error, backoff_ms = pause.as_millis() as u64, "link accept failed; retrying");
                tokio::select! {
                    () = ctx.shutdown.cancelled() => break,
                    () = sleep(pause) => continue,
                }
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            warn!(%peer, max_links = ctx.config.max_links, "link refused: at max_links");
            continue;
        };
        if let Err(error) = stream.set_nodelay(true) {
            debug!(%peer, %error, "could not set nodelay on link");
        }
        let id = ctx.shared.next_link.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!(
            "link",
            link.id = id,
            link.peer = %peer,
            link.gateway = tracing::field::Empty
        );
        tokio::spawn(run_link(ctx.clone(), id, stream, permit).instrument(span));
    }
    info!("service stopped accepting links");
}

/// Why a link ended; decides the closing `Goaway` and the log line.
#[derive(Debug)]
enum LinkEnd {
    /// The service's shutdown token was cancelled.
    Shutdown,
    /// The application dropped the event receiver.
    EventsClosed,
    /// The gateway said goodbye.
    PeerGoaway { code: u16, reason: String },
    /// The gateway closed the connection.
    PeerClosed,
    /// Nothing arrived within `ping_timeout`.
    Timeout,
    /// The `Hello` exchange failed.
    Hello(HelloError),
    /// The gateway sent a frame it may not send at this point.
    Protocol(String),
    /// Reading failed.
    Read(CodecError),
    /// Writing failed or timed out.
    Write(String),
}

impl LinkEnd {
    /// The `Goaway` to send before closing, if there is anyone to tell.
    fn goaway(&self) -> Option<Frame> {
        let goaway = match self {
            LinkEnd::Shutdown => Goaway::ShuttingDown(End::Service),
            LinkEnd::EventsClosed => Goaway::ServiceStopped,
            LinkEnd::Hello(error) => return error.goaway(),
            LinkEnd::Protocol(reason) => Goaway::ProtocolError(reason.clone()),
            LinkEnd::Read(CodecError::Io(_)) => return None,
            LinkEnd::Read(error) => Goaway::ProtocolError(error.to_string()),
            LinkEnd::PeerGoaway { .. }
            | LinkEnd::PeerClosed
            | LinkEnd::Timeout
            | LinkEnd::Write(_) => return None,
        };
        Some(goaway.frame())
    }

    fn log(&self) {
        match self {
            LinkEnd::Shutdown | LinkEnd::EventsClosed | LinkEnd::PeerClosed => {
                info!(reason = ?self, "link down");
            }
            LinkEnd::PeerGoaway { code, reason } => {
                info!(goaway.code = code, goaway.reason = %reason, "link down: gateway said goaway");
            }
            LinkEnd::Timeout => warn!("link down: nothing received within ping_timeout"),
            LinkEnd::Hello(error) => warn!(%error, "link refused: hello failed"),
            LinkEnd::Protocol(reason) => warn!(%reason, "link down: protocol error"),
            LinkEnd::Read(error) => warn!(%error, "link down: read failed"),
            LinkEnd::Write(error) => warn!(%error, "link down: write failed"),
        }
    }
}

type LinkReader = FramedRead<OwnedReadHalf, FrameCodec>;
type LinkSink = FramedWrite<OwnedWriteHalf, FrameCodec>;

/// One link's whole life: hello, up, down. Holds its permit until the end.
async fn run_link(ctx: LinkCtx, id: LinkId, stream: TcpStream, _permit: OwnedSemaphorePermit) {
    let (read_half, write_half) = stream.into_split();
    let max = ctx.config.max_frame_bytes;
    let mut reader = FramedRead::new(read_half, FrameCodec::new(max));
    let mut writer = FramedWrite::new(write_half, FrameCodec::new(max));
    let write_timeout = ctx.config.ping_timeout;

    let (gateway, gateway_max_frame) = match hello(&ctx, &mut reader, &mut writer).await {
        Ok(up) => up,
        Err(end) => {
            end.log();
            if let Some(goaway) = end.goaway() {
                let _ = timeout(write_timeout, writer.send(goaway)).await;
            }
            return;
        }
    };
    tracing::Span::current().record("link.gateway", gateway.as_str());
    info!("link up");

    let (frames_tx, frames_rx) = mpsc::channel(ctx.config.link_queue_frames.max(1));
    let (mut writer, pongs) = LinkWriter::spawn(
        writer,
        frames_rx,
        WriterConfig {
            ping_interval: ctx.config.ping_interval,
            write_timeout,
        },
        |_| {},
    );
    ctx.shared.links().insert(
        id,
        UpLink {
            gateway: Arc::from(gateway.as_str()),
            max_frame_bytes: gateway_max_frame,
            frames: frames_tx.clone(),
        },
    );

    let (announced, end) = match emit(&ctx, Event::LinkUp { link: id, gateway }).await {
        Err(end) => (false, end),
        Ok(()) => (
            true,
            read_loop(&ctx, id, &mut reader, &pongs, &mut writer).await,
        ),
    };

    // Down: no new sends, then the goodbye, then the event.
    ctx.shared.links().remove(&id);
    end.log();
    if !matches!(end, LinkEnd::Write(_)) {
        // What is queued, then the goaway, each bounded by the writer.
        writer.stop(end.goaway(), write_timeout).await;
    }
    drop(frames_tx);
    if announced {
        // The application may have dropped the receiver; then nobody is listening.
        let _ = ctx.events.send(Event::LinkDown { link: id }).await;
    }
}

/// Waits for the gateway's `Hello` and answers it (the link crate's
/// [`hello::answer`], bounded by `ping_timeout`). Returns the gateway's name
/// and frame cap; from here the writer sends no frame above that cap.
async fn hello(
    ctx: &LinkCtx,
    reader: &mut LinkReader,
    writer: &mut LinkSink,
) -> Result<(String, usize), LinkEnd> {
    let exchange = hello::answer(
        reader,
        writer,
        &ctx.config.name,
        ctx.config.max_frame_bytes,
        ctx.config.ping_timeout,
    );
    tokio::select! {
        biased;
        () = ctx.shutdown.cancelled() => Err(LinkEnd::Shutdown),
        peer = exchange => peer
            .map(|p| (p.name, p.max_frame_bytes))
            .map_err(LinkEnd::Hello),
    }
}

/// Hands an event to the application, unless shutdown comes first.
async fn emit(ctx: &LinkCtx, event: Event) -> Result<(), LinkEnd> {
    tokio::select! {
        biased;
        () = ctx.shutdown.cancelled() => Err(LinkEnd::Shutdown),
        sent = ctx.events.send(event) => sent.map_err(|_| LinkEnd::EventsClosed),
    }
}

/// Reads frames until the link ends. Every branch of the `select!` is cancel
/// safe: `FramedRead` keeps partial frames in its buffer.
async fn read_loop(
    ctx: &LinkCtx,
    id: LinkId,
    reader: &mut LinkReader,
    pongs: &Pongs,
    writer: &mut LinkWriter,
) -> LinkEnd {
    let silence = ctx.config.ping_timeout;
    let deadline = tokio::time::sleep(silence);
    tokio::pin!(deadline);
    loop {
        let next = tokio::select! {
            biased;
            () = ctx.shutdown.cancelled() => return LinkEnd::Shutdown,
            written = writer.ended() => {
                return LinkEnd::Write(match written {
                    Ok(()) => "writer stopped".to_owned(),
                    Err(error) => error.to_string(),
                });
            }
            () = &mut deadline => return LinkEnd::Timeout,
            next = reader.next() => next,
        };
        let frame = match next {
            None => return LinkEnd::PeerClosed,
            Some(Err(error)) => return LinkEnd::Read(error),
            Some(Ok(frame)) => frame,
        };
        let event = match frame {
            Frame::Ping { nonce } => {
                // Latest nonce wins: the writer answers the newest ping.
                pongs.answer(nonce);
                None
            }
            Frame::Pong { .. } => None,
            Frame::Goaway { code, reason } => return LinkEnd::PeerGoaway { code, reason },
            Frame::ClientOpen {
                client,
                route,
                remote_addr,
                claims,
            } => {
                debug!(client.id = client, %route, %remote_addr, "client open");
                Some(Event::Open {
                    link: id,
                    client,
                    route,
                    remote_addr,
                    claims,
                })
            }
            Frame::ClientMessage {
                client,
                kind,
                payload,
            } => Some(Event::Message {
                link: id,
                client,
                kind,
                payload,
            }),
            Frame::ClientClose {
                client,
                code,
                reason,
            } => {
                debug!(client.id = client, code, %reason, "client close");
                Some(Event::Close {
                    link: id,
                    client,
                    code,
                    reason,
                })
            }
            other @ (Frame::Hello { .. }
            | Frame::Subscribe { .. }
            | Frame::Unsubscribe { .. }
            | Frame::Publish { .. }) => {
                return LinkEnd::Protocol(format!(
                    "a gateway may not send {} frames on an up link",
                    other.type_name()
                ));
            }
        };
        if let Some(event) = event {
            if let Err(end) = emit(ctx, event).await {
                return end;
            }
        }
        // Time spent waiting for the application does not count as the
        // gateway's silence.
        deadline.as_mut().reset(Instant::now() + silence);
    }
}
