//! The link wire format: [`Frame`] and its [`FrameCodec`].
//!
//! Both ends of a link speak this codec: the gateway (which dials) and the
//! service (which listens). `docs/link-protocol.md` is the normative spec; this
//! module is its reference implementation.
//!
//! # Framing
//!
//! ```text
//! +----------------+---------+----------------------+
//! | length: u32 BE | type u8 | body (length-1 bytes)|
//! +----------------+---------+----------------------+
//! ```
//!
//! `length` counts the type byte and the body. Integers are big-endian.
//! Strings are a `u16` length then UTF-8 bytes; `claims` is a `u32` length then
//! bytes; a `payload` takes the rest of the frame.
//!
//! # Invariants the decoder keeps
//!
//! - It never panics, whatever the input.
//! - The length is checked against the cap *before* any buffer grows, so a
//!   hostile header costs 4 bytes, not 4 GiB.
//! - Payloads and claims are split off the read buffer and frozen: no copy.
//! - Every byte of a frame is accounted for: trailing bytes are an error.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Version carried in [`Frame::Hello`]; both ends must agree exactly.
///
/// Version 2 added `max_frame_bytes` to the `Hello`: each end says the
/// largest frame it accepts, and the other never sends a larger one.
pub const PROTOCOL_VERSION: u16 = 2;

/// Default cap on one frame (length field value); a larger length is an error
/// before any allocation.
///
/// 16 MiB leaves room for the largest WebSocket message a gateway accepts by
/// default plus the frame's own fields.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// The smallest cap an end may say in its `Hello`: room for a frame with a
/// full 65,535-byte string and a modest `claims` object. A peer that says
/// less is refused at the handshake.
pub const MIN_FRAME_BYTES: usize = 64 * 1024;

/// The length field of a `ClientMessage` minus its payload: type, client, kind.
pub const CLIENT_MESSAGE_OVERHEAD: usize = TYPE_BYTES + 8 + 1;

/// The most a frame that carries a message adds to it: a `Publish` with the
/// longest topic a `u16` can describe (type, topic, kind).
pub const MESSAGE_FRAME_OVERHEAD: usize = TYPE_BYTES + 2 + MAX_STRING_BYTES + 1;

/// The largest frame `length` the `u32` length field can describe: no end can
/// say, accept or send a larger frame, whatever its cap.
pub const MAX_FRAME_LENGTH: usize = u32::MAX as usize;

/// The largest message the link protocol can carry in every frame that
/// carries one: [`MAX_FRAME_LENGTH`] less [`MESSAGE_FRAME_OVERHEAD`]. A
/// gateway's `limits.max_message_bytes` above it could not be forwarded at
/// all, so its config check refuses it.
pub const MAX_MESSAGE_BYTES: usize = MAX_FRAME_LENGTH - MESSAGE_FRAME_OVERHEAD;

/// The frame cap an end needs to receive messages of up to `max_message`
/// bytes in any frame that carries one, and never less than
/// [`MAX_FRAME_BYTES`]. At most [`MAX_FRAME_LENGTH`] for messages up to
/// [`MAX_MESSAGE_BYTES`].
pub fn frame_cap_for_messages(max_message: usize) -> usize {
    max_message
        .saturating_add(MESSAGE_FRAME_OVERHEAD)
        .max(MAX_FRAME_BYTES)
}

/// A client's id, chosen by the gateway; unique per gateway per link lifetime.
pub type ClientId = u64;

/// Goaway code: normal close (shutdown, drain, restart).
pub const GOAWAY_NORMAL: u16 = 0;
/// Goaway code: the peer's [`Frame::Hello`] carried a version this end does not speak.
pub const GOAWAY_UNSUPPORTED_VERSION: u16 = 1;
/// Goaway code: the peer broke the protocol (bad frame, frame not allowed in that direction or state).
pub const GOAWAY_PROTOCOL_ERROR: u16 = 2;
/// Goaway code: this end is at its link limit.
pub const GOAWAY_TOO_MANY_LINKS: u16 = 3;

/// Bytes of the length prefix.
const LEN_BYTES: usize = 4;
/// Bytes of the type field.
const TYPE_BYTES: usize = 1;
/// Largest string a `u16` length prefix can describe.
const MAX_STRING_BYTES: usize = u16::MAX as usize;
/// Largest `claims` a `u32` length prefix can describe.
const MAX_CLAIMS_BYTES: usize = u32::MAX as usize;

