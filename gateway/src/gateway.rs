//! The assembled gateway: listeners, link pools, shared state; start, reload
//! and drain.
//!
//! Teardown order (drain): stop accepting → close clients with 1001 spread
//! over the drain window in random order → wait for their sessions to end
//! (each tells its service) → stop links (Goaway after what is queued).

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::registry::Registry;
use rand::seq::SliceRandom;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{AdminServer, GatewayView};
use crate::client::ListenerCtx;
use crate::close::CloseReason;
use crate::config::{Config, ListenerConfig};
use crate::handover::AdoptedSockets;
use crate::links::{spawn_pool, LinkContext, ServicePool};
use crate::listener::{accept_loop, bind, set_backlog};
use crate::metrics::Metrics;
use crate::state::{Settings, Shared};
use crate::tls::{server_config, ReloadableAcceptor, TlsError};

/// The admin endpoint's name among the sockets an upgrade hands over.
const ADMIN_SOCKET: &str = "admin";

/// Drain closes are issued in steps of this length.
const DRAIN_TICK: Duration = Duration::from_millis(10);
/// How often [`Gateway::wait_ready`] looks.
const READY_POLL: Duration = Duration::from_millis(20);

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
    #[error("listener {name}: inherited socket: {source}")]
    Adopt {
        name: String,
        source: std::io::Error,
    },
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

/// Reads each listener's certificate expiry into the metrics and logs where
/// it stands (a warning within `tls::EXPIRY_WARNING` of it, an error once
/// past). Start and every accepted reload call it with the files just loaded.
fn note_certificate_expiry<'a>(
    listeners: impl IntoIterator<Item = &'a ListenerConfig>,
    metrics: &Metrics,
) {
    let now = SystemTime::now();
    for l in listeners {
        match crate::tls::leaf_not_after(&l.tls_cert_path) {
            Ok(not_after) => {
                crate::tls::log_expiry(&l.name, &l.tls_cert_path, not_after, now);
                metrics.certificates.set(&l.name, not_after);
            }
            // Loaded a moment ago: replaced since, it is read at the next reload.
            Err(e) => {
                warn!(listener = %l.name, error = %e, "cannot read the certificate's expiry");
            }
        }
    }
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
    /// Copies of the listening sockets (each listener's by name, then the
    /// admin endpoint's) for an upgrade handover; closed when the drain
    /// stops accepting, so a stopped gateway's ports refuse at once.
    sockets: Vec<(String, OwnedFd)>,
}

