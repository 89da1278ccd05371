//! Store benches: what one append+ack costs in memory, how many messages/s
//! the redb store takes with group commit under 64 concurrent appenders (one
//! fsync shared by many), and what reading 100 pending messages costs.
//!
//! `cargo bench --bench store`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pushgate::store::memory::MemoryStore;
use pushgate::store::redb::RedbStore;
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
    let store = Arc::new(RedbStore::open(dir.path(), 4096, 0).expect("open store"));
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

fn pending_100(c: &mut Criterion) {
    let rt = runtime(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let redb = RedbStore::open(dir.path(), 4096, 0).expect("open store");
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

criterion_group!(benches, memory_append_ack, redb_group_commit, pending_100);
criterion_main!(benches);
