//! One WebSocket connection, served by one task: frames in, commands handled, heartbeats
//! — and writing. A publication or reply normally never waits: the task that pushes it
//! writes it straight to the socket ([`Sink`], the queue's direct path) when nothing is
//! queued before it and the socket takes it. Only when the socket would block does it
//! wait in the connection's bounded queue, which this task drains into vectored writes
//! as the socket becomes writable.
//!
//! Replies, pings and publications all go through the one queue, so a `subscribe` reply
//! always precedes the publications it replays, and a client that reads nothing — replies
//! included — overflows its queue and is closed as a slow consumer (4000).

use std::collections::HashMap;
use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use switchboard_core::hub::{SubscribeOutcome, SubscribeRequest, SubscriptionHandle};
use switchboard_core::pattern::is_pattern;
use switchboard_core::queue::{DirectWrite, Event, Written};
use switchboard_core::{ChannelName, CloseReason, ConnQueue, Delivery, Kind, StreamPosition};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, MissedTickBehavior};

use super::frame::{self, close, FrameReader, Incoming, Violation};
use super::io::{Read, Rx, Socket, Tx};
use super::protocol::{self, Command};
use crate::api;
use crate::app::AppState;
use crate::auth::{self, Identity, Operation};
use crate::cursor;
use crate::error::{ApiError, Code};
use crate::presence::PresenceGuard;
use crate::registry::Registration;
use crate::session::{self, resolve_channel, resolve_pattern, Resolved, ResolvedPattern};

/// Encoding slots in [`Delivery`] owned by this transport.
const SLOT_TEXT: usize = 2;
const SLOT_DEFLATE: usize = 3;

/// How long the writer may take to flush its last frames once the connection is over.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Room for the command envelope around a payload at the size limit.
pub const ENVELOPE_BYTES: usize = 4096;

/// What the handshake decided.
pub struct Ctx {
    pub state: AppState,
    pub deflate: bool,
    pub url_channels: Vec<Resolved>,
    pub url_cursor: Option<Vec<StreamPosition>>,
    pub url_rewind: Option<usize>,
    pub url_patterns: Vec<ResolvedPattern>,
    /// From `?token=` on the handshake, if any.
    pub identity: Option<Identity>,
    /// This connection's places under the connection limits.
    pub slot: super::super::Admitted,
}

/// Serves an upgraded connection until it ends.
///
/// Every idle connection keeps this future (and its task) for its whole life, so it is
/// kept small: the setup is done here, outside it; the handshake's leftovers (`pre`, the
/// URL's channels in `ctx`) are used up before the first wait; the one-off work of
/// subscribing is boxed and freed once done.
pub fn serve(socket: Socket, pre: Bytes, mut ctx: Box<Ctx>) -> impl std::future::Future<Output = ()> + Send {
    let state = ctx.state.clone();
    let tracked = state.track_upgraded();
    let gauge = state.metrics.connection(crate::metrics::Transport::Ws);
    if let Socket::Tcp(stream) = &socket {
        let _ = stream.set_nodelay(true);
        if state.config.ws.send_buffer_bytes > 0 {
            let _ = socket2::SockRef::from(stream).set_send_buffer_size(state.config.ws.send_buffer_bytes);
        }
    }
    let (rx, tx) = socket.split();
    let queue = state.hub.queue(state.config.defaults.queue_max_bytes);
    let deflate = ctx.deflate.then(|| state.clone());
    if let Some(stream) = tx.tcp() {
        queue.set_direct(Arc::new(Sink {
            stream: stream.clone(),
            deflate: deflate.clone(),
            metrics: state.metrics.clone(),
        }));
    }
    // However the task ends — even by a panic — the queue closes, which also drops the
    // direct path's hold on the socket.
    let closes = CloseOnDrop(queue.clone());
    let mut conn = Box::new(Conn {
        state: state.clone(),
        queue,
        rx,
        tx,
        outbox: Outbox::default(),
        deflate,
        subs: HashMap::new(),
        patterns: HashMap::new(),
        client: crate::presence::client_id(),
        bucket: crate::limits::Bucket::full(state.config.ws.max_commands_per_sec as f64 * 2.0),
        rejected: crate::limits::SlidingCount::new(),
        identity: None,
        claimed: None,
        registration: None,
        expiry: Expiry::None,
        timer: None,
        reader: FrameReader::new(state.config.limits.max_message_bytes + ENVELOPE_BYTES, ctx.deflate),
        _slot: None,
    });
    if let Some(who) = ctx.identity.take() {
        conn.set_identity(who);
    }
    tracing::debug!(client = %conn.client, deflate = ctx.deflate, "websocket connected");
    async move {
        let (_tracked, _gauge, _closes) = (tracked, gauge, closes);
        let mut incoming = Vec::new();
        if conn.start(pre, ctx, &mut incoming).await {
            conn.run(incoming).await;
        }
        // Whatever ended it, the queue is closed now: write what it still holds and the
        // goodbye its close reason calls for, within a grace period — a peer that stopped
        // reading does not keep the socket.
        conn.queue.close(CloseReason::Normal);
        // Leave channels and presence now, not after the goodbye: others see the leave at once.
        conn.subs.clear();
        conn.patterns.clear();
        conn.registration = None;
        let _ = tokio::time::timeout(CLOSE_GRACE, conn.flush_and_close()).await;
        tracing::debug!(client = %conn.client, "websocket closed");
    }
}