/// The socket `adopted` holds for `bind`, when it is bound there (a
/// configured port 0 takes any); `None` when the address changed, so the
/// caller binds anew.
fn adopt(
    adopted: Option<std::net::TcpListener>,
    bind: SocketAddr,
) -> Option<std::io::Result<tokio::net::TcpListener>> {
    let socket = adopted?;
    let here = socket.local_addr().ok()?;
    let same = here == bind || (bind.port() == 0 && here.ip() == bind.ip());
    if !same {
        info!(%here, %bind, "inherited socket is bound elsewhere; binding anew");
        return None;
    }
    Some(
        socket
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(socket)),
    )
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

    /// As [`Gateway::start`], accepting on the sockets a predecessor handed
    /// over (by listener name, where still bound to the configured
    /// address) instead of binding them.
    ///
    /// # Errors
    /// As [`Gateway::start`].
    pub async fn start_adopting(
        config: &Config,
        adopted: AdoptedSockets,
    ) -> Result<Gateway, StartError> {
        let tls_configs = tls_configs(config)?;
        Self::start_inner(config, tls_configs, adopted).await
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
        Self::start_inner(config, tls_configs, AdoptedSockets::default()).await
    }

    async fn start_inner(
        config: &Config,
        tls_configs: Vec<rustls::ServerConfig>,
        mut adopted: AdoptedSockets,
    ) -> Result<Gateway, StartError> {
        let mut registry = Registry::default();
        let service_names: Vec<String> = config.services.iter().map(|s| s.name.clone()).collect();
        let metrics = Metrics::new(&mut registry, &service_names);
        note_certificate_expiry(&config.listeners, &metrics);
        metrics
            .clients_max
            .set(i64::try_from(config.limits.max_clients).unwrap_or(i64::MAX));
        let shared = Arc::new(Shared::new(metrics, config)?);

        // A successor in a handover (docs: handover.rs) adopts its sockets.
        let successor = !adopted.listeners.is_empty();
        // Bind everything before starting anything, so a bind error leaves nothing running.
        let mut bound = Vec::new();
        let mut sockets = Vec::new();
        for l in &config.listeners {
            let inherited = adopt(adopted.listeners.remove(&l.name), l.bind);
            let listener = match inherited {
                Some(r) => r
                    .and_then(|listener| set_backlog(&listener, l.backlog).map(|()| listener))
                    .map_err(|source| StartError::Adopt {
                        name: l.name.clone(),
                        source,
                    })?,
                None => bind(l.bind, l.backlog).map_err(|source| StartError::Bind {
                    name: l.name.clone(),
                    addr: l.bind,
                    source,
                })?,
            };
            let copy = listener.as_fd().try_clone_to_owned();
            let copy = copy.map_err(|source| StartError::Adopt {
                name: l.name.clone(),
                source,
            })?;
            sockets.push((l.name.clone(), copy));
            bound.push(listener);
        }
        // Inherited listeners the file no longer has are closed here.
        drop(adopted.listeners);
        let admin_listener = match adopt(adopted.admin.take(), config.admin_bind) {
            Some(r) => r.map_err(|source| crate::admin::AdminBindError {
                addr: config.admin_bind,
                source,
            })?,
            None => crate::admin::bind(config.admin_bind).await?,
        };
        let copy = admin_listener.as_fd().try_clone_to_owned();
        let copy = copy.map_err(|source| crate::admin::AdminBindError {
            addr: config.admin_bind,
            source,
        })?;
        sockets.push((ADMIN_SOCKET.to_owned(), copy));
        // Nothing is accepted or dialled yet: what is open now is the base
        // of the descriptor count on kernels that do not report it.
        crate::process::record_baseline_fds();

        let link_stop = CancellationToken::new();
        let gateway_name: Arc<str> = Arc::from(gateway_name().as_str());
        let link_ctx = Arc::new(LinkContext {
            clients: shared.clients.clone(),
            topics: shared.topics.clone(),
            metrics: shared.metrics.clone(),
            settings: shared.settings_handle(),
        });
        let mut pools = Vec::new();
        let mut link_tasks = Vec::new();
        for s in &config.services {
            let (pool, tasks) = spawn_pool(
                s.clone(),
                gateway_name.clone(),
                link_ctx.clone(),
                link_stop.clone(),
            );
            pools.push(pool);
            link_tasks.extend(tasks);
        }
        if successor {
            // The predecessor still accepts on the same queue: take no client
            // before this process's links are up (bounded), or the first
            // clients it accepts would get 1013 "service unavailable".
            let by = Instant::now() + crate::handover::LINKS_WAIT;
            while pools.iter().any(|p| p.links_up() == 0) && Instant::now() < by {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
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
                tls_stream: l.tls_stream,
                ws_codec: l.ws_codec,
                health_path: l.health_path.as_deref().map(Box::from),
                permits: permits.clone(),
                shared: shared.clone(),
            });
            info!(listener = %l.name, %addr, protocol = l.protocol.as_str(), backlog = l.backlog, tls_stream = l.tls_stream.as_str(), ws_codec = l.ws_codec.as_str(), "listening");
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
            shared.metrics.clone(),
            shared.admission.clone(),
            shared.lifecycle.clone(),
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
            sockets,
        })
    }

    /// The listening sockets an upgrade hands over: each listener's by name,
    /// and the admin endpoint's.
    pub fn handover_sockets(&self) -> crate::handover::Sockets<'_> {
        let mut out = crate::handover::Sockets::default();
        for (name, fd) in &self.sockets {
            if name == ADMIN_SOCKET {
                out.admin = Some(fd.as_fd());
            } else {
                out.listeners.push((name, fd.as_fd()));
            }
        }
        out
    }

    /// After a handover: stop the admin endpoint at once (the successor
    /// answers `/readyz` and `/metrics` on the same socket from now on),
    /// then drain this process's clients with no load-balancer grace: the
    /// successor already accepts. Returns the clients closed.
    pub async fn drain_handed_over(mut self, window: Duration) -> usize {
        self.admin.stop().await;
        self.drain(Duration::ZERO, window).await
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

    /// Instances of the service called `name` with a link up, and how many
    /// it has.
    pub fn instances_linked(&self, name: &str) -> (usize, usize) {
        self.pools
            .iter()
            .find(|p| &*p.name == name)
            .map_or((0, 0), |p| (p.instances_linked(), p.instances()))
    }

    /// Ready: listeners bound (always, once started) and every service has a link up.
    pub fn is_ready(&self) -> bool {
        self.view.is_ready()
    }

    /// Waits until [`Gateway::is_ready`] or `bound` has passed, and says
    /// which: a start waits a moment for its links so its first clients do
    /// not meet "no link", but a service that is down must not hold it back.
    pub async fn wait_ready(&self, bound: Duration) -> bool {
        let by = Instant::now() + bound;
        loop {
            if self.is_ready() {
                return true;
            }
            if Instant::now() >= by {
                return false;
            }
            tokio::time::sleep(READY_POLL).await;
        }
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
        let running =
            |l: &&ListenerConfig| self.listeners.iter().any(|(ctx, _)| ctx.name == l.name);
        note_certificate_expiry(
            config.listeners.iter().filter(running),
            &self.shared.metrics,
        );
        self.shared.set_settings(settings);
        self.shared.admission.set_limits(&config.limits);
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
        self.shared.lifecycle.set_restart_pending(pending);
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
    /// for their sessions to end, then close the links. Returns the clients
    /// it closed over the window.
    pub async fn drain(mut self, grace: Duration, window: Duration) -> usize {
        // Phase 1: readiness off, still accepting, so the load balancer takes
        // the host out before any connection is refused.
        self.shared.lifecycle.leave();
        if !grace.is_zero() {
            info!(
                grace_ms = grace.as_millis() as u64,
                "leaving the load balancer: /readyz answers 503, still accepting"
            );
            tokio::time::sleep(grace).await;
        }
        // Phase 2: stop accepting. Phase 3: close clients over the window.
        self.shared.lifecycle.drain();
        self.accept_stop.cancel();
        self.permits.close();
        for t in self.accept_tasks.drain(..) {
            let _ = t.await;
        }
        // Our last copies of the listeners: from here a port no other
        // process holds refuses connections instead of queueing them.
        self.sockets.retain(|(name, _)| name == ADMIN_SOCKET);

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
                        c.outbox.close(CloseReason::Shutdown);
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
        // (they see `draining`). Wait for sessions to end, bounded by what
        // bounds each close: the write timeout for the close frame, then the
        // lingering close that lets the client read it.
        let settings = self.shared.settings();
        let deadline = Instant::now()
            + settings.limits.write_timeout
            + crate::linger::LINGER_TIME
            + Duration::from_secs(1);
        while self.shared.admission.connections() > 0 && Instant::now() < deadline {
            for i in 0..crate::registry::SHARDS {
                for c in self.shared.clients.shard_snapshot(i) {
                    c.outbox.close(CloseReason::Shutdown);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.shared.admission.connections() > 0 {
            warn!(
                connections = self.shared.admission.connections(),
                "drain deadline passed; closing the rest"
            );
        }
        self.link_stop.cancel();
        for t in self.link_tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(6), t).await;
        }
        self.admin.stop().await;
        self.sockets.clear();
        info!("stopped");
        total
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::serve;
    use tokio::net::TcpStream;

    /// Bytes the task of one client may occupy (its future, allocated once
    /// for the client's whole life). Measured at 1,592 bytes (release) and
    /// 1,608 (debug) with rustls 0.23 / tungstenite 0.30 on x86_64: the
    /// session loop is ~840 of it. Unboxed handshake states or a stream moved
    /// inline add kilobytes (6,280 bytes before the phases were boxed), which
    /// this budget catches.
    const CLIENT_FUTURE_BUDGET: usize = 1700;

    #[tokio::test]
    async fn client_task_future_stays_within_budget() {
        let dir = std::env::temp_dir().join(format!("edgegate-future-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = crate::tls::self_signed().unwrap();
        std::fs::write(dir.join("c.pem"), cert).unwrap();
        std::fs::write(dir.join("k.pem"), key).unwrap();
        let text = format!(
            "[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\ntls_cert_path = \"{0}/c.pem\"\ntls_key_path = \"{0}/k.pem\"\n\n[[route]]\nlistener = \"t\"\npath = \"/\"\nservice = \"s\"\n\n[[service]]\nname = \"s\"\naddresses = [\"127.0.0.1:9\"]\n",
            dir.display()
        );
        let config = crate::Config::from_toml(&dir.join("e.toml"), &text, []).unwrap();
        let gw = Gateway::start(&config).await.unwrap();
        let ctx = gw.listener_ctx(0);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let addr = stream.local_addr().unwrap();
        let permit = Arc::new(tokio::sync::Semaphore::new(1))
            .acquire_owned()
            .await
            .unwrap();
        let fut = serve(stream, addr, 1, ctx, permit);
        let size = std::mem::size_of_val(&fut);
        println!("client task future: {size} bytes");
        assert!(
            size <= CLIENT_FUTURE_BUDGET,
            "client future grew to {size} bytes (budget {CLIENT_FUTURE_BUDGET})"
        );
        drop(fut);
        gw.shutdown(Duration::ZERO).await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A client task that panics in session gives back everything it held:
    /// its admission, its registry entry, its topic memberships and its link
    /// binding, and the service hears ClientClose 1011. The guards are the
    /// ones `serve` and `run_session` hold.
    #[tokio::test]
    async fn a_client_task_that_panics_in_session_leaves_nothing_behind() {
        let dir = std::env::temp_dir().join(format!("edgegate-panic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = crate::tls::self_signed().unwrap();
        std::fs::write(dir.join("c.pem"), cert).unwrap();
        std::fs::write(dir.join("k.pem"), key).unwrap();
        let text = format!(
            "[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\ntls_cert_path = \"{0}/c.pem\"\ntls_key_path = \"{0}/k.pem\"\n\n[[route]]\nlistener = \"t\"\npath = \"/\"\nservice = \"s\"\n\n[[service]]\nname = \"s\"\naddresses = [\"127.0.0.1:9\"]\n\n[admin]\nbind = \"127.0.0.1:0\"\n",
            dir.display()
        );
        let config = crate::Config::from_toml(&dir.join("e.toml"), &text, []).unwrap();
        let gw = Gateway::start(&config).await.unwrap();
        let shared = gw.shared().clone();
        let (tx, mut service) = tokio::sync::mpsc::channel(8);
        let link = Arc::new(crate::links::LinkHandle::detached(7, tx));
        let ip: std::net::IpAddr = "127.0.0.5".parse().unwrap();
        let task_ctx = gw.listener_ctx(0);
        shared.admission.try_take(ip).unwrap();
        assert_eq!(shared.admission.connections(), 1);

        let (task_shared, task_link) = (shared.clone(), link.clone());
        let task = tokio::spawn(async move {
            let shared = &*task_shared;
            let _slot = crate::client::ClientSlot {
                ctx: task_ctx,
                addr: std::net::SocketAddr::new(ip, 1),
            };
            let handle = Arc::new(crate::outbox::ClientHandle::new(
                42,
                task_link.id,
                8,
                crate::config::SlowReaderPolicy::DropOldest,
            ));
            task_link.bind(&shared.clients, handle.clone());
            let _in_session = crate::client::InSession {
                shared,
                handle: &handle,
                link: &task_link,
            };
            assert!(shared.topics.subscribe("room", &handle, &shared.metrics));
            tokio::task::yield_now().await;
            panic!("a bug in the session");
        });
        assert!(task.await.unwrap_err().is_panic());

        assert_eq!(shared.admission.connections(), 0, "admission given back");
        assert_eq!(shared.clients.len(), 0, "registry entry removed");
        assert_eq!(
            shared.topics.subscriber_count("room"),
            0,
            "memberships removed"
        );
        assert_eq!(link.load(), 0, "link binding removed");
        match service.try_recv() {
            Ok(edgegate_link::proto::Frame::ClientClose { client, code, .. }) => {
                assert_eq!((client, code), (42, 1011))
            }
            other => panic!("the service was not told: {other:?}"),
        }
        gw.shutdown(Duration::ZERO).await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
