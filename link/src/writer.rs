//! The writing half of a link end, the same on both ends: the gateway's
//! links and the service's links run this one writer, so both keep the
//! rules of docs/link-protocol.md ("Health") the same way.
//!
//! Invariants:
//! - **Every write is bounded.** A batch (at most [`WRITE_BATCH_FRAMES`]
//!   frames and its flush) that does not finish within `write_timeout` ends
//!   the writer with an error: the peer stopped reading, and a link nobody
//!   reads must be torn down, not kept up with clients bound to it.
//! - **The writer pings.** A `Ping` goes out every `ping_interval` whatever
//!   the traffic, from here, never through the data queue, so a full queue
//!   cannot silence a healthy end.
//! - **Pongs do not queue behind data.** The reader hands each ping's nonce
//!   to [`Pongs::answer`]; the writer answers the newest one before the next
//!   batch of data (an older unanswered nonce is superseded: the peer needs
//!   only to hear something).
//! - **Stop writes what is queued, then the last word.** [`LinkWriter::stop`]
//!   writes the frames already queued and then the final frame (a `Goaway`),
//!   all within `write_timeout`.

use std::future::Future;
use std::io;
use std::time::Duration;

use futures_util::SinkExt;
use tokio::io::AsyncWrite;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tokio_util::codec::FramedWrite;
use tracing::Instrument;

use crate::proto::{CodecError, Frame, FrameCodec};

/// Most frames written in one batch (one flush), so a busy queue holds a
/// ping or pong back by at most one batch.
pub const WRITE_BATCH_FRAMES: usize = 64;
/// Shortest ping interval accepted; a zero interval would spin.
const MIN_PING_INTERVAL: Duration = Duration::from_millis(1);

/// How a link end writes.
#[derive(Clone, Copy, Debug)]
pub struct WriterConfig {
    /// A `Ping` goes out this often, whatever the traffic.
    pub ping_interval: Duration,
    /// Bound on each batch of writes and on the final flush at stop.
    pub write_timeout: Duration,
}

/// The reader's side of the pong rule: it answers pings through this, never
/// through the data queue.
#[derive(Debug)]
pub struct Pongs(watch::Sender<u64>);

impl Pongs {
    /// Asks the writer to answer the ping `nonce` (the newest wins).
    pub fn answer(&self, nonce: u64) {
        self.0.send_replace(nonce);
    }
}

/// A running writer task; the frames go in through the queue given to
/// [`LinkWriter::spawn`].
#[derive(Debug)]
pub struct LinkWriter {
    stop: Option<oneshot::Sender<Option<Frame>>>,
    task: JoinHandle<Result<(), CodecError>>,
}

impl LinkWriter {
    /// Spawns the writer of `sink`: it writes what arrives on `frames`, the
    /// pongs asked for through the returned [`Pongs`] and its own pings.
    /// `on_written` is told how many data frames each batch wrote.
    ///
    /// The writer ends on a write error or timeout (the task's result says
    /// which), at [`LinkWriter::stop`], or when every sender of `frames` is
    /// dropped.
    ///
    /// # Panics
    /// When called outside a Tokio runtime.
    pub fn spawn<W>(
        sink: FramedWrite<W, FrameCodec>,
        frames: mpsc::Receiver<Frame>,
        config: WriterConfig,
        on_written: impl FnMut(usize) + Send + 'static,
    ) -> (LinkWriter, Pongs)
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (pong_tx, pong_rx) = watch::channel(0u64);
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(
            write_loop(sink, frames, pong_rx, stop_rx, config, on_written).in_current_span(),
        );
        (
            LinkWriter {
                stop: Some(stop_tx),
                task,
            },
            Pongs(pong_tx),
        )
    }

    /// Waits until the writer ends by itself: a write error or timeout
    /// (`Err`), or its queue closed (`Ok`).
    ///
    /// # Cancel safety
    /// Cancel safe: the writer keeps running.
    pub async fn ended(&mut self) -> Result<(), CodecError> {
        match (&mut self.task).await {
            Ok(result) => result,
            Err(join) => Err(CodecError::Io(io::Error::other(join.to_string()))),
        }
    }

    /// Writes what is queued, then `last` (a `Goaway`) if given, bounded by
    /// `write_timeout` each; waits for that, then ends the writer.
    pub async fn stop(mut self, last: Option<Frame>, write_timeout: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(last);
        }
        // The writer bounds its own writes; this bounds a writer stuck
        // before it saw the stop (e.g. in a batch that is timing out).
        if timeout(write_timeout * 2, &mut self.task).await.is_err() {
            self.task.abort();
        }
    }
}

