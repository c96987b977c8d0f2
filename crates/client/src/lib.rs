//! Rust client for Switchboard.
//!
//! [`Client`] is what applications want: reconnects with full-jitter backoff, resume
//! from positions, exactly-once delivery to the application, heartbeat watchdog (same
//! semantics as the JavaScript client). [`Connection`] speaks the `switchboard.v1`
//! command protocol over one connection, no retries — what tests want. Both run on
//! [`socket::WebSocket`]: tokio-tungstenite with rustls, `ws://` and `wss://`, the
//! platform's roots and a CA of your own ([`ConnectOptions::ca_pem`]).
//!
//! [`ws::WsStream`] is a separate raw RFC 6455 client over plain TCP that exposes frames
//! (malformed ones included): the server's conformance and bad-input tests use it.

pub mod client;
pub mod socket;
pub mod ws;

use std::time::Duration;

use serde_json::{json, Value};

pub use client::{backoff_delay, Client, ClientOptions, ConnState, Event, Subscription};
pub use socket::WebSocket;
pub use ws::{ConnectOptions, Message, WsError, WsStream};

/// A `switchboard.v1` session over one WebSocket.
pub struct Connection {
    pub ws: WebSocket,
    next_id: u64,
    /// Pushes (publications, resets, …) that arrived while waiting for a reply.
    pending: std::collections::VecDeque<Value>,
}

/// A reply error from the server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ServerError {
    pub code: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Ws(#[from] WsError),
    #[error("server error {0}")]
    Server(#[from] ServerError),
    #[error("connection closed ({0:?})")]
    Closed(Option<u16>),
    #[error("protocol: {0}")]
    Protocol(String),
}

impl Connection {
    /// Connects to `url` (`ws://host:port/ws[?channel=…]`, or `wss://…`).
    pub async fn connect(url: &str) -> Result<Connection, ClientError> {
        Self::connect_with(url, ConnectOptions::default()).await
    }

    pub async fn connect_with(url: &str, opts: ConnectOptions) -> Result<Connection, ClientError> {
        let ws = WebSocket::connect(url, &opts).await?;
        Ok(Connection { ws, next_id: 1, pending: Default::default() })
    }

    /// Sends a command (adding its `id`) and waits for the reply; pushes received
    /// meanwhile are kept for [`Self::next_push`].
    pub async fn call(&mut self, mut cmd: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        cmd["id"] = json!(id);
        self.ws.send_text(&cmd.to_string()).await?;
        loop {
            let v = self.next_json().await?;
            if v.get("id").and_then(Value::as_u64) == Some(id) {
                if let Some(ok) = v.get("ok") {
                    return Ok(ok.clone());
                }
                let e = &v["error"];
                return Err(ServerError {
                    code: e["code"].as_str().unwrap_or("").into(),
                    message: e["message"].as_str().unwrap_or("").into(),
                }
                .into());
            }
            self.pending.push_back(v);
        }
    }

    pub async fn subscribe(&mut self, channel: &str, since: Option<&str>) -> Result<Value, ClientError> {
        let mut cmd = json!({"cmd": "subscribe", "channel": channel});
        if let Some(s) = since {
            cmd["since"] = json!(s);
        }
        self.call(cmd).await
    }

    pub async fn publish(&mut self, channel: &str, data: Value) -> Result<Value, ClientError> {
        self.call(json!({"cmd": "publish", "channel": channel, "data": data})).await
    }

    /// The next push (a message without `id`).
    pub async fn next_push(&mut self) -> Result<Value, ClientError> {
        if let Some(v) = self.pending.pop_front() {
            return Ok(v);
        }
        self.next_json().await
    }

    /// The next publication (`{"pub":…}`'s inner object), skipping other pushes.
    pub async fn next_pub(&mut self) -> Result<Value, ClientError> {
        loop {
            let v = self.next_push().await?;
            if let Some(p) = v.get("pub") {
                return Ok(p.clone());
            }
        }
    }

    /// Like [`Self::next_pub`] with a deadline.
    pub async fn next_pub_within(&mut self, d: Duration) -> Result<Option<Value>, ClientError> {
        match tokio::time::timeout(d, self.next_pub()).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    async fn next_json(&mut self) -> Result<Value, ClientError> {
        loop {
            match self.ws.recv().await? {
                Message::Text(t) => {
                    return serde_json::from_str(&t)
                        .map_err(|e| ClientError::Protocol(format!("bad JSON from server: {e}")))
                }
                Message::Ping(_) | Message::Pong(_) => {}
                Message::Binary(_) => return Err(ClientError::Protocol("binary frame from server".into())),
                Message::Close(code, _) => return Err(ClientError::Closed(code)),
            }
        }
    }
}
