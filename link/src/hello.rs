//! The `Hello` exchange that opens every link, the same on both ends: the
//! gateway dials and offers ([`offer`]), the service answers ([`answer`]).
//! Each end checks the other's `Hello` by the same rules (version, frame
//! cap) and from then on sends no frame above the other's cap.
//!
//! Rules (docs/link-protocol.md, "Handshake"):
//! - The first frame each way is `Hello`; anything else is a protocol error.
//! - Another version is refused ([`HelloError::UnsupportedVersion`]; the
//!   answering end says so in a `Goaway` with code 1).
//! - A frame cap below [`MIN_FRAME_BYTES`] is refused (a protocol error).
//! - The whole exchange is bounded by `within`.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::timeout;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::goaway::Goaway;
use crate::proto::{CodecError, Frame, FrameCodec, MIN_FRAME_BYTES, PROTOCOL_VERSION};

/// What an end learnt from the other's `Hello`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The other end's name (a gateway's is unique in its fleet).
    pub name: String,
    /// The largest frame the other end accepts; the writer's codec is set to
    /// it.
    pub max_frame_bytes: usize,
}

/// Why a `Hello` exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    /// No `Hello` arrived within the bound.
    #[error("no hello within {0:?}")]
    Timeout(Duration),
    /// The other end closed the connection first.
    #[error("closed before hello")]
    Closed,
    /// Reading failed or the bytes were not a frame.
    #[error("reading the hello: {0}")]
    Read(CodecError),
    /// Our own `Hello` could not be written (or not in time).
    #[error("writing the hello: {0}")]
    Write(String),
    /// The other end speaks another version.
    #[error("peer speaks link protocol version {0}, this end {PROTOCOL_VERSION}")]
    UnsupportedVersion(u16),
    /// The other end accepts frames smaller than the protocol allows.
    #[error("peer accepts frames up to {0} bytes, below the protocol's minimum {MIN_FRAME_BYTES}")]
    FrameCapTooSmall(usize),
    /// The other end said goodbye instead.
    #[error("goaway {code}: {reason}")]
    Goaway {
        /// The `Goaway` code.
        code: u16,
        /// Its reason.
        reason: String,
    },
    /// The first frame was not a `Hello`.
    #[error("expected hello, got {0}")]
    Unexpected(&'static str),
}

impl HelloError {
    /// The `Goaway` that tells the other end why, when there is one to say
    /// (nothing after a close, a read i/o error, a write failure or its own
    /// goaway).
    pub fn goaway(&self) -> Option<Frame> {
        let goaway = match self {
            HelloError::UnsupportedVersion(_) => Goaway::UnsupportedVersion(self.to_string()),
            HelloError::FrameCapTooSmall(_) | HelloError::Unexpected(_) => {
                Goaway::ProtocolError(self.to_string())
            }
            HelloError::Read(CodecError::Io(_)) => return None,
            HelloError::Read(_) => Goaway::ProtocolError(self.to_string()),
            HelloError::Timeout(_)
            | HelloError::Closed
            | HelloError::Write(_)
            | HelloError::Goaway { .. } => return None,
        };
        Some(goaway.frame())
    }
}

/// The dialling end (the gateway): sends its `Hello` (`name`, accepting
/// frames up to `max_frame_bytes`), then reads and checks the other's.
///
/// # Errors
/// [`HelloError`] saying which rule failed.
///
/// # Cancel safety
/// Not cancel safe: a cancelled exchange leaves the link unusable.
pub async fn offer<R, W>(
    reader: &mut FramedRead<R, FrameCodec>,
    writer: &mut FramedWrite<W, FrameCodec>,
    name: &str,
    max_frame_bytes: usize,
    within: Duration,
) -> Result<Peer, HelloError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    send_hello(writer, name, max_frame_bytes, within).await?;
    let peer = receive_hello(reader, within).await?;
    *writer.encoder_mut() = FrameCodec::new(peer.max_frame_bytes);
    Ok(peer)
}

/// The answering end (the service): reads and checks the other's `Hello`,
/// then answers with its own (`name`, accepting frames up to
/// `max_frame_bytes`). On a refused `Hello` nothing is answered: the caller
/// sends [`HelloError::goaway`].
///
/// # Errors
/// [`HelloError`] saying which rule failed.
///
/// # Cancel safety
/// Not cancel safe: a cancelled exchange leaves the link unusable.
pub async fn answer<R, W>(
    reader: &mut FramedRead<R, FrameCodec>,
    writer: &mut FramedWrite<W, FrameCodec>,
    name: &str,
    max_frame_bytes: usize,
    within: Duration,
) -> Result<Peer, HelloError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let peer = receive_hello(reader, within).await?;
    send_hello(writer, name, max_frame_bytes, within).await?;
    *writer.encoder_mut() = FrameCodec::new(peer.max_frame_bytes);
    Ok(peer)
}

async fn send_hello<W: AsyncWrite + Unpin>(
    writer: &mut FramedWrite<W, FrameCodec>,
    name: &str,
    max_frame_bytes: usize,
    within: Duration,
) -> Result<(), HelloError> {
    let hello = Frame::Hello {
        version: PROTOCOL_VERSION,
        name: name.to_owned(),
        max_frame_bytes: u32::try_from(max_frame_bytes).unwrap_or(u32::MAX),
    };
    match timeout(within, writer.send(hello)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(HelloError::Write(e.to_string())),
        Err(_elapsed) => Err(HelloError::Write(format!("not written within {within:?}"))),
    }
}

