//! The core data path, end to end: a real gateway, a real TLS WebSocket
//! client, a real service on a real link.

use std::time::Duration;

use bytes::Bytes;
use edgegate_link::proto::{Frame, Kind, CLIENT_MESSAGE_OVERHEAD};
use edgegate_link::service::Event;
use edgegate_tests::{
    close_code, eventually, refused_status, EventService, ExampleService, GatewayBuilder, WsClient,
};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(5);

/// The next data or close message (pings and pongs skipped).
async fn recv(ws: &mut WsClient) -> Message {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("message in time")
            .expect("stream open")
            .expect("no error");
        if !matches!(m, Message::Ping(_) | Message::Pong(_)) {
            return m;
        }
    }
}

#[tokio::test]
async fn echo_round_trip_goes_through_the_service() {
    let service = ExampleService::start().await;
    let gw = GatewayBuilder::new(service.addr).start().await;
    let mut ws = gw.connect("/echo").await;
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(recv(&mut ws).await, Message::text("hello"));
    let bin = vec![0u8, 1, 2, 255];
    ws.send(Message::binary(bin.clone())).await.unwrap();
    assert_eq!(recv(&mut ws).await, Message::binary(bin));
    assert!(gw.metric("edgegate_client_messages_in_total", "") >= 2.0);
}

#[tokio::test]
async fn both_tls_streams_carry_websocket_clients() {
    let service = ExampleService::start().await;
    for kind in ["rustls", "lean"] {
        let gw = GatewayBuilder::new(service.addr)
            .tls_stream(kind)
            .start()
            .await;
        let mut ws = gw.connect("/echo").await;
        // Larger than a TLS record both ways.
        let big = vec![7u8; 40_000];
        ws.send(Message::binary(big.clone())).await.unwrap();
        assert_eq!(recv(&mut ws).await, Message::binary(big), "{kind}");
        ws.send(Message::text("small")).await.unwrap();
        assert_eq!(recv(&mut ws).await, Message::text("small"), "{kind}");
        ws.close(None).await.unwrap();
        assert!(
            matches!(recv(&mut ws).await, Message::Close(_)),
            "{kind}: close answered"
        );
    }
}

#[tokio::test]
async fn chat_publish_reaches_all_room_members_and_nobody_else() {
    let service = ExampleService::start().await;
    let gw = GatewayBuilder::new(service.addr).start().await;
    let mut members = Vec::new();
    for _ in 0..3 {
        members.push(gw.connect("/chat").await);
    }
    let mut outsider = gw.connect("/echo").await;
    // Subscriptions travel on the link after the open; wait until all three are in.
    eventually(Duration::from_secs(2), || {
        gw.gateway().shared().topics.subscriber_count("room") == 3
    })
    .await;
    assert_eq!(gw.gateway().shared().topics.subscriber_count("room"), 3);
    members[0].send(Message::text("hi room")).await.unwrap();
    for m in &mut members {
        assert_eq!(recv(m).await, Message::text("hi room"));
    }
    // The /echo client must not see the room's message.
    outsider.send(Message::text("mine")).await.unwrap();
    assert_eq!(recv(&mut outsider).await, Message::text("mine"));
}

