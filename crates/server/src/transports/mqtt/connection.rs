//! One MQTT connection: CONNECT, then packets in and publications out, served by one
//! task. Subscriptions, presence, publishing and the gate are the `switchboard.v1`
//! session's ([`crate::commands::Session`]); this file is MQTT's framing and rules.

use std::collections::{HashMap, HashSet};
use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use switchboard_core::pattern::covers;
use switchboard_core::queue::{Broken, DirectWrite, Event, Written};
use switchboard_core::{ChannelName, CloseReason, Kind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::codec::{self, Connect, Packet, Version};
use crate::app::AppState;
use crate::auth::Operation;
use crate::commands::{ops, Session, SmallMap, Wire};
use crate::error::{ApiError, Code};

/// MQTT replies are packets the connection writes itself; the session's own text pushes
/// (WebSocket-protocol replies) have no MQTT form.
pub struct MqttWire;

impl Wire for MqttWire {
    fn text(_: &[u8]) -> Bytes {
        Bytes::new()
    }
    fn close(_: u16, _: &str) -> Bytes {
        Bytes::new()
    }
    // (Not at `connect`, which MQTT has not: a client that subscribes to `$direct` is
    // registered by its connection, with a PUBLISH of the client's version as the frame.)
    const DIRECT: bool = false;
    const TRANSPORT: &'static str = "mqtt";
}

/// Encoding slots in `Delivery` owned by this transport (QoS 0, not retained).
const SLOT_V311: usize = 4;
const SLOT_V5: usize = 5;
/// The MQTT 5 authentication method this server takes: the connection token (a JWT) as
/// its data, at CONNECT and to re-authenticate.
pub const AUTH_METHOD: &str = "JWT";
/// How long a client has to send CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Topic aliases a client may define (MQTT 5).
const TOPIC_ALIASES: u16 = 16;
/// QoS 2 publications a client may have between PUBREC and PUBREL (its receive maximum).
const RECEIVE_MAXIMUM: u16 = 64;
/// How long a connection taking a client id over waits for the old connection to keep
/// its session.
const TAKE_OVER_WAIT: Duration = Duration::from_secs(5);
/// A client's own publications remembered for No Local: more than its queue can hold
/// between two reads.
const OWN_REMEMBERED: usize = 1024;
/// QoS 1 and 2 publications in flight to an MQTT 3.1.1 client (MQTT 5 clients say theirs).
const OUTGOING_WINDOW_V311: usize = 32;

/// How the connection ended, for the will and the goodbye.
enum End {
    /// DISCONNECT from the client (the reason code; 0x04 asks for the will).
    Client(u8),
    /// The socket closed or failed, or keep-alive ran out: publish the will.
    Lost,
    /// A protocol error: MQTT 5 gets a DISCONNECT with this reason.
    Protocol(u8, String),
    /// The server closed the queue (shutdown, slow consumer, token expiry, the API).
    Server(CloseReason),
}

/// An outgoing QoS 1 or 2 publication not yet complete.
struct Inflight {
    id: u16,
    qos: u8,
    /// QoS 2: PUBREC came and PUBREL went; PUBCOMP completes it.
    released: bool,
    /// For a stored publication: the position its completion confirms.
    confirms: Option<(ChannelName, switchboard_core::StreamPosition)>,
}

/// What ended one wait of the connection's task.
#[derive(Default)]
struct Woke {
    read: Option<std::io::Result<usize>>,
    /// The queue has something (or closed, or beat).
    changed: bool,
    /// The keep-alive timer fired.
    keep_alive: bool,
    /// The connection token expired.
    token_expired: bool,
}

/// A subscription that passed its checks.
enum Target {
    Channel(crate::session::Resolved),
    Pattern(crate::session::ResolvedPattern),
    /// `$share/{group}/{filter}`.
    Shared(String, super::shared::Target),
}

struct Conn {
    session: Session<MqttWire>,
    /// Set once this connection has kept its session at the end (for one taking over);
    /// only a connection that keeps a session has one.
    ended: Option<tokio::sync::oneshot::Sender<()>>,
    version: Version,
    tcp: Io,
    buf: BytesMut,
    /// MQTT filter → the channel or pattern it subscribed. (Small maps, not hash maps:
    /// a client has one or a few, and a hash map's smallest table cost each ~200 bytes.)
    filters: SmallMap<String, String>,
    /// Seconds; 0: no keep-alive.
    keep_alive: u16,
    /// When the client last sent a packet (keep-alive counts from it).
    last_seen: Instant,
    /// Armed only in the last heartbeat interval before keep-alive runs out.
    keep_alive_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether it parks at its next wait or keeps its task (`transports::parking`).
    rhythm: crate::transports::parking::Rhythm,
    /// The client's Topic Alias Maximum (MQTT 5): how many aliases this server may define
    /// for topics it sends; 0: none.
    alias_max: u16,
    /// Keep the session after the connection ends, for this long.
    persist: Option<Duration>,
    /// The QoS granted to each subscribed channel or pattern.
    qos: SmallMap<String, u8>,
    /// Subscribed to `$direct`: registered for direct messages.
    /// (Boxed: rare, and 40 bytes inline would put every connection's state in the
    /// allocator's next size class.)
    direct: Option<Box<crate::registry::ClientRegistration>>,
    /// The window of QoS 1 and 2 publications; for plain TCP, the queue's direct path.
    sink: Arc<Sink>,
    /// Authenticated with the `JWT` method (MQTT 5): may re-authenticate with AUTH.
    jwt_auth: bool,
    /// What only some connections use, allocated while they do.
    rare: Lazy,
}

/// The state of QoS 1 and 2, MQTT 5's options, retained messages, topic aliases and
/// kept sessions: empty for most connections (a QoS 0 subscriber), so not part of every
/// idle connection's memory.
#[derive(Default)]
struct Rare {
    /// QoS 2 packet ids received and acknowledged with PUBREC, awaiting PUBREL.
    qos2: HashSet<u16>,
    aliases: HashMap<u16, String>,
    /// The topic aliases this server defined for the client (MQTT 5): topic → alias.
    aliases_out: HashMap<String, u16>,
    /// Per channel subscribed with a retained publication: the offset up to which what
    /// arrives is that retained publication (sent with the retain flag).
    retained: Vec<(ChannelName, u64)>,
    /// Retained messages sent again for a repeated filter, on their way.
    resent: Vec<std::sync::Arc<switchboard_core::Delivery>>,
    /// `$share/…` filter → this connection's place in the group.
    shared: HashMap<String, super::shared::Membership>,
    /// `$SYS/…` filters subscribed.
    sys: HashMap<String, super::sys::Membership>,
    /// `$presence/…` filters subscribed: the channels whose presence this client watches.
    presence: HashMap<String, super::presence::Watch>,
    /// Where each subscribed channel stands for this client: its subscribe position, then
    /// each publication written — what a persistent session resumes from.
    positions: HashMap<ChannelName, switchboard_core::StreamPosition>,
    /// MQTT 5 subscription identifiers, by the channel or pattern subscribed.
    sub_ids: HashMap<String, u32>,
    /// MQTT 5 No Local: the channels and patterns subscribed without this client's own
    /// publications.
    no_local: HashSet<String>,
    /// MQTT 5 Retain As Published: the channels and patterns subscribed with it.
    rap: HashSet<String>,
    /// This client's latest stored publications (channel, offset), while it has No Local
    /// subscriptions: what they leave out.
    own: std::collections::VecDeque<(ChannelName, u64)>,
    /// From a resumed session: publications that were in flight when it was kept, by
    /// (channel, offset) — sent again with their packet id and DUP (or, for a QoS 2 one
    /// already released, its PUBREL again) as the resume replays them.
    again: HashMap<(ChannelName, u64), (u16, bool)>,
    /// Publications drained from the queue while the window was full, and their bytes.
    held: std::collections::VecDeque<Event>,
    held_bytes: usize,
}

impl Rare {
    fn is_empty(&self) -> bool {
        self.qos2.is_empty()
            && self.aliases.is_empty()
            && self.aliases_out.is_empty()
            && self.retained.is_empty()
            && self.resent.is_empty()
            && self.shared.is_empty()
            && self.sys.is_empty()
            && self.presence.is_empty()
            && self.positions.is_empty()
            && self.sub_ids.is_empty()
            && self.no_local.is_empty()
            && self.rap.is_empty()
            && self.own.is_empty()
            && self.again.is_empty()
            && self.held.is_empty()
            && self.held_bytes == 0
    }
}

/// [`Rare`], allocated on the first change and let go of when empty again
/// ([`Lazy::trim`]); reading it meanwhile reads an empty one.
#[derive(Default)]
struct Lazy(Option<Box<Rare>>);

impl Lazy {
    fn trim(&mut self) {
        if self.0.as_ref().is_some_and(|r| r.is_empty()) {
            self.0 = None;
        }
    }
}

impl std::ops::Deref for Lazy {
    type Target = Rare;
    fn deref(&self) -> &Rare {
        static EMPTY: std::sync::LazyLock<Rare> = std::sync::LazyLock::new(Rare::default);
        self.0.as_deref().unwrap_or(&EMPTY)
    }
}

impl std::ops::DerefMut for Lazy {
    fn deref_mut(&mut self) -> &mut Rare {
        self.0.get_or_insert_with(Default::default)
    }
}

/// The MQTT topic direct messages arrive on (subscribe to it to take them), and the
/// prefix of the topics that send them: `$direct/client/{id}`, `$direct/user/{user}`.
pub const DIRECT_TOPIC: &str = "$direct";

/// A direct message as the PUBLISH (QoS 0) an MQTT client of each version reads:
/// topic `$direct`, payload `{"from","data"}`.
fn direct_v311(json: &[u8]) -> Bytes {
    codec::publish(Version::V311, DIRECT_TOPIC, crate::registry::message_of(json), false)
}
fn direct_v5(json: &[u8]) -> Bytes {
    codec::publish(Version::V5, DIRECT_TOPIC, crate::registry::message_of(json), false)
}

/// What an MQTT connection runs on: TCP, TLS, or a WebSocket's binary messages.
pub type Io = Box<dyn crate::transports::ws::io::Stream>;

/// A plain TCP connection shared by the connection's task (reading, and writing what was
/// queued) and the queue's direct path ([`Sink`], writing from the fan-out).
pub struct SharedTcp(pub Arc<TcpStream>);

impl AsyncRead for SharedTcp {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            match self.0.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // Readiness was stale: `try_read` cleared it, so the next poll waits.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write))
    }
}

/// The QoS 1 and 2 publications on their way to the client (its window), shared by the
/// connection's task and the direct path.
struct Window {
    inflight: std::collections::VecDeque<Inflight>,
    next_packet_id: u16,
    /// `inflight`'s length as last counted in the server's in-flight gauge.
    counted: usize,
}

/// The window, locked; when let go, the server's gauge of publications in flight to MQTT
/// clients follows what changed meanwhile.
struct WindowGuard<'a> {
    window: std::sync::MutexGuard<'a, Window>,
    gauge: &'a std::sync::atomic::AtomicI64,
}

impl std::ops::Deref for WindowGuard<'_> {
    type Target = Window;
    fn deref(&self) -> &Window {
        &self.window
    }
}

impl std::ops::DerefMut for WindowGuard<'_> {
    fn deref_mut(&mut self) -> &mut Window {
        &mut self.window
    }
}

impl Drop for WindowGuard<'_> {
    fn drop(&mut self) {
        let (now, counted) = (self.window.inflight.len(), self.window.counted);
        if now != counted {
            self.gauge.fetch_add(now as i64 - counted as i64, Ordering::Relaxed);
            self.window.counted = now;
        }
    }
}

