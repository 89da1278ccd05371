//! One simulated device: connect (bind, TCP, TLS, upgrade, `hello`, `sub`),
//! then read frames, ack device messages, check seq order, loss and
//! duplicates, and reconnect after a storm or a gateway close.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use rand::Rng;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::net::{self, Stream};
use crate::token::Signer;
use crate::wire::{new_hist, topic_name, Kind, Progress, WorkerConfig, WorkerReport, BACKLOG_TAG};

type Ws = WebSocketStream<Stream>;

/// Latency histograms are sharded so that 15k connections receiving the
/// same broadcast do not all queue on one lock.
const SHARDS: usize = 8;
/// Upper bound on reconnects of one device in one run (every loop bounded).
const MAX_RECONNECTS: u32 = 10_000;
/// Message numbers above this are not tracked for duplicates (bitset size).
const MAX_TRACKED_K: u64 = 1 << 24;

/// What the coordinator wants, as seen by every connection task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Control {
    pub finish: bool,
    pub storm_round: u32,
}

/// State shared by the connection tasks of one worker.
pub struct Shared {
    pub cfg: WorkerConfig,
    signer: Signer,
    tls: Option<(TlsConnector, rustls::pki_types::ServerName<'static>)>,
    ws_config: WebSocketConfig,
    pub permits: Arc<Semaphore>,
    up: AtomicU64,
    peak_up: AtomicU64,
    attempts: AtomicU64,
    established: AtomicU64,
    failed: AtomicU64,
    reconnected: AtomicU64,
    reconnect_failed: AtomicU64,
    gave_up: AtomicU64,
    closed: AtomicU64,
    delivered: [AtomicU64; 3],
    first_rx_us: AtomicU64,
    last_rx_us: AtomicU64,
    backlog_rx: AtomicU64,
    backlog_last_us: AtomicU64,
    dropped_rx: AtomicU64,
    /// Initial connects not yet finished.
    pub ramp_pending: AtomicU64,
    /// The ramp has spawned every task it will.
    pub ramp_spawned: AtomicBool,
    pub ramp_start_us: AtomicU64,
    ramp_end_us: AtomicU64,
    failed_by: Mutex<BTreeMap<String, u64>>,
    reconnect_failed_by: Mutex<BTreeMap<String, u64>>,
    closed_by: Mutex<BTreeMap<String, u64>>,
    handshake: Mutex<Histogram<u64>>,
    latency: Vec<Mutex<[Histogram<u64>; 3]>>,
    agg: Mutex<Agg>,
}

/// Per-device results merged when a device task ends.
#[derive(Default)]
struct Agg {
    per_k: [Vec<u64>; 2],
    device_received: Vec<u64>,
    duplicates: [u64; 3],
    out_of_order: u64,
    missing_seq: u64,
    foreign: u64,
    dropped: u64,
    acks: u64,
    error_frames: BTreeMap<String, u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking task cannot leave these counters half-updated in a way
    // that matters; keep counting.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn bump(map: &Mutex<BTreeMap<String, u64>>, key: &str) {
    *lock(map).entry(key.to_string()).or_insert(0) += 1;
}

impl Shared {
    pub fn new(cfg: WorkerConfig) -> anyhow::Result<Shared> {
        let tls = if cfg.tls {
            Some((net::insecure_tls()?, net::server_name(&cfg.host)?))
        } else {
            None
        };
        // Small buffers: the client holds up to ~15k connections per process
        // and reads small frames; tungstenite's defaults are 128 KiB each.
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0)
            .max_message_size(Some(1 << 20))
            .max_frame_size(Some(1 << 20));
        Ok(Shared {
            signer: Signer::new(&cfg.app, &cfg.secret, cfg.token_ttl),
            tls,
            ws_config,
            permits: Arc::new(Semaphore::new(cfg.concurrency.max(1))),
            up: AtomicU64::new(0),
            peak_up: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            established: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            reconnected: AtomicU64::new(0),
            reconnect_failed: AtomicU64::new(0),
            gave_up: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            delivered: Default::default(),
            first_rx_us: AtomicU64::new(u64::MAX),
            last_rx_us: AtomicU64::new(0),
            backlog_rx: AtomicU64::new(0),
            backlog_last_us: AtomicU64::new(0),
            dropped_rx: AtomicU64::new(0),
            ramp_pending: AtomicU64::new(cfg.count),
            ramp_spawned: AtomicBool::new(false),
            ramp_start_us: AtomicU64::new(0),
            ramp_end_us: AtomicU64::new(0),
            failed_by: Mutex::default(),
            reconnect_failed_by: Mutex::default(),
            closed_by: Mutex::default(),
            handshake: Mutex::new(new_hist()),
            latency: (0..SHARDS)
                .map(|_| Mutex::new([new_hist(), new_hist(), new_hist()]))
                .collect(),
            agg: Mutex::default(),
            cfg,
        })
    }

