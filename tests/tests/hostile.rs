//! Hostile input against a real in-process gateway: broken TLS, broken HTTP
//! upgrades, broken WebSocket frames, bad tokens and a framed-protocol
//! attacker; plus property tests of both decoders (the stable-toolchain
//! stand-in for the cargo-fuzz targets in `fuzz/`).
//!
//! What every test checks: the attacker is refused with the documented
//! close code or HTTP status, the refusal is counted (`phase` of
//! `edgegate_handshake_failures_total`, `reason` of
//! `edgegate_clients_closed_total`), nothing reaches the service, and the
//! gateway holds no connection afterwards. The results table is
//! `docs/hostile-input.md`; faults (link loss, EMFILE, signals) are in
//! `hostile_faults.rs`.

use std::time::{Duration, Instant};

use edgegate_link::service::Event;
use edgegate_tests::{eventually, refused_status, EventService, GatewayBuilder, TestGateway};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Helpers: raw TLS, raw HTTP, raw WebSocket frames.
// ---------------------------------------------------------------------------

/// A gateway with 1 s handshake and upgrade timeouts, 1 KiB messages, one
/// link to `service`.
async fn gateway(service: &EventService) -> TestGateway {
    gateway_with_timeouts(service, 1).await
}

/// As [`gateway`], with `secs` for the handshake and upgrade timeouts: long
/// ones tell "closed at once" from "closed at the timeout" on a busy machine.
async fn gateway_with_timeouts(service: &EventService, secs: u64) -> TestGateway {
    GatewayBuilder::new(service.addr)
        .links(1)
        .limit("handshake_timeout_secs", secs)
        .limit("upgrade_timeout_secs", secs)
        .limit("max_message_bytes", 1024)
        .start()
        .await
}

/// Waits until the gateway holds no connection; returns how long it took.
async fn settle(gw: &TestGateway, within: Duration) -> Duration {
    let start = Instant::now();
    assert!(
        eventually(within, || gw.gateway().shared().admission.connections()
            == 0)
        .await,
        "gateway still holds {} connections after {within:?}",
        gw.gateway().shared().admission.connections()
    );
    start.elapsed()
}

fn failures(gw: &TestGateway, phase: &str) -> f64 {
    gw.metric(
        "edgegate_handshake_failures_total",
        &format!("phase=\"{phase}\""),
    )
}

fn closed(gw: &TestGateway, reason: &str) -> f64 {
    gw.metric(
        "edgegate_clients_closed_total",
        &format!("reason=\"{reason}\""),
    )
}

/// Reads until the peer closes (EOF or error); returns the bytes read and
/// when it closed. Panics if it stays open past `within`.
async fn read_until_closed<S: AsyncReadExt + Unpin>(
    s: &mut S,
    within: Duration,
) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => panic!("peer still open after {within:?}"),
            Ok(Ok(0) | Err(_)) => return (got, start.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A TLS stream to the gateway (ALPN `http/1.1`), nothing sent yet.
async fn raw_tls(gw: &TestGateway) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    gw.cert
        .connector()
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("tls handshake")
}

/// The bytes of a real rustls ClientHello for `localhost`.
fn real_client_hello(gw: &TestGateway) -> Vec<u8> {
    let config = gw.cert.connector().config().clone();
    let mut conn =
        rustls::ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// A hand-made ClientHello record: `version` in the record and the hello,
/// only `suites`, the usual ECDHE extensions, and no `supported_versions`
/// (so the offer is exactly `version`).
fn crafted_client_hello(version: [u8; 2], suites: &[u16]) -> Vec<u8> {
    let mut ext = Vec::new();
    let mut push_ext = |ty: u16, body: &[u8]| {
        ext.extend_from_slice(&ty.to_be_bytes());
        ext.extend_from_slice(&(body.len() as u16).to_be_bytes());
        ext.extend_from_slice(body);
    };
    // server_name: localhost
    let name = b"localhost";
    let mut sni = Vec::new();
    sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name);
    push_ext(0x0000, &sni);
    // supported_groups: x25519, secp256r1
    push_ext(0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17]);
    // ec_point_formats: uncompressed
    push_ext(0x000b, &[1, 0]);
    // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256, rsa_pkcs1_sha1
    push_ext(
        0x000d,
        &[0, 8, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01, 0x02, 0x01],
    );

    let mut hello = Vec::new();
    hello.extend_from_slice(&version);
    hello.extend_from_slice(&[0x5a; 32]); // random
    hello.push(0); // session id
    hello.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        hello.extend_from_slice(&s.to_be_bytes());
    }
    hello.extend_from_slice(&[1, 0]); // compression: null
    hello.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    hello.extend_from_slice(&ext);

    let mut hs = vec![0x01];
    hs.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&hello);
    let mut record = vec![0x16, version[0], version[1]];
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    record
}

/// The fatal alert description the server answered with, if its first
/// record is an alert.
fn alert_description(reply: &[u8]) -> Option<u8> {
    (reply.len() >= 7 && reply[0] == 0x15 && reply[5] == 2).then(|| reply[6])
}

const TLS_ALERT_HANDSHAKE_FAILURE: u8 = 40;
const TLS_ALERT_PROTOCOL_VERSION: u8 = 70;

