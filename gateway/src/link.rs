//! Links: persistent connections from EdgeGate to services. A service's
//! pool keeps `links` links to each of its instances (one instance per
//! configured address), so every gateway is linked to every instance and a
//! publish from any instance reaches this gateway's subscribers.
//!
//! A slot dials its one instance, exchanges Hello, then runs two halves: the
//! link crate's writer (`edgegate_link::writer`, the same on the service's
//! end) that drains the slot's bounded queue into the socket, pings, and
//! bounds every write, and a reader (the slot task itself) that dispatches
//! service frames to clients and topics. When a link drops, the slot redials the same instance with
//! jittered exponential backoff; an instance that never answers holds up only
//! its own slots.
//!
//! Policy (documented in docs/link-protocol.md and docs/config.md):
//! - A client is bound at open to the up link with the fewest clients, over
//!   all instances, and stays on it, so its messages stay in order.
//! - A full link queue pauses the clients that write to it (they stop reading
//!   their socket, so TCP pushes back); a client still blocked after
//!   `link_backpressure_timeout_secs` is closed with 1013.
//! - When a link drops, every client bound to it is closed with 1012 (service
//!   restart): frames in flight may be lost and the service has lost its state
//!   for them, so the client must reconnect and open again. Clients of other
//!   links and other instances are untouched.
//! - While a service has no link up, new clients are closed with 1013 right
//!   after the upgrade.
//! - A link that sends nothing (not even a pong) for `ping_timeout_secs` is
//!   torn down and redialled; so is a link whose write does not finish
//!   within `ping_timeout_secs` (the service stopped reading), even while
//!   the service still pings.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use edgegate_link::backoff::Backoff;
use edgegate_link::hello::{self, HelloError};
use edgegate_link::proto::{
    frame_cap_for_messages, ClientId, Frame, FrameCodec, Kind, CLIENT_MESSAGE_OVERHEAD,
};
use edgegate_link::writer::{LinkWriter, Pongs, WriterConfig};
use futures_util::{SinkExt, StreamExt};
use parking_lot::RwLock;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::Utf8Bytes;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::close::CloseReason;
use crate::config::ServiceConfig;
use crate::metrics::Metrics;
use crate::outbox::ClientHandle;
use crate::registry::ClientRegistry;
use crate::state::Settings;
use crate::topics::Topics;

/// What the links need of the gateway and nothing more: the client registry
/// (to deliver to and close the clients bound to a link), the topics
/// (subscribe, publish), the metrics, and the live settings (the message cap
/// a link says in its `Hello`, read at each dial so a reload applies).
#[derive(Debug, Clone)]
pub struct LinkContext {
    pub clients: Arc<ClientRegistry>,
    pub topics: Arc<Topics>,
    pub metrics: Arc<Metrics>,
    pub settings: Arc<ArcSwap<Settings>>,
}

/// Link ids are unique in the process, for logs.
static NEXT_LINK_ID: AtomicU64 = AtomicU64::new(1);

/// One live link: what clients bound to it hold.
#[derive(Debug)]
pub struct LinkHandle {
    pub id: u64,
    pub service: Arc<str>,
    /// The link's bounded queue towards the service.
    pub tx: mpsc::Sender<Frame>,
    /// The largest frame the service accepts (from its `Hello`): a client
    /// frame above it is refused for that client, never sent, because the
    /// service would drop the whole link on it.
    pub max_frame_bytes: usize,
    /// Clients bound to this link now: its load, for [`ServicePool::pick`].
    /// Which clients they are is kept once, in each `ClientHandle::link_id`.
    bound: AtomicUsize,
}

impl LinkHandle {
    /// Counts a client bound to this link (its `ClientHandle::link_id`).
    pub fn bind(&self) {
        self.bound.fetch_add(1, Ordering::Relaxed);
    }

