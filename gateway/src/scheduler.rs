//! Scheduler signals: the first thing to degrade in production was fairness
//! (how long a ready task waits to be polled), long before anything failed.
//!
//! One probe task per gateway, nothing per client:
//! - every [`PROBE_INTERVAL`] it wakes, yields (which makes it ready again at
//!   once, behind whatever else is ready) and records the time until it is
//!   polled again: `edgegate_runtime_poll_delay_seconds`. Yielding measures
//!   the queueing a client's woken task sees, without the timer's own 1 ms
//!   granularity in the number.
//! - every [`SAMPLE_INTERVAL`] it samples Tokio's stable `RuntimeMetrics`:
//!   workers, alive tasks, global queue depth, busy time (counter and ratio).
//! - every [`SUMMARY_INTERVAL`] it logs one `summary` line: the line to grep
//!   during an incident.
//!
//! Its last tick is the liveness signal of `/healthz` ([`Probe::is_live`]).
//!
//! Not exported: per-worker local queue depth, steals, overflows and the
//! poll-time histogram. They need `--cfg tokio_unstable`, which this project
//! does not set (see `docs/monitoring.md`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Protocol;
use crate::links::ServicePool;
use crate::metrics::Metrics;
use crate::state::Shared;

/// How often the probe measures poll delay: 10 samples a second, so the
/// 10 s summary has 100 of them for its p99.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// How often the runtime gauges are sampled.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// How often the summary line is logged.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// A probe that has not ticked for this long means a hung runtime: a ready
/// task has waited 100× the worst delay production ever showed before
/// clients suffered. Liveness failures restart the process (and drop every
/// client), so this errs on the late side.
pub const LIVENESS_MAX_TICK_AGE: Duration = Duration::from_secs(10);

/// The probe's heartbeat, read by `/healthz` and the watchdog.
#[derive(Debug)]
pub struct Probe {
    start: Instant,
    /// Milliseconds since `start` at the last completed probe.
    last_tick_ms: AtomicU64,
}

impl Default for Probe {
    fn default() -> Self {
        Self::new()
    }
}

impl Probe {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            last_tick_ms: AtomicU64::new(0),
        }
    }

    fn tick(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_tick_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the probe last ran.
    pub fn last_tick_age(&self) -> Duration {
        let last = Duration::from_millis(self.last_tick_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    /// The runtime is responsive: the probe ran within [`LIVENESS_MAX_TICK_AGE`].
    pub fn is_live(&self) -> bool {
        self.last_tick_age() <= LIVENESS_MAX_TICK_AGE
    }
}

/// Runs the probe, the sampler and the summary until `stop`. Spawn it once
/// per gateway.
///
/// # Cancel safety
/// Stops at the next await after `stop` is cancelled; it holds nothing that
/// needs cleaning up.
pub async fn run(
    shared: Arc<Shared>,
    pools: Vec<Arc<ServicePool>>,
    probe: Arc<Probe>,
    stop: CancellationToken,
) {
    let handle = Handle::current();
    let mut sampler = RuntimeSampler::new(&handle);
    sampler.sample(&handle, &shared.metrics);
    probe.tick();
    let mut summary = Summary::new(&shared.metrics);
    let mut last_sample = Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(PROBE_INTERVAL) => {}
            () = stop.cancelled() => return,
        }
        let ready = Instant::now();
        tokio::task::yield_now().await;
        let delay = ready.elapsed();
        shared.metrics.poll_delayed(delay);
        summary.delays.push(delay);
        probe.tick();

        if last_sample.elapsed() >= SAMPLE_INTERVAL {
            last_sample = Instant::now();
            sampler.sample(&handle, &shared.metrics);
        }
        if summary.since.elapsed() >= SUMMARY_INTERVAL {
            summary.log(&shared, &pools, &handle);
        }
    }
}

/// Turns Tokio's cumulative per-worker busy time into a counter and a ratio.
#[derive(Debug)]
struct RuntimeSampler {
    last_busy: Duration,
    last_at: Instant,
}

impl RuntimeSampler {
    fn new(handle: &Handle) -> Self {
        Self {
            last_busy: total_busy(handle),
            last_at: Instant::now(),
        }
    }

