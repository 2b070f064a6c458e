//! The server side of RFC 6455 WebSocket framing: a decoder that holds no
//! buffer while its client is idle, and an encoder whose frames are shared
//! `Bytes`.
//!
//! # Why it is written by hand
//! The per-client budget (an idle client holds no I/O buffer) and the
//! fan-out design (a publish is encoded, and later compressed, once for every
//! subscriber) need both from the WebSocket layer, and no maintained crate
//! gives both (latest versions, checked for issue 30):
//!
//! | crate | permessage-deflate | shared pre-encoded frame | buffer while idle |
//! |---|---|---|---|
//! | tungstenite 0.30 | no (an RSV1 frame is refused) | no | read buffer allocated up front (256 B here, 128 KiB default) |
//! | tokio-websockets 0.13 | no | uncompressed `Bytes` only | 8 KiB, fixed |
//! | fastwebsockets 0.10 | no | no | 8 KiB, fixed |
//! | yawc 0.5 | yes, both `no_context_takeover` | no (compressed flag crate-private) | ≥ 1 KiB each way |
//! | soketto 0.8 | yes, fresh state per message | no | futures-io |
//!
//! Framing is small and fully specified, so the codec is ours: the caller
//! reads from the socket into a scratch buffer of its worker thread (as
//! [`lean_tls`](super::lean_tls) does for ciphertext) and hands the bytes to
//! [`Decoder::decode`]; only what must survive stays with the client.
//!
//! # What is built so far
//! The decoder and the frame encoder, with their tests, and a client stream
//! on them ([`ws_stream`](super::ws_stream): pongs, the close handshake and
//! writes are its job, not this module's) that a listener picks with
//! `ws_codec = "edgegate"`; tungstenite stays the default. Still to come
//! (issue 30): the Autobahn conformance run, outbound queues of frames
//! encoded once per publish (today the stream encodes each message per
//! client, as tungstenite does), then permessage-deflate. Until deflate is
//! negotiated a frame with any RSV bit set is refused.
//!
//! # What a client holds
//! A [`Decoder`] keeps, between calls, only:
//! - the header bytes of a frame whose header is not whole yet (inline, at
//!   most [`MAX_CLIENT_HEADER`] bytes);
//! - the data message being assembled (its fragments so far), grown only as
//!   its bytes arrive, never beyond `max_message_bytes`;
//! - the payload of a control frame cut by a read (at most 125 bytes).
//!
//! Both buffers are handed on or freed when their message completes, so an
//! idle client holds no heap at all ([`Decoder::held_bytes`] is 0).
//!
//! # The rules, and the close code for breaking each
//! Checked as soon as the bytes that break them arrive, so the result does
//! not depend on how the bytes were cut into reads (a test feeds every frame
//! one byte at a time and whole):
//! - 1002 ([`DecodeError::close_code`]): an unmasked frame; RSV bits without
//!   a negotiated extension; a reserved opcode; a length not in its shortest
//!   form, or a 64-bit length with its top bit set; a control frame longer
//!   than 125 bytes or fragmented; a continuation outside a message, or a new
//!   message inside one; a close frame with a 1-byte payload or a code not
//!   allowed on the wire (RFC 6455 7.4).
//! - 1007: a text message that is not UTF-8, found at the first byte that
//!   cannot start or continue a valid sequence (a code point cut by a
//!   fragment or a read is waited for); a close reason that is not UTF-8.
//! - 1009: a data message longer than `max_message_bytes`, refused on the
//!   header of the frame that would pass it, before any of its payload is
//!   buffered.

use std::mem;
use std::str;

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

/// Longest control frame payload (RFC 6455 5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;
/// Longest close reason: a control payload minus the 2-byte code.
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;
/// Longest client frame header: 2 bytes, an 8-byte length, a 4-byte mask.
pub const MAX_CLIENT_HEADER: usize = 14;
/// Longest server frame header: 2 bytes and an 8-byte length (no mask).
pub const MAX_SERVER_HEADER: usize = 10;

