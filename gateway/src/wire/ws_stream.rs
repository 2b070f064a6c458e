//! A client's WebSocket over its TLS stream, on our codec ([`super::ws`]):
//! what a listener with `ws_codec = "edgegate"` gives its clients.
//!
//! It presents the same `Stream` + `Sink` of tungstenite `Message`s as
//! tokio-tungstenite's `WebSocketStream`, with the errors the session loop
//! already maps to close codes, so the session runs unchanged on either
//! codec while both exist. It behaves as tungstenite does where the session
//! relies on it:
//! - a ping is answered with a pong on its own (the ping is still yielded,
//!   to count against the control-frame budget); only the latest ping's
//!   pong waits to be written, and a close frame replaces it, so a ping
//!   flood from a client that does not read queues one pong, not one each;
//! - a close frame is answered with a close carrying the same code, queued
//!   when it is read and written by the next flush or `close`;
//! - after a close is sent nothing more is written;
//! - the end of the input without a close frame ends the stream (`None`).
//!
//! # What a client holds
//! Reads go into one scratch buffer per worker thread, and the decoder keeps
//! only what must survive (see [`super::ws`]). Besides the decoder a client
//! holds `leftover`, input read past the end of the message just yielded
//! (the next message's bytes, decoded before reading again), and `out`,
//! encoded frames the socket has not taken. Both are freed once empty, so an
//! idle client holds no buffer ([`WsStream::held_bytes`] is 0).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data};
use tokio_tungstenite::tungstenite::protocol::frame::Utf8Bytes;
use tokio_tungstenite::tungstenite::protocol::CloseFrame as TungCloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as TungMessage};

use super::ws::{self, DecodeError, Decoder, Header, Message, OpCode};

/// Plaintext taken from the TLS stream in one read: one TLS record's worth.
const READ_BYTES: usize = 16 * 1024;
/// Encoded bytes a writer may queue before `poll_ready` waits for the
/// socket to take some: bounds `out` to about this plus one message.
const OUT_HIGH_WATER: usize = 64 * 1024;

thread_local! {
    /// The read buffer of this worker thread (see [`with_scratch`]).
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's read buffer, [`READ_BYTES`] long: one per
/// worker thread, not one per client. If it is in use (a stream polled from
/// inside another's poll), `f` gets a buffer of its own.
fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < READ_BYTES {
                buf.resize(READ_BYTES, 0);
            }
            f(&mut buf[..READ_BYTES])
        }
        Err(_) => f(&mut vec![0; READ_BYTES]),
    })
}

/// What one call of the decoder gives.
type Decoded = Result<Option<Message>, DecodeError>;

/// A server-side WebSocket over `IO` (the client's TLS stream).
pub struct WsStream<IO> {
    io: IO,
    decoder: Decoder,
    /// Input read past the last message yielded, from `leftover_from` on.
    leftover: Vec<u8>,
    leftover_from: usize,
    /// Encoded frames the socket has not taken, from `out_from` on.
    out: Vec<u8>,
    out_from: usize,
    /// The pong owed to the latest ping, written with the next write.
    pong: Option<Bytes>,
    /// A close frame is queued or sent: nothing more is written.
    close_sent: bool,
    /// The input ended (close frame, EOF or error): nothing more is read.
    read_done: bool,
}

impl<IO> WsStream<IO> {
    /// A WebSocket on `io` whose upgrade is done; `rest` is what the client
    /// sent after its request head (its first frames).
    pub fn new(io: IO, rest: Vec<u8>, max_message_bytes: usize) -> Self {
        WsStream {
            io,
            decoder: Decoder::new(max_message_bytes),
            leftover: rest,
            leftover_from: 0,
            out: Vec::new(),
            out_from: 0,
            pong: None,
            close_sent: false,
            read_done: false,
        }
    }

    pub fn get_mut(&mut self) -> &mut IO {
        &mut self.io
    }

    /// Heap bytes this client's WebSocket holds (allocated capacity, not
    /// counting the TLS stream under it). 0 whenever the client is idle.
    pub fn held_bytes(&self) -> usize {
        self.decoder.held_bytes()
            + self.leftover.capacity()
            + self.out.capacity()
            + self.pong.as_ref().map_or(0, Bytes::len)
    }

