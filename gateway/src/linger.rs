//! Lingering close: how a connection the gateway ends is let go, so the
//! last thing the gateway wrote (a close frame, an HTTP refusal) reaches
//! the client even while the client is still sending.
//!
//! Dropping a TCP socket that has unread data makes the kernel answer with
//! RST instead of FIN (RFC 1122 4.2.2.13). A client that is still writing
//! (a big message being refused with 1009, a burst before a 1008) then gets
//! the reset, and its TLS/WebSocket stack discards what it had not yet read
//! — the close frame. Measured with a real client still writing a 1 MiB
//! message: the 1009 frame arrived in 2 of 50 tries.
//!
//! So, as nginx's `lingering_close` does: after the last frame, send
//! close_notify and FIN (the write side is shut), then read and discard what
//! the client still sends until it closes its side, for at most
//! [`LINGER_TIME`] and [`LINGER_BYTES`], then drop the socket. Nothing is
//! decrypted: the bytes are read raw from the socket into a stack buffer of
//! [`DISCARD_CHUNK`] bytes that lives only while a read is ready, so a
//! lingering client holds no buffer while it waits.

use std::io::ErrorKind;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::tls::ServerTls;

/// Longest a connection lingers after the gateway's last frame. A client
/// answers a close frame within one round trip, and one still sending stops
/// within a few once its stack reads the close; 2 s covers slow mobile links
/// (nginx's `lingering_timeout` is 5 s per read, `lingering_time` 30 s total,
/// for HTTP bodies that can be far larger than a refused message).
pub const LINGER_TIME: Duration = Duration::from_secs(2);

/// Most bytes read and discarded while lingering. A refused message is at
/// most what the client had in flight: its socket buffer and the kernel's
/// (up to 4 MiB with Linux's default `tcp_rmem`/`tcp_wmem` maxima). A client
/// that sends more is not going to read the close; it gets the reset.
pub const LINGER_BYTES: usize = 4 << 20;

/// Bytes discarded per read, on the stack of the thread doing the read.
const DISCARD_CHUNK: usize = 16 << 10;

/// Lets go of a TLS connection the gateway has ended: close_notify and FIN,
/// then reads and discards until the client closes its side, [`LINGER_TIME`]
/// passes or [`LINGER_BYTES`] are read. Returns the bytes discarded.
///
/// Call it after the last frame is written; the caller drops the stream after.
pub async fn linger(tls: &mut ServerTls) -> usize {
    let deadline = Instant::now() + LINGER_TIME;
    // close_notify, flush, then shutdown(SHUT_WR): the client reads its
    // close and then EOF. Bounded: the client's window may be shut.
    if tokio::time::timeout_at(deadline, tls.shutdown())
        .await
        .is_err()
    {
        return 0;
    }
    let tcp = tls.tcp();
    let mut discarded = 0;
    while discarded < LINGER_BYTES {
        match tokio::time::timeout_at(deadline, tcp.readable()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => break,
        }
        match discard_ready(tcp) {
            Ok(0) => break,
            Ok(n) => discarded += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
    }
    discarded
}

/// Reads and drops what the socket has ready; `Ok(0)` when the client has
/// closed its side.
fn discard_ready(tcp: &TcpStream) -> std::io::Result<usize> {
    let mut chunk = [0u8; DISCARD_CHUNK];
    let mut total = 0;
    loop {
        match tcp.try_read(&mut chunk) {
            Ok(0) if total == 0 => return Ok(0),
            Ok(0) => return Ok(total),
            Ok(n) => total += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock && total > 0 => return Ok(total),
            Err(e) => return Err(e),
        }
        if total >= LINGER_BYTES {
            return Ok(total);
        }
    }
}