/// A valid upgrade request for `path`, with `extra` header lines.
fn upgrade_request(method: &str, path: &str, extra: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Reads an HTTP response head; `None` when the peer closed first.
async fn read_http_status<S: AsyncReadExt + Unpin>(s: &mut S) -> Option<u16> {
    read_http_head(s).await.map(|(status, _)| status)
}

/// Reads an HTTP response head: the status and the header lines, lowercased.
async fn read_http_head<S: AsyncReadExt + Unpin>(s: &mut S) -> Option<(u16, Vec<String>)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(WAIT, s.read(&mut byte))
            .await
            .expect("http reply in time")
        {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let headers = text
        .lines()
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    Some((status, headers))
}

/// A TLS stream upgraded to WebSocket on `/echo` by hand.
async fn raw_websocket(gw: &TestGateway) -> TlsStream<TcpStream> {
    let mut s = raw_tls(gw).await;
    s.write_all(upgrade_request("GET", "/echo", "").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_http_status(&mut s).await, Some(101));
    s
}

/// One WebSocket frame, written by hand so it can be wrong on purpose.
fn ws_frame(fin: bool, rsv: u8, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![(u8::from(fin) << 7) | ((rsv & 7) << 4) | (opcode & 0x0f)];
    let m = if mask.is_some() { 0x80 } else { 0 };
    let n = payload.len();
    if n < 126 {
        f.push(m | n as u8);
    } else if n <= 0xffff {
        f.push(m | 126);
        f.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        f.push(m | 127);
        f.extend_from_slice(&(n as u64).to_be_bytes());
    }
    match mask {
        Some(k) => {
            f.extend_from_slice(&k);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

/// A masked, final frame (what a well-behaved client sends).
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    ws_frame(true, 0, opcode, Some([0x37, 0xfa, 0x21, 0x3d]), payload)
}

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;

/// What the server ended a raw WebSocket with.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// A close frame with this code.
    Close(u16),
    /// A close frame without a code.
    CloseNoCode,
    /// The connection ended without a close frame.
    Eof,
}

/// Reads server frames (unmasked) until a close frame or the end; counts pongs.
async fn read_end(s: &mut TlsStream<TcpStream>, within: Duration) -> (End, usize) {
    let mut pongs = 0;
    let end = tokio::time::timeout(within, async {
        loop {
            let mut h = [0u8; 2];
            if s.read_exact(&mut h).await.is_err() {
                return End::Eof;
            }
            let opcode = h[0] & 0x0f;
            let len = match h[1] & 0x7f {
                126 => {
                    let mut b = [0u8; 2];
                    if s.read_exact(&mut b).await.is_err() {
                        return End::Eof;
                    }
                    u16::from_be_bytes(b) as usize
                }
                127 => {
                    let mut b = [0u8; 8];
                    if s.read_exact(&mut b).await.is_err() {
                        return End::Eof;
                    }
                    u64::from_be_bytes(b) as usize
                }
                n => n as usize,
            };
            let mut payload = vec![0u8; len];
            if s.read_exact(&mut payload).await.is_err() {
                return End::Eof;
            }
            match opcode {
                OP_CLOSE if payload.len() >= 2 => {
                    return End::Close(u16::from_be_bytes([payload[0], payload[1]]))
                }
                OP_CLOSE => return End::CloseNoCode,
                0xA => pongs += 1,
                _ => {}
            }
        }
    })
    .await
    .expect("server ends the connection in time");
    (end, pongs)
}

/// Every event the service has queued now (after a short quiet period).
async fn drain_events(service: &mut EventService) -> Vec<Event> {
    let mut events = Vec::new();
    while let Ok(Some(e)) =
        tokio::time::timeout(Duration::from_millis(300), service.events.recv()).await
    {
        events.push(e);
    }
    events
}

fn messages(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Event::Message { .. }))
        .count()
}

// ---------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------

#[tokio::test]
async fn garbage_instead_of_a_client_hello_is_dropped_at_once_and_counted_as_a_tls_failure() {
    let mut service = EventService::start().await;
    let gw = gateway_with_timeouts(&service, 10).await;
    let inputs: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        &[0u8; 512],
        &[
            0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0x00, 0xff, 0xfb, 0, 0, 0, 0,
        ],
        &[0xff; 64],
    ];
    for input in inputs {
        let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
        tcp.write_all(input).await.unwrap();
        let (_, after) = read_until_closed(&mut tcp, WAIT).await;
        assert!(
            after < Duration::from_secs(3),
            "closed only after {after:?} (the timeout is 10 s), not on the garbage"
        );
    }
    settle(&gw, WAIT).await;
    assert_eq!(failures(&gw, "tls"), inputs.len() as f64);
    assert_eq!(gw.gateway().client_count(), 0);
    let events = drain_events(&mut service).await;
    assert!(
        !events.iter().any(|e| matches!(e, Event::Open { .. })),
        "{events:?}"
    );
}

#[tokio::test]
async fn truncated_client_hello_and_silent_connections_end_at_the_handshake_timeout() {
    let service = EventService::start().await;
    let gw = gateway(&service).await;
    let hello = real_client_hello(&gw);
    let mut conns = Vec::new();
    // Silent after connect, half a ClientHello, a whole one but nothing after
    // the server's flight.
    for cut in [0, hello.len() / 2, hello.len()] {
        let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
        tcp.write_all(&hello[..cut]).await.unwrap();
        conns.push(tcp);
    }
    eventually(WAIT, || gw.gateway().shared().admission.connections() == 3).await;
    assert_eq!(gw.gateway().shared().admission.connections(), 3);
    for tcp in &mut conns {
        let (_, after) = read_until_closed(tcp, WAIT).await;
        assert!(after < Duration::from_secs(4), "held for {after:?}");
    }
    settle(&gw, WAIT).await;
    assert_eq!(failures(&gw, "tls"), 3.0);
}

#[tokio::test]
async fn slowloris_dripping_a_client_hello_is_cut_at_the_handshake_timeout_while_others_connect() {
    let service = EventService::start().await;
    // More permits than drips: this is about the timeout, not the permits.
    let gw = GatewayBuilder::new(service.addr)
        .links(1)
        .limit("handshake_timeout_secs", 1)
        .limit("handshake_permits", 64)
        .start()
        .await;
    let hello = real_client_hello(&gw);
    let start = Instant::now();
    let mut drips = Vec::new();
    for _ in 0..40 {
        let hello = hello.clone();
        let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
        drips.push(tokio::spawn(async move {
            // One byte every 100 ms: 40 s for the whole hello.
            for b in hello {
                if tcp.write_all(&[b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                let mut probe = [0u8; 1];
                if let Ok(Ok(0)) =
                    tokio::time::timeout(Duration::from_millis(1), tcp.read(&mut probe)).await
                {
                    break;
                }
            }
            start.elapsed()
        }));
    }
    // A real client is served meanwhile (40 drips hold 40 of 64 permits).
    let mut ws = gw.connect("/echo").await;
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::text("hi"))
        .await
        .unwrap();
    for d in drips {
        let held = d.await.unwrap();
        assert!(held < Duration::from_secs(5), "a drip lasted {held:?}");
    }
    drop(ws);
    settle(&gw, WAIT).await;
    assert_eq!(failures(&gw, "tls"), 40.0);
}

/// Connections that send nothing give their handshake permit back after
/// `CLIENT_HELLO_WAIT`, so they cannot keep new clients out for a whole
/// handshake timeout.
#[tokio::test]
async fn idle_connections_holding_every_handshake_permit_do_not_lock_out_new_clients() {
    let service = EventService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .links(1)
        .limit("handshake_permits", 8)
        .limit("handshake_timeout_secs", 10)
        .start()
        .await;
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    // Accepted, so each holds a handshake permit.
    assert!(eventually(WAIT, || gw.gateway().shared().admission.connections() == 8).await);
    let start = Instant::now();
    let _ws = gw.connect("/echo").await;
    let waited = start.elapsed();
    println!("new client behind 8 idle connections holding 8 permits: in after {waited:?}");
    assert!(
        waited < Duration::from_secs(4),
        "a new client waited {waited:?} behind idle connections"
    );
}

/// The cheap variant: one byte, then nothing. The permit is kept once a byte
/// has arrived, so `handshake_permits` such connections still hold every
/// permit for the handshake timeout (and a client that finishes TLS and
/// drips its HTTP request holds one for the upgrade timeout too).
#[tokio::test]
async fn connections_that_send_one_byte_and_stall_do_not_lock_out_new_clients() {
    let service = EventService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .links(1)
        .limit("handshake_permits", 8)
        .limit("handshake_timeout_secs", 10)
        .start()
        .await;
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
        tcp.write_all(&[0x16]).await.unwrap();
        stalled.push(tcp);
    }
    // Accepted, so each holds a handshake permit.
    assert!(eventually(WAIT, || gw.gateway().shared().admission.connections() == 8).await);
    let start = Instant::now();
    let _ws = gw.connect("/echo").await;
    let waited = start.elapsed();
    assert!(
        waited < Duration::from_secs(4),
        "a new client waited {waited:?} behind stalled connections"
    );
}

