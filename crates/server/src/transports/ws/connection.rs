//! One WebSocket connection, served by one task: frames in, commands handled, heartbeats
//! — and writing. A publication or reply normally never waits: the task that pushes it
//! writes it straight to the socket (the queue's direct path, [`TcpConn`]'s
//! `DirectWrite`) when nothing is queued before it and the socket takes it. Only when
//! the socket would block does it wait in the connection's bounded queue, which this
//! task drains into vectored writes as the socket becomes writable.
//!
//! Replies, pings and publications all go through the one queue, so a `subscribe` reply
//! always precedes the publications it replays, and a client that reads nothing — replies
//! included — overflows its queue and is closed as a slow consumer (4000).

use std::io::IoSlice;
use std::time::Duration;

use bytes::Bytes;
use switchboard_core::queue::{DirectWrite, Event, Written};
use switchboard_core::{CloseReason, Delivery, Kind, StreamPosition};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::frame::{self, close, FrameReader, Incoming, Violation};
use super::io::{Read, Rx, Socket, TcpConn, Tx};
use crate::app::AppState;
use crate::auth::Identity;
use crate::commands::{self, Session, Wire};
use crate::session::{self, Resolved, ResolvedPattern};

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
    let deflate = ctx.deflate.then(|| state.clone());
    let (rx, tx) = socket.split(deflate.clone(), &state.metrics);
    let queue = state.hub.queue(state.config.defaults.queue_max_bytes);
    if let Some(tcp) = tx.tcp() {
        queue.set_direct(tcp.clone());
    }
    // However the task ends — even by a panic — the queue closes, which also drops the
    // direct path's hold on the socket.
    let closes = super::super::CloseOnDrop(queue.clone());
    let mut conn = Box::new(Conn {
        session: Session::new(state.clone(), queue),
        rx,
        tx,
        outbox: Outbox::default(),
        deflate,
        reader: FrameReader::new(state.config.limits.max_message_bytes + ENVELOPE_BYTES, ctx.deflate),
        incoming: Vec::new(),
        last_seen: Instant::now(),
        blocked: false,
        rhythm: Default::default(),
        _slot: None,
    });
    if let Some(who) = ctx.identity.take() {
        conn.session.set_identity(who);
    }
    crate::heartbeat::Heartbeats::join(&state, &conn.session.queue);
    conn.session.opened();
    tracing::debug!(client = %conn.session.client, deflate = ctx.deflate, "websocket connected");
    // What the start needs, in one box: the task's future keeps what it captured for its
    // whole life, and these two are used up before the first wait.
    let boot = Box::new((pre, ctx));
    async move {
        // (Moved out in a block of its own: the box is freed where its variable ends.)
        let (pre, ctx) = {
            let b = boot;
            *b
        };
        if conn.start(pre, ctx).await {
            crate::transports::parking::drive(Held { conn, _tracked: tracked, _gauge: gauge, _closes: closes }).await
        } else {
            // (Boxed, as in `finish`: the timeout's timer would otherwise be part of every
            // idle connection's state.)
            Box::pin(end(&mut conn)).await;
        }
    }
}

/// The queue's direct path: writes an event to the socket now if it takes all or part
/// of it without blocking (see `switchboard_core::queue`).
impl DirectWrite for TcpConn {
    fn try_write(&self, event: &Event) -> Written {
        let bytes = encode(event, self.deflate.as_ref());
        let (written, n) = super::super::send_direct(&self.stream, &bytes);
        self.metrics.bytes_out.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        written
    }

