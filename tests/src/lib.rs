//! Test helpers: a real gateway on `127.0.0.1:0`, a real service on the other
//! end of a real link, and a real TLS WebSocket client.
//!
//! - [`TestCert`]: a fresh self-signed certificate written to a temp dir.
//! - [`TestGateway`]: builds a config (TOML, through the same pipeline as
//!   `edgegate run`), starts the gateway in-process, shuts it down on drop.
//! - [`ws_connect`]: a TLS WebSocket client that trusts the test certificate.
//! - [`EventService`]: a link-protocol service whose events a test reads.
//! - [`fixture::MinimalGateway`]: the one minimal gateway config the tests
//!   start from (also read by the gateway crate's own integration tests).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgegate::{Config, Gateway};
use edgegate_link::service::{Event, Service, ServiceConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::Response;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

pub mod fixture;
pub mod framed;
pub mod load;

/// The client side of a test connection.
pub type WsClient = WebSocketStream<TlsStream<TcpStream>>;

static DIR_SEQ: AtomicU64 = AtomicU64::new(0);

/// A fresh, empty directory under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "edgegate-test-{tag}-{}-{}",
        std::process::id(),
        DIR_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// A self-signed certificate for localhost/127.0.0.1.
#[derive(Debug, Clone)]
pub struct TestCert {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub cert_pem: String,
}

impl TestCert {
    pub fn generate(dir: &Path) -> Self {
        let (cert_pem, key_pem) = edgegate::tls::self_signed().expect("generate certificate");
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        std::fs::write(&cert_path, &cert_pem).unwrap();
        std::fs::write(&key_path, key_pem).unwrap();
        Self {
            cert_path,
            key_path,
            cert_pem,
        }
    }

    /// As [`TestCert::generate`], valid for the 30 days up to `not_after`
    /// (which may be past: an expired certificate still loads).
    pub fn generate_valid_until(dir: &Path, not_after: SystemTime) -> Self {
        let at = |t: SystemTime| {
            let secs = t.duration_since(UNIX_EPOCH).expect("after 1970");
            rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(secs.as_secs())
        };
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("certificate names");
        params.not_before = at(not_after - Duration::from_secs(30 * 86_400));
        params.not_after = at(not_after);
        let key = rcgen::KeyPair::generate().expect("generate key");
        let cert = params.self_signed(&key).expect("sign certificate");
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        std::fs::write(&cert_path, &cert_pem).unwrap();
        std::fs::write(&key_path, key_pem).unwrap();
        Self {
            cert_path,
            key_path,
            cert_pem,
        }
    }

    /// A TLS connector that trusts only this certificate (ALPN `http/1.1`).
    pub fn connector(&self) -> TlsConnector {
        self.connector_alpn(&[b"http/1.1"])
    }

    /// As [`TestCert::connector`], offering `alpn` (none if empty).
    pub fn connector_alpn(&self, alpn: &[&[u8]]) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.cert_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        TlsConnector::from(Arc::new(config))
    }
}

/// A link-protocol service on `127.0.0.1:0` whose events the test reads.
pub struct EventService {
    pub service: Service,
    pub events: mpsc::Receiver<Event>,
    pub addr: std::net::SocketAddr,
    stop: CancellationToken,
}

impl EventService {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener)
    }

    pub fn start_on(listener: TcpListener) -> Self {
        let stop = CancellationToken::new();
        let (service, events) =
            Service::start(listener, ServiceConfig::new("test"), stop.clone()).unwrap();
        let addr = service.local_addr();
        Self {
            service,
            events,
            addr,
            stop,
        }
    }

    /// The next event, or panic after `within`.
    pub async fn next_event(&mut self, within: Duration) -> Event {
        tokio::time::timeout(within, self.events.recv())
            .await
            .expect("service event in time")
            .expect("service running")
    }

    /// Waits for an event matching `pred`, skipping others.
    pub async fn wait_for(
        &mut self,
        within: Duration,
        mut pred: impl FnMut(&Event) -> bool,
    ) -> Event {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let e = self.next_event(left).await;
            if pred(&e) {
                return e;
            }
        }
    }

    /// Stops the service: links get Goaway and close.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for EventService {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The example service (echo and chat) on `127.0.0.1:0`.
