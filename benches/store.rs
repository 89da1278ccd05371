//! Store benches: what one append+ack costs in memory, how many messages/s
//! the redb store takes with group commit under 64 concurrent appenders (one
//! fsync shared by many), what one commit of 400 messages costs when they go
//! to few devices or spread over many (and, on raw redb tables, what the same
//! commit costs keyed by device or in arrival order), and what reading 100
//! pending messages costs.
//!
//! `cargo bench --bench store` (the spread and layout benches fill their
//! stores on first use: up to half a minute each)

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pushgate::store::memory::MemoryStore;
use pushgate::store::redb::{RedbStore, Tuning, DB_FILE};
use pushgate::store::{NewMessage, Store};

const APP: &str = "bench";
const APPENDERS: u64 = 64;

fn message(n: u64) -> NewMessage {
    NewMessage {
        id: Arc::from(format!("0190c2a4-0000-7000-8000-{n:012}")),
        data: Bytes::from_static(br#"{"title":"Hi","body":"You have a new message","n":1}"#),
        created_ms: 1_700_000_000_000,
        expires_ms: 1_700_000_000_000 + 3_600_000,
        collapse_key: None,
    }
}

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("tokio runtime")
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .build()
            .expect("tokio runtime")
    }
}

fn memory_append_ack(c: &mut Criterion) {
    let rt = runtime(1);
    let store = MemoryStore::new();
    let names: Vec<String> = (0..1024).map(|i| format!("dev{i}")).collect();
    let msg = message(1);
    let mut n = 0usize;
    let mut group = c.benchmark_group("memory");
    group.throughput(Throughput::Elements(1));
    group.bench_function("append+ack", |b| {
        b.iter(|| {
            n += 1;
            let device = names[n % names.len()].as_str();
            rt.block_on(async {
                let out = store
                    .append(APP, &[device], &msg, 100)
                    .await
                    .expect("append");
                store.ack(APP, device, out[0].seq).await.expect("ack");
            });
        })
    });
    group.finish();
}