    /// Appends one frame to `out`.
    fn queue(&mut self, opcode: OpCode, payload: &[u8]) {
        self.out
            .extend_from_slice(Header::new(opcode, true, payload.len()).as_bytes());
        self.out.extend_from_slice(payload);
    }

    /// Appends the pong owed, if any, to `out`.
    fn queue_pong(&mut self) {
        if let Some(data) = self.pong.take() {
            self.queue(OpCode::Pong, &data);
        }
    }

    /// Appends a close frame with `code` (none when `None`) to `out`, in
    /// place of the pong owed.
    fn queue_close(&mut self, close: Option<(u16, &str)>) {
        self.pong = None;
        match close {
            Some((code, reason)) => self.out.extend_from_slice(&ws::encode_close(code, reason)),
            None => self.queue(OpCode::Close, &[]),
        }
        self.close_sent = true;
    }

    /// What the session sees of a decoded message; answers pings and closes.
    fn received(&mut self, message: Message) -> Result<TungMessage, WsError> {
        Ok(match message {
            Message::Text(text) => TungMessage::Text(Utf8Bytes::try_from(text)?),
            Message::Binary(data) => TungMessage::Binary(data),
            Message::Ping(data) => {
                if !self.close_sent {
                    self.pong = Some(data.clone());
                }
                TungMessage::Ping(data)
            }
            Message::Pong(data) => TungMessage::Pong(data),
            Message::Close(frame) => {
                self.read_done = true;
                if !self.close_sent {
                    self.queue_close(frame.as_ref().map(|f| (f.code, "")));
                }
                TungMessage::Close(frame.map(|f| TungCloseFrame {
                    code: CloseCode::from(f.code),
                    reason: Utf8Bytes::from(String::from(f.reason)),
                }))
            }
        })
    }

    /// Decodes from `leftover`: a message, or `None` once it is used up.
    fn decode_leftover(&mut self) -> Decoded {
        let mut rest = &self.leftover[self.leftover_from..];
        let decoded = self.decoder.decode(&mut rest);
        self.leftover_from = self.leftover.len() - rest.len();
        if rest.is_empty() {
            self.leftover = Vec::new();
            self.leftover_from = 0;
        }
        decoded
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> WsStream<IO> {
    /// Writes `out` until the socket has taken all of it, then frees it.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_from < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.out_from..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_from += n;
        }
        self.out = Vec::new();
        self.out_from = 0;
        Poll::Ready(Ok(()))
    }

