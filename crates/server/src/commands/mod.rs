//! The `switchboard.v1` command set, apart from any transport: a client's session — its
//! identity, its subscriptions and presence, its token's expiry, its command rate — and
//! the commands that act on it (connect, subscribe, unsubscribe, publish, history,
//! presence, presence_stats, refresh, ping; docs/protocol.md). Every channel operation
//! goes through [`Session::gated`], the one door ([`crate::auth::gate`]).
//!
//! A transport is framing and I/O: it reads messages and hands their text to
//! [`Session::command`]; replies and pushes come back through the session's queue as
//! bytes its [`Wire`] framed; a close is a close code of the protocol
//! (docs/protocol.md, "Close codes"). The WebSocket is one such transport
//! (`transports::ws::connection`); a WebTransport stream can be another, and MQTT maps
//! its packets onto the same operations ([`ops`], [`Session::subscribe`], …).

pub mod ops;
pub mod protocol;

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use switchboard_core::hub::{SubscribeOutcome, SubscribeRequest, SubscriptionHandle};
use switchboard_core::pattern::is_pattern;
use switchboard_core::queue::Event;
use switchboard_core::{ChannelName, CloseReason, ConnQueue};

use self::protocol::Command;
use crate::app::AppState;
use crate::auth::{self, Identity, Operation};
use crate::cursor;
use crate::error::{ApiError, Code};
use crate::presence::PresenceGuard;
use crate::registry::Registration;
use crate::session::{self, resolve_channel, resolve_pattern, Resolved, ResolvedPattern};
use crate::transports::ws::frame::close;

/// How a transport frames the protocol's messages.
pub trait Wire: Send + Sync + 'static {
    /// One JSON message, as the bytes to queue (a WebSocket text frame, …).
    fn text(json: &[u8]) -> Bytes;
    /// The last bytes of a session closed with a protocol close code.
    fn close(code: u16, reason: &str) -> Bytes;
    /// Whether the transport's sessions take direct messages (`{"message":…}` pushes).
    const DIRECT: bool = true;
    /// Its name in webhooks' connection events.
    const TRANSPORT: &'static str;
}

/// How a session closed by the server ends: the `disconnect` push saying whether to
/// reconnect, then the close with its code and text.
pub struct Goodbye {
    pub push: String,
    pub code: u16,
    pub text: &'static str,
}

/// The goodbye for a queue closed for `reason` (none for a normal close, whose close is
/// already queued).
pub fn goodbye(reason: CloseReason) -> Option<Goodbye> {
    let push = |code: u16, reason: &str, retry_ms: Option<u64>| {
        let v = match retry_ms {
            Some(retry_ms) => {
                serde_json::json!({"disconnect": {"code": code, "reason": reason, "reconnect": true, "retry_ms": retry_ms}})
            }
            None => serde_json::json!({"disconnect": {"code": code, "reason": reason, "reconnect": false}}),
        };
        v.to_string()
    };
    let (code, key, retry, text) = match reason {
        CloseReason::SlowConsumer => {
            (close::SLOW_CONSUMER, "slow_consumer", Some(0), "slow consumer: reconnect and resume")
        }
        CloseReason::Shutdown => {
            (close::GOING_AWAY, "shutdown", Some(fastrand::u64(500..=5000)), "server shutting down: reconnect")
        }
        CloseReason::TokenExpired => {
            (close::TOKEN_EXPIRED, "token_expired", Some(0), "token expired: reconnect with a new token")
        }
        CloseReason::Disconnected => (close::DISCONNECTED, "disconnected", None, "disconnected by the server"),
        CloseReason::Normal => return None,
    };
    Some(Goodbye { push: push(code, key, retry), code, text })
}

/// How far back refused commands are counted to tell a flood.
const FLOOD_WINDOW: Duration = Duration::from_secs(10);

/// Where the session's token stands.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Expiry {
    /// Anonymous: nothing expires.
    None,
    /// Valid until this time (Unix ms on the server's clock).
    Until(u64),
    /// Expired; the client was asked to `refresh` before this time (Unix ms).
    Grace(u64),
}