    /// Forgets a client counted by [`LinkHandle::bind`].
    pub fn unbind(&self) {
        self.bound.fetch_sub(1, Ordering::Relaxed);
    }

    /// Clients bound to this link now.
    fn load(&self) -> usize {
        self.bound.load(Ordering::Relaxed)
    }
}

/// One slot of a pool: the link it holds while up.
type Slot = RwLock<Option<Arc<LinkHandle>>>;

/// One instance of a service (one configured address) and its slots.
#[derive(Debug)]
struct Instance {
    addr: Arc<str>,
    slots: Box<[Slot]>,
}

impl Instance {
    fn is_linked(&self) -> bool {
        self.slots.iter().any(|s| s.read().is_some())
    }
}

/// The links of one service: `links` slots for each of its instances.
#[derive(Debug)]
pub struct ServicePool {
    pub name: Arc<str>,
    instances: Box<[Instance]>,
    /// Where the next [`ServicePool::pick`] starts looking, so clients spread
    /// over equally loaded links in turn.
    next: AtomicUsize,
}

impl ServicePool {
    fn new(name: &str, addresses: &[String], links: usize) -> Self {
        Self {
            name: Arc::from(name),
            instances: addresses
                .iter()
                .map(|addr| Instance {
                    addr: Arc::from(addr.as_str()),
                    slots: (0..links).map(|_| RwLock::new(None)).collect(),
                })
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// Every slot, interleaved by instance (slot 0 of each instance, then
    /// slot 1 of each, ...), so a scan alternates between instances.
    fn slots(&self) -> impl Iterator<Item = &Slot> + Clone {
        let per_instance = self.instances.first().map_or(0, |i| i.slots.len());
        (0..per_instance).flat_map(move |s| self.instances.iter().map(move |i| &i.slots[s]))
    }

    /// The link for a new client: the up link with the fewest clients over
    /// all instances; among equals, the next in turn. `None` when no link of
    /// the service is up.
    pub fn pick(&self) -> Option<Arc<LinkHandle>> {
        let total = self.slots().count();
        if total == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % total;
        self.slots()
            .cycle()
            .skip(start)
            .take(total)
            .filter_map(|s| s.read().clone())
            .min_by_key(|l| l.load())
    }

    /// Links up right now, over all instances.
    pub fn links_up(&self) -> usize {
        self.slots().filter(|s| s.read().is_some()).count()
    }

    /// Instances with at least one link up.
    pub fn instances_linked(&self) -> usize {
        self.instances.iter().filter(|i| i.is_linked()).count()
    }

    /// Instances configured (the service's `addresses`).
    pub fn instances(&self) -> usize {
        self.instances.len()
    }

    /// Frames queued over all up links (for the queue-depth gauge).
    pub fn queued_frames(&self) -> usize {
        self.slots()
            .filter_map(|s| s.read().clone())
            .map(|l| l.tx.max_capacity() - l.tx.capacity())
            .sum()
    }

    fn set(&self, instance: usize, slot: usize, link: Option<Arc<LinkHandle>>) {
        *self.instances[instance].slots[slot].write() = link;
    }
}

/// Creates the pool of `config` and spawns one task per slot: `links` for
/// each of its addresses.
///
/// Slots stop when `stop` is cancelled: each sends Goaway after what is
/// queued and closes its link.
pub fn spawn_pool(
    config: ServiceConfig,
    gateway_name: Arc<str>,
    ctx: Arc<LinkContext>,
    stop: CancellationToken,
) -> (Arc<ServicePool>, Vec<tokio::task::JoinHandle<()>>) {
    let pool = Arc::new(ServicePool::new(
        &config.name,
        &config.addresses,
        config.links,
    ));
    let config = Arc::new(config);
    let tasks = (0..config.addresses.len())
        .flat_map(|instance| (0..config.links).map(move |slot| (instance, slot)))
        .map(|(instance, slot)| {
            tokio::spawn(run_slot(
                instance,
                slot,
                pool.clone(),
                config.clone(),
                gateway_name.clone(),
                ctx.clone(),
                stop.clone(),
            ))
        })
        .collect();
    (pool, tasks)
}

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error("connect {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connect {addr}: timed out")]
    Timeout { addr: String },
    #[error("hello with {addr}: {source}")]
    Hello { addr: String, source: HelloError },
}

