//! In-process [`Store`]: sharded maps behind std mutexes, for tests, dry runs
//! and `kind = "memory"`. Nothing survives the process; otherwise it keeps
//! exactly the rules of the trait, the same way `redb` does (the property
//! tests hold both to one model).
//!
//! Rules the trait leaves open, decided here and in `redb` alike:
//! - a message is expired at `now_ms` when `expires_ms < now_ms` (its
//!   `expires_ms` is the last millisecond it may be delivered);
//! - the pending limit counts stored messages, but before it discards a live
//!   message it first removes the device's expired ones (at the appended
//!   message's `created_ms`), so an expired message is never reported as
//!   dropped. Those count as expired and are reported by the next `expire`;
//! - `max_pending` 0 is taken as 1: the message just stored is never the one
//!   the limit discards;
//! - `ack` and `purge` count every message they remove, expired ones not yet
//!   removed by `expire` included.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    AppendOutcome, DeviceRecord, ExpireOutcome, NewMessage, Store, StoreError, StoredMessage,
};

/// Enough shards that connection tasks on a few cores rarely meet on one lock.
const SHARDS: usize = 64;

/// The in-process store. Cheap to create; share it behind an `Arc`.
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    /// Messages stored over all devices, expired ones not yet removed included.
    pending_total: AtomicU64,
    /// Expired messages removed by `append` (see the module doc), not yet
    /// reported by `expire`.
    expired_unreported: AtomicU64,
    /// Messages removed by acks.
    acked_total: AtomicU64,
}

/// Deadline index entry: (expires_ms, app, device, seq).
type ExpiryKey = (u64, Arc<str>, Arc<str>, u64);

#[derive(Default)]
struct Shard {
    /// app -> device -> state. Device entries are never removed, so that
    /// their seq counter is never reset.
    apps: HashMap<Arc<str>, HashMap<Arc<str>, Device>>,
    /// Every stored message of this shard by deadline, so `expire` does not
    /// scan devices.
    expiry: BTreeSet<ExpiryKey>,
}

struct Device {
    app: Arc<str>,
    name: Arc<str>,
    next_seq: u64,
    sessions: u64,
    first_seen_ms: u64,
    last_seen_ms: u64,
    /// Allocated with the first message stored: most devices only ever have
    /// a session record, and a `Device` sits in a hash table whose buckets
    /// are paid for even when empty (72 bytes instead of 144 this way).
    queue: Option<Box<Queue>>,
}

/// A device's stored messages and their indexes.
#[derive(Default)]
struct Queue {
    dropped: u64,
    messages: BTreeMap<u64, Pending>,
    /// collapse key -> seq of the pending message carrying it.
    collapse: HashMap<Arc<str>, u64>,
}

/// The messages of a device that never had one.
static NO_MESSAGES: BTreeMap<u64, Pending> = BTreeMap::new();

struct Pending {
    id: Arc<str>,
    data: Bytes,
    created_ms: u64,
    expires_ms: u64,
    collapse_key: Option<Arc<str>>,
}

impl Device {
    fn new(app: Arc<str>, name: Arc<str>) -> Self {
        Device {
            app,
            name,
            next_seq: 1,
            sessions: 0,
            first_seen_ms: 0,
            last_seen_ms: 0,
            queue: None,
        }
    }

    fn messages(&self) -> &BTreeMap<u64, Pending> {
        self.queue.as_ref().map_or(&NO_MESSAGES, |q| &q.messages)
    }

    fn queue_mut(&mut self) -> &mut Queue {
        self.queue.get_or_insert_with(Box::default)
    }

    /// Removes one message with its index entries; returns whether it was there.
    fn remove(&mut self, expiry: &mut BTreeSet<ExpiryKey>, seq: u64) -> bool {
        let Some(q) = self.queue.as_mut() else {
            return false;
        };
        let Some(msg) = q.messages.remove(&seq) else {
            return false;
        };
        expiry.remove(&(msg.expires_ms, self.app.clone(), self.name.clone(), seq));
        if let Some(key) = &msg.collapse_key {
            if q.collapse.get(key) == Some(&seq) {
                q.collapse.remove(key);
            }
        }
        true
    }