impl Window {
    /// The next packet id neither in flight nor `busy` (an id a resumed session is
    /// about to send again).
    fn packet_id(&mut self, busy: impl Fn(u16) -> bool) -> u16 {
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if !busy(id) && !self.inflight.iter().any(|f| f.id == id) {
                return id;
            }
        }
    }
}

/// What one event is for the direct path.
enum Prepared {
    /// Nothing goes out for it (presence events, resets, packets over the client's
    /// maximum size): written, as far as the queue is concerned.
    Skip,
    /// These bytes; `true` when it took a place in the window (QoS 1 and 2).
    Send(Bytes, bool),
    /// The client's window is full: the connection's task holds it until there is room.
    Full,
}

/// The connection's side of writing: its window of QoS 1 and 2 publications, and — for
/// MQTT over plain TCP — the queue's direct path: a publication or packet is written to
/// the socket by the task that pushes it, when nothing is queued before it, the socket
/// takes it and the connection's state needs nothing more of its task (`plain`, set by
/// the task): every subscription at one QoS, without subscription identifiers or No
/// Local, no retained message on its way, nothing held back, no session to keep. A QoS 1
/// or 2 publication then takes its packet id and place in the window here, under the
/// window's lock. Otherwise pushes are queued and the task writes them.
struct Sink {
    /// The socket, when the connection is plain TCP (else there is no direct path).
    stream: Option<Arc<TcpStream>>,
    version: Version,
    /// The client's maximum packet size: larger packets are not sent to it.
    max_packet: usize,
    /// The client's receive maximum: QoS 1 and 2 publications it takes incomplete.
    receive_max: usize,
    /// 0: not plain (the task writes everything); else 1 + the QoS of every subscription.
    plain: AtomicU8,
    window: std::sync::Mutex<Window>,
    /// The server's metrics (the window's place in the in-flight gauge).
    metrics: Arc<crate::metrics::Metrics>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        let w = self.window.get_mut().unwrap_or_else(|p| p.into_inner());
        self.metrics.mqtt_inflight.fetch_sub(w.counted as i64, Ordering::Relaxed);
    }
}

impl Sink {
    fn window(&self) -> WindowGuard<'_> {
        WindowGuard {
            window: self.window.lock().unwrap_or_else(|p| p.into_inner()),
            gauge: &self.metrics.mqtt_inflight,
        }
    }

    /// What `event` goes out as at QoS `qos` (the window is locked for QoS 1 and 2).
    fn prepare(&self, event: &Event, qos: u8, window: Option<&mut Window>) -> Prepared {
        let fits = |b: Bytes| if b.len() <= self.max_packet { Prepared::Send(b, false) } else { Prepared::Skip };
        match event {
            Event::Publication(d) if matches!(d.publication.kind, Kind::Join | Kind::Leave) => Prepared::Skip,
            // Expired while it waited (MQTT-3.3.2-5).
            Event::Publication(d) if d.publication.expired_now() => Prepared::Skip,
            Event::Publication(d) => match window {
                Some(w) if qos > 0 => {
                    if w.inflight.len() >= self.receive_max {
                        return Prepared::Full;
                    }
                    let id = w.packet_id(|_| false);
                    let bytes = publish_of(self.version, d, Sending { qos, packet_id: id, ..Sending::default() });
                    if bytes.len() > self.max_packet {
                        return Prepared::Skip;
                    }
                    // (No position to confirm: a plain connection keeps no session.)
                    w.inflight.push_back(Inflight { id, qos, released: false, confirms: None });
                    Prepared::Send(bytes, true)
                }
                _ => fits(shared(self.version, d)),
            },
            Event::Frame(b) => fits(b.clone()),
            Event::Reset { .. } => Prepared::Skip,
        }
    }

    /// The socket and the QoS, while the direct path may write.
    fn plain(&self) -> Option<(&TcpStream, u8)> {
        let plain = self.plain.load(Ordering::Acquire);
        self.stream.as_deref().filter(|_| plain > 0).map(|s| (s, plain - 1))
    }
}

impl DirectWrite for Sink {
    fn try_write(&self, event: &Event) -> Written {
        let Some((stream, qos)) = self.plain() else { return Written::Blocked };
        let mut window = (qos > 0 && matches!(event, Event::Publication(_))).then(|| self.window());
        let (bytes, took) = match self.prepare(event, qos, window.as_deref_mut()) {
            Prepared::Skip => return Written::All,
            Prepared::Full => return Written::Blocked,
            Prepared::Send(b, took) => (b, took),
        };
        let (written, _) = crate::transports::send_direct(stream, &bytes);
        if took && matches!(written, Written::Blocked | Written::Failed) {
            // Not sent: it leaves the window (queued, the task sends it with an id of its own).
            window.as_deref_mut().and_then(|w| w.inflight.pop_back());
        }
        written
    }

    fn try_write_many(&self, events: &[Event]) -> Result<(usize, Option<Bytes>), Broken> {
        const MAX_IOV: usize = 256;
        let Some((stream, qos)) = self.plain() else { return Ok((0, None)) };
        let mut window = (qos > 0).then(|| self.window());
        // (event index, its bytes, whether it took a place in the window) for what is
        // sent; what is skipped counts as written.
        let mut frames: Vec<(usize, Bytes, bool)> = Vec::with_capacity(events.len().min(MAX_IOV));
        let mut considered = events.len();
        for (i, e) in events.iter().enumerate() {
            if frames.len() == MAX_IOV {
                considered = i;
                break;
            }
            match self.prepare(e, qos, window.as_deref_mut()) {
                Prepared::Skip => {}
                Prepared::Send(b, took) => frames.push((i, b, took)),
                Prepared::Full => {
                    considered = i;
                    break;
                }
            }
        }
        // Frames from `from` on were not sent at all: their places in the window go.
        let unsend = |window: &mut Option<WindowGuard<'_>>, from: usize| {
            let n = frames[from..].iter().filter(|f| f.2).count();
            if let Some(w) = window.as_deref_mut() {
                let keep = w.inflight.len() - n;
                w.inflight.truncate(keep);
            }
        };
        if frames.is_empty() {
            return Ok((considered, None));
        }
        match crate::transports::send_direct_many(stream, &frames, |f| &f.1) {
            Ok((whole, _, _)) if whole == frames.len() => Ok((considered, None)),
            Ok((whole, rest, _)) => {
                unsend(&mut window, whole + usize::from(rest.is_some()));
                Ok((frames[whole].0, rest))
            }
            Err(e) => {
                unsend(&mut window, 0);
                match e.kind() {
                    std::io::ErrorKind::WouldBlock => Ok((frames[0].0, None)),
                    _ => Err(Broken),
                }
            }
        }
    }
}

/// Serves a connection accepted on the MQTT listener (`tls`: the MQTT-over-TLS one)
/// until it ends.
pub fn serve_accepted(
    tcp: TcpStream,
    tls: bool,
    state: AppState,
    peer: SocketAddr,
    slot: impl Send + 'static,
) -> impl std::future::Future<Output = ()> + Send {
    let tracked = state.track_upgraded();
    let starting = Box::pin(async move {
        let (io, direct): (Io, _) = match (tls, state.tls.clone()) {
            (true, Some(t)) => match crate::listener::tls_handshake(tcp, &t, &state, peer).await {
                Some(s) => (Box::new(s), None),
                None => return (None, state),
            },
            _ => {
                let tcp = Arc::new(tcp);
                (Box::new(SharedTcp(tcp.clone())), Some(tcp))
            }
        };
        (start(io, &state, peer, direct).await, state)
    });
    serve_started(starting, tracked, slot)
}

/// Serves an accepted MQTT connection until it ends. `direct`: the plain TCP socket
/// under `tcp`, for writing from the fan-out.
pub fn serve(
    tcp: Io,
    state: AppState,
    peer: SocketAddr,
    slot: impl Send + 'static,
    direct: Option<Arc<TcpStream>>,
) -> impl std::future::Future<Output = ()> + Send {
    let tracked = state.track_upgraded();
    let starting = Box::pin(async move { (start(tcp, &state, peer, direct).await, state) });
    serve_started(starting, tracked, slot)
}

/// The connection's start: CONNECT read and answered, or `None`.
type Starting = Pin<
    Box<dyn std::future::Future<Output = (Option<(Box<Accepted>, crate::metrics::ConnectionGauge)>, AppState)> + Send>,
>;

/// The connection, once `starting` has accepted it. One-off work is boxed — the
/// handshake and CONNECT in `starting` with what only they need (the socket, the peer's
/// address), resuming a session, packet handling, the goodbye: its state must not sit in
/// every idle connection's future.
async fn serve_started<S: Send + 'static>(starting: Starting, tracked: crate::app::UpgradedGuard, slot: S) {
    let (Some((mut conn, gauge)), state) = starting.await else { return };
    let closes = crate::transports::CloseOnDrop(conn.c.session.queue.clone());
    // Beats for presence, the kept session and keep-alive; the close at shutdown.
    crate::heartbeat::Heartbeats::join(&state, &conn.c.session.queue);
    if conn.c.sink.stream.is_some() {
        conn.c.session.queue.set_direct(conn.c.sink.clone());
    }
    if let Some(kept) = conn.resumed.take() {
        if let Some(end) = Box::pin(conn.c.resume(*kept)).await {
            return Box::pin(finish(conn, end, state)).await;
        }
    }
    crate::transports::parking::drive(Held {
        conn,
        state,
        _gauge: gauge,
        _closes: closes,
        _tracked: tracked,
        _slot: slot,
    })
    .await
}

/// Everything an accepted connection holds, between its tasks.
struct Held<S> {
    conn: Box<Accepted>,
    state: AppState,
    _gauge: crate::metrics::ConnectionGauge,
    _closes: crate::transports::CloseOnDrop,
    _tracked: crate::app::UpgradedGuard,
    _slot: S,
}

impl<S: Send + 'static> crate::transports::parking::Park for Held<S> {
    const TRANSPORT: crate::metrics::Transport = crate::metrics::Transport::Mqtt;
    type Ended = End;
    fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.state.metrics
    }
    fn run<'a>(&'a mut self, park: &'a std::task::Waker) -> impl std::future::Future<Output = Option<End>> + Send + 'a {
        self.conn.c.run(park)
    }
    async fn finish(self, end: End) {
        // (What else it holds — its gauges, its slot — goes after the goodbye.)
        let Held { conn, state, .. } = self;
        Box::pin(finish(conn, end, state)).await
    }
}

/// Says goodbye as `end` calls for, leaves, and publishes the will if it is due.
async fn finish(mut conn: Box<Accepted>, end: End, state: AppState) {
    let version = conn.c.version;
    let will = conn.will_allowed.take();
    let publish_will = matches!(end, End::Lost | End::Client(0x04) | End::Protocol(..));
    conn.c.goodbye(&end).await;
    conn.c.session.leave_all();
    if let (true, Some(w)) = (publish_will, will) {
        let (will, resolved) = *w;
        let state = state.clone();
        let (client_id, queue) = (conn.c.client_id().to_string(), std::sync::Arc::downgrade(&conn.c.session.queue));
        let (will_client, will_user) = (conn.c.session.client.clone(), conn.c.session.user().map(str::to_string));
        // (The will's delay runs after the connection is gone: no session outlives it.)
        tokio::spawn(async move {
            if will.delay_secs > 0 {
                tokio::time::sleep(Duration::from_secs(will.delay_secs.min(86_400) as u64)).await;
                // A new connection for the client id within the delay: no will
                // (MQTT-3.1.3-9).
                if state.mqtt_clients.replaced(&client_id, &queue) {
                    return;
                }
            }
            if let Some(data) = super::data_of(&will.payload) {
                let by = ops::Publisher::Client { client: Some(&will_client), user: will_user.as_deref() };
                if let Err(e) = ops::publish_to(&state, &resolved, data, None, None, by, will.meta.as_deref()).await {
                    tracing::debug!("MQTT will not published: {}", e.message);
                }
            }
        });
    }
    tracing::debug!(client = %conn.c.client_id(), ?version, "MQTT connection closed");
}

