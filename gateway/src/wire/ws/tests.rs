//! The codec against hand-built frames for every rule, against tungstenite's
//! client (its frames decoded by ours, ours read by it), and against random
//! messages cut into random reads. Every hand-built input is decoded whole
//! and cut into reads of 1, 2, 3, 5 and 13 bytes, and must give the same
//! outcome every way.

use std::io::{self, Cursor, Read, Write};

use bytes::Bytes;
use proptest::prelude::*;
use tokio_tungstenite::tungstenite::protocol::frame::coding::OpCode as TungOpCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data};
use tokio_tungstenite::tungstenite::protocol::frame::Frame as TungFrame;
use tokio_tungstenite::tungstenite::protocol::{
    CloseFrame as TungCloseFrame, Role, WebSocket, WebSocketConfig,
};
use tokio_tungstenite::tungstenite::Message as TungMessage;

use super::*;

/// The message limit of most tests.
const MAX: usize = 100_000;
const KEY: [u8; 4] = [0x37, 0xFA, 0x21, 0x3D];

/// How a test frame writes its payload length.
#[derive(Debug, Clone, Copy)]
enum Len {
    /// The shortest form, as a correct client writes it.
    Shortest,
    /// The 16-bit form whatever the length.
    Bits16,
    /// The 64-bit form whatever the length.
    Bits64,
    /// This value in the 64-bit form, whatever the payload.
    Raw64(u64),
}

