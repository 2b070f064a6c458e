//! Framed TCP clients: TLS, then length-prefixed frames
//! (docs/framed-protocol.md), with the same session model as WebSocket.

use std::time::Duration;

use edgegate_link::service::Event;
use edgegate_tests::framed::{FramedTestClient, BINARY, CLOSE, PING, PONG, TEXT, WELCOME};
use edgegate_tests::{eventually, EventService, ExampleService, GatewayBuilder};

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn framed_client_echo_round_trip() {
    let service = ExampleService::start().await;
    let gw = GatewayBuilder::new(service.addr).framed().start().await;
    let mut c = FramedTestClient::connect(gw.addr, &gw.cert, "/echo", "")
        .await
        .unwrap();
    assert_eq!(c.recv(WAIT).await.unwrap().kind, WELCOME);
    c.send(TEXT, b"hello").await.unwrap();
    let f = c.recv_data(WAIT).await.unwrap();
    assert_eq!((f.kind, f.body.as_slice()), (TEXT, &b"hello"[..]));
    c.send(BINARY, &[0, 1, 2]).await.unwrap();
    let f = c.recv_data(WAIT).await.unwrap();
    assert_eq!((f.kind, f.body), (BINARY, vec![0, 1, 2]));
    assert_eq!(gw.metric("edgegate_clients", "protocol=\"framed\""), 1.0);
}

#[tokio::test]
async fn framed_clients_run_on_the_lean_tls_stream() {
    let service = ExampleService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .framed()
        .tls_stream("lean")
        .start()
        .await;
    let mut c = FramedTestClient::connect(gw.addr, &gw.cert, "/echo", "")
        .await
        .unwrap();
    assert_eq!(c.recv(WAIT).await.unwrap().kind, WELCOME);
    let big = vec![3u8; 40_000];
    c.send(BINARY, &big).await.unwrap();
    let f = c.recv_data(WAIT).await.unwrap();
    assert_eq!((f.kind, f.body), (BINARY, big));
}

#[tokio::test]
async fn framed_and_websocket_clients_share_a_chat_topic() {
    let service = ExampleService::start().await;
    let gw = GatewayBuilder::new(service.addr).framed().start().await;
    let mut a = FramedTestClient::connect(gw.addr, &gw.cert, "/chat", "")
        .await
        .unwrap();
    let mut b = FramedTestClient::connect(gw.addr, &gw.cert, "/chat", "")
        .await
        .unwrap();
    assert_eq!(a.recv(WAIT).await.unwrap().kind, WELCOME);
    assert_eq!(b.recv(WAIT).await.unwrap().kind, WELCOME);
    eventually(Duration::from_secs(2), || {
        gw.gateway().shared().topics.subscriber_count("room") == 2
    })
    .await;
    a.send(TEXT, b"to the room").await.unwrap();
    for c in [&mut a, &mut b] {
        let f = c.recv_data(WAIT).await.unwrap();
        assert_eq!((f.kind, f.body.as_slice()), (TEXT, &b"to the room"[..]));
    }
}

#[tokio::test]
async fn framed_client_with_unknown_route_gets_4404() {
    let service = ExampleService::start().await;
    let gw = GatewayBuilder::new(service.addr).framed().start().await;
    let mut c = FramedTestClient::connect(gw.addr, &gw.cert, "/nowhere", "")
        .await
        .unwrap();
    assert_eq!(c.recv(WAIT).await.unwrap().close_code(), Some(4404));
}

#[tokio::test]
async fn framed_client_with_a_bad_token_gets_4401_and_never_reaches_the_service() {
    let mut service = EventService::start().await;
    let key_dir = edgegate_tests::temp_dir("framed-jwt");
    let key_path = key_dir.join("jwt.key");
    std::fs::write(&key_path, b"framed-test-secret-of-at-least-32-bytes").unwrap();
    let gw = GatewayBuilder::new(service.addr)
        .framed()
        .links(1)
        .auth("mode", "\"jwt\"")
        .auth("jwt_algorithm", "\"HS256\"")
        .auth("jwt_key_path", format!("\"{}\"", key_path.display()))
        .auth("jwt_audience", "\"edgegate\"")
        .start()
        .await;
    service
        .wait_for(WAIT, |e| matches!(e, Event::LinkUp { .. }))
        .await;
    let mut c = FramedTestClient::connect(gw.addr, &gw.cert, "/echo", "not-a-jwt")
        .await
        .unwrap();
    assert_eq!(c.recv(WAIT).await.unwrap().close_code(), Some(4401));
    let mut c = FramedTestClient::connect(gw.addr, &gw.cert, "/echo", "")
        .await
        .unwrap();
    assert_eq!(c.recv(WAIT).await.unwrap().close_code(), Some(4401));
    assert_eq!(
        gw.metric("edgegate_handshake_failures_total", "phase=\"auth\""),
        2.0
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), service.events.recv())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn framed_oversized_message_is_closed_with_1009() {
    let service = ExampleService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .framed()
        .limit("max_message_bytes", 1024)
        .start()
        .await;
    let mut c = FramedTestClient::connect(gw.addr, &gw.cert, "/echo", "")
        .await
        .unwrap();
    assert_eq!(c.recv(WAIT).await.unwrap().kind, WELCOME);
    c.send(BINARY, &vec![0u8; 2048]).await.unwrap();
    assert_eq!(c.recv_data(WAIT).await.unwrap().close_code(), Some(1009));
}

#[tokio::test]
async fn framed_ping_is_answered_and_silence_times_out() {
    let service = ExampleService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .framed()
        .heartbeat("ping_interval_secs", 1)
        .heartbeat("ping_timeout_secs", 2)
        .start()
        .await;
    let mut c = FramedTestClient::connect(gw.addr, &gw.cert, "/echo", "")
        .await
        .unwrap();
    assert_eq!(c.recv(WAIT).await.unwrap().kind, WELCOME);
    c.send(PING, b"n1").await.unwrap();
    let f = c.recv(WAIT).await.unwrap();
    assert_eq!((f.kind, f.body.as_slice()), (PONG, &b"n1"[..]));
    // The gateway pings after a second of silence; not answering closes us with 4408.
    let mut saw_ping = false;
    loop {
        let f = c.recv(WAIT).await.unwrap();
        if f.kind == PING {
            saw_ping = true;
            continue;
        }
        assert_eq!(f.kind, CLOSE);
        assert_eq!(
            f.close_code(),
            Some(edgegate::close::HEARTBEAT_TIMEOUT_CODE)
        );
        break;
    }
    assert!(saw_ping);
}

#[tokio::test]
async fn framed_garbage_first_frame_is_refused() {
    let service = ExampleService::start().await;
    let gw = GatewayBuilder::new(service.addr).framed().start().await;
    let mut c = FramedTestClient::connect(gw.addr, &gw.cert, "/echo", "")
        .await
        .unwrap();
    assert_eq!(c.recv(WAIT).await.unwrap().kind, WELCOME);
    // An unknown frame type after the Hello: protocol error 1002.
    c.send_raw(&[0, 0, 0, 1, 0x7f]).await.unwrap();
    assert_eq!(c.recv_data(WAIT).await.unwrap().close_code(), Some(1002));
}