#[tokio::test]
async fn tls_1_0_and_1_1_offers_are_refused_with_a_protocol_version_alert() {
    let service = EventService::start().await;
    let gw = gateway_with_timeouts(&service, 10).await;
    // Only what a TLS 1.0/1.1 client has: RSA and ECDHE CBC-SHA suites, 3DES.
    let legacy_suites = [0x002f, 0x0035, 0xc013, 0xc014, 0xc009, 0xc00a, 0x000a];
    for version in [[3, 1], [3, 2]] {
        let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
        tcp.write_all(&crafted_client_hello(version, &legacy_suites))
            .await
            .unwrap();
        let (reply, after) = read_until_closed(&mut tcp, WAIT).await;
        assert_eq!(
            alert_description(&reply),
            Some(TLS_ALERT_PROTOCOL_VERSION),
            "version {version:?}: {reply:02x?}"
        );
        assert!(
            after < Duration::from_secs(3),
            "closed after {after:?}: at the 10 s timeout, not on the offer"
        );
    }
    settle(&gw, WAIT).await;
    assert_eq!(failures(&gw, "tls"), 2.0);
}

/// The client's cipher order is honoured (every suite offered is an AEAD
/// with forward secrecy): a client that prefers ChaCha20 gets it, one that
/// prefers AES-GCM gets that, on TLS 1.3 and 1.2; and nothing but AEAD,
/// forward-secret suites is offered at all.
#[tokio::test]
async fn the_client_cipher_order_is_honoured_and_every_suite_is_aead_with_forward_secrecy() {
    use rustls::crypto::ring::cipher_suite as cs;
    use rustls_pki_types::pem::PemObject;
    let service = EventService::start().await;
    let gw = gateway(&service).await;
    let negotiated = |suites: Vec<rustls::SupportedCipherSuite>,
                      version: &'static rustls::SupportedProtocolVersion| {
        let gw = &gw;
        async move {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pki_types::CertificateDer::pem_slice_iter(gw.cert.cert_pem.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
            let mut provider = rustls::crypto::ring::default_provider();
            provider.cipher_suites = suites;
            let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let tcp = TcpStream::connect(gw.addr).await.unwrap();
            let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .expect("tls handshake");
            tls.get_ref().1.negotiated_cipher_suite().unwrap().suite()
        }
    };
    let v13 = &rustls::version::TLS13;
    let v12 = &rustls::version::TLS12;
    for (offer, version, want) in [
        (
            vec![
                cs::TLS13_CHACHA20_POLY1305_SHA256,
                cs::TLS13_AES_256_GCM_SHA384,
            ],
            v13,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ),
        (
            vec![
                cs::TLS13_AES_128_GCM_SHA256,
                cs::TLS13_CHACHA20_POLY1305_SHA256,
            ],
            v13,
            cs::TLS13_AES_128_GCM_SHA256,
        ),
        (
            vec![
                cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            ],
            v12,
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ),
        (
            vec![
                cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            ],
            v12,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
    ] {
        let got = negotiated(offer, version).await;
        assert_eq!(got, want.suite());
    }
    // What the gateway's config offers: each suite an AEAD (GCM or
    // ChaCha20-Poly1305) with ECDHE (TLS 1.2) or TLS 1.3.
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(&gw.cert.cert_path)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&gw.cert.key_path).unwrap();
    let config = edgegate::tls::server_config_from(certs, key).unwrap();
    assert!(!config.ignore_client_order);
    let suites = &config.crypto_provider().cipher_suites;
    assert!(!suites.is_empty());
    for suite in suites {
        let name = format!("{:?}", suite.suite());
        assert!(
            name.starts_with("TLS13_") || name.starts_with("TLS_ECDHE_"),
            "{name}"
        );
        assert!(
            name.contains("GCM") || name.contains("CHACHA20_POLY1305"),
            "{name}"
        );
    }
}

#[tokio::test]
async fn tls_1_2_offer_of_only_weak_cipher_suites_is_refused_with_a_handshake_failure_alert() {
    let service = EventService::start().await;
    let gw = gateway(&service).await;
    let weak = [
        (
            "RC4, 3DES, NULL, export",
            vec![0x0005, 0x0004, 0x000a, 0x0002, 0x003b, 0x0003],
        ),
        (
            "static RSA (no forward secrecy)",
            vec![0x002f, 0x0035, 0x003c, 0x009c, 0x009d],
        ),
        (
            "ECDHE with CBC (not AEAD)",
            vec![0xc013, 0xc014, 0xc027, 0xc009, 0xc023],
        ),
    ];
    for (what, suites) in &weak {
        let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
        tcp.write_all(&crafted_client_hello([3, 3], suites))
            .await
            .unwrap();
        let (reply, _) = read_until_closed(&mut tcp, WAIT).await;
        assert_eq!(
            alert_description(&reply),
            Some(TLS_ALERT_HANDSHAKE_FAILURE),
            "{what}: {reply:02x?}"
        );
    }
    // The same hello with an AEAD ECDHE suite gets a ServerHello.
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(&crafted_client_hello([3, 3], &[0xc02b, 0xc02f]))
        .await
        .unwrap();
    let mut first = [0u8; 6];
    tcp.read_exact(&mut first).await.unwrap();
    assert_eq!(
        (first[0], first[5]),
        (0x16, 0x02),
        "handshake record with a ServerHello"
    );
    drop(tcp);
    settle(&gw, WAIT).await;
    assert_eq!(failures(&gw, "tls"), weak.len() as f64 + 1.0);
}

// ---------------------------------------------------------------------------
// HTTP upgrade
// ---------------------------------------------------------------------------