/// The queue's direct path: writes an event to the socket now if it takes all or part
/// of it without blocking (see `switchboard_core::queue`).
struct Sink {
    stream: Arc<TcpStream>,
    /// The server state when this connection negotiated permessage-deflate.
    deflate: Option<AppState>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl DirectWrite for Sink {
    fn try_write(&self, event: &Event) -> Written {
        let bytes = encode(event, self.deflate.as_ref());
        // A plain send(2) on the socket: tokio's `try_write` would first consult and then
        // update its readiness bookkeeping, a measurable share of a delivery's CPU. If
        // the socket would block, the connection's task learns it from its own
        // (possibly stale, so retried) `writable()` and a `try_write` that blocks.
        match socket2::SockRef::from(&*self.stream).send(&bytes) {
            Ok(n) => {
                self.metrics.bytes_out.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                if n == bytes.len() {
                    Written::All
                } else {
                    Written::Part(bytes.slice(n..))
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Written::Blocked,
            Err(_) => Written::Failed,
        }
    }

    fn try_write_many(&self, events: &[Event]) -> Result<(usize, Option<Bytes>), switchboard_core::queue::Broken> {
        const MAX_IOV: usize = 256;
        let frames: Vec<Bytes> = events.iter().take(MAX_IOV).map(|e| encode(e, self.deflate.as_ref())).collect();
        let slices: Vec<IoSlice<'_>> = frames.iter().map(|f| IoSlice::new(f)).collect();
        let mut n = match socket2::SockRef::from(&*self.stream).send_vectored(&slices) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok((0, None)),
            Err(_) => return Err(switchboard_core::queue::Broken),
        };
        self.metrics.bytes_out.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        for (i, f) in frames.iter().enumerate() {
            if n < f.len() {
                return Ok((i, (n > 0).then(|| f.slice(n..))));
            }
            n -= f.len();
        }
        Ok((frames.len(), None))
    }
}

/// Encoded frames waiting for the socket, and how much of the first one it already took.
#[derive(Default)]
struct Outbox {
    frames: Vec<Bytes>,
    written: usize,
}

/// Writes the outbox, many frames per system call, until the socket would block
/// (`Ok(false)`) or the outbox is written (its buffer given back) and flushed (`Ok(true)`).
fn write_outbox(
    tx: &mut Tx,
    outbox: &mut Outbox,
    metrics: &crate::metrics::Metrics,
    cx: &mut std::task::Context<'_>,
) -> std::io::Result<bool> {
    const MAX_IOV: usize = 256;
    let frames = &mut outbox.frames;
    while !frames.is_empty() {
        let end = frames.len().min(MAX_IOV);
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(end);
        slices.push(IoSlice::new(&frames[0][outbox.written..]));
        slices.extend(frames[1..end].iter().map(|f| IoSlice::new(f)));
        let Some(mut n) = tx.write_vectored(cx, &slices)? else {
            return Ok(false);
        };
        metrics.bytes_out.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        let mut done = 0;
        while n > 0 {
            let left = frames[done].len() - outbox.written;
            if n >= left {
                n -= left;
                done += 1;
                outbox.written = 0;
            } else {
                outbox.written += n;
                n = 0;
            }
        }
        frames.drain(..done);
    }
    *frames = Vec::new();
    tx.flush(cx)
}

/// Closes a connection's queue when dropped (see `serve`).
struct CloseOnDrop(Arc<ConnQueue>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close(CloseReason::Normal);
    }
}

/// How far back refused commands are counted to tell a flood.
const FLOOD_WINDOW: Duration = Duration::from_secs(10);

struct Conn {
    state: AppState,
    queue: Arc<ConnQueue>,
    rx: Rx,
    tx: Tx,
    outbox: Outbox,
    /// The server state when this connection negotiated permessage-deflate.
    deflate: Option<AppState>,
    /// Presence guards are boxed: most subscriptions have none, and a map entry sized
    /// for one would cost every idle connection hundreds of bytes.
    subs: HashMap<ChannelName, (SubscriptionHandle, Option<Box<PresenceGuard>>)>,
    patterns: HashMap<String, SubscriptionHandle>,
    client: String,
    /// Commands per second: `ws.max_commands_per_sec`, bursts of twice that.
    bucket: crate::limits::Bucket,
    /// Commands refused for the rate limit, over the last [`FLOOD_WINDOW`].
    rejected: crate::limits::SlidingCount,
    // Boxed: rare, and an idle anonymous connection should not carry their size.
    identity: Option<Box<Identity>>,
    /// What an anonymous client said about itself (shown in presence as unverified).
    claimed: Option<Box<serde_json::Value>>,
    registration: Option<Box<Registration>>,
    expiry: Expiry,
    /// Fires at the expiry deadline; only connections with a token have one.
    timer: Option<super::super::Timer>,
    reader: FrameReader,
    /// This connection's places under the connection limits.
    _slot: Option<super::super::Admitted>,
}

/// Where the connection's token stands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expiry {
    /// Anonymous: nothing expires.
    None,
    /// Valid until this time (Unix ms on the server's clock).
    Until(u64),
    /// Expired; the client was asked to `refresh` before this time (Unix ms).
    Grace(u64),
}

