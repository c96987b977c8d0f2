//! Server-Sent Events: `GET /sse?channel=a&channel=b`.
//!
//! Stream layout (see docs/protocol.md):
//!
//! ```text
//! retry: 2000
//!
//! id: <cursor>
//! event: subscribed
//! data: {"channels":[{"channel":"a","epoch":"…","offset":4,"recovered":true}]}
//!
//! id: <cursor>
//! event: message
//! data: {"channel":"a","offset":5,"epoch":"…","time":…,"data":…}
//! ```
//!
//! `id` is always the cursor of everything received so far, so the browser's automatic
//! `Last-Event-ID` resumes exactly. A position that cannot be continued produces
//! `event: reset`; the end of the stream is announced with `event: disconnect`.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{Extensions, HeaderMap};
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use switchboard_core::queue::Event;
use switchboard_core::{ChannelName, CloseReason, Delivery, Kind, StreamPosition};
use tokio::sync::watch;
use tokio::time::{Interval, MissedTickBehavior};

use crate::app::AppState;
use crate::cursor;
use crate::error::{ApiError, Code};
use crate::registry::Registration;
use crate::session::{self, Query, Session};

/// Encoding slots in [`Delivery`] owned by this transport.
const SLOT_FULL_EVENT: usize = 0;
const SLOT_EVENT_BODY: usize = 1;
/// Join/leave events share slot 0 with full events: a delivery is one kind or the other.
const SLOT_OTHER_EVENT: usize = 0;

pub async fn handler(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    ext: Extensions,
) -> Result<Response, ApiError> {
    if !state.config.sse.enabled {
        return Err(ApiError::new(Code::TransportDisabled, "the SSE transport is disabled on this server"));
    }
    let slot = super::admit(&state, &headers, &ext)?;
    let q = Query::parse(raw.as_deref());
    let (channels, patterns) = session::resolve_mixed(&state, &q.channels)?;
    if channels.is_empty() && patterns.is_empty() {
        return Err(ApiError::new(Code::InvalidRequest, "name at least one channel: ?channel=NAME"));
    }
    let who = super::identity(&state, &headers, &q)?;
    let sub_tokens = q.all("sub_token");
    let cred = crate::auth::Credentials { who: who.as_ref(), sub_tokens: &sub_tokens, subscribed: false };
    super::gate_all(&state, crate::auth::Operation::Subscribe, &channels, &cred)?;
    for p in &patterns {
        crate::auth::gate_pattern(who.as_ref(), p, &state.deny)?;
    }
    let header_id = headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::trim).filter(|s| !s.is_empty());
    // (`since`, the name the WebSocket URL and polling use, is taken too.)
    let given = header_id
        .or_else(|| q.get("last_event_id").filter(|s| !s.is_empty()))
        .or_else(|| q.get("since").filter(|s| !s.is_empty()));
    let asked = given.map(|s| cursor::parse(s, channels.len())).transpose()?;
    let rewind = session::check_rewind(&channels, q.int("rewind", 1..=u32::MAX as u64, Code::BadRewind)?)?;
    let client = crate::presence::client_id();
    // `&client=<JSON>`: an anonymous client's own description for presence (unverified).
    let claimed = match q.get("client") {
        Some(c) if c.len() > 1024 => {
            return Err(ApiError::new(Code::InvalidRequest, "`client` is at most 1024 bytes of JSON"));
        }
        Some(c) => Some(
            serde_json::from_str::<serde_json::Value>(c)
                .map_err(|_| ApiError::new(Code::InvalidRequest, "`client` is not JSON"))?,
        ),
        None => None,
    };
    let presence = Some(session::Presence { client: &client, who: who.as_ref(), claimed: claimed.as_ref() });
    let session = session::open(&state, &channels, asked.clone(), rewind, &patterns, presence).await?;

    let period = Duration::from_secs(state.config.sse.keepalive_secs);
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let ip = super::client_ip(&state, &headers, &ext);
    tracing::debug!(client_ip = ?ip, channels = channels.len(), patterns = patterns.len(), "sse stream opened");
    let registration = who.as_ref().map(|w| state.registry.register(&w.user, w.jti.clone(), session.queue.clone()));
    // Direct messages reach the stream too, as `event: direct`.
    let direct = state.config.direct.enabled.then(|| {
        let r = state.registry.add_client(&client, &session.queue, direct_event);
        if let Some(w) = &who {
            state.registry.set_client_user(&client, &w.user);
        }
        Box::new(r)
    });
    // With direct messages on, the stream's `client_key` (`<client>.<secret>`): the
    // client's `POST /send` proves with it that it sends as this client.
    let client = if direct.is_some() { state.registry.new_client_key(&client) } else { client };
    let events = crate::webhooks::ConnectionEvents::open(&state, &client, who.as_ref().map(|w| w.user.as_str()), "sse");
    // The stream ends when the token does; the client reconnects with a fresh one.
    let expiry = who.as_ref().map(|w| super::timer(&state, w.expires_at_ms()));
    let stream =
        SseStream {
            gauge: state.metrics.connection(crate::metrics::Transport::Sse),
            patterns: patterns.iter().map(|p| p.pattern.to_string()).collect(),
            _slot: slot,
            _registration: registration,
            _direct: direct,
            _events: events,
            client,
            expiry,
            channels: channels.iter().map(|r| r.channel.clone()).collect(),
            // Reset channels keep the client's old position until their reset event is
            // sent, so a reconnect in between is told again.
            positions: session
                .starts
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    if s.reset {
                        asked.as_ref().map_or(s.position.clone(), |a| a[i].clone())
                    } else {
                        s.position.clone()
                    }
                })
                .collect(),
            session,
            keepalive,
            shutdown: state.shutdown.clone(),
            shutdown_seen: false,
            retry_ms: state.config.sse.retry_ms,
            batch: Vec::new(),
            ready: Default::default(),
            phase: Phase::Preamble,
        };
    let body = futures_util::stream::unfold(stream, |mut s| async move {
        let chunk = s.next_chunk().await?;
        s.gauge.metrics().bytes_out.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Some((Ok::<_, std::convert::Infallible>(chunk), s))
    });
    Ok(Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(body))
        .expect("static headers"))
}

