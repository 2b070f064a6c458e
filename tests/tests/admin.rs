//! The admin endpoint over real HTTP: `/metrics` from a gateway under a
//! little load, `/healthz`, `/readyz` through link loss and drain.
//!
//! `promtool check metrics` runs on the real scrape when promtool is on the
//! PATH; `tests/monitoring/run.sh` installs it and sets
//! `EDGEGATE_REQUIRE_PROMTOOL=1` so that a missing promtool fails instead of
//! skipping. With `EDGEGATE_METRICS_OUT=path` the scrape is also written
//! there (the script checks every name is documented).

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgegate::{Config, Gateway};
use edgegate_tests::{
    http_get, http_request, metric_value, temp_dir, ExampleService, GatewayBuilder, TestCert,
    WsClient,
};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(5);

/// Every series a fresh gateway with one service called `svc` exports.
const KNOWN_SERIES: &[&str] = &[
    "edgegate_clients{protocol=\"websocket\"}",
    "edgegate_clients_accepted_total{protocol=\"websocket\"}",
    "edgegate_clients_closed_total{reason=\"shutdown\"}",
    "edgegate_clients_refused_total",
    "edgegate_clients_max",
    "edgegate_connections",
    "edgegate_handshake_failures_total{phase=\"tls\"}",
    "edgegate_handshake_duration_seconds_count",
    "edgegate_accept_errors_total{kind=\"fds\"}",
    "edgegate_client_messages_in_total",
    "edgegate_client_messages_out_total",
    "edgegate_outbound_dropped_total{policy=\"drop_oldest\"}",
    "edgegate_links_up{service=\"svc\"}",
    "edgegate_link_reconnects_total{service=\"svc\"}",
    "edgegate_link_queue_depth{service=\"svc\"}",
    "edgegate_config_reloads_total{result=\"ok\"}",
    "edgegate_config_reloads_total{result=\"rejected\"}",
    "edgegate_build_info{version=",
    "edgegate_runtime_poll_delay_seconds_bucket{le=",
    "edgegate_runtime_poll_delay_seconds_count",
    "edgegate_runtime_workers",
    "edgegate_runtime_alive_tasks",
    "edgegate_runtime_global_queue_depth",
    "edgegate_runtime_worker_busy_seconds_total",
    "edgegate_runtime_worker_busy_ratio",
    "edgegate_process_resident_memory_bytes",
    "edgegate_process_max_fds",
    "edgegate_jemalloc_allocated_bytes",
    "edgegate_jemalloc_resident_bytes",
    "edgegate_jemalloc_retained_bytes",
    "edgegate_tls_certificate_expiry_seconds{listener=\"test\"}",
    "process_start_time_seconds",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
];

async fn scrape(addr: std::net::SocketAddr) -> String {
    let reply = http_get(addr, "/metrics").await.expect("scrape /metrics");
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.body
}

async fn echo(ws: &mut WsClient, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("echo in time")
            .expect("open")
            .expect("no error");
        if let Message::Text(t) = m {
            assert_eq!(t.as_str(), text);
            return;
        }
    }
}

/// Runs `promtool check metrics` on `text`: `Some(output)` on failure,
/// `None` when it passed or promtool is absent (allowed unless required).
fn promtool_check_metrics(text: &str) -> Option<String> {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            assert!(
                std::env::var_os("EDGEGATE_REQUIRE_PROMTOOL").is_none(),
                "promtool is required (EDGEGATE_REQUIRE_PROMTOOL) but cannot run: {e}"
            );
            eprintln!("SKIP promtool check metrics: promtool not found ({e}); tests/monitoring/run.sh installs it");
            return None;
        }
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool runs");
    eprintln!("promtool check metrics: {}", out.status);
    (!out.status.success()).then(|| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test]
