//! A TLS server stream that holds no buffer while its client is idle.
//!
//! # Why it is written by hand
//! tokio-rustls drives rustls's buffered `ServerConnection`, whose read
//! buffer shrinks back to 4 KiB but never to zero, and it reads on every
//! poll: every idle client keeps 4 KiB it is not using. Measured with rustls
//! 0.23 and ring, TLS 1.3, 2000 idle connections: 1,168 B inline + 6,281 B
//! heap per buffered connection after an idle read, against 1,088 B +
//! 2,089 B for the caller-buffered `UnbufferedServerConnection` this stream
//! drives. For a gateway whose clients are mostly idle that is most of what
//! one client costs (10.9 KiB RSS per idle client on tokio-rustls).
//!
//! # What a client holds
//! Between polls a [`LeanTlsStream`] keeps only what must survive:
//! - `partial`: ciphertext of a record not yet complete (and the handshake
//!   fragments rustls reassembles in place inside it);
//! - `unsent`: ciphertext the socket did not take;
//! - `plaintext`: decrypted bytes the reader did not take.
//!
//! Each is unallocated when empty, so an idle client holds no buffer at all
//! ([`LeanTlsStream::held_bytes`] is 0). Ciphertext is read into, and
//! application data encrypted into, one scratch buffer per thread
//! ([`with_scratch`]); only the leftovers above are copied out of it.
//!
//! # The rustls API this depends on
//! rustls's unbuffered API changes shape in 0.24 (caller-owned input buffers
//! via `TlsInputBuffer`, `SplitConnection`). Everything that touches it is in
//! this module, and only [`process`] walks its state machine: porting means
//! rewriting that function and the handshake entry, not the callers, which
//! see a plain `AsyncRead + AsyncWrite`.
//!
//! # Semantics (as tokio-rustls)
//! - Reads return 0 after the peer's close_notify; a TCP EOF without one is
//!   an `UnexpectedEof` error.
//! - `poll_shutdown` sends close_notify, then shuts the socket's write side.
//! - A TLS error (including a received fatal alert) is an `InvalidData`
//!   error carrying the `rustls::Error`; the alert rustls answers with is
//!   sent on a best-effort basis.
//! - A KeyUpdate from the client is applied at once; the answer rustls owes
//!   goes out with the next write.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::mem;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, UnbufferedStatus,
};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Ciphertext taken from the socket in one read: one whole record of the
/// largest size (16 KiB of plaintext plus header, content type, tag and what
/// TLS 1.2 may add), so a full record never needs two reads.
const READ_BYTES: usize = 16 * 1024 + 2048 + 5;
/// Plaintext taken by one `poll_write` (four full records), as much as
/// tokio-rustls takes (rustls's 64 KiB buffer limit). Bounds what a client
/// whose socket is full keeps in `unsent` to about this much. Not less:
/// tungstenite drains what a write took from the front of its out buffer,
/// so writing one message costs its length squared over this; at one record
/// (16 KiB) an 18 MiB message took seconds of memmove on a worker and
/// starved the service's link past its ping timeout.
const WRITE_BYTES: usize = 4 * RECORD_PLAINTEXT;
/// The most plaintext one TLS record carries.
const RECORD_PLAINTEXT: usize = 16 * 1024;
/// Bytes a record adds to its plaintext, rounded up: header 5, TLS 1.2
/// explicit nonce 8, tag 16, TLS 1.3 content type 1.
const RECORD_OVERHEAD: usize = 64;
/// Room for records rustls sends ahead of application data (a KeyUpdate).
const OUT_SLACK: usize = 256;

thread_local! {
    /// The scratch buffer of this worker thread (see [`with_scratch`]).
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch buffer, at least `len` bytes long. The
/// buffer grows to the largest length asked and stays: one per worker
/// thread, not one per client. If it is already in use (a stream driven
/// from inside another's poll), `f` gets a buffer of its own.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < len {
                buf.resize(len, 0);
            }
            f(&mut buf[..len])
        }
        Err(_) => f(&mut vec![0; len]),
    })
}