#[tokio::test]
async fn endless_request_headers_are_cut_off_after_64_kib() {
    let service = EventService::start().await;
    let gw = gateway(&service).await;
    let s = raw_tls(&gw).await;
    let (mut rd, mut wr) = tokio::io::split(s);
    // Headers without end, up to 1 MiB, while the answer is read: the gateway
    // answers 431 after 64 KiB and, lingering, discards the rest unread.
    let writer = tokio::spawn(async move {
        wr.write_all(b"GET /echo HTTP/1.1\r\nHost: localhost\r\n")
            .await
            .unwrap();
        let line = format!("X-Filler: {}\r\n", "a".repeat(1000));
        let mut written = 0usize;
        while written <= 1 << 20 {
            match tokio::time::timeout(Duration::from_secs(2), wr.write_all(line.as_bytes())).await
            {
                Ok(Ok(())) => written += line.len(),
                _ => break,
            }
        }
        written
    });
    assert_eq!(read_http_status(&mut rd).await, Some(431));
    let (_, _) = read_until_closed(&mut rd, WAIT).await;
    let written = writer.await.unwrap();
    settle(&gw, WAIT).await;
    println!("header bytes written while the gateway refused and lingered: {written}");
    assert_eq!(failures(&gw, "upgrade"), 1.0);
}