/// One client's session. (Fields the transport's event loop waits on are visible to it.)
pub struct Session<W: Wire> {
    pub state: AppState,
    /// Replies, pushes and publications, in order, bounded in bytes.
    pub queue: Arc<ConnQueue>,
    /// Presence guards are boxed: most subscriptions have none, and a map entry sized
    /// for one would cost every idle connection hundreds of bytes.
    subs: SmallMap<ChannelName, (SubscriptionHandle, Option<Box<PresenceGuard>>)>,
    patterns: SmallMap<String, SubscriptionHandle>,
    pub client: String,
    /// Commands per second: `ws.max_commands_per_sec`, bursts of twice that.
    bucket: crate::limits::Bucket,
    /// Commands refused for the rate limit, over the last [`FLOOD_WINDOW`].
    rejected: crate::limits::SlidingCount,
    // Boxed: rare, and an idle anonymous connection should not carry their size.
    identity: Option<Box<Identity>>,
    /// What an anonymous client said about itself (shown in presence as unverified).
    claimed: Option<Box<serde_json::Value>>,
    registration: Option<Box<Registration>>,
    /// Channels and patterns subscribed with `"datagrams": true` (WebTransport; rare: a
    /// boxed slice, which allocates nothing when empty and is the smallest in every session).
    datagrams: Box<[String]>,
    /// Registered by client id for direct messages (at `connect`; removed on drop): a
    /// connection that never sends `connect` does not know its id and costs nothing here.
    direct: bool,
    /// `connection.opened`/`closed` webhooks, when an endpoint takes them.
    events: Option<Box<crate::webhooks::ConnectionEvents>>,
    pub expiry: Expiry,
    /// Fires at the expiry deadline; only sessions with a token have one.
    pub timer: Option<crate::transports::Timer>,
    wire: PhantomData<W>,
}

impl<W: Wire> Drop for Session<W> {
    fn drop(&mut self) {
        if self.direct {
            self.state.registry.remove_client(&self.client);
        }
    }
}

impl<W: Wire> Session<W> {
    pub fn new(state: AppState, queue: Arc<ConnQueue>) -> Self {
        let rate = state.config.ws.max_commands_per_sec as f64 * 2.0;
        let client = crate::presence::client_id();
        Session {
            datagrams: Box::default(),
            direct: false,
            events: None,
            state,
            queue,
            subs: SmallMap::default(),
            patterns: SmallMap::default(),
            client,
            bucket: crate::limits::Bucket::full(rate),
            rejected: crate::limits::SlidingCount::new(),
            identity: None,
            claimed: None,
            registration: None,
            expiry: Expiry::None,
            timer: None,
            wire: PhantomData,
        }
    }

    /// The expiry timer fired: first a `refresh` request with a grace period, then the
    /// close (4101). Returns false when the session is over.
    pub fn on_expiry(&mut self) -> bool {
        match self.expiry {
            Expiry::Until(_) => {
                let grace = Duration::from_secs(self.state.config.auth.refresh_grace_secs);
                self.arm(Expiry::Grace(self.state.clock.now_ms().saturating_add(grace.as_millis() as u64)));
                let v =
                    serde_json::json!({"refresh": {"reason": "token_expired", "grace_ms": grace.as_millis() as u64}});
                self.push(W::text(v.to_string().as_bytes()));
                true
            }
            _ => {
                self.queue.close(CloseReason::TokenExpired);
                false
            }
        }
    }

    /// Counts one command against `ws.max_commands_per_sec` (bursts of twice that).
    /// `Err(false)`: refuse this one; `Err(true)`: a flood — the client keeps sending past
    /// the limit, however many of its commands get through in between (refusals are
    /// counted over a window): close it.
    pub fn take_command(&mut self) -> Result<(), bool> {
        let rate = self.state.config.ws.max_commands_per_sec as f64;
        if self.bucket.take(rate, rate * 2.0).is_ok() {
            return Ok(());
        }
        Err(self.rejected.add(FLOOD_WINDOW) > rate * 2.0)
    }

    /// The client is alive: keeps its presence entries from expiring.
    pub async fn refresh_presence(&self) {
        for (_, guard) in self.subs.values() {
            if let Some(g) = guard {
                g.refresh().await;
            }
        }
    }

    /// Leaves every channel and presence, and the user registry, now.
    pub fn leave_all(&mut self) {
        self.subs.clear();
        self.patterns.clear();
        self.registration = None;
    }

    pub fn arm(&mut self, expiry: Expiry) {
        self.expiry = expiry;
        self.timer = match expiry {
            Expiry::Until(t) | Expiry::Grace(t) => Some(crate::transports::timer(&self.state, t)),
            Expiry::None => None,
        };
    }