impl Conn {
    /// Takes over what the handshake left: the bytes hyper read past it and the URL's
    /// channels, subscribed here. Boxed: one-off work whose state no idle connection
    /// should keep. Returns false when the connection is already over.
    async fn start(&mut self, pre: Bytes, ctx: Box<Ctx>, incoming: &mut Vec<Incoming>) -> bool {
        Box::pin(async move {
            // Holds this connection's place under the connection limits from now on.
            let Ctx { slot, url_channels, url_cursor, url_rewind, url_patterns, .. } = *ctx;
            self._slot = Some(slot);
            if let Err(v) = self.reader.feed(&pre, incoming) {
                self.violate(v);
                return false;
            }
            for (i, r) in url_channels.into_iter().enumerate() {
                let since = url_cursor.as_ref().map(|c| c[i].clone());
                let req = session::subscribe_request(&r, since, url_rewind);
                let res = self.subscribe(r, req, |o, ch| format!("{{\"subscribed\":{}}}", outcome_json(ch, o))).await;
                if let Err(e) = res {
                    // The channel was checked at the handshake; this is the broker failing.
                    self.push_final(frame::text(self.error_reply(None, &e).as_bytes()));
                    self.close_with(close::INTERNAL, "subscribe failed");
                    return false;
                }
            }
            for p in url_patterns {
                let raw = p.pattern.to_string();
                match self.subscribe_pattern(p).await {
                    Ok(()) => self.push(frame::text(
                        format!("{{\"subscribed\":{{\"channel\":\"{raw}\",\"pattern\":true}}}}").as_bytes(),
                    )),
                    Err(e) => {
                        self.push_final(frame::text(self.error_reply(None, &e).as_bytes()));
                        self.close_with(close::INTERNAL, "subscribe failed");
                        return false;
                    }
                }
            }
            true
        })
        .await
    }