async fn metrics_are_scraped_over_http_and_move_under_load() {
    let service = ExampleService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .limit("max_clients", 500)
        .start()
        .await;
    let admin = gw.admin_addr();
    assert_ne!(
        admin.port(),
        gw.addr.port(),
        "admin is never the client port"
    );

    let before = scrape(admin).await;
    let mut clients = Vec::new();
    for i in 0..5 {
        let mut ws = gw.connect("/echo").await;
        echo(&mut ws, &format!("hello {i}")).await;
        clients.push(ws);
    }
    let v = |text: &str, name: &str, labels: &str| metric_value(text, name, labels);
    // Scrape until the probe has run (every 100 ms) and the sampler (every 1 s)
    // has seen the clients' tasks.
    let sampled = |t: &str| {
        v(t, "edgegate_runtime_poll_delay_seconds_count", "") > 0.0
            && v(t, "edgegate_runtime_alive_tasks", "") >= 5.0
            && v(t, "edgegate_runtime_worker_busy_seconds_total", "") > 0.0
    };
    let mut during = scrape(admin).await;
    for _ in 0..250 {
        if sampled(&during) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        during = scrape(admin).await;
    }

    assert_eq!(
        v(&during, "edgegate_clients", "protocol=\"websocket\""),
        5.0
    );
    assert_eq!(v(&during, "edgegate_connections", ""), 5.0);
    assert_eq!(v(&during, "edgegate_clients_max", ""), 500.0);
    assert_eq!(v(&during, "edgegate_links_up", "service=\"svc\""), 2.0);
    assert!(
        v(&during, "edgegate_clients_accepted_total", "")
            >= 5.0 + v(&before, "edgegate_clients_accepted_total", "")
    );
    assert!(v(&during, "edgegate_client_messages_in_total", "") >= 5.0);
    assert!(v(&during, "edgegate_client_messages_out_total", "") >= 5.0);
    assert!(v(&during, "edgegate_handshake_duration_seconds_count", "") >= 5.0);
    assert!(
        v(&during, "edgegate_runtime_poll_delay_seconds_count", "")
            > v(&before, "edgegate_runtime_poll_delay_seconds_count", ""),
        "the poll-delay probe records samples"
    );
    assert_eq!(
        v(
            &during,
            "edgegate_runtime_poll_delay_seconds_bucket",
            "le=\"+Inf\""
        ),
        v(&during, "edgegate_runtime_poll_delay_seconds_count", "")
    );
    assert!(
        v(&during, "edgegate_runtime_alive_tasks", "") >= 5.0,
        "one task per client at least"
    );
    assert!(v(&during, "edgegate_runtime_workers", "") >= 1.0);
    assert!(v(&during, "edgegate_runtime_worker_busy_seconds_total", "") > 0.0);
    let ratio = v(&during, "edgegate_runtime_worker_busy_ratio", "");
    assert!((0.0..=1.0).contains(&ratio), "{ratio}");
    assert!(v(&during, "edgegate_process_resident_memory_bytes", "") > 1_000_000.0);
    assert!(v(&during, "edgegate_process_max_fds", "") > 0.0);
    if during.contains("edgegate_process_open_fds ") {
        // Five clients hold five sockets on the gateway side (and five here).
        assert!(v(&during, "edgegate_process_open_fds", "") >= 10.0);
    }
    // Labels never carry addresses or client ids.
    assert!(
        !during.contains("127.0.0.1"),
        "an address leaked into a label"
    );

    for mut ws in clients {
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    }
    let mut after = String::new();
    for _ in 0..100 {
        after = scrape(admin).await;
        if v(&after, "edgegate_clients", "") == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(v(&after, "edgegate_clients", ""), 0.0);
    assert!(v(&after, "edgegate_clients_closed_total", "") >= 5.0);

    if let Some(path) = std::env::var_os("EDGEGATE_METRICS_OUT") {
        std::fs::write(&path, &after).expect("write EDGEGATE_METRICS_OUT");
    }
    if let Some(problems) = promtool_check_metrics(&after) {
        panic!("promtool check metrics failed:\n{problems}");
    }
}

#[tokio::test]
async fn known_series_exist_at_zero_from_start_up() {
    let service = ExampleService::start().await;
    let gw = GatewayBuilder::new(service.addr).start().await;
    let text = scrape(gw.admin_addr()).await;
    let missing: Vec<_> = KNOWN_SERIES.iter().filter(|s| !text.contains(*s)).collect();
    assert!(missing.is_empty(), "missing series {missing:?} in\n{text}");
    assert_eq!(
        metric_value(&text, "edgegate_clients_closed_total", ""),
        0.0
    );
}

#[tokio::test]
async fn prometheus_gets_openmetrics_and_everyone_else_classic_text() {
    let service = ExampleService::start().await;
    let gw = GatewayBuilder::new(service.addr).start().await;
    let plain = http_get(gw.admin_addr(), "/metrics").await.unwrap();
    assert!(plain
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")));
    assert!(plain
        .body
        .contains("# TYPE edgegate_clients_accepted_total counter"));
    assert!(!plain.body.contains("# EOF"));

    let accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
    let om = http_request(gw.admin_addr(), "GET", "/metrics", &[("Accept", accept)])
        .await
        .unwrap();
    assert!(om
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/openmetrics-text")));
    assert!(om.body.contains("# TYPE edgegate_clients_accepted counter"));
    assert!(om.body.trim_end().ends_with("# EOF"));
}

#[tokio::test]
async fn healthz_is_ok_and_unknown_paths_and_methods_are_refused() {
    let service = ExampleService::start().await;
    let gw = GatewayBuilder::new(service.addr).start().await;
    let admin = gw.admin_addr();
    let h = http_get(admin, "/healthz").await.unwrap();
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"));
    assert_eq!(http_get(admin, "/nope").await.unwrap().status, 404);
    assert_eq!(
        http_request(admin, "POST", "/metrics", &[])
            .await
            .unwrap()
            .status,
        405
    );
    // The client port does not serve admin paths.
    assert!(http_get(gw.addr, "/metrics")
        .await
        .map_or(true, |r| r.status != 200));
}

#[tokio::test]
async fn readyz_is_503_without_links_and_while_draining_and_admin_stops_last() {
    let service = ExampleService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .links(1)
        .drain_window_secs(2)
        .start()
        .await;
    let admin = gw.admin_addr();
    let r = http_get(admin, "/readyz").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));

    // Service gone: no link up, not ready (the gateway is still alive).
    service.kill().await;
    let mut r = http_get(admin, "/readyz").await.unwrap();
    for _ in 0..250 {
        if r.status == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        r = http_get(admin, "/readyz").await.unwrap();
    }
    assert_eq!(r.status, 503);
    assert!(r.body.contains("service svc has no link up"), "{}", r.body);
    assert_eq!(http_get(admin, "/healthz").await.unwrap().status, 200);

    // Service back, then a drain with a client held: 503 "draining" during it.
    let listener = tokio::net::TcpListener::bind(service_addr_of(&gw))
        .await
        .unwrap();
    let _service = ExampleService::start_on(listener);
    gw.wait_links(1).await;
    assert_eq!(http_get(admin, "/readyz").await.unwrap().status, 200);
    let _client = gw.connect("/echo").await;
    let drain = tokio::spawn(gw.shutdown(Duration::from_secs(2)));
    let mut saw_draining = false;
    for _ in 0..100 {
        match http_get(admin, "/readyz").await {
            Ok(r) if r.status == 503 && r.body.contains("draining") => {
                saw_draining = true;
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => panic!("admin endpoint gone during the drain: {e}"),
        }
    }
    assert!(saw_draining, "readyz never said draining");
    drain.await.unwrap();
    assert!(
        http_get(admin, "/readyz").await.is_err(),
        "admin endpoint closed after stop"
    );
}

/// The service address the test gateway dials.
fn service_addr_of(gw: &edgegate_tests::TestGateway) -> std::net::SocketAddr {
    gw.config.services[0].addresses[0]
        .parse()
        .expect("service address")
}

/// `method path` over TLS on the gateway's client port; the status and the
/// body, read until the gateway closes.
async fn client_port_request(
    gw: &edgegate_tests::TestGateway,
    method: &str,
    path: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut tls = gw
        .cert
        .connector()
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .expect("tls handshake");
    tls.write_all(format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut raw))
        .await
        .expect("the gateway answers and closes");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// For load balancers that can probe only the client port: the listener's
/// `health_path` answers over TLS with the readiness `/readyz` uses (200
/// while ready, 503 while leaving), never upgrades, and is not counted as a
/// failed client; routes still upgrade beside it.
#[tokio::test]
async fn health_path_on_the_client_port_answers_readiness_over_tls() {
    let service = ExampleService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .links(1)
        .listener_key("health_path", "\"/lb-check\"")
        .start()
        .await;
    let (status, body) = client_port_request(&gw, "GET", "/lb-check").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let (status, body) = client_port_request(&gw, "HEAD", "/lb-check").await;
    assert_eq!((status, body.as_str()), (200, ""));
    let (status, _) = client_port_request(&gw, "POST", "/lb-check").await;
    assert_eq!(status, 405);
    let mut ws = gw.connect("/echo").await;
    ws.send(Message::text("still routed")).await.unwrap();
    let echoed = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed, Message::text("still routed"));

    gw.gateway().shared().lifecycle.leave();
    let (status, body) = client_port_request(&gw, "GET", "/lb-check").await;
    assert_eq!((status, body.as_str()), (503, "not ready: draining\n"));
    let failures = gw.metric("edgegate_handshake_failures_total", "");
    assert_eq!(failures, 0.0, "probes are not failed clients");
}

/// The standard process metrics, under the names generic dashboards and
/// queries use, read from the real `/metrics`: the start time is this (test)
/// process's and stays put, CPU time grows with work, and resident memory and
/// the descriptor limit are the figures of their `edgegate_process_*` twins.
#[tokio::test]
async fn standard_process_metrics_describe_the_process_on_the_real_metrics() {
    let service = ExampleService::start().await;
    let gw = GatewayBuilder::new(service.addr).start().await;
    let first = scrape(gw.admin_addr()).await;
    for (name, kind) in [
        ("process_start_time_seconds", "gauge"),
        ("process_cpu_seconds_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_virtual_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
    ] {
        assert!(
            first.contains(&format!("# TYPE {name} {kind}\n")),
            "no {kind} {name} in\n{first}"
        );
    }
    let v = |text: &str, name: &str| metric_value(text, name, "");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let start = v(&first, "process_start_time_seconds");
    assert!(
        start <= now + 1.0 && start > now - 86_400.0,
        "this process started at {start}, now is {now}"
    );
    let cpu = v(&first, "process_cpu_seconds_total");
    assert!(cpu > 0.0, "{cpu}");

    // Work until the process has used 50 ms more CPU (bounded), then scrape.
    let mut x = 0u64;
    for _ in 0..100_000 {
        for i in 0..10_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        if edgegate::process::cpu_seconds().unwrap_or(0.0) > cpu + 0.05 {
            break;
        }
    }
    let second = scrape(gw.admin_addr()).await;
    assert!(
        v(&second, "process_cpu_seconds_total") >= cpu + 0.05,
        "CPU time {cpu} -> {}",
        v(&second, "process_cpu_seconds_total")
    );
    assert_eq!(v(&second, "process_start_time_seconds"), start);
    for (standard, ours) in [
        (
            "process_resident_memory_bytes",
            "edgegate_process_resident_memory_bytes",
        ),
        ("process_max_fds", "edgegate_process_max_fds"),
        ("process_open_fds", "edgegate_process_open_fds"),
    ] {
        assert_eq!(v(&second, standard), v(&second, ours), "{standard}");
    }
    assert!(v(&second, "process_max_fds") > 0.0);
    assert!(v(&second, "process_resident_memory_bytes") > 1_000_000.0);
    assert!(
        v(&second, "process_virtual_memory_bytes") >= v(&second, "process_resident_memory_bytes")
    );
}

/// A `tracing` writer into a shared buffer: what the gateway logs, as the
/// journal would get it.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// What was logged since the last call.
    fn take(&self) -> String {
        String::from_utf8(std::mem::take(&mut *self.0.lock().unwrap())).unwrap()
    }
}

/// The seconds left on each listener's certificate are on the real
/// `/metrics` from start-up and follow every reload; start and reload log a
/// warning within 14 days of expiry and an error once expired, and neither
/// for a certificate with years left.
#[tokio::test]
async fn certificate_expiry_is_exported_and_logged_at_start_and_every_reload() {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // The test's runtime has one thread: the gateway logs on this one.
    let _logging = tracing::subscriber::set_default(subscriber);

    let day = 86_400u64;
    let service = ExampleService::start().await;
    let dir = temp_dir("expiry");
    let in_days =
        |days: u64, hours: u64| SystemTime::now() + Duration::from_secs(days * day + hours * 3600);
    let cert = TestCert::generate_valid_until(&dir, in_days(5, 1));
    let text = GatewayBuilder::new(service.addr).toml(&cert);
    let path = dir.join("edgegate.toml");
    std::fs::write(&path, &text).unwrap();
    let config = Config::from_toml(&path, &text, std::iter::empty()).unwrap();
    let gw = Gateway::start(&config)
        .await
        .expect("an expiring certificate still loads");
    let left = |text: &str| {
        metric_value(
            text,
            "edgegate_tls_certificate_expiry_seconds",
            "listener=\"test\"",
        )
    };
    let near = |got: f64, want: u64| (got - want as f64).abs() < 600.0;

    let start_logs = logs.take();
    assert!(
        start_logs.contains("WARN") && start_logs.contains("certificate expires in 5 day(s)"),
        "start-up logs:\n{start_logs}"
    );
    let seconds = left(&scrape(gw.admin_addr()).await);
    assert!(near(seconds, 5 * day + 3600), "{seconds} s left");

    TestCert::generate_valid_until(
        &dir,
        SystemTime::now() - Duration::from_secs(2 * day + 3600),
    );
    gw.reload(&config)
        .expect("an expired certificate still loads");
    let reload_logs = logs.take();
    assert!(
        reload_logs.contains("ERROR") && reload_logs.contains("certificate expired"),
        "reload logs:\n{reload_logs}"
    );
    let seconds = left(&scrape(gw.admin_addr()).await);
    assert!(near(-seconds, 2 * day + 3600), "{seconds} s left");

    // Its `certificate valid` line is not asserted: other tests of this
    // binary log it first without a subscriber, and tracing's per-callsite
    // cache may then skip it for this thread's subscriber.
    TestCert::generate(&dir);
    gw.reload(&config).expect("reload");
    let reload_logs = logs.take();
    assert!(
        reload_logs.contains("configuration reloaded")
            && !reload_logs.contains("WARN")
            && !reload_logs.contains("ERROR"),
        "reload logs:\n{reload_logs}"
    );
    assert!(left(&scrape(gw.admin_addr()).await) > 365.0 * day as f64);

    gw.shutdown(Duration::ZERO).await;
    let _ = std::fs::remove_dir_all(&dir);
}
