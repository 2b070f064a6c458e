//! `edgegate-load`: many TLS WebSocket clients from one process, spread over
//! source addresses, driven by commands on stdin, reporting JSON lines on stdout.
//!
//! One process holds at most its RLIMIT_NOFILE of clients; run several for more
//! (`tests/bench/bench.py` does). Modes say what the clients do once connected:
//!
//! | mode | clients |
//! |---|---|
//! | `idle` | hold the connection and answer pings |
//! | `echo` | the first `--active` clients send timestamped messages, `--rate` per second in all, while sending is on; echoed messages are timed |
//! | `subscribe` | hold and time every timestamped message they get (connect to `/chat`), and count deliveries per message; with `--publisher`, client 0 publishes one message per `publish` (on `--publisher-path` if given) and is not a subscriber |
//! | `storm` | like `idle`; the `storm` command makes them all drop and reconnect at once |
//!
//! Every mode takes every command. Commands, one per line on stdin:
//!
//! | command | does | prints |
//! |---|---|---|
//! | `start` / `pause` | echo senders start / stop sending | `{"event":"ack"}` |
//! | `report` | latency histogram since the last report, counters; resets the histogram; in `subscribe` mode also `messages`: `[send_ns, deliveries, last_delivery_us]` per message since the last report | `{"event":"report",...}` |
//! | `publish N MS` | the publisher sends N messages, MS milliseconds apart | `{"event":"published"}` |
//! | `storm` | every connected client drops and reconnects at once; waits until all are back | `{"event":"storm",...}` |
//! | `stats` | counters, and `close_codes`: sessions the gateway closed, by close code | `{"event":"stats",...}` |
//! | `stop` | closes every client and exits | `{"event":"done",...}` |
//!
//! With `--reconnect`, a client whose session the gateway ends reconnects at
//! once (counted in `reconnected`), so a drain moves clients instead of
//! losing them: the lab's upgrade step counts how many moved.
//!
//! After connecting it prints `{"event":"connected",...}`. It exits on `stop`,
//! SIGTERM, or after `--hold-secs`. End of stdin is not a stop, so it can run
//! without a driver.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use edgegate_tests::load::{
    histogram_json, insecure_connector, open_clients, parse_sources, Control, Proto, Role, Shared,
    Target,
};
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;

/// `sysexits.h` code for bad command-line usage.
const EX_USAGE: u8 = 64;
/// Descriptors a process keeps for itself beyond its clients.
const SPARE_FDS: u64 = 64;
/// How long a storm may take before it is reported as not all back.
const STORM_DEADLINE: Duration = Duration::from_secs(180);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Idle,
    Echo,
    Subscribe,
    Storm,
}

#[derive(Debug, Parser)]
#[command(about = "EdgeGate load generator: many TLS WebSocket clients from one process")]
struct Args {
    /// Gateway (or proxy) address.
    #[arg(long)]
    target: SocketAddr,
    /// WebSocket path.
    #[arg(long, default_value = "/echo")]
    path: String,
    /// TLS server name (SNI) and Host header.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Client protocol: `ws` (WebSocket) or `framed` (docs/framed-protocol.md;
    /// `--path` is the route sent in Hello).
    #[arg(long, default_value = "ws")]
    proto: Proto,
    #[arg(long, value_enum, default_value = "idle")]
    mode: Mode,
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Source addresses: `127.0.1.1-8` or a comma list.
    #[arg(long, default_value = "127.0.1.1-4")]
    sources: String,
    /// First connects in flight at once.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Echo: how many clients send (the rest hold).
    #[arg(long, default_value_t = 100)]
    active: usize,
    /// Echo: messages per second sent by the whole process.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Size of every message sent (at least the 8-byte timestamp).
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
    /// Subscribe: client 0 publishes on `publish`.
    #[arg(long)]
    publisher: bool,
    /// Subscribe: the publisher connects to this path instead of `--path`
    /// (a server with separate publish and subscribe endpoints).
    #[arg(long)]
    publisher_path: Option<String>,
    /// Echo: start sending as soon as connected (no `start` needed).
    #[arg(long)]
    autostart: bool,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// A client the gateway closes reconnects at once instead of ending.
    #[arg(long)]
    reconnect: bool,
    /// Exit this long after connecting, if no `stop` came first.
    #[arg(long, default_value_t = 3600)]
    hold_secs: u64,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let limit = edgegate::runtime::raise_nofile_limit();
    if let Ok(l) = &limit {
        if args.clients as u64 + SPARE_FDS > l.soft {
            eprintln!(
                "edgegate-load: {} clients need more than RLIMIT_NOFILE {} (hard {}); run several processes",
                args.clients, l.soft, l.hard
            );
            return std::process::ExitCode::from(EX_USAGE);
        }
    }
    let sources = match parse_sources(&args.sources) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("edgegate-load: --sources: {e}");
            return std::process::ExitCode::from(EX_USAGE);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(args, sources));
    std::process::ExitCode::SUCCESS
}

