//! The stream against tokio-tungstenite's client over in-memory pipes, one
//! byte at a time and in big chunks.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{duplex, AsyncWriteExt, DuplexStream};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::WsStream;

/// Every test finishes far within this; a hang fails instead of blocking.
const BOUND: Duration = Duration::from_secs(20);
const MAX: usize = 100_000;

/// A tungstenite client and our server over a pipe holding `pipe_bytes`.
async fn pair(pipe_bytes: usize) -> (WebSocketStream<DuplexStream>, WsStream<DuplexStream>) {
    let (client_io, server_io) = duplex(pipe_bytes);
    let client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
    (client, WsStream::new(server_io, Vec::new(), MAX))
}

async fn next(server: &mut WsStream<DuplexStream>) -> Option<Result<Message, WsError>> {
    timeout(BOUND, server.next()).await.expect("server read")
}

#[tokio::test]
async fn messages_are_echoed_through_a_pipe_of_any_width() {
    for pipe_bytes in [1, 7, 64 * 1024] {
        let (client, mut server) = pair(pipe_bytes).await;
        let big = Bytes::from(vec![7u8; 70_000]);
        let sent = vec![
            Message::text("héllo"),
            Message::Binary(big.clone()),
            Message::text(""),
        ];
        // The client writes and reads at once: a narrow pipe holds neither
        // the messages nor their echoes.
        let (mut tx, mut rx) = client.split();
        let writer = tokio::spawn(async move {
            for m in sent {
                tx.send(m).await.unwrap();
            }
            let fragments = [
                Frame::message("frag", OpCode::Data(Data::Text), false),
                Frame::message("mented", OpCode::Data(Data::Continue), true),
            ];
            for f in fragments {
                tx.send(Message::Frame(f)).await.unwrap();
            }
            tx
        });
        let reader = tokio::spawn(async move {
            let mut echoed = Vec::new();
            for _ in 0..4 {
                echoed.push(rx.next().await.unwrap().unwrap());
            }
            echoed
        });
        let mut received = Vec::new();
        for _ in 0..4 {
            let m = next(&mut server).await.unwrap().unwrap();
            timeout(BOUND, server.send(m.clone()))
                .await
                .unwrap()
                .unwrap();
            received.push(m);
        }
        let echoed = timeout(BOUND, reader).await.unwrap().unwrap();
        drop(timeout(BOUND, writer).await.unwrap().unwrap());
        let expected = [
            Message::text("héllo"),
            Message::Binary(big),
            Message::text(""),
            Message::text("fragmented"),
        ];
        assert_eq!(received, expected, "pipe of {pipe_bytes}");
        assert_eq!(echoed, expected, "pipe of {pipe_bytes}");
        assert_eq!(server.held_bytes(), 0, "pipe of {pipe_bytes}");
    }
}

#[tokio::test]
async fn a_ping_is_answered_with_a_pong() {
    let (mut client, mut server) = pair(1024).await;
    client
        .send(Message::Ping(Bytes::from_static(b"hi")))
        .await
        .unwrap();
    assert_eq!(
        next(&mut server).await.unwrap().unwrap(),
        Message::Ping(Bytes::from_static(b"hi"))
    );
    server.flush().await.unwrap();
    let answer = timeout(BOUND, client.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(answer, Message::Pong(Bytes::from_static(b"hi")));
}

#[tokio::test]
async fn a_close_replaces_the_pong_owed() {
    let (mut client, mut server) = pair(1024).await;
    client
        .send(Message::Ping(Bytes::from_static(b"hi")))
        .await
        .unwrap();
    assert!(matches!(
        next(&mut server).await,
        Some(Ok(Message::Ping(_)))
    ));
    let frame = CloseFrame {
        code: CloseCode::Policy,
        reason: "too many control frames".into(),
    };
    timeout(BOUND, server.send(Message::Close(Some(frame.clone()))))
        .await
        .unwrap()
        .unwrap();
    let answer = timeout(BOUND, client.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(answer, Message::Close(Some(frame)));
}

#[tokio::test]
async fn a_client_close_is_answered_with_its_code() {
    let (mut client, mut server) = pair(1024).await;
    client
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "done".into(),
        })))
        .await
        .unwrap();
    let Some(Ok(Message::Close(Some(frame)))) = next(&mut server).await else {
        panic!("expected a close frame");
    };
    assert_eq!(u16::from(frame.code), 1000);
    assert_eq!(frame.reason.as_str(), "done");
    timeout(BOUND, server.close()).await.unwrap().unwrap();
    let answer = timeout(BOUND, client.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Message::Close(Some(frame)) = answer else {
        panic!("expected a close answer, got {answer:?}");
    };
    assert_eq!(frame.code, CloseCode::Normal);
    assert!(next(&mut server).await.is_none());
    assert!(server.send(Message::text("late")).await.is_err());
}

#[tokio::test]
async fn a_server_close_carries_its_code_and_reason() {
    let (mut client, mut server) = pair(1024).await;
    let frame = CloseFrame {
        code: CloseCode::from(4408),
        reason: "heartbeat timeout".into(),
    };
    server
        .send(Message::Close(Some(frame.clone())))
        .await
        .unwrap();
    let answer = timeout(BOUND, client.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(answer, Message::Close(Some(frame)));
}

#[tokio::test]
async fn broken_frames_map_to_the_errors_the_session_closes_on() {
    // Unmasked text: a protocol error (1002).
    let (mut raw, server_io) = duplex(1024);
    let mut server = WsStream::new(server_io, Vec::new(), MAX);
    raw.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
    assert!(matches!(
        next(&mut server).await,
        Some(Err(WsError::Protocol(_)))
    ));

    // Over the limit: a capacity error (1009), on the header alone.
    let (mut raw, server_io) = duplex(1024);
    let mut server = WsStream::new(server_io, Vec::new(), 10);
    raw.write_all(&[0x82, 0x80 | 11, 1, 2, 3, 4]).await.unwrap();
    assert!(matches!(
        next(&mut server).await,
        Some(Err(WsError::Capacity(_)))
    ));

    // Text that is not UTF-8: a UTF-8 error (1007).
    let (mut raw, server_io) = duplex(1024);
    let mut server = WsStream::new(server_io, Vec::new(), MAX);
    raw.write_all(&[0x81, 0x81, 0, 0, 0, 0, 0xFF])
        .await
        .unwrap();
    assert!(matches!(
        next(&mut server).await,
        Some(Err(WsError::Utf8(_)))
    ));
}

#[tokio::test]
async fn frames_sent_with_the_request_are_read_first() {
    let (mut raw, server_io) = duplex(1024);
    // "hi" masked with a zero key, then "yo" on the wire.
    let rest = vec![0x81, 0x82, 0, 0, 0, 0, b'h', b'i'];
    let mut server = WsStream::new(server_io, rest, MAX);
    raw.write_all(&[0x81, 0x82, 0, 0, 0, 0, b'y', b'o'])
        .await
        .unwrap();
    assert_eq!(
        next(&mut server).await.unwrap().unwrap(),
        Message::text("hi")
    );
    assert_eq!(
        next(&mut server).await.unwrap().unwrap(),
        Message::text("yo")
    );
    assert_eq!(server.held_bytes(), 0);
    drop(raw);
    assert!(next(&mut server).await.is_none(), "eof ends the stream");
}
