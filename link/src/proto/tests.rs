//! Codec tests: round trips, every malformed case, and random input.

use super::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn every_variant() -> Vec<Frame> {
    vec![
        Frame::Hello {
            version: PROTOCOL_VERSION,
            name: "gw-1".into(),
            max_frame_bytes: MAX_FRAME_BYTES as u32,
        },
        Frame::Ping { nonce: u64::MAX },
        Frame::Pong { nonce: 7 },
        Frame::Goaway {
            code: GOAWAY_NORMAL,
            reason: "draining".into(),
        },
        Frame::ClientOpen {
            client: 42,
            route: "/chat".into(),
            remote_addr: "203.0.113.9:51234".into(),
            claims: Bytes::from_static(br#"{"sub":"ana"}"#),
        },
        Frame::ClientMessage {
            client: 42,
            kind: Kind::Text,
            payload: Bytes::from_static("héllo".as_bytes()),
        },
        Frame::ClientMessage {
            client: 43,
            kind: Kind::Binary,
            payload: Bytes::new(),
        },
        Frame::ClientClose {
            client: 42,
            code: 1000,
            reason: String::new(),
        },
        Frame::Subscribe {
            client: 42,
            topic: "room".into(),
        },
        Frame::Unsubscribe {
            client: 42,
            topic: "room".into(),
        },
        Frame::Publish {
            topic: "room".into(),
            kind: Kind::Binary,
            payload: Bytes::from_static(&[0, 1, 2, 255]),
        },
    ]
}

fn encode(frame: &Frame) -> BytesMut {
    let mut buf = BytesMut::new();
    FrameCodec::default()
        .encode(frame, &mut buf)
        .expect("test frames encode");
    buf
}

/// A frame built by hand: length prefix computed from `type + body`.
fn raw(frame_type: u8, body: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u32(1 + body.len() as u32);
    buf.put_u8(frame_type);
    buf.put_slice(body);
    buf
}

fn decode_one(mut buf: BytesMut) -> Result<Option<Frame>, CodecError> {
    FrameCodec::default().decode(&mut buf)
}

fn expect_malformed(buf: BytesMut, frame_type: u8, what: &str) {
    match decode_one(buf) {
        Err(CodecError::Malformed {
            frame_type: t,
            what: w,
        }) => {
            assert_eq!(t, frame_type);
            assert_eq!(w, what);
        }
        other => panic!("expected malformed `{what}`, got {other:?}"),
    }
}

#[test]
fn every_variant_round_trips() {
    for frame in every_variant() {
        let mut buf = encode(&frame);
        let decoded = FrameCodec::default().decode(&mut buf).expect("decodes");
        assert_eq!(decoded.as_ref(), Some(&frame), "{}", frame.type_name());
        assert!(buf.is_empty(), "{} left bytes behind", frame.type_name());
    }
}

#[test]
fn frames_split_at_every_byte_decode_once_complete() {
    let mut stream = BytesMut::new();
    let frames = every_variant();
    for frame in &frames {
        stream.extend_from_slice(&encode(frame));
    }
    let mut codec = FrameCodec::default();
    let mut buf = BytesMut::new();
    let mut decoded = Vec::new();
    for byte in &stream {
        buf.put_u8(*byte);
        while let Some(frame) = codec.decode(&mut buf).expect("valid stream") {
            decoded.push(frame);
        }
    }
    assert_eq!(decoded, frames);
}

#[test]
fn encoding_matches_the_documented_layout() {
    let buf = encode(&Frame::ClientOpen {
        client: 1,
        route: "/e".into(),
        remote_addr: "a".into(),
        claims: Bytes::from_static(b"{}"),
    });
    let expected: &[u8] = &[
        0, 0, 0,
        22,   // length: type 1 + client 8 + route (2+2) + remote_addr (2+1) + claims (4+2)
        0x10, // type
        0, 0, 0, 0, 0, 0, 0, 1, // client
        0, 2, b'/', b'e', // route
        0, 1, b'a', // remote_addr
        0, 0, 0, 2, b'{', b'}', // claims
    ];
    assert_eq!(&buf[..], expected);

    let buf = encode(&Frame::Publish {
        topic: "t".into(),
        kind: Kind::Text,
        payload: Bytes::from_static(b"hi"),
    });
    assert_eq!(&buf[..], &[0, 0, 0, 7, 0x22, 0, 1, b't', 1, b'h', b'i']);
}

#[test]
fn payload_is_split_off_the_read_buffer_without_copying() {
    let mut buf = encode(&Frame::ClientMessage {
        client: 1,
        kind: Kind::Binary,
        payload: Bytes::from(vec![9u8; 64]),
    });
    let start = buf.as_ptr() as usize;
    let end = start + buf.len();
    let Some(Frame::ClientMessage { payload, .. }) =
        FrameCodec::default().decode(&mut buf).expect("decodes")
    else {
        panic!("expected a client message");
    };
    let at = payload.as_ptr() as usize;
    assert!(
        at >= start && at + payload.len() <= end,
        "payload was copied"
    );
}

#[test]
fn zero_length_is_malformed() {
    expect_malformed(BytesMut::from(&[0u8, 0, 0, 0][..]), 0, "length is zero");
}

#[test]
fn unknown_type_is_rejected() {
    assert!(matches!(
        decode_one(raw(0x7f, b"")),
        Err(CodecError::UnknownType(0x7f))
    ));
}

#[test]
fn frame_too_large_is_rejected_from_the_header_alone() {
    let mut codec = FrameCodec::new(1024);
    let mut buf = BytesMut::with_capacity(4);
    buf.put_u32(1025);
    let capacity = buf.capacity();
    match codec.decode(&mut buf) {
        Err(CodecError::FrameTooLarge {
            len: 1025,
            max: 1024,
        }) => {}
        other => panic!("expected frame too large, got {other:?}"),
    }
    assert_eq!(buf.capacity(), capacity, "buffer grew for a refused frame");

    let mut buf = BytesMut::new();
    buf.put_u32(u32::MAX);
    assert!(matches!(
        FrameCodec::default().decode(&mut buf),
        Err(CodecError::FrameTooLarge { .. })
    ));
}

#[test]
fn incomplete_frame_reserves_only_its_declared_length() {
    let mut buf = BytesMut::new();
    buf.put_u32(100);
    buf.put_u8(CLIENT_MESSAGE);
    assert!(FrameCodec::default()
        .decode(&mut buf)
        .expect("valid header")
        .is_none());
    assert!(buf.capacity() >= 104);
    assert!(buf.capacity() < 4096, "reserved {} bytes", buf.capacity());
}

#[test]
fn encoder_refuses_frames_above_the_cap_without_writing() {
    let mut codec = FrameCodec::new(16);
    let mut buf = BytesMut::new();
    let frame = Frame::ClientMessage {
        client: 1,
        kind: Kind::Binary,
        payload: Bytes::from(vec![0u8; 8]),
    };
    assert!(matches!(
        codec.encode(&frame, &mut buf),
        Err(CodecError::FrameTooLarge { len: 18, max: 16 })
    ));
    assert!(buf.is_empty());
}

#[test]
fn encoder_refuses_strings_longer_than_their_prefix() {
    let frame = Frame::Subscribe {
        client: 1,
        topic: "x".repeat(MAX_STRING_BYTES + 1),
    };
    let mut buf = BytesMut::new();
    assert!(matches!(
        FrameCodec::default().encode(frame, &mut buf),
        Err(CodecError::FieldTooLong { field: "topic", .. })
    ));
    assert!(buf.is_empty());
}

#[test]
fn truncated_fields_are_malformed() {
    expect_malformed(raw(HELLO, &[0]), HELLO, "truncated version");
    expect_malformed(raw(HELLO, &[0, 1, 0, 5, b'a']), HELLO, "truncated name");
    expect_malformed(raw(PING, &[0; 7]), PING, "truncated nonce");
    expect_malformed(raw(GOAWAY, &[0, 0, 0]), GOAWAY, "truncated reason");
    expect_malformed(raw(CLIENT_OPEN, &[0; 4]), CLIENT_OPEN, "truncated client");
    expect_malformed(
        raw(
            CLIENT_OPEN,
            &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9],
        ),
        CLIENT_OPEN,
        "truncated claims",
    );
    expect_malformed(
        raw(CLIENT_MESSAGE, &[0; 8]),
        CLIENT_MESSAGE,
        "truncated kind",
    );
    expect_malformed(raw(CLIENT_CLOSE, &[0; 9]), CLIENT_CLOSE, "truncated code");
    expect_malformed(raw(SUBSCRIBE, &[0; 9]), SUBSCRIBE, "truncated topic");
    expect_malformed(raw(PUBLISH, &[0, 1, b't']), PUBLISH, "truncated kind");
}