/// A TLS server connection over `IO` (a `TcpStream` in the gateway) that
/// implements `AsyncRead` and `AsyncWrite`, holding no buffer while idle.
pub struct LeanTlsStream<IO> {
    io: IO,
    /// The TLS state and keys: what an idle client costs.
    conn: UnbufferedServerConnection,
    held: Held,
}

/// What a client keeps between polls. Every buffer is unallocated when empty.
#[derive(Default)]
struct Held {
    /// Ciphertext received but not yet processed: an incomplete record.
    partial: Vec<u8>,
    /// Ciphertext the socket has not taken, from `unsent_from` on.
    unsent: Vec<u8>,
    unsent_from: usize,
    /// Decrypted data the reader has not taken, from `plaintext_from` on.
    plaintext: Vec<u8>,
    plaintext_from: usize,
    /// The peer sent close_notify: reads end cleanly.
    peer_closed: bool,
    /// The socket reached EOF.
    eof: bool,
    /// We queued close_notify: nothing more may be written.
    close_sent: bool,
    /// rustls reported an error: its state is not driven again.
    failed: bool,
    /// `partial` holds bytes rustls has not seen yet (read by
    /// [`LeanTlsStream::client_hello`]): process them before reading more.
    unseen: bool,
}

/// What [`process`] should do once rustls can take application data.
enum Intent<'a> {
    /// Nothing: stop when rustls needs more ciphertext.
    Read,
    /// Encrypt `plaintext` into `out`.
    Encrypt {
        plaintext: &'a [u8],
        out: &'a mut [u8],
    },
    /// Queue close_notify into `unsent`.
    CloseNotify,
}

/// Why [`process`] stopped.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// rustls needs more ciphertext before it can go on.
    Idle,
    /// `Intent::Encrypt` wrote this many bytes of ciphertext.
    Encrypted(usize),
    /// `Intent::Encrypt` needs an output buffer of this many bytes.
    OutTooSmall(usize),
    /// Both sides sent close_notify.
    Closed,
}

impl<IO> LeanTlsStream<IO> {
    /// A server connection on `io` that has not started its handshake; run
    /// it with [`LeanTlsStream::handshake`].
    ///
    /// # Errors
    /// When rustls refuses the config.
    pub fn new(io: IO, config: Arc<ServerConfig>) -> Result<Self, rustls::Error> {
        Ok(Self {
            io,
            conn: UnbufferedServerConnection::new(config)?,
            held: Held::default(),
        })
    }