#[tokio::test]
async fn request_headers_dripped_byte_by_byte_end_at_the_upgrade_timeout() {
    let service = EventService::start().await;
    let gw = gateway(&service).await;
    let mut s = raw_tls(&gw).await;
    let start = Instant::now();
    let req = upgrade_request("GET", "/echo", "");
    for b in req.as_bytes() {
        if s.write_all(&[*b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if gw.gateway().shared().admission.connections() == 0 {
            break;
        }
    }
    let (_, _) = read_until_closed(&mut s, WAIT).await;
    let held = start.elapsed();
    assert!(held < Duration::from_secs(4), "held for {held:?}");
    settle(&gw, WAIT).await;
    assert_eq!(failures(&gw, "upgrade"), 1.0);
}

#[tokio::test]
async fn malformed_upgrade_requests_are_refused_counted_and_never_reach_the_service() {
    let mut service = EventService::start().await;
    let gw = gateway(&service).await;
    let many_headers: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    // Each gets the answer a web server would give, never a bare reset.
    let cases: Vec<(&str, String, u16)> = vec![
        ("wrong method", upgrade_request("POST", "/echo", ""), 405),
        (
            "HTTP/1.0",
            upgrade_request("GET", "/echo", "").replacen("HTTP/1.1", "HTTP/1.0", 1),
            400,
        ),
        (
            "no Upgrade header",
            upgrade_request("GET", "/echo", "").replace("Upgrade: websocket\r\n", ""),
            426,
        ),
        (
            "no Connection: Upgrade",
            upgrade_request("GET", "/echo", "").replace("Connection: Upgrade\r\n", ""),
            400,
        ),
        (
            "no Sec-WebSocket-Key",
            upgrade_request("GET", "/echo", "")
                .replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
            400,
        ),
        (
            "Sec-WebSocket-Version 8",
            upgrade_request("GET", "/echo", "").replace("Version: 13", "Version: 8"),
            426,
        ),
        ("not HTTP", "\x00\x01\x02 garbage\r\n\r\n".to_string(), 400),
        (
            "200 headers",
            upgrade_request("GET", "/echo", &many_headers),
            431,
        ),
        ("unknown route", upgrade_request("GET", "/admin", ""), 404),
        (
            "a browser's plain GET /",
            "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_string(),
            404,
        ),
        (
            "a plain GET on a route",
            "GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n".to_string(),
            426,
        ),
    ];
    let mut outcomes = Vec::new();
    for (what, req, want) in &cases {
        let mut s = raw_tls(&gw).await;
        s.write_all(req.as_bytes()).await.unwrap();
        let (status, headers) = read_http_head(&mut s).await.expect("an answer");
        let (rest, _) = read_until_closed(&mut s, WAIT).await;
        assert_eq!(status, *want, "{what}");
        assert!(!rest.is_empty(), "{what}: a short body says why");
        let has = |line: &str| headers.iter().any(|h| h == line);
        assert!(has("connection: close"), "{what}: {headers:?}");
        if status == 426 {
            assert!(has("upgrade: websocket"), "{what}: {headers:?}");
            assert!(has("sec-websocket-version: 13"), "{what}: {headers:?}");
        }
        if status == 405 {
            assert!(has("allow: get"), "{what}: {headers:?}");
        }
        outcomes.push(format!("{what}: HTTP {want}"));
    }
    println!("{}", outcomes.join("\n"));
    settle(&gw, WAIT).await;
    assert_eq!(failures(&gw, "upgrade"), cases.len() as f64);
    let events = drain_events(&mut service).await;
    assert!(
        !events.iter().any(|e| matches!(e, Event::Open { .. })),
        "{events:?}"
    );
}

#[tokio::test]
async fn frames_sent_in_the_same_write_as_the_upgrade_request_are_not_lost() {
    let mut service = EventService::start().await;
    let gw = gateway(&service).await;
    let mut s = raw_tls(&gw).await;
    // The request head and a ping in one write: the gateway reads past the
    // head, and what it read past is the first frame.
    let mut bytes = upgrade_request("GET", "/echo", "").into_bytes();
    bytes.extend(client_frame(OP_PING, b"pipelined"));
    s.write_all(&bytes).await.unwrap();
    assert_eq!(read_http_status(&mut s).await, Some(101));
    // The pong (opcode 0xA, payload echoed) is the first server frame.
    let mut head = [0u8; 2];
    tokio::time::timeout(WAIT, s.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(head, [0x8a, 9], "a pong of 9 bytes");
    let mut payload = [0u8; 9];
    s.read_exact(&mut payload).await.unwrap();
    assert_eq!(&payload, b"pipelined");
    let events = drain_events(&mut service).await;
    assert!(
        events.iter().any(|e| matches!(e, Event::Open { .. })),
        "{events:?}"
    );
}

// ---------------------------------------------------------------------------
// WebSocket frames
// ---------------------------------------------------------------------------

#[tokio::test]
async fn broken_websocket_frames_are_closed_with_the_right_code_and_nothing_is_forwarded() {
    let mut service = EventService::start().await;
    let gw = gateway(&service).await; // max_message_bytes = 1024
    let k = Some([1, 2, 3, 4]);
    let too_long_fragments = {
        let mut v = ws_frame(false, 0, OP_TEXT, k, &[b'a'; 512]);
        for _ in 0..4 {
            v.extend(ws_frame(false, 0, OP_CONT, k, &[b'a'; 512]));
        }
        v
    };
    let huge_length_header = {
        // A binary frame claiming 2^62 bytes: header only.
        let mut v = vec![0x82, 0x80 | 127];
        v.extend_from_slice(&(1u64 << 62).to_be_bytes());
        v.extend_from_slice(&[1, 2, 3, 4]);
        v
    };
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "unmasked text frame",
            ws_frame(true, 0, OP_TEXT, None, b"hi"),
            1002,
        ),
        (
            "RSV1 set without an extension",
            ws_frame(true, 4, OP_TEXT, k, b"hi"),
            1002,
        ),
        ("RSV3 set", ws_frame(true, 1, OP_BINARY, k, b"hi"), 1002),
        (
            "reserved data opcode 0x3",
            ws_frame(true, 0, 0x3, k, b"hi"),
            1002,
        ),
        (
            "reserved control opcode 0xB",
            ws_frame(true, 0, 0xB, k, b""),
            1002,
        ),
        (
            "continuation without a start",
            ws_frame(true, 0, OP_CONT, k, b"hi"),
            1002,
        ),
        (
            "invalid UTF-8 in text",
            ws_frame(true, 0, OP_TEXT, k, &[0x68, 0xc3, 0x28]),
            1007,
        ),
        (
            "invalid UTF-8 split over fragments",
            {
                let mut v = ws_frame(false, 0, OP_TEXT, k, &[0x68, 0xe2]);
                v.extend(ws_frame(true, 0, OP_CONT, k, &[0x28, 0xa1]));
                v
            },
            1007,
        ),
        (
            "ping of 126 bytes",
            ws_frame(true, 0, OP_PING, k, &[0; 126]),
            1002,
        ),
        (
            "fragmented ping",
            ws_frame(false, 0, OP_PING, k, b"p"),
            1002,
        ),
        (
            "new text inside a fragmented message",
            {
                let mut v = ws_frame(false, 0, OP_TEXT, k, b"a");
                v.extend(ws_frame(true, 0, OP_TEXT, k, b"b"));
                v
            },
            1002,
        ),
        ("fragments past max_message_bytes", too_long_fragments, 1009),
        (
            "single frame past max_message_bytes",
            ws_frame(true, 0, OP_BINARY, k, &[0; 2048]),
            1009,
        ),
        ("length field of 2^62", huge_length_header, 1009),
        (
            "close with a 1-byte body",
            ws_frame(true, 0, OP_CLOSE, k, &[3]),
            1002,
        ),
        (
            "close with reserved code 1005",
            ws_frame(true, 0, OP_CLOSE, k, &1005u16.to_be_bytes()),
            1002,
        ),
        (
            "close with invalid UTF-8 reason",
            ws_frame(true, 0, OP_CLOSE, k, &[0x03, 0xe8, 0xff]),
            1007,
        ),
    ];
    let mut outcomes = Vec::new();
    for (what, bytes, want) in &cases {
        let mut s = raw_websocket(&gw).await;
        s.write_all(bytes).await.unwrap();
        s.flush().await.unwrap();
        let (end, _) = read_end(&mut s, WAIT).await;
        outcomes.push(format!("{what}: {end:?}"));
        assert_eq!(end, End::Close(*want), "{what}");
    }
    println!("{}", outcomes.join("\n"));
    settle(&gw, WAIT).await;
    let events = drain_events(&mut service).await;
    let opens = events
        .iter()
        .filter(|e| matches!(e, Event::Open { .. }))
        .count();
    let closes = events
        .iter()
        .filter(|e| matches!(e, Event::Close { .. }))
        .count();
    assert_eq!(
        (opens, closes, messages(&events)),
        (cases.len(), cases.len(), 0),
        "{events:?}"
    );
    // tungstenite answers a close with a reserved code itself (1002) and hands
    // the gateway a close: the service hears `ClientClose{1002}` and the
    // reason label is `client`; every other case is the gateway's decision.
    // Our codec (`ws_codec = "edgegate"`) refuses that close as the protocol
    // error it is.
    let edgegate_codec =
        std::env::var(edgegate_tests::fixture::WS_CODEC_ENV).is_ok_and(|codec| codec == "edgegate");
    let client_closes = if edgegate_codec { 0.0 } else { 1.0 };
    let too_big = cases.iter().filter(|c| c.2 == 1009).count() as f64;
    assert_eq!(closed(&gw, "message_too_big"), too_big);
    assert_eq!(closed(&gw, "client"), client_closes);
    assert_eq!(
        closed(&gw, "protocol_error"),
        cases.len() as f64 - too_big - client_closes
    );
    assert_eq!(gw.metric("edgegate_client_messages_in_total", ""), 0.0);
}

#[tokio::test]
async fn ping_flood_from_a_client_that_never_reads_is_closed_with_1008_and_forwards_nothing() {
    let mut service = EventService::start().await;
    let gw = gateway(&service).await;
    let mut s = raw_websocket(&gw).await;
    let ping = client_frame(OP_PING, &[0x55; 125]);
    let batch = ping.repeat(256);
    // 10,240 pings (1.3 MB) written without reading a single pong. The
    // gateway closes the flooder past its budget and, lingering, reads and
    // discards the rest, so every write completes.
    let mut sent = 0;
    while sent < 10_240 {
        match tokio::time::timeout(Duration::from_secs(2), s.write_all(&batch)).await {
            Ok(Ok(())) => sent += 256,
            _ => break,
        }
    }
    // The gateway still serves others.
    let mut other = gw.connect("/echo").await;
    use futures_util::SinkExt;
    other
        .send(tokio_tungstenite::tungstenite::Message::text("ok"))
        .await
        .unwrap();
    let (end, pongs) = read_end(&mut s, WAIT).await;
    println!("ping flood: {sent} pings written, {pongs} pongs received, ended with {end:?}");
    assert!(matches!(end, End::Close(1008)), "{end:?}");
    assert!(
        pongs <= usize::from(edgegate::client::CONTROL_FRAME_BUDGET),
        "{pongs} pongs: the budget was not applied"
    );
    assert_eq!(closed(&gw, "control_flood"), 1.0);
    drop(other);
    settle(&gw, WAIT).await;
    let events = drain_events(&mut service).await;
    // Only the other client's message reached the service.
    assert_eq!(messages(&events), 1, "{events:?}");
}

/// A text message is checked for UTF-8 as its fragments arrive: the first
/// fragment that cannot be UTF-8 gets 1007 at once, without waiting for a
/// rest of the message that may never come (tungstenite decodes each
/// fragment as it lands; this pins it).
#[tokio::test]
async fn invalid_utf8_in_the_first_fragment_of_a_text_message_is_refused_at_once() {
    let mut service = EventService::start().await;
    let gw = gateway(&service).await;
    let mut s = raw_websocket(&gw).await;
    // 0xff is never UTF-8; FIN is not set and nothing follows.
    let first = ws_frame(false, 0, OP_TEXT, Some([1, 2, 3, 4]), b"ok \xff then more");
    s.write_all(&first).await.unwrap();
    let (end, _) = read_end(&mut s, WAIT).await;
    assert!(matches!(end, End::Close(1007)), "{end:?}");
    assert_eq!(closed(&gw, "protocol_error"), 1.0);
    settle(&gw, WAIT).await;
    assert_eq!(messages(&drain_events(&mut service).await), 0);
}

/// A listener with `ws_codec = "edgegate"` runs our codec, which refuses a
/// frame length not in its shortest form (tungstenite takes it): the switch
/// reaches the client, and a well-formed message on the same listener still
/// goes through to the service.
#[tokio::test]
async fn the_edgegate_codec_refuses_a_length_not_in_its_shortest_form() {
    let mut service = EventService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .links(1)
        .limit("max_message_bytes", 1024)
        .listener_key("ws_codec", "\"edgegate\"")
        .start()
        .await;
    let mut s = raw_websocket(&gw).await;
    s.write_all(&client_frame(OP_TEXT, b"fine")).await.unwrap();
    // "hi" with its length in the 16-bit form.
    let mut long_form = vec![0x81, 0x80 | 126, 0, 2, 1, 2, 3, 4];
    long_form.extend([b'h' ^ 1, b'i' ^ 2]);
    s.write_all(&long_form).await.unwrap();
    let (end, _) = read_end(&mut s, WAIT).await;
    assert!(matches!(end, End::Close(1002)), "{end:?}");
    assert_eq!(closed(&gw, "protocol_error"), 1.0);
    settle(&gw, WAIT).await;
    assert_eq!(messages(&drain_events(&mut service).await), 1);
}

/// A client that pings often but within the budget is never closed by it:
/// one ping per 25 ms (~40 per 1 s heartbeat interval, budget 64) for 3 s.
#[tokio::test]
async fn a_client_pinging_often_but_within_the_budget_stays_connected() {
    let service = EventService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .links(1)
        .heartbeat("ping_interval_secs", 1)
        .heartbeat("ping_timeout_secs", 3)
        .start()
        .await;
    let mut ws = gw.connect("/echo").await;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    for i in 0..120u32 {
        ws.send(Message::Ping(i.to_be_bytes().to_vec().into()))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(25)).await;
        // Read the pongs as they come, as a real client does.
        while let Ok(Some(msg)) = tokio::time::timeout(Duration::ZERO, ws.next()).await {
            assert!(!matches!(msg, Ok(Message::Close(_))), "closed: {msg:?}");
        }
    }
    assert_eq!(closed(&gw, "control_flood"), 0.0);
    assert_eq!(gw.metric("edgegate_clients", ""), 1.0);
}

