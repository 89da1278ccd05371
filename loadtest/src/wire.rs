//! What the coordinator and its worker processes say to each other: one JSON
//! object per line, config and commands on the worker's stdin, events on its
//! stdout. Also the payload every pushed message carries.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest value the histograms hold: one hour in microseconds; anything
/// slower saturates there (and the run is broken anyway).
pub const HIST_MAX_US: u64 = 3_600_000_000;

/// A histogram of microseconds, 3 significant figures.
pub fn new_hist() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts, so this cannot fail.
    #[allow(clippy::unwrap_used)]
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).unwrap()
}

/// A histogram as (value, count) pairs, for shipping between processes.
pub fn hist_to_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Adds (value, count) pairs into `h`.
pub fn add_pairs(h: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(v, c) in pairs {
        h.saturating_record_n(v.clamp(1, HIST_MAX_US), c);
    }
}

/// Payload `kind` of the messages the redeliver scenario stores before the
/// devices connect (not one of the three kinds: counted apart).
pub const BACKLOG_TAG: &str = "backlog";

/// The three kinds of `msg` frame, told apart by the payload's `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Broadcast,
    Topic,
    Device,
}

impl Kind {
    pub fn idx(self) -> usize {
        match self {
            Kind::Broadcast => 0,
            Kind::Topic => 1,
            Kind::Device => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Broadcast => "broadcast",
            Kind::Topic => "topic",
            Kind::Device => "device",
        }
    }

    pub fn from_tag(tag: &str) -> Option<Kind> {
        match tag {
            "b" => Some(Kind::Broadcast),
            "t" => Some(Kind::Topic),
            "d" => Some(Kind::Device),
            _ => None,
        }
    }

    pub fn tag(self) -> &'static str {
        match self {
            Kind::Broadcast => "b",
            Kind::Topic => "t",
            Kind::Device => "d",
        }
    }
}

/// The `data` of every message the load test pushes. `ts_us` is the send
/// time (unix microseconds, taken just before the API request), so the
/// receipt time minus it is the end-to-end latency; `run` tells this run's
/// messages from leftovers of an earlier one (a redb store redelivers them);
/// `k` numbers the messages of one kind from 0, for loss and duplicates.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Payload {
    pub ts_us: u64,
    pub run: String,
    pub kind: String,
    pub k: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pad: String,
}

/// Everything a worker needs, sent as the first line on its stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerConfig {
    pub worker: u32,
    /// Global index of this worker's first connection (source addresses go
    /// round-robin over the global index).
    pub first_index: u64,
    pub count: u64,
    pub host: String,
    pub port: u16,
    pub path: String,
    pub addr: SocketAddr,
    pub tls: bool,
    pub sources: Vec<IpAddr>,
    /// Connections per second for this worker (0: unlimited).
    pub rate: f64,
    pub concurrency: usize,
    pub connect_timeout_ms: u64,
    pub retries: u32,
    pub app: String,
    pub secret: String,
    pub token_ttl: u64,
    pub token_in_query: bool,
    pub device_prefix: String,
    /// 0: no subscriptions; else device with global index g subscribes to
    /// topic `g % topics`.
    pub topics: u32,
    pub run_id: String,
    /// Reconnect when the gateway closes a connection (storm).
    pub reconnect: bool,
    /// How long reconnect attempts may go on after a drop.
    pub reconnect_window_ms: u64,
    /// The worker finishes by itself this long after starting, whatever the
    /// coordinator does (it normally says `finish` much earlier).
    pub deadline_ms: u64,
}

impl WorkerConfig {
    pub fn device_id(&self, n: u64) -> String {
        device_id(&self.device_prefix, self.worker, n)
    }
}

/// `<prefix>-<worker>-<n>`.
pub fn device_id(prefix: &str, worker: u32, n: u64) -> String {
    format!("{prefix}-{worker}-{n}")
}

/// Name of topic `i` of a run.
pub fn topic_name(prefix: &str, i: u64) -> String {
    format!("{prefix}-topic-{i}")
}

/// Coordinator to worker, after the config line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Cmd {
    /// Start the ramp.
    Connect,
    /// Every connection drops its socket and reconnects at once.
    Storm { round: u32 },
    /// Close everything, send the report, exit.
    Finish,
}

/// Worker to coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    Ready { worker: u32, fd_limit: u64 },
    Progress(Progress),
    Report(Box<WorkerReport>),
    Fatal { worker: u32, message: String },
}