    pub fn progress(&self) -> Progress {
        let first = self.first_rx_us.load(Ordering::Relaxed);
        Progress {
            worker: self.cfg.worker,
            up: self.up.load(Ordering::Relaxed),
            peak_up: self.peak_up.load(Ordering::Relaxed),
            attempts: self.attempts.load(Ordering::Relaxed),
            established: self.established.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            reconnected: self.reconnected.load(Ordering::Relaxed),
            reconnect_failed: self.reconnect_failed.load(Ordering::Relaxed),
            gave_up: self.gave_up.load(Ordering::Relaxed),
            closed: self.closed.load(Ordering::Relaxed),
            delivered: [
                self.delivered[0].load(Ordering::Relaxed),
                self.delivered[1].load(Ordering::Relaxed),
                self.delivered[2].load(Ordering::Relaxed),
            ],
            ramp_done: self.ramp_spawned.load(Ordering::Acquire)
                && self.ramp_pending.load(Ordering::Acquire) == 0,
            first_rx_us: if first == u64::MAX { 0 } else { first },
            last_rx_us: self.last_rx_us.load(Ordering::Relaxed),
            cpu_ms: crate::procstat::self_cpu_ms(),
            ramp_start_us: self.ramp_start_us.load(Ordering::Relaxed),
            ramp_end_us: self.ramp_end_us.load(Ordering::Relaxed),
            backlog_rx: self.backlog_rx.load(Ordering::Relaxed),
            backlog_last_us: self.backlog_last_us.load(Ordering::Relaxed),
            dropped: self.dropped_rx.load(Ordering::Relaxed),
        }
    }

    /// The final account; tasks still running contribute what they merged.
    pub fn report(&self) -> WorkerReport {
        let mut lat = [new_hist(), new_hist(), new_hist()];
        for shard in &self.latency {
            let s = lock(shard);
            for i in 0..3 {
                // Same bounds everywhere, so adding cannot fail.
                let _ = lat[i].add(&s[i]);
            }
        }
        let mut agg = lock(&self.agg);
        let mut device_received = std::mem::take(&mut agg.device_received);
        device_received.sort_unstable();
        device_received.dedup();
        let own = crate::procstat::read("self").unwrap_or_default();
        WorkerReport {
            progress: self.progress(),
            failed_by: lock(&self.failed_by).clone(),
            reconnect_failed_by: lock(&self.reconnect_failed_by).clone(),
            closed_by: lock(&self.closed_by).clone(),
            handshake_us: crate::wire::hist_to_pairs(&lock(&self.handshake)),
            latency_us: [
                crate::wire::hist_to_pairs(&lat[0]),
                crate::wire::hist_to_pairs(&lat[1]),
                crate::wire::hist_to_pairs(&lat[2]),
            ],
            per_k: std::mem::take(&mut agg.per_k),
            device_received,
            duplicates: agg.duplicates,
            out_of_order: agg.out_of_order,
            missing_seq: agg.missing_seq,
            foreign: agg.foreign,
            dropped: agg.dropped,
            error_frames: agg.error_frames.clone(),
            acks: agg.acks,
            cpu_ms: own.cpu_ms,
            max_rss_bytes: own.hwm_bytes.max(own.rss_bytes),
        }
    }

    fn inc_up(&self) {
        let now = self.up.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_up.fetch_max(now, Ordering::Relaxed);
    }
}

/// Why a connect attempt failed, and when the gateway asked us to retry.
#[derive(Debug)]
struct Fail {
    reason: String,
    retry_after: Option<Duration>,
}

impl Fail {
    fn new(reason: impl Into<String>) -> Fail {
        Fail {
            reason: reason.into(),
            retry_after: None,
        }
    }
}

