//! `edgegate demo`: a gateway with a fresh self-signed certificate and the
//! example service over a real TCP link, on loopback.
//!
//! The demo's config takes the same `EDGEGATE_<SECTION>__<KEY>` environment
//! overrides as `edgegate run` (the benchmark raises `limits.max_clients`
//! and sets `runtime.worker_threads` this way), so it is written and checked
//! before the runtime is built: [`prepare`], then [`run`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use edgegate_link::example::{run_example_service_with, EXAMPLE_SERVICE_NAME};
use edgegate_link::service::ServiceConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::gateway::Gateway;

/// Demo ports, overridable on the command line.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub client_addr: SocketAddr,
    pub service_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("writing demo files in {dir}: {source}")]
    Files {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("generating a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("example service: bind {addr}: {source}")]
    Service {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("demo config: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Start(#[from] crate::gateway::StartError),
    #[error(transparent)]
    Run(#[from] crate::shutdown::RunError),
}

/// Writes the demo's certificate and config into `dir` and returns the
/// checked config with `env`'s `EDGEGATE_` overrides applied: the demo runs
/// the same pipeline as `edgegate run`.
///
/// # Errors
/// [`DemoError`] when files cannot be written or the config does not check.
pub fn demo_config(
    dir: &std::path::Path,
    opts: &DemoOptions,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, DemoError> {
    let files = |source| DemoError::Files {
        dir: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(files)?;
    let (cert, key) = crate::tls::self_signed()?;
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert).map_err(files)?;
    std::fs::write(&key_path, key).map_err(files)?;
    let text = format!(
        r#"
[admin]
bind = "{admin}"

[[listener]]
name = "demo"
bind = "{client}"
protocol = "websocket"
backlog = 1024
tls_cert_path = "{cert}"
tls_key_path = "{key}"

[[route]]
listener = "demo"
path = "/echo"
service = "example"

[[route]]
listener = "demo"
path = "/chat"
service = "example"

[[service]]
name = "example"
addresses = ["{service}"]
links = 2

[limits]
max_clients = 10000

[drain]
# An interactive demo: SIGTERM drains like `run`, over a short window, with
# no load balancer to leave first.
drain_window_secs = 2
lb_grace_secs = 0
"#,
        admin = opts.admin_addr,
        client = opts.client_addr,
        service = opts.service_addr,
        cert = cert_path.display(),
        key = key_path.display(),
    );
    let path = dir.join("edgegate.toml");
    std::fs::write(&path, &text).map_err(files)?;
    Ok(Config::from_toml(&path, &text, env)?)
}

/// The demo's files and checked config, before its runtime exists.
#[derive(Debug)]
pub struct Prepared {
    /// Holds the certificate and config; removed when the demo ends.
    pub dir: PathBuf,
    /// The runtime is built from `config.runtime.worker_threads`.
    pub config: Config,
}

/// Writes the demo's files in a fresh temp directory and checks its config,
/// with the process environment's `EDGEGATE_` overrides.
///
/// # Errors
/// [`DemoError`] when files cannot be written or the config does not check.
pub fn prepare(opts: &DemoOptions) -> Result<Prepared, DemoError> {
    let dir = std::env::temp_dir().join(format!("edgegate-demo-{}", std::process::id()));
    let config = demo_config(&dir, opts, std::env::vars())?;
    Ok(Prepared { dir, config })
}

/// Runs the demo until SIGTERM or Ctrl-C, through the same lifecycle as
/// `edgegate run` ([`crate::shutdown::serve`]): same signals, same drain.
///
/// # Errors
/// [`DemoError`] when a port is taken or the files cannot be written.
pub async fn run(opts: DemoOptions, prepared: Prepared) -> Result<(), DemoError> {
    let Prepared { dir, config } = prepared;
    let service_listener = TcpListener::bind(opts.service_addr)
        .await
        .map_err(|source| DemoError::Service {
            addr: opts.service_addr,
            source,
        })?;
    let stop = CancellationToken::new();
    // The service says the frame cap the config declares for it, which
    // check-config has compared with max_message_bytes.
    let mut service_config = ServiceConfig::new(EXAMPLE_SERVICE_NAME);
    service_config.max_frame_bytes = config.services[0].max_frame_bytes;
    let service = tokio::spawn(run_example_service_with(
        service_listener,
        service_config,
        stop.clone(),
    ));
    let signals = crate::shutdown::Signals::install()?;
    let gateway = Gateway::start(&config).await?;
    // Give the links a moment so the first client does not meet "no link".
    gateway.wait_ready(Duration::from_secs(1)).await;
    let addr = gateway.local_addr("demo").unwrap_or(opts.client_addr);
    println!(
        "EdgeGate demo is running.\n\
         \n  clients:  wss://{addr}/echo  (every message comes back through the example service)\
         \n            wss://{addr}/chat  (every message goes to every /chat client)\
         \n  service:  example service on {service} (link protocol, {links} links)\
         \n  admin:    http://{admin}/metrics  /healthz  /readyz\
         \n  files:    {dir} (self-signed certificate, config)\
         \n\nTry it (the certificate is self-signed):\
         \n  npx wscat --no-check -c wss://{addr}/chat\
         \n  python3 tests/appliance/ws_client.py echo {ip} {port} /echo {dir}/cert.pem hello\
         \n\nCtrl-C or SIGTERM drains and stops it.",
        service = opts.service_addr,
        links = config.services[0].links,
        admin = gateway.admin_addr(),
        dir = dir.display(),
        ip = addr.ip(),
        port = addr.port(),
    );
    let result = crate::shutdown::serve(gateway, &config, signals, None).await;
    stop.cancel();
    let _ = service.await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(result?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> DemoOptions {
        let any = "127.0.0.1:0".parse().unwrap();
        DemoOptions {
            client_addr: any,
            service_addr: any,
            admin_addr: any,
        }
    }

    #[test]
    fn the_demo_config_takes_edgegate_overrides_like_run() {
        let dir = std::env::temp_dir().join(format!("edgegate-demo-test-{}", std::process::id()));
        let plain = demo_config(&dir, &opts(), std::iter::empty()).unwrap();
        assert_eq!(plain.limits.max_clients, 10_000);
        let env = [
            (
                "EDGEGATE_LIMITS__MAX_CLIENTS".to_owned(),
                "19500".to_owned(),
            ),
            (
                "EDGEGATE_RUNTIME__WORKER_THREADS".to_owned(),
                "3".to_owned(),
            ),
        ];
        let raised = demo_config(&dir, &opts(), env).unwrap();
        assert_eq!(raised.limits.max_clients, 19_500);
        assert_eq!(raised.runtime.worker_threads, 3);
        let bad = [("EDGEGATE_LIMITS__MAX_CLIENTZ".to_owned(), "1".to_owned())];
        assert!(matches!(
            demo_config(&dir, &opts(), bad),
            Err(DemoError::Config(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
