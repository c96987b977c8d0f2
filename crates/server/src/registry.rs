//! Live streaming connections by user, so the server API can end them
//! (`/api/disconnect`, `/api/revoke`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use switchboard_core::{CloseReason, ConnQueue};

struct Entry {
    jti: Option<String>,
    queue: Arc<ConnQueue>,
}

#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    by_user: Mutex<HashMap<String, HashMap<u64, Entry>>>,
    /// Connections that take direct messages, by client id: their user (once known),
    /// queue, and how their transport frames a protocol message.
    clients: Mutex<Clients>,
}

/// The connections that take direct messages: by client id, and the ids of each user's
/// (so a message to a user touches that user's connections, not every one).
#[derive(Default)]
struct Clients {
    by_id: HashMap<String, Client>,
    by_user: HashMap<String, std::collections::HashSet<String>>,
}

impl Clients {
    fn insert(&mut self, id: &str, c: Client) {
        self.remove(id);
        if let Some(u) = &c.user {
            self.by_user.entry(u.clone()).or_default().insert(id.to_string());
        }
        self.by_id.insert(id.to_string(), c);
    }

    fn remove(&mut self, id: &str) -> Option<Client> {
        let c = self.by_id.remove(id)?;
        if let Some(u) = &c.user {
            self.unindex(u, id);
        }
        Some(c)
    }

    fn unindex(&mut self, user: &str, id: &str) {
        if let Some(ids) = self.by_user.get_mut(user) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_user.remove(user);
            }
        }
    }

    fn set_user(&mut self, id: &str, user: &str) {
        let Some(c) = self.by_id.get_mut(id) else { return };
        let old = c.user.replace(user.to_string());
        if let Some(old) = old {
            self.unindex(&old, id);
        }
        self.by_user.entry(user.to_string()).or_default().insert(id.to_string());
    }
}

struct Client {
    user: Option<String>,
    /// The secret of `<client>.<secret>` (a `client_key`), for connections whose client
    /// acts over separate requests (SSE, polling): proves a request comes from it.
    secret: Option<Box<str>>,
    queue: std::sync::Weak<ConnQueue>,
    frame: fn(&[u8]) -> bytes::Bytes,
}

/// The `{"from","data"}` of the protocol message `{"message":{"from","data"}}` that
/// [`Registry::deliver`] hands a connection: what SSE, polling and MQTT carry.
pub fn message_of(json: &[u8]) -> &[u8] {
    json.strip_prefix(b"{\"message\":").and_then(|j| j.strip_suffix(b"}")).unwrap_or(json)
}

/// A connection registered for direct messages; dropping it unregisters.
pub struct ClientRegistration {
    registry: Arc<Registry>,
    client: String,
    queue: std::sync::Weak<ConnQueue>,
}

impl Drop for ClientRegistration {
    fn drop(&mut self) {
        // Only if the id is still this connection's: an MQTT client id taken over by a
        // new connection stays registered to that one.
        let mut m = self.registry.clients.lock().unwrap_or_else(|p| p.into_inner());
        if m.by_id.get(&self.client).is_some_and(|c| c.queue.ptr_eq(&self.queue)) {
            m.remove(&self.client);
        }
    }
}

/// A registered connection; dropping it unregisters.
pub struct Registration {
    registry: Arc<Registry>,
    user: String,
    id: u64,
}

impl Registry {
    pub fn register(self: &Arc<Self>, user: &str, jti: Option<String>, queue: Arc<ConnQueue>) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut m = self.by_user.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(user.to_string()).or_default().insert(id, Entry { jti, queue });
        Registration { registry: self.clone(), user: user.to_string(), id }
    }

    /// Closes every connection of `user` (or only those with token id `jti`). Returns how
    /// many were closed.
    pub fn disconnect(&self, user: Option<&str>, jti: Option<&str>, reason: CloseReason) -> usize {
        let m = self.by_user.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        let users: Vec<&HashMap<u64, Entry>> = match user {
            Some(u) => m.get(u).into_iter().collect(),
            None => m.values().collect(),
        };
        for conns in users {
            for e in conns.values() {
                if jti.is_none() || e.jti.as_deref() == jti {
                    e.queue.close(reason);
                    n += 1;
                }
            }
        }
        n
    }

    /// Registers a connection for direct messages to `client`; whoever holds the
    /// registration (an SSE stream) unregisters by dropping it.
    pub fn add_client(
        self: &Arc<Self>,
        client: &str,
        queue: &Arc<ConnQueue>,
        frame: fn(&[u8]) -> bytes::Bytes,
    ) -> ClientRegistration {
        self.insert_client(client, queue, frame);
        ClientRegistration { registry: self.clone(), client: client.to_string(), queue: Arc::downgrade(queue) }
    }

    /// Registers a connection for direct messages to `client`, to be removed with
    /// [`Registry::remove_client`] (a command session does, keeping no second copy of its id).
    pub fn insert_client(&self, client: &str, queue: &Arc<ConnQueue>, frame: fn(&[u8]) -> bytes::Bytes) {
        let c = Client { user: None, secret: None, queue: Arc::downgrade(queue), frame };
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).insert(client, c);
    }

    pub fn remove_client(&self, client: &str) {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).remove(client);
    }

    /// The connection `client` is now `user`'s.
    pub fn set_client_user(&self, client: &str, user: &str) {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).set_user(client, user);
    }

    /// Gives connection `client` a new secret; returns its `client_key`, `<client>.<secret>`.
    pub fn new_client_key(&self, client: &str) -> String {
        let secret = crate::auth::random_hex(16);
        if let Some(c) = self.clients.lock().unwrap_or_else(|p| p.into_inner()).by_id.get_mut(client) {
            c.secret = Some(secret.as_str().into());
        }
        format!("{client}.{secret}")
    }

    /// The connection here whose `client_key` is `key`: its client id and user.
    pub fn key_owner(&self, key: &str) -> Option<(String, Option<String>)> {
        let (client, secret) = key.split_once('.')?;
        let m = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let c = m.by_id.get(client)?;
        let ok = c.secret.as_deref().is_some_and(|s| crate::app::constant_time_eq(s.as_bytes(), secret.as_bytes()));
        ok.then(|| (client.to_string(), c.user.clone()))
    }

    /// The user of connection `client`, if it is here and has one.
    pub fn client_user(&self, client: &str) -> Option<Option<String>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).by_id.get(client).map(|c| c.user.clone())
    }

    /// Queues the protocol message `json` on connection `client`, or on every connection
    /// of `user`, here. Returns how many took it.
    pub fn deliver(&self, client: Option<&str>, user: Option<&str>, json: &[u8]) -> usize {
        let m = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let targets: Vec<&Client> = match (client, user) {
            (Some(id), _) => m.by_id.get(id).into_iter().collect(),
            (None, Some(u)) => m.by_user.get(u).into_iter().flatten().filter_map(|id| m.by_id.get(id)).collect(),
            (None, None) => Vec::new(),
        };
        targets
            .into_iter()
            .filter_map(|c| c.queue.upgrade().map(|q| (q, c.frame)))
            .filter(|(q, frame)| q.push(switchboard_core::queue::Event::Frame(frame(json))).is_ok())
            .count()
    }

    /// Users with live connections.
    pub fn users(&self) -> usize {
        self.by_user.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut m = self.registry.by_user.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(conns) = m.get_mut(&self.user) {
            conns.remove(&self.id);
            if conns.is_empty() {
                m.remove(&self.user);
            }
        }
    }
}

