//! `edgegate-example`: the example service and a one-message client, shipped
//! in the package as `/usr/lib/edgegate/edgegate-example` so that a fresh
//! install can show an echo without building anything:
//!
//! ```text
//! sudo systemctl start edgegate-example          # service: /echo and /chat on 127.0.0.1:7000
//! /usr/lib/edgegate/edgegate-example echo hello  # client: prints "hello", through the gateway
//! ```
//!
//! `service` runs the link crate's example service (the one `edgegate demo`
//! and `cargo run -p edgegate-link --example example_service` run), which the
//! shipped `edgegate.toml` routes `/echo` and `/chat` to. `echo` is a real TLS
//! WebSocket client: it verifies the gateway's certificate against a CA file
//! (by default Debian's snakeoil certificate, the one the shipped
//! configuration serves), sends one text message and prints what comes back.
//! It lives in the gateway's package (not the link crate's examples) so that
//! `cargo deb` builds it with the gateway's dependencies and features.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use edgegate_link::example::{run_example_service_with, EXAMPLE_SERVICE_NAME};
use edgegate_link::proto::{MAX_FRAME_LENGTH, MIN_FRAME_BYTES};
use edgegate_link::service::ServiceConfig;
use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// `sysexits.h`: the gateway, the service or the CA file is not usable.
const EX_UNAVAILABLE: u8 = 69;
/// Close code of a gateway that has no link up to the route's service yet
/// (1013, "try again later"): `echo` retries it until `--wait` runs out.
const TRY_AGAIN_LATER: u16 = 1013;

#[derive(Debug, Parser)]
#[command(
    name = "edgegate-example",
    version,
    about = "EdgeGate's example service (/echo, /chat) and a one-message TLS WebSocket client"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the example service until SIGINT or SIGTERM.
    Service {
        /// Where the service listens for the gateway's links.
        #[arg(long, default_value = "127.0.0.1:7000")]
        listen: SocketAddr,
        /// The link frame cap said in the service's Hello [default: 16 MiB];
        /// a gateway with `max_message_bytes = M` needs at least M + 10.
        #[arg(long)]
        max_frame_bytes: Option<usize>,
    },
    /// Send MESSAGE to a route of the gateway over TLS and print the reply.
    Echo {
        /// The gateway's listener.
        #[arg(long, default_value = "127.0.0.1:8443")]
        connect: SocketAddr,
        /// The route (the shipped configuration routes /echo to the example service).
        #[arg(long, default_value = "/echo")]
        path: String,
        /// The certificate (or CA) the gateway's certificate must chain to.
        #[arg(long, default_value = "/etc/ssl/certs/ssl-cert-snakeoil.pem")]
        ca: PathBuf,
        /// The name the certificate must carry [default: the first DNS name
        /// of the --ca certificate].
        #[arg(long)]
        server_name: Option<String>,
        /// How long to retry while the gateway has no link to the service
        /// yet (close code 1013), e.g. right after the service started.
        #[arg(long, default_value_t = 20)]
        wait_secs: u64,
        message: String,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Plain text in the journal (stderr of the unit), colours on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("edgegate-example: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Service {
            listen,
            max_frame_bytes,
        } => runtime.block_on(service(listen, max_frame_bytes)),
        Command::Echo {
            connect,
            path,
            ca,
            server_name,
            wait_secs,
            message,
        } => {
            let target = Target {
                addr: connect,
                path,
                ca,
                server_name,
            };
            runtime.block_on(echo(&target, &message, Duration::from_secs(wait_secs)))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, message }) => {
            eprintln!("edgegate-example: {message}");
            ExitCode::from(code)
        }
    }
}

/// Why a command failed, and the exit status that says so.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

async fn service(listen: SocketAddr, max_frame_bytes: Option<usize>) -> Result<(), Failure> {
    let mut config = ServiceConfig::new(EXAMPLE_SERVICE_NAME);
    if let Some(max) = max_frame_bytes {
        if !(MIN_FRAME_BYTES..=MAX_FRAME_LENGTH).contains(&max) {
            return Err(Failure::new(
                2,
                format!(
                    "--max-frame-bytes {max}: expected {MIN_FRAME_BYTES} to {MAX_FRAME_LENGTH}"
                ),
            ));
        }
        config.max_frame_bytes = max;
    }
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| Failure::new(EX_UNAVAILABLE, format!("cannot listen on {listen}: {e}")))?;
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    term.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = terminate => {}
        }
        tracing::info!("signal: shutting down");
        on_signal.cancel();
    });
    tracing::info!(%listen, max_frame_bytes = config.max_frame_bytes, "example service listening for gateway links");
    run_example_service_with(listener, config, shutdown)
        .await
        .map_err(|e| Failure::new(1, e.to_string()))
}

