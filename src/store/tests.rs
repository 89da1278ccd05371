//! Tests both stores must pass: one scenario per rule of the `Store` trait,
//! and a property test that runs random operation sequences (with restarts,
//! for `redb`) against a plain `BTreeMap` model.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use proptest::prelude::*;

use super::memory::MemoryStore;
use super::redb::{RedbStore, Tuning};
use super::{DeviceRecord, NewMessage, Store, StoredMessage};

/// A message created at `created_ms` that lives `ttl_ms` more milliseconds.
pub(super) fn msg(id: &str, created_ms: u64, ttl_ms: u64, key: Option<&str>) -> NewMessage {
    NewMessage {
        id: Arc::from(id),
        data: Bytes::from(format!("{{\"id\":\"{id}\"}}")),
        created_ms,
        expires_ms: created_ms + ttl_ms,
        collapse_key: key.map(Arc::from),
    }
}

/// Seqs of the live pending messages of a device at `now_ms`.
pub(super) async fn seqs(s: &dyn Store, app: &str, device: &str, now_ms: u64) -> Vec<u64> {
    s.pending(app, device, 0, now_ms, usize::MAX)
        .await
        .expect("pending")
        .iter()
        .map(|m| m.seq)
        .collect()
}

async fn append1(
    s: &dyn Store,
    app: &str,
    device: &str,
    m: &NewMessage,
    max: u64,
) -> super::AppendOutcome {
    s.append(app, &[device], m, max).await.expect("append")[0]
}

// ---- scenarios, one per rule -------------------------------------------

async fn seq_is_per_device_and_starts_at_one(s: &dyn Store) {
    let out = s
        .append("s1", &["d1", "d2"], &msg("m1", 0, 1000, None), 10)
        .await
        .expect("append");
    assert_eq!(out.iter().map(|o| o.seq).collect::<Vec<_>>(), [1, 1]);
    assert_eq!(
        append1(s, "s1", "d1", &msg("m2", 0, 1000, None), 10)
            .await
            .seq,
        2
    );
    // Another app's device of the same name has its own counter.
    assert_eq!(
        append1(s, "s1b", "d1", &msg("m3", 0, 1000, None), 10)
            .await
            .seq,
        1
    );
    assert_eq!(seqs(s, "s1", "d1", 0).await, [1, 2]);
    assert_eq!(seqs(s, "s1", "d2", 0).await, [1]);
    assert!(s
        .append("s1", &[], &msg("m4", 0, 1000, None), 10)
        .await
        .expect("append")
        .is_empty());
}

async fn ack_is_cumulative(s: &dyn Store) {
    for i in 0..5 {
        append1(s, "s2", "d", &msg(&format!("m{i}"), 0, 1000, None), 10).await;
    }
    assert_eq!(s.ack("s2", "d", 3).await.expect("ack"), 3);
    assert_eq!(seqs(s, "s2", "d", 0).await, [4, 5]);
    assert_eq!(s.ack("s2", "d", 3).await.expect("ack"), 0, "already acked");
    assert_eq!(s.ack("s2", "d", 99).await.expect("ack"), 2);
    assert_eq!(s.ack("s2", "nobody", 99).await.expect("ack"), 0);
    // Acking everything does not reset the counter.
    assert_eq!(
        append1(s, "s2", "d", &msg("m5", 0, 1000, None), 10)
            .await
            .seq,
        6
    );
}

async fn purge_removes_all_and_keeps_seq(s: &dyn Store) {
    append1(s, "s3", "d", &msg("a", 0, 1000, Some("k")), 10).await;
    append1(s, "s3", "d", &msg("b", 0, 1000, None), 10).await;
    assert_eq!(s.purge("s3", "d").await.expect("purge"), 2);
    assert_eq!(s.purge("s3", "d").await.expect("purge"), 0);
    assert_eq!(s.purge("s3", "never").await.expect("purge"), 0);
    assert!(seqs(s, "s3", "d", 0).await.is_empty());
    // Purged collapse keys are gone too: nothing to collapse.
    let out = append1(s, "s3", "d", &msg("c", 0, 1000, Some("k")), 10).await;
    assert_eq!((out.seq, out.collapsed), (3, 0));
}

