//! Upgrading in place: the running gateway hands its listening sockets to a
//! new process, which accepts on them before the old one stops, so an
//! upgrade refuses no connection and resets none.
//!
//! # The exchange
//! ```text
//! edgegate upgrade ──"upgrade"──► old process, on [admin] control_socket
//!   old: spawn <its binary's path> run --config <its file>, with the client
//!        listeners, the admin listener, the control socket and one end of a
//!        socketpair (the channel) inherited; old keeps accepting
//!   new: load config and certificates, adopt the sockets, links up
//!        (bounded by LINKS_WAIT: a client it accepted before would get
//!        1013), accept ──"ready version=.."──► old
//!   old: stop its watchdog, MAINPID=<new> to systemd ──"main"──► new
//!   new: READY=1 with its status, then the watchdog, as the main process
//!   old ──"ok pid=.. version=.. handover_ms=.."──► edgegate upgrade
//!   old: close its copies of the listeners, drain its clients with 1001
//!        over drain_window_secs ──"drained clients=.. ms=.."──► edgegate
//!        upgrade --wait; old exits 0
//! ```
//! Both processes hold the same kernel sockets, so the accept queue is one
//! queue: whatever is queued while they overlap is accepted by one of them,
//! and closing the old process's copies (close, never `shutdown()`, which
//! would act on the shared socket) leaves the new one's open.
//!
//! # Why this design
//! - systemd (Debian 12: 252, `Type=notify`, `NotifyAccess=main`) accepts
//!   `MAINPID=` from the main process while the unit runs, and from then on
//!   only the new process's notifications. So the old process sends
//!   `MAINPID=` and then nothing more (no `STOPPING=1`: that would stop the
//!   unit), and the new one says `READY=1` and pets the watchdog only after
//!   it is main. No `NotifyAccess=all`, no `ExecReload` change: `systemctl
//!   reload` stays a live config reload that never drains.
//! - The new process is started from the *path* of the binary as resolved
//!   at start-up (`/usr/bin/edgegate`): after dpkg replaced the file,
//!   `/proc/self/exe` names the deleted old inode.
//! - Sockets are inherited, not sent: `dup` gives copies without
//!   `FD_CLOEXEC`, so the child gets them at the same numbers with no
//!   `pre_exec` code, and their numbers and names travel in one environment
//!   variable ([`HANDOVER_ENV`]). Not systemd's `LISTEN_FDS`: it requires
//!   `LISTEN_PID` to be the child's own PID, which is only known after fork,
//!   where setting the environment is not async-signal-safe. The child
//!   trusts the variable only when its parent is the PID it names.
//! - Not `shellflip` (Cloudflare): it passes bytes between the processes
//!   but not sockets, and has no bound on a child that never gets ready.
//!   Not `ecdysis`: it needs systemd ≥ 253 (`Type=notify-reload`) or
//!   `NotifyAccess=all`. Not `SO_REUSEPORT` rebinding: closing the old
//!   listener resets the connections in its own accept queue.
//! - A child that fails (exits, or is not ready within [`CHILD_READY_TIMEOUT`])
//!   is told to stop (the channel closes: it drains whatever it accepted
//!   with 1001 and exits), killed if it does not, and the old process keeps
//!   serving; `edgegate upgrade` prints the reason and exits non-zero.
//!
//! While a handover runs (at most [`CHILD_READY_TIMEOUT`]) a SIGHUP waits
//! for its end. A stop signal ends it: the child is told to stop and the old
//! process, still the main one, drains as for any stop.

