//! The channel operations every transport shares: publish (with its idempotency keys
//! and volatile publications), history, and the checks on a payload. The server API,
//! the client HTTP endpoints, the WebSocket commands — and any transport to come — call
//! these, after the gate.

use bytes::Bytes;
use serde_json::value::RawValue;
use switchboard_core::{BrokerError, HistoryRequest, Meta};

use crate::app::AppState;
use crate::cursor;
use crate::error::{ApiError, Code};

/// Checks a payload against the size limit and returns it as single-line JSON text (SSE
/// `data:` lines and the canonical encoding rely on it having no raw newlines).
pub fn payload(state: &AppState, data: &RawValue) -> Result<Bytes, ApiError> {
    let max = state.config.limits.max_message_bytes;
    let text = data.get();
    if text.len() > max {
        return Err(ApiError::new(Code::MessageTooLarge, format!("data is {} bytes; the limit is {max}", text.len())));
    }
    if text.contains(['\n', '\r']) {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ApiError::new(Code::InvalidJson, e.to_string()))?;
        return Ok(Bytes::from(v.to_string()));
    }
    Ok(Bytes::copy_from_slice(text.as_bytes()))
}

/// Checks a publication's meta as a client or the API gave it: a payload format of 0 or
/// 1, a response topic without wildcards, and its JSON within `limits.max_message_bytes`.
pub fn check_meta(state: &AppState, meta: &Meta) -> Result<(), ApiError> {
    let bad = |why: String| Err(ApiError::new(Code::InvalidRequest, format!("meta: {why}")));
    if meta.format.is_some_and(|f| f > 1) {
        return bad("format is 0 (bytes) or 1 (UTF-8)".into());
    }
    if let Some(t) = &meta.response_topic {
        if t.is_empty() || t.contains(['+', '#', '\0']) {
            return bad("response_topic is a topic name: not empty, no wildcards".into());
        }
    }
    // (MQTT carries each in at most 65,535 bytes.)
    let strings = [&meta.content_type, &meta.response_topic].into_iter().flatten().map(|s| s.len());
    let pairs = meta.headers.iter().flat_map(|(k, v)| [k.len(), v.len()]);
    let binary = meta.correlation.iter().map(|c| c.len());
    if strings.chain(pairs).chain(binary).any(|n| n > u16::MAX as usize) {
        return bad("each string (and the correlation data) is at most 65,535 bytes".into());
    }
    let max = state.config.limits.max_message_bytes;
    let len = serde_json::to_vec(meta).map_or(usize::MAX, |v| v.len());
    if len > max {
        return Err(ApiError::new(Code::MessageTooLarge, format!("meta is {len} bytes of JSON; the limit is {max}")));
    }
    Ok(())
}

/// Longest idempotency key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// What a publish did.
#[derive(Debug)]
pub enum Outcome {
    /// Stored at its position — or, `duplicate`, stored earlier under the same idempotency
    /// key, and nothing new was published.
    Stored(switchboard_core::Published),
    /// Delivered to whoever was subscribed, not stored.
    Volatile,
}