/// A short, stable label for an I/O error.
pub fn io_reason(e: &io::Error) -> String {
    use io::ErrorKind::*;
    if e.get_ref()
        .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
    {
        return "tls".into();
    }
    match e.kind() {
        ConnectionRefused => "refused".into(),
        ConnectionReset => "reset".into(),
        ConnectionAborted => "aborted".into(),
        TimedOut => "timeout".into(),
        AddrNotAvailable => "addr_not_available".into(),
        AddrInUse => "addr_in_use".into(),
        UnexpectedEof => "eof".into(),
        BrokenPipe => "broken_pipe".into(),
        kind => match e.raw_os_error() {
            Some(24) => "emfile".into(),
            Some(23) => "enfile".into(),
            Some(n) => format!("errno_{n}"),
            None => format!("io_{kind:?}").to_lowercase(),
        },
    }
}

fn ws_reason(e: &WsError) -> String {
    match e {
        WsError::Io(e) => io_reason(e),
        WsError::ConnectionClosed | WsError::AlreadyClosed => "closed".into(),
        WsError::Protocol(p) => {
            use tokio_tungstenite::tungstenite::error::ProtocolError as P;
            match p {
                P::ResetWithoutClosingHandshake => "reset".into(),
                _ => "ws_protocol".into(),
            }
        }
        WsError::Capacity(_) => "ws_capacity".into(),
        WsError::Http(r) => format!("http_{}", r.status().as_u16()),
        _ => "ws_other".into(),
    }
}

fn ws_fail(e: WsError) -> Fail {
    if let WsError::Http(resp) = &e {
        let status = resp.status().as_u16();
        let code = resp
            .body()
            .as_deref()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
            .and_then(|v| v.get("error").and_then(|c| c.as_str()).map(str::to_string));
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let reason = match code {
            Some(c)
                if c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') && c.len() <= 40 =>
            {
                format!("http_{status}_{c}")
            }
            _ => format!("http_{status}"),
        };
        return Fail {
            reason,
            retry_after,
        };
    }
    Fail::new(ws_reason(&e))
}

/// The frames the gateway sends; unknown fields are ignored. Borrowed from
/// the frame text: a broadcast to 15k devices is parsed 15k times here.
#[derive(Debug, Deserialize)]
struct InFrame<'a> {
    #[serde(borrow)]
    t: Cow<'a, str>,
    #[serde(default, borrow)]
    device: Option<Cow<'a, str>>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default, borrow)]
    topic: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    count: Option<u64>,
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    reason: Option<Cow<'a, str>>,
    #[serde(default)]
    retry_ms: Option<u64>,
}

/// The receiving side of [`crate::wire::Payload`] (padding skipped).
#[derive(Debug, Deserialize)]
struct RxPayload<'a> {
    ts_us: u64,
    #[serde(borrow)]
    run: Cow<'a, str>,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    k: u64,
}

/// A growable bitset of message numbers.
#[derive(Default)]
struct Bits(Vec<u64>);

impl Bits {
    /// Sets bit `k`; true if it was already set.
    fn test_and_set(&mut self, k: u64) -> bool {
        if k >= MAX_TRACKED_K {
            return false;
        }
        let (w, b) = ((k / 64) as usize, k % 64);
        if self.0.len() <= w {
            self.0.resize(w + 1, 0);
        }
        let was = self.0[w] & (1 << b) != 0;
        self.0[w] |= 1 << b;
        was
    }

    fn ones(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &word)| {
            (0..64u64)
                .filter(move |b| word & (1 << b) != 0)
                .map(move |b| w as u64 * 64 + b)
        })
    }
}

/// What one device remembers across its connections.
#[derive(Default)]
struct DevState {
    /// Broadcast and topic message numbers received.
    bits: [Bits; 2],
    /// Device message numbers received.
    seen: HashSet<u64>,
    duplicates: [u64; 3],
    out_of_order: u64,
    missing_seq: u64,
    foreign: u64,
    dropped: u64,
    acks: u64,
    error_frames: BTreeMap<String, u64>,
}

enum End {
    Finish,
    Storm,
    Closed {
        reason: String,
        retry_ms: Option<u64>,
    },
}

/// Identity of one device task.
pub struct Device {
    n: u64,
    id: String,
    topic: Option<String>,
    source: Option<IpAddr>,
}

