//! EdgeGate: a TLS WebSocket edge for millions of mostly idle clients,
//! forwarding their messages to backend services over persistent links.
//!
//! # Glossary
//! - **client**: a remote peer connected to EdgeGate (WebSocket over TLS).
//! - **service**: a backend EdgeGate forwards to. Services listen; EdgeGate dials them.
//! - **link**: one persistent connection from EdgeGate to a service; a service
//!   has a pool of links. The wire protocol is in `docs/link-protocol.md` and
//!   the `edgegate-link` crate.
//! - **route**: maps a listener and path to a service.
//! - **topic**: a named group of clients a service publishes to in one frame.
//!
//! # Layout
//! - [`config`]: TOML file → raw struct → checked [`config::Config`].
//! - [`runtime`]: the explicitly built Tokio runtime, `RLIMIT_NOFILE`.
//! - [`listener`]: bind with backlog; the accept loop (permit, cap, spawn).
//! - [`backlog`]: kernel accept-queue overflows as metrics and warnings.
//! - [`tls`]: certificates and the reloadable acceptor.
//! - [`auth`]: JWT and Origin checks done during the upgrade.
//! - [`client`]: one client's life: TLS → upgrade (or framed Hello) → session → close.
//! - [`framed`]: the framed client protocol as a stream of messages.
//! - [`outbox`]: a client's bounded outbound queue and handle.
//! - [`registry`]: connected clients by id (sharded).
//! - [`topics`]: topic membership and fan-out (sharded, batched).
//! - [`link`]: link pools, dialling, the link reader and writer.
//! - [`metrics`]: every metric name.
//! - [`gateway`]: assembly, reload and drain.
//! - [`admin`]: the admin endpoint: `/metrics`, `/healthz`, `/readyz`.
//! - [`scheduler`]: the poll-delay probe, runtime metrics, the summary log line.
//! - [`process`]: resident memory, open fds, jemalloc statistics.
//! - [`logging`]: journald when stderr is the journal, plain stderr otherwise.
//! - [`preflight`]: `edgegate tune --check`: host limits and sysctls vs. the config.
//! - [`shutdown`]: signals: SIGHUP reload, SIGTERM drain.
//! - [`systemd`]: sd_notify readiness, status and watchdog.
//! - [`demo`]: `edgegate demo`.
//!
//! # A client's life
//! ```text
//! kernel accept queue ─► accept loop ─(handshake permit)─► client task
//!                                                           │ TLS handshake      (handshake_timeout_secs)
//!                                                           │ upgrade + auth     (upgrade_timeout_secs)
//!                                                           │ bind to a link, ClientOpen to the service
//!                                                           │ session loop: client ─► link queue
//!                                                           │               outbox ─► client (write_timeout_secs)
//!                                                           │               heartbeat (ping_interval/ping_timeout)
//!                                                           ▼ close: one CloseReason, ClientClose to the service
//! ```
//! One task per client, nothing else per client: no helper task, no timer
//! per message. The handshake permit covers the TLS handshake only, and only
//! while the client makes progress (see `client::tls_phase`).

#![deny(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod backlog;
pub mod client;
pub mod config;
pub mod demo;
pub mod framed;
pub mod gateway;
pub mod link;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod outbox;
pub mod preflight;
pub mod process;
pub mod registry;
pub mod runtime;
pub mod scheduler;
pub mod shutdown;
pub mod systemd;
pub mod tls;
pub mod topics;

pub use config::Config;
pub use gateway::Gateway;

/// Exit code for a configuration error (`EX_CONFIG` from sysexits.h); the
/// systemd unit does not restart on it.
pub const EX_CONFIG: u8 = 78;