/// Reads the CONNECT packet and answers it: the accepted connection and its place in the
/// connections gauge.
async fn start(
    mut tcp: Io,
    state: &AppState,
    peer: SocketAddr,
    direct: Option<Arc<TcpStream>>,
) -> Option<(Box<Accepted>, crate::metrics::ConnectionGauge)> {
    let max_packet = state.config.mqtt.max_packet_bytes;
    let mut buf = BytesMut::with_capacity(512);
    let connect = match tokio::time::timeout(CONNECT_TIMEOUT, read_connect(&mut tcp, &mut buf, max_packet)).await {
        Ok(Ok(c)) => c,
        Ok(Err(Some((version, e)))) => {
            tracing::debug!(%peer, "MQTT CONNECT refused: {}", e.message());
            let code = e.reason_code();
            let message = e.message();
            let props = server_props(state, None, None, Some(&message));
            let _ = send_now(&mut tcp, &codec::connack(version, false, code, &props)).await;
            return None;
        }
        Ok(Err(None)) | Err(_) => return None,
    };
    let gauge = state.metrics.connection(crate::metrics::Transport::Mqtt);
    let conn = accept(tcp, buf, state, *connect, direct).await?;
    Some((Box::new(conn), gauge))
}

/// Reads the CONNECT packet. `Err(Some)`: a CONNECT-level error to answer with CONNACK;
/// `Err(None)`: nothing worth answering (not MQTT, or gone).
async fn read_connect(
    tcp: &mut Io,
    buf: &mut BytesMut,
    max_packet: usize,
) -> Result<Box<Connect>, Option<(Version, codec::Error)>> {
    loop {
        match codec::decode(buf, None, max_packet) {
            Ok(Some((Packet::Connect(c), n))) => {
                let _ = buf.split_to(n);
                return Ok(c);
            }
            Ok(Some(_)) => return Err(None),
            Ok(None) => {}
            // A CONNECT naming a level we do not speak gets a 3.1.1-shaped answer (MQTT
            // 3.1.1 §3.1.2.2); other garbage, none.
            Err(e @ codec::Error::UnsupportedVersion(_)) => return Err(Some((Version::V311, e))),
            // An MQTT 5 CONNECT (its level byte after the fixed header and the name
            // "MQTT") with an error gets a CONNACK saying which.
            Err(e) if level_of(buf) == Some(5) => return Err(Some((Version::V5, e))),
            Err(_) => return Err(None),
        }
        match tcp.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(None),
            Ok(_) => {}
        }
    }
}

/// The protocol level byte of a CONNECT at the front of `buf`, if there is one.
fn level_of(buf: &[u8]) -> Option<u8> {
    let n = buf.iter().skip(1).take(4).position(|b| b & 0x80 == 0)? + 1;
    (buf.get(1 + n..1 + n + 6)? == b"\0\x04MQTT").then(|| buf.get(1 + n + 6).copied())?
}

fn server_props<'a>(
    state: &AppState,
    assigned: Option<&'a str>,
    keep_alive: Option<u16>,
    reason: Option<&'a str>,
) -> codec::ServerProps<'a> {
    codec::ServerProps {
        assigned_client_id: assigned,
        keep_alive,
        receive_maximum: RECEIVE_MAXIMUM,
        maximum_packet_size: state.config.mqtt.max_packet_bytes as u32,
        reason,
        topic_alias_maximum: TOPIC_ALIASES,
        session_expiry_override: None,
        auth_method: None,
    }
}

/// A connection past CONNACK, with its will (already authorized) if it has one.
struct Accepted {
    c: Conn,
    // (Boxed, as `resumed`: the accepted connection lives as long as it does.)
    will_allowed: Option<Box<(codec::Will, crate::session::Resolved)>>,
    /// The kept session this connection resumes.
    resumed: Option<Box<super::sessions::Kept>>,
}

