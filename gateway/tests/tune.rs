//! `edgegate tune --check`: one line per problem, exit 1 on a fatal one, 0
//! when the host carries the config, 78 when the config itself is wrong.
//! The host values compared against are read from this machine in the test.

// The shared minimal gateway config (also `edgegate_tests::fixture`).
#[path = "../../tests/src/fixture.rs"]
mod fixture;

use std::path::PathBuf;
use std::process::{Command, Output};

use nix::sys::resource::{getrlimit, Resource};

fn config(tag: &str, max_clients: u64, backlog: u64) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("edgegate-tune-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = edgegate::tls::self_signed().unwrap();
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
    let mut g =
        fixture::MinimalGateway::new(dir.join("cert.pem"), dir.join("key.pem"), "127.0.0.1:7000");
    g.listener_keys = vec![format!("backlog = {backlog}")];
    g.after = format!("[limits]\nmax_clients = {max_clients}\n");
    let text = g.toml();
    let path = dir.join("edgegate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `edgegate tune --check` on `path`, then removes the config's directory.
fn tune_check(path: &PathBuf) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_edgegate"))
        .args(["tune", "--check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    out
}

fn sysctl(key: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/sys/{key}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[test]
fn tune_check_reports_a_nofile_limit_below_max_clients_and_exits_1() {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if hard >= 1 << 40 {
        eprintln!("skipped: RLIMIT_NOFILE hard limit is unlimited here");
        return;
    }
    let out = tune_check(&config("big", hard + 10_000, 128));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("fatal: nofile:"))
        .unwrap_or_else(|| panic!("no nofile line in:\n{stdout}"));
    assert!(
        line.contains(&format!("hard RLIMIT_NOFILE is {hard}")),
        "{line}"
    );
    assert!(
        line.contains("LimitNOFILE="),
        "the line names the fix: {line}"
    );
}

#[test]
fn tune_check_passes_a_small_config_with_exit_0() {
    // A backlog within this host's somaxconn, a few clients.
    let backlog = sysctl("net/core/somaxconn").map_or(128, |s| s.min(128));
    let out = tune_check(&config("small", 100, backlog));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("fatal:"), "{stdout}");
    assert!(stdout.contains("0 fatal"), "{stdout}");
}

#[test]
fn tune_check_warns_about_a_backlog_above_somaxconn_without_failing() {
    let Some(somaxconn) = sysctl("net/core/somaxconn") else {
        eprintln!("skipped: net.core.somaxconn not readable");
        return;
    };
    if somaxconn >= u64::from(u32::MAX) - 1 {
        eprintln!("skipped: somaxconn is at its maximum");
        return;
    }
    let out = tune_check(&config("backlog", 100, somaxconn + 1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("warning: somaxconn: listener public")),
        "{stdout}"
    );
}

#[test]
fn tune_check_with_a_broken_config_exits_78() {
    let out = Command::new(env!("CARGO_BIN_EXE_edgegate"))
        .args(["tune", "--check", "--config", "/nonexistent/edgegate.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/edgegate.toml"));
}

#[test]
fn tune_write_puts_tcp_mem_for_this_hosts_memory_in_the_file() {
    let dir = std::env::temp_dir().join(format!("edgegate-tune-write-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("70-edgegate-host.conf");
    let out = Command::new(env!("CARGO_BIN_EXE_edgegate"))
        .args(["tune", "--write"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(&path).unwrap();
    let pages: Vec<u64> = text
        .lines()
        .find_map(|l| l.strip_prefix("net.ipv4.tcp_mem = "))
        .expect("a tcp_mem line")
        .split(' ')
        .map(|v| v.parse().unwrap())
        .collect();
    // 20/30/40 % of this machine's MemTotal, in pages.
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    let page = edgegate::preflight::page_size();
    let want: Vec<u64> = [20, 30, 40]
        .iter()
        .map(|p| mem_kib * 1024 / 100 * p / page)
        .collect();
    assert_eq!(pages, want, "{text}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("systemctl restart systemd-sysctl"));
    let _ = std::fs::remove_dir_all(&dir);

    // Neither --check nor --write: a usage error, not a silent no-op.
    let out = Command::new(env!("CARGO_BIN_EXE_edgegate"))
        .arg("tune")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