    /// Removes every message `doomed` picks; returns how many.
    fn remove_where(
        &mut self,
        expiry: &mut BTreeSet<ExpiryKey>,
        mut doomed: impl FnMut(u64, &Pending) -> bool,
    ) -> u64 {
        let seqs: Vec<u64> = self
            .messages()
            .iter()
            .filter(|(seq, msg)| doomed(**seq, msg))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in &seqs {
            self.remove(expiry, *seq);
        }
        seqs.len() as u64
    }

    fn live(&self, now_ms: u64) -> impl Iterator<Item = (&u64, &Pending)> {
        self.messages()
            .iter()
            .filter(move |(_, msg)| msg.expires_ms >= now_ms)
    }
}

impl Shard {
    fn device(&self, app: &str, device: &str) -> Option<&Device> {
        self.apps.get(app)?.get(device)
    }

    fn device_mut(
        &mut self,
        app: &str,
        device: &str,
    ) -> Option<(&mut Device, &mut BTreeSet<ExpiryKey>)> {
        let dev = self.apps.get_mut(app)?.get_mut(device)?;
        Some((dev, &mut self.expiry))
    }

    /// The device's state, created (with seq starting at 1) if new.
    fn device_or_new(
        &mut self,
        app: &str,
        device: &str,
    ) -> (&mut Device, &mut BTreeSet<ExpiryKey>) {
        let app_key = match self.apps.get_key_value(app) {
            Some((key, _)) => key.clone(),
            None => {
                let key: Arc<str> = Arc::from(app);
                self.apps.insert(key.clone(), HashMap::new());
                key
            }
        };
        let devices = self
            .apps
            .get_mut(app)
            .expect("app entry ensured just above");
        if !devices.contains_key(device) {
            let name: Arc<str> = Arc::from(device);
            devices.insert(name.clone(), Device::new(app_key, name));
        }
        let dev = devices
            .get_mut(device)
            .expect("device entry ensured just above");
        (dev, &mut self.expiry)
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: RandomState::new(),
            pending_total: AtomicU64::new(0),
            expired_unreported: AtomicU64::new(0),
            acked_total: AtomicU64::new(0),
        }
    }

    fn shard(&self, app: &str, device: &str) -> MutexGuard<'_, Shard> {
        let hash = self.hasher.hash_one((app, device));
        let index = (hash % SHARDS as u64) as usize;
        lock(&self.shards[index])
    }

    fn add_pending(&self, delta: i64) {
        if delta >= 0 {
            self.pending_total
                .fetch_add(delta.unsigned_abs(), Ordering::Relaxed);
        } else {
            self.pending_total
                .fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
    }

    /// Stores `msg` for one device; see the module doc for the order of rules.
    fn append_one(
        &self,
        app: &str,
        device: &str,
        msg: &NewMessage,
        max_pending: u64,
    ) -> AppendOutcome {
        let now_ms = msg.created_ms;
        let max_pending = max_pending.max(1);
        let mut shard = self.shard(app, device);
        let (dev, expiry) = shard.device_or_new(app, device);
        let seq = dev.next_seq;
        dev.next_seq += 1;
        let mut delta: i64 = 1;

        let mut collapsed = 0;
        if let Some(key) = &msg.collapse_key {
            if let Some(old) = dev.queue_mut().collapse.get(key).copied() {
                if dev.remove(expiry, old) {
                    collapsed = 1;
                    delta -= 1;
                }
            }
            dev.queue_mut().collapse.insert(key.clone(), seq);
        }
        dev.queue_mut().messages.insert(
            seq,
            Pending {
                id: msg.id.clone(),
                data: msg.data.clone(),
                created_ms: msg.created_ms,
                expires_ms: msg.expires_ms,
                collapse_key: msg.collapse_key.clone(),
            },
        );
        expiry.insert((msg.expires_ms, dev.app.clone(), dev.name.clone(), seq));

        let mut dropped = 0;
        if dev.messages().len() as u64 > max_pending {
            let expired = dev.remove_where(expiry, |_, m| m.expires_ms < now_ms);
            self.expired_unreported
                .fetch_add(expired, Ordering::Relaxed);
            delta -= expired as i64;
            let excess = (dev.messages().len() as u64).saturating_sub(max_pending);
            let oldest: Vec<u64> = dev
                .messages()
                .keys()
                .take(excess as usize)
                .copied()
                .collect();
            for old in oldest {
                dev.remove(expiry, old);
            }
            dropped = excess;
            delta -= excess as i64;
            dev.queue_mut().dropped += excess;
        }
        drop(shard);
        self.add_pending(delta);
        AppendOutcome {
            seq,
            dropped,
            collapsed,
        }
    }

    fn ack_now(&self, app: &str, device: &str, seq: u64) -> u64 {
        let removed = self.remove_from(app, device, |s, _| s <= seq);
        self.acked_total.fetch_add(removed, Ordering::Relaxed);
        removed
    }

    /// Removes the device's messages that `doomed` picks; returns how many.
    fn remove_from(
        &self,
        app: &str,
        device: &str,
        doomed: impl FnMut(u64, &Pending) -> bool,
    ) -> u64 {
        let mut shard = self.shard(app, device);
        let removed = match shard.device_mut(app, device) {
            Some((dev, expiry)) => dev.remove_where(expiry, doomed),
            None => 0,
        };
        drop(shard);
        self.pending_total.fetch_sub(removed, Ordering::Relaxed);
        removed
    }
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A poisoned shard means a panic half-way through an update: its
    // invariants are gone, so every later caller fails loudly too.
    shard
        .lock()
        .expect("memory store shard poisoned by an earlier panic")
}