    fn try_write_many(&self, events: &[Event]) -> Result<(usize, Option<Bytes>), switchboard_core::queue::Broken> {
        const MAX_IOV: usize = 256;
        let frames: Vec<Bytes> = events.iter().take(MAX_IOV).map(|e| encode(e, self.deflate.as_ref())).collect();
        match super::super::send_direct_many(&self.stream, &frames, |f| f) {
            Ok((whole, rest, n)) => {
                self.metrics.bytes_out.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                Ok((whole, rest))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok((0, None)),
            Err(_) => Err(switchboard_core::queue::Broken),
        }
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

/// What woke a connection's task (several at once, possibly).
#[derive(Default)]
struct Woke {
    /// The socket was read.
    read: Option<Read>,
    /// Waiting to write: the socket has room (TCP) or took the outbox (a stream) —
    /// `Some(false)` when it failed.
    written: Option<bool>,
    /// The queue changed (something queued, a heartbeat, the close).
    changed: bool,
    /// The token's expiry timer fired.
    expired: bool,
}

struct Conn {
    /// The protocol's session: identity, subscriptions, presence, the queue.
    session: Session<WsWire>,
    rx: Rx,
    tx: Tx,
    outbox: Outbox,
    /// The server state when this connection negotiated permessage-deflate.
    deflate: Option<AppState>,
    reader: FrameReader,
    /// Messages read and not yet handled.
    incoming: Vec<Incoming>,
    /// When the client last sent anything (for the heartbeat timeout).
    last_seen: Instant,
    /// The queue woke the connection while the socket was full: nothing to write until
    /// the socket has room (the queue wakes a blocked connection once per batch, and for
    /// heartbeats).
    blocked: bool,
    /// Whether it parks at its next wait or keeps its task (`transports::parking`).
    rhythm: crate::transports::parking::Rhythm,
    /// This connection's places under the connection limits.
    _slot: Option<super::super::Admitted>,
}

/// An upgraded connection with what counts it, between its tasks.
struct Held {
    conn: Box<Conn>,
    _tracked: crate::app::UpgradedGuard,
    _gauge: crate::metrics::ConnectionGauge,
    _closes: super::super::CloseOnDrop,
}

impl crate::transports::parking::Park for Held {
    const TRANSPORT: crate::metrics::Transport = crate::metrics::Transport::Ws;
    type Ended = ();
    fn metrics(&self) -> &std::sync::Arc<crate::metrics::Metrics> {
        &self.conn.session.state.metrics
    }
    fn run<'a>(&'a mut self, park: &'a std::task::Waker) -> impl std::future::Future<Output = Option<()>> + Send + 'a {
        self.conn.run(park)
    }
    async fn finish(mut self, (): ()) {
        Box::pin(end(&mut self.conn)).await
    }
}

/// Whatever ended it, the queue is closed now: writes what it still holds and the
/// goodbye its close reason calls for, within a grace period — a peer that stopped
/// reading does not keep the socket.
async fn end(conn: &mut Conn) {
    conn.session.queue.close(CloseReason::Normal);
    // Leave channels and presence now, not after the goodbye: others see the leave at once.
    conn.session.leave_all();
    let _ = tokio::time::timeout(CLOSE_GRACE, conn.flush_and_close()).await;
    tracing::debug!(client = %conn.session.client, "websocket closed");
}

/// `switchboard.v1` over WebSocket: one text frame per message, the close code in a
/// close frame.
pub struct WsWire;

impl Wire for WsWire {
    fn text(json: &[u8]) -> Bytes {
        frame::text(json)
    }

    fn close(code: u16, reason: &str) -> Bytes {
        frame::close_frame(code, reason)
    }
    const TRANSPORT: &'static str = "websocket";
}

impl Conn {
    fn violate(&self, v: Violation) {
        tracing::debug!(client = %self.session.client, code = v.code, reason = v.reason, "websocket protocol violation");
        self.session.close_with(v.code, v.reason);
    }

    /// Takes over what the handshake left: the bytes hyper read past it and the URL's
    /// channels, subscribed here. Boxed: one-off work whose state no idle connection
    /// should keep. Returns false when the connection is already over.
    async fn start(&mut self, pre: Bytes, ctx: Box<Ctx>) -> bool {
        Box::pin(async move {
            // Holds this connection's place under the connection limits from now on.
            let Ctx { slot, url_channels, url_cursor, url_rewind, url_patterns, .. } = *ctx;
            self._slot = Some(slot);
            if let Err(v) = self.reader.feed(&pre, &mut self.incoming) {
                self.violate(v);
                return false;
            }
            for (i, r) in url_channels.into_iter().enumerate() {
                let since = url_cursor.as_ref().map(|c| c[i].clone());
                let req = session::subscribe_request(&r, since, url_rewind);
                let res = self
                    .session
                    .subscribe(r, req, |o, ch| format!("{{\"subscribed\":{}}}", commands::outcome_json(ch, o)))
                    .await;
                if let Err(e) = res {
                    // The channel was checked at the handshake; this is the broker failing.
                    self.session.push_final(frame::text(self.session.error_reply(None, &e).as_bytes()));
                    self.session.close_with(close::INTERNAL, "subscribe failed");
                    return false;
                }
            }
            for p in url_patterns {
                let raw = p.pattern.to_string();
                match self.session.subscribe_pattern(p).await {
                    Ok(()) => self.session.push(frame::text(
                        format!("{{\"subscribed\":{{\"channel\":\"{raw}\",\"pattern\":true}}}}").as_bytes(),
                    )),
                    Err(e) => {
                        self.session.push_final(frame::text(self.session.error_reply(None, &e).as_bytes()));
                        self.session.close_with(close::INTERNAL, "subscribe failed");
                        return false;
                    }
                }
            }
            true
        })
        .await
    }

    /// Serves the connection until it ends (`Some`) or has nothing to do (`None`): then
    /// what it waits on — its socket, its queue, its timer — has been polled with `park`,
    /// which wakes it.
    async fn run(&mut self, park: &std::task::Waker) -> Option<()> {
        // (What lives across its waits is in `self`, boxed, rather than here: this
        // future's size decides the size class of every connection's task.)
        self.rhythm.started();
        loop {
            // Boxed: the commands' futures (subscribe, broker calls) are large and
            // short-lived; kept inline they would sit in every idle connection's state.
            if !self.incoming.is_empty() && !Box::pin(self.handle_incoming()).await {
                return Some(());
            }
            // The server's heartbeat wheel (crate::heartbeat) beats once per ping interval.
            if self.session.queue.take_beat() {
                self.rhythm.beat();
                let interval = Duration::from_secs(self.session.state.config.ws.ping_interval_secs);
                if self.last_seen.elapsed() >= interval * 3 {
                    // A stall of this process must not count against the client: what
                    // its socket already holds is a sign of life.
                    let this = &mut *self;
                    let got = std::future::poll_fn(move |cx| {
                        std::task::Poll::Ready(this.rx.read_now(cx, &mut this.reader, &mut this.incoming))
                    })
                    .await;
                    match self.after_read(got) {
                        Ok(true) => {}
                        Ok(false) => return Some(()),
                        Err(v) => {
                            Box::pin(self.violated(v)).await;
                            return Some(());
                        }
                    }
                }
                if self.last_seen.elapsed() >= interval * 3 {
                    self.session
                        .close_with(close::HEARTBEAT_TIMEOUT, "heartbeat timeout: no frames for 3 ping intervals");
                    return Some(());
                }
                self.session.push(Bytes::from_static(frame::PING));
                // Alive: keep this client's presence entries from expiring. (Boxed: once
                // an interval, and its future would sit in every idle connection's state.)
                Box::pin(self.session.refresh_presence()).await;
            }
            // What is queued goes out as far as the socket takes it now.
            if !std::mem::take(&mut self.blocked) {
                match std::future::poll_fn(|cx| std::task::Poll::Ready(self.write_queued(cx))).await {
                    Ok(true) => {}
                    Ok(false) => return Some(()), // the queue closed: `finish` says goodbye
                    Err(_) => {
                        self.session.queue.close(CloseReason::Normal);
                        return Some(());
                    }
                }
            }
            let waiting_to_write = !self.outbox.frames.is_empty() || self.tx.unflushed();
            // Everything it waits on is polled once with `park` as the waker: nothing
            // ready, and the connection parks (its task ends) until one of them wakes it.
            // A busy one waits in its task.
            let woke = if self.rhythm.parks() {
                match self.poll_wait(&mut std::task::Context::from_waker(park), waiting_to_write) {
                    std::task::Poll::Ready(w) => w,
                    std::task::Poll::Pending => {
                        self.rhythm.parked();
                        return None;
                    }
                }
            } else {
                let began = Instant::now();
                let w = std::future::poll_fn(|cx| self.poll_wait(cx, waiting_to_write)).await;
                self.rhythm.waited(began);
                w
            };
            if woke.written == Some(false) {
                self.session.queue.close(CloseReason::Normal);
                return Some(());
            }
            if woke.expired && !self.session.on_expiry() {
                return Some(());
            }
            if let Some(got) = woke.read {
                match self.after_read(got) {
                    Ok(true) => {}
                    Ok(false) => return Some(()),
                    Err(v) => {
                        Box::pin(self.violated(v)).await;
                        return Some(());
                    }
                }
            }
            self.blocked =
                woke.changed && waiting_to_write && woke.written.is_none() && self.session.queue.closed().is_none();
        }
    }

    /// What ended the wait, if anything has: a read, room to write (when
    /// `waiting_to_write`), the queue, the token's expiry. (Polled by hand rather than by
    /// `select!`, whose branch futures would sit in every idle connection's state.)
    fn poll_wait(&mut self, cx: &mut std::task::Context<'_>, waiting_to_write: bool) -> std::task::Poll<Woke> {
        use std::task::Poll;
        let mut w = Woke::default();
        if let Poll::Ready(got) = self.rx.poll_read(cx, &mut self.reader, &mut self.incoming) {
            w.read = Some(got);
        }
        if waiting_to_write {
            // TCP: wait for room, then write at the top of the loop. A stream:
            // write (and flush) here, as it takes the bytes.
            let p = match &self.tx {
                Tx::Tcp(_) => self.tx.poll_writable(cx),
                Tx::Stream { .. } => {
                    match write_outbox(&mut self.tx, &mut self.outbox, &self.session.state.metrics, cx) {
                        Ok(true) => Poll::Ready(Ok(())),
                        Ok(false) => Poll::Pending,
                        Err(e) => Poll::Ready(Err(e)),
                    }
                }
            };
            if let Poll::Ready(r) = p {
                w.written = Some(r.is_ok());
            }
        }
        w.changed = self.session.queue.poll_changed(cx).is_ready();
        if let Some(t) = self.session.timer.as_mut() {
            w.expired = t.as_mut().poll(cx).is_ready();
        }
        if w.read.is_some() || w.written.is_some() || w.changed || w.expired {
            Poll::Ready(w)
        } else {
            Poll::Pending
        }
    }

    /// Handles the messages read. Returns false when the connection is over.
    async fn handle_incoming(&mut self) -> bool {
        for msg in std::mem::take(&mut self.incoming) {
            match msg {
                Incoming::Text(t) => {
                    if !self.session.command(&t).await {
                        return false;
                    }
                }
                Incoming::Ping(p) => self.session.push(frame::frame(frame::OP_PONG, false, &p)),
                Incoming::Pong | Incoming::Binary(_) => {}
                Incoming::Close(code) => {
                    // Echo the peer's code (RFC 6455 §5.5.1) and end.
                    self.session.push_final(frame::close_frame(code.unwrap_or(close::NORMAL), ""));
                    self.session.queue.close(CloseReason::Normal);
                    return false;
                }
            }
        }
        true
    }

    /// Moves what is queued into the outbox, encoded. `Err` once the queue is closed and
    /// empty.
    fn refill(&mut self) -> Result<(), CloseReason> {
        let mut batch = Vec::new();
        self.session.queue.drain_into(&mut batch)?;
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
            if !write_outbox(&mut self.tx, &mut self.outbox, &self.session.state.metrics, cx)? {
                return Ok(true); // blocked: the select waits for the socket
            }
            // Nothing more queued: done, unless the queue closed meanwhile (a wake-up
            // it sent while the socket was full was taken then, and none follows).
            if !self.session.queue.write_done() && self.session.queue.closed().is_none() {
                return Ok(true);
            }
        }
    }

    /// After the queue closed: writes what it still held, then the goodbye its close
    /// reason calls for, and shuts the socket's write side.
    async fn flush_and_close(&mut self) {
        let reason = self.session.queue.closed().unwrap_or(CloseReason::Normal);
        while self.refill().is_ok() {}
        self.outbox.frames.extend(goodbye(reason));
        loop {
            let r = std::future::poll_fn(|cx| {
                match write_outbox(&mut self.tx, &mut self.outbox, &self.session.state.metrics, cx) {
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

    /// Accounts for one read from the socket. `Ok(false)` when the connection is over;
    /// a protocol violation is the caller's to handle ([`Conn::violated`]). Not async: it
    /// runs in every idle connection's state, which must stay small.
    fn after_read(&mut self, got: Read) -> Result<bool, Violation> {
        match got {
            Read::Data => self.last_seen = Instant::now(),
            Read::WouldBlock => {}
            Read::Eof | Read::Failed => {
                self.session.queue.close(CloseReason::Normal);
                return Ok(false);
            }
            Read::Violation(v) => return Err(v),
        }
        Ok(true)
    }

    /// Handles the commands that came before a protocol violation, then closes for it.
    async fn violated(&mut self, v: Violation) {
        for msg in std::mem::take(&mut self.incoming) {
            if let Incoming::Text(t) = msg {
                if !Box::pin(self.session.command(&t)).await {
                    return;
                }
            }
        }
        self.violate(v);
    }
}

/// The `reset` push: the client's position on `channel` could not be continued.
pub(crate) fn reset_json(
    channel: &switchboard_core::ChannelName,
    position: &switchboard_core::StreamPosition,
) -> String {
    let v = serde_json::json!({"reset": {
        "channel": channel, "epoch": &*position.epoch, "offset": position.offset, "reason": "stream_reset",
    }});
    v.to_string()
}

/// A publication (or join/leave) as the protocol pushes it: `{"pub":…}`.
pub(crate) fn pub_payload(d: &Delivery) -> Vec<u8> {
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
        Event::Reset { channel, position } => frame::text(reset_json(channel, position).as_bytes()),
        Event::Frame(b) => b.clone(),
    }
}

/// The last frames of a connection closed for `reason`: a `disconnect` push saying
/// whether to reconnect, and the close frame (nothing more for a normal close, whose close
/// frame is already queued).
fn goodbye(reason: CloseReason) -> Vec<Bytes> {
    match crate::commands::goodbye(reason) {
        Some(g) => vec![frame::text(g.push.as_bytes()), frame::close_frame(g.code, g.text)],
        None => Vec::new(),
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
