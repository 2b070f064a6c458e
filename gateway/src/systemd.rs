//! systemd integration through `sd_notify`: readiness, status, watchdog,
//! reload and stop notifications. Every call is a no-op outside systemd
//! (no `NOTIFY_SOCKET`).

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::debug;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "sd_notify failed");
    }
}

/// `READY=1` with a status line: every listener is bound and the config loaded.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `MAINPID=<pid>`: the unit's main process is `pid` from now on (an
/// upgrade's successor, see `handover`); systemd then accepts only its
/// notifications. Unlike the others, a failed send is returned: the caller
/// must stay main then.
///
/// # Errors
/// When the notification socket is set but the send fails.
pub fn main_pid(pid: u32) -> std::io::Result<()> {
    sd_notify::notify(&[NotifyState::MainPid(pid)])
}

/// `RELOADING=1` with `MONOTONIC_USEC`, as `Type=notify-reload` expects.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// `STOPPING=1`: the drain has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// How often the status line is refreshed.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// Pets the watchdog at half its interval and refreshes `STATUS=` from inside
/// the runtime, so a stalled runtime stops petting it. Runs until `stop`.
/// `status` gives the current status line.
pub async fn watchdog_and_status(status: impl Fn() -> String, stop: CancellationToken) {
    let watchdog = sd_notify::watchdog_enabled();
    let period = watchdog.map_or(STATUS_INTERVAL, |w| (w / 2).min(STATUS_INTERVAL));
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let status = status();
        if watchdog.is_some() {
            send(&[NotifyState::Watchdog, NotifyState::Status(&status)]);
        } else {
            send(&[NotifyState::Status(&status)]);
        }
    }
}