type Reader = FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>;
type Writer = FramedWrite<tokio::net::tcp::OwnedWriteHalf, FrameCodec>;

/// A link just through its `Hello` exchange.
struct Dialled {
    reader: Reader,
    writer: Writer,
    /// The service's name, from its `Hello`.
    service_name: String,
    /// The largest frame the service accepts, from its `Hello`.
    max_frame_bytes: usize,
}

/// Dials `addr` and exchanges `Hello`s (the link crate's [`hello::offer`],
/// the same checks the service makes). The gateway accepts frames up to
/// `max_frame_bytes` (said in its `Hello`) and sends none larger than the
/// service's.
async fn dial(
    addr: &str,
    config: &ServiceConfig,
    gateway_name: &str,
    max_frame_bytes: usize,
) -> Result<Dialled, DialError> {
    let stream = timeout(config.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| DialError::Timeout { addr: addr.into() })?
        .map_err(|source| DialError::Connect {
            addr: addr.into(),
            source,
        })?;
    // Links carry many small frames; batching happens in the writer.
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    let mut reader = FramedRead::new(r, FrameCodec::new(max_frame_bytes));
    // Only Hello goes out until the service has said its cap.
    let mut writer = FramedWrite::new(w, FrameCodec::default());
    let offered = hello::offer(
        &mut reader,
        &mut writer,
        gateway_name,
        max_frame_bytes,
        config.connect_timeout,
    )
    .await;
    let peer = match offered {
        Ok(peer) => peer,
        Err(source) => {
            // Say why before closing, as the service does (protocol spec).
            if let Some(goaway) = source.goaway() {
                let _ = timeout(config.connect_timeout, writer.send(goaway)).await;
            }
            return Err(DialError::Hello {
                addr: addr.into(),
                source,
            });
        }
    };
    Ok(Dialled {
        reader,
        writer,
        service_name: peer.name,
        max_frame_bytes: peer.max_frame_bytes,
    })
}

/// Redials take up to half off each pause at random (a pause in [d/2, d]), so
/// the gateways that lost one instance do not redial it in lockstep.
const REDIAL_JITTER: f64 = 0.5;

