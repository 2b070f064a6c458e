//! The lean stream against rustls's own client (tokio-rustls), over
//! in-memory pipes whose capacity sets how the bytes arrive (one at a time,
//! or in big chunks) and over real loopback TCP.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, HandshakeKind, RootCertStore, ServerConfig, SupportedProtocolVersion};
use tokio::io::{duplex, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::LeanTlsStream;

/// Every test finishes far within this; a hang fails instead of blocking.
const BOUND: Duration = Duration::from_secs(20);

/// A server config for `localhost` and a client config that trusts it.
fn configs(versions: &[&'static SupportedProtocolVersion]) -> (Arc<ServerConfig>, ClientConfig) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let der: CertificateDer<'static> = cert.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut roots = RootCertStore::empty();
    roots.add(der).unwrap();
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    (Arc::new(server), client)
}

fn tls13() -> (Arc<ServerConfig>, ClientConfig) {
    configs(&[&rustls::version::TLS13])
}

/// Handshakes a client and a lean server over a pipe that holds at most
/// `pipe_bytes` in each direction (1: every byte is its own read).
async fn pair(
    server: Arc<ServerConfig>,
    client: ClientConfig,
    pipe_bytes: usize,
) -> (TlsStream<DuplexStream>, LeanTlsStream<DuplexStream>) {
    let (client_io, server_io) = duplex(pipe_bytes);
    let accept = tokio::spawn(LeanTlsStream::accept(server_io, server));
    let name = ServerName::try_from("localhost").unwrap();
    let client = timeout(
        BOUND,
        TlsConnector::from(Arc::new(client)).connect(name, client_io),
    )
    .await
    .unwrap()
    .unwrap();
    let server = timeout(BOUND, accept).await.unwrap().unwrap().unwrap();
    (client, server)
}

/// Reads everything until a clean end.
async fn read_to_end(stream: &mut (impl AsyncReadExt + Unpin)) -> io::Result<Vec<u8>> {
    let mut all = Vec::new();
    timeout(BOUND, stream.read_to_end(&mut all))
        .await
        .unwrap()?;
    Ok(all)
}

/// Echoes until the client's close_notify, then closes with its own.
async fn echo<IO>(mut server: LeanTlsStream<IO>) -> io::Result<LeanTlsStream<IO>>
where
    IO: tokio::io::AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = vec![0; 4096];
    loop {
        let n = server.read(&mut buf).await?;
        if n == 0 {
            server.shutdown().await?;
            return Ok(server);
        }
        server.write_all(&buf[..n]).await?;
        server.flush().await?;
    }
}

/// A message long enough to span several records, with no repeating
/// period a misordering could hide behind.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Writes `message`, closes, and returns what the echo sent back.
async fn round_trip(mut client: TlsStream<DuplexStream>, message: &[u8]) -> Vec<u8> {
    let (mut read, mut write) = tokio::io::split(&mut client);
    let (written, echoed) = tokio::join!(
        async {
            write.write_all(message).await?;
            write.shutdown().await
        },
        read_to_end(&mut read),
    );
    written.unwrap();
    echoed.unwrap()
}

#[tokio::test]
async fn echoes_over_tls13_and_tls12() {
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let (server, client) = configs(&[version]);
        let (client, server) = pair(server, client, 64 * 1024).await;
        assert_eq!(server.protocol_version(), Some(version.version));
        assert_eq!(server.alpn_protocol(), Some(&b"http/1.1"[..]));
        let server = tokio::spawn(echo(server));
        assert_eq!(round_trip(client, b"hello").await, b"hello");
        timeout(BOUND, server).await.unwrap().unwrap().unwrap();
    }
}

#[tokio::test]
async fn delivers_byte_by_byte_both_ways() {
    for (server, client) in [tls13(), configs(&[&rustls::version::TLS12])] {
        // A one-byte pipe: the handshake and every record arrive a byte at a
        // time, so each is a partial record many times over.
        let (client, server) = pair(server, client, 1).await;
        let server = tokio::spawn(echo(server));
        let message = pattern(20_000);
        assert_eq!(round_trip(client, &message).await, message);
        let server = timeout(BOUND, server).await.unwrap().unwrap().unwrap();
        assert_eq!(server.held_bytes(), 0);
    }
}