use std::collections::HashMap;
use std::io::{self, BufRead, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use crate::systemd;

/// The environment variable that tells a new process which inherited
/// descriptors are its sockets (JSON, see [`Inherited`]).
pub const HANDOVER_ENV: &str = "EDGEGATE_HANDOVER";

/// How long the new process has to load its config and certificates, adopt
/// the sockets and get its links up. Start-up takes well under a second on
/// a warm host; links wait at most [`LINKS_WAIT`] of it.
pub const CHILD_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a new process waits for its links before it says ready anyway
/// (a service that is down for the old process is down for the new one).
pub const LINKS_WAIT: Duration = Duration::from_secs(5);

/// How long a new process that said ready waits to be made main before it
/// gives up (drains what it accepted and exits).
pub const MAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a failed child has to exit after its channel closed before it
/// is killed.
const CHILD_EXIT_GRACE: Duration = Duration::from_secs(3);

/// How long the control socket waits for a request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The exit code of `edgegate upgrade` when no gateway answers on the
/// control socket (`EX_UNAVAILABLE`): the package restarts instead.
pub const EX_UNAVAILABLE: u8 = 69;

/// Why a handover failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("cannot start {binary}: {source}")]
    Spawn { binary: PathBuf, source: io::Error },
    #[error("cannot copy the listening sockets for the new process: {0}")]
    Dup(io::Error),
    #[error("the new process (pid {pid}) exited before it was ready: {status}; see its log")]
    ChildExited { pid: u32, status: String },
    #[error("the new process (pid {pid}) was not ready within {secs} s; stopped it")]
    ChildTimeout { pid: u32, secs: u64 },
    #[error("the new process (pid {pid}) said {line:?} instead of ready")]
    ChildProtocol { pid: u32, line: String },
    #[error("cannot make pid {pid} the unit's main process: {source}")]
    MainPid { pid: u32, source: io::Error },
    #[error("channel to the old process: {0}")]
    Channel(io::Error),
    #[error("the old process did not make this one main within {} s", MAIN_TIMEOUT.as_secs())]
    NotMade,
    #[error("{HANDOVER_ENV}: {0}")]
    Env(String),
    #[error("the gateway is stopping (a stop signal came during the handover); the new process was told to stop")]
    Stopping,
}

// ---------------------------------------------------------------------------
// The old process: the control socket and the child.
// ---------------------------------------------------------------------------

/// The control socket of a running gateway, and what it needs to start its
/// successor.
#[derive(Debug)]
pub struct Control {
    listener: UnixListener,
    /// The binary's path as resolved at start-up: what the successor runs.
    binary: PathBuf,
}