/// Where `echo` connects and what it trusts.
struct Target {
    addr: SocketAddr,
    path: String,
    ca: PathBuf,
    server_name: Option<String>,
}

/// What one WebSocket session gave back.
enum Reply {
    Text(String),
    Closed(u16, String),
}

async fn echo(target: &Target, message: &str, wait: Duration) -> Result<(), Failure> {
    let (tls, name) = connector(&target.ca, target.server_name.as_deref())?;
    let deadline = Instant::now() + wait;
    loop {
        match exchange(&tls, &name, target, message).await? {
            Reply::Text(text) => {
                println!("{text}");
                return Ok(());
            }
            Reply::Closed(TRY_AGAIN_LATER, _) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Reply::Closed(code, reason) => {
                return Err(Failure::new(
                    EX_UNAVAILABLE,
                    format!(
                        "the gateway closed the session with {code} ({reason}){}",
                        if code == TRY_AGAIN_LATER {
                            ": no link to the route's service; is it running? (systemctl status edgegate-example)"
                        } else {
                            ""
                        }
                    ),
                ))
            }
        }
    }
}

/// A TLS connector that trusts the certificates in `ca`, and the name it
/// checks: `server_name`, or the first DNS name of the first certificate.
fn connector(
    ca: &Path,
    server_name: Option<&str>,
) -> Result<(tokio_rustls::TlsConnector, ServerName<'static>), Failure> {
    let unusable = |e: String| Failure::new(EX_UNAVAILABLE, format!("{}: {e}", ca.display()));
    let certs = CertificateDer::pem_file_iter(ca)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| unusable(e.to_string()))?;
    let first = certs
        .first()
        .ok_or_else(|| unusable("no certificate in file".to_owned()))?;
    let name = match server_name {
        Some(name) => name.to_owned(),
        None => first_dns_name(first).ok_or_else(|| {
            unusable("the certificate names no DNS name: give --server-name".to_owned())
        })?,
    };
    let name = ServerName::try_from(name.clone())
        .map_err(|e| Failure::new(2, format!("--server-name {name:?}: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| unusable(e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Failure::new(1, e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
}

fn first_dns_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
        _ => None,
    })
}

/// One session: TCP, TLS, the upgrade, one text message out, the first
/// text message or the close back.
async fn exchange(
    tls: &tokio_rustls::TlsConnector,
    name: &ServerName<'static>,
    target: &Target,
    message: &str,
) -> Result<Reply, Failure> {
    let unavailable = |what: &str, e: &dyn std::fmt::Display| {
        Failure::new(EX_UNAVAILABLE, format!("{}: {what}: {e}", target.addr))
    };
    let session = async {
        let tcp = TcpStream::connect(target.addr)
            .await
            .map_err(|e| unavailable("connect", &e))?;
        let stream = tls
            .connect(name.clone(), tcp)
            .await
            .map_err(|e| unavailable("TLS", &e))?;
        let url = format!("wss://{}{}", name.to_str(), target.path);
        let (mut ws, _) = tokio_tungstenite::client_async(url, stream)
            .await
            .map_err(|e| unavailable("WebSocket upgrade", &e))?;
        ws.send(Message::text(message))
            .await
            .map_err(|e| unavailable("send", &e))?;
        while let Some(frame) = ws.next().await {
            match frame.map_err(|e| unavailable("receive", &e))? {
                Message::Text(text) => {
                    let _ = ws.close(None).await;
                    return Ok(Reply::Text(text.as_str().to_owned()));
                }
                Message::Close(close) => {
                    let (code, reason) = close.map_or((CloseCode::Status, String::new()), |c| {
                        (c.code, c.reason.as_str().to_owned())
                    });
                    return Ok(Reply::Closed(u16::from(code), reason));
                }
                _ => {}
            }
        }
        Err(Failure::new(
            EX_UNAVAILABLE,
            format!("{}: the connection ended without a reply", target.addr),
        ))
    };
    tokio::time::timeout(Duration::from_secs(10), session)
        .await
        .map_err(|_| Failure::new(EX_UNAVAILABLE, format!("{}: no reply in 10 s", target.addr)))?
}