    async fn run(&mut self, mut incoming: Vec<Incoming>) {
        let interval = Duration::from_secs(self.state.config.ws.ping_interval_secs);
        let mut ping = tokio::time::interval_at(Instant::now() + interval, interval);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_seen = Instant::now();
        let mut shutdown = self.state.shutdown.clone();
        let mut shutdown_seen = false;
        loop {
            for msg in std::mem::take(&mut incoming) {
                match msg {
                    Incoming::Text(t) => {
                        // Boxed: the command's future (subscribe, broker calls) is large
                        // and short-lived; kept inline it would sit in every idle
                        // connection's state.
                        if !Box::pin(self.command(&t)).await {
                            return;
                        }
                    }
                    Incoming::Ping(p) => self.push(frame::frame(frame::OP_PONG, false, &p)),
                    Incoming::Pong | Incoming::Binary(_) => {}
                    Incoming::Close(code) => {
                        // Echo the peer's code (RFC 6455 §5.5.1) and end.
                        self.push_final(frame::close_frame(code.unwrap_or(close::NORMAL), ""));
                        self.queue.close(CloseReason::Normal);
                        return;
                    }
                }
            }
            if *shutdown.borrow() && !shutdown_seen {
                shutdown_seen = true;
                self.queue.close(CloseReason::Shutdown);
            }
            // What is queued goes out as far as the socket takes it now.
            match std::future::poll_fn(|cx| std::task::Poll::Ready(self.write_queued(cx))).await {
                Ok(true) => {}
                Ok(false) => return, // the queue closed: `serve` says goodbye
                Err(_) => return self.queue.close(CloseReason::Normal),
            }
            let waiting_to_write = !self.outbox.frames.is_empty() || self.tx.unflushed();
            tokio::select! {
                got = std::future::poll_fn(|cx| self.rx.poll_read(cx, &mut self.reader, &mut incoming)) => {
                    if !self.after_read(got, &mut incoming, &mut last_seen).await {
                        return;
                    }
                }
                _ = ping.tick() => {
                    if last_seen.elapsed() >= interval * 3 {
                        // A stall of this process must not count against the client:
                        // what its socket already holds is a sign of life.
                        let got = std::future::poll_fn(|cx| {
                            std::task::Poll::Ready(self.rx.read_now(cx, &mut self.reader, &mut incoming))
                        })
                        .await;
                        if !self.after_read(got, &mut incoming, &mut last_seen).await {
                            return;
                        }
                    }
                    if last_seen.elapsed() >= interval * 3 {
                        return self.close_with(close::HEARTBEAT_TIMEOUT, "heartbeat timeout: no frames for 3 ping intervals");
                    }
                    self.push(Bytes::from_static(frame::PING));
                    // Alive: keep this client's presence entries from expiring.
                    for (_, guard) in self.subs.values() {
                        if let Some(g) = guard {
                            g.refresh().await;
                        }
                    }
                }
                // TCP: wait for room, then write at the top of the loop. A stream: write
                // (and flush) here, as it takes the bytes.
                r = std::future::poll_fn(|cx| match &self.tx {
                    Tx::Tcp(_) => self.tx.poll_writable(cx),
                    Tx::Stream { .. } => match write_outbox(&mut self.tx, &mut self.outbox, &self.state.metrics, cx) {
                        Ok(true) => std::task::Poll::Ready(Ok(())),
                        Ok(false) => std::task::Poll::Pending,
                        Err(e) => std::task::Poll::Ready(Err(e)),
                    },
                }), if waiting_to_write => {
                    if r.is_err() {
                        return self.queue.close(CloseReason::Normal);
                    }
                }
                _ = self.queue.changed(), if !waiting_to_write => {}
                _ = shutdown.changed(), if !shutdown_seen => {}
                _ = super::super::maybe_sleep(&mut self.timer), if self.timer.is_some() => {
                    match self.expiry {
                        Expiry::Until(_) => {
                            let grace = Duration::from_secs(self.state.config.auth.refresh_grace_secs);
                            self.arm(Expiry::Grace(self.state.clock.now_ms().saturating_add(grace.as_millis() as u64)));
                            let v = serde_json::json!({"refresh": {"reason": "token_expired", "grace_ms": grace.as_millis() as u64}});
                            self.push(frame::text(v.to_string().as_bytes()));
                        }
                        _ => return self.queue.close(CloseReason::TokenExpired),
                    }
                }
            }
        }
    }

    /// Moves what is queued into the outbox, encoded. `Err` once the queue is closed and
    /// empty.
    fn refill(&mut self) -> Result<(), CloseReason> {
        let mut batch = Vec::new();
        self.queue.drain_into(&mut batch)?;
        let deflate = self.deflate.as_ref();
        self.outbox.frames.extend(batch.iter().map(|e| encode(e, deflate)));
        Ok(())
    }

    /// Writes what is queued until the socket would block or nothing is left. `Ok(false)`
    /// when the queue has closed (everything before the close was written or is in the
    /// outbox).
    fn write_queued(&mut self, cx: &mut std::task::Context<'_>) -> std::io::Result<bool> {
        loop {
            if self.outbox.frames.is_empty() {
                if self.refill().is_err() {
                    return Ok(false);
                }
                if self.outbox.frames.is_empty() {
                    // Nothing left: what a stream buffered goes out now.
                    self.tx.flush(cx)?;
                    return Ok(true);
                }
            }
            if !write_outbox(&mut self.tx, &mut self.outbox, &self.state.metrics, cx)? {
                return Ok(true); // blocked: the select waits for the socket
            }
            if !self.queue.write_done() {
                return Ok(true);
            }
        }
    }