/// Cumulative counters of one worker, sent several times a second.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    pub worker: u32,
    /// Connections that have said `hello` (and are subscribed) and are open now.
    pub up: u64,
    /// Highest `up` seen.
    pub peak_up: u64,
    /// Initial connect attempts started.
    pub attempts: u64,
    /// Initial connects that succeeded.
    pub established: u64,
    /// Initial connects that failed for good.
    pub failed: u64,
    /// Reconnects (after a storm or a gateway close) that succeeded.
    pub reconnected: u64,
    /// Reconnect attempts that failed (and were retried, or not).
    pub reconnect_failed: u64,
    /// Connections that gave up reconnecting.
    pub gave_up: u64,
    /// Open connections closed by the gateway or the network.
    pub closed: u64,
    /// `msg` frames of this run received, by kind.
    pub delivered: [u64; 3],
    /// Every initial connect has finished (up or failed).
    pub ramp_done: bool,
    /// Unix µs of the first and last `msg` of this run received (0: none).
    pub first_rx_us: u64,
    pub last_rx_us: u64,
    /// This worker process's CPU time so far, ms.
    pub cpu_ms: f64,
    /// Unix µs when the ramp started, and when the last initial connect
    /// finished (0: not yet). Progress comes 5 times a second; these make the
    /// ramp time exact anyway.
    pub ramp_start_us: u64,
    pub ramp_end_us: u64,
    /// redeliver: stored-before-connect messages of this run received, and
    /// unix µs of the last one (0: none).
    #[serde(default)]
    pub backlog_rx: u64,
    #[serde(default)]
    pub backlog_last_us: u64,
    /// Sum of the `dropped` counts received so far.
    #[serde(default)]
    pub dropped: u64,
}

impl Progress {
    /// Sums counters over workers (`worker` and flags are not meaningful
    /// in the sum, except `ramp_done`, which is "all done").
    pub fn sum<'a>(items: impl IntoIterator<Item = &'a Progress>) -> Progress {
        let mut s = Progress {
            ramp_done: true,
            ..Progress::default()
        };
        let mut any = false;
        for p in items {
            any = true;
            s.up += p.up;
            s.peak_up += p.peak_up;
            s.attempts += p.attempts;
            s.established += p.established;
            s.failed += p.failed;
            s.reconnected += p.reconnected;
            s.reconnect_failed += p.reconnect_failed;
            s.gave_up += p.gave_up;
            s.closed += p.closed;
            for i in 0..3 {
                s.delivered[i] += p.delivered[i];
            }
            s.ramp_done &= p.ramp_done;
            if p.first_rx_us != 0 && (s.first_rx_us == 0 || p.first_rx_us < s.first_rx_us) {
                s.first_rx_us = p.first_rx_us;
            }
            s.last_rx_us = s.last_rx_us.max(p.last_rx_us);
            s.cpu_ms += p.cpu_ms;
            if p.ramp_start_us != 0 && (s.ramp_start_us == 0 || p.ramp_start_us < s.ramp_start_us) {
                s.ramp_start_us = p.ramp_start_us;
            }
            s.ramp_end_us = s.ramp_end_us.max(p.ramp_end_us);
            s.backlog_rx += p.backlog_rx;
            s.backlog_last_us = s.backlog_last_us.max(p.backlog_last_us);
            s.dropped += p.dropped;
        }
        s.ramp_done &= any;
        s
    }

    pub fn delivered_total(&self) -> u64 {
        self.delivered.iter().sum()
    }
}

/// A worker's final account.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    pub progress: Progress,
    /// Initial connect failures by reason (`http_401`, `timeout`, `refused`…).
    pub failed_by: BTreeMap<String, u64>,
    /// Reconnect failures by reason.
    pub reconnect_failed_by: BTreeMap<String, u64>,
    /// Closes of open connections by reason (`bye_slow_consumer`, `close_4009`, `eof`…).
    pub closed_by: BTreeMap<String, u64>,
    /// Connect to `hello`, µs.
    pub handshake_us: Vec<(u64, u64)>,
    /// Send timestamp to receipt, µs, by kind.
    pub latency_us: [Vec<(u64, u64)>; 3],
    /// Broadcast and topic: receipts per message number `k`.
    pub per_k: [Vec<u64>; 2],
    /// Device: every distinct `k` received.
    pub device_received: Vec<u64>,
    /// Receipts of a `k` this device had already seen, by kind.
    pub duplicates: [u64; 3],
    /// Device messages whose seq was not above the last one seen on the
    /// same connection (and not a duplicate).
    pub out_of_order: u64,
    /// Device messages of this run without `seq` although ttl > 0 (or with
    /// one although ttl = 0 is not known here: counted by the coordinator).
    pub missing_seq: u64,
    /// `msg` frames that were not this run's (other runs, other senders).
    pub foreign: u64,
    /// Sum of `dropped` frame counts.
    pub dropped: u64,
    /// `error` frames by code.
    pub error_frames: BTreeMap<String, u64>,
    /// Acks written.
    pub acks: u64,
    /// This worker process's CPU time (user + system), ms.
    pub cpu_ms: f64,
    /// This worker process's peak RSS, bytes.
    pub max_rss_bytes: u64,
}
