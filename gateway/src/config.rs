//! Configuration: TOML file → [`RawConfig`] (unknown keys rejected) → checked [`Config`].
//!
//! The same pipeline serves `edgegate run`, `edgegate check-config`, the package's
//! `ExecStartPre` and Ansible's `validate:`. Environment variables with the
//! `EDGEGATE_` prefix override scalar keys, with `__` between section and key
//! (`EDGEGATE_LIMITS__MAX_CLIENTS=50000`). Every key is documented in
//! `docs/config.md`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgegate_link::proto::{
    CLIENT_MESSAGE_OVERHEAD, MAX_FRAME_BYTES, MAX_FRAME_LENGTH, MAX_MESSAGE_BYTES, MIN_FRAME_BYTES,
};
use serde::Deserialize;

// The auth section's checked form lives with the code that uses it, so auth
// needs nothing from here.
pub use crate::auth::{AuthConfig, AuthMode, JwtAlgorithm};

/// Where `edgegate run` and `edgegate check-config` look without `--config`.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/edgegate/edgegate.toml";

/// Everything that can be wrong with a configuration. Each variant names the
/// file and, where it can, the line or key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Syntax errors and unknown or mistyped keys, with line and column.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value that parsed but makes no sense (`key` is the dotted key).
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

// ---------------------------------------------------------------------------
// Raw file structs: exactly what the TOML holds.
// ---------------------------------------------------------------------------

/// The file as written, before any checking.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub runtime: RawRuntime,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub listener: Vec<RawListener>,
    #[serde(default)]
    pub route: Vec<RawRoute>,
    #[serde(default)]
    pub service: Vec<RawService>,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub heartbeat: RawHeartbeat,
    #[serde(default)]
    pub auth: RawAuth,
    #[serde(default)]
    pub drain: RawDrain,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRuntime {
    /// 0 means "one less than the number of cores, at least 1".
    pub worker_threads: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    pub bind: String,
    /// The Unix socket `edgegate upgrade` asks for a handover on; "" = none.
    pub control_socket: String,
}

/// The admin endpoint's default address. Port 7611 is outside the ports
/// the Prometheus ecosystem takes by default (9090-9094 for Prometheus,
/// Pushgateway and Alertmanager; 9100-9999 for exporters), so a gateway that
/// shares a host with a Prometheus server or its exporters binds.
pub const DEFAULT_ADMIN_BIND: &str = "127.0.0.1:7611";

/// Where the running gateway listens for `edgegate upgrade`: in the unit's
/// `RuntimeDirectory=edgegate`, which systemd creates for the service user
/// and removes when the unit stops.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/edgegate/control.sock";

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            bind: DEFAULT_ADMIN_BIND.into(),
            control_socket: DEFAULT_CONTROL_SOCKET.into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: String,
    pub bind: String,
    #[serde(default = "default_protocol")]
    pub protocol: String,
    #[serde(default = "default_backlog")]
    pub backlog: u32,
    pub tls_cert_path: PathBuf,
    pub tls_key_path: PathBuf,
    #[serde(default = "default_tls_stream")]
    pub tls_stream: String,
    #[serde(default = "default_ws_codec")]
    pub ws_codec: String,
    #[serde(default)]
    pub health_path: Option<String>,
}

fn default_protocol() -> String {
    "websocket".into()
}

fn default_tls_stream() -> String {
    TlsStreamKind::Lean.as_str().into()
}

fn default_ws_codec() -> String {
    WsCodec::Tungstenite.as_str().into()
}

fn default_backlog() -> u32 {
    4096
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub listener: String,
    pub path: String,
    pub service: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub name: String,
    pub addresses: Vec<String>,
    #[serde(default = "default_links")]
    pub links: usize,
    #[serde(default = "default_link_queue_frames")]
    pub link_queue_frames: usize,
    #[serde(default = "default_connect_timeout_secs")]
    pub connect_timeout_secs: u64,
    #[serde(default = "default_link_ping_interval_secs")]
    pub ping_interval_secs: u64,
    #[serde(default = "default_link_ping_timeout_secs")]
    pub ping_timeout_secs: u64,
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    #[serde(default = "default_service_max_frame_bytes")]
    pub max_frame_bytes: usize,
}