// ---------------------------------------------------------------------------
// Framed protocol attacker
// ---------------------------------------------------------------------------

#[tokio::test]
async fn framed_attacker_frames_are_refused_from_the_header_and_nothing_is_forwarded() {
    use edgegate_tests::framed::{FramedTestClient, WELCOME};
    let mut service = EventService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .framed()
        .links(1)
        .limit("max_message_bytes", 1024)
        .limit("upgrade_timeout_secs", 1)
        .start()
        .await;
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("length 0xFFFFFFFF", vec![0xff, 0xff, 0xff, 0xff], 1009),
        ("length 0", vec![0, 0, 0, 0], 1002),
        ("unknown type", vec![0, 0, 0, 1, 0x7f], 1002),
        ("second Hello", vec![0, 0, 0, 5, 0x01, 0, 0, 0, 0], 1002),
        (
            "text with invalid UTF-8",
            vec![0, 0, 0, 3, 0x03, 0xc3, 0x28],
            1007,
        ),
        (
            "ping of 126 bytes",
            [&[0u8, 0, 0, 127, 0x05][..], &[0u8; 126]].concat(),
            1002,
        ),
        ("close with a 1-byte body", vec![0, 0, 0, 2, 0x07, 3], 1002),
    ];
    for (what, bytes, want) in &cases {
        let mut c = FramedTestClient::connect(gw.addr, &gw.cert, "/echo", "")
            .await
            .unwrap();
        assert_eq!(c.recv(WAIT).await.unwrap().kind, WELCOME);
        c.send_raw(bytes).await.unwrap();
        let f = c.recv_data(WAIT).await;
        assert_eq!(f.and_then(|f| f.close_code()), Some(*want), "{what}");
    }
    // Before the Hello: a huge length is refused too (1002, "expected hello").
    let mut tls = {
        let tcp = TcpStream::connect(gw.addr).await.unwrap();
        gw.cert
            .connector_alpn(&[b"edgegate/1"])
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap()
    };
    tls.write_all(&[0x7f, 0xff, 0xff, 0xff, 0x01])
        .await
        .unwrap();
    let (reply, _) = read_until_closed(&mut tls, WAIT).await;
    assert_eq!(
        &reply[4..7],
        &[0x07, 0x03, 0xea],
        "close 1002 before the hello: {reply:02x?}"
    );
    settle(&gw, WAIT).await;
    let events = drain_events(&mut service).await;
    assert_eq!(messages(&events), 0, "{events:?}");
    assert_eq!(failures(&gw, "upgrade"), 1.0);
}

// ---------------------------------------------------------------------------
// Auth
// ---------------------------------------------------------------------------

/// CPU time (user + system) of this process's threads whose name starts with `prefix`.
fn threads_cpu(prefix: &str) -> Duration {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.trim_end().starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the ")" of the command: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 12 {
            total += f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
        }
    }
    Duration::from_secs_f64(total as f64 / ticks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_tokens_costs_no_service_traffic_and_is_counted() {
    const BAD: usize = 1000;
    let mut service = EventService::start().await;
    let secret = b"an-hs256-secret-of-32-bytes-or-more!";
    let key_dir = edgegate_tests::temp_dir("hostile-jwt");
    let key_path = key_dir.join("jwt.key");
    std::fs::write(&key_path, secret).unwrap();
    // The gateway runs on its own runtime, so its CPU time is its threads'.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("gw-under-test")
        .enable_all()
        .build()
        .unwrap();
    let builder = GatewayBuilder::new(service.addr)
        .links(1)
        .auth("mode", "\"jwt\"")
        .auth("jwt_algorithm", "\"HS256\"")
        .auth("jwt_key_path", format!("\"{}\"", key_path.display()))
        .auth("jwt_audience", "\"edgegate\"");
    let gw = rt.spawn(builder.start()).await.unwrap();
    service
        .wait_for(WAIT, |e| matches!(e, Event::LinkUp { .. }))
        .await;
    let frames_out = gw.metric("edgegate_link_frames_out_total", "");

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": "mallory", "aud": "edgegate", "exp": now + 600}),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-secret-not-the-secret-not"),
    )
    .unwrap();
    // alg "none": header {"alg":"none","typ":"JWT"}, no signature.
    let alg_none = format!(
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
        base64_url(
            &serde_json::to_vec(
                &serde_json::json!({"sub": "mallory", "aud": "edgegate", "exp": now + 600})
            )
            .unwrap()
        )
    );
    let tokens = [
        forged,
        alg_none,
        "garbage".to_string(),
        "a.b.c".to_string(),
        "x".repeat(4000),
    ];

    let cpu_before = threads_cpu("gw-under-test");
    let wall = Instant::now();
    let addr = gw.addr;
    let cert = gw.cert.clone();
    let mut tasks = Vec::new();
    for worker in 0..16 {
        let tokens = tokens.clone();
        let cert = cert.clone();
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in (worker..BAD).step_by(16) {
                let path = format!("/echo?access_token={}", tokens[i % tokens.len()]);
                let err = edgegate_tests::ws_connect(addr, &cert, &path, &[])
                    .await
                    .expect_err("refused");
                statuses.push(refused_status(&err));
            }
            statuses
        }));
    }
    for t in tasks {
        for s in t.await.unwrap() {
            assert_eq!(s, Some(401));
        }
    }
    let elapsed = wall.elapsed();
    assert!(eventually(WAIT, || gw.gateway().shared().admission.connections() == 0).await);
    let cpu = threads_cpu("gw-under-test") - cpu_before;
    println!(
        "{BAD} bad tokens in {elapsed:?} ({:.0}/s): gateway CPU {cpu:?}, {:.0} µs per rejected token (TLS handshake + HTTP + JWT check)",
        BAD as f64 / elapsed.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / BAD as f64
    );
    assert_eq!(failures(&gw, "auth"), BAD as f64);
    let events = drain_events(&mut service).await;
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::Open { .. } | Event::Message { .. })),
        "{events:?}"
    );
    // Only link pings/pongs went out, no client frame.
    let extra = gw.metric("edgegate_link_frames_out_total", "") - frames_out;
    assert!(
        extra < 20.0,
        "{extra} frames went to the service during the flood"
    );
    drop(gw);
    rt.shutdown_background();
    let _ = std::fs::remove_dir_all(&key_dir);
}

