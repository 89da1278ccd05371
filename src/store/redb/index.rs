//! The redb store's in-memory index: for every device with messages stored,
//! its seq counter and the log keys of its messages in seq order, plus the
//! expiry buckets. The log on disk is in arrival order only (so a commit
//! writes a few contiguous pages, not a random leaf per message); this index
//! is what finds a device's messages in it. It is rebuilt from the log when
//! the file is opened.
//!
//! The writer changes it while it applies a transaction; readers see only
//! what is committed. Each entry notes the transaction that added it and
//! the one that removed it, and the index notes the last committed one: an
//! entry is visible if it was added by a committed transaction and not
//! removed by one. After a commit the writer drops the removed entries of
//! the devices it touched; after a failed one the index is rebuilt from the
//! file, so the writer-side fields (seq counters, collapse keys, buckets)
//! never need undoing.

use std::collections::hash_map::Entry as Slot;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// Width of an expiry bucket, in ms.
pub(super) const BUCKET_MS: u64 = 60_000;

/// `Dev::bucket` that notes no bucket.
const NO_BUCKET: u64 = u64::MAX;

/// (app, device)
pub(super) type DevId = (Box<str>, Box<str>);

/// Every device with messages stored (or changed in the transaction being
/// applied), and the expiry buckets.
#[derive(Default)]
pub(super) struct Index {
    /// app -> device -> state. A device with nothing stored whose device
    /// row says all there is to know is not kept (see [`Dev::evictable`]).
    pub devices: HashMap<Box<str>, HashMap<Box<str>, Dev>>,
    /// Expiry buckets: minute (expires_ms / BUCKET_MS) -> device -> the
    /// earliest deadline in it. A device is in a minute's bucket if it may
    /// have messages whose deadline falls in that minute. `expire` sweeps
    /// them when their minute comes; before that, a device leaves the
    /// buckets of minutes it has nothing stored in once it is in more
    /// buckets than it has messages ([`prune_buckets`]).
    pub buckets: BTreeMap<u64, HashMap<DevId, u64>>,
    /// Log keys of acked or expired messages whose rows are not deleted
    /// yet. Acks only mark their messages removed and move the device's
    /// ack cursor, expiry only marks them; the rows are deleted later,
    /// lowest keys first, so that many deletions share a page (see
    /// `DEAD_HOLD` in the store).
    pub dead: DeadKeys,
    /// The last expiry sweep whose clock was not behind the one before:
    /// its `now_ms`, and `next_key` when it ran. It removed every row
    /// under that key whose deadline is before that time (a sweep with an
    /// earlier clock deletes its rows at once and leaves this as it is).
    /// Persisted in `meta` by the transaction of the sweep.
    pub swept: (u64, u64),
    /// The last committed write transaction (readers see up to it).
    pub committed: u64,
    /// Key of the next log row: keys only grow, also across rebuilds, so a
    /// reader holding a key never finds another message under it.
    pub next_key: u64,
}

impl Index {
    pub fn get(&self, app: &str, device: &str) -> Option<&Dev> {
        self.devices.get(app)?.get(device)
    }

    pub fn get_mut(&mut self, app: &str, device: &str) -> Option<&mut Dev> {
        self.devices.get_mut(app)?.get_mut(device)
    }

    /// Forgets a device (see [`Dev::evictable`]).
    pub fn remove(&mut self, app: &str, device: &str) {
        if let Some(devices) = self.devices.get_mut(app) {
            devices.remove(device);
            if devices.is_empty() {
                self.devices.remove(app);
            }
        }
    }
}

/// A set of log keys, as 64-key words of bits: the keys a redelivered
/// backlog's acks leave are dense in the log (its rows were appended
/// together), so a million of them take ~16k words (~0.3 MB) where a
/// `BTreeSet` took ~20 MB. Keys far apart cost a word each (~35 B; the
/// `BTreeSet` took ~20 B per key).
#[derive(Default)]
pub(super) struct DeadKeys {
    /// key / 64 -> bit key % 64 set for each key in the set; no word is 0.
    words: BTreeMap<u64, u64>,
    len: usize,
}