async fn run(args: Args, sources: Vec<std::net::IpAddr>) {
    let target = Arc::new(Target {
        addr: args.target,
        path: args.path.clone(),
        publisher_path: args.publisher_path.clone(),
        server_name: args.server_name.clone(),
        proto: args.proto,
        sources,
        connector: insecure_connector(args.proto),
    });
    let shared = Shared::new(args.payload_bytes);
    let shared = Arc::new(if args.mode == Mode::Subscribe {
        shared.track_messages()
    } else {
        shared
    });
    let (control_tx, control) = watch::channel(Control {
        sending: args.autostart,
        reconnect: args.reconnect,
        ..Control::default()
    });

    let active = args.active.min(args.clients);
    let period = if args.rate > 0.0 && active > 0 {
        Duration::from_secs_f64(active as f64 / args.rate)
    } else {
        Duration::from_secs(3600)
    };
    let (mode, publisher) = (args.mode, args.publisher);
    let role = move |i: usize| match mode {
        Mode::Echo if i < active => Role::Periodic {
            period,
            offset: period.mul_f64(i as f64 / active as f64),
        },
        Mode::Subscribe if publisher && i == 0 => Role::Publisher,
        _ => Role::Hold,
    };
    let took = open_clients(
        args.clients,
        args.concurrency,
        target,
        shared.clone(),
        &control,
        role,
    )
    .await;
    let c = &shared.counters;
    emit(json!({
        "event": "connected",
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "clients": args.clients,
        "connected": c.connected.load(Ordering::Relaxed),
        "failed": c.failed.load(Ordering::Relaxed),
        "connect_secs": round3(took.as_secs_f64()),
    }));

    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal");
    let hold = tokio::time::sleep(Duration::from_secs(args.hold_secs));
    tokio::pin!(hold);
    let mut window = Instant::now();
    loop {
        let line = tokio::select! {
            line = lines.next_line(), if stdin_open => match line {
                Ok(Some(line)) => line,
                _ => {
                    stdin_open = false;
                    continue;
                }
            },
            () = &mut hold => break,
            _ = term.recv() => break,
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["start"] => {
                shared.take_latency();
                window = Instant::now();
                control_tx.send_modify(|c| c.sending = true);
                emit(json!({"event": "ack", "command": "start"}));
            }
            ["pause"] => {
                control_tx.send_modify(|c| c.sending = false);
                emit(json!({"event": "ack", "command": "pause"}));
            }
            ["report"] => {
                let h = shared.take_latency();
                let messages: Vec<[u64; 3]> = shared
                    .take_messages()
                    .into_iter()
                    .map(|(sent, d)| [sent, d.count, d.max_us])
                    .collect();
                let secs = window.elapsed().as_secs_f64();
                window = Instant::now();
                emit(json!({
                    "event": "report",
                    "window_secs": round3(secs),
                    "live": c.live.load(Ordering::Relaxed),
                    "sent": c.sent.swap(0, Ordering::Relaxed),
                    "received": c.received.swap(0, Ordering::Relaxed),
                    "closed": c.closed.load(Ordering::Relaxed),
                    "latency": histogram_json(&h),
                    "messages": messages,
                }));
            }
            ["publish", n, ms] => {
                let (Ok(n), Ok(ms)) = (n.parse::<u64>(), ms.parse::<u64>()) else {
                    emit(json!({"event": "error", "error": "usage: publish N MS"}));
                    continue;
                };
                for i in 0..n {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    control_tx.send_modify(|c| c.publish += 1);
                }
                emit(json!({"event": "published", "messages": n}));
            }
            ["storm"] => storm(&shared, &control_tx).await,
            ["stats"] => emit(stats(&shared)),
            ["stop"] => break,
            [] => {}
            _ => emit(json!({"event": "error", "error": format!("unknown command {line:?}")})),
        }
    }
    control_tx.send_modify(|c| c.stop = true);
    // Give tasks a moment to see the stop; the process exit closes the rest.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut done = stats(&shared);
    done["event"] = "done".into();
    emit(done);
}

/// Drops and reconnects every connected client at once; reports when all are
/// back (or the deadline passed).
async fn storm(shared: &Shared, control_tx: &watch::Sender<Control>) {
    let c = &shared.counters;
    let clients = c.live.load(Ordering::Relaxed);
    let base_back = c.reconnected.load(Ordering::Relaxed);
    let base_failures = c.reconnect_failures.load(Ordering::Relaxed);
    let started = Instant::now();
    control_tx.send_modify(|c| c.storm += 1);
    let (mut half, mut p99) = (None, None);
    let back = loop {
        let back = c.reconnected.load(Ordering::Relaxed) - base_back;
        let t = started.elapsed();
        if half.is_none() && back * 2 >= clients {
            half = Some(t);
        }
        if p99.is_none() && back * 100 >= clients * 99 {
            p99 = Some(t);
        }
        if back >= clients || t > STORM_DEADLINE {
            break back;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let secs = |d: Option<Duration>| d.map(|d| round3(d.as_secs_f64()));
    emit(json!({
        "event": "storm",
        "clients": clients,
        "back": back,
        "all_back": back >= clients,
        "back_secs": round3(started.elapsed().as_secs_f64()),
        "half_back_secs": secs(half),
        "p99_back_secs": secs(p99),
        "reconnect_failures": c.reconnect_failures.load(Ordering::Relaxed) - base_failures,
    }));
}

fn stats(shared: &Shared) -> serde_json::Value {
    let c = &shared.counters;
    json!({
        "event": "stats",
        "live": c.live.load(Ordering::Relaxed),
        "connected": c.connected.load(Ordering::Relaxed),
        "failed": c.failed.load(Ordering::Relaxed),
        "closed": c.closed.load(Ordering::Relaxed),
        "close_codes": close_codes(shared),
        "reconnected": c.reconnected.load(Ordering::Relaxed),
        "reconnect_failures": c.reconnect_failures.load(Ordering::Relaxed),
    })
}

/// `{"1001": n, ...}`: how the gateway ended sessions ("0": no close code).
fn close_codes(shared: &Shared) -> serde_json::Value {
    let codes = shared.close_codes.lock().unwrap_or_else(|e| e.into_inner());
    codes
        .iter()
        .map(|(code, n)| (code.to_string(), json!(n)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn emit(v: serde_json::Value) {
    println!("{v}");
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