    /// The socket.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Whether the handshake has not completed yet.
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// The ALPN protocol agreed in the handshake.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// The TLS version agreed in the handshake.
    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.conn.protocol_version()
    }

    /// Heap bytes this client's buffers hold (allocated capacity, not
    /// counting rustls's own state). 0 whenever the client is idle.
    pub fn held_bytes(&self) -> usize {
        let h = &self.held;
        h.partial.capacity() + h.unsent.capacity() + h.plaintext.capacity()
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> LeanTlsStream<IO> {
    /// Runs the TLS handshake on `io` to its end.
    ///
    /// # Errors
    /// The socket's error, `UnexpectedEof` if the client leaves, or
    /// `InvalidData` carrying the `rustls::Error`.
    ///
    /// # Cancel safety
    /// Dropping the future leaves the handshake half done; the stream is
    /// then only fit to be dropped.
    pub async fn accept(io: IO, config: Arc<ServerConfig>) -> io::Result<Self> {
        let mut stream = Self::new(io, config).map_err(invalid_data)?;
        stream.handshake().await?;
        Ok(stream)
    }

    /// Waits until the first whole TLS record (the ClientHello, or its
    /// first part) has arrived, without handing it to rustls: the caller
    /// decides when to spend the handshake's CPU work. Then call
    /// [`LeanTlsStream::handshake`].
    ///
    /// # Errors
    /// The socket's error, `UnexpectedEof`, or `InvalidData` when the first
    /// bytes are not a TLS handshake record.
    ///
    /// # Cancel safety
    /// Cancel safe: what arrived is kept for the next call or the handshake.
    pub async fn client_hello(&mut self) -> io::Result<()> {
        poll_fn(|cx| self.poll_client_hello(cx)).await
    }

    fn poll_client_hello(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        /// TLS record header: content type, version, length.
        const HEADER: usize = 5;
        /// The content type of handshake records.
        const HANDSHAKE: u8 = 0x16;
        /// Longest plaintext record (RFC 8446 5.1): a longer one is refused
        /// at once rather than waited for.
        const MAX_FRAGMENT: usize = 1 << 14;
        loop {
            let kept = &self.held.partial;
            if let Some(&kind) = kept.first() {
                if kind != HANDSHAKE {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "not a tls handshake record",
                    )));
                }
            }
            if kept.len() >= HEADER {
                let len = usize::from(u16::from_be_bytes([kept[3], kept[4]]));
                if len > MAX_FRAGMENT {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "tls record longer than 16 KiB",
                    )));
                }
                if kept.len() >= HEADER + len {
                    return Poll::Ready(Ok(()));
                }
            }
            let Self { io, held, .. } = &mut *self;
            ready!(with_scratch(READ_BYTES, |scratch| {
                let mut fresh = ReadBuf::new(scratch);
                ready!(Pin::new(io).poll_read(cx, &mut fresh))?;
                if fresh.filled().is_empty() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "eof before a whole client hello",
                    )));
                }
                held.partial.extend_from_slice(fresh.filled());
                held.unseen = true;
                Poll::Ready(Ok(()))
            }))?;
        }
    }

    /// Runs the handshake to its end (returns at once when it is done).
    ///
    /// # Errors
    /// As [`LeanTlsStream::accept`].
    ///
    /// # Cancel safety
    /// Cancel safe: a later call goes on where this one stopped.
    pub async fn handshake(&mut self) -> io::Result<()> {
        poll_fn(|cx| self.poll_handshake(cx)).await
    }

    /// Drives the handshake: sends what rustls produced and reads while
    /// sending waits (a client may write before it reads, as rustls's own
    /// does with its compatibility ChangeCipherSpec). Ready once the
    /// handshake is complete and its last flight is sent. In TLS 1.3 what
    /// the server sends after the client's Finished is only session tickets,
    /// which no client waits for: what of them the socket has not taken goes
    /// out with the next write or flush.
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let sent = match self.poll_send(cx) {
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => true,
                Poll::Pending => false,
            };
            if !self.conn.is_handshaking() {
                if sent || self.conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3) {
                    return Poll::Ready(Ok(()));
                }
                return Poll::Pending;
            }
            if self.held.eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tls handshake eof",
                )));
            }
            if let Err(e) = ready!(self.poll_receive(cx, None)) {
                let _ = self.poll_send(cx);
                return Poll::Ready(Err(e));
            }
        }
    }

    /// Writes `unsent` to the socket; ready once all of it is taken, and
    /// then frees it.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let held = &mut self.held;
        while held.unsent_from < held.unsent.len() {
            let n =
                ready!(Pin::new(&mut self.io).poll_write(cx, &held.unsent[held.unsent_from..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            held.unsent_from += n;
        }
        if held.unsent.capacity() > 0 {
            held.unsent = Vec::new();
            held.unsent_from = 0;
        }
        Poll::Ready(Ok(()))
    }

    /// Reads once from the socket into the scratch buffer (after the kept
    /// partial record; no read when it holds bytes rustls has not seen) and
    /// runs rustls over it. Decrypted data goes to
    /// `reader` as far as it fits, the rest to `plaintext`; what is left of
    /// an incomplete record goes back to `partial`. Ready after one read
    /// that returned data or EOF.
    fn poll_receive(
        &mut self,
        cx: &mut Context<'_>,
        reader: Option<&mut ReadBuf<'_>>,
    ) -> Poll<io::Result<()>> {
        let Self { io, conn, held } = self;
        let partial = mem::take(&mut held.partial);
        let kept = partial.len();
        with_scratch(kept + READ_BYTES, |scratch| {
            scratch[..kept].copy_from_slice(&partial);
            let n = if mem::take(&mut held.unseen) {
                0
            } else {
                let mut fresh = ReadBuf::new(&mut scratch[kept..]);
                let read = Pin::new(io).poll_read(cx, &mut fresh);
                let n = fresh.filled().len();
                match read {
                    Poll::Ready(Ok(())) if n > 0 => n,
                    Poll::Ready(Ok(())) => {
                        held.eof = true;
                        held.partial = partial;
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Ready(Err(e)) => {
                        held.partial = partial;
                        return Poll::Ready(Err(e));
                    }
                    Poll::Pending => {
                        held.partial = partial;
                        return Poll::Pending;
                    }
                }
            };
            let filled = kept + n;
            let (done, result) = process(conn, held, &mut scratch[..filled], Intent::Read, reader);
            // After close_notify rustls reads nothing more: drop what follows.
            held.partial = if done < filled && result.is_ok() && !held.peer_closed {
                scratch[done..filled].to_vec()
            } else {
                Vec::new()
            };
            Poll::Ready(result.map(drop).map_err(invalid_data))
        })
    }

    /// Encrypts `plaintext` into the scratch buffer and writes it to the
    /// socket; what the socket does not take goes to `unsent`.
    fn encrypt_and_send(&mut self, cx: &mut Context<'_>, plaintext: &[u8]) -> io::Result<()> {
        let mut out_len = plaintext.len()
            + (plaintext.len() / RECORD_PLAINTEXT + 1) * RECORD_OVERHEAD
            + OUT_SLACK;
        loop {
            let Self { io, conn, held } = &mut *self;
            let stop = with_scratch(out_len, |out| {
                let mut partial = mem::take(&mut held.partial);
                let intent = Intent::Encrypt {
                    plaintext,
                    out: &mut *out,
                };
                let (done, result) = process(conn, held, &mut partial, intent, None);
                partial.drain(..done);
                if !partial.is_empty() {
                    held.partial = partial;
                }
                let stop = result.map_err(invalid_data)?;
                if let Stop::Encrypted(n) = stop {
                    held.send_or_keep(io, cx, &out[..n])?;
                }
                Ok::<_, io::Error>(stop)
            })?;
            match stop {
                Stop::Encrypted(_) => return Ok(()),
                Stop::OutTooSmall(needed) => out_len = needed,
                Stop::Idle | Stop::Closed => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        "tls connection cannot send application data",
                    ))
                }
            }
        }
    }
}

