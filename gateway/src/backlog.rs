//! Accept-queue overflows, made visible.
//!
//! When a listener's accept queue (the `backlog`, capped by
//! `net.core.somaxconn`) is full, the kernel drops the connection and counts
//! it in `TcpExt: ListenOverflows` / `ListenDrops` (`/proc/net/netstat`),
//! host-wide. Nothing else says so: the client just retries its SYN. This
//! watcher turns those kernel counters into `edgegate_listen_overflows_total`
//! and `edgegate_listen_drops_total` and logs a warning naming the fix when
//! they grow. Reading the file is O(1) in clients.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::metrics::Metrics;

/// How often the kernel counters are read.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(5);

/// `(ListenOverflows, ListenDrops)` from `/proc/net/netstat`.
pub fn read_listen_counters() -> Option<(u64, u64)> {
    parse_netstat(&std::fs::read_to_string("/proc/net/netstat").ok()?)
}

/// Parses the `TcpExt:` header/value line pair.
pub fn parse_netstat(text: &str) -> Option<(u64, u64)> {
    let mut lines = text.lines();
    while let Some(header) = lines.next() {
        let values = lines.next()?;
        if !header.starts_with("TcpExt:") {
            continue;
        }
        let find = |name: &str| -> Option<u64> {
            let i = header.split_whitespace().position(|h| h == name)?;
            values.split_whitespace().nth(i)?.parse().ok()
        };
        return Some((find("ListenOverflows")?, find("ListenDrops")?));
    }
    None
}

/// Watches the counters until `stop`: counts the increase since start-up and
/// warns when it grows.
pub async fn watch(metrics: &Metrics, backlogs: Vec<(String, u32)>, stop: CancellationToken) {
    let Some((mut overflows, mut drops)) = read_listen_counters() else {
        return;
    };
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let Some((o, d)) = read_listen_counters() else {
            return;
        };
        let (new_o, new_d) = (o.saturating_sub(overflows), d.saturating_sub(drops));
        metrics.listen_overflows.inc_by(new_o);
        metrics.listen_drops.inc_by(new_d);
        if new_o > 0 || new_d > 0 {
            warn!(
                overflows = new_o,
                drops = new_d,
                listeners = ?backlogs,
                "kernel dropped connections on a full accept queue (host-wide ListenOverflows); raise the listener backlog and net.core.somaxconn, or handshake_permits if the gateway is idle"
            );
        }
        (overflows, drops) = (o, d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netstat_tcpext_counters_are_found_by_name() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 1 42 43\nIpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(parse_netstat(text), Some((42, 43)));
        assert_eq!(parse_netstat("IpExt: A\nIpExt: 1\n"), None);
    }

    #[test]
    fn this_kernel_exposes_the_counters() {
        assert!(read_listen_counters().is_some());
    }
}
