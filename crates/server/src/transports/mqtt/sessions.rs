//! Persistent MQTT sessions, kept between a client's connections: its subscriptions and,
//! for each channel, the position it had reached — so a device that reconnects with clean
//! session 0 (MQTT 5: clean start 0 within its session expiry) gets what was published
//! meanwhile, from the channel's history, without subscribing again. With the Redis
//! broker they are kept in Redis, and the client may come back to any node; otherwise in
//! this node's memory (docs/mqtt.md).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchboard_core::StreamPosition;

/// One subscription of a kept session.
#[derive(Debug, Clone)]
pub struct KeptSub {
    pub filter: String,
    /// The channel or pattern the filter maps to.
    pub name: String,
    /// The QoS granted.
    pub qos: u8,
    /// The MQTT 5 subscription identifier.
    pub id: Option<u32>,
    /// MQTT 5 No Local.
    pub no_local: bool,
    /// MQTT 5 Retain As Published.
    pub rap: bool,
    /// Where the client stood on the channel: the last publication written (QoS 0) or
    /// acknowledged (QoS 1). None for patterns: they are live-only.
    pub position: Option<StreamPosition>,
}

#[derive(Debug, Clone, Default)]
pub struct Kept {
    pub subs: Vec<KeptSub>,
    /// Publications in flight when the session was kept: (channel, offset, packet id,
    /// released — a QoS 2 one whose PUBREL went).
    pub inflight: Vec<(String, u64, u16, bool)>,
}

impl Kept {
    fn to_json(&self) -> String {
        let subs: Vec<Value> = self
            .subs
            .iter()
            .map(|s| {
                json!({"filter": s.filter, "name": s.name, "qos": s.qos, "id": s.id, "no_local": s.no_local, "rap": s.rap,
                    "position": s.position.as_ref().map(|p| format!("{}:{}", p.epoch, p.offset))})
            })
            .collect();
        json!({ "subs": subs, "inflight": self.inflight }).to_string()
    }

    fn from_json(text: &str) -> Option<Kept> {
        let v: Value = serde_json::from_str(text).ok()?;
        let subs = v["subs"]
            .as_array()?
            .iter()
            .filter_map(|s| {
                Some(KeptSub {
                    filter: s["filter"].as_str()?.to_string(),
                    name: s["name"].as_str()?.to_string(),
                    qos: s["qos"].as_u64().unwrap_or(0).min(2) as u8,
                    id: s["id"].as_u64().and_then(|i| u32::try_from(i).ok()),
                    no_local: s["no_local"].as_bool().unwrap_or(false),
                    rap: s["rap"].as_bool().unwrap_or(false),
                    position: s["position"].as_str().and_then(|p| crate::cursor::parse_position(p).ok()),
                })
            })
            .collect();
        let inflight = serde_json::from_value(v["inflight"].clone()).unwrap_or_default();
        Some(Kept { subs, inflight })
    }
}

/// Where the cluster's nodes keep sessions, so a client may come back to any node.
pub enum Shared {
    Redis(switchboard_redis::RedisKv),
    Nats(Box<switchboard_nats::NatsKv>),
}

impl Shared {
    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), switchboard_core::BrokerError> {
        match self {
            Shared::Redis(kv) => kv.set(key, value, ttl).await,
            Shared::Nats(kv) => kv.set(key, value, ttl).await,
        }
    }

    async fn take(&self, key: &str) -> Result<Option<String>, switchboard_core::BrokerError> {
        match self {
            Shared::Redis(kv) => kv.take(key).await,
            Shared::Nats(kv) => kv.take(key).await,
        }
    }

    async fn delete(&self, key: &str) -> Result<(), switchboard_core::BrokerError> {
        match self {
            Shared::Redis(kv) => kv.delete(key).await,
            Shared::Nats(kv) => kv.delete(key).await,
        }
    }
}

/// Sessions kept, by client id: in Redis or NATS when the broker is, else in memory (or
/// files, with durable history).
#[derive(Default)]
pub struct Sessions {
    memory: Mutex<HashMap<String, (Kept, Instant)>>,
    shared: OnceLock<Shared>,
    /// With durable history (`--data-dir`): one file per session in this directory, so a
    /// restart keeps them.
    dir: OnceLock<std::path::PathBuf>,
    /// Sessions saved so far (for tests and metrics).
    saves: std::sync::atomic::AtomicU64,
}

