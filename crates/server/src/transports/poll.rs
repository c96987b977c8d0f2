//! Short and long polling: `GET /poll?channel=…&since=<cursor>[&wait=SECONDS][&limit=N]`.
//!
//! Stateless: the cursor carries everything, so any node with access to history can
//! answer. Without `wait` (or `wait=0`) the answer is immediate; with `wait` the request
//! is held until a message arrives or the wait ends. The answer is always
//!
//! ```json
//! {"messages":[…], "cursor":"<cursor>", "resets":[{"channel":…,"epoch":…,"offset":…,"reason":…}]}
//! ```
//!
//! Without `since` no messages are returned, only the current cursor (or, with `wait`,
//! the next messages). Namespaces without history are refused (`history_disabled`): a
//! poller between two requests would miss messages without being told.
//!
//! With `direct=1` (then `client_key=…`) the poller also takes direct messages, kept for
//! it between polls in a mailbox (see [`super::mailbox`]); the answer adds `"client"`,
//! `"client_key"` and `"direct":[…]`, and such a poll may name no channel.

use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use switchboard_core::queue::Event;
use switchboard_core::StreamPosition;

use crate::app::AppState;
use crate::cursor;
use crate::error::{ApiError, Code};
use crate::session::{self, Query};

pub async fn handler(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
    headers: axum::http::HeaderMap,
    ext: axum::http::Extensions,
) -> Result<Response, ApiError> {
    let cfg = &state.config.poll;
    if !cfg.enabled {
        return Err(ApiError::new(Code::TransportDisabled, "the poll transport is disabled on this server"));
    }
    // Directly connected, a poll is counted with its TCP connection; through a trusted
    // proxy, against the client the proxy names, for as long as it waits.
    let _forwarded = super::forwarded_slot(&state, &headers, &ext)?;
    let _gauge = state.metrics.connection(crate::metrics::Transport::Poll);
    let q = Query::parse(raw.as_deref());
    // `direct=1` / `client_key=…`: this poller takes direct messages (see `mailbox`);
    // ignored when direct messages are off (the answer then has no `client`).
    let key = q.get("client_key").filter(|k| !k.is_empty());
    let asks_direct = key.is_some() || q.get("direct").is_some_and(|v| v == "1" || v == "true");
    let direct = asks_direct && state.config.direct.enabled;
    // A poll for direct messages alone names no channel.
    let channels =
        if direct && q.channels.is_empty() { Vec::new() } else { session::resolve_channels(&state, &q.channels)? };
    let who = super::identity(&state, &headers, &q)?;
    let sub_tokens = q.all("sub_token");
    let cred = crate::auth::Credentials { who: who.as_ref(), sub_tokens: &sub_tokens, subscribed: false };
    super::gate_all(&state, crate::auth::Operation::Subscribe, &channels, &cred)?;
    if let Some(r) = channels.iter().find(|r| !r.options.keeps_history()) {
        return Err(ApiError::new(
            Code::HistoryDisabled,
            format!("namespace {:?} keeps no history, so it cannot be polled; use /sse or /ws", r.channel.namespace()),
        ));
    }
    let wait = q.int("wait", 0..=cfg.max_wait_secs, Code::BadWait)?.unwrap_or(0);
    let limit = q.int("limit", 1..=cfg.max_limit as u64, Code::BadLimit)?.unwrap_or(cfg.default_limit as u64) as usize;
    let asked = q.get("since").filter(|s| !s.is_empty()).map(|s| cursor::parse(s, channels.len())).transpose()?;

    let rewind = session::check_rewind(&channels, q.int("rewind", 1..=u32::MAX as u64, Code::BadRewind)?)?;
    let session = session::open(&state, &channels, asked, rewind, &[], None).await?;
    let user = who.as_ref().map(|w| w.user.as_str());
    // As many mailboxes as connections may be open (with no cap: that many all the same).
    let max = match state.limits.max_connections() {
        0 => 100_000,
        n => n,
    };
    let mailbox = direct.then(|| state.mailboxes.lease(&state.registry, key, user, max)).transpose()?;
    let mut positions: Vec<StreamPosition> = session.starts.iter().map(|s| s.position.clone()).collect();
    let mut resets: Vec<serde_json::Value> = session
        .starts
        .iter()
        .filter(|s| s.reset)
        .map(|s| reset_json(&s.channel, &s.position, "position_lost"))
        .collect();

    let mut events = Vec::new();
    let mut directs = Vec::new();
    let _ = session.queue.drain_into(&mut events);
    if let Some(m) = &mailbox {
        let _ = m.queue.drain_into(&mut directs);
    }
    if events.is_empty() && directs.is_empty() && resets.is_empty() && wait > 0 {
        let mut shutdown = state.shutdown.clone();
        let direct_arrives = async {
            match &mailbox {
                Some(m) => {
                    let _ = m.queue.next_batch(&mut directs).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = session.queue.next_batch(&mut events) => {}
            _ = direct_arrives => {}
            _ = tokio::time::sleep(Duration::from_secs(wait)) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
    }
    if let Some(m) = &mailbox {
        // Whatever else arrived meanwhile goes in this answer too.
        let _ = m.queue.drain_into(&mut directs);
    }

    let mut body = Vec::with_capacity(
        256 + events.iter().map(|e| if let Event::Publication(d) = e { d.json().len() + 1 } else { 0 }).sum::<usize>(),
    );
    body.extend_from_slice(b"{\"messages\":[");
    let mut n = 0;
    for e in events {
        if n == limit {
            // Left for the next poll: the cursor stops before them.
            break;
        }
        match e {
            // Polling is history-based: volatile and presence events are not polled.
            Event::Publication(d) if !d.publication.is_stored() => {}
            Event::Publication(d) => {
                let Some(i) = channels.iter().position(|r| r.channel == d.publication.channel) else { continue };
                if n > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(d.json());
                positions[i] = d.publication.position();
                n += 1;
            }
            Event::Reset { channel, position } => {
                if let Some(i) = channels.iter().position(|r| r.channel == channel) {
                    resets.push(reset_json(&channel, &position, "stream_reset"));
                    positions[i] = position;
                }
            }
            Event::Frame(_) => {}
        }
    }
    drop(session);
    body.extend_from_slice(b"],\"cursor\":");
    body.extend_from_slice(serde_json::Value::String(cursor::format(&positions)).to_string().as_bytes());
    body.extend_from_slice(b",\"resets\":");
    body.extend_from_slice(serde_json::Value::Array(resets).to_string().as_bytes());
    if let Some(m) = &mailbox {
        // Ids and keys are [0-9a-z.]: no escaping needed.
        body.extend_from_slice(format!(",\"client\":\"{}\",\"client_key\":\"{}\"", m.client, m.key).as_bytes());
        body.extend_from_slice(b",\"direct\":[");
        let mut first = true;
        for e in &directs {
            let Event::Frame(json) = e else { continue };
            if !first {
                body.push(b',');
            }
            body.extend_from_slice(crate::registry::message_of(json));
            first = false;
        }
        body.push(b']');
    }
    body.push(b'}');
    Ok((StatusCode::OK, [("content-type", "application/json"), ("cache-control", "no-store")], body).into_response())
}

fn reset_json(channel: &switchboard_core::ChannelName, p: &StreamPosition, reason: &str) -> serde_json::Value {
    serde_json::json!({"channel": channel, "epoch": &*p.epoch, "offset": p.offset, "reason": reason})
}