impl Device {
    pub fn new(cfg: &WorkerConfig, n: u64) -> Device {
        let global = cfg.first_index + n;
        let source = if cfg.sources.is_empty() {
            None
        } else {
            Some(cfg.sources[(global % cfg.sources.len() as u64) as usize])
        };
        Device {
            n,
            id: cfg.device_id(n),
            topic: (cfg.topics > 0)
                .then(|| topic_name(&cfg.device_prefix, global % u64::from(cfg.topics))),
            source,
        }
    }
}

/// Waits until `ctl` says finish (or its sender is gone).
async fn finished(ctl: &mut watch::Receiver<Control>) {
    // Bounded by the coordinator's deadline: it always ends with Finish or
    // by closing our stdin, which drops the sender.
    while !ctl.borrow_and_update().finish {
        if ctl.changed().await.is_err() {
            return;
        }
    }
}

/// Sleeps `d` unless finish comes first; true if finish came.
async fn sleep_or_finish(d: Duration, ctl: &mut watch::Receiver<Control>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => ctl.borrow().finish,
        _ = finished(ctl) => true,
    }
}

fn backoff(attempt: u32, retry_after: Option<Duration>) -> Duration {
    let mut rng = rand::rng();
    if let Some(d) = retry_after {
        return d.min(Duration::from_secs(10)) + Duration::from_millis(rng.random_range(0..500));
    }
    let base = 100u64 << attempt.min(5);
    Duration::from_millis(rng.random_range(base / 2..=base))
}

/// Runs one device for the whole run. `permit` is the ramp's handshake slot.
pub async fn run(
    sh: Arc<Shared>,
    dev: Device,
    permit: OwnedSemaphorePermit,
    mut ctl: watch::Receiver<Control>,
) {
    let mut st = DevState::default();
    let mut ws = initial_connect(&sh, &dev, permit, &mut ctl).await;
    sh.ramp_end_us.fetch_max(crate::now_us(), Ordering::Relaxed);
    sh.ramp_pending.fetch_sub(1, Ordering::AcqRel);
    let mut reconnects = 0u32;
    while let Some(mut conn) = ws.take() {
        sh.inc_up();
        let end = session(&sh, &dev, &mut conn, &mut st, &mut ctl).await;
        sh.up.fetch_sub(1, Ordering::Relaxed);
        let mut wait = Duration::ZERO;
        match end {
            End::Finish => {
                // Polite close so the gateway frees the connection at once;
                // bounded, since thousands close together.
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(None)).await;
                break;
            }
            End::Storm => drop(conn),
            End::Closed { reason, retry_ms } => {
                sh.closed.fetch_add(1, Ordering::Relaxed);
                bump(&sh.closed_by, &reason);
                drop(conn);
                if !sh.cfg.reconnect {
                    break;
                }
                // retry_ms from `bye`, else a little jitter so a mass close
                // does not come back as one wave.
                wait = Duration::from_millis(
                    retry_ms.unwrap_or_else(|| rand::rng().random_range(0..1000)),
                );
            }
        }
        if wait > Duration::ZERO && sleep_or_finish(wait, &mut ctl).await {
            break;
        }
        if reconnects >= MAX_RECONNECTS {
            sh.gave_up.fetch_add(1, Ordering::Relaxed);
            break;
        }
        reconnects += 1;
        ws = reconnect(&sh, &dev, &mut ctl).await;
    }
    merge(&sh, st);
}

async fn acquire(sh: &Shared, ctl: &mut watch::Receiver<Control>) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        p = sh.permits.clone().acquire_owned() => p.ok(),
        _ = finished(ctl) => None,
    }
}

