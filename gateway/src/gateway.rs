//! The assembled gateway: listeners, link pools, shared state; start, reload
//! and drain.
//!
//! Teardown order (drain): stop accepting → close clients with 1001 spread
//! over the drain window in random order → wait for their sessions to end
//! (each tells its service) → stop links (Goaway after what is queued).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus_client::registry::Registry;
use rand::seq::SliceRandom;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{AdminServer, GatewayView};
use crate::auth::Authenticator;
use crate::client::CloseReason;
use crate::config::{Config, Heartbeat, Limits};
use crate::link::{spawn_pool, ServicePool};
use crate::listener::{accept_loop, bind, ListenerCtx};
use crate::metrics::Metrics;
use crate::registry::ClientRegistry;
use crate::tls::{server_config, ReloadableAcceptor, TlsError};
use crate::topics::Topics;

/// WebSocket read buffer per client. tungstenite allocates it eagerly and
/// keeps it for the client's life; its 128 KiB default would be ~25× the
/// whole per-client budget. It is also the most tungstenite reads per call:
/// a larger message still arrives whole (the buffer grows to the frame's
/// length while it is read), in 256-byte copies out of rustls's plaintext
/// buffer, which costs function calls, not syscalls. Measured: 1 KiB → 256 B
/// saved ~0.8 KiB per idle client.
pub const WS_READ_BUFFER_BYTES: usize = 256;

/// Drain closes are issued in steps of this length.
const DRAIN_TICK: Duration = Duration::from_millis(10);

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

/// State every client task, link and the accept loops share.
#[derive(Debug)]
pub struct Shared {
    pub metrics: Metrics,
    pub clients: ClientRegistry,
    pub topics: Topics,
    settings: RwLock<Arc<Settings>>,
    /// TCP connections held (handshaking or in session), against `max_clients`.
    connections: AtomicUsize,
    max_clients: AtomicUsize,
    /// 0 = no per-address limit.
    max_clients_per_address: AtomicUsize,
    addresses: crate::registry::AddressCounts,
    next_id: AtomicU64,
    draining: AtomicBool,
    /// Readiness is off (the first drain phase) while clients are still
    /// accepted and served.
    leaving: AtomicBool,
    /// Keys changed in the file since start that only a restart applies
    /// (as of the last accepted reload).
    restart_pending: Mutex<Vec<String>>,
}

impl Shared {
    /// The current settings (a cheap `Arc` clone).
    pub fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn next_client_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Counts a new connection from `ip` unless `max_clients` or
    /// `max_clients_per_address` is reached; says which refused it.
    pub fn try_take_connection(&self, ip: std::net::IpAddr) -> Result<(), Refused> {
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

    /// Forgets a connection counted by [`Shared::try_take_connection`].
    pub fn release_connection(&self, ip: std::net::IpAddr) {
        self.connections.fetch_sub(1, Ordering::AcqRel);
        // Unconditional: a reload may have turned the limit off since this
        // connection was counted, and its count must not stay behind.
        self.addresses.release(ip);
    }

    /// Connections held, handshaking or in session.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether the gateway is leaving its load balancer: readiness answers
    /// 503, clients are still accepted. True for the whole drain.
    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::Relaxed)
    }

    /// The systemd status line: counts, and what waits for a restart.
    pub fn status_text(&self) -> String {
        let mut status = format!(
            "{} clients, {} connections",
            self.clients.len(),
            self.connections()
        );
        let pending = self
            .restart_pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !pending.is_empty() {
            status.push_str("; restart needed for ");
            status.push_str(&pending.join(", "));
        }
        status
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

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listener {name}: bind {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("listener {name}: {source}")]
    Tls { name: String, source: TlsError },
    #[error("{0}")]
    Auth(#[from] crate::auth::KeyError),
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminBindError),
}

impl StartError {
    /// Whether the operator's files are at fault (exit `EX_CONFIG`, which the
    /// unit does not restart on), rather than the host (a port in use).
    pub fn is_config(&self) -> bool {
        matches!(self, StartError::Tls { .. } | StartError::Auth(_))
    }
}

