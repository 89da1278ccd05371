//! The durability promise over real processes on the redb store: a gateway
//! killed with SIGKILL while pushes are in flight loses no message it
//! answered 202 for, and seqs never go back or repeat across restarts; a
//! second process on the same store is refused; the pending gauge is right
//! after a restart; a store that cannot write accepts nothing.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::process::{Proc, BIN};
use crate::support::*;

/// Devices pushed to in the crash test.
const DEVICES: usize = 20;
/// Of those, the first `LIVE` are connected (and ack) while pushes run.
const LIVE: usize = 6;
/// Concurrent pushers; pusher p owns devices p, p + PUSHERS, …, so the
/// pushes of one device are sequential and their order is known.
const PUSHERS: usize = 10;
/// SIGKILLs per run.
const KILLS: usize = 3;

/// The base config on the redb store at `store`, with a pending limit that
/// never discards (every 202 must come back).
fn redb_config(store: &Path) -> impl FnOnce(String) -> String {
    let store = store.display().to_string();
    move |t: String| {
        t.replace("[store]", "[messages]\nmax_pending = 1000000\n\n[store]")
            .replace(
                "kind = \"memory\"",
                &format!("kind = \"redb\"\npath = \"{store}\""),
            )
    }
}

fn device_name(i: usize) -> String {
    format!("c{i}")
}

/// One `msg` frame as a device saw it.
#[derive(Debug, Clone)]
struct Seen {
    seq: u64,
    id: String,
    n: u64,
}

/// Parse a gateway frame: `Some` for a device-directed `msg`; panics on
/// `dropped` (the pending limit is out of reach here) or a `msg` without seq.
fn parse_msg(text: &str) -> Option<Seen> {
    let v: Value = serde_json::from_str(text).expect("gateway frames are JSON");
    match v["t"].as_str() {
        Some("msg") => Some(Seen {
            seq: v["seq"].as_u64().unwrap_or_else(|| panic!("no seq: {v}")),
            id: v["id"].as_str().unwrap().to_string(),
            n: v["data"]["n"]
                .as_u64()
                .unwrap_or_else(|| panic!("no n: {v}")),
        }),
        Some("dropped") => panic!("nothing may be dropped here: {v}"),
        _ => None,
    }
}

/// A device connected while the gateway runs: reads and acks every message
/// until the connection dies (the kill), returns what it saw in order.
async fn live_reader(mut d: Device) -> Vec<Seen> {
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, d.ws.next()).await {
            Err(_) => panic!("a live device heard nothing for {WAIT:?}"),
            Ok(Some(Ok(Message::Text(t)))) => {
                if let Some(m) = parse_msg(&t) {
                    let ack = json!({"t": "ack", "seq": m.seq}).to_string();
                    seen.push(m);
                    if d.ws.send(Message::Text(ack.into())).await.is_err() {
                        break;
                    }
                }
            }
            Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) => break,
            Ok(Some(Ok(_))) => {}
        }
    }
    seen
}

/// What one push got.
#[derive(Debug)]
struct Push {
    device: usize,
    n: u64,
    /// The id of a 202; `None`: no answer (killed mid-request), so it may or
    /// may not be stored.
    id: Option<String>,
}