/// Connected MQTT client ids on this node: MQTT allows one connection per client id, and
/// a new one takes the id over (the old connection is closed).
/// Each id's connection: its queue, and (for one that keeps a session) whether it has
/// ended, its session kept.
#[derive(Default)]
pub struct ClientIds(std::sync::Mutex<HashMap<String, Holder>>);

/// The connection holding a client id: its queue, and its [`Ended`] if it keeps a session.
type Holder = (std::sync::Weak<ConnQueue>, Option<Ended>);

/// Turns true when a connection has finished (kept its session, if any).
pub type Ended = tokio::sync::oneshot::Receiver<()>;

impl ClientIds {
    /// Registers `queue` under `id`, closing the connection that held it: that one's
    /// [`Ended`] if it keeps a session, to wait for it to keep it.
    pub fn take_over(&self, id: &str, queue: &Arc<ConnQueue>, ended: Option<Ended>) -> Option<Ended> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let old = m.insert(id.to_string(), (Arc::downgrade(queue), ended));
        // Forget the ids of connections that are gone, now and then.
        // (A gone connection's entry only ever answers `holds` with false.)
        if m.len() > 64 && m.len().is_power_of_two() {
            m.retain(|_, (w, _)| w.strong_count() > 0);
        }
        let (old, ended) = old?;
        old.upgrade()?.close(CloseReason::Normal);
        ended
    }
}

impl ClientIds {
    /// Whether another connection took `id` over from the one whose queue was `queue`
    /// (still open or not).
    pub fn replaced(&self, id: &str, queue: &std::sync::Weak<ConnQueue>) -> bool {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.get(id).is_some_and(|(w, _)| !w.ptr_eq(queue))
    }

    /// Whether `queue`'s connection still holds `id` (no other connection took it over).
    pub fn holds(&self, id: &str, queue: &Arc<ConnQueue>) -> bool {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.get(id).and_then(|(w, _)| w.upgrade()).is_some_and(|q| Arc::ptr_eq(&q, queue))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(json: &[u8]) -> bytes::Bytes {
        bytes::Bytes::copy_from_slice(json)
    }

    #[test]
    fn a_message_to_a_user_reaches_that_users_connections_as_they_come_change_and_go() {
        let r = Arc::new(Registry::default());
        let queues: Vec<Arc<ConnQueue>> = (0..4).map(|_| ConnQueue::new(1 << 20)).collect();
        for (i, q) in queues.iter().enumerate() {
            r.insert_client(&format!("c{i}"), q, frame);
        }
        r.set_client_user("c0", "ann");
        r.set_client_user("c1", "ann");
        r.set_client_user("c2", "bob");
        assert_eq!(r.deliver(None, Some("ann"), b"1"), 2);
        assert_eq!(r.deliver(None, Some("bob"), b"2"), 1);
        assert_eq!(r.deliver(None, Some("cid"), b"3"), 0);
        // A connection that changes user, one that goes, an id taken by another connection.
        r.set_client_user("c1", "bob");
        r.remove_client("c2");
        r.insert_client("c0", &queues[3], frame);
        assert_eq!(r.deliver(None, Some("ann"), b"4"), 0, "c0 is another connection now, with no user");
        assert_eq!(r.deliver(None, Some("bob"), b"5"), 1);
        let m = r.clients.lock().unwrap();
        assert_eq!(m.by_user.keys().collect::<Vec<_>>(), vec!["bob"]);
        assert_eq!(m.by_user["bob"].iter().collect::<Vec<_>>(), vec!["c1"]);
    }
}