/// Every listener's TLS server config, in the config's order.
fn tls_configs(config: &Config) -> Result<Vec<rustls::ServerConfig>, StartError> {
    config
        .listeners
        .iter()
        .map(|l| {
            server_config(&l.tls_cert_path, &l.tls_key_path, l.protocol).map_err(|source| {
                StartError::Tls {
                    name: l.name.clone(),
                    source,
                }
            })
        })
        .collect()
}

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    shared: Arc<Shared>,
    /// The metrics registry, readiness and liveness, shared with the admin endpoint.
    view: Arc<GatewayView>,
    /// `/metrics`, `/healthz`, `/readyz` on `[admin] bind`; stopped last in a drain.
    admin: AdminServer,
    /// Stops the scheduler probe (`scheduler::run`) when the gateway is dropped.
    _probe_stop: tokio_util::sync::DropGuard,
    listeners: Vec<(Arc<ListenerCtx>, SocketAddr)>,
    pools: Vec<Arc<ServicePool>>,
    permits: Arc<Semaphore>,
    permit_count: AtomicUsize,
    accept_stop: CancellationToken,
    link_stop: CancellationToken,
    accept_tasks: Vec<JoinHandle<()>>,
    link_tasks: Vec<JoinHandle<()>>,
    /// The configuration the gateway started with: what a reload compares
    /// the file with to name the keys that wait for a restart.
    running: Config,
}

impl Gateway {
    /// Binds every listener, starts the link pools and the accept loops.
    /// Listeners configured on port 0 get an ephemeral port: see
    /// [`Gateway::local_addr`].
    ///
    /// # Errors
    /// [`StartError`] when a listener cannot bind or its certificate is unusable.
    pub async fn start(config: &Config) -> Result<Gateway, StartError> {
        let tls_configs = tls_configs(config)?;
        Self::start_with_tls(config, tls_configs).await
    }

    /// Builds everything [`Gateway::start`] builds from the file without
    /// binding or dialling anything: every listener's certificate chain and
    /// key (parsed, and the key matching the certificate) and the auth keys.
    /// `edgegate check-config` runs this, so a file it passes does not fail
    /// `run` on its contents.
    ///
    /// # Errors
    /// [`StartError`] naming the listener and file, as `start` would.
    pub fn check(config: &Config) -> Result<(), StartError> {
        tls_configs(config)?;
        Settings::from_config(config)?;
        Ok(())
    }

    /// As [`Gateway::start`], with the TLS configs already built (one per
    /// listener, in order): the demo's generated certificate takes this path.
    ///
    /// # Errors
    /// As [`Gateway::start`].
    pub async fn start_with_tls(
        config: &Config,
        tls_configs: Vec<rustls::ServerConfig>,
    ) -> Result<Gateway, StartError> {
        let mut registry = Registry::default();
        let service_names: Vec<String> = config.services.iter().map(|s| s.name.clone()).collect();
        let metrics = Metrics::new(&mut registry, &service_names);
        metrics
            .clients_max
            .set(i64::try_from(config.limits.max_clients).unwrap_or(i64::MAX));
        let shared = Arc::new(Shared {
            metrics,
            clients: ClientRegistry::default(),
            topics: Topics::default(),
            settings: RwLock::new(Arc::new(Settings::from_config(config)?)),
            connections: AtomicUsize::new(0),
            max_clients: AtomicUsize::new(config.limits.max_clients),
            max_clients_per_address: AtomicUsize::new(config.limits.max_clients_per_address),
            addresses: crate::registry::AddressCounts::default(),
            next_id: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            leaving: AtomicBool::new(false),
            restart_pending: Mutex::default(),
        });

        // Bind everything before starting anything, so a bind error leaves nothing running.
        let mut bound = Vec::new();
        for l in &config.listeners {
            let listener = bind(l.bind, l.backlog).map_err(|source| StartError::Bind {
                name: l.name.clone(),
                addr: l.bind,
                source,
            })?;
            bound.push(listener);
        }
        let admin_listener = crate::admin::bind(config.admin_bind).await?;
        // Nothing is accepted or dialled yet: what is open now is the base
        // of the descriptor count on kernels that do not report it.
        crate::process::record_baseline_fds();

        let link_stop = CancellationToken::new();
        let gateway_name: Arc<str> = Arc::from(gateway_name().as_str());
        let mut pools = Vec::new();
        let mut link_tasks = Vec::new();
        for s in &config.services {
            let (pool, tasks) = spawn_pool(
                s.clone(),
                gateway_name.clone(),
                shared.clone(),
                link_stop.clone(),
            );
            pools.push(pool);
            link_tasks.extend(tasks);
        }

        let permits = Arc::new(Semaphore::new(config.limits.handshake_permits));
        let accept_stop = CancellationToken::new();
        let mut listeners = Vec::new();
        let mut accept_tasks = Vec::new();
        for ((l, listener), tls) in config.listeners.iter().zip(bound).zip(tls_configs) {
            let addr = listener.local_addr().map_err(|source| StartError::Bind {
                name: l.name.clone(),
                addr: l.bind,
                source,
            })?;
            let ctx = Arc::new(ListenerCtx {
                name: l.name.clone(),
                protocol: l.protocol,
                routes: l.routes.clone(),
                services: pools.clone(),
                tls: ReloadableAcceptor::new(tls),
                permits: permits.clone(),
                shared: shared.clone(),
            });
            info!(listener = %l.name, %addr, protocol = l.protocol.as_str(), backlog = l.backlog, "listening");
            accept_tasks.push(tokio::spawn(accept_loop(
                listener,
                ctx.clone(),
                permits.clone(),
                accept_stop.clone(),
            )));
            listeners.push((ctx, addr));
        }

        let probe = Arc::new(crate::scheduler::Probe::new());
        let ops_stop = CancellationToken::new();
        tokio::spawn(crate::scheduler::run(
            shared.clone(),
            pools.clone(),
            probe.clone(),
            ops_stop.child_token(),
        ));
        let backlogs = config
            .listeners
            .iter()
            .map(|l| (l.name.clone(), l.backlog))
            .collect();
        let watch_shared = shared.clone();
        let watch_stop = ops_stop.child_token();
        tokio::spawn(async move {
            crate::backlog::watch(&watch_shared.metrics, backlogs, watch_stop).await
        });
        let view = Arc::new(GatewayView::new(
            registry,
            shared.clone(),
            pools.clone(),
            probe,
        ));
        let admin = AdminServer::spawn(admin_listener, view.clone());

        Ok(Gateway {
            shared,
            view,
            admin,
            _probe_stop: ops_stop.drop_guard(),
            listeners,
            pools,
            permits,
            permit_count: AtomicUsize::new(config.limits.handshake_permits),
            accept_stop,
            link_stop,
            accept_tasks,
            link_tasks,
            running: config.clone(),
        })
    }