impl Held {
    /// Hands decrypted data to `reader` as far as it fits, keeping the rest
    /// (after anything already kept, so order holds).
    fn keep_plaintext(&mut self, payload: &[u8], reader: Option<&mut ReadBuf<'_>>) {
        let mut rest = payload;
        if let Some(reader) = reader {
            if self.plaintext_from == self.plaintext.len() {
                let n = rest.len().min(reader.remaining());
                reader.put_slice(&rest[..n]);
                rest = &rest[n..];
            }
        }
        if !rest.is_empty() {
            self.plaintext.extend_from_slice(rest);
        }
    }

    /// Copies kept plaintext into `buf`; false when there is none. Frees the
    /// buffer once the reader has taken all of it.
    fn take_plaintext(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let kept = &self.plaintext[self.plaintext_from..];
        if kept.is_empty() {
            return false;
        }
        let n = kept.len().min(buf.remaining());
        buf.put_slice(&kept[..n]);
        self.plaintext_from += n;
        if self.plaintext_from == self.plaintext.len() {
            self.plaintext = Vec::new();
            self.plaintext_from = 0;
        }
        true
    }

    /// Writes `ciphertext` to the socket as far as it takes it now, and
    /// keeps the rest in `unsent`. Behind earlier unsent bytes it is only
    /// queued, so order holds.
    fn send_or_keep<IO: AsyncWrite + Unpin>(
        &mut self,
        io: &mut IO,
        cx: &mut Context<'_>,
        ciphertext: &[u8],
    ) -> io::Result<()> {
        let mut sent = 0;
        if self.unsent_from == self.unsent.len() {
            while sent < ciphertext.len() {
                match Pin::new(&mut *io).poll_write(cx, &ciphertext[sent..]) {
                    Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                    Poll::Ready(Ok(n)) => sent += n,
                    Poll::Ready(Err(e)) => return Err(e),
                    Poll::Pending => break,
                }
            }
        }
        if sent < ciphertext.len() {
            self.unsent.extend_from_slice(&ciphertext[sent..]);
        }
        Ok(())
    }

