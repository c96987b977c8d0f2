//! Plain-HTTP commands for clients that are not on a WebSocket (SSE and polling
//! clients, the JavaScript client's fallbacks): publish and presence, authorized with the
//! client's token exactly as on a WebSocket — not with a server API key.

use axum::extract::{RawQuery, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::app::AppState;
use crate::auth::{Credentials, Operation};
use crate::error::{ApiError, Code};
use crate::session::{resolve_channel, Query};

fn json(body: String) -> Response {
    (StatusCode::OK, [("content-type", "application/json")], body).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody<'a> {
    channel: String,
    #[serde(borrow)]
    data: &'a RawValue,
    key: Option<String>,
    volatile: Option<bool>,
    meta: Option<switchboard_core::Meta>,
}

/// `POST /publish {"channel","data"[,"key"][,"volatile"][,"meta"]}` with the client's token
/// (`Authorization: Bearer` or `?token=`): where the namespace allows client publishing.
pub async fn publish(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
    req: Request,
) -> Result<Response, ApiError> {
    let q = Query::parse(raw.as_deref());
    let (who, body) = write_request(&state, &q, req).await?;
    let b: PublishBody = crate::api::parse_json(&body)?;
    let r = resolve_channel(&state, &b.channel)?;
    let sub_tokens = q.all("sub_token");
    state.gate(
        Operation::Publish,
        &r,
        &Credentials { who: who.as_ref(), sub_tokens: &sub_tokens, subscribed: false },
    )?;
    let data = crate::commands::ops::payload(&state, b.data)?;
    if let Some(m) = &b.meta {
        crate::commands::ops::check_meta(&state, m)?;
    }
    let by = crate::commands::ops::Publisher::Client { client: None, user: who.as_ref().map(|w| w.user.as_str()) };
    Ok(json(crate::commands::ops::publish_to(&state, &r, data, b.volatile, b.key, by, b.meta.as_ref()).await?.reply()))
}

/// A client's writing request (`/publish`, `/send`): counted against its IP's rate, its
/// identity, and its body (bounded).
async fn write_request(
    state: &AppState,
    q: &Query,
    req: Request,
) -> Result<(Option<crate::auth::Identity>, axum::body::Bytes), ApiError> {
    if let Some(ip) = super::client_ip(state, req.headers(), req.extensions()) {
        state.limits.take_publish(ip)?;
    }
    let who = super::identity(state, req.headers(), q)?;
    let limit = state.config.limits.max_message_bytes * 2 + 64 * 1024;
    let body = axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| ApiError::new(Code::MessageTooLarge, format!("request body is larger than {limit} bytes")))?;
    Ok((who, body))
}

/// The one channel a client HTTP read names, once the gate lets `op` through.
async fn gated_channel(
    state: &AppState,
    op: Operation,
    raw: Option<String>,
    headers: &axum::http::HeaderMap,
) -> Result<crate::session::Resolved, ApiError> {
    let q = Query::parse(raw.as_deref());
    let name = q.single_channel()?;
    let who = super::identity(state, headers, &q)?;
    let r = resolve_channel(state, name)?;
    let sub_tokens = q.all("sub_token");
    state.gate(op, &r, &Credentials { who: who.as_ref(), sub_tokens: &sub_tokens, subscribed: false })?;
    Ok(r)
}

/// `GET /history?channel=…[&since=…][&limit=…]` (client token): a channel's retained
/// publications, as `GET /api/history` answers them, for a channel the client may read.
pub async fn history(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let q = Query::parse(raw.as_deref());
    let r = gated_channel(&state, Operation::History, raw, &headers).await?;
    let limit = q.int("limit", 1..=state.config.poll.max_limit as u64, Code::BadLimit)?;
    let body = crate::commands::ops::history_json(&state, &r, q.get("since"), limit).await?;
    Ok((StatusCode::OK, [("content-type", "application/json")], body).into_response())
}

/// `GET /presence?channel=…` (client token): who is in a channel the client may read.
pub async fn presence(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let r = gated_channel(&state, Operation::Presence, raw, &headers).await?;
    Ok(json(crate::presence::members_json(&state, &r).await?))
}

/// `GET /presence_stats?channel=…` (client token).
pub async fn presence_stats(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let r = gated_channel(&state, Operation::PresenceStats, raw, &headers).await?;
    Ok(json(crate::presence::stats_json(&state, &r).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody<'a> {
    to: crate::commands::protocol::To,
    #[serde(borrow)]
    data: &'a RawValue,
    /// Under `[direct] policy = "presence"`: the channel whose presence sender and target share.
    channel: Option<String>,
}

/// `POST /send {"to":{"client"|"user"},"data"[,"channel"]}` with the client's token and,
/// to send as one of its connections, `?client_key=` (from SSE's `subscribed` event or a
/// poll's answer): the `send` command for clients that are not on a WebSocket, under the
/// same `[direct] policy`. Under the `presence` policy the body names the channel both
/// are present in.
pub async fn send(State(state): State<AppState>, RawQuery(raw): RawQuery, req: Request) -> Result<Response, ApiError> {
    let q = Query::parse(raw.as_deref());
    let (who, body) = write_request(&state, &q, req).await?;
    let b: SendBody = crate::api::parse_json(&body)?;
    if b.to.client.is_some() == b.to.user.is_some() {
        return Err(ApiError::new(Code::InvalidRequest, "`to` names exactly one of `client` or `user`"));
    }
    let user = who.as_ref().map(|w| w.user.as_str());
    let client = match q.get("client_key").filter(|k| !k.is_empty()) {
        None => None,
        Some(key) => match state.registry.key_owner(key) {
            Some((client, owner)) if owner.as_deref() == user => Some(client),
            _ => return Err(ApiError::new(
                Code::PermissionDenied,
                "client_key names no connection of yours on this node (it closed, or the request reached another node)",
            )),
        },
    };
    let sender =
        crate::commands::ops::Sender { client: client.as_deref(), user, claim: who.as_ref().is_some_and(|w| w.direct) };
    let shares_presence = async {
        let (Some(client), Some(name)) = (client.as_deref(), b.channel.as_deref()) else { return false };
        let Ok(r) = resolve_channel(&state, name) else { return false };
        let Ok(members) = state.presence.members(&r.channel).await else { return false };
        members.iter().any(|m| m.client == client)
            && members.iter().any(|m| match (&b.to.client, &b.to.user) {
                (Some(c), _) => &m.client == c,
                (_, Some(u)) => &m.user == u,
                _ => false,
            })
    };
    crate::commands::ops::may_send(&state, &sender, &b.to, shares_presence).await?;
    let data = b.data;
    Ok(json(crate::commands::ops::send_direct(&state, sender.from(), &b.to, data).await?))
}