impl Drop for LinkWriter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn write_loop<W>(
    mut sink: FramedWrite<W, FrameCodec>,
    mut frames: mpsc::Receiver<Frame>,
    mut pongs: watch::Receiver<u64>,
    mut stop: oneshot::Receiver<Option<Frame>>,
    config: WriterConfig,
    mut on_written: impl FnMut(usize),
) -> Result<(), CodecError>
where
    W: AsyncWrite + Unpin,
{
    let interval = config.ping_interval.max(MIN_PING_INTERVAL);
    let mut ping = tokio::time::interval_at(Instant::now() + interval, interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ping_nonce = 0u64;
    let mut pongs_open = true;
    loop {
        let first = tokio::select! {
            biased;
            last = &mut stop => {
                // What is queued goes first (clients' closes after a drain),
                // then the last word.
                let queued = bounded(config.write_timeout, async {
                    let mut n = 0;
                    while let Ok(frame) = frames.try_recv() {
                        sink.feed(frame).await?;
                        n += 1;
                    }
                    if let Ok(Some(frame)) = last {
                        sink.feed(frame).await?;
                    }
                    SinkExt::<Frame>::flush(&mut sink).await?;
                    Ok(n)
                })
                .await?;
                on_written(queued);
                return Ok(());
            }
            changed = pongs.changed(), if pongs_open => match changed {
                Ok(()) => Some(Frame::Pong { nonce: *pongs.borrow_and_update() }),
                Err(_) => {
                    pongs_open = false;
                    continue;
                }
            },
            _ = ping.tick() => {
                ping_nonce = ping_nonce.wrapping_add(1);
                Some(Frame::Ping { nonce: ping_nonce })
            }
            frame = frames.recv() => match frame {
                Some(frame) => {
                    let written = bounded(config.write_timeout, async {
                        sink.feed(frame).await?;
                        let mut n = 1;
                        while n < WRITE_BATCH_FRAMES {
                            match frames.try_recv() {
                                Ok(frame) => sink.feed(frame).await?,
                                Err(_) => break,
                            }
                            n += 1;
                        }
                        SinkExt::<Frame>::flush(&mut sink).await?;
                        Ok(n)
                    })
                    .await?;
                    on_written(written);
                    None
                }
                None => return Ok(()),
            },
        };
        if let Some(control) = first {
            bounded(config.write_timeout, sink.send(control)).await?;
        }
    }
}

/// Runs a write with a deadline; a write that cannot finish means the peer
/// stopped reading.
async fn bounded<T>(
    limit: Duration,
    write: impl Future<Output = Result<T, CodecError>>,
) -> Result<T, CodecError> {
    match timeout(limit, write).await {
        Ok(result) => result,
        Err(_elapsed) => Err(CodecError::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("link write did not finish within {limit:?}"),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio::io::{duplex, DuplexStream};
    use tokio_util::codec::FramedRead;

    const CONFIG: WriterConfig = WriterConfig {
        ping_interval: Duration::from_secs(10),
        write_timeout: Duration::from_secs(3),
    };

    fn writer(
        buffer: usize,
    ) -> (
        LinkWriter,
        Pongs,
        mpsc::Sender<Frame>,
        FramedRead<DuplexStream, FrameCodec>,
    ) {
        let (ours, theirs) = duplex(buffer);
        let (tx, rx) = mpsc::channel(16);
        let sink = FramedWrite::new(ours, FrameCodec::default());
        let (w, pongs) = LinkWriter::spawn(sink, rx, CONFIG, |_| {});
        (w, pongs, tx, FramedRead::new(theirs, FrameCodec::default()))
    }

    #[tokio::test(start_paused = true)]
    async fn the_newest_pong_goes_out_then_pings_on_the_interval() {
        let (_w, pongs, _tx, mut peer) = writer(1 << 16);
        pongs.answer(1);
        pongs.answer(2);
        assert_eq!(
            peer.next().await.unwrap().unwrap(),
            Frame::Pong { nonce: 2 }
        );
        let before = Instant::now();
        assert_eq!(
            peer.next().await.unwrap().unwrap(),
            Frame::Ping { nonce: 1 }
        );
        assert_eq!(before.elapsed(), CONFIG.ping_interval);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_ends_the_writer_after_write_timeout() {
        let (mut w, _pongs, tx, _peer) = writer(64);
        let frame = Frame::Pong { nonce: 0 };
        for _ in 0..16 {
            tx.send(frame.clone()).await.unwrap();
        }
        let before = Instant::now();
        let err = w.ended().await.unwrap_err();
        assert!(
            matches!(&err, CodecError::Io(e) if e.kind() == io::ErrorKind::TimedOut),
            "{err}"
        );
        assert_eq!(before.elapsed(), CONFIG.write_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn stop_writes_what_is_queued_then_the_last_frame() {
        let (w, _pongs, tx, mut peer) = writer(1 << 16);
        for nonce in 1..=3 {
            tx.send(Frame::Pong { nonce }).await.unwrap();
        }
        let goaway = Frame::Goaway {
            code: 0,
            reason: "bye".into(),
        };
        w.stop(Some(goaway.clone()), CONFIG.write_timeout).await;
        for nonce in 1..=3 {
            assert_eq!(peer.next().await.unwrap().unwrap(), Frame::Pong { nonce });
        }
        assert_eq!(peer.next().await.unwrap().unwrap(), goaway);
    }
}
