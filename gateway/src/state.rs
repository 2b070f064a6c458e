//! The state the data path shares, owned here and importing nothing above it:
//! admission (connection counts and limits), the lifecycle (leaving the load
//! balancer, draining, what waits for a restart), the live settings, the
//! client directory and topics.
//!
//! Each part is its own type, so a consumer can be handed only the part it
//! reads: the admin endpoint gets [`Admission`] and [`Lifecycle`], the links
//! the registry, topics, metrics and settings, not [`Shared`]. The assembler (`gateway`) builds and changes them; nothing
//! here starts a task.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::auth::Authenticator;
use crate::config::{Config, Heartbeat, Limits};
use crate::metrics::Metrics;
use crate::registry::{AddressCounts, ClientRegistry};
use crate::topics::Topics;

/// WebSocket read buffer per client. tungstenite allocates it eagerly and
/// keeps it for the client's life; its 128 KiB default would be ~25× the
/// whole per-client budget. It is also the most tungstenite reads per call:
/// a larger message still arrives whole (the buffer grows to the frame's
/// length while it is read), in 256-byte copies out of rustls's plaintext
/// buffer, which costs function calls, not syscalls. Measured: 1 KiB → 256 B
/// saved ~0.8 KiB per idle client.
pub const WS_READ_BUFFER_BYTES: usize = 256;

/// Settings a reload may change; each client keeps the snapshot it started with.
#[derive(Debug)]
pub struct Settings {
    pub limits: Limits,
    pub heartbeat: Heartbeat,
    pub auth: Authenticator,
    pub ws_config: WebSocketConfig,
}

impl Settings {
    /// # Errors
    /// When the auth key does not parse.
    pub fn from_config(config: &Config) -> Result<Self, crate::auth::KeyError> {
        let max = config.limits.max_message_bytes;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(WS_READ_BUFFER_BYTES)
            // Write each message through at once: no per-client write buffer
            // is kept waiting for more.
            .write_buffer_size(0)
            .max_write_buffer_size(max + 1024)
            .max_message_size(Some(max))
            .max_frame_size(Some(max))
            .accept_unmasked_frames(false);
        Ok(Self {
            limits: config.limits.clone(),
            heartbeat: config.heartbeat.clone(),
            auth: Authenticator::new(&config.auth)?,
            ws_config,
        })
    }
}

/// Why a connection was closed at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `limits.max_clients` reached.
    MaxClients,
    /// `limits.max_clients_per_address` reached for this address.
    PerAddress,
}

/// Connections held against `max_clients` and `max_clients_per_address`,
/// and client ids.
#[derive(Debug)]
pub struct Admission {
    /// TCP connections held (handshaking or in session).
    connections: AtomicUsize,
    max_clients: AtomicUsize,
    /// 0 = no per-address limit.
    max_clients_per_address: AtomicUsize,
    addresses: AddressCounts,
    next_id: AtomicU64,
}

impl Admission {
    pub fn new(limits: &Limits) -> Self {
        Self {
            connections: AtomicUsize::new(0),
            max_clients: AtomicUsize::new(limits.max_clients),
            max_clients_per_address: AtomicUsize::new(limits.max_clients_per_address),
            addresses: AddressCounts::default(),
            next_id: AtomicU64::new(1),
        }
    }

    /// Applies a reload's limits; connections already held stay.
    pub fn set_limits(&self, limits: &Limits) {
        self.max_clients_per_address
            .store(limits.max_clients_per_address, Ordering::Relaxed);
        self.max_clients
            .store(limits.max_clients, Ordering::Relaxed);
    }

    pub fn next_client_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Counts a new connection from `ip` unless `max_clients` or
    /// `max_clients_per_address` is reached; says which refused it.
    pub fn try_take(&self, ip: IpAddr) -> Result<(), Refused> {
        let max = self.max_clients.load(Ordering::Relaxed);
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| Refused::MaxClients)?;
        let per_address = self.max_clients_per_address.load(Ordering::Relaxed);
        if per_address > 0
            && !self
                .addresses
                .try_take(ip, u32::try_from(per_address).unwrap_or(u32::MAX))
        {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::PerAddress);
        }
        Ok(())
    }

    /// Forgets a connection counted by [`Admission::try_take`].
    pub fn release(&self, ip: IpAddr) {
        self.connections.fetch_sub(1, Ordering::AcqRel);
        // Unconditional: a reload may have turned the limit off since this
        // connection was counted, and its count must not stay behind.
        self.addresses.release(ip);
    }

    /// Connections held, handshaking or in session.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

/// Where the gateway is in its life: serving, leaving its load balancer,
/// draining; and what the running file changed that only a restart applies.
#[derive(Debug, Default)]
pub struct Lifecycle {
    draining: AtomicBool,
    /// Readiness is off (the first drain phase) while clients are still
    /// accepted and served.
    leaving: AtomicBool,
    /// Keys changed in the file since start that only a restart applies
    /// (as of the last accepted reload).
    restart_pending: Mutex<Vec<String>>,
}

impl Lifecycle {
    /// Whether the gateway stopped accepting and is closing its clients.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether the gateway is leaving its load balancer: readiness answers
    /// 503, clients are still accepted. True for the whole drain.
    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::Relaxed)
    }

    /// Phase 1 of a drain: readiness off.
    pub fn leave(&self) {
        self.leaving.store(true, Ordering::Relaxed);
    }

    /// Phase 2 of a drain: new sessions close themselves with 1001.
    pub fn drain(&self) {
        self.leaving.store(true, Ordering::Relaxed);
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Records the keys that wait for a restart (replacing the last list).
    pub fn set_restart_pending(&self, keys: Vec<String>) {
        *self.restart_pending.lock() = keys;
    }

    /// The keys that wait for a restart.
    pub fn restart_pending(&self) -> Vec<String> {
        self.restart_pending.lock().clone()
    }
}

/// What every client task, link and accept loop shares.
#[derive(Debug)]
pub struct Shared {
    pub metrics: Arc<Metrics>,
    pub clients: Arc<ClientRegistry>,
    pub topics: Arc<Topics>,
    pub admission: Arc<Admission>,
    pub lifecycle: Arc<Lifecycle>,
    settings: Arc<ArcSwap<Settings>>,
}

impl Shared {
    pub fn new(metrics: Metrics, config: &Config) -> Result<Self, crate::auth::KeyError> {
        Ok(Self {
            metrics: Arc::new(metrics),
            clients: Arc::new(ClientRegistry::default()),
            topics: Arc::new(Topics::default()),
            admission: Arc::new(Admission::new(&config.limits)),
            lifecycle: Arc::new(Lifecycle::default()),
            settings: Arc::new(ArcSwap::from_pointee(Settings::from_config(config)?)),
        })
    }

    /// The current settings (a cheap `Arc` clone).
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.load_full()
    }

    /// The live settings themselves, for a part that reads them at its own
    /// moments (a link, at each dial).
    pub fn settings_handle(&self) -> Arc<ArcSwap<Settings>> {
        self.settings.clone()
    }

    /// Replaces the settings new clients start with.
    pub fn set_settings(&self, settings: Settings) {
        self.settings.store(Arc::new(settings));
    }

    /// The systemd status line: counts, and what waits for a restart.
    pub fn status_text(&self) -> String {
        let mut status = format!(
            "{} clients, {} connections",
            self.clients.len(),
            self.admission.connections()
        );
        let pending = self.lifecycle.restart_pending();
        if !pending.is_empty() {
            status.push_str("; restart needed for ");
            status.push_str(&pending.join(", "));
        }
        status
    }
}
