//! What a node does as part of a cluster: register itself (with its channels) on a
//! heartbeat, and apply control messages — disconnects and revocations — that other
//! nodes broadcast. With the in-memory broker all of this is a no-op.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchboard_core::{CloseReason, NodeInfo};

use crate::app::AppState;
use crate::error::ApiError;

/// How often a node refreshes its registration; it lapses after three missed beats.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// A control message between nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Control {
    Disconnect {
        user: Option<String>,
        jti: Option<String>,
    },
    Revoke {
        user: Option<String>,
        jti: Option<String>,
        ttl_secs: u64,
    },
    /// A direct message for a client or user that may be connected here; each node
    /// answers `origin`'s request `req` with how many of its connections took it.
    Direct {
        client: Option<String>,
        user: Option<String>,
        json: String,
        origin: String,
        req: u64,
    },
    DirectAck {
        origin: String,
        req: u64,
        node: String,
        delivered: usize,
    },
}

pub fn node_info(state: &AppState) -> NodeInfo {
    NodeInfo {
        id: state.node_id.clone(),
        address: state.config.listen.to_string(),
        connections: state.limits.open(),
        started: state.started,
    }
}

/// Sends `msg` to the other nodes (this node has applied it already).
pub async fn broadcast(state: &AppState, msg: Control) -> Result<(), ApiError> {
    let bytes = serde_json::to_vec(&msg).expect("control serialises");
    state.hub.broker().publish_control(bytes.into()).await?;
    Ok(())
}

fn apply(state: &AppState, msg: Control) {
    match msg {
        Control::Disconnect { user, jti } => {
            state.registry.disconnect(user.as_deref(), jti.as_deref(), CloseReason::Disconnected);
        }
        Control::Revoke { user, jti, ttl_secs } => {
            let ttl = Duration::from_secs(ttl_secs);
            if let Some(u) = &user {
                let _ = state.deny.revoke_user(u, ttl);
            }
            if let Some(j) = &jti {
                let _ = state.deny.revoke_token(j, ttl);
            }
            state.registry.disconnect(user.as_deref(), jti.as_deref(), CloseReason::Disconnected);
        }
        Control::Direct { client, user, json, origin, req } => {
            let delivered = state.registry.deliver(client.as_deref(), user.as_deref(), json.as_bytes());
            state.metrics.direct_messages.fetch_add(delivered as u64, std::sync::atomic::Ordering::Relaxed);
            let state = state.clone();
            tokio::spawn(async move {
                let node = state.node_id.clone();
                let _ = broadcast(&state, Control::DirectAck { origin, req, node, delivered }).await;
            });
        }
        Control::DirectAck { origin, req, node, delivered } => {
            if origin == state.node_id {
                if let Some(tx) = state.direct_pending.lock().unwrap_or_else(|p| p.into_inner()).get(&req) {
                    let _ = tx.send((node, delivered));
                }
            }
        }
    }
}

/// Heartbeats between two reads of the cluster's revocations.
const REVOCATIONS_EVERY: u32 = 12;

/// Puts the revocations the broker keeps for the cluster in force on this node.
pub async fn adopt_revocations(state: &AppState) {
    match state.hub.broker().revocations().await {
        Ok(kept) if !kept.is_empty() => {
            let n = state.deny.adopt(&kept);
            tracing::debug!(revocations = n, "revocations kept for the cluster in force here");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("the cluster's revocations could not be read: {e}"),
    }
}

/// Wires control messages to this node and starts its heartbeat.
pub fn start(state: &AppState, listening: SocketAddr) {
    let weak = std::sync::Arc::downgrade(&state.inner);
    state.hub.set_control_handler(Box::new(move |bytes| {
        let Some(inner) = weak.upgrade() else { return };
        match serde_json::from_slice::<Control>(&bytes) {
            Ok(msg) => apply(&AppState { inner }, msg),
            Err(e) => tracing::warn!("ignoring a malformed control message: {e}"),
        }
    }));
    let weak = std::sync::Arc::downgrade(&state.inner);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT);
        let mut beats = 0u32;
        loop {
            tick.tick().await;
            let Some(state) = AppState::running(&weak) else { return };
            // Revocations kept for the cluster, now and then: what a broadcast this node
            // missed (its Pub/Sub link was down) is in force within a minute.
            if beats.is_multiple_of(REVOCATIONS_EVERY) {
                adopt_revocations(&state).await;
            }
            beats = beats.wrapping_add(1);
            let mut me = node_info(&state);
            me.address = listening.to_string();
            let channels: Vec<(String, usize)> =
                state.hub.channels().into_iter().map(|(c, n)| (c.to_string(), n)).collect();
            if let Err(e) = state.hub.broker().heartbeat(&me, &channels, HEARTBEAT * 3).await {
                tracing::debug!("heartbeat failed: {e}");
            }
        }
    });
}