impl Outcome {
    /// The answer every transport gives: `{"epoch","offset"}` (plus `"duplicate":true`
    /// for a repeated idempotency key) or `{"volatile":true}`.
    pub fn reply(&self) -> String {
        match self {
            Outcome::Stored(p) => {
                let dup = if p.duplicate { r#","duplicate":true"# } else { "" };
                format!("{{\"epoch\":\"{}\",\"offset\":{}{dup}}}", p.position.epoch, p.position.offset)
            }
            Outcome::Volatile => r#"{"volatile":true}"#.to_string(),
        }
    }

    /// Whether it repeated an idempotency key within its window.
    pub fn duplicate(&self) -> bool {
        matches!(self, Outcome::Stored(p) if p.duplicate)
    }

    /// The stored publication's offset.
    pub fn offset(&self) -> Option<u64> {
        match self {
            Outcome::Stored(p) => Some(p.position.offset),
            Outcome::Volatile => None,
        }
    }
}

/// Publishes for the API, for clients and for sources. A repeated idempotency key is
/// counted and answered as a duplicate, and raises no `publication` webhook.
pub async fn publish_to(
    state: &AppState,
    r: &crate::session::Resolved,
    data: Bytes,
    volatile: Option<bool>,
    key: Option<String>,
    by: Publisher<'_>,
    meta: Option<&Meta>,
) -> Result<Outcome, ApiError> {
    // The `publication` webhook keeps its own handle on the bytes, when one is wanted.
    let hook = state.webhooks.as_ref().filter(|w| w.wants("publication")).map(|_| data.clone());
    if let Some(k) = &key {
        if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY {
            return Err(ApiError::new(
                Code::InvalidIdempotencyKey,
                format!("an idempotency key is 1 to {MAX_IDEMPOTENCY_KEY} bytes; this one is {}", k.len()),
            ));
        }
    }
    // What the broker stores and forwards: the data, with the meta in front when it has one.
    let stored = Meta::wrap(meta, data);
    if volatile.unwrap_or(r.options.volatile) {
        if key.is_some() {
            return Err(ApiError::new(Code::InvalidRequest, "volatile publications take no idempotency key"));
        }
        let res = state.hub.broker().publish_volatile(&r.channel, switchboard_core::Kind::Volatile, stored).await;
        if res.is_err() {
            state.metrics.broker_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        res?;
        state.metrics.publishes_volatile.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(data) = hook {
            publication_event(state, r, &data, None, by, meta);
        }
        return Ok(Outcome::Volatile);
    }
    let window = std::time::Duration::from_secs(state.config.limits.idempotency_window_secs);
    let started = std::time::Instant::now();
    let res = state.hub.broker().publish(&r.channel, stored, &r.options.publish_options(key, window)).await;
    let m = &*state.metrics;
    m.broker_publish.observe(started.elapsed());
    if res.is_err() {
        m.broker_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let published = res?;
    if published.duplicate {
        m.publishes_duplicate.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    } else {
        m.publishes_stored.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(data) = hook {
            publication_event(state, r, &data, Some(&published.position), by, meta);
        }
    }
    Ok(Outcome::Stored(published))
}

/// Who publishes: a client (its connection's id, when it has one, and its user) or the
/// server API.
#[derive(Debug, Clone, Copy)]
pub enum Publisher<'a> {
    Api,
    Client { client: Option<&'a str>, user: Option<&'a str> },
}

/// The `publication` webhook event.
fn publication_event(
    state: &AppState,
    r: &crate::session::Resolved,
    data: &[u8],
    pos: Option<&switchboard_core::StreamPosition>,
    by: Publisher<'_>,
    meta: Option<&Meta>,
) {
    let from_client = matches!(by, Publisher::Client { .. });
    crate::webhooks::emit(state, "publication", Some(&r.channel), from_client, || {
        let data: serde_json::Value = serde_json::from_slice(data).unwrap_or(serde_json::Value::Null);
        let publisher = match by {
            Publisher::Api => serde_json::json!({"server": true}),
            Publisher::Client { client, user } => serde_json::json!({"client": client, "user": user}),
        };
        let mut e = serde_json::json!({"channel": r.channel, "data": data, "publisher": publisher});
        if let Some(m) = meta.filter(|m| !m.is_empty()) {
            e["meta"] = serde_json::to_value(m).unwrap_or_default();
        }
        match pos {
            Some(p) => (e["epoch"], e["offset"]) = (p.epoch.to_string().into(), p.offset.into()),
            None => e["volatile"] = true.into(),
        }
        e
    });
}

/// Who sends a direct message: the client (when it is known and proven), its user (when
/// it has a token), and whether its token has the `direct` claim.
pub struct Sender<'a> {
    pub client: Option<&'a str>,
    pub user: Option<&'a str>,
    pub claim: bool,
}

impl Sender<'_> {
    /// The `from` the target sees.
    pub fn from(&self) -> serde_json::Value {
        serde_json::json!({"client": self.client, "user": self.user})
    }
}

/// Whether `[direct] policy` lets `sender` message `to`. `shares_presence` says whether
/// the target is present in a channel the sender is present in (asked only under the
/// `presence` policy).
pub async fn may_send(
    state: &AppState,
    sender: &Sender<'_>,
    to: &crate::commands::protocol::To,
    shares_presence: impl std::future::Future<Output = bool>,
) -> Result<(), ApiError> {
    use crate::config::DirectPolicy;
    let policy = state.config.direct.policy(state.dev);
    if policy != DirectPolicy::Anyone && sender.user.is_none() {
        return Err(ApiError::new(Code::TokenRequired, "direct messages need a connection token"));
    }
    let allowed = match policy {
        DirectPolicy::Anyone | DirectPolicy::Authenticated => true,
        DirectPolicy::SameUser => match (&to.user, &to.client) {
            (Some(u), _) => Some(u.as_str()) == sender.user,
            (None, Some(c)) => state.registry.client_user(c).flatten().as_deref() == sender.user,
            (None, None) => false,
        },
        DirectPolicy::Claim => sender.claim,
        DirectPolicy::Presence => shares_presence.await,
    };
    if allowed {
        return Ok(());
    }
    let why = match policy {
        DirectPolicy::SameUser => "direct messages go to your own connections only",
        DirectPolicy::Claim => "direct messages need a token with the claim \"direct\": true",
        _ => "direct messages go to those present in a channel you are subscribed to",
    };
    Err(ApiError::new(Code::PermissionDenied, why))
}

