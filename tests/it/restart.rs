//! Restart without dropping the fleet, over real processes: devices stay
//! connected and are pushed to without pause while the gateway is handed
//! over to a new process several times (`serve --takeover`, and SIGHUP).
//! Afterwards every message that got a 202 has arrived (at least once, in
//! seq order), no API call failed or was refused, no device connection was
//! refused, every device is connected again, and the reconnects were spread
//! over the drain window.
//!
//! `cargo test --test it restart -- --nocapture` prints the figures.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::process::Proc;
use crate::support::*;

const DEVICES: usize = 40;
/// Each pusher owns devices p, p + PUSHERS, …: a device's pushes are
/// sequential, so their order is known.
const PUSHERS: usize = 4;
const ROUNDS: usize = 3;
const DRAIN_SECS: u64 = 2;

/// Base config on the redb store in `dir`, a short drain window, and a
/// pending limit that never discards.
fn write_config(dir: &Path) -> std::path::PathBuf {
    let store = dir.join("store").display().to_string();
    let toml = base_toml()
        .replace("[store]", "[messages]\nmax_pending = 1000000\n\n[store]")
        .replace(
            "kind = \"memory\"",
            &format!("kind = \"redb\"\npath = \"{store}\""),
        )
        .replace("drain_secs = 1", &format!("drain_secs = {DRAIN_SECS}"));
    let path = dir.join("pushgate.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// An HTTP/1.1 client that keeps its connection open, as backends do, and
/// opens a new one only when the server says `Connection: close`.
struct KeepAlive {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
    /// Connections opened.
    opened: u64,
}

impl KeepAlive {
    fn new(addr: SocketAddr) -> Self {
        KeepAlive {
            addr,
            conn: None,
            opened: 0,
        }
    }

    async fn post(&mut self, path: &str, body: &str) -> std::io::Result<(u16, Value)> {
        if self.conn.is_none() {
            self.conn = Some(BufReader::new(TcpStream::connect(self.addr).await?));
            self.opened += 1;
        }
        let result = self.exchange(path, body).await;
        if !matches!(result, Ok((_, _, true))) {
            self.conn = None;
        }
        result.map(|(status, body, _)| (status, body))
    }

    /// Status, JSON body, and whether the connection stays open.
    async fn exchange(&mut self, path: &str, body: &str) -> std::io::Result<(u16, Value, bool)> {
        let addr = self.addr;
        let conn = self.conn.as_mut().unwrap();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.get_mut().write_all(req.as_bytes()).await?;
        let mut status = 0;
        let mut length = 0;
        let mut keep = true;
        let mut line = String::new();
        loop {
            line.clear();
            if conn.read_line(&mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if status == 0 {
                status = l
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
            } else if let Some((name, value)) = l.split_once(':') {
                let (name, value) = (name.to_ascii_lowercase(), value.trim());
                if name == "content-length" {
                    length = value.parse().unwrap_or(0);
                } else if name == "connection" && value.eq_ignore_ascii_case("close") {
                    keep = false;
                }
            }
        }
        let mut body = vec![0u8; length];
        conn.read_exact(&mut body).await?;
        let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok((status, body, keep))
    }
}

/// What the pushers saw.
#[derive(Default)]
struct Pushed {
    /// (device, n, id) of every 202.
    accepted: Vec<(usize, u64, String)>,
    /// Calls that got no answer (connection error) or another status.
    failures: Vec<String>,
    latencies_ms: Vec<f64>,
    connections: u64,
}

async fn pusher(api: SocketAddr, p: usize, stop: Arc<AtomicBool>, next: Arc<AtomicU64>) -> Pushed {
    let mine: Vec<usize> = (p..DEVICES).step_by(PUSHERS).collect();
    let mut client = KeepAlive::new(api);
    let mut out = Pushed::default();
    let mut k = 0;
    while !stop.load(Ordering::SeqCst) {
        let device = mine[k % mine.len()];
        k += 1;
        let n = next.fetch_add(1, Ordering::SeqCst);
        let body = json!({"to": {"device": format!("r{device}")}, "data": {"n": n}}).to_string();
        let started = Instant::now();
        match client.post("/v1/apps/demo/messages", &body).await {
            Ok((202, v)) => {
                out.latencies_ms
                    .push(started.elapsed().as_secs_f64() * 1000.0);
                out.accepted
                    .push((device, n, v["id"].as_str().unwrap().to_string()));
            }
            Ok((status, v)) => out.failures.push(format!("n {n}: {status} {v}")),
            Err(e) => out.failures.push(format!("n {n}: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    out.connections = client.opened;
    out
}

/// What one device saw.
#[derive(Default)]
struct DeviceLog {
    /// (connection number, seq, id, n) of every `msg`, in arrival order.
    msgs: Vec<(u32, u64, String, u64)>,
    /// When each `bye draining` came, since the test's epoch.
    byes: Vec<Duration>,
    /// Connection attempts that failed.
    refused: Vec<String>,
    connections: u32,
}

/// Connects, acks everything, and after a `bye` reconnects after its
/// `retry_ms`, until `stop`. Ids received go to `received` as they come.
async fn device(
    addr: SocketAddr,
    i: usize,
    epoch: Instant,
    stop: Arc<AtomicBool>,
    received: Arc<Mutex<HashSet<String>>>,
) -> DeviceLog {
    let url = format!(
        "ws://{addr}/v1/connect?token={}",
        token(&format!("r{i}"), &[])
    );
    let mut log = DeviceLog::default();
    while !stop.load(Ordering::SeqCst) {
        let ws = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url.as_str())).await;
        let mut ws = match ws {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(e)) => {
                log.refused.push(e.to_string());
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(_) => {
                log.refused.push("no upgrade in time".into());
                continue;
            }
        };
        log.connections += 1;
        let mut retry = Duration::ZERO;
        loop {
            let next = tokio::time::timeout(Duration::from_millis(200), ws.next()).await;
            let frame = match next {
                Err(_) if stop.load(Ordering::SeqCst) => return log,
                Err(_) => continue,
                Ok(Some(Ok(Message::Text(t)))) => t,
                Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) => break,
                Ok(Some(Ok(_))) => continue,
            };
            let v: Value = serde_json::from_str(&frame).unwrap();
            match v["t"].as_str() {
                Some("msg") => {
                    let seq = v["seq"].as_u64().unwrap();
                    let id = v["id"].as_str().unwrap().to_string();
                    let n = v["data"]["n"].as_u64().unwrap();
                    log.msgs.push((log.connections, seq, id.clone(), n));
                    received.lock().unwrap().insert(id);
                    let ack = json!({"t": "ack", "seq": seq}).to_string();
                    if ws.send(Message::Text(ack.into())).await.is_err() {
                        break;
                    }
                }
                Some("bye") => {
                    assert_eq!(v["reason"], "draining", "{v}");
                    log.byes.push(epoch.elapsed());
                    retry = Duration::from_millis(v["retry_ms"].as_u64().unwrap());
                }
                Some("hello") | Some("dropped") => {}
                _ => panic!("unexpected frame {v}"),
            }
        }
        tokio::time::sleep(retry).await;
    }
    log
}

/// Open device connections, as the gateway's metrics count them.
async fn connected(api: SocketAddr) -> f64 {
    let body = http(api, "GET", "/metrics", None, None, "").await.body;
    metric(&body, "pushgate_connections{app=\"demo\"}")
}

async fn until_connected(api: SocketAddr, n: usize) {
    // Reconnects wait up to 5 s of retry_ms after a drain window.
    let deadline = Instant::now() + WAIT + Duration::from_secs(DRAIN_SECS);
    while connected(api).await < n as f64 {
        assert!(Instant::now() < deadline, "devices did not all come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeovers_under_load_lose_nothing_and_refuse_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let mut gw = Proc::spawn_config(&config, &[], tempfile::tempdir().unwrap());
    let (device_addr, api) = (gw.device, gw.api);
    let epoch = Instant::now();

    let stop_devices = Arc::new(AtomicBool::new(false));
    let received = Arc::new(Mutex::new(HashSet::new()));
    let devices: Vec<_> = (0..DEVICES)
        .map(|i| {
            tokio::spawn(device(
                device_addr,
                i,
                epoch,
                stop_devices.clone(),
                received.clone(),
            ))
        })
        .collect();
    until_connected(api, DEVICES).await;

    let stop_pushing = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let pushers: Vec<_> = (0..PUSHERS)
        .map(|p| tokio::spawn(pusher(api, p, stop_pushing.clone(), next.clone())))
        .collect();

    // Each round: a new process takes over; the old one drains and exits 0.
    let mut windows = Vec::new();
    for round in 0..ROUNDS {
        until_connected(api, DEVICES).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = epoch.elapsed();
        let new = Proc::spawn_config(&config, &["--takeover"], tempfile::tempdir().unwrap());
        assert_eq!((new.device, new.api), (device_addr, api), "round {round}");
        assert_eq!(
            gw.wait(),
            0,
            "round {round}: the old process exits 0 after its drain"
        );
        let lines = gw.log_lines().join("\n");
        assert!(lines.contains("handed over"), "round {round}:\n{lines}");
        windows.push((started, epoch.elapsed()));
        gw = new;
    }
    until_connected(api, DEVICES).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_pushing.store(true, Ordering::SeqCst);
    let mut pushed = Pushed::default();
    for p in pushers {
        let p = p.await.unwrap();
        pushed.accepted.extend(p.accepted);
        pushed.failures.extend(p.failures);
        pushed.latencies_ms.extend(p.latencies_ms);
        pushed.connections += p.connections;
    }

    // Every 202 arrives (bounded wait), then the devices stop.
    let wanted: HashSet<String> = pushed
        .accepted
        .iter()
        .map(|(_, _, id)| id.clone())
        .collect();
    let deadline = Instant::now() + WAIT;
    loop {
        let missing = wanted.difference(&received.lock().unwrap()).count();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} accepted messages never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        connected(api).await,
        DEVICES as f64,
        "every device is connected again"
    );
    stop_devices.store(true, Ordering::SeqCst);
    let mut logs = Vec::new();
    for d in devices {
        logs.push(d.await.unwrap());
    }
    gw.signal("-TERM");
    assert_eq!(gw.wait(), 0);

    assert!(
        pushed.failures.is_empty(),
        "API calls failed: {:?}",
        pushed.failures
    );
    let refused: Vec<&String> = logs.iter().flat_map(|l| &l.refused).collect();
    assert!(
        refused.is_empty(),
        "device connections refused: {refused:?}"
    );

    // Order and no reuse: per device, one id per seq, seqs rising within a
    // connection, and seq order is push order.
    let mut checked = 0;
    let mut duplicates = 0;
    for (i, log) in logs.iter().enumerate() {
        let mut by_seq: HashMap<u64, (&str, u64)> = HashMap::new();
        let mut last: Option<(u32, u64)> = None;
        for (conn, seq, id, n) in &log.msgs {
            if let Some(&(other, other_n)) = by_seq.get(seq) {
                assert_eq!(
                    (other, other_n),
                    (id.as_str(), *n),
                    "device r{i}: seq {seq} reused"
                );
                duplicates += 1;
            }
            by_seq.insert(*seq, (id, *n));
            if let Some((last_conn, last_seq)) = last {
                if last_conn == *conn {
                    assert!(seq > &last_seq, "device r{i}: seq {seq} after {last_seq}");
                }
            }
            last = Some((*conn, *seq));
        }
        let mut seqs: Vec<_> = by_seq.into_iter().collect();
        seqs.sort();
        assert!(
            seqs.windows(2).all(|w| w[0].1 .1 < w[1].1 .1),
            "device r{i}: seq order is not push order"
        );
        checked += pushed.accepted.iter().filter(|(d, _, _)| *d == i).count();
    }
    assert_eq!(checked, pushed.accepted.len());

    // The reconnects of each round were spread over the drain window.
    let window = Duration::from_secs(DRAIN_SECS);
    let mut spreads = Vec::new();
    for (round, (from, to)) in windows.iter().enumerate() {
        let byes: Vec<Duration> = logs
            .iter()
            .flat_map(|l| l.byes.iter().copied())
            .filter(|t| t >= from && t <= to)
            .collect();
        assert_eq!(
            byes.len(),
            DEVICES,
            "round {round}: every device told to reconnect once"
        );
        let first = byes.iter().min().unwrap();
        let last = byes.iter().max().unwrap();
        let spread = *last - *first;
        assert!(
            spread >= window / 2,
            "round {round}: reconnects within {spread:?}, not spread over {window:?}"
        );
        spreads.push(spread);
    }

    let mut lat = pushed.latencies_ms.clone();
    lat.sort_by(f64::total_cmp);
    let connections: u32 = logs.iter().map(|l| l.connections).sum();
    println!(
        "restart: {ROUNDS} hand-overs, {DEVICES} devices, {} messages accepted and checked \
         ({duplicates} redelivered twice), 0 API failures over {} API connections, \
         0 refused of {connections} device connections; API p50 {:.1} ms p99 {:.1} ms max {:.1} ms; \
         reconnect spread per round {:?} (window {window:?})",
        pushed.accepted.len(),
        pushed.connections,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(0.0),
        spreads,
    );
}

/// `systemctl reload` sends SIGHUP: the gateway starts its own successor
/// (same binary path and arguments, plus `--takeover`), hands over, drains
/// and exits 0; the successor serves on the same addresses and store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_starts_a_successor_that_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let mut old = Proc::spawn_config(&config, &[], tempfile::tempdir().unwrap());
    let gw = old.gateway();
    let mut d = gw.connect("r1").await;
    let first = gw
        .push(json!({"to": {"device": "r1"}, "data": {"n": 1}}))
        .await;
    let m = d.recv().await;
    assert_eq!(m["id"], first["id"]);
    // Not acked: it must come again from the successor.

    old.signal("-HUP");
    let bye = d.recv().await;
    assert_eq!(
        (bye["t"].as_str(), bye["reason"].as_str()),
        (Some("bye"), Some("draining"))
    );
    assert_eq!(old.wait(), 0, "the old process exits 0 after its drain");
    let lines = old.log_lines();
    let pids: Vec<u32> = lines
        .iter()
        .filter(|l| l.contains("pushgate serving"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("pid="))
                .and_then(|p| p.parse().ok())
        })
        .collect();
    assert_eq!(
        pids.len(),
        1,
        "the successor logged where it serves:\n{}",
        lines.join("\n")
    );
    let successor = pids[0];
    assert_ne!(successor, old.child.id());

    let mut d = gw.connect("r1").await;
    let again = d.recv().await;
    assert_eq!(
        (again["id"].clone(), again["seq"].as_u64()),
        (first["id"].clone(), Some(1))
    );
    d.ack(1).await;
    let second = gw
        .push(json!({"to": {"device": "r1"}, "data": {"n": 2}}))
        .await;
    let m = d.recv().await;
    assert_eq!(
        (m["id"].clone(), m["seq"].as_u64()),
        (second["id"].clone(), Some(2))
    );

    // The successor is nobody's child here: stop it by pid.
    Proc::stop_pid(successor);
}

/// A successor that goes away after the old process released the store (a
/// bad deploy: it crashed opening it) leaves the old one serving: it takes
/// the store back and accepts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_takeover_leaves_the_old_process_serving() {
    use std::io::{BufRead, Write};

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let mut old = Proc::spawn_config(&config, &[], tempfile::tempdir().unwrap());
    let gw = old.gateway();
    let before = gw
        .push(json!({"to": {"device": "r2"}, "data": {"n": 1}}))
        .await;

    let control = dir.path().join("store").join("handoff.sock");
    let stream = std::os::unix::net::UnixStream::connect(&control).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    writer.write_all(b"hello pushgate-handoff 1\n").unwrap();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("listeners"), "{line}");
    writer.write_all(b"take\n").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "released\n");
    // The old process has let go of the store: another can open it now.
    drop(
        pushgate::store::redb::RedbStore::open(
            &dir.path().join("store"),
            pushgate::store::redb::Tuning::batch(64, 0),
        )
        .unwrap(),
    );
    drop((reader, writer));

    // Calls made meanwhile wait in the backlog; then the old one serves again.
    let after = gw
        .push(json!({"to": {"device": "r2"}, "data": {"n": 2}}))
        .await;
    let mut d = gw.connect("r2").await;
    assert_eq!(d.recv().await["id"], before["id"]);
    assert_eq!(d.recv().await["id"], after["id"]);
    let lines = old.log_lines().join("\n");
    assert!(lines.contains("hand-over abandoned"), "{lines}");
    old.signal("-TERM");
    assert_eq!(old.wait(), 0);
}

