//! The Tokio runtime, built explicitly, and process limits.

use std::io;

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Builds the multi-threaded runtime with `workers` worker threads.
///
/// # Errors
/// When the runtime cannot start its threads.
pub fn build(workers: usize) -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .thread_name("edgegate-worker")
        .enable_all()
        .build()
}

/// The soft and hard `RLIMIT_NOFILE` after raising.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (Rust does not).
///
/// # Errors
/// When the limit cannot be read or set.
pub fn raise_nofile_limit() -> io::Result<NofileLimit> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
    }
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    Ok(NofileLimit { soft, hard })
}

/// Descriptors the gateway needs besides one per client: links, listeners,
/// the admin endpoint, the runtime's own (epoll, eventfds), logs.
pub const RESERVED_FDS: u64 = 256;