enum Phase {
    Preamble,
    Live,
    Done,
}

struct SseStream {
    gauge: crate::metrics::ConnectionGauge,
    patterns: Vec<String>,
    _slot: super::Admitted,
    _registration: Option<Registration>,
    _direct: Option<Box<crate::registry::ClientRegistration>>,
    _events: Option<Box<crate::webhooks::ConnectionEvents>>,
    /// This stream's client id (in `subscribed`: what direct messages are sent to), as
    /// its `client_key` `<client>.<secret>` when direct messages are on.
    client: String,
    expiry: Option<super::Timer>,
    channels: Vec<ChannelName>,
    positions: Vec<StreamPosition>,
    session: Session,
    keepalive: Interval,
    shutdown: watch::Receiver<bool>,
    shutdown_seen: bool,
    retry_ms: u64,
    batch: Vec<Event>,
    /// Chunks rendered and not yet handed to hyper: mostly the publications' own shared
    /// encodings, passed on as they are — nothing is copied per subscriber.
    ready: std::collections::VecDeque<Bytes>,
    phase: Phase,
}

impl SseStream {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if let Some(b) = self.ready.pop_front() {
            if self.ready.is_empty() && self.ready.capacity() > 64 {
                self.ready = Default::default(); // a burst is over: idle streams hold little
            }
            return Some(b);
        }
        match self.phase {
            Phase::Preamble => {
                self.phase = Phase::Live;
                return Some(self.preamble());
            }
            Phase::Done => return None,
            Phase::Live => {}
        }
        if *self.shutdown.borrow() {
            self.begin_shutdown();
        }
        loop {
            tokio::select! {
                r = self.session.queue.next_batch(&mut self.batch) => match r {
                    Ok(()) => {
                        self.render_batch();
                        if let Some(b) = self.ready.pop_front() {
                            return Some(b);
                        }
                    }
                    Err(reason) => {
                        self.phase = Phase::Done;
                        return Some(self.disconnect(reason));
                    }
                },
                _ = self.keepalive.tick() => {
                    for g in &self.session.presence {
                        g.refresh().await;
                    }
                    return Some(Bytes::from_static(b": keepalive\n\n"));
                }
                _ = self.shutdown.changed(), if !self.shutdown_seen => self.begin_shutdown(),
                _ = super::maybe_sleep(&mut self.expiry), if self.expiry.is_some() => {
                    self.expiry = None;
                    self.session.queue.close(CloseReason::TokenExpired);
                }
            }
        }
    }

    fn begin_shutdown(&mut self) {
        self.shutdown_seen = true;
        self.session.queue.close(CloseReason::Shutdown);
    }

    fn cursor(&self) -> String {
        cursor::format(&self.positions)
    }

    fn preamble(&mut self) -> Bytes {
        let mut out = BytesMut::new();
        out.put_slice(format!("retry: {}\n\n", self.retry_ms).as_bytes());
        let subscribed: Vec<_> = self
            .session
            .starts
            .iter()
            .map(|s| {
                serde_json::json!({
                    "channel": s.channel, "epoch": &*s.position.epoch, "offset": s.position.offset, "recovered": !s.reset,
                })
            })
            .collect();
        let mut data = serde_json::json!({ "channels": subscribed, "patterns": self.patterns });
        match self.client.split_once('.') {
            Some((client, _)) => {
                data["client"] = client.into();
                data["client_key"] = self.client.as_str().into();
            }
            None => data["client"] = self.client.as_str().into(),
        }
        out.put_slice(format!("id: {}\nevent: subscribed\ndata: {data}\n\n", self.cursor()).as_bytes());
        let resets: Vec<(usize, StreamPosition)> = self
            .session
            .starts
            .iter()
            .enumerate()
            .filter(|(_, s)| s.reset)
            .map(|(i, s)| (i, s.position.clone()))
            .collect();
        for (i, position) in resets {
            self.write_reset(&mut out, i, position, "position_lost");
        }
        out.freeze()
    }

    fn write_reset(&mut self, out: &mut BytesMut, i: usize, position: StreamPosition, reason: &str) {
        let data = serde_json::json!({
            "channel": self.channels[i], "epoch": &*position.epoch, "offset": position.offset, "reason": reason,
        });
        self.positions[i] = position;
        out.put_slice(format!("id: {}\nevent: reset\ndata: {data}\n\n", self.cursor()).as_bytes());
    }

    /// Turns a batch of events into chunks in `ready`: shared encodings as they are;
    /// only what is this stream's own (a multi-channel cursor, a reset) is built here.
    fn render_batch(&mut self) {
        let batch = std::mem::take(&mut self.batch);
        for e in &batch {
            match e {
                Event::Publication(d) if !d.publication.is_stored() => {
                    // Volatile and presence events: no id, so the cursor stays put.
                    self.ready.push_back(match d.publication.kind {
                        Kind::Join => d.encoded(SLOT_OTHER_EVENT, |d| named_event("join", d)),
                        Kind::Leave => d.encoded(SLOT_OTHER_EVENT, |d| named_event("leave", d)),
                        _ => d.encoded(SLOT_EVENT_BODY, event_body),
                    });
                }
                Event::Publication(d) => {
                    let Some(i) = self.channels.iter().position(|c| *c == d.publication.channel) else {
                        // Matched by a pattern only: live-only, outside the cursor.
                        self.ready.push_back(d.encoded(SLOT_EVENT_BODY, event_body));
                        continue;
                    };
                    let p = &d.publication;
                    if self.positions[i].epoch == p.epoch && p.offset <= self.positions[i].offset {
                        continue; // also matched by a pattern: sent once
                    }
                    self.positions[i] = p.position();
                    if self.channels.len() == 1 {
                        // One channel: the id is the publication's own position, so the
                        // whole event is the same for every subscriber — built once.
                        self.ready.push_back(d.encoded(SLOT_FULL_EVENT, full_event));
                    } else {
                        self.ready.push_back(Bytes::from(format!("id: {}\n", self.cursor())));
                        self.ready.push_back(d.encoded(SLOT_EVENT_BODY, event_body));
                    }
                }
                Event::Reset { channel, position } => {
                    if let Some(i) = self.channels.iter().position(|c| c == channel) {
                        let mut out = BytesMut::new();
                        self.write_reset(&mut out, i, position.clone(), "stream_reset");
                        self.ready.push_back(out.freeze());
                    }
                }
                Event::Frame(b) => self.ready.push_back(b.clone()),
            }
        }
        self.batch = batch;
        self.batch.clear();
    }

    fn disconnect(&self, reason: CloseReason) -> Bytes {
        let (name, retry, reconnect) = match reason {
            CloseReason::SlowConsumer => ("slow_consumer", self.retry_ms, true),
            CloseReason::Normal => ("closed", self.retry_ms, true),
            // Spread the reconnects of a draining node's clients over a window.
            CloseReason::Shutdown => ("shutdown", fastrand::u64(self.retry_ms / 2..=self.retry_ms.max(1) * 5), true),
            CloseReason::TokenExpired => ("token_expired", self.retry_ms, true),
            CloseReason::Disconnected => ("disconnected", self.retry_ms, false),
        };
        let data = serde_json::json!({"reason": name, "reconnect": reconnect, "retry_ms": retry});
        Bytes::from(format!("retry: {retry}\nevent: disconnect\ndata: {data}\n\n"))
    }
}

