//! The example service and the service runner, driven over real TCP by a fake
//! gateway made of `Framed<TcpStream, FrameCodec>`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use edgegate_link::example::{
    run_example_service, CHAT_ROUTE, CHAT_TOPIC, ECHO_ROUTE, EXAMPLE_SERVICE_NAME,
    UNKNOWN_ROUTE_CODE,
};
use edgegate_link::proto::{
    ClientId, CodecError, Frame, FrameCodec, Kind, GOAWAY_NORMAL, GOAWAY_PROTOCOL_ERROR,
    GOAWAY_UNSUPPORTED_VERSION, MAX_FRAME_BYTES, MIN_FRAME_BYTES, PROTOCOL_VERSION,
};
use edgegate_link::service::{Event, SendError, Service, ServiceConfig};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

/// Bound on every wait, so a broken service fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(10);

type FakeGateway = Framed<TcpStream, FrameCodec>;

/// The example service on an ephemeral port, cancelled when dropped.
struct ExampleService {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl ExampleService {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_example_service(listener, shutdown.clone()));
        ExampleService {
            addr,
            shutdown,
            task,
        }
    }
}

impl Drop for ExampleService {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn dial(addr: SocketAddr) -> FakeGateway {
    let stream = TcpStream::connect(addr).await.expect("connect");
    Framed::new(stream, FrameCodec::default())
}

async fn next(gateway: &mut FakeGateway) -> Frame {
    timeout(PATIENCE, gateway.next())
        .await
        .expect("a frame in time")
        .expect("link still open")
        .expect("a well-formed frame")
}

async fn send(gateway: &mut FakeGateway, frame: Frame) {
    gateway.send(frame).await.expect("send");
}

/// Dials and completes the hello exchange as gateway `name`.
async fn link_up(addr: SocketAddr, name: &str) -> FakeGateway {
    let mut gateway = dial(addr).await;
    send(
        &mut gateway,
        Frame::Hello {
            version: PROTOCOL_VERSION,
            name: name.to_owned(),
            max_frame_bytes: MAX_FRAME_BYTES as u32,
        },
    )
    .await;
    match next(&mut gateway).await {
        Frame::Hello { version, .. } => assert_eq!(version, PROTOCOL_VERSION),
        other => panic!("expected hello, got {other:?}"),
    }
    gateway
}

async fn open(gateway: &mut FakeGateway, client: ClientId, route: &str) {
    send(
        gateway,
        Frame::ClientOpen {
            client,
            route: route.to_owned(),
            remote_addr: "198.51.100.7:40000".to_owned(),
            claims: Bytes::from_static(b"{}"),
        },
    )
    .await;
}

async fn message(gateway: &mut FakeGateway, client: ClientId, kind: Kind, payload: &'static [u8]) {
    send(
        gateway,
        Frame::ClientMessage {
            client,
            kind,
            payload: Bytes::from_static(payload),
        },
    )
    .await;
}

/// Waits until the peer closes the connection, skipping frames before it.
async fn closed(gateway: &mut FakeGateway) {
    loop {
        match timeout(PATIENCE, gateway.next())
            .await
            .expect("close in time")
        {
            None | Some(Err(_)) => return,
            Some(Ok(_)) => {}
        }
    }
}

/// Expects a `Goaway` with `code` whose reason contains `part`, then the close.
async fn goaway_then_close(gateway: &mut FakeGateway, code: u16, part: &str) {
    match next(gateway).await {
        Frame::Goaway { code: got, reason } => {
            assert_eq!(got, code);
            assert!(reason.contains(part), "reason: {reason}");
        }
        other => panic!("expected goaway, got {other:?}"),
    }
    closed(gateway).await;
}

#[tokio::test]
async fn gateway_hello_is_answered_with_the_service_hello() {
    let service = ExampleService::start().await;
    let mut gateway = dial(service.addr).await;
    send(
        &mut gateway,
        Frame::Hello {
            version: PROTOCOL_VERSION,
            name: "gw-a".to_owned(),
            max_frame_bytes: MAX_FRAME_BYTES as u32,
        },
    )
    .await;
    assert_eq!(
        next(&mut gateway).await,
        Frame::Hello {
            version: PROTOCOL_VERSION,
            name: EXAMPLE_SERVICE_NAME.to_owned(),
            max_frame_bytes: MAX_FRAME_BYTES as u32,
        }
    );
}

#[tokio::test]
async fn echo_route_sends_every_message_back() {
    let service = ExampleService::start().await;
    let mut gateway = link_up(service.addr, "gw-a").await;
    open(&mut gateway, 1, ECHO_ROUTE).await;
    message(&mut gateway, 1, Kind::Text, b"hello").await;
    message(&mut gateway, 1, Kind::Binary, &[0, 159, 255]).await;
    assert_eq!(
        next(&mut gateway).await,
        Frame::ClientMessage {
            client: 1,
            kind: Kind::Text,
            payload: Bytes::from_static(b"hello"),
        }
    );
    assert_eq!(
        next(&mut gateway).await,
        Frame::ClientMessage {
            client: 1,
            kind: Kind::Binary,
            payload: Bytes::from_static(&[0, 159, 255]),
        }
    );
}

#[tokio::test]
async fn chat_client_is_subscribed_and_its_messages_are_published_to_the_room() {
    let service = ExampleService::start().await;
    let mut gateway = link_up(service.addr, "gw-a").await;
    for client in [1, 2] {
        open(&mut gateway, client, CHAT_ROUTE).await;
        assert_eq!(
            next(&mut gateway).await,
            Frame::Subscribe {
                client,
                topic: CHAT_TOPIC.to_owned(),
            }
        );
    }
    message(&mut gateway, 2, Kind::Text, b"hi room").await;
    assert_eq!(
        next(&mut gateway).await,
        Frame::Publish {
            topic: CHAT_TOPIC.to_owned(),
            kind: Kind::Text,
            payload: Bytes::from_static(b"hi room"),
        }
    );
}

#[tokio::test]
async fn chat_publish_reaches_each_gateway_once_on_its_first_link() {
    let service = ExampleService::start().await;
    let mut a_first = link_up(service.addr, "gw-a").await;
    let mut a_second = link_up(service.addr, "gw-a").await;
    let mut b = link_up(service.addr, "gw-b").await;

    open(&mut a_second, 7, CHAT_ROUTE).await;
    assert!(matches!(
        next(&mut a_second).await,
        Frame::Subscribe { client: 7, .. }
    ));
    message(&mut a_second, 7, Kind::Binary, b"to everyone").await;

    let published = Frame::Publish {
        topic: CHAT_TOPIC.to_owned(),
        kind: Kind::Binary,
        payload: Bytes::from_static(b"to everyone"),
    };
    assert_eq!(next(&mut a_first).await, published);
    assert_eq!(next(&mut b).await, published);

    // The publish is complete, so a duplicate on gw-a's second link would be
    // queued ahead of this echo.
    open(&mut a_second, 8, ECHO_ROUTE).await;
    message(&mut a_second, 8, Kind::Text, b"marker").await;
    assert_eq!(
        next(&mut a_second).await,
        Frame::ClientMessage {
            client: 8,
            kind: Kind::Text,
            payload: Bytes::from_static(b"marker"),
        }
    );
}

#[tokio::test]
async fn client_on_unknown_route_is_closed_with_4404() {
    let service = ExampleService::start().await;
    let mut gateway = link_up(service.addr, "gw-a").await;
    open(&mut gateway, 3, "/nope").await;
    assert_eq!(
        next(&mut gateway).await,
        Frame::ClientClose {
            client: 3,
            code: UNKNOWN_ROUTE_CODE,
            reason: "unknown route".to_owned(),
        }
    );
}

#[tokio::test]
async fn ping_is_answered_with_pong_with_the_same_nonce() {
    let service = ExampleService::start().await;
    let mut gateway = link_up(service.addr, "gw-a").await;
    send(&mut gateway, Frame::Ping { nonce: 0xfeed }).await;
    assert_eq!(next(&mut gateway).await, Frame::Pong { nonce: 0xfeed });
}

#[tokio::test]
async fn version_mismatch_gets_goaway_code_1_and_the_link_closes() {
    let service = ExampleService::start().await;
    let mut gateway = dial(service.addr).await;
    send(
        &mut gateway,
        Frame::Hello {
            version: PROTOCOL_VERSION + 1,
            name: "gw-future".to_owned(),
            max_frame_bytes: MAX_FRAME_BYTES as u32,
        },
    )
    .await;
    goaway_then_close(&mut gateway, GOAWAY_UNSUPPORTED_VERSION, "version").await;
}

/// A version 1 `Hello` (no `max_frame_bytes`) is still understood well
/// enough to be answered with "unsupported version", not a protocol error.
#[tokio::test]
async fn a_version_1_hello_gets_goaway_code_1() {
    let service = ExampleService::start().await;
    let mut stream = TcpStream::connect(service.addr).await.expect("connect");
    // length 9: type, version 1, name "gw-1"; no max_frame_bytes.
    stream
        .write_all(&[0, 0, 0, 9, 0x01, 0, 1, 0, 4, b'g', b'w', b'-', b'1'])
        .await
        .expect("write");
    let mut gateway = Framed::new(stream, FrameCodec::default());
    goaway_then_close(&mut gateway, GOAWAY_UNSUPPORTED_VERSION, "1").await;
}

#[tokio::test]
async fn a_gateway_frame_cap_below_the_minimum_is_a_protocol_error() {
    let service = ExampleService::start().await;
    let mut gateway = dial(service.addr).await;
    send(
        &mut gateway,
        Frame::Hello {
            version: PROTOCOL_VERSION,
            name: "gw-tiny".to_owned(),
            max_frame_bytes: (MIN_FRAME_BYTES - 1) as u32,
        },
    )
    .await;
    goaway_then_close(&mut gateway, GOAWAY_PROTOCOL_ERROR, "minimum").await;
}

#[tokio::test]
async fn first_frame_other_than_hello_is_a_protocol_error() {
    let service = ExampleService::start().await;
    let mut gateway = dial(service.addr).await;
    open(&mut gateway, 1, ECHO_ROUTE).await;
    assert!(matches!(
        next(&mut gateway).await,
        Frame::Goaway {
            code: GOAWAY_PROTOCOL_ERROR,
            ..
        }
    ));
    closed(&mut gateway).await;
}

#[tokio::test]
async fn garbage_bytes_close_the_link_and_the_service_keeps_serving() {
    let service = ExampleService::start().await;
    let mut raw = TcpStream::connect(service.addr).await.expect("connect");
    // A valid header announcing a frame type that does not exist, then noise.
    raw.write_all(&[0, 0, 0, 3, 0x99, 0xde, 0xad, 0xbe, 0xef])
        .await
        .expect("write garbage");
    let mut rest = Vec::new();
    timeout(PATIENCE, raw.read_to_end(&mut rest))
        .await
        .expect("close in time")
        .expect("read until close");
    let mut buf = BytesMut::from(&rest[..]);
    let goaway = tokio_util::codec::Decoder::decode(&mut FrameCodec::default(), &mut buf)
        .expect("a well-formed goaway");
    assert!(matches!(
        goaway,
        Some(Frame::Goaway {
            code: GOAWAY_PROTOCOL_ERROR,
            ..
        })
    ));

    // A length far above the cap: refused from the header alone.
    let mut raw = TcpStream::connect(service.addr).await.expect("connect");
    let mut huge = BytesMut::new();
    huge.put_u32(u32::MAX);
    raw.write_all(&huge).await.expect("write header");
    let mut rest = Vec::new();
    timeout(PATIENCE, raw.read_to_end(&mut rest))
        .await
        .expect("close in time")
        .expect("read until close");

    let mut gateway = link_up(service.addr, "gw-a").await;
    send(&mut gateway, Frame::Ping { nonce: 1 }).await;
    assert_eq!(next(&mut gateway).await, Frame::Pong { nonce: 1 });
}

#[tokio::test]
async fn gateway_may_not_send_service_frames_on_an_up_link() {
    let service = ExampleService::start().await;
    let mut gateway = link_up(service.addr, "gw-a").await;
    send(
        &mut gateway,
        Frame::Publish {
            topic: "room".to_owned(),
            kind: Kind::Text,
            payload: Bytes::new(),
        },
    )
    .await;
    assert!(matches!(
        next(&mut gateway).await,
        Frame::Goaway {
            code: GOAWAY_PROTOCOL_ERROR,
            ..
        }
    ));
    closed(&mut gateway).await;
}

#[tokio::test]
async fn shutdown_says_goaway_to_every_link_and_ends_the_service() {
    let mut service = ExampleService::start().await;
    let mut gateway = link_up(service.addr, "gw-a").await;
    service.shutdown.cancel();
    assert!(matches!(
        next(&mut gateway).await,
        Frame::Goaway {
            code: GOAWAY_NORMAL,
            ..
        }
    ));
    closed(&mut gateway).await;
    timeout(PATIENCE, &mut service.task)
        .await
        .expect("service ends in time")
        .expect("service task")
        .expect("service result");
}

// The runner itself, through its events.

async fn start_service(
    config: ServiceConfig,
) -> (Service, mpsc::Receiver<Event>, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let shutdown = CancellationToken::new();
    let (service, events) = Service::start(listener, config, shutdown.clone()).expect("start");
    (service, events, shutdown)
}

async fn event(events: &mut mpsc::Receiver<Event>) -> Event {
    timeout(PATIENCE, events.recv())
        .await
        .expect("an event in time")
        .expect("service still running")
}

#[tokio::test]
async fn link_events_come_in_order_and_link_down_comes_once() {
    let (service, mut events, shutdown) = start_service(ServiceConfig::new("svc")).await;
    let mut gateway = link_up(service.local_addr(), "gw-a").await;
    let Event::LinkUp {
        link,
        gateway: name,
    } = event(&mut events).await
    else {
        panic!("expected link up");
    };
    assert_eq!(name, "gw-a");

    open(&mut gateway, 5, "/x").await;
    message(&mut gateway, 5, Kind::Text, b"m").await;
    send(
        &mut gateway,
        Frame::ClientClose {
            client: 5,
            code: 1000,
            reason: "bye".to_owned(),
        },
    )
    .await;
    assert!(
        matches!(event(&mut events).await, Event::Open { client: 5, ref route, .. } if route == "/x")
    );
    assert!(matches!(
        event(&mut events).await,
        Event::Message { client: 5, .. }
    ));
    assert!(matches!(
        event(&mut events).await,
        Event::Close {
            client: 5,
            code: 1000,
            ..
        }
    ));

    drop(gateway);
    assert_eq!(event(&mut events).await, Event::LinkDown { link });
    assert!(matches!(
        service.send(link, Frame::ClientMessage { client: 5, kind: Kind::Text, payload: Bytes::new() }).await,
        Err(SendError::LinkDown(l)) if l == link
    ));

    shutdown.cancel();
    assert!(timeout(PATIENCE, events.recv())
        .await
        .expect("end in time")
        .is_none());
}

/// What the service sends is held to the gateway's cap from its `Hello`:
/// a frame over it is refused at `send` and `publish`, and the link stays up.
#[tokio::test]
async fn frames_over_the_gateways_cap_are_refused_and_the_link_stays() {
    let (service, mut events, _shutdown) = start_service(ServiceConfig::new("svc")).await;
    let mut gateway = dial(service.local_addr()).await;
    send(
        &mut gateway,
        Frame::Hello {
            version: PROTOCOL_VERSION,
            name: "gw-small".to_owned(),
            max_frame_bytes: MIN_FRAME_BYTES as u32,
        },
    )
    .await;
    assert!(matches!(next(&mut gateway).await, Frame::Hello { .. }));
    let Event::LinkUp { link, .. } = event(&mut events).await else {
        panic!("expected link up");
    };
    let fits = Bytes::from(vec![1u8; MIN_FRAME_BYTES - 10]);
    let over = Bytes::from(vec![1u8; MIN_FRAME_BYTES - 9]);
    let refused = service
        .send(
            link,
            Frame::ClientMessage {
                client: 1,
                kind: Kind::Binary,
                payload: over.clone(),
            },
        )
        .await;
    assert!(
        matches!(refused, Err(SendError::Codec(CodecError::FrameTooLarge { len, max })) if len == MIN_FRAME_BYTES + 1 && max == MIN_FRAME_BYTES),
        "{refused:?}"
    );
    let published = service
        .publish("t", Kind::Binary, Bytes::from(vec![1u8; MIN_FRAME_BYTES]))
        .await;
    assert!(
        matches!(
            published,
            Err(SendError::Codec(CodecError::FrameTooLarge { .. }))
        ),
        "{published:?}"
    );
    service
        .send(
            link,
            Frame::ClientMessage {
                client: 1,
                kind: Kind::Binary,
                payload: fits.clone(),
            },
        )
        .await
        .expect("a frame at the cap is sent");
    assert_eq!(
        next(&mut gateway).await,
        Frame::ClientMessage {
            client: 1,
            kind: Kind::Binary,
            payload: fits
        }
    );
}

#[test]
fn a_service_frame_cap_below_the_minimum_is_refused_at_start() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut config = ServiceConfig::new("svc");
        config.max_frame_bytes = MIN_FRAME_BYTES - 1;
        let error =
            Service::start(listener, config, CancellationToken::new()).expect_err("refused");
        assert!(error.to_string().contains("minimum"), "{error}");
    });
}

