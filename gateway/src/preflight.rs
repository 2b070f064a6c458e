//! Preflight: does this host carry the configuration? `edgegate tune --check`
//! prints the findings and exits 1 on a fatal one; `edgegate run` logs the
//! same findings at start-up and starts anyway.
//!
//! Each finding is one actionable line: what is short, by how much, and the
//! setting that fixes it. The checks and their arithmetic:
//!
//! | check | needs | severity |
//! |---|---|---|
//! | hard `RLIMIT_NOFILE` | ≥ max_clients + links + [`RESERVED_FDS`] | fatal |
//! | `fs.nr_open` | ≥ the same (LimitNOFILE cannot exceed it) | fatal |
//! | `fs.file-max` | ≥ the same (system-wide) | warning |
//! | `net.core.somaxconn` | ≥ each listener's backlog (the kernel caps it silently) | warning |
//! | `net.ipv4.tcp_mem` | max ≥ max_clients × [`TCP_PAGES_PER_CLIENT`] | warning |
//! | `net.ipv4.tcp_mem` | max ≤ [`TCP_MEM_MAX_PERCENT_LIMIT`] % of MemTotal | warning |
//! | `nf_conntrack_max` (module loaded) | ≥ max_clients + links | warning |
//! | `ip_local_port_range` | ≥ links to one address; listener and admin ports outside it or reserved | warning |
//!
//! The limits read are the ones of the process running the check: under
//! systemd the unit's `LimitNOFILE=` applies, and the gateway logs its own
//! findings at start-up.

use std::fmt;
use std::net::SocketAddr;

use nix::sys::resource::{getrlimit, Resource};

use crate::config::Config;
use crate::runtime::{NofileLimit, RESERVED_FDS};

/// Socket memory charged to a client with data queued, in pages. The kernel
/// charges socket buffers in whole `SK_MEM_QUANTUM` units (one 4 KiB page),
/// so a client with one small message in its send queue costs one page of
/// `tcp_mem`; an idle client costs none. A publish to every client therefore
/// needs about `max_clients` pages at once.
pub const TCP_PAGES_PER_CLIENT: u64 = 1;

/// `edgegate tune --write`: `tcp_mem` as percentages of MemTotal (min,
/// pressure, max), the same defaults as the Ansible role's
/// `edgegate_host_tcp_mem_*_percent`. The kernel's own default is about
/// 4.7 / 6.25 / 9.4 % (RAM / 16 around the pressure value): too little for a
/// fan-out to millions, while a fixed big-host value (the package once
/// shipped 16/24/32 GiB) is more than a small host has.
pub const TCP_MEM_PERCENT: [u64; 3] = [20, 30, 40];
/// Above this share of MemTotal, `tcp_mem` max promises socket memory the
/// host cannot back: the OOM killer acts before TCP's own limit does.
pub const TCP_MEM_MAX_PERCENT_LIMIT: u64 = 60;
/// Where `edgegate tune --write` puts the host's file (after the package's
/// `/usr/lib/sysctl.d/60-edgegate.conf`, so it wins).
pub const HOST_SYSCTL_PATH: &str = "/etc/sysctl.d/70-edgegate-host.conf";