fn default_links() -> usize {
    2
}
fn default_link_queue_frames() -> usize {
    4096
}
fn default_connect_timeout_secs() -> u64 {
    5
}
fn default_link_ping_interval_secs() -> u64 {
    10
}
fn default_link_ping_timeout_secs() -> u64 {
    30
}
fn default_reconnect_min_ms() -> u64 {
    100
}
fn default_reconnect_max_ms() -> u64 {
    10_000
}
/// What the reference service says in its `Hello` unless told otherwise.
fn default_service_max_frame_bytes() -> usize {
    MAX_FRAME_BYTES
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub max_clients: usize,
    pub max_clients_per_address: usize,
    pub handshake_permits: usize,
    pub handshake_timeout_secs: u64,
    pub upgrade_timeout_secs: u64,
    pub max_message_bytes: usize,
    pub outbound_queue_messages: usize,
    pub slow_reader_policy: String,
    pub write_timeout_secs: u64,
    pub link_backpressure_timeout_secs: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            max_clients: 100_000,
            max_clients_per_address: 0,
            handshake_permits: 0,
            handshake_timeout_secs: 10,
            upgrade_timeout_secs: 10,
            max_message_bytes: 64 * 1024,
            outbound_queue_messages: 256,
            slow_reader_policy: "drop_oldest".into(),
            write_timeout_secs: 10,
            link_backpressure_timeout_secs: 5,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHeartbeat {
    pub ping_interval_secs: u64,
    pub ping_timeout_secs: u64,
}

impl Default for RawHeartbeat {
    fn default() -> Self {
        Self {
            ping_interval_secs: 30,
            ping_timeout_secs: 75,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAuth {
    pub mode: String,
    pub jwt_algorithm: Option<String>,
    pub jwt_key_path: Option<PathBuf>,
    pub jwt_audience: Option<String>,
    pub jwt_issuer: Option<String>,
    pub jwt_leeway_secs: u64,
    pub allowed_origins: Vec<String>,
}

impl Default for RawAuth {
    fn default() -> Self {
        Self {
            mode: "none".into(),
            jwt_algorithm: None,
            jwt_key_path: None,
            jwt_audience: None,
            jwt_issuer: None,
            jwt_leeway_secs: 30,
            allowed_origins: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDrain {
    pub drain_window_secs: u64,
    pub lb_grace_secs: u64,
}

/// How long `/readyz` answers 503 while the gateway still accepts, before a
/// drain stops accepting. A load balancer takes a host out after its health
/// check failed `fall` times `inter` apart: HAProxy's defaults (2 s × 3) need
/// 6 s, so 10 s covers them with one interval to spare. Set it to your
/// balancer's interval × threshold plus one interval.
pub const DEFAULT_LB_GRACE_SECS: u64 = 10;

impl Default for RawDrain {
    fn default() -> Self {
        Self {
            drain_window_secs: 30,
            lb_grace_secs: DEFAULT_LB_GRACE_SECS,
        }
    }
}

// ---------------------------------------------------------------------------
// Checked config: typed, cross-referenced, files readable.
// ---------------------------------------------------------------------------

/// A configuration that passed every check.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, for reload and messages.
    pub path: PathBuf,
    pub runtime: RuntimeConfig,
    pub admin_bind: SocketAddr,
    /// `[admin] control_socket`: where `edgegate upgrade` connects; `None`
    /// when set to "" (no upgrade without a restart).
    pub control_socket: Option<PathBuf>,
    pub listeners: Vec<ListenerConfig>,
    pub services: Vec<ServiceConfig>,
    pub limits: Limits,
    pub heartbeat: Heartbeat,
    pub auth: AuthConfig,
    /// Spread of the 1001 closes on SIGTERM.
    pub drain_window: Duration,
    /// Readiness off while still accepting, before a drain stops accepting.
    pub lb_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Resolved worker count (never 0).
    pub worker_threads: usize,
}

/// Which TLS stream a listener's clients use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsStreamKind {
    /// tokio-rustls over rustls's buffered connection: keeps a 4 KiB read
    /// buffer per client, idle or not. The fallback, kept while the lean
    /// stream is new.
    Rustls,
    /// Our own stream over rustls's caller-buffered connection
    /// (`wire::lean_tls`): holds no buffer while a client is idle. The
    /// default.
    Lean,
}

impl TlsStreamKind {
    /// The value in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsStreamKind::Rustls => "rustls",
            TlsStreamKind::Lean => "lean",
        }
    }
}

/// Which WebSocket codec a listener's clients use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsCodec {
    /// tokio-tungstenite.
    Tungstenite,
    /// Our own (`wire::ws`): holds no buffer while a client is idle.
    Edgegate,
}

impl WsCodec {
    /// The value in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            WsCodec::Tungstenite => "tungstenite",
            WsCodec::Edgegate => "edgegate",
        }
    }
}

/// What a listener speaks after TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    WebSocket,
    Framed,
}

impl Protocol {
    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::WebSocket => "websocket",
            Protocol::Framed => "framed",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub protocol: Protocol,
    pub backlog: u32,
    pub tls_cert_path: PathBuf,
    pub tls_key_path: PathBuf,
    pub tls_stream: TlsStreamKind,
    pub ws_codec: WsCodec,
    /// A path answered 200/503 by readiness instead of routed (websocket
    /// listeners only), for load balancers that probe only the client port.
    pub health_path: Option<String>,
    /// Path → index into [`Config::services`].
    pub routes: HashMap<String, usize>,
}

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub name: String,
    pub addresses: Vec<String>,
    pub links: usize,
    pub link_queue_frames: usize,
    pub connect_timeout: Duration,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// The link frame cap the service says in its `Hello`, as the operator
    /// declares it: checked against `limits.max_message_bytes` here, and
    /// against the service's actual `Hello` at link-up (a warning).
    pub max_frame_bytes: usize,
}

