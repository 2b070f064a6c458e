//! Runs the example service (`/echo`, `/chat`) until Ctrl-C.
//!
//! ```text
//! cargo run -p edgegate-link --example example_service -- --listen 127.0.0.1:7000
//! ```

use std::process::ExitCode;

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

    let listen = match parse_listen(std::env::args().skip(1)) {
        Ok(listen) => listen,
        Err(message) => {
            eprintln!("example_service: {message}\nusage: example_service [--listen ADDR]");
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
    match runtime.block_on(run(&listen)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("example_service: {error}");
            ExitCode::FAILURE
        }
    }
}

fn parse_listen(mut args: impl Iterator<Item = String>) -> Result<String, String> {
    let mut listen = DEFAULT_LISTEN.to_owned();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().ok_or("--listen needs an address")?,
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(listen)
}

async fn run(listen: &str) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await.map_err(|error| {
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
    edgegate_link::example::run_example_service(listener, shutdown).await
}