fn hs256_token(secret: &[u8], aud: &str, exp_offset: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = serde_json::json!({"sub": "alice", "aud": aud, "exp": now + exp_offset});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

#[tokio::test]
async fn invalid_or_expired_token_gets_401_and_the_service_never_sees_an_open() {
    let mut service = EventService::start().await;
    let secret = b"an-hs256-secret-of-32-bytes-or-more!";
    let key_dir = edgegate_tests::temp_dir("jwt");
    let key_path = key_dir.join("jwt.key");
    std::fs::write(&key_path, secret).unwrap();
    let gw = GatewayBuilder::new(service.addr)
        .links(1)
        .auth("mode", "\"jwt\"")
        .auth("jwt_algorithm", "\"HS256\"")
        .auth("jwt_key_path", format!("\"{}\"", key_path.display()))
        .auth("jwt_audience", "\"edgegate\"")
        .auth("jwt_leeway_secs", 0)
        .start()
        .await;
    service
        .wait_for(WAIT, |e| matches!(e, Event::LinkUp { .. }))
        .await;

    let expired = hs256_token(secret, "edgegate", -600);
    let wrong_key = hs256_token(b"another-secret-another-secret-123456", "edgegate", 600);
    for path in [
        "/echo".to_string(),
        format!("/echo?access_token={expired}"),
        format!("/echo?access_token={wrong_key}"),
        "/echo?access_token=garbage".to_string(),
    ] {
        let err = gw.try_connect(&path, &[]).await.expect_err("refused");
        assert_eq!(refused_status(&err), Some(401), "{path}");
    }
    let bearer = format!("Bearer {expired}");
    let err = gw
        .try_connect("/echo", &[("authorization", &bearer)])
        .await
        .expect_err("refused");
    assert_eq!(refused_status(&err), Some(401));
    assert_eq!(
        gw.metric("edgegate_handshake_failures_total", "phase=\"auth\""),
        5.0
    );

    // A good token gets in, and its claims reach the service.
    let good = hs256_token(secret, "edgegate", 600);
    let _ws = gw.connect(&format!("/echo?access_token={good}")).await;
    match service
        .wait_for(WAIT, |e| matches!(e, Event::Open { .. }))
        .await
    {
        Event::Open { claims, route, .. } => {
            assert_eq!(route, "/echo");
            let v: serde_json::Value = serde_json::from_slice(&claims).unwrap();
            assert_eq!(v["sub"], "alice");
        }
        other => panic!("{other:?}"),
    }
    // Nothing else was opened: the rejected clients never reached the service.
    assert!(service.events.try_recv().is_err());
}

#[tokio::test]
async fn disallowed_origin_gets_403() {
    let service = ExampleService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .auth("allowed_origins", "[\"https://app.example\"]")
        .start()
        .await;
    let err = gw
        .try_connect("/echo", &[("origin", "https://evil.example")])
        .await
        .expect_err("refused");
    assert_eq!(refused_status(&err), Some(403));
    let mut ok = gw
        .try_connect("/echo", &[("origin", "https://app.example")])
        .await
        .expect("allowed origin");
    ok.send(Message::text("x")).await.unwrap();
    assert_eq!(recv(&mut ok).await, Message::text("x"));
}

#[tokio::test]
async fn unknown_path_gets_404() {
    let service = ExampleService::start().await;
    let gw = GatewayBuilder::new(service.addr).start().await;
    let err = gw.try_connect("/nowhere", &[]).await.expect_err("refused");
    assert_eq!(refused_status(&err), Some(404));
}

#[tokio::test]
async fn oversized_message_is_closed_with_1009() {
    let service = ExampleService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .limit("max_message_bytes", 1024)
        .start()
        .await;
    let mut ws = gw.connect("/echo").await;
    ws.send(Message::binary(vec![0u8; 4096])).await.unwrap();
    assert_eq!(close_code(&mut ws, WAIT).await, Some(1009));
    eventually(WAIT, || {
        gw.metric(
            "edgegate_clients_closed_total",
            "reason=\"message_too_big\"",
        ) >= 1.0
    })
    .await;
    assert_eq!(
        gw.metric(
            "edgegate_clients_closed_total",
            "reason=\"message_too_big\""
        ),
        1.0
    );
}

/// `limits.max_message_bytes` of the large-message tests: 20 MiB, above
/// what the reference service's default 16 MiB frame cap carries.
const TWENTY_MIB: usize = 20 * 1024 * 1024;
/// The frame cap that carries [`TWENTY_MIB`] messages: the message plus
/// the `ClientMessage` fields.
const TWENTY_MIB_CAP: usize = TWENTY_MIB + CLIENT_MESSAGE_OVERHEAD;
/// A message within [`TWENTY_MIB`] but over the default 16 MiB cap.
const EIGHTEEN_MIB: usize = 18 * 1024 * 1024;
/// Bound on an 18 MiB echo through TLS, the gateway and a link, both ways.
const BIG_WAIT: Duration = Duration::from_secs(60);

/// The next data or close message, waiting up to [`BIG_WAIT`].
async fn recv_big(ws: &mut WsClient) -> Message {
    loop {
        let m = tokio::time::timeout(BIG_WAIT, ws.next())
            .await
            .expect("message in time")
            .expect("stream open")
            .expect("no error");
        if !matches!(m, Message::Ping(_) | Message::Pong(_)) {
            return m;
        }
    }
}

/// A message the gateway accepts but the service's link frame cap cannot
/// carry (the example service takes frames up to 16 MiB unless told more;
/// an 18 MiB message is an 18,874,378-byte `ClientMessage`) is refused for
/// its client alone: 1009 to that client, the link and every other client
/// on it untouched. The config declares a cap the service does not say
/// (check-config refuses the combination otherwise).
#[tokio::test]
async fn a_message_over_the_services_frame_cap_closes_that_client_alone() {
    let service = ExampleService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .links(1)
        .limit("max_message_bytes", TWENTY_MIB)
        .service_key("max_frame_bytes", TWENTY_MIB_CAP)
        // Moving 18 MiB through an unoptimised build on one test thread can
        // keep that thread from the link's pongs for seconds on a loaded
        // host; this test is about the big message, not the link heartbeat.
        .service_key("ping_interval_secs", 10)
        .service_key("ping_timeout_secs", 60)
        .start()
        .await;
    let mut bystander = gw.connect("/echo").await;
    let mut big = gw.connect("/echo").await;
    big.send(Message::binary(vec![7u8; EIGHTEEN_MIB]))
        .await
        .unwrap();
    assert_eq!(close_code(&mut big, BIG_WAIT).await, Some(1009));
    bystander.send(Message::text("still here")).await.unwrap();
    assert_eq!(recv(&mut bystander).await, Message::text("still here"));
    assert_eq!(gw.gateway().links_up("svc"), 1);
    assert_eq!(
        gw.metric("edgegate_clients_closed_total", "reason=\"link_lost\""),
        0.0
    );
}

/// Issue 28 item 9: the example service started with a frame cap sized
/// from the gateway's `max_message_bytes` (`--max-frame-bytes` on its
/// command line) carries every message the gateway accepts: an 18 MiB
/// message comes back whole, byte for byte, and a bystander on the same
/// link keeps echoing. Before it had a fixed 16 MiB cap and this client got
/// 1009.
#[tokio::test]
async fn an_example_service_with_a_larger_frame_cap_echoes_what_the_gateway_allows() {
    let service = ExampleService::start_with_max_frame_bytes(TWENTY_MIB_CAP).await;
    let gw = GatewayBuilder::new(service.addr)
        .links(1)
        .limit("max_message_bytes", TWENTY_MIB)
        .service_key("max_frame_bytes", TWENTY_MIB_CAP)
        // Moving 18 MiB through an unoptimised build on one test thread can
        // keep that thread from the link's pongs for seconds on a loaded
        // host; this test is about the big message, not the link heartbeat.
        .service_key("ping_interval_secs", 10)
        .service_key("ping_timeout_secs", 60)
        .start()
        .await;
    let mut bystander = gw.connect("/echo").await;
    let mut big = gw.connect("/echo").await;
    // Not one repeated byte: a reordered or dropped chunk would show.
    let payload: Vec<u8> = (0..EIGHTEEN_MIB).map(|i| (i % 251) as u8).collect();
    big.send(Message::binary(payload.clone())).await.unwrap();
    match recv_big(&mut big).await {
        Message::Binary(echoed) => assert!(echoed == payload, "18 MiB echo differs"),
        other => panic!("expected the 18 MiB echo, got {other:?}"),
    }
    bystander.send(Message::text("still here")).await.unwrap();
    assert_eq!(recv(&mut bystander).await, Message::text("still here"));
    assert_eq!(gw.gateway().links_up("svc"), 1);
    assert_eq!(
        gw.metric(
            "edgegate_clients_closed_total",
            "reason=\"message_too_big\""
        ),
        0.0
    );
}

#[tokio::test]
async fn silent_client_is_closed_after_the_heartbeat_timeout() {
    let service = ExampleService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .heartbeat("ping_interval_secs", 1)
        .heartbeat("ping_timeout_secs", 2)
        .start()
        .await;
    let mut ws = gw.connect("/echo").await;
    // Not polling the client means its pongs are never sent: it is silent
    // until the gateway has closed it.
    eventually(WAIT, || {
        gw.metric(
            "edgegate_clients_closed_total",
            "reason=\"heartbeat_timeout\"",
        ) >= 1.0
    })
    .await;
    assert_eq!(
        close_code(&mut ws, WAIT).await,
        Some(edgegate::close::HEARTBEAT_TIMEOUT_CODE)
    );
    assert_eq!(
        gw.metric(
            "edgegate_clients_closed_total",
            "reason=\"heartbeat_timeout\""
        ),
        1.0
    );
}

#[tokio::test]
async fn client_answering_pings_outlives_the_heartbeat_timeout() {
    let service = ExampleService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .heartbeat("ping_interval_secs", 1)
        .heartbeat("ping_timeout_secs", 2)
        .start()
        .await;
    let mut ws = gw.connect("/echo").await;
    // Reading answers pings; after 3.5 s the client is still served.
    let until = tokio::time::Instant::now() + Duration::from_millis(3500);
    while let Ok(m) = tokio::time::timeout_at(until, ws.next()).await {
        assert!(matches!(m, Some(Ok(Message::Ping(_)))), "{m:?}");
    }
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(recv(&mut ws).await, Message::text("still here"));
}

/// A service that sends `n` messages of `size` bytes to the first client that opens.
async fn flood_first_client(service: &mut EventService, n: usize, size: usize) {
    let Event::Open { link, client, .. } = service
        .wait_for(WAIT, |e| matches!(e, Event::Open { .. }))
        .await
    else {
        unreachable!()
    };
    let payload = Bytes::from(vec![b'x'; size]);
    for _ in 0..n {
        service
            .service
            .send(
                link,
                Frame::ClientMessage {
                    client,
                    kind: Kind::Binary,
                    payload: payload.clone(),
                },
            )
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn slow_reader_drops_oldest_and_counts_it() {
    let mut service = EventService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .links(1)
        .limit("outbound_queue_messages", 8)
        .limit("slow_reader_policy", "\"drop_oldest\"")
        .limit("write_timeout_secs", 30)
        .start()
        .await;
    let _ws = gw.connect("/echo").await; // never reads
                                         // 64 MiB: far more than the loopback socket buffers hold.
    flood_first_client(&mut service, 1024, 64 * 1024).await;
    let mut dropped = 0.0;
    eventually(Duration::from_secs(4), || {
        dropped = gw.metric("edgegate_outbound_dropped_total", "policy=\"drop_oldest\"");
        dropped > 0.0
    })
    .await;
    assert!(dropped > 0.0, "no drops counted");
    assert_eq!(
        gw.gateway().client_count(),
        1,
        "drop_oldest keeps the client"
    );
}

#[tokio::test]
async fn slow_reader_under_close_policy_is_closed_and_counted() {
    let mut service = EventService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .links(1)
        .limit("outbound_queue_messages", 8)
        .limit("slow_reader_policy", "\"close\"")
        .limit("write_timeout_secs", 30)
        .start()
        .await;
    let _ws = gw.connect("/echo").await; // never reads
    flood_first_client(&mut service, 1024, 64 * 1024).await;
    service
        .wait_for(WAIT, |e| matches!(e, Event::Close { .. }))
        .await;
    assert_eq!(
        gw.metric("edgegate_clients_closed_total", "reason=\"slow_reader\""),
        1.0
    );
    assert_eq!(
        gw.metric("edgegate_outbound_dropped_total", "policy=\"close\""),
        1.0
    );
}

#[tokio::test]
async fn service_killed_and_restarted_links_come_back() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = ExampleService::start_on(listener);
    let gw = GatewayBuilder::new(addr).start().await;
    let mut before = gw.connect("/echo").await;
    before.send(Message::text("a")).await.unwrap();
    assert_eq!(recv(&mut before).await, Message::text("a"));

    // The service goes away: clients bound to its links are closed with 1012.
    service.kill().await;
    assert_eq!(close_code(&mut before, WAIT).await, Some(1012));
    eventually(Duration::from_secs(2), || gw.gateway().links_up("svc") == 0).await;
    // While no link is up, new clients are told to come back later (1013).
    let mut during = gw.connect("/echo").await;
    assert_eq!(close_code(&mut during, WAIT).await, Some(1013));
    assert!(!gw.gateway().is_ready());

    // The service returns on the same address: links redial and clients are served.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let _service = ExampleService::start_on(listener);
    gw.wait_links(2).await;
    let mut after = gw.connect("/echo").await;
    after.send(Message::text("b")).await.unwrap();
    assert_eq!(recv(&mut after).await, Message::text("b"));
    assert!(gw.metric("edgegate_link_reconnects_total", "") >= 1.0);
    assert_eq!(
        gw.metric("edgegate_clients_closed_total", "reason=\"link_lost\""),
        1.0
    );
    assert_eq!(
        gw.metric("edgegate_clients_closed_total", "reason=\"no_link\""),
        1.0
    );
}

#[tokio::test]
async fn client_close_reaches_the_service_with_its_code() {
    let mut service = EventService::start().await;
    let gw = GatewayBuilder::new(service.addr).links(1).start().await;
    let mut ws = gw.connect("/echo").await;
    service
        .wait_for(WAIT, |e| matches!(e, Event::Open { .. }))
        .await;
    ws.close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: 4001u16.into(),
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    match service
        .wait_for(WAIT, |e| matches!(e, Event::Close { .. }))
        .await
    {
        Event::Close { code, .. } => assert_eq!(code, 4001),
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn service_close_reaches_the_client_with_its_code() {
    let mut service = EventService::start().await;
    let gw = GatewayBuilder::new(service.addr).links(1).start().await;
    let mut ws = gw.connect("/echo").await;
    let Event::Open { link, client, .. } = service
        .wait_for(WAIT, |e| matches!(e, Event::Open { .. }))
        .await
    else {
        unreachable!()
    };
    service
        .service
        .send(
            link,
            Frame::ClientClose {
                client,
                code: 4100,
                reason: "kicked".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(close_code(&mut ws, WAIT).await, Some(4100));
}

#[tokio::test]
async fn drain_closes_every_client_with_1001_and_tells_the_service() {
    let mut service = EventService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .links(1)
        .drain_window_secs(1)
        .start()
        .await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(gw.connect("/echo").await);
    }
    let window = Duration::from_millis(500);
    let drain = tokio::spawn(gw.shutdown(window));
    for ws in &mut clients {
        assert_eq!(close_code(ws, WAIT).await, Some(1001));
    }
    tokio::time::timeout(WAIT, drain)
        .await
        .expect("drain finishes")
        .unwrap();
    let mut closes = 0;
    while let Ok(Some(e)) =
        tokio::time::timeout(Duration::from_millis(500), service.events.recv()).await
    {
        if matches!(e, Event::Close { .. }) {
            closes += 1;
        }
    }
    assert_eq!(
        closes, 20,
        "every client's close reached the service before the link closed"
    );
}

#[tokio::test]
async fn a_link_can_only_address_the_clients_bound_to_it() {
    let mut service = EventService::start().await;
    let gw = GatewayBuilder::new(service.addr).links(2).start().await;
    let mut links = Vec::new();
    while links.len() < 2 {
        if let Event::LinkUp { link, .. } = service.next_event(WAIT).await {
            links.push(link);
        }
    }
    let mut ws = gw.connect("/echo").await;
    let Event::Open {
        link: own, client, ..
    } = service
        .wait_for(WAIT, |e| matches!(e, Event::Open { .. }))
        .await
    else {
        unreachable!()
    };
    let other = *links.iter().find(|l| **l != own).unwrap();
    // The other link's close and message for this client are ignored.
    let close = |code| Frame::ClientClose {
        client,
        code,
        reason: "x".into(),
    };
    service.service.send(other, close(4001)).await.unwrap();
    let msg = Frame::ClientMessage {
        client,
        kind: Kind::Text,
        payload: Bytes::from_static(b"not yours"),
    };
    service.service.send(other, msg).await.unwrap();
    // Its own link's message arrives, and nothing before it.
    let msg = Frame::ClientMessage {
        client,
        kind: Kind::Text,
        payload: Bytes::from_static(b"yours"),
    };
    service.service.send(own, msg).await.unwrap();
    assert_eq!(recv(&mut ws).await, Message::text("yours"));
    service.service.send(own, close(4002)).await.unwrap();
    assert_eq!(close_code(&mut ws, WAIT).await, Some(4002));
}