async fn initial_connect(
    sh: &Shared,
    dev: &Device,
    permit: OwnedSemaphorePermit,
    ctl: &mut watch::Receiver<Control>,
) -> Option<Ws> {
    let mut permit = Some(permit);
    let mut attempt = 0u32;
    loop {
        if ctl.borrow().finish {
            return None;
        }
        let p = match permit.take() {
            Some(p) => p,
            None => acquire(sh, ctl).await?,
        };
        sh.attempts.fetch_add(1, Ordering::Relaxed);
        let r = connect(sh, dev).await;
        drop(p);
        match r {
            Ok(ws) => {
                sh.established.fetch_add(1, Ordering::Relaxed);
                return Some(ws);
            }
            Err(f) => {
                bump(&sh.failed_by, &f.reason);
                if attempt >= sh.cfg.retries {
                    sh.failed.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                attempt += 1;
                if sleep_or_finish(backoff(attempt, f.retry_after), ctl).await {
                    sh.failed.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
        }
    }
}

async fn reconnect(sh: &Shared, dev: &Device, ctl: &mut watch::Receiver<Control>) -> Option<Ws> {
    let deadline = Instant::now() + Duration::from_millis(sh.cfg.reconnect_window_ms);
    // Bounded by the deadline and by this count.
    for attempt in 0..MAX_RECONNECTS {
        if ctl.borrow().finish {
            return None;
        }
        let p = acquire(sh, ctl).await?;
        let r = connect(sh, dev).await;
        drop(p);
        match r {
            Ok(ws) => {
                sh.reconnected.fetch_add(1, Ordering::Relaxed);
                return Some(ws);
            }
            Err(f) => {
                sh.reconnect_failed.fetch_add(1, Ordering::Relaxed);
                bump(&sh.reconnect_failed_by, &f.reason);
                let wait = backoff(attempt + 1, f.retry_after);
                if Instant::now() + wait > deadline {
                    break;
                }
                if sleep_or_finish(wait, ctl).await {
                    return None;
                }
            }
        }
    }
    sh.gave_up.fetch_add(1, Ordering::Relaxed);
    None
}

fn request_for(
    sh: &Shared,
    token: &str,
) -> Result<tokio_tungstenite::tungstenite::handshake::client::Request, Fail> {
    let cfg = &sh.cfg;
    let scheme = if cfg.tls { "wss" } else { "ws" };
    let host = if cfg.host.contains(':') {
        format!("[{}]", cfg.host)
    } else {
        cfg.host.clone()
    };
    let mut url = format!("{scheme}://{host}:{}{}", cfg.port, cfg.path);
    if cfg.token_in_query {
        url.push(if cfg.path.contains('?') { '&' } else { '?' });
        url.push_str("token=");
        url.push_str(token);
    }
    let mut req = url
        .into_client_request()
        .map_err(|_| Fail::new("bad_request_url"))?;
    if !cfg.token_in_query {
        let v = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| Fail::new("bad_token"))?;
        req.headers_mut().insert("authorization", v);
    }
    Ok(req)
}

/// One connect attempt, bounded by the connect timeout: TCP (+TLS), upgrade,
/// `hello`, and the topic subscription if any.
async fn connect(sh: &Shared, dev: &Device) -> Result<Ws, Fail> {
    let started = Instant::now();
    let attempt = async {
        let topics: Vec<String> = dev.topic.iter().cloned().collect();
        let token = sh
            .signer
            .token(&dev.id, &topics)
            .map_err(|_| Fail::new("token"))?;
        let req = request_for(sh, &token)?;
        let tls = sh.tls.as_ref().map(|(c, n)| (c, n));
        let stream = net::connect(sh.cfg.addr, dev.source, tls)
            .await
            .map_err(|e| Fail::new(io_reason(&e)))?;
        let (mut ws, _resp) =
            tokio_tungstenite::client_async_with_config(req, stream, Some(sh.ws_config))
                .await
                .map_err(ws_fail)?;
        let hello = next_text(&mut ws, "hello").await?;
        match serde_json::from_str::<InFrame>(&hello) {
            Ok(f) if f.t == "hello" => {
                if f.device.as_deref() != Some(dev.id.as_str()) {
                    return Err(Fail::new("hello_wrong_device"));
                }
            }
            _ => return Err(Fail::new("no_hello")),
        }
        if let Some(topic) = &dev.topic {
            let sub = serde_json::json!({"t": "sub", "topic": topic}).to_string();
            ws.send(Message::text(sub)).await.map_err(ws_fail)?;
            // Broadcasts may arrive before the answer; only the answer matters
            // here (the scenario's messages are sent after the ramp).
            loop {
                let text = next_text(&mut ws, "subscribed").await?;
                match serde_json::from_str::<InFrame>(&text) {
                    Ok(f) if f.t == "subscribed" && f.topic.as_deref() == Some(topic.as_str()) => {
                        break
                    }
                    Ok(f) if f.t == "error" => {
                        return Err(Fail::new(format!(
                            "sub_{}",
                            f.code.as_deref().unwrap_or("error")
                        )))
                    }
                    _ => continue,
                }
            }
        }
        Ok(ws)
    };
    let timeout = Duration::from_millis(sh.cfg.connect_timeout_ms);
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(ws)) => {
            let us = started.elapsed().as_micros() as u64;
            lock(&sh.handshake).saturating_record(us.max(1));
            Ok(ws)
        }
        Ok(Err(f)) => Err(f),
        Err(_) => Err(Fail::new("timeout")),
    }
}