#[test]
fn trailing_bytes_after_fixed_fields_are_malformed() {
    for frame in every_variant() {
        if matches!(frame, Frame::ClientMessage { .. } | Frame::Publish { .. }) {
            continue;
        }
        let mut body = encode(&frame).split_off(5);
        body.put_u8(0);
        expect_malformed(
            raw(frame.frame_type(), &body),
            frame.frame_type(),
            "trailing bytes after the last field",
        );
    }
}

#[test]
fn invalid_utf8_is_malformed() {
    expect_malformed(
        raw(SUBSCRIBE, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 2, 0xc3, 0x28]),
        SUBSCRIBE,
        "topic is not utf-8",
    );
    expect_malformed(raw(HELLO, &[0, 1, 0, 1, 0xff]), HELLO, "name is not utf-8");
}

#[test]
fn unknown_message_kind_is_malformed() {
    expect_malformed(
        raw(CLIENT_MESSAGE, &[0, 0, 0, 0, 0, 0, 0, 1, 3, b'x']),
        CLIENT_MESSAGE,
        "unknown message kind",
    );
    expect_malformed(raw(PUBLISH, &[0, 0, 0]), PUBLISH, "unknown message kind");
}

#[test]
fn eof_in_the_middle_of_a_frame_is_an_error() {
    let mut buf = encode(&Frame::Ping { nonce: 1 });
    buf.truncate(6);
    assert!(matches!(
        FrameCodec::default().decode_eof(&mut buf),
        Err(CodecError::TruncatedAtEof { buffered: 6 })
    ));
    assert!(FrameCodec::default()
        .decode_eof(&mut BytesMut::new())
        .expect("clean eof")
        .is_none());
}

