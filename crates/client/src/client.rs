//! [`Client`]: a resilient `switchboard.v1` client — the same semantics as the
//! JavaScript client. It keeps one WebSocket up (rotating over the given node URLs),
//! reconnects with full-jitter backoff, resubscribes every subscription from its last
//! position, drops anything it already delivered, surfaces resets, and treats a silent
//! connection as dead (heartbeat watchdog).
//!
//! ```no_run
//! # async fn demo() -> Result<(), switchboard_client::ClientError> {
//! use switchboard_client::{Client, ClientOptions, Event};
//! let client = Client::start(ClientOptions::new(["ws://127.0.0.1:8000/ws"]));
//! let mut sub = client.subscribe("news:1", None);
//! client.publish("news:1", serde_json::json!({"text": "hi"})).await?;
//! while let Some(event) = sub.next().await {
//!     if let Event::Publication(p) = event {
//!         println!("{} {}", p["offset"], p["data"]);
//!     }
//! }
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::socket::WebSocket;
use crate::ws::{ConnectOptions, Message};
use crate::{ClientError, ServerError};

/// Full-jitter backoff: a delay in `[0, min(cap, base * 2^attempt))`.
pub fn backoff_delay(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let bound = base.saturating_mul(2u32.saturating_pow(attempt.min(30))).min(cap);
    Duration::from_nanos(fastrand::u64(0..bound.as_nanos().max(1) as u64))
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Node URLs (`ws://host:port/ws` or `wss://…`), tried in turn on every reconnect.
    pub urls: Vec<String>,
    pub token: Option<String>,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub connect: ConnectOptions,
}

impl ClientOptions {
    pub fn new<S: Into<String>>(urls: impl IntoIterator<Item = S>) -> Self {
        ClientOptions {
            urls: urls.into_iter().map(Into::into).collect(),
            token: None,
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(30),
            connect: ConnectOptions::default(),
        }
    }
}

/// Where the connection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    Connecting {
        attempt: u32,
    },
    Connected {
        url: String,
    },
    /// Waiting before the next attempt.
    Disconnected {
        reason: String,
        retry_in: Duration,
    },
    /// Told by the server not to come back (4102), or closed.
    Closed {
        reason: String,
    },
}

/// What a subscription receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A publication (`{"channel","offset","epoch","time","data"}`), once, in order.
    Publication(Value),
    /// History was lost: the subscription continues from this position.
    Reset {
        epoch: String,
        offset: u64,
    },
    Join(Value),
    Leave(Value),
}

struct SubState {
    position: Option<(String, u64)>,
    tx: mpsc::UnboundedSender<Event>,
}

/// A live subscription; read it with [`Subscription::next`].
pub struct Subscription {
    pub channel: String,
    rx: mpsc::UnboundedReceiver<Event>,
    shared: Arc<Mutex<HashMap<String, SubState>>>,
}

impl Subscription {
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// `epoch:offset` of the last publication delivered.
    pub fn position(&self) -> Option<String> {
        let subs = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        subs.get(&self.channel).and_then(|s| s.position.clone()).map(|(e, o)| format!("{e}:{o}"))
    }
}

enum Cmd {
    Subscribe(String),
    Call(Value, oneshot::Sender<Result<Value, ClientError>>),
    Close,
}

/// The client; cheap to clone.
#[derive(Clone)]
pub struct Client {
    cmds: mpsc::UnboundedSender<Cmd>,
    subs: Arc<Mutex<HashMap<String, SubState>>>,
    state: watch::Receiver<ConnState>,
}

impl Client {
    /// Starts the connection task.
    pub fn start(opts: ClientOptions) -> Client {
        let (cmds, rx) = mpsc::unbounded_channel();
        let subs: Arc<Mutex<HashMap<String, SubState>>> = Arc::default();
        let (state_tx, state) = watch::channel(ConnState::Connecting { attempt: 0 });
        tokio::spawn(drive(opts, rx, subs.clone(), state_tx));
        Client { cmds, subs, state }
    }