/// The frame opcodes RFC 6455 defines; every other value is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl OpCode {
    fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    /// Close, ping and pong: at most 125 bytes, never fragmented, allowed
    /// between the fragments of a message.
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// A message received from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message; the bytes are valid UTF-8.
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    /// A close frame; `None` when it carried no payload (no status code).
    Close(Option<CloseFrame>),
}

/// The payload of a close frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    /// A code allowed on the wire ([`valid_close_code`]).
    pub code: u16,
    /// At most [`MAX_CLOSE_REASON`] bytes.
    pub reason: Box<str>,
}

/// Why a client's frames were refused. Each one fails the connection with
/// the code of [`DecodeError::close_code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("client frame not masked")]
    Unmasked,
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    #[error("frame length not in its shortest form")]
    NonMinimalLength,
    #[error("64-bit frame length with its top bit set")]
    LengthTopBit,
    #[error("control frame longer than 125 bytes")]
    ControlTooLong,
    #[error("fragmented control frame")]
    FragmentedControl,
    #[error("continuation frame outside a fragmented message")]
    UnexpectedContinuation,
    #[error("new message before the fragmented one ended")]
    UnfinishedMessage,
    #[error("close frame with a 1-byte payload")]
    CloseTooShort,
    #[error("close code {0} not allowed on the wire")]
    InvalidCloseCode(u16),
    #[error("close reason is not utf-8")]
    CloseReasonNotUtf8,
    #[error("text message is not utf-8")]
    InvalidUtf8,
    #[error("message longer than max_message_bytes")]
    MessageTooBig,
}

impl DecodeError {
    /// The close code the connection is failed with (RFC 6455 7.4.1):
    /// 1007 for text (a message or a close reason) that is not UTF-8, 1009
    /// for a message over the limit, 1002 for every other violation.
    pub fn close_code(self) -> u16 {
        match self {
            DecodeError::InvalidUtf8 | DecodeError::CloseReasonNotUtf8 => 1007,
            DecodeError::MessageTooBig => 1009,
            _ => 1002,
        }
    }
}

/// Close codes a peer may send (RFC 6455 7.4 and the IANA registry):
/// 1000-1003, 1007-1014, 3000-4999. 1004-1006 and 1015 are reserved for
/// local use and never on the wire.
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Decodes the frames one client sends, from whatever pieces its bytes
/// arrive in. One per client; see the module doc for what it holds.
#[derive(Debug)]
pub struct Decoder {
    /// Refuse a data message longer than this (`max_message_bytes`).
    max_message_bytes: usize,
    /// The header of the next frame while it is incomplete.
    header: [u8; MAX_CLIENT_HEADER],
    header_len: u8,
    /// The frame whose payload is arriving, once its header is whole.
    frame: Option<Frame>,
    /// Text or Binary while a data message is open (its first frame seen,
    /// its last not yet).
    message_kind: Option<OpCode>,
    /// The open data message's payload so far, unmasked.
    message: Vec<u8>,
    /// How much of `message` is known to be UTF-8 (text only): what follows
    /// is at most a code point cut by a fragment or read.
    utf8_checked: usize,
    /// The payload of the control frame arriving, unmasked.
    control: Vec<u8>,
    /// A close frame or an error ended the input: the rest is ignored.
    ended: bool,
}

/// A frame whose header is whole and whose payload is arriving.
#[derive(Debug, Clone, Copy)]
struct Frame {
    opcode: OpCode,
    fin: bool,
    mask: [u8; 4],
    /// Payload bytes still to come.
    remaining: u64,
    /// Payload bytes received so far, modulo 4: where the mask stands.
    mask_phase: u8,
}

impl Decoder {
    /// A decoder for a new client whose data messages may be at most
    /// `max_message_bytes` long.
    pub fn new(max_message_bytes: usize) -> Self {
        Decoder {
            max_message_bytes,
            header: [0; MAX_CLIENT_HEADER],
            header_len: 0,
            frame: None,
            message_kind: None,
            message: Vec::new(),
            utf8_checked: 0,
            control: Vec::new(),
            ended: false,
        }
    }