/// The host-specific sysctl file: `tcp_mem` from this host's memory.
pub fn host_sysctl_file(mem_total_bytes: u64, page_bytes: u64) -> String {
    let page_bytes = page_bytes.max(1);
    let pages = TCP_MEM_PERCENT.map(|p| mem_total_bytes / 100 * p / page_bytes);
    let gib = |pages: u64| (pages * page_bytes) as f64 / f64::from(1u32 << 30);
    format!(
        "# Written by `edgegate tune --write` from this host's memory; rerun it\n\
         # after a memory change. Overrides /usr/lib/sysctl.d/60-edgegate.conf.\n\
         # MemTotal {:.1} GiB, page {page_bytes} B.\n\
         #\n\
         # Socket memory for all TCP (pages): {}/{}/{} % of MemTotal\n\
         # = {:.1} / {:.1} / {:.1} GiB. An idle client costs none; a publish to\n\
         # every client costs about one page each while it is queued.\n\
         net.ipv4.tcp_mem = {} {} {}\n",
        mem_total_bytes as f64 / f64::from(1u32 << 30),
        TCP_MEM_PERCENT[0],
        TCP_MEM_PERCENT[1],
        TCP_MEM_PERCENT[2],
        gib(pages[0]),
        gib(pages[1]),
        gib(pages[2]),
        pages[0],
        pages[1],
        pages[2],
    )
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The gateway will fail below `max_clients` (clients refused with EMFILE).
    Fatal,
    /// Degrades under load or in corner cases; worth fixing.
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Fatal => "fatal",
            Severity::Warning => "warning",
        }
    }
}

/// One problem, as one actionable line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// Short key of the check (`nofile`, `nr_open`, `somaxconn`, ...).
    pub check: &'static str,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: {}",
            self.severity.as_str(),
            self.check,
            self.message
        )
    }
}

/// The live kernel settings and limits the checks compare against. `None`
/// where a value cannot be read (a check is then skipped, not failed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Host {
    pub nofile: Option<NofileLimit>,
    pub nr_open: Option<u64>,
    pub file_max: Option<u64>,
    pub somaxconn: Option<u64>,
    /// `net.ipv4.tcp_mem`: min, pressure, max, in pages.
    pub tcp_mem: Option<[u64; 3]>,
    /// `MemTotal` from `/proc/meminfo`, bytes.
    pub mem_total: Option<u64>,
    /// The page size `tcp_mem` is counted in, bytes.
    pub page_size: u64,
    /// `None` when `nf_conntrack` is not loaded.
    pub conntrack_max: Option<u64>,
    pub port_range: Option<(u16, u16)>,
    pub reserved_ports: Vec<(u16, u16)>,
}

impl Host {
    /// Reads this host from `/proc/sys` and `getrlimit`.
    pub fn read() -> Host {
        let nofile = getrlimit(Resource::RLIMIT_NOFILE)
            .ok()
            .map(|(soft, hard)| NofileLimit { soft, hard });
        let tcp_mem = sysctl("net/ipv4/tcp_mem").and_then(|v| {
            let n: Vec<u64> = v
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            <[u64; 3]>::try_from(n).ok()
        });
        let port_range = sysctl("net/ipv4/ip_local_port_range").and_then(|v| {
            let mut it = v.split_whitespace().filter_map(|x| x.parse::<u16>().ok());
            Some((it.next()?, it.next()?))
        });
        Host {
            nofile,
            nr_open: sysctl_u64("fs/nr_open"),
            file_max: sysctl_u64("fs/file-max"),
            somaxconn: sysctl_u64("net/core/somaxconn"),
            tcp_mem,
            mem_total: mem_total_bytes(),
            page_size: page_size(),
            conntrack_max: sysctl_u64("net/netfilter/nf_conntrack_max"),
            port_range,
            reserved_ports: sysctl("net/ipv4/ip_local_reserved_ports")
                .map(|v| parse_port_list(&v))
                .unwrap_or_default(),
        }
    }
}

/// Whose descriptor limit [`Host::nofile`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NofileOf {
    /// This process's own `getrlimit`.
    ThisProcess,
    /// `edgegate.service`'s `LimitNOFILE=`, as systemd will apply it.
    Unit,
}

impl Host {
    /// What `edgegate tune --check` compares against. An operator runs it
    /// from a shell whose descriptor limit (often 1024) says nothing about
    /// the gateway's: when `edgegate.service` is loaded and this process is
    /// not itself started by systemd, the limit is the unit's `LimitNOFILE=`
    /// (read with `systemctl show`, the one stable interface to it without
    /// a D-Bus client). Everything else is read as [`Host::read`] does.
    pub fn read_for_tune() -> (Host, NofileOf) {
        let mut host = Host::read();
        if std::env::var_os("INVOCATION_ID").is_some() {
            return (host, NofileOf::ThisProcess);
        }
        match unit_nofile("edgegate.service") {
            Some(limit) => {
                host.nofile = Some(limit);
                (host, NofileOf::Unit)
            }
            None => (host, NofileOf::ThisProcess),
        }
    }
}