    /// Subscribes (resuming after `since` = `epoch:offset` if given).
    pub fn subscribe(&self, channel: &str, since: Option<&str>) -> Subscription {
        let (tx, rx) = mpsc::unbounded_channel();
        let position = since.and_then(|s| s.rsplit_once(':')).and_then(|(e, o)| Some((e.to_string(), o.parse().ok()?)));
        self.subs.lock().unwrap_or_else(|p| p.into_inner()).insert(channel.to_string(), SubState { position, tx });
        let _ = self.cmds.send(Cmd::Subscribe(channel.to_string()));
        Subscription { channel: channel.to_string(), rx, shared: self.subs.clone() }
    }

    async fn call(&self, cmd: Value) -> Result<Value, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(Cmd::Call(cmd, tx)).map_err(|_| ClientError::Closed(None))?;
        rx.await.map_err(|_| ClientError::Closed(None))?
    }

    pub async fn publish(&self, channel: &str, data: Value) -> Result<Value, ClientError> {
        self.call(json!({"cmd": "publish", "channel": channel, "data": data})).await
    }

    pub async fn presence(&self, channel: &str) -> Result<Value, ClientError> {
        self.call(json!({"cmd": "presence", "channel": channel})).await
    }

    /// Watches the connection state.
    pub fn state(&self) -> watch::Receiver<ConnState> {
        self.state.clone()
    }

    pub fn close(&self) {
        let _ = self.cmds.send(Cmd::Close);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn drive(
    opts: ClientOptions,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    subs: Arc<Mutex<HashMap<String, SubState>>>,
    state: watch::Sender<ConnState>,
) {
    let mut attempt: u32 = 0;
    let mut k = 0usize;
    // Calls made while disconnected wait here for the next connection.
    let mut waiting: Vec<(Value, oneshot::Sender<Result<Value, ClientError>>)> = Vec::new();
    loop {
        let url = opts.urls[k % opts.urls.len().max(1)].clone();
        let _ = state.send(ConnState::Connecting { attempt });
        let outcome = session(&opts, &url, &mut cmds, &subs, &state, &mut waiting, &mut attempt).await;
        match outcome {
            Outcome::Closed(reason) => {
                let _ = state.send(ConnState::Closed { reason });
                for (_, tx) in waiting.drain(..) {
                    let _ = tx.send(Err(ClientError::Closed(None)));
                }
                return;
            }
            Outcome::Retry(reason, advice) => {
                k += 1;
                let jitter = backoff_delay(attempt, opts.backoff_base, opts.backoff_cap);
                let delay = advice.map_or(jitter, |a| a + jitter / 4);
                attempt = attempt.saturating_add(1);
                let _ = state.send(ConnState::Disconnected { reason, retry_in: delay });
                let deadline = Instant::now() + delay;
                // Keep taking commands while waiting (subscriptions are remembered; calls
                // wait for the connection).
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => break,
                        cmd = cmds.recv() => match cmd {
                            None | Some(Cmd::Close) => {
                                let _ = state.send(ConnState::Closed { reason: "closed".into() });
                                return;
                            }
                            Some(Cmd::Subscribe(_)) => {}
                            Some(Cmd::Call(v, tx)) => waiting.push((v, tx)),
                        }
                    }
                }
            }
        }
    }
}

enum Outcome {
    Retry(String, Option<Duration>),
    Closed(String),
}

fn subscribe_cmd(subs: &Mutex<HashMap<String, SubState>>, channel: &str) -> Value {
    let mut cmd = json!({"cmd": "subscribe", "channel": channel});
    if let Some((e, o)) = lock(subs).get(channel).and_then(|s| s.position.clone()) {
        cmd["since"] = json!(format!("{e}:{o}"));
    }
    cmd
}

