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

/// A service that answers `who` with its link's number and, on a link where
/// a client says `stop reading`, stops reading that link while it keeps
/// pinging it: the link looks alive to a silence check and can never be
/// written to once the socket buffers are full.
async fn stalling_service(listener: TcpListener) {
    let mut next = 0u32;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        next += 1;
        tokio::spawn(stalling_link(stream, next));
    }
}

async fn stalling_link(stream: tokio::net::TcpStream, number: u32) {
    use edgegate_link::proto::{Frame, FrameCodec, Kind, PROTOCOL_VERSION};
    use std::sync::Arc;
    use tokio_util::codec::{FramedRead, FramedWrite};

    let (r, w) = stream.into_split();
    let mut reader = FramedRead::new(r, FrameCodec::default());
    let writer = Arc::new(tokio::sync::Mutex::new(FramedWrite::new(
        w,
        FrameCodec::default(),
    )));
    let Some(Ok(Frame::Hello { .. })) = reader.next().await else {
        return;
    };
    let hello = Frame::Hello {
        version: PROTOCOL_VERSION,
        name: "stalling".into(),
        max_frame_bytes: 1 << 20,
    };
    if writer.lock().await.send(hello).await.is_err() {
        return;
    }
    let pinger = {
        let writer = writer.clone();
        tokio::spawn(async move {
            for nonce in 1.. {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if writer
                    .lock()
                    .await
                    .send(Frame::Ping { nonce })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    while let Some(Ok(frame)) = reader.next().await {
        let Frame::ClientMessage {
            client, payload, ..
        } = frame
        else {
            continue;
        };
        match &payload[..] {
            b"who" => {
                let answer = Frame::ClientMessage {
                    client,
                    kind: Kind::Text,
                    payload: format!("link-{number}").into(),
                };
                let _ = writer.lock().await.send(answer).await;
            }
            b"stop reading" => {
                // Keep the socket and the pings, read nothing more.
                let _ = pinger.await;
                drop(reader);
                return;
            }
            _ => {}
        }
    }
    pinger.abort();
}

/// Asks a client of the stalling service which link it is on.
async fn which_link(ws: &mut WsClient) -> String {
    ws.send(Message::text("who")).await.unwrap();
    match next_message(ws).await {
        Some(Message::Text(t)) => t.to_string(),
        other => panic!("no answer to who: {other:?}"),
    }
}

#[tokio::test]
async fn a_service_that_stops_reading_but_pings_loses_the_link_and_its_clients_get_1012() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _service = tokio::spawn(stalling_service(listener));
    // A short link queue, so the stall is reached after a few MiB.
    let gw = GatewayBuilder::new(addr)
        .links(2)
        .service_key("link_queue_frames", 16)
        .start()
        .await;

    // Four clients, two on each link.
    let mut clients: Vec<Option<WsClient>> = open_clients(&gw, "/echo", 4)
        .await
        .into_iter()
        .map(Some)
        .collect();
    let mut on: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, ws) in clients.iter_mut().enumerate() {
        let ws = ws.as_mut().expect("open");
        on.entry(which_link(ws).await).or_default().push(i);
    }
    let mut links: Vec<Vec<usize>> = on.into_values().collect();
    assert_eq!(links.len(), 2, "clients on both links: {links:?}");
    let (stalled, healthy) = (links.remove(0), links.remove(0));
    let mut flood = clients[stalled[0]].take().expect("flooder");
    let mut bystander = clients[stalled[1]].take().expect("bystander");

    // The flooder's link stops reading; the flooder fills it.
    flood.send(Message::text("stop reading")).await.unwrap();
    let flooding = tokio::spawn(async move {
        let chunk = vec![7u8; 60 * 1024];
        while flood.send(Message::binary(chunk.clone())).await.is_ok() {}
    });

    // The gateway's bounded write gives up (ping_timeout_secs = 3 in the
    // fixture) although the service still pings: the link is torn down and
    // the other client bound to it is closed with 1012.
    let started = Instant::now();
    assert_eq!(
        edgegate_tests::close_code(&mut bystander, Duration::from_secs(15)).await,
        Some(1012)
    );
    println!("stalled link torn down after {:?}", started.elapsed());
    flooding.abort();
    // The clients of the other link still work, and a new client is bound
    // to a link that reads.
    for i in healthy {
        let ws = clients[i].as_mut().expect("healthy client");
        assert!(which_link(ws).await.starts_with("link-"));
    }
    let mut fresh = gw.connect("/echo").await;
    assert!(which_link(&mut fresh).await.starts_with("link-"));
    assert!(gw.metric("edgegate_clients_closed_total", "reason=\"link_lost\"") >= 1.0);
}

#[tokio::test]
async fn an_instance_that_never_answers_holds_up_only_its_own_links() {
    // The silent instance accepts TCP (the kernel does) but never says Hello:
    // each dial to it waits out connect_timeout_secs, set far beyond the
    // test's patience.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let answering = ExampleService::start().await;
    let gw = GatewayBuilder::new(answering.addr)
        .instances(&[silent.local_addr().unwrap(), answering.addr])
        .links(2)
        .service_key("connect_timeout_secs", 120)
        .start_with_links_up(2)
        .await;
    assert_eq!(gw.instances_linked(), (1, 2));
    // The gateway is ready and serves clients while its dials to the silent
    // instance are still waiting for a Hello.
    let r = edgegate_tests::http_get(gw.admin_addr(), "/readyz")
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "ready\nservice svc: 1 of 2 instances linked\n")
    );
    let mut ws = gw.connect("/echo").await;
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Some(Message::text("hi")));
    assert_eq!(gw.instances_linked(), (1, 2));
}

