//! `edgegate-write-floor`: the fan-out benchmark's reference line. One thread
//! writes the same small message to N open TLS WebSocket connections, and
//! does nothing else: no queue per client, no task wake-ups, no topic.
//!
//! Whatever a fan-out server adds on top of "encrypt one record and write it,
//! per subscriber" shows as the distance from this floor, measured with the
//! same subscribers and the same load generator (`tests/bench`, system
//! `floor`). Clients on `--publish-path` publish: every data message they
//! send is written, as one binary frame, to every other client. The frame is
//! encoded once; the TLS record is sealed per connection, as it must be.
//!
//! ```text
//! edgegate-write-floor --listen 127.0.0.1:7300 --cert cert.pem --key key.pem
//! ```
//!
//! Everything runs on one current-thread runtime. The fan-out loop is not
//! budgeted by Tokio's cooperative scheduling, so a publish runs start to
//! end without yielding: the floor is the fastest one thread can go, not a
//! fair server. A subscriber whose write fails is dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use clap::Parser;
use edgegate::config::Protocol;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Read buffer per connection: subscribers send nothing, publishers little.
const READ_BUFFER_BYTES: usize = 2048;
/// Listen backlog: a benchmark connects thousands of clients quickly.
const BACKLOG: u32 = 4096;

#[derive(Debug, Parser)]
#[command(about = "Fan-out floor: one thread writing a message to N TLS WebSocket clients")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:7300")]
    listen: SocketAddr,
    /// Certificate chain, PEM.
    #[arg(long)]
    cert: PathBuf,
    /// Private key, PEM.
    #[arg(long)]
    key: PathBuf,
    /// Clients on this path publish; clients on any other path subscribe.
    #[arg(long, default_value = "/pub")]
    publish_path: String,
}

type Subscriber = WebSocketStream<TlsStream<TcpStream>>;

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let _ = edgegate::runtime::raise_nofile_limit();
    let config = match edgegate::tls::server_config(&args.cert, &args.key, Protocol::WebSocket) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edgegate-write-floor: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(serve(args, TlsAcceptor::from(Arc::new(config))))
}

async fn serve(args: Args, acceptor: TlsAcceptor) -> std::process::ExitCode {
    let listener = match TcpSocket::new_v4()
        .and_then(|s| {
            s.set_reuseaddr(true)?;
            s.bind(args.listen)?;
            Ok(s)
        })
        .and_then(|s| s.listen(BACKLOG))
    {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "edgegate-write-floor: cannot listen on {}: {e}",
                args.listen
            );
            return std::process::ExitCode::FAILURE;
        }
    };
    let (sub_tx, sub_rx) = mpsc::unbounded_channel();
    let (pub_tx, pub_rx) = mpsc::unbounded_channel();
    tokio::spawn(fan_out(sub_rx, pub_rx));
    let publish_path: Arc<str> = args.publish_path.into();
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                tokio::spawn(open(
                    tcp,
                    acceptor.clone(),
                    publish_path.clone(),
                    sub_tx.clone(),
                    pub_tx.clone(),
                ));
            }
            // EMFILE and friends: back off instead of spinning or exiting.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
}

/// TLS, the upgrade, then either hand the connection to the fan-out loop
/// (a subscriber) or read its messages as publishes (a publisher).
async fn open(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    publish_path: Arc<str>,
    subscribers: mpsc::UnboundedSender<Subscriber>,
    publishes: mpsc::UnboundedSender<Bytes>,
) {
    let _ = tcp.set_nodelay(true);
    let Ok(tls) = acceptor.accept(tcp).await else {
        return;
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0);
    let mut publisher = false;
    // The error type is tungstenite's callback contract, not ours to shrink.
    #[allow(clippy::result_large_err)]
    let note_path = |req: &Request, resp: Response| {
        publisher = req.uri().path() == &*publish_path;
        Ok(resp)
    };
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async_with_config(tls, note_path, Some(config)).await
    else {
        return;
    };
    if !publisher {
        let _ = subscribers.send(ws);
        return;
    }
    while let Some(Ok(msg)) = ws.next().await {
        match msg {
            Message::Binary(b) => {
                let _ = publishes.send(b);
            }
            Message::Text(t) => {
                let _ = publishes.send(Bytes::copy_from_slice(t.as_ref()));
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
}

/// Owns every subscriber; writes each publish to all of them in one pass.
async fn fan_out(
    mut subscribers: mpsc::UnboundedReceiver<Subscriber>,
    mut publishes: mpsc::UnboundedReceiver<Bytes>,
) {
    let mut subs: Vec<Subscriber> = Vec::new();
    loop {
        tokio::select! {
            Some(s) = subscribers.recv() => subs.push(s),
            Some(payload) = publishes.recv() => {
                // Subscribers that finished their upgrade before this publish.
                while let Ok(s) = subscribers.try_recv() {
                    subs.push(s);
                }
                let frame = binary_frame(&payload);
                let started = Instant::now();
                let before = subs.len();
                subs = tokio::task::unconstrained(write_all(std::mem::take(&mut subs), &frame)).await;
                eprintln!(
                    "edgegate-write-floor: {} bytes to {} subscribers in {:.3} ms ({} dropped)",
                    payload.len(),
                    subs.len(),
                    started.elapsed().as_secs_f64() * 1000.0,
                    before - subs.len()
                );
            }
            else => return,
        }
    }
}

/// Writes `frame` to every subscriber in turn; returns those still open.
async fn write_all(subs: Vec<Subscriber>, frame: &[u8]) -> Vec<Subscriber> {
    let mut alive = Vec::with_capacity(subs.len());
    for mut ws in subs {
        // The WebSocket layer has nothing buffered (subscribers are never
        // written through it), so raw frame bytes on its stream are valid.
        let tls = ws.get_mut();
        if tls.write_all(frame).await.is_ok() && tls.flush().await.is_ok() {
            alive.push(ws);
        }
    }
    alive
}

/// An unmasked (server-to-client) binary WebSocket frame, FIN set.
fn binary_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 10);
    f.push(0x82);
    let n = payload.len();
    match (u8::try_from(n), u16::try_from(n)) {
        (Ok(short), _) if short < 126 => f.push(short),
        (_, Ok(medium)) => {
            f.push(126);
            f.extend_from_slice(&medium.to_be_bytes());
        }
        _ => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

#[cfg(test)]
mod tests {
    use super::binary_frame;

    #[test]
    fn frames_use_the_shortest_length_form() {
        assert_eq!(binary_frame(b"hi"), [0x82, 2, b'h', b'i']);
        let mid = binary_frame(&[0; 300]);
        assert_eq!(&mid[..4], [0x82, 126, 1, 44]);
        let big = binary_frame(&[0; 70_000]);
        assert_eq!(&big[..2], [0x82, 127]);
        assert_eq!(big.len(), 70_000 + 10);
    }
}