/// `LimitNOFILESoft`/`LimitNOFILE` of a loaded unit; `None` without
/// systemd or when the unit is not installed.
fn unit_nofile(unit: &str) -> Option<NofileLimit> {
    let out = std::process::Command::new("systemctl")
        .args([
            "show",
            unit,
            "-p",
            "LoadState",
            "-p",
            "LimitNOFILESoft",
            "-p",
            "LimitNOFILE",
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    parse_unit_nofile(&String::from_utf8_lossy(&out.stdout))
}

/// Parses `systemctl show` lines `KEY=VALUE` (`infinity` is `u64::MAX`).
fn parse_unit_nofile(text: &str) -> Option<NofileLimit> {
    let mut loaded = false;
    let (mut soft, mut hard) = (None, None);
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let number = || match value.trim() {
            "infinity" => Some(u64::MAX),
            v => v.parse().ok(),
        };
        match key {
            "LoadState" => loaded = value.trim() == "loaded",
            "LimitNOFILESoft" => soft = number(),
            "LimitNOFILE" => hard = number(),
            _ => {}
        }
    }
    let hard = hard.filter(|_| loaded)?;
    Some(NofileLimit {
        soft: soft.unwrap_or(hard),
        hard,
    })
}

/// `MemTotal` of `/proc/meminfo` in bytes.
pub fn mem_total_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The system page size (4096 where it cannot be read).
pub fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| u64::try_from(p).ok())
        .unwrap_or(4096)
}

fn sysctl(key: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{key}")).ok()
}

fn sysctl_u64(key: &str) -> Option<u64> {
    sysctl(key)?.trim().parse().ok()
}

/// Parses a port list such as `8443,7611-9099` (as in `ip_local_reserved_ports`).
pub fn parse_port_list(text: &str) -> Vec<(u16, u16)> {
    text.trim()
        .split(',')
        .filter_map(|part| {
            let part = part.trim();
            match part.split_once('-') {
                Some((a, b)) => Some((a.trim().parse().ok()?, b.trim().parse().ok()?)),
                None => {
                    let p = part.parse().ok()?;
                    Some((p, p))
                }
            }
        })
        .collect()
}

/// Descriptors the configuration needs: one per client, one per link, and
/// [`RESERVED_FDS`] for listeners, the admin endpoint, the runtime and logs.
pub fn needed_fds(config: &Config) -> u64 {
    config.limits.max_clients as u64 + total_links(config) as u64 + RESERVED_FDS
}

/// Links the gateway keeps: `links` to each address of each service.
fn total_links(config: &Config) -> usize {
    config
        .services
        .iter()
        .map(|s| s.links * s.addresses.len())
        .sum()
}