async fn session(
    opts: &ClientOptions,
    url: &str,
    cmds: &mut mpsc::UnboundedReceiver<Cmd>,
    subs: &Arc<Mutex<HashMap<String, SubState>>>,
    state: &watch::Sender<ConnState>,
    waiting: &mut Vec<(Value, oneshot::Sender<Result<Value, ClientError>>)>,
    attempt: &mut u32,
) -> Outcome {
    let mut ws = match WebSocket::connect(url, &opts.connect).await {
        Ok(ws) => ws,
        Err(e) => return Outcome::Retry(format!("connect: {e}"), None),
    };
    let mut next_id: u64 = 1;
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    let mut send = |ws_cmd: Value, p: Pending, pending: &mut HashMap<u64, Pending>| {
        let id = next_id;
        next_id += 1;
        let mut v = ws_cmd;
        v["id"] = json!(id);
        pending.insert(id, p);
        v.to_string()
    };
    let hello = send(json!({"cmd": "connect", "token": opts.token}), Pending::Connect, &mut pending);
    if ws.send_text(&hello).await.is_err() {
        return Outcome::Retry("connect failed".into(), None);
    }
    let channels: Vec<String> = lock(subs).keys().cloned().collect();
    for ch in channels {
        let t = send(subscribe_cmd(subs, &ch), Pending::Subscribe(ch), &mut pending);
        if ws.send_text(&t).await.is_err() {
            return Outcome::Retry("send failed".into(), None);
        }
    }
    for (v, tx) in waiting.drain(..) {
        let t = send(v, Pending::Call(tx), &mut pending);
        let _ = ws.send_text(&t).await;
    }
    let mut ping_every = Duration::from_secs(25);
    let mut last_heard = Instant::now();
    let mut tick = tokio::time::interval(ping_every);
    tick.tick().await;
    let mut advice: Option<Duration> = None;
    let mut no_reconnect = false;
    loop {
        tokio::select! {
            msg = ws.recv() => {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => return Outcome::Retry(format!("connection lost: {e}"), advice),
                };
                last_heard = Instant::now();
                match msg {
                    Message::Close(code, reason) => {
                        if code == Some(4102) || no_reconnect {
                            return Outcome::Closed(format!("server closed ({code:?}): {reason}"));
                        }
                        return Outcome::Retry(format!("server closed ({code:?}): {reason}"), advice);
                    }
                    Message::Text(t) => {
                        let Ok(v) = serde_json::from_str::<Value>(&t) else {
                            return Outcome::Retry("malformed frame from the server".into(), None);
                        };
                        if let Some(id) = v.get("id").and_then(Value::as_u64) {
                            match pending.remove(&id) {
                                Some(Pending::Connect) => {
                                    if let Some(ms) = v["ok"]["ping_interval_ms"].as_u64() {
                                        ping_every = Duration::from_millis(ms.max(100));
                                        tick = tokio::time::interval(ping_every);
                                        tick.tick().await;
                                    }
                                    if v.get("error").is_some() {
                                        return Outcome::Closed(format!("connect refused: {}", v["error"]));
                                    }
                                    *attempt = 0;
                                    let _ = state.send(ConnState::Connected { url: url.to_string() });
                                }
                                Some(Pending::Subscribe(ch)) => on_subscribed(subs, &ch, &v),
                                Some(Pending::Call(tx)) => { let _ = tx.send(reply(&v)); }
                                Some(Pending::Ignore) | None => {}
                            }
                        } else if let Some(p) = v.get("pub") {
                            deliver(subs, p);
                        } else if let Some(r) = v.get("reset") {
                            let ch = r["channel"].as_str().unwrap_or_default();
                            if let Some(s) = lock(subs).get_mut(ch) {
                                let (e, o) = (r["epoch"].as_str().unwrap_or_default().to_string(), r["offset"].as_u64().unwrap_or(0));
                                s.position = Some((e.clone(), o));
                                let _ = s.tx.send(Event::Reset { epoch: e, offset: o });
                            }
                        } else if let Some(j) = v.get("join") {
                            route(subs, j, Event::Join(j.clone()));
                        } else if let Some(l) = v.get("leave") {
                            route(subs, l, Event::Leave(l.clone()));
                        } else if let Some(d) = v.get("disconnect") {
                            advice = d["retry_ms"].as_u64().map(Duration::from_millis);
                            no_reconnect = d["reconnect"] == false;
                        }
                    }
                    Message::Binary(_) | Message::Ping(_) | Message::Pong(_) => {}
                }
            }
            cmd = cmds.recv() => match cmd {
                None | Some(Cmd::Close) => {
                    let _ = ws.send_close(1000, "bye").await;
                    return Outcome::Closed("closed by the application".into());
                }
                Some(Cmd::Subscribe(ch)) => {
                    let t = send(subscribe_cmd(subs, &ch), Pending::Subscribe(ch), &mut pending);
                    if ws.send_text(&t).await.is_err() {
                        return Outcome::Retry("send failed".into(), None);
                    }
                }
                Some(Cmd::Call(v, tx)) => {
                    let t = send(v, Pending::Call(tx), &mut pending);
                    if ws.send_text(&t).await.is_err() {
                        return Outcome::Retry("send failed".into(), None);
                    }
                }
            },
            _ = tick.tick() => {
                if last_heard.elapsed() > ping_every * 3 {
                    return Outcome::Retry("heartbeat timeout".into(), None);
                }
                let t = send(json!({"cmd": "ping"}), Pending::Ignore, &mut pending);
                let _ = ws.send_text(&t).await;
            }
        }
    }
}

