//! The `edgegate` binary: parses the command line, builds the runtime, sets up
//! logging and maps errors to exit codes. Everything else is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edgegate::config::{Config, DEFAULT_CONFIG_PATH};
use edgegate::EX_CONFIG;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc options read at start-up: return dirty pages to the kernel after
/// one second (and muzzy ones after another), with a background thread doing
/// the purging, so memory taken by a burst (reconnect storm, fan-out) goes
/// back instead of staying resident.
#[allow(non_upper_case_globals, unsafe_code)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:1000\0";

/// Exit code for an error that is not the config's (EX_SOFTWARE).
const EX_SOFTWARE: u8 = 70;

#[derive(Debug, Parser)]
#[command(
    name = "edgegate",
    version,
    about = "TLS WebSocket edge gateway for millions of mostly idle clients"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Check a configuration file: exit 0 if good, 78 with the problem if not.
    CheckConfig {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Run a gateway, the example service and a self-signed certificate on loopback.
    Demo {
        /// Where clients connect (wss://).
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        /// Where the example service listens for links.
        #[arg(long, default_value = "127.0.0.1:7000")]
        service: SocketAddr,
        /// Admin endpoint (metrics, health).
        #[arg(long, default_value = edgegate::config::DEFAULT_ADMIN_BIND)]
        admin: SocketAddr,
    },
    /// Upgrade in place: the running gateway hands its listening sockets to
    /// a new process started from the installed binary, which serves before
    /// the old one drains its clients. Exit 0 once the new one serves; 1 with
    /// the reason when it failed (the old one keeps serving); 69 when no
    /// gateway answers on the control socket.
    Upgrade {
        /// Also wait until the old process has drained its clients and exited.
        #[arg(long)]
        wait: bool,
        /// The control socket [default: `[admin] control_socket` in --config].
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Compare this host's limits and kernel settings with what the config
    /// needs (--check), or write this host's memory-dependent kernel settings
    /// (--write).
    #[command(group(clap::ArgGroup::new("action").required(true).args(["check", "write"])))]
    Tune {
        /// Check and report (one line per problem); exit 1 on a fatal one.
        #[arg(long)]
        check: bool,
        /// Write net.ipv4.tcp_mem computed from this host's MemTotal to PATH
        /// (default /etc/sysctl.d/70-edgegate-host.conf; `-` = stdout). Apply
        /// with `systemctl restart systemd-sysctl`.
        #[arg(long, value_name = "PATH", num_args = 0..=1,
              default_missing_value = edgegate::preflight::HOST_SYSCTL_PATH)]
        write: Option<PathBuf>,
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
}

fn init_logging() {
    edgegate::logging::init();
}