fn redb_group_commit(c: &mut Criterion) {
    let rt = runtime(2);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(RedbStore::open(dir.path(), Tuning::batch(4096, 0)).expect("open store"));
    let mut group = c.benchmark_group("redb");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("append, 64 concurrent appenders", |b| {
        b.iter_custom(|iters| {
            let per_task = iters.div_ceil(APPENDERS);
            let commits = store.commits();
            let start = Instant::now();
            rt.block_on(async {
                let tasks: Vec<_> = (0..APPENDERS)
                    .map(|t| {
                        let store = store.clone();
                        tokio::spawn(async move {
                            let device = format!("dev{t}");
                            let msg = message(t);
                            for _ in 0..per_task {
                                store
                                    .append(APP, &[device.as_str()], &msg, 100)
                                    .await
                                    .expect("append");
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.expect("appender");
                }
            });
            let elapsed = start.elapsed();
            // Scale to the iterations asked for (rounding up per task).
            let done = per_task * APPENDERS;
            let batches = store.commits() - commits;
            if done >= 10_000 {
                eprintln!(
                    "  {done} appends in {batches} commits ({:.1} per commit)",
                    done as f64 / batches.max(1) as f64
                );
            }
            elapsed.mul_f64(iters as f64 / done as f64)
        })
    });
    group.finish();
}

/// Messages per commit in the spread benches: about what the store packs
/// into one commit at 30–50k msgs/s.
const COMMIT: usize = 400;
/// Messages stored before the spread benches measure.
const PREFILL: u64 = 200_000;

/// Deterministic device numbers (xorshift64), the same every run.
struct Picker(u64);

impl Picker {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Bytes this process has dirtied for storage (`write_bytes` of
/// /proc/self/io), 0 where unreadable.
fn write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("write_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Storage bytes written over every iteration of a bench (criterion's
/// warm-up included: the ratio per message is the same).
#[derive(Default)]
struct Written {
    bytes: u64,
    messages: u64,
}

impl Written {
    /// Adds what was written since `before` (a `write_bytes()` reading).
    fn add(&mut self, before: u64, messages: u64) {
        self.bytes += write_bytes().saturating_sub(before);
        self.messages += messages;
    }

    fn report(&self, what: &str) {
        if self.messages > 0 {
            eprintln!(
                "  {what}: {:.0} bytes written per message ({} messages)",
                self.bytes as f64 / self.messages as f64,
                self.messages
            );
        }
    }
}

/// One `append_many` of 400 messages (one request, one commit) to random
/// devices among 64 or 10,000, on a store already holding 200k messages:
/// with many devices every message lands in its own B-tree leaf.
fn redb_spread(c: &mut Criterion) {
    let rt = runtime(1);
    let mut group = c.benchmark_group("redb commit of 400");
    group.throughput(Throughput::Elements(COMMIT as u64));
    group.sample_size(20);
    for devices in [64u64, 10_000] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = RedbStore::open(dir.path(), Tuning::batch(4096, 0)).expect("open store");
        let names: Vec<String> = (0..devices).map(|i| format!("dev{i}")).collect();
        let mut pick = Picker(0x9E37_79B9_7F4A_7C15);
        let mut n = 0u64;
        let mut batch = |pick: &mut Picker| -> Vec<(Vec<&str>, NewMessage)> {
            (0..COMMIT)
                .map(|_| {
                    n += 1;
                    (
                        vec![names[pick.next(devices) as usize].as_str()],
                        message(n),
                    )
                })
                .collect()
        };
        // No pending limit: nothing is dropped, so both runs do the same work.
        let unlimited = u64::MAX;
        let mut filled = false;
        let mut written = Written::default();
        group.bench_function(format!("append_many, {devices} devices"), |b| {
            b.iter_custom(|iters| {
                // Filled on first use, so that a filter skipping this bench
                // skips the fill too.
                if !std::mem::replace(&mut filled, true) {
                    for _ in 0..PREFILL / COMMIT as u64 {
                        let items = batch(&mut pick);
                        for r in rt.block_on(store.append_many(APP, &items, unlimited)) {
                            r.expect("append");
                        }
                    }
                }
                let before = write_bytes();
                let mut elapsed = Duration::ZERO;
                for _ in 0..iters {
                    let items = batch(&mut pick);
                    let start = Instant::now();
                    for r in rt.block_on(store.append_many(APP, &items, unlimited)) {
                        r.expect("append");
                    }
                    elapsed += start.elapsed();
                }
                written.add(before, iters * COMMIT as u64);
                elapsed
            })
        });
        written.report(&format!("{devices} devices"));
    }
    group.finish();
}

/// Row layouts the layout bench compares.
#[derive(Clone, Copy)]
enum Layout {
    /// Rows keyed (app, device, seq), as the store's `pending` table.
    ByDevice,
    /// A 16-byte pointer keyed (app, device, seq), the row itself keyed by
    /// arrival order.
    PointerByDevice,
    /// Rows keyed by arrival order only (an append-only log).
    ByArrival,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::ByDevice => "keyed (app, device, seq), 10k devices",
            Layout::PointerByDevice => "pointers keyed by device + rows by arrival",
            Layout::ByArrival => "keyed by arrival (log)",
        }
    }
}

/// The same commit of 400 ~150-byte rows on raw redb tables holding 200k
/// rows, spread over 10,000 devices, in three layouts (see [`Layout`]).
/// What a log layout would save the store's writer, and that a per-device
/// index on disk costs the same however small its entries.
fn redb_layout(c: &mut Criterion) {
    use redb::{Database, Durability, TableDefinition};
    const BY_DEVICE: TableDefinition<(&str, &str, u64), &[u8]> = TableDefinition::new("by_device");
    const BY_ARRIVAL: TableDefinition<u64, &[u8]> = TableDefinition::new("by_arrival");
    const DEVICES: u64 = 10_000;
    let value = [7u8; 150];
    let pointer = [7u8; 16];
    let names: Vec<String> = (0..DEVICES).map(|i| format!("dev{i}")).collect();
    let mut group = c.benchmark_group("redb layout, commit of 400");
    group.throughput(Throughput::Elements(COMMIT as u64));
    group.sample_size(20);
    for layout in [Layout::ByDevice, Layout::PointerByDevice, Layout::ByArrival] {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Database::create(dir.path().join("layout.redb")).expect("create");
        let mut pick = Picker(0x9E37_79B9_7F4A_7C15);
        let mut seqs = vec![0u64; DEVICES as usize];
        let mut arrival = 0u64;
        let mut commit = |rows: usize, durability: Durability, pick: &mut Picker| {
            let mut txn = db.begin_write().expect("begin");
            txn.set_durability(durability).expect("durability");
            {
                let mut by_device = txn.open_table(BY_DEVICE).expect("table");
                let mut by_arrival = txn.open_table(BY_ARRIVAL).expect("table");
                for _ in 0..rows {
                    let d = pick.next(DEVICES) as usize;
                    seqs[d] += 1;
                    arrival += 1;
                    let key = (APP, names[d].as_str(), seqs[d]);
                    match layout {
                        Layout::ByDevice => by_device.insert(key, &value[..]),
                        Layout::PointerByDevice => by_device
                            .insert(key, &pointer[..])
                            .and_then(|_| by_arrival.insert(arrival, &value[..])),
                        Layout::ByArrival => by_arrival.insert(arrival, &value[..]),
                    }
                    .expect("insert");
                }
            }
            txn.commit().expect("commit");
        };
        let mut filled = false;
        let mut written = Written::default();
        group.bench_function(layout.name(), |b| {
            b.iter_custom(|iters| {
                if !std::mem::replace(&mut filled, true) {
                    for _ in 0..PREFILL / 10_000 {
                        commit(10_000, Durability::None, &mut pick);
                    }
                    commit(0, Durability::Immediate, &mut pick);
                }
                let before = write_bytes();
                let start = Instant::now();
                for _ in 0..iters {
                    commit(COMMIT, Durability::Immediate, &mut pick);
                }
                let elapsed = start.elapsed();
                written.add(before, iters * COMMIT as u64);
                elapsed
            })
        });
        written.report(layout.name());
    }
    group.finish();
}

/// Stores `PREFILL` messages in the store in `dir`, each to one of 10,000
/// devices picked at random (the same every run), `COMMIT` to a request.
fn fill_10k_devices(rt: &tokio::runtime::Runtime, dir: &std::path::Path) {
    let store = RedbStore::open(dir, Tuning::batch(4096, 0)).expect("open store");
    let mut pick = Picker(0x9E37_79B9_7F4A_7C15);
    let names: Vec<String> = (0..10_000).map(|i| format!("dev{i}")).collect();
    for round in 0..PREFILL / COMMIT as u64 {
        let items: Vec<(Vec<&str>, NewMessage)> = (0..COMMIT as u64)
            .map(|i| {
                let device = names[pick.next(10_000) as usize].as_str();
                (vec![device], message(round * COMMIT as u64 + i))
            })
            .collect();
        for r in rt.block_on(store.append_many(APP, &items, u64::MAX)) {
            r.expect("append");
        }
    }
    assert_eq!(store.pending_total(), PREFILL);
}

/// Opening a store that holds 200k messages over 10,000 devices: the
/// in-memory index is rebuilt by one pass over the log, so this is what a
/// restart adds per 200k pending messages.
fn redb_open(c: &mut Criterion) {
    let rt = runtime(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut filled = false;
    let mut group = c.benchmark_group("redb open");
    group.sample_size(10);
    group.throughput(Throughput::Elements(PREFILL));
    group.bench_function("200k messages, 10k devices", |b| {
        if !std::mem::replace(&mut filled, true) {
            fill_10k_devices(&rt, dir.path());
        }
        // Each store is closed before the next opens (the file is locked
        // while open); closing is left out of the time.
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let store =
                    RedbStore::open(dir.path(), Tuning::batch(4096, 0)).expect("open store");
                elapsed += start.elapsed();
                assert_eq!(store.pending_total(), PREFILL);
                drop(store);
            }
            elapsed
        })
    });
    group.finish();
}

/// Expiring 200k messages over 10,000 devices at once (one ttl for all):
/// the one transaction the sweep makes, which every API call that stores
/// a message waits behind. Each iteration expires a fresh copy of the
/// same file; copying and opening it are left out of the time.
fn redb_expire(c: &mut Criterion) {
    let rt = runtime(1);
    let template = tempfile::tempdir().expect("tempdir");
    fill_10k_devices(&rt, template.path());
    let after_ttl = message(0).expires_ms + 1;
    let mut group = c.benchmark_group("redb expire");
    group.sample_size(10);
    group.throughput(Throughput::Elements(PREFILL));
    group.bench_function("200k messages, 10k devices, one sweep", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir().expect("tempdir");
                std::fs::copy(template.path().join(DB_FILE), dir.path().join(DB_FILE))
                    .expect("copy store");
                let store =
                    RedbStore::open(dir.path(), Tuning::batch(4096, 0)).expect("open store");
                let start = Instant::now();
                let out = rt.block_on(store.expire(after_ttl)).expect("expire");
                elapsed += start.elapsed();
                assert_eq!(out.expired, PREFILL);
                assert_eq!(store.pending_total(), 0);
            }
            elapsed
        })
    });
    group.finish();
}

