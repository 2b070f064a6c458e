//! The framed client protocol: TLS, then length-prefixed binary frames, for
//! native clients that do not want HTTP and WebSocket framing. Spec:
//! `docs/framed-protocol.md`.
//!
//! The session loop is written against `Stream<Item = Result<Message, _>> +
//! Sink<Message>`, so [`FramedClient`] presents framed frames as WebSocket
//! messages: the session model, heartbeat, limits and routing are the same
//! code for both protocols.
//!
//! Every frame: `u32` big-endian length of what follows, `u8` type, body.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::frame::Utf8Bytes;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::codec::{Decoder, Encoder, Framed, FramedParts};

/// Client → gateway, first frame: `route: str16`, `token: str16`.
pub const HELLO: u8 = 0x01;
/// Gateway → client: the session is open (empty body).
pub const WELCOME: u8 = 0x02;
/// Both ways: UTF-8 text message.
pub const TEXT: u8 = 0x03;
/// Both ways: binary message.
pub const BINARY: u8 = 0x04;
/// Both ways: ping (≤ 125 bytes of body), answered by a pong with the same body.
pub const PING: u8 = 0x05;
/// Both ways: pong.
pub const PONG: u8 = 0x06;
/// Both ways: `code: u16`, `reason: UTF-8` (rest of the frame).
pub const CLOSE: u8 = 0x07;

/// Largest control frame body (as WebSocket).
pub const MAX_CONTROL_BYTES: usize = 125;
/// Largest Hello body: a route and a token of at most 4 KiB each.
pub const MAX_HELLO_BYTES: usize = 2 + 4096 + 2 + 4096;
/// Initial read buffer: small, so an idle framed client holds little. It grows
/// while a larger frame arrives and is released by the codec after it.
pub const READ_BUFFER_BYTES: usize = 512;

/// A client's first frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub route: String,
    pub token: String,
}

/// What the codec yields: the Hello, or a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    Hello(Hello),
    Message(Message),
}

/// Encodes and decodes framed-protocol frames.
#[derive(Debug, Clone)]
pub struct ClientCodec {
    max_message_bytes: usize,
}

impl ClientCodec {
    pub fn new(max_message_bytes: usize) -> Self {
        Self { max_message_bytes }
    }
}

fn protocol(t: u8) -> WsError {
    WsError::Protocol(ProtocolError::InvalidOpcode(t))
}

fn read_str16(body: &mut Bytes, what: u8) -> Result<String, WsError> {
    if body.len() < 2 {
        return Err(protocol(what));
    }
    let len = body.get_u16() as usize;
    if body.len() < len {
        return Err(protocol(what));
    }
    let s = body.split_to(len);
    String::from_utf8(s.to_vec()).map_err(|e| WsError::Utf8(e.to_string()))
}

impl Decoder for ClientCodec {
    type Item = Inbound;
    type Error = WsError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, WsError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len == 0 {
            return Err(protocol(0));
        }
        // Checked on the header alone, before buffering the body.
        let max = self.max_message_bytes.max(MAX_HELLO_BYTES) + 1;
        if len > max {
            return Err(WsError::Capacity(CapacityError::MessageTooLong {
                size: len - 1,
                max_size: self.max_message_bytes,
            }));
        }
        if src.len() < 4 + len {
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        let t = src.get_u8();
        let mut body = src.split_to(len - 1).freeze();
        // A drained buffer that grew for a large frame is released.
        if src.is_empty() && src.capacity() > READ_BUFFER_BYTES * 4 {
            *src = BytesMut::with_capacity(READ_BUFFER_BYTES);
        }
        let msg = match t {
            HELLO => {
                let route = read_str16(&mut body, t)?;
                let token = read_str16(&mut body, t)?;
                if !body.is_empty() {
                    return Err(protocol(t));
                }
                return Ok(Some(Inbound::Hello(Hello { route, token })));
            }
            TEXT | BINARY if body.len() > self.max_message_bytes => {
                return Err(WsError::Capacity(CapacityError::MessageTooLong {
                    size: body.len(),
                    max_size: self.max_message_bytes,
                }))
            }
            TEXT => {
                Message::Text(Utf8Bytes::try_from(body).map_err(|e| WsError::Utf8(e.to_string()))?)
            }
            BINARY => Message::Binary(body),
            PING | PONG if body.len() > MAX_CONTROL_BYTES => return Err(protocol(t)),
            PING => Message::Ping(body),
            PONG => Message::Pong(body),
            CLOSE => {
                if body.len() < 2 || body.len() > MAX_CONTROL_BYTES {
                    return Err(protocol(t));
                }
                let code = body.get_u16();
                let reason = Utf8Bytes::try_from(body).map_err(|e| WsError::Utf8(e.to_string()))?;
                Message::Close(Some(CloseFrame {
                    code: CloseCode::from(code),
                    reason,
                }))
            }
            other => return Err(protocol(other)),
        };
        Ok(Some(Inbound::Message(msg)))
    }
}