/// The next text frame during the handshake phase.
async fn next_text(ws: &mut Ws, waiting_for: &str) -> Result<String, Fail> {
    // Bounded by the caller's connect timeout.
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_string()),
            Some(Ok(Message::Close(f))) => {
                return Err(Fail::new(match f {
                    Some(f) => format!("closed_before_{waiting_for}_{}", u16::from(f.code)),
                    None => format!("closed_before_{waiting_for}"),
                }))
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(ws_fail(e)),
            None => return Err(Fail::new(format!("eof_before_{waiting_for}"))),
        }
    }
}

enum Action {
    None,
    Ack(u64),
    Bye(String, Option<u64>),
}

/// Reads frames until finish, a storm, or the connection ends.
async fn session(
    sh: &Shared,
    dev: &Device,
    ws: &mut Ws,
    st: &mut DevState,
    ctl: &mut watch::Receiver<Control>,
) -> End {
    let round = ctl.borrow().storm_round;
    let mut last_seq = 0u64;
    let mut bye: Option<(String, Option<u64>)> = None;
    // Bounded by the gateway closing, or by Finish from the coordinator.
    loop {
        let c = *ctl.borrow_and_update();
        if c.finish {
            return End::Finish;
        }
        if c.storm_round != round {
            return End::Storm;
        }
        tokio::select! {
            r = ctl.changed() => {
                if r.is_err() {
                    return End::Finish;
                }
            }
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    match on_text(sh, dev, st, &mut last_seq, t.as_str()) {
                        Action::None => {}
                        Action::Ack(seq) => {
                            let ack = format!(r#"{{"t":"ack","seq":{seq}}}"#);
                            if let Err(e) = ws.send(Message::text(ack)).await {
                                return closed(bye, ws_reason(&e));
                            }
                            st.acks += 1;
                        }
                        Action::Bye(reason, retry_ms) => bye = Some((reason, retry_ms)),
                    }
                }
                Some(Ok(Message::Close(f))) => {
                    // Let tungstenite send its close reply, briefly.
                    let _ = tokio::time::timeout(Duration::from_millis(500), ws.next()).await;
                    let code = f.map(|f| format!("close_{}", u16::from(f.code)));
                    return closed(bye, code.unwrap_or_else(|| "close".into()));
                }
                Some(Ok(Message::Binary(_))) => {
                    *st.error_frames.entry("binary_from_gateway".into()).or_insert(0) += 1;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return closed(bye, ws_reason(&e)),
                None => return closed(bye, "eof".into()),
            }
        }
    }
}

fn closed(bye: Option<(String, Option<u64>)>, how: String) -> End {
    match bye {
        Some((reason, retry_ms)) => End::Closed {
            reason: format!("bye_{reason}"),
            retry_ms,
        },
        None => End::Closed {
            reason: how,
            retry_ms: None,
        },
    }
}

fn on_text(sh: &Shared, dev: &Device, st: &mut DevState, last_seq: &mut u64, text: &str) -> Action {
    let frame: InFrame = match serde_json::from_str(text) {
        Ok(f) => f,
        Err(_) => {
            *st.error_frames
                .entry("unparsable_frame".into())
                .or_insert(0) += 1;
            return Action::None;
        }
    };
    match frame.t.as_ref() {
        "msg" => on_msg(sh, dev, st, last_seq, frame),
        "dropped" => {
            st.dropped += frame.count.unwrap_or(0);
            sh.dropped_rx
                .fetch_add(frame.count.unwrap_or(0), Ordering::Relaxed);
            Action::None
        }
        "error" => {
            let code = frame.code.as_deref().unwrap_or("none");
            *st.error_frames.entry(format!("error_{code}")).or_insert(0) += 1;
            Action::None
        }
        "bye" => Action::Bye(
            frame.reason.map_or_else(|| "none".into(), Cow::into_owned),
            frame.retry_ms,
        ),
        "subscribed" | "unsubscribed" => Action::None,
        "hello" => {
            *st.error_frames.entry("second_hello".into()).or_insert(0) += 1;
            Action::None
        }
        _ => {
            *st.error_frames.entry("unknown_frame".into()).or_insert(0) += 1;
            Action::None
        }
    }
}

