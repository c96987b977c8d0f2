//! The server API for applications: publish, broadcast, history, channels; and health.

use axum::body::Body;
use axum::extract::{RawQuery, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use switchboard_core::{BrokerError, HistoryRequest};

use crate::app::AppState;
use crate::cursor;
use crate::error::{ApiError, Code};
use crate::session::{resolve_channel, Query};

fn json(status: StatusCode, body: String) -> Response {
    (status, [("content-type", "application/json")], body).into_response()
}

/// Reads a request body of at most `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::new(Code::MessageTooLarge, format!("request body is larger than {limit} bytes")))
}

pub(crate) fn parse_json<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| json_error("request body", &e))
}

/// A JSON error in words for people: where the text stops being JSON, or which field is
/// missing or wrong — not the parser's own vocabulary.
pub(crate) fn json_error(what: &str, e: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Data => {
            // "missing field `channel`", "unknown field `x`, expected one of …": already
            // about the request's own fields; drop the parser's position suffix.
            let text = e.to_string();
            let text = text.split(" at line ").next().unwrap_or(&text).to_string();
            ApiError::new(Code::InvalidRequest, format!("{what}: {text}"))
        }
        Category::Eof => ApiError::new(Code::InvalidJson, format!("{what} is not valid JSON: it ends too early")),
        Category::Syntax | Category::Io => ApiError::new(
            Code::InvalidJson,
            format!("{what} is not valid JSON (line {}, column {})", e.line(), e.column()),
        ),
    }
}