async fn collapse_key_replaces_older(s: &dyn Store) {
    append1(s, "s4", "d", &msg("x1", 0, 1000, Some("x")), 10).await;
    append1(s, "s4", "d", &msg("y1", 0, 1000, Some("y")), 10).await;
    let out = append1(s, "s4", "d", &msg("x2", 0, 1000, Some("x")), 10).await;
    assert_eq!((out.seq, out.collapsed, out.dropped), (3, 1, 0));
    let pending = s.pending("s4", "d", 0, 0, 10).await.expect("pending");
    let ids: Vec<&str> = pending.iter().map(|m| &*m.id).collect();
    assert_eq!(ids, ["y1", "x2"]);
    // Other devices' keys are their own.
    assert_eq!(
        append1(s, "s4", "e", &msg("x3", 0, 1000, Some("x")), 10)
            .await
            .collapsed,
        0
    );
    // Once acked, nothing is left to collapse.
    s.ack("s4", "d", 3).await.expect("ack");
    assert_eq!(
        append1(s, "s4", "d", &msg("x4", 0, 1000, Some("x")), 10)
            .await
            .collapsed,
        0
    );
}

async fn pending_limit_drops_oldest(s: &dyn Store) {
    let mut dropped = Vec::new();
    for i in 0..5 {
        dropped.push(
            append1(s, "s5", "d", &msg(&format!("m{i}"), 0, 1000, None), 3)
                .await
                .dropped,
        );
    }
    assert_eq!(dropped, [0, 0, 0, 1, 1]);
    assert_eq!(seqs(s, "s5", "d", 0).await, [3, 4, 5]);
    assert_eq!(s.take_dropped("s5", "d").await.expect("take"), 2);
    assert_eq!(s.take_dropped("s5", "d").await.expect("take"), 0);
    assert_eq!(s.take_dropped("s5", "never").await.expect("take"), 0);
    // A collapse does not grow the count, so it drops nothing.
    let s5 = "s5c";
    for i in 0..3 {
        append1(
            s,
            s5,
            "d",
            &msg(&format!("m{i}"), 0, 1000, Some(&format!("k{i}"))),
            3,
        )
        .await;
    }
    let out = append1(s, s5, "d", &msg("m3", 0, 1000, Some("k0")), 3).await;
    assert_eq!((out.collapsed, out.dropped), (1, 0));
}

async fn expired_are_hidden_then_removed(s: &dyn Store) {
    let before = s.pending_total();
    append1(s, "s6", "d", &msg("short", 1000, 10, None), 10).await;
    append1(s, "s6", "d", &msg("long", 1000, 100, None), 10).await;
    assert_eq!(s.pending_total(), before + 2);
    // expires_ms is the last millisecond it is delivered.
    assert_eq!(seqs(s, "s6", "d", 1010).await, [1, 2]);
    assert_eq!(seqs(s, "s6", "d", 1011).await, [2]);
    let rec = s
        .device("s6", "d", 1011)
        .await
        .expect("device")
        .expect("has pending");
    assert_eq!(rec.pending, 1);
    assert_eq!(s.expire(1010).await.expect("expire").expired, 0);
    assert_eq!(s.pending_total(), before + 2);
    assert_eq!(s.expire(1011).await.expect("expire").expired, 1);
    assert_eq!(s.pending_total(), before + 1);
    assert_eq!(s.expire(1011).await.expect("expire").expired, 0);
    assert_eq!(s.expire(5000).await.expect("expire").expired, 1);
    assert_eq!(s.pending_total(), before);
    assert_eq!(s.device("s6", "d", 5000).await.expect("device"), None);
}

async fn limit_takes_expired_before_live(s: &dyn Store) {
    append1(s, "s7", "d", &msg("old", 0, 5, None), 2).await;
    append1(s, "s7", "d", &msg("live", 0, 1000, None), 2).await;
    let out = append1(s, "s7", "d", &msg("new", 10, 1000, None), 2).await;
    assert_eq!((out.seq, out.dropped), (3, 0), "the expired one makes room");
    assert_eq!(seqs(s, "s7", "d", 10).await, [2, 3]);
    assert_eq!(s.take_dropped("s7", "d").await.expect("take"), 0);
    // It is reported as expired by the next sweep.
    assert_eq!(s.expire(10).await.expect("expire").expired, 1);
}