    /// The bound address of the listener called `name`.
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(ctx, _)| ctx.name == name)
            .map(|(_, addr)| *addr)
    }

    /// The context of the `i`-th listener (tests measure client futures with it).
    #[cfg(test)]
    pub(crate) fn listener_ctx(&self, i: usize) -> Arc<ListenerCtx> {
        self.listeners[i].0.clone()
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The bound address of the admin endpoint (`/metrics`, `/healthz`, `/readyz`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr()
    }

    /// What the admin endpoint reads (metrics, readiness, liveness).
    pub fn view(&self) -> &Arc<GatewayView> {
        &self.view
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode_metrics(&self) -> String {
        self.view.encode_metrics()
    }

    /// Clients in session.
    pub fn client_count(&self) -> usize {
        self.shared.clients.len()
    }

    /// Links up for the service called `name`.
    pub fn links_up(&self, name: &str) -> usize {
        self.pools
            .iter()
            .find(|p| &*p.name == name)
            .map_or(0, |p| p.links_up())
    }

    /// Ready: listeners bound (always, once started) and every service has a link up.
    pub fn is_ready(&self) -> bool {
        self.view.is_ready()
    }

    /// Applies what can change live: certificates, limits, heartbeat, auth.
    /// Listeners, routes and services need a restart (they are logged when they differ).
    /// Clients keep the settings they started with.
    ///
    /// # Errors
    /// When a new certificate or key cannot be loaded; nothing is changed then.
    pub fn reload(&self, config: &Config) -> Result<(), StartError> {
        let mut tls = Vec::new();
        for (ctx, _) in &self.listeners {
            let Some(l) = config.listeners.iter().find(|l| l.name == ctx.name) else {
                continue;
            };
            let c =
                server_config(&l.tls_cert_path, &l.tls_key_path, l.protocol).map_err(|source| {
                    StartError::Tls {
                        name: l.name.clone(),
                        source,
                    }
                })?;
            tls.push((ctx.clone(), c));
        }
        let settings = Settings::from_config(config)?;
        for (ctx, c) in tls {
            ctx.tls.replace(c);
        }
        *self
            .shared
            .settings
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(settings);
        self.shared
            .max_clients_per_address
            .store(config.limits.max_clients_per_address, Ordering::Relaxed);
        self.shared
            .max_clients
            .store(config.limits.max_clients, Ordering::Relaxed);
        self.shared
            .metrics
            .clients_max
            .set(i64::try_from(config.limits.max_clients).unwrap_or(i64::MAX));
        let old = self
            .permit_count
            .swap(config.limits.handshake_permits, Ordering::AcqRel);
        let new = config.limits.handshake_permits;
        if new > old {
            self.permits.add_permits(new - old);
        } else if new < old {
            self.permits.forget_permits(old - new);
        }
        let pending = self.running.restart_only_changes(config);
        for key in &pending {
            warn!(key = %key, "changed in the file, but applies only after a restart");
        }
        self.shared
            .metrics
            .config_restart_pending
            .set(i64::try_from(pending.len()).unwrap_or(i64::MAX));
        if pending.is_empty() {
            info!("configuration reloaded");
        } else {
            warn!(
                restart_needed = pending.len(),
                "configuration reloaded; {} changed key(s) need a restart: {}",
                pending.len(),
                pending.join(", ")
            );
        }
        *self
            .shared
            .restart_pending
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = pending;
        Ok(())
    }

    /// The systemd status line (see [`Shared::status_text`]).
    pub fn status_text(&self) -> String {
        self.shared.status_text()
    }

    /// Drains and stops with no load-balancer grace: [`Gateway::drain`] with
    /// a zero grace.
    pub async fn shutdown(self, window: Duration) {
        self.drain(Duration::ZERO, window).await;
    }

    /// Drains and stops in phases: readiness off while still accepting for
    /// `grace` (the load balancer notices), then stop accepting, close every
    /// client with 1001 spread over `window` in random order, wait (bounded)
    /// for their sessions to end, then close the links.
    pub async fn drain(mut self, grace: Duration, window: Duration) {
        // Phase 1: readiness off, still accepting, so the load balancer takes
        // the host out before any connection is refused.
        self.shared.leaving.store(true, Ordering::Relaxed);
        if !grace.is_zero() {
            info!(
                grace_ms = grace.as_millis() as u64,
                "leaving the load balancer: /readyz answers 503, still accepting"
            );
            tokio::time::sleep(grace).await;
        }
        // Phase 2: stop accepting. Phase 3: close clients over the window.
        self.shared.draining.store(true, Ordering::Relaxed);
        self.accept_stop.cancel();
        self.permits.close();
        for t in self.accept_tasks.drain(..) {
            let _ = t.await;
        }

        // Every client, shard by shard with a yield between shards, each
        // shard shuffled: the close order is random, and no step holds the
        // worker long (see ClientRegistry::shard_snapshot).
        let mut clients = Vec::new();
        for i in 0..crate::registry::SHARDS {
            let mut shard = self.shared.clients.shard_snapshot(i);
            shard.shuffle(&mut rand::rng());
            clients.push(shard);
            tokio::task::yield_now().await;
        }
        // Interleave the shards so each drain tick takes from all of them.
        let total: usize = clients.iter().map(Vec::len).sum();
        info!(
            clients = total,
            window_ms = window.as_millis() as u64,
            "draining"
        );
        let start = Instant::now();
        let ticks = (window.as_millis() / DRAIN_TICK.as_millis()).max(1) as usize;
        let mut closed = 0usize;
        let mut cursor = vec![0usize; clients.len()];
        for tick in 1..=ticks {
            let upto = total * tick / ticks;
            // Round-robin over shards until `upto` clients are closed.
            while closed < upto {
                for (shard, pos) in clients.iter().zip(cursor.iter_mut()) {
                    if closed >= upto {
                        break;
                    }
                    if let Some(c) = shard.get(*pos) {
                        c.outbox
                            .close(CloseReason::Shutdown, 1001, "gateway draining");
                        *pos += 1;
                        closed += 1;
                    }
                }
            }
            if closed < total {
                tokio::time::sleep_until(start + window.mul_f64(tick as f64 / ticks as f64)).await;
            }
        }
        drop(clients);
        // Clients that finished their handshake during the drain close themselves
        // (they see `draining`). Wait for sessions to end, bounded by the write
        // timeout that bounds each close.
        let settings = self.shared.settings();
        let deadline = Instant::now() + settings.limits.write_timeout + Duration::from_secs(1);
        while self.shared.connections() > 0 && Instant::now() < deadline {
            for i in 0..crate::registry::SHARDS {
                for c in self.shared.clients.shard_snapshot(i) {
                    c.outbox
                        .close(CloseReason::Shutdown, 1001, "gateway draining");
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.shared.connections() > 0 {
            warn!(
                connections = self.shared.connections(),
                "drain deadline passed; closing the rest"
            );
        }
        self.link_stop.cancel();
        for t in self.link_tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(6), t).await;
        }
        self.admin.stop().await;
        info!("stopped");
    }
}

/// The name this gateway gives itself in link Hello frames; services use it
/// to publish once per gateway.
pub fn gateway_name() -> String {
    static INSTANCE: AtomicU64 = AtomicU64::new(0);
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "edgegate".into());
    // Host, process and instance: unique even for several gateways in one test process.
    format!(
        "{host}:{}:{}",
        std::process::id(),
        INSTANCE.fetch_add(1, Ordering::Relaxed)
    )
}
