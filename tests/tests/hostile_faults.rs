//! Faults: a service that crashes mid-stream and comes back (a flapping
//! link), a service too slow to read, file descriptors exhausted, signals
//! under load, and memory after a hostile mix. The rule checked end to end:
//! every message a client sends is delivered to the service in order, or
//! the client receives a close code (1011/1012/1013) saying it may not have
//! been. The results table is `docs/hostile-input.md`.
//!
//! The in-process tests use [`RecordingService`], a link-protocol service
//! written here on the raw codec so the test can crash it (sockets dropped,
//! no Goaway) or stop it reading. The process tests run the real
//! `edgegate` binary (`edgegate-process`, built by cargo from the gateway's
//! `main.rs` before the tests run).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgegate_link::proto::{Frame, FrameCodec, PROTOCOL_VERSION};
use edgegate_tests::fixture::MinimalGateway;
use edgegate_tests::{eventually, http_get, metric_value, GatewayBuilder, TestCert, WsClient};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::codec::{FramedRead, FramedWrite};

const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// A service that records what arrives, and can crash or stall on demand.
// ---------------------------------------------------------------------------

/// Sequence numbers received, per client connection tag, in arrival order.
type Log = Arc<Mutex<HashMap<u32, Vec<u64>>>>;

struct RecordingService {
    addr: SocketAddr,
    log: Log,
    /// The accept loop; it owns the link tasks, so aborting it drops every link.
    task: tokio::task::JoinHandle<()>,
}

impl RecordingService {
    /// Listens on `addr` (port 0 for any) with a small receive buffer, so a
    /// stalled service fills up quickly. While `paused` is set its link
    /// readers stop reading (the service is "slow").
    async fn start(addr: SocketAddr, log: Log, paused: Arc<AtomicBool>) -> Self {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.set_recv_buffer_size(16 * 1024).unwrap();
        socket.bind(addr).unwrap();
        let listener = socket.listen(64).unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(accept(listener, log.clone(), paused.clone()));
        Self { addr, log, task }
    }

    /// Crashes: every link socket is dropped at once, no Goaway.
    fn crash(&self) {
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, log: Log, paused: Arc<AtomicBool>) {
    let mut links = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        links.spawn(serve_link(stream, log.clone(), paused.clone()));
    }
}