/// A client frame with first byte `b0` (FIN, RSV, opcode), its length
/// written as `len`, masked with `key` (unmasked when `None`).
fn raw_frame(b0: u8, payload: &[u8], len: Len, key: Option<[u8; 4]>) -> Vec<u8> {
    let mask_bit = if key.is_some() { 0x80 } else { 0 };
    let mut out = vec![b0];
    match (len, payload.len()) {
        (Len::Shortest, n @ 0..=125) => out.push(mask_bit | n as u8),
        (Len::Shortest, n @ 126..=0xFFFF) | (Len::Bits16, n) => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        (Len::Shortest | Len::Bits64, n) => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
        (Len::Raw64(n), _) => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
    match key {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A correct client frame.
fn frame(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
    raw_frame(first_byte(opcode, fin), payload, Len::Shortest, Some(KEY))
}

fn first_byte(opcode: OpCode, fin: bool) -> u8 {
    (u8::from(fin) << 7) | opcode as u8
}

/// What decoding an input produced: its messages, then the error that ended
/// it, if one did.
#[derive(Debug, PartialEq)]
struct Outcome {
    messages: Vec<Message>,
    error: Option<DecodeError>,
}

/// Decodes `input` cut into reads of `chunk` bytes.
fn feed(dec: &mut Decoder, input: &[u8], chunk: usize) -> Outcome {
    let mut messages = Vec::new();
    for piece in input.chunks(chunk.max(1)) {
        let mut rest = piece;
        loop {
            match dec.decode(&mut rest) {
                Ok(Some(message)) => messages.push(message),
                Ok(None) => break,
                Err(error) => {
                    return Outcome {
                        messages,
                        error: Some(error),
                    }
                }
            }
        }
        assert!(rest.is_empty(), "Ok(None) leaves input behind");
    }
    Outcome {
        messages,
        error: None,
    }
}

/// Decodes `input` whole and cut every way; all must agree.
fn decode_with(input: &[u8], max: usize) -> Outcome {
    let whole = feed(&mut Decoder::new(max), input, input.len());
    for chunk in [1, 2, 3, 5, 13] {
        let cut = feed(&mut Decoder::new(max), input, chunk);
        assert_eq!(cut, whole, "reads of {chunk} bytes differ from one read");
    }
    whole
}

fn decode(input: &[u8]) -> Outcome {
    decode_with(input, MAX)
}

fn messages(messages: Vec<Message>) -> Outcome {
    Outcome {
        messages,
        error: None,
    }
}

fn refused(error: DecodeError) -> Outcome {
    Outcome {
        messages: Vec::new(),
        error: Some(error),
    }
}

fn text(s: &str) -> Message {
    Message::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn binary(b: &[u8]) -> Message {
    Message::Binary(Bytes::copy_from_slice(b))
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// `n` bytes of a repeating pattern.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

#[test]
fn a_masked_text_frame_is_a_text_message() {
    assert_eq!(
        decode(&frame(OpCode::Text, true, b"hello")),
        messages(vec![text("hello")])
    );
}

#[test]
fn empty_messages_are_messages() {
    let mut input = frame(OpCode::Text, true, b"");
    input.extend(frame(OpCode::Binary, true, b""));
    input.extend(frame(OpCode::Ping, true, b""));
    assert_eq!(
        decode(&input),
        messages(vec![text(""), binary(b""), Message::Ping(Bytes::new())])
    );
}

#[test]
fn lengths_of_every_form_are_decoded() {
    for n in [1, 125, 126, 127, 0xFFFF, 0x1_0000, 70_000] {
        let payload = pattern(n);
        assert_eq!(
            decode(&frame(OpCode::Binary, true, &payload)),
            messages(vec![binary(&payload)]),
            "{n} bytes"
        );
    }
}

#[test]
fn fragments_are_assembled_around_control_frames() {
    let mut input = frame(OpCode::Text, false, b"Hel");
    input.extend(frame(OpCode::Ping, true, b"p1"));
    input.extend(frame(OpCode::Continuation, false, b"lo, "));
    input.extend(frame(OpCode::Pong, true, b""));
    input.extend(frame(OpCode::Continuation, false, b""));
    input.extend(frame(OpCode::Continuation, true, b"world"));
    input.extend(frame(OpCode::Binary, true, b"\xFF\x00"));
    assert_eq!(
        decode(&input),
        messages(vec![
            Message::Ping(Bytes::from_static(b"p1")),
            Message::Pong(Bytes::new()),
            text("Hello, world"),
            binary(b"\xFF\x00"),
        ])
    );
}

#[test]
fn a_code_point_cut_by_fragments_is_accepted() {
    // "€uro": the euro sign's three bytes in three fragments.
    let mut input = frame(OpCode::Text, false, b"\xE2");
    input.extend(frame(OpCode::Continuation, false, b"\x82"));
    input.extend(frame(OpCode::Continuation, true, b"\xACuro"));
    assert_eq!(decode(&input), messages(vec![text("€uro")]));
}

#[test]
fn invalid_utf8_fails_before_its_message_ends() {
    // A valid fragment, then one holding a surrogate (ED A0 80); the last
    // fragment never comes.
    let mut input = frame(OpCode::Text, false, "κόσμε".as_bytes());
    input.extend(frame(OpCode::Continuation, false, b"\xED\xA0\x80edited"));
    assert_eq!(decode(&input), refused(DecodeError::InvalidUtf8));

    // Inside one frame: refused at the bad byte, the rest not yet sent.
    let whole = frame(OpCode::Text, true, b"abc\xFFdefghijklmnop");
    let header = 6;
    assert_eq!(
        decode(&whole[..header + 4]),
        refused(DecodeError::InvalidUtf8)
    );
}

#[test]
fn a_code_point_cut_at_the_end_of_a_message_is_invalid() {
    let outcome = decode(&frame(OpCode::Text, true, b"a\xE2\x82"));
    assert_eq!(outcome, refused(DecodeError::InvalidUtf8));
    assert_eq!(DecodeError::InvalidUtf8.close_code(), 1007);

    let mut input = frame(OpCode::Text, false, b"a\xE2\x82");
    input.extend(frame(OpCode::Continuation, true, b""));
    assert_eq!(decode(&input), refused(DecodeError::InvalidUtf8));
}

#[test]
fn binary_messages_are_not_checked_as_utf8() {
    let mut input = frame(OpCode::Binary, false, b"\xFF\xE2");
    input.extend(frame(OpCode::Continuation, true, b"\xC0"));
    assert_eq!(decode(&input), messages(vec![binary(b"\xFF\xE2\xC0")]));
}

#[test]
fn an_unmasked_frame_is_refused() {
    let input = raw_frame(0x81, b"hello", Len::Shortest, None);
    assert_eq!(decode(&input), refused(DecodeError::Unmasked));
    assert_eq!(DecodeError::Unmasked.close_code(), 1002);
}

#[test]
fn reserved_bits_are_refused_without_an_extension() {
    for rsv in [0x40, 0x20, 0x10, 0x70] {
        let input = raw_frame(0x81 | rsv, b"hello", Len::Shortest, Some(KEY));
        assert_eq!(
            decode(&input),
            refused(DecodeError::ReservedBits),
            "{rsv:#x}"
        );
    }
}

#[test]
fn reserved_opcodes_are_refused() {
    for op in (0x3..=0x7).chain(0xB..=0xF) {
        let input = raw_frame(0x80 | op, b"", Len::Shortest, Some(KEY));
        assert_eq!(
            decode(&input),
            refused(DecodeError::ReservedOpcode(op)),
            "{op:#x}"
        );
    }
}

#[test]
fn lengths_not_in_their_shortest_form_are_refused() {
    for (n, len) in [
        (0, Len::Bits16),
        (125, Len::Bits16),
        (126, Len::Bits64),
        (0xFFFF, Len::Bits64),
    ] {
        let input = raw_frame(0x82, &pattern(n), len, Some(KEY));
        assert_eq!(
            decode(&input),
            refused(DecodeError::NonMinimalLength),
            "{n} bytes as {len:?}"
        );
    }
    // The shortest forms of the same lengths pass.
    let input = raw_frame(0x82, &pattern(126), Len::Bits16, Some(KEY));
    assert_eq!(decode(&input), messages(vec![binary(&pattern(126))]));
}

#[test]
fn a_64_bit_length_with_its_top_bit_set_is_refused() {
    let input = raw_frame(0x82, b"", Len::Raw64(1 << 63), Some(KEY));
    assert_eq!(decode(&input), refused(DecodeError::LengthTopBit));
    let input = raw_frame(0x82, b"", Len::Raw64(u64::MAX), Some(KEY));
    assert_eq!(decode(&input), refused(DecodeError::LengthTopBit));
}

#[test]
fn control_frames_over_125_bytes_are_refused() {
    for op in [OpCode::Ping, OpCode::Pong, OpCode::Close] {
        let mut payload = pattern(126);
        payload[..2].copy_from_slice(&1000u16.to_be_bytes());
        let input = raw_frame(first_byte(op, true), &payload, Len::Shortest, Some(KEY));
        assert_eq!(
            decode(&input),
            refused(DecodeError::ControlTooLong),
            "{op:?}"
        );
    }
    // 125 is the most a control frame may carry.
    let input = frame(OpCode::Ping, true, &pattern(125));
    assert_eq!(
        decode(&input),
        messages(vec![Message::Ping(pattern(125).into())])
    );
}

#[test]
fn fragmented_control_frames_are_refused() {
    for op in [OpCode::Ping, OpCode::Pong, OpCode::Close] {
        let input = frame(op, false, b"");
        assert_eq!(
            decode(&input),
            refused(DecodeError::FragmentedControl),
            "{op:?}"
        );
    }
}

#[test]
fn a_continuation_outside_a_message_is_refused() {
    let input = frame(OpCode::Continuation, true, b"x");
    assert_eq!(decode(&input), refused(DecodeError::UnexpectedContinuation));

    let mut input = frame(OpCode::Text, true, b"done");
    input.extend(frame(OpCode::Continuation, true, b"x"));
    assert_eq!(
        decode(&input),
        Outcome {
            messages: vec![text("done")],
            error: Some(DecodeError::UnexpectedContinuation),
        }
    );
}

#[test]
fn a_new_message_inside_a_fragmented_one_is_refused() {
    for op in [OpCode::Text, OpCode::Binary] {
        let mut input = frame(OpCode::Text, false, b"start");
        input.extend(frame(op, true, b"again"));
        assert_eq!(
            decode(&input),
            refused(DecodeError::UnfinishedMessage),
            "{op:?}"
        );
    }
}

#[test]
fn close_frames_are_parsed() {
    assert_eq!(
        decode(&frame(OpCode::Close, true, b"")),
        messages(vec![Message::Close(None)])
    );
    assert_eq!(
        decode(&frame(OpCode::Close, true, &1000u16.to_be_bytes())),
        messages(vec![close(1000, "")])
    );
    let mut payload = 4000u16.to_be_bytes().to_vec();
    payload.extend_from_slice("au revoir, ça va".as_bytes());
    assert_eq!(
        decode(&frame(OpCode::Close, true, &payload)),
        messages(vec![close(4000, "au revoir, ça va")])
    );
}

#[test]
fn close_codes_allowed_on_the_wire_are_accepted() {
    for code in (1000u16..=1003)
        .chain(1007..=1014)
        .chain([3000, 3999, 4000, 4999])
    {
        let input = frame(OpCode::Close, true, &code.to_be_bytes());
        assert_eq!(decode(&input), messages(vec![close(code, "")]), "{code}");
    }
}

#[test]
fn close_codes_not_allowed_on_the_wire_are_refused() {
    for code in [
        0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ] {
        let input = frame(OpCode::Close, true, &code.to_be_bytes());
        assert_eq!(
            decode(&input),
            refused(DecodeError::InvalidCloseCode(code)),
            "{code}"
        );
        assert_eq!(DecodeError::InvalidCloseCode(code).close_code(), 1002);
    }
}

#[test]
fn a_close_frame_of_one_byte_is_refused() {
    let input = frame(OpCode::Close, true, b"\x03");
    assert_eq!(decode(&input), refused(DecodeError::CloseTooShort));
}

#[test]
fn a_close_reason_that_is_not_utf8_is_refused() {
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"\xCE\xBA\xE1\xBD\xB9\xED\xA0\x80");
    let input = frame(OpCode::Close, true, &payload);
    assert_eq!(decode(&input), refused(DecodeError::CloseReasonNotUtf8));
    assert_eq!(DecodeError::CloseReasonNotUtf8.close_code(), 1007);
}

#[test]
fn input_after_a_close_frame_is_ignored() {
    let mut input = frame(OpCode::Close, true, &1000u16.to_be_bytes());
    input.extend(frame(OpCode::Text, true, b"late"));
    input.extend(raw_frame(0x81, b"unmasked", Len::Shortest, None));
    assert_eq!(decode(&input), messages(vec![close(1000, "")]));

    let mut dec = Decoder::new(MAX);
    let mut rest = &input[..];
    assert!(matches!(dec.decode(&mut rest), Ok(Some(Message::Close(_)))));
    assert!(dec.is_ended());
    assert_eq!(dec.decode(&mut rest), Ok(None));
    assert!(rest.is_empty());
}

#[test]
fn a_close_inside_a_fragmented_message_ends_it() {
    let mut dec = Decoder::new(MAX);
    let mut input = frame(OpCode::Binary, false, &pattern(500));
    input.extend(frame(OpCode::Close, true, &1001u16.to_be_bytes()));
    assert_eq!(
        feed(&mut dec, &input, input.len()),
        messages(vec![close(1001, "")])
    );
    assert_eq!(dec.held_bytes(), 0);
}

#[test]
fn a_message_over_the_limit_is_refused_on_its_header() {
    let max = 100;
    assert_eq!(
        decode_with(&frame(OpCode::Binary, true, &pattern(max)), max),
        messages(vec![binary(&pattern(max))])
    );
    let over = frame(OpCode::Binary, true, &pattern(max + 1));
    // The header alone (2 bytes and the mask) is refused: nothing buffered.
    let mut dec = Decoder::new(max);
    assert_eq!(
        feed(&mut dec, &over[..6], 1),
        refused(DecodeError::MessageTooBig)
    );
    assert_eq!(dec.held_bytes(), 0);
    assert_eq!(DecodeError::MessageTooBig.close_code(), 1009);

    let huge = raw_frame(0x82, b"", Len::Raw64(1 << 40), Some(KEY));
    assert_eq!(decode_with(&huge, max), refused(DecodeError::MessageTooBig));
}

#[test]
fn the_limit_applies_to_the_assembled_message() {
    let max = 100;
    let mut fits = frame(OpCode::Text, false, &[b'a'; 60]);
    fits.extend(frame(OpCode::Ping, true, &pattern(100)));
    fits.extend(frame(OpCode::Continuation, true, &[b'b'; 40]));
    let expected = format!("{}{}", "a".repeat(60), "b".repeat(40));
    assert_eq!(
        decode_with(&fits, max),
        messages(vec![Message::Ping(pattern(100).into()), text(&expected)])
    );

    let mut over = frame(OpCode::Text, false, &[b'a'; 60]);
    over.extend(frame(OpCode::Continuation, false, &[b'b'; 41]));
    assert_eq!(decode_with(&over, max), refused(DecodeError::MessageTooBig));
}

#[test]
fn nothing_is_held_between_messages() {
    let mut dec = Decoder::new(MAX);
    let mut input = frame(OpCode::Text, false, b"part one, ");
    input.extend(frame(OpCode::Ping, true, b"ping"));
    input.extend(frame(OpCode::Continuation, true, b"part two"));
    input.extend(frame(OpCode::Binary, true, &pattern(5000)));
    let outcome = feed(&mut dec, &input, 7);
    assert_eq!(outcome.messages.len(), 3);
    assert_eq!(outcome.error, None);
    assert_eq!(dec.held_bytes(), 0);
}

#[test]
fn a_frame_cut_by_reads_holds_no_more_than_its_length() {
    let payload = pattern(1000);
    let input = frame(OpCode::Binary, true, &payload);
    let mut dec = Decoder::new(MAX);
    let (first, second) = input.split_at(input.len() / 2);
    let mut held = 0;
    for byte in first.chunks(1) {
        assert_eq!(dec.decode(&mut &byte[..]), Ok(None));
        held = held.max(dec.held_bytes());
    }
    assert!(held > 0 && held <= payload.len(), "held {held}");
    let mut rest = second;
    assert_eq!(dec.decode(&mut rest), Ok(Some(binary(&payload))));
    assert_eq!(dec.held_bytes(), 0);
}

#[test]
fn a_decoder_stays_small() {
    // Per client, for as long as it is connected: the header being read,
    // the frame being received and two empty buffers. Measured: 104 bytes.
    assert!(
        std::mem::size_of::<Decoder>() <= 104,
        "{} bytes",
        std::mem::size_of::<Decoder>()
    );
}

#[test]
fn server_headers_use_the_shortest_length() {
    let cases: [(usize, &[u8]); 6] = [
        (0, &[0x81, 0]),
        (125, &[0x81, 125]),
        (126, &[0x81, 126, 0, 126]),
        (0xFFFF, &[0x81, 126, 0xFF, 0xFF]),
        (0x1_0000, &[0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
        (1 << 40, &[0x81, 127, 0, 0, 1, 0, 0, 0, 0, 0]),
    ];
    for (len, bytes) in cases {
        assert_eq!(Header::new(OpCode::Text, true, len).as_bytes(), bytes);
    }
    assert_eq!(
        Header::new(OpCode::Continuation, false, 3).as_bytes(),
        [0x00, 3]
    );
    assert_eq!(&encode(OpCode::Binary, b"ab")[..], [0x82, 2, b'a', b'b']);
}

#[test]
fn a_close_reason_is_cut_on_a_character_boundary() {
    let long = "é".repeat(100);
    let frame = encode_close(1001, &long);
    assert_eq!(frame[1] as usize, 2 + 122);
    assert_eq!(&frame[2..4], 1001u16.to_be_bytes());
    assert!(long.as_bytes().starts_with(&frame[4..]));
}

#[test]
#[should_panic(expected = "control frame payload over 125 bytes")]
fn a_control_frame_over_125_bytes_cannot_be_encoded() {
    let _ = encode(OpCode::Ping, &pattern(126));
}

/// A byte stream for tungstenite: reads from `input`, writes to `output`.
#[derive(Default)]
struct Pipe {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn frames_from_tungstenites_client_are_decoded() {
    let mut client = WebSocket::from_raw_socket(Pipe::default(), Role::Client, None);
    let big = pattern(70_000);
    let sent = [
        TungMessage::text("héllo"),
        TungMessage::binary(big.clone()),
        TungMessage::Ping(Bytes::from_static(b"are you there")),
        TungMessage::Frame(TungFrame::message(
            "frag",
            TungOpCode::Data(Data::Text),
            false,
        )),
        TungMessage::Pong(Bytes::from_static(b"unsolicited")),
        TungMessage::Frame(TungFrame::message(
            "mented",
            TungOpCode::Data(Data::Continue),
            true,
        )),
        TungMessage::Close(Some(TungCloseFrame {
            code: CloseCode::Away,
            reason: "bye".into(),
        })),
    ];
    for message in sent {
        client.write(message).unwrap();
    }
    client.flush().unwrap();
    let wire = &client.get_ref().output;
    assert_eq!(
        decode(wire),
        messages(vec![
            text("héllo"),
            binary(&big),
            Message::Ping(Bytes::from_static(b"are you there")),
            Message::Pong(Bytes::from_static(b"unsolicited")),
            text("fragmented"),
            close(1001, "bye"),
        ])
    );
}

#[test]
fn tungstenites_client_reads_our_frames() {
    let big = pattern(70_000);
    let mut wire = Vec::new();
    wire.extend_from_slice(&encode(OpCode::Text, "héllo".as_bytes()));
    wire.extend_from_slice(&encode(OpCode::Binary, &big));
    wire.extend_from_slice(&encode(OpCode::Ping, b"ping"));
    wire.extend_from_slice(&encode(OpCode::Pong, b""));
    wire.extend_from_slice(Header::new(OpCode::Text, false, 3).as_bytes());
    wire.extend_from_slice(b"one");
    wire.extend_from_slice(Header::new(OpCode::Continuation, true, 4).as_bytes());
    wire.extend_from_slice(b" two");
    wire.extend_from_slice(&encode_close(1001, "gateway draining"));
    let pipe = Pipe {
        input: Cursor::new(wire),
        output: Vec::new(),
    };
    let config = WebSocketConfig::default().max_message_size(Some(MAX));
    let mut client = WebSocket::from_raw_socket(pipe, Role::Client, Some(config));
    let mut received = Vec::new();
    for _ in 0..6 {
        received.push(client.read().unwrap());
    }
    assert_eq!(
        received,
        [
            TungMessage::text("héllo"),
            TungMessage::binary(big),
            TungMessage::Ping(Bytes::from_static(b"ping")),
            TungMessage::Pong(Bytes::new()),
            TungMessage::text("one two"),
            TungMessage::Close(Some(TungCloseFrame {
                code: CloseCode::Away,
                reason: "gateway draining".into(),
            })),
        ]
    );
}

/// A random message as a client might send it: text or binary, cut into
/// fragments at random byte offsets (code points included), with control
/// frames between the fragments.
#[derive(Debug, Clone)]
struct Sent {
    text: bool,
    payload: Vec<u8>,
    /// Fragment ends, as fractions of the payload (sorted).
    cuts: Vec<u8>,
    /// A ping sent before each fragment but the first.
    pings: Vec<Vec<u8>>,
}

fn sent() -> impl Strategy<Value = Sent> {
    let payload = prop_oneof![
        ".{0,200}".prop_map(|s: String| (true, s.into_bytes())),
        proptest::collection::vec(any::<u8>(), 0..400).prop_map(|b| (false, b)),
    ];
    (
        payload,
        proptest::collection::vec(any::<u8>(), 0..4),
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..126), 0..4),
    )
        .prop_map(|((text, payload), mut cuts, pings)| {
            cuts.sort_unstable();
            Sent {
                text,
                payload,
                cuts,
                pings,
            }
        })
}

/// `sent` as client frames masked with `key` (headers from [`Header`]), and
/// the messages they must decode to.
fn client_frames(sent: &[Sent], key: [u8; 4]) -> (Vec<u8>, Vec<Message>) {
    let mut wire = Vec::new();
    let mut expected = Vec::new();
    let mut put = |opcode, fin, payload: &[u8]| {
        let mut header = Header::new(opcode, fin, payload.len()).as_bytes().to_vec();
        header[1] |= 0x80;
        wire.extend_from_slice(&header);
        wire.extend_from_slice(&key);
        wire.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    };
    for s in sent {
        let mut bounds: Vec<usize> = s
            .cuts
            .iter()
            .map(|&c| s.payload.len() * usize::from(c) / 255)
            .collect();
        bounds.push(s.payload.len());
        let mut start = 0;
        for (i, &end) in bounds.iter().enumerate() {
            if i > 0 {
                if let Some(ping) = s.pings.get(i - 1) {
                    put(OpCode::Ping, true, ping);
                    expected.push(Message::Ping(Bytes::copy_from_slice(ping)));
                }
            }
            let opcode = match (i, s.text) {
                (0, true) => OpCode::Text,
                (0, false) => OpCode::Binary,
                _ => OpCode::Continuation,
            };
            put(opcode, i + 1 == bounds.len(), &s.payload[start..end]);
            start = end;
        }
        let payload = Bytes::copy_from_slice(&s.payload);
        expected.push(if s.text {
            Message::Text(payload)
        } else {
            Message::Binary(payload)
        });
    }
    (wire, expected)
}

proptest! {
    #[test]
    fn random_messages_in_random_reads_are_decoded(
        sent in proptest::collection::vec(sent(), 1..6),
        key in any::<[u8; 4]>(),
        chunk in 1usize..64,
    ) {
        let (wire, expected) = client_frames(&sent, key);
        let mut dec = Decoder::new(MAX);
        prop_assert_eq!(feed(&mut dec, &wire, chunk), messages(expected));
        prop_assert_eq!(dec.held_bytes(), 0);
    }

    #[test]
    fn any_bytes_decode_the_same_in_any_reads(
        wire in proptest::collection::vec(any::<u8>(), 0..300),
        chunk in 1usize..16,
    ) {
        let whole = feed(&mut Decoder::new(1000), &wire, wire.len());
        prop_assert_eq!(feed(&mut Decoder::new(1000), &wire, chunk), whole);
    }
}