/// Most sessions kept in memory at once; past it the soonest to expire goes first.
const MAX_SESSIONS: usize = 100_000;

impl Sessions {
    /// Keeps sessions in the cluster's backplane from now on (Redis or NATS broker).
    pub fn use_shared(&self, kv: Shared) {
        let _ = self.shared.set(kv);
    }

    /// Keeps sessions as files in `dir` from now on (durable history's server); sessions
    /// that expired while the server was down are removed.
    pub fn use_dir(&self, dir: &std::path::Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let now = switchboard_core::now_millis();
        for entry in std::fs::read_dir(dir)?.flatten() {
            let expired = std::fs::read_to_string(entry.path())
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .is_none_or(|v| v["until"].as_u64().is_none_or(|until| until <= now));
            if expired {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let _ = self.dir.set(dir.to_path_buf());
        Ok(())
    }

    /// The file of `client_id`'s session (its SHA-1: client ids may be long or odd).
    fn file(dir: &std::path::Path, client_id: &str) -> std::path::PathBuf {
        dir.join(format!("{}.json", sha1_smol::Sha1::from(client_id).digest()))
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Kept, Instant)>> {
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many times a session was saved.
    pub fn saves(&self) -> u64 {
        self.saves.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Keeps `kept` for `expiry`.
    pub async fn keep(&self, client_id: &str, kept: Kept, expiry: Duration) {
        self.saves.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(kv) = self.shared.get() {
            if let Err(e) = kv.set(client_id, &kept.to_json(), expiry).await {
                tracing::warn!(client = client_id, "MQTT session not kept in the backplane: {e}");
            }
            return;
        }
        if let Some(dir) = self.dir.get() {
            let until = switchboard_core::now_millis() + expiry.as_millis() as u64;
            let text = serde_json::json!({"client": client_id, "until": until, "kept": kept.to_json()}).to_string();
            let (path, tmp) = (Self::file(dir, client_id), dir.join(format!(".{}.tmp", fastrand::u64(..))));
            // Written whole, then renamed over the old: never half a session. (Not synced:
            // a killed process keeps it; a power failure may lose the latest save.)
            if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)) {
                tracing::warn!(client = client_id, "MQTT session not kept in {}: {e}", dir.display());
            }
            return;
        }
        let mut m = self.map();
        let now = Instant::now();
        if m.len() >= MAX_SESSIONS {
            m.retain(|_, (_, until)| *until > now);
            if m.len() >= MAX_SESSIONS {
                if let Some(first) = m.iter().min_by_key(|(_, (_, until))| *until).map(|(k, _)| k.clone()) {
                    m.remove(&first);
                }
            }
        }
        m.insert(client_id.to_string(), (kept, now + expiry));
    }

    /// Takes the session kept for `client_id`, if it has not expired.
    pub async fn take(&self, client_id: &str) -> Option<Kept> {
        if let Some(kv) = self.shared.get() {
            return match kv.take(client_id).await {
                Ok(v) => v.as_deref().and_then(Kept::from_json),
                Err(e) => {
                    tracing::warn!(client = client_id, "MQTT session not read from the backplane: {e}");
                    None
                }
            };
        }
        if let Some(dir) = self.dir.get() {
            let path = Self::file(dir, client_id);
            let text = std::fs::read_to_string(&path).ok()?;
            let _ = std::fs::remove_file(&path);
            let v: Value = serde_json::from_str(&text).ok()?;
            let live = v["client"] == client_id && v["until"].as_u64()? > switchboard_core::now_millis();
            return live.then(|| Kept::from_json(v["kept"].as_str()?)).flatten();
        }
        let (kept, until) = self.map().remove(client_id)?;
        (until > Instant::now()).then_some(kept)
    }

    pub async fn discard(&self, client_id: &str) {
        if let Some(kv) = self.shared.get() {
            let _ = kv.delete(client_id).await;
            return;
        }
        if let Some(dir) = self.dir.get() {
            let _ = std::fs::remove_file(Self::file(dir, client_id));
            return;
        }
        self.map().remove(client_id);
    }

    /// Sessions kept in this node's memory (none when they are in Redis or NATS).
    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