/// Appends one frame: length, type, body parts.
fn put_frame(dst: &mut BytesMut, t: u8, parts: &[&[u8]]) {
    let len: usize = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    dst.reserve(4 + len);
    dst.put_u32(len as u32);
    dst.put_u8(t);
    for p in parts {
        dst.put_slice(p);
    }
}

impl Encoder<Message> for ClientCodec {
    type Error = WsError;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), WsError> {
        match msg {
            Message::Text(t) => put_frame(dst, TEXT, &[t.as_bytes()]),
            Message::Binary(b) => put_frame(dst, BINARY, &[&b]),
            Message::Ping(b) => put_frame(dst, PING, &[&b]),
            Message::Pong(b) => put_frame(dst, PONG, &[&b]),
            Message::Close(frame) => {
                let (code, reason) = frame.map_or((1000, Utf8Bytes::default()), |f| {
                    (u16::from(f.code), f.reason)
                });
                put_frame(dst, CLOSE, &[&code.to_be_bytes(), reason.as_bytes()]);
            }
            // Raw WebSocket frames have no framed-protocol form.
            Message::Frame(_) => {}
        }
        Ok(())
    }
}

/// Encodes the Welcome frame.
pub fn welcome() -> Bytes {
    let mut b = BytesMut::new();
    put_frame(&mut b, WELCOME, &[]);
    b.freeze()
}

/// A framed client as a stream of WebSocket messages and a sink for them.
/// Pings are answered here, as tungstenite does for WebSocket clients.
pub struct FramedClient<T> {
    inner: Framed<T, ClientCodec>,
    /// A pong owed to the client, sent before the next read.
    pong: Option<Bytes>,
    closed: bool,
}

impl<T: AsyncRead + AsyncWrite + Unpin> FramedClient<T> {
    /// Wraps `io` with small buffers (an idle client holds little).
    pub fn new(io: T, max_message_bytes: usize) -> Self {
        let mut parts = FramedParts::new::<Message>(io, ClientCodec::new(max_message_bytes));
        parts.read_buf = BytesMut::with_capacity(READ_BUFFER_BYTES);
        parts.write_buf = BytesMut::new();
        Self {
            inner: Framed::from_parts(parts),
            pong: None,
            closed: false,
        }
    }

    /// The stream under the framing (for the lingering close).
    pub fn get_mut(&mut self) -> &mut T {
        self.inner.get_mut()
    }

    /// Reads the Hello (the caller bounds it with the upgrade timeout).
    ///
    /// # Errors
    /// A protocol error, an I/O error, or a first frame that is not Hello.
    pub async fn read_hello(&mut self) -> Result<Hello, WsError> {
        use futures_util::StreamExt;
        match self.inner.next().await {
            Some(Ok(Inbound::Hello(h))) => Ok(h),
            Some(Ok(Inbound::Message(_))) => Err(protocol(HELLO)),
            Some(Err(e)) => Err(e),
            None => Err(WsError::ConnectionClosed),
        }
    }

    /// Writes raw bytes (the Welcome frame) and flushes.
    ///
    /// # Errors
    /// The write error.
    pub async fn send_raw(&mut self, frame: Bytes) -> Result<(), WsError> {
        use tokio::io::AsyncWriteExt;
        let io = self.inner.get_mut();
        io.write_all(&frame).await?;
        io.flush().await?;
        Ok(())
    }