/// What happens when a client's outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowReaderPolicy {
    /// Drop the oldest queued message and count it.
    DropOldest,
    /// Close the client with 1008 (policy violation).
    Close,
}

impl SlowReaderPolicy {
    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SlowReaderPolicy::DropOldest => "drop_oldest",
            SlowReaderPolicy::Close => "close",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_clients: usize,
    /// 0 = no per-address limit.
    pub max_clients_per_address: usize,
    pub handshake_permits: usize,
    pub handshake_timeout: Duration,
    pub upgrade_timeout: Duration,
    pub max_message_bytes: usize,
    pub outbound_queue_messages: usize,
    pub slow_reader_policy: SlowReaderPolicy,
    pub write_timeout: Duration,
    pub link_backpressure_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
}

impl Config {
    /// The keys that differ between this (running) configuration and `new`
    /// but that a reload cannot apply: the listeners (set, address,
    /// protocol, backlog, TLS stream), the routes, the services and everything about
    /// their links, `[runtime]` and `[admin]`. Certificates, `[limits]`,
    /// `[heartbeat]`, `[auth]` and `[drain]` are live and never listed.
    /// Named as in the file: `listener.public.bind`, `service.example`,
    /// `route.public./chat`.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<String> {
        let mut keys = Vec::new();
        if self.runtime.worker_threads != new.runtime.worker_threads {
            keys.push("runtime.worker_threads".to_owned());
        }
        if self.admin_bind != new.admin_bind {
            keys.push("admin.bind".to_owned());
        }
        if self.control_socket != new.control_socket {
            keys.push("admin.control_socket".to_owned());
        }
        for old in &self.listeners {
            let Some(l) = new.listeners.iter().find(|l| l.name == old.name) else {
                keys.push(format!("listener.{} (removed)", old.name));
                continue;
            };
            let name = &old.name;
            if l.bind != old.bind {
                keys.push(format!("listener.{name}.bind"));
            }
            if l.protocol != old.protocol {
                keys.push(format!("listener.{name}.protocol"));
            }
            if l.backlog != old.backlog {
                keys.push(format!("listener.{name}.backlog"));
            }
            if l.tls_stream != old.tls_stream {
                keys.push(format!("listener.{name}.tls_stream"));
            }
            if l.ws_codec != old.ws_codec {
                keys.push(format!("listener.{name}.ws_codec"));
            }
            if l.health_path != old.health_path {
                keys.push(format!("listener.{name}.health_path"));
            }
            let routes = |c: &Config, l: &ListenerConfig| {
                let mut r: Vec<(String, String)> = l
                    .routes
                    .iter()
                    .map(|(path, &i)| (path.clone(), c.services[i].name.clone()))
                    .collect();
                r.sort();
                r
            };
            let (before, after) = (routes(self, old), routes(new, l));
            for (path, service) in &after {
                if !before.iter().any(|(p, s)| p == path && s == service) {
                    keys.push(format!("route.{name}.{path}"));
                }
            }
            for (path, _) in &before {
                if !after.iter().any(|(p, _)| p == path) {
                    keys.push(format!("route.{name}.{path} (removed)"));
                }
            }
        }
        for l in &new.listeners {
            if !self.listeners.iter().any(|old| old.name == l.name) {
                keys.push(format!("listener.{} (added)", l.name));
            }
        }
        for old in &self.services {
            match new.services.iter().find(|s| s.name == old.name) {
                None => keys.push(format!("service.{} (removed)", old.name)),
                Some(s) => {
                    let name = &old.name;
                    let fields = [
                        ("addresses", s.addresses != old.addresses),
                        ("links", s.links != old.links),
                        (
                            "link_queue_frames",
                            s.link_queue_frames != old.link_queue_frames,
                        ),
                        (
                            "connect_timeout_secs",
                            s.connect_timeout != old.connect_timeout,
                        ),
                        ("ping_interval_secs", s.ping_interval != old.ping_interval),
                        ("ping_timeout_secs", s.ping_timeout != old.ping_timeout),
                        ("reconnect_min_ms", s.reconnect_min != old.reconnect_min),
                        ("reconnect_max_ms", s.reconnect_max != old.reconnect_max),
                    ];
                    keys.extend(
                        fields
                            .iter()
                            .filter(|(_, changed)| *changed)
                            .map(|(field, _)| format!("service.{name}.{field}")),
                    );
                }
            }
        }
        for s in &new.services {
            if !self.services.iter().any(|old| old.name == s.name) {
                keys.push(format!("service.{} (added)", s.name));
            }
        }
        keys
    }

    /// Reads, parses and checks the file at `path`, applying `EDGEGATE_`
    /// environment overrides.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, and the line or key, of the first problem.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(path, &text, std::env::vars())
    }

    /// The pipeline behind [`Config::load`], with the text and the environment
    /// passed in so tests control both.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn from_toml(
        path: &Path,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        // First pass with `toml` alone: its errors carry line, column and key.
        toml::from_str::<RawConfig>(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        // Only `EDGEGATE_<SECTION>__<KEY>` names are config overrides; other
        // EDGEGATE_ variables (EDGEGATE_LOG, a CI's own) are not config.
        let env: HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| {
                k.strip_prefix("EDGEGATE_")
                    .is_some_and(|rest| rest.contains("__"))
            })
            .collect();
        let raw: RawConfig = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("EDGEGATE")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(env)),
            )
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::Parse {
                path: path.to_owned(),
                message: format!("with EDGEGATE_ environment overrides: {e}"),
            })?;
        check(path, raw)
    }
}

