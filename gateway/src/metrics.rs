//! Every metric EdgeGate exports, by name, in one place.
//!
//! Prometheus conventions: `edgegate_` prefix, base units, `_total` counters
//! (the `_total` suffix is added by the encoder), `_seconds` histograms.
//! Labels are small enums (listener protocol, close reason, phase, policy,
//! service name from the config): never client ids, addresses or topics.
//! Every known series exists at zero from start-up. The registry is passed in
//! by hand, so each test gateway has its own.
//!
//! Two families are written at scrape time by collectors rather than stored:
//! the standard `process_*` metrics ([`ProcessCollector`], the one place
//! without the prefix, because generic dashboards and queries expect these
//! names), and the seconds left on each listener's certificate
//! ([`CertificateExpiry`]), so that figure is right whenever it is read.

use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::close::CloseReason;
use crate::config::{Protocol, SlowReaderPolicy};

type Labels = [(&'static str, &'static str); 1];
type ServiceLabels = [(&'static str, String); 1];

/// Handshake phases, as the `phase` label of handshake failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Tls,
    Upgrade,
    Auth,
    Open,
}

impl Phase {
    pub const ALL: [Phase; 4] = [Phase::Tls, Phase::Upgrade, Phase::Auth, Phase::Open];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Tls => "tls",
            Phase::Upgrade => "upgrade",
            Phase::Auth => "auth",
            Phase::Open => "open",
        }
    }
}

/// Accept error classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptError {
    /// EMFILE/ENFILE: out of file descriptors.
    Fds,
    /// ENOBUFS/ENOMEM.
    Memory,
    /// Anything else (ECONNABORTED...).
    Other,
}

impl AcceptError {
    pub const ALL: [AcceptError; 3] = [AcceptError::Fds, AcceptError::Memory, AcceptError::Other];

    pub fn as_str(self) -> &'static str {
        match self {
            AcceptError::Fds => "fds",
            AcceptError::Memory => "memory",
            AcceptError::Other => "other",
        }
    }
}

/// The gateway's metrics. Cheap to clone handles live inside.
#[derive(Debug)]
pub struct Metrics {
    /// Clients past the upgrade, by listener protocol.
    pub clients: Family<Labels, Gauge>,
    pub clients_accepted: Family<Labels, Counter>,
    pub clients_closed: Family<Labels, Counter>,
    pub clients_refused: Counter,
    pub clients_refused_per_address: Counter,
    pub handshake_failures: Family<Labels, Counter>,
    pub handshake_duration: Histogram,
    pub accept_errors: Family<Labels, Counter>,
    pub messages_in: Counter,
    pub messages_out: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub outbound_dropped: Family<Labels, Counter>,
    pub links_up: Family<ServiceLabels, Gauge>,
    /// Instances configured per service (its `addresses`).
    pub service_instances: Family<ServiceLabels, Gauge>,
    /// Instances of each service with at least one link up (read at scrape
    /// time): below `service_instances`, some instance's publishes reach no
    /// subscriber here.
    pub service_instances_linked: Family<ServiceLabels, Gauge>,
    pub link_reconnects: Family<ServiceLabels, Counter>,
    pub link_queue_depth: Family<ServiceLabels, Gauge<i64, AtomicI64>>,
    pub link_frames_in: Counter,
    pub link_frames_out: Counter,
    pub topics: Gauge,
    pub subscriptions: Gauge,
    pub publishes: Counter,
    pub publish_fanout: Histogram,
    pub publish_delivery: Histogram,
    pub drain_closed: Counter<u64, AtomicU64>,
    /// Host-wide kernel accept-queue overflows since start-up (see `backlog`).
    pub listen_overflows: Counter,
    pub listen_drops: Counter,