async fn serve_link(stream: TcpStream, log: Log, paused: Arc<AtomicBool>) {
    let (r, w) = stream.into_split();
    let mut reader = FramedRead::new(r, FrameCodec::default());
    let mut writer = FramedWrite::new(w, FrameCodec::default());
    match reader.next().await {
        Some(Ok(Frame::Hello { .. })) => {}
        _ => return,
    }
    let hello = Frame::Hello {
        version: PROTOCOL_VERSION,
        name: "recorder".into(),
        max_frame_bytes: edgegate_link::proto::MAX_FRAME_BYTES as u32,
    };
    if writer.send(hello).await.is_err() {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut ticks = 0u64;
    loop {
        let reading = !paused.load(Ordering::Relaxed);
        tokio::select! {
            frame = reader.next(), if reading => match frame {
                Some(Ok(Frame::Ping { nonce })) => {
                    if writer.send(Frame::Pong { nonce }).await.is_err() { return; }
                }
                Some(Ok(Frame::ClientMessage { payload, .. })) => {
                    let text = std::str::from_utf8(&payload).unwrap();
                    let (conn, seq) = text.split_once(':').unwrap();
                    let seq: u64 = seq.split(':').next().unwrap().parse().unwrap();
                    log.lock().unwrap().entry(conn.parse().unwrap()).or_default().push(seq);
                }
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return,
            },
            _ = tick.tick() => {
                ticks += 1;
                // Proof of life every 200 ms, even while not reading.
                if ticks.is_multiple_of(10) && writer.send(Frame::Ping { nonce: ticks }).await.is_err() {
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Clients that number their messages.
// ---------------------------------------------------------------------------

/// How one client connection ended.
#[derive(Debug, Clone)]
struct Conn {
    tag: u32,
    /// Messages the client wrote (`send` returned Ok).
    sent: u64,
    /// The close code the gateway sent, if it closed the connection.
    gateway_close: Option<u16>,
    /// The connection ended without a close frame from the gateway while
    /// the client had not asked to close.
    silent_end: bool,
}

static NEXT_TAG: AtomicU32 = AtomicU32::new(1);

/// One connection: sends `tag:seq[:padding]` every `every` until the gateway
/// closes it, `stop` is set (then closes with 1000), or `max` messages.
async fn numbered_connection(
    mut ws: WsClient,
    every: Duration,
    pad: usize,
    max: u64,
    stop: Arc<AtomicBool>,
) -> Conn {
    let tag = NEXT_TAG.fetch_add(1, Ordering::Relaxed);
    let padding = "p".repeat(pad);
    let mut conn = Conn {
        tag,
        sent: 0,
        gateway_close: None,
        silent_end: false,
    };
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if stop.load(Ordering::Relaxed) || conn.sent >= max {
                    let _ = tokio::time::timeout(WAIT, ws.close(None)).await;
                    // Drain to the end: a gateway close may cross ours.
                    while let Ok(Some(Ok(m))) = tokio::time::timeout(WAIT, ws.next()).await {
                        if let Message::Close(Some(f)) = m {
                            let code = u16::from(f.code);
                            if code != 1000 { conn.gateway_close = Some(code); }
                        }
                    }
                    return conn;
                }
                let text = if pad > 0 { format!("{tag}:{}:{padding}", conn.sent) } else { format!("{tag}:{}", conn.sent) };
                match tokio::time::timeout(Duration::from_secs(10), ws.send(Message::text(text))).await {
                    Ok(Ok(())) => conn.sent += 1,
                    _ => {
                        conn.gateway_close = read_close(&mut ws).await;
                        conn.silent_end = conn.gateway_close.is_none();
                        return conn;
                    }
                }
            }
            m = ws.next() => match m {
                Some(Ok(Message::Close(f))) => {
                    conn.gateway_close = Some(f.map_or(1005, |f| u16::from(f.code)));
                    return conn;
                }
                Some(Ok(_)) => {}
                None | Some(Err(_)) => {
                    conn.silent_end = true;
                    return conn;
                }
            }
        }
    }
}

async fn read_close(ws: &mut WsClient) -> Option<u16> {
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
        if let Message::Close(f) = m {
            return Some(f.map_or(1005, |f| u16::from(f.code)));
        }
    }
    None
}

/// Checks the rule for every connection; returns (delivered all, cut with a close code).
/// Waits, at most `within`, until every connection the gateway did not close
/// with 1011-1013 has all it sent in the service's log: closes travel after
/// the messages on the same link, so the last messages may still be on it.
async fn wait_delivered(conns: &[Conn], log: &Log, within: Duration) {
    let arrived = || {
        let log = log.lock().unwrap();
        conns.iter().all(|c| {
            matches!(c.gateway_close, Some(1011..=1013))
                || log.get(&c.tag).map_or(0, Vec::len) as u64 >= c.sent
        })
    };
    eventually(within, arrived).await;
}

fn check_nothing_lost(conns: &[Conn], log: &Log) -> (usize, usize) {
    let log = log.lock().unwrap();
    let (mut complete, mut cut) = (0, 0);
    for c in conns {
        let got = log.get(&c.tag).cloned().unwrap_or_default();
        let in_order_prefix = got.iter().enumerate().all(|(i, s)| *s == i as u64);
        assert!(
            in_order_prefix,
            "connection {}: delivered out of order or with a gap: {got:?}",
            c.tag
        );
        assert!(
            got.len() as u64 <= c.sent,
            "connection {}: more delivered than sent",
            c.tag
        );
        assert!(
            !c.silent_end,
            "connection {} ended without a close frame: {c:?}",
            c.tag
        );
        if (got.len() as u64) < c.sent {
            assert!(
                matches!(c.gateway_close, Some(1011..=1013)),
                "connection {}: {} of {} delivered but the close said {:?}",
                c.tag,
                got.len(),
                c.sent,
                c.gateway_close
            );
            cut += 1;
        } else {
            complete += 1;
        }
    }
    (complete, cut)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_silently_when_the_service_crashes_and_restarts_mid_stream() {
    let log: Log = Arc::default();
    let paused = Arc::new(AtomicBool::new(false));
    let service =
        RecordingService::start("127.0.0.1:0".parse().unwrap(), log.clone(), paused.clone()).await;
    let addr = service.addr;
    let gw = Arc::new(GatewayBuilder::new(addr).links(2).start().await);
    let stop = Arc::new(AtomicBool::new(false));

    // 20 clients; each reconnects after a close and numbers every connection afresh.
    let mut clients = Vec::new();
    for _ in 0..20 {
        let (gw, stop) = (gw.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut conns = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match gw.try_connect("/echo", &[]).await {
                    Ok(ws) => conns.push(
                        numbered_connection(
                            ws,
                            Duration::from_millis(3),
                            0,
                            u64::MAX,
                            stop.clone(),
                        )
                        .await,
                    ),
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            conns
        }));
    }
    // Crash and restart the service twice while messages flow.
    let mut service = service;
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        service.crash();
        tokio::time::sleep(Duration::from_millis(300)).await;
        service = RecordingService::start(addr, log.clone(), paused.clone()).await;
        gw.wait_links(2).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    let mut conns = Vec::new();
    for c in clients {
        conns.extend(c.await.unwrap());
    }
    wait_delivered(&conns, &service.log, Duration::from_secs(5)).await;
    let (complete, cut) = check_nothing_lost(&conns, &service.log);
    let sent: u64 = conns.iter().map(|c| c.sent).sum();
    let mut codes: HashMap<Option<u16>, usize> = HashMap::new();
    for c in &conns {
        *codes.entry(c.gateway_close).or_default() += 1;
    }
    println!("{} connections, {sent} messages: {complete} delivered in full, {cut} cut with a close code; gateway close codes {codes:?}", conns.len());
    assert!(
        cut >= 1,
        "the crashes cut no connection: the test did not test anything"
    );
    assert!(gw.metric("edgegate_clients_closed_total", "reason=\"link_lost\"") >= 1.0);
    service.crash();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_too_slow_to_read_pauses_its_clients_then_closes_them_with_1013_and_loses_nothing_silently(
) {
    let log: Log = Arc::default();
    let paused = Arc::new(AtomicBool::new(false));
    let service =
        RecordingService::start("127.0.0.1:0".parse().unwrap(), log.clone(), paused.clone()).await;
    let gw = Arc::new(
        GatewayBuilder::new(service.addr)
            .links(1)
            .limit("link_backpressure_timeout_secs", 1)
            .start()
            .await,
    );
    // The service stops reading; TCP fills, then the link queue (4096 frames).
    paused.store(true, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..5 {
        let ws = gw.connect("/echo").await;
        // 4 KiB messages as fast as possible: ~5,000 each, far more than TCP and the queue hold.
        clients.push(tokio::spawn(numbered_connection(
            ws,
            Duration::from_micros(100),
            4000,
            5_000,
            stop.clone(),
        )));
    }
    let start = Instant::now();
    let mut conns = Vec::new();
    for c in clients {
        conns.push(
            tokio::time::timeout(Duration::from_secs(20), c)
                .await
                .expect("clients end")
                .unwrap(),
        );
    }
    let ended = start.elapsed();
    let depth = gw.metric("edgegate_link_queue_depth", "");
    // The service wakes up and reads what the gateway queued.
    paused.store(false, Ordering::Relaxed);
    for _ in 0..300 {
        if gw.metric("edgegate_link_queue_depth", "") == 0.0
            && gw.gateway().shared().admission.connections() == 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_delivered(&conns, &log, Duration::from_secs(5)).await;
    let (complete, cut) = check_nothing_lost(&conns, &log);
    let sent: u64 = conns.iter().map(|c| c.sent).sum();
    let delivered: usize = log.lock().unwrap().values().map(Vec::len).sum();
    println!("slow service: {sent} messages sent, {delivered} delivered after it woke, {cut} clients closed with a code, {complete} complete, ended after {ended:?}; queue depth while stalled {depth}");
    for c in &conns {
        assert_eq!(c.gateway_close, Some(1013), "{c:?}");
    }
    assert_eq!(
        gw.metric(
            "edgegate_clients_closed_total",
            "reason=\"link_backpressure\""
        ),
        5.0
    );
    assert!(depth <= 4096.0);
    service.crash();
}

// ---------------------------------------------------------------------------
// The real binary
// ---------------------------------------------------------------------------

/// The gateway binary: `edgegate-process`, this crate's build of the
/// gateway's own `main.rs`, which cargo builds before the tests run.
fn edgegate_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_edgegate-process"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real `edgegate run` process with its own config; killed on drop.
struct GatewayProcess {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    cert: TestCert,
    dir: PathBuf,
    config_path: PathBuf,
}

impl GatewayProcess {
    /// Starts the binary (under `prlimit --nofile=N:N` when `nofile` is set)
    /// forwarding to `service`, with `extra` TOML appended; waits for /readyz.
    async fn start(service: SocketAddr, nofile: Option<u64>, extra: &str) -> Self {
        let dir = edgegate_tests::temp_dir("hostile-proc");
        let cert = TestCert::generate(&dir);
        let (port, admin_port) = (free_port(), free_port());
        let mut config = MinimalGateway::new(&cert.cert_path, &cert.key_path, service);
        config.admin = format!("127.0.0.1:{admin_port}");
        config.bind = format!("127.0.0.1:{port}");
        config.after = extra.to_string();
        let config = config.toml();
        let config_path = dir.join("edgegate.toml");
        std::fs::write(&config_path, config).unwrap();
        let bin = edgegate_binary();
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let log = std::fs::File::create(dir.join("stderr.log")).unwrap();
        let child = cmd
            .args(["run", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn edgegate");
        let p = Self {
            child,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            admin: format!("127.0.0.1:{admin_port}").parse().unwrap(),
            cert,
            dir,
            config_path,
        };
        for _ in 0..500 {
            if matches!(http_get(p.admin, "/readyz").await, Ok(r) if r.status == 200) {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("edgegate did not become ready: {}", p.stderr());
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    async fn metric(&self, name: &str, labels: &str) -> f64 {
        let text = http_get(self.admin, "/metrics")
            .await
            .expect("metrics")
            .body;
        metric_value(&text, name, labels)
    }

    async fn connect(&self) -> Result<WsClient, tokio_tungstenite::tungstenite::Error> {
        edgegate_tests::ws_connect(self.addr, &self.cert, "/echo", &[]).await
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < within,
                "edgegate still running after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn echo(ws: &mut WsClient, text: &str) -> bool {
    if ws.send(Message::text(text.to_owned())).await.is_err() {
        return false;
    }
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return t.as_str() == text,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            _ => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_binary_keeps_serving_counts_backs_off_and_recovers() {
    let stop = tokio_util::sync::CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service_addr = listener.local_addr().unwrap();
    tokio::spawn(edgegate_link::example::run_example_service(
        listener,
        stop.clone(),
    ));
    let gw = GatewayProcess::start(service_addr, Some(64), "").await;

    // Fill the descriptors with real clients until one cannot get in.
    let mut clients = Vec::new();
    let exhausted = loop {
        assert!(
            clients.len() < 64,
            "64 clients connected under a 64-descriptor limit"
        );
        match tokio::time::timeout(Duration::from_secs(2), gw.connect()).await {
            Ok(Ok(ws)) => clients.push(ws),
            _ => break clients.len(),
        }
    };
    println!("clients in at RLIMIT_NOFILE=64: {exhausted}");
    // Existing clients are still served while accept fails.
    for (i, ws) in clients.iter_mut().enumerate().take(5) {
        assert!(
            echo(ws, &format!("still here {i}")).await,
            "an existing client lost service"
        );
    }
    // Descriptors come back: new clients get in again within the backoff
    // (the loop retries until the gateway has seen the freed sockets close).
    clients.truncate(exhausted.saturating_sub(10));
    let start = Instant::now();
    let mut fresh = loop {
        match tokio::time::timeout(Duration::from_secs(2), gw.connect()).await {
            Ok(Ok(ws)) => break ws,
            _ => assert!(
                start.elapsed() < Duration::from_secs(6),
                "no recovery after descriptors were freed"
            ),
        }
    };
    println!(
        "recovered {:?} after descriptors were freed",
        start.elapsed()
    );
    assert!(echo(&mut fresh, "back").await);
    let fds_errors = gw
        .metric("edgegate_accept_errors_total", "kind=\"fds\"")
        .await;
    println!("edgegate_accept_errors_total{{kind=\"fds\"}} = {fds_errors}");
    assert!(fds_errors >= 1.0);
    assert!(
        gw.stderr().contains("accept failed; backing off"),
        "no log line for EMFILE"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_sigterm_under_load_reload_without_dropping_anyone_then_drain_everyone_with_1001(
) {
    const CLIENTS: usize = 300;
    let stop = tokio_util::sync::CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service_addr = listener.local_addr().unwrap();
    tokio::spawn(edgegate_link::example::run_example_service(
        listener,
        stop.clone(),
    ));
    let mut gw = GatewayProcess::start(
        service_addr,
        None,
        "[drain]\ndrain_window_secs = 2\nlb_grace_secs = 0\n",
    )
    .await;

    // Every client sends a numbered message every 100 ms and checks its echoes in order.
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let ws = gw.connect().await.expect("client connects");
        tasks.push(tokio::spawn(async move {
            let (mut tx, mut rx) = ws.split();
            let mut sent = 0u64;
            let mut echoed = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if tx.send(Message::text(sent.to_string())).await.is_ok() { sent += 1; }
                    }
                    m = rx.next() => match m {
                        Some(Ok(Message::Text(t))) => {
                            assert_eq!(t.as_str(), echoed.to_string(), "echo out of order");
                            echoed += 1;
                        }
                        Some(Ok(Message::Close(f))) => return (Some(f.map_or(1005, |f| u16::from(f.code))), sent, echoed),
                        Some(Ok(_)) => {}
                        None | Some(Err(_)) => return (None, sent, echoed),
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SIGHUP with a changed file: reloaded, nobody dropped.
    let text =
        std::fs::read_to_string(&gw.config_path).unwrap() + "[limits]\nmax_message_bytes = 32768\n";
    std::fs::write(&gw.config_path, text).unwrap();
    gw.signal(nix::sys::signal::Signal::SIGHUP);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        gw.metric("edgegate_config_reloads_total", "result=\"ok\"")
            .await,
        1.0
    );
    assert_eq!(
        gw.metric("edgegate_clients", "").await,
        CLIENTS as f64,
        "a reload dropped clients"
    );
    assert!(
        tasks.iter().all(|t| !t.is_finished()),
        "a client ended during the reload"
    );

    // SIGTERM: every client gets 1001 within the window; the process exits 0.
    gw.signal(nix::sys::signal::Signal::SIGTERM);
    let status = gw.wait_exit(Duration::from_secs(10)).await;
    let mut codes: HashMap<Option<u16>, usize> = HashMap::new();
    let (mut sent, mut echoed) = (0, 0);
    for t in tasks {
        let (code, s, e) = t.await.unwrap();
        *codes.entry(code).or_default() += 1;
        sent += s;
        echoed += e;
    }
    println!("{CLIENTS} clients under load: {sent} messages sent, {echoed} echoed; close codes at SIGTERM {codes:?}");
    assert_eq!(codes.get(&Some(1001)), Some(&CLIENTS), "{codes:?}");
    assert_eq!(status.code(), Some(0));
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_mix_leaves_no_connection_and_no_memory_behind_in_the_real_binary() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stop = tokio_util::sync::CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service_addr = listener.local_addr().unwrap();
    tokio::spawn(edgegate_link::example::run_example_service(
        listener,
        stop.clone(),
    ));
    let gw = GatewayProcess::start(
        service_addr,
        None,
        "[limits]\nhandshake_timeout_secs = 1\nupgrade_timeout_secs = 1\nmax_message_bytes = 4096\n",
    )
    .await;

    // One round: garbage TLS, half a handshake, a bad upgrade, a bad frame,
    // an oversized message, each `n` times, all at once.
    async fn round(gw: &GatewayProcess, n: usize) {
        let mut set = JoinSet::new();
        for i in 0..n {
            let (addr, cert) = (gw.addr, gw.cert.clone());
            set.spawn(async move {
                let mut tcp = TcpStream::connect(addr).await.unwrap();
                let _ = tcp
                    .write_all(&[0x16, 0x03, 0x01, 0x00, 0x10, 0xff, 0xff])
                    .await;
                let mut b = [0u8; 64];
                let _ = tokio::time::timeout(WAIT, tcp.read(&mut b)).await;
            });
            let (addr, cert2) = (gw.addr, cert.clone());
            set.spawn(async move {
                let tcp = TcpStream::connect(addr).await.unwrap();
                let tls = cert2
                    .connector()
                    .connect(
                        rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                        tcp,
                    )
                    .await;
                if let Ok(mut tls) = tls {
                    let _ = tls
                        .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\n\r\n")
                        .await;
                    let mut b = [0u8; 256];
                    let _ = tokio::time::timeout(WAIT, tls.read(&mut b)).await;
                }
            });
            set.spawn(async move {
                if let Ok(mut ws) = edgegate_tests::ws_connect(addr, &cert, "/echo", &[]).await {
                    let m = if i % 2 == 0 {
                        Message::binary(vec![0u8; 8192])
                    } else {
                        Message::text("fine")
                    };
                    let _ = ws.send(m).await;
                    let _ = tokio::time::timeout(WAIT, ws.next()).await;
                    let _ = ws.close(None).await;
                }
            });
        }
        while set.join_next().await.is_some() {}
    }
    async fn settled(gw: &GatewayProcess) -> (f64, f64) {
        for _ in 0..300 {
            if gw.metric("edgegate_connections", "").await == 0.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // jemalloc purges decayed pages after ~1 s; allocated bytes need no wait.
        tokio::time::sleep(Duration::from_millis(200)).await;
        (
            gw.metric("edgegate_connections", "").await,
            gw.metric("edgegate_jemalloc_allocated_bytes", "").await,
        )
    }
    // Warm-up fills caches (TLS session cache, metric series, buffers).
    round(&gw, 50).await;
    let (conns0, alloc0) = settled(&gw).await;
    round(&gw, 150).await;
    let (conns1, alloc1) = settled(&gw).await;
    let rss = gw
        .metric("edgegate_process_resident_memory_bytes", "")
        .await;
    let tls_failures = gw
        .metric("edgegate_handshake_failures_total", "phase=\"tls\"")
        .await;
    let upgrade_failures = gw
        .metric("edgegate_handshake_failures_total", "phase=\"upgrade\"")
        .await;
    println!(
        "hostile mix: connections {conns0} -> {conns1}; jemalloc allocated {alloc0} -> {alloc1} bytes ({:+}); RSS {rss}; tls failures {tls_failures}, upgrade failures {upgrade_failures}",
        alloc1 - alloc0
    );
    assert_eq!(conns1, 0.0);
    assert_eq!(tls_failures, 200.0);
    assert_eq!(upgrade_failures, 200.0);
    assert!(alloc0 > 0.0, "jemalloc statistics missing");
    assert!(
        alloc1 - alloc0 < 256.0 * 1024.0,
        "600 hostile connections left {} bytes behind",
        alloc1 - alloc0
    );
    stop.cancel();
}