/// Compares `host` with what `config` needs; an empty list means it fits.
pub fn check(config: &Config, host: &Host) -> Vec<Finding> {
    let mut out = Vec::new();
    let max_clients = config.limits.max_clients as u64;
    let links = total_links(config) as u64;
    let needed = needed_fds(config);
    let mut add = |severity, check, message: String| {
        out.push(Finding {
            severity,
            check,
            message,
        })
    };

    if let Some(limit) = host.nofile {
        if limit.hard < needed {
            add(
                Severity::Fatal,
                "nofile",
                format!(
                    "hard RLIMIT_NOFILE is {} but max_clients = {max_clients} needs {needed} descriptors \
                     ({max_clients} clients + {links} links + {RESERVED_FDS} reserved): clients beyond ~{} are refused with EMFILE; \
                     set LimitNOFILE={needed} or more (systemctl edit edgegate; the package sets 2100000) or lower [limits] max_clients",
                    limit.hard,
                    limit.hard.saturating_sub(links + RESERVED_FDS)
                ),
            );
        }
    }
    if let Some(nr_open) = host.nr_open {
        if nr_open < needed {
            add(
                Severity::Fatal,
                "nr_open",
                format!(
                    "fs.nr_open is {nr_open}, below the {needed} descriptors max_clients = {max_clients} needs; no RLIMIT_NOFILE can exceed it: \
                     set fs.nr_open = {} in /etc/sysctl.d/90-edgegate-local.conf",
                    needed.next_power_of_two()
                ),
            );
        }
    }
    if let Some(file_max) = host.file_max {
        if file_max < needed {
            add(
                Severity::Warning,
                "file_max",
                format!(
                    "fs.file-max is {file_max}, below the {needed} descriptors this process alone needs: \
                     set fs.file-max = {} in /etc/sysctl.d/90-edgegate-local.conf",
                    (needed * 2).next_power_of_two()
                ),
            );
        }
    }
    if let Some(somaxconn) = host.somaxconn {
        for l in &config.listeners {
            if u64::from(l.backlog) > somaxconn {
                add(
                    Severity::Warning,
                    "somaxconn",
                    format!(
                        "listener {}: backlog {} is silently capped to net.core.somaxconn = {somaxconn}: a reconnect storm overflows the accept queue; \
                         set net.core.somaxconn = {} or lower the listener's backlog",
                        l.name, l.backlog, l.backlog
                    ),
                );
            }
        }
    }
    if let Some([_, pressure, max]) = host.tcp_mem {
        let pages = max_clients * TCP_PAGES_PER_CLIENT;
        let gib = |p: u64| p as f64 * host.page_size as f64 / f64::from(1u32 << 30);
        let too_big = host.mem_total.filter(|&mem| {
            max.saturating_mul(host.page_size) / TCP_MEM_MAX_PERCENT_LIMIT * 100 > mem
        });
        if let Some(mem) = too_big {
            add(
                Severity::Warning,
                "tcp_mem",
                format!(
                    "net.ipv4.tcp_mem max is {max} pages ({:.1} GiB), more than {TCP_MEM_MAX_PERCENT_LIMIT} % of this host's {:.1} GiB: \
                     under a fan-out the OOM killer acts before TCP's limit does; write {HOST_SYSCTL_PATH} for this host's memory with \
                     `edgegate tune --write` and apply it (`systemctl restart systemd-sysctl`)",
                    gib(max),
                    mem as f64 / f64::from(1u32 << 30)
                ),
            );
        } else if max < pages {
            add(
                Severity::Warning,
                "tcp_mem",
                format!(
                    "net.ipv4.tcp_mem max is {max} pages ({:.1} GiB) but one message queued to each of max_clients = {max_clients} clients needs ~{pages} pages \
                     ({TCP_PAGES_PER_CLIENT} page per client with data queued): TCP drops and stalls during a fan-out to everyone; raise the third value of net.ipv4.tcp_mem to {pages} or more",
                    gib(max)
                ),
            );
        } else if pressure < pages {
            add(
                Severity::Warning,
                "tcp_mem",
                format!(
                    "net.ipv4.tcp_mem pressure threshold is {pressure} pages but a fan-out to max_clients = {max_clients} clients needs ~{pages} pages: \
                     TCP shrinks buffers under pressure; raise the second value of net.ipv4.tcp_mem to {pages} or more"
                ),
            );
        }
    }
    if let Some(ct_max) = host.conntrack_max {
        if ct_max < max_clients + links {
            add(
                Severity::Warning,
                "conntrack",
                format!(
                    "nf_conntrack is loaded and net.netfilter.nf_conntrack_max = {ct_max} < {} (max_clients + links): new clients are dropped once the table is full; \
                     exempt client ports with a notrack rule (docs/install.md) or raise net.netfilter.nf_conntrack_max",
                    max_clients + links
                ),
            );
        }
    }
    if let Some((lo, hi)) = host.port_range {
        let size = u64::from(hi.saturating_sub(lo)) + 1;
        for s in &config.services {
            // Each address gets `links` links, each from its own ephemeral port.
            let per_addr = s.links as u64;
            if per_addr > size {
                add(
                    Severity::Warning,
                    "port_range",
                    format!(
                        "service {}: {per_addr} links to one address but net.ipv4.ip_local_port_range {lo}-{hi} has {size} ports: widen the range or use fewer links",
                        s.name
                    ),
                );
            }
        }
        let mut ports: Vec<(String, SocketAddr)> = config
            .listeners
            .iter()
            .map(|l| (format!("listener {}", l.name), l.bind))
            .collect();
        ports.push(("admin endpoint".into(), config.admin_bind));
        for (what, addr) in ports {
            let port = addr.port();
            let reserved = host
                .reserved_ports
                .iter()
                .any(|&(a, b)| (a..=b).contains(&port));
            if port != 0 && (lo..=hi).contains(&port) && !reserved {
                add(
                    Severity::Warning,
                    "port_range",
                    format!(
                        "{what}: port {port} is inside net.ipv4.ip_local_port_range {lo}-{hi} and not reserved: an outgoing connection can take it and the next bind fails; \
                         add {port} to net.ipv4.ip_local_reserved_ports"
                    ),
                );
            }
        }
    }
    out
}

