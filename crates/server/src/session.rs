//! What every subscribing transport does first: check the requested channels, open a
//! bounded queue and subscribe it to each channel, resuming from the client's cursor.

use std::sync::Arc;
use switchboard_core::hub::{SubscribeRequest, SubscriptionHandle};
use switchboard_core::{ChannelName, ConnQueue, StreamPosition};

use switchboard_core::pattern::{is_pattern, Pattern};

use crate::app::AppState;
use crate::auth::Identity;
use crate::config::NamespaceOptions;
use crate::error::{ApiError, Code};
use crate::presence::PresenceGuard;

/// A channel the request may use, with its namespace's options.
pub struct Resolved {
    pub channel: ChannelName,
    pub options: NamespaceOptions,
}

/// A wildcard subscription the request may use.
pub struct ResolvedPattern {
    pub pattern: Pattern,
    pub options: NamespaceOptions,
}

/// Splits a request's `channel` list into channel names and patterns (live-only).
pub fn resolve_mixed(state: &AppState, names: &[String]) -> Result<(Vec<Resolved>, Vec<ResolvedPattern>), ApiError> {
    let (patterns, exact): (Vec<String>, Vec<String>) = names.iter().cloned().partition(|n| is_pattern(n));
    if patterns.is_empty() {
        return Ok((resolve_channels(state, &exact)?, Vec::new()));
    }
    let max = state.config.limits.max_channels_per_request;
    if names.len() > max {
        return Err(ApiError::new(
            Code::TooManyChannels,
            format!("{} channels requested; the limit is {max}", names.len()),
        ));
    }
    let exact = if exact.is_empty() { Vec::new() } else { resolve_channels(state, &exact)? };
    let patterns = patterns.iter().map(|p| resolve_pattern(state, p)).collect::<Result<Vec<_>, _>>()?;
    Ok((exact, patterns))
}

pub fn resolve_pattern(state: &AppState, s: &str) -> Result<ResolvedPattern, ApiError> {
    let shown: String = s.chars().take(64).collect();
    let pattern = Pattern::parse(s)
        .map_err(|e| ApiError::new(Code::InvalidPattern, format!("invalid pattern {shown:?}: {e}")))?;
    let options = state.config.namespace(pattern.namespace()).ok_or_else(|| {
        ApiError::new(Code::UnknownNamespace, format!("namespace {:?} is not configured", pattern.namespace()))
    })?;
    Ok(ResolvedPattern { pattern, options })
}

/// Validates a channel list from a request: at least one, within the limit, valid names,
/// known namespaces.
pub fn resolve_channels(state: &AppState, names: &[String]) -> Result<Vec<Resolved>, ApiError> {
    if names.is_empty() {
        return Err(ApiError::new(Code::InvalidRequest, "name at least one channel: ?channel=NAME"));
    }
    let max = state.config.limits.max_channels_per_request;
    if names.len() > max {
        return Err(ApiError::new(
            Code::TooManyChannels,
            format!("{} channels requested; the limit is {max}", names.len()),
        ));
    }
    let mut out: Vec<Resolved> = Vec::with_capacity(names.len());
    for name in names {
        let r = resolve_channel(state, name)?;
        if out.iter().any(|o| o.channel == r.channel) {
            return Err(ApiError::new(Code::InvalidRequest, format!("channel {name:?} named twice")));
        }
        out.push(r);
    }
    Ok(out)
}

pub fn resolve_channel(state: &AppState, name: &str) -> Result<Resolved, ApiError> {
    if is_pattern(name) {
        let shown: String = name.chars().take(64).collect();
        return Err(ApiError::new(
            Code::InvalidPattern,
            format!("{shown:?} is a pattern; patterns are live-only subscriptions (use /sse or /ws subscribe)"),
        ));
    }
    let channel = ChannelName::parse(name).map_err(|e| ApiError::channel(name, e))?;
    let options = state.config.namespace(channel.namespace()).ok_or_else(|| {
        ApiError::new(Code::UnknownNamespace, format!("namespace {:?} is not configured", channel.namespace()))
    })?;
    Ok(Resolved { channel, options })
}

/// Where one channel of a session starts.
pub struct Start {
    pub channel: ChannelName,
    /// The position the client is at before the queued events.
    pub position: StreamPosition,
    /// A cursor was given for this channel and could not be continued.
    pub reset: bool,
}

/// A connection's queue and subscriptions; dropping it unsubscribes everything and
/// leaves presence.
pub struct Session {
    pub queue: Arc<ConnQueue>,
    pub starts: Vec<Start>,
    pub presence: Vec<PresenceGuard>,
    _handles: Vec<SubscriptionHandle>,
}

/// Who is subscribing, for presence (`None`: a stateless request that enters no
/// presence).
pub struct Presence<'a> {
    pub client: &'a str,
    pub who: Option<&'a Identity>,
    /// What an anonymous client said about itself (shown as unverified).
    pub claimed: Option<&'a serde_json::Value>,
}