    /// Reads once into the scratch buffer and decodes what came; what
    /// follows a whole message is kept in `leftover`. `Ok(None)`: EOF.
    fn poll_read_decode(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Decoded>>> {
        let (io, decoder, leftover) = (&mut self.io, &mut self.decoder, &mut self.leftover);
        with_scratch(|buf| {
            let mut read = ReadBuf::new(buf);
            ready!(Pin::new(io).poll_read(cx, &mut read))?;
            let input = read.filled();
            if input.is_empty() {
                return Poll::Ready(Ok(None));
            }
            let mut rest = input;
            let decoded = decoder.decode(&mut rest);
            // The next message's bytes; nothing after a close or an error.
            if !rest.is_empty() && !decoder.is_ended() {
                *leftover = rest.to_vec();
            }
            Poll::Ready(Ok(Some(decoded)))
        })
    }
}

/// The tungstenite error the session maps to the right close code.
fn to_ws_error(e: DecodeError, max_message_bytes: usize) -> WsError {
    let protocol = |p| WsError::Protocol(p);
    match e {
        DecodeError::InvalidUtf8 | DecodeError::CloseReasonNotUtf8 => WsError::Utf8(e.to_string()),
        DecodeError::MessageTooBig => WsError::Capacity(CapacityError::MessageTooLong {
            size: max_message_bytes.saturating_add(1),
            max_size: max_message_bytes,
        }),
        DecodeError::Unmasked => protocol(ProtocolError::UnmaskedFrameFromClient),
        DecodeError::ReservedBits => protocol(ProtocolError::NonZeroReservedBits),
        DecodeError::ReservedOpcode(op) => protocol(ProtocolError::InvalidOpcode(op)),
        DecodeError::ControlTooLong => protocol(ProtocolError::ControlFrameTooBig),
        DecodeError::FragmentedControl => protocol(ProtocolError::FragmentedControlFrame),
        DecodeError::UnexpectedContinuation => protocol(ProtocolError::UnexpectedContinueFrame),
        DecodeError::UnfinishedMessage => protocol(ProtocolError::ExpectedFragment(Data::Continue)),
        DecodeError::NonMinimalLength
        | DecodeError::LengthTopBit
        | DecodeError::CloseTooShort
        | DecodeError::InvalidCloseCode(_) => protocol(ProtocolError::InvalidCloseSequence),
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Stream for WsStream<IO> {
    type Item = Result<TungMessage, WsError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        // Answers owed (a pong, a close) go out as the client is read, as
        // tungstenite does; a full socket does not stop the reading.
        this.queue_pong();
        if this.out_from < this.out.len() {
            if let Poll::Ready(Err(e)) = this.poll_write_out(cx) {
                return Poll::Ready(Some(Err(WsError::Io(e))));
            }
        }
        loop {
            if this.read_done {
                return Poll::Ready(None);
            }
            let decoded = if this.leftover.is_empty() {
                match ready!(this.poll_read_decode(cx)) {
                    Ok(Some(decoded)) => decoded,
                    Ok(None) => {
                        this.read_done = true;
                        return Poll::Ready(None);
                    }
                    Err(e) => {
                        this.read_done = true;
                        return Poll::Ready(Some(Err(WsError::Io(e))));
                    }
                }
            } else {
                this.decode_leftover()
            };
            match decoded {
                Ok(None) => {}
                Ok(Some(message)) => return Poll::Ready(Some(this.received(message))),
                Err(e) => {
                    this.read_done = true;
                    let max = this.decoder.max_message_bytes();
                    return Poll::Ready(Some(Err(to_ws_error(e, max))));
                }
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Sink<TungMessage> for WsStream<IO> {
    type Error = WsError;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let this = &mut *self;
        if this.out.len() - this.out_from > OUT_HIGH_WATER {
            ready!(this.poll_write_out(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(mut self: Pin<&mut Self>, message: TungMessage) -> Result<(), WsError> {
        let this = &mut *self;
        if this.close_sent {
            return Err(WsError::Protocol(ProtocolError::SendAfterClosing));
        }
        match message {
            TungMessage::Text(text) => this.queue(OpCode::Text, text.as_bytes()),
            TungMessage::Binary(data) => this.queue(OpCode::Binary, &data),
            TungMessage::Ping(data) => this.queue(OpCode::Ping, control(&data)?),
            TungMessage::Pong(data) => this.queue(OpCode::Pong, control(&data)?),
            TungMessage::Close(frame) => {
                this.queue_close(
                    frame
                        .as_ref()
                        .map(|f| (u16::from(f.code), f.reason.as_str())),
                );
            }
            TungMessage::Frame(_) => {
                return Err(WsError::Protocol(ProtocolError::InvalidOpcode(0xFF)));
            }
        }
        Ok(())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let this = &mut *self;
        this.queue_pong();
        ready!(this.poll_write_out(cx))?;
        ready!(Pin::new(&mut this.io).poll_flush(cx))?;
        Poll::Ready(Ok(()))
    }

    /// Sends a close frame unless one was sent (an answer to the client's
    /// included), and flushes. The TLS stream stays open for the caller's
    /// lingering close.
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        if !self.close_sent {
            self.queue_close(None);
        }
        self.poll_flush(cx)
    }
}

/// A control frame's payload, refused past 125 bytes.
fn control(payload: &[u8]) -> Result<&[u8], WsError> {
    if payload.len() > ws::MAX_CONTROL_PAYLOAD {
        return Err(WsError::Protocol(ProtocolError::ControlFrameTooBig));
    }
    Ok(payload)
}

#[cfg(test)]
mod tests;