#[async_trait]
impl Store for MemoryStore {
    async fn append(
        &self,
        app: &str,
        devices: &[&str],
        msg: &NewMessage,
        max_pending: u64,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        Ok(devices
            .iter()
            .map(|device| self.append_one(app, device, msg, max_pending))
            .collect())
    }

    async fn pending(
        &self,
        app: &str,
        device: &str,
        after_seq: u64,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let shard = self.shard(app, device);
        let Some(dev) = shard.device(app, device) else {
            return Ok(Vec::new());
        };
        Ok(dev
            .messages()
            .range(after_seq.saturating_add(1)..)
            .filter(|(seq, msg)| **seq > after_seq && msg.expires_ms >= now_ms)
            .take(limit)
            .map(|(seq, msg)| StoredMessage {
                seq: *seq,
                id: msg.id.clone(),
                data: msg.data.clone(),
                created_ms: msg.created_ms,
                expires_ms: msg.expires_ms,
            })
            .collect())
    }

    async fn ack(&self, app: &str, device: &str, seq: u64) -> Result<u64, StoreError> {
        Ok(self.ack_now(app, device, seq))
    }

    fn ack_queued(&self, app: &str, device: &str, seq: u64) {
        // Nothing to queue for: an ack here is a short locked update.
        self.ack_now(app, device, seq);
    }

    fn acked_total(&self) -> u64 {
        self.acked_total.load(Ordering::Relaxed)
    }

    async fn purge(&self, app: &str, device: &str) -> Result<u64, StoreError> {
        Ok(self.remove_from(app, device, |_, _| true))
    }

    async fn take_dropped(&self, app: &str, device: &str) -> Result<u64, StoreError> {
        let mut shard = self.shard(app, device);
        Ok(match shard.device_mut(app, device) {
            Some((dev, _)) => dev
                .queue
                .as_mut()
                .map_or(0, |q| std::mem::take(&mut q.dropped)),
            None => 0,
        })
    }

