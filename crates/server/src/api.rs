//! The server API for applications: publish, broadcast, history, channels; and health.

use axum::body::Body;
use axum::extract::{RawQuery, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::app::AppState;
use crate::commands::ops::{history_json, payload, publish_to};
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
    /// The publication's properties (expiry, headers, …; docs/protocol.md).
    meta: Option<switchboard_core::Meta>,
}

/// `POST /api/publish {"channel":…, "data":…[, "key":…][, "volatile":true][, "meta":{…}]}` →
/// `{"epoch":…, "offset":…}` (or `{"volatile":true}`).
pub async fn publish(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let body = read_body(req.into_body(), body_limit(&state)).await?;
    let r: PublishRequest = parse_json(&body)?;
    let resolved = resolve_channel(&state, &r.channel)?;
    let data = payload(&state, r.data)?;
    if let Some(m) = &r.meta {
        crate::commands::ops::check_meta(&state, m)?;
    }
    let by = crate::commands::ops::Publisher::Api;
    let reply = publish_to(&state, &resolved, data, r.volatile, r.key, by, r.meta.as_ref()).await?;
    Ok(json(StatusCode::OK, reply.reply()))
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
            publish_to(&state, &resolved, data.clone(), r.volatile, None, crate::commands::ops::Publisher::Api, None)
                .await
        };
        results.push(match one.await {
            Ok(reply) => {
                let mut v: serde_json::Value = serde_json::from_str(&reply.reply()).expect("our own JSON");
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
    match state.sources.get().filter(|s| !s.is_empty()) {
        // A source's outage is reported, not a reason to take clients away from this node.
        Some(sources) => {
            let detail: serde_json::Map<String, serde_json::Value> = sources
                .iter()
                .map(|s| {
                    let up = s.connected.load(std::sync::atomic::Ordering::Relaxed) == 1;
                    (s.name.clone(), (if up { "connected" } else { "disconnected" }).into())
                })
                .collect();
            json(StatusCode::OK, serde_json::json!({"status": "ready", "sources": detail}).to_string())
        }
        None => json(StatusCode::OK, r#"{"status":"ready"}"#.into()),
    }
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
struct SendRequest<'a> {
    to: crate::commands::protocol::To,
    #[serde(borrow)]
    data: &'a serde_json::value::RawValue,
}

/// `POST /api/send {"to":{"client"|"user":…},"data":…}` → `{"delivered":N}`: a direct
/// message from the application (`from: {"server":true}`).
pub async fn send(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let body = read_body(req.into_body(), state.config.limits.max_message_bytes + 4096).await?;
    let r: SendRequest = parse_json(&body)?;
    if r.to.client.is_some() == r.to.user.is_some() {
        return Err(ApiError::new(Code::InvalidRequest, "`to` names exactly one of `client` or `user`"));
    }
    let answer = crate::commands::ops::send_direct(&state, serde_json::json!({"server": true}), &r.to, r.data).await?;
    Ok(json(StatusCode::OK, answer))
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
    let (key, n) = match (&r.user, &r.jti) {
        (Some(user), _) => {
            state.deny.revoke_user(user, ttl)?;
            (crate::auth::DenyList::key("user", user), state.registry.disconnect(Some(user), None, reason))
        }
        (None, Some(jti)) => {
            state.deny.revoke_token(jti, ttl)?;
            (crate::auth::DenyList::key("jti", jti), state.registry.disconnect(None, Some(jti), reason))
        }
        (None, None) => unreachable!("checked above"),
    };
    // Kept by the broker for every node, also those that start later (Redis); then told
    // to the nodes up now, which close what they have open.
    let until = switchboard_core::now_millis() + ttl.as_millis() as u64;
    state.hub.broker().save_revocation(&key, until).await?;
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

/// The webhooks, or `not_found` when none are configured.
fn webhooks(state: &AppState) -> Result<&std::sync::Arc<crate::webhooks::Webhooks>, ApiError> {
    state.webhooks.as_ref().ok_or_else(|| ApiError::new(Code::NotFound, "no webhook endpoints are configured"))
}

/// `GET /api/webhooks/dead[?endpoint=NAME][&limit=N]` → `{"dead":[{"endpoint","id",
/// "attempts","first","error","event"}…],"total":N}`: events whose retries ran out, oldest
/// first.
pub async fn webhooks_dead(
    State(state): State<AppState>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> Result<Response, ApiError> {
    let w = webhooks(&state)?;
    let q = crate::session::Query::parse(raw.as_deref());
    let limit = q.int("limit", 1..=10_000, Code::BadLimit)?.unwrap_or(1000) as usize;
    let endpoint = q.get("endpoint");
    let dead: Vec<_> = w.dead_list().await?.into_iter().filter(|(ep, _)| endpoint.is_none_or(|e| e == ep)).collect();
    let shown: Vec<serde_json::Value> = dead
        .iter()
        .take(limit)
        .map(|(ep, i)| {
            serde_json::json!({"endpoint": ep, "id": i.id, "attempts": i.attempt, "first": i.first,
                "error": i.error, "event": i.event})
        })
        .collect();
    Ok(json(StatusCode::OK, serde_json::json!({"dead": shown, "total": dead.len()}).to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    endpoint: Option<String>,
    ids: Option<Vec<String>>,
}

/// `POST /api/webhooks/replay {"endpoint"?, "ids"?}` → `{"replayed":N}`: dead events (of one
/// endpoint, or only those ids) go back to the queue as new — attempts and the horizon
/// start again.
pub async fn webhooks_replay(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let w = webhooks(&state)?;
    let body = read_body(req.into_body(), 1 << 20).await?;
    let r: ReplayRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ReplayRequest { endpoint: None, ids: None }
    } else {
        parse_json(&body)?
    };
    if let Some(ep) = &r.endpoint {
        if !w.endpoint_names().contains(ep) {
            return Err(ApiError::new(Code::NotFound, format!("no webhook endpoint is named {ep:?}")));
        }
    }
    let n = w.replay(r.endpoint.as_deref(), r.ids.as_deref()).await?;
    Ok(json(StatusCode::OK, format!("{{\"replayed\":{n}}}")))
}