/// A direct message (`{"message":{"from","data"}}`) as `event: direct` with the inner
/// `{"from","data"}`.
fn direct_event(json: &[u8]) -> Bytes {
    let inner = crate::registry::message_of(json);
    let mut b = BytesMut::with_capacity(inner.len() + 24);
    b.put_slice(b"event: direct\ndata: ");
    b.put_slice(inner);
    b.put_slice(b"\n\n");
    b.freeze()
}

fn event_body(d: &Delivery) -> Bytes {
    let mut b = BytesMut::with_capacity(d.json().len() + 24);
    b.put_slice(b"event: message\ndata: ");
    b.put_slice(d.json());
    b.put_slice(b"\n\n");
    b.freeze()
}

fn named_event(name: &str, d: &Delivery) -> Bytes {
    let mut b = BytesMut::with_capacity(d.json().len() + 24);
    b.put_slice(format!("event: {name}\ndata: ").as_bytes());
    b.put_slice(d.json());
    b.put_slice(b"\n\n");
    b.freeze()
}

fn full_event(d: &Delivery) -> Bytes {
    let p = &d.publication;
    let mut b = BytesMut::with_capacity(d.json().len() + 48);
    b.put_slice(format!("id: {}:{}\n", p.epoch, p.offset).as_bytes());
    b.put_slice(&d.encoded(SLOT_EVENT_BODY, event_body));
    b.freeze()
}