/// Frame type bytes, one per [`Frame`] variant.
const HELLO: u8 = 0x01;
const PING: u8 = 0x02;
const PONG: u8 = 0x03;
const GOAWAY: u8 = 0x04;
const CLIENT_OPEN: u8 = 0x10;
const CLIENT_MESSAGE: u8 = 0x11;
const CLIENT_CLOSE: u8 = 0x12;
const SUBSCRIBE: u8 = 0x20;
const UNSUBSCRIBE: u8 = 0x21;
const PUBLISH: u8 = 0x22;

/// Whether a client message is text or binary, as in WebSocket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// UTF-8 text (wire value 1). The gateway has validated the UTF-8 of
    /// messages from clients; a service must send valid UTF-8.
    Text,
    /// Arbitrary bytes (wire value 2).
    Binary,
}

impl Kind {
    fn to_wire(self) -> u8 {
        match self {
            Kind::Text => 1,
            Kind::Binary => 2,
        }
    }

    fn from_wire(value: u8) -> Option<Kind> {
        match value {
            1 => Some(Kind::Text),
            2 => Some(Kind::Binary),
            _ => None,
        }
    }
}

/// One link frame. Field order is the wire order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// `0x01`, both ways: the gateway sends it first (name = gateway name), the
    /// service answers (name = service name).
    Hello {
        /// Must equal [`PROTOCOL_VERSION`].
        version: u16,
        /// The sender's name, for logs and for grouping links per gateway.
        name: String,
        /// The largest frame `length` the sender accepts; the receiver must
        /// not send a larger frame. `0` when the peer did not say (a
        /// version 1 `Hello`, which ends after `name`).
        max_frame_bytes: u32,
    },
    /// `0x02`, both ways: liveness probe.
    Ping {
        /// Echoed in the answering [`Frame::Pong`].
        nonce: u64,
    },
    /// `0x03`: answer to a [`Frame::Ping`] with the same nonce.
    Pong {
        /// The nonce of the ping being answered.
        nonce: u64,
    },
    /// `0x04`: clean link close; the sender stops sending after it.
    Goaway {
        /// One of the `GOAWAY_*` codes.
        code: u16,
        /// Human-readable reason, for logs.
        reason: String,
    },
    /// `0x10`, gateway → service: a client connected.
    ClientOpen {
        /// The client's id on this link.
        client: ClientId,
        /// The route (e.g. WebSocket path) the client came in on.
        route: String,
        /// The client's remote address as `ip:port`.
        remote_addr: String,
        /// Verified auth claims as a JSON object (`{}` when no auth).
        claims: Bytes,
    },
    /// `0x11`, both ways: one message from or to a client.
    ClientMessage {
        /// The client on this link.
        client: ClientId,
        /// Text or binary.
        kind: Kind,
        /// The message bytes (the rest of the frame).
        payload: Bytes,
    },
    /// `0x12`, both ways: service → gateway closes that client with
    /// code/reason; gateway → service says the client has gone.
    ClientClose {
        /// The client on this link.
        client: ClientId,
        /// WebSocket close code.
        code: u16,
        /// WebSocket close reason.
        reason: String,
    },
    /// `0x20`, service → gateway: add the client to a topic.
    Subscribe {
        /// The client on this link.
        client: ClientId,
        /// Topic name.
        topic: String,
    },
    /// `0x21`, service → gateway: remove the client from a topic.
    Unsubscribe {
        /// The client on this link.
        client: ClientId,
        /// Topic name.
        topic: String,
    },
    /// `0x22`, service → gateway: deliver to every subscriber of the topic on
    /// that gateway.
    Publish {
        /// Topic name.
        topic: String,
        /// Text or binary.
        kind: Kind,
        /// The message bytes (the rest of the frame).
        payload: Bytes,
    },
}

