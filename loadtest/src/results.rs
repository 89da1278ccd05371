//! What a run found: the JSON document `--json` writes, and the human
//! summary printed at the end.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::procstat::Sample;

/// Latency or duration percentiles, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    /// From a histogram of microseconds; None when empty.
    pub fn from_us(h: &Histogram<u64>) -> Option<Percentiles> {
        if h.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Percentiles {
            count: h.len(),
            min: ms(h.min()),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        })
    }

    pub fn line(&self) -> String {
        format!(
            "p50 {} p90 {} p99 {} p99.9 {} max {} (n={})",
            fmt_ms(self.p50),
            fmt_ms(self.p90),
            fmt_ms(self.p99),
            fmt_ms(self.p999),
            fmt_ms(self.max),
            self.count
        )
    }
}

fn fmt_ms(ms: f64) -> String {
    if ms >= 10_000.0 {
        format!("{:.1}s", ms / 1000.0)
    } else if ms >= 100.0 {
        format!("{ms:.0}ms")
    } else if ms >= 1.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{:.0}µs", ms * 1000.0)
    }
}

fn fmt_bytes(b: f64) -> String {
    let a = b.abs();
    if a >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if a >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if a >= 10.0 * 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

fn fmt_map(m: &BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Setup {
    pub url: String,
    pub api: String,
    pub app: String,
    pub connections: u64,
    pub workers: u32,
    pub per_worker: Vec<u64>,
    pub ramp_per_sec: f64,
    pub hold_secs: f64,
    pub source_addresses: usize,
    pub tls: bool,
    pub token_in: String,
    pub concurrency_per_worker: usize,
    pub run_id: String,
    /// Set by `bench`: how the gateway was started.
    pub bench: Option<BenchInfo>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BenchInfo {
    pub gateway_bin: String,
    pub store: String,
    pub tls: bool,
    pub heartbeat_secs: u64,
    pub drain_secs: u64,
    pub config: String,
    pub log: String,
    /// Exit status of the gateway after the final SIGTERM.
    pub exit_code: Option<i32>,
    pub stop_secs: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Connections {
    pub target: u64,
    pub attempts: u64,
    pub established: u64,
    /// Connections that never came up.
    pub failed: u64,
    /// Failed initial attempts by reason (with `--retries 0`, one per failed connection).
    pub failed_by: BTreeMap<String, u64>,
    /// Connections up just before the clients closed them.
    pub up_at_end: u64,
    pub peak_up: u64,
    /// Open connections closed by the gateway or the network.
    pub closed: u64,
    pub closed_by: BTreeMap<String, u64>,
    /// Closes that are failures: all of them, except in the storm scenario.
    pub unexpected_closes: u64,
    pub reconnected: u64,
    pub reconnect_failed: u64,
    pub reconnect_failed_by: BTreeMap<String, u64>,
    pub gave_up: u64,
    /// From the first attempt until every initial connect finished.
    pub ramp_secs: f64,
    /// Established connections per second of ramp.
    pub handshakes_per_sec: f64,
    /// Connect start to `hello` (and `subscribed`), every connect including reconnects.
    pub handshake_ms: Option<Percentiles>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Delivery {
    pub kind: String,
    /// Messages the load test tried to push (one per target device / topic
    /// message / broadcast).
    pub messages: u64,
    /// Messages the API accepted (202, or a batch entry without error).
    pub accepted: u64,
    /// API refusals by status and code, and transport errors.
    pub api_errors: BTreeMap<String, u64>,
    /// Deliveries owed: broadcast/topic: connections up (or, if some were
    /// down, the gateway's `online`) per accepted message; device: accepted
    /// messages (ttl 0: those the gateway found online).
    pub expected: u64,
    /// `msg` frames of this run received, duplicates included.
    pub delivered: u64,
    /// Distinct (device, message) receipts.
    pub unique: u64,
    /// expected − unique, floored at 0.
    pub lost: u64,
    pub duplicates: u64,
    /// Device messages whose seq did not increase on one connection.
    pub out_of_order: u64,
    /// Device messages without a seq although ttl > 0.
    pub missing_seq: u64,
    /// Sum of `online` over the 202 answers.
    pub gateway_online: u64,
    /// Sum of `stored` over the 202 answers.
    pub gateway_stored: u64,
    /// From the first send to the last receipt.
    pub window_secs: f64,
    pub deliveries_per_sec: f64,
    /// Send timestamp (in the payload) to receipt at the device.
    pub latency_ms: Option<Percentiles>,
    /// API request to response.
    pub api_latency_ms: Option<Percentiles>,
    /// API calls per second achieved while sending.
    pub api_calls_per_sec: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Frames {
    /// `msg` frames that were not this run's.
    pub foreign: u64,
    /// Sum of `dropped` counts.
    pub dropped: u64,
    pub acks: u64,
    /// `error` frames and anomalies by code.
    pub anomalies: BTreeMap<String, u64>,
}

/// Scenario redeliver: the stored backlog and how fast it came back.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Redelivery {
    /// Messages stored per device before it connected.
    pub backlog_per_device: u64,
    /// (message, device) pairs the gateway said it stored.
    pub stored: u64,
    /// Failed stores by error key (each counts its devices).
    pub fill_errors: BTreeMap<String, u64>,
    /// Time to store the backlog.
    pub fill_secs: f64,
    /// Backlog messages received once the devices connected.
    pub redelivered: u64,
    /// Messages the gateway's pending limit discarded (`dropped` frames):
    /// pushes that reached a device before its backlog was acked push the
    /// oldest backlog messages out.
    pub dropped: u64,
    /// From the connect command to the last backlog message received.
    pub redeliver_secs: f64,
    /// Every stored message came back (or was reported dropped) within the
    /// time allowed.
    pub complete: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct StormRound {
    pub round: u32,
    /// How: `client_drop` or `gateway_restart`.
    pub how: String,
    /// Connections up before the storm.
    pub target: u64,
    /// Connections up when the round ended.
    pub back: u64,
    pub recovered: bool,
    /// From the drop (or SIGTERM) until all were back (or the timeout).
    pub secs: f64,
    pub reconnect_failures: u64,
    /// Gateway restart: SIGTERM to exit, and start to /healthz. Takeover:
    /// start of the new process to the old one's exit, and start to the
    /// hand-over being done.
    pub stop_secs: Option<f64>,
    pub start_secs: Option<f64>,
    /// Backend calls made during the round.
    pub api: ApiProbe,
}

/// Backend API calls made while a storm round ran.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ApiProbe {
    pub ok: u64,
    /// By error code, HTTP status, or `transport: …`.
    pub errors: BTreeMap<String, u64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GatewayStats {
    /// `proc` (from --gateway-pid or bench) or `metrics` (/metrics).
    pub source: String,
    pub pid: Option<u32>,
    pub before: Option<Sample>,
    pub connected: Option<Sample>,
    pub before_send: Option<Sample>,
    pub after_send: Option<Sample>,
    pub after: Option<Sample>,
    /// (RSS connected − RSS before) / connections up.
    pub bytes_per_conn: Option<f64>,
    /// (fds connected − fds before) / connections up.
    pub fds_per_conn: Option<f64>,
    /// RSS after the scenario minus RSS connected (lasting growth).
    pub rss_growth_after: Option<f64>,
    /// Gateway CPU over the sending phase per 1000 deliveries.
    pub cpu_ms_per_1000_deliveries: Option<f64>,
    /// Gateway CPU from before connecting to the end.
    pub cpu_ms_total: Option<f64>,
    /// The device scenario: bytes the gateway wrote to storage over the
    /// sending phase per accepted message (the store's write amplification;
    /// with devices online it includes removing acked messages).
    pub write_bytes_per_message: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkerUse {
    pub worker: u32,
    pub cpu_ms: f64,
    pub max_rss_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientStats {
    /// Coordinator plus every worker process.
    pub cpu_ms: f64,
    pub coordinator_cpu_ms: f64,
    pub workers: Vec<WorkerUse>,
    /// Client CPU during the sending phase (approx.: workers' total) per 1000
    /// deliveries, to spot a client-bound run.
    pub cpu_ms_per_1000_deliveries: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct TimelinePoint {
    pub t: f64,
    pub up: u64,
    pub failed: u64,
    pub delivered: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Results {
    pub tool: String,
    pub version: String,
    pub scenario: String,
    pub started_unix: u64,
    pub elapsed_secs: f64,
    /// Why the run stopped early (Ctrl-C, time limit), if it did.
    pub interrupted: Option<String>,
    /// Problems that make the numbers doubtful.
    pub errors: Vec<String>,
    pub setup: Setup,
    pub connections: Connections,
    pub deliveries: Vec<Delivery>,
    pub frames: Frames,
    pub storm: Vec<StormRound>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redeliver: Option<Redelivery>,
    pub gateway: Option<GatewayStats>,
    pub client: ClientStats,
    pub timeline: Vec<TimelinePoint>,
    /// Every latency recorded (all kinds), for `--plot`; not in the JSON.
    #[serde(skip)]
    pub latency_hist: Option<Histogram<u64>>,
}

impl Results {
    /// True when nothing failed, nothing was lost or duplicated and the
    /// run was not cut short.
    pub fn clean(&self) -> bool {
        self.interrupted.is_none()
            && self.errors.is_empty()
            && self.connections.failed == 0
            && self.connections.gave_up == 0
            && self.connections.unexpected_closes == 0
            && self
                .redeliver
                .as_ref()
                .is_none_or(|r| r.complete && r.fill_errors.is_empty())
            && self.frames.anomalies.is_empty()
            && self.deliveries.iter().all(|d| {
                d.lost == 0
                    && d.duplicates == 0
                    && d.out_of_order == 0
                    && d.missing_seq == 0
                    && d.api_errors.is_empty()
            })
            // A SIGTERM restart answers 503 draining by design; a takeover
            // or a client-side storm must not fail a single call.
            && self
                .storm
                .iter()
                .all(|r| r.how == "gateway_restart" || r.api.errors.is_empty())
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let c = &self.connections;
        let _ = writeln!(
            s,
            "pushgate-loadtest {}: {} connections to {} ({} worker{}, {} source address{}{})",
            self.scenario,
            self.setup.connections,
            self.setup.url,
            self.setup.workers,
            if self.setup.workers == 1 { "" } else { "s" },
            self.setup.source_addresses,
            if self.setup.source_addresses == 1 {
                ""
            } else {
                "es"
            },
            if self.setup.tls { ", TLS" } else { "" },
        );
        if let Some(why) = &self.interrupted {
            let _ = writeln!(s, "  STOPPED EARLY: {why} (numbers below are partial)");
        }
        for e in &self.errors {
            let _ = writeln!(s, "  ERROR: {e}");
        }
        let _ = writeln!(
            s,
            "connections  established {}/{}  failed {}  up at end {}  peak {}",
            c.established, c.target, c.failed, c.up_at_end, c.peak_up
        );
        let _ = writeln!(
            s,
            "  ramp {:.2}s  {:.0} handshakes/s",
            c.ramp_secs, c.handshakes_per_sec
        );
        if let Some(h) = &c.handshake_ms {
            let _ = writeln!(s, "  handshake {}", h.line());
        }
        if !c.failed_by.is_empty() {
            let _ = writeln!(s, "  failed attempts: {}", fmt_map(&c.failed_by));
        }
        if c.closed > 0 {
            let _ = writeln!(
                s,
                "  closed by gateway/network {}: {}",
                c.closed,
                fmt_map(&c.closed_by)
            );
        }
        if c.reconnected > 0 || c.reconnect_failed > 0 || c.gave_up > 0 {
            let _ = write!(
                s,
                "  reconnected {}  reconnect failures {}",
                c.reconnected, c.reconnect_failed
            );
            if !c.reconnect_failed_by.is_empty() {
                let _ = write!(s, " ({})", fmt_map(&c.reconnect_failed_by));
            }
            let _ = writeln!(s, "  gave up {}", c.gave_up);
        }
        for d in &self.deliveries {
            let _ = writeln!(
                s,
                "{}  messages {} accepted {}  deliveries {}/{} expected  lost {}  dup {}  {:.0}/s over {:.2}s",
                d.kind,
                d.messages,
                d.accepted,
                d.unique,
                d.expected,
                d.lost,
                d.duplicates,
                d.deliveries_per_sec,
                d.window_secs
            );
            if let Some(l) = &d.latency_ms {
                let _ = writeln!(s, "  latency {}", l.line());
            }
            if let Some(l) = &d.api_latency_ms {
                let _ = writeln!(
                    s,
                    "  api {}  ({:.0} calls/s)",
                    l.line(),
                    d.api_calls_per_sec
                );
            }
            if !d.api_errors.is_empty() {
                let _ = writeln!(s, "  api errors: {}", fmt_map(&d.api_errors));
            }
            if d.out_of_order > 0 || d.missing_seq > 0 {
                let _ = writeln!(
                    s,
                    "  out of order {}  missing seq {}",
                    d.out_of_order, d.missing_seq
                );
            }
            if d.gateway_online != d.expected && d.kind != "device" {
                let _ = writeln!(s, "  gateway said online {}", d.gateway_online);
            }
        }
        if let Some(r) = &self.redeliver {
            let rate = |n: u64, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
            let _ = writeln!(
                s,
                "redeliver  backlog {}/device  stored {} in {:.2}s ({:.0}/s){}",
                r.backlog_per_device,
                r.stored,
                r.fill_secs,
                rate(r.stored, r.fill_secs),
                if r.fill_errors.is_empty() {
                    String::new()
                } else {
                    format!("  errors: {}", fmt_map(&r.fill_errors))
                }
            );
            let _ = writeln!(
                s,
                "  redelivered {}/{} (dropped by the pending limit {}) in {:.2}s after connect ({:.0}/s){}",
                r.redelivered,
                r.stored,
                r.dropped,
                r.redeliver_secs,
                rate(r.redelivered, r.redeliver_secs),
                if r.complete { "" } else { "  INCOMPLETE" }
            );
        }
        let f = &self.frames;
        if f.foreign > 0 || f.dropped > 0 || !f.anomalies.is_empty() {
            let _ = writeln!(
                s,
                "frames  foreign {}  dropped {}  anomalies: {}",
                f.foreign,
                f.dropped,
                fmt_map(&f.anomalies)
            );
        }
        for r in &self.storm {
            let _ = writeln!(
                s,
                "storm round {} ({}): {}/{} back in {:.2}s{}  reconnect failures {}",
                r.round,
                r.how,
                r.back,
                r.target,
                r.secs,
                if r.recovered { "" } else { " (NOT ALL BACK)" },
                r.reconnect_failures
            );
            let _ = writeln!(
                s,
                "  API during the round: {} ok, p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  errors: {}",
                r.api.ok,
                r.api.p50_ms,
                r.api.p99_ms,
                r.api.max_ms,
                fmt_map(&r.api.errors)
            );
        }
        if let Some(g) = &self.gateway {
            let pid = g.pid.map(|p| format!(" pid {p}")).unwrap_or_default();
            let _ = writeln!(s, "gateway ({}{pid})", g.source);
            let row = |name: &str, x: &Option<Sample>| -> Option<String> {
                x.map(|x| {
                    format!(
                        "  {name:<12} rss {:>10}  cpu {:>9.0} ms  fds {}",
                        fmt_bytes(x.rss_bytes as f64),
                        x.cpu_ms,
                        x.fds
                    )
                })
            };
            for (name, x) in [
                ("before", &g.before),
                ("connected", &g.connected),
                ("before send", &g.before_send),
                ("after send", &g.after_send),
                ("after", &g.after),
            ] {
                if let Some(line) = row(name, x) {
                    let _ = writeln!(s, "{line}");
                }
            }
            if let Some(b) = g.bytes_per_conn {
                let _ = writeln!(s, "  bytes per connection {b:.0} B");
            }
            if let Some(f) = g.fds_per_conn {
                let _ = writeln!(s, "  fds per connection {f:.2}");
            }
            if let Some(x) = g.rss_growth_after {
                let _ = writeln!(s, "  rss growth after scenario {}", fmt_bytes(x));
            }
            if let Some(x) = g.cpu_ms_per_1000_deliveries {
                let _ = writeln!(s, "  cpu ms per 1000 deliveries {x:.2}");
            }
            if let Some(x) = g.write_bytes_per_message {
                let _ = writeln!(s, "  storage writes per accepted message {x:.0} B");
            }
        }
        let cl = &self.client;
        let _ = write!(s, "load client cpu {:.0} ms", cl.cpu_ms);
        if let Some(x) = cl.cpu_ms_per_1000_deliveries {
            let _ = write!(s, "  ({x:.2} ms per 1000 deliveries)");
        }
        let rss: u64 = cl.workers.iter().map(|w| w.max_rss_bytes).sum();
        let _ = writeln!(s, "  workers' peak rss {}", fmt_bytes(rss as f64));
        if let Some(b) = &self.setup.bench {
            let _ = write!(
                s,
                "bench: gateway {} store {}{}, exit {} after SIGTERM",
                b.gateway_bin,
                b.store,
                if b.tls { ", TLS" } else { "" },
                b.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "by signal".into()),
            );
            if !b.log.is_empty() {
                let _ = write!(s, " (config {}, log {})", b.config, b.log);
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(
            s,
            "result: {}  ({:.1}s)",
            if self.clean() {
                "CLEAN"
            } else {
                "PROBLEMS (see above)"
            },
            self.elapsed_secs
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_in_ms() {
        let mut h = crate::wire::new_hist();
        for v in 1..=1000u64 {
            h.record(v * 1000).expect("in range");
        }
        let p = Percentiles::from_us(&h).expect("not empty");
        assert_eq!(p.count, 1000);
        assert!((p.p50 - 500.0).abs() < 1.0, "{p:?}");
        assert!((p.p99 - 990.0).abs() < 1.0, "{p:?}");
        assert!((p.max - 1000.0).abs() < 1.0, "{p:?}");
        assert!(Percentiles::from_us(&crate::wire::new_hist()).is_none());
    }

    #[test]
    fn clean_means_no_loss_and_no_failure() {
        let mut r = Results::default();
        assert!(r.clean());
        r.deliveries.push(Delivery {
            lost: 1,
            ..Delivery::default()
        });
        assert!(!r.clean());
        r.deliveries.clear();
        r.connections.failed = 1;
        assert!(!r.clean());
        assert!(r.summary().contains("PROBLEMS"));
    }
}
