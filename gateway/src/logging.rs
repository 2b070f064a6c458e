//! Logging set-up: `tracing` events go to the journal when stderr is
//! connected to it (the systemd unit), and to stderr as plain text
//! otherwise. ANSI colours only when stderr is a terminal.
//!
//! "Connected to the journal" is what systemd documents for `JOURNAL_STREAM`:
//! the variable holds `device:inode` of the stream systemd connected to
//! stdout/stderr, and it only counts while stderr still is that stream (a
//! redirect by a wrapper script breaks the match and text goes to stderr).
//!
//! The filter comes from `EDGEGATE_LOG` (`EnvFilter` syntax), default `info`.

use std::io::IsTerminal;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The environment variable holding the log filter.
pub const FILTER_ENV: &str = "EDGEGATE_LOG";

/// Where logs went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Native journal entries (structured fields, priorities).
    Journal,
    /// Text lines on stderr.
    Stderr { ansi: bool },
}

/// Installs the global subscriber and says where it writes. A second call
/// leaves the first subscriber in place.
pub fn init() -> Output {
    let filter = || EnvFilter::try_from_env(FILTER_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
    if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(journal) => {
                // Fields keep the default `F_` prefix (`F_LISTENER`, `F_ERROR`), so
                // none can pose as a trusted journal field.
                let journal = journal.with_syslog_identifier("edgegate".into());
                let _ = tracing_subscriber::registry()
                    .with(filter())
                    .with(journal)
                    .try_init();
                return Output::Journal;
            }
            Err(e) => {
                // Fall through to stderr, which the journal still captures.
                let out = init_stderr(filter());
                tracing::warn!(error = %e, "cannot open the journal socket; logging to stderr");
                return out;
            }
        }
    }
    init_stderr(filter())
}

fn init_stderr(filter: EnvFilter) -> Output {
    let ansi = std::io::stderr().is_terminal();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
    Output::Stderr { ansi }
}

/// Whether stderr is the stream named by `JOURNAL_STREAM`.
pub fn stderr_is_journal() -> bool {
    match std::env::var("JOURNAL_STREAM") {
        Ok(value) => stream_matches(&value, std::io::stderr().as_fd()),
        Err(_) => false,
    }
}

/// Whether `fd` is the stream a `JOURNAL_STREAM` value names.
pub fn stream_matches(journal_stream: &str, fd: BorrowedFd<'_>) -> bool {
    let Some((dev, ino)) = parse_journal_stream(journal_stream) else {
        return false;
    };
    // fstat(2) through a duplicate, so dropping the File cannot close `fd`.
    let Ok(dup) = fd.try_clone_to_owned() else {
        return false;
    };
    match std::fs::File::from(dup).metadata() {
        Ok(meta) => meta.dev() == dev && meta.ino() == ino,
        Err(_) => false,
    }
}

/// Parses `JOURNAL_STREAM`'s `device:inode` (both decimal).
pub fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_is_device_colon_inode() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8:"), None);
        assert_eq!(parse_journal_stream("x:1"), None);
        assert_eq!(parse_journal_stream(""), None);
    }

    #[test]
    fn a_stream_matches_its_own_device_and_inode_only() {
        let file = std::fs::File::open("/proc/self/statm").unwrap();
        let meta = file.metadata().unwrap();
        let own = format!("{}:{}", meta.dev(), meta.ino());
        assert!(stream_matches(&own, file.as_fd()));
        let other = format!("{}:{}", meta.dev(), meta.ino() + 1);
        assert!(!stream_matches(&other, file.as_fd()));
        assert!(!stream_matches("garbage", file.as_fd()));
    }

    #[test]
    fn stderr_is_not_the_journal_without_journal_stream() {
        // The test harness never runs under the journal with this variable
        // pointing at its stderr; if it is set, it names another stream.
        if std::env::var_os("JOURNAL_STREAM").is_none() {
            assert!(!stderr_is_journal());
        }
    }
}