/// Pushes to its devices in turn until the gateway stops answering.
async fn pusher(
    api: SocketAddr,
    p: usize,
    next_n: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Vec<Push> {
    let mine: Vec<usize> = (p..DEVICES).step_by(PUSHERS).collect();
    let mut pushes = Vec::new();
    for k in 0.. {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let device = mine[k % mine.len()];
        let n = next_n.fetch_add(1, Ordering::SeqCst);
        let body = json!({"to": {"device": device_name(device)}, "data": {"n": n}, "ttl": 3600});
        let body = body.to_string();
        let r = try_http(
            api,
            "POST",
            "/v1/apps/demo/messages",
            Some(KEY),
            Some(&body),
        )
        .await;
        match r {
            Some(r) if r.status == 202 => {
                let id = r.json()["id"].as_str().unwrap().to_string();
                pushes.push(Push {
                    device,
                    n,
                    id: Some(id),
                });
                accepted.fetch_add(1, Ordering::SeqCst);
            }
            Some(r) => panic!(
                "push refused while the gateway ran: {} {}",
                r.status, r.body
            ),
            None => {
                pushes.push(Push {
                    device,
                    n,
                    id: None,
                });
                break;
            }
        }
    }
    pushes
}

/// Connect `device`, read until every id of `expect` came and then nothing
/// for a moment, acking each message as it comes; close. Returns what came.
async fn drain_device(gw: &Gateway, device: &str, expect: HashSet<String>) -> Vec<Seen> {
    let mut d = gw.connect(device).await;
    let mut seen: Vec<Seen> = Vec::new();
    let mut missing = expect;
    loop {
        let wait = if missing.is_empty() {
            Duration::from_millis(300)
        } else {
            WAIT
        };
        match tokio::time::timeout(wait, d.ws.next()).await {
            Err(_) if missing.is_empty() => break,
            Err(_) => panic!(
                "{device}: {} messages that got a 202 never came, e.g. {:?}",
                missing.len(),
                missing.iter().next()
            ),
            Ok(Some(Ok(Message::Text(t)))) => {
                if let Some(m) = parse_msg(&t) {
                    missing.remove(&m.id);
                    d.ack(m.seq).await;
                    seen.push(m);
                }
            }
            Ok(Some(Ok(Message::Close(f)))) => panic!("{device}: closed {f:?}"),
            Ok(Some(Err(e))) => panic!("{device}: {e}"),
            Ok(None) => panic!("{device}: connection ended"),
            Ok(Some(Ok(_))) => {}
        }
    }
    // The gateway handles the acks before the close, in frame order.
    d.close().await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_pushes_loses_nothing_that_got_a_202() {
    let mut dir = tempfile::tempdir().unwrap();
    let store: PathBuf = dir.path().join("store");
    let next_n = Arc::new(AtomicU64::new(1));
    let mut pushes: Vec<Vec<Push>> = (0..PUSHERS).map(|_| Vec::new()).collect();
    // Per device, per connection, the messages it saw, in order.
    let mut sessions: Vec<Vec<Vec<Seen>>> = (0..DEVICES).map(|_| Vec::new()).collect();
    let mut moments = Vec::new();

    for round in 0..KILLS {
        let mut p = Proc::start_in(dir, redb_config(&store));
        let gw = p.gateway();
        let mut readers = Vec::new();
        for i in 0..LIVE {
            let d = gw.connect(&device_name(i)).await;
            readers.push(tokio::spawn(live_reader(d)));
        }
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..PUSHERS)
            .map(|i| {
                tokio::spawn(pusher(
                    p.api,
                    i,
                    next_n.clone(),
                    accepted.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        // Some pushes through, then a random moment while they go on.
        let deadline = tokio::time::Instant::now() + WAIT;
        while accepted.load(Ordering::SeqCst) < 50 {
            assert!(tokio::time::Instant::now() < deadline, "no pushes accepted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let moment = rand::rng().random_range(0..800u64);
        tokio::time::sleep(Duration::from_millis(moment)).await;
        let before_kill = accepted.load(Ordering::SeqCst);
        p.signal("-KILL");
        assert_eq!(p.wait(), -1, "killed by a signal");
        stop.store(true, Ordering::SeqCst);
        for (i, t) in tasks.into_iter().enumerate() {
            let got = tokio::time::timeout(WAIT, t)
                .await
                .expect("pusher stops")
                .unwrap();
            pushes[i].extend(got);
        }
        for (i, r) in readers.into_iter().enumerate() {
            let seen = tokio::time::timeout(WAIT, r)
                .await
                .expect("reader stops")
                .unwrap();
            sessions[i].push(seen);
        }
        moments.push(format!(
            "round {round}: killed {moment} ms after the 50th 202 ({before_kill} 202s by then)"
        ));
        dir = p.into_dir();
    }

    // What was promised, and what may or may not have been stored.
    let mut promised: HashMap<u64, (usize, String)> = HashMap::new();
    let mut unknown: HashMap<u64, usize> = HashMap::new();
    for push in pushes.iter().flatten() {
        match &push.id {
            Some(id) => {
                promised.insert(push.n, (push.device, id.clone()));
            }
            None => {
                unknown.insert(push.n, push.device);
            }
        }
    }
    let seen_live: HashSet<u64> = sessions.iter().flatten().flatten().map(|m| m.n).collect();

    // Last restart: the gauge first, then every device reads everything.
    let p = Proc::start_in(dir, redb_config(&store));
    let gw = p.gateway();
    let gauge = metric(&gw.metrics().await, "pushgate_pending_messages") as usize;
    let mut final_tasks = Vec::new();
    for i in 0..DEVICES {
        let expect: HashSet<String> = promised
            .iter()
            .filter(|(n, (d, _))| *d == i && !seen_live.contains(n))
            .map(|(_, (_, id))| id.clone())
            .collect();
        let gw = p.gateway();
        final_tasks.push(tokio::spawn(async move {
            drain_device(&gw, &device_name(i), expect).await
        }));
    }
    let mut redelivered = 0;
    for (i, t) in final_tasks.into_iter().enumerate() {
        let seen = t.await.unwrap();
        redelivered += seen.len();
        sessions[i].push(seen);
    }
    // The gauge counted exactly what the devices then got.
    assert_eq!(gauge, redelivered, "pending gauge after restart");
    // Acked ones never come back.
    for i in 0..DEVICES {
        let mut d = gw.connect(&device_name(i)).await;
        d.expect_silence(Duration::from_millis(200)).await;
        d.close().await;
    }

    // Every delivery is of a message pushed to that device, with its id.
    let mut seq_of: Vec<HashMap<u64, u64>> = vec![HashMap::new(); DEVICES];
    let mut n_of: Vec<HashMap<u64, u64>> = vec![HashMap::new(); DEVICES];
    let mut delivered: HashSet<u64> = HashSet::new();
    let mut deliveries = 0;
    for (i, conns) in sessions.iter().enumerate() {
        for conn in conns {
            // In one connection, seqs strictly increase.
            for w in conn.windows(2) {
                assert!(
                    w[0].seq < w[1].seq,
                    "{}: seq {} then {}",
                    device_name(i),
                    w[0].seq,
                    w[1].seq
                );
            }
            for m in conn {
                deliveries += 1;
                match (promised.get(&m.n), unknown.get(&m.n)) {
                    (Some((d, id)), _) => {
                        assert_eq!((*d, id), (i, &m.id), "n={} delivered wrong", m.n)
                    }
                    (None, Some(d)) => assert_eq!(*d, i, "n={} to the wrong device", m.n),
                    (None, None) => panic!("{}: n={} was never pushed", device_name(i), m.n),
                }
                // One message, one seq; one seq, one message: never reused.
                let s = *seq_of[i].entry(m.n).or_insert(m.seq);
                assert_eq!(s, m.seq, "n={} came with seqs {s} and {}", m.n, m.seq);
                let n = *n_of[i].entry(m.seq).or_insert(m.n);
                assert_eq!(
                    n,
                    m.n,
                    "{} seq {} reused for n={n} and n={}",
                    device_name(i),
                    m.seq,
                    m.n
                );
                delivered.insert(m.n);
            }
        }
    }
    // Every 202 arrived at least once.
    let lost: Vec<_> = promised.keys().filter(|n| !delivered.contains(n)).collect();
    assert!(
        lost.is_empty(),
        "{} promised messages lost: {lost:?}",
        lost.len()
    );
    // Seqs follow acceptance order across the kills: each device's pushes are
    // sequential (one pusher), so a later 202 has a higher seq.
    for push_list in &pushes {
        let mut last: HashMap<usize, u64> = HashMap::new();
        for push in push_list.iter().filter(|p| p.id.is_some()) {
            let seq = seq_of[push.device][&push.n];
            if let Some(prev) = last.insert(push.device, seq) {
                assert!(
                    prev < seq,
                    "{}: seq went from {prev} back to {seq}",
                    device_name(push.device)
                );
            }
        }
    }
    let unknown_stored = unknown.keys().filter(|n| delivered.contains(n)).count();
    eprintln!(
        "crash test: {KILLS} SIGKILLs ({}); {} messages got a 202, all {} delivered and checked \
         ({deliveries} deliveries over {DEVICES} devices, {redelivered} after the last restart); \
         {} pushes cut off by a kill, {unknown_stored} of them stored anyway",
        moments.join("; "),
        promised.len(),
        promised.len(),
        unknown.len(),
    );
}

#[tokio::test]
async fn second_process_on_the_same_store_exits_one_store_locked() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let first = Proc::start_in(tempfile::tempdir().unwrap(), redb_config(&store));
    let config = dir.path().join("second.toml");
    std::fs::write(&config, redb_config(&store)(base_toml())).unwrap();
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .output(),
    )
    .await
    .expect("the second process exits at once")
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.contains("store locked"))
        .unwrap_or_else(|| panic!("no 'store locked' line in {err}"));
    assert!(line.contains(&store.display().to_string()), "{line}");
    // The first one is unharmed.
    assert_eq!(
        http(first.api, "GET", "/healthz", None, None, "")
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn pending_gauge_is_right_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let mut p = Proc::start_in(dir, redb_config(&store));
    let gw = p.gateway();
    for i in 0..7 {
        gw.push(json!({"to": {"device": "g1"}, "data": {"n": i}}))
            .await;
    }
    // Two devices at once, and a collapse that replaces one.
    gw.push(json!({"to": {"devices": ["g1", "g2"]}, "data": 1, "collapse_key": "k"}))
        .await;
    gw.push(json!({"to": {"devices": ["g1", "g2"]}, "data": 2, "collapse_key": "k"}))
        .await;
    assert_eq!(
        metric(&gw.metrics().await, "pushgate_pending_messages"),
        9.0
    );
    // Every 202 is durable: a kill keeps all nine.
    p.signal("-KILL");
    p.wait();

    let mut p = Proc::start_in(p.into_dir(), redb_config(&store));
    let gw = p.gateway();
    assert_eq!(
        metric(&gw.metrics().await, "pushgate_pending_messages"),
        9.0
    );
    let mut d = gw.connect("g1").await;
    let mut last = 0;
    for _ in 0..8 {
        last = d.recv().await["seq"].as_u64().unwrap();
    }
    d.ack(last - 3).await;
    d.close().await;
    // g1 keeps seqs 7 and 9 (8 was collapsed), g2 its one.
    assert_eq!(
        metric(&gw.metrics().await, "pushgate_pending_messages"),
        3.0
    );
    // Acks are made durable by a clean stop.
    p.signal("-TERM");
    assert_eq!(p.wait(), 0);

    let p = Proc::start_in(p.into_dir(), redb_config(&store));
    let gw = p.gateway();
    assert_eq!(
        metric(&gw.metrics().await, "pushgate_pending_messages"),
        3.0
    );
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct TinyFs {
    dir: tempfile::TempDir,
}

impl TinyFs {
    /// `Err` with the reason when mounting is not possible here (needs root
    /// and a kernel that allows it: CI has both, a laptop may not).
    fn mount(size: &str) -> Result<TinyFs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(TinyFs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Fill the file system holding `path` until a write fails.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x55u8; 64 * 1024];
    while f.write_all(&chunk).and_then(|_| f.sync_data()).is_ok() {}
    // Whatever partial page is left.
    while f
        .write_all(&chunk[..512])
        .and_then(|_| f.sync_data())
        .is_ok()
    {}
}

#[tokio::test]
async fn full_disk_answers_503_store_unavailable_and_accepts_nothing() {
    let fs = match TinyFs::mount("16m") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIPPED full_disk_answers_503_store_unavailable_and_accepts_nothing: {why}");
            return;
        }
    };
    let store = fs.path().join("store");
    let p = Proc::start(redb_config(&store));
    let gw = p.gateway();
    let mut accepted: Vec<(u64, String)> = Vec::new();
    let mut refused: Vec<u64> = Vec::new();
    let pad = "x".repeat(3000);
    let push = |n: u64| {
        let body = json!({"to": {"device": "full"}, "data": {"n": n, "pad": pad}}).to_string();
        async move {
            let r = http(
                p.api,
                "POST",
                "/v1/apps/demo/messages",
                Some(KEY),
                Some(&body),
                "application/json",
            )
            .await;
            (n, r)
        }
    };
    let mut n = 0;
    for _ in 0..10 {
        n += 1;
        let (n, r) = push(n).await;
        assert_eq!(r.status, 202, "{}", r.body);
        accepted.push((n, r.json()["id"].as_str().unwrap().to_string()));
    }

    fill(&fs.path().join("filler"));
    // Whatever room redb's file still has inside goes first; then writes fail.
    let mut first_503 = None;
    for _ in 0..3000 {
        n += 1;
        let (n, r) = push(n).await;
        match r.status {
            202 => accepted.push((n, r.json()["id"].as_str().unwrap().to_string())),
            503 => {
                assert_eq!(r.code(), "store_unavailable", "{}", r.body);
                assert!(r.header("Retry-After").is_some());
                refused.push(n);
                first_503.get_or_insert(n);
                if refused.len() >= 20 {
                    break;
                }
            }
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    assert!(
        first_503.is_some(),
        "3000 pushes of 3 KB fitted on a full 16 MiB disk"
    );

    // Room again: the store heals without a restart (it reopens the file at
    // most once a second).
    std::fs::remove_file(fs.path().join("filler")).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        n += 1;
        let (n, r) = push(n).await;
        if r.status == 202 {
            accepted.push((n, r.json()["id"].as_str().unwrap().to_string()));
            break;
        }
        assert_eq!(r.code(), "store_unavailable", "{}", r.body);
        refused.push(n);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store never healed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every 202 is there, in order; nothing that got a 503 is.
    let mut d = gw.connect("full").await;
    let mut got = Vec::new();
    for _ in 0..accepted.len() {
        let m = d.recv().await;
        got.push((
            m["data"]["n"].as_u64().unwrap(),
            m["id"].as_str().unwrap().to_string(),
        ));
    }
    assert_eq!(got, accepted);
    d.expect_silence(Duration::from_millis(300)).await;
    eprintln!(
        "full disk: {} pushes accepted and delivered, {} refused with 503 store_unavailable \
         (first at push {}), none of them delivered",
        accepted.len(),
        refused.len(),
        first_503.unwrap_or_default()
    );
}

#[tokio::test]
async fn batch_on_redb_keeps_request_order_per_device() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let p = Proc::start_in(dir, redb_config(&store));
    let gw = p.gateway();
    let mut live = gw.connect("b0").await;
    // Interleaved targets, a multi-device one, a now-or-never one and a bad
    // one: however the batch is stored, each device's seqs follow request order.
    let mut messages = Vec::new();
    for i in 0..120 {
        messages.push(match i % 10 {
            7 => json!({"to": {"devices": ["b0", "b1", "b2"]}, "data": {"n": i}}),
            8 => json!({"to": {"device": "b1"}, "data": {"n": i}, "ttl": 0}),
            9 => json!({"to": {"device": "b2"}, "data": {"n": i}, "bogus": 1}),
            k => json!({"to": {"device": format!("b{}", k % 3)}, "data": {"n": i}}),
        });
    }
    let r = gw
        .api(
            "POST",
            "/v1/apps/demo/messages/batch",
            Some(json!({ "messages": messages })),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let results = r.json()["results"].as_array().unwrap().clone();
    for (i, res) in results.iter().enumerate() {
        match i % 10 {
            9 => assert_eq!(res["error"]["code"], "invalid", "{res}"),
            _ => assert!(res["id"].is_string(), "{i}: {res}"),
        }
    }
    let expect = |dev: usize| -> Vec<u64> {
        (0..120u64)
            .filter(|i| match i % 10 {
                7 => true,
                8 | 9 => false,
                k => k as usize % 3 == dev,
            })
            .collect()
    };
    // Live, and again from the store after a reconnect.
    let mut got = Vec::new();
    for _ in 0..expect(0).len() {
        let m = live.recv().await;
        got.push((m["seq"].as_u64().unwrap(), m["data"]["n"].as_u64().unwrap()));
    }
    let want: Vec<(u64, u64)> = expect(0)
        .into_iter()
        .zip(1..)
        .map(|(n, s)| (s, n))
        .collect();
    assert_eq!(got, want);
    live.close().await;
    for dev in 0..3 {
        let mut d = gw.connect(&format!("b{dev}")).await;
        let mut got = Vec::new();
        for _ in 0..expect(dev).len() {
            let m = d.recv().await;
            got.push((m["seq"].as_u64().unwrap(), m["data"]["n"].as_u64().unwrap()));
        }
        let want: Vec<(u64, u64)> = expect(dev)
            .into_iter()
            .zip(1..)
            .map(|(n, s)| (s, n))
            .collect();
        assert_eq!(got, want, "b{dev}");
        d.expect_silence(Duration::from_millis(100)).await;
    }
}