async fn run_slot(
    instance: usize,
    slot: usize,
    pool: Arc<ServicePool>,
    config: Arc<ServiceConfig>,
    gateway_name: Arc<str>,
    ctx: Arc<LinkContext>,
    stop: CancellationToken,
) {
    let label = [("service", config.name.clone())];
    let mut backoff = Backoff::new(config.reconnect_min, config.reconnect_max, REDIAL_JITTER);
    let mut attempt = 0usize;
    let mut failures = 0u64;
    let addr = pool.instances[instance].addr.clone();
    let addr = &*addr;
    loop {
        if stop.is_cancelled() {
            return;
        }
        if attempt > 0 {
            ctx.metrics.link_reconnects.get_or_create(&label).inc();
        }
        attempt += 1;
        // The largest message a service may send is also max_message_bytes.
        let own_max = frame_cap_for_messages(ctx.settings.load().limits.max_message_bytes);
        let dialled = tokio::select! {
            r = dial(addr, &config, &gateway_name, own_max) => r,
            () = stop.cancelled() => return,
        };
        match dialled {
            Ok(Dialled {
                reader,
                writer,
                service_name,
                max_frame_bytes,
            }) => {
                failures = 0;
                backoff.reset();
                let (tx, rx) = mpsc::channel(config.link_queue_frames);
                let link = Arc::new(LinkHandle {
                    id: NEXT_LINK_ID.fetch_add(1, Ordering::Relaxed),
                    service: pool.name.clone(),
                    tx,
                    max_frame_bytes,
                    bound: AtomicUsize::new(0),
                });
                info!(service = %config.name, link.id = link.id, %addr, peer = %service_name, instance, slot, max_frame_bytes, "link up");
                let max_message = ctx.settings.load().limits.max_message_bytes;
                if max_message + CLIENT_MESSAGE_OVERHEAD > max_frame_bytes {
                    warn!(
                        service = %config.name, link.id = link.id, max_frame_bytes, max_message_bytes = max_message,
                        "the service accepts smaller frames than limits.max_message_bytes needs: client messages above {} bytes are refused with 1009",
                        max_frame_bytes - CLIENT_MESSAGE_OVERHEAD
                    );
                }
                pool.set(instance, slot, Some(link.clone()));
                ctx.metrics.links_up.get_or_create(&label).inc();
                let end = run_link(&link, reader, writer, rx, &config, &ctx, &stop).await;
                pool.set(instance, slot, None);
                ctx.metrics.links_up.get_or_create(&label).dec();
                if stop.is_cancelled() {
                    info!(service = %config.name, link.id = link.id, "link closed");
                    return;
                }
                warn!(service = %config.name, link.id = link.id, %addr, reason = %end, clients = link.load(), "link down; closing its clients with 1012");
                close_bound(&ctx.clients, link.id).await;
            }
            Err(e) => {
                failures += 1;
                // First failure and then every 10th: a dead service must not flood the log.
                if failures == 1 || failures % 10 == 0 {
                    warn!(service = %config.name, %addr, failures, error = %e, "link dial failed");
                } else {
                    debug!(service = %config.name, %addr, failures, error = %e, "link dial failed");
                }
            }
        }
        tokio::select! {
            () = sleep(backoff.next_delay()) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Closes every client bound to link `id` with 1012. The registry is walked
/// shard by shard with a yield between shards, as a drain walks it, so a
/// link drop among millions of clients never holds a worker for long.
async fn close_bound(clients: &ClientRegistry, id: u64) {
    for shard in 0..crate::registry::SHARDS {
        for c in clients.shard_matching(shard, |c| c.link_id == id) {
            c.outbox.close(CloseReason::LinkLost);
        }
        tokio::task::yield_now().await;
    }
}

/// Bound on the goodbye at shutdown: what is queued, then the Goaway.
const GOAWAY_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs one established link until it drops or `stop` is cancelled; returns
/// why it ended.
///
/// The writer is the link crate's [`LinkWriter`], as on the service's end:
/// it pings every `ping_interval_secs`, answers the newest ping ahead of
/// queued data, and ends the link when a write does not finish within
/// `ping_timeout_secs` (the service stopped reading).
async fn run_link(
    link: &Arc<LinkHandle>,
    mut reader: Reader,
    writer: Writer,
    rx: mpsc::Receiver<Frame>,
    config: &ServiceConfig,
    ctx: &LinkContext,
    stop: &CancellationToken,
) -> String {
    let frames_out = ctx.metrics.link_frames_out.clone();
    let (mut writer, pongs) = LinkWriter::spawn(
        writer,
        rx,
        WriterConfig {
            ping_interval: config.ping_interval,
            write_timeout: config.ping_timeout,
        },
        move |n| {
            frames_out.inc_by(n as u64);
        },
    );
    let silence = tokio::time::sleep(config.ping_timeout);
    tokio::pin!(silence);
    loop {
        tokio::select! {
            frame = reader.next() => match frame {
                None => return "service closed the link".to_string(),
                Some(Err(e)) => return format!("read: {e}"),
                Some(Ok(frame)) => {
                    silence.as_mut().reset(Instant::now() + config.ping_timeout);
                    ctx.metrics.link_frames_in.inc();
                    if let Err(end) = dispatch(link, frame, &pongs, ctx).await {
                        return end;
                    }
                }
            },
            written = writer.ended() => {
                return match written {
                    Ok(()) => "link writer stopped".to_string(),
                    Err(e) => format!("write: {e}"),
                };
            }
            () = &mut silence => return format!("no frame for {:?}", config.ping_timeout),
            () = stop.cancelled() => {
                // Clients were drained before links are stopped: say goodbye
                // after what is queued.
                let goaway = Frame::Goaway { code: 0, reason: "gateway shutting down".into() };
                writer.stop(Some(goaway), GOAWAY_TIMEOUT.min(config.ping_timeout)).await;
                return "gateway shutting down".to_string();
            }
        }
    }
}

/// Applies one frame from the service. `Err` ends the link.
async fn dispatch(
    link: &Arc<LinkHandle>,
    frame: Frame,
    pongs: &Pongs,
    ctx: &LinkContext,
) -> Result<(), String> {
    match frame {
        Frame::ClientMessage {
            client,
            kind,
            payload,
        } => {
            let Some(c) = own_client(link, ctx, client) else {
                // The client left (the service will see its close), or it is
                // not this link's: a service addresses only its own clients.
                return Ok(());
            };
            match to_message(kind, payload) {
                Some(msg) => {
                    if c.outbox.push(msg) == crate::outbox::Pushed::DroppedOldest {
                        ctx.metrics
                            .outbound_dropped
                            .get_or_create(&[("policy", "drop_oldest")])
                            .inc();
                    }
                }
                None => warn!(
                    link.id = link.id,
                    client, "service sent invalid UTF-8 as text; message dropped"
                ),
            }
        }
        Frame::ClientClose {
            client,
            code,
            reason,
        } => {
            if let Some(c) = own_client(link, ctx, client) {
                let code = if crate::close::valid_close_code(code) {
                    code
                } else {
                    1011
                };
                c.outbox.close(CloseReason::service(code, &reason));
            }
        }
        Frame::Subscribe { client, topic } => {
            if let Some(c) = own_client(link, ctx, client) {
                ctx.topics.subscribe(&topic, &c, &ctx.metrics);
            }
        }
        Frame::Unsubscribe { client, topic } => {
            if let Some(c) = own_client(link, ctx, client) {
                ctx.topics.unsubscribe(&topic, &c, &ctx.metrics);
            }
        }
        Frame::Publish {
            topic,
            kind,
            payload,
        } => match to_message(kind, payload) {
            Some(msg) => {
                ctx.topics.publish(&topic, msg, &ctx.metrics).await;
            }
            None => warn!(
                link.id = link.id,
                "service published invalid UTF-8 as text; publish dropped"
            ),
        },
        Frame::Ping { nonce } => pongs.answer(nonce),
        Frame::Pong { .. } => {}
        Frame::Goaway { code, reason } => {
            return Err(format!("service sent goaway {code}: {reason}"))
        }
        other @ (Frame::Hello { .. } | Frame::ClientOpen { .. }) => {
            return Err(format!(
                "protocol error: service sent {}",
                other.type_name()
            ))
        }
    }
    Ok(())
}

/// The client `client` if it was opened on `link`: a service addresses only
/// its own clients, never another link's (or another service's).
fn own_client(link: &LinkHandle, ctx: &LinkContext, client: ClientId) -> Option<Arc<ClientHandle>> {
    ctx.clients.get(client).filter(|c| c.link_id == link.id)
}

/// The WebSocket message for a link payload: encoded once, shared by every
/// queue it is pushed to. `None` for text that is not UTF-8.
pub fn to_message(kind: Kind, payload: Bytes) -> Option<Message> {
    match kind {
        Kind::Binary => Some(Message::Binary(payload)),
        Kind::Text => Utf8Bytes::try_from(payload).ok().map(Message::Text),
    }
}
