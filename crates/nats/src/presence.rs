//! [`NatsPresence`]: presence in the broker's state stream, one message per member
//! (`P.s.pr.<channel>.<client>`, its expiry inside), read back with one consumer per
//! listing.

use std::collections::HashSet;
use std::time::Duration;

use async_trait::async_trait;
use switchboard_core::presence::{Member, PresenceManager, PresenceStats};
use switchboard_core::{now_millis, BrokerError, ChannelName};

use crate::broker::{unavailable, NatsBroker, STATE_MAX_AGE};

/// Presence over NATS, sharing the broker's connection and streams.
#[derive(Clone)]
pub struct NatsPresence {
    broker: NatsBroker,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    #[serde(flatten)]
    member: Member,
    until: u64,
}

impl NatsPresence {
    pub fn new(broker: &NatsBroker) -> NatsPresence {
        NatsPresence { broker: broker.clone() }
    }

    fn subject(&self, channel: &ChannelName, client: &str) -> String {
        self.broker.state_subject("pr", &[channel.as_str(), client])
    }

    async fn live(&self, channel: &ChannelName) -> Result<Vec<Member>, BrokerError> {
        let streams = self.broker.streams().await?;
        let filter = format!("{}.*", self.broker.state_subject("pr", &[channel.as_str()]));
        let now = now_millis();
        let mut out = Vec::new();
        for e in NatsBroker::read_each(&streams.state, &filter).await? {
            match serde_json::from_slice::<Stored>(&e.payload) {
                Ok(s) if s.until > now => out.push(s.member),
                // Lapsed (its node died without a leave): gone for everyone.
                _ => {
                    let _ = streams.state.purge().filter(e.subject).await;
                }
            }
        }
        out.sort_by(|a, b| a.client.cmp(&b.client));
        Ok(out)
    }
}

#[async_trait]
impl PresenceManager for NatsPresence {
    async fn add(&self, channel: &ChannelName, member: Member, ttl: Duration) -> Result<(), BrokerError> {
        self.broker.streams().await?;
        // The state stream keeps a message an hour at most: a longer TTL is an hour.
        let until = now_millis() + ttl.min(STATE_MAX_AGE).as_millis() as u64;
        let subject = self.subject(channel, &member.client);
        let body = serde_json::to_vec(&Stored { member, until }).map_err(unavailable)?;
        self.broker.publish_state(subject, body.into()).await.map(|_| ())
    }

    async fn remove(&self, channel: &ChannelName, client: &str) -> Result<(), BrokerError> {
        let streams = self.broker.streams().await?;
        streams.state.purge().filter(self.subject(channel, client)).await.map_err(unavailable)?;
        Ok(())
    }

    async fn members(&self, channel: &ChannelName) -> Result<Vec<Member>, BrokerError> {
        self.live(channel).await
    }

    async fn stats(&self, channel: &ChannelName) -> Result<PresenceStats, BrokerError> {
        let members = self.live(channel).await?;
        let users: HashSet<&str> = members.iter().map(|m| m.user.as_str()).collect();
        Ok(PresenceStats { clients: members.len(), users: users.len() })
    }
}