async fn receive_hello<R: AsyncRead + Unpin>(
    reader: &mut FramedRead<R, FrameCodec>,
    within: Duration,
) -> Result<Peer, HelloError> {
    let frame = match timeout(within, reader.next()).await {
        Err(_elapsed) => return Err(HelloError::Timeout(within)),
        Ok(None) => return Err(HelloError::Closed),
        Ok(Some(Err(e))) => return Err(HelloError::Read(e)),
        Ok(Some(Ok(frame))) => frame,
    };
    match frame {
        Frame::Hello {
            version,
            name,
            max_frame_bytes,
        } => {
            if version != PROTOCOL_VERSION {
                return Err(HelloError::UnsupportedVersion(version));
            }
            let max_frame_bytes = usize::try_from(max_frame_bytes).unwrap_or(usize::MAX);
            if max_frame_bytes < MIN_FRAME_BYTES {
                return Err(HelloError::FrameCapTooSmall(max_frame_bytes));
            }
            Ok(Peer {
                name,
                max_frame_bytes,
            })
        }
        Frame::Goaway { code, reason } => Err(HelloError::Goaway { code, reason }),
        other => Err(HelloError::Unexpected(other.type_name())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{GOAWAY_PROTOCOL_ERROR, GOAWAY_UNSUPPORTED_VERSION};
    use tokio::io::{duplex, DuplexStream, ReadHalf, WriteHalf};

    const WITHIN: Duration = Duration::from_secs(5);

    type End = (
        FramedRead<ReadHalf<DuplexStream>, FrameCodec>,
        FramedWrite<WriteHalf<DuplexStream>, FrameCodec>,
    );

    fn ends() -> (End, End) {
        let (a, b) = duplex(1 << 16);
        let framed = |s: DuplexStream| {
            let (r, w) = tokio::io::split(s);
            (
                FramedRead::new(r, FrameCodec::default()),
                FramedWrite::new(w, FrameCodec::default()),
            )
        };
        (framed(a), framed(b))
    }

    #[tokio::test]
    async fn both_ends_learn_the_others_name_and_cap() {
        let ((mut gr, mut gw), (mut sr, mut sw)) = ends();
        let (gateway, service) = tokio::join!(
            offer(&mut gr, &mut gw, "gw", 1 << 20, WITHIN),
            answer(&mut sr, &mut sw, "svc", MIN_FRAME_BYTES, WITHIN),
        );
        let (gateway, service) = (gateway.unwrap(), service.unwrap());
        assert_eq!(
            (gateway.name.as_str(), gateway.max_frame_bytes),
            ("svc", MIN_FRAME_BYTES)
        );
        assert_eq!(
            (service.name.as_str(), service.max_frame_bytes),
            ("gw", 1 << 20)
        );
        // Each writer now refuses frames above the other's cap.
        let big = Frame::Publish {
            topic: "t".into(),
            kind: crate::proto::Kind::Binary,
            payload: vec![0u8; MIN_FRAME_BYTES].into(),
        };
        assert!(matches!(
            gw.send(big).await,
            Err(CodecError::FrameTooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn another_version_is_refused_with_goaway_code_1() {
        let ((_, mut gw), (mut sr, mut sw)) = ends();
        let old = Frame::Hello {
            version: PROTOCOL_VERSION + 1,
            name: "gw".into(),
            max_frame_bytes: 1 << 20,
        };
        gw.send(old).await.unwrap();
        let err = answer(&mut sr, &mut sw, "svc", 1 << 20, WITHIN)
            .await
            .unwrap_err();
        assert!(matches!(err, HelloError::UnsupportedVersion(v) if v == PROTOCOL_VERSION + 1));
        assert!(matches!(
            err.goaway(),
            Some(Frame::Goaway {
                code: GOAWAY_UNSUPPORTED_VERSION,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn a_cap_below_the_minimum_and_a_first_frame_not_hello_are_protocol_errors() {
        let ((mut gr, mut gw), (_, mut sw)) = ends();
        let tiny = Frame::Hello {
            version: PROTOCOL_VERSION,
            name: "svc".into(),
            max_frame_bytes: (MIN_FRAME_BYTES - 1) as u32,
        };
        sw.send(tiny).await.unwrap();
        let err = offer(&mut gr, &mut gw, "gw", 1 << 20, WITHIN)
            .await
            .unwrap_err();
        assert!(matches!(err, HelloError::FrameCapTooSmall(_)), "{err}");
        assert!(matches!(
            err.goaway(),
            Some(Frame::Goaway {
                code: GOAWAY_PROTOCOL_ERROR,
                ..
            })
        ));

        let ((mut gr, mut gw), (_, mut sw)) = ends();
        sw.send(Frame::Ping { nonce: 1 }).await.unwrap();
        let err = offer(&mut gr, &mut gw, "gw", 1 << 20, WITHIN)
            .await
            .unwrap_err();
        assert!(matches!(err, HelloError::Unexpected("ping")), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn silence_ends_the_exchange_after_its_bound() {
        let ((mut gr, mut gw), _service) = ends();
        let err = offer(&mut gr, &mut gw, "gw", 1 << 20, WITHIN)
            .await
            .unwrap_err();
        assert!(
            matches!(err, HelloError::Timeout(d) if d == WITHIN),
            "{err}"
        );
    }
}
