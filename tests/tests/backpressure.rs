//! Backpressure towards services: a slow service pauses its clients and
//! closes them with 1013 after the bound; a link that stops answering is
//! torn down, its clients closed with 1012, and redialled.

use std::time::Duration;

use edgegate_link::proto::{Frame, FrameCodec, PROTOCOL_VERSION};
use edgegate_tests::{close_code, eventually, EventService, GatewayBuilder};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::codec::Framed;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_stops_reading_pauses_its_clients_then_closes_them_with_1013() {
    // The service never takes its events: its runner stops reading the link,
    // TCP fills, and the gateway's link queue (4 frames) fills behind it.
    let service = EventService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .links(1)
        .service_key("link_queue_frames", 4)
        .limit("link_backpressure_timeout_secs", 1)
        .start()
        .await;
    let mut ws = gw.connect("/echo").await;
    let payload = vec![0u8; 60 * 1024];
    let writer = async {
        // Far more than socket buffers and queues hold; the writes block once
        // the gateway stops reading this client.
        for _ in 0..2000 {
            if ws.send(Message::binary(payload.clone())).await.is_err() {
                break;
            }
        }
        ws
    };
    let Ok(mut ws) = tokio::time::timeout(Duration::from_secs(20), writer).await else {
        panic!("client writes never stopped: the gateway kept reading")
    };
    assert_eq!(
        close_code(&mut ws, Duration::from_secs(10)).await,
        Some(1013)
    );
    assert_eq!(
        gw.metric(
            "edgegate_clients_closed_total",
            "reason=\"link_backpressure\""
        ),
        1.0
    );
    drop(service);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_stops_answering_is_torn_down_and_its_clients_closed_with_1012() {
    // A service that says hello and then goes silent (no pongs, no frames).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (sock, _) = listener.accept().await.unwrap();
            let mut link = Framed::new(sock, FrameCodec::default());
            if let Some(Ok(Frame::Hello { .. })) = link.next().await {
                link.send(Frame::Hello {
                    version: PROTOCOL_VERSION,
                    name: "silent".into(),
                    max_frame_bytes: edgegate_link::proto::MAX_FRAME_BYTES as u32,
                })
                .await
                .unwrap();
            }
            held.push(link); // read nothing more, answer nothing
        }
    });
    // The builder's service pings every 1 s and gives up after 3 s.
    let gw = GatewayBuilder::new(addr).links(1).start().await;
    let mut ws = gw.connect("/echo").await;
    assert_eq!(
        close_code(&mut ws, Duration::from_secs(10)).await,
        Some(1012)
    );
    let mut reconnects = 0.0;
    eventually(Duration::from_secs(5), || {
        reconnects = gw.metric("edgegate_link_reconnects_total", "");
        reconnects >= 1.0
    })
    .await;
    assert!(reconnects >= 1.0, "link redialled");
    assert_eq!(
        gw.metric("edgegate_clients_closed_total", "reason=\"link_lost\""),
        1.0
    );
    accepted.abort();
}