/// A gateway's end of a link that says Hello, then pings every 100 ms and
/// never reads again.
async fn gateway_that_stops_reading(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    use edgegate_link::proto::{Frame, FrameCodec, PROTOCOL_VERSION};
    use tokio_util::codec::{FramedRead, FramedWrite};

    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (r, w) = stream.into_split();
    let mut reader = FramedRead::new(r, FrameCodec::default());
    let mut writer = FramedWrite::new(w, FrameCodec::default());
    let hello = Frame::Hello {
        version: PROTOCOL_VERSION,
        name: "stops-reading".into(),
        max_frame_bytes: 1 << 20,
    };
    writer.send(hello).await.unwrap();
    assert!(matches!(reader.next().await, Some(Ok(Frame::Hello { .. }))));
    tokio::spawn(async move {
        let _reader = reader;
        for nonce in 1.. {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if writer.send(Frame::Ping { nonce }).await.is_err() {
                return;
            }
        }
    })
}

#[tokio::test]
async fn a_gateway_that_stops_reading_but_pings_loses_the_link_at_the_service() {
    use edgegate_link::proto::{Frame, Kind};
    use edgegate_link::service::{Event, Service, ServiceConfig};

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = ServiceConfig::new("stalled");
    config.ping_interval = Duration::from_millis(500);
    config.ping_timeout = Duration::from_secs(2);
    config.link_queue_frames = 16;
    let stop = tokio_util::sync::CancellationToken::new();
    let (service, mut events) = Service::start(listener, config, stop.clone()).unwrap();
    let _peer = gateway_that_stops_reading(addr).await;
    let link = match tokio::time::timeout(WAIT, events.recv()).await.unwrap() {
        Some(Event::LinkUp { link, .. }) => link,
        other => panic!("expected the link up, got {other:?}"),
    };

    // The service writes to it until its bounded write gives up (ping
    // timeout 2 s) although the gateway still pings: the link goes down.
    let started = Instant::now();
    let sender = service.clone();
    let flooding = tokio::spawn(async move {
        let payload = bytes::Bytes::from(vec![7u8; 60 * 1024]);
        loop {
            let frame = Frame::ClientMessage {
                client: 1,
                kind: Kind::Binary,
                payload: payload.clone(),
            };
            if sender.send(link, frame).await.is_err() {
                return;
            }
        }
    });
    match tokio::time::timeout(Duration::from_secs(15), events.recv())
        .await
        .expect("link down in time")
    {
        Some(Event::LinkDown { link: down }) => assert_eq!(down, link),
        other => panic!("expected the link down, got {other:?}"),
    }
    println!(
        "service dropped the unread link after {:?}",
        started.elapsed()
    );
    tokio::time::timeout(WAIT, flooding)
        .await
        .expect("sends fail once the link is down")
        .unwrap();
    stop.cancel();
}

#[tokio::test]
async fn a_service_hello_below_the_minimum_frame_cap_gets_goaway_2_from_the_gateway() {
    use edgegate_link::proto::{
        Frame, FrameCodec, GOAWAY_PROTOCOL_ERROR, MIN_FRAME_BYTES, PROTOCOL_VERSION,
    };
    use tokio_util::codec::Framed;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gw = GatewayBuilder::new(addr)
        .links(1)
        .start_with_links_up(0)
        .await;
    let (stream, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("the gateway dials")
        .unwrap();
    let mut link = Framed::new(stream, FrameCodec::default());
    assert!(matches!(link.next().await, Some(Ok(Frame::Hello { .. }))));
    let tiny = Frame::Hello {
        version: PROTOCOL_VERSION,
        name: "tiny".into(),
        max_frame_bytes: (MIN_FRAME_BYTES - 1) as u32,
    };
    link.send(tiny).await.unwrap();
    match tokio::time::timeout(WAIT, link.next())
        .await
        .expect("answer")
    {
        Some(Ok(Frame::Goaway { code, reason })) => {
            assert_eq!(code, GOAWAY_PROTOCOL_ERROR);
            assert!(reason.contains("minimum"), "{reason}");
        }
        other => panic!("expected goaway 2, got {other:?}"),
    }
    assert_eq!(gw.gateway().links_up("svc"), 0);
}
