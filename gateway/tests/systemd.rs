//! The real binary under a fake systemd: `NOTIFY_SOCKET` is a Unix datagram
//! socket this test binds, `WATCHDOG_USEC` asks for the watchdog, and the
//! service is the example service on a real link. Checks the notification
//! sequence (READY, WATCHDOG, STATUS, RELOADING with MONOTONIC_USEC on
//! SIGHUP, STOPPING on SIGTERM, exit 0) and that SIGHUP swaps certificates
//! for new clients without dropping the connected ones.

// The shared minimal gateway config (also `edgegate_tests::fixture`).
#[path = "../../tests/src/fixture.rs"]
mod fixture;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixDatagram};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

type Ws = WebSocketStream<TlsStream<TcpStream>>;

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("edgegate-systemd-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes a fresh self-signed pair to `dir/cert.pem`, `dir/key.pem` (by
/// rename, as a deploy tool would) and returns the certificate PEM.
fn write_cert(dir: &Path) -> String {
    let (cert, key) = edgegate::tls::self_signed().unwrap();
    for (name, text) in [("cert.pem", &cert), ("key.pem", &key)] {
        let tmp = dir.join(format!("{name}.new"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
    cert
}

fn config_text(dir: &Path, service: std::net::SocketAddr, max_clients: usize) -> String {
    let mut g = fixture::MinimalGateway::new(dir.join("cert.pem"), dir.join("key.pem"), service);
    g.before = "[runtime]\nworker_threads = 1\n".into();
    g.listener_keys = vec!["backlog = 128".into()];
    g.links = 1;
    g.service_keys = vec![
        "reconnect_min_ms = 20".into(),
        "reconnect_max_ms = 200".into(),
    ];
    g.after = format!("[limits]\nmax_clients = {max_clients}\n\n[drain]\ndrain_window_secs = 1\nlb_grace_secs = 0\n");
    g.toml()
}

/// The example service on 127.0.0.1:0, stopped on drop.
struct Service {
    addr: std::net::SocketAddr,
    stop: CancellationToken,
}

impl Service {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(edgegate_link::example::run_example_service(
            listener,
            stop.clone(),
        ));
        Self { addr, stop }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// `edgegate run` as a child, with a notify socket; killed on drop.
struct Gateway {
    child: Child,
    notify: UnixDatagram,
    log: PathBuf,
    /// Every notification received so far, one datagram each.
    seen: Vec<String>,
}

impl Gateway {
    fn spawn(dir: &Path, config: &Path, watchdog_usec: Option<u64>) -> Self {
        let socket = dir.join("notify.sock");
        let _ = std::fs::remove_file(&socket);
        let notify = UnixDatagram::bind(&socket).unwrap();
        let log = dir.join("gateway.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgegate"));
        cmd.args(["run", "--config"])
            .arg(config)
            .env("NOTIFY_SOCKET", &socket)
            .env("EDGEGATE_LOG", "info")
            .env_remove("JOURNAL_STREAM")
            .env_remove("WATCHDOG_PID")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        match watchdog_usec {
            Some(usec) => cmd.env("WATCHDOG_USEC", usec.to_string()),
            None => cmd.env_remove("WATCHDOG_USEC"),
        };
        let child = cmd.spawn().expect("spawn edgegate run");
        Self {
            child,
            notify,
            log,
            seen: Vec::new(),
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        kill(pid, sig).unwrap();
    }

    /// Waits for a notification containing the line `line`; returns that datagram.
    async fn expect(&mut self, line: &str) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut buf = vec![0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let n = match tokio::time::timeout(left, self.notify.recv(&mut buf)).await {
                Ok(r) => r.unwrap(),
                Err(_) => panic!(
                    "no {line} within {WAIT:?}; got {:?}\nlog:\n{}",
                    self.seen,
                    self.log_text()
                ),
            };
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.seen.push(msg.clone());
            if msg.lines().any(|l| l == line) {
                return msg;
            }
        }
    }

    /// The address from the log line `listening listener=public addr=...`
    /// (or `admin endpoint listening ... addr=...`).
    async fn logged_addr(&self, marker: &str) -> std::net::SocketAddr {
        for _ in 0..500 {
            let log = self.log_text();
            if let Some(addr) = log
                .lines()
                .filter(|l| l.contains(marker))
                .filter_map(|l| l.split("addr=").nth(1))
                .filter_map(|rest| rest.split_whitespace().next())
                .find_map(|a| a.parse().ok())
            {
                return addr;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no {marker:?} address in the log:\n{}", self.log_text());
    }

    /// Waits for the process to exit and returns its code.
    async fn exit_code(&mut self) -> Option<i32> {
        for _ in 0..(WAIT.as_millis() / 20) {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("gateway did not exit; log:\n{}", self.log_text());
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn connector(trusted: &[&str]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for pem in trusted {
        roots
            .add(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
            .unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Connects to `/echo`; returns the client and the certificate the gateway presented.
async fn connect(addr: std::net::SocketAddr, trusted: &[&str]) -> (Ws, CertificateDer<'static>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector(trusted)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake");
    let presented = tls
        .get_ref()
        .1
        .peer_certificates()
        .expect("server certificate")[0]
        .clone()
        .into_owned();
    let url = format!("wss://localhost:{}/echo", addr.port());
    let (ws, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("upgrade");
    (ws, presented)
}

async fn echo(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("echo in time")
            .expect("client still connected")
            .expect("no error");
        if let Message::Text(t) = m {
            assert_eq!(t.as_str(), text);
            return;
        }
    }
}

/// A series' value from `GET /metrics` on the admin endpoint.
async fn admin_metric(admin: std::net::SocketAddr, series: &str) -> Option<f64> {
    let mut tcp = TcpStream::connect(admin).await.ok()?;
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    tcp.read_to_string(&mut text).await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn notify_sequence_is_ready_watchdog_status_reloading_ready_stopping_and_exit_0() {
    let service = Service::start().await;
    let dir = temp_dir("notify");
    write_cert(&dir);
    let config = dir.join("edgegate.toml");
    std::fs::write(&config, config_text(&dir, service.addr, 1000)).unwrap();
    // 1 s watchdog: the gateway pets it every 500 ms.
    let mut gw = Gateway::spawn(&dir, &config, Some(1_000_000));

    let ready = gw.expect("READY=1").await;
    assert!(ready.lines().any(|l| l.starts_with("STATUS=")), "{ready:?}");
    assert_eq!(
        gw.seen
            .iter()
            .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
            .count(),
        0,
        "READY=1 is the first notification: {:?}",
        gw.seen
    );
    let log = gw.log_text();
    assert!(
        log.contains("listening listener=public"),
        "READY=1 only after the listener is bound:\n{log}"
    );

    let pet = gw.expect("WATCHDOG=1").await;
    let status = pet
        .lines()
        .find(|l| l.starts_with("STATUS="))
        .expect("status refreshed with the watchdog");
    assert!(status.contains("0 clients"), "{status}");
    gw.expect("WATCHDOG=1").await;

    // SIGHUP with a good file: RELOADING=1 with MONOTONIC_USEC, then READY=1.
    gw.signal(Signal::SIGHUP);
    let reloading = gw.expect("RELOADING=1").await;
    let usec = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .expect("MONOTONIC_USEC with RELOADING=1");
    assert!(usec.parse::<u64>().is_ok_and(|u| u > 0), "{usec}");
    gw.expect("READY=1").await;

    // SIGHUP with a broken file: rejected with a log line, old config kept, still serving.
    let admin = gw.logged_addr("admin endpoint listening").await;
    std::fs::write(&config, "[limits]\nmax_clientz = 1\n").unwrap();
    gw.signal(Signal::SIGHUP);
    gw.expect("RELOADING=1").await;
    gw.expect("READY=1").await;
    assert!(
        gw.log_text().contains("reload rejected"),
        "{}",
        gw.log_text()
    );
    assert_eq!(
        admin_metric(admin, "edgegate_config_reloads_total{result=\"rejected\"}").await,
        Some(1.0)
    );
    assert_eq!(
        admin_metric(admin, "edgegate_config_reloads_total{result=\"ok\"}").await,
        Some(1.0)
    );
    assert!(
        gw.child.try_wait().unwrap().is_none(),
        "still running after a bad reload"
    );

    gw.signal(Signal::SIGTERM);
    gw.expect("STOPPING=1").await;
    assert_eq!(gw.exit_code().await, Some(0), "log:\n{}", gw.log_text());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_reload_names_every_key_that_needs_a_restart_until_the_file_is_back() {
    let service = Service::start().await;
    let dir = temp_dir("restart-only");
    write_cert(&dir);
    let config = dir.join("edgegate.toml");
    let original = config_text(&dir, service.addr, 1000);
    std::fs::write(&config, &original).unwrap();
    // With a watchdog, STATUS= is refreshed with every WATCHDOG=1.
    let mut gw = Gateway::spawn(&dir, &config, Some(1_000_000));
    gw.expect("READY=1").await;
    let admin = gw.logged_addr("admin endpoint listening").await;

    // A live key (max_clients) beside two that only a restart applies.
    let changed = original
        .replace("backlog = 128", "backlog = 64")
        .replace(&service.addr.to_string(), "127.0.0.1:9")
        .replace("max_clients = 1000", "max_clients = 900");
    assert_ne!(changed, original);
    std::fs::write(&config, &changed).unwrap();
    gw.signal(Signal::SIGHUP);
    gw.expect("RELOADING=1").await;
    let ready = gw.expect("READY=1").await;
    let status = ready
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .expect("STATUS= with READY=1")
        .to_owned();
    assert!(
        status.contains("restart needed for listener.public.backlog, service.example.addresses"),
        "{status}"
    );
    assert_eq!(
        admin_metric(admin, "edgegate_config_restart_pending").await,
        Some(2.0)
    );
    assert_eq!(
        admin_metric(admin, "edgegate_clients_max").await,
        Some(900.0)
    );
    let log = gw.log_text();
    for key in ["listener.public.backlog", "service.example.addresses"] {
        assert!(
            log.lines()
                .any(|l| l.contains("applies only after a restart") && l.contains(key)),
            "{key} not logged:\n{log}"
        );
    }
    // The periodic status keeps saying it.
    let refreshed = gw.expect("WATCHDOG=1").await;
    assert!(refreshed.contains("restart needed"), "{refreshed}");

    // The file back as it was: nothing waits for a restart any more.
    std::fs::write(&config, &original).unwrap();
    gw.signal(Signal::SIGHUP);
    gw.expect("RELOADING=1").await;
    let ready = gw.expect("READY=1").await;
    assert!(!ready.contains("restart needed"), "{ready}");
    assert_eq!(
        admin_metric(admin, "edgegate_config_restart_pending").await,
        Some(0.0)
    );

    gw.signal(Signal::SIGTERM);
    assert_eq!(gw.exit_code().await, Some(0), "log:\n{}", gw.log_text());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn sighup_serves_new_certificates_to_new_clients_and_keeps_connected_ones() {
    let service = Service::start().await;
    let dir = temp_dir("certs");
    let old_pem = write_cert(&dir);
    let config = dir.join("edgegate.toml");
    std::fs::write(&config, config_text(&dir, service.addr, 1000)).unwrap();
    let mut gw = Gateway::spawn(&dir, &config, None);
    gw.expect("READY=1").await;
    let addr = gw.logged_addr("listening listener=public").await;
    let old_der = CertificateDer::from_pem_slice(old_pem.as_bytes()).unwrap();

    // Links come up right after READY=1; retry the first echo until one is up.
    let mut first = None;
    for _ in 0..100 {
        let (mut ws, presented) = connect(addr, &[&old_pem]).await;
        assert_eq!(presented, old_der);
        ws.send(Message::text("warm-up")).await.unwrap();
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => {
                first = Some(ws);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let mut old_client = first.expect("an echo through the example service");

    let new_pem = write_cert(&dir);
    let new_der = CertificateDer::from_pem_slice(new_pem.as_bytes()).unwrap();
    assert_ne!(old_der, new_der);
    gw.signal(Signal::SIGHUP);
    gw.expect("RELOADING=1").await;
    gw.expect("READY=1").await;

    let (mut new_client, presented) = connect(addr, &[&old_pem, &new_pem]).await;
    assert_eq!(
        presented, new_der,
        "a client arriving after SIGHUP sees the new certificate"
    );
    echo(&mut new_client, "new").await;
    echo(&mut old_client, "still here").await;
    assert!(
        gw.log_text().contains("configuration reloaded"),
        "{}",
        gw.log_text()
    );

    gw.signal(Signal::SIGTERM);
    assert_eq!(gw.exit_code().await, Some(0), "log:\n{}", gw.log_text());
    let _ = std::fs::remove_dir_all(&dir);
}
