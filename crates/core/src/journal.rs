//! The durable memory broker's write-ahead journal: every stored publication is appended
//! to one file — under its channel's lock, before the publication is numbered for good or
//! reaches anyone — and the broker's state is rebuilt from that file at start.
//!
//! A record is `len: u32 LE | crc32: u32 LE | body` (the CRC of the body); a record that
//! is cut short or whose CRC fails ends the journal there: the tail is truncated and
//! reported, never a panic. A write that fails (a full disk) is undone (the file is cut
//! back to its length before it) and the publish fails with
//! [`BrokerError::StorageFull`]; nothing was numbered.
//!
//! Durability (`fsync`): `always` — a publish is answered only once its record is synced
//! (one sync for every record written meanwhile: group commit); `batched` — synced every
//! interval; `never` — left to the kernel. Every record is in the kernel before the
//! publication is delivered, so a killed process loses nothing under any policy; a power
//! failure loses what was not yet synced.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::broker::BrokerError;
use crate::publication::Epoch;
use crate::ChannelName;

/// When the journal is synced to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// Before a publish is answered (group commit).
    Always,
    /// Every interval, in the background.
    Batched(Duration),
    /// Never explicitly.
    Never,
}

/// A record of the journal.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A stored publication, with what its channel keeps of it.
    Publication {
        channel: ChannelName,
        epoch: Epoch,
        offset: u64,
        /// Wall clock, Unix ms.
        time: u64,
        data: Bytes,
        history_size: u32,
        /// How long history keeps it (ms); 0: not at all.
        history_ttl_ms: u64,
        /// Its idempotency key and until when (Unix ms) the key is remembered.
        key: Option<(String, u64)>,
    },
    /// A channel's epoch and top offset (a snapshot's record for a channel whose history
    /// is gone but whose numbering goes on).
    Channel { channel: ChannelName, epoch: Epoch, top: u64 },
    /// An idempotency key, remembered until `until` (Unix ms): a snapshot's record.
    Key { channel: ChannelName, epoch: Epoch, key: String, offset: u64, until: u64 },
}

const PUBLICATION: u8 = 1;
const CHANNEL: u8 = 2;
const KEY: u8 = 3;

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u32).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

impl Record {
    /// The record as it is written: length, CRC, body.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        match self {
            Record::Publication { channel, epoch, offset, time, data, history_size, history_ttl_ms, key } => {
                b.push(PUBLICATION);
                put_str(&mut b, channel.as_str());
                put_str(&mut b, epoch);
                b.extend_from_slice(&offset.to_le_bytes());
                b.extend_from_slice(&time.to_le_bytes());
                b.extend_from_slice(&history_size.to_le_bytes());
                b.extend_from_slice(&history_ttl_ms.to_le_bytes());
                match key {
                    Some((k, until)) => {
                        b.push(1);
                        put_str(&mut b, k);
                        b.extend_from_slice(&until.to_le_bytes());
                    }
                    None => b.push(0),
                }
                b.extend_from_slice(&(data.len() as u32).to_le_bytes());
                b.extend_from_slice(data);
            }
            Record::Channel { channel, epoch, top } => {
                b.push(CHANNEL);
                put_str(&mut b, channel.as_str());
                put_str(&mut b, epoch);
                b.extend_from_slice(&top.to_le_bytes());
            }
            Record::Key { channel, epoch, key, offset, until } => {
                b.push(KEY);
                put_str(&mut b, channel.as_str());
                put_str(&mut b, epoch);
                put_str(&mut b, key);
                b.extend_from_slice(&offset.to_le_bytes());
                b.extend_from_slice(&until.to_le_bytes());
            }
        }
        let mut out = Vec::with_capacity(8 + b.len());
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32(&b).to_le_bytes());
        out.extend_from_slice(&b);
        out
    }

    fn decode(body: &[u8]) -> Option<Record> {
        let mut r = Reader(body);
        let rec = match r.u8()? {
            PUBLICATION => {
                let channel = ChannelName::parse(r.str()?).ok()?;
                let epoch: Epoch = r.str()?.into();
                let (offset, time, history_size, history_ttl_ms) = (r.u64()?, r.u64()?, r.u32()?, r.u64()?);
                let key = match r.u8()? {
                    1 => Some((r.str()?.to_string(), r.u64()?)),
                    _ => None,
                };
                let len = r.u32()? as usize;
                let data = Bytes::copy_from_slice(r.take(len)?);
                Record::Publication { channel, epoch, offset, time, data, history_size, history_ttl_ms, key }
            }
            CHANNEL => {
                let channel = ChannelName::parse(r.str()?).ok()?;
                Record::Channel { channel, epoch: r.str()?.into(), top: r.u64()? }
            }
            KEY => {
                let channel = ChannelName::parse(r.str()?).ok()?;
                let epoch: Epoch = r.str()?.into();
                Record::Key { channel, epoch, key: r.str()?.to_string(), offset: r.u64()?, until: r.u64()? }
            }
            _ => return None,
        };
        r.0.is_empty().then_some(rec)
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn str(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }
}