#[tokio::test]
async fn service_refuses_to_send_frames_the_runner_owns() {
    let (service, _events, _shutdown) = start_service(ServiceConfig::new("svc")).await;
    assert!(matches!(
        service.send(1, Frame::Ping { nonce: 1 }).await,
        Err(SendError::NotAllowed("ping"))
    ));
}

#[tokio::test]
async fn publish_with_no_link_up_succeeds() {
    let (service, _events, _shutdown) = start_service(ServiceConfig::new("svc")).await;
    service
        .publish("room", Kind::Text, Bytes::from_static(b"nobody"))
        .await
        .expect("nothing to deliver is not an error");
}

#[tokio::test(start_paused = true)]
async fn service_pings_and_drops_a_silent_gateway_after_ping_timeout() {
    let mut config = ServiceConfig::new("svc");
    config.ping_interval = Duration::from_secs(1);
    config.ping_timeout = Duration::from_secs(3);
    let (service, mut events, _shutdown) = start_service(config).await;
    let mut gateway = link_up(service.local_addr(), "gw-a").await;
    let Event::LinkUp { link, .. } = event(&mut events).await else {
        panic!("expected link up");
    };
    // The gateway reads but never answers.
    assert_eq!(next(&mut gateway).await, Frame::Ping { nonce: 1 });
    assert_eq!(next(&mut gateway).await, Frame::Ping { nonce: 2 });
    assert_eq!(event(&mut events).await, Event::LinkDown { link });
    closed(&mut gateway).await;
}

#[tokio::test(start_paused = true)]
async fn gateway_that_answers_pings_stays_up() {
    let mut config = ServiceConfig::new("svc");
    config.ping_interval = Duration::from_secs(1);
    config.ping_timeout = Duration::from_secs(3);
    let (service, mut events, _shutdown) = start_service(config).await;
    let mut gateway = link_up(service.local_addr(), "gw-a").await;
    let Event::LinkUp { .. } = event(&mut events).await else {
        panic!("expected link up");
    };
    for _ in 0..10 {
        let Frame::Ping { nonce } = next(&mut gateway).await else {
            panic!("expected ping");
        };
        send(&mut gateway, Frame::Pong { nonce }).await;
    }
    assert!(events.try_recv().is_err(), "no link down while pongs flow");
}
