//! The process's life under signals: start, reload on SIGHUP, drain on
//! SIGTERM (SIGINT drains faster), exit at once on a second SIGTERM/SIGINT;
//! and an upgrade asked for on the control socket: hand the listening
//! sockets to a successor, then drain (see `handover`).

use std::path::Path;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::gateway::{Gateway, StartError};
use crate::handover::{Adopted, Control, HandoverError};
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
    #[error("upgrade: {0}")]
    Handover(#[from] HandoverError),
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
    let Some(mut adopted) = Adopted::take_from_env()? else {
        let gateway = Gateway::start(&config).await?;
        let control = config
            .control_socket
            .as_deref()
            .and_then(|p| Control::open(p, None));
        return serve(gateway, &config, signals, control).await;
    };
    // A successor: accept on the predecessor's sockets, get the links up
    // (bounded), say ready, and serve once made main.
    let parent = adopted.parent;
    info!(parent, "taking over the listening sockets");
    let sockets = std::mem::take(&mut adopted.sockets);
    let gateway = Gateway::start_adopting(&config, sockets).await?;
    let inherited_control = adopted.control.take();
    let control = config
        .control_socket
        .as_deref()
        .and_then(|p| Control::open(p, inherited_control));
    let outcome = tokio::select! {
        ready = gateway.wait_ready(crate::handover::LINKS_WAIT) => {
            if !ready {
                warn!(parent, wait_ms = crate::handover::LINKS_WAIT.as_millis(), "not every service has a link up yet; saying ready anyway");
            }
            adopted.ready_then_main().await
        }
        () = adopted.parent_gone() => Err(HandoverError::NotMade),
    };
    if let Err(e) = outcome {
        error!(error = %e, parent, "not made main; closing what this process accepted");
        gateway.shutdown(INTERRUPT_DRAIN_WINDOW).await;
        return Err(e.into());
    }
    info!(parent, "now the main process");
    serve(gateway, &config, signals, control).await
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
/// drains faster), exit at once on a second stop signal; with a `control`
/// socket, an upgrade hands the sockets to a successor and then drains.
///
/// # Errors
/// [`RunError::Interrupted`] when a second stop signal cut the drain.
pub async fn serve(
    gateway: Gateway,
    config: &Config,
    signals: Signals,
    control: Option<Control>,
) -> Result<(), RunError> {
    let Signals {
        mut term,
        mut int,
        mut hup,
    } = signals;
    // READY=1 first (every listener and the admin endpoint are bound), then
    // the watchdog and status refresh from inside the runtime.
    systemd::ready(&gateway.status_text());
    let mut status = StatusTask::start(&gateway);
    info!(version = env!("CARGO_PKG_VERSION"), admin = %gateway.admin_addr(), "ready");

    // The drain timings of the latest accepted file: a reload applies them.
    let (mut grace, mut window) = (config.lb_grace, config.drain_window);
    let ending = loop {
        tokio::select! {
            _ = hup.recv() => {
                if let Some(new) = reload(&gateway, &config.path) {
                    (grace, window) = (new.lb_grace, new.drain_window);
                }
            }
            _ = term.recv() => break Ending::Drain(grace, window),
            // An operator at a terminal wants the prompt back: no grace.
            _ = int.recv() => break Ending::Drain(Duration::ZERO, window.min(INTERRUPT_DRAIN_WINDOW)),
            mut requester = next_upgrade(control.as_ref()) => {
                let Some(control) = &control else { continue };
                // A stop signal wins over a handover in progress: the child
                // is told to stop, and this process drains as for any stop
                // (systemd's stop job waits for this process, the main one).
                let started = tokio::select! {
                    r = control.start_successor(&config.path, gateway.handover_sockets()) => r,
                    _ = term.recv() => {
                        requester.failed(&HandoverError::Stopping).await;
                        break Ending::Drain(grace, window);
                    }
                    _ = int.recv() => {
                        requester.failed(&HandoverError::Stopping).await;
                        break Ending::Drain(Duration::ZERO, window.min(INTERRUPT_DRAIN_WINDOW));
                    }
                };
                let child = match started {
                    Ok(c) => c,
                    Err(e) => {
                        requester.failed(&e).await;
                        continue;
                    }
                };
                // From MAINPID= on systemd takes only the successor's
                // notifications: ours stop first.
                status.stop().await;
                match child.make_main().await {
                    Ok(done) => {
                        requester.handed_over(&done).await;
                        info!(pid = done.pid, version = %done.version, handover_ms = done.took.as_millis() as u64, "handed over; draining this process's clients");
                        break Ending::HandedOver(requester, window);
                    }
                    Err(e) => {
                        status = StatusTask::start(&gateway);
                        requester.failed(&e).await;
                    }
                }
            }
        }
    };
    match ending {
        Ending::Drain(grace, window) => {
            systemd::stopping();
            let drain = gateway.drain(grace, window);
            let result = tokio::select! {
                _ = drain => Ok(()),
                _ = term.recv() => Err(RunError::Interrupted),
                _ = int.recv() => Err(RunError::Interrupted),
            };
            status.stop().await;
            result
        }
        Ending::HandedOver(mut requester, window) => {
            // Our copy of the control socket: the successor answers on it now.
            drop(control);
            let started = tokio::time::Instant::now();
            let drain = gateway.drain_handed_over(window);
            let clients = tokio::select! {
                n = drain => n,
                _ = term.recv() => return Err(RunError::Interrupted),
                _ = int.recv() => return Err(RunError::Interrupted),
            };
            requester
                .say(&format!(
                    "drained clients={clients} ms={}",
                    started.elapsed().as_millis()
                ))
                .await;
            Ok(())
        }
    }
}

/// How the serving loop ended.
enum Ending {
    /// A stop signal: drain with this grace and window.
    Drain(Duration, Duration),
    /// A successor is main: answer the requester after draining over the window.
    HandedOver(crate::handover::Requester, Duration),
}

/// The next upgrade request, or never without a control socket.
async fn next_upgrade(control: Option<&Control>) -> crate::handover::Requester {
    match control {
        Some(c) => c.next_upgrade().await,
        None => std::future::pending().await,
    }
}

/// The watchdog and status refresh (see `systemd::watchdog_and_status`).
struct StatusTask {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl StatusTask {
    fn start(gateway: &Gateway) -> Self {
        let stop = CancellationToken::new();
        let shared = gateway.shared().clone();
        let task = tokio::spawn(systemd::watchdog_and_status(
            move || shared.status_text(),
            stop.clone(),
        ));
        Self { stop, task }
    }

    /// Stops it and waits until it sent its last notification.
    async fn stop(&mut self) {
        self.stop.cancel();
        let _ = (&mut self.task).await;
    }
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