/// CRC-32 (IEEE), bitwise: records are small and this is not the hot part of a write.
pub fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, b| table[((c ^ *b as u32) & 0xFF) as usize] ^ (c >> 8))
}

/// What reading the journal found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub records: u64,
    /// Bytes of a torn or corrupt tail, cut off.
    pub dropped_bytes: u64,
    pub took: Duration,
}

/// Reads every good record of the journal at `path` (none if it does not exist), cutting
/// off a bad tail.
pub fn read(path: &Path, mut apply: impl FnMut(Record)) -> std::io::Result<Recovery> {
    let started = std::time::Instant::now();
    let mut rec = Recovery::default();
    let mut file = match std::fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(rec),
        Err(e) => return Err(e),
    };
    let size = file.metadata()?.len();
    let mut reader = std::io::BufReader::with_capacity(1 << 20, (&mut file).take(size));
    let mut good: u64 = 0;
    let mut head = [0u8; 8];
    let mut body = Vec::new();
    loop {
        if reader.read_exact(&mut head).is_err() {
            break;
        }
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as u64;
        let crc = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
        if len > size - good - 8 {
            break;
        }
        body.resize(len as usize, 0);
        if reader.read_exact(&mut body).is_err() || crc32(&body) != crc {
            break;
        }
        let Some(r) = Record::decode(&body) else { break };
        apply(r);
        rec.records += 1;
        good += 8 + len;
    }
    drop(reader);
    rec.dropped_bytes = size - good;
    if rec.dropped_bytes > 0 {
        file.set_len(good)?;
        file.sync_all()?;
    }
    rec.took = started.elapsed();
    Ok(rec)
}

struct File {
    file: std::fs::File,
    /// Bytes written (the file's length), and records written.
    len: u64,
    seq: u64,
}

/// Synced up to which record, and whether the syncer has failed.
#[derive(Default)]
struct Synced {
    seq: u64,
    wanted: u64,
    error: Option<String>,
}

pub struct Journal {
    path: PathBuf,
    file: Mutex<File>,
    policy: Fsync,
    synced: Mutex<Synced>,
    /// Wakes the syncer (a record wants syncing) and the waiters (a sync finished).
    wake: Condvar,
    done: tokio::sync::watch::Sender<u64>,
}

fn storage_error(e: std::io::Error) -> BrokerError {
    // ENOSPC, and EFBIG (a file-size limit: the same to the publisher).
    if matches!(e.raw_os_error(), Some(28) | Some(27)) || e.kind() == std::io::ErrorKind::StorageFull {
        BrokerError::StorageFull(e.to_string())
    } else {
        BrokerError::Unavailable(format!("journal: {e}"))
    }
}

impl Journal {
    /// Opens `path` for appending (after [`read`] recovered it) and starts the syncer.
    pub fn open(path: &Path, policy: Fsync) -> std::io::Result<Arc<Journal>> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let len = file.metadata()?.len();
        let (done, _) = tokio::sync::watch::channel(0);
        let j = Arc::new(Journal {
            path: path.to_path_buf(),
            file: Mutex::new(File { file, len, seq: 0 }),
            policy,
            synced: Mutex::new(Synced::default()),
            wake: Condvar::new(),
            done,
        });
        if policy != Fsync::Never {
            let weak = Arc::downgrade(&j);
            std::thread::Builder::new().name("journal-sync".into()).spawn(move || syncer(weak, policy))?;
        }
        Ok(j)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the journal.
    pub fn len(&self) -> u64 {
        self.file.lock().unwrap_or_else(|p| p.into_inner()).len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes `record` (into the kernel): its sequence number, for [`Journal::durable`].
    /// A failed write is cut back off the file.
    pub fn append(&self, record: &Record) -> Result<u64, BrokerError> {
        let bytes = record.encode();
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.file.write_all(&bytes) {
            let len = f.len;
            let _ = f.file.set_len(len);
            return Err(storage_error(e));
        }
        f.len += bytes.len() as u64;
        f.seq += 1;
        Ok(f.seq)
    }

    /// Resolves once record `seq` is as durable as the policy promises before a publish
    /// is answered: synced under `always`, at once otherwise.
    pub async fn durable(&self, seq: u64) -> Result<(), BrokerError> {
        if self.policy != Fsync::Always {
            return Ok(());
        }
        let mut rx = self.done.subscribe();
        {
            let mut s = self.synced.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = &s.error {
                return Err(BrokerError::StorageFull(e.clone()));
            }
            if s.seq >= seq {
                return Ok(());
            }
            s.wanted = s.wanted.max(seq);
        }
        self.wake.notify_all();
        let _ = rx.wait_for(|synced| *synced >= seq).await;
        match &self.synced.lock().unwrap_or_else(|p| p.into_inner()).error {
            Some(e) => Err(BrokerError::StorageFull(e.clone())),
            None => Ok(()),
        }
    }

    /// Compacts the journal without stalling writers: `snapshot` (what is live, read
    /// after this call began) is written to a new file, then — holding writers back only
    /// for that — what was appended meanwhile is copied after it, the new file synced and
    /// renamed over the old. Records in both replay idempotently. Returns the new length.
    pub fn compact(&self, snapshot: impl FnOnce() -> Vec<Record>) -> std::io::Result<u64> {
        let from = self.file.lock().unwrap_or_else(|p| p.into_inner()).len;
        let tmp = self.path.with_extension("compact");
        let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        let mut len = 0;
        for r in snapshot() {
            let b = r.encode();
            w.write_all(&b)?;
            len += b.len() as u64;
        }
        let mut out = w.into_inner().map_err(|e| e.into_error())?;
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        // The tail written since `from`, after the snapshot.
        let mut old = std::fs::File::open(&self.path)?;
        std::io::Seek::seek(&mut old, std::io::SeekFrom::Start(from))?;
        len += std::io::copy(&mut old.take(f.len - from), &mut out)?;
        out.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent().and_then(|d| std::fs::File::open(d).ok()) {
            let _ = dir.sync_all();
        }
        f.file = std::fs::OpenOptions::new().append(true).open(&self.path)?;
        f.len = len;
        Ok(len)
    }

    /// Replaces the journal with `records` (a snapshot of what is live), atomically.
    pub fn rewrite(&self, records: impl Iterator<Item = Record>) -> std::io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut len = 0;
        {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
            for r in records {
                let b = r.encode();
                w.write_all(&b)?;
                len += b.len() as u64;
            }
            w.flush()?;
            w.get_ref().sync_all()?;
        }
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent().and_then(|d| std::fs::File::open(d).ok()) {
            let _ = dir.sync_all();
        }
        f.file = std::fs::OpenOptions::new().append(true).open(&self.path)?;
        f.len = len;
        Ok(())
    }
}

