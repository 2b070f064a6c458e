//! The process as the kernel and the allocator see it: resident memory, open
//! descriptors and jemalloc's own counters, read cheaply enough to run on
//! every scrape of a process holding millions of descriptors.
//!
//! - Resident memory: `/proc/self/statm` (one short line), not `status` or
//!   `smaps`.
//! - Open descriptors: `stat("/proc/self/fd").st_size`, which Linux ≥ 6.2
//!   reports as the number of open descriptors. Listing the directory would
//!   cost O(clients) per scrape, so it is never done: on older kernels the
//!   series is not exported (`st_size` is 0 there).
//! - jemalloc: `stats.allocated`, `stats.resident`, `stats.retained` after an
//!   epoch advance, only once the binary has said jemalloc is its global
//!   allocator ([`enable_jemalloc_stats`]); a library user or a test with the
//!   system allocator keeps these at 0.

use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::resource::{getrlimit, Resource};

use crate::metrics::Metrics;

static JEMALLOC_STATS: AtomicBool = AtomicBool::new(false);

/// Says that jemalloc is the process's global allocator, so its statistics
/// describe the whole heap. The `edgegate` binary calls it first thing.
pub fn enable_jemalloc_stats() {
    JEMALLOC_STATS.store(true, Ordering::Relaxed);
}

/// Resident set size in bytes, from `/proc/self/statm` (pages × page size).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| u64::try_from(p).ok())
        .unwrap_or(4096)
}

/// Open file descriptors, when the kernel reports them as the size of
/// `/proc/self/fd` (Linux ≥ 6.2); `None` otherwise. Never lists the directory.
pub fn open_fds() -> Option<u64> {
    let size = std::fs::metadata("/proc/self/fd").ok()?.len();
    // A process always has some descriptor open (this one's stdin at least,
    // or the runtime's epoll), so 0 means "not reported".
    (size > 0).then_some(size)
}

/// The soft `RLIMIT_NOFILE`.
pub fn max_fds() -> Option<u64> {
    getrlimit(Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}

/// jemalloc's allocated, resident and retained bytes, when jemalloc is the
/// global allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JemallocStats {
    pub allocated: u64,
    pub resident: u64,
    pub retained: u64,
}

/// Reads jemalloc's statistics; `None` unless [`enable_jemalloc_stats`] was
/// called or when jemalloc refuses (built without statistics).
pub fn jemalloc_stats() -> Option<JemallocStats> {
    use tikv_jemalloc_ctl::{epoch, stats};
    if !JEMALLOC_STATS.load(Ordering::Relaxed) {
        return None;
    }
    // The statistics are cached per epoch: advance it to read fresh values.
    epoch::advance().ok()?;
    Some(JemallocStats {
        allocated: stats::allocated::read().ok()? as u64,
        resident: stats::resident::read().ok()? as u64,
        retained: stats::retained::read().ok()? as u64,
    })
}

/// Sets the process gauges from fresh readings. Cheap: a few small reads,
/// whatever the number of clients.
pub fn refresh(metrics: &Metrics) {
    if let Some(rss) = resident_bytes() {
        metrics.resident_memory.set(saturating_i64(rss));
    }
    if let Some(fds) = open_fds() {
        metrics.open_fds.set(saturating_i64(fds));
    }
    if let Some(max) = max_fds() {
        metrics.max_fds.set(saturating_i64(max));
    }
    if let Some(j) = jemalloc_stats() {
        metrics.jemalloc_allocated.set(saturating_i64(j.allocated));
        metrics.jemalloc_resident.set(saturating_i64(j.resident));
        metrics.jemalloc_retained.set(saturating_i64(j.retained));
    }
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_memory_is_read_from_statm() {
        let rss = resident_bytes().expect("statm readable");
        assert!(rss > 1024 * 1024, "{rss}");
    }

    #[test]
    fn open_fds_follow_opened_files_when_the_kernel_reports_them() {
        let Some(before) = open_fds() else {
            eprintln!("skipped: this kernel does not report the fd count as the size of /proc/self/fd (Linux < 6.2)");
            return;
        };
        let files: Vec<_> = (0..8)
            .filter_map(|_| std::fs::File::open("/proc/self/statm").ok())
            .collect();
        let after = open_fds().expect("still reported");
        // Other tests open and close descriptors concurrently: allow slack.
        assert!(
            after + 4 >= before + files.len() as u64,
            "{before} -> {after}"
        );
    }

    #[test]
    fn jemalloc_stats_stay_off_until_enabled() {
        // The test binary does not use jemalloc as its allocator.
        if !JEMALLOC_STATS.load(Ordering::Relaxed) {
            assert!(jemalloc_stats().is_none());
        }
    }
}
