//! Links, the gateway's side: persistent connections from EdgeGate to services. A service's
//! pool keeps `links` links to each of its instances (one instance per
//! configured address), so every gateway is linked to every instance and a
//! publish from any instance reaches this gateway's subscribers.
//!
//! A slot dials its one instance, exchanges Hello, then runs two halves: the
//! link crate's writer (`edgegate_link::writer`, the same on the service's
//! end) that drains the slot's bounded queue into the socket, pings, and
//! bounds every write, and a reader (the slot task itself) that dispatches
//! service frames to clients and topics. When a link drops, the slot
//! redials the same instance with jittered exponential backoff; an instance
//! that never answers holds up only its own slots.
//!
//! Policy (documented in docs/link-protocol.md and docs/config.md):
//! - A client is bound at open to the up link with the fewest clients, over
//!   all instances, and stays on it, so its messages stay in order.
//! - A full link queue pauses the clients that write to it (they stop reading
//!   their socket, so TCP pushes back); a client still blocked after
//!   `link_backpressure_timeout_secs` is closed with 1013.
//! - When a link drops, every client bound to it is closed with 1012 (service
//!   restart): frames in flight may be lost and the service has lost its state
//!   for them, so the client must reconnect and open again. That includes a
//!   client that picked the link just as it dropped ([`LinkHandle::bind`]
//!   says why none is missed). Clients of other links and other instances
//!   are untouched.
//! - While a service has no link up, new clients are closed with 1013 right
//!   after the upgrade.
//! - A link that sends nothing (not even a pong) for `ping_timeout_secs` is
//!   torn down and redialled; so is a link whose write does not finish
//!   within `ping_timeout_secs` (the service stopped reading), even while
//!   the service still pings.

//!
//! # Layout
//!
//! | module | holds |
//! |---|---|
//! | `pool` | [`ServicePool`] (slots per instance, picking a link for a client) and [`LinkHandle`] (what a bound client holds) |
//! | `slot` | [`spawn_pool`]: one task per slot, dialling, the link's life, redial |
//! | `dispatch` | applying a service's frames to clients and topics |
//!
//! The link end itself (hello, writer, backoff, codec) is the `edgegate-link`
//! crate's, the same as on the service's end.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::metrics::Metrics;
use crate::registry::ClientRegistry;
use crate::state::Settings;
use crate::topics::Topics;

mod dispatch;
mod pool;
mod slot;

pub use dispatch::to_message;
pub use pool::{LinkHandle, ServicePool};
pub use slot::spawn_pool;

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