    /// Heap bytes this client's decoder holds (allocated capacity). 0
    /// between messages, so whenever the client is idle.
    pub fn held_bytes(&self) -> usize {
        self.message.capacity() + self.control.capacity()
    }

    /// The longest data message accepted.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// Whether a close frame or an error ended the input.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Decodes from `input` until one message is complete, advancing
    /// `input` past what was used; call again with the rest. `Ok(None)`
    /// means all of `input` was taken and what it held of an incomplete frame
    /// is kept for the next call.
    ///
    /// After a close frame, and after an error, the decoder has ended: later
    /// input is taken and ignored (`Ok(None)`), and its buffers are freed.
    ///
    /// # Errors
    /// A [`DecodeError`] naming the rule the client broke; fail the
    /// connection with its [`close_code`](DecodeError::close_code).
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<Message>, DecodeError> {
        if self.ended {
            *input = &[];
            return Ok(None);
        }
        let decoded = self.decode_frames(input);
        if decoded.is_err() {
            self.end();
        }
        decoded
    }

    fn decode_frames(&mut self, input: &mut &[u8]) -> Result<Option<Message>, DecodeError> {
        loop {
            let mut frame = match self.frame {
                Some(frame) => frame,
                None => match self.read_header(input)? {
                    Some(frame) => frame,
                    None => return Ok(None),
                },
            };
            self.read_payload(&mut frame, input)?;
            if frame.remaining > 0 {
                self.frame = Some(frame);
                return Ok(None);
            }
            self.frame = None;
            if let Some(message) = self.finish(frame)? {
                return Ok(Some(message));
            }
        }
    }

    /// Gathers the next frame's header from `input` and checks it: `None`
    /// when `input` ran out before it was whole.
    fn read_header(&mut self, input: &mut &[u8]) -> Result<Option<Frame>, DecodeError> {
        loop {
            let have = usize::from(self.header_len);
            let need = if have < 2 {
                2
            } else {
                header_size(self.header[1])
            };
            if have == need {
                break;
            }
            let take = (need - have).min(input.len());
            if take == 0 {
                return Ok(None);
            }
            self.header[have..have + take].copy_from_slice(&input[..take]);
            *input = &input[take..];
            self.header_len += take as u8; // take <= MAX_CLIENT_HEADER
            if have < 2 && have + take == 2 {
                self.check_start(self.header[0], self.header[1])?;
            }
        }
        let header = &self.header[..usize::from(self.header_len)];
        let (b0, b1) = (header[0], header[1]);
        let (len, rest) = match b1 & 0x7F {
            126 => {
                let len = u16::from_be_bytes([header[2], header[3]]);
                if len < 126 {
                    return Err(DecodeError::NonMinimalLength);
                }
                (u64::from(len), &header[4..])
            }
            127 => {
                let mut bytes = [0; 8];
                bytes.copy_from_slice(&header[2..10]);
                let len = u64::from_be_bytes(bytes);
                if len >> 63 != 0 {
                    return Err(DecodeError::LengthTopBit);
                }
                if u16::try_from(len).is_ok() {
                    return Err(DecodeError::NonMinimalLength);
                }
                (len, &header[10..])
            }
            short => (u64::from(short), &header[2..]),
        };
        let mut mask = [0; 4];
        mask.copy_from_slice(rest);
        // check_start refused every opcode from_bits does not know.
        let opcode = OpCode::from_bits(b0 & 0x0F).ok_or(DecodeError::ReservedOpcode(b0 & 0x0F))?;
        if !opcode.is_control() {
            let total = self.message.len() as u64 + len;
            if total > self.max_message_bytes as u64 {
                return Err(DecodeError::MessageTooBig);
            }
            if opcode != OpCode::Continuation {
                self.message_kind = Some(opcode);
            }
        }
        self.header_len = 0;
        Ok(Some(Frame {
            opcode,
            fin: b0 & 0x80 != 0,
            mask,
            remaining: len,
            mask_phase: 0,
        }))
    }