    // Operations: limits, reloads, the scheduler and the process. The
    // scheduler series are sampled by `scheduler::run`, the process series
    // at every scrape (`AdminServer` encode, from `process`).
    /// `limits.max_clients` as loaded (changes on reload).
    pub clients_max: Gauge,
    /// TCP connections held against `max_clients` (handshaking or in session).
    pub connections: Gauge,
    /// SIGHUP reloads, by result (`ok`, `rejected`).
    pub config_reloads: Family<Labels, Counter>,
    /// Keys changed in the file that wait for a restart (0 after one).
    pub config_restart_pending: Gauge,
    /// Always 1; the `version` label carries the build.
    pub build_info: Family<Labels, Gauge>,
    /// Lateness of the probe task: time from ready (woken) to polled.
    pub poll_delay: Histogram,
    pub runtime_workers: Gauge,
    pub runtime_alive_tasks: Gauge,
    pub runtime_global_queue_depth: Gauge,
    /// Sum over workers of the time spent busy (not parked).
    pub runtime_busy: Counter<f64, AtomicU64>,
    /// Busy share of the workers over the last sample interval (0..=1).
    pub runtime_busy_ratio: Gauge<f64, AtomicU64>,
    pub resident_memory: Gauge,
    /// Open file descriptors, counted without listing them (see
    /// `process::open_fds`).
    pub open_fds: Gauge,
    /// Soft `RLIMIT_NOFILE`.
    pub max_fds: Gauge,
    pub jemalloc_allocated: Gauge,
    pub jemalloc_resident: Gauge,
    pub jemalloc_retained: Gauge,
    /// Each listener's certificate expiry (set at start and every reload).
    pub certificates: Arc<CertificateExpiry>,
}

/// Each listener's leaf certificate `not_after`, as read at start and at the
/// last accepted reload, exported as
/// `edgegate_tls_certificate_expiry_seconds{listener}`: the seconds left,
/// computed at each scrape (negative once expired). A gauge set at reload
/// would go stale between reloads, which may be months apart.
#[derive(Debug, Default)]
pub struct CertificateExpiry {
    /// Listener name and `not_after` in seconds since the epoch, in the
    /// config's order.
    not_after: parking_lot::Mutex<Vec<(String, i64)>>,
}

impl CertificateExpiry {
    /// Records the `not_after` of `listener`'s certificate.
    pub fn set(&self, listener: &str, not_after: SystemTime) {
        let secs = unix_seconds(not_after);
        let mut all = self.not_after.lock();
        match all.iter_mut().find(|(name, _)| name == listener) {
            Some(entry) => entry.1 = secs,
            None => all.push((listener.to_owned(), secs)),
        }
    }

    /// Seconds left on `listener`'s certificate at `now`, if recorded.
    pub fn seconds_left(&self, listener: &str, now: SystemTime) -> Option<i64> {
        let all = self.not_after.lock();
        let (_, not_after) = all.iter().find(|(name, _)| name == listener)?;
        Some(not_after - unix_seconds(now))
    }
}

impl Collector for CertificateExpiry {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let now = unix_seconds(SystemTime::now());
        let all = self.not_after.lock().clone();
        if all.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(
            "tls_certificate_expiry_seconds",
            "Seconds until the listener's leaf certificate expires (not_after); negative once expired",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (listener, not_after) in &all {
            let labels = [("listener", listener.as_str())];
            ConstGauge::new(not_after - now).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// The standard process metrics, under the names the Prometheus client
/// libraries' process collectors use (no `edgegate_` prefix): start time and
/// CPU time read at each scrape (see `process`), virtual memory likewise,
/// and resident memory and descriptors as the `edgegate_process_*` gauges
/// hold them (the admin endpoint refreshes those just before encoding). The
/// alerts and the dashboard use the prefixed names, which no other program
/// on a host exports.
#[derive(Debug)]
struct ProcessCollector {
    resident: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        if let Some(start) = crate::process::start_time_seconds() {
            let g = ConstGauge::new(start);
            g.encode(encoder.encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                None,
                g.metric_type(),
            )?)?;
        }
        if let Some(cpu) = crate::process::cpu_seconds() {
            let c = ConstCounter::new(cpu);
            c.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                c.metric_type(),
            )?)?;
        }
        if let Some(vsz) = crate::process::virtual_bytes() {
            let g = ConstGauge::new(i64::try_from(vsz).unwrap_or(i64::MAX));
            g.encode(encoder.encode_descriptor(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                None,
                g.metric_type(),
            )?)?;
        }
        for (name, help, gauge) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                &self.resident,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                &self.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                &self.max_fds,
            ),
        ] {
            let g = ConstGauge::new(gauge.get());
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}