impl Control {
    /// Opens the control socket at `path`: the inherited one when a
    /// predecessor passed it (and it is bound to `path`), else a fresh bind
    /// (a stale file from a stopped gateway is replaced; one a live gateway
    /// answers on is left alone). `None`, with a warning, when it cannot be
    /// had: the gateway runs, and upgrades need a restart.
    pub fn open(path: &Path, inherited: Option<std::os::unix::net::UnixListener>) -> Option<Self> {
        let binary = match own_binary() {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cannot resolve this binary's path; upgrade unavailable");
                return None;
            }
        };
        let adopted = inherited.filter(|l| {
            l.local_addr()
                .ok()
                .is_some_and(|a| a.as_pathname() == Some(path))
        });
        let listener = match adopted {
            Some(l) => {
                info!(path = %path.display(), "control socket adopted");
                l
            }
            None => match bind_fresh(path) {
                Ok(l) => {
                    info!(path = %path.display(), "control socket listening (edgegate upgrade)");
                    l
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot bind the control socket; `edgegate upgrade` is unavailable");
                    return None;
                }
            },
        };
        let listener = listener
            .set_nonblocking(true)
            .and_then(|()| UnixListener::from_std(listener));
        match listener {
            Ok(listener) => Some(Self { listener, binary }),
            Err(e) => {
                warn!(error = %e, "control socket unusable; `edgegate upgrade` is unavailable");
                None
            }
        }
    }

    /// The next upgrade request, answered by the returned [`Requester`].
    /// Connections that do not ask for an upgrade are answered and dropped
    /// here.
    ///
    /// # Cancel safety
    /// Cancel-safe while waiting for a connection; once one is accepted its
    /// request line is read with a bound ([`REQUEST_TIMEOUT`]).
    pub async fn next_upgrade(&self) -> Requester {
        loop {
            let Ok((stream, _)) = self.listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let peer = stream.peer_cred().ok();
            let mut stream = BufReader::new(stream);
            let mut line = String::new();
            let read = tokio::time::timeout(REQUEST_TIMEOUT, stream.read_line(&mut line)).await;
            let mut requester = Requester { stream };
            match read {
                Ok(Ok(_)) if line.trim() == "upgrade" => {
                    info!(
                        uid = peer.map(|p| p.uid()),
                        pid = peer.and_then(|p| p.pid()),
                        "upgrade requested on the control socket"
                    );
                    return requester;
                }
                Ok(Ok(_)) => {
                    requester
                        .say(&format!("error unknown request {:?}", line.trim()))
                        .await;
                }
                _ => {}
            }
        }
    }

    /// Starts the successor: `<binary> run --config <config>` with every
    /// socket in `sockets` and the control socket inherited, and waits for
    /// it to say ready.
    ///
    /// # Errors
    /// [`HandoverError`] when it cannot start, exits, or is not ready within
    /// [`CHILD_READY_TIMEOUT`]; it is stopped then.
    ///
    /// # Cancel safety
    /// Dropping the future closes the channel: a child already started
    /// closes what it accepted with 1001 and exits by itself (it is not
    /// waited for).
    pub async fn start_successor(
        &self,
        config: &Path,
        sockets: Sockets<'_>,
    ) -> Result<ReadyChild, HandoverError> {
        let started = Instant::now();
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(HandoverError::Dup)?;
        // Copies without FD_CLOEXEC: the child inherits exactly these, at
        // these numbers. Closed here as soon as it is spawned.
        let dup =
            |fd: BorrowedFd<'_>| nix::unistd::dup(fd).map_err(|e| HandoverError::Dup(e.into()));
        let mut held: Vec<OwnedFd> = Vec::new();
        let mut keep = |fd: BorrowedFd<'_>| -> Result<i32, HandoverError> {
            let copy = dup(fd)?;
            let raw = copy.as_raw_fd();
            held.push(copy);
            Ok(raw)
        };
        let mut spec = Inherited {
            parent: std::process::id(),
            channel: keep(theirs.as_fd())?,
            listeners: HashMap::new(),
            admin: None,
            control: Some(keep(self.listener.as_fd())?),
        };
        for (name, fd) in sockets.listeners {
            spec.listeners.insert(name.to_owned(), keep(fd)?);
        }
        spec.admin = sockets.admin.map(&mut keep).transpose()?;
        let spec = serde_json::to_string(&spec).map_err(|e| HandoverError::Dup(e.into()))?;
        let spawned = std::process::Command::new(&self.binary)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env(HANDOVER_ENV, spec)
            // The watchdog is ours until the child is main; systemd's own
            // socket-activation variables are not for it.
            .env_remove("WATCHDOG_PID")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null())
            .spawn();
        drop(held);
        drop(theirs);
        let child = spawned.map_err(|source| HandoverError::Spawn {
            binary: self.binary.clone(),
            source,
        })?;
        let pid = child.id();
        info!(pid, binary = %self.binary.display(), "started the new process; waiting for it to be ready");
        let channel = ours
            .set_nonblocking(true)
            .and_then(|()| UnixStream::from_std(ours))
            .map_err(HandoverError::Channel)?;
        let mut ready = ReadyChild {
            child,
            pid,
            channel: BufReader::new(channel),
            version: String::new(),
            started,
        };
        let mut line = String::new();
        let outcome =
            tokio::time::timeout(CHILD_READY_TIMEOUT, ready.channel.read_line(&mut line)).await;
        let failure = match outcome {
            Ok(Ok(n)) if n > 0 => match line.trim().strip_prefix("ready version=") {
                Some(v) => {
                    ready.version = v.to_owned();
                    return Ok(ready);
                }
                None => HandoverError::ChildProtocol {
                    pid,
                    line: line.trim().to_owned(),
                },
            },
            Ok(_) => {
                let status = ready.stop().await;
                return Err(HandoverError::ChildExited { pid, status });
            }
            Err(_) => HandoverError::ChildTimeout {
                pid,
                secs: CHILD_READY_TIMEOUT.as_secs(),
            },
        };
        ready.stop().await;
        Err(failure)
    }
}

