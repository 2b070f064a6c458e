//! Applying a service's frames: messages and closes to the link's own
//! clients, subscriptions and publishes to topics, pings to the writer.

use std::sync::Arc;

use bytes::Bytes;
use edgegate_link::proto::{ClientId, Frame, Kind};
use edgegate_link::writer::Pongs;
use tokio_tungstenite::tungstenite::protocol::frame::Utf8Bytes;
use tokio_tungstenite::tungstenite::Message;
use tracing::warn;

use super::pool::LinkHandle;
use super::LinkContext;
use crate::close::CloseReason;
use crate::outbox::ClientHandle;

/// Applies one frame from the service. `Err` ends the link.
pub(super) async fn dispatch(
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
