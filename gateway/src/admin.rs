//! The admin endpoint: a separate HTTP/1 listener (`[admin] bind`, default
//! `127.0.0.1:7611`), never the client port.
//!
//! | path | answers |
//! |---|---|
//! | `/metrics` | every metric, Prometheus/OpenMetrics text |
//! | `/healthz` | 200 while the runtime is responsive (the scheduler probe ticked within [`LIVENESS_MAX_TICK_AGE`](crate::scheduler::LIVENESS_MAX_TICK_AGE)), else 503 |
//! | `/readyz`  | 200 when the listeners are bound and every service has a link up (naming each service with instances unlinked, "2 of 3"); 503 otherwise and while draining |
//!
//! HTTP is hyper's: one small task per admin connection, at most
//! [`MAX_CONNECTIONS`] at once, each with a header-read timeout, so a stuck
//! scraper cannot hold resources the clients need.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::links::ServicePool;
use crate::metrics::Metrics;
use crate::scheduler::Probe;
use crate::state::{Admission, Lifecycle};

/// Admin connections served at once; more wait in the kernel's accept queue.
/// Scrapers and health checkers are a handful per host.
pub const MAX_CONNECTIONS: usize = 32;

/// How long a connection may take to send its request headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an open admin connection may finish its request once the gateway stops.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The OpenMetrics text format `prometheus-client` writes, served to
/// scrapers that ask for it (Prometheus does, in its `Accept` header).
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The classic Prometheus text format, served to everyone else (curl,
/// `promtool check metrics`, older scrapers).
const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the admin endpoint reads: a shareable view of a running gateway,
/// made of the narrow handles it needs (the metrics and their registry,
/// connection counts, the lifecycle for readiness, link pools, the probe).
#[derive(Debug)]
pub struct GatewayView {
    registry: Registry,
    metrics: Arc<Metrics>,
    admission: Arc<Admission>,
    lifecycle: Arc<Lifecycle>,
    pools: Vec<Arc<ServicePool>>,
    probe: Arc<Probe>,
}

pub use crate::readiness::{Degraded, NotReady};

impl GatewayView {
    pub fn new(
        registry: Registry,
        metrics: Arc<Metrics>,
        admission: Arc<Admission>,
        lifecycle: Arc<Lifecycle>,
        pools: Vec<Arc<ServicePool>>,
        probe: Arc<Probe>,
    ) -> Self {
        Self {
            registry,
            metrics,
            admission,
            lifecycle,
            pools,
            probe,
        }
    }

    /// The text exposition of every metric, with the scrape-time gauges
    /// (link queues, connections, process) refreshed first.
    pub fn encode_metrics(&self) -> String {
        let m = &self.metrics;
        for pool in &self.pools {
            let label = [("service", pool.name.to_string())];
            m.link_queue_depth
                .get_or_create(&label)
                .set(saturating_i64(pool.queued_frames() as u64));
            m.service_instances
                .get_or_create(&label)
                .set(saturating_i64(pool.instances() as u64));
            m.service_instances_linked
                .get_or_create(&label)
                .set(saturating_i64(pool.instances_linked() as u64));
        }
        m.connections
            .set(i64::try_from(self.admission.connections()).unwrap_or(i64::MAX));
        // Process gauges: a few small reads, whatever the number of clients.
        let links: usize = self.pools.iter().map(|p| p.links_up()).sum();
        let held_sockets = (self.admission.connections() + links) as u64;
        if let Some(rss) = crate::process::resident_bytes() {
            m.resident_memory.set(saturating_i64(rss));
        }
        if let Some(fds) = crate::process::open_fds(held_sockets) {
            m.open_fds.set(saturating_i64(fds));
        }
        if let Some(max) = crate::process::max_fds() {
            m.max_fds.set(saturating_i64(max));
        }
        if let Some(j) = crate::process::jemalloc_stats() {
            m.jemalloc_allocated.set(saturating_i64(j.allocated));
            m.jemalloc_resident.set(saturating_i64(j.resident));
            m.jemalloc_retained.set(saturating_i64(j.retained));
        }

        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// `Ok` when ready for clients: not draining and every service has a
    /// link up. A service with some instances unlinked is still served (by
    /// the others); the `Ok` names each such service and how many of its
    /// instances are linked, so the operator sees "2 of 3".
    ///
    /// # Errors
    /// The first reason it is not.
    pub fn readiness(&self) -> Result<Vec<Degraded>, NotReady> {
        crate::readiness::readiness(&self.lifecycle, &self.pools)
    }

    pub fn is_ready(&self) -> bool {
        self.readiness().is_ok()
    }

    /// The runtime is responsive (the scheduler probe ticked recently).
    pub fn is_live(&self) -> bool {
        self.probe.is_live()
    }

    pub fn probe(&self) -> &Arc<Probe> {
        &self.probe
    }
}

/// Why the admin endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("admin endpoint: bind {addr}: {source}")]
pub struct AdminBindError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds the admin listener (port 0 picks a free port).
///
/// # Errors
/// [`AdminBindError`] when the address is taken or not local.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminBindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminBindError { addr, source })
}

/// A running admin endpoint.
#[derive(Debug)]
pub struct AdminServer {
    addr: SocketAddr,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl AdminServer {
    /// Serves `view` on `listener` until [`AdminServer::stop`].
    pub fn spawn(listener: TcpListener, view: Arc<GatewayView>) -> AdminServer {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let stop = CancellationToken::new();
        info!(%addr, "admin endpoint listening (/metrics, /healthz, /readyz)");
        let task = tokio::spawn(serve(listener, view, stop.clone()));
        AdminServer {
            addr,
            stop,
            task: Some(task),
        }
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets open requests finish (bounded) and waits for it.
    pub async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The accept loop. Accept errors never end it (they are logged at debug
/// and retried after a pause); only `stop` does.
async fn serve(listener: TcpListener, view: Arc<GatewayView>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        // Wait for a free slot first, so excess scrapers queue in the kernel.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = stop.cancelled() => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let view = view.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            serve_connection(stream, view, stop).await;
            drop(permit);
        });
        // Reap finished connections so the set stays small.
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

async fn serve_connection(stream: TcpStream, view: Arc<GatewayView>, stop: CancellationToken) {
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let response = respond(&view, &req);
        async move { Ok::<_, Infallible>(response) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(error = %e, "admin connection failed");
            }
        }
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
        }
    }
}

/// One request → one response; never fails.
fn respond<B>(view: &GatewayView, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let openmetrics = req
                .headers()
                .get_all(ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/openmetrics-text"));
            let text = view.encode_metrics();
            let (body, content_type) = if openmetrics {
                (text, OPENMETRICS_CONTENT_TYPE)
            } else {
                (to_prometheus_text(&text), PROMETHEUS_CONTENT_TYPE)
            };
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            r
        }
        "/healthz" => {
            if view.is_live() {
                text(StatusCode::OK, "ok\n".into())
            } else {
                let age = view.probe.last_tick_age();
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "runtime unresponsive: probe last ran {:.1} s ago\n",
                        age.as_secs_f64()
                    ),
                )
            }
        }
        "/readyz" => match view.readiness() {
            Ok(degraded) => {
                let mut body = String::from("ready\n");
                for d in degraded {
                    body.push_str(&format!("{d}\n"));
                }
                text(StatusCode::OK, body)
            }
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/" => text(
            StatusCode::OK,
            "edgegate admin: /metrics /healthz /readyz\n".into(),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz, /readyz\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Rewrites OpenMetrics text as the classic Prometheus text format (0.0.4).
/// The samples are the same; the differences are in the metadata: a counter
/// family is named with its `_total` suffix in `# HELP`/`# TYPE`, and there
/// are no `# UNIT` or `# EOF` lines.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // `# HELP` comes before `# TYPE`; hold it until the type is known.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            let kind = match kind {
                "counter" | "gauge" | "histogram" | "summary" => kind,
                _ => "untyped",
            };
            if let Some((_, text)) = help.take() {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        } else {
            if let Some((name, text)) = help.take() {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_with_total_in_prometheus_text() {
        let om = "# HELP edgegate_publishes Publish frames.\n# TYPE edgegate_publishes counter\nedgegate_publishes_total 3\n\
                  # HELP edgegate_topics Topics.\n# TYPE edgegate_topics gauge\n# UNIT edgegate_topics topics\nedgegate_topics 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP edgegate_publishes_total Publish frames.\n# TYPE edgegate_publishes_total counter\nedgegate_publishes_total 3\n\
             # HELP edgegate_topics Topics.\n# TYPE edgegate_topics gauge\nedgegate_topics 1\n"
        );
    }
}
