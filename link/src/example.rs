//! The example service: `/echo` and `/chat`, enough to see a gateway work.
//!
//! `edgegate demo` and the tests run [`run_example_service`] (or
//! [`run_example_service_with`], to set its frame cap); the
//! `example_service` binary in `link/examples/` runs it on its own
//! (`--max-frame-bytes`).
//!
//! | route | behaviour |
//! |---|---|
//! | [`ECHO_ROUTE`] | every message goes back to its sender, same kind |
//! | [`CHAT_ROUTE`] | the client is subscribed to [`CHAT_TOPIC`]; every message is published there, so every chat client on every gateway gets it, sender included |
//! | anything else | the client is closed with [`UNKNOWN_ROUTE_CODE`] |
//!
//! Clients are keyed by `(link, client)` because client ids are only unique
//! per link; a [`Event::LinkDown`] forgets every client of that link.

use std::collections::HashMap;
use std::io;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::proto::{ClientId, Frame, Kind};
use crate::service::{Event, LinkId, Service, ServiceConfig};

/// Name the example service gives in its `Hello`.
pub const EXAMPLE_SERVICE_NAME: &str = "example";
/// Route whose messages are sent back to their sender.
pub const ECHO_ROUTE: &str = "/echo";
/// Route whose messages are published to [`CHAT_TOPIC`].
pub const CHAT_ROUTE: &str = "/chat";
/// Topic every chat client is subscribed to.
pub const CHAT_TOPIC: &str = "room";
/// Close code for a client on a route the example service does not know.
pub const UNKNOWN_ROUTE_CODE: u16 = 4404;

/// What the example service does with a client's messages.
#[derive(Clone, Copy, Debug)]
enum Route {
    Echo,
    Chat,
}

/// Runs the example service on `listener` with the defaults of
/// [`ServiceConfig::new`] (16 MiB frames) until `shutdown` is cancelled and
/// every link has closed.
///
/// # Errors
///
/// Fails when the listener's local address cannot be read.
pub async fn run_example_service(
    listener: TcpListener,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let config = ServiceConfig::new(EXAMPLE_SERVICE_NAME);
    run_example_service_with(listener, config, shutdown).await
}

/// As [`run_example_service`], with `config`: start from
/// `ServiceConfig::new(EXAMPLE_SERVICE_NAME)` and change what you need, e.g.
/// a larger `max_frame_bytes` (said in the service's `Hello`) so that links
/// carry a gateway's larger `limits.max_message_bytes`.
///
/// # Errors
///
/// Fails when the listener's local address cannot be read, or when `config`
/// is out of range (`max_frame_bytes` below the protocol's minimum).
pub async fn run_example_service_with(
    listener: TcpListener,
    config: ServiceConfig,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let (service, mut events) = Service::start(listener, config, shutdown)?;
    let mut clients: HashMap<(LinkId, ClientId), Route> = HashMap::new();
    while let Some(event) = events.recv().await {
        handle(&service, &mut clients, event).await;
    }
    Ok(())
}

async fn handle(service: &Service, clients: &mut HashMap<(LinkId, ClientId), Route>, event: Event) {
    match event {
        Event::LinkUp { .. } => {}
        Event::LinkDown { link } => clients.retain(|(on, _), _| *on != link),
        Event::Open {
            link,
            client,
            route,
            ..
        } => match route.as_str() {
            ECHO_ROUTE => {
                clients.insert((link, client), Route::Echo);
            }
            CHAT_ROUTE => {
                clients.insert((link, client), Route::Chat);
                let subscribe = Frame::Subscribe {
                    client,
                    topic: CHAT_TOPIC.to_owned(),
                };
                send(service, link, subscribe).await;
            }
            _ => {
                debug!(link.id = link, client.id = client, %route, "closing client on unknown route");
                let close = Frame::ClientClose {
                    client,
                    code: UNKNOWN_ROUTE_CODE,
                    reason: "unknown route".to_owned(),
                };
                send(service, link, close).await;
            }
        },
        Event::Message {
            link,
            client,
            kind,
            payload,
        } => match clients.get(&(link, client)) {
            Some(Route::Echo) => {
                let echo = Frame::ClientMessage {
                    client,
                    kind,
                    payload,
                };
                send(service, link, echo).await;
            }
            Some(Route::Chat) => publish(service, kind, payload).await,
            None => debug!(
                link.id = link,
                client.id = client,
                "message from an unknown client"
            ),
        },
        Event::Close { link, client, .. } => {
            clients.remove(&(link, client));
        }
    }
}

/// Sends to one link; a link that went down meanwhile is routine.
async fn send(service: &Service, link: LinkId, frame: Frame) {
    if let Err(error) = service.send(link, frame).await {
        debug!(link.id = link, %error, "example service could not send");
    }
}

async fn publish(service: &Service, kind: Kind, payload: Bytes) {
    if let Err(error) = service.publish(CHAT_TOPIC, kind, payload).await {
        debug!(%error, "example service could not publish to every gateway");
    }
}
