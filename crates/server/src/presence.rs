//! Presence for connections: join a channel's presence when subscribing, refresh on the
//! connection's heartbeat, leave when the subscription ends — with join/leave events for
//! namespaces that want them.

use std::time::Duration;

use switchboard_core::presence::Member;
use switchboard_core::{ChannelName, Kind};

use crate::app::AppState;
use crate::auth::Identity;
use crate::error::ApiError;
use crate::session::Resolved;

/// A client's presence in one channel; dropping it removes the entry and, if the
/// namespace sends them, publishes a leave event.
pub struct PresenceGuard {
    state: AppState,
    channel: ChannelName,
    member: Member,
    ttl: Duration,
    join_leave: bool,
}

/// A fresh client id (one per connection: a user's tabs are separate clients).
pub fn client_id() -> String {
    const A: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    (0..12).map(|_| A[fastrand::usize(..A.len())] as char).collect()
}

/// Enters `r`'s presence when its namespace keeps presence. `claimed` is what an
/// anonymous client said about itself (`connect`'s `client`): shown as its info, under
/// `"unverified"`, only when there is no token. The join event (in `join_leave`
/// namespaces) is sent by [`PresenceGuard::announce`], so a transport can enter presence
/// before it confirms a subscribe and announce after the subscriber is live (it sees its
/// own join).
pub async fn join(
    state: &AppState,
    r: &Resolved,
    client: &str,
    who: Option<&Identity>,
    claimed: Option<&serde_json::Value>,
) -> Result<Option<PresenceGuard>, ApiError> {
    if !r.options.presence {
        return Ok(None);
    }
    let info = match who {
        Some(w) => w.info.clone(),
        None => claimed.map(|c| serde_json::json!({ "unverified": c })),
    };
    let member = Member { client: client.to_string(), user: who.map(|w| w.user.clone()).unwrap_or_default(), info };
    let ttl = Duration::from_secs(r.options.presence_ttl_secs);
    state.presence.add(&r.channel, member.clone(), ttl).await?;
    crate::webhooks::emit(state, "presence.join", Some(&r.channel), true, || presence_event(&r.channel, &member));
    Ok(Some(PresenceGuard {
        state: state.clone(),
        channel: r.channel.clone(),
        member,
        ttl,
        join_leave: r.options.join_leave,
    }))
}

impl PresenceGuard {
    /// Publishes the join event, in namespaces with `join_leave`.
    pub async fn announce(&self) -> Result<(), ApiError> {
        if self.join_leave {
            let data = serde_json::to_vec(&self.member).expect("member serialises");
            self.state.hub.broker().publish_volatile(&self.channel, Kind::Join, data.into()).await?;
        }
        Ok(())
    }

    /// Extends the entry's TTL (called on every heartbeat of the connection).
    pub async fn refresh(&self) {
        let _ = self.state.presence.add(&self.channel, self.member.clone(), self.ttl).await;
    }
}

impl Drop for PresenceGuard {
    fn drop(&mut self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let (state, channel, member, join_leave) =
            (self.state.clone(), self.channel.clone(), self.member.clone(), self.join_leave);
        rt.spawn(async move {
            let _ = state.presence.remove(&channel, &member.client).await;
            crate::webhooks::emit(&state, "presence.leave", Some(&channel), true, || presence_event(&channel, &member));
            if join_leave {
                let data = serde_json::to_vec(&member).expect("member serialises");
                let _ = state.hub.broker().publish_volatile(&channel, Kind::Leave, data.into()).await;
            }
        });
    }
}

/// A presence webhook's data: the channel and the member.
fn presence_event(channel: &ChannelName, m: &Member) -> serde_json::Value {
    serde_json::json!({"channel": channel, "client": m.client, "user": m.user, "info": m.info})
}

/// `{"clients":[{"client","user","info"}…]}` for `channel`.
pub async fn members_json(state: &AppState, r: &Resolved) -> Result<String, ApiError> {
    check_enabled(r)?;
    let members = state.presence.members(&r.channel).await?;
    Ok(serde_json::json!({ "clients": members }).to_string())
}

/// `{"clients":N,"users":M}` for `channel`.
pub async fn stats_json(state: &AppState, r: &Resolved) -> Result<String, ApiError> {
    check_enabled(r)?;
    let s = state.presence.stats(&r.channel).await?;
    Ok(serde_json::json!({"clients": s.clients, "users": s.users}).to_string())
}

fn check_enabled(r: &Resolved) -> Result<(), ApiError> {
    if r.options.presence {
        Ok(())
    } else {
        Err(ApiError::new(
            crate::error::Code::PresenceDisabled,
            format!("presence is not enabled for namespace {:?}", r.channel.namespace()),
        ))
    }
}