async fn pending_after_and_limit(s: &dyn Store) {
    for i in 0..5 {
        append1(s, "s8", "d", &msg(&format!("m{i}"), 0, 1000, None), 10).await;
    }
    let got = s.pending("s8", "d", 2, 0, 2).await.expect("pending");
    assert_eq!(got.iter().map(|m| m.seq).collect::<Vec<_>>(), [3, 4]);
    assert_eq!(
        got[0],
        StoredMessage {
            seq: 3,
            id: Arc::from("m2"),
            data: Bytes::from_static(b"{\"id\":\"m2\"}"),
            created_ms: 0,
            expires_ms: 1000,
        }
    );
    assert!(s
        .pending("s8", "d", u64::MAX, 0, 10)
        .await
        .expect("pending")
        .is_empty());
    assert!(s
        .pending("s8", "d", 0, 0, 0)
        .await
        .expect("pending")
        .is_empty());
    assert!(s
        .pending("s8", "nobody", 0, 0, 10)
        .await
        .expect("pending")
        .is_empty());
    // A device whose id extends another's is not part of its range.
    append1(s, "s8", "d2", &msg("other", 0, 1000, None), 10).await;
    assert_eq!(seqs(s, "s8", "d", 0).await, [1, 2, 3, 4, 5]);
}

async fn device_record_rules(s: &dyn Store) {
    assert_eq!(s.device("s9", "d", 0).await.expect("device"), None);
    s.record_session("s9", "d", 100).await.expect("session");
    s.record_session("s9", "d", 200).await.expect("session");
    let rec = s.device("s9", "d", 300).await.expect("device");
    let want = DeviceRecord {
        first_seen_ms: Some(100),
        last_seen_ms: Some(200),
        sessions: 2,
        pending: 0,
    };
    assert_eq!(rec, Some(want));
    // Never connected but something pending.
    append1(s, "s9", "p", &msg("m", 0, 1000, None), 10).await;
    let rec = s.device("s9", "p", 0).await.expect("device");
    let want = DeviceRecord {
        first_seen_ms: None,
        last_seen_ms: None,
        sessions: 0,
        pending: 1,
    };
    assert_eq!(rec, Some(want));
    // Its only message expired: as never seen.
    assert_eq!(s.device("s9", "p", 1001).await.expect("device"), None);
    // Acked away: as never seen too.
    s.ack("s9", "p", 1).await.expect("ack");
    assert_eq!(s.device("s9", "p", 0).await.expect("device"), None);
}

macro_rules! for_both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory_store {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(&super::MemoryStore::new()).await;
                }
            )*
        }
        mod redb_store {
            $(
                #[tokio::test]
                async fn $name() {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let store = super::RedbStore::open(dir.path(), super::Tuning::batch(64, 0)).expect("open");
                    super::$name(&store).await;
                }
            )*
        }
    };
}

for_both_stores!(
    seq_is_per_device_and_starts_at_one,
    ack_is_cumulative,
    purge_removes_all_and_keeps_seq,
    collapse_key_replaces_older,
    pending_limit_drops_oldest,
    expired_are_hidden_then_removed,
    limit_takes_expired_before_live,
    pending_after_and_limit,
    device_record_rules,
);

// ---- property test against a model -------------------------------------

const APPS: [&str; 2] = ["a", "b"];
const DEVICES: [&str; 3] = ["d0", "d1", "d2"];
const KEYS: [&str; 2] = ["k0", "k1"];
const MAX_PENDING: u64 = 3;

#[derive(Debug, Clone, Copy)]
enum Ttl {
    /// Expired on arrival.
    Past,
    /// Expires at the very millisecond it arrives (still live then).
    Now,
    Short(u64),
    Long,
}

#[derive(Debug, Clone)]
enum Step {
    Append {
        app: usize,
        devices: Vec<usize>,
        key: Option<usize>,
        ttl: Ttl,
    },
    /// Ack `back` below the device's next seq (0: everything).
    Ack {
        app: usize,
        device: usize,
        back: u64,
    },
    /// Several messages of one app at once (`append_many`), each with its
    /// devices (possibly none), key and ttl.
    AppendMany {
        app: usize,
        items: Vec<(Vec<usize>, Option<usize>, Ttl)>,
    },
    /// `ack_queued` for each (app, device, back) in turn (several per
    /// device merge), then either a flush or, if `append_to` is set, an
    /// append to that (app, device) which shares the acks' transaction.
    AckQueued {
        acks: Vec<(usize, usize, u64)>,
        append_to: Option<(usize, usize)>,
    },
    Purge {
        app: usize,
        device: usize,
    },
    TakeDropped {
        app: usize,
        device: usize,
    },
    Session {
        app: usize,
        device: usize,
    },
    Read {
        app: usize,
        device: usize,
        after_back: u64,
        limit: usize,
    },
    Expire,
    Tick(u64),
    Restart,
}