pub struct ExampleService {
    pub addr: std::net::SocketAddr,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl ExampleService {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener)
    }

    pub fn start_on(listener: TcpListener) -> Self {
        let config = ServiceConfig::new(edgegate_link::example::EXAMPLE_SERVICE_NAME);
        Self::start_with(listener, config)
    }

    /// The example service saying `max_frame_bytes` in its `Hello`.
    pub async fn start_with_max_frame_bytes(max_frame_bytes: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut config = ServiceConfig::new(edgegate_link::example::EXAMPLE_SERVICE_NAME);
        config.max_frame_bytes = max_frame_bytes;
        Self::start_with(listener, config)
    }

    pub fn start_with(listener: TcpListener, config: ServiceConfig) -> Self {
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(edgegate_link::example::run_example_service_with(
            listener,
            config,
            stop.clone(),
        ));
        Self {
            addr,
            stop,
            task: Some(task),
        }
    }

    /// Stops it and waits until its links are closed.
    pub async fn kill(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for ExampleService {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Builds the TOML for a test gateway.
#[derive(Debug, Clone)]
pub struct GatewayBuilder {
    /// The test service's addresses, one per instance.
    service_addrs: Vec<std::net::SocketAddr>,
    links: usize,
    routes: Vec<String>,
    limits: Vec<(String, String)>,
    heartbeat: Vec<(String, String)>,
    auth: Vec<(String, String)>,
    drain_window_secs: u64,
    protocol: &'static str,
    backlog: u32,
    /// The listener's `tls_stream`; unset: the fixture's default (see
    /// [`fixture::TLS_STREAM_ENV`]).
    tls_stream: Option<&'static str>,
    service_keys: Vec<(String, String)>,
    listener_keys: Vec<(String, String)>,
}

impl GatewayBuilder {
    pub fn new(service_addr: std::net::SocketAddr) -> Self {
        Self {
            service_addrs: vec![service_addr],
            links: 2,
            routes: vec!["/echo".into(), "/chat".into()],
            limits: Vec::new(),
            heartbeat: Vec::new(),
            auth: Vec::new(),
            drain_window_secs: 1,
            protocol: "websocket",
            backlog: 1024,
            tls_stream: None,
            service_keys: Vec::new(),
            listener_keys: Vec::new(),
        }
    }

    /// Sets a `[[service]]` key of the test service (value as TOML).
    pub fn service_key(mut self, key: &str, value: impl ToString) -> Self {
        self.service_keys.push((key.into(), value.to_string()));
        self
    }

    /// Sets a `[[listener]]` key of the test listener (value as TOML).
    pub fn listener_key(mut self, key: &str, value: impl ToString) -> Self {
        self.listener_keys.push((key.into(), value.to_string()));
        self
    }

    /// The listener's accept backlog.
    pub fn backlog(mut self, backlog: u32) -> Self {
        self.backlog = backlog;
        self
    }

    /// The listener's TLS stream (`"rustls"` or `"lean"`), whatever
    /// [`fixture::TLS_STREAM_ENV`] says.
    pub fn tls_stream(mut self, kind: &'static str) -> Self {
        self.tls_stream = Some(kind);
        self
    }

    /// Makes the test listener speak the framed protocol.
    pub fn framed(mut self) -> Self {
        self.protocol = "framed";
        self
    }

    /// Links per instance of the test service.
    pub fn links(mut self, n: usize) -> Self {
        self.links = n;
        self
    }

    /// Gives the test service these instances (its `addresses`), instead of
    /// the one address the builder was made with.
    pub fn instances(mut self, addrs: &[std::net::SocketAddr]) -> Self {
        self.service_addrs = addrs.to_vec();
        self
    }

    /// Links the gateway keeps to the test service: `links` per instance.
    pub fn total_links(&self) -> usize {
        self.links * self.service_addrs.len()
    }

    /// Sets a `[limits]` key (value as TOML).
    pub fn limit(mut self, key: &str, value: impl ToString) -> Self {
        self.limits.push((key.into(), value.to_string()));
        self
    }

    /// Sets a `[heartbeat]` key.
    pub fn heartbeat(mut self, key: &str, value: impl ToString) -> Self {
        self.heartbeat.push((key.into(), value.to_string()));
        self
    }

    /// Sets an `[auth]` key (value as TOML, e.g. `"\"jwt\""`).
    pub fn auth(mut self, key: &str, value: impl ToString) -> Self {
        self.auth.push((key.into(), value.to_string()));
        self
    }

    pub fn drain_window_secs(mut self, secs: u64) -> Self {
        self.drain_window_secs = secs;
        self
    }

    /// The config text this builder produces, with `cert`: the shared
    /// [`fixture::MinimalGateway`] with this builder's keys.
    pub fn toml(&self, cert: &TestCert) -> String {
        let mut g = fixture::MinimalGateway::new(&cert.cert_path, &cert.key_path, "");
        g.service_addrs = self.service_addrs.iter().map(ToString::to_string).collect();
        g.listener = "test".into();
        g.service = "svc".into();
        g.routes.clone_from(&self.routes);
        g.links = self.links;
        g.listener_keys = vec![
            format!("protocol = \"{}\"", self.protocol),
            format!("backlog = {}", self.backlog),
        ];
        if let Some(kind) = self.tls_stream {
            g.listener_keys.push(format!("tls_stream = \"{kind}\""));
        }
        g.listener_keys
            .extend(self.listener_keys.iter().map(|(k, v)| format!("{k} = {v}")));
        // Fast link defaults for tests; a test's own `service_key` replaces
        // the default of the same name (TOML refuses a key given twice).
        let defaults = [
            ("ping_interval_secs", "1"),
            ("ping_timeout_secs", "3"),
            ("reconnect_min_ms", "20"),
            ("reconnect_max_ms", "200"),
        ];
        g.service_keys = defaults
            .iter()
            .filter(|(k, _)| !self.service_keys.iter().any(|(own, _)| own == k))
            .map(|(k, v)| format!("{k} = {v}"))
            .chain(self.service_keys.iter().map(|(k, v)| format!("{k} = {v}")))
            .collect();
        let mut after = String::new();
        for (section, kv) in [
            ("limits", &self.limits),
            ("heartbeat", &self.heartbeat),
            ("auth", &self.auth),
        ] {
            let _ = writeln!(after, "[{section}]");
            for (k, v) in kv {
                let _ = writeln!(after, "{k} = {v}");
            }
            after.push('\n');
        }
        let _ = writeln!(
            after,
            "[drain]\nlb_grace_secs = 0\ndrain_window_secs = {}",
            self.drain_window_secs
        );
        g.after = after;
        g.toml()
    }

    /// Starts the gateway and waits until every link (to every instance)
    /// is up. Call it again (on a clone) for more gateways in front of the
    /// same instances: each has its own certificate, ports and name.
    pub async fn start(self) -> TestGateway {
        let links = self.total_links();
        self.start_with_links_up(links).await
    }

    /// Starts the gateway and waits until `links` links are up (for tests
    /// in which some instance is meant not to be linked).
    pub async fn start_with_links_up(self, links: usize) -> TestGateway {
        let dir = temp_dir("gw");
        let cert = TestCert::generate(&dir);
        let text = self.toml(&cert);
        let path = dir.join("edgegate.toml");
        std::fs::write(&path, &text).unwrap();
        let config =
            Config::from_toml(&path, &text, std::iter::empty()).expect("test config checks");
        let gateway = Gateway::start(&config).await.expect("gateway starts");
        let addr = gateway.local_addr("test").unwrap();
        let tg = TestGateway {
            gateway: Some(gateway),
            addr,
            cert,
            config,
            dir,
        };
        tg.wait_links(links).await;
        tg
    }
}

/// How often [`eventually`] looks again.
const POLL_EVERY: Duration = Duration::from_millis(10);

/// Waits until `cond` holds, looking every 10 ms, for at most `within`;
/// returns whether it held. For what a real socket, link or process makes
/// true, which paused time cannot drive: the test asserts on the state after.
pub async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// A running in-process gateway; shut down (fast) on drop.
pub struct TestGateway {
    gateway: Option<Gateway>,
    pub addr: std::net::SocketAddr,
    pub cert: TestCert,
    pub config: Config,
    pub dir: PathBuf,
}

impl TestGateway {
    pub fn gateway(&self) -> &Gateway {
        self.gateway.as_ref().expect("running")
    }

    /// Waits until `n` links to the test service (over all its instances)
    /// are up.
    pub async fn wait_links(&self, n: usize) {
        if eventually(Duration::from_secs(5), || {
            self.gateway().links_up("svc") >= n
        })
        .await
        {
            return;
        }
        panic!(
            "links did not come up: {} of {n}",
            self.gateway().links_up("svc")
        );
    }

    /// Opens a TLS WebSocket client on `path` (which may carry a query).
    pub async fn connect(&self, path: &str) -> WsClient {
        self.try_connect(path, &[]).await.expect("client connects")
    }

    /// Opens a client with extra request headers; the error carries the HTTP
    /// response for refused upgrades.
    pub async fn try_connect(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<WsClient, tokio_tungstenite::tungstenite::Error> {
        ws_connect(self.addr, &self.cert, path, headers).await
    }

    /// The admin endpoint (`/metrics`, `/healthz`, `/readyz`), on an ephemeral port.
    pub fn admin_addr(&self) -> std::net::SocketAddr {
        self.gateway().admin_addr()
    }

    /// Instances of the test service with a link up, and how many it has,
    /// as the metrics say them.
    pub fn instances_linked(&self) -> (usize, usize) {
        let of = |name| self.metric(name, "service=\"svc\"") as usize;
        (
            of("edgegate_service_instances_linked"),
            of("edgegate_service_instances"),
        )
    }

    /// Counter or gauge value from the metrics text: the sum of every series
    /// of `name` whose labels contain `labels` (e.g. `reason="slow_reader"`).
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        metric_value(&self.gateway().encode_metrics(), name, labels)
    }

    /// Drains and stops the gateway.
    pub async fn shutdown(mut self, window: Duration) {
        if let Some(g) = self.gateway.take() {
            g.shutdown(window).await;
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(g) = self.gateway.take() {
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(g.shutdown(Duration::ZERO));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sum of the series of metric `name` (exact name as exposed) whose label set
/// contains `labels`.
pub fn metric_value(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            (n == name && rest.contains(labels)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// Connects a TLS WebSocket client to `addr` trusting `cert`.
pub async fn ws_connect(
    addr: std::net::SocketAddr,
    cert: &TestCert,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<WsClient, tokio_tungstenite::tungstenite::Error> {
    let tcp = TcpStream::connect(addr).await?;
    let tls = cert
        .connector()
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let mut req = format!("wss://localhost:{}{path}", addr.port()).into_client_request()?;
    for (k, v) in headers {
        req.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    // Frames as large as a message (64 MiB), as browsers take them:
    // tungstenite's 16 MiB frame default would refuse a large echo that
    // the gateway sends as one frame.
    let config = WebSocketConfig::default().max_frame_size(None);
    let (ws, _resp): (WsClient, Response<Option<Vec<u8>>>) =
        tokio_tungstenite::client_async_with_config(req, tls, Some(config)).await?;
    Ok(ws)
}

/// The close code `ws` receives next, skipping data; `None` when the stream
/// ends without a close frame.
///
/// # Panics
/// When nothing closes the client within `within`.
pub async fn close_code(ws: &mut WsClient, within: Duration) -> Option<u16> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no close within {within:?}"))
        {
            None | Some(Err(_)) => return None,
            Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
        }
    }
}

/// The HTTP status of a refused upgrade.
pub fn refused_status(e: &tokio_tungstenite::tungstenite::Error) -> Option<u16> {
    match e {
        tokio_tungstenite::tungstenite::Error::Http(resp) => Some(resp.status().as_u16()),
        _ => None,
    }
}

/// A reply from the admin endpoint (see [`http_get`]).
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }
}

/// A plain HTTP/1.1 request to `addr` (the admin endpoint) with
/// `Connection: close`; the reply is read to the end.
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpReply> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(addr).await?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    tcp.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut raw))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "admin reply timed out")
        })??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP reply");
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(HttpReply {
        status,
        headers,
        body: body.to_owned(),
    })
}

/// `GET path` on the admin endpoint at `addr`.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<HttpReply> {
    http_request(addr, "GET", path, &[]).await
}
