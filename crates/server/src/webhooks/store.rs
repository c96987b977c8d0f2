//! Where pending webhook events wait: what a restart or a crash must not lose.
//!
//! [`FileStore`] is the embedded queue (the memory broker's): the state lives in memory
//! and every change is appended to a journal file, one JSON line each, before a
//! delivery can depend on it — the journal is replayed at start (a torn last line, from a
//! crash mid-write, is cut off and reported) and rewritten as a snapshot when it has
//! grown to several times what is live. Writes are grouped: one writer task writes what
//! has accumulated and syncs once per group (`[webhooks] fsync`).
//!
//! An event taken for delivery stays in the journal as pending until it is done, moved
//! to a later attempt or dead: after a crash it is delivered again (at least once —
//! receivers dedupe by event id).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use switchboard_core::now_millis;
use tokio::sync::{mpsc, Notify};

/// An event waiting for one endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Item {
    /// The event's id (`evt_…`): what receivers dedupe on.
    pub id: String,
    /// Failed attempts so far.
    pub attempt: u32,
    /// When it was queued (Unix ms): the retry horizon counts from here.
    pub first: u64,
    /// Not before (Unix ms).
    pub due: u64,
    /// The last failure, for the dead-letter list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The event's JSON.
    pub event: Box<serde_json::value::RawValue>,
    /// Where a shared queue holds it (a Redis Stream entry), while taken.
    #[serde(skip)]
    pub entry: Option<String>,
}

/// A journal line: `{"add":{…}}`, `{"done":{…}}`, … (externally tagged: an event's
/// raw JSON cannot pass through serde's buffering of internally tagged enums).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Op {
    Add { ep: String, item: Item },
    Done { ep: String, id: String },
    Later { ep: String, id: String, attempt: u32, due: u64, error: Option<String> },
    Dead { ep: String, id: String, attempt: u32, error: Option<String> },
    Revive { ep: String, id: String, now: u64 },
}

#[derive(Default)]
struct Endpoint {
    /// Due now, oldest first, with when each became ready (for batching).
    ready: VecDeque<(Item, Instant)>,
    /// Waiting for their next attempt, by (due, sequence).
    delayed: BTreeMap<(u64, u64), Item>,
    /// Taken by a delivery, by id.
    inflight: HashMap<String, Item>,
    dead: Vec<Item>,
}

#[derive(Default)]
struct State {
    eps: HashMap<String, Endpoint>,
    /// Pending (not dead) events across endpoints.
    pending: usize,
    seq: u64,
}

impl State {
    fn ep(&mut self, name: &str) -> &mut Endpoint {
        self.eps.entry(name.to_string()).or_default()
    }

    /// Applies one journal line at start: idempotent, so a line written both before and
    /// after a snapshot does no harm.
    fn replay(&mut self, op: Op) {
        match op {
            Op::Add { ep, item } => {
                let e = self.ep(&ep);
                let known = e.ready.iter().any(|(i, _)| i.id == item.id)
                    || e.delayed.values().any(|i| i.id == item.id)
                    || e.dead.iter().any(|i| i.id == item.id);
                if !known {
                    e.ready.push_back((item, Instant::now()));
                    self.pending += 1;
                }
            }
            Op::Done { ep, id } => {
                if self.take_pending(&ep, &id).is_some() {
                    self.pending -= 1;
                }
            }
            Op::Later { ep, id, attempt, due, error } => {
                if let Some(mut item) = self.take_pending(&ep, &id) {
                    (item.attempt, item.due, item.error) = (attempt, due, error);
                    self.seq += 1;
                    let seq = self.seq;
                    self.ep(&ep).delayed.insert((due, seq), item);
                }
            }
            Op::Dead { ep, id, attempt, error } => {
                if let Some(mut item) = self.take_pending(&ep, &id) {
                    (item.attempt, item.error) = (attempt, error);
                    self.ep(&ep).dead.push(item);
                    self.pending -= 1;
                }
            }
            Op::Revive { ep, id, now } => {
                let e = self.ep(&ep);
                if let Some(i) = e.dead.iter().position(|i| i.id == id) {
                    let mut item = e.dead.remove(i);
                    (item.attempt, item.first, item.due, item.error) = (0, now, now, None);
                    e.ready.push_back((item, Instant::now()));
                    self.pending += 1;
                }
            }
        }
    }

    /// Removes a pending item (ready, delayed or in flight) wherever it is.
    fn take_pending(&mut self, ep: &str, id: &str) -> Option<Item> {
        let e = self.eps.get_mut(ep)?;
        if let Some(item) = e.inflight.remove(id) {
            return Some(item);
        }
        if let Some(i) = e.ready.iter().position(|(i, _)| i.id == id) {
            return e.ready.remove(i).map(|(item, _)| item);
        }
        let key = e.delayed.iter().find(|(_, i)| i.id == id).map(|(k, _)| *k)?;
        e.delayed.remove(&key)
    }