    /// After the queue closed: writes what it still held, then the goodbye its close
    /// reason calls for, and shuts the socket's write side.
    async fn flush_and_close(&mut self) {
        let reason = self.queue.closed().unwrap_or(CloseReason::Normal);
        while self.refill().is_ok() {}
        self.outbox.frames.extend(goodbye(reason));
        loop {
            let r = std::future::poll_fn(|cx| {
                match write_outbox(&mut self.tx, &mut self.outbox, &self.state.metrics, cx) {
                    Ok(true) => std::task::Poll::Ready(Ok(true)),
                    // TCP: wait for room and try again. A stream's write registered the wake-up.
                    Ok(false) => self.tx.poll_writable(cx).map_ok(|()| false),
                    Err(e) => std::task::Poll::Ready(Err(e)),
                }
            })
            .await;
            if !matches!(r, Ok(false)) {
                break;
            }
        }
        let _ = std::future::poll_fn(|cx| self.tx.poll_shutdown(cx)).await;
        // Read (and drop) what the peer still sends until it closes its side: closing a
        // socket with unread input resets the connection, and the reset can destroy the
        // close frame before the peer reads it. Bounded by the caller's grace period.
        let _ = std::future::poll_fn(|cx| self.rx.poll_discard(cx)).await;
    }

    /// Accounts for one read from the socket. Returns false when the connection is over.
    async fn after_read(&mut self, got: Read, incoming: &mut Vec<Incoming>, last_seen: &mut Instant) -> bool {
        match got {
            Read::Data => *last_seen = Instant::now(),
            Read::WouldBlock => {}
            Read::Eof | Read::Failed => {
                self.queue.close(CloseReason::Normal);
                return false;
            }
            Read::Violation(v) => {
                // Handle what came before the violation, then close.
                for msg in std::mem::take(incoming) {
                    if let Incoming::Text(t) = msg {
                        if !Box::pin(self.command(&t)).await {
                            return false;
                        }
                    }
                }
                self.violate(v);
                return false;
            }
        }
        true
    }

    fn arm(&mut self, expiry: Expiry) {
        self.expiry = expiry;
        self.timer = match expiry {
            Expiry::Until(t) | Expiry::Grace(t) => Some(super::super::timer(&self.state, t)),
            Expiry::None => None,
        };
    }

    /// Adopts a verified identity: registers the connection under its user (for
    /// `/api/disconnect`) and arms the expiry timer.
    fn set_identity(&mut self, who: Identity) {
        self.arm(Expiry::Until(who.expires_at_ms()));
        if self.registration.is_none() {
            self.registration =
                Some(Box::new(self.state.registry.register(&who.user, who.jti.clone(), self.queue.clone())));
        }
        self.identity = Some(Box::new(who));
    }

    /// Queues a frame behind what is queued, within the byte bound.
    fn push(&self, frame: Bytes) {
        let _ = self.queue.push(Event::Frame(frame));
    }

    /// Queues a last frame regardless of the bound (a close must get out).
    fn push_final(&self, frame: Bytes) {
        self.queue.push_replay(Event::Frame(frame));
    }

    fn close_with(&self, code: u16, reason: &str) {
        self.push_final(frame::close_frame(code, reason));
        self.queue.close(CloseReason::Normal);
    }

    fn violate(&self, v: Violation) {
        tracing::debug!(client = %self.client, code = v.code, reason = v.reason, "websocket protocol violation");
        self.close_with(v.code, v.reason);
    }

    /// An error reply, counted in the metrics by its code.
    fn error_reply(&self, id: Option<u64>, e: &ApiError) -> String {
        self.state.metrics.error(e.code.as_str());
        protocol::error(id, e)
    }

    fn reply(&self, text: String) {
        self.push(frame::text(text.as_bytes()));
    }