impl Frame {
    /// Short snake_case name of the frame type, for logs and metric labels.
    pub fn type_name(&self) -> &'static str {
        type_name(self.frame_type())
    }

    /// The wire type byte of this frame.
    pub fn frame_type(&self) -> u8 {
        match self {
            Frame::Hello { .. } => HELLO,
            Frame::Ping { .. } => PING,
            Frame::Pong { .. } => PONG,
            Frame::Goaway { .. } => GOAWAY,
            Frame::ClientOpen { .. } => CLIENT_OPEN,
            Frame::ClientMessage { .. } => CLIENT_MESSAGE,
            Frame::ClientClose { .. } => CLIENT_CLOSE,
            Frame::Subscribe { .. } => SUBSCRIBE,
            Frame::Unsubscribe { .. } => UNSUBSCRIBE,
            Frame::Publish { .. } => PUBLISH,
        }
    }

    /// The value of this frame's length field, checking every length-prefixed
    /// field fits its prefix.
    pub(crate) fn wire_len(&self) -> Result<usize, CodecError> {
        let body = match self {
            Frame::Hello { name, .. } => 2 + string_len(name, "name")? + 4,
            Frame::Ping { .. } | Frame::Pong { .. } => 8,
            Frame::Goaway { reason, .. } => 2 + string_len(reason, "reason")?,
            Frame::ClientOpen {
                route,
                remote_addr,
                claims,
                ..
            } => {
                if claims.len() > MAX_CLAIMS_BYTES {
                    return Err(CodecError::FieldTooLong {
                        field: "claims",
                        len: claims.len(),
                        max: MAX_CLAIMS_BYTES,
                    });
                }
                8 + string_len(route, "route")?
                    + string_len(remote_addr, "remote_addr")?
                    + 4
                    + claims.len()
            }
            Frame::ClientMessage { payload, .. } => 8 + 1 + payload.len(),
            Frame::ClientClose { reason, .. } => 8 + 2 + string_len(reason, "reason")?,
            Frame::Subscribe { topic, .. } | Frame::Unsubscribe { topic, .. } => {
                8 + string_len(topic, "topic")?
            }
            Frame::Publish { topic, payload, .. } => {
                string_len(topic, "topic")? + 1 + payload.len()
            }
        };
        Ok(TYPE_BYTES + body)
    }
}

/// Name of a frame type byte, `"unknown"` for bytes that are not a type.
fn type_name(frame_type: u8) -> &'static str {
    match frame_type {
        HELLO => "hello",
        PING => "ping",
        PONG => "pong",
        GOAWAY => "goaway",
        CLIENT_OPEN => "client_open",
        CLIENT_MESSAGE => "client_message",
        CLIENT_CLOSE => "client_close",
        SUBSCRIBE => "subscribe",
        UNSUBSCRIBE => "unsubscribe",
        PUBLISH => "publish",
        _ => "unknown",
    }
}

/// Encoded size of a string field (prefix included).
fn string_len(s: &str, field: &'static str) -> Result<usize, CodecError> {
    if s.len() > MAX_STRING_BYTES {
        return Err(CodecError::FieldTooLong {
            field,
            len: s.len(),
            max: MAX_STRING_BYTES,
        });
    }
    Ok(2 + s.len())
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The link's socket failed.
    #[error("link i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A frame's length field is above the cap (decode: checked from the
    /// header alone; encode: the frame would be refused by a peer with the
    /// same cap).
    #[error("link frame of {len} bytes is larger than the {max}-byte limit")]
    FrameTooLarge {
        /// The frame's length field.
        len: usize,
        /// The cap in force.
        max: usize,
    },
    /// The type byte is not a known frame type.
    #[error("unknown link frame type 0x{0:02x}")]
    UnknownType(u8),
    /// The frame's body does not match its type's layout.
    #[error("malformed link frame of type 0x{frame_type:02x} ({}): {what}", type_name(*frame_type))]
    Malformed {
        /// The frame's type byte (0 when the length field itself is bad).
        frame_type: u8,
        /// What is wrong with it.
        what: &'static str,
    },
    /// Encode only: a length-prefixed field is longer than its prefix allows.
    #[error("link frame field `{field}` is {len} bytes, more than its {max}-byte limit")]
    FieldTooLong {
        /// Field name as in [`Frame`].
        field: &'static str,
        /// Its length.
        len: usize,
        /// The most its length prefix can carry.
        max: usize,
    },
    /// The peer closed the link in the middle of a frame.
    #[error("link closed in the middle of a frame ({buffered} bytes buffered)")]
    TruncatedAtEof {
        /// Bytes of the incomplete frame that had arrived.
        buffered: usize,
    },
}