/// Checks a requested rewind against every channel's history size.
pub fn check_rewind(channels: &[Resolved], rewind: Option<u64>) -> Result<Option<usize>, ApiError> {
    let Some(n) = rewind else { return Ok(None) };
    for r in channels {
        if n as usize > r.options.history_size {
            return Err(ApiError::new(
                Code::BadRewind,
                format!(
                    "rewind {n}: namespace {:?} keeps at most {} publications",
                    r.channel.namespace(),
                    r.options.history_size
                ),
            ));
        }
    }
    Ok(Some(n as usize))
}

/// What a new subscription starts from: the position if given, else the rewind asked for,
/// else the namespace's `rewind_on_subscribe`.
pub fn subscribe_request(r: &Resolved, since: Option<StreamPosition>, rewind: Option<usize>) -> SubscribeRequest {
    let rewind = rewind.or((r.options.rewind_on_subscribe > 0).then_some(r.options.rewind_on_subscribe));
    let recovery_max = (r.options.recovery_max > 0).then_some(r.options.recovery_max);
    SubscribeRequest { since, rewind, recovery_max }
}

/// Subscribes a new queue to `channels`, resuming from `cursor` when given (one position
/// per channel, same order), else rewinding as asked.
pub async fn open(
    state: &AppState,
    channels: &[Resolved],
    cursor: Option<Vec<StreamPosition>>,
    rewind: Option<usize>,
    patterns: &[ResolvedPattern],
    presence: Option<Presence<'_>>,
) -> Result<Session, ApiError> {
    // One queue serves all the connection's channels; it gets the most generous bound
    // among their namespaces.
    let bound = channels
        .iter()
        .map(|r| r.options.queue_max_bytes)
        .chain(patterns.iter().map(|p| p.options.queue_max_bytes))
        .max()
        .unwrap_or(1 << 20);
    let queue = state.hub.queue(bound);
    let mut starts = Vec::with_capacity(channels.len());
    let mut handles = Vec::with_capacity(channels.len());
    for (i, r) in channels.iter().enumerate() {
        let since = cursor.as_ref().map(|c| c[i].clone());
        let pending =
            state.hub.subscribe(r.channel.clone(), queue.clone(), subscribe_request(r, since, rewind)).await?;
        let outcome = pending.outcome().clone();
        if cursor.is_some() {
            // SSE `Last-Event-ID` and poll `since` are resumes too (the WebSocket counts
            // its own).
            state.metrics.resume(outcome.recovered);
        }
        handles.push(pending.go_live());
        starts.push(Start { channel: r.channel.clone(), position: outcome.position, reset: !outcome.recovered });
    }
    for p in patterns {
        handles.push(state.hub.subscribe_pattern(p.pattern.clone(), queue.clone()).await?);
    }
    let mut guards = Vec::new();
    if let Some(p) = presence {
        for r in channels {
            if let Some(g) = crate::presence::join(state, r, p.client, p.who, p.claimed).await? {
                if let Err(e) = g.announce().await {
                    tracing::debug!("join event not published: {}", e.message);
                }
                guards.push(g);
            }
        }
    }
    Ok(Session { queue, starts, presence: guards, _handles: handles })
}

/// Reads every `channel` parameter and the named single-valued ones from a raw query.
pub struct Query {
    pub channels: Vec<String>,
    pairs: Vec<(String, String)>,
}

impl Query {
    pub fn parse(raw: Option<&str>) -> Query {
        let mut channels = Vec::new();
        let mut pairs = Vec::new();
        for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            if k == "channel" {
                channels.push(v.into_owned());
            } else {
                pairs.push((k.into_owned(), v.into_owned()));
            }
        }
        Query { channels, pairs }
    }

    /// The one `channel` of requests that take exactly one.
    pub fn single_channel(&self) -> Result<&str, ApiError> {
        match self.channels.as_slice() {
            [name] => Ok(name),
            _ => Err(ApiError::new(Code::InvalidRequest, "name exactly one channel: ?channel=NAME")),
        }
    }

    /// Every value of a repeated parameter.
    pub fn all(&self, key: &str) -> Vec<String> {
        self.pairs.iter().filter(|(k, _)| k == key).map(|(_, v)| v.clone()).collect()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Parses an integer parameter within `range`, or fails with `code`.
    pub fn int(&self, key: &str, range: std::ops::RangeInclusive<u64>, code: Code) -> Result<Option<u64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.parse::<u64>() {
                Ok(n) if range.contains(&n) => Ok(Some(n)),
                _ => Err(ApiError::new(
                    code,
                    format!(
                        "{key}={:?}: expected an integer from {} to {}",
                        v.chars().take(32).collect::<String>(),
                        range.start(),
                        range.end()
                    ),
                )),
            },
        }
    }
}
