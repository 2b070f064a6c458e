//! The `edgegate` binary's command line: exit codes and messages an operator
//! (or systemd's ExecStartPre, or Ansible's validate) relies on.

use std::path::PathBuf;
use std::process::Command;

fn edgegate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgegate"))
}

fn temp(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("edgegate-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = edgegate::tls::self_signed().unwrap();
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
    let path = dir.join("edgegate.toml");
    std::fs::write(&path, text.replace("DIR", &dir.display().to_string())).unwrap();
    path
}

const GOOD: &str = r#"
[[listener]]
name = "public"
bind = "127.0.0.1:0"
tls_cert_path = "DIR/cert.pem"
tls_key_path = "DIR/key.pem"

[[route]]
listener = "public"
path = "/echo"
service = "example"

[[service]]
name = "example"
addresses = ["127.0.0.1:7000"]
"#;

#[test]
fn check_config_accepts_a_good_file() {
    let out = edgegate()
        .args(["check-config", "--config"])
        .arg(temp("good", GOOD))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

#[test]
fn check_config_names_the_line_of_an_unknown_key_and_exits_78() {
    let bad = format!("{GOOD}\n[limits]\nmax_clientz = 10\n");
    let out = edgegate()
        .args(["check-config", "--config"])
        .arg(temp("unknown", &bad))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_clientz") && err.contains("line"), "{err}");
}

#[test]
fn check_config_names_the_key_of_a_bad_value() {
    let bad = GOOD.replace("path = \"/echo\"", "path = \"echo\"");
    let out = edgegate()
        .args(["check-config", "--config"])
        .arg(temp("value", &bad))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("route[0].path"));
}

/// A message the gateway accepts must fit one link frame the service
/// accepts: `max_message_bytes` + 10 (the `ClientMessage` fields) against
/// the service's declared cap, 16 MiB unless `[[service]] max_frame_bytes`
/// says more.
#[test]
fn check_config_refuses_messages_the_services_frame_cap_cannot_carry() {
    let twenty_mib = format!("{GOOD}\n[limits]\nmax_message_bytes = 20971520\n");
    let out = edgegate()
        .args(["check-config", "--config"])
        .arg(temp("frame-cap", &twenty_mib))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    for says in [
        "service[0].max_frame_bytes",
        "limits.max_message_bytes = 20971520",
        "needs 20971530",
        "up to 16777216 bytes",
        "at most 16777206",
    ] {
        assert!(err.contains(says), "{says:?} missing from: {err}");
    }

    let declared = twenty_mib.replace(
        "addresses = [\"127.0.0.1:7000\"]",
        "addresses = [\"127.0.0.1:7000\"]\nmax_frame_bytes = 20971530",
    );
    let out = edgegate()
        .args(["check-config", "--config"])
        .arg(temp("frame-cap-declared", &declared))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A service that says less in its `Hello` than the config declares: the
/// gateway runs, and says at link-up which numbers disagree and what to
/// raise. The example service with its default 16 MiB cap, behind a config
/// that declares 20 MiB + 10 for a 20 MiB `max_message_bytes`.
#[tokio::test]
async fn run_warns_at_link_up_when_the_service_says_a_smaller_frame_cap() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop_service = stop.clone().drop_guard();
    tokio::spawn(edgegate_link::example::run_example_service(listener, stop));
    let text = GOOD.replace(
        "addresses = [\"127.0.0.1:7000\"]",
        &format!("addresses = [\"{service}\"]\nlinks = 1\nmax_frame_bytes = 20971530"),
    ) + "\n[limits]\nmax_message_bytes = 20971520\n\n[admin]\nbind = \"127.0.0.1:0\"\ncontrol_socket = \"\"\n";
    let config = temp("link-up-cap", &text);
    let log = config.with_file_name("stderr.log");
    let mut child = edgegate()
        .args(["run", "--config"])
        .arg(&config)
        .env("EDGEGATE_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut err = String::new();
    while std::time::Instant::now() < deadline && !err.contains("needs 20971530") {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        err = std::fs::read_to_string(&log).unwrap_or_default();
    }
    let _ = child.kill();
    let _ = child.wait();
    for says in [
        "up to 16777216 bytes",
        "limits.max_message_bytes = 20971520 needs 20971530",
        "above 16777206 bytes are refused with 1009",
        "--max-frame-bytes",
        "[[service]] max_frame_bytes",
    ] {
        assert!(err.contains(says), "{says:?} missing from: {err}");
    }
}

/// The link protocol's `u32` length bounds a message, whatever the caps.
#[test]
fn check_config_refuses_messages_no_link_frame_can_carry() {
    let max = edgegate_link::proto::MAX_MESSAGE_BYTES;
    let too_big = GOOD.replace(
        "addresses = [\"127.0.0.1:7000\"]",
        "addresses = [\"127.0.0.1:7000\"]\nmax_frame_bytes = 4294967295",
    ) + &format!("\n[limits]\nmax_message_bytes = {}\n", max + 1);
    let out = edgegate()
        .args(["check-config", "--config"])
        .arg(temp("frame-cap-u32", &too_big))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("limits.max_message_bytes") && err.contains(&max.to_string()),
        "{err}"
    );
    let largest = too_big.replace(&(max + 1).to_string(), &max.to_string());
    let out = edgegate()
        .args(["check-config", "--config"])
        .arg(temp("frame-cap-u32-ok", &largest))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn run_with_a_broken_config_exits_78_before_binding() {
    let bad = GOOD.replace("cert.pem", "missing.pem");
    let out = edgegate()
        .args(["run", "--config"])
        .arg(temp("run", &bad))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.pem"));
}

#[test]
fn missing_config_file_exits_78_with_its_path() {
    let out = edgegate()
        .args(["check-config", "--config", "/nonexistent/edgegate.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/edgegate.toml"));
}

#[test]
fn shipped_example_config_is_accepted_when_its_certificates_exist() {
    // The shipped file names Debian's snakeoil pair; point it at a test pair.
    let shipped = include_str!("../config/edgegate.toml")
        .replace("/etc/ssl/certs/ssl-cert-snakeoil.pem", "DIR/cert.pem")
        .replace("/etc/ssl/private/ssl-cert-snakeoil.key", "DIR/key.pem");
    let out = edgegate()
        .args(["check-config", "--config"])
        .arg(temp("shipped", &shipped))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn version_is_printed() {
    let out = edgegate().arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

/// A PEM file whose CERTIFICATE block is base64 of bytes that are not X.509:
/// it passes a PEM reader, and only a certificate parser rejects it.
const GARBAGE_CERT: &str =
    "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZSBnYXJiYWdlIGdhcmJhZ2U=\n-----END CERTIFICATE-----\n";

/// Writes a config whose certificate or key is replaced by `cert`/`key` when given.
fn with_files(name: &str, cert: Option<&str>, key: Option<&str>) -> PathBuf {
    let path = temp(name, GOOD);
    let dir = path.parent().unwrap();
    if let Some(cert) = cert {
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
    }
    if let Some(key) = key {
        std::fs::write(dir.join("key.pem"), key).unwrap();
    }
    path
}

fn assert_config_error(out: &std::process::Output, names: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains(names), "{names} not named in: {err}");
}

#[test]
fn check_config_rejects_a_certificate_that_is_not_x509_naming_the_file() {
    let path = with_files("garbage-cert", Some(GARBAGE_CERT), None);
    let out = edgegate()
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_config_error(&out, "cert.pem");
}

#[test]
fn check_config_rejects_a_key_that_does_not_match_the_certificate() {
    let (_, other_key) = edgegate::tls::self_signed().unwrap();
    let path = with_files("mismatch", None, Some(&other_key));
    let out = edgegate()
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_config_error(&out, "key.pem");
}

#[test]
fn run_with_a_garbage_certificate_exits_78_so_systemd_does_not_restart_it() {
    let path = with_files("run-garbage", Some(GARBAGE_CERT), None);
    let out = edgegate()
        .args(["run", "--config"])
        .arg(&path)
        .env("EDGEGATE_LOG", "info")
        .output()
        .unwrap();
    assert_config_error(&out, "cert.pem");
}

#[test]
fn run_with_a_mismatched_key_exits_78() {
    let (_, other_key) = edgegate::tls::self_signed().unwrap();
    let path = with_files("run-mismatch", None, Some(&other_key));
    let out = edgegate()
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_config_error(&out, "key.pem");
}