#[tokio::test]
async fn carries_large_writes_both_ways_through_a_small_pipe() {
    let (server, client) = tls13();
    // The pipe takes 1000 bytes at a time: every 16 KiB record the server
    // writes is mostly left unsent and every read ends inside a record.
    let (client, server) = pair(server, client, 1000).await;
    let server = tokio::spawn(echo(server));
    let message = pattern(3 * 1024 * 1024 + 17);
    assert!(round_trip(client, &message).await == message);
    let server = timeout(BOUND, server).await.unwrap().unwrap().unwrap();
    assert_eq!(server.held_bytes(), 0);
}

#[tokio::test]
async fn one_large_server_write_arrives_whole() {
    let (server, client) = tls13();
    let (mut client, mut server) = pair(server, client, 4096).await;
    let message = pattern(1024 * 1024);
    let sent = message.clone();
    let writer = tokio::spawn(async move {
        server.write_all(&sent).await?;
        server.shutdown().await?;
        Ok::<_, io::Error>(server)
    });
    let received = read_to_end(&mut client).await.unwrap();
    assert!(received == message, "{} bytes received", received.len());
    let server = timeout(BOUND, writer).await.unwrap().unwrap().unwrap();
    assert_eq!(server.held_bytes(), 0);
}

/// One `poll_write` takes as much plaintext as tokio-rustls does, so a
/// writer that drains its own buffer from the front after each write
/// (tungstenite) stays cheap on large messages. At 16 KiB a write (the old
/// value) an 18 MiB WebSocket message starved a service link past its ping
/// timeout (`an_example_service_with_a_larger_frame_cap_echoes_what_the_gateway_allows`).
#[tokio::test]
async fn one_write_takes_as_much_as_tokio_rustls() {
    let (server, client) = tls13();
    let (mut client, mut server) = pair(server, client, 1024 * 1024).await;
    let message = pattern(1024 * 1024);
    let took = timeout(BOUND, server.write(&message))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(took, super::WRITE_BYTES);
    assert!(took >= 64 * 1024, "one write took {took} bytes");
    server.shutdown().await.unwrap();
    let received = read_to_end(&mut client).await.unwrap();
    assert!(
        received == message[..took],
        "{} bytes received",
        received.len()
    );
}

#[tokio::test]
async fn client_close_notify_ends_reads_and_the_server_can_still_answer() {
    let (server, client) = tls13();
    let (mut client, mut server) = pair(server, client, 64 * 1024).await;
    client.write_all(b"last words").await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    timeout(BOUND, server.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"last words");
    server.write_all(b"goodbye").await.unwrap();
    server.shutdown().await.unwrap();
    // The client sees the answer and then a clean end, not UnexpectedEof.
    assert_eq!(read_to_end(&mut client).await.unwrap(), b"goodbye");
    assert_eq!(server.held_bytes(), 0);
}

