//! The minimal gateway config every test starts from: one TLS listener, its
//! routes to one service, and whatever keys a test adds. One copy, shared by
//! the test helper crate (`edgegate_tests::fixture`) and by the gateway's own
//! integration tests (`#[path = "../../tests/src/fixture.rs"] mod fixture;`),
//! so it uses nothing but std.

use std::fmt::Write as _;
use std::path::PathBuf;

/// The variable that picks every test listener's TLS stream.
pub const TLS_STREAM_ENV: &str = "EDGEGATE_TEST_TLS_STREAM";
/// The variable that picks every test listener's WebSocket codec.
pub const WS_CODEC_ENV: &str = "EDGEGATE_TEST_WS_CODEC";

/// A minimal gateway config; [`MinimalGateway::toml`] writes it.
///
/// The defaults: admin and listener on `127.0.0.1:0`, listener `public` with
/// route `/echo` to service `example` at one address, 2 links.
///
/// With `EDGEGATE_TEST_TLS_STREAM` set (`lean`, `rustls`), the listener gets
/// that `tls_stream` unless the test sets its own: the whole suite runs on
/// either TLS stream (unset: the default, `lean`; the `rust-rustls` suite of
/// `tests/run-all.sh` runs it on the fallback). The same for
/// `EDGEGATE_TEST_WS_CODEC` (`tungstenite`, `edgegate`) and `ws_codec`.
#[derive(Debug, Clone)]
pub struct MinimalGateway {
    /// `[admin] bind`.
    pub admin: String,
    /// Extra `[admin]` keys, as TOML lines (`control_socket = "..."`).
    pub admin_keys: Vec<String>,
    /// The listener's `name`, used by its routes.
    pub listener: String,
    /// The listener's `bind`.
    pub bind: String,
    /// The listener's certificate and key files.
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// Extra `[[listener]]` keys, as TOML lines (`backlog = 128`).
    pub listener_keys: Vec<String>,
    /// The routed paths, each a `[[route]]` to the service.
    pub routes: Vec<String>,
    /// The service's `name` and its addresses, one per instance.
    pub service: String,
    pub service_addrs: Vec<String>,
    /// The service's `links`.
    pub links: usize,
    /// Extra `[[service]]` keys, as TOML lines; a key given twice keeps the last.
    pub service_keys: Vec<String>,
    /// Tables written before `[admin]` (`[runtime]`) and after the service.
    pub before: String,
    pub after: String,
}

impl MinimalGateway {
    /// The defaults, with the listener's certificate and the service address.
    pub fn new(
        cert_path: impl Into<PathBuf>,
        key_path: impl Into<PathBuf>,
        service_addr: impl ToString,
    ) -> Self {
        Self {
            admin: "127.0.0.1:0".into(),
            admin_keys: Vec::new(),
            listener: "public".into(),
            bind: "127.0.0.1:0".into(),
            cert_path: cert_path.into(),
            key_path: key_path.into(),
            listener_keys: Vec::new(),
            routes: vec!["/echo".into()],
            service: "example".into(),
            service_addrs: vec![service_addr.to_string()],
            links: 2,
            service_keys: Vec::new(),
            before: String::new(),
            after: String::new(),
        }
    }

    /// The config text.
    pub fn toml(&self) -> String {
        let mut t = String::new();
        if !self.before.is_empty() {
            let _ = writeln!(t, "{}\n", self.before.trim_end());
        }
        let _ = write!(
            t,
            "[admin]\nbind = \"{}\"\n{}\n[[listener]]\nname = \"{}\"\nbind = \"{}\"\ntls_cert_path = \"{}\"\ntls_key_path = \"{}\"\n",
            self.admin,
            self.admin_keys.iter().map(|k| format!("{k}\n")).collect::<String>(),
            self.listener,
            self.bind,
            self.cert_path.display(),
            self.key_path.display()
        );
        for line in &self.listener_keys {
            let _ = writeln!(t, "{line}");
        }
        let own_stream = self
            .listener_keys
            .iter()
            .any(|line| line.split('=').next().unwrap_or("").trim() == "tls_stream");
        if let (false, Ok(kind)) = (own_stream, std::env::var(TLS_STREAM_ENV)) {
            let _ = writeln!(t, "tls_stream = \"{kind}\"");
        }
        let own_codec = self
            .listener_keys
            .iter()
            .any(|line| line.split('=').next().unwrap_or("").trim() == "ws_codec");
        if let (false, Ok(codec)) = (own_codec, std::env::var(WS_CODEC_ENV)) {
            let _ = writeln!(t, "ws_codec = \"{codec}\"");
        }
        for path in &self.routes {
            let _ = write!(
                t,
                "\n[[route]]\nlistener = \"{}\"\npath = \"{path}\"\nservice = \"{}\"\n",
                self.listener, self.service
            );
        }
        let addresses: Vec<String> = self
            .service_addrs
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect();
        let _ = write!(
            t,
            "\n[[service]]\nname = \"{}\"\naddresses = [{}]\nlinks = {}\n",
            self.service,
            addresses.join(", "),
            self.links
        );
        for (i, line) in self.service_keys.iter().enumerate() {
            let key = line.split('=').next().unwrap_or("").trim();
            let overridden = self.service_keys[i + 1..]
                .iter()
                .any(|later| later.split('=').next().unwrap_or("").trim() == key);
            if !overridden {
                let _ = writeln!(t, "{line}");
            }
        }
        if !self.after.is_empty() {
            let _ = write!(t, "\n{}\n", self.after.trim_end());
        }
        t
    }
}
