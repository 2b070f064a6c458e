//! The process as the kernel and the allocator see it: memory, CPU time,
//! start time, open descriptors and jemalloc's own counters, read cheaply
//! enough to run on every scrape of a process holding millions of
//! descriptors.
//!
//! - Resident and virtual memory: `/proc/self/statm` (one short line), not
//!   `status` or `smaps`.
//! - CPU time: `getrusage(RUSAGE_SELF)`, user plus system, to the
//!   microsecond (`/proc/self/stat` counts in 10 ms clock ticks).
//! - Start time: the process's start in clock ticks after boot
//!   (`/proc/self/stat`) plus the boot time (`btime` in `/proc/stat`), read
//!   once: the same figure `ps` shows, whenever the gateway was built.
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

use std::sync::OnceLock;

use nix::sys::resource::{getrlimit, getrusage, Resource, UsageWho};

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
    statm_bytes(1)
}

/// Virtual memory size in bytes, from `/proc/self/statm`.
pub fn virtual_bytes() -> Option<u64> {
    statm_bytes(0)
}

/// Field `index` of `/proc/self/statm` (in pages), in bytes.
fn statm_bytes(index: usize) -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(index)?.parse().ok()?;
    Some(pages * page_size())
}

/// CPU time the process has used, user plus system, in seconds.
pub fn cpu_seconds() -> Option<f64> {
    let usage = getrusage(UsageWho::RUSAGE_SELF).ok()?;
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    Some(secs(usage.user_time()) + secs(usage.system_time()))
}

/// When the process started, in seconds since the Unix epoch (read once).
pub fn start_time_seconds() -> Option<f64> {
    static START: OnceLock<Option<f64>> = OnceLock::new();
    *START.get_or_init(|| {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()?;
        start_time_from(&stat, &boot, ticks as f64)
    })
}

/// The start time from the texts of `/proc/self/stat` and `/proc/stat` and
/// the clock ticks per second.
fn start_time_from(stat: &str, boot: &str, ticks_per_second: f64) -> Option<f64> {
    // Field 2, the command, is in parentheses and may hold spaces or ')':
    // count fields from the last ')'. `starttime` is field 22 overall, the
    // 20th after the command.
    let after_command = &stat[stat.rfind(')')? + 1..];
    let start_ticks: f64 = after_command.split_whitespace().nth(19)?.parse().ok()?;
    let btime: f64 = boot
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    (ticks_per_second > 0.0).then(|| btime + start_ticks / ticks_per_second)
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
    fn virtual_memory_is_at_least_the_resident_memory() {
        let (vsz, rss) = (virtual_bytes().unwrap(), resident_bytes().unwrap());
        assert!(vsz >= rss, "virtual {vsz} < resident {rss}");
    }

    #[test]
    fn cpu_time_grows_with_work() {
        let before = cpu_seconds().expect("getrusage");
        // Spin until the counter moves (microseconds resolution; bounded).
        let mut x = 0u64;
        let mut after = before;
        for _ in 0..10_000 {
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
            after = cpu_seconds().unwrap();
            if after > before {
                break;
            }
        }
        assert!(after > before, "{before} -> {after}");
    }

    #[test]
    fn start_time_is_read_after_the_command_field() {
        // A command with a space and a ')' of its own; starttime = 4200
        // ticks after a boot at 1_700_000_000.
        let stat =
            "1234 (a) b) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 4 0 4200 1000 100";
        let boot = "cpu  1 2 3\nbtime 1700000000\nprocesses 9\n";
        assert_eq!(start_time_from(stat, boot, 100.0), Some(1_700_000_042.0));
        assert_eq!(start_time_from(stat, "cpu 1\n", 100.0), None);
    }

    #[test]
    fn this_process_started_in_the_past_but_after_boot_and_2020() {
        let start = start_time_seconds().expect("/proc readable");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        // A clock-tick rounding of at most 10 ms either way.
        assert!(start <= now + 1.0, "start {start} after now {now}");
        assert!(start > 1_577_836_800.0, "start {start} before 2020");
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