/// How long a direct message waits for the other nodes to say whether they delivered it.
const DIRECT_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Delivers a direct message: `{"message":{"from":…,"data":…}}` to connection `to.client`
/// or every connection of `to.user` — here, and through the backplane on the other nodes,
/// each of which answers how many of its connections took it. A target that no node has
/// is an error. Not stored.
pub async fn send_direct(
    state: &AppState,
    from: serde_json::Value,
    to: &crate::commands::protocol::To,
    data: &serde_json::value::RawValue,
) -> Result<String, ApiError> {
    if !state.config.direct.enabled {
        return Err(ApiError::new(
            Code::TransportDisabled,
            "direct messages are off on this server ([direct] enabled)",
        ));
    }
    if data.get().len() > state.config.limits.max_message_bytes {
        return Err(ApiError::new(Code::MessageTooLarge, "the message is over limits.max_message_bytes"));
    }
    let json = format!("{{\"message\":{{\"from\":{from},\"data\":{}}}}}", data.get());
    let delivered = state.registry.deliver(to.client.as_deref(), to.user.as_deref(), json.as_bytes());
    state.metrics.direct_messages.fetch_add(delivered as u64, std::sync::atomic::Ordering::Relaxed);
    let (mut delivered, mut unanswered) = (delivered, 0);
    if state.config.broker.kind.is_cluster() {
        let (there, silent) = elsewhere(state, to, json).await?;
        (delivered, unanswered) = (delivered + there, silent);
    }
    if delivered == 0 && unanswered == 0 {
        let who = to.client.as_deref().map_or_else(|| format!("user {:?}", to.user), |c| format!("client {c:?}"));
        return Err(ApiError::new(
            Code::TargetNotConnected,
            format!("{who} has no connection that takes direct messages"),
        ));
    }
    if unanswered > 0 {
        // Some node did not answer in time: it may have delivered it, or not.
        return Ok(format!("{{\"delivered\":{delivered},\"unanswered_nodes\":{unanswered}}}"));
    }
    Ok(format!("{{\"delivered\":{delivered}}}"))
}

/// Sends a direct message to the other live nodes and waits (at most
/// [`DIRECT_ANSWER_WAIT`]) for each to say how many of its connections took it: (how
/// many took it there, how many nodes did not answer).
async fn elsewhere(
    state: &AppState,
    to: &crate::commands::protocol::To,
    json: String,
) -> Result<(usize, usize), ApiError> {
    let nodes = state.hub.broker().nodes().await?.unwrap_or_default();
    let mut waiting: std::collections::HashSet<String> =
        nodes.into_iter().map(|n| n.id).filter(|id| *id != state.node_id).collect();
    if waiting.is_empty() {
        return Ok((0, 0));
    }
    let req = state.direct_requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    state.direct_pending.lock().unwrap_or_else(|p| p.into_inner()).insert(req, tx);
    struct Pending<'a>(&'a AppState, u64);
    impl Drop for Pending<'_> {
        fn drop(&mut self) {
            self.0.direct_pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1);
        }
    }
    let _pending = Pending(state, req);
    let origin = state.node_id.clone();
    let msg = crate::cluster::Control::Direct { client: to.client.clone(), user: to.user.clone(), json, origin, req };
    crate::cluster::broadcast(state, msg).await?;
    let mut delivered = 0;
    let answers = async {
        while let Some((node, n)) = rx.recv().await {
            if waiting.remove(&node) {
                delivered += n;
            }
            if waiting.is_empty() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DIRECT_ANSWER_WAIT, answers).await;
    Ok((delivered, waiting.len()))
}

/// The history answer shared by `GET /api/history` and the WebSocket `history` command:
/// `{"publications":[…],"epoch","offset","recovered"}`.
pub async fn history_json(
    state: &AppState,
    resolved: &crate::session::Resolved,
    since: Option<&str>,
    limit: Option<u64>,
) -> Result<Vec<u8>, ApiError> {
    if !resolved.options.keeps_history() {
        return Err(ApiError::new(
            Code::HistoryDisabled,
            format!("namespace {:?} keeps no history", resolved.channel.namespace()),
        ));
    }
    let max = state.config.poll.max_limit as u64;
    let limit = match limit {
        None => state.config.poll.default_limit,
        Some(n) if (1..=max).contains(&n) => n as usize,
        Some(n) => return Err(ApiError::new(Code::BadLimit, format!("limit {n}: expected 1 to {max}"))),
    };
    let since = since.map(cursor::parse_position).transpose()?;
    let latest = since.is_none();
    let req = HistoryRequest { since, limit: Some(limit), latest };
    let (pubs, position, recovered) = match state.hub.broker().history(&resolved.channel, req).await {
        Ok(h) => (h.publications, h.position, true),
        Err(BrokerError::PositionLost { current }) => (Vec::new(), current, false),
        Err(e) => return Err(e.into()),
    };
    let mut body = Vec::with_capacity(64 + pubs.iter().map(|p| p.data.len() + 100).sum::<usize>());
    body.extend_from_slice(b"{\"publications\":[");
    for (i, p) in pubs.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(p.json());
    }
    body.extend_from_slice(
        format!("],\"epoch\":\"{}\",\"offset\":{},\"recovered\":{recovered}}}", position.epoch, position.offset)
            .as_bytes(),
    );
    Ok(body)
}
