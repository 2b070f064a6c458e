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
//! Lowest layer first; a module imports only its own layer and those below
//! (checked by `tests/tools/import_graph.py`, layers in
//! `tests/tools/import_graph.toml`).
//! - [`wire`]: byte-level codecs with no gateway state: the lean TLS stream,
//!   the WebSocket frame codec and its client stream (`ws_codec`).
//! - [`runtime`]: the explicitly built Tokio runtime, `RLIMIT_NOFILE`.
//! - [`logging`]: journald when stderr is the journal, plain stderr otherwise.
//! - [`process`]: resident memory, open fds, jemalloc statistics.
//! - [`close`]: why a client's session ended: its close frame, metric label
//!   and what the service is told.
//! - [`config`]: TOML file → raw struct → checked [`config::Config`].
//! - [`auth`]: JWT and Origin checks done during the upgrade.
//! - [`tls`]: certificates, the reloadable acceptor, a client's stream of
//!   either kind (tokio-rustls or lean, by the listener's `tls_stream`).
//! - [`linger`]: the lingering close that lets a client read the last frame.
//! - [`metrics`]: every metric name.
//! - [`outbox`]: a client's bounded outbound queue and handle.
//! - [`registry`]: connected clients by id (sharded).
//! - [`topics`]: topic membership and fan-out (sharded, batched).
//! - [`state`]: what the whole gateway shares: admission (the client cap),
//!   lifecycle (drain, leave), the settings a reload swaps.
//! - [`links`]: link pools (`links` per service instance), dialling, the link
//!   reader and dispatch; it gets a narrow `LinkContext`, not `Shared`. The
//!   writer is the link crate's.
//! - [`readiness`]: ready for clients or not, one rule for `/readyz` and a
//!   listener's `health_path`.
//! - [`framed`]: the framed client protocol as a stream of messages.
//! - [`client`]: one client's life: TLS → upgrade (or framed Hello) → session → close.
//! - [`listener`]: bind with backlog; the accept loop (permit, cap, spawn).
//! - [`admin`]: the admin endpoint: `/metrics`, `/healthz`, `/readyz`.
//! - [`backlog`]: kernel accept-queue overflows as metrics and warnings.
//! - [`scheduler`]: the poll-delay probe, runtime metrics, the summary log line.
//! - [`systemd`]: sd_notify readiness, status and watchdog.
//! - [`preflight`]: `edgegate tune --check`: host limits and sysctls vs. the config.
//! - [`gateway`]: assembly, reload and drain.
//! - [`handover`]: `edgegate upgrade`: the listening sockets handed to a new
//!   process, which serves before the old one drains.
//! - [`shutdown`]: signals: SIGHUP reload, SIGTERM drain.
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
pub mod close;
pub mod config;
pub mod demo;
pub mod framed;
pub mod gateway;
pub mod handover;
pub mod linger;
pub mod links;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod outbox;
pub mod preflight;
pub mod process;
pub mod readiness;
pub mod registry;
pub mod runtime;
pub mod scheduler;
pub mod shutdown;
pub mod state;
pub mod systemd;
pub mod tls;
pub mod topics;
pub mod wire;

pub use config::Config;
pub use gateway::Gateway;

/// Exit code for a configuration error (`EX_CONFIG` from sysexits.h); the
/// systemd unit does not restart on it.
pub const EX_CONFIG: u8 = 78;