    /// Every live item as journal lines: a snapshot.
    fn snapshot(&self) -> Vec<Op> {
        let mut ops = Vec::new();
        for (name, e) in &self.eps {
            let pending = e.inflight.values().chain(e.ready.iter().map(|(i, _)| i)).chain(e.delayed.values());
            for item in pending {
                ops.push(Op::Add { ep: name.clone(), item: item.clone() });
            }
            for item in &e.dead {
                ops.push(Op::Add { ep: name.clone(), item: item.clone() });
                let (id, attempt, error) = (item.id.clone(), item.attempt, item.error.clone());
                ops.push(Op::Dead { ep: name.clone(), id, attempt, error });
            }
        }
        ops
    }

    fn live(&self) -> usize {
        self.eps.values().map(|e| e.ready.len() + e.delayed.len() + e.inflight.len() + e.dead.len()).sum()
    }
}

/// What a start found in the journal.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Events pending (to deliver) and dead.
    pub pending: usize,
    pub dead: usize,
    /// Bytes of a torn or corrupt tail that were cut off.
    pub dropped_bytes: u64,
}

/// The embedded queue: memory plus a journal file.
pub struct FileStore {
    state: Mutex<State>,
    journal: mpsc::UnboundedSender<String>,
    notify: Notify,
    pub recovered: Recovered,
}

