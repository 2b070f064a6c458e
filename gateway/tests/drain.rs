//! SIGTERM drain of the real binary with thousands of clients: every client
//! receives close 1001 within the drain window, the closes are spread over
//! the window, and the process exits 0.

// The shared minimal gateway config (also `edgegate_tests::fixture`).
#[path = "../../tests/src/fixture.rs"]
mod fixture;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const CLIENTS: usize = 2000;
const DRAIN_WINDOW_SECS: u64 = 4;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn connector(cert_pem: &str) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(cert_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Connects one client and returns when it is closed: (close code, when).
async fn client(
    addr: SocketAddr,
    tls: tokio_rustls::TlsConnector,
) -> tokio::task::JoinHandle<Option<(u16, Instant)>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let stream = tls
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let req = format!("wss://localhost:{}/echo", addr.port())
        .into_client_request()
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    tokio::spawn(async move {
        while let Some(m) = ws.next().await {
            if let Ok(Message::Close(Some(f))) = m {
                return Some((u16::from(f.code), Instant::now()));
            }
            if m.is_err() {
                return None;
            }
        }
        None
    })
}

/// The admin endpoint's answer to `GET path`: its status code and body, or
/// `None` while it does not answer.
async fn admin_get(admin: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(admin).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: edgegate\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut reply))
        .await
        .ok()?
        .ok()?;
    let reply = String::from_utf8_lossy(&reply);
    let status = reply.split_whitespace().nth(1)?.parse().ok()?;
    let (_, body) = reply.split_once("\r\n\r\n")?;
    Some((status, body.to_owned()))
}

/// The admin endpoint's status code for `GET path`, or `None` while it does
/// not answer.
async fn admin_status(admin: SocketAddr, path: &str) -> Option<u16> {
    admin_get(admin, path).await.map(|(status, _)| status)
}