    /// Appends a handshake record (or alert) rustls produced to `unsent`.
    fn encode(
        &mut self,
        encode: &mut EncodeTlsData<'_, ServerConnectionData>,
    ) -> Result<(), rustls::Error> {
        append(
            &mut self.unsent,
            |out| encode.encode(out),
            |e| match e {
                EncodeError::InsufficientSize(s) => Some(s.required_size),
                EncodeError::AlreadyEncoded => None,
            },
        )
        .map_err(|e| rustls::Error::General(e.to_string()))
    }
}

/// Appends what `write` produces to `out`, sizing the tail by asking
/// `write` first with no room (rustls's encoders say how much they need and
/// change nothing when it is missing).
fn append<E>(
    out: &mut Vec<u8>,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, E>,
    needs: impl Fn(&E) -> Option<usize>,
) -> Result<(), E> {
    let needed = match write(&mut []) {
        Ok(_) => return Ok(()),
        Err(e) => needs(&e).ok_or(e)?,
    };
    let start = out.len();
    out.resize(start + needed, 0);
    match write(&mut out[start..]) {
        Ok(n) => {
            out.truncate(start + n);
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

/// Runs rustls's state machine over `incoming` until it needs more
/// ciphertext or has done `intent`. Returns how many bytes at the front of
/// `incoming` rustls is done with (the caller drops them) and why it
/// stopped. Decrypted data goes to `reader`/`held.plaintext`, records to
/// send to `held.unsent`.
///
/// On an error, the alert rustls queued in answer is encoded into `unsent`
/// too, for the caller to send if it can, and the connection is failed for
/// good: rustls is not driven again (it would answer the same bad input
/// with a second alert).
fn process(
    conn: &mut UnbufferedServerConnection,
    held: &mut Held,
    incoming: &mut [u8],
    mut intent: Intent<'_>,
    mut reader: Option<&mut ReadBuf<'_>>,
) -> (usize, Result<Stop, rustls::Error>) {
    if held.failed {
        return (
            0,
            Err(rustls::Error::General(
                "tls connection failed earlier".into(),
            )),
        );
    }
    let mut done = 0;
    let failed = loop {
        let UnbufferedStatus { mut discard, state } =
            conn.process_tls_records(&mut incoming[done..]);
        let state = match state {
            Ok(state) => state,
            Err(e) => {
                done += discard;
                break e;
            }
        };
        let stop = match state {
            ConnectionState::ReadTraffic(mut traffic) => {
                let mut error = None;
                while let Some(record) = traffic.next_record() {
                    match record {
                        Ok(record) => {
                            discard += record.discard;
                            held.keep_plaintext(record.payload, reader.as_deref_mut());
                        }
                        Err(e) => {
                            error = Some(e);
                            break;
                        }
                    }
                }
                if let Some(e) = error {
                    done += discard;
                    break e;
                }
                None
            }
            ConnectionState::EncodeTlsData(mut encode) => {
                if let Err(e) = held.encode(&mut encode) {
                    done += discard;
                    break e;
                }
                None
            }
            // Encoded records are in `unsent`, which is always sent before
            // anything written later: as good as transmitted.
            ConnectionState::TransmitTlsData(transmit) => {
                transmit.done();
                None
            }
            ConnectionState::PeerClosed => {
                held.peer_closed = true;
                None
            }
            ConnectionState::Closed => Some(Stop::Closed),
            ConnectionState::BlockedHandshake => Some(Stop::Idle),
            ConnectionState::WriteTraffic(mut traffic) => match &mut intent {
                Intent::Read => Some(Stop::Idle),
                Intent::Encrypt { plaintext, out } => match traffic.encrypt(plaintext, out) {
                    Ok(n) => Some(Stop::Encrypted(n)),
                    Err(EncryptError::InsufficientSize(s)) => {
                        Some(Stop::OutTooSmall(s.required_size))
                    }
                    Err(EncryptError::EncryptExhausted) => {
                        done += discard;
                        break rustls::Error::EncryptError;
                    }
                },
                Intent::CloseNotify => {
                    let queued = append(
                        &mut held.unsent,
                        |out| traffic.queue_close_notify(out),
                        |e| match e {
                            EncryptError::InsufficientSize(s) => Some(s.required_size),
                            EncryptError::EncryptExhausted => None,
                        },
                    );
                    if queued.is_err() {
                        done += discard;
                        break rustls::Error::EncryptError;
                    }
                    Some(Stop::Idle)
                }
            },
            // Early data is off (`max_early_data_size` 0); a state added by a
            // later rustls is not one this driver knows how to handle.
            other => {
                done += discard;
                break rustls::Error::General(format!("unexpected tls state {other:?}"));
            }
        };
        done += discard;
        if let Some(stop) = stop {
            return (done, Ok(stop));
        }
    };
    // rustls queued an alert in answer (if the error was its own finding):
    // encode it so the caller can try to send it. One fatal alert is one
    // record, so one call; a second would read the bad input again.
    held.failed = true;
    if let Ok(ConnectionState::EncodeTlsData(mut encode)) =
        conn.process_tls_records(&mut incoming[done..]).state
    {
        let _ = held.encode(&mut encode);
    }
    (done, Err(failed))
}

fn invalid_data(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for LeanTlsStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.held.take_plaintext(buf) || this.held.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if this.held.eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending tls close_notify",
                )));
            }
            // Reading never waits on the socket's write side (a split
            // writer's waker stays its own); what reading produced for the
            // peer goes out with the next write or flush.
            let before = buf.filled().len();
            if let Err(e) = ready!(this.poll_receive(cx, Some(buf))) {
                let _ = this.poll_send(cx);
                return Poll::Ready(Err(e));
            }
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for LeanTlsStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.held.close_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "tls close_notify already sent",
            )));
        }
        let plaintext = &buf[..buf.len().min(WRITE_BYTES)];
        this.encrypt_and_send(cx, plaintext)?;
        Poll::Ready(Ok(plaintext.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.held.close_sent && !this.conn.is_handshaking() {
            this.held.close_sent = true;
            let Self { conn, held, .. } = &mut *this;
            let mut partial = mem::take(&mut held.partial);
            let (done, result) = process(conn, held, &mut partial, Intent::CloseNotify, None);
            partial.drain(..done);
            if !partial.is_empty() {
                held.partial = partial;
            }
            result.map_err(invalid_data)?;
        }
        ready!(this.poll_send(cx))?;
        Poll::Ready(match ready!(Pin::new(&mut this.io).poll_shutdown(cx)) {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            other => other,
        })
    }
}

impl<IO> std::fmt::Debug for LeanTlsStream<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeanTlsStream")
            .field("handshaking", &self.conn.is_handshaking())
            .field("held_bytes", &self.held_bytes())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