#[tokio::test]
async fn server_close_notify_ends_client_reads_and_the_client_can_still_send() {
    let (server, client) = tls13();
    let (mut client, mut server) = pair(server, client, 64 * 1024).await;
    server.write_all(b"closing").await.unwrap();
    server.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut client).await.unwrap(), b"closing");
    let mut buf = [0; 16];
    let err = server.write(b"more").await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    // Half-closed: what the client still sends is read, then its close.
    client.write_all(b"late").await.unwrap();
    client.flush().await.unwrap();
    let n = timeout(BOUND, server.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"late");
    client.shutdown().await.unwrap();
    let n = timeout(BOUND, server.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn eof_without_close_notify_is_unexpected_eof() {
    let (server, client) = tls13();
    let (mut client, mut server) = pair(server, client, 64 * 1024).await;
    client.write_all(b"partial").await.unwrap();
    client.flush().await.unwrap();
    // Close the pipe under TLS: no close_notify.
    client.get_mut().0.shutdown().await.unwrap();
    let mut got = Vec::new();
    let err = timeout(BOUND, server.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    assert_eq!(got, b"partial");
}

#[tokio::test]
async fn the_client_hello_waits_unprocessed_until_the_handshake() {
    let (server, client) = tls13();
    // A one-byte pipe: the hello arrives a byte at a time.
    let (client_io, server_io) = duplex(1);
    let mut lean = LeanTlsStream::new(server_io, server).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let connect = tokio::spawn(TlsConnector::from(Arc::new(client)).connect(name, client_io));
    timeout(BOUND, lean.client_hello()).await.unwrap().unwrap();
    assert!(lean.is_handshaking());
    // Waiting again returns at once: the record is kept, not consumed.
    timeout(BOUND, lean.client_hello()).await.unwrap().unwrap();
    timeout(BOUND, lean.handshake()).await.unwrap().unwrap();
    let client = timeout(BOUND, connect).await.unwrap().unwrap().unwrap();
    let server = tokio::spawn(echo(lean));
    assert_eq!(round_trip(client, b"after hello").await, b"after hello");
    timeout(BOUND, server).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn a_plain_http_request_is_not_a_client_hello() {
    let (server, _) = tls13();
    let (mut client_io, server_io) = duplex(1024);
    let mut lean = LeanTlsStream::new(server_io, server).unwrap();
    client_io
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let err = timeout(BOUND, lean.client_hello())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
}

#[tokio::test]
async fn a_handshake_record_longer_than_tls_allows_is_refused_at_once() {
    let (server, _) = tls13();
    let (mut client_io, server_io) = duplex(1024);
    let mut lean = LeanTlsStream::new(server_io, server).unwrap();
    // A header claiming 64 KiB, and nothing after it.
    client_io
        .write_all(&[0x16, 0x03, 0x01, 0xff, 0xff])
        .await
        .unwrap();
    let err = timeout(Duration::from_secs(1), lean.client_hello())
        .await
        .expect("refused without waiting for the body")
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
}

#[tokio::test]
async fn eof_during_the_handshake_is_unexpected_eof() {
    let (server, _) = tls13();
    let (mut client_io, server_io) = duplex(1024);
    let accept = tokio::spawn(LeanTlsStream::accept(server_io, server));
    // Half a ClientHello, then the end.
    client_io
        .write_all(&[0x16, 0x03, 0x01, 0x01, 0x00, 0x01])
        .await
        .unwrap();
    client_io.shutdown().await.unwrap();
    let err = timeout(BOUND, accept).await.unwrap().unwrap().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
}

#[tokio::test]
async fn a_client_that_rejects_the_certificate_is_a_received_alert() {
    let (server, _) = tls13();
    // A client that trusts a different certificate.
    let (_, stranger) = tls13();
    let (client_io, server_io) = duplex(64 * 1024);
    let accept = tokio::spawn(LeanTlsStream::accept(server_io, server));
    let name = ServerName::try_from("localhost").unwrap();
    let refused = TlsConnector::from(Arc::new(stranger))
        .connect(name, client_io)
        .await;
    assert!(refused.is_err());
    let err = timeout(BOUND, accept).await.unwrap().unwrap().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    let inner = err.get_ref().unwrap().downcast_ref::<rustls::Error>();
    assert!(
        matches!(inner, Some(rustls::Error::AlertReceived(_))),
        "{err}"
    );
}

#[tokio::test]
async fn a_forged_record_is_refused_and_the_client_gets_an_alert() {
    let (server, client) = tls13();
    let (mut client, mut server) = pair(server, client, 64 * 1024).await;
    // An application-data record that was never encrypted by the client.
    client
        .get_mut()
        .0
        .write_all(&[0x17, 0x03, 0x03, 0x00, 0x20])
        .await
        .unwrap();
    client.get_mut().0.write_all(&[0xab; 0x20]).await.unwrap();
    let mut buf = [0; 16];
    let err = timeout(BOUND, server.read(&mut buf))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    let inner = err.get_ref().unwrap().downcast_ref::<rustls::Error>();
    assert_eq!(inner, Some(&rustls::Error::DecryptError));
    // The server answered with bad_record_mac.
    let err = timeout(BOUND, client.read(&mut buf))
        .await
        .unwrap()
        .unwrap_err();
    let inner = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    assert_eq!(
        inner,
        Some(&rustls::Error::AlertReceived(
            rustls::AlertDescription::BadRecordMac
        )),
        "{err}"
    );
}

#[tokio::test]
async fn key_updates_from_the_client_are_followed() {
    let (server, client) = tls13();
    let (mut client, server) = pair(server, client, 64 * 1024).await;
    let server = tokio::spawn(echo(server));
    let mut buf = [0; 64];
    for round in 0..5u8 {
        // Ask for new keys both ways, then talk under them.
        client.get_mut().1.refresh_traffic_keys().unwrap();
        let message = [round; 40];
        client.write_all(&message).await.unwrap();
        client.flush().await.unwrap();
        timeout(BOUND, client.read_exact(&mut buf[..40]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(buf[..40], message);
    }
    client.shutdown().await.unwrap();
    assert!(read_to_end(&mut client).await.unwrap().is_empty());
    timeout(BOUND, server).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn a_second_connection_resumes_the_session() {
    let (server, client) = tls13();
    let client = Arc::new(client);
    for expected in [HandshakeKind::Full, HandshakeKind::Resumed] {
        let (client_io, server_io) = duplex(64 * 1024);
        let accept = tokio::spawn(LeanTlsStream::accept(server_io, server.clone()));
        let name = ServerName::try_from("localhost").unwrap();
        let mut client = TlsConnector::from(client.clone())
            .connect(name, client_io)
            .await
            .unwrap();
        let server = timeout(BOUND, accept).await.unwrap().unwrap().unwrap();
        assert_eq!(client.get_ref().1.handshake_kind(), Some(expected));
        let server = tokio::spawn(echo(server));
        // The echo also carries the tickets the server sent to the client.
        client.write_all(b"ping").await.unwrap();
        client.shutdown().await.unwrap();
        assert_eq!(read_to_end(&mut client).await.unwrap(), b"ping");
        timeout(BOUND, server).await.unwrap().unwrap().unwrap();
    }
}

#[tokio::test]
async fn works_over_loopback_tcp_and_holds_nothing_when_idle() {
    let (server, client) = tls13();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connector = TlsConnector::from(Arc::new(client));
    let clients = (0..20).map(|_| {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            let name = ServerName::try_from("localhost").unwrap();
            connector.connect(name, tcp).await
        }
    });
    let accepts = async {
        let mut servers = Vec::new();
        for _ in 0..20 {
            let (tcp, _) = listener.accept().await?;
            servers.push(tokio::spawn(LeanTlsStream::accept(tcp, server.clone())));
        }
        Ok::<_, io::Error>(servers)
    };
    let (clients, servers) = tokio::join!(futures_util::future::join_all(clients), accepts);
    let mut clients: Vec<_> = clients.into_iter().map(Result::unwrap).collect();
    let mut servers_done = Vec::new();
    for s in servers.unwrap() {
        servers_done.push(timeout(BOUND, s).await.unwrap().unwrap().unwrap());
    }
    let message = pattern(100_000);
    for (client, server) in clients.iter_mut().zip(servers_done.iter_mut()) {
        client.write_all(&message).await.unwrap();
        client.flush().await.unwrap();
        let mut got = vec![0; message.len()];
        timeout(BOUND, server.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert!(got == message);
        server.write_all(&message).await.unwrap();
        server.flush().await.unwrap();
        timeout(BOUND, client.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert!(got == message);
    }
    // Everything has been read and written: no client holds a buffer.
    for server in &servers_done {
        assert_eq!(server.held_bytes(), 0, "{server:?}");
    }
}

/// The stream's own size: rustls's connection state plus our bookkeeping.
/// Measured 1,224 bytes (rustls 0.23.46, x86_64); a budget with room for
/// rustls patch releases, so growth is a decision, not an accident.
const STREAM_BUDGET: usize = 1_280;

#[test]
fn the_stream_stays_within_its_size_budget() {
    let size = std::mem::size_of::<LeanTlsStream<TcpStream>>();
    assert!(
        size <= STREAM_BUDGET,
        "LeanTlsStream<TcpStream> is {size} bytes"
    );
}