/// Decodes until the codec needs more bytes or fails; must never panic.
fn drain(codec: &mut FrameCodec, buf: &mut BytesMut) {
    while let Ok(Some(_)) = codec.decode(buf) {}
}

#[test]
fn random_bytes_never_panic_the_decoder() {
    let mut rng = StdRng::seed_from_u64(0x5eed_1111);
    for _ in 0..20_000 {
        let len = rng.random_range(0..64);
        let mut bytes = vec![0u8; len];
        rng.fill(&mut bytes[..]);
        // Bias the header towards small lengths and known types so the
        // body parsers get exercised, not only the header checks.
        if len >= 5 && rng.random_bool(0.8) {
            let declared = rng.random_range(1..=(len as u32 - 4) + 2);
            bytes[..4].copy_from_slice(&declared.to_be_bytes());
            let types = [
                HELLO,
                PING,
                PONG,
                GOAWAY,
                CLIENT_OPEN,
                CLIENT_MESSAGE,
                CLIENT_CLOSE,
                SUBSCRIBE,
                UNSUBSCRIBE,
                PUBLISH,
            ];
            bytes[4] = types[rng.random_range(0..types.len())];
        }
        let mut codec = FrameCodec::new(rng.random_range(0..128));
        drain(&mut codec, &mut BytesMut::from(&bytes[..]));
        let _ = codec.decode_eof(&mut BytesMut::from(&bytes[..]));
    }
}

#[test]
fn mutated_valid_frames_never_panic_the_decoder() {
    let mut rng = StdRng::seed_from_u64(0x5eed_2222);
    let frames = every_variant();
    for _ in 0..20_000 {
        let mut bytes = encode(&frames[rng.random_range(0..frames.len())]).to_vec();
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..bytes.len());
            match rng.random_range(0..3) {
                0 => bytes[at] = rng.random(),
                1 => bytes.truncate(at),
                _ => bytes.insert(at, rng.random()),
            }
            if bytes.is_empty() {
                break;
            }
        }
        drain(&mut FrameCodec::default(), &mut BytesMut::from(&bytes[..]));
    }
}