fn base64_url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A TCP connection to the gateway from `source` (any 127.0.0.0/8 address).
/// It sends nothing, so it holds a slot for the whole handshake timeout.
async fn tcp_from(gw: &TestGateway, source: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    socket.connect(gw.addr).await.unwrap()
}

/// Waits until the gateway holds `n` connections and `refused_metric` reads `refused`.
async fn wait_counts(gw: &TestGateway, n: usize, refused_metric: &str, refused: f64) {
    let counted = || {
        gw.gateway().shared().admission.connections() == n
            && gw.metric(refused_metric, "") == refused
    };
    if eventually(Duration::from_secs(5), counted).await {
        return;
    }
    panic!(
        "gateway holds {} connections and {refused_metric} is {}, expected {n} and {refused}",
        gw.gateway().shared().admission.connections(),
        gw.metric(refused_metric, "")
    );
}

/// One address holds its `max_clients_per_address` and no more; a client
/// from another address still gets in.
#[tokio::test]
async fn one_address_cannot_take_every_client_slot() {
    let service = EventService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .links(1)
        .limit("max_clients", 40)
        .limit("max_clients_per_address", 10)
        .limit("handshake_timeout_secs", 60)
        .start()
        .await;
    let mut held = Vec::new();
    for _ in 0..60 {
        held.push(tcp_from(&gw, "127.0.0.2").await);
    }
    wait_counts(&gw, 10, "edgegate_clients_refused_per_address_total", 50.0).await;
    assert_eq!(gw.metric("edgegate_clients_refused_total", ""), 0.0);
    let mut victim = tcp_from(&gw, "127.0.0.3").await;
    let mut b = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_millis(300), victim.read(&mut b))
        .await
        .is_ok();
    assert!(!closed, "another address is locked out");
    wait_counts(&gw, 11, "edgegate_clients_refused_per_address_total", 50.0).await;
    drop(held);
    drop(victim);
    settle(&gw, WAIT).await;
}

/// With no per-address limit (the default) one address can hold every slot;
/// the refusals beyond `max_clients` are cheap (closed at accept) and counted.
#[tokio::test]
async fn without_a_per_address_limit_one_address_fills_max_clients_and_the_rest_are_refused_at_accept(
) {
    let service = EventService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .links(1)
        .limit("max_clients", 20)
        // Long enough that no held connection times out during the test.
        .limit("handshake_timeout_secs", 60)
        .start()
        .await;
    let mut held = Vec::new();
    for _ in 0..30 {
        held.push(tcp_from(&gw, "127.0.0.2").await);
    }
    wait_counts(&gw, 20, "edgegate_clients_refused_total", 10.0).await;
    // Another address is locked out while the attacker holds the slots:
    // closed at accept, before any TLS.
    let mut victim = tcp_from(&gw, "127.0.0.3").await;
    let (reply, _) = read_until_closed(&mut victim, WAIT).await;
    assert!(reply.is_empty());
    wait_counts(&gw, 20, "edgegate_clients_refused_total", 11.0).await;
    drop(held);
    settle(&gw, WAIT).await;
}

// ---------------------------------------------------------------------------
// Decoders: properties on arbitrary input (fuzzing on stable)
// ---------------------------------------------------------------------------

mod decoders {
    use bytes::{BufMut, Bytes, BytesMut};
    use edgegate::framed::{ClientCodec, Inbound, MAX_HELLO_BYTES};
    use edgegate_link::proto::{Frame, FrameCodec, Kind};
    use proptest::prelude::*;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_util::codec::{Decoder, Encoder};

    const MAX_MESSAGE: usize = 4096;
    const MAX_LINK_FRAME: usize = 64 * 1024;