/// Checks a CONNECT — credentials, client id, will — and answers it.
async fn accept(
    mut tcp: Io,
    buf: BytesMut,
    state: &AppState,
    connect: Connect,
    direct: Option<Arc<TcpStream>>,
) -> Option<Accepted> {
    let version = connect.version;
    let refuse = |code: u8, why: String| {
        let props = server_props(state, None, None, Some(&why));
        codec::connack(version, false, code, &props)
    };
    if state.is_draining() {
        let _ =
            send_now(&mut tcp, &refuse(0x89, "server_busy: this node is draining; connect to another".into())).await;
        return None;
    }
    if let Err(e) = state.limits.take_handshake() {
        let _ = send_now(&mut tcp, &refuse(0x89, format!("{}: {}", e.code.as_str(), e.message))).await;
        return None;
    }
    // The connection token travels as the password (the user name is free: MQTT
    // clients want one).
    // Or, MQTT 5's enhanced authentication with the method `JWT`: the token as the
    // authentication data — which lets the client re-authenticate (AUTH) with a new one.
    let jwt_auth = match connect.auth_method.as_deref() {
        None => false,
        Some(AUTH_METHOD) => true,
        Some(other) => {
            let why = format!("bad_authentication_method: {other:?} is not supported; use {AUTH_METHOD:?}");
            let _ = send_now(&mut tcp, &refuse(0x8C, why)).await;
            return None;
        }
    };
    let credential = if jwt_auth { connect.auth_data.as_ref() } else { connect.password.as_ref() };
    // A device configured with a user name and password (`[[mqtt.users]]`) is that user,
    // allowed what its entry says; any other user name leaves the password a token.
    let device = match (jwt_auth, connect.username.as_deref()) {
        (false, Some(name)) => state.config.mqtt.users.iter().find(|u| u.name == name),
        _ => None,
    };
    if let Some(d) = device {
        if !credential.is_some_and(|p| d.password_matches(p)) {
            state.metrics.error(Code::TokenInvalid.as_str());
            let why = format!("token_invalid: not the password of the configured user {:?}", d.name);
            let _ = send_now(&mut tcp, &refuse(0x86, why)).await;
            return None;
        }
    }
    let identity = match credential {
        _ if device.is_some() => device.map(|d| crate::auth::Identity {
            user: d.name.clone(),
            exp: u64::MAX / 1000, // (no expiry)
            channels: d.channels.clone(),
            info: d.info.clone(),
            jti: None,
            direct: false,
        }),
        None if jwt_auth => {
            let why = "token_required: the JWT authentication method needs the token as its data".to_string();
            let _ = send_now(&mut tcp, &refuse(0x87, why)).await;
            return None;
        }
        None => None,
        Some(p) => {
            let verified = std::str::from_utf8(p)
                .map_err(|_| ApiError::new(Code::TokenInvalid, "the token is not UTF-8"))
                .and_then(|t| crate::transports::verify(state, t));
            match verified {
                Ok(who) => Some(who),
                Err(e) => {
                    state.metrics.error(e.code.as_str());
                    let code = if e.code == Code::TokenRevoked { 0x8A } else { 0x86 };
                    let _ = send_now(&mut tcp, &refuse(code, format!("{}: {}", e.code.as_str(), e.message))).await;
                    return None;
                }
            }
        }
    };
    let (client_id, assigned) = if connect.client_id.is_empty() {
        if version == Version::V311 && !connect.clean_start {
            let _ =
                send_now(&mut tcp, &refuse(0x85, "invalid_request: an empty client id needs a clean session".into()))
                    .await;
            return None;
        }
        let id = format!("sb-{}", crate::presence::client_id());
        (id.clone(), Some(id))
    } else {
        (connect.client_id.clone(), None)
    };
    let queue = state.hub.queue(state.config.defaults.queue_max_bytes);
    let mut session = Session::<MqttWire>::new(state.clone(), queue);
    // Its client id for presence and direct messages: the MQTT client identifier, which
    // a device keeps across connections (`mqtt:` keeps it apart from generated ids).
    session.client = format!("mqtt:{client_id}");
    match (identity, connect.username.as_deref().filter(|u| !u.is_empty())) {
        (Some(who), _) => session.set_identity(who),
        // Anonymous with a user name: what it says it is, shown as such in presence.
        (None, Some(name)) => session.claim(serde_json::json!({ "username": name })),
        (None, None) => {}
    }
    session.opened();
    // The will is a publication like any other: authorized now, not when it fires.
    let will_allowed = match connect.will {
        None => None,
        Some(w) => {
            let r = super::channel_of(state, &w.topic)
                .map_err(|why| ApiError::new(Code::InvalidChannel, why))
                .and_then(|ch| session.gated(Operation::Publish, &ch, None));
            match r {
                Ok(resolved) => Some((w, resolved)),
                Err(e) => {
                    let code = if e.code.as_str().contains("channel") { 0x90 } else { 0x87 };
                    let _ =
                        send_now(&mut tcp, &refuse(code, format!("{}: will: {}", e.code.as_str(), e.message))).await;
                    return None;
                }
            }
        }
    };
    // Persistent sessions: 3.1.1's clean session 0 keeps one (for `mqtt.session_expiry_secs`),
    // MQTT 5's session expiry interval says for how long (at most that). Clean start
    // discards what was kept.
    let max_expiry = state.config.mqtt.session_expiry_secs;
    let (persist, granted) = match version {
        Version::V311 => ((!connect.clean_start).then_some(max_expiry), None),
        Version::V5 => {
            let asked = connect.session_expiry as u64;
            let granted = asked.min(max_expiry);
            ((granted > 0).then_some(granted), (granted != asked).then_some(granted as u32))
        }
    };
    // A new connection with a client id takes the id over (MQTT-3.1.4-2): the old one
    // is closed, and keeps its session as it ends — which this one waits for (bounded),
    // so it resumes the session as the old connection left it. (Only a connection that
    // keeps a session is waited for — one without has nothing to leave behind — so only
    // such a connection makes the channel it tells its end on.)
    let (ended, ended_rx) = match persist {
        Some(_) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    if let Some(old) = state.mqtt_clients.take_over(&client_id, &session.queue, ended_rx) {
        // (Sent, or dropped by a connection that ended without a word: done either way.)
        let _ = tokio::time::timeout(TAKE_OVER_WAIT, old).await;
    }
    let resumed = if connect.clean_start {
        state.mqtt_sessions.discard(&client_id).await;
        None
    } else {
        state.mqtt_sessions.take(&client_id).await
    };
    let mut props = server_props(state, assigned.as_deref(), None, None);
    props.session_expiry_override = granted;
    props.auth_method = jwt_auth.then_some(AUTH_METHOD);
    if send_now(&mut tcp, &codec::connack(version, resumed.is_some(), 0, &props)).await.is_err() {
        return None;
    }
    tracing::debug!(client = %client_id, ?version, "MQTT connected");
    let max_packet = connect.maximum_packet_size.map_or(usize::MAX, |m| m as usize);
    let sink = Arc::new(Sink {
        stream: direct,
        version,
        max_packet,
        receive_max: match version {
            Version::V5 => connect.receive_maximum.max(1) as usize,
            Version::V311 => OUTGOING_WINDOW_V311,
        },
        plain: AtomicU8::new(0),
        window: std::sync::Mutex::new(Window { inflight: Default::default(), next_packet_id: 1, counted: 0 }),
        metrics: state.metrics.clone(),
    });
    Some(Accepted {
        c: Conn {
            ended,
            session,
            version,
            tcp,
            buf,
            filters: SmallMap::default(),
            keep_alive: connect.keep_alive,
            last_seen: Instant::now(),
            keep_alive_timer: None,
            rhythm: Default::default(),
            alias_max: if version == Version::V5 { connect.topic_alias_maximum } else { 0 },
            persist: persist.map(Duration::from_secs),
            qos: SmallMap::default(),
            direct: None,
            sink,
            jwt_auth,
            rare: Lazy::default(),
        },
        will_allowed: will_allowed.map(Box::new),
        resumed: resumed.map(Box::new),
    })
}

impl Conn {
    /// The MQTT client id, read from the session's client name (`mqtt:` and the id), so
    /// the connection keeps one copy of it, not two.
    fn client_id(&self) -> &str {
        let c = &self.session.client;
        c.strip_prefix("mqtt:").unwrap_or(c)
    }

    /// Serves the connection until it ends (`Some`) or has nothing to do (`None`): then
    /// what it waits on — its socket, its queue, its timers — has been polled with
    /// `park`, which wakes it.
    async fn run(&mut self, park: &std::task::Waker) -> Option<End> {
        let keep_alive = Duration::from_secs(self.keep_alive as u64);
        // MQTT 3.1.2.10: one and a half keep-alive periods of silence end the connection.
        let allowed = keep_alive + keep_alive / 2;
        let server_max = self.session.state.config.mqtt.max_packet_bytes;
        // The server's heartbeat wheel (crate::heartbeat) beats once per ping interval:
        // presence is refreshed, the session saved and keep-alive checked then. Only in
        // the last interval before keep-alive runs out does the connection arm a timer of
        // its own (so a client with a keep-alive shorter than the interval keeps one).
        let interval = Duration::from_secs(self.session.state.config.ws.ping_interval_secs.max(1));
        self.rhythm.started();
        loop {
            // Packets already buffered first.
            loop {
                // (The packet is taken out of the decoder's result before the await: the
                // result's other variants must not sit in the state.)
                let p = match codec::decode(&self.buf, Some(self.version), server_max) {
                    Ok(Some((p, n))) => {
                        let _ = self.buf.split_to(n);
                        p
                    }
                    Ok(None) => break,
                    Err(e) => return Some(End::Protocol(e.reason_code(), e.message())),
                };
                self.last_seen = Instant::now();
                if let Some(end) = Box::pin(self.packet(p)).await {
                    return Some(end);
                }
            }
            if self.buf.is_empty() && self.buf.capacity() > 0 {
                // Nothing partial: an idle connection holds no read buffer.
                self.buf = BytesMut::new();
            }
            // (Boxed, as the rest of the occasional work: an idle connection's state
            // holds only what it waits on.) At shutdown the wheel closes the queue: this
            // then says goodbye.
            if let Err(end) = Box::pin(self.write_queued()).await {
                return Some(end);
            }
            self.rare.trim();
            self.set_plain(self.plain_qos());
            let expires = (!keep_alive.is_zero()).then(|| self.last_seen + allowed);
            if self.session.queue.take_beat() {
                self.rhythm.beat();
                Box::pin(self.session.refresh_presence()).await;
                // A persistent session is saved now and then while connected, so a node
                // that dies without closing still leaves it (positions at most one
                // interval old: what follows them comes again, at least once).
                Box::pin(self.keep_session()).await;
            }
            match expires {
                Some(e) if Instant::now() >= e => {
                    // A stall of this process must not count against the client: what
                    // its socket already holds is a sign of life.
                    let (io, buf) = (&mut self.tcp, &mut self.buf);
                    let got = std::future::poll_fn(|cx| Poll::Ready(poll_read_some(io, buf, cx))).await;
                    match got {
                        Poll::Ready(Ok(n)) if n > 0 => continue,
                        _ => return Some(End::Lost),
                    }
                }
                Some(e) if e <= Instant::now() + interval => match self.keep_alive_timer.as_mut() {
                    Some(t) => t.as_mut().reset(e),
                    None => self.keep_alive_timer = Some(Box::pin(tokio::time::sleep_until(e))),
                },
                _ => self.keep_alive_timer = None,
            }
            // Everything it waits on is polled once with `park` as the waker: nothing
            // ready, and the connection parks (its task ends) until one of them wakes it.
            // A busy one waits in its task.
            let woke = if self.rhythm.parks() {
                match self.poll_wait(&mut Context::from_waker(park)) {
                    Poll::Ready(w) => w,
                    Poll::Pending => {
                        self.rhythm.parked();
                        return None;
                    }
                }
            } else {
                let began = Instant::now();
                let w = std::future::poll_fn(|cx| self.poll_wait(cx)).await;
                self.rhythm.waited(began);
                w
            };
            if let Some(Ok(0) | Err(_)) = woke.read {
                return Some(End::Lost);
            }
            if woke.token_expired {
                self.session.timer = None;
                self.session.queue.close(CloseReason::TokenExpired);
            }
            // (A keep-alive timer that fired is read at the top: `expires` has passed.)
        }
    }

    /// What ended the wait, if anything has: a read, the queue, keep-alive, the token.
    fn poll_wait(&mut self, cx: &mut Context<'_>) -> Poll<Woke> {
        let mut w = Woke::default();
        if let Poll::Ready(r) = poll_read_some(&mut self.tcp, &mut self.buf, cx) {
            w.read = Some(r);
        }
        w.changed = self.session.queue.poll_changed(cx).is_ready();
        if let Some(t) = self.keep_alive_timer.as_mut() {
            w.keep_alive = std::future::Future::poll(t.as_mut(), cx).is_ready();
        }
        if let Some(t) = self.session.timer.as_mut() {
            w.token_expired = std::future::Future::poll(t.as_mut(), cx).is_ready();
        }
        if w.read.is_some() || w.changed || w.keep_alive || w.token_expired {
            Poll::Ready(w)
        } else {
            Poll::Pending
        }
    }

    /// Writes what the queue holds: publications as PUBLISH packets, acknowledgements
    /// as they were queued (in order with the publications). `Err` when it is over.
    async fn write_queued(&mut self) -> Result<(), End> {
        let mut batch = Vec::new();
        let closed = self.session.queue.drain_into(&mut batch).err();
        let drained = !batch.is_empty();
        // (Taken out of `rare` only when there: most connections hold nothing back.)
        let (mut held, mut held_bytes) = match self.rare.held.is_empty() {
            true => (std::collections::VecDeque::new(), 0),
            false => (std::mem::take(&mut self.rare.held), std::mem::take(&mut self.rare.held_bytes)),
        };
        for e in batch {
            if let Event::Publication(d) = &e {
                held_bytes += d.json().len();
            }
            held.push_back(e);
        }
        let mut out = Vec::new();
        let mut waiting = std::collections::VecDeque::new();
        while let Some(e) = held.pop_front() {
            match e {
                Event::Publication(ref d) if matches!(d.publication.kind, Kind::Join | Kind::Leave) => {
                    held_bytes -= d.json().len();
                }
                Event::Publication(ref d) if self.is_own(d) || d.publication.expired_now() => {
                    // No Local: the client's own publication stays here; an expired one
                    // is not sent (MQTT-3.3.2-5), nor again. The session's position
                    // moves past a stored one all the same (a volatile one has none).
                    held_bytes -= d.json().len();
                    self.take_retained(d);
                    if d.publication.is_stored() {
                        if !self.rare.again.is_empty() {
                            self.rare.again.remove(&(d.publication.channel.clone(), d.publication.offset));
                        }
                        self.advance(&d.publication.channel, d.publication.position());
                    }
                }
                Event::Publication(ref d) => {
                    let qos = self.qos_for(&d.publication.channel);
                    if qos >= 1 && (self.sink.window().inflight.len() >= self.sink.receive_max || !waiting.is_empty()) {
                        // The client's window is full: it waits here, in order.
                        waiting.push_back(e);
                        continue;
                    }
                    held_bytes -= d.json().len();
                    // The retain flag: set on a channel's retained message sent for a
                    // subscription, and — with Retain As Published — on a publication
                    // published with it.
                    let for_subscribing = self.take_retained(d);
                    if for_subscribing {
                        self.session.state.metrics.mqtt_retained_sent.fetch_add(1, Ordering::Relaxed);
                    }
                    let retained = for_subscribing || self.as_published(d);
                    let alias = self.alias_for(&d.publication.channel);
                    let stored = d.publication.kind == Kind::Stored;
                    let p = if qos >= 1 {
                        let confirms = stored.then(|| (d.publication.channel.clone(), d.publication.position()));
                        let key = (d.publication.channel.clone(), d.publication.offset);
                        match self.rare.again.remove(&key) {
                            // Released before the session was kept: only PUBCOMP is missing.
                            Some((id, true)) => {
                                self.sink.window().inflight.push_back(Inflight {
                                    id,
                                    qos: 2,
                                    released: true,
                                    confirms,
                                });
                                codec::ack(self.version, 6, id, 0, "")
                            }
                            again => {
                                let (id, dup) = match again {
                                    Some((id, _)) => (id, true),
                                    None => (self.packet_id(), false),
                                };
                                self.sink.window().inflight.push_back(Inflight { id, qos, released: false, confirms });
                                let ids = self.ids_for(&d.publication.channel);
                                let s = Sending { qos, packet_id: id, retain: retained, dup, ids: &ids, alias };
                                publish_of(self.version, d, s)
                            }
                        }
                    } else {
                        if stored {
                            self.advance(&d.publication.channel, d.publication.position());
                        }
                        let ids = self.ids_for(&d.publication.channel);
                        if retained || !ids.is_empty() || alias.is_some() {
                            let s = Sending { retain: retained, ids: &ids, alias, ..Sending::default() };
                            publish_of(self.version, d, s)
                        } else {
                            shared(self.version, d)
                        }
                    };
                    if p.len() <= self.sink.max_packet {
                        out.push(p);
                    } else {
                        if qos >= 1 {
                            // Never sent (over the client's maximum packet size): it must not
                            // keep a place in the window, which no acknowledgement would free.
                            self.sink.window().inflight.pop_back();
                        }
                        if let Some((_, true)) = alias {
                            // Nor does the alias it would have defined exist.
                            self.rare.aliases_out.remove(&super::topic_of(&d.publication.channel));
                        }
                    }
                }
                // Acknowledgements, pings and direct messages never wait behind the
                // window. (A direct message over the client's maximum packet size is dropped.)
                Event::Frame(b) if b.len() <= self.sink.max_packet => out.push(b),
                Event::Frame(_) => {}
                Event::Reset { .. } => {}
            }
        }
        if !waiting.is_empty() {
            self.rare.held = waiting;
            self.rare.held_bytes = held_bytes;
        }
        for b in &out {
            if self.tcp.write_all(b).await.is_err() {
                return Err(End::Lost);
            }
        }
        // TLS and WebSocket streams hold what the socket did not take yet: push it out.
        if !out.is_empty() && self.tcp.flush().await.is_err() {
            return Err(End::Lost);
        }
        if drained {
            self.session.queue.write_done();
        }
        // What waits for the window counts against the same bound as the queue.
        if held_bytes > self.session.queue.max_bytes() {
            return Err(End::Server(CloseReason::SlowConsumer));
        }
        match closed {
            Some(reason) => Err(End::Server(reason)),
            None => Ok(()),
        }
    }

    /// The QoS of every subscription when this connection's publications need nothing
    /// of its task — the direct path may write them (see [`Sink`]); `None` otherwise.
    fn plain_qos(&self) -> Option<u8> {
        let plain = self.persist.is_none()
            && self.alias_max == 0
            && self.rare.held.is_empty()
            && self.rare.again.is_empty()
            && self.rare.retained.is_empty()
            && self.rare.resent.is_empty()
            && self.rare.sub_ids.is_empty()
            && self.rare.no_local.is_empty()
            && self.rare.rap.is_empty();
        let mut qos = self.qos.values();
        let first = qos.next().copied().unwrap_or(0);
        (plain && qos.all(|q| *q == first)).then_some(first)
    }

    fn set_plain(&self, qos: Option<u8>) {
        self.sink.plain.store(qos.map_or(0, |q| q + 1), Ordering::Release);
    }

    /// The next packet id not in flight (nor waiting to be sent again).
    fn packet_id(&mut self) -> u16 {
        let again = &self.rare.again;
        self.sink.window().packet_id(|id| again.values().any(|(a, _)| *a == id))
    }

    /// The QoS a publication on `channel` goes out with: its channel subscription's, else
    /// the highest of the patterns'.
    fn qos_for(&self, channel: &ChannelName) -> u8 {
        match self.qos.get(channel.as_str()) {
            Some(q) => *q,
            None => self
                .qos
                .iter()
                .filter(|(name, _)| switchboard_core::pattern::is_pattern(name))
                .map(|(_, q)| *q)
                .max()
                .unwrap_or(0),
        }
    }

    /// The identifiers of the subscriptions a publication on `channel` matches (MQTT 5).
    fn ids_for(&self, channel: &ChannelName) -> Vec<u32> {
        if self.rare.sub_ids.is_empty() {
            return Vec::new();
        }
        let mut ids: Vec<u32> =
            self.rare.sub_ids.iter().filter(|(name, _)| covers(name, channel)).map(|(_, id)| *id).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Whether `d` is this client's own publication and every subscription it matches
    /// asked for No Local (MQTT 5).
    fn is_own(&self, d: &switchboard_core::Delivery) -> bool {
        let p = &d.publication;
        !self.rare.no_local.is_empty()
            && p.is_stored()
            && self.rare.own.iter().any(|(c, o)| *o == p.offset && *c == p.channel)
            && self.qos.keys().filter(|name| covers(name, &p.channel)).all(|name| self.rare.no_local.contains(name))
    }

    /// PUBREC for an outgoing QoS 2 publication: PUBREL, and it waits for PUBCOMP.
    fn received(&mut self, id: u16) {
        // (The window's lock is let go of before the queue's is taken: the direct path
        // takes them the other way round.)
        let found =
            self.sink.window().inflight.iter_mut().find(|f| f.id == id && f.qos == 2).map(|f| f.released = true);
        if found.is_some() {
            self.send(codec::ack(self.version, 6, id, 0, ""));
        }
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2): the publication leaves the window, and the
    /// session's position on its channel moves past it.
    fn acked(&mut self, id: u16, qos: u8) {
        let f = {
            let mut w = self.sink.window();
            w.inflight.iter().position(|f| f.id == id && f.qos == qos).and_then(|i| w.inflight.remove(i))
        };
        let Some(f) = f else { return };
        if let Some((channel, position)) = f.confirms {
            self.advance(&channel, position);
        }
    }

    /// The session's position on `channel` moves to `position` — forward only (a
    /// retained message sent again is behind it), or into a new epoch.
    fn advance(&mut self, channel: &ChannelName, position: switchboard_core::StreamPosition) {
        if self.rare.positions.is_empty() {
            return; // (no session is kept: nothing to move)
        }
        if let Some(p) = self.rare.positions.get_mut(channel) {
            if p.epoch != position.epoch || p.offset < position.offset {
                *p = position;
            }
        }
    }

    /// The topic alias a publication on `channel` goes out with (MQTT 5, to a client that
    /// takes them): its topic's alias once it has one — the first `alias_max` topics sent
    /// get one each, defined by the PUBLISH that first carries it (the topic and the
    /// alias) — else none, and the topic goes whole.
    fn alias_for(&mut self, channel: &ChannelName) -> Option<(u16, bool)> {
        if self.alias_max == 0 {
            return None;
        }
        let topic = super::topic_of(channel);
        if let Some(a) = self.rare.aliases_out.get(&topic) {
            return Some((*a, false));
        }
        let defined = self.rare.aliases_out.len();
        if defined >= self.alias_max as usize {
            return None;
        }
        let alias = defined as u16 + 1;
        self.rare.aliases_out.insert(topic, alias);
        Some((alias, true))
    }

    /// Whether `d` was published with the retain flag and a subscription it matches asked
    /// for Retain As Published (MQTT 5).
    fn as_published(&self, d: &switchboard_core::Delivery) -> bool {
        !self.rare.rap.is_empty()
            && d.publication.meta.as_ref().is_some_and(|m| m.retain)
            && self.rare.rap.iter().any(|name| covers(name, &d.publication.channel))
    }

    /// Whether `d` is the retained publication of a channel just subscribed to.
    fn take_retained(&mut self, d: &switchboard_core::Delivery) -> bool {
        if let Some(i) = self.rare.resent.iter().position(|r| std::ptr::eq(&**r, d)) {
            self.rare.resent.swap_remove(i);
            return true;
        }
        let ch = &d.publication.channel;
        match self.rare.retained.iter().position(|(c, _)| c == ch) {
            Some(i) => {
                let upto = self.rare.retained[i].1;
                if d.publication.offset >= upto {
                    self.rare.retained.swap_remove(i);
                }
                d.publication.offset <= upto
            }
            None => false,
        }
    }

    fn send(&self, packet: Bytes) {
        // In the queue, so acknowledgements keep their place among publications.
        let _ = self.session.queue.push(Event::Frame(packet));
    }

    /// Handles one packet; `Some` ends the connection.
    async fn packet(&mut self, p: Packet) -> Option<End> {
        let v = self.version;
        // PUBLISH, SUBSCRIBE and UNSUBSCRIBE count against the command rate, as the
        // WebSocket's commands do; past it they are refused (0x96), and a client that
        // keeps on is closed.
        if matches!(p, Packet::Publish(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_)) {
            if let Err(flood) = self.session.take_command() {
                self.session.state.metrics.error(Code::RateLimited.as_str());
                if flood || v == Version::V311 {
                    return Some(End::Protocol(0x96, "rate_limited: message rate too high".into()));
                }
                let why = "rate_limited: too many packets; slow down";
                match p {
                    Packet::Publish(codec::Publish { qos: 1, packet_id: Some(id), .. }) => {
                        self.send(codec::ack(v, 4, id, 0x96, why))
                    }
                    Packet::Publish(codec::Publish { qos: 2, packet_id: Some(id), .. }) => {
                        self.send(codec::ack(v, 5, id, 0x96, why))
                    }
                    Packet::Subscribe(s) => {
                        self.send(codec::sub_ack(v, 9, s.packet_id, &vec![0x96; s.filters.len()], why))
                    }
                    Packet::Unsubscribe(u) => {
                        self.send(codec::sub_ack(v, 11, u.packet_id, &vec![0x80; u.filters.len()], why))
                    }
                    _ => {}
                }
                return None;
            }
        }
        if matches!(p, Packet::Subscribe(_)) {
            // What a subscription brings (its QoS, options, retained message) is the
            // task's to write until `run` finds the connection plain again.
            self.set_plain(None);
        }
        match p {
            Packet::PingReq => self.send(codec::pingresp()),
            Packet::Disconnect(reason) => return Some(End::Client(reason)),
            Packet::Publish(p) => return self.publish(p).await,
            Packet::PubRel(id) => {
                self.rare.qos2.remove(&id);
                self.send(codec::ack(v, 7, id, 0, ""));
            }
            Packet::PubAck(id) => self.acked(id, 1),
            Packet::PubRec(id) => self.received(id),
            Packet::PubComp(id) => self.acked(id, 2),
            Packet::Subscribe(s) => {
                let end = self.subscribe_all(s).await;
                // Saved as soon as the subscriptions change (see `run`).
                self.keep_session().await;
                return end;
            }
            Packet::Unsubscribe(u) => {
                let codes: Vec<u8> = u
                    .filters
                    .iter()
                    .map(|f| {
                        let gone = self
                            .filters
                            .remove(f)
                            .or_else(|| self.rare.shared.remove(f).map(|_| String::new()))
                            .or_else(|| self.rare.sys.remove(f).map(|_| String::new()))
                            .or_else(|| self.rare.presence.remove(f).map(|_| String::new()));
                        match gone {
                            None if f == DIRECT_TOPIC && self.direct.is_some() => {
                                self.direct = None;
                                0
                            }
                            Some(ch) if ch.is_empty() => 0, // a shared, $SYS or $presence one: left
                            Some(ch) => {
                                self.session.unsubscribe(&ch);
                                self.qos.remove(&ch);
                                self.rare.sub_ids.remove(&ch);
                                self.rare.no_local.remove(&ch);
                                self.rare.rap.remove(&ch);
                                if let Ok(c) = ChannelName::parse(&ch) {
                                    self.rare.positions.remove(&c);
                                }
                                0
                            }
                            None => 0x11, // no subscription existed
                        }
                    })
                    .collect();
                self.send(codec::sub_ack(v, 11, u.packet_id, &codes, ""));
                self.keep_session().await;
            }
            Packet::Auth(a) => return self.reauthenticate(a),
            Packet::Connect(_) => return Some(End::Protocol(0x82, "a second CONNECT".into())),
        }
        None
    }

    /// Whether this connection may subscribe to `$SYS` (`mqtt.sys_topics`).
    fn sys_allowed(&self) -> Result<(), ApiError> {
        match self.session.state.config.mqtt.sys_topics {
            crate::config::SysTopics::All => Ok(()),
            crate::config::SysTopics::Authenticated if self.session.user().is_some() => Ok(()),
            crate::config::SysTopics::Authenticated => {
                Err(ApiError::new(Code::TokenRequired, "$SYS is for clients that connected with a token"))
            }
            crate::config::SysTopics::Off => Err(ApiError::new(Code::PermissionDenied, "$SYS is off on this server")),
        }
    }

    /// AUTH from the client: re-authentication with a new token (MQTT 5 §4.12.1), for a
    /// connection that authenticated with [`AUTH_METHOD`] — the same user's, as the
    /// WebSocket's `refresh`. Success is answered with AUTH 0x00 and the token's expiry
    /// replaces the old one; anything else ends the connection with its reason.
    fn reauthenticate(&mut self, a: codec::Auth) -> Option<End> {
        if !self.jwt_auth {
            return Some(End::Protocol(0x82, "AUTH without an authentication method at CONNECT".into()));
        }
        if a.reason != 0x19 {
            return Some(End::Protocol(0x82, format!("AUTH with reason {:#04x}: only 0x19 re-authenticate", a.reason)));
        }
        if a.method.as_deref() != Some(AUTH_METHOD) {
            return Some(End::Protocol(
                0x8C,
                format!("bad_authentication_method: re-authenticate with {AUTH_METHOD:?}"),
            ));
        }
        let verified = a
            .data
            .as_deref()
            .ok_or_else(|| ApiError::new(Code::TokenRequired, "AUTH without the token as its data"))
            .and_then(|d| {
                std::str::from_utf8(d).map_err(|_| ApiError::new(Code::TokenInvalid, "the token is not UTF-8"))
            })
            .and_then(|t| crate::transports::verify(&self.session.state, t))
            .and_then(|who| match self.session.user() {
                Some(old) if old != who.user => {
                    Err(ApiError::new(Code::TokenInvalid, "the new token is for another user"))
                }
                _ => Ok(who),
            });
        match verified {
            Ok(who) => {
                self.session.set_identity(who);
                self.send(codec::auth(0x00, AUTH_METHOD));
                None
            }
            Err(e) => {
                self.session.state.metrics.error(e.code.as_str());
                let code = if e.code == Code::TokenRevoked { 0x8A } else { 0x87 };
                Some(End::Protocol(code, format!("{}: {}", e.code.as_str(), e.message)))
            }
        }
    }

    /// SUBSCRIBE: every filter is checked (form, gate, limits) and answered in SUBACK
    /// first, then subscribed — so the SUBACK precedes the retained publications. A
    /// subscription that fails after its check (the broker) ends the connection.
    async fn subscribe_all(&mut self, s: codec::Subscribe) -> Option<End> {
        let v5 = self.version == Version::V5;
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut why = String::new();
        let mut todo = Vec::new();
        let mut resend = Vec::new();
        let max = self.session.state.config.ws.max_subscriptions;
        let mut sys_now = Vec::new();
        for (filter, options) in &s.filters {
            let granted = options.qos;
            if super::sys::is_sys(filter) {
                codes.push(match self.sys_allowed() {
                    Ok(()) => {
                        // QoS 0: statistics are sent again at the next interval anyway.
                        if !self.rare.sys.contains_key(filter) {
                            let m =
                                super::sys::subscribe(&self.session.state, &self.session.queue, filter, self.version);
                            self.rare.sys.insert(filter.clone(), m);
                        }
                        sys_now.push(filter.clone());
                        0
                    }
                    Err(e) => {
                        why = format!("{}: {}", e.code.as_str(), e.message);
                        if v5 {
                            0x87
                        } else {
                            0x80
                        }
                    }
                });
                continue;
            }
            if let Some(topic) = filter.strip_prefix(super::presence::PREFIX) {
                let room = self.filters.len() + self.rare.presence.len() < max;
                codes.push(match self.watch_presence(filter, topic, s.token.clone(), room).await {
                    Ok(()) => 0, // QoS 0: presence events are never stored, never sent again
                    Err((code, e)) => {
                        self.session.state.metrics.error(e.code.as_str());
                        if why.is_empty() {
                            why = format!("{}: {}", e.code.as_str(), e.message);
                        }
                        code
                    }
                });
                continue;
            }
            if filter == DIRECT_TOPIC {
                codes.push(match self.subscribe_direct() {
                    Ok(()) => 0, // direct messages are QoS 0: never stored, never sent again
                    Err(e) => {
                        why = format!("{}: {}", e.code.as_str(), e.message);
                        0x80
                    }
                });
                continue;
            }
            match self.check_filter(filter, s.token.clone()) {
                Ok(None) => {
                    // A repeated filter replaces the subscription: the new QoS and
                    // options, and its retained message again (MQTT-3.8.4-3; MQTT 5 with
                    // Retain Handling 0) — without interrupting it.
                    if let Some(name) = self.filters.get(filter).cloned() {
                        self.qos.set(name.clone(), granted);
                        self.set_options(name.clone(), s.id, options.no_local, options.retain_as_published);
                        if options.retain_handling == 0 {
                            resend.push(name);
                        }
                    }
                    codes.push(granted)
                }
                Ok(Some(t)) if self.filters.len() + self.rare.presence.len() + todo.len() >= max => {
                    drop(t);
                    codes.push(if v5 { 0x97 } else { 0x80 });
                    if why.is_empty() {
                        why = format!("too_many_subscriptions: at most {max} per connection");
                    }
                }
                Ok(Some(t)) => {
                    codes.push(granted);
                    todo.push((filter.clone(), t, *options));
                }
                Err((code, e)) => {
                    tracing::debug!(client = %self.client_id(), filter, "MQTT subscribe refused: {}", e.message);
                    self.session.state.metrics.error(e.code.as_str());
                    if why.is_empty() {
                        why = format!("{}: {}", e.code.as_str(), e.message);
                    }
                    codes.push(code);
                }
            }
        }
        self.send(codec::sub_ack(self.version, 9, s.packet_id, &codes, &why));
        for filter in sys_now {
            super::sys::send_now(&self.session.state, &self.session.queue, &filter, self.version);
        }
        for name in resend {
            self.resend_retained(&name).await;
        }
        for (filter, target, options) in todo {
            let granted = options.qos;
            let name = match &target {
                Target::Channel(r) | Target::Shared(_, super::shared::Target::Channel(r)) => r.channel.to_string(),
                Target::Pattern(p) | Target::Shared(_, super::shared::Target::Pattern(p)) => p.pattern.to_string(),
            };
            let r = match target {
                Target::Shared(group, t) => {
                    match super::shared::join(&self.session.state, &group, t, &self.session.queue).await {
                        Ok(m) => {
                            self.qos.set(name.clone(), granted);
                            self.set_options(name, s.id, false, false);
                            self.rare.shared.insert(filter, m);
                            continue;
                        }
                        Err(e) => Err(e),
                    }
                }
                Target::Pattern(p) => self.session.subscribe_pattern(p).await,
                Target::Channel(resolved) => {
                    // The channel's latest publication is its retained message — unless
                    // MQTT 5's Retain Handling 2 asks for none. (Handling 1, "only for a
                    // new subscription", is 0 here: a repeated filter never comes here.)
                    let keeps = resolved.options.keeps_history() && resolved.options.history_size > 0;
                    let rewind = (keeps && options.retain_handling != 2).then_some(1);
                    let channel = resolved.channel.clone();
                    self.subscribe_channel(resolved, None, rewind).await.map(|o| {
                        // (With a rewind the position is just before the replay.)
                        let mut at = o.position;
                        at.offset += o.replayed as u64;
                        if o.replayed > 0 {
                            self.rare.retained.push((channel.clone(), at.offset));
                        }
                        // (Positions are what a kept session resumes from: only then.)
                        if self.persist.is_some() {
                            self.rare.positions.entry(channel).or_insert(at);
                        }
                    })
                }
            };
            match r {
                Ok(()) => self.subscribed(filter, name, granted, s.id, options.no_local, options.retain_as_published),
                Err(e) => {
                    return Some(End::Protocol(0x80, format!("{}: subscribe failed: {}", e.code.as_str(), e.message)))
                }
            }
        }
        None
    }

    /// Watches a channel's presence for a SUBSCRIBE to `$presence/{topic}` (see
    /// [`super::presence`]); `room`: under `ws.max_subscriptions`.
    async fn watch_presence(
        &mut self,
        filter: &str,
        topic: &str,
        token: Option<String>,
        room: bool,
    ) -> Result<(), (u8, ApiError)> {
        if self.rare.presence.contains_key(filter) {
            return Ok(()); // (a repeated filter: nothing to replace)
        }
        let v = self.version;
        let invalid = if v == Version::V5 { 0x8F } else { 0x80 };
        if !room {
            let max = self.session.state.config.ws.max_subscriptions;
            let e = ApiError::new(Code::TooManySubscriptions, format!("at most {max} subscriptions per connection"));
            return Err((reason_for(v, &e), e));
        }
        let name = super::channel_of(&self.session.state, topic)
            .map_err(|why| (invalid, ApiError::new(Code::InvalidChannel, why)))?;
        if switchboard_core::pattern::is_pattern(&name) {
            let e = ApiError::new(Code::InvalidChannel, "a presence topic names one channel: no wildcards");
            return Err((invalid, e));
        }
        let r = self.session.gated(Operation::Presence, &name, token).map_err(|e| (reason_for(v, &e), e))?;
        let watch = super::presence::watch(&self.session.state, &r, &self.session.queue, filter, v)
            .await
            .map_err(|e| (reason_for(v, &e), e))?;
        self.rare.presence.insert(filter.to_string(), watch);
        Ok(())
    }

    /// Registers this connection for direct messages (its SUBSCRIBE to `$direct`).
    fn subscribe_direct(&mut self) -> Result<(), ApiError> {
        let state = &self.session.state;
        if !state.config.direct.enabled {
            return Err(ApiError::new(Code::TransportDisabled, "direct messages are off on this server"));
        }
        if self.direct.is_none() {
            let frame = if self.version == Version::V5 { direct_v5 } else { direct_v311 };
            let r = state.registry.add_client(&self.session.client, &self.session.queue, frame);
            if let Some(user) = self.session.user() {
                state.registry.set_client_user(&self.session.client, user);
            }
            self.direct = Some(Box::new(r));
        }
        Ok(())
    }

    /// A PUBLISH to `$direct/client/{id}` or `$direct/user/{user}`: a direct message, under
    /// `[direct] policy` as the `send` command. The success code: 0, or (MQTT 5) 0x10 No
    /// matching subscribers when the target is not connected.
    async fn send_direct(&mut self, target: &str, p: &codec::Publish) -> Result<u8, ApiError> {
        let to = match target.split_once('/') {
            Some(("client", id)) if !id.is_empty() => {
                crate::commands::protocol::To { client: Some(id.into()), user: None }
            }
            Some(("user", u)) if !u.is_empty() => crate::commands::protocol::To { client: None, user: Some(u.into()) },
            _ => {
                return Err(ApiError::new(
                    Code::InvalidChannel,
                    "direct messages go to $direct/client/{client id} or $direct/user/{user id}",
                ))
            }
        };
        let data = super::data_of(&p.payload).ok_or_else(|| {
            ApiError::new(Code::InvalidJson, "binary payloads are not supported: send UTF-8 text or JSON")
        })?;
        let data = String::from_utf8(data.to_vec()).ok().and_then(|d| serde_json::value::RawValue::from_string(d).ok());
        let data = data.ok_or_else(|| ApiError::new(Code::InvalidJson, "the payload is not JSON"))?;
        match self.session.send(&to, &data).await {
            Ok(_) => Ok(0),
            Err(e) if e.code == Code::TargetNotConnected && self.version == Version::V5 => Ok(0x10),
            // MQTT 3.1.1 has no way to say it: a message to nobody is dropped quietly.
            Err(e) if e.code == Code::TargetNotConnected => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Sends a subscribed channel's retained message (its latest publication) again, with
    /// the retain flag: queued behind what is already on its way.
    async fn resend_retained(&mut self, name: &str) {
        let Ok(channel) = ChannelName::parse(name) else { return };
        let Some(resolved) = self.session.gated(Operation::Subscribe, name, None).ok() else { return };
        if !resolved.options.keeps_history() || resolved.options.history_size == 0 {
            return;
        }
        let req = switchboard_core::broker::HistoryRequest { since: None, limit: Some(1), latest: true };
        let Ok(h) = self.session.state.hub.broker().history(&channel, req).await else { return };
        if let Some(d) = h.publications.into_iter().next_back() {
            // A copy of its own, told apart from the same publication arriving live.
            let copy = switchboard_core::Delivery::new(d.publication.clone());
            self.rare.resent.push(copy.clone());
            let _ = self.session.queue.push(Event::Publication(copy));
        }
    }

    /// Subscribes this connection to a channel (through the session: presence, the
    /// race-free replay), answering nothing itself: its outcome.
    async fn subscribe_channel(
        &mut self,
        resolved: crate::session::Resolved,
        since: Option<switchboard_core::StreamPosition>,
        rewind: Option<usize>,
    ) -> Result<switchboard_core::hub::SubscribeOutcome, ApiError> {
        let req = crate::session::subscribe_request(&resolved, since, rewind);
        let mut outcome = None;
        self.session
            .subscribe(resolved, req, |o, _| {
                outcome = Some(o.clone());
                String::new()
            })
            .await?;
        Ok(outcome.expect("a successful subscribe has an outcome"))
    }

    /// Records a subscription made: its filter, its channel or pattern, its QoS and
    /// identifier.
    fn subscribed(&mut self, filter: String, name: String, qos: u8, id: Option<u32>, no_local: bool, rap: bool) {
        self.qos.set(name.clone(), qos);
        self.set_options(name.clone(), id, no_local, rap);
        self.filters.set(filter, name);
    }

    /// A subscription's MQTT 5 options: its identifier, No Local, Retain As Published.
    fn set_options(&mut self, name: String, id: Option<u32>, no_local: bool, rap: bool) {
        if no_local {
            self.rare.no_local.insert(name.clone());
        } else {
            self.rare.no_local.remove(&name);
        }
        if rap {
            self.rare.rap.insert(name.clone());
        } else {
            self.rare.rap.remove(&name);
        }
        match id {
            Some(id) => self.rare.sub_ids.insert(name, id),
            None => self.rare.sub_ids.remove(&name),
        };
    }

    /// Resumes a kept session: its subscriptions again, each channel from where this
    /// client stood — what was published meanwhile (within the channel's history) comes
    /// first, in order. Still through the gate: a token may allow less than before.
    async fn resume(&mut self, kept: super::sessions::Kept) -> Option<End> {
        // What was in flight goes again with its packet id as the replay reaches it.
        for (channel, offset, id, released) in kept.inflight {
            if let Ok(c) = ChannelName::parse(&channel) {
                self.rare.again.insert((c, offset), (id, released));
            }
        }
        for sub in kept.subs {
            if sub.filter == DIRECT_TOPIC {
                let _ = self.subscribe_direct();
                continue;
            }
            if let Some(topic) = sub.filter.strip_prefix(super::presence::PREFIX) {
                // Through the gate again, as every kept subscription.
                if let Err((_, e)) = self.watch_presence(&sub.filter, topic, None, true).await {
                    tracing::debug!(client = %self.client_id(), filter = %sub.filter, "MQTT session: not watched again: {}", e.message);
                }
                continue;
            }
            let r = if switchboard_core::pattern::is_pattern(&sub.name) {
                match self.session.gated_pattern(&sub.name) {
                    Ok(p) => self.session.subscribe_pattern(p).await,
                    Err(e) => Err(e),
                }
            } else {
                match self.session.gated(Operation::Subscribe, &sub.name, None) {
                    Ok(resolved) => {
                        let channel = resolved.channel.clone();
                        self.subscribe_channel(resolved, sub.position.clone(), None).await.map(|o| {
                            if !o.recovered {
                                tracing::debug!(client = %self.client_id(), %channel, "MQTT session: history no longer reaches its position");
                            }
                            self.rare.positions.insert(channel, o.position);
                        })
                    }
                    Err(e) => Err(e),
                }
            };
            match r {
                Ok(()) => self.subscribed(sub.filter, sub.name, sub.qos, sub.id, sub.no_local, sub.rap),
                Err(e) => {
                    tracing::debug!(client = %self.client_id(), filter = %sub.filter, "MQTT session: not resubscribed: {}", e.message);
                }
            }
        }
        None
    }

    /// Keeps this session for the next connection with its client id, when it asked
    /// for that — unless another connection took the id over meanwhile.
    async fn keep_session(&mut self) {
        // Only while this connection holds its client id: once another took it over,
        // only the last word below keeps it (the new connection waits for that).
        if self.session.state.mqtt_clients.holds(self.client_id(), &self.session.queue) {
            self.save_session().await;
        }
    }

    async fn save_session(&mut self) {
        let Some(expiry) = self.persist else { return };
        let mut subs: Vec<_> = self
            .filters
            .iter()
            .map(|(filter, name)| super::sessions::KeptSub {
                filter: filter.clone(),
                name: name.clone(),
                qos: self.qos.get(name).copied().unwrap_or(0),
                id: self.rare.sub_ids.get(name).copied(),
                no_local: self.rare.no_local.contains(name),
                rap: self.rare.rap.contains(name),
                position: ChannelName::parse(name).ok().and_then(|c| self.rare.positions.get(&c).cloned()),
            })
            .collect();
        // `$direct` and the `$presence/…` watches, QoS 0: what was sent to them meanwhile
        // is not kept (direct messages and presence events are never stored).
        let direct = self.direct.is_some().then(|| DIRECT_TOPIC.to_string());
        for filter in direct.into_iter().chain(self.rare.presence.keys().cloned()) {
            let sub = super::sessions::KeptSub {
                filter,
                name: String::new(),
                qos: 0,
                id: None,
                no_local: false,
                rap: false,
                position: None,
            };
            subs.push(sub);
        }
        let inflight = self
            .sink
            .window()
            .inflight
            .iter()
            .filter_map(|f| f.confirms.as_ref().map(|(c, p)| (c.to_string(), p.offset, f.id, f.released)))
            .collect();
        let kept = super::sessions::Kept { subs, inflight };
        self.session.state.mqtt_sessions.keep(self.client_id(), kept, expiry).await;
    }

    /// A filter's channel or pattern, through the gate: `Ok(None)` when this connection
    /// already has it; `Err` with the SUBACK code.
    fn check_filter(&self, filter: &str, token: Option<String>) -> Result<Option<Target>, (u8, ApiError)> {
        let v5 = self.version == Version::V5;
        let invalid = if v5 { 0x8F } else { 0x80 };
        let (group, topic_filter) = match filter.strip_prefix("$share/") {
            Some(rest) => match rest.split_once('/') {
                Some((g, f)) if !g.is_empty() && !g.contains(['+', '#']) && !f.is_empty() => (Some(g), f),
                _ => {
                    let e = ApiError::new(Code::InvalidPattern, "a shared subscription is $share/{group}/{filter}");
                    return Err((invalid, e));
                }
            },
            None => (None, filter),
        };
        let name = super::channel_of(&self.session.state, topic_filter)
            .map_err(|why| (invalid, ApiError::new(Code::InvalidChannel, why)))?;
        if self.filters.contains_key(filter) || self.rare.shared.contains_key(filter) {
            return Ok(None);
        }
        let target = if switchboard_core::pattern::is_pattern(&name) {
            self.session.gated_pattern(&name).map(Target::Pattern)
        } else {
            self.session.gated(Operation::Subscribe, &name, token).map(Target::Channel)
        };
        let target = match (group, target) {
            (Some(g), Ok(Target::Channel(r))) => Ok(Target::Shared(g.to_string(), super::shared::Target::Channel(r))),
            (Some(g), Ok(Target::Pattern(p))) => Ok(Target::Shared(g.to_string(), super::shared::Target::Pattern(p))),
            (_, t) => t,
        };
        target.map(Some).map_err(|e| {
            // A filter's form is "Topic Filter invalid" (a name's is 0x90).
            let code = match reason_for(self.version, &e) {
                0x90 => invalid,
                c => c,
            };
            (code, e)
        })
    }

    async fn publish(&mut self, p: codec::Publish) -> Option<End> {
        let v = self.version;
        // Topic aliases (MQTT 5): a topic with an alias defines it, an empty one uses it.
        let topic = match (p.topic_alias, p.topic.is_empty()) {
            (Some(a), _) if a == 0 || a > TOPIC_ALIASES => {
                return Some(End::Protocol(0x94, format!("topic alias {a}: this server takes 1 to {TOPIC_ALIASES}")))
            }
            (Some(a), false) => {
                self.rare.aliases.insert(a, p.topic.clone());
                p.topic.clone()
            }
            (Some(a), true) => match self.rare.aliases.get(&a) {
                Some(t) => t.clone(),
                None => return Some(End::Protocol(0x82, "unknown topic alias".into())),
            },
            (None, true) => return Some(End::Protocol(0x82, "PUBLISH without a topic".into())),
            (None, false) => p.topic.clone(),
        };
        if p.qos == 2 {
            let id = p.packet_id.expect("QoS 2 has an id");
            if !self.rare.qos2.contains(&id) && self.rare.qos2.len() >= RECEIVE_MAXIMUM as usize {
                return Some(End::Protocol(0x93, "receive maximum exceeded".into()));
            }
        }
        let result = match topic.strip_prefix("$direct/") {
            // QoS 2 sent again (DUP) before PUBREL: already sent once.
            Some(_) if p.qos == 2 && p.packet_id.is_some_and(|id| self.rare.qos2.contains(&id)) => Ok(0),
            Some(target) => self.send_direct(target, &p).await,
            None => self.store(&topic, &p).await.map(|()| 0),
        };
        let (code, why) = match &result {
            Ok(code) => (*code, String::new()),
            Err(e) => {
                self.session.state.metrics.error(e.code.as_str());
                (reason_for(v, e), format!("{}: {}", e.code.as_str(), e.message))
            }
        };
        match (p.qos, p.packet_id) {
            (1, Some(id)) if v == Version::V5 || code == 0 => self.send(codec::ack(v, 4, id, code, &why)),
            (2, Some(id)) if v == Version::V5 || code == 0 => {
                if code < 0x80 {
                    self.rare.qos2.insert(id);
                }
                self.send(codec::ack(v, 5, id, code, &why));
            }
            // MQTT 3.1.1 has no negative acknowledgement: a refused publication closes.
            // (MQTT 5 at QoS 0 has no answer at all: refused quietly, counted.)
            _ if v == Version::V311 && code != 0 => return Some(End::Protocol(code, why)),
            _ => {}
        }
        None
    }

    /// Publishes an MQTT PUBLISH to its channel, through the gate.
    async fn store(&mut self, topic: &str, p: &codec::Publish) -> Result<(), ApiError> {
        let name = super::channel_of(&self.session.state, topic).map_err(|w| ApiError::new(Code::InvalidChannel, w))?;
        if switchboard_core::pattern::is_pattern(&name) {
            return Err(ApiError::new(Code::InvalidChannel, "a topic name cannot hold wildcards"));
        }
        let resolved = self.session.gated(Operation::Publish, &name, p.token.clone())?;
        let data = super::data_of(&p.payload).ok_or_else(|| {
            ApiError::new(Code::InvalidJson, "binary payloads are not supported: send UTF-8 text or JSON")
        })?;
        if data.len() > self.session.state.config.limits.max_message_bytes {
            return Err(ApiError::new(Code::MessageTooLarge, "the payload is over limits.max_message_bytes"));
        }
        // QoS 2: exactly once, even when the client sends the PUBLISH again (DUP) — the
        // packet id keys an idempotent publish.
        let key = (p.qos == 2).then(|| format!("mqtt:{}:{}", self.client_id(), p.packet_id.unwrap_or(0)));
        let volatile = (p.qos == 0 && resolved.options.volatile).then_some(true);
        let channel = resolved.channel.clone();
        let by = ops::Publisher::Client { client: Some(&self.session.client), user: self.session.user() };
        let meta = p.meta.as_deref();
        let answer = ops::publish_to(&self.session.state, &resolved, data, volatile, key, by, meta).await?;
        if !self.rare.no_local.is_empty() {
            // Remembered for No Local (its delivery is in this connection's queue, read
            // after this packet).
            if let Some(offset) = answer.offset() {
                if self.rare.own.len() >= OWN_REMEMBERED {
                    self.rare.own.pop_front();
                }
                self.rare.own.push_back((channel, offset));
            }
        }
        Ok(())
    }

    /// The last word: MQTT 5 gets a DISCONNECT saying why the server ends it.
    async fn goodbye(&mut self, end: &End) {
        // From here on only this task writes (the DISCONNECT must not be interleaved).
        self.session.queue.clear_direct();
        let _ = self.write_queued().await;
        // Kept before the socket closes: a client that reconnects as soon as it sees the
        // close finds its session — and a connection that took this one over, which
        // waits for `ended`, resumes it from here.
        self.save_session().await;
        if let Some(ended) = self.ended.take() {
            let _ = ended.send(());
        }
        if self.version == Version::V5 {
            let (code, text) = match end {
                End::Protocol(code, text) => (*code, text.as_str()),
                End::Server(CloseReason::Shutdown) => (0x8B, "server shutting down"),
                End::Server(CloseReason::SlowConsumer) => (0x97, "slow consumer: publications were not read in time"),
                End::Server(CloseReason::TokenExpired) => (0xA0, "the connection token expired"),
                End::Server(CloseReason::Disconnected) => (0x98, "disconnected by the server"),
                End::Server(CloseReason::Normal) => (0x8E, "session taken over by another connection"),
                End::Client(_) | End::Lost => (0, ""),
            };
            if code != 0 {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    send_now(&mut self.tcp, &codec::disconnect(code, text)),
                )
                .await;
            }
        }
        let _ = self.tcp.shutdown().await;
    }
}

/// Reads what is there into `buf`, through a buffer on the stack of one poll: waiting
/// for input holds no buffer.
/// Reads what the socket has into `buf` (through a buffer on the stack: an idle
/// connection keeps none).
fn poll_read_some(io: &mut Io, buf: &mut BytesMut, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
    let mut stack = [0u8; 4096];
    let mut rb = ReadBuf::new(&mut stack);
    ready!(Pin::new(&mut *io).poll_read(cx, &mut rb))?;
    buf.extend_from_slice(rb.filled());
    Poll::Ready(Ok(rb.filled().len()))
}

/// Writes `bytes` and flushes: a TLS or WebSocket stream may hold what it was given.
async fn send_now(io: &mut Io, bytes: &[u8]) -> std::io::Result<()> {
    io.write_all(bytes).await?;
    io.flush().await
}

/// The MQTT reason code for an error of the gate or the broker.
fn reason_for(version: Version, e: &ApiError) -> u8 {
    if version == Version::V311 {
        return 0x80;
    }
    match e.code {
        Code::TokenRequired
        | Code::PermissionDenied
        | Code::SubscriptionTokenRequired
        | Code::SubscriptionTokenInvalid
        | Code::PublishNotAllowed
        | Code::TokenInvalid => 0x87,
        Code::InvalidChannel | Code::UnknownNamespace | Code::InvalidPattern => 0x90,
        Code::MessageTooLarge => 0x95,
        Code::InvalidJson => 0x99,
        Code::RateLimited => 0x96,
        Code::TooManySubscriptions => 0x97,
        _ => 0x80,
    }
}

/// The PUBLISH every QoS 0 subscriber of `d` without identifiers gets, not retained.
fn encode(version: Version, d: &switchboard_core::Delivery) -> Bytes {
    publish_of(version, d, Sending::default())
}

/// How one client is sent a publication.
#[derive(Default, Clone, Copy)]
struct Sending<'a> {
    qos: u8,
    /// For QoS 1 and 2.
    packet_id: u16,
    retain: bool,
    /// Sent again, unacknowledged, with the same packet id.
    dup: bool,
    /// MQTT 5: the identifiers of the subscriptions it matches.
    ids: &'a [u32],
    /// MQTT 5: the topic alias, and whether the topic goes with it (defining it).
    alias: Option<(u16, bool)>,
}

/// [`encode`], made once per publication and shared by its subscribers — but for a
/// publication that expires: what is left of its expiry changes while it waits.
fn shared(version: Version, d: &switchboard_core::Delivery) -> Bytes {
    if d.publication.meta.as_ref().is_some_and(|m| m.ttl.is_some()) {
        return encode(version, d);
    }
    let slot = if version == Version::V5 { SLOT_V5 } else { SLOT_V311 };
    d.encoded(slot, |d| encode(version, d))
}

/// The PUBLISH of `d` for one client, as `s` says.
fn publish_of(version: Version, d: &switchboard_core::Delivery, s: Sending<'_>) -> Bytes {
    let topic = super::topic_of(&d.publication.channel);
    let payload = super::payload_of(&d.publication.data);
    let meta = d.publication.meta.as_deref();
    // What is left of its Message Expiry Interval, in whole seconds rounded up
    // (MQTT-3.3.2-6); an expired one is not sent at all.
    let expiry = meta
        .and_then(|m| m.expires_at(d.publication.time))
        .map(|at| at.saturating_sub(switchboard_core::now_millis()).div_ceil(1000).min(u32::MAX as u64) as u32);
    let Sending { qos, packet_id, retain, dup, ids: subscription_ids, alias } = s;
    codec::Outgoing {
        topic: &topic,
        payload: &payload,
        qos,
        packet_id,
        retain,
        dup,
        subscription_ids,
        meta,
        expiry,
        alias,
    }
    .encode(version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use switchboard_core::{Delivery, Publication};

    fn publication(kind: Kind, data: &str) -> Event {
        Event::Publication(Delivery::new(Publication {
            channel: ChannelName::parse("room").unwrap(),
            offset: 1,
            epoch: "e".into(),
            data: Bytes::copy_from_slice(data.as_bytes()),
            time: 0,
            kind,
            meta: None,
        }))
    }

    /// A sink on one end of a loopback connection, and the other end. `plain`: 0, or 1 +
    /// the QoS of the direct path.
    fn pair(plain: u8, max_packet: usize) -> (Sink, std::net::TcpStream) {
        pair_with(plain, max_packet, 3)
    }

    /// [`pair`] with the client's receive maximum.
    fn pair_with(plain: u8, max_packet: usize, receive_max: usize) -> (Sink, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let stream = Some(Arc::new(TcpStream::from_std(server).unwrap()));
        let window = std::sync::Mutex::new(Window { inflight: Default::default(), next_packet_id: 1, counted: 0 });
        let (version, plain, metrics) = (Version::V311, AtomicU8::new(plain), Default::default());
        (Sink { stream, version, max_packet, receive_max, plain, window, metrics }, client)
    }

    fn qos1(id: u16, payload: &[u8]) -> Bytes {
        let out = codec::Outgoing {
            topic: "room",
            payload,
            qos: 1,
            packet_id: id,
            retain: false,
            dup: false,
            subscription_ids: &[],
            meta: None,
            expiry: None,
            alias: None,
        };
        out.encode(Version::V311)
    }

    #[tokio::test]
    async fn at_qos_1_the_direct_path_numbers_publications_within_the_window() {
        let (sink, mut client) = pair(2, usize::MAX);
        // Two singly, with packet ids 1 and 2; presence events and acks pass as at QoS 0.
        assert!(matches!(sink.try_write(&publication(Kind::Stored, "\"a\"")), Written::All));
        assert!(matches!(sink.try_write(&publication(Kind::Join, "{}")), Written::All));
        assert!(matches!(sink.try_write(&Event::Frame(codec::pingresp())), Written::All));
        assert!(matches!(sink.try_write(&publication(Kind::Volatile, "\"b\"")), Written::All));
        // A batch of two: only one place is left in the window (receive maximum 3).
        let batch = vec![publication(Kind::Stored, "\"c\""), publication(Kind::Stored, "\"d\"")];
        assert_eq!(sink.try_write_many(&batch).unwrap(), (1, None), "the second waits for room");
        assert!(matches!(sink.try_write(&publication(Kind::Stored, "\"e\"")), Written::Blocked));
        let want = [qos1(1, b"a"), codec::pingresp(), qos1(2, b"b"), qos1(3, b"c")].concat();
        assert_eq!(read_exactly(&mut client, want.len()), want);
        let ids: Vec<u16> = sink.window().inflight.iter().map(|f| f.id).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        // PUBACK for 2 (as the task handles it): the next takes id 4, not one in flight.
        sink.window().inflight.retain(|f| f.id != 2);
        assert!(matches!(sink.try_write(&publication(Kind::Stored, "\"d\"")), Written::All));
        assert_eq!(read_exactly(&mut client, qos1(4, b"d").len()), qos1(4, b"d"));
        assert_eq!(sink.window().inflight.iter().map(|f| f.id).collect::<Vec<_>>(), vec![1, 3, 4]);
        // The server's gauge of publications in flight follows the window, and lets go
        // of it with the connection.
        let metrics = sink.metrics.clone();
        assert_eq!(metrics.mqtt_inflight.load(Ordering::Relaxed), 3);
        drop(sink);
        assert_eq!(metrics.mqtt_inflight.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn at_qos_1_what_the_socket_does_not_take_leaves_the_window() {
        let (sink, mut client) = pair_with(2, usize::MAX, usize::MAX);
        let big = format!("\"{}\"", "z".repeat(30_000));
        let events: Vec<Event> = (0..20).map(|_| publication(Kind::Stored, &big)).collect();
        // Batches until the unread socket takes one only in part, however much it holds.
        let mut before = 0;
        let (n, rest) = loop {
            let (n, rest) = sink.try_write_many(&events).unwrap();
            if n < events.len() {
                break (n, rest);
            }
            before += events.len();
            assert!(before < 60_000, "an unread socket took {before} publications of 30 KB");
        };
        // In the window: what went whole, and the one that went in part.
        let sent = before + n + usize::from(rest.is_some());
        assert_eq!(sink.window().inflight.len(), sent);
        // The client reads the sent ones numbered 1, 2, … up to where the socket stopped.
        let payload = &big.as_bytes()[1..big.len() - 1];
        let want: Vec<u8> = (1..=sent as u16).flat_map(|id| qos1(id, payload).to_vec()).collect();
        let got = read_exactly(&mut client, want.len() - rest.map_or(0, |r| r.len()));
        let differ = got.iter().zip(&want).position(|(a, b)| a != b);
        assert_eq!(differ, None, "the stream differs from what was numbered");
    }

    fn read_exactly(client: &mut std::net::TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        client.read_exact(&mut got).unwrap();
        got
    }

    #[tokio::test]
    async fn the_direct_path_writes_what_the_task_would_and_counts_what_it_leaves_out() {
        let (sink, mut client) = pair(1, 40);
        let long = format!("\"{}\"", "x".repeat(60));
        let events = vec![
            publication(Kind::Join, "{}"),
            publication(Kind::Stored, "\"a\""),
            Event::Reset {
                channel: ChannelName::parse("room").unwrap(),
                position: switchboard_core::StreamPosition { epoch: "e".into(), offset: 0 },
            },
            publication(Kind::Stored, &long), // over the client's maximum packet size
            Event::Frame(codec::pingresp()),
            publication(Kind::Leave, "{}"),
        ];
        // Every event is accounted for: written, or not for this client at all.
        assert_eq!(sink.try_write_many(&events).unwrap(), (events.len(), None));
        let want = [codec::publish(Version::V311, "room", b"a", false), codec::pingresp()].concat();
        assert_eq!(read_exactly(&mut client, want.len()), want);
        assert!(matches!(sink.try_write(&publication(Kind::Leave, "{}")), Written::All));
        assert!(matches!(sink.try_write(&publication(Kind::Volatile, "\"b\"")), Written::All));
        let want = codec::publish(Version::V311, "room", b"b", false);
        assert_eq!(read_exactly(&mut client, want.len()), want);
    }

    #[tokio::test]
    async fn while_the_connection_is_not_plain_everything_is_left_to_its_task() {
        let (sink, _client) = pair(0, usize::MAX);
        assert!(matches!(sink.try_write(&publication(Kind::Stored, "1")), Written::Blocked));
        let events = vec![publication(Kind::Stored, "1"), publication(Kind::Stored, "2")];
        assert_eq!(sink.try_write_many(&events).unwrap(), (0, None));
    }

    #[tokio::test]
    async fn a_socket_that_takes_part_of_a_batch_leaves_the_rest_at_the_right_event() {
        let (sink, mut client) = pair(1, usize::MAX);
        let big = format!("\"{}\"", "y".repeat(30_000));
        let events: Vec<Event> =
            (0..20).flat_map(|_| [publication(Kind::Join, "{}"), publication(Kind::Stored, &big)]).collect();
        let is_sent = |e: &Event| matches!(e, Event::Publication(d) if d.publication.kind == Kind::Stored);
        // Batches until the unread socket takes one only in part, however much it holds.
        let mut before = 0;
        let (n, rest) = loop {
            let (n, rest) = sink.try_write_many(&events).unwrap();
            if n < events.len() {
                break (n, rest);
            }
            before += 20;
            assert!(before < 60_000, "an unread socket took {before} publications of 30 KB");
        };
        // The event it stopped at is one that is sent (not a skipped join), and what is
        // left of it plus everything after it make up the rest of the stream.
        assert!(is_sent(&events[n]));
        let one = codec::publish(Version::V311, "room", big.trim_matches('"').as_bytes(), false);
        let sent_whole = before + events[..n].iter().filter(|e| is_sent(e)).count();
        let part = rest.map_or(0, |r| one.len() - r.len());
        let got = read_exactly(&mut client, sent_whole * one.len() + part);
        let want = one.repeat(sent_whole + 1);
        let differ = got.iter().zip(&want).position(|(a, b)| a != b);
        assert_eq!(differ, None, "the stream differs from the publications in order");
    }
}