    async fn expire(&self, now_ms: u64) -> Result<ExpireOutcome, StoreError> {
        let mut expired = 0;
        let bound: ExpiryKey = (now_ms, Arc::from(""), Arc::from(""), 0);
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            // Everything before `bound` has expires_ms < now_ms (seqs start at 1).
            let keep = shard.expiry.split_off(&bound);
            let due = std::mem::replace(&mut shard.expiry, keep);
            for (_, app, device, seq) in due {
                if let Some((dev, expiry)) = shard.device_mut(&app, &device) {
                    if dev.remove(expiry, seq) {
                        expired += 1;
                    }
                }
            }
        }
        self.pending_total.fetch_sub(expired, Ordering::Relaxed);
        expired += self.expired_unreported.swap(0, Ordering::Relaxed);
        Ok(ExpireOutcome { expired })
    }

    async fn record_session(&self, app: &str, device: &str, now_ms: u64) -> Result<(), StoreError> {
        let mut shard = self.shard(app, device);
        let (dev, _) = shard.device_or_new(app, device);
        if dev.sessions == 0 {
            dev.first_seen_ms = now_ms;
        }
        dev.sessions += 1;
        dev.last_seen_ms = now_ms;
        Ok(())
    }

    async fn device(
        &self,
        app: &str,
        device: &str,
        now_ms: u64,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        let shard = self.shard(app, device);
        let Some(dev) = shard.device(app, device) else {
            return Ok(None);
        };
        let pending = dev.live(now_ms).count() as u64;
        if dev.sessions == 0 && pending == 0 {
            return Ok(None);
        }
        let seen = |ms| (dev.sessions > 0).then_some(ms);
        Ok(Some(DeviceRecord {
            first_seen_ms: seen(dev.first_seen_ms),
            last_seen_ms: seen(dev.last_seen_ms),
            sessions: dev.sessions,
            pending,
        }))
    }

    fn pending_total(&self) -> u64 {
        self.pending_total.load(Ordering::Relaxed)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{msg, seqs};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_get_distinct_seqs() {
        let s = Arc::new(MemoryStore::new());
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    let m = msg(&format!("m{i}"), 0, 1000, None);
                    s.append("a", &["d"], &m, 1000).await.expect("append")[0].seq
                })
            })
            .collect();
        let mut got = Vec::new();
        for task in tasks {
            got.push(task.await.expect("task"));
        }
        got.sort_unstable();
        assert_eq!(got, (1..=64).collect::<Vec<u64>>());
        assert_eq!(s.pending_total(), 64);
    }

    #[tokio::test]
    async fn expire_sweeps_every_shard() {
        let s = MemoryStore::default();
        let names: Vec<String> = (0..500).map(|i| format!("dev{i}")).collect();
        let devices: Vec<&str> = names.iter().map(String::as_str).collect();
        s.append("a", &devices, &msg("short", 0, 10, None), 10)
            .await
            .expect("append");
        s.append("a", &devices, &msg("long", 0, 1000, None), 10)
            .await
            .expect("append");
        assert_eq!(s.pending_total(), 1000);
        assert_eq!(s.expire(11).await.expect("expire").expired, 500);
        assert_eq!(s.pending_total(), 500);
        for device in &devices[..10] {
            assert_eq!(seqs(&s, "a", device, 0).await, [2]);
        }
        // The index has nothing left before the long ones' deadline.
        assert_eq!(s.expire(1000).await.expect("expire").expired, 0);
        assert_eq!(s.expire(1001).await.expect("expire").expired, 500);
        assert_eq!(s.pending_total(), 0);
    }

    #[test]
    fn device_record_is_small() {
        let size = std::mem::size_of::<Device>();
        assert!(size <= 72, "Device is {size} bytes");
    }

    #[tokio::test]
    async fn flush_is_a_no_op() {
        let s = MemoryStore::new();
        s.flush().await.expect("flush");
        assert_eq!(s.pending_total(), 0);
    }
}