    /// The connection is established (its token, if given at the start, adopted):
    /// `connection.opened` for the webhooks that take it.
    pub fn opened(&mut self) {
        let user = self.identity.as_ref().map(|i| i.user.as_str());
        self.events = crate::webhooks::ConnectionEvents::open(&self.state, &self.client, user, W::TRANSPORT);
    }

    /// The user of this session's token, if it has one.
    pub fn user(&self) -> Option<&str> {
        self.identity.as_ref().map(|i| i.user.as_str())
    }

    /// A direct message from this session, if `[direct]` lets it send to `to`.
    pub async fn send(&self, to: &protocol::To, data: &serde_json::value::RawValue) -> Result<String, ApiError> {
        let user = self.identity.as_ref().map(|i| i.user.as_str());
        let claim = self.identity.as_ref().is_some_and(|i| i.direct);
        let sender = ops::Sender { client: Some(&self.client), user, claim };
        ops::may_send(&self.state, &sender, to, self.shares_presence_with(to)).await?;
        ops::send_direct(&self.state, sender.from(), to, data).await
    }

    /// Whether `to` is in the presence of a channel this session is subscribed to (with
    /// presence).
    async fn shares_presence_with(&self, to: &protocol::To) -> bool {
        for (channel, (_, guard)) in self.subs.iter() {
            if guard.is_none() {
                continue;
            }
            let Ok(members) = self.state.presence.members(channel).await else { continue };
            let present = members.iter().any(|m| match (&to.client, &to.user) {
                (Some(c), _) => &m.client == c,
                (None, Some(u)) => &m.user == u,
                (None, None) => false,
            });
            if present {
                return true;
            }
        }
        false
    }

    fn set_datagrams(&mut self, name: &str, on: bool) {
        if self.datagrams.is_empty() && !on {
            return;
        }
        let mut names: Vec<String> = std::mem::take(&mut self.datagrams).into_vec();
        names.retain(|n| n != name);
        if on {
            names.push(name.to_string());
        }
        self.datagrams = names.into_boxed_slice();
    }

    /// Whether this session asked for `channel`'s volatile publications as datagrams
    /// (on its subscription to the channel, or to a pattern covering it).
    pub fn wants_datagrams(&self, channel: &ChannelName) -> bool {
        self.datagrams.iter().any(|name| switchboard_core::pattern::covers(name, channel))
    }

    /// Makes this session addressable by direct messages (once, at `connect`).
    fn register_direct(&mut self) {
        if self.direct || !W::DIRECT || !self.state.config.direct.enabled {
            return;
        }
        self.state.registry.insert_client(&self.client, &self.queue, W::text);
        if let Some(who) = &self.identity {
            self.state.registry.set_client_user(&self.client, &who.user);
        }
        self.direct = true;
    }

    /// What an anonymous client says about itself (small and public only: it is shown
    /// to others in presence, under `"unverified"`).
    pub fn claim(&mut self, about: serde_json::Value) {
        if about.to_string().len() <= 1024 {
            self.claimed = Some(Box::new(about));
        }
    }

    /// Adopts a verified identity: registers the connection under its user (for
    /// `/api/disconnect`) and arms the expiry timer.
    pub fn set_identity(&mut self, who: Identity) {
        if let Some(e) = &mut self.events {
            e.set_user(&who.user);
        }
        if self.direct {
            self.state.registry.set_client_user(&self.client, &who.user);
        }
        self.arm(Expiry::Until(who.expires_at_ms()));
        if self.registration.is_none() {
            self.registration =
                Some(Box::new(self.state.registry.register(&who.user, who.jti.clone(), self.queue.clone())));
        }
        self.identity = Some(Box::new(who));
    }

    /// Queues a frame behind what is queued, within the byte bound.
    pub fn push(&self, frame: Bytes) {
        let _ = self.queue.push(Event::Frame(frame));
    }

    /// Queues a last frame regardless of the bound (a close must get out).
    pub fn push_final(&self, frame: Bytes) {
        self.queue.push_replay(Event::Frame(frame));
    }

    pub fn close_with(&self, code: u16, reason: &str) {
        self.push_final(W::close(code, reason));
        self.queue.close(CloseReason::Normal);
    }

    /// An error reply, counted in the metrics by its code.
    pub fn error_reply(&self, id: Option<u64>, e: &ApiError) -> String {
        self.state.metrics.error(e.code.as_str());
        protocol::error(id, e)
    }