/// `[admin] control_socket` as the file at `path` sets it, read without
/// checking the rest, so `edgegate upgrade` finds the running gateway even
/// when the file holds something the new version rejects (the new process
/// reports that). The default when the file cannot be read; `None` when it
/// sets "".
pub fn control_socket_of(path: &Path) -> Option<PathBuf> {
    let raw = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| toml::from_str::<toml::Table>(&text).ok())
        .and_then(|t| {
            t.get("admin")?
                .get("control_socket")?
                .as_str()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| DEFAULT_CONTROL_SOCKET.to_owned());
    (!raw.is_empty()).then(|| PathBuf::from(raw))
}

fn invalid(path: &Path, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_owned(),
        key: key.into(),
        message: message.into(),
    }
}

fn secs(path: &Path, key: &str, value: u64) -> Result<Duration, ConfigError> {
    if value == 0 {
        return Err(invalid(path, key, "must be at least 1"));
    }
    Ok(Duration::from_secs(value))
}

fn readable(path: &Path, key: &str, file: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(file).map_err(|e| invalid(path, key, format!("{}: {e}", file.display())))
}

/// Turns the raw file into a checked [`Config`].
fn check(path: &Path, raw: RawConfig) -> Result<Config, ConfigError> {
    let worker_threads = match raw.runtime.worker_threads {
        0 => default_worker_threads(),
        n => n,
    };

    let admin_bind = raw
        .admin
        .bind
        .parse()
        .map_err(|e| invalid(path, "admin.bind", format!("{:?}: {e}", raw.admin.bind)))?;
    let control_socket = match raw.admin.control_socket.as_str() {
        "" => None,
        p if Path::new(p).is_absolute() => Some(PathBuf::from(p)),
        p => {
            return Err(invalid(
                path,
                "admin.control_socket",
                format!("{p:?}: must be an absolute path (or \"\" for none)"),
            ))
        }
    };

    let mut services = Vec::new();
    let mut service_index = HashMap::new();
    for (i, s) in raw.service.iter().enumerate() {
        let key = |k: &str| format!("service[{i}].{k}");
        if s.name.is_empty() {
            return Err(invalid(path, key("name"), "must not be empty"));
        }
        if service_index.insert(s.name.clone(), i).is_some() {
            return Err(invalid(
                path,
                key("name"),
                format!("duplicate service {:?}", s.name),
            ));
        }
        if s.addresses.is_empty() {
            return Err(invalid(
                path,
                key("addresses"),
                "needs at least one host:port",
            ));
        }
        for a in &s.addresses {
            if a.rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return Err(invalid(
                    path,
                    key("addresses"),
                    format!("{a:?} is not host:port"),
                ));
            }
        }
        if s.links == 0 || s.links > 1024 {
            return Err(invalid(path, key("links"), "must be between 1 and 1024"));
        }
        if s.link_queue_frames == 0 {
            return Err(invalid(
                path,
                key("link_queue_frames"),
                "must be at least 1",
            ));
        }
        if s.reconnect_min_ms == 0 || s.reconnect_max_ms < s.reconnect_min_ms {
            return Err(invalid(
                path,
                key("reconnect_max_ms"),
                "needs 0 < reconnect_min_ms <= reconnect_max_ms",
            ));
        }
        if s.ping_timeout_secs <= s.ping_interval_secs {
            return Err(invalid(
                path,
                key("ping_timeout_secs"),
                "must be longer than ping_interval_secs",
            ));
        }
        if !(MIN_FRAME_BYTES..=MAX_FRAME_LENGTH).contains(&s.max_frame_bytes) {
            return Err(invalid(
                path,
                key("max_frame_bytes"),
                format!(
                    "{} is outside the link protocol's range {MIN_FRAME_BYTES} to {MAX_FRAME_LENGTH}",
                    s.max_frame_bytes
                ),
            ));
        }
        services.push(ServiceConfig {
            name: s.name.clone(),
            addresses: s.addresses.clone(),
            links: s.links,
            link_queue_frames: s.link_queue_frames,
            connect_timeout: secs(path, &key("connect_timeout_secs"), s.connect_timeout_secs)?,
            ping_interval: secs(path, &key("ping_interval_secs"), s.ping_interval_secs)?,
            ping_timeout: secs(path, &key("ping_timeout_secs"), s.ping_timeout_secs)?,
            reconnect_min: Duration::from_millis(s.reconnect_min_ms),
            reconnect_max: Duration::from_millis(s.reconnect_max_ms),
            max_frame_bytes: s.max_frame_bytes,
        });
    }

    if raw.listener.is_empty() {
        return Err(invalid(
            path,
            "listener",
            "at least one [[listener]] is needed",
        ));
    }
    let mut listeners: Vec<ListenerConfig> = Vec::new();
    let mut binds = HashSet::new();
    for (i, l) in raw.listener.iter().enumerate() {
        let key = |k: &str| format!("listener[{i}].{k}");
        if l.name.is_empty() || listeners.iter().any(|o| o.name == l.name) {
            return Err(invalid(path, key("name"), "must be unique and not empty"));
        }
        let bind: SocketAddr = l
            .bind
            .parse()
            .map_err(|e| invalid(path, key("bind"), format!("{:?}: {e}", l.bind)))?;
        // Port 0 (tests) asks the kernel for a free port each time: never a clash.
        if bind.port() != 0 && (!binds.insert(bind) || bind == admin_bind) {
            return Err(invalid(path, key("bind"), format!("{bind} is used twice")));
        }
        let protocol = match l.protocol.as_str() {
            "websocket" => Protocol::WebSocket,
            "framed" => Protocol::Framed,
            other => {
                return Err(invalid(
                    path,
                    key("protocol"),
                    format!("{other:?}: expected \"websocket\" or \"framed\""),
                ))
            }
        };
        if l.backlog == 0 {
            return Err(invalid(path, key("backlog"), "must be at least 1"));
        }
        let tls_stream = match l.tls_stream.as_str() {
            "rustls" => TlsStreamKind::Rustls,
            "lean" => TlsStreamKind::Lean,
            other => {
                return Err(invalid(
                    path,
                    key("tls_stream"),
                    format!("{other:?}: expected \"rustls\" or \"lean\""),
                ))
            }
        };
        let ws_codec = match l.ws_codec.as_str() {
            "tungstenite" => WsCodec::Tungstenite,
            "edgegate" => WsCodec::Edgegate,
            other => {
                return Err(invalid(
                    path,
                    key("ws_codec"),
                    format!("{other:?}: expected \"tungstenite\" or \"edgegate\""),
                ))
            }
        };
        if let Some(h) = &l.health_path {
            if protocol != Protocol::WebSocket {
                return Err(invalid(
                    path,
                    key("health_path"),
                    "only a websocket listener answers HTTP",
                ));
            }
            if !h.starts_with('/') || h.contains(['?', '#', ' ']) {
                return Err(invalid(
                    path,
                    key("health_path"),
                    format!("{h:?}: must be a path such as \"/healthz\""),
                ));
            }
        }
        readable(path, &key("tls_cert_path"), &l.tls_cert_path)?;
        readable(path, &key("tls_key_path"), &l.tls_key_path)?;
        listeners.push(ListenerConfig {
            name: l.name.clone(),
            bind,
            protocol,
            backlog: l.backlog,
            tls_cert_path: l.tls_cert_path.clone(),
            tls_key_path: l.tls_key_path.clone(),
            tls_stream,
            ws_codec,
            health_path: l.health_path.clone(),
            routes: HashMap::new(),
        });
    }

    for (i, r) in raw.route.iter().enumerate() {
        let key = |k: &str| format!("route[{i}].{k}");
        let Some(listener) = listeners.iter_mut().find(|l| l.name == r.listener) else {
            return Err(invalid(
                path,
                key("listener"),
                format!("no listener named {:?}", r.listener),
            ));
        };
        let Some(&service) = service_index.get(&r.service) else {
            return Err(invalid(
                path,
                key("service"),
                format!("no service named {:?}", r.service),
            ));
        };
        if !r.path.starts_with('/') {
            return Err(invalid(path, key("path"), "must start with '/'"));
        }
        if listener.health_path.as_deref() == Some(r.path.as_str()) {
            return Err(invalid(
                path,
                key("path"),
                format!("{:?} is listener {:?}'s health_path", r.path, listener.name),
            ));
        }
        if listener.routes.insert(r.path.clone(), service).is_some() {
            return Err(invalid(
                path,
                key("path"),
                format!("{:?} is routed twice", r.path),
            ));
        }
    }

    let l = &raw.limits;
    if l.max_clients == 0 {
        return Err(invalid(path, "limits.max_clients", "must be at least 1"));
    }
    if !(125..=MAX_MESSAGE_BYTES).contains(&l.max_message_bytes) {
        return Err(invalid(
            path,
            "limits.max_message_bytes",
            format!(
                "{} is outside 125 to {MAX_MESSAGE_BYTES} (the largest message a link frame's u32 length can carry)",
                l.max_message_bytes
            ),
        ));
    }
    check_frame_caps(path, &raw.service, l.max_message_bytes)?;
    if l.outbound_queue_messages == 0 {
        return Err(invalid(
            path,
            "limits.outbound_queue_messages",
            "must be at least 1",
        ));
    }
    let slow_reader_policy = match l.slow_reader_policy.as_str() {
        "drop_oldest" => SlowReaderPolicy::DropOldest,
        "close" => SlowReaderPolicy::Close,
        other => {
            return Err(invalid(
                path,
                "limits.slow_reader_policy",
                format!("{other:?}: expected \"drop_oldest\" or \"close\""),
            ))
        }
    };
    let limits = Limits {
        max_clients: l.max_clients,
        max_clients_per_address: l.max_clients_per_address,
        handshake_permits: match l.handshake_permits {
            0 => HANDSHAKE_PERMITS_PER_WORKER * worker_threads,
            n => n,
        },
        handshake_timeout: secs(
            path,
            "limits.handshake_timeout_secs",
            l.handshake_timeout_secs,
        )?,
        upgrade_timeout: secs(path, "limits.upgrade_timeout_secs", l.upgrade_timeout_secs)?,
        max_message_bytes: l.max_message_bytes,
        outbound_queue_messages: l.outbound_queue_messages,
        slow_reader_policy,
        write_timeout: secs(path, "limits.write_timeout_secs", l.write_timeout_secs)?,
        link_backpressure_timeout: secs(
            path,
            "limits.link_backpressure_timeout_secs",
            l.link_backpressure_timeout_secs,
        )?,
    };

    let h = &raw.heartbeat;
    if h.ping_timeout_secs <= h.ping_interval_secs {
        return Err(invalid(
            path,
            "heartbeat.ping_timeout_secs",
            "must be longer than heartbeat.ping_interval_secs",
        ));
    }
    let heartbeat = Heartbeat {
        ping_interval: secs(path, "heartbeat.ping_interval_secs", h.ping_interval_secs)?,
        ping_timeout: secs(path, "heartbeat.ping_timeout_secs", h.ping_timeout_secs)?,
    };

    let a = &raw.auth;
    let mode = match a.mode.as_str() {
        "none" => AuthMode::None,
        "jwt" => {
            let algorithm = match a.jwt_algorithm.as_deref() {
                Some("HS256") => JwtAlgorithm::Hs256,
                Some("RS256") => JwtAlgorithm::Rs256,
                Some("ES256") => JwtAlgorithm::Es256,
                Some("EdDSA") => JwtAlgorithm::EdDsa,
                other => {
                    return Err(invalid(
                        path,
                        "auth.jwt_algorithm",
                        format!("{other:?}: expected \"HS256\", \"RS256\", \"ES256\" or \"EdDSA\""),
                    ))
                }
            };
            let key_path = a.jwt_key_path.clone().ok_or_else(|| {
                invalid(path, "auth.jwt_key_path", "required when mode = \"jwt\"")
            })?;
            let key = readable(path, "auth.jwt_key_path", &key_path)?;
            let audience = a
                .jwt_audience
                .clone()
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    invalid(path, "auth.jwt_audience", "required when mode = \"jwt\"")
                })?;
            AuthMode::Jwt {
                algorithm,
                key_path,
                key,
                audience,
                issuer: a.jwt_issuer.clone().filter(|s| !s.is_empty()),
                leeway_secs: a.jwt_leeway_secs,
            }
        }
        other => {
            return Err(invalid(
                path,
                "auth.mode",
                format!("{other:?}: expected \"none\" or \"jwt\""),
            ))
        }
    };
    let auth = AuthConfig {
        mode,
        allowed_origins: a.allowed_origins.clone(),
    };
    // Fail now, not at the first client, if the key does not parse.
    crate::auth::Authenticator::new(&auth)
        .map_err(|e| invalid(path, "auth.jwt_key_path", e.to_string()))?;

    Ok(Config {
        path: path.to_owned(),
        runtime: RuntimeConfig { worker_threads },
        admin_bind,
        control_socket,
        listeners,
        services,
        limits,
        heartbeat,
        auth,
        drain_window: Duration::from_secs(raw.drain.drain_window_secs),
        lb_grace: Duration::from_secs(raw.drain.lb_grace_secs),
    })
}

