//! A WebTransport client for tests (wtransport, the same crate the server uses, as a
//! client): the `switchboard.v1` protocol as lines on one bidirectional stream, and
//! datagrams.

use std::time::Duration;

use serde_json::Value;
use wtransport::{ClientConfig, Connection, Endpoint, RecvStream, SendStream};

use super::TestServer;

pub struct Wt {
    pub conn: Connection,
    pub send: SendStream,
    recv: RecvStream,
    buf: Vec<u8>,
}

/// The server's development certificate hash (`/wt/cert-hash`).
pub async fn cert_hash(s: &TestServer) -> wtransport::tls::Sha256Digest {
    let (status, v) = s.get_json("/wt/cert-hash").await;
    assert_eq!(status, 200, "{v}");
    let hex = v["hex"].as_str().unwrap();
    let bytes: Vec<u8> = (0..32).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
    wtransport::tls::Sha256Digest::new(bytes.try_into().unwrap())
}

/// A session to `https://127.0.0.1:{wt port}{path}` trusting the development
/// certificate by its hash, with `headers`: the connection (not yet a stream).
pub async fn session(s: &TestServer, path: &str, headers: &[(&str, &str)]) -> Result<Connection, String> {
    let hash = cert_hash(s).await;
    let config = ClientConfig::builder()
        .with_bind_default()
        .with_server_certificate_hashes([hash])
        .keep_alive_interval(Some(Duration::from_secs(3)))
        .build();
    let endpoint = Endpoint::client(config).map_err(|e| e.to_string())?;
    let url = format!("https://127.0.0.1:{}{path}", s.wt.expect("webtransport.listen").port());
    let mut options = wtransport::endpoint::ConnectOptions::builder(url);
    for (k, v) in headers {
        options = options.add_header(*k, *v);
    }
    let connect = endpoint.connect(options.build());
    match tokio::time::timeout(Duration::from_secs(30), connect).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("no session within 30 s".into()),
    }
}

impl Wt {
    /// A session at `/wt{query}` offering the subprotocol, and its protocol stream.
    pub async fn connect(s: &TestServer, query: &str) -> Wt {
        Wt::try_connect(s, query).await.expect("a WebTransport session")
    }

    /// The same; `Err` when the server closed the session (or refused it) first.
    pub async fn try_connect(s: &TestServer, query: &str) -> Result<Wt, String> {
        let conn = session(s, &format!("/wt{query}"), &[("wt-available-protocols", "\"switchboard.v1\"")]).await?;
        let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())?;
        Ok(Wt { conn, send, recv, buf: Vec::new() })
    }

    pub async fn send_line(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.expect("stream write");
    }

    pub async fn send(&mut self, v: Value) {
        self.try_send(v).await.expect("stream write");
    }

    /// The same; `Err` when the session is gone (the server may close it at any time,
    /// before this is written).
    pub async fn try_send(&mut self, v: Value) -> Result<(), String> {
        let mut line = v.to_string().into_bytes();
        line.push(b'\n');
        self.send.write_all(&line).await.map_err(|e| e.to_string())
    }

    /// The next line from the server; `None` once the stream ended.
    pub async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(serde_json::from_slice(&line[..i]).expect("a JSON line"));
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(Duration::from_secs(30), self.recv.read(&mut chunk)).await {
                Ok(Ok(Some(n))) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Ok(None)) | Ok(Err(_)) => return None,
                Err(_) => panic!("no line from the server within 30 s"),
            }
        }
    }

    /// The last line before the stream ends.
    pub async fn last_line(&mut self) -> Value {
        let mut last = None;
        while let Some(l) = self.next().await {
            last = Some(l);
        }
        last.expect("a line before the end")
    }

    /// Sends a command with `id` and returns its reply (pushes before it are skipped and
    /// returned in `skipped`).
    pub async fn command(&mut self, mut v: Value, id: u64, skipped: &mut Vec<Value>) -> Value {
        v["id"] = id.into();
        self.send(v).await;
        loop {
            let m = self.next().await.expect("a reply");
            if m["id"] == id {
                return m;
            }
            skipped.push(m);
        }
    }

    /// The next datagram, as JSON.
    pub async fn datagram(&self) -> Value {
        let d = tokio::time::timeout(Duration::from_secs(30), self.conn.receive_datagram())
            .await
            .expect("a datagram within 30 s")
            .expect("the session is open");
        serde_json::from_slice(&d).expect("a JSON datagram")
    }

    /// How the session ended: (application code, reason).
    pub async fn closed(&self) -> (u64, String) {
        closed(&self.conn).await
    }
}

/// How a session ended: (application code, reason).
pub async fn closed(conn: &Connection) -> (u64, String) {
    match tokio::time::timeout(Duration::from_secs(30), conn.closed()).await.expect("closed within 30 s") {
        wtransport::error::ConnectionError::ApplicationClosed(c) => {
            (c.code().into_inner(), String::from_utf8_lossy(c.reason()).into_owned())
        }
        other => panic!("closed otherwise: {other}"),
    }
}