fn on_msg(
    sh: &Shared,
    dev: &Device,
    st: &mut DevState,
    last_seq: &mut u64,
    frame: InFrame<'_>,
) -> Action {
    let now = crate::now_us();
    let ack = frame.seq.map(Action::Ack).unwrap_or(Action::None);
    let payload = frame
        .data
        .and_then(|d| serde_json::from_str::<RxPayload<'_>>(d.get()).ok())
        .filter(|p| p.run == sh.cfg.run_id);
    if payload.as_ref().is_some_and(|p| p.kind == BACKLOG_TAG) {
        // Stored before the device connected (scenario redeliver): counted
        // apart, so the pushes' figures stay those of the live ones.
        sh.backlog_rx.fetch_add(1, Ordering::Relaxed);
        sh.backlog_last_us.fetch_max(now, Ordering::Relaxed);
        return ack;
    }
    let Some((p, kind)) = payload.and_then(|p| Kind::from_tag(&p.kind).map(|k| (p, k))) else {
        st.foreign += 1;
        return ack;
    };
    sh.delivered[kind.idx()].fetch_add(1, Ordering::Relaxed);
    sh.first_rx_us.fetch_min(now, Ordering::Relaxed);
    sh.last_rx_us.fetch_max(now, Ordering::Relaxed);
    let lat = now.saturating_sub(p.ts_us).max(1);
    lock(&sh.latency[dev.n as usize % SHARDS])[kind.idx()].saturating_record(lat);
    let shape_ok = match kind {
        Kind::Broadcast => frame.seq.is_none() && frame.topic.is_none(),
        Kind::Topic => {
            frame.seq.is_none()
                && frame.topic.is_some()
                && frame.topic.as_deref() == dev.topic.as_deref()
        }
        Kind::Device => frame.topic.is_none(),
    };
    if !shape_ok {
        *st.error_frames
            .entry(format!("{}_frame_wrong_shape", kind.name()))
            .or_insert(0) += 1;
    }
    match kind {
        Kind::Broadcast | Kind::Topic => {
            if st.bits[kind.idx()].test_and_set(p.k) {
                st.duplicates[kind.idx()] += 1;
            }
        }
        Kind::Device => {
            if !st.seen.insert(p.k) {
                st.duplicates[kind.idx()] += 1;
            } else if let Some(seq) = frame.seq {
                if seq <= *last_seq {
                    st.out_of_order += 1;
                }
            } else {
                st.missing_seq += 1;
            }
            if let Some(seq) = frame.seq {
                *last_seq = (*last_seq).max(seq);
            }
        }
    }
    ack
}

fn merge(sh: &Shared, st: DevState) {
    let mut agg = lock(&sh.agg);
    for i in 0..2 {
        for k in st.bits[i].ones() {
            let v = &mut agg.per_k[i];
            if v.len() <= k as usize {
                v.resize(k as usize + 1, 0);
            }
            v[k as usize] += 1;
        }
    }
    agg.device_received.extend(st.seen);
    for i in 0..3 {
        agg.duplicates[i] += st.duplicates[i];
    }
    agg.out_of_order += st.out_of_order;
    agg.missing_seq += st.missing_seq;
    agg.foreign += st.foreign;
    agg.dropped += st.dropped;
    agg.acks += st.acks;
    for (k, v) in st.error_frames {
        *agg.error_frames.entry(k).or_insert(0) += v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_track_duplicates() {
        let mut b = Bits::default();
        assert!(!b.test_and_set(3));
        assert!(b.test_and_set(3));
        assert!(!b.test_and_set(130));
        assert!(!b.test_and_set(MAX_TRACKED_K));
        assert!(!b.test_and_set(MAX_TRACKED_K));
        assert_eq!(b.ones().collect::<Vec<_>>(), vec![3, 130]);
    }

    #[test]
    fn io_reasons_are_stable() {
        let e = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(io_reason(&e), "refused");
        assert_eq!(io_reason(&io::Error::from_raw_os_error(24)), "emfile");
    }

    #[test]
    fn backoff_is_bounded() {
        for a in 0..40 {
            assert!(backoff(a, None) <= Duration::from_millis(3200));
        }
        assert!(backoff(1, Some(Duration::from_secs(100))) <= Duration::from_millis(10_500));
    }
}