fn step() -> impl Strategy<Value = Step> {
    let app = 0..APPS.len();
    let device = 0..DEVICES.len();
    let ttl = prop_oneof![
        1 => Just(Ttl::Past),
        1 => Just(Ttl::Now),
        3 => (1..40u64).prop_map(Ttl::Short),
        3 => Just(Ttl::Long),
    ];
    let devices = proptest::sample::subsequence(vec![0usize, 1, 2], 1..=3).prop_shuffle();
    prop_oneof![
        8 => (app.clone(), devices, proptest::option::of(0..KEYS.len()), ttl.clone())
            .prop_map(|(app, devices, key, ttl)| Step::Append { app, devices, key, ttl }),
        3 => (app.clone(), device.clone(), 0..5u64)
            .prop_map(|(app, device, back)| Step::Ack { app, device, back }),
        3 => (
            app.clone(),
            proptest::collection::vec(
                (
                    proptest::sample::subsequence(vec![0usize, 1, 2], 0..=3),
                    proptest::option::of(0..KEYS.len()),
                    ttl,
                ),
                1..5,
            ),
        )
            .prop_map(|(app, items)| Step::AppendMany { app, items }),
        3 => (
            proptest::collection::vec((app.clone(), device.clone(), 0..5u64), 1..6),
            proptest::option::of((app.clone(), device.clone())),
        )
            .prop_map(|(acks, append_to)| Step::AckQueued { acks, append_to }),
        1 => (app.clone(), device.clone()).prop_map(|(app, device)| Step::Purge { app, device }),
        2 => (app.clone(), device.clone()).prop_map(|(app, device)| Step::TakeDropped { app, device }),
        1 => (app.clone(), device.clone()).prop_map(|(app, device)| Step::Session { app, device }),
        2 => (app.clone(), device.clone(), 0..5u64, 0..4usize)
            .prop_map(|(app, device, after_back, limit)| Step::Read { app, device, after_back, limit }),
        2 => Just(Step::Expire),
        3 => (0..30u64).prop_map(Step::Tick),
        1 => Just(Step::Restart),
    ]
}

#[derive(Debug, Clone)]
struct MMsg {
    id: String,
    created_ms: u64,
    expires_ms: u64,
    key: Option<usize>,
}

#[derive(Debug, Clone)]
struct MDevice {
    next_seq: u64,
    dropped: u64,
    msgs: BTreeMap<u64, MMsg>,
    sessions: u64,
    first_seen_ms: u64,
    last_seen_ms: u64,
}

impl Default for MDevice {
    fn default() -> Self {
        MDevice {
            next_seq: 1,
            dropped: 0,
            msgs: BTreeMap::new(),
            sessions: 0,
            first_seen_ms: 0,
            last_seen_ms: 0,
        }
    }
}

/// The rules, written as plainly as possible.
#[derive(Debug, Default)]
struct Model {
    now_ms: u64,
    ids: u64,
    devices: BTreeMap<(usize, usize), MDevice>,
    expired_unreported: u64,
}

impl Model {
    fn dev(&mut self, app: usize, device: usize) -> &mut MDevice {
        self.devices.entry((app, device)).or_default()
    }

    fn append(&mut self, app: usize, device: usize, m: &MMsg) -> super::AppendOutcome {
        let now = self.now_ms;
        let dev = self.dev(app, device);
        let seq = dev.next_seq;
        dev.next_seq += 1;
        let before = dev.msgs.len();
        if m.key.is_some() {
            dev.msgs.retain(|_, old| old.key != m.key);
        }
        let collapsed = (before - dev.msgs.len()) as u64;
        dev.msgs.insert(seq, m.clone());
        let mut dropped = 0;
        if dev.msgs.len() as u64 > MAX_PENDING {
            let before = dev.msgs.len();
            dev.msgs.retain(|_, old| old.expires_ms >= now);
            let expired = (before - dev.msgs.len()) as u64;
            while dev.msgs.len() as u64 > MAX_PENDING {
                dev.msgs.pop_first();
                dropped += 1;
            }
            dev.dropped += dropped;
            self.expired_unreported += expired;
        }
        super::AppendOutcome {
            seq,
            dropped,
            collapsed,
        }
    }

