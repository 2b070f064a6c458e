//! Links across a fleet: several gateways in front of several instances of
//! one service, each gateway linked to every instance. Real gateways, real
//! TLS WebSocket clients, real example services on real links.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use edgegate_tests::{eventually, ExampleService, GatewayBuilder, TestGateway, WsClient};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(5);

/// The next data or close message (pings and pongs skipped); `None` when the
/// stream ends.
async fn next_message(ws: &mut WsClient) -> Option<Message> {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("message in time")
        {
            None | Some(Err(_)) => return None,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(m)) => return Some(m),
        }
    }
}

/// The close code of a close message.
fn close_code_of(m: &Message) -> Option<u16> {
    match m {
        Message::Close(f) => f.as_ref().map(|f| u16::from(f.code)),
        _ => None,
    }
}

/// Reads chat messages until every one of `expected` has arrived; returns how
/// often each text arrived (anything not expected is counted too).
async fn read_until_all(ws: &mut WsClient, expected: &[String]) -> HashMap<String, usize> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    while !expected.iter().all(|e| seen.contains_key(e)) {
        match next_message(ws).await {
            Some(Message::Text(t)) => *seen.entry(t.to_string()).or_default() += 1,
            other => panic!("chat client got {other:?} while waiting for {expected:?}"),
        }
    }
    seen
}

/// `n` example services on their own ports; their addresses.
async fn start_instances(n: usize) -> (Vec<ExampleService>, Vec<SocketAddr>) {
    let mut services = Vec::new();
    for _ in 0..n {
        services.push(ExampleService::start().await);
    }
    let addrs = services.iter().map(|s| s.addr).collect();
    (services, addrs)
}

/// Opens `n` clients on `path`, one after the other, each bound before the
/// next opens (the gateway binds each to its least loaded link, so `n` equal
/// to the instance count puts one client on each instance).
async fn open_clients(gw: &TestGateway, path: &str, n: usize) -> Vec<WsClient> {
    let mut clients = Vec::new();
    for _ in 0..n {
        let before = gw.gateway().client_count();
        clients.push(gw.connect(path).await);
        assert!(
            eventually(WAIT, || gw.gateway().client_count() == before + 1).await,
            "client bound"
        );
    }
    clients
}