/// `edgegate tune --check`: one line per finding on stdout; exit 1 on a
/// fatal one, 78 when the config itself is wrong.
fn tune_check(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edgegate: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let (host, nofile_of) = edgegate::preflight::Host::read_for_tune();
    let findings = edgegate::preflight::check(&config, &host);
    if let Some(limit) = host.nofile {
        let whose = match nofile_of {
            edgegate::preflight::NofileOf::Unit => "edgegate.service's LimitNOFILE",
            edgegate::preflight::NofileOf::ThisProcess => {
                "this process's RLIMIT_NOFILE (edgegate.service is not loaded here)"
            }
        };
        println!(
            "descriptor limit checked: {whose}: soft {}, hard {}",
            limit.soft, limit.hard
        );
    }
    for f in &findings {
        println!("{f}");
    }
    let fatal = findings
        .iter()
        .filter(|f| f.severity == edgegate::preflight::Severity::Fatal)
        .count();
    println!(
        "{}: max_clients {} needs {} descriptors: {} fatal, {} warnings",
        path.display(),
        config.limits.max_clients,
        edgegate::preflight::needed_fds(&config),
        fatal,
        findings.len() - fatal
    );
    if fatal > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `edgegate upgrade [--wait]`: the gateway's answers on stdout.
fn upgrade(wait: bool, socket: Option<PathBuf>, config: &std::path::Path) -> ExitCode {
    use edgegate::handover::{request_upgrade, UpgradeOutcome, EX_UNAVAILABLE};
    let Some(socket) = socket.or_else(|| edgegate::config::control_socket_of(config)) else {
        eprintln!(
            "edgegate: {} sets [admin] control_socket = \"\": no upgrade in place; restart instead",
            config.display()
        );
        return ExitCode::from(EX_UNAVAILABLE);
    };
    match request_upgrade(&socket, wait, &mut std::io::stdout()) {
        UpgradeOutcome::Done => ExitCode::SUCCESS,
        UpgradeOutcome::Failed(reason) => {
            eprintln!("edgegate: upgrade failed, the running gateway keeps serving: {reason}");
            ExitCode::FAILURE
        }
        UpgradeOutcome::Unavailable(e) => {
            eprintln!("edgegate: no gateway answers on {}: {e}", socket.display());
            ExitCode::from(EX_UNAVAILABLE)
        }
    }
}

/// `edgegate tune --write PATH`: the host's sysctl file, from MemTotal.
fn tune_write(path: &std::path::Path) -> ExitCode {
    let Some(mem) = edgegate::preflight::mem_total_bytes() else {
        eprintln!("edgegate: cannot read MemTotal from /proc/meminfo");
        return ExitCode::from(EX_SOFTWARE);
    };
    let text = edgegate::preflight::host_sysctl_file(mem, edgegate::preflight::page_size());
    if path.as_os_str() == "-" {
        print!("{text}");
        return ExitCode::SUCCESS;
    }
    // Written whole, then renamed: systemd-sysctl never reads half a file.
    let tmp = path.with_extension("conf.tmp");
    let written = std::fs::write(&tmp, &text).and_then(|()| std::fs::rename(&tmp, path));
    match written {
        Ok(()) => {
            print!("{text}");
            println!(
                "wrote {}; apply it with: systemctl restart systemd-sysctl",
                path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            eprintln!("edgegate: cannot write {}: {e}", path.display());
            ExitCode::from(EX_SOFTWARE)
        }
    }
}

fn main() -> ExitCode {
    // This binary's global allocator is jemalloc: its statistics are the heap's.
    edgegate::process::enable_jemalloc_stats();
    let cli = Cli::parse();
    match cli.command {
        Command::Tune {
            write: Some(path), ..
        } => tune_write(&path),
        Command::Tune { config, .. } => tune_check(&config),
        Command::Upgrade {
            wait,
            socket,
            config,
        } => upgrade(wait, socket, &config),
        Command::CheckConfig { config } => match Config::load(&config)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                edgegate::Gateway::check(&c).map_err(|e| e.to_string())?;
                Ok(c)
            }) {
            Ok(c) => {
                println!(
                    "{}: ok ({} listeners, {} services, max_clients {})",
                    config.display(),
                    c.listeners.len(),
                    c.services.len(),
                    c.limits.max_clients
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("edgegate: {e}");
                ExitCode::from(EX_CONFIG)
            }
        },
        Command::Run { config } => {
            init_logging();
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::from(EX_CONFIG);
                }
            };
            let runtime = match edgegate::runtime::build(config.runtime.worker_threads) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot build the runtime");
                    return ExitCode::from(EX_SOFTWARE);
                }
            };
            match runtime.block_on(edgegate::shutdown::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(edgegate::shutdown::RunError::Start(e)) if e.is_config() => {
                    tracing::error!("{e}");
                    ExitCode::from(EX_CONFIG)
                }
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::from(EX_SOFTWARE)
                }
            }
        }
        Command::Demo {
            listen,
            service,
            admin,
        } => {
            init_logging();
            let opts = edgegate::demo::DemoOptions {
                client_addr: listen,
                service_addr: service,
                admin_addr: admin,
            };
            let prepared = match edgegate::demo::prepare(&opts) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("edgegate: {e}");
                    let config = matches!(e, edgegate::demo::DemoError::Config(_));
                    return ExitCode::from(if config { EX_CONFIG } else { EX_SOFTWARE });
                }
            };
            let runtime = match edgegate::runtime::build(prepared.config.runtime.worker_threads) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("edgegate: cannot build the runtime: {e}");
                    return ExitCode::from(EX_SOFTWARE);
                }
            };
            match runtime.block_on(edgegate::demo::run(opts, prepared)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("edgegate: {e}");
                    ExitCode::from(EX_SOFTWARE)
                }
            }
        }
    }
}