impl DeadKeys {
    pub fn insert(&mut self, key: u64) {
        let word = self.words.entry(key / 64).or_insert(0);
        let bit = 1 << (key % 64);
        if *word & bit == 0 {
            *word |= bit;
            self.len += 1;
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Takes up to `n` keys out of the set, lowest first.
    pub fn take_lowest(&mut self, n: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(n.min(self.len));
        while out.len() < n {
            let Some(mut entry) = self.words.first_entry() else {
                break;
            };
            let base = *entry.key() * 64;
            let word = entry.get_mut();
            while *word != 0 && out.len() < n {
                let bit = word.trailing_zeros();
                out.push(base + u64::from(bit));
                *word &= *word - 1;
            }
            if *word == 0 {
                entry.remove();
            }
        }
        self.len -= out.len();
        out
    }
}

/// Makes the device's expiry bucket for `expires_ms` cover it: nothing to
/// do when the device's noted bucket is that one and its value is no later
/// (the usual case: one bucket per device and minute, not an index entry
/// per message).
pub(super) fn note_deadline(
    buckets: &mut BTreeMap<u64, HashMap<DevId, u64>>,
    app: &str,
    device: &str,
    dev: &mut Dev,
    expires_ms: u64,
) {
    let minute = expires_ms / BUCKET_MS;
    if dev.bucket == minute && dev.bucket_min_ms <= expires_ms {
        return;
    }
    let min = match buckets
        .entry(minute)
        .or_default()
        .entry((app.into(), device.into()))
    {
        Slot::Occupied(min) => {
            let min = min.into_mut();
            *min = (*min).min(expires_ms);
            *min
        }
        Slot::Vacant(slot) => {
            dev.minutes.push(minute);
            *slot.insert(expires_ms)
        }
    };
    dev.bucket = minute;
    dev.bucket_min_ms = min;
}

/// Takes the device out of the bucket of `minute`, and the minute out of
/// the index once nobody is in it.
pub(super) fn leave_bucket(
    buckets: &mut BTreeMap<u64, HashMap<DevId, u64>>,
    minute: u64,
    id: &DevId,
) {
    if let Some(bucket) = buckets.get_mut(&minute) {
        bucket.remove(id);
        if bucket.is_empty() {
            buckets.remove(&minute);
        }
    }
}

/// Takes the device out of the buckets of minutes in which it has nothing
/// stored any more, once it is in more buckets than it has messages (or in
/// any, with nothing stored). Buckets are otherwise only swept when their
/// minute comes, and a device acking everything it gets would be in one
/// for every minute of the ttl.
pub(super) fn prune_buckets(
    buckets: &mut BTreeMap<u64, HashMap<DevId, u64>>,
    id: &DevId,
    dev: &mut Dev,
) {
    if dev.minutes.len() as u64 <= dev.live {
        return;
    }
    let msgs = &dev.msgs;
    let stored_in = |minute: u64| {
        msgs.iter()
            .any(|e| e.removed == 0 && e.expires_ms / BUCKET_MS == minute)
    };
    let mut kept = Vec::new();
    for minute in std::mem::take(&mut dev.minutes) {
        if stored_in(minute) {
            kept.push(minute);
            continue;
        }
        leave_bucket(buckets, minute, id);
        if dev.bucket == minute {
            dev.bucket = NO_BUCKET;
        }
    }
    dev.minutes = kept;
}

/// One message stored for one device.
#[derive(Debug, Clone, Copy)]
struct Entry {
    seq: u64,
    /// Its row in the log.
    key: u64,
    expires_ms: u64,
    /// Transaction that stored it (0: on disk when the index was built).
    added: u64,
    /// Transaction that removed it, 0 if none.
    removed: u64,
}

impl Entry {
    fn visible(&self, committed: u64) -> bool {
        self.added <= committed && (self.removed == 0 || self.removed > committed)
    }
}

/// One device's state.
pub(super) struct Dev {
    /// Seq of the next message.
    pub next_seq: u64,
    /// `next_seq` as the device row on disk has it (0: no row). Seqs are
    /// recovered as the greater of it and the newest stored seq + 1, so the
    /// row must be written whenever a removal leaves that short.
    pub floor: u64,
    pub dropped: u64,
    pub sessions: u64,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    /// Every seq up to this one is acked (the ack cursor): log rows of
    /// this device with seq ≤ it are not messages any more.
    pub acked: u64,
    /// `dropped`, `acked` or the session fields changed since the row was
    /// written.
    pub row_dirty: bool,
    /// The last transaction that changed it.
    pub touched: u64,
    /// Entries not removed (the writer's view).
    live: u64,
    /// In seq order.
    msgs: VecDeque<Entry>,
    /// collapse key -> seq of the newest message stored with it, which may
    /// be removed since (checked when the key comes again).
    collapse: HashMap<Box<str>, u64>,
    /// Minutes of the expiry buckets the device is in.
    minutes: Vec<u64>,
    /// The minute of the expiry bucket last noted for the device ...
    bucket: u64,
    /// ... and that bucket's value.
    bucket_min_ms: u64,
}

/// A device row: (next_seq, dropped, sessions, first_seen_ms,
/// last_seen_ms, acked).
pub(super) type DeviceRow = (u64, u64, u64, u64, u64, u64);

impl Dev {
    /// A device never seen.
    #[cfg(test)]
    pub fn new() -> Self {
        Dev::from_row(None)
    }

    /// A device as its row on disk has it, with nothing stored yet.
    pub fn from_row(row: Option<DeviceRow>) -> Self {
        let (floor, dropped, sessions, first_seen_ms, last_seen_ms, acked) =
            row.unwrap_or_default();
        Dev {
            next_seq: floor.max(1),
            floor,
            dropped,
            sessions,
            first_seen_ms,
            last_seen_ms,
            acked,
            row_dirty: false,
            touched: 0,
            live: 0,
            msgs: VecDeque::new(),
            collapse: HashMap::new(),
            minutes: Vec::new(),
            bucket: NO_BUCKET,
            bucket_min_ms: 0,
        }
    }

    pub fn row(&self) -> DeviceRow {
        (
            self.next_seq,
            self.dropped,
            self.sessions,
            self.first_seen_ms,
            self.last_seen_ms,
            self.acked,
        )
    }

    /// Moves the ack cursor to `seq` (never past the last seq handed out,
    /// whatever a device claims: a later message must never fall under it).
    pub fn ack_upto(&mut self, seq: u64) {
        let seq = seq.min(self.next_seq - 1);
        if seq > self.acked {
            self.acked = seq;
            self.row_dirty = true;
        }
    }

    /// Messages stored, removed ones excluded (the writer's view).
    pub fn live(&self) -> u64 {
        self.live
    }

    /// Adds a message with the next seq (the caller has taken it).
    pub fn push(&mut self, seq: u64, key: u64, expires_ms: u64, txn: u64) {
        debug_assert!(self.msgs.back().is_none_or(|e| e.seq < seq));
        self.msgs.push_back(Entry {
            seq,
            key,
            expires_ms,
            added: txn,
            removed: 0,
        });
        self.live += 1;
        self.next_seq = self.next_seq.max(seq + 1);
    }

    /// Notes that `key` now belongs to `seq`; returns the seq it belonged
    /// to before, if that message is still stored.
    pub fn collapse(&mut self, key: &str, seq: u64) -> Option<u64> {
        let old = match self.collapse.get_mut(key) {
            Some(old) => Some(std::mem::replace(old, seq)),
            None => {
                self.collapse.insert(key.into(), seq);
                None
            }
        };
        old.filter(|old| self.is_live(*old))
    }

    fn is_live(&self, seq: u64) -> bool {
        self.msgs
            .binary_search_by_key(&seq, |e| e.seq)
            .is_ok_and(|i| self.msgs[i].removed == 0)
    }

    /// Removes the stored message `seq` in transaction `txn`, calling
    /// `gone` with its log key first; returns whether it was stored.
    pub fn remove_seq<E>(
        &mut self,
        seq: u64,
        txn: u64,
        gone: impl FnOnce(u64) -> Result<(), E>,
    ) -> Result<bool, E> {
        let Ok(i) = self.msgs.binary_search_by_key(&seq, |e| e.seq) else {
            return Ok(false);
        };
        let entry = &mut self.msgs[i];
        if entry.removed != 0 {
            return Ok(false);
        }
        gone(entry.key)?;
        entry.removed = txn;
        self.live -= 1;
        Ok(true)
    }

    /// Removes, in transaction `txn`, the stored messages with seq ≤ `upto`
    /// whose deadline `pick` accepts, oldest first, at most `limit`,
    /// calling `gone` with each one's log key first; returns how many.
    pub fn remove_where<E>(
        &mut self,
        upto: u64,
        limit: u64,
        txn: u64,
        mut pick: impl FnMut(u64) -> bool,
        mut gone: impl FnMut(u64) -> Result<(), E>,
    ) -> Result<u64, E> {
        let mut n = 0;
        for entry in self.msgs.iter_mut() {
            if entry.seq > upto || n == limit {
                break;
            }
            if entry.removed != 0 || !pick(entry.expires_ms) {
                continue;
            }
            gone(entry.key)?;
            entry.removed = txn;
            self.live -= 1;
            n += 1;
        }
        Ok(n)
    }

    /// Whether the device row must be written for seqs to be recovered: a
    /// removal left the newest stored seq short of `next_seq - 1`, and the
    /// row does not have `next_seq` yet.
    pub fn needs_floor(&self) -> bool {
        let newest = self
            .msgs
            .iter()
            .rev()
            .find(|e| e.removed == 0)
            .map_or(0, |e| e.seq);
        self.floor < self.next_seq && newest + 1 < self.next_seq
    }

    /// After a committed transaction: drops removed entries, and collapse
    /// keys whose message is gone once they outnumber what is stored.
    pub fn compact(&mut self) {
        while self.msgs.front().is_some_and(|e| e.removed != 0) {
            self.msgs.pop_front();
        }
        if self.msgs.len() as u64 > self.live {
            self.msgs.retain(|e| e.removed == 0);
        }
        if self.msgs.is_empty() {
            self.msgs = VecDeque::new();
            self.collapse = HashMap::new();
        } else if self.collapse.len() as u64 > 2 * self.live + 8 {
            let msgs = &self.msgs;
            self.collapse
                .retain(|_, seq| msgs.binary_search_by_key(seq, |e| e.seq).is_ok());
        }
    }

    /// Nothing stored and the row on disk has everything else (or there
    /// is nothing to know: no row, no seq handed out): the device can leave
    /// memory. It is read back from its row when next needed.
    pub fn evictable(&self) -> bool {
        self.msgs.is_empty()
            && !self.row_dirty
            && (self.floor >= self.next_seq || (self.floor == 0 && self.next_seq == 1))
    }

    /// (seq, log key) of the committed messages after `after_seq` not
    /// expired at `now_ms`, in seq order, at most `limit`.
    pub fn visible(
        &self,
        committed: u64,
        after_seq: u64,
        now_ms: u64,
        limit: usize,
    ) -> Vec<(u64, u64)> {
        let start = self.msgs.partition_point(|e| e.seq <= after_seq);
        self.msgs
            .range(start..)
            .filter(|e| e.visible(committed) && e.expires_ms >= now_ms)
            .take(limit)
            .map(|e| (e.seq, e.key))
            .collect()
    }

    /// Committed messages not expired at `now_ms`.
    pub fn visible_count(&self, committed: u64, now_ms: u64) -> u64 {
        self.msgs
            .iter()
            .filter(|e| e.visible(committed) && e.expires_ms >= now_ms)
            .count() as u64
    }

    /// The earliest deadline of a stored message in `minute`, if any.
    pub fn earliest_in(&self, minute: u64) -> Option<u64> {
        self.msgs
            .iter()
            .filter(|e| e.removed == 0 && e.expires_ms / BUCKET_MS == minute)
            .map(|e| e.expires_ms)
            .min()
    }

    /// After `expire` swept the bucket of `minute`: forgets it, or lowers
    /// its value if messages are `left` in it.
    pub fn bucket_swept(&mut self, minute: u64, left: Option<u64>) {
        if left.is_none() {
            self.minutes.retain(|m| *m != minute);
        }
        if self.bucket == minute {
            match left {
                Some(min) => self.bucket_min_ms = min,
                None => self.bucket = NO_BUCKET,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(_: u64) -> Result<(), ()> {
        Ok(())
    }

    #[test]
    fn dead_keys_come_out_lowest_first_each_once() {
        let mut dead = DeadKeys::default();
        for key in [200, 3, 64, 63, 3, 1_000_000, 65] {
            dead.insert(key);
        }
        assert_eq!(dead.len(), 6);
        assert_eq!(dead.take_lowest(3), [3, 63, 64]);
        assert_eq!(dead.len(), 3);
        assert_eq!(dead.take_lowest(10), [65, 200, 1_000_000]);
        assert!(dead.is_empty());
        assert_eq!(dead.take_lowest(10), Vec::<u64>::new());
        // A word emptied by `take_lowest` is gone, and a key can come again.
        dead.insert(64);
        assert_eq!(dead.words.len(), 1);
        assert_eq!(dead.take_lowest(1), [64]);
        assert!(dead.words.is_empty());
    }

    #[test]
    fn readers_see_only_committed_adds_and_removals() {
        let mut d = Dev::new();
        d.push(1, 10, 100, 1);
        d.push(2, 11, 100, 2);
        // Transaction 2 is being applied: its add is hidden.
        assert_eq!(d.visible(1, 0, 0, 10), [(1, 10)]);
        assert!(d.remove_seq(1, 2, ok).expect("remove"));
        // Its removal too: seq 1 is still there for readers.
        assert_eq!(d.visible(1, 0, 0, 10), [(1, 10)]);
        assert_eq!(d.visible(2, 0, 0, 10), [(2, 11)]);
        assert_eq!(d.live(), 1);
        d.compact();
        assert_eq!(d.msgs.len(), 1);
        assert_eq!(d.visible_count(2, 0), 1);
        assert_eq!(d.visible_count(2, 101), 0);
    }

    #[test]
    fn the_row_is_needed_once_the_newest_seq_is_removed() {
        let mut d = Dev::new();
        d.push(1, 1, 100, 1);
        d.push(2, 2, 100, 1);
        d.next_seq = 3;
        assert!(!d.needs_floor());
        assert_eq!(d.remove_where(1, u64::MAX, 1, |_| true, ok), Ok(1));
        assert!(!d.needs_floor(), "seq 2 still says where seqs are");
        assert!(d.remove_seq(2, 1, ok).expect("remove"));
        assert!(d.needs_floor());
        d.floor = d.next_seq;
        assert!(!d.needs_floor());
        d.compact();
        assert!(d.evictable());
    }

    #[test]
    fn a_collapse_key_names_its_message_only_while_it_is_stored() {
        let mut d = Dev::new();
        d.push(1, 1, 100, 1);
        assert_eq!(d.collapse("k", 1), None);
        d.push(2, 2, 100, 1);
        assert_eq!(d.collapse("k", 2), Some(1));
        assert!(d.remove_seq(2, 1, ok).expect("remove"));
        d.push(3, 3, 100, 1);
        assert_eq!(d.collapse("k", 3), None);
    }

    #[test]
    fn a_failed_removal_stops_where_it_failed() {
        let mut d = Dev::new();
        d.push(1, 1, 100, 1);
        d.push(2, 2, 100, 1);
        let mut calls = 0;
        let out = d.remove_where(
            u64::MAX,
            u64::MAX,
            1,
            |_| true,
            |_| {
                calls += 1;
                if calls == 2 {
                    Err("disk")
                } else {
                    Ok(())
                }
            },
        );
        assert_eq!(out, Err("disk"));
        // The first was removed, the second not.
        assert_eq!(d.live(), 1);
        assert!(d.is_live(2));
    }
}