/// The path this binary was started from, resolved now (at start-up):
/// what a successor runs. If the file was already replaced, the kernel names
/// it `<path> (deleted)`; the path is what counts.
fn own_binary() -> io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(
        match exe.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
            Some(path) => PathBuf::from(path),
            None => exe,
        },
    )
}

/// Binds a fresh control socket at `path`, mode 0600.
fn bind_fresh(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another gateway answers on it",
        ));
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// The sockets a gateway hands over, borrowed from it.
#[derive(Debug, Default)]
pub struct Sockets<'a> {
    /// Each `[[listener]]`'s socket by name.
    pub listeners: Vec<(&'a str, BorrowedFd<'a>)>,
    /// The admin endpoint's socket.
    pub admin: Option<BorrowedFd<'a>>,
}

/// A successor that said ready and waits to be made main.
#[derive(Debug)]
pub struct ReadyChild {
    child: std::process::Child,
    pid: u32,
    channel: BufReader<UnixStream>,
    version: String,
    started: Instant,
}

impl ReadyChild {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `MAINPID=` to systemd, then tells the child it is main. The
    /// caller has stopped its own notifications (the watchdog) first: from
    /// here on systemd accepts only the child's.
    ///
    /// # Errors
    /// [`HandoverError::MainPid`] when systemd cannot be told; the child is
    /// stopped then and the caller stays main.
    pub async fn make_main(mut self) -> Result<HandedOver, HandoverError> {
        let pid = self.pid;
        if let Err(source) = systemd::main_pid(pid) {
            self.stop().await;
            return Err(HandoverError::MainPid { pid, source });
        }
        if let Err(e) = self.channel.get_mut().write_all(b"main\n").await {
            // It was ready a moment ago; systemd now watches it and sees it
            // exit. Nothing here can take the main PID back.
            warn!(pid = self.pid, error = %e, "the new process is gone after it was made main");
        }
        Ok(HandedOver {
            pid: self.pid,
            version: std::mem::take(&mut self.version),
            took: self.started.elapsed(),
        })
    }

    /// Closes the channel (the child drains what it accepted and exits),
    /// kills it if it has not exited within [`CHILD_EXIT_GRACE`], reaps it,
    /// and returns how it ended.
    async fn stop(self) -> String {
        let ReadyChild {
            mut child,
            pid,
            channel,
            ..
        } = self;
        drop(channel);
        let reaped = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + CHILD_EXIT_GRACE;
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => return status.to_string(),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Ok(None) => {
                        let _ = child.kill();
                        return child
                            .wait()
                            .map_or_else(|e| e.to_string(), |s| format!("{s} (killed)"));
                    }
                    Err(e) => return e.to_string(),
                }
            }
        })
        .await;
        let status = reaped.unwrap_or_else(|e| e.to_string());
        warn!(pid, %status, "the new process was stopped; this one keeps serving");
        status
    }
}

/// A completed handover: the successor is main.
#[derive(Debug)]
pub struct HandedOver {
    pub pid: u32,
    pub version: String,
    /// From the request to the successor being main.
    pub took: Duration,
}

/// The `edgegate upgrade` on the other end of the control socket.
#[derive(Debug)]
pub struct Requester {
    stream: BufReader<UnixStream>,
}

impl Requester {
    /// Writes one line; a requester that went away is not an error.
    pub async fn say(&mut self, line: &str) {
        let _ = self
            .stream
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
            .await;
    }

    pub async fn failed(mut self, error: &HandoverError) {
        warn!(error = %error, "upgrade failed; this process keeps serving");
        self.say(&format!("error {error}")).await;
    }

