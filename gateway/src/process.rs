//! The process as the kernel and the allocator see it: resident memory, open
//! descriptors and jemalloc's own counters, read cheaply enough to run on
//! every scrape of a process holding millions of descriptors.
//!
//! - Resident memory: `/proc/self/statm` (one short line), not `status` or
//!   `smaps`.
//! - Open descriptors: `stat("/proc/self/fd").st_size`, which Linux ≥ 6.2
//!   reports as the number of open descriptors. Older kernels (Debian 12's
//!   6.1) report 0 there, and listing the directory would cost O(clients)
//!   per scrape, so there the count is the descriptors listed once at
//!   start-up, before any client or link ([`record_baseline_fds`]), plus the
//!   sockets the gateway holds now (accepted connections and links). It
//!   misses short-lived descriptors (an admin scrape's own connection, a
//!   file being read), a handful against limits in the millions.
//! - jemalloc: `stats.allocated`, `stats.resident`, `stats.retained` after an
//!   epoch advance, only once the binary has said jemalloc is its global
//!   allocator ([`enable_jemalloc_stats`]); a library user or a test with the
//!   system allocator keeps these at 0.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nix::sys::resource::{getrlimit, Resource};

static JEMALLOC_STATS: AtomicBool = AtomicBool::new(false);

/// Descriptors open before the gateway held any client or link; 0 until
/// [`record_baseline_fds`] ran.
static BASELINE_FDS: AtomicU64 = AtomicU64::new(0);

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

/// Lists `/proc/self/fd` once, while the process holds only its own files,
/// listeners and admin socket, as the base that [`open_fds`] adds held
/// sockets to on kernels that do not report the count. Called by the gateway
/// after binding and before it accepts or dials anything.
pub fn record_baseline_fds() {
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        // The listing's own descriptor is in it and closes afterwards.
        let n = dir.count().saturating_sub(1) as u64;
        BASELINE_FDS.store(n, Ordering::Relaxed);
    }
}

/// Open file descriptors: the kernel's count where it reports one (Linux ≥
/// 6.2), else the start-up baseline plus `held_sockets` (the clients'
/// connections and links the gateway holds now); `None` when neither is
/// known. Never lists the directory.
pub fn open_fds(held_sockets: u64) -> Option<u64> {
    let size = std::fs::metadata("/proc/self/fd").map_or(0, |m| m.len());
    count_fds(size, BASELINE_FDS.load(Ordering::Relaxed), held_sockets)
}

/// A process always has some descriptor open (the runtime's epoll at
/// least), so a size or a baseline of 0 means "not reported".
fn count_fds(fd_dir_size: u64, baseline: u64, held_sockets: u64) -> Option<u64> {
    if fd_dir_size > 0 {
        Some(fd_dir_size)
    } else if baseline > 0 {
        Some(baseline + held_sockets)
    } else {
        None
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_memory_is_read_from_statm() {
        let rss = resident_bytes().expect("statm readable");
        assert!(rss > 1024 * 1024, "{rss}");
    }

    #[test]
    fn open_fds_follow_opened_files() {
        record_baseline_fds();
        let before = open_fds(0).expect("reported by the kernel or the baseline");
        let files: Vec<_> = (0..8)
            .filter_map(|_| std::fs::File::open("/proc/self/statm").ok())
            .collect();
        // Files the gateway does not count are seen only where the kernel
        // reports the count; the held sockets are added on every kernel.
        let after = open_fds(files.len() as u64).expect("still reported");
        // Other tests open and close descriptors concurrently: allow slack.
        assert!(
            after + 4 >= before + files.len() as u64,
            "{before} -> {after}"
        );
    }

    #[test]
    fn without_the_kernels_count_the_baseline_plus_held_sockets_is_reported() {
        // Linux 6.1 reports st_size 0 for /proc/self/fd.
        assert_eq!(count_fds(0, 12, 1000), Some(1012));
        assert_eq!(count_fds(0, 0, 1000), None, "no baseline recorded");
        assert_eq!(
            count_fds(1234, 12, 1000),
            Some(1234),
            "the kernel's count wins"
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