#[test]
fn random_valid_frames_round_trip() {
    let mut rng = StdRng::seed_from_u64(0x5eed_3333);
    let text = |rng: &mut StdRng| -> String {
        (0..rng.random_range(0..20))
            .map(|_| rng.random_range('a'..='ω'))
            .collect()
    };
    for _ in 0..2_000 {
        let mut payload = vec![0u8; rng.random_range(0..100)];
        rng.fill(&mut payload[..]);
        let kind = if rng.random() {
            Kind::Text
        } else {
            Kind::Binary
        };
        let frame = match rng.random_range(0..4) {
            0 => Frame::ClientOpen {
                client: rng.random(),
                route: text(&mut rng),
                remote_addr: text(&mut rng),
                claims: payload.into(),
            },
            1 => Frame::ClientMessage {
                client: rng.random(),
                kind,
                payload: payload.into(),
            },
            2 => Frame::ClientClose {
                client: rng.random(),
                code: rng.random(),
                reason: text(&mut rng),
            },
            _ => Frame::Publish {
                topic: text(&mut rng),
                kind,
                payload: payload.into(),
            },
        };
        let mut buf = encode(&frame);
        assert_eq!(
            FrameCodec::default().decode(&mut buf).expect("decodes"),
            Some(frame)
        );
    }
}

#[test]
fn type_names_are_snake_case() {
    let names: Vec<_> = every_variant().iter().map(Frame::type_name).collect();
    assert_eq!(
        names,
        [
            "hello",
            "ping",
            "pong",
            "goaway",
            "client_open",
            "client_message",
            "client_message",
            "client_close",
            "subscribe",
            "unsubscribe",
            "publish"
        ]
    );
}

#[test]
fn a_version_1_hello_decodes_with_no_frame_cap() {
    let mut buf = BytesMut::from(&[0u8, 0, 0, 5, HELLO, 0, 1, 0, 0][..]);
    let frame = FrameCodec::default().decode(&mut buf).unwrap().unwrap();
    assert_eq!(
        frame,
        Frame::Hello {
            version: 1,
            name: String::new(),
            max_frame_bytes: 0,
        }
    );
}

#[test]
fn a_hello_with_half_a_frame_cap_is_malformed() {
    let mut buf = BytesMut::from(&[0u8, 0, 0, 7, HELLO, 0, 2, 0, 0, 0, 1][..]);
    assert!(matches!(
        FrameCodec::default().decode(&mut buf),
        Err(CodecError::Malformed {
            what: "truncated max_frame_bytes",
            ..
        })
    ));
}

#[test]
fn the_frame_cap_for_messages_covers_a_publish_with_the_longest_topic() {
    assert_eq!(frame_cap_for_messages(1024), MAX_FRAME_BYTES);
    let max = 20 * 1024 * 1024;
    let publish = Frame::Publish {
        topic: "t".repeat(usize::from(u16::MAX)),
        kind: Kind::Binary,
        payload: Bytes::from(vec![0u8; max]),
    };
    assert_eq!(publish.wire_len().unwrap(), frame_cap_for_messages(max));
    let message = Frame::ClientMessage {
        client: 1,
        kind: Kind::Binary,
        payload: Bytes::from(vec![0u8; max]),
    };
    assert_eq!(message.wire_len().unwrap(), max + CLIENT_MESSAGE_OVERHEAD);
}

#[test]
fn the_largest_message_fills_the_largest_frame_a_u32_length_describes() {
    assert_eq!(frame_cap_for_messages(MAX_MESSAGE_BYTES), MAX_FRAME_LENGTH);
    assert_eq!(
        u32::try_from(frame_cap_for_messages(MAX_MESSAGE_BYTES)),
        Ok(u32::MAX)
    );
    assert!(frame_cap_for_messages(MAX_MESSAGE_BYTES + 1) > MAX_FRAME_LENGTH);
}