fn pending_100(c: &mut Criterion) {
    let rt = runtime(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let redb = RedbStore::open(dir.path(), Tuning::batch(4096, 0)).expect("open store");
    let memory = MemoryStore::new();
    let ids: Vec<NewMessage> = (0..100).map(message).collect();
    rt.block_on(async {
        for msg in &ids {
            redb.append(APP, &["reader"], msg, 100)
                .await
                .expect("append");
            memory
                .append(APP, &["reader"], msg, 100)
                .await
                .expect("append");
        }
    });
    let now = 1_700_000_000_000;
    let mut group = c.benchmark_group("pending 100");
    group.bench_function("redb", |b| {
        b.iter(|| {
            let got = rt
                .block_on(redb.pending(APP, "reader", 0, now, 100))
                .expect("pending");
            assert_eq!(got.len(), 100);
            black_box(got)
        })
    });
    group.bench_function("memory", |b| {
        b.iter(|| {
            let got = rt
                .block_on(memory.pending(APP, "reader", 0, now, 100))
                .expect("pending");
            assert_eq!(got.len(), 100);
            black_box(got)
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    memory_append_ack,
    redb_group_commit,
    redb_spread,
    redb_layout,
    redb_open,
    redb_expire,
    pending_100
);
criterion_main!(benches);