/// Topic and broadcast messages are live-only. During the drain after a
/// hand-over, the devices still on the old process get the ones the new
/// process accepts: it relays them over the control connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_still_draining_on_the_old_process_get_new_broadcasts() {
    const N: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    // A long window: device i is told to go at i × 2 s.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &format!("drain_secs = {DRAIN_SECS}"),
        &format!("drain_secs = {}", 2 * N),
    );
    std::fs::write(&config, text).unwrap();
    let mut old = Proc::spawn_config(&config, &[], tempfile::tempdir().unwrap());
    let gw = old.gateway();
    let mut devices = Vec::new();
    for i in 0..N {
        devices.push(gw.connect_token(&token(&format!("b{i}"), &["news"])).await);
    }
    for d in &mut devices {
        d.send(json!({"t": "sub", "topic": "news"})).await;
        assert_eq!(d.recv().await["t"], "subscribed");
    }

    let new = Proc::spawn_config(&config, &["--takeover"], tempfile::tempdir().unwrap());
    let lines = crate::process::lines_until_in(&old, "handed over: the new process serves");
    assert!(!lines.is_empty());
    // Accepted by the new process; none of these devices is on it.
    let broadcast = gw
        .push(json!({"to": {"broadcast": true}, "data": {"b": 1}}))
        .await;
    let topic = gw
        .push(json!({"to": {"topic": "news"}, "data": {"t": 1}}))
        .await;
    assert_eq!(broadcast["online"], 0, "{broadcast}");

    let mut got_both = 0;
    for (i, d) in devices.iter_mut().enumerate() {
        let mut got = Vec::new();
        loop {
            let f = d.recv().await;
            match f["t"].as_str() {
                Some("msg") => got.push(f["id"].clone()),
                Some("bye") => break,
                _ => panic!("device b{i}: unexpected {f}"),
            }
            if got.len() == 2 {
                break;
            }
        }
        if got.len() == 2 {
            assert_eq!(
                got,
                [broadcast["id"].clone(), topic["id"].clone()],
                "device b{i}"
            );
            got_both += 1;
        }
    }
    // The drain closes them in random order: one at once (it may have gone
    // before the messages came), the others 2, 4 and 6 s later, long after.
    assert!(
        got_both >= N - 1,
        "{got_both} of {N} devices got both; old:\n{}\nnew:\n{}",
        old.log_lines().join("\n"),
        new.log_lines().join("\n")
    );
    drop(devices);
    assert_eq!(old.wait(), 0);
    drop(new);
}