    pub fn reply(&self, text: String) {
        self.push(W::text(text.as_bytes()));
    }

    /// Handles one command. Returns false when the connection is closing.
    pub async fn command(&mut self, text: &str) -> bool {
        if let Err(flood) = self.take_command() {
            if flood {
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
            Command::Subscribe { channel, since, rewind, token: _, datagrams } if is_pattern(&channel) => {
                let r = if since.is_some() || rewind.is_some() {
                    Err(ApiError::new(Code::InvalidPattern, "pattern subscriptions are live-only: no since or rewind"))
                } else {
                    self.gated_pattern(&channel)
                };
                match r {
                    Ok(p) => self.subscribe_pattern(p).await.map(|()| {
                        self.set_datagrams(&channel, datagrams);
                        Some(serde_json::json!({"channel": channel, "pattern": true}).to_string())
                    }),
                    Err(e) => Err(e),
                }
            }
            Command::Subscribe { channel, since, rewind, token, datagrams } => {
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
                res.map(|()| {
                    self.set_datagrams(&channel, datagrams);
                    None
                })
            }
            Command::Unsubscribe { channel } if is_pattern(&channel) => match self.patterns.remove(&channel) {
                Some(_) => {
                    self.set_datagrams(&channel, false);
                    Ok(Some("{}".to_string()))
                }
                None => Err(ApiError::new(Code::NotSubscribed, format!("not subscribed to {channel:?}"))),
            },
            Command::Unsubscribe { channel } => {
                let ch = ChannelName::parse(&channel).map_err(|e| ApiError::channel(&channel, e));
                ch.and_then(|ch| match self.subs.remove(&ch) {
                    Some(_) => {
                        self.set_datagrams(&channel, false);
                        Ok(Some("{}".to_string()))
                    }
                    None => Err(ApiError::new(Code::NotSubscribed, format!("not subscribed to {channel:?}"))),
                })
            }
            Command::Publish { channel, data, volatile, key, token, meta } => {
                match self.gated(Operation::Publish, &channel, token) {
                    Ok(r) => match ops::payload(&self.state, data) {
                        Ok(data) => {
                            let by = ops::Publisher::Client { client: Some(&self.client), user: self.user() };
                            let meta = meta.as_deref();
                            match meta.map(|m| ops::check_meta(&self.state, m)).transpose() {
                                Ok(_) => ops::publish_to(&self.state, &r, data, volatile, key, by, meta)
                                    .await
                                    .map(|o| Some(o.reply())),
                                Err(e) => Err(e),
                            }
                        }
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                }
            }
            Command::History { channel, since, limit, token } => {
                match self.gated(Operation::History, &channel, token) {
                    Ok(r) => ops::history_json(&self.state, &r, since.as_deref(), limit)
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
                    self.claim(c);
                }
                if self.identity.is_some() && token.is_some() {
                    Err(ApiError::new(Code::InvalidRequest, "already authenticated; send `refresh` with a new token"))
                } else {
                    match token.as_deref().map(|t| crate::transports::verify(&self.state, t)).transpose() {
                        Ok(who) => {
                            if let Some(who) = who {
                                self.set_identity(who);
                            }
                            self.register_direct();
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
            Command::Refresh { token } => match crate::transports::verify(&self.state, &token) {
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
            Command::Send { to, data } => self.send(&to, data).await.map(Some),
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
    pub async fn subscribe(
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
        self.check_room()?;
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
        // (An empty reply is none: a transport that answers in its own packets.)
        let text = reply(pending.outcome(), &r.channel);
        if !text.is_empty() {
            self.reply(text);
        }
        let handle = pending.go_live();
        if let Some(g) = &guard {
            // The subscribe succeeded and was confirmed; a join event lost to a broker
            // hiccup is not worth failing it for (presence itself is in place).
            if let Err(e) = g.announce().await {
                tracing::debug!("join event not published: {}", e.message);
            }
        }
        // Keyed by the hub's copy of the name (the one this request parsed is let go).
        let name = handle.subscription().channel().clone();
        self.subs.insert(name, (handle, guard.map(Box::new)));
        Ok(())
    }

    /// Room for one more subscription under `ws.max_subscriptions`.
    fn check_room(&self) -> Result<(), ApiError> {
        let max = self.state.config.ws.max_subscriptions;
        if self.subs.len() + self.patterns.len() >= max {
            return Err(ApiError::new(
                Code::TooManySubscriptions,
                format!("at most {max} subscriptions per connection"),
            ));
        }
        Ok(())
    }

    /// The caller has authorized the pattern.
    pub async fn subscribe_pattern(&mut self, p: ResolvedPattern) -> Result<(), ApiError> {
        let raw = p.pattern.to_string();
        if self.patterns.contains_key(&raw) {
            return Err(ApiError::new(Code::AlreadySubscribed, format!("already subscribed to {raw:?}")));
        }
        self.check_room()?;
        self.queue.raise_bound(p.options.queue_max_bytes);
        let handle = self.state.hub.subscribe_pattern(p.pattern, self.queue.clone()).await?;
        self.patterns.insert(raw, handle);
        Ok(())
    }

    /// Resolves a wildcard pattern and asks the gate whether this session may subscribe
    /// to every channel it can match.
    pub fn gated_pattern(&self, pattern: &str) -> Result<ResolvedPattern, ApiError> {
        let p = resolve_pattern(&self.state, pattern)?;
        auth::gate_pattern(self.identity.as_deref(), &p, &self.state.deny)?;
        Ok(p)
    }

    /// Ends the subscription to a channel or pattern; false if there was none.
    pub fn unsubscribe(&mut self, name: &str) -> bool {
        if is_pattern(name) {
            return self.patterns.remove(name).is_some();
        }
        ChannelName::parse(name).is_ok_and(|ch| self.subs.remove(&ch).is_some())
    }

    /// Resolves `channel` and asks the gate whether this connection may perform `op` on
    /// it: every channel command goes through here. `token` is a subscription token.
    pub fn gated(&self, op: Operation, channel: &str, token: Option<String>) -> Result<Resolved, ApiError> {
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

/// A subscription's outcome as the protocol shows it.
pub fn outcome_json(channel: &ChannelName, o: &SubscribeOutcome) -> String {
    serde_json::json!({
        "channel": channel, "epoch": &*o.position.epoch, "offset": o.position.offset,
        "recovered": o.recovered, "replayed": o.replayed,
    })
    .to_string()
}

/// A session's subscriptions: a vector searched in order, not a hash map. A connection
/// has one or a few, and a hash map's smallest table (four buckets) cost every idle
/// connection ~190 bytes where one entry takes 48; at the cap of `ws.max_subscriptions`
/// (1,000) a lookup is a scan of 1,000 names, once per subscribe or unsubscribe.
pub(crate) struct SmallMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        SmallMap(Vec::new())
    }
}

impl<K: PartialEq, V> SmallMap<K, V> {
    fn position<Q>(&self, k: &Q) -> Option<usize>
    where
        K: std::borrow::Borrow<Q>,
        Q: PartialEq + ?Sized,
    {
        self.0.iter().position(|(key, _)| key.borrow() == k)
    }

    pub(crate) fn contains_key<Q>(&self, k: &Q) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: PartialEq + ?Sized,
    {
        self.position(k).is_some()
    }

    /// Adds an entry; the caller has checked that `k` is not there.
    pub(crate) fn insert(&mut self, k: K, v: V) {
        debug_assert!(!self.contains_key(&k));
        if self.0.len() == self.0.capacity() {
            // Exactly one at first (a Vec's first push would make room for four), then
            // doubling.
            self.0.reserve_exact(self.0.len().max(1));
        }
        self.0.push((k, v));
    }

    pub(crate) fn remove<Q>(&mut self, k: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: PartialEq + ?Sized,
    {
        let (_, v) = self.0.swap_remove(self.position(k)?);
        if self.0.len() < self.0.capacity() / 4 {
            self.0.shrink_to(self.0.len() * 2);
        }
        Some(v)
    }

    pub(crate) fn get<Q>(&self, k: &Q) -> Option<&V>
    where
        K: std::borrow::Borrow<Q>,
        Q: PartialEq + ?Sized,
    {
        self.position(k).map(|i| &self.0[i].1)
    }

    /// Sets `k` to `v`, replacing what it had.
    pub(crate) fn set(&mut self, k: K, v: V) {
        match self.position(&k) {
            Some(i) => self.0[i].1 = v,
            None => self.insert(k, v),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &K> {
        self.0.iter().map(|(k, _)| k)
    }

    pub(crate) fn clear(&mut self) {
        self.0 = Vec::new();
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.0.iter().map(|(_, v)| v)
    }
}