/// [`Frame`] encoder and decoder for [`tokio_util::codec::Framed`].
#[derive(Clone, Debug)]
pub struct FrameCodec {
    /// Cap on a frame's length field, both when reading and when writing.
    max_frame_bytes: usize,
}

impl FrameCodec {
    /// A codec that refuses frames whose length field exceeds `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> Self {
        FrameCodec { max_frame_bytes }
    }

    /// The cap on a frame's length field.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }
}

impl Default for FrameCodec {
    /// A codec with the [`MAX_FRAME_BYTES`] cap.
    fn default() -> Self {
        FrameCodec::new(MAX_FRAME_BYTES)
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        let Some(header) = src.get(..LEN_BYTES) else {
            return Ok(None);
        };
        let mut len_bytes = [0u8; LEN_BYTES];
        len_bytes.copy_from_slice(header);
        // u32 always fits usize on the targets tokio supports; saturate anyway.
        let len = usize::try_from(u32::from_be_bytes(len_bytes)).unwrap_or(usize::MAX);
        if len == 0 {
            return Err(CodecError::Malformed {
                frame_type: 0,
                what: "length is zero",
            });
        }
        if len > self.max_frame_bytes {
            return Err(CodecError::FrameTooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        let total = LEN_BYTES.saturating_add(len);
        if src.len() < total {
            // The length is validated: reserve exactly what this frame still needs.
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(LEN_BYTES);
        let mut buf = src.split_to(len);
        let frame_type = buf.get_u8();
        decode_body(Body { buf, frame_type }).map(Some)
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() => Ok(None),
            None => Err(CodecError::TruncatedAtEof {
                buffered: buf.len(),
            }),
        }
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        // Every check happens before the first byte is written, so a refused
        // frame leaves `dst` untouched.
        let len = frame.wire_len()?;
        if len > self.max_frame_bytes {
            return Err(CodecError::FrameTooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        let Ok(len_field) = u32::try_from(len) else {
            return Err(CodecError::FrameTooLarge {
                len,
                max: u32::MAX as usize,
            });
        };
        dst.reserve(LEN_BYTES + len);
        dst.put_u32(len_field);
        dst.put_u8(frame.frame_type());
        // String and claims lengths were checked by `wire_len`.
        match frame {
            Frame::Hello {
                version,
                name,
                max_frame_bytes,
            } => {
                dst.put_u16(*version);
                put_string(dst, name);
                dst.put_u32(*max_frame_bytes);
            }
            Frame::Ping { nonce } | Frame::Pong { nonce } => dst.put_u64(*nonce),
            Frame::Goaway { code, reason } => {
                dst.put_u16(*code);
                put_string(dst, reason);
            }
            Frame::ClientOpen {
                client,
                route,
                remote_addr,
                claims,
            } => {
                dst.put_u64(*client);
                put_string(dst, route);
                put_string(dst, remote_addr);
                dst.put_u32(claims.len() as u32);
                dst.put_slice(claims);
            }
            Frame::ClientMessage {
                client,
                kind,
                payload,
            } => {
                dst.put_u64(*client);
                dst.put_u8(kind.to_wire());
                dst.put_slice(payload);
            }
            Frame::ClientClose {
                client,
                code,
                reason,
            } => {
                dst.put_u64(*client);
                dst.put_u16(*code);
                put_string(dst, reason);
            }
            Frame::Subscribe { client, topic } | Frame::Unsubscribe { client, topic } => {
                dst.put_u64(*client);
                put_string(dst, topic);
            }
            Frame::Publish {
                topic,
                kind,
                payload,
            } => {
                put_string(dst, topic);
                dst.put_u8(kind.to_wire());
                dst.put_slice(payload);
            }
        }
        Ok(())
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode(&frame, dst)
    }
}

/// Writes a string whose length `Frame::wire_len` has checked.
fn put_string(dst: &mut BytesMut, s: &str) {
    dst.put_u16(s.len() as u16);
    dst.put_slice(s.as_bytes());
}

fn decode_body(mut body: Body) -> Result<Frame, CodecError> {
    let frame = match body.frame_type {
        HELLO => {
            let version = body.u16("truncated version")?;
            let name = body.string("truncated name", "name is not utf-8")?;
            // A version 1 Hello ends here: decode it, so the handshake can
            // answer with "unsupported version" rather than a protocol error.
            let max_frame_bytes = if body.buf.is_empty() {
                0
            } else {
                body.u32("truncated max_frame_bytes")?
            };
            body.finish()?;
            Frame::Hello {
                version,
                name,
                max_frame_bytes,
            }
        }
        PING | PONG => {
            let nonce = body.u64("truncated nonce")?;
            let is_ping = body.frame_type == PING;
            body.finish()?;
            if is_ping {
                Frame::Ping { nonce }
            } else {
                Frame::Pong { nonce }
            }
        }
        GOAWAY => {
            let code = body.u16("truncated code")?;
            let reason = body.string("truncated reason", "reason is not utf-8")?;
            body.finish()?;
            Frame::Goaway { code, reason }
        }
        CLIENT_OPEN => {
            let client = body.u64("truncated client")?;
            let route = body.string("truncated route", "route is not utf-8")?;
            let remote_addr = body.string("truncated remote_addr", "remote_addr is not utf-8")?;
            let claims = body.claims()?;
            body.finish()?;
            Frame::ClientOpen {
                client,
                route,
                remote_addr,
                claims,
            }
        }
        CLIENT_MESSAGE => {
            let client = body.u64("truncated client")?;
            let kind = body.kind()?;
            Frame::ClientMessage {
                client,
                kind,
                payload: body.rest(),
            }
        }
        CLIENT_CLOSE => {
            let client = body.u64("truncated client")?;
            let code = body.u16("truncated code")?;
            let reason = body.string("truncated reason", "reason is not utf-8")?;
            body.finish()?;
            Frame::ClientClose {
                client,
                code,
                reason,
            }
        }
        SUBSCRIBE | UNSUBSCRIBE => {
            let client = body.u64("truncated client")?;
            let topic = body.string("truncated topic", "topic is not utf-8")?;
            let is_subscribe = body.frame_type == SUBSCRIBE;
            body.finish()?;
            if is_subscribe {
                Frame::Subscribe { client, topic }
            } else {
                Frame::Unsubscribe { client, topic }
            }
        }
        PUBLISH => {
            let topic = body.string("truncated topic", "topic is not utf-8")?;
            let kind = body.kind()?;
            Frame::Publish {
                topic,
                kind,
                payload: body.rest(),
            }
        }
        other => return Err(CodecError::UnknownType(other)),
    };
    Ok(frame)
}

/// The body of one frame being parsed; every read is bounds-checked.
struct Body {
    buf: BytesMut,
    frame_type: u8,
}

impl Body {
    fn malformed(&self, what: &'static str) -> CodecError {
        CodecError::Malformed {
            frame_type: self.frame_type,
            what,
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<BytesMut, CodecError> {
        if self.buf.len() < n {
            return Err(self.malformed(what));
        }
        Ok(self.buf.split_to(n))
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, CodecError> {
        if self.buf.len() < 2 {
            return Err(self.malformed(what));
        }
        Ok(self.buf.get_u16())
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, CodecError> {
        if self.buf.len() < 4 {
            return Err(self.malformed(what));
        }
        Ok(self.buf.get_u32())
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, CodecError> {
        if self.buf.len() < 8 {
            return Err(self.malformed(what));
        }
        Ok(self.buf.get_u64())
    }

    fn string(
        &mut self,
        truncated: &'static str,
        not_utf8: &'static str,
    ) -> Result<String, CodecError> {
        let len = usize::from(self.u16(truncated)?);
        let bytes = self.take(len, truncated)?;
        match std::str::from_utf8(&bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(self.malformed(not_utf8)),
        }
    }

    fn claims(&mut self) -> Result<Bytes, CodecError> {
        let len = usize::try_from(self.u32("truncated claims")?).unwrap_or(usize::MAX);
        Ok(self.take(len, "truncated claims")?.freeze())
    }

    fn kind(&mut self) -> Result<Kind, CodecError> {
        if self.buf.is_empty() {
            return Err(self.malformed("truncated kind"));
        }
        Kind::from_wire(self.buf.get_u8()).ok_or_else(|| self.malformed("unknown message kind"))
    }

    /// The rest of the frame, zero-copy.
    fn rest(self) -> Bytes {
        self.buf.freeze()
    }

    /// Fixed-layout frames end exactly at their last field.
    fn finish(self) -> Result<(), CodecError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.malformed("trailing bytes after the last field"))
        }
    }
}

#[cfg(test)]
mod tests;
