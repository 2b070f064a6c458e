//! Reconnect storms and the accept queue: the handshake permits shape a wave
//! so every client gets in while established clients keep being served, and
//! a full accept queue shows in metrics instead of as silent SYN drops.

use std::time::Duration;

use edgegate_tests::{eventually, ExampleService, GatewayBuilder};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_through_few_permits_lets_everyone_in_while_established_clients_are_served() {
    let service = ExampleService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .limit("handshake_permits", 4)
        .limit("handshake_timeout_secs", 30)
        .start()
        .await;
    let mut witness = gw.connect("/echo").await;

    // 400 clients arrive at once; only 4 handshakes run at a time.
    let storm: Vec<_> = (0..400)
        .map(|_| {
            let (addr, cert) = (gw.addr, gw.cert.clone());
            tokio::spawn(async move { edgegate_tests::ws_connect(addr, &cert, "/echo", &[]).await })
        })
        .collect();
    // The witness is served during the storm.
    for i in 0..20 {
        witness.send(Message::text(format!("w{i}"))).await.unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), witness.next())
                .await
                .unwrap()
            {
                Some(Ok(Message::Text(t))) => {
                    assert_eq!(t.as_str(), format!("w{i}"));
                    break;
                }
                Some(Ok(_)) => continue,
                other => panic!("witness lost: {other:?}"),
            }
        }
    }
    let mut clients = Vec::new();
    for t in storm {
        clients.push(t.await.unwrap().expect("every storm client gets in"));
    }
    // A client is registered after its 101 is written: the last one may be
    // connected on its side a moment before the gateway counts it.
    assert!(
        eventually(Duration::from_secs(5), || gw.gateway().client_count()
            == 401)
        .await,
        "{} clients registered",
        gw.gateway().client_count()
    );
    assert_eq!(gw.metric("edgegate_handshake_failures_total", ""), 0.0);
    assert_eq!(gw.metric("edgegate_clients_refused_total", ""), 0.0);
}

#[tokio::test]
async fn clients_beyond_max_clients_are_refused_at_accept_and_counted() {
    let service = ExampleService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .limit("max_clients", 3)
        .start()
        .await;
    let _held: Vec<_> = futures_util::future::join_all((0..3).map(|_| gw.connect("/echo"))).await;
    let refused = gw.try_connect("/echo", &[]).await;
    assert!(refused.is_err(), "fourth client refused");
    assert_eq!(gw.metric("edgegate_clients_refused_total", ""), 1.0);
    assert_eq!(gw.gateway().client_count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_accept_queue_shows_in_metrics() {
    let service = ExampleService::start().await;
    // One permit, held by a client that never starts TLS: the accept loop
    // waits, and the backlog of 1 overflows under more connections.
    let gw = GatewayBuilder::new(service.addr)
        .limit("handshake_permits", 1)
        .limit("handshake_timeout_secs", 30)
        .backlog(1)
        .start()
        .await;
    let mut idle = Vec::new();
    for _ in 0..64 {
        // Connect completes in the kernel while the accept queue has room;
        // after that SYNs are dropped: use a short timeout per attempt.
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(100), TcpStream::connect(gw.addr)).await
        {
            idle.push(s);
        }
    }
    let mut overflows = 0.0;
    eventually(Duration::from_secs(15), || {
        overflows = gw.metric("edgegate_listen_overflows_total", "");
        overflows > 0.0
    })
    .await;
    assert!(overflows > 0.0, "accept-queue overflow not counted");
}