    /// Handles one command. Returns false when the connection is closing.
    async fn command(&mut self, text: &str) -> bool {
        let rate = self.state.config.ws.max_commands_per_sec as f64;
        if self.bucket.take(rate, rate * 2.0).is_err() {
            // A client that keeps sending past the limit is closed, however many of its
            // commands get through in between: refusals are counted over a window.
            if self.rejected.add(FLOOD_WINDOW) > rate * 2.0 {
                self.close_with(close::POLICY, "command flood");
                return false;
            }
            let id = serde_json::from_str::<serde_json::Value>(text).ok().and_then(|v| v["id"].as_u64());
            let e = ApiError::new(Code::RateLimited, "too many commands; slow down");
            self.reply(self.error_reply(id, &e));
            return true;
        }
        let (id, cmd) = match protocol::parse(text) {
            Ok(x) => x,
            Err((id, e)) => {
                self.reply(self.error_reply(id, &e));
                return true;
            }
        };
        let result = match cmd {
            Command::Subscribe { channel, since, rewind, token: _ } if is_pattern(&channel) => {
                let r = async {
                    if since.is_some() || rewind.is_some() {
                        return Err(ApiError::new(
                            Code::InvalidPattern,
                            "pattern subscriptions are live-only: no since or rewind",
                        ));
                    }
                    let p = resolve_pattern(&self.state, &channel)?;
                    auth::gate_pattern(self.identity.as_deref(), &p, &self.state.deny)?;
                    Ok(p)
                }
                .await;
                match r {
                    Ok(p) => self
                        .subscribe_pattern(p)
                        .await
                        .map(|()| Some(serde_json::json!({"channel": channel, "pattern": true}).to_string())),
                    Err(e) => Err(e),
                }
            }
            Command::Subscribe { channel, since, rewind, token } => {
                let r = async {
                    let resolved = self.gated(Operation::Subscribe, &channel, token)?;
                    let since = since.as_deref().map(cursor::parse_position).transpose()?;
                    let rewind = session::check_rewind(std::slice::from_ref(&resolved), rewind)?;
                    let req = session::subscribe_request(&resolved, since, rewind);
                    Ok::<_, ApiError>((resolved, req))
                }
                .await;
                let res = match r {
                    Ok((resolved, req)) => {
                        self.subscribe(resolved, req, |o, ch| protocol::ok(id, &outcome_json(ch, o))).await
                    }
                    Err(e) => Err(e),
                };
                // Success replied inside `subscribe`, before the replay.
                res.map(|()| None)
            }
            Command::Unsubscribe { channel } if is_pattern(&channel) => match self.patterns.remove(&channel) {
                Some(_) => Ok(Some("{}".to_string())),
                None => Err(ApiError::new(Code::NotSubscribed, format!("not subscribed to {channel:?}"))),
            },
            Command::Unsubscribe { channel } => {
                let ch = ChannelName::parse(&channel).map_err(|e| ApiError::channel(&channel, e));
                ch.and_then(|ch| match self.subs.remove(&ch) {
                    Some(_) => Ok(Some("{}".to_string())),
                    None => Err(ApiError::new(Code::NotSubscribed, format!("not subscribed to {channel:?}"))),
                })
            }
            Command::Publish { channel, data, volatile, key, token } => {
                match self.gated(Operation::Publish, &channel, token) {
                    Ok(r) => match api::payload(&self.state, data) {
                        Ok(data) => api::publish_to(&self.state, &r, data, volatile, key).await.map(Some),
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                }
            }
            Command::History { channel, since, limit, token } => {
                match self.gated(Operation::History, &channel, token) {
                    Ok(r) => api::history_json(&self.state, &r, since.as_deref(), limit)
                        .await
                        .map(|b| Some(String::from_utf8(b).expect("history JSON is UTF-8"))),
                    Err(e) => Err(e),
                }
            }
            Command::Presence { channel, token } => match self.gated(Operation::Presence, &channel, token) {
                Ok(r) => crate::presence::members_json(&self.state, &r).await.map(Some),
                Err(e) => Err(e),
            },
            Command::PresenceStats { channel, token } => match self.gated(Operation::PresenceStats, &channel, token) {
                Ok(r) => crate::presence::stats_json(&self.state, &r).await.map(Some),
                Err(e) => Err(e),
            },
            Command::Connect { token, client } => {
                if let Some(c) = client {
                    // Small and public only: it is shown to others in presence.
                    if c.to_string().len() <= 1024 {
                        self.claimed = Some(Box::new(c));
                    }
                }
                if self.identity.is_some() && token.is_some() {
                    Err(ApiError::new(Code::InvalidRequest, "already authenticated; send `refresh` with a new token"))
                } else {
                    match token.as_deref().map(|t| super::super::verify(&self.state, t)).transpose() {
                        Ok(who) => {
                            if let Some(who) = who {
                                self.set_identity(who);
                            }
                            let user = self.identity.as_deref().map(|w| w.user.clone());
                            let expires = self.identity.as_deref().map(|w| w.expires_in_ms(&self.state.clock));
                            Ok(Some(
                                serde_json::json!({
                                    "client": self.client, "version": "v1", "user": user,
                                    "expires_in_ms": expires,
                                    "ping_interval_ms": self.state.config.ws.ping_interval_secs * 1000,
                                })
                                .to_string(),
                            ))
                        }
                        Err(e) => {
                            // A bad connection token ends the connection, with its code.
                            let code = match e.code {
                                Code::TokenExpired => close::TOKEN_EXPIRED,
                                Code::TokenRevoked => close::DISCONNECTED,
                                _ => close::TOKEN_INVALID,
                            };
                            self.reply(self.error_reply(id, &e));
                            self.close_with(code, e.code.as_str());
                            return false;
                        }
                    }
                }
            }
            Command::Refresh { token } => match super::super::verify(&self.state, &token) {
                Ok(who) if self.identity.as_deref().is_some_and(|old| old.user != who.user) => {
                    Err(ApiError::new(Code::TokenInvalid, "refresh token is for another user"))
                }
                Ok(who) => {
                    let ms = who.expires_in_ms(&self.state.clock);
                    self.set_identity(who);
                    Ok(Some(format!("{{\"expires_in_ms\":{ms}}}")))
                }
                Err(e) => Err(e),
            },
            Command::Ping => Ok(Some("{}".to_string())),
        };
        match result {
            Ok(Some(ok)) => self.reply(protocol::ok(id, &ok)),
            Ok(None) => {}
            Err(e) => self.reply(self.error_reply(id, &e)),
        }
        true
    }

    /// Subscribes race-free; `reply` renders what is queued before the replay.
    /// The caller has authorized the subscription.
    async fn subscribe(
        &mut self,
        r: Resolved,
        req: SubscribeRequest,
        reply: impl FnOnce(&SubscribeOutcome, &ChannelName) -> String,
    ) -> Result<(), ApiError> {
        if self.subs.contains_key(&r.channel) {
            return Err(ApiError::new(
                Code::AlreadySubscribed,
                format!("already subscribed to {:?}", r.channel.as_str()),
            ));
        }
        let max = self.state.config.ws.max_subscriptions;
        if self.subs.len() + self.patterns.len() >= max {
            return Err(ApiError::new(
                Code::TooManySubscriptions,
                format!("at most {max} subscriptions per connection"),
            ));
        }
        self.queue.raise_bound(r.options.queue_max_bytes);
        let resuming = req.since.is_some();
        let pending = self.state.hub.subscribe(r.channel.clone(), self.queue.clone(), req).await?;
        if resuming {
            self.state.metrics.resume(pending.outcome().recovered);
        }
        // In presence before the reply says subscribed; the join event after going live,
        // so the subscriber sees its own.
        let guard =
            crate::presence::join(&self.state, &r, &self.client, self.identity.as_deref(), self.claimed.as_deref())
                .await?;
        self.reply(reply(pending.outcome(), &r.channel));
        let handle = pending.go_live();
        if let Some(g) = &guard {
            // The subscribe succeeded and was confirmed; a join event lost to a broker
            // hiccup is not worth failing it for (presence itself is in place).
            if let Err(e) = g.announce().await {
                tracing::debug!("join event not published: {}", e.message);
            }
        }
        self.subs.insert(r.channel, (handle, guard.map(Box::new)));
        Ok(())
    }

    /// The caller has authorized the pattern.
    async fn subscribe_pattern(&mut self, p: ResolvedPattern) -> Result<(), ApiError> {
        let raw = p.pattern.to_string();
        if self.patterns.contains_key(&raw) {
            return Err(ApiError::new(Code::AlreadySubscribed, format!("already subscribed to {raw:?}")));
        }
        let max = self.state.config.ws.max_subscriptions;
        if self.subs.len() + self.patterns.len() >= max {
            return Err(ApiError::new(
                Code::TooManySubscriptions,
                format!("at most {max} subscriptions per connection"),
            ));
        }
        self.queue.raise_bound(p.options.queue_max_bytes);
        let handle = self.state.hub.subscribe_pattern(p.pattern, self.queue.clone()).await?;
        self.patterns.insert(raw, handle);
        Ok(())
    }

    /// Resolves `channel` and asks the gate whether this connection may perform `op` on
    /// it: every channel command goes through here. `token` is a subscription token.
    fn gated(&self, op: Operation, channel: &str, token: Option<String>) -> Result<Resolved, ApiError> {
        let r = resolve_channel(&self.state, channel)?;
        let cred = auth::Credentials {
            who: self.identity.as_deref(),
            sub_tokens: token.as_slice(),
            subscribed: self.subs.contains_key(&r.channel),
        };
        self.state.gate(op, &r, &cred)?;
        Ok(r)
    }
}

fn outcome_json(channel: &ChannelName, o: &SubscribeOutcome) -> String {
    serde_json::json!({
        "channel": channel, "epoch": &*o.position.epoch, "offset": o.position.offset,
        "recovered": o.recovered, "replayed": o.replayed,
    })
    .to_string()
}

fn pub_payload(d: &Delivery) -> Vec<u8> {
    let mut v = Vec::with_capacity(d.json().len() + 10);
    v.extend_from_slice(match d.publication.kind {
        Kind::Stored | Kind::Volatile => b"{\"pub\":",
        Kind::Join => b"{\"join\":",
        Kind::Leave => b"{\"leave\":",
    });
    v.extend_from_slice(d.json());
    v.push(b'}');
    v
}

/// `deflate`: the server state when this connection negotiated permessage-deflate (to
/// read the publication's namespace setting).
fn encode(e: &Event, deflate: Option<&AppState>) -> Bytes {
    match e {
        // Built once per publication, shared by every subscriber with the same setting.
        Event::Publication(d) if deflate.is_some() => d.encoded(SLOT_DEFLATE, |d| {
            let state = deflate.expect("guarded");
            let allowed = state.config.namespace(d.publication.channel.namespace()).is_none_or(|o| o.deflate);
            frame::text_maybe_deflated(&pub_payload(d), allowed)
        }),
        Event::Publication(d) => d.encoded(SLOT_TEXT, |d| frame::text(&pub_payload(d))),
        Event::Reset { channel, position } => {
            let v = serde_json::json!({"reset": {
                "channel": channel, "epoch": &*position.epoch, "offset": position.offset, "reason": "stream_reset",
            }});
            frame::text(v.to_string().as_bytes())
        }
        Event::Frame(b) => b.clone(),
    }
}

fn disconnect(code: u16, reason: &str, retry_ms: u64) -> Bytes {
    let v =
        serde_json::json!({"disconnect": {"code": code, "reason": reason, "reconnect": true, "retry_ms": retry_ms}});
    frame::text(v.to_string().as_bytes())
}

fn disconnect_final(code: u16, reason: &str) -> Bytes {
    let v = serde_json::json!({"disconnect": {"code": code, "reason": reason, "reconnect": false}});
    frame::text(v.to_string().as_bytes())
}

/// The last frames of a connection closed for `reason`: a `disconnect` push saying
/// whether to reconnect, and the close frame (nothing more for a normal close, whose close
/// frame is already queued).
fn goodbye(reason: CloseReason) -> Vec<Bytes> {
    match reason {
        CloseReason::SlowConsumer => vec![
            disconnect(close::SLOW_CONSUMER, "slow_consumer", 0),
            frame::close_frame(close::SLOW_CONSUMER, "slow consumer: reconnect and resume"),
        ],
        CloseReason::Shutdown => {
            let retry = fastrand::u64(500..=5000);
            vec![
                disconnect(close::GOING_AWAY, "shutdown", retry),
                frame::close_frame(close::GOING_AWAY, "server shutting down: reconnect"),
            ]
        }
        CloseReason::TokenExpired => vec![
            disconnect(close::TOKEN_EXPIRED, "token_expired", 0),
            frame::close_frame(close::TOKEN_EXPIRED, "token expired: reconnect with a new token"),
        ],
        CloseReason::Disconnected => vec![
            disconnect_final(close::DISCONNECTED, "disconnected"),
            frame::close_frame(close::DISCONNECTED, "disconnected by the server"),
        ],
        CloseReason::Normal => Vec::new(),
    }
}

/// The conformance endpoint (`/ws/echo`, `--dev` only): echoes every message with the
/// same framing code as `/ws`, so independent suites (Autobahn|Testsuite) can check
/// RFC 6455 / 7692 behaviour. Binary is echoed here; the protocol endpoint refuses it.
pub async fn serve_echo(socket: Socket, pre: Bytes, deflate: bool, max_message: usize, _slot: super::super::Admitted) {
    match socket {
        Socket::Tcp(s) => {
            let _ = s.set_nodelay(true);
            echo(s, pre, deflate, max_message).await
        }
        Socket::Stream(s) => echo(s, pre, deflate, max_message).await,
    }
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, pre: Bytes, deflate: bool, max_message: usize) {
    use tokio::io::AsyncReadExt;
    let mut reader = FrameReader::new(max_message, deflate).allowing_binary();
    let mut incoming = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut result = reader.feed(&pre, &mut incoming);
    loop {
        if let Err(v) = result {
            let _ = stream.write_all(&frame::close_frame(v.code, v.reason)).await;
            let _ = stream.shutdown().await;
            return;
        }
        for msg in std::mem::take(&mut incoming) {
            let out = match msg {
                Incoming::Text(t) => frame::data_maybe_deflated(frame::OP_TEXT, t.as_bytes(), deflate),
                Incoming::Binary(b) => frame::data_maybe_deflated(frame::OP_BINARY, &b, deflate),
                Incoming::Ping(p) => frame::frame(frame::OP_PONG, false, &p),
                Incoming::Pong => continue,
                Incoming::Close(code) => {
                    let _ = stream.write_all(&frame::close_frame(code.unwrap_or(close::NORMAL), "")).await;
                    let _ = stream.shutdown().await;
                    return;
                }
            };
            if stream.write_all(&out).await.is_err() {
                return;
            }
        }
        match tokio::time::timeout(Duration::from_secs(60), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => result = reader.feed(&buf[..n], &mut incoming),
            _ => return,
        }
    }
}