    /// The checks the first two header bytes settle.
    fn check_start(&self, b0: u8, b1: u8) -> Result<(), DecodeError> {
        if b0 & 0x70 != 0 {
            return Err(DecodeError::ReservedBits);
        }
        let bits = b0 & 0x0F;
        let opcode = OpCode::from_bits(bits).ok_or(DecodeError::ReservedOpcode(bits))?;
        if b1 & 0x80 == 0 {
            return Err(DecodeError::Unmasked);
        }
        let fin = b0 & 0x80 != 0;
        match opcode {
            OpCode::Close | OpCode::Ping | OpCode::Pong => {
                if !fin {
                    return Err(DecodeError::FragmentedControl);
                }
                if usize::from(b1 & 0x7F) > MAX_CONTROL_PAYLOAD {
                    return Err(DecodeError::ControlTooLong);
                }
            }
            OpCode::Continuation if self.message_kind.is_none() => {
                return Err(DecodeError::UnexpectedContinuation);
            }
            OpCode::Text | OpCode::Binary if self.message_kind.is_some() => {
                return Err(DecodeError::UnfinishedMessage);
            }
            OpCode::Continuation | OpCode::Text | OpCode::Binary => {}
        }
        Ok(())
    }

    /// Moves what `input` holds of `frame`'s payload into the message or
    /// control buffer, unmasked; text is checked as it arrives.
    fn read_payload(&mut self, frame: &mut Frame, input: &mut &[u8]) -> Result<(), DecodeError> {
        let take = usize::try_from(frame.remaining).map_or(input.len(), |r| r.min(input.len()));
        if take == 0 {
            return Ok(());
        }
        let (chunk, rest) = input.split_at(take);
        *input = rest;
        let buf = if frame.opcode.is_control() {
            &mut self.control
        } else {
            &mut self.message
        };
        // remaining fits: the message limit (data) or 125 (control) bounds it.
        reserve(buf, take, frame.remaining as usize);
        let start = buf.len();
        buf.extend_from_slice(chunk);
        unmask(&mut buf[start..], frame.mask, frame.mask_phase);
        frame.mask_phase = ((usize::from(frame.mask_phase) + take) % 4) as u8;
        frame.remaining -= take as u64;
        if !frame.opcode.is_control() && self.message_kind == Some(OpCode::Text) {
            check_utf8(&self.message, &mut self.utf8_checked, true)?;
        }
        Ok(())
    }

    /// A frame's payload is whole: the message it completes, if any.
    fn finish(&mut self, frame: Frame) -> Result<Option<Message>, DecodeError> {
        Ok(Some(match frame.opcode {
            OpCode::Ping => Message::Ping(Bytes::from(mem::take(&mut self.control))),
            OpCode::Pong => Message::Pong(Bytes::from(mem::take(&mut self.control))),
            OpCode::Close => {
                let close = parse_close(&self.control)?;
                self.end();
                Message::Close(close)
            }
            OpCode::Continuation | OpCode::Text | OpCode::Binary => {
                if !frame.fin {
                    return Ok(None);
                }
                let kind = self.message_kind.take();
                if kind == Some(OpCode::Text) {
                    check_utf8(&self.message, &mut self.utf8_checked, false)?;
                }
                self.utf8_checked = 0;
                let payload = Bytes::from(mem::take(&mut self.message));
                match kind {
                    Some(OpCode::Text) => Message::Text(payload),
                    _ => Message::Binary(payload),
                }
            }
        }))
    }

    /// Ends the input: nothing more is decoded, every buffer is freed.
    fn end(&mut self) {
        self.ended = true;
        self.frame = None;
        self.message_kind = None;
        self.message = Vec::new();
        self.control = Vec::new();
    }
}

/// Header size once its second byte is known: 2, the extended length, the mask.
fn header_size(b1: u8) -> usize {
    let extended = match b1 & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + extended + 4
}

/// Makes room for `take` more bytes in `buf`, doubling its capacity but never
/// past what the frame still brings (`upto` bytes, `take` included): a
/// message cut into many reads costs amortised copies, and never holds more
/// than its own length.
fn reserve(buf: &mut Vec<u8>, take: usize, upto: usize) {
    let need = buf.len() + take;
    if need > buf.capacity() {
        let target = (buf.capacity() * 2).clamp(need, buf.len() + upto);
        buf.reserve_exact(target - buf.len());
    }
}