    fn poll_send_pong(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        if self.pong.is_some() {
            let mut inner = Pin::new(&mut self.inner);
            match inner.as_mut().poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
            if let Some(p) = self.pong.take() {
                inner.as_mut().start_send(Message::Pong(p))?;
            }
            // Best effort: a full socket leaves the pong buffered for the next flush.
            if let Poll::Ready(Err(e)) = inner.poll_flush(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Stream for FramedClient<T> {
    type Item = Result<Message, WsError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(None);
        }
        if let Poll::Ready(Err(e)) = this.poll_send_pong(cx) {
            return Poll::Ready(Some(Err(e)));
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(Inbound::Hello(_)))) => Poll::Ready(Some(Err(protocol(HELLO)))),
            Poll::Ready(Some(Ok(Inbound::Message(m)))) => {
                match &m {
                    Message::Ping(p) => this.pong = Some(p.clone()),
                    Message::Close(_) => this.closed = true,
                    _ => {}
                }
                Poll::Ready(Some(Ok(m)))
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Sink<Message> for FramedClient<T> {
    type Error = WsError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Pin::new(&mut self.get_mut().inner).poll_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), WsError> {
        Pin::new(&mut self.get_mut().inner).start_send(item)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    /// Answers a client's close with a close frame (as WebSocket does), then
    /// shuts the write side down.
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let this = self.get_mut();
        if this.closed {
            this.closed = false; // reply once
            let mut inner = Pin::new(&mut this.inner);
            match inner.as_mut().poll_ready(cx) {
                Poll::Ready(Ok(())) => inner.as_mut().start_send(Message::Close(None))?,
                other => return other,
            }
        }
        Pin::new(&mut this.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(t: u8, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        put_frame(&mut b, t, &[body]);
        b
    }

    fn hello_body(route: &str, token: &str) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(route.len() as u16).to_be_bytes());
        v.extend_from_slice(route.as_bytes());
        v.extend_from_slice(&(token.len() as u16).to_be_bytes());
        v.extend_from_slice(token.as_bytes());
        v
    }

    #[test]
    fn hello_and_messages_decode() {
        let mut c = ClientCodec::new(1024);
        let mut buf = frame(HELLO, &hello_body("/echo", "tok"));
        buf.extend_from_slice(&frame(TEXT, b"hi"));
        buf.extend_from_slice(&frame(BINARY, &[1, 2]));
        assert_eq!(
            c.decode(&mut buf).unwrap(),
            Some(Inbound::Hello(Hello {
                route: "/echo".into(),
                token: "tok".into()
            }))
        );
        assert_eq!(
            c.decode(&mut buf).unwrap(),
            Some(Inbound::Message(Message::text("hi")))
        );
        assert_eq!(
            c.decode(&mut buf).unwrap(),
            Some(Inbound::Message(Message::binary(vec![1, 2])))
        );
        assert_eq!(c.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone() {
        let mut c = ClientCodec::new(1024);
        let mut buf = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        assert!(matches!(c.decode(&mut buf), Err(WsError::Capacity(_))));
        assert!(
            buf.capacity() < 1 << 20,
            "no allocation from the length field"
        );
    }

    #[test]
    fn message_over_the_limit_is_too_long() {
        let mut c = ClientCodec::new(8);
        let mut buf = frame(BINARY, &[0; 9]);
        assert!(matches!(c.decode(&mut buf), Err(WsError::Capacity(_))));
    }

    #[test]
    fn bad_utf8_unknown_type_and_zero_length_are_errors() {
        let mut c = ClientCodec::new(1024);
        assert!(matches!(
            c.decode(&mut frame(TEXT, &[0xff, 0xfe])),
            Err(WsError::Utf8(_))
        ));
        assert!(matches!(
            c.decode(&mut frame(0x7f, b"")),
            Err(WsError::Protocol(_))
        ));
        assert!(matches!(
            c.decode(&mut BytesMut::from(&[0u8, 0, 0, 0][..])),
            Err(WsError::Protocol(_))
        ));
        assert!(matches!(
            c.decode(&mut frame(PING, &[0; 126])),
            Err(WsError::Protocol(_))
        ));
    }

    #[test]
    fn encoded_messages_decode_back() {
        let mut c = ClientCodec::new(1024);
        let mut buf = BytesMut::new();
        for m in [
            Message::text("t"),
            Message::binary(vec![9]),
            Message::Ping(Bytes::from_static(b"p")),
            Message::Close(Some(CloseFrame {
                code: CloseCode::from(4000),
                reason: "r".into(),
            })),
        ] {
            c.encode(m.clone(), &mut buf).unwrap();
            assert_eq!(c.decode(&mut buf).unwrap(), Some(Inbound::Message(m)));
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut c = ClientCodec::new(256);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let mut buf = BytesMut::new();
            let n = (seed % 64) as usize;
            for _ in 0..n {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                buf.put_u8(seed as u8);
            }
            while let Ok(Some(_)) = c.decode(&mut buf) {}
        }
    }
}
