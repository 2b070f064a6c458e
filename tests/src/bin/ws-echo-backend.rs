//! `ws-echo-backend`: a minimal plain-TCP WebSocket echo server, the backend
//! HAProxy and nginx proxy to when the benchmark compares them with EdgeGate.
//!
//! Any path is accepted; every data message is sent back as it came. One task
//! per connection, a small read buffer, so 20k idle connections stay cheap.
//!
//! ```text
//! ws-echo-backend --listen 127.0.0.1:7100
//! ```

use std::net::SocketAddr;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Read buffer per connection: echo messages are small.
const READ_BUFFER_BYTES: usize = 4096;

#[derive(Debug, Parser)]
#[command(about = "Plain WebSocket echo backend for proxy benchmarks")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:7100")]
    listen: SocketAddr,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let _ = edgegate::runtime::raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = match TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("ws-echo-backend: cannot listen on {}: {e}", args.listen);
                return std::process::ExitCode::FAILURE;
            }
        };
        loop {
            match listener.accept().await {
                Ok((tcp, _)) => {
                    tokio::spawn(echo(tcp));
                }
                // EMFILE and friends: back off instead of spinning or exiting.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    })
}

async fn echo(tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0);
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(tcp, Some(config)).await else {
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        let reply = match msg {
            Message::Text(_) | Message::Binary(_) => msg,
            Message::Close(_) => break,
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
}