#[tokio::test]
async fn every_gateway_links_every_instance_and_losing_one_closes_only_its_clients() {
    const INSTANCES: usize = 3;
    let (mut services, addrs) = start_instances(INSTANCES).await;
    let builder = GatewayBuilder::new(addrs[0]).instances(&addrs).links(1);
    // Each gateway is up only when it has a link to each of the 3 instances.
    let gateways = [builder.clone().start().await, builder.start().await];
    for gw in &gateways {
        assert_eq!(gw.instances_linked(), (INSTANCES, INSTANCES));
        assert_eq!(
            gw.metric("edgegate_service_instances_linked", "service=\"svc\""),
            3.0
        );
        assert_eq!(
            gw.metric("edgegate_service_instances", "service=\"svc\""),
            3.0
        );
    }

    // On each gateway, one chat client and one echo client per instance.
    let mut chat = Vec::new();
    let mut echo = Vec::new();
    for gw in &gateways {
        chat.push(open_clients(gw, "/chat", INSTANCES).await);
        echo.push(open_clients(gw, "/echo", INSTANCES).await);
        assert!(
            eventually(WAIT, || {
                gw.gateway().shared().topics.subscriber_count("room") == INSTANCES
            })
            .await,
            "every chat client subscribed"
        );
    }

    // Every chat client says one line, so every instance publishes once per
    // gateway: each of the 6 chat clients, on either gateway, gets each of
    // the 6 lines exactly once.
    let mut lines = Vec::new();
    for (g, clients) in chat.iter_mut().enumerate() {
        for (i, ws) in clients.iter_mut().enumerate() {
            let line = format!("gw{g}-client{i}");
            ws.send(Message::text(line.clone())).await.unwrap();
            lines.push(line);
        }
    }
    let mut deliveries = [0usize; 2];
    for (g, clients) in chat.iter_mut().enumerate() {
        for ws in clients.iter_mut() {
            let seen = read_until_all(ws, &lines).await;
            assert!(
                seen.values().all(|n| *n == 1) && seen.len() == lines.len(),
                "each line exactly once: {seen:?}"
            );
            deliveries[g] += seen.values().sum::<usize>();
        }
    }
    for gw in &gateways {
        assert_eq!(
            gw.metric("edgegate_publishes_total", ""),
            lines.len() as f64,
            "one publish per line on each gateway"
        );
    }
    println!(
        "publishes: {} lines from {INSTANCES} instances; deliveries per gateway {deliveries:?} \
         ({} subscribers x {} lines each)",
        lines.len(),
        INSTANCES,
        lines.len()
    );

    // Instance 2 goes away: on each gateway exactly its two clients (one chat,
    // one echo) are closed with 1012; the other echo clients keep echoing.
    let lost = addrs[2];
    services.pop().expect("instance 2").kill().await;
    for gw in &gateways {
        assert!(
            eventually(WAIT, || gw.instances_linked() == (2, INSTANCES)).await,
            "instance 2 unlinked: {:?}",
            gw.instances_linked()
        );
        assert!(
            eventually(WAIT, || gw.gateway().client_count() == 2 * INSTANCES - 2).await,
            "only instance 2's clients closed: {} left",
            gw.gateway().client_count()
        );
        assert_eq!(
            gw.metric("edgegate_clients_closed_total", "reason=\"link_lost\""),
            2.0
        );
        let r = edgegate_tests::http_get(gw.admin_addr(), "/readyz")
            .await
            .unwrap();
        assert_eq!(r.status, 200, "served by the other instances");
        assert!(
            r.body.contains("service svc: 2 of 3 instances linked"),
            "{}",
            r.body
        );
    }
    for clients in &mut echo {
        let mut closed = 0;
        for ws in clients.iter_mut() {
            let _ = ws.send(Message::text("still there?")).await;
            match next_message(ws).await {
                Some(Message::Text(t)) => assert_eq!(t.as_str(), "still there?"),
                Some(m) if close_code_of(&m) == Some(1012) => closed += 1,
                other => panic!("echo client got {other:?}"),
            }
        }
        assert_eq!(closed, 1, "one echo client per gateway was on instance 2");
    }
    // A new chat client (on a live instance) says a line: every chat client
    // either was on instance 2 (its next message is the 1012 close) or gets
    // the line.
    let mut speaker = open_clients(&gateways[0], "/chat", 1).await.remove(0);
    assert!(
        eventually(WAIT, || {
            gateways[0]
                .gateway()
                .shared()
                .topics
                .subscriber_count("room")
                == INSTANCES
        })
        .await,
        "the new chat client subscribed"
    );
    speaker.send(Message::text("after")).await.unwrap();
    assert_eq!(
        next_message(&mut speaker).await,
        Some(Message::text("after"))
    );
    for clients in &mut chat {
        let mut closed = 0;
        for ws in clients.iter_mut() {
            match next_message(ws).await {
                Some(Message::Text(t)) => assert_eq!(t.as_str(), "after"),
                Some(m) if close_code_of(&m) == Some(1012) => closed += 1,
                other => panic!("chat client got {other:?}"),
            }
        }
        assert_eq!(closed, 1, "one chat client per gateway was on instance 2");
    }

    // Instance 2 comes back on its address: both gateways relink it within
    // the backoff bound (reconnect_max_ms = 200 in the fixture).
    let restarted = Instant::now();
    let listener = TcpListener::bind(lost).await.unwrap();
    let _back = ExampleService::start_on(listener);
    for gw in &gateways {
        assert!(
            eventually(WAIT, || gw.instances_linked() == (INSTANCES, INSTANCES)).await,
            "instance 2 relinked: {:?}",
            gw.instances_linked()
        );
    }
    println!(
        "instance relinked by both gateways {:?} after its restart",
        restarted.elapsed()
    );
    // New clients go to the least loaded link, the restarted instance's, and
    // are served by it.
    for gw in &gateways {
        let assert_ready = edgegate_tests::http_get(gw.admin_addr(), "/readyz")
            .await
            .unwrap();
        assert_eq!(
            (assert_ready.status, assert_ready.body.as_str()),
            (200, "ready\n")
        );
        for ws in &mut open_clients(gw, "/echo", 2).await {
            ws.send(Message::text("back")).await.unwrap();
            assert_eq!(next_message(ws).await, Some(Message::text("back")));
        }
    }
}