    fn remove(&mut self, app: usize, device: usize, upto: u64) -> u64 {
        let dev = self.dev(app, device);
        let before = dev.msgs.len();
        dev.msgs.retain(|seq, _| *seq > upto);
        (before - dev.msgs.len()) as u64
    }

    fn expire(&mut self) -> u64 {
        let now = self.now_ms;
        let mut n = std::mem::take(&mut self.expired_unreported);
        for dev in self.devices.values_mut() {
            let before = dev.msgs.len();
            dev.msgs.retain(|_, m| m.expires_ms >= now);
            n += (before - dev.msgs.len()) as u64;
        }
        n
    }

    fn live(&self, app: usize, device: usize) -> Vec<(u64, String, u64, u64)> {
        self.devices
            .get(&(app, device))
            .map(|dev| {
                dev.msgs
                    .iter()
                    .filter(|(_, m)| m.expires_ms >= self.now_ms)
                    .map(|(seq, m)| (*seq, m.id.clone(), m.created_ms, m.expires_ms))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn record(&self, app: usize, device: usize) -> Option<DeviceRecord> {
        let dev = self.devices.get(&(app, device))?;
        let pending = self.live(app, device).len() as u64;
        if dev.sessions == 0 && pending == 0 {
            return None;
        }
        let seen = |ms| (dev.sessions > 0).then_some(ms);
        Some(DeviceRecord {
            first_seen_ms: seen(dev.first_seen_ms),
            last_seen_ms: seen(dev.last_seen_ms),
            sessions: dev.sessions,
            pending,
        })
    }

    fn stored(&self) -> u64 {
        self.devices.values().map(|d| d.msgs.len() as u64).sum()
    }

    fn next_seq(&self, app: usize, device: usize) -> u64 {
        self.devices.get(&(app, device)).map_or(1, |d| d.next_seq)
    }
}

/// The store under test; `redb` can be restarted on its directory.
enum Subject {
    Memory(MemoryStore),
    Redb(tempfile::TempDir, Option<RedbStore>),
}

impl Subject {
    fn redb() -> Subject {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RedbStore::open(dir.path(), Tuning::batch(64, 0)).expect("open");
        Subject::Redb(dir, Some(store))
    }

    fn store(&self) -> &dyn Store {
        match self {
            Subject::Memory(s) => s,
            Subject::Redb(_, s) => s.as_ref().expect("store is open between restarts"),
        }
    }

    /// Drops and reopens a durable store; returns false for `memory`.
    fn restart(&mut self) -> bool {
        match self {
            Subject::Memory(_) => false,
            Subject::Redb(dir, store) => {
                store.take();
                *store = Some(RedbStore::open(dir.path(), Tuning::batch(64, 0)).expect("reopen"));
                true
            }
        }
    }
}

fn data_of(id: &str) -> Bytes {
    Bytes::from(format!("{{\"id\":\"{id}\"}}"))
}

async fn run_steps(mut subject: Subject, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let mut model = Model {
        now_ms: 1_000_000,
        ..Model::default()
    };
    for (i, step) in steps.iter().enumerate() {
        let s = subject.store();
        let at = format!("step {i}: {step:?}");
        match step {
            Step::Append {
                app,
                devices,
                key,
                ttl,
            } => {
                model.ids += 1;
                let id = format!("m{}", model.ids);
                let now = model.now_ms;
                let expires_ms = match ttl {
                    Ttl::Past => now - 1,
                    Ttl::Now => now,
                    Ttl::Short(ms) => now + ms,
                    Ttl::Long => now + 1_000_000,
                };
                let new = NewMessage {
                    id: Arc::from(id.as_str()),
                    data: data_of(&id),
                    created_ms: now,
                    expires_ms,
                    collapse_key: key.map(|k| Arc::from(KEYS[k])),
                };
                let names: Vec<&str> = devices.iter().map(|d| DEVICES[*d]).collect();
                let got = s
                    .append(APPS[*app], &names, &new, MAX_PENDING)
                    .await
                    .expect("append");
                let m = MMsg {
                    id,
                    created_ms: now,
                    expires_ms,
                    key: *key,
                };
                let want: Vec<_> = devices.iter().map(|d| model.append(*app, *d, &m)).collect();
                prop_assert_eq!(got, want, "{}", at);
            }
            Step::Ack { app, device, back } => {
                let seq = model.next_seq(*app, *device).saturating_sub(*back);
                let before = s.acked_total();
                let got = s.ack(APPS[*app], DEVICES[*device], seq).await.expect("ack");
                prop_assert_eq!(got, model.remove(*app, *device, seq), "{}", at);
                prop_assert_eq!(s.acked_total() - before, got, "{}", at);
            }
            Step::AppendMany { app, items } => {
                let now = model.now_ms;
                let mut batch = Vec::new();
                let mut want = Vec::new();
                for (devices, key, ttl) in items {
                    model.ids += 1;
                    let id = format!("m{}", model.ids);
                    let expires_ms = match ttl {
                        Ttl::Past => now - 1,
                        Ttl::Now => now,
                        Ttl::Short(ms) => now + ms,
                        Ttl::Long => now + 1_000_000,
                    };
                    let new = NewMessage {
                        id: Arc::from(id.as_str()),
                        data: data_of(&id),
                        created_ms: now,
                        expires_ms,
                        collapse_key: key.map(|k| Arc::from(KEYS[k])),
                    };
                    let names: Vec<&str> = devices.iter().map(|d| DEVICES[*d]).collect();
                    batch.push((names, new));
                    let m = MMsg {
                        id,
                        created_ms: now,
                        expires_ms,
                        key: *key,
                    };
                    let outs: Vec<_> = devices.iter().map(|d| model.append(*app, *d, &m)).collect();
                    want.push(outs);
                }
                let got: Vec<_> = s
                    .append_many(APPS[*app], &batch, MAX_PENDING)
                    .await
                    .into_iter()
                    .map(|r| r.expect("append_many"))
                    .collect();
                prop_assert_eq!(got, want, "{}", at);
            }
            Step::AckQueued { acks, append_to } => {
                let before = s.acked_total();
                let mut want = 0;
                for (app, device, back) in acks {
                    let seq = model.next_seq(*app, *device).saturating_sub(*back);
                    s.ack_queued(APPS[*app], DEVICES[*device], seq);
                    want += model.remove(*app, *device, seq);
                }
                match append_to {
                    None => s.flush().await.expect("flush"),
                    Some((app, device)) => {
                        model.ids += 1;
                        let id = format!("m{}", model.ids);
                        let now = model.now_ms;
                        let new = NewMessage {
                            id: Arc::from(id.as_str()),
                            data: data_of(&id),
                            created_ms: now,
                            expires_ms: now + 1_000_000,
                            collapse_key: None,
                        };
                        let got = s
                            .append(APPS[*app], &[DEVICES[*device]], &new, MAX_PENDING)
                            .await
                            .expect("append");
                        let m = MMsg {
                            id,
                            created_ms: now,
                            expires_ms: now + 1_000_000,
                            key: None,
                        };
                        prop_assert_eq!(got, vec![model.append(*app, *device, &m)], "{}", at);
                    }
                }
                prop_assert_eq!(s.acked_total() - before, want, "{}", at);
            }
            Step::Purge { app, device } => {
                let got = s.purge(APPS[*app], DEVICES[*device]).await.expect("purge");
                prop_assert_eq!(got, model.remove(*app, *device, u64::MAX), "{}", at);
            }
            Step::TakeDropped { app, device } => {
                let got = s
                    .take_dropped(APPS[*app], DEVICES[*device])
                    .await
                    .expect("take");
                let want = model
                    .devices
                    .get_mut(&(*app, *device))
                    .map_or(0, |d| std::mem::take(&mut d.dropped));
                prop_assert_eq!(got, want, "{}", at);
            }
            Step::Session { app, device } => {
                let now = model.now_ms;
                s.record_session(APPS[*app], DEVICES[*device], now)
                    .await
                    .expect("session");
                let dev = model.dev(*app, *device);
                if dev.sessions == 0 {
                    dev.first_seen_ms = now;
                }
                dev.sessions += 1;
                dev.last_seen_ms = now;
            }
            Step::Read {
                app,
                device,
                after_back,
                limit,
            } => {
                let after = model.next_seq(*app, *device).saturating_sub(*after_back);
                let got: Vec<_> = s
                    .pending(APPS[*app], DEVICES[*device], after, model.now_ms, *limit)
                    .await
                    .expect("pending")
                    .into_iter()
                    .map(|m| (m.seq, m.id.to_string(), m.created_ms, m.expires_ms))
                    .collect();
                let want: Vec<_> = model
                    .live(*app, *device)
                    .into_iter()
                    .filter(|m| m.0 > after)
                    .take(*limit)
                    .collect();
                prop_assert_eq!(got, want, "{}", at);
            }
            Step::Expire => {
                let got = s.expire(model.now_ms).await.expect("expire").expired;
                prop_assert_eq!(got, model.expire(), "{}", at);
            }
            Step::Tick(ms) => model.now_ms += ms,
            Step::Restart => {
                if subject.restart() {
                    // Only a metric: not kept across restarts.
                    model.expired_unreported = 0;
                }
            }
        }

        // Whole state after every step.
        let s = subject.store();
        prop_assert_eq!(
            s.pending_total(),
            model.stored(),
            "pending_total after {}",
            at
        );
        for (app, app_name) in APPS.iter().enumerate() {
            for (device, device_name) in DEVICES.iter().enumerate() {
                let got = s
                    .pending(app_name, device_name, 0, model.now_ms, usize::MAX)
                    .await
                    .expect("pending");
                for m in &got {
                    prop_assert_eq!(&m.data, &data_of(&m.id), "data after {}", at);
                }
                let got: Vec<_> = got
                    .into_iter()
                    .map(|m| (m.seq, m.id.to_string(), m.created_ms, m.expires_ms))
                    .collect();
                prop_assert_eq!(
                    got,
                    model.live(app, device),
                    "{}/{} after {}",
                    app,
                    device,
                    at
                );
                let rec = s
                    .device(app_name, device_name, model.now_ms)
                    .await
                    .expect("device");
                prop_assert_eq!(
                    rec,
                    model.record(app, device),
                    "{}/{} after {}",
                    app,
                    device,
                    at
                );
            }
        }
    }
    // Dropped counts and seqs, read the destructive way at the very end.
    let s = subject.store();
    for (app, app_name) in APPS.iter().enumerate() {
        for (device, device_name) in DEVICES.iter().enumerate() {
            let dropped = s.take_dropped(app_name, device_name).await.expect("take");
            let want = model.devices.get(&(app, device)).map_or(0, |d| d.dropped);
            prop_assert_eq!(dropped, want, "dropped {}/{}", app, device);
            let probe = msg("probe", model.now_ms, 1000, None);
            let seq = s
                .append(app_name, &[device_name], &probe, MAX_PENDING)
                .await
                .expect("append")[0]
                .seq;
            prop_assert_eq!(
                seq,
                model.next_seq(app, device),
                "next seq {}/{}",
                app,
                device
            );
        }
    }
    Ok(())
}

/// `PROPTEST_CASES` overrides the number of cases (for a longer soak).
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(256)))]
    #[test]
    fn memory_store_matches_model(steps in proptest::collection::vec(step(), 1..80)) {
        runtime().block_on(run_steps(Subject::Memory(MemoryStore::new()), steps))?;
    }
}

proptest! {
    // Every append is an fsync: fewer, shorter cases than for memory.
    #![proptest_config(ProptestConfig::with_cases(cases(64)))]
    #[test]
    fn redb_store_matches_model(steps in proptest::collection::vec(step(), 1..50)) {
        runtime().block_on(run_steps(Subject::redb(), steps))?;
    }
}

/// A sequence the model test can draw (found by review, not by a run):
/// the log emptied by a purge after a sweep, so that keys started again
/// under the sweep's mark at the next start, and a message with a past
/// deadline stored then was skipped at the start after, its seq reused.
#[test]
fn redb_keys_do_not_start_again_under_the_sweep_mark() {
    let append = |ttl| Step::Append {
        app: 0,
        devices: vec![0],
        key: None,
        ttl,
    };
    let steps = vec![
        append(Ttl::Long),
        Step::Expire,
        Step::Purge { app: 0, device: 0 },
        Step::Restart,
        append(Ttl::Past),
        Step::Restart,
        append(Ttl::Long),
    ];
    runtime()
        .block_on(run_steps(Subject::redb(), steps))
        .expect("the store follows the model");
}