    pub async fn handed_over(&mut self, done: &HandedOver) {
        self.say(&format!(
            "ok pid={} version={} handover_ms={}",
            done.pid,
            done.version,
            done.took.as_millis()
        ))
        .await;
    }
}

// ---------------------------------------------------------------------------
// The new process: what it inherited.
// ---------------------------------------------------------------------------

/// What a new process inherited from the one it replaces, as named in
/// [`HANDOVER_ENV`]: descriptor numbers in the parent's description, then
/// the sockets themselves once [`Inherited::take_from_env`] adopted them.
#[derive(Debug, Serialize, Deserialize)]
struct Inherited {
    /// The old process: the variable is trusted only when it is our parent.
    parent: u32,
    channel: i32,
    listeners: HashMap<String, i32>,
    admin: Option<i32>,
    control: Option<i32>,
}

/// Listening sockets a new process took over from the one it replaces.
#[derive(Debug, Default)]
pub struct AdoptedSockets {
    /// Each `[[listener]]`'s socket by name.
    pub listeners: HashMap<String, std::net::TcpListener>,
    /// The admin endpoint's.
    pub admin: Option<std::net::TcpListener>,
}

/// The sockets a new process adopted, and its channel to the old one.
#[derive(Debug)]
pub struct Adopted {
    /// The old process.
    pub parent: u32,
    /// For `Gateway::start_adopting`.
    pub sockets: AdoptedSockets,
    /// For [`Control::open`].
    pub control: Option<std::os::unix::net::UnixListener>,
    channel: BufReader<UnixStream>,
}

impl Adopted {
    /// Reads [`HANDOVER_ENV`] and takes ownership of the descriptors it
    /// names. `None` when the variable is absent, or names a process that is
    /// not our parent (a leftover in an operator's shell; logged).
    ///
    /// # Errors
    /// [`HandoverError::Env`] when the variable is malformed or a descriptor
    /// is not open.
    pub fn take_from_env() -> Result<Option<Adopted>, HandoverError> {
        let Ok(text) = std::env::var(HANDOVER_ENV) else {
            return Ok(None);
        };
        let spec: Inherited =
            serde_json::from_str(&text).map_err(|e| HandoverError::Env(e.to_string()))?;
        let parent = std::os::unix::process::parent_id();
        if spec.parent != parent {
            warn!(
                named = spec.parent,
                parent, "{HANDOVER_ENV} names another process than our parent; ignored"
            );
            return Ok(None);
        }
        let mut seen = std::collections::HashSet::new();
        let mut own = |fd: i32| -> Result<OwnedFd, HandoverError> {
            if fd < 3 || !seen.insert(fd) {
                return Err(HandoverError::Env(format!(
                    "descriptor {fd} named twice or reserved"
                )));
            }
            adopt_fd(fd).map_err(|e| HandoverError::Env(format!("descriptor {fd}: {e}")))
        };
        let channel = std::os::unix::net::UnixStream::from(own(spec.channel)?);
        let mut listeners = HashMap::new();
        for (name, fd) in spec.listeners {
            listeners.insert(name, std::net::TcpListener::from(own(fd)?));
        }
        let admin = spec
            .admin
            .map(|fd| own(fd).map(std::net::TcpListener::from))
            .transpose()?;
        let control = spec
            .control
            .map(|fd| own(fd).map(std::os::unix::net::UnixListener::from))
            .transpose()?;
        let channel = channel
            .set_nonblocking(true)
            .and_then(|()| UnixStream::from_std(channel))
            .map_err(HandoverError::Channel)?;
        Ok(Some(Adopted {
            parent,
            sockets: AdoptedSockets { listeners, admin },
            control,
            channel: BufReader::new(channel),
        }))
    }

    /// Returns when the old process closed the channel (it gave up on this
    /// one, or exited) before saying anything.
    ///
    /// # Cancel safety
    /// Cancel-safe: it only looks at the channel, consuming nothing.
    pub async fn parent_gone(&mut self) {
        loop {
            match self.channel.fill_buf().await {
                Ok([]) | Err(_) => return,
                // The old process speaks only after "ready": nothing to read yet.
                Ok(_) => std::future::pending::<()>().await,
            }
        }
    }