/// Checks a payload against the size limit and returns it as single-line JSON text (SSE
/// `data:` lines and the canonical encoding rely on it having no raw newlines).
pub(crate) fn payload(state: &AppState, data: &RawValue) -> Result<Bytes, ApiError> {
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

fn body_limit(state: &AppState) -> usize {
    // Room for the envelope and for JSON escapes around a payload at the limit.
    state.config.limits.max_message_bytes * 2 + 64 * 1024
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest<'a> {
    channel: String,
    #[serde(borrow)]
    data: &'a RawValue,
    /// Idempotency key: a repeat within `limits.idempotency_window_secs` publishes nothing.
    key: Option<String>,
    /// Volatile: no offset, not stored, never replayed (defaults to the namespace's).
    volatile: Option<bool>,
}

/// Longest idempotency key accepted, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// Publishes for the API and for clients: returns the reply JSON, `{"epoch","offset"}`
/// or, for a volatile publication, `{"volatile":true}`.
pub(crate) async fn publish_to(
    state: &AppState,
    r: &crate::session::Resolved,
    data: Bytes,
    volatile: Option<bool>,
    key: Option<String>,
) -> Result<String, ApiError> {
    if let Some(k) = &key {
        if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY {
            return Err(ApiError::new(
                Code::InvalidIdempotencyKey,
                format!("an idempotency key is 1 to {MAX_IDEMPOTENCY_KEY} bytes; this one is {}", k.len()),
            ));
        }
    }
    if volatile.unwrap_or(r.options.volatile) {
        if key.is_some() {
            return Err(ApiError::new(Code::InvalidRequest, "volatile publications take no idempotency key"));
        }
        let res = state.hub.broker().publish_volatile(&r.channel, switchboard_core::Kind::Volatile, data).await;
        if res.is_err() {
            state.metrics.broker_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        res?;
        state.metrics.publishes_volatile.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Ok(r#"{"volatile":true}"#.to_string());
    }
    let window = std::time::Duration::from_secs(state.config.limits.idempotency_window_secs);
    let started = std::time::Instant::now();
    let res = state.hub.broker().publish(&r.channel, data, &r.options.publish_options(key, window)).await;
    let m = &*state.metrics;
    m.broker_publish.observe(started.elapsed());
    if res.is_err() {
        m.broker_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let pos = res?;
    m.publishes_stored.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(format!("{{\"epoch\":\"{}\",\"offset\":{}}}", pos.epoch, pos.offset))
}

/// `POST /api/publish {"channel":…, "data":…[, "key":…][, "volatile":true]}` →
/// `{"epoch":…, "offset":…}` (or `{"volatile":true}`).
pub async fn publish(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let body = read_body(req.into_body(), body_limit(&state)).await?;
    let r: PublishRequest = parse_json(&body)?;
    let resolved = resolve_channel(&state, &r.channel)?;
    let data = payload(&state, r.data)?;
    let reply = publish_to(&state, &resolved, data, r.volatile, r.key).await?;
    Ok(json(StatusCode::OK, reply))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastRequest<'a> {
    channels: Vec<String>,
    #[serde(borrow)]
    data: &'a RawValue,
    volatile: Option<bool>,
}

/// `POST /api/broadcast {"channels":[…], "data":…}` → `{"results":[…]}`, one result per
/// channel in request order: `{"channel","epoch","offset"}` or `{"channel","error"}`.
pub async fn broadcast(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let body = read_body(req.into_body(), body_limit(&state)).await?;
    let r: BroadcastRequest = parse_json(&body)?;
    let max = state.config.limits.max_channels_per_request;
    if r.channels.is_empty() {
        return Err(ApiError::new(Code::InvalidRequest, "channels must name at least one channel"));
    }
    if r.channels.len() > max {
        return Err(ApiError::new(Code::TooManyChannels, format!("{} channels; the limit is {max}", r.channels.len())));
    }
    let mut seen = std::collections::HashSet::with_capacity(r.channels.len());
    if let Some(twice) = r.channels.iter().find(|c| !seen.insert(c.as_str())) {
        let shown: String = twice.chars().take(64).collect();
        return Err(ApiError::new(Code::InvalidRequest, format!("channel {shown:?} named twice")));
    }
    let data = payload(&state, r.data)?;
    let mut results = Vec::with_capacity(r.channels.len());
    for name in &r.channels {
        let one = async {
            let resolved = resolve_channel(&state, name)?;
            publish_to(&state, &resolved, data.clone(), r.volatile, None).await
        };
        results.push(match one.await {
            Ok(reply) => {
                let mut v: serde_json::Value = serde_json::from_str(&reply).expect("our own JSON");
                v["channel"] = serde_json::json!(name);
                v
            }
            Err(e) => serde_json::json!({"channel": name, "error": {"code": e.code.as_str(), "message": e.message}}),
        });
    }
    Ok(json(StatusCode::OK, serde_json::json!({ "results": results }).to_string()))
}

/// `GET /api/history?channel=…[&since=epoch:offset][&limit=N]`.
///
/// Without `since`: the newest `limit` retained publications. With `since`: the
/// publications after it, or `"recovered": false` and no publications when the position
/// cannot be continued. Always carries the channel's current `epoch` and `offset`.
pub async fn history(State(state): State<AppState>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Query::parse(raw.as_deref());
    let name = q.single_channel()?;
    let limit = q.int("limit", 1..=state.config.poll.max_limit as u64, Code::BadLimit)?;
    let resolved = resolve_channel(&state, name)?;
    let body = history_json(&state, &resolved, q.get("since"), limit).await?;
    Ok((StatusCode::OK, [("content-type", "application/json")], body).into_response())
}

/// The history answer shared by `GET /api/history` and the WebSocket `history` command:
/// `{"publications":[…],"epoch","offset","recovered"}`.
pub(crate) async fn history_json(
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

/// `GET /api/channels` → active channels with their subscriber counts: summed over the
/// cluster's live nodes (as of their last heartbeat) with a cluster broker, this node's
/// own otherwise. `?scope=node` asks for this node's only.
pub async fn channels(State(state): State<AppState>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Query::parse(raw.as_deref());
    let local = || state.hub.channels().into_iter().map(|(c, n)| (c.to_string(), n)).collect::<Vec<_>>();
    let list = if q.get("scope") == Some("node") {
        local()
    } else {
        match state.hub.broker().cluster_channels().await? {
            Some(all) => all,
            None => local(),
        }
    };
    let list: Vec<_> = list.into_iter().map(|(c, n)| serde_json::json!({"channel": c, "subscribers": n})).collect();
    Ok(json(StatusCode::OK, serde_json::json!({ "channels": list }).to_string()))
}

/// `GET /api/info` → this node and the cluster's live nodes.
pub async fn info(State(state): State<AppState>) -> Result<Response, ApiError> {
    let me = crate::cluster::node_info(&state);
    let nodes = state.hub.broker().nodes().await?.unwrap_or_else(|| vec![me.clone()]);
    Ok(json(
        StatusCode::OK,
        serde_json::json!({
            "node": me,
            "version": env!("CARGO_PKG_VERSION"),
            "broker": format!("{:?}", state.config.broker.kind).to_lowercase(),
            "nodes": nodes,
        })
        .to_string(),
    ))
}

/// `GET /healthz`: the process is up.
pub async fn healthz() -> Response {
    json(StatusCode::OK, r#"{"status":"ok"}"#.into())
}

/// `GET /readyz`: the broker answers and the node is not draining.
pub async fn readyz(State(state): State<AppState>) -> Response {
    if state.is_draining() {
        return json(StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"draining"}"#.into());
    }
    if !state.hub.broker().ready().await {
        return json(StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"broker_unavailable"}"#.into());
    }
    json(StatusCode::OK, r#"{"status":"ready"}"#.into())
}

/// `GET /`: a pointer to the endpoints, for people who open the server in a browser.
pub async fn index() -> Response {
    let text = "Switchboard real-time server.\n\n\
        GET  /sse?channel=NAME          Server-Sent Events (resume with Last-Event-ID)\n\
        GET  /poll?channel=NAME&since=C  short poll; add &wait=SECONDS for a long poll\n\
        POST /api/publish               {\"channel\":NAME,\"data\":JSON}\n\
        POST /api/broadcast             {\"channels\":[NAME,...],\"data\":JSON}\n\
        GET  /api/history?channel=NAME  retained publications\n\
        GET  /api/channels              active channels\n\
        GET  /healthz, /readyz          liveness, readiness\n";
    (StatusCode::OK, [("content-type", "text/plain; charset=utf-8")], text).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectRequest {
    user: String,
    jti: Option<String>,
}

/// `POST /api/disconnect {"user":…[, "jti":…]}` → `{"disconnected":N}`: closes the user's
/// streaming connections on this node (only those of token `jti`, if given). WebSockets
/// get close 4102 and `reconnect:false`; SSE streams end with `event: disconnect`.
pub async fn disconnect(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let body = read_body(req.into_body(), 64 * 1024).await?;
    let r: DisconnectRequest = parse_json(&body)?;
    let n = state.registry.disconnect(Some(&r.user), r.jti.as_deref(), switchboard_core::CloseReason::Disconnected);
    crate::cluster::broadcast(&state, crate::cluster::Control::Disconnect { user: Some(r.user), jti: r.jti }).await?;
    Ok(json(StatusCode::OK, serde_json::json!({ "disconnected": n }).to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    user: Option<String>,
    jti: Option<String>,
    /// How long the revocation lasts; set it to at least the token lifetime.
    ttl_secs: u64,
}

/// `POST /api/revoke {"user"|"jti":…, "ttl_secs":N}` → `{"disconnected":N}`: refuses the
/// user's (or token's) connects and subscribes for `ttl_secs`, and closes what is open.
pub async fn revoke(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let body = read_body(req.into_body(), 64 * 1024).await?;
    let r: RevokeRequest = parse_json(&body)?;
    if r.user.is_none() == r.jti.is_none() {
        return Err(ApiError::new(Code::InvalidRequest, "give exactly one of `user` or `jti`"));
    }
    if r.ttl_secs == 0 || r.ttl_secs > 365 * 86_400 {
        return Err(ApiError::new(Code::InvalidRequest, "ttl_secs must be from 1 to 31536000"));
    }
    let ttl = std::time::Duration::from_secs(r.ttl_secs);
    let reason = switchboard_core::CloseReason::Disconnected;
    let n = match (&r.user, &r.jti) {
        (Some(user), _) => {
            state.deny.revoke_user(user, ttl)?;
            state.registry.disconnect(Some(user), None, reason)
        }
        (None, Some(jti)) => {
            state.deny.revoke_token(jti, ttl)?;
            state.registry.disconnect(None, Some(jti), reason)
        }
        (None, None) => unreachable!("checked above"),
    };
    let msg = crate::cluster::Control::Revoke { user: r.user, jti: r.jti, ttl_secs: r.ttl_secs };
    crate::cluster::broadcast(&state, msg).await?;
    Ok(json(StatusCode::OK, serde_json::json!({ "disconnected": n }).to_string()))
}

/// `GET /api/presence?channel=…` → `{"clients":[{"client","user","info"}…]}`.
pub async fn presence(State(state): State<AppState>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Query::parse(raw.as_deref());
    let name = q.single_channel()?;
    let r = resolve_channel(&state, name)?;
    Ok(json(StatusCode::OK, crate::presence::members_json(&state, &r).await?))
}

/// `GET /api/presence_stats?channel=…` → `{"clients":N,"users":M}`.
pub async fn presence_stats(State(state): State<AppState>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Query::parse(raw.as_deref());
    let name = q.single_channel()?;
    let r = resolve_channel(&state, name)?;
    Ok(json(StatusCode::OK, crate::presence::stats_json(&state, &r).await?))
}

/// `GET /metrics`: Prometheus text format (docs/operations.md lists the metrics).
pub async fn metrics(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    let accept = headers.get(axum::http::header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = crate::metrics::Format::from_accept(accept);
    (StatusCode::OK, [("content-type", format.content_type())], crate::metrics::render(&state, format)).into_response()
}
