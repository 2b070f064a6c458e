//! Runs the example service (`/echo`, `/chat`) until Ctrl-C.
//!
//! ```text
//! cargo run -p edgegate-link --example example_service -- --listen 127.0.0.1:7000
//! ```
//!
//! `--max-frame-bytes N` sets the link frame cap the service says in its
//! `Hello` (default 16 MiB). A gateway with `limits.max_message_bytes = M`
//! needs `N >= M + 10` to forward every message it accepts (a
//! `ClientMessage` frame is the message plus 10 bytes); set the gateway's
//! `[[service]] max_frame_bytes` to the same `N`.

use std::process::ExitCode;

use edgegate_link::example::{run_example_service_with, EXAMPLE_SERVICE_NAME};
use edgegate_link::proto::{MAX_FRAME_LENGTH, MIN_FRAME_BYTES};
use edgegate_link::service::ServiceConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Where the service listens unless `--listen` says otherwise.
const DEFAULT_LISTEN: &str = "127.0.0.1:7000";
/// `sysexits.h` code for bad command-line usage.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            eprintln!(
                "example_service: {message}\nusage: example_service [--listen ADDR] [--max-frame-bytes N]"
            );
            return ExitCode::from(EX_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("example_service: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("example_service: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The command line: where to listen and the service's config.
struct Args {
    listen: String,
    config: ServiceConfig,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut listen = DEFAULT_LISTEN.to_owned();
    let mut config = ServiceConfig::new(EXAMPLE_SERVICE_NAME);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().ok_or("--listen needs an address")?,
            "--max-frame-bytes" => {
                let value = args.next().ok_or("--max-frame-bytes needs a number")?;
                config.max_frame_bytes = value
                    .parse()
                    .ok()
                    .filter(|n| (MIN_FRAME_BYTES..=MAX_FRAME_LENGTH).contains(n))
                    .ok_or_else(|| {
                        format!(
                            "--max-frame-bytes {value:?}: expected a number from {MIN_FRAME_BYTES} to {MAX_FRAME_LENGTH}"
                        )
                    })?;
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(Args { listen, config })
}

async fn run(Args { listen, config }: Args) -> std::io::Result<()> {
    let listener = TcpListener::bind(&listen).await.map_err(|error| {
        std::io::Error::new(error.kind(), format!("cannot listen on {listen}: {error}"))
    })?;
    let shutdown = CancellationToken::new();
    let on_ctrl_c = shutdown.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!("ctrl-c: shutting down");
        }
        on_ctrl_c.cancel();
    });
    tracing::info!(
        max_frame_bytes = config.max_frame_bytes,
        "example service frame cap (said in its Hello)"
    );
    run_example_service_with(listener, config, shutdown).await
}
