//! The process's life under signals: start, reload on SIGHUP, drain on
//! SIGTERM (SIGINT drains faster), exit at once on a second SIGTERM/SIGINT.

use std::path::Path;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::gateway::{Gateway, StartError};
use crate::runtime::raise_nofile_limit;
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
    match raise_nofile_limit() {
        Ok(limit) => info!(soft = limit.soft, hard = limit.hard, "RLIMIT_NOFILE"),
        Err(e) => warn!(error = %e, "cannot raise RLIMIT_NOFILE"),
    }
    // The same findings as `edgegate tune --check`, against the raised limits.
    for finding in crate::preflight::check(&config, &crate::preflight::Host::read()) {
        warn!(
            check = finding.check,
            severity = finding.severity.as_str(),
            "{}",
            finding.message
        );
    }
    let signals = Signals::install()?;
    let gateway = Gateway::start(&config).await?;
    serve(gateway, &config, signals).await
}

/// The stop and reload signals, installed before the gateway starts so none
/// is missed while it binds.
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// # Errors
    /// [`RunError::Signal`] when a handler cannot be installed.
    pub fn install() -> Result<Self, RunError> {
        Ok(Self {
            term: signal(SignalKind::terminate()).map_err(RunError::Signal)?,
            int: signal(SignalKind::interrupt()).map_err(RunError::Signal)?,
            hup: signal(SignalKind::hangup()).map_err(RunError::Signal)?,
        })
    }
}

/// The one lifecycle of a started gateway, shared by `run` and `demo`:
/// READY, reload on SIGHUP, drain over `drain_window_secs` on SIGTERM (SIGINT
/// drains faster), exit at once on a second stop signal.
///
/// # Errors
/// [`RunError::Interrupted`] when a second stop signal cut the drain.
pub async fn serve(gateway: Gateway, config: &Config, signals: Signals) -> Result<(), RunError> {
    let Signals {
        mut term,
        mut int,
        mut hup,
    } = signals;
    // READY=1 first (every listener and the admin endpoint are bound), then
    // the watchdog and status refresh from inside the runtime.
    systemd::ready(&gateway.status_text());
    let status_stop = CancellationToken::new();
    let shared = gateway.shared().clone();
    tokio::spawn(systemd::watchdog_and_status(
        move || shared.status_text(),
        status_stop.clone(),
    ));
    info!(version = env!("CARGO_PKG_VERSION"), admin = %gateway.admin_addr(), "ready");

    // The drain timings of the latest accepted file: a reload applies them.
    let (mut grace, mut window) = (config.lb_grace, config.drain_window);
    let (grace, window) = loop {
        tokio::select! {
            _ = hup.recv() => {
                if let Some(new) = reload(&gateway, &config.path) {
                    (grace, window) = (new.lb_grace, new.drain_window);
                }
            }
            _ = term.recv() => break (grace, window),
            // An operator at a terminal wants the prompt back: no grace.
            _ = int.recv() => break (Duration::ZERO, window.min(INTERRUPT_DRAIN_WINDOW)),
        }
    };
    systemd::stopping();
    let drain = gateway.drain(grace, window);
    let result = tokio::select! {
        () = drain => Ok(()),
        _ = term.recv() => Err(RunError::Interrupted),
        _ = int.recv() => Err(RunError::Interrupted),
    };
    status_stop.cancel();
    result
}

/// SIGHUP: re-read the file; a bad file is logged and the old config stays.
/// Returns the new config when it was applied.
fn reload(gateway: &Gateway, path: &Path) -> Option<Config> {
    systemd::reloading();
    let result = match Config::load(path) {
        Ok(new) => gateway
            .reload(&new)
            .map(|()| new)
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = &result {
        error!(error = %e, "reload rejected; keeping the running configuration");
    }
    gateway.metrics().reloaded(result.is_ok());
    systemd::ready(&gateway.status_text());
    result.ok()
}