/// Syncs the journal: on demand (`always`: every record a publish waits for, grouped) or
/// every interval (`batched`).
fn syncer(journal: std::sync::Weak<Journal>, policy: Fsync) {
    let interval = match policy {
        Fsync::Batched(d) => d,
        _ => Duration::from_millis(200),
    };
    loop {
        let Some(j) = journal.upgrade() else { return };
        if policy == Fsync::Always {
            let s = j.synced.lock().unwrap_or_else(|p| p.into_inner());
            let _ = j.wake.wait_timeout_while(s, interval, |s| s.wanted <= s.seq);
        } else {
            std::thread::sleep(interval);
        }
        // What is written now is what this sync covers.
        let (file, seq) = {
            let f = j.file.lock().unwrap_or_else(|p| p.into_inner());
            (f.file.try_clone(), f.seq)
        };
        if seq <= j.synced.lock().unwrap_or_else(|p| p.into_inner()).seq {
            continue;
        }
        let r = file.and_then(|f| f.sync_data());
        let mut s = j.synced.lock().unwrap_or_else(|p| p.into_inner());
        let done = match r {
            Ok(()) => {
                s.seq = s.seq.max(seq);
                s.seq
            }
            Err(e) => {
                s.error = Some(format!("journal sync: {e}"));
                u64::MAX // wakes every waiter, to find the error
            }
        };
        drop(s);
        j.done.send_replace(done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publication(offset: u64) -> Record {
        Record::Publication {
            channel: ChannelName::parse("ns:c").unwrap(),
            epoch: "e1".into(),
            offset,
            time: 1_700_000_000_000 + offset,
            data: Bytes::from(format!("{{\"n\":{offset}}}")),
            history_size: 100,
            history_ttl_ms: 60_000,
            key: offset.is_multiple_of(2).then(|| (format!("k{offset}"), 5)),
        }
    }

    #[test]
    fn records_round_trip_and_the_crc_is_ieee() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        for r in [
            publication(1),
            publication(2),
            Record::Channel { channel: ChannelName::parse("x").unwrap(), epoch: "e".into(), top: 9 },
            Record::Key {
                channel: ChannelName::parse("x").unwrap(),
                epoch: "e".into(),
                key: "k".into(),
                offset: 3,
                until: 4,
            },
        ] {
            let b = r.encode();
            assert_eq!(Record::decode(&b[8..]), Some(r));
        }
    }

    #[test]
    fn a_torn_or_corrupt_tail_is_cut_off_and_counted() {
        let dir = std::env::temp_dir().join(format!("sb-journal-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("j");
        let mut bytes: Vec<u8> = (1..=3).flat_map(|n| publication(n).encode()).collect();
        let good = bytes.len() as u64;
        let torn = publication(4).encode();
        bytes.extend_from_slice(&torn[..torn.len() / 2]);
        std::fs::write(&path, &bytes).unwrap();
        let mut seen = Vec::new();
        let r = read(&path, |r| seen.push(r)).unwrap();
        assert_eq!((r.records, r.dropped_bytes), (3, torn.len() as u64 / 2));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good, "cut back to the last good record");
        // A flipped bit in the middle ends the journal there too.
        let mut bytes = std::fs::read(&path).unwrap();
        let second = publication(1).encode().len();
        bytes[second + 12] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let r = read(&path, |_| {}).unwrap();
        assert_eq!(r.records, 1);
        assert_eq!(seen.len(), 3);
    }
}
