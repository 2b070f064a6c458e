//! The process's life under signals: start, reload on SIGHUP, drain on
//! SIGTERM (SIGINT drains faster), exit at once on a second SIGTERM/SIGINT.

use std::path::Path;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::gateway::{Gateway, StartError};
use crate::runtime::{nofile_warning, raise_nofile_limit};
use crate::systemd;

/// The drain window for SIGINT (an operator at a terminal wants the prompt back).
pub const INTERRUPT_DRAIN_WINDOW: Duration = Duration::from_secs(1);

/// Why `run` failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error("second signal during drain; exited without finishing it")]
    Interrupted,
}

/// Runs the gateway until a signal stops it. Must be called inside the runtime.
///
/// # Errors
/// [`RunError`] when the gateway cannot start, or a second stop signal cut the drain.
pub async fn run(config: Config) -> Result<(), RunError> {
    let links: usize = config.services.iter().map(|s| s.links).sum();
    match raise_nofile_limit() {
        Ok(limit) => {
            info!(soft = limit.soft, hard = limit.hard, "RLIMIT_NOFILE");
            if let Some(w) = nofile_warning(limit, config.limits.max_clients, links) {
                warn!("{w}");
            }
        }
        Err(e) => warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
    }
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(RunError::Signal)?;

    let gateway = Gateway::start(&config).await?;
    let status_stop = CancellationToken::new();
    tokio::spawn(systemd::watchdog_and_status(gateway.shared().clone(), status_stop.clone()));
    systemd::ready("serving");
    info!(version = env!("CARGO_PKG_VERSION"), "ready");

    let window = loop {
        tokio::select! {
            _ = hup.recv() => reload(&gateway, &config.path),
            _ = term.recv() => break config.drain_window,
            _ = int.recv() => break config.drain_window.min(INTERRUPT_DRAIN_WINDOW),
        }
    };
    systemd::stopping();
    let drain = gateway.shutdown(window);
    let result = tokio::select! {
        () = drain => Ok(()),
        _ = term.recv() => Err(RunError::Interrupted),
        _ = int.recv() => Err(RunError::Interrupted),
    };
    status_stop.cancel();
    result
}

/// SIGHUP: re-read the file; a bad file is logged and the old config stays.
fn reload(gateway: &Gateway, path: &Path) {
    systemd::reloading();
    match Config::load(path) {
        Ok(new) => match gateway.reload(&new) {
            Ok(()) => {}
            Err(e) => error!(error = %e, "reload rejected; keeping the running configuration"),
        },
        Err(e) => error!(error = %e, "reload rejected; keeping the running configuration"),
    }
    systemd::ready("serving");
}