    /// Tells the old process this one serves, then waits (bounded by
    /// [`MAIN_TIMEOUT`]) until it was made the unit's main process.
    ///
    /// # Errors
    /// [`HandoverError::NotMade`] when the old process closed the channel or
    /// did not answer: the caller drains what it accepted and exits.
    pub async fn ready_then_main(mut self) -> Result<(), HandoverError> {
        self.channel
            .get_mut()
            .write_all(format!("ready version={}\n", env!("CARGO_PKG_VERSION")).as_bytes())
            .await
            .map_err(HandoverError::Channel)?;
        let mut line = String::new();
        match tokio::time::timeout(MAIN_TIMEOUT, self.channel.read_line(&mut line)).await {
            Ok(Ok(_)) if line.trim() == "main" => Ok(()),
            _ => Err(HandoverError::NotMade),
        }
    }
}

/// Takes ownership of an inherited descriptor after checking it is open.
#[allow(unsafe_code)]
fn adopt_fd(fd: i32) -> io::Result<OwnedFd> {
    // Open, and marked close-on-exec from now on (only the next handover's
    // explicit copies reach a child).
    nix::fcntl::fcntl(
        // SAFETY: borrowed only for this call; F_SETFD fails with EBADF if
        // the number is not open, and no Rust object owns it yet.
        unsafe { BorrowedFd::borrow_raw(fd) },
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(io::Error::from)?;
    // SAFETY: the parent that named this number in HANDOVER_ENV (checked to
    // be our parent) passed it open for us alone; each number is adopted
    // once (checked by the caller), so this is its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

// ---------------------------------------------------------------------------
// `edgegate upgrade`: the client.
// ---------------------------------------------------------------------------

/// How `edgegate upgrade` ended.
#[derive(Debug)]
pub enum UpgradeOutcome {
    /// The successor serves (and, with `--wait`, the old process exited).
    Done,
    /// The gateway answered with an error; the old process keeps serving.
    Failed(String),
    /// Nothing answers on the socket.
    Unavailable(io::Error),
}

/// The longest `edgegate upgrade` waits for the answer: the child's bound
/// and then some.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(CHILD_READY_TIMEOUT.as_secs() + 30);

/// Asks the gateway on `socket` to hand over and prints its answers to
/// `out`. With `wait`, also waits until the old process drained and exited
/// (bounded by nothing but its drain: the unit's stop timeout bounds that).
pub fn request_upgrade(socket: &Path, wait: bool, out: &mut impl Write) -> UpgradeOutcome {
    let mut stream = match std::os::unix::net::UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => return UpgradeOutcome::Unavailable(e),
    };
    // One socket, so one receive timeout for both handles.
    let timeouts = stream.try_clone();
    if let Err(e) = stream
        .write_all(b"upgrade\n")
        .and_then(|()| stream.set_read_timeout(Some(ANSWER_TIMEOUT)))
    {
        return UpgradeOutcome::Unavailable(e);
    }
    let mut lines = io::BufReader::new(stream).lines();
    let first = match lines.next() {
        Some(Ok(l)) => l,
        Some(Err(e)) => return UpgradeOutcome::Failed(format!("no answer: {e}")),
        None => return UpgradeOutcome::Failed("the gateway closed the control socket".into()),
    };
    let _ = writeln!(out, "{first}");
    if let Some(e) = first.strip_prefix("error ") {
        return UpgradeOutcome::Failed(e.to_owned());
    }
    if !first.starts_with("ok ") {
        return UpgradeOutcome::Failed(format!("unexpected answer {first:?}"));
    }
    if wait {
        if let Ok(s) = &timeouts {
            let _ = s.set_read_timeout(None);
        }
        for line in lines.map_while(Result::ok) {
            let _ = writeln!(out, "{line}");
        }
    }
    UpgradeOutcome::Done
}