    fn sample(&mut self, handle: &Handle, m: &Metrics) {
        let rm = handle.metrics();
        let workers = rm.num_workers();
        m.runtime_workers
            .set(i64::try_from(workers).unwrap_or(i64::MAX));
        m.runtime_alive_tasks
            .set(i64::try_from(rm.num_alive_tasks()).unwrap_or(i64::MAX));
        m.runtime_global_queue_depth
            .set(i64::try_from(rm.global_queue_depth()).unwrap_or(i64::MAX));

        let busy = total_busy(handle);
        let now = Instant::now();
        let gained = busy.saturating_sub(self.last_busy);
        let wall = now.duration_since(self.last_at);
        // The counter follows the runtime's own total (it only grows).
        let counted = m.runtime_busy.get();
        if busy.as_secs_f64() > counted {
            m.runtime_busy.inc_by(busy.as_secs_f64() - counted);
        }
        if workers > 0 && !wall.is_zero() {
            let ratio = gained.as_secs_f64() / (wall.as_secs_f64() * workers as f64);
            m.runtime_busy_ratio.set(ratio.clamp(0.0, 1.0));
        }
        self.last_busy = busy;
        self.last_at = now;
    }
}

fn total_busy(handle: &Handle) -> Duration {
    let rm = handle.metrics();
    (0..rm.num_workers())
        .map(|w| rm.worker_total_busy_duration(w))
        .sum()
}

/// What the summary line compares against: the previous line's counters.
#[derive(Debug)]
struct Summary {
    since: Instant,
    delays: Vec<Duration>,
    accepted: u64,
    closed: u64,
    failed: u64,
}

impl Summary {
    fn new(m: &Metrics) -> Self {
        let (accepted, closed, failed) = client_counters(m);
        Self {
            since: Instant::now(),
            delays: Vec::with_capacity(128),
            accepted,
            closed,
            failed,
        }
    }

    /// Logs one line and starts the next window.
    fn log(&mut self, shared: &Shared, pools: &[Arc<ServicePool>], handle: &Handle) {
        let m = &shared.metrics;
        let secs = self.since.elapsed().as_secs_f64().max(0.001);
        let (accepted, closed, failed) = client_counters(m);
        let per_sec = |now: u64, before: u64| now.saturating_sub(before) as f64 / secs;
        let links_up: usize = pools.iter().map(|p| p.links_up()).sum();
        let rss_mib = crate::process::resident_bytes().unwrap_or(0) / (1024 * 1024);
        let rm = handle.metrics();
        let p99 = percentile(&mut self.delays, 0.99);
        let max = self.delays.last().copied().unwrap_or_default();
        // Everything in the message itself: journald shows only MESSAGE by
        // default, and this is the line people grep.
        info!(
            target: "edgegate::summary",
            "summary poll_delay_p99_ms={:.3} poll_delay_max_ms={:.3} busy={:.2} alive_tasks={} global_queue={} \
             clients={} connections={} accepts_per_sec={:.1} closes_per_sec={:.1} handshake_failures_per_sec={:.1} \
             links_up={links_up} rss_mib={rss_mib}",
            p99.as_secs_f64() * 1000.0,
            max.as_secs_f64() * 1000.0,
            m.runtime_busy_ratio.get(),
            rm.num_alive_tasks(),
            rm.global_queue_depth(),
            shared.clients.len(),
            shared.admission.connections(),
            per_sec(accepted, self.accepted),
            per_sec(closed, self.closed),
            per_sec(failed, self.failed),
        );
        self.since = Instant::now();
        self.delays.clear();
        self.accepted = accepted;
        self.closed = closed;
        self.failed = failed;
    }
}

/// Clients accepted, closed and lost in handshake so far (every label summed).
fn client_counters(m: &Metrics) -> (u64, u64, u64) {
    let accepted = [Protocol::WebSocket, Protocol::Framed]
        .iter()
        .map(|p| {
            m.clients_accepted
                .get_or_create(&[("protocol", p.as_str())])
                .get()
        })
        .sum();
    let closed = crate::close::CloseReason::LABELS
        .iter()
        .map(|r| m.clients_closed.get_or_create(&[("reason", *r)]).get())
        .sum();
    let failed = crate::metrics::Phase::ALL
        .iter()
        .map(|p| {
            m.handshake_failures
                .get_or_create(&[("phase", p.as_str())])
                .get()
        })
        .sum();
    (accepted, closed, failed)
}

/// The `q` quantile (nearest rank) of `samples`, which it sorts (so the
/// last sample is the maximum afterwards).
fn percentile(samples: &mut [Duration], q: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let mut v: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        assert_eq!(percentile(&mut v, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&mut v, 1.0), Duration::from_millis(100));
        assert_eq!(percentile(&mut [], 0.99), Duration::ZERO);
        assert_eq!(
            percentile(&mut [Duration::from_millis(7)], 0.99),
            Duration::from_millis(7)
        );
    }

    #[test]
    fn a_fresh_probe_is_live_and_an_old_one_is_not() {
        let p = Probe::new();
        assert!(p.is_live());
        let old = Probe {
            start: Instant::now() - LIVENESS_MAX_TICK_AGE - Duration::from_secs(1),
            last_tick_ms: AtomicU64::new(0),
        };
        assert!(!old.is_live());
    }
}