/// XORs `buf` with `mask`, starting `phase` bytes into it: eight bytes at a
/// time, then the tail.
fn unmask(buf: &mut [u8], mask: [u8; 4], phase: u8) {
    let phase = usize::from(phase);
    let key: [u8; 4] = std::array::from_fn(|i| mask[(phase + i) % 4]);
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut words = buf.chunks_exact_mut(8);
    for word in &mut words {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(word);
        word.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ wide).to_ne_bytes());
    }
    for (byte, k) in words.into_remainder().iter_mut().zip(key.iter().cycle()) {
        *byte ^= k;
    }
}

/// Checks `buf[*checked..]` as UTF-8 and moves `checked` past what is valid.
/// With `more`, bytes may still follow, so a code point cut at the end is
/// waited for; anything that no continuation can make valid fails at once.
fn check_utf8(buf: &[u8], checked: &mut usize, more: bool) -> Result<(), DecodeError> {
    match str::from_utf8(&buf[*checked..]) {
        Ok(_) => {
            *checked = buf.len();
            Ok(())
        }
        Err(e) if more && e.error_len().is_none() => {
            *checked += e.valid_up_to();
            Ok(())
        }
        Err(_) => Err(DecodeError::InvalidUtf8),
    }
}

/// A close frame's payload: nothing, or a code and a UTF-8 reason.
fn parse_close(payload: &[u8]) -> Result<Option<CloseFrame>, DecodeError> {
    match payload {
        [] => Ok(None),
        [_] => Err(DecodeError::CloseTooShort),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !valid_close_code(code) {
                return Err(DecodeError::InvalidCloseCode(code));
            }
            let reason = str::from_utf8(reason).map_err(|_| DecodeError::CloseReasonNotUtf8)?;
            Ok(Some(CloseFrame {
                code,
                reason: reason.into(),
            }))
        }
    }
}

/// The header of an unmasked server frame, kept inline: for a payload that
/// is written as it is, after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    bytes: [u8; MAX_SERVER_HEADER],
    len: u8,
}

impl Header {
    /// The header of a frame with `opcode` and a payload of `payload_len`
    /// bytes; `fin` unless more fragments of its message follow.
    pub fn new(opcode: OpCode, fin: bool, payload_len: usize) -> Self {
        let mut bytes = [0; MAX_SERVER_HEADER];
        bytes[0] = (u8::from(fin) << 7) | opcode as u8;
        let len = match payload_len {
            0..=125 => {
                bytes[1] = payload_len as u8;
                2
            }
            126..=0xFFFF => {
                bytes[1] = 126;
                bytes[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
                4
            }
            _ => {
                bytes[1] = 127;
                bytes[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
                10
            }
        };
        Header { bytes, len }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// One whole unmasked server frame, header and payload in one shared
/// buffer: a publish is encoded once and every subscriber's queue holds a
/// clone of it (a reference count, no copy).
///
/// # Panics
/// If `opcode` is a control opcode and `payload` is longer than
/// [`MAX_CONTROL_PAYLOAD`] bytes: the caller chose an impossible frame.
pub fn encode(opcode: OpCode, payload: &[u8]) -> Bytes {
    assert!(
        !opcode.is_control() || payload.len() <= MAX_CONTROL_PAYLOAD,
        "control frame payload over 125 bytes"
    );
    let header = Header::new(opcode, true, payload.len());
    let mut frame = BytesMut::with_capacity(header.as_bytes().len() + payload.len());
    frame.put_slice(header.as_bytes());
    frame.put_slice(payload);
    frame.freeze()
}

/// A close frame with `code` and `reason`, the reason cut on a character
/// boundary to [`MAX_CLOSE_REASON`] bytes.
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let mut cut = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = [0; MAX_CONTROL_PAYLOAD];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + cut].copy_from_slice(&reason.as_bytes()[..cut]);
    encode(OpCode::Close, &payload[..2 + cut])
}

#[cfg(test)]
mod tests;