/// Refuses a `max_message_bytes` some service's link frame cap cannot carry:
/// every client message crosses a link as one `ClientMessage` frame, so a
/// message the gateway accepts but the service's cap refuses would only ever
/// be answered with 1009. Names both numbers and the two keys that fix it.
fn check_frame_caps(
    path: &Path,
    services: &[RawService],
    max_message_bytes: usize,
) -> Result<(), ConfigError> {
    let needed = max_message_bytes + CLIENT_MESSAGE_OVERHEAD;
    for (i, s) in services.iter().enumerate() {
        if s.max_frame_bytes < needed {
            return Err(invalid(
                path,
                format!("service[{i}].max_frame_bytes"),
                format!(
                    "service {:?} accepts link frames of up to {} bytes, but limits.max_message_bytes = {max_message_bytes} \
                     needs {needed} (the message plus {CLIENT_MESSAGE_OVERHEAD} bytes of ClientMessage frame): \
                     raise the service's own frame cap to at least {needed} and set service[{i}].max_frame_bytes to it, \
                     or lower limits.max_message_bytes to at most {}",
                    s.name,
                    s.max_frame_bytes,
                    s.max_frame_bytes - CLIENT_MESSAGE_OVERHEAD
                ),
            ));
        }
    }
    Ok(())
}

