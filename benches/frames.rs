//! Per-operation costs on the message path: encoding a `msg` frame once per
//! message (device / topic / broadcast), parsing what devices send (ack,
//! sub, bad JSON), verifying a device token at the upgrade, and the hub
//! handing one shared frame to 10k connection queues.
//!
//! `cargo bench --bench frames`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pushgate::auth::{issue_device_token, Auth};
use pushgate::fanout::{encode, hand_out};
use pushgate::hub::{Conn, ConnHandle, MsgKind, Out};
use pushgate::metrics::Metrics;
use pushgate::protocol::{msg_frame, parse_device_frame, MsgTarget};

const ID: &str = "0190c2a4-7d3e-7a31-9c5b-2f1e8d4c6a10";
/// A typical small notification payload (already compact JSON).
const DATA: &str = r#"{"title":"Hi","body":"You have a new message","badge":3,"url":"/inbox/42"}"#;
const FANOUT_CONNS: usize = 10_000;

fn encoding(c: &mut Criterion) {
    let mut group = c.benchmark_group("msg frame");
    group.throughput(Throughput::Elements(1));
    group.bench_function("device (protocol::msg_frame)", |b| {
        b.iter(|| {
            msg_frame(
                black_box(ID),
                MsgTarget::Device { seq: 123_456 },
                black_box(DATA),
            )
        })
    });
    group.bench_function("topic (protocol::msg_frame)", |b| {
        b.iter(|| {
            msg_frame(
                black_box(ID),
                MsgTarget::Topic("news.sports"),
                black_box(DATA),
            )
        })
    });
    group.bench_function("broadcast (protocol::msg_frame)", |b| {
        b.iter(|| msg_frame(black_box(ID), MsgTarget::Broadcast, black_box(DATA)))
    });
    // What the API does per topic/broadcast message: encode once into the
    // shared `Arc<Frame>`.
    let now = Instant::now();
    group.bench_function("broadcast shared (fanout::encode)", |b| {
        b.iter(|| {
            encode(
                black_box(ID),
                MsgTarget::Broadcast,
                black_box(DATA),
                MsgKind::Broadcast,
                now,
                false,
            )
        })
    });
    group.bench_function("topic shared (fanout::encode)", |b| {
        b.iter(|| {
            encode(
                black_box(ID),
                MsgTarget::Topic("news.sports"),
                black_box(DATA),
                MsgKind::Topic,
                now,
                false,
            )
        })
    });
    group.finish();
}

fn parsing(c: &mut Criterion) {
    let mut group = c.benchmark_group("device frame parse");
    group.throughput(Throughput::Elements(1));
    group.bench_function("ack", |b| {
        b.iter(|| parse_device_frame(black_box(r#"{"t":"ack","seq":123456}"#)))
    });
    group.bench_function("sub", |b| {
        b.iter(|| parse_device_frame(black_box(r#"{"t":"sub","topic":"news.sports"}"#)))
    });
    group.bench_function("bad JSON", |b| {
        b.iter(|| parse_device_frame(black_box(r#"{"t":"ack","seq":12"#)))
    });
    group.finish();
}

fn tokens(c: &mut Criterion) {
    let cfg = pushgate::config::parse(
        "[[app]]\nid = \"bench\"\ndevice_secret = \"bench-secret-0123456789abcdef\"\napi_keys = [\"k\"]\n",
    )
    .expect("valid config");
    let auth = Auth::new(&cfg);
    let now = 1_700_000_000;
    let token = issue_device_token(
        "bench-secret-0123456789abcdef",
        "bench",
        "device-000123",
        now + 86_400,
        &["news.*".to_string()],
    )
    .expect("token");
    assert!(auth.verify_device_token(&token, now).is_ok());
    let mut group = c.benchmark_group("device token");
    group.throughput(Throughput::Elements(1));
    group.bench_function("verify (HS256)", |b| {
        b.iter(|| auth.verify_device_token(black_box(&token), now))
    });
    group.finish();
}

fn fanout(c: &mut Criterion) {
    let metrics = Metrics::new(&["bench"]).expect("metrics");
    let conns: Vec<ConnHandle> = (0..FANOUT_CONNS)
        .map(|i| Conn::new(i as u64, 0, Arc::from(format!("device-{i}"))))
        .collect();
    let frame = encode(
        ID,
        MsgTarget::Broadcast,
        DATA,
        MsgKind::Broadcast,
        Instant::now(),
        false,
    );
    let out = Out { frame, seq: 0 };
    let mut group = c.benchmark_group("hub fan-out");
    group.throughput(Throughput::Elements(FANOUT_CONNS as u64));
    group.bench_function("one shared frame to 10k connections", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let handed = hand_out(&conns, &out, 64, &metrics);
                total += start.elapsed();
                assert_eq!(handed, FANOUT_CONNS as u64);
                // Drain outside the timed part, as the connection tasks do.
                for conn in &conns {
                    black_box(conn.take());
                }
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, encoding, parsing, tokens, fanout);
criterion_main!(benches);
