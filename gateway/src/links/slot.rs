//! One slot's life: dial its instance, exchange Hello, run the link (the
//! link crate's writer, the reader here), close the bound clients when it
//! drops, back off, redial.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edgegate_link::backoff::Backoff;
use edgegate_link::goaway::{End, Goaway};
use edgegate_link::hello::{self, HelloError};
use edgegate_link::proto::{frame_cap_for_messages, Frame, FrameCodec, CLIENT_MESSAGE_OVERHEAD};
use edgegate_link::writer::{LinkWriter, WriterConfig};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout, Instant};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::dispatch::dispatch;
use super::pool::{LinkHandle, ServicePool};
use super::LinkContext;
use crate::close::CloseReason;
use crate::config::ServiceConfig;
use crate::registry::ClientRegistry;

/// Link ids are unique in the process, for logs.
static NEXT_LINK_ID: AtomicU64 = AtomicU64::new(1);

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
    let addr = pool.address(instance);
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
                let link = Arc::new(LinkHandle::new(
                    NEXT_LINK_ID.fetch_add(1, Ordering::Relaxed),
                    pool.name.clone(),
                    tx,
                    max_frame_bytes,
                ));
                info!(service = %config.name, link.id = link.id, %addr, peer = %service_name, instance, slot, max_frame_bytes, "link up");
                let max_message = ctx.settings.load().limits.max_message_bytes;
                let needed = max_message + CLIENT_MESSAGE_OVERHEAD;
                if needed > max_frame_bytes {
                    // check-config compared max_message_bytes with the cap the
                    // config declares; the service said less than that.
                    warn!(
                        service = %config.name, link.id = link.id, max_frame_bytes, max_message_bytes = max_message,
                        "service {:?} says in its Hello it accepts link frames of up to {max_frame_bytes} bytes, \
                         but limits.max_message_bytes = {max_message} needs {needed}: client messages above {} bytes are refused with 1009. \
                         Raise the service's own frame cap (the example service: --max-frame-bytes) to at least {needed} \
                         and set [[service]] max_frame_bytes to what it says, or lower limits.max_message_bytes",
                        config.name,
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
                close_bound(&ctx.clients, &link).await;
            }
            Err(e) => {
                failures += 1;
                // First failure and then every 10th: a dead service must not flood the log.
                if failures == 1 || failures.is_multiple_of(10) {
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

/// Closes every client bound to `link` with 1012. The link is marked down
/// first, so a client binding while the registry is walked is closed by
/// [`LinkHandle::bind`] if the walk misses it. The registry is walked shard
/// by shard with a yield between shards, as a drain walks it, so a link drop
/// among millions of clients never holds a worker for long.
async fn close_bound(clients: &ClientRegistry, link: &LinkHandle) {
    link.mark_down();
    for shard in 0..crate::registry::SHARDS {
        for c in clients.shard_matching(shard, |c| c.link_id == link.id) {
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
                let goaway = Goaway::ShuttingDown(End::Gateway);
                writer.stop(Some(goaway.frame()), GOAWAY_TIMEOUT.min(config.ping_timeout)).await;
                return goaway.to_string();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SlowReaderPolicy;
    use crate::outbox::ClientHandle;

    fn client(id: u64, link: &LinkHandle) -> Arc<ClientHandle> {
        Arc::new(ClientHandle::new(id, link.id, 16, SlowReaderPolicy::Close))
    }

    fn open(client: u64) -> Frame {
        Frame::ClientOpen {
            client,
            route: "/".into(),
            remote_addr: "192.0.2.1:1".into(),
            claims: bytes::Bytes::new(),
        }
    }

    /// The race of a client that picks a link as it drops: the client's
    /// open gets through (the writer still holds the queue) but its binding
    /// is registered after the teardown scanned the registry. Played here
    /// in that order, step by step.
    #[tokio::test]
    async fn a_client_bound_as_its_link_goes_down_is_closed_with_1012() {
        let clients = ClientRegistry::default();
        let pool = ServicePool::new("s", &["a:1".into()], 1);
        // The writer task's end of the queue, still alive while the link tears down.
        let (tx, _writer_queue) = mpsc::channel(4);
        let link = Arc::new(LinkHandle::new(1, pool.name.clone(), tx, 1 << 20));
        pool.set(0, 0, Some(link.clone()));
        // A client registered before the drop is found by the scan.
        let early = client(1, &link);
        link.bind(&clients, early.clone());

        let picked = pool.pick().expect("the link is up");
        // The link drops; its teardown runs before the client registers.
        pool.set(0, 0, None);
        close_bound(&clients, &link).await;
        let late = client(2, &picked);
        picked.bind(&clients, late.clone());
        picked.tx.send(open(2)).await.expect("the open got through");

        assert_eq!(early.outbox.close_request(), Some(CloseReason::LinkLost));
        assert_eq!(
            late.outbox.close_request(),
            Some(CloseReason::LinkLost),
            "a client bound to a link that went down must be closed with 1012"
        );
    }
}