impl FileStore {
    /// Opens (or creates) the queue in `dir`, replaying its journal, and starts its writer.
    pub fn open(dir: &Path, fsync: bool) -> std::io::Result<Arc<FileStore>> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("webhooks.journal");
        let (state, recovered) = load(&path)?;
        // Start from a compact file: the snapshot of what is live.
        let snapshot = state.snapshot();
        write_snapshot(&path, &snapshot)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let store = Arc::new(FileStore { state: Mutex::new(state), journal: tx, notify: Notify::new(), recovered });
        let weak = Arc::downgrade(&store);
        std::thread::Builder::new().name("webhook-journal".into()).spawn(move || writer(path, rx, fsync, weak))?;
        Ok(store)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `op` and journals it (under the state's lock: the journal's order is the state's).
    fn apply(&self, st: &mut State, op: Op) {
        if let Ok(line) = serde_json::to_string(&op) {
            let _ = self.journal.send(line);
        }
        st.replay(op);
    }

    /// Queues `event` for each of `endpoints`; false (nothing queued) when `max_pending`
    /// events already wait.
    pub fn add(&self, endpoints: &[&str], id: &str, event: &serde_json::value::RawValue, max_pending: usize) -> bool {
        let mut st = self.state();
        if st.pending + endpoints.len() > max_pending {
            return false;
        }
        let now = now_millis();
        for ep in endpoints {
            let item = Item {
                id: id.to_string(),
                attempt: 0,
                first: now,
                due: now,
                error: None,
                event: event.to_owned(),
                entry: None,
            };
            self.apply(&mut st, Op::Add { ep: ep.to_string(), item });
        }
        drop(st);
        self.notify.notify_waiters();
        true
    }

    /// Up to `max` due events of `ep`, taken for delivery. Waits for the first, then —
    /// with `batch` — until `max` are there or the oldest has waited `batch`.
    pub async fn take(&self, ep: &str, max: usize, batch: Duration) -> Vec<Item> {
        loop {
            let notified = self.notify.notified();
            let wait = {
                let mut st = self.state();
                let now = now_millis();
                let e = st.ep(ep);
                while let Some(entry) = e.delayed.first_entry() {
                    if entry.key().0 > now {
                        break;
                    }
                    e.ready.push_back((entry.remove(), Instant::now()));
                }
                let oldest = e.ready.front().map(|(_, at)| at.elapsed());
                match oldest {
                    Some(age) if e.ready.len() >= max || age >= batch => {
                        let n = e.ready.len().min(max);
                        let items: Vec<Item> = e.ready.drain(..n).map(|(i, _)| i).collect();
                        for i in &items {
                            e.inflight.insert(i.id.clone(), i.clone());
                        }
                        return items;
                    }
                    Some(age) => batch - age,
                    None => {
                        let next = e.delayed.keys().next().map(|(due, _)| Duration::from_millis(due - now));
                        next.unwrap_or(Duration::from_secs(1)).min(Duration::from_secs(1))
                    }
                }
            };
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    pub fn done(&self, ep: &str, ids: &[String]) {
        let mut st = self.state();
        for id in ids {
            self.apply(&mut st, Op::Done { ep: ep.to_string(), id: id.clone() });
        }
    }

    pub fn later(&self, ep: &str, item: &Item, due: u64, error: &str) {
        let op = Op::Later {
            ep: ep.to_string(),
            id: item.id.clone(),
            attempt: item.attempt + 1,
            due,
            error: Some(error.to_string()),
        };
        self.apply(&mut self.state(), op);
    }

    pub fn dead(&self, ep: &str, item: &Item, error: &str) {
        let op = Op::Dead {
            ep: ep.to_string(),
            id: item.id.clone(),
            attempt: item.attempt + 1,
            error: Some(error.to_string()),
        };
        self.apply(&mut self.state(), op);
    }

    /// The dead-letter list: (endpoint, item), oldest first per endpoint.
    pub fn dead_list(&self) -> Vec<(String, Item)> {
        let st = self.state();
        let mut out: Vec<(String, Item)> =
            st.eps.iter().flat_map(|(name, e)| e.dead.iter().map(|i| (name.clone(), i.clone()))).collect();
        out.sort_by(|a, b| (a.1.first, &a.1.id).cmp(&(b.1.first, &b.1.id)));
        out
    }

    /// Moves dead events back to the queue (those of `ep`, or every endpoint's; only
    /// `ids` when given), as new: attempts and horizon start again. Returns how many.
    pub fn replay(&self, ep: Option<&str>, ids: Option<&[String]>) -> usize {
        let mut st = self.state();
        let now = now_millis();
        let chosen: Vec<(String, String)> = st
            .eps
            .iter()
            .filter(|(name, _)| ep.is_none_or(|e| e == name.as_str()))
            .flat_map(|(name, e)| e.dead.iter().map(move |i| (name.clone(), i.id.clone())))
            .filter(|(_, id)| ids.is_none_or(|ids| ids.contains(id)))
            .collect();
        for (ep, id) in &chosen {
            self.apply(&mut st, Op::Revive { ep: ep.clone(), id: id.clone(), now });
        }
        drop(st);
        self.notify.notify_waiters();
        chosen.len()
    }

    /// Events pending (not dead), across endpoints.
    pub fn pending(&self) -> usize {
        self.state().pending
    }

    pub fn dead_count(&self) -> usize {
        self.state().eps.values().map(|e| e.dead.len()).sum()
    }
}

/// Reads the journal: the state it describes, and what was cut off its end.
fn load(path: &Path) -> std::io::Result<(State, Recovered)> {
    let mut state = State::default();
    let mut rec = Recovered::default();
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((state, rec)),
        Err(e) => return Err(e),
    };
    let total = file.metadata()?.len();
    let mut reader = std::io::BufReader::new(file);
    let mut good: u64 = 0;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        // A line without its newline is one the crash interrupted; so is one that does not parse.
        let complete = line.last() == Some(&b'\n');
        match serde_json::from_slice::<Op>(&line).ok().filter(|_| complete) {
            Some(op) => {
                state.replay(op);
                good += n as u64;
            }
            None => break,
        }
    }
    rec.dropped_bytes = total - good;
    rec.pending = state.pending;
    rec.dead = state.eps.values().map(|e| e.dead.len()).sum();
    Ok((state, rec))
}

/// Writes `ops` as the whole journal, atomically (a temporary file renamed over it).
fn write_snapshot(path: &Path, ops: &[Op]) -> std::io::Result<()> {
    let tmp: PathBuf = path.with_extension("journal.tmp");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        for op in ops {
            serde_json::to_writer(&mut f, op)?;
            f.write_all(b"\n")?;
        }
        f.flush()?;
        f.get_ref().sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        // The rename itself is durable once the directory is synced.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// The writer thread: appends what was journaled, syncs once per group, and rewrites the
/// file as a snapshot once it holds several times what is live.
fn writer(path: PathBuf, mut rx: mpsc::UnboundedReceiver<String>, fsync: bool, store: std::sync::Weak<FileStore>) {
    let open = |p: &Path| std::fs::OpenOptions::new().append(true).create(true).open(p);
    let mut file = match open(&path) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!("webhook queue: cannot open {}: {e}", path.display());
            return;
        }
    };
    let mut lines_since_snapshot: usize = 0;
    let mut buf = Vec::with_capacity(64 * 1024);
    while let Some(first) = rx.blocking_recv() {
        buf.clear();
        buf.extend_from_slice(first.as_bytes());
        buf.push(b'\n');
        let mut n = 1;
        while let Ok(more) = rx.try_recv() {
            buf.extend_from_slice(more.as_bytes());
            buf.push(b'\n');
            n += 1;
        }
        let written = file.write_all(&buf).and_then(|()| if fsync { file.sync_data() } else { Ok(()) });
        if let Err(e) = written {
            tracing::error!("webhook queue: writing {}: {e}", path.display());
        }
        lines_since_snapshot += n;
        if lines_since_snapshot >= 10_000 {
            let Some(store) = store.upgrade() else { return };
            // Under the state's lock: nothing is journaled meanwhile, so the snapshot and
            // the lines after it agree (lines already queued replay idempotently).
            let st = store.state();
            if lines_since_snapshot > 4 * st.live() {
                match write_snapshot(&path, &st.snapshot()).and_then(|()| open(&path)) {
                    Ok(f) => {
                        file = f;
                        lines_since_snapshot = 0;
                    }
                    Err(e) => tracing::error!("webhook queue: snapshot of {}: {e}", path.display()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<serde_json::value::RawValue> {
        serde_json::value::RawValue::from_string(s.to_string()).unwrap()
    }

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("sb-wh-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Waits until the writer has written what was journaled.
    fn settle(path: &Path, lines: usize) {
        for _ in 0..1000 {
            let n = std::fs::read_to_string(path).map(|s| s.lines().count()).unwrap_or(0);
            if n >= lines {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("the journal never reached {lines} lines");
    }

    #[tokio::test]
    async fn a_restart_keeps_what_is_pending_and_dead_and_forgets_what_is_done() {
        let d = dir();
        let path = d.join("webhooks.journal");
        {
            let s = FileStore::open(&d, true).unwrap();
            for n in 0..4 {
                assert!(s.add(&["a"], &format!("evt_{n}"), &raw(&format!("{{\"n\":{n}}}")), 100));
            }
            let taken = s.take("a", 3, Duration::ZERO).await;
            assert_eq!(taken.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["evt_0", "evt_1", "evt_2"]);
            s.done("a", &[taken[0].id.clone()]);
            s.later("a", &taken[1], now_millis() + 3_600_000, "HTTP 500");
            s.dead("a", &taken[2], "HTTP 410");
            // evt_3 is still ready; evt_1 waits an hour; evt_2 is dead.
            settle(&path, 7);
        }
        let s = FileStore::open(&d, true).unwrap();
        assert_eq!(s.recovered, Recovered { pending: 2, dead: 1, dropped_bytes: 0 });
        assert_eq!(s.pending(), 2);
        let dead = s.dead_list();
        assert_eq!(
            (dead[0].1.id.as_str(), dead[0].1.attempt, dead[0].1.error.as_deref()),
            ("evt_2", 1, Some("HTTP 410"))
        );
        let ready = s.take("a", 10, Duration::ZERO).await;
        assert_eq!(ready.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["evt_3"]);
        // Replay from the dead-letter list: pending again, attempts from zero.
        assert_eq!(s.replay(Some("a"), None), 1);
        let again = s.take("a", 10, Duration::ZERO).await;
        assert_eq!((again[0].id.as_str(), again[0].attempt), ("evt_2", 0));
        assert_eq!(s.dead_count(), 0);
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_off_and_reported_and_taken_events_come_back() {
        let d = dir();
        let path = d.join("webhooks.journal");
        {
            let s = FileStore::open(&d, true).unwrap();
            assert!(s.add(&["a", "b"], "evt_x", &raw("{}"), 100));
            let _ = s.take("a", 1, Duration::ZERO).await; // taken, never finished: a crash
            settle(&path, 2);
        }
        // The crash cut a line in half.
        let torn = b"{\"done\":{\"ep\":\"a\",\"id\":\"ev";
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(torn).unwrap();
        drop(f);
        let s = FileStore::open(&d, true).unwrap();
        assert_eq!(s.recovered.dropped_bytes, torn.len() as u64);
        assert_eq!(s.recovered.pending, 2);
        assert_eq!(s.take("a", 1, Duration::ZERO).await[0].id, "evt_x");
        assert_eq!(s.take("b", 1, Duration::ZERO).await[0].id, "evt_x");
    }

    #[tokio::test]
    async fn past_max_pending_new_events_are_refused_and_batches_wait_for_their_size_or_time() {
        let s = FileStore::open(&dir(), false).unwrap();
        assert!(s.add(&["a"], "1", &raw("1"), 2));
        assert!(s.add(&["a"], "2", &raw("2"), 2));
        assert!(!s.add(&["a"], "3", &raw("3"), 2));
        // A batch of 5 is not full: it goes once the oldest has waited the batch time.
        let batch = s.take("a", 5, Duration::from_millis(50)).await;
        assert_eq!(batch.len(), 2);
    }
}
