//! A framed-protocol test client written from `docs/framed-protocol.md`
//! alone (independent of the gateway's codec, so the tests check the spec).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::TestCert;

pub const HELLO: u8 = 0x01;
pub const WELCOME: u8 = 0x02;
pub const TEXT: u8 = 0x03;
pub const BINARY: u8 = 0x04;
pub const PING: u8 = 0x05;
pub const PONG: u8 = 0x06;
pub const CLOSE: u8 = 0x07;

/// One frame: type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    pub kind: u8,
    pub body: Vec<u8>,
}

impl RawFrame {
    /// The close code of a Close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.kind == CLOSE && self.body.len() >= 2)
            .then(|| u16::from_be_bytes([self.body[0], self.body[1]]))
    }
}

pub struct FramedTestClient {
    tls: TlsStream<TcpStream>,
}

impl FramedTestClient {
    /// TLS to `addr`, then the Hello. Does not wait for Welcome.
    pub async fn connect(
        addr: std::net::SocketAddr,
        cert: &TestCert,
        route: &str,
        token: &str,
    ) -> std::io::Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        let tls = cert
            .connector_alpn(&[b"edgegate/1"])
            .connect(
                rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await?;
        let mut c = Self { tls };
        let mut body = Vec::new();
        body.extend_from_slice(&(route.len() as u16).to_be_bytes());
        body.extend_from_slice(route.as_bytes());
        body.extend_from_slice(&(token.len() as u16).to_be_bytes());
        body.extend_from_slice(token.as_bytes());
        c.send(HELLO, &body).await?;
        Ok(c)
    }

    pub async fn send(&mut self, kind: u8, body: &[u8]) -> std::io::Result<()> {
        let mut f = Vec::with_capacity(5 + body.len());
        f.extend_from_slice(&((body.len() + 1) as u32).to_be_bytes());
        f.push(kind);
        f.extend_from_slice(body);
        self.tls.write_all(&f).await?;
        self.tls.flush().await
    }

    /// Writes raw bytes (for malformed-input tests).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.tls.write_all(bytes).await?;
        self.tls.flush().await
    }

    /// The next frame, or `None` at end of stream.
    pub async fn recv(&mut self, within: Duration) -> Option<RawFrame> {
        tokio::time::timeout(within, async {
            let mut len = [0u8; 4];
            self.tls.read_exact(&mut len).await.ok()?;
            let len = u32::from_be_bytes(len) as usize;
            let mut buf = vec![0u8; len];
            self.tls.read_exact(&mut buf).await.ok()?;
            let kind = *buf.first()?;
            Some(RawFrame {
                kind,
                body: buf[1..].to_vec(),
            })
        })
        .await
        .expect("frame in time")
    }

    /// The next frame that is not a ping (pings are answered).
    pub async fn recv_data(&mut self, within: Duration) -> Option<RawFrame> {
        loop {
            let f = self.recv(within).await?;
            if f.kind == PING {
                self.send(PONG, &f.body).await.ok()?;
                continue;
            }
            return Some(f);
        }
    }
}