/// Polls `GET path` on the admin endpoint until it answers `status`, for at
/// most `within`; returns whether it did.
async fn wait_admin(admin: SocketAddr, path: &str, status: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if admin_status(admin, path).await == Some(status) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// The real binary, started with the example service behind it.
struct Running {
    child: std::process::Child,
    addr: SocketAddr,
    admin: SocketAddr,
    cert: String,
    dir: std::path::PathBuf,
    stop: tokio_util::sync::CancellationToken,
}

impl Running {
    /// Starts `edgegate run` with `drain_window_secs` (and no load-balancer
    /// grace) and waits until its links are up.
    async fn start(tag: &str, drain_window_secs: u64) -> Self {
        Self::start_with_grace(tag, drain_window_secs, 0).await
    }

    /// As [`Running::start`], with `lb_grace_secs`.
    async fn start_with_grace(tag: &str, drain_window_secs: u64, lb_grace_secs: u64) -> Self {
        let dir = std::env::temp_dir().join(format!("edgegate-drain-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = edgegate::tls::self_signed().unwrap();
        std::fs::write(dir.join("cert.pem"), &cert).unwrap();
        std::fs::write(dir.join("key.pem"), &key).unwrap();
        let service = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let service_addr = service.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(edgegate_link::example::run_example_service(
            service,
            stop.clone(),
        ));
        let (port, admin_port) = (free_port(), free_port());
        let mut config =
            fixture::MinimalGateway::new(dir.join("cert.pem"), dir.join("key.pem"), service_addr);
        config.bind = format!("127.0.0.1:{port}");
        config.admin = format!("127.0.0.1:{admin_port}");
        config.after = format!(
            "[limits]\nmax_clients = 5000\n[drain]\ndrain_window_secs = {drain_window_secs}\nlb_grace_secs = {lb_grace_secs}\n"
        );
        let config = config.toml();
        let config_path = dir.join("edgegate.toml");
        std::fs::write(&config_path, config).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_edgegate"))
            .args(["run", "--config"])
            .arg(&config_path)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
        // Ready means listening with the links up; before that clients get 1013.
        assert!(
            wait_admin(admin, "/readyz", 200, Duration::from_secs(10)).await,
            "edgegate did not become ready"
        );
        Self {
            child,
            addr,
            admin,
            cert,
            dir,
            stop,
        }
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Waits for the process to exit and cleans up.
    async fn exit_status(self) -> std::process::ExitStatus {
        let Running {
            mut child,
            dir,
            stop,
            ..
        } = self;
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
        stop.cancel();
        let _ = std::fs::remove_dir_all(&dir);
        status
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_thousands_of_clients_with_1001_spread_over_the_window_and_exits_0() {
    let gw = Running::start("many", DRAIN_WINDOW_SECS).await;
    let (addr, cert) = (gw.addr, gw.cert.clone());

    let tls = connector(&cert);
    let mut waiters = Vec::with_capacity(CLIENTS);
    for chunk in 0..CLIENTS / 50 {
        let batch: Vec<_> = (0..50).map(|_| client(addr, tls.clone())).collect();
        for w in futures_util::future::join_all(batch).await {
            waiters.push(w);
        }
        let _ = chunk;
    }

    let sent = Instant::now();
    gw.signal(nix::sys::signal::Signal::SIGTERM);
    let mut closes = Vec::with_capacity(CLIENTS);
    for w in waiters {
        let got = tokio::time::timeout(Duration::from_secs(DRAIN_WINDOW_SECS + 10), w)
            .await
            .expect("close within the window")
            .unwrap();
        closes.push(got.expect("a close frame"));
    }
    let status = gw.exit_status().await;

    assert!(
        closes.iter().all(|(code, _)| *code == 1001),
        "every client got 1001"
    );
    let window = Duration::from_secs(DRAIN_WINDOW_SECS);
    let offsets: Vec<Duration> = closes.iter().map(|(_, t)| t.duration_since(sent)).collect();
    let last = *offsets.iter().max().unwrap();
    let first = *offsets.iter().min().unwrap();
    assert!(
        last <= window + Duration::from_secs(2),
        "last close at {last:?}"
    );
    assert!(
        last - first >= window / 2,
        "closes spread over {:?} only",
        last - first
    );
    // No tenth of the window takes more than a quarter of the clients.
    let mut buckets = [0usize; 10];
    for o in &offsets {
        let b = ((o.as_secs_f64() / window.as_secs_f64()) * 10.0) as usize;
        buckets[b.min(9)] += 1;
    }
    assert!(
        buckets.iter().all(|&n| n <= CLIENTS / 4),
        "closes bunched: {buckets:?}"
    );
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_during_a_long_drain_exits_at_once() {
    let gw = Running::start("twice", 60).await;
    let _client = client(gw.addr, connector(&gw.cert)).await;
    gw.signal(nix::sys::signal::Signal::SIGTERM);
    // The first SIGTERM has started the drain once readiness says so.
    assert!(wait_admin(gw.admin, "/readyz", 503, Duration::from_secs(5)).await);
    let second = Instant::now();
    gw.signal(nix::sys::signal::Signal::SIGTERM);
    let status = gw.exit_status().await;
    assert!(
        second.elapsed() < Duration::from_secs(5),
        "exited {:?} after the second SIGTERM",
        second.elapsed()
    );
    assert_ne!(
        status.code(),
        Some(0),
        "an interrupted drain is not a clean exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_within_a_second_and_exits_0() {
    let gw = Running::start("int", 60).await;
    let client = client(gw.addr, connector(&gw.cert)).await;
    let sent = Instant::now();
    gw.signal(nix::sys::signal::Signal::SIGINT);
    let closed = tokio::time::timeout(Duration::from_secs(10), client)
        .await
        .unwrap()
        .unwrap();
    let (code, at) = closed.expect("a close frame");
    assert_eq!(code, 1001);
    assert!(
        at.duration_since(sent) < Duration::from_secs(3),
        "closed after {:?}",
        at.duration_since(sent)
    );
    assert_eq!(gw.exit_status().await.code(), Some(0));
}

/// `edgegate demo` shares `run`'s lifecycle: SIGTERM drains its clients with
/// 1001 and the process exits 0 (it used to die on the signal, status 143).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_drains_on_sigterm_like_run_and_exits_0() {
    let (port, service_port, admin_port) = (free_port(), free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgegate"))
        .arg("demo")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--service", &format!("127.0.0.1:{service_port}")])
        .args(["--admin", &format!("127.0.0.1:{admin_port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    assert!(
        wait_admin(admin, "/readyz", 200, Duration::from_secs(10)).await,
        "the demo did not become ready"
    );
    let dir = std::env::temp_dir().join(format!("edgegate-demo-{}", child.id()));
    let cert = std::fs::read_to_string(dir.join("cert.pem")).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let waiter = client(addr, connector(&cert)).await;

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let close = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("a close within the demo's drain window")
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(close.map(|(code, _)| code), Some(1001));
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    assert!(!dir.exists(), "the demo removes its files on exit");
}

/// Sends one text message and waits for the echo, on a fresh client.
async fn echo_once(addr: SocketAddr, tls: &tokio_rustls::TlsConnector) -> bool {
    use futures_util::SinkExt;
    let Ok(tcp) = TcpStream::connect(addr).await else {
        return false;
    };
    let Ok(stream) = tls
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
    else {
        return false;
    };
    let req = format!("wss://localhost:{}/echo", addr.port())
        .into_client_request()
        .unwrap();
    let Ok((mut ws, _)) = tokio_tungstenite::client_async(req, stream).await else {
        return false;
    };
    if ws.send(Message::text("during grace")).await.is_err() {
        return false;
    }
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    matches!(reply, Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "during grace")
}

/// The drain's first phase: readiness answers 503 while new clients are
/// still accepted and served for `lb_grace_secs`; only then are connections
/// refused, and every client, old or new, gets 1001.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_lb_grace_readiness_is_503_and_new_clients_are_still_served() {
    let gw = Running::start_with_grace("grace", 1, 3).await;
    let tls = connector(&gw.cert);
    let before = client(gw.addr, tls.clone()).await;
    let sent = Instant::now();
    gw.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        wait_admin(gw.admin, "/readyz", 503, Duration::from_secs(2)).await,
        "readiness turns off at once"
    );
    assert!(
        echo_once(gw.addr, &tls).await,
        "a new client is accepted and served during the grace"
    );
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "the grace check ran inside the grace ({:?})",
        sent.elapsed()
    );
    let during = client(gw.addr, tls.clone()).await;
    // After the grace the listeners close: connecting is refused.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut refused = false;
    while Instant::now() < deadline {
        if TcpStream::connect(gw.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "the listener closes after the grace");
    assert!(
        sent.elapsed() >= Duration::from_secs(3),
        "connections were refused before the grace ended ({:?})",
        sent.elapsed()
    );
    for w in [before, during] {
        let got = tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .expect("a close within the window")
            .unwrap();
        assert_eq!(got.map(|(code, _)| code), Some(1001));
    }
    let status = gw.exit_status().await;
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}

/// A reload changes what the next drain does. Started with no load-balancer
/// grace and a 600 s window, then reloaded by SIGHUP with a 2 s grace and a
/// 1 s window, the gateway's SIGTERM turns readiness off while still
/// accepting and serving new clients for the new grace, refuses connections
/// only after it, and closes a client at the end of the new window, not ten
/// minutes later. (A drain with one client closes it at the window's end.)
/// The bounds are generous: only the order of events and the 600 s the old
/// window would take are asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_grace_and_the_window_of_the_next_drain() {
    let gw = Running::start_with_grace("reload", 600, 0).await;
    let path = gw.dir.join("edgegate.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("drain_window_secs = 600\nlb_grace_secs = 0\n"));
    let text = text.replace(
        "drain_window_secs = 600\nlb_grace_secs = 0\n",
        "drain_window_secs = 1\nlb_grace_secs = 2\n",
    );
    std::fs::write(&path, text).unwrap();
    gw.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut reloaded = false;
    while !reloaded && Instant::now() < deadline {
        if let Some((_, metrics)) = admin_get(gw.admin, "/metrics").await {
            reloaded = metrics
                .lines()
                .any(|l| l == "edgegate_config_reloads_total{result=\"ok\"} 1");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reloaded, "the reload was not accepted");

    let tls = connector(&gw.cert);
    let before = client(gw.addr, tls.clone()).await;
    let sent = Instant::now();
    gw.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        wait_admin(gw.admin, "/readyz", 503, Duration::from_secs(2)).await,
        "readiness turns off at once"
    );
    assert!(
        echo_once(gw.addr, &tls).await,
        "the reloaded grace: a new client is accepted and served"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut refused_after = None;
    while Instant::now() < deadline {
        if TcpStream::connect(gw.addr).await.is_err() {
            refused_after = Some(sent.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused_after = refused_after.expect("the listener closes after the grace");
    assert!(
        refused_after >= Duration::from_secs(2),
        "connections were refused {refused_after:?} after SIGTERM, inside the reloaded 2 s grace"
    );
    let (code, at) = tokio::time::timeout(Duration::from_secs(30), before)
        .await
        .expect("closed within the reloaded window, not the started one (600 s)")
        .unwrap()
        .expect("a close frame");
    assert_eq!(code, 1001);
    let closed_after = at.duration_since(sent);
    assert!(
        closed_after >= Duration::from_millis(2900),
        "closed {closed_after:?} after SIGTERM: before the 2 s grace and the 1 s window"
    );
    let status = gw.exit_status().await;
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}