/// Default handshake permits per worker thread (`handshake_permits = 0`).
/// A TLS handshake's first server step is ~150 µs of CPU in one poll; with
/// 16 per worker ready at once, a client task waits a few milliseconds behind
/// them at worst. Measured on 2 workers, 15k clients reconnecting at once:
/// 256 permits → all back in 6.0 s, poll delay p99 120 ms; 32 → 3.9 s and
/// 17 ms; 8 → 5.2 s (the accept queue overflows more) and 9 ms.
pub const HANDSHAKE_PERMITS_PER_WORKER: usize = 16;

/// One less than the number of cores, at least 1: the kernel's network
/// processing (softirq) needs a core too, and production found fairness
/// better with it left free.
pub fn default_worker_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get().saturating_sub(1).max(1))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_default_admin_port_is_outside_the_prometheus_ecosystems_ports() {
        let raw = super::RawAdmin::default();
        let port: u16 = raw.bind.rsplit(':').next().unwrap().parse().unwrap();
        assert!(
            !(9090..=9094).contains(&port) && !(9100..=9999).contains(&port),
            "admin port {port} clashes with Prometheus, Alertmanager or an exporter"
        );
    }

    use super::*;

    fn write_cert_pair(dir: &Path) -> (PathBuf, PathBuf) {
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, "not checked here").unwrap();
        std::fs::write(&key, "not checked here").unwrap();
        (cert, key)
    }

    fn sample(dir: &Path) -> String {
        let (cert, key) = write_cert_pair(dir);
        format!(
            r#"
[[listener]]
name = "public"
bind = "127.0.0.1:0"
tls_cert_path = "{}"
tls_key_path = "{}"

[[route]]
listener = "public"
path = "/echo"
service = "example"

[[service]]
name = "example"
addresses = ["127.0.0.1:7000"]
"#,
            cert.display(),
            key.display()
        )
    }

    #[test]
    fn restart_only_changes_lists_every_key_a_reload_cannot_apply() {
        let dir = tempdir("restart-only");
        let base = sample(&dir);
        let parse =
            |text: &str| Config::from_toml(&dir.join("e.toml"), text, std::iter::empty()).unwrap();
        let running = parse(&base);
        assert!(running.restart_only_changes(&parse(&base)).is_empty());

        // Live keys: never listed.
        let live = format!("{base}\n[limits]\nmax_clients = 7\n[drain]\ndrain_window_secs = 5\nlb_grace_secs = 1\n");
        assert!(running.restart_only_changes(&parse(&live)).is_empty());

        let moved = base
            .replace("bind = \"127.0.0.1:0\"", "bind = \"127.0.0.1:9\"")
            .replace("127.0.0.1:7000", "127.0.0.1:7001")
            .replace("path = \"/echo\"", "path = \"/chat\"")
            .replace("tls_key_path", "tls_stream = \"rustls\"\ntls_key_path");
        let added = format!(
            "{moved}\n[[listener]]\nname = \"second\"\nbind = \"127.0.0.1:0\"\ntls_cert_path = \"{0}\"\ntls_key_path = \"{0}\"\n[runtime]\nworker_threads = 7\n",
            dir.join("cert.pem").display()
        );
        assert_eq!(
            running.restart_only_changes(&parse(&added)),
            [
                "runtime.worker_threads",
                "listener.public.bind",
                "listener.public.tls_stream",
                "route.public./chat",
                "route.public./echo (removed)",
                "listener.second (added)",
                "service.example.addresses",
            ]
        );
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("edgegate-config-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let dir = tempdir("minimal");
        let c = Config::from_toml(Path::new("t.toml"), &sample(&dir), []).unwrap();
        assert_eq!(c.limits.max_clients, 100_000);
        assert_eq!(c.limits.slow_reader_policy, SlowReaderPolicy::DropOldest);
        assert_eq!(c.listeners[0].routes.get("/echo"), Some(&0));
        assert_eq!(c.services[0].links, 2);
        assert!(c.runtime.worker_threads >= 1);
    }

    #[test]
    fn unknown_key_is_reported_with_its_line() {
        let dir = tempdir("unknown");
        let text = format!("{}\n[limits]\nmax_clientz = 5\n", sample(&dir));
        let err = Config::from_toml(Path::new("t.toml"), &text, [])
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_clientz"), "{err}");
        assert!(err.contains("line"), "{err}");
    }

    #[test]
    fn environment_overrides_scalar_keys() {
        let dir = tempdir("env");
        let env = [("EDGEGATE_LIMITS__MAX_CLIENTS".to_string(), "42".to_string())];
        let c = Config::from_toml(Path::new("t.toml"), &sample(&dir), env).unwrap();
        assert_eq!(c.limits.max_clients, 42);
    }

    #[test]
    fn other_edgegate_variables_are_not_config() {
        let dir = tempdir("env-other");
        let env = [
            ("EDGEGATE_LOG".to_string(), "debug".to_string()),
            ("EDGEGATE_CI_CACHE".to_string(), "/tmp".to_string()),
        ];
        assert!(Config::from_toml(Path::new("t.toml"), &sample(&dir), env).is_ok());
    }

    #[test]
    fn unknown_override_key_is_an_error() {
        let dir = tempdir("env-unknown");
        let env = [("EDGEGATE_LIMITS__MAX_CLIENTZ".to_string(), "1".to_string())];
        let err = Config::from_toml(Path::new("t.toml"), &sample(&dir), env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_clientz"), "{err}");
    }

    #[test]
    fn tls_stream_defaults_to_lean_and_takes_rustls() {
        let dir = tempdir("tls-stream");
        let c = Config::from_toml(Path::new("t.toml"), &sample(&dir), []).unwrap();
        assert_eq!(c.listeners[0].tls_stream, TlsStreamKind::Lean);
        let text = sample(&dir).replace("tls_key_path", "tls_stream = \"rustls\"\ntls_key_path");
        let c = Config::from_toml(Path::new("t.toml"), &text, []).unwrap();
        assert_eq!(c.listeners[0].tls_stream, TlsStreamKind::Rustls);
    }

    #[test]
    fn unknown_tls_stream_names_the_key_and_the_choices() {
        let dir = tempdir("tls-stream-bad");
        let text = sample(&dir).replace("tls_key_path", "tls_stream = \"openssl\"\ntls_key_path");
        let err = Config::from_toml(Path::new("t.toml"), &text, [])
            .unwrap_err()
            .to_string();
        assert!(err.contains("listener[0].tls_stream"), "{err}");
        assert!(err.contains("\"rustls\" or \"lean\""), "{err}");
    }

    #[test]
    fn ws_codec_defaults_to_tungstenite_and_takes_edgegate() {
        let dir = tempdir("ws-codec");
        let c = Config::from_toml(Path::new("t.toml"), &sample(&dir), []).unwrap();
        assert_eq!(c.listeners[0].ws_codec, WsCodec::Tungstenite);
        let text = sample(&dir).replace("tls_key_path", "ws_codec = \"edgegate\"\ntls_key_path");
        let c = Config::from_toml(Path::new("t.toml"), &text, []).unwrap();
        assert_eq!(c.listeners[0].ws_codec, WsCodec::Edgegate);
        let text = sample(&dir).replace("tls_key_path", "ws_codec = \"fastws\"\ntls_key_path");
        let err = Config::from_toml(Path::new("t.toml"), &text, [])
            .unwrap_err()
            .to_string();
        assert!(err.contains("listener[0].ws_codec"), "{err}");
        assert!(err.contains("\"tungstenite\" or \"edgegate\""), "{err}");
    }

    #[test]
    fn health_path_is_off_by_default_and_checked() {
        let dir = tempdir("health-path");
        let parse = |text: &str| Config::from_toml(Path::new("t.toml"), text, []).unwrap();
        let c = parse(&sample(&dir));
        assert_eq!(c.listeners[0].health_path, None);
        let with = |h: &str| {
            sample(&dir).replace(
                "tls_key_path",
                &format!("health_path = \"{h}\"\ntls_key_path"),
            )
        };
        let c = parse(&with("/healthz"));
        assert_eq!(c.listeners[0].health_path.as_deref(), Some("/healthz"));
        for (bad, why) in [("healthz", "must be a path"), ("/echo", "health_path")] {
            let err = Config::from_toml(Path::new("t.toml"), &with(bad), [])
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn route_to_unknown_service_names_the_key() {
        let dir = tempdir("route");
        let text = sample(&dir).replace("service = \"example\"", "service = \"nope\"");
        let err = Config::from_toml(Path::new("t.toml"), &text, [])
            .unwrap_err()
            .to_string();
        assert!(err.contains("route[0].service"), "{err}");
    }

    #[test]
    fn missing_certificate_file_is_an_error() {
        let dir = tempdir("cert");
        let text = sample(&dir).replace("cert.pem", "absent.pem");
        let err = Config::from_toml(Path::new("t.toml"), &text, [])
            .unwrap_err()
            .to_string();
        assert!(err.contains("listener[0].tls_cert_path"), "{err}");
    }

    #[test]
    fn a_service_frame_cap_outside_the_protocols_range_names_the_key() {
        let dir = tempdir("frame-cap-range");
        for cap in [MIN_FRAME_BYTES - 1, MAX_FRAME_LENGTH + 1] {
            let text = sample(&dir).replace(
                "addresses = [\"127.0.0.1:7000\"]",
                &format!("addresses = [\"127.0.0.1:7000\"]\nmax_frame_bytes = {cap}"),
            );
            let err = Config::from_toml(Path::new("t.toml"), &text, [])
                .unwrap_err()
                .to_string();
            assert!(err.contains("service[0].max_frame_bytes"), "{err}");
            assert!(err.contains(&cap.to_string()), "{err}");
        }
        let c = Config::from_toml(Path::new("t.toml"), &sample(&dir), []).unwrap();
        assert_eq!(c.services[0].max_frame_bytes, MAX_FRAME_BYTES);
    }

    #[test]
    fn shipped_example_config_parses() {
        // The shipped file points at Debian's snakeoil pair, which may be absent
        // here: only the parse and key checks are exercised.
        let text = include_str!("../config/edgegate.toml");
        toml::from_str::<RawConfig>(text).unwrap();
    }
}
