//! `edgegate-load`: opens many idle TLS WebSocket clients from one process,
//! spread over source addresses, prints one JSON line once they are all
//! connected (or failed), then holds them until `--hold-secs` or SIGTERM.
//!
//! One process holds at most its RLIMIT_NOFILE of clients; run several for more.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use edgegate_tests::load::{open_idle, parse_sources, IdleLoad, LoadStats};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
struct Args {
    /// Gateway address.
    #[arg(long)]
    target: SocketAddr,
    /// Route path.
    #[arg(long, default_value = "/echo")]
    path: String,
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Source addresses: `127.0.1.1-8` or a comma list.
    #[arg(long, default_value = "127.0.1.1-4")]
    sources: String,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// How long to hold the clients after they connected.
    #[arg(long, default_value_t = 3600)]
    hold_secs: u64,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Ok((soft, hard)) = nix_rlimit() {
        if (args.clients as u64) + 64 > hard {
            eprintln!("edgegate-load: {} clients need more than RLIMIT_NOFILE {hard} (soft {soft}); run several processes", args.clients);
            return std::process::ExitCode::from(64);
        }
    }
    let sources = match parse_sources(&args.sources) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("edgegate-load: --sources: {e}");
            return std::process::ExitCode::from(64);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let stats = Arc::new(LoadStats::default());
        let stop = CancellationToken::new();
        let load = IdleLoad {
            target: args.target,
            path: args.path,
            clients: args.clients,
            sources,
            concurrency: args.concurrency,
        };
        let elapsed = open_idle(&load, stats.clone(), stop.clone()).await;
        println!(
            "{{\"event\":\"connected\",\"clients\":{},\"connected\":{},\"failed\":{},\"connect_secs\":{:.3}}}",
            args.clients,
            stats.connected.load(Ordering::Relaxed),
            stats.failed.load(Ordering::Relaxed),
            elapsed.as_secs_f64()
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal");
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(args.hold_secs)) => {}
            _ = term.recv() => {}
        }
        stop.cancel();
        println!(
            "{{\"event\":\"done\",\"closed_by_gateway\":{}}}",
            stats.closed.load(Ordering::Relaxed)
        );
    });
    std::process::ExitCode::SUCCESS
}

/// Raises the soft fd limit to the hard one and returns both.
fn nix_rlimit() -> std::io::Result<(u64, u64)> {
    let _ = edgegate::runtime::raise_nofile_limit();
    let l = edgegate::runtime::raise_nofile_limit()?;
    Ok((l.soft, l.hard))
}
