//! The load tester's test binary.
//!
//! `fake_*`: the real `pushgate-loadtest` binary against a small in-test
//! gateway written from PROTOCOL.md, so the client side is checked on its own.
//!
//! `pushgate_*`: the smoke run that keeps the load test from rotting: `bench`
//! starts the real gateway (`PUSHGATE_BIN`, or `pushgate` next to this test's
//! target directory) and runs each scenario with a few hundred connections
//! for a few seconds, asserting no failures and no loss. Without the gateway
//! binary these tests FAIL, on purpose.

#[path = "support/fake_gateway.rs"]
mod fake_gateway;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;

use fake_gateway::Fake;

const BIN: &str = env!("CARGO_BIN_EXE_pushgate-loadtest");

fn temp_path(name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "pushgate-loadtest-test-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ))
}

struct Run {
    code: i32,
    json: Value,
    out: String,
    err: String,
}

/// Runs the binary with `args` plus `--json`, returns exit code and results.
async fn run(args: &[String]) -> Run {
    let json_path = temp_path("results.json");
    let out: Output = tokio::process::Command::new(BIN)
        .args(args)
        .arg("--json")
        .arg(&json_path)
        .arg("--quiet")
        .arg("--time-limit")
        .arg("120")
        .kill_on_drop(true)
        .output()
        .await
        .expect("runs pushgate-loadtest");
    let json = std::fs::read_to_string(&json_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let _ = std::fs::remove_file(&json_path);
    Run {
        code: out.status.code().unwrap_or(-1),
        json,
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn fake_args(fake: &Fake, scenario: &str, n: u64, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "run".into(),
        scenario.into(),
        "--url".into(),
        format!("ws://{}/v1/connect", fake.device),
        "--api".into(),
        format!("http://{}", fake.api),
        "--app".into(),
        fake_gateway::APP.into(),
        "--secret".into(),
        fake_gateway::SECRET.into(),
        "--api-key".into(),
        fake_gateway::API_KEY.into(),
        "-n".into(),
        n.to_string(),
        "--hold".into(),
        "0.3".into(),
        "--settle".into(),
        "0.2".into(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The assertions every clean run must pass.
fn assert_clean(r: &Run, n: u64) {
    assert_eq!(
        r.code, 0,
        "exit code\nstdout:\n{}\nstderr:\n{}",
        r.out, r.err
    );
    let c = &r.json["connections"];
    assert_eq!(u(&c["established"]), n, "{}", r.out);
    assert_eq!(u(&c["failed"]), 0, "{}", r.out);
    assert!(
        r.json["errors"].as_array().is_some_and(|e| e.is_empty()),
        "{}",
        r.out
    );
    assert!(r.json["interrupted"].is_null(), "{}", r.out);
    for d in r.json["deliveries"].as_array().expect("deliveries") {
        assert_eq!(u(&d["lost"]), 0, "lost: {}", r.out);
        assert_eq!(u(&d["duplicates"]), 0, "duplicates: {}", r.out);
        assert_eq!(u(&d["out_of_order"]), 0, "order: {}", r.out);
        assert!(
            d["api_errors"].as_object().is_some_and(|m| m.is_empty()),
            "{}",
            r.out
        );
        assert_eq!(u(&d["unique"]), u(&d["expected"]), "{}", r.out);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_broadcast_over_two_workers_with_plot() {
    let fake = Fake::start().await;
    let plot = temp_path("plot.png");
    let plot_s = plot.display().to_string();
    let r = run(&fake_args(
        &fake,
        "broadcast",
        300,
        &["--workers", "2", "--count", "5", "--plot", &plot_s],
    ))
    .await;
    assert_clean(&r, 300);
    let d = &r.json["deliveries"][0];
    assert_eq!(d["kind"], "broadcast");
    assert_eq!(u(&d["expected"]), 1500);
    assert_eq!(u(&d["gateway_online"]), 1500);
    assert!(d["latency_ms"]["p99"].as_f64().is_some(), "{}", r.out);
    assert_eq!(r.json["setup"]["workers"], 2);
    assert_eq!(r.json["setup"]["per_worker"], serde_json::json!([150, 150]));
    assert_eq!(r.json["gateway"]["source"], "metrics");
    assert!(r.out.contains("result: CLEAN"), "{}", r.out);
    let png = std::fs::read(&plot).expect("plot written");
    assert_eq!(&png[1..4], b"PNG");
    let _ = std::fs::remove_file(&plot);
    assert_eq!(
        r.json["client"]["workers"].as_array().map(Vec::len),
        Some(2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_idle_from_one_source_address() {
    let fake = Fake::start().await;
    let r = run(&fake_args(&fake, "idle", 200, &["--source", "127.0.0.7"])).await;
    assert_clean(&r, 200);
    assert_eq!(r.json["setup"]["source_addresses"], 1);
    assert!(u(&r.json["connections"]["peak_up"]) == 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_topic_with_query_tokens() {
    let fake = Fake::start().await;
    let r = run(&fake_args(
        &fake,
        "topic",
        200,
        &["--topics", "4", "--count", "8", "--token-in", "query"],
    ))
    .await;
    assert_clean(&r, 200);
    // 8 messages over 4 topics of 50 devices each.
    assert_eq!(u(&r.json["deliveries"][0]["expected"]), 400, "{}", r.out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_device_pushes_single_and_batched() {
    let fake = Fake::start().await;
    let r = run(&fake_args(
        &fake,
        "device",
        200,
        &["--rate", "300", "--duration", "1"],
    ))
    .await;
    assert_clean(&r, 200);
    let d = &r.json["deliveries"][0];
    assert_eq!(u(&d["accepted"]), 300, "{}", r.out);
    assert_eq!(u(&r.json["frames"]["acks"]), 300, "{}", r.out);

    let r = run(&fake_args(
        &fake,
        "device",
        200,
        &[
            "--rate",
            "500",
            "--duration",
            "1",
            "--batch",
            "50",
            "--seed",
            "7",
        ],
    ))
    .await;
    assert_clean(&r, 200);
    assert_eq!(u(&r.json["deliveries"][0]["accepted"]), 500, "{}", r.out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_storm_rounds_all_come_back() {
    let fake = Fake::start().await;
    let r = run(&fake_args(
        &fake,
        "storm",
        200,
        &["--rounds", "2", "--storm-timeout", "20"],
    ))
    .await;
    assert_clean(&r, 200);
    let rounds = r.json["storm"].as_array().expect("storm rounds");
    assert_eq!(rounds.len(), 2);
    for round in rounds {
        assert_eq!(round["recovered"], true, "{}", r.out);
        assert_eq!(u(&round["back"]), 200, "{}", r.out);
    }
    assert!(u(&r.json["connections"]["reconnected"]) >= 400, "{}", r.out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_refusals_are_counted_by_reason() {
    let fake = Fake::start().await;
    let mut args = fake_args(&fake, "idle", 50, &[]);
    let i = args
        .iter()
        .position(|a| a == "--secret")
        .expect("has --secret");
    args[i + 1] = "wrong-secret".into();
    let r = run(&args).await;
    assert_eq!(r.code, 3, "problems give exit 3\n{}\n{}", r.out, r.err);
    assert_eq!(u(&r.json["connections"]["failed"]), 50);
    assert_eq!(
        u(&r.json["connections"]["failed_by"]["http_401_unauthorized"]),
        50,
        "{}",
        r.out
    );
    assert!(r.out.contains("PROBLEMS"), "{}", r.out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_overload_is_retried_when_asked() {
    let fake = Fake::start().await;
    fake.refuse_next(20);
    let r = run(&fake_args(&fake, "idle", 100, &["--retries", "3"])).await;
    assert_clean(&r, 100);
    assert_eq!(
        u(&r.json["connections"]["failed_by"]["http_503_overloaded"]),
        20,
        "{}",
        r.out
    );
    assert_eq!(fake.connected(), 0, "connections closed at the end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_targets_are_refused() {
    let r = run(&[
        "run".into(),
        "idle".into(),
        "--url".into(),
        "ws://10.1.2.3:8080/v1/connect".into(),
        "--secret".into(),
        "s".into(),
    ])
    .await;
    assert_eq!(r.code, 1);
    assert!(r.err.contains("--allow-remote"), "{}", r.err);
}

/// `floor` needs no gateway: every frame of every round reaches the sinks
/// (two writer threads, two sink processes, so both code paths run), and
/// the JSON says so.
/// Runs `pushgate-loadtest floor ARGS --json F`; asserts exit 0 and
/// returns its stdout and JSON.
async fn floor(args: &[&str], gateway: Option<PathBuf>) -> (String, Value) {
    let json_path = temp_path("floor.json");
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("floor").args(args);
    if let Some(bin) = gateway {
        cmd.arg("--gateway-bin").arg(bin);
    }
    let out = cmd
        .arg("--json")
        .arg(&json_path)
        .kill_on_drop(true)
        .output()
        .await
        .expect("runs pushgate-loadtest floor");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("json written"))
            .expect("json");
    let _ = std::fs::remove_file(&json_path);
    (stdout, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floor_delivers_every_frame() {
    let (stdout, json) = floor(
        &[
            "-n",
            "300",
            "--count",
            "3",
            "--threads",
            "2",
            "--sinks",
            "2",
            "--settle",
            "0",
            "--frame-bytes",
            "120",
        ],
        None,
    )
    .await;
    assert_eq!(u(&json["frames_expected"]), 900);
    assert_eq!(u(&json["frames_received"]), 900);
    assert_eq!(u(&json["latency_ms"]["count"]), 900);
    assert_eq!(json["round_ms"].as_array().map(Vec::len), Some(3));
    assert_eq!(json["sender"], "raw");
    assert!(json["sender_cpu_ms_per_1000"]
        .as_f64()
        .is_some_and(|v| v > 0.0));
    assert!(stdout.contains("writer  cpu"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floor_refuses_a_frame_that_is_not_one_short_frame() {
    let out = tokio::process::Command::new(BIN)
        .args(["floor", "-n", "10", "--frame-bytes", "126"])
        .output()
        .await
        .expect("runs pushgate-loadtest floor");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--frame-bytes"));
}

// --- against the real gateway -------------------------------------------

/// The pushgate binary: `PUSHGATE_BIN`, or `pushgate` in this test's own
/// target directory (target/debug/deps/smoke-… → target/debug/pushgate), or
/// the workspace's target/debug/pushgate. Missing is a failure.
fn gateway_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PUSHGATE_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "PUSHGATE_BIN={} does not exist", p.display());
        return p;
    }
    let mut tried = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent().and_then(Path::parent) {
            tried.push(dir.join("pushgate"));
        }
    }
    tried.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/pushgate"));
    if let Some(found) = tried.iter().find(|p| p.is_file()) {
        return found.clone();
    }
    panic!(
        "the loadtest smoke test needs the pushgate gateway binary and found none.\n\
         Build it first (`cargo build --bin pushgate`, or `cargo test --workspace`), or set \
         PUSHGATE_BIN=/path/to/pushgate. Looked at: {}",
        tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// `floor --gateway-bin`: the same raw sinks as devices of the real
/// gateway, each round a broadcast; every frame arrives and the gateway's
/// CPU is measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floor_against_the_gateway() {
    let (stdout, json) = floor(
        &["-n", "200", "--count", "2", "--sinks", "2", "--settle", "0"],
        Some(gateway_bin()),
    )
    .await;
    assert_eq!(json["sender"], "gateway");
    assert_eq!(u(&json["frames_received"]), 400);
    assert_eq!(u(&json["latency_ms"]["count"]), 400);
    assert!(json["sender_cpu_ms"].as_f64().is_some_and(|v| v > 0.0));
    assert!(stdout.contains("gateway cpu"), "{stdout}");

    // The same with a topic every device subscribes to.
    let (_, json) = floor(
        &[
            "-n", "100", "--count", "2", "--settle", "0.5", "--topic", "news",
        ],
        Some(gateway_bin()),
    )
    .await;
    assert_eq!(json["sender"], "gateway-topic");
    assert_eq!(u(&json["frames_received"]), 200);
}

async fn bench(scenario: &str, n: u64, extra: &[&str]) -> Run {
    let bin = gateway_bin();
    let mut a: Vec<String> = vec![
        "bench".into(),
        scenario.into(),
        "--gateway-bin".into(),
        bin.display().to_string(),
        "--drain-secs".into(),
        "1".into(),
        "-n".into(),
        n.to_string(),
        "--hold".into(),
        "1".into(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    run(&a).await
}

fn assert_gateway_measured(r: &Run) {
    let g = &r.json["gateway"];
    assert_eq!(g["source"], "proc", "{}", r.out);
    assert!(g["bytes_per_conn"].as_f64().is_some(), "{}", r.out);
    assert_eq!(
        r.json["setup"]["bench"]["exit_code"], 0,
        "gateway exit after SIGTERM\n{}",
        r.out
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushgate_idle() {
    let r = bench("idle", 300, &[]).await;
    assert_clean(&r, 300);
    assert_gateway_measured(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushgate_broadcast() {
    let r = bench("broadcast", 300, &["--count", "5"]).await;
    assert_clean(&r, 300);
    assert_eq!(u(&r.json["deliveries"][0]["unique"]), 1500, "{}", r.out);
    assert_gateway_measured(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushgate_device() {
    let r = bench("device", 300, &["--rate", "200", "--duration", "2"]).await;
    assert_clean(&r, 300);
    assert_eq!(u(&r.json["deliveries"][0]["accepted"]), 400, "{}", r.out);
    assert_gateway_measured(&r);
}

/// `--offline`: every push is stored while no device is connected, and
/// every accepted one arrives after they connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushgate_device_offline() {
    let r = bench(
        "device",
        300,
        &[
            "--store",
            "redb",
            "--offline",
            "--rate",
            "1000",
            "--duration",
            "2",
            "--batch",
            "10",
        ],
    )
    .await;
    assert_clean(&r, 300);
    let d = &r.json["deliveries"][0];
    assert_eq!(u(&d["accepted"]), 2000, "{}", r.out);
    assert_eq!(u(&d["gateway_stored"]), 2000, "{}", r.out);
    // Nobody was connected while the pushes were accepted.
    assert_eq!(u(&d["gateway_online"]), 0, "{}", r.out);
    assert_eq!(u(&d["unique"]), 2000, "{}", r.out);
    // Where the kernel accounts the store's writes (not on tmpfs), they are
    // reported per message.
    let g = &r.json["gateway"];
    if u(&g["after_send"]["write_bytes"]) > u(&g["before_send"]["write_bytes"]) {
        assert!(g["write_bytes_per_message"].as_f64().is_some(), "{}", r.out);
    }
    assert_gateway_measured(&r);
}

#[tokio::test]
async fn offline_needs_a_stored_device_push() {
    for (extra, why) in [
        (
            &["topic", "--offline"][..],
            "only applies to the device scenario",
        ),
        (&["device", "--offline", "--ttl", "0"][..], "needs ttl > 0"),
        (
            &["device", "--offline", "--ttl", "20", "--duration", "10"][..],
            "would expire",
        ),
        (
            &["device", "--offline", "--rate", "1000", "--duration", "10"][..],
            "max_pending",
        ),
    ] {
        let mut a: Vec<String> = vec!["run".into()];
        a.extend(extra.iter().map(|s| s.to_string()));
        a.extend(["-n", "10", "--secret", "s", "--api-key", "k"].map(String::from));
        let r = run(&a).await;
        assert_eq!(r.code, 1, "{extra:?}: {}\n{}", r.out, r.err);
        assert!(r.err.contains(why), "{extra:?}: {}", r.err);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushgate_topic() {
    let r = bench("topic", 200, &["--topics", "4", "--count", "8"]).await;
    assert_clean(&r, 200);
    assert_gateway_measured(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushgate_storm() {
    let r = bench("storm", 200, &["--storm-timeout", "30"]).await;
    assert_clean(&r, 200);
    assert_eq!(r.json["storm"][0]["recovered"], true, "{}", r.out);
    assert_gateway_measured(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushgate_storm_takeover() {
    let r = bench(
        "storm",
        200,
        &["--takeover", "--store", "redb", "--storm-timeout", "30"],
    )
    .await;
    assert_clean(&r, 200);
    let round = &r.json["storm"][0];
    assert_eq!(round["how"], "gateway_takeover", "{}", r.out);
    assert_eq!(round["recovered"], true, "{}", r.out);
    assert_eq!(u(&round["reconnect_failures"]), 0, "{}", r.out);
    // The API answered throughout the hand-over, without one error.
    assert!(u(&round["api"]["ok"]) > 0, "{}", r.out);
    assert_eq!(round["api"]["errors"], serde_json::json!({}), "{}", r.out);
    assert_eq!(
        r.json["setup"]["bench"]["exit_code"], 0,
        "the new gateway exits 0 after SIGTERM\n{}",
        r.out
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushgate_redeliver() {
    let r = bench(
        "redeliver",
        300,
        &[
            "--store",
            "redb",
            "--backlog",
            "20",
            "--rate",
            "100",
            "--duration",
            "2",
            "--batch",
            "5",
        ],
    )
    .await;
    assert_clean(&r, 300);
    let d = &r.json["redeliver"];
    assert_eq!(u(&d["stored"]), 300 * 20, "{}", r.out);
    assert_eq!(d["complete"], true, "{}", r.out);
    // Every stored message came back, or the device was told it was
    // dropped (pushes to a device still reconnecting can push it out).
    assert!(
        u(&d["redelivered"]) + u(&d["dropped"]) >= 300 * 20,
        "{}",
        r.out
    );
    assert!(u(&d["redelivered"]) > 0, "{}", r.out);
    assert_eq!(u(&r.json["deliveries"][0]["accepted"]), 200, "{}", r.out);
    assert_gateway_measured(&r);
}