/// Whether any finding is fatal.
pub fn any_fatal(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.severity == Severity::Fatal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_clients: usize, backlog: u32, bind: &str) -> Config {
        let dir = std::env::temp_dir().join(format!(
            "edgegate-preflight-{}-{max_clients}-{backlog}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = crate::tls::self_signed().unwrap();
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
        let text = format!(
            "[admin]\nbind = \"127.0.0.1:7611\"\n\n[[listener]]\nname = \"public\"\nbind = \"{bind}\"\nbacklog = {backlog}\n\
             tls_cert_path = \"{d}/cert.pem\"\ntls_key_path = \"{d}/key.pem\"\n\n\
             [[route]]\nlistener = \"public\"\npath = \"/echo\"\nservice = \"example\"\n\n\
             [[service]]\nname = \"example\"\naddresses = [\"127.0.0.1:7000\"]\nlinks = 4\n\n\
             [limits]\nmax_clients = {max_clients}\n",
            d = dir.display()
        );
        let path = dir.join("edgegate.toml");
        Config::from_toml(&path, &text, std::iter::empty()).unwrap()
    }

    #[test]
    fn the_units_limit_is_read_from_systemctl_show() {
        let shown = "LoadState=loaded\nLimitNOFILESoft=2100000\nLimitNOFILE=2100000\n";
        assert_eq!(
            parse_unit_nofile(shown),
            Some(NofileLimit {
                soft: 2_100_000,
                hard: 2_100_000
            })
        );
        let infinite = "LimitNOFILE=infinity\nLoadState=loaded\nLimitNOFILESoft=1024";
        assert_eq!(parse_unit_nofile(infinite).map(|l| l.hard), Some(u64::MAX));
        // Not installed: systemctl still prints the defaults.
        let missing = "LoadState=not-found\nLimitNOFILESoft=1024\nLimitNOFILE=524288\n";
        assert_eq!(parse_unit_nofile(missing), None);
        assert_eq!(parse_unit_nofile(""), None);
    }

    fn roomy() -> Host {
        Host {
            nofile: Some(NofileLimit {
                soft: 4_194_304,
                hard: 4_194_304,
            }),
            nr_open: Some(4_194_304),
            file_max: Some(8_388_608),
            somaxconn: Some(65_535),
            tcp_mem: Some([1_000_000, 4_000_000, 8_000_000]),
            mem_total: Some(128 << 30),
            page_size: 4096,
            conntrack_max: None,
            port_range: Some((32_768, 60_999)),
            reserved_ports: Vec::new(),
        }
    }

    #[test]
    fn a_tcp_mem_bigger_than_the_host_is_a_warning_that_names_tune_write() {
        // The package's old fixed value (32 GiB max) on a 3 GiB VM.
        let host = Host {
            tcp_mem: Some([4_194_304, 6_291_456, 8_388_608]),
            mem_total: Some(3 << 30),
            ..roomy()
        };
        let f = check(&config(100_000, 1024, "0.0.0.0:8443"), &host);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!((f[0].check, f[0].severity), ("tcp_mem", Severity::Warning));
        assert!(f[0].message.contains("edgegate tune --write"), "{}", f[0]);
        // What tune --write computes for that host passes.
        let written = host_sysctl_file(3 << 30, 4096);
        let line = written
            .lines()
            .find_map(|l| l.strip_prefix("net.ipv4.tcp_mem = "))
            .expect("a tcp_mem line");
        let pages: Vec<u64> = line.split(' ').map(|v| v.parse().unwrap()).collect();
        let host = Host {
            tcp_mem: Some(<[u64; 3]>::try_from(pages.clone()).unwrap()),
            ..host
        };
        assert_eq!(check(&config(100_000, 1024, "0.0.0.0:8443"), &host), vec![]);
        // 20/30/40 % of 3 GiB in 4 KiB pages.
        assert_eq!(pages, [157_286, 235_929, 314_572]);
    }

    #[test]
    fn a_roomy_host_has_no_findings() {
        assert_eq!(
            check(&config(2_000_000, 65_535, "0.0.0.0:8443"), &roomy()),
            vec![]
        );
    }

    #[test]
    fn a_low_hard_nofile_limit_is_fatal_and_names_the_fix() {
        let host = Host {
            nofile: Some(NofileLimit {
                soft: 20_000,
                hard: 20_000,
            }),
            ..roomy()
        };
        let f = check(&config(100_000, 1024, "0.0.0.0:8443"), &host);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].severity, Severity::Fatal);
        assert!(f[0].message.contains("LimitNOFILE=100260"), "{}", f[0]);
        assert!(any_fatal(&f));
    }

    #[test]
    fn every_shortfall_is_one_line() {
        let host = Host {
            nofile: Some(NofileLimit {
                soft: 1024,
                hard: 4096,
            }),
            nr_open: Some(1_048_576),
            file_max: Some(100_000),
            somaxconn: Some(4096),
            tcp_mem: Some([10, 20, 30]),
            mem_total: Some(128 << 30),
            page_size: 4096,
            conntrack_max: Some(65_536),
            port_range: Some((1024, 65_000)),
            reserved_ports: parse_port_list("7611"),
        };
        let f = check(&config(2_000_000, 65_535, "0.0.0.0:8443"), &host);
        let checks: Vec<_> = f.iter().map(|f| f.check).collect();
        assert_eq!(
            checks,
            [
                "nofile",
                "nr_open",
                "file_max",
                "somaxconn",
                "tcp_mem",
                "conntrack",
                "port_range"
            ],
            "{f:#?}"
        );
        assert!(f.iter().all(|f| !f.to_string().contains('\n')));
        // 7611 (admin) is reserved; 8443 is not.
        assert!(f.last().is_some_and(|f| f.message.contains("port 8443")));
    }

    #[test]
    fn port_lists_parse_ranges_and_singles() {
        assert_eq!(
            parse_port_list("8443,7611-9099\n"),
            vec![(8443, 8443), (7611, 9099)]
        );
        assert_eq!(parse_port_list("\n"), vec![]);
    }

    #[test]
    fn this_host_can_be_read() {
        let h = Host::read();
        assert!(
            h.nofile.is_some() && h.somaxconn.is_some() && h.port_range.is_some(),
            "{h:?}"
        );
    }
}