/// Bucket bounds of `edgegate_runtime_poll_delay_seconds`: 10 µs × 2^k up to
/// ~1.3 s. An idle runtime polls a woken task within tens of microseconds;
/// the production incident this tracks showed up at tens of milliseconds.
pub fn poll_delay_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_01, 2.0, 18)
}

/// Reload results, as the `result` label of `edgegate_config_reloads_total`.
pub const RELOAD_RESULTS: [&str; 2] = ["ok", "rejected"];

impl Metrics {
    /// Creates every metric, registers it in `registry`, and creates the known
    /// label values at zero.
    pub fn new(registry: &mut Registry, services: &[String]) -> Self {
        let m = Self {
            clients: Family::default(),
            clients_accepted: Family::default(),
            clients_closed: Family::default(),
            clients_refused: Counter::default(),
            clients_refused_per_address: Counter::default(),
            handshake_failures: Family::default(),
            handshake_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            accept_errors: Family::default(),
            messages_in: Counter::default(),
            messages_out: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            outbound_dropped: Family::default(),
            links_up: Family::default(),
            service_instances: Family::default(),
            service_instances_linked: Family::default(),
            link_reconnects: Family::default(),
            link_queue_depth: Family::default(),
            link_frames_in: Counter::default(),
            link_frames_out: Counter::default(),
            topics: Gauge::default(),
            subscriptions: Gauge::default(),
            publishes: Counter::default(),
            publish_fanout: Histogram::new(exponential_buckets(1.0, 4.0, 12)),
            publish_delivery: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            drain_closed: Counter::default(),
            listen_overflows: Counter::default(),
            listen_drops: Counter::default(),
            clients_max: Gauge::default(),
            connections: Gauge::default(),
            config_reloads: Family::default(),
            config_restart_pending: Gauge::default(),
            build_info: Family::default(),
            poll_delay: Histogram::new(poll_delay_buckets()),
            runtime_workers: Gauge::default(),
            runtime_alive_tasks: Gauge::default(),
            runtime_global_queue_depth: Gauge::default(),
            runtime_busy: Counter::default(),
            runtime_busy_ratio: Gauge::default(),
            resident_memory: Gauge::default(),
            open_fds: Gauge::default(),
            max_fds: Gauge::default(),
            jemalloc_allocated: Gauge::default(),
            jemalloc_resident: Gauge::default(),
            jemalloc_retained: Gauge::default(),
            certificates: Arc::default(),
        };
        for r in RELOAD_RESULTS {
            let _ = m.config_reloads.get_or_create(&[("result", r)]);
        }
        m.build_info
            .get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        for p in [Protocol::WebSocket, Protocol::Framed] {
            let _ = m.clients.get_or_create(&[("protocol", p.as_str())]);
            let _ = m
                .clients_accepted
                .get_or_create(&[("protocol", p.as_str())]);
        }
        for r in CloseReason::LABELS {
            let _ = m.clients_closed.get_or_create(&[("reason", r)]);
        }
        for p in Phase::ALL {
            let _ = m.handshake_failures.get_or_create(&[("phase", p.as_str())]);
        }
        for e in AcceptError::ALL {
            let _ = m.accept_errors.get_or_create(&[("kind", e.as_str())]);
        }
        for p in [SlowReaderPolicy::DropOldest, SlowReaderPolicy::Close] {
            let _ = m.outbound_dropped.get_or_create(&[("policy", p.as_str())]);
        }
        for s in services {
            let l = [("service", s.clone())];
            let _ = m.links_up.get_or_create(&l);
            let _ = m.service_instances.get_or_create(&l);
            let _ = m.service_instances_linked.get_or_create(&l);
            let _ = m.link_reconnects.get_or_create(&l);
            let _ = m.link_queue_depth.get_or_create(&l);
        }

        registry.register_collector(Box::new(ProcessCollector {
            resident: m.resident_memory.clone(),
            open_fds: m.open_fds.clone(),
            max_fds: m.max_fds.clone(),
        }));
        let r = registry.sub_registry_with_prefix("edgegate");
        r.register_collector(Box::new(m.certificates.clone()));
        r.register(
            "clients",
            "Clients past the upgrade, by listener protocol",
            m.clients.clone(),
        );
        r.register(
            "clients_accepted",
            "Clients that completed TLS and upgrade",
            m.clients_accepted.clone(),
        );
        r.register(
            "clients_closed",
            "Client sessions ended, by close reason",
            m.clients_closed.clone(),
        );
        r.register(
            "clients_refused",
            "Connections closed at accept because max_clients was reached",
            m.clients_refused.clone(),
        );
        r.register(
            "clients_refused_per_address",
            "Connections closed at accept because their address reached max_clients_per_address",
            m.clients_refused_per_address.clone(),
        );
        r.register(
            "handshake_failures",
            "Clients lost before their session, by phase",
            m.handshake_failures.clone(),
        );
        r.register(
            "handshake_duration_seconds",
            "Accept to session start (TLS + upgrade + auth)",
            m.handshake_duration.clone(),
        );
        r.register(
            "accept_errors",
            "accept(2) errors, by kind",
            m.accept_errors.clone(),
        );
        r.register(
            "client_messages_in",
            "Messages received from clients",
            m.messages_in.clone(),
        );
        r.register(
            "client_messages_out",
            "Messages written to clients",
            m.messages_out.clone(),
        );
        r.register(
            "client_bytes_in",
            "Payload bytes received from clients",
            m.bytes_in.clone(),
        );
        r.register(
            "client_bytes_out",
            "Payload bytes written to clients",
            m.bytes_out.clone(),
        );
        r.register(
            "outbound_dropped",
            "Outbound messages dropped by the slow-reader policy",
            m.outbound_dropped.clone(),
        );
        r.register("links_up", "Links up, by service", m.links_up.clone());
        r.register(
            "service_instances",
            "Instances configured, by service",
            m.service_instances.clone(),
        );
        r.register(
            "service_instances_linked",
            "Instances with at least one link up, by service",
            m.service_instances_linked.clone(),
        );
        r.register(
            "link_reconnects",
            "Link dials after the first, by service",
            m.link_reconnects.clone(),
        );
        r.register(
            "link_queue_depth",
            "Frames waiting in link queues, by service",
            m.link_queue_depth.clone(),
        );
        r.register(
            "link_frames_in",
            "Frames received from services",
            m.link_frames_in.clone(),
        );
        r.register(
            "link_frames_out",
            "Frames sent to services",
            m.link_frames_out.clone(),
        );
        r.register(
            "topics",
            "Topics with at least one subscriber",
            m.topics.clone(),
        );
        r.register(
            "subscriptions",
            "Client subscriptions to topics",
            m.subscriptions.clone(),
        );
        r.register(
            "publishes",
            "Publish frames received from services",
            m.publishes.clone(),
        );
        r.register(
            "publish_fanout_clients",
            "Subscribers reached per publish",
            m.publish_fanout.clone(),
        );
        r.register(
            "publish_delivery_seconds",
            "Time to queue one publish to every subscriber",
            m.publish_delivery.clone(),
        );
        r.register(
            "drain_closed_clients",
            "Clients closed with 1001 by a drain",
            m.drain_closed.clone(),
        );
        r.register("listen_overflows", "Connections the kernel dropped on a full accept queue since start-up (host-wide TcpExt ListenOverflows)", m.listen_overflows.clone());
        r.register("listen_drops", "Connections the kernel dropped at listen since start-up (host-wide TcpExt ListenDrops)", m.listen_drops.clone());
        r.register(
            "clients_max",
            "limits.max_clients: connections beyond it are refused",
            m.clients_max.clone(),
        );
        r.register(
            "connections",
            "TCP connections held against max_clients (handshaking or in session)",
            m.connections.clone(),
        );
        r.register(
            "config_reloads",
            "SIGHUP reloads, by result",
            m.config_reloads.clone(),
        );
        r.register(
            "config_restart_pending",
            "Keys changed in the configuration file that apply only after a restart",
            m.config_restart_pending.clone(),
        );
        r.register(
            "build_info",
            "Always 1; the version label carries the build",
            m.build_info.clone(),
        );
        r.register(
            "runtime_poll_delay_seconds",
            "Time from ready to polled of a probe task (scheduler fairness)",
            m.poll_delay.clone(),
        );
        r.register(
            "runtime_workers",
            "Tokio worker threads",
            m.runtime_workers.clone(),
        );
        r.register(
            "runtime_alive_tasks",
            "Tokio tasks alive (one per client, plus links and accept loops)",
            m.runtime_alive_tasks.clone(),
        );
        r.register(
            "runtime_global_queue_depth",
            "Tasks waiting in the Tokio global (injection) queue",
            m.runtime_global_queue_depth.clone(),
        );
        r.register(
            "runtime_worker_busy_seconds",
            "Time Tokio workers spent busy, summed over workers",
            m.runtime_busy.clone(),
        );
        r.register(
            "runtime_worker_busy_ratio",
            "Busy share of the Tokio workers over the last second (0 to 1)",
            m.runtime_busy_ratio.clone(),
        );
        r.register(
            "process_resident_memory_bytes",
            "Resident set size (/proc/self/statm)",
            m.resident_memory.clone(),
        );
        r.register(
            "process_open_fds",
            "Open file descriptors (the kernel's count on Linux >= 6.2; the start-up baseline plus held sockets before)",
            m.open_fds.clone(),
        );
        r.register("process_max_fds", "Soft RLIMIT_NOFILE", m.max_fds.clone());
        r.register("jemalloc_allocated_bytes", "Bytes allocated by the application (jemalloc stats.allocated; 0 when jemalloc is not the allocator)", m.jemalloc_allocated.clone());
        r.register(
            "jemalloc_resident_bytes",
            "Bytes in physically resident data pages mapped by jemalloc (stats.resident)",
            m.jemalloc_resident.clone(),
        );
        r.register(
            "jemalloc_retained_bytes",
            "Bytes in virtual memory jemalloc retained but returned to the OS (stats.retained)",
            m.jemalloc_retained.clone(),
        );
        m
    }

    /// Counts the end of a client session.
    pub fn closed(&self, protocol: Protocol, reason: &CloseReason) {
        self.clients
            .get_or_create(&[("protocol", protocol.as_str())])
            .dec();
        self.clients_closed
            .get_or_create(&[("reason", reason.label())])
            .inc();
    }

    /// Records one probe's lateness (see `scheduler`).
    pub fn poll_delayed(&self, delay: Duration) {
        self.poll_delay.observe(delay.as_secs_f64());
    }

    /// Counts a SIGHUP reload by result.
    pub fn reloaded(&self, ok: bool) {
        let result = if ok {
            RELOAD_RESULTS[0]
        } else {
            RELOAD_RESULTS[1]
        };
        self.config_reloads
            .get_or_create(&[("result", result)])
            .inc();
    }

    /// Counts a client lost before its session.
    pub fn handshake_failed(&self, phase: Phase) {
        self.handshake_failures
            .get_or_create(&[("phase", phase.as_str())])
            .inc();
    }
}