enum Pending {
    Connect,
    Subscribe(String),
    Call(oneshot::Sender<Result<Value, ClientError>>),
    Ignore,
}

fn reply(v: &Value) -> Result<Value, ClientError> {
    if let Some(ok) = v.get("ok") {
        return Ok(ok.clone());
    }
    let e = &v["error"];
    Err(ServerError {
        code: e["code"].as_str().unwrap_or("").into(),
        message: e["message"].as_str().unwrap_or("").into(),
    }
    .into())
}

fn on_subscribed(subs: &Mutex<HashMap<String, SubState>>, ch: &str, v: &Value) {
    let mut subs = lock(subs);
    let Some(s) = subs.get_mut(ch) else { return };
    let ok = &v["ok"];
    let (Some(epoch), Some(offset)) = (ok["epoch"].as_str(), ok["offset"].as_u64()) else { return };
    if ok["recovered"] == false {
        s.position = Some((epoch.to_string(), offset));
        let _ = s.tx.send(Event::Reset { epoch: epoch.to_string(), offset });
    } else if s.position.is_none() {
        s.position = Some((epoch.to_string(), offset));
    }
}

fn route(subs: &Mutex<HashMap<String, SubState>>, v: &Value, ev: Event) {
    let ch = v["channel"].as_str().unwrap_or_default();
    if let Some(s) = lock(subs).get(ch) {
        let _ = s.tx.send(ev);
    }
}

/// Delivers a publication once: anything at or before the subscription's position was
/// delivered already (a resume can overlap what arrived live).
fn deliver(subs: &Mutex<HashMap<String, SubState>>, p: &Value) {
    let ch = p["channel"].as_str().unwrap_or_default();
    let mut subs = lock(subs);
    let Some(s) = subs.get_mut(ch) else { return };
    if let (Some(epoch), Some(offset)) = (p["epoch"].as_str(), p["offset"].as_u64()) {
        if let Some((e, o)) = &s.position {
            if e == epoch && offset <= *o {
                return;
            }
        }
        s.position = Some((epoch.to_string(), offset));
    }
    let _ = s.tx.send(Event::Publication(p.clone()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_by_the_full_jitter_formula() {
        let (base, cap) = (Duration::from_millis(500), Duration::from_secs(30));
        for attempt in 0..12 {
            let bound = (base * 2u32.pow(attempt)).min(cap);
            let samples: Vec<Duration> = (0..300).map(|_| backoff_delay(attempt, base, cap)).collect();
            assert!(samples.iter().all(|d| *d < bound), "attempt {attempt}");
            let spread = *samples.iter().max().unwrap() - *samples.iter().min().unwrap();
            assert!(spread > bound * 7 / 10, "attempt {attempt}: bunched");
        }
    }
}