    /// Bytes that look like frames often enough to get past the header: a
    /// plausible length and type followed by arbitrary bytes, or pure noise.
    fn framish() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            (
                0u32..300,
                prop_oneof![
                    Just(0x01u8),
                    Just(0x03),
                    Just(0x04),
                    Just(0x07),
                    Just(0x11),
                    Just(0x10),
                    Just(0x22),
                    any::<u8>()
                ],
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(len, t, body)| {
                    let mut v = len.to_be_bytes().to_vec();
                    v.push(t);
                    v.extend(body);
                    v
                }),
            any::<u32>().prop_map(|len| len.to_be_bytes().to_vec()),
        ]
    }

    /// Feeds `input` in `chunk`-byte pieces, decoding after each, until an
    /// error. Returns the largest buffer capacity seen.
    fn feed<D: Decoder>(codec: &mut D, input: &[u8], chunk: usize) -> usize {
        let mut buf = BytesMut::with_capacity(64);
        let mut max_cap = buf.capacity();
        for piece in input.chunks(chunk.max(1)) {
            buf.put_slice(piece);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => return max_cap.max(buf.capacity()),
                }
                max_cap = max_cap.max(buf.capacity());
            }
            max_cap = max_cap.max(buf.capacity());
        }
        let _ = codec.decode_eof(&mut buf);
        max_cap
    }

    fn frames() -> impl Strategy<Value = Frame> {
        let s = || "[a-z/é]{0,40}";
        let kind = || prop_oneof![Just(Kind::Text), Just(Kind::Binary)];
        let payload = || proptest::collection::vec(any::<u8>(), 0..200).prop_map(Bytes::from);
        prop_oneof![
            (any::<u16>(), s(), any::<u32>()).prop_map(|(version, name, max_frame_bytes)| {
                Frame::Hello {
                    version,
                    name,
                    max_frame_bytes,
                }
            }),
            any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
            any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
            (any::<u16>(), s()).prop_map(|(code, reason)| Frame::Goaway { code, reason }),
            (any::<u64>(), s(), s(), payload()).prop_map(|(client, route, remote_addr, claims)| {
                Frame::ClientOpen {
                    client,
                    route,
                    remote_addr,
                    claims,
                }
            }),
            (any::<u64>(), kind(), payload()).prop_map(|(client, kind, payload)| {
                Frame::ClientMessage {
                    client,
                    kind,
                    payload,
                }
            }),
            (any::<u64>(), any::<u16>(), s()).prop_map(|(client, code, reason)| {
                Frame::ClientClose {
                    client,
                    code,
                    reason,
                }
            }),
            (any::<u64>(), s()).prop_map(|(client, topic)| Frame::Subscribe { client, topic }),
            (any::<u64>(), s()).prop_map(|(client, topic)| Frame::Unsubscribe { client, topic }),
            (s(), kind(), payload()).prop_map(|(topic, kind, payload)| Frame::Publish {
                topic,
                kind,
                payload
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn framed_decoder_never_panics_and_never_buffers_past_its_limit(
            input in proptest::collection::vec(framish(), 1..8).prop_map(|v| v.concat()),
            chunk in 1usize..64,
        ) {
            let cap = feed(&mut ClientCodec::new(MAX_MESSAGE), &input, chunk);
            // One frame (limit + header) plus what one read appended, doubled by BytesMut growth.
            let bound = 2 * (MAX_MESSAGE.max(MAX_HELLO_BYTES) + 8 + 64) + input.len();
            prop_assert!(cap <= bound, "capacity {} > {}", cap, bound);
        }

        #[test]
        fn framed_length_field_alone_never_allocates_its_value(len in any::<u32>()) {
            let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
            let _ = ClientCodec::new(MAX_MESSAGE).decode(&mut buf);
            prop_assert!(buf.capacity() <= 2 * (MAX_HELLO_BYTES + 8));
        }

        #[test]
        fn framed_messages_round_trip(body in proptest::collection::vec(any::<u8>(), 0..MAX_MESSAGE), text in ".{0,200}", split in 0usize..64) {
            let mut codec = ClientCodec::new(MAX_MESSAGE);
            let mut wire = BytesMut::new();
            codec.encode(Message::binary(body.clone()), &mut wire).unwrap();
            codec.encode(Message::text(text.clone()), &mut wire).unwrap();
            let mut buf = BytesMut::new();
            let split = split.min(wire.len());
            buf.extend_from_slice(&wire[..split]);
            let mut got = Vec::new();
            while let Some(m) = codec.decode(&mut buf).unwrap() { got.push(m); }
            buf.extend_from_slice(&wire[split..]);
            while let Some(m) = codec.decode(&mut buf).unwrap() { got.push(m); }
            prop_assert_eq!(got, vec![Inbound::Message(Message::binary(body)), Inbound::Message(Message::text(text))]);
        }

        #[test]
        fn link_decoder_never_panics_and_never_buffers_past_its_limit(
            input in proptest::collection::vec(framish(), 1..8).prop_map(|v| v.concat()),
            chunk in 1usize..64,
        ) {
            let cap = feed(&mut FrameCodec::new(MAX_LINK_FRAME), &input, chunk);
            let bound = 2 * (MAX_LINK_FRAME + 8 + 64) + input.len();
            prop_assert!(cap <= bound, "capacity {} > {}", cap, bound);
        }

        #[test]
        fn link_frames_round_trip_whatever_the_split(frames in proptest::collection::vec(frames(), 1..6), chunk in 1usize..40) {
            let mut codec = FrameCodec::new(MAX_LINK_FRAME);
            let mut wire = BytesMut::new();
            for f in &frames { codec.encode(f, &mut wire).unwrap(); }
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(f) = codec.decode(&mut buf).unwrap() { got.push(f); }
            }
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn link_decoder_survives_any_single_byte_mutation(frame in frames(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut codec = FrameCodec::new(MAX_LINK_FRAME);
            let mut wire = BytesMut::new();
            codec.encode(&frame, &mut wire).unwrap();
            let i = at.index(wire.len());
            wire[i] = byte;
            // Ok (another valid frame or incomplete) or an error: never a panic.
            let _ = codec.decode(&mut wire);
            let _ = codec.decode_eof(&mut wire);
        }

        #[test]
        fn link_length_field_alone_never_allocates_its_value(len in any::<u32>()) {
            let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
            let _ = FrameCodec::new(MAX_LINK_FRAME).decode(&mut buf);
            prop_assert!(buf.capacity() <= 2 * (MAX_LINK_FRAME + 8));
        }
    }
}

// ---------------------------------------------------------------------------
// Closes the gateway starts while the client is still writing (issue 28).
// ---------------------------------------------------------------------------

/// How many times the still-writing client tries in one run.
const STILL_WRITING_TRIES: usize = 50;

/// A real third-party client (Python `websockets`) sends a 1 MiB message in
/// 100 fragments against a 64 KiB limit, 50 times in a row. The gateway
/// closes each with 1009 while the client is still writing: without a
/// lingering close the gateway dropped its socket with unread data, the
/// kernel answered with RST and the client lost the close frame (2 of 50
/// arrived on the old code). Each try must read the code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_still_writing_a_rejected_message_reads_its_close_code_every_time() {
    let python = std::process::Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tools/python-clients.sh"
        ))
        .output()
        .expect("run tests/tools/python-clients.sh");
    assert!(
        python.status.success(),
        "the Python client venv could not be made (needs PyPI): {}",
        String::from_utf8_lossy(&python.stderr)
    );
    let python = String::from_utf8(python.stdout).unwrap().trim().to_owned();

    let service = EventService::start().await;
    let gw = GatewayBuilder::new(service.addr)
        .links(1)
        .limit("max_message_bytes", 65536)
        .start()
        .await;
    let port = gw.addr.port().to_string();
    let ca = gw.cert.cert_path.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/hostile/still_writing.py"
            ))
            .args(["127.0.0.1", &port, "/echo"])
            .arg(ca)
            .arg(STILL_WRITING_TRIES.to_string())
            .output()
            .expect("run still_writing.py")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "still_writing.py failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let codes: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("try "))
        .filter_map(|l| l.split(": ").nth(1))
        .collect();
    assert_eq!(codes.len(), STILL_WRITING_TRIES, "{stdout}");
    let received = codes.iter().filter(|c| **c == "1009").count();
    assert_eq!(
        received, STILL_WRITING_TRIES,
        "the 1009 close frame arrived in {received} of {STILL_WRITING_TRIES} tries:\n{stdout}"
    );
    assert_eq!(closed(&gw, "message_too_big"), STILL_WRITING_TRIES as f64);
    settle(&gw, WAIT).await;
}
