//! The coordinator: plans the run, starts the worker processes, drives the
//! scenario through the backend API, watches progress, and turns the
//! workers' reports into [`Results`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

use crate::api::Api;
use crate::bench::Gateway;
use crate::cli::{LoadOpts, Scenario, TokenIn};
use crate::procstat::{self, Sample};
use crate::results::*;
use crate::target::{self, Endpoint};
use crate::wire::{self, Cmd, Event, Kind, Payload, Progress, WorkerConfig, WorkerReport};

/// Most connections one run may ask for (bounded loops, bounded memory).
const MAX_CONNECTIONS: u64 = 10_000_000;
/// Most worker processes.
const MAX_WORKERS: u32 = 512;
/// Most messages one fan-out run sends, and most device pushes.
const MAX_MESSAGES: u64 = 10_000_000;
/// Most `--backlog`: the gateway's default `max_pending`, above which the
/// oldest would be dropped before the devices connect.
const MAX_BACKLOG: u64 = 100;
/// How often `Fleet::wait_for` looks at its condition without an event.
const COND_POLL: Duration = Duration::from_millis(50);
/// `--offline`: most messages per device on average.
const MAX_OFFLINE_MEAN: u64 = 50;

/// A validated run: resolved endpoints, worker shares, ids.
#[derive(Debug, Clone)]
pub struct Plan {
    pub scenario: Scenario,
    pub o: LoadOpts,
    pub device: Endpoint,
    pub api: Endpoint,
    pub sources: Vec<IpAddr>,
    /// (first global index, count) per worker.
    pub shares: Vec<(u64, u64)>,
    pub run_id: String,
    /// storm: restart the gateway instead of dropping clients (bench only).
    pub restart: Restart,
}

/// How a `bench storm` round disturbs the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Restart {
    /// The clients drop their connections.
    #[default]
    No,
    /// SIGTERM (drain, exit), then start the gateway again.
    Sigterm,
    /// Start a new gateway with `serve --takeover`: it takes listeners and
    /// store over, the old one drains and exits.
    Takeover,
}

impl Plan {
    /// Checks the options and resolves the endpoints (loopback only unless
    /// `--allow-remote`).
    pub async fn new(scenario: Scenario, o: LoadOpts, restart: Restart) -> Result<Plan> {
        if o.connections == 0 || o.connections > MAX_CONNECTIONS {
            bail!("--connections must be 1..={MAX_CONNECTIONS}");
        }
        if o.secret.as_deref().unwrap_or("").is_empty() {
            bail!("--secret (the app's device secret, or PUSHGATE_DEVICE_SECRET) is required: devices sign their own tokens");
        }
        if scenario.needs_api() && o.api_key.as_deref().unwrap_or("").is_empty() {
            bail!(
                "the {} scenario pushes through the API: give --api-key (or PUSHGATE_API_KEY)",
                scenario.name()
            );
        }
        if o.per_worker == 0 {
            bail!("--per-worker must be at least 1");
        }
        let hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(_, h)| h)
            .unwrap_or(u64::MAX);
        if o.per_worker + 64 > hard {
            bail!(
                "--per-worker {} is above what one process may open (hard fd limit {hard}); lower it",
                o.per_worker
            );
        }
        let needed = o.connections.div_ceil(o.per_worker);
        let workers = match o.workers {
            Some(0) => bail!("--workers must be at least 1"),
            Some(w) if u64::from(w) < needed => bail!(
                "{} connections over {w} workers is more than --per-worker {} each; use at least {needed} workers",
                o.connections,
                o.per_worker
            ),
            Some(w) => w,
            None => needed as u32,
        };
        if workers > MAX_WORKERS || u64::from(workers) > o.connections {
            bail!(
                "--workers must be 1..={} and at most --connections",
                MAX_WORKERS
            );
        }
        for (name, v) in [
            ("--hold", o.hold),
            ("--settle", o.settle),
            ("--drain-timeout", o.drain_timeout),
            ("--storm-timeout", o.storm_timeout),
            ("--ramp", o.ramp),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{name} must be a number >= 0");
            }
        }
        if !(o.connect_timeout.is_finite() && o.connect_timeout > 0.0) {
            bail!("--connect-timeout must be > 0");
        }
        if !(o.time_limit.is_finite() && o.time_limit > 0.0) {
            bail!("--time-limit must be > 0");
        }
        if o.concurrency == 0 || o.api_conns == 0 {
            bail!("--concurrency and --api-conns must be at least 1");
        }
        match scenario {
            Scenario::Broadcast | Scenario::Topic if o.count == 0 || o.count > MAX_MESSAGES => {
                bail!("--count must be 1..={MAX_MESSAGES}")
            }
            Scenario::Topic if o.topics == 0 => bail!("--topics must be at least 1"),
            Scenario::Device | Scenario::Redeliver => {
                if scenario == Scenario::Redeliver {
                    if o.backlog == 0 || o.backlog > MAX_BACKLOG {
                        // More than the gateway's default max_pending would
                        // be dropped before the devices connect.
                        bail!("--backlog must be 1..={MAX_BACKLOG}");
                    }
                    if o.ttl == 0 {
                        bail!("--ttl 0 is never stored: redeliver needs ttl > 0");
                    }
                    if o.backlog.saturating_mul(o.connections) > MAX_MESSAGES {
                        bail!("-n × --backlog must be at most {MAX_MESSAGES} messages");
                    }
                }
                if !(o.rate.is_finite()
                    && o.rate > 0.0
                    && o.duration.is_finite()
                    && o.duration > 0.0)
                {
                    bail!("--rate and --duration must be > 0");
                }
                if o.rate * o.duration > MAX_MESSAGES as f64 {
                    bail!("--rate × --duration must be at most {MAX_MESSAGES} messages");
                }
                if o.batch == 0 || o.batch > 500 {
                    bail!("--batch must be 1..=500");
                }
                if o.offline {
                    if o.ttl == 0 {
                        bail!("--ttl 0 is never stored: --offline needs ttl > 0");
                    }
                    // The first message waits for the pushes, the connect
                    // ramp and the drain before its device can take it.
                    let wait = o.duration + o.ramp_secs() + o.drain_timeout + 30.0;
                    if (o.ttl as f64) < wait {
                        bail!(
                            "--offline: --ttl {} would expire messages before their device connects; \
                             give at least {wait:.0} (--duration + the connect ramp + --drain-timeout + 30 s)",
                            o.ttl
                        );
                    }
                    if o.rate * o.duration > (o.connections * MAX_OFFLINE_MEAN) as f64 {
                        // Random targets: a mean of 50 keeps every device
                        // well under the default max_pending of 100.
                        bail!(
                            "--offline: --rate × --duration must be at most {MAX_OFFLINE_MEAN} × -n, \
                             or devices would reach max_pending and drop"
                        );
                    }
                }
            }
            Scenario::Storm if o.rounds == 0 || o.rounds > 1000 => {
                bail!("--rounds must be 1..=1000")
            }
            _ => {}
        }
        if o.offline && scenario != Scenario::Device {
            bail!("--offline only applies to the device scenario");
        }
        if restart != Restart::No && scenario != Scenario::Storm {
            bail!("--restart and --takeover only apply to the storm scenario");
        }
        let device = target::resolve(&o.url, &["ws", "wss"], o.allow_remote).await?;
        let api = target::resolve(&o.api, &["http"], o.allow_remote).await?;
        let sources = target::parse_sources(&o.source, o.allow_remote)?;
        if let Some(bad) = sources
            .iter()
            .find(|s| s.is_ipv4() != device.addr.is_ipv4())
        {
            bail!(
                "--source {bad} is not of the same address family as {}; give matching sources or --source none",
                device.addr
            );
        }
        let (base, rem) = (
            o.connections / u64::from(workers),
            o.connections % u64::from(workers),
        );
        let mut shares = Vec::new();
        let mut first = 0;
        for w in 0..u64::from(workers) {
            let count = base + u64::from(w < rem);
            shares.push((first, count));
            first += count;
        }
        let run_id = format!("{:x}", crate::now_us());
        Ok(Plan {
            scenario,
            o,
            device,
            api,
            sources,
            shares,
            run_id,
            restart,
        })
    }

    fn worker_config(&self, worker: u32) -> WorkerConfig {
        let o = &self.o;
        let (first, count) = self.shares[worker as usize];
        WorkerConfig {
            worker,
            first_index: first,
            count,
            host: self.device.host.clone(),
            port: self.device.port,
            path: self.device.path.clone(),
            addr: self.device.addr,
            tls: self.device.is_tls(),
            sources: self.sources.clone(),
            rate: o.ramp / self.shares.len() as f64,
            concurrency: o.concurrency,
            connect_timeout_ms: (o.connect_timeout * 1000.0) as u64,
            retries: o.retries,
            app: o.app.clone(),
            secret: o.secret.clone().unwrap_or_default(),
            token_ttl: o.token_ttl,
            token_in_query: o.token_in == TokenIn::Query,
            device_prefix: o.device_prefix.clone(),
            topics: if self.scenario == Scenario::Topic {
                o.topics
            } else {
                0
            },
            run_id: self.run_id.clone(),
            reconnect: self.scenario == Scenario::Storm,
            reconnect_window_ms: (o.storm_timeout * 1000.0) as u64,
            deadline_ms: ((o.time_limit + 120.0) * 1000.0) as u64,
        }
    }

    /// Device id of global connection `g`.
    fn device_of(&self, g: u64) -> String {
        let w = self.shares.partition_point(|&(first, _)| first <= g) - 1;
        wire::device_id(&self.o.device_prefix, w as u32, g - self.shares[w].0)
    }

    fn setup(&self) -> Setup {
        let o = &self.o;
        Setup {
            url: o.url.clone(),
            api: o.api.clone(),
            app: o.app.clone(),
            connections: o.connections,
            workers: self.shares.len() as u32,
            per_worker: self.shares.iter().map(|s| s.1).collect(),
            ramp_per_sec: o.ramp,
            hold_secs: o.hold,
            source_addresses: self.sources.len(),
            tls: self.device.is_tls(),
            token_in: format!("{:?}", o.token_in).to_lowercase(),
            concurrency_per_worker: o.concurrency,
            run_id: self.run_id.clone(),
            bench: None,
        }
    }
}

/// Set once, by Ctrl-C or the time limit, with the reason. A second Ctrl-C
/// exits at once.
pub type Stop = watch::Receiver<Option<String>>;

fn install_stop(time_limit: Duration) -> Stop {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let why = tokio::select! {
            r = tokio::signal::ctrl_c() => match r {
                Ok(()) => "interrupted (Ctrl-C)".to_string(),
                // No signal handling: only the time limit stops the run.
                Err(_) => { tokio::time::sleep(time_limit).await; format!("time limit {time_limit:?} reached") }
            },
            _ = tokio::time::sleep(time_limit) => format!("time limit {time_limit:?} reached"),
        };
        eprintln!(
            "\n{why}: stopping, collecting what the workers have (Ctrl-C again to quit at once)"
        );
        let _ = tx.send(Some(why));
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("second Ctrl-C: exiting without a report");
            std::process::exit(130);
        }
    });
    rx
}

fn stopped(stop: &Stop) -> bool {
    stop.borrow().is_some()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Met,
    Timeout,
    Stopped,
    Gone,
}

/// The progress line on stderr.
struct Printer {
    quiet: bool,
    tty: bool,
    printed: bool,
    last: Instant,
    last_conns: u64,
    last_deliv: u64,
    target: u64,
}

impl Printer {
    fn tick(&mut self, t: f64, p: &Progress) {
        let dt = self.last.elapsed().as_secs_f64();
        if self.quiet || dt < 1.0 {
            return;
        }
        let conns = p.established + p.reconnected;
        let deliv = p.delivered_total();
        let line = format!(
            "{t:7.1}s  up {}/{}  +{:.0}/s  failed {}  closed {}  reconnected {} (failures {})  delivered {} (+{:.0}/s)",
            p.up,
            self.target,
            conns.saturating_sub(self.last_conns) as f64 / dt,
            p.failed,
            p.closed,
            p.reconnected,
            p.reconnect_failed,
            deliv,
            deliv.saturating_sub(self.last_deliv) as f64 / dt,
        );
        if self.tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
        self.printed = true;
        self.last = Instant::now();
        self.last_conns = conns;
        self.last_deliv = deliv;
    }

    fn end(&mut self) {
        if self.tty && self.printed {
            eprintln!();
        }
        self.printed = false;
    }
}

/// The worker processes and what they last said.
struct Fleet {
    children: Vec<Child>,
    stdins: Vec<Option<ChildStdin>>,
    rx: mpsc::Receiver<(u32, Option<Event>)>,
    latest: Vec<Progress>,
    /// Coordinator-side view of each worker's CPU at its last progress.
    alive: Vec<bool>,
    ready: Vec<bool>,
    reports: Vec<Option<WorkerReport>>,
    fatal: Vec<String>,
    timeline: Vec<TimelinePoint>,
    t0: Instant,
    printer: Printer,
    /// Connections up, for senders that need it.
    up: Arc<AtomicU64>,
    /// The timeline stops when the clients start closing at the end.
    recording: bool,
}

impl Fleet {
    async fn spawn(plan: &Plan, t0: Instant) -> Result<Fleet> {
        let exe = std::env::current_exe().context("finding this program to start workers")?;
        let n = plan.shares.len();
        let (tx, rx) = mpsc::channel(1024);
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        for w in 0..n as u32 {
            let mut child = Command::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                // Own process group: a terminal Ctrl-C reaches only the
                // coordinator, which then finishes the workers in order.
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting worker {w} ({})", exe.display()))?;
            let mut stdin = child.stdin.take().context("worker stdin")?;
            let stdout = child.stdout.take().context("worker stdout")?;
            let mut line = serde_json::to_vec(&plan.worker_config(w))?;
            line.push(b'\n');
            stdin
                .write_all(&line)
                .await
                .context("sending the worker its config")?;
            stdin.flush().await?;
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                // Ends when the worker's stdout closes.
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(ev) = serde_json::from_str::<Event>(&line) {
                        if tx.send((w, Some(ev))).await.is_err() {
                            return;
                        }
                    }
                }
                let _ = tx.send((w, None)).await;
            });
            children.push(child);
            stdins.push(Some(stdin));
        }
        Ok(Fleet {
            children,
            stdins,
            rx,
            latest: (0..n as u32)
                .map(|worker| Progress {
                    worker,
                    ..Progress::default()
                })
                .collect(),
            alive: vec![true; n],
            ready: vec![false; n],
            reports: vec![None; n],
            fatal: Vec::new(),
            timeline: Vec::new(),
            t0,
            printer: Printer {
                quiet: plan.o.quiet,
                tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
                printed: false,
                last: Instant::now(),
                last_conns: 0,
                last_deliv: 0,
                target: plan.o.connections,
            },
            up: Arc::new(AtomicU64::new(0)),
            recording: true,
        })
    }

    fn sum(&self) -> Progress {
        Progress::sum(&self.latest)
    }

    async fn send(&mut self, cmd: &Cmd) {
        let Ok(mut line) = serde_json::to_vec(cmd) else {
            return;
        };
        line.push(b'\n');
        for s in self.stdins.iter_mut() {
            if let Some(stdin) = s {
                if stdin.write_all(&line).await.is_err() || stdin.flush().await.is_err() {
                    *s = None;
                }
            }
        }
    }

    fn on_event(&mut self, w: u32, ev: Option<Event>) {
        let i = w as usize;
        match ev {
            None => self.alive[i] = false,
            Some(Event::Ready { .. }) => self.ready[i] = true,
            Some(Event::Progress(p)) => self.latest[i] = p,
            Some(Event::Report(r)) => {
                self.latest[i] = r.progress.clone();
                self.reports[i] = Some(*r);
            }
            Some(Event::Fatal { message, .. }) => {
                self.fatal.push(message);
                self.alive[i] = false;
            }
        }
        let sum = self.sum();
        self.up.store(sum.up, Ordering::Relaxed);
        let t = self.t0.elapsed().as_secs_f64();
        if self.recording && self.timeline.last().is_none_or(|l| t - l.t >= 0.25) {
            self.timeline.push(TimelinePoint {
                t,
                up: sum.up,
                failed: sum.failed,
                delivered: sum.delivered_total(),
            });
        }
        self.printer.tick(t, &sum);
    }

    /// Processes events until `cond` holds on the summed progress, the
    /// deadline passes, the run is stopped, or every worker is gone.
    async fn wait_for(
        &mut self,
        mut cond: impl FnMut(&Fleet) -> bool,
        deadline: Instant,
        stop: &Stop,
    ) -> Wait {
        let mut stop = stop.clone();
        // Bounded by the deadline.
        loop {
            if cond(self) {
                return Wait::Met;
            }
            if stop.borrow_and_update().is_some() {
                return Wait::Stopped;
            }
            // A worker that died without a report makes the run void.
            let lost_worker = self
                .alive
                .iter()
                .zip(&self.reports)
                .any(|(alive, r)| !alive && r.is_none());
            if !self.fatal.is_empty() || lost_worker {
                return Wait::Gone;
            }
            tokio::select! {
                ev = self.rx.recv() => match ev {
                    Some((w, ev)) => self.on_event(w, ev),
                    None => return Wait::Gone,
                },
                _ = tokio::time::sleep_until(deadline) => return Wait::Timeout,
                _ = stop.changed() => {}
                // Conditions on things other than worker events (a sending
                // task finishing before any worker has connected) are seen
                // within this.
                _ = tokio::time::sleep(COND_POLL) => {}
            }
        }
    }

    /// Waits `d`, keeping progress flowing; false if stopped or workers died.
    async fn hold(&mut self, d: Duration, stop: &Stop) -> bool {
        matches!(
            self.wait_for(|_| false, Instant::now() + d, stop).await,
            Wait::Timeout
        )
    }

    /// Tells every worker to finish and collects the reports (bounded).
    async fn finish(&mut self) {
        self.recording = false;
        self.send(&Cmd::Finish).await;
        let never = watch::channel(None).1;
        let deadline = Instant::now() + Duration::from_secs(30);
        self.wait_for(
            |f| {
                f.reports
                    .iter()
                    .zip(&f.alive)
                    .all(|(r, alive)| r.is_some() || !alive)
            },
            deadline,
            &never,
        )
        .await;
        self.printer.end();
        for s in self.stdins.iter_mut() {
            *s = None;
        }
        for (w, c) in self.children.iter_mut().enumerate() {
            match tokio::time::timeout(Duration::from_secs(5), c.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    eprintln!("worker {w} did not exit; killing it");
                    let _ = c.kill().await;
                }
            }
        }
    }
}

/// Where gateway resource figures come from.
enum Probe {
    Pid(u32),
    Metrics(Arc<Api>),
    None,
}

impl Probe {
    async fn new(pid: Option<u32>, api: Arc<Api>) -> Probe {
        if let Some(pid) = pid {
            return Probe::Pid(pid);
        }
        let p = Probe::Metrics(api);
        if p.sample().await.is_some() {
            p
        } else {
            Probe::None
        }
    }

    async fn sample(&self) -> Option<Sample> {
        match self {
            Probe::Pid(pid) => procstat::read(&pid.to_string()).ok(),
            Probe::Metrics(api) => {
                let r = api.get("/metrics").await.ok()?;
                if r.status != 200 {
                    return None;
                }
                procstat::from_metrics(&String::from_utf8_lossy(&r.body))
            }
            Probe::None => None,
        }
    }
}

/// What a sender did, per message number.
#[derive(Default)]
struct SendLog {
    kind: Option<Kind>,
    messages: u64,
    accepted: u64,
    errors: BTreeMap<String, u64>,
    online: u64,
    stored: u64,
    /// Broadcast/topic: deliveries owed per k.
    expected_k: Vec<u64>,
    /// Device: accepted k that must arrive.
    owed: Vec<u64>,
    api_calls: u64,
    api_latency: Option<Histogram<u64>>,
    first_send_us: u64,
    send_secs: f64,
}

impl SendLog {
    fn new(kind: Kind) -> SendLog {
        SendLog {
            kind: Some(kind),
            api_latency: Some(wire::new_hist()),
            ..SendLog::default()
        }
    }

    fn record_error(&mut self, key: String) {
        *self.errors.entry(key).or_insert(0) += 1;
    }

    fn record_latency(&mut self, d: Duration) {
        if let Some(h) = &mut self.api_latency {
            h.saturating_record((d.as_micros() as u64).max(1));
        }
    }
}

fn http_error_key(r: &crate::api::Response) -> String {
    match r.error_code() {
        Some(c) => format!("{}_{c}", r.status),
        None => r.status.to_string(),
    }
}

fn payload(run_id: &str, kind: Kind, k: u64, pad: &str) -> serde_json::Value {
    serde_json::to_value(payload_of(run_id, kind, k, pad)).unwrap_or_default()
}

fn payload_of(run_id: &str, kind: Kind, k: u64, pad: &str) -> Payload {
    Payload {
        ts_us: crate::now_us(),
        run: run_id.to_string(),
        kind: kind.tag().to_string(),
        k,
        pad: pad.to_string(),
    }
}

/// A device message of the `device` scenario, as the API takes it.
#[derive(serde::Serialize)]
struct DeviceMessage<'a> {
    to: ToDevice<'a>,
    data: Payload,
    ttl: u64,
}

#[derive(serde::Serialize)]
struct ToDevice<'a> {
    device: &'a str,
}

/// The API's answer to one message (or one entry of a batch's answer);
/// other fields are not read.
#[derive(Default, serde::Deserialize)]
struct MessageAnswer {
    #[serde(default)]
    online: u64,
    #[serde(default)]
    stored: u64,
    error: Option<AnswerError>,
}

#[derive(Default, serde::Deserialize)]
struct AnswerError {
    code: Option<String>,
}

#[derive(serde::Deserialize)]
struct BatchAnswer {
    results: Vec<MessageAnswer>,
}

/// Device ids per stored backlog message (`to.devices` allows 1000).
const BACKLOG_FANOUT: u64 = 1000;
/// Backlog messages per batch call.
const BACKLOG_BATCH: usize = 10;

/// What storing the redeliver scenario's backlog did.
#[derive(Default)]
struct Fill {
    stored: u64,
    errors: BTreeMap<String, u64>,
    secs: f64,
}

/// Stores `--backlog` messages for every device before any connects: each
/// message goes to up to 1000 devices (`to.devices`), ten messages a call,
/// `--api-conns` calls at a time. Bounded: n × backlog / 1000 messages, each
/// call by the API timeout.
async fn fill_backlog(plan: Arc<Plan>, api: Arc<Api>, stop: Stop) -> Fill {
    let o = &plan.o;
    let fill = Arc::new(Mutex::new(Fill::default()));
    let inflight = Arc::new(Semaphore::new(o.api_conns));
    let pad = "x".repeat(o.payload_bytes);
    let start = Instant::now();
    let path = format!("/v1/apps/{}/messages/batch", o.app);
    let mut msgs = Vec::new();
    let mut ks = Vec::new();
    let chunks = o.connections.div_ceil(BACKLOG_FANOUT);
    for j in 0..o.backlog {
        for c in 0..chunks {
            let first = c * BACKLOG_FANOUT;
            let ids: Vec<String> = (first..(first + BACKLOG_FANOUT).min(o.connections))
                .map(|g| plan.device_of(g))
                .collect();
            ks.push(ids.len() as u64);
            let data = serde_json::to_value(Payload {
                ts_us: crate::now_us(),
                run: plan.run_id.clone(),
                kind: wire::BACKLOG_TAG.into(),
                k: j,
                pad: pad.clone(),
            })
            .unwrap_or_default();
            msgs.push(json!({"to": {"devices": ids}, "data": data, "ttl": o.ttl}));
            let last = j + 1 == o.backlog && c + 1 == chunks;
            if msgs.len() < BACKLOG_BATCH && !last {
                continue;
            }
            if stopped(&stop) {
                break;
            }
            let Ok(permit) = inflight.clone().acquire_owned().await else {
                break;
            };
            let body = json!({"messages": std::mem::take(&mut msgs)});
            let counts = std::mem::take(&mut ks);
            let (api, fill, path) = (api.clone(), fill.clone(), path.clone());
            tokio::spawn(async move {
                let r = api.post_json(&path, &body).await;
                let mut f = fill.lock().unwrap_or_else(|p| p.into_inner());
                let results = match &r {
                    Ok(r) if r.status == 200 => r
                        .json()
                        .and_then(|v| v.get("results").and_then(|x| x.as_array()).cloned())
                        .unwrap_or_default(),
                    _ => Vec::new(),
                };
                for (i, n) in counts.into_iter().enumerate() {
                    let key = match (&r, results.get(i)) {
                        (_, Some(e)) if e.get("stored").is_some() => {
                            f.stored += e["stored"].as_u64().unwrap_or(0);
                            continue;
                        }
                        (_, Some(e)) => {
                            format!("batch_{}", e["error"]["code"].as_str().unwrap_or("error"))
                        }
                        (Ok(r), None) => http_error_key(r),
                        (Err(_), None) => "transport".to_string(),
                    };
                    *f.errors.entry(key).or_insert(0) += n;
                }
                drop(permit);
            });
        }
    }
    let _ = inflight.acquire_many(o.api_conns as u32).await;
    let mut f = fill.lock().unwrap_or_else(|p| p.into_inner());
    f.secs = start.elapsed().as_secs_f64();
    std::mem::take(&mut *f)
}

/// Broadcasts or topic messages, back to back (or `interval` apart).
async fn send_fanout(
    plan: Arc<Plan>,
    api: Arc<Api>,
    kind: Kind,
    up: Arc<AtomicU64>,
    stop: Stop,
) -> SendLog {
    let o = &plan.o;
    let mut log = SendLog::new(kind);
    let path = format!("/v1/apps/{}/messages", o.app);
    let pad = "x".repeat(o.payload_bytes);
    let start = std::time::Instant::now();
    log.first_send_us = crate::now_us();
    let n = o.connections;
    let topics = u64::from(o.topics.max(1));
    for k in 0..o.count {
        if stopped(&stop) {
            break;
        }
        let (to, ours) = match kind {
            Kind::Topic => {
                let t = k % topics;
                // Devices g with g % topics == t.
                let ours = n / topics + u64::from(t < n % topics);
                (
                    json!({"topic": wire::topic_name(&o.device_prefix, t)}),
                    ours,
                )
            }
            _ => (json!({"broadcast": true}), n),
        };
        let all_up = up.load(Ordering::Relaxed) == n;
        let body = json!({"to": to, "data": payload(&plan.run_id, kind, k, &pad)});
        log.messages += 1;
        let t = std::time::Instant::now();
        let r = api.post_json(&path, &body).await;
        log.record_latency(t.elapsed());
        log.api_calls += 1;
        let owed = match r {
            Ok(r) if r.status == 202 => {
                log.accepted += 1;
                let v = r.json().unwrap_or_default();
                let online = v.get("online").and_then(|x| x.as_u64()).unwrap_or(0);
                log.online += online;
                // With every connection up we know who must receive it; if
                // some are down, the gateway's count is the best we have.
                if all_up {
                    ours
                } else {
                    online
                }
            }
            Ok(r) => {
                log.record_error(http_error_key(&r));
                // Overload (429 queue_full / rate_limited, 503): back off as
                // asked, bounded, so the run measures rather than hammers.
                if let Some(secs) = r
                    .header("retry-after")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                {
                    tokio::time::sleep(Duration::from_secs(secs.min(5))).await;
                }
                0
            }
            Err(_) => {
                log.record_error("transport".into());
                0
            }
        };
        log.expected_k.push(owed);
        if o.interval_ms > 0 {
            tokio::time::sleep(Duration::from_millis(o.interval_ms)).await;
        }
    }
    log.send_secs = start.elapsed().as_secs_f64();
    log
}

/// Pushes to random devices at `--rate` for `--duration`.
async fn send_devices(plan: Arc<Plan>, api: Arc<Api>, stop: Stop) -> SendLog {
    let o = &plan.o;
    let log = Arc::new(Mutex::new(SendLog::new(Kind::Device)));
    let total = (o.rate * o.duration).round().max(1.0) as u64;
    let batch = u64::from(o.batch);
    let calls = total.div_ceil(batch);
    let inflight = Arc::new(Semaphore::new(o.api_conns));
    let mut rng = StdRng::seed_from_u64(o.seed);
    let pad = "x".repeat(o.payload_bytes);
    let start = Instant::now();
    let wall = std::time::Instant::now();
    if let Ok(mut l) = log.lock() {
        l.first_send_us = crate::now_us();
    }
    let mut k = 0u64;
    for call in 0..calls {
        tokio::time::sleep_until(start + Duration::from_secs_f64((call * batch) as f64 / o.rate))
            .await;
        if stopped(&stop) {
            break;
        }
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            break;
        };
        let m = batch.min(total - call * batch);
        // The body is written straight from typed parts: building it as a
        // `serde_json::Value` first was a seventh of the client's CPU.
        let mut body = Vec::with_capacity(m as usize * (120 + o.payload_bytes) + 16);
        let mut ks = Vec::with_capacity(m as usize);
        if o.batch != 1 {
            body.extend_from_slice(b"{\"messages\":[");
        }
        for i in 0..m {
            let g = rng.random_range(0..o.connections);
            if i > 0 {
                body.push(b',');
            }
            let device = plan.device_of(g);
            let msg = DeviceMessage {
                to: ToDevice { device: &device },
                data: payload_of(&plan.run_id, Kind::Device, k, &pad),
                ttl: o.ttl,
            };
            if serde_json::to_writer(&mut body, &msg).is_err() {
                break; // writing to a Vec does not fail
            }
            ks.push(k);
            k += 1;
        }
        let path = if o.batch == 1 {
            format!("/v1/apps/{}/messages", o.app)
        } else {
            body.extend_from_slice(b"]}");
            format!("/v1/apps/{}/messages/batch", o.app)
        };
        let api = api.clone();
        let log = log.clone();
        let ttl0 = o.ttl == 0;
        tokio::spawn(async move {
            let t = std::time::Instant::now();
            let r = api.post(&path, &body).await;
            let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
            l.record_latency(t.elapsed());
            l.api_calls += 1;
            l.messages += ks.len() as u64;
            // One entry per message: (accepted, online, stored) or an error key.
            let outcomes: Vec<Result<(u64, u64), String>> = match r {
                Ok(r) if r.status == 202 && ks.len() == 1 => {
                    let a: MessageAnswer = serde_json::from_slice(&r.body).unwrap_or_default();
                    vec![Ok((a.online, a.stored))]
                }
                Ok(r) if r.status == 200 && ks.len() > 1 => {
                    let results = serde_json::from_slice::<BatchAnswer>(&r.body)
                        .map(|b| b.results)
                        .unwrap_or_default();
                    (0..ks.len())
                        .map(|i| match results.get(i) {
                            Some(MessageAnswer { error: Some(e), .. }) => {
                                Err(format!("batch_{}", e.code.as_deref().unwrap_or("error")))
                            }
                            Some(a) => Ok((a.online, a.stored)),
                            None => Err("batch_missing_result".into()),
                        })
                        .collect()
                }
                Ok(r) => vec![Err(http_error_key(&r)); ks.len()],
                Err(_) => vec![Err("transport".into()); ks.len()],
            };
            for (k, out) in ks.into_iter().zip(outcomes) {
                match out {
                    Ok((online, stored)) => {
                        l.accepted += 1;
                        l.online += online;
                        l.stored += stored;
                        if !ttl0 || online > 0 {
                            l.owed.push(k);
                        }
                    }
                    Err(key) => l.record_error(key),
                }
            }
            drop(permit);
        });
    }
    // Wait for the calls in flight (each bounded by the API timeout).
    let _ = inflight.acquire_many(o.api_conns as u32).await;
    let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
    l.send_secs = wall.elapsed().as_secs_f64();
    std::mem::take(&mut *l)
}

/// Waits for a sending task, at most `limit_secs` (then aborts it and
/// records the error), and returns its log.
async fn finish_sending(
    fleet: &mut Fleet,
    handle: tokio::task::JoinHandle<SendLog>,
    limit_secs: f64,
    stop: &Stop,
    res: &mut Results,
) -> SendLog {
    let w = fleet
        .wait_for(
            |_| handle.is_finished(),
            Instant::now() + Duration::from_secs_f64(limit_secs),
            stop,
        )
        .await;
    if w == Wait::Timeout {
        handle.abort();
        res.errors.push("sending did not finish in time".into());
    }
    handle.await.unwrap_or_default()
}

/// Runs the plan; `gw` is the gateway `bench` started (for its pid and for
/// storm restarts).
pub async fn execute(plan: Plan, mut gw: Option<&mut Gateway>) -> Result<Results> {
    let plan = Arc::new(plan);
    let o = &plan.o;
    let t0 = Instant::now();
    let cpu0 = procstat::self_cpu_ms();
    let stop = install_stop(Duration::from_secs_f64(o.time_limit));
    let mut res = Results {
        tool: "pushgate-loadtest".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        scenario: plan.scenario.name().into(),
        started_unix: crate::unix_secs(),
        setup: plan.setup(),
        ..Results::default()
    };
    let api = Arc::new(Api::new(
        &plan.api,
        o.api_key.clone(),
        Duration::from_secs(30),
    ));
    let mut probe = Probe::new(o.gateway_pid.or(gw.as_ref().map(|g| g.pid())), api.clone()).await;
    let mut gs = GatewayStats {
        source: match probe {
            Probe::Pid(_) => "proc".into(),
            Probe::Metrics(_) => "metrics".into(),
            Probe::None => String::new(),
        },
        pid: match probe {
            Probe::Pid(p) => Some(p),
            _ => None,
        },
        ..GatewayStats::default()
    };
    gs.before = probe.sample().await;
    if let (Probe::Pid(pid), None) = (&probe, gs.before) {
        eprintln!(
            "warning: cannot read /proc/{pid} (is the gateway's pid right?): no gateway figures"
        );
    }

    let mut fleet = Fleet::spawn(&plan, t0).await?;
    let mut ok = match fleet
        .wait_for(
            |f| f.ready.iter().all(|r| *r),
            Instant::now() + Duration::from_secs(20),
            &stop,
        )
        .await
    {
        Wait::Met => true,
        Wait::Timeout => {
            res.errors
                .push("workers did not get ready within 20 s".into());
            false
        }
        _ => false,
    };

    // Redeliver: the backlog is stored before anyone connects, then the
    // pushes start together with the connects.
    let mut redeliver: Option<(Redelivery, u64)> = None;
    let mut live: Option<tokio::task::JoinHandle<SendLog>> = None;
    let mut live_cpu: Option<f64> = None;
    if ok && plan.scenario == Scenario::Redeliver {
        let fill = fill_backlog(plan.clone(), api.clone(), stop.clone()).await;
        ok = !stopped(&stop);
        let r = Redelivery {
            backlog_per_device: o.backlog,
            stored: fill.stored,
            fill_errors: fill.errors,
            fill_secs: fill.secs,
            ..Redelivery::default()
        };
        gs.before_send = probe.sample().await;
        live_cpu =
            Some(fleet.latest.iter().map(|p| p.cpu_ms).sum::<f64>() + procstat::self_cpu_ms());
        redeliver = Some((r, crate::now_us()));
        live = Some(tokio::spawn(send_devices(
            plan.clone(),
            api.clone(),
            stop.clone(),
        )));
    }

    let client_cpu =
        |f: &Fleet| f.latest.iter().map(|p| p.cpu_ms).sum::<f64>() + procstat::self_cpu_ms();

    // Device --offline: every push is stored before any device connects;
    // the phase's gateway and client CPU are those of storing alone.
    let mut offline: Option<(SendLog, (f64, f64))> = None;
    if ok && plan.scenario == Scenario::Device && o.offline {
        gs.before_send = probe.sample().await;
        let c0 = client_cpu(&fleet);
        let handle = tokio::spawn(send_devices(plan.clone(), api.clone(), stop.clone()));
        let sent = finish_sending(&mut fleet, handle, o.duration + 60.0, &stop, &mut res).await;
        gs.after_send = probe.sample().await;
        ok = !stopped(&stop);
        offline = Some((sent, (c0, client_cpu(&fleet))));
    }

    // Ramp.
    let ramp_start = Instant::now();
    if ok {
        fleet.send(&Cmd::Connect).await;
        let per_worker = plan.shares.iter().map(|s| s.1).max().unwrap_or(0) as f64;
        let ramp_secs = o.ramp_secs();
        let conc = o.concurrency as f64;
        let worst = ramp_secs * 2.0
            + (per_worker / conc).ceil() * o.connect_timeout * f64::from(o.retries + 1)
            + 30.0;
        let w = fleet
            .wait_for(
                |f| f.sum().ramp_done,
                Instant::now() + Duration::from_secs_f64(worst),
                &stop,
            )
            .await;
        if w == Wait::Timeout {
            res.errors
                .push(format!("the ramp did not finish within {worst:.0} s"));
        }
        ok = w == Wait::Met;
    }
    let ramp = fleet.sum();
    res.connections.ramp_secs = if ramp.ramp_end_us > ramp.ramp_start_us && ramp.ramp_start_us > 0 {
        (ramp.ramp_end_us - ramp.ramp_start_us) as f64 / 1e6
    } else {
        ramp_start.elapsed().as_secs_f64()
    };
    res.connections.handshakes_per_sec = if res.connections.ramp_secs > 0.0 {
        ramp.established as f64 / res.connections.ramp_secs
    } else {
        0.0
    };
    if ok && o.settle > 0.0 {
        ok = fleet.hold(Duration::from_secs_f64(o.settle), &stop).await;
    }
    gs.connected = probe.sample().await;
    let up_connected = fleet.sum().up;

    // The scenario's action.
    let mut log: Option<SendLog> = None;
    let mut phase_cpu: Option<(f64, f64)> = None;
    if ok {
        match plan.scenario {
            Scenario::Idle => {}
            Scenario::Device if offline.is_some() => {
                let (sent, cpu) = offline.take().unwrap_or_default();
                let owed = sent.owed.len() as u64;
                let kind = Kind::Device;
                let w = fleet
                    .wait_for(
                        |f| f.sum().delivered[kind.idx()] >= owed,
                        Instant::now() + Duration::from_secs_f64(o.drain_timeout),
                        &stop,
                    )
                    .await;
                ok = matches!(w, Wait::Met | Wait::Timeout);
                phase_cpu = Some(cpu);
                log = Some(sent);
            }
            Scenario::Broadcast | Scenario::Topic | Scenario::Device => {
                let kind = match plan.scenario {
                    Scenario::Broadcast => Kind::Broadcast,
                    Scenario::Topic => Kind::Topic,
                    _ => Kind::Device,
                };
                gs.before_send = probe.sample().await;
                let c0 = client_cpu(&fleet);
                let before = fleet.sum().delivered[kind.idx()];
                let handle = if kind == Kind::Device {
                    tokio::spawn(send_devices(plan.clone(), api.clone(), stop.clone()))
                } else {
                    tokio::spawn(send_fanout(
                        plan.clone(),
                        api.clone(),
                        kind,
                        fleet.up.clone(),
                        stop.clone(),
                    ))
                };
                // Sending: bounded by count/rate; the API timeout bounds each call.
                let send_limit = match kind {
                    Kind::Device => o.duration + 60.0,
                    _ => o.count as f64 * (30.0 + o.interval_ms as f64 / 1000.0),
                };
                let sent = finish_sending(&mut fleet, handle, send_limit, &stop, &mut res).await;
                let owed: u64 = match kind {
                    Kind::Device => sent.owed.len() as u64,
                    _ => sent.expected_k.iter().sum(),
                };
                let w = fleet
                    .wait_for(
                        |f| f.sum().delivered[kind.idx()] - before >= owed,
                        Instant::now() + Duration::from_secs_f64(o.drain_timeout),
                        &stop,
                    )
                    .await;
                ok = matches!(w, Wait::Met | Wait::Timeout);
                gs.after_send = probe.sample().await;
                phase_cpu = Some((c0, client_cpu(&fleet)));
                log = Some(sent);
            }
            Scenario::Redeliver => {
                let c0 = live_cpu.unwrap_or_else(|| client_cpu(&fleet));
                let (mut r, t0_us) = redeliver.take().unwrap_or_default();
                let sent = match live.take() {
                    Some(h) => {
                        finish_sending(&mut fleet, h, o.duration + 60.0, &stop, &mut res).await
                    }
                    None => SendLog::default(),
                };
                let owed = sent.owed.len() as u64;
                let kind = Kind::Device;
                let want = r.stored;
                let w = fleet
                    .wait_for(
                        |f| {
                            let p = f.sum();
                            p.delivered[kind.idx()] >= owed && p.backlog_rx + p.dropped >= want
                        },
                        Instant::now()
                            + Duration::from_secs_f64(o.drain_timeout.max(o.storm_timeout)),
                        &stop,
                    )
                    .await;
                ok = matches!(w, Wait::Met | Wait::Timeout);
                let p = fleet.sum();
                r.redelivered = p.backlog_rx;
                r.dropped = p.dropped;
                r.complete = p.backlog_rx + p.dropped >= want;
                if p.backlog_last_us > t0_us {
                    r.redeliver_secs = (p.backlog_last_us - t0_us) as f64 / 1e6;
                }
                res.redeliver = Some(r);
                gs.after_send = probe.sample().await;
                phase_cpu = Some((c0, client_cpu(&fleet)));
                log = Some(sent);
            }
            Scenario::Storm => {
                for round in 1..=o.rounds {
                    let before = fleet.sum();
                    let target = before.up;
                    let started = Instant::now();
                    let deadline = started + Duration::from_secs_f64(o.storm_timeout);
                    let done = |f: &Fleet| {
                        let p = f.sum();
                        p.reconnected - before.reconnected >= target && p.up >= target
                    };
                    let mut stop_secs = None;
                    let mut start_secs = None;
                    let how;
                    // Backend calls go on during the storm: their latency
                    // says whether the API starves.
                    let probing = Arc::new(std::sync::atomic::AtomicBool::new(true));
                    let prober =
                        tokio::spawn(probe_api(api.clone(), plan.o.app.clone(), probing.clone()));
                    let w = if let (Restart::Sigterm | Restart::Takeover, Some(g)) =
                        (plan.restart, gw.as_deref_mut())
                    {
                        let takeover = plan.restart == Restart::Takeover;
                        how = if takeover {
                            "gateway_takeover"
                        } else {
                            "gateway_restart"
                        };
                        let (r, w) = tokio::join!(
                            async {
                                if takeover {
                                    g.takeover().await
                                } else {
                                    g.restart().await
                                }
                            },
                            fleet.wait_for(done, deadline, &stop)
                        );
                        match r {
                            Ok((a, b)) => {
                                stop_secs = Some(a);
                                start_secs = Some(b);
                            }
                            Err(e) => res.errors.push(format!("gateway restart: {e:#}")),
                        }
                        probe = Probe::Pid(g.pid());
                        gs.pid = Some(g.pid());
                        w
                    } else {
                        how = "client_drop";
                        fleet.send(&Cmd::Storm { round }).await;
                        fleet.wait_for(done, deadline, &stop).await
                    };
                    let after = fleet.sum();
                    probing.store(false, Ordering::SeqCst);
                    let api_probe = prober.await.unwrap_or_default();
                    res.storm.push(StormRound {
                        round,
                        how: how.into(),
                        target,
                        back: after.up,
                        recovered: w == Wait::Met,
                        secs: started.elapsed().as_secs_f64(),
                        reconnect_failures: after.reconnect_failed - before.reconnect_failed,
                        stop_secs,
                        start_secs,
                        api: api_probe,
                    });
                    if !matches!(w, Wait::Met | Wait::Timeout) {
                        ok = false;
                        break;
                    }
                    if round < o.rounds && !fleet.hold(Duration::from_secs(1), &stop).await {
                        ok = false;
                        break;
                    }
                }
            }
        }
    }
    if ok && o.hold > 0.0 {
        fleet.hold(Duration::from_secs_f64(o.hold), &stop).await;
    }
    gs.after = probe.sample().await;
    let end = fleet.sum();
    fleet.finish().await;

    // Aggregate.
    res.interrupted = stop.borrow().clone();
    res.errors.extend(fleet.fatal.iter().cloned());
    for (w, r) in fleet.reports.iter().enumerate() {
        if r.is_none() {
            res.errors.push(format!("worker {w} sent no report"));
        }
    }
    let reports: Vec<&WorkerReport> = fleet.reports.iter().flatten().collect();
    let fin = fleet.sum();
    let c = &mut res.connections;
    c.target = o.connections;
    c.attempts = fin.attempts;
    c.established = fin.established;
    c.failed = fin.failed;
    c.up_at_end = end.up;
    c.peak_up = fin.peak_up;
    c.closed = fin.closed;
    c.reconnected = fin.reconnected;
    c.reconnect_failed = fin.reconnect_failed;
    c.gave_up = fin.gave_up;
    let mut handshake = wire::new_hist();
    let mut latency = [wire::new_hist(), wire::new_hist(), wire::new_hist()];
    let mut per_k: [Vec<u64>; 2] = Default::default();
    let mut device_received = Vec::new();
    for r in &reports {
        merge_map(&mut c.failed_by, &r.failed_by);
        merge_map(&mut c.reconnect_failed_by, &r.reconnect_failed_by);
        merge_map(&mut c.closed_by, &r.closed_by);
        wire::add_pairs(&mut handshake, &r.handshake_us);
        for (h, pairs) in latency.iter_mut().zip(&r.latency_us) {
            wire::add_pairs(h, pairs);
        }
        for (acc, got) in per_k.iter_mut().zip(&r.per_k) {
            if acc.len() < got.len() {
                acc.resize(got.len(), 0);
            }
            for (a, g) in acc.iter_mut().zip(got) {
                *a += g;
            }
        }
        device_received.extend_from_slice(&r.device_received);
        res.frames.foreign += r.foreign;
        res.frames.dropped += r.dropped;
        res.frames.acks += r.acks;
        merge_map(&mut res.frames.anomalies, &r.error_frames);
        res.client.workers.push(WorkerUse {
            worker: r.progress.worker,
            cpu_ms: r.cpu_ms,
            max_rss_bytes: r.max_rss_bytes,
        });
    }
    c.handshake_ms = Percentiles::from_us(&handshake);

    if let Some(log) = log {
        let kind = log.kind.unwrap_or(Kind::Broadcast);
        let dups: u64 = reports.iter().map(|r| r.duplicates[kind.idx()]).sum();
        let mut d = Delivery {
            kind: kind.name().into(),
            messages: log.messages,
            accepted: log.accepted,
            api_errors: log.errors.clone(),
            gateway_online: log.online,
            gateway_stored: log.stored,
            delivered: fin.delivered[kind.idx()],
            duplicates: dups,
            latency_ms: Percentiles::from_us(&latency[kind.idx()]),
            api_latency_ms: log.api_latency.as_ref().and_then(Percentiles::from_us),
            api_calls_per_sec: if log.send_secs > 0.0 {
                log.api_calls as f64 / log.send_secs
            } else {
                0.0
            },
            ..Delivery::default()
        };
        match kind {
            Kind::Device => {
                device_received.sort_unstable();
                device_received.dedup();
                d.expected = log.owed.len() as u64;
                d.unique = device_received.len() as u64;
                d.lost = log
                    .owed
                    .iter()
                    .filter(|k| device_received.binary_search(k).is_err())
                    .count() as u64;
                d.out_of_order = reports.iter().map(|r| r.out_of_order).sum();
                if o.ttl > 0 {
                    d.missing_seq = reports.iter().map(|r| r.missing_seq).sum();
                }
            }
            _ => {
                let got = &per_k[kind.idx()];
                d.expected = log.expected_k.iter().sum();
                d.unique = got.iter().sum();
                d.lost = log
                    .expected_k
                    .iter()
                    .enumerate()
                    .map(|(k, &e)| e.saturating_sub(got.get(k).copied().unwrap_or(0)))
                    .sum();
            }
        }
        if fin.last_rx_us > log.first_send_us {
            d.window_secs = (fin.last_rx_us - log.first_send_us) as f64 / 1e6;
            d.deliveries_per_sec = d.unique as f64 / d.window_secs;
        }
        if let (Some(a), Some(b)) = (gs.before_send, gs.after_send) {
            // A /metrics page without process_cpu_seconds_total reads as 0.
            // Equal readings: less than one 10 ms tick, not measurable.
            // Redeliver: the backlog's deliveries are work of the phase too.
            let n = d.unique + res.redeliver.as_ref().map_or(0, |r| r.redelivered);
            if n > 0 && b.cpu_ms > a.cpu_ms {
                gs.cpu_ms_per_1000_deliveries = Some((b.cpu_ms - a.cpu_ms) / n as f64 * 1000.0);
            }
        }
        // Redeliver's window also holds the backlog's removal on ack.
        let storing = plan.scenario == Scenario::Device;
        if let (true, Some(a), Some(b)) = (storing, gs.before_send, gs.after_send) {
            if d.accepted > 0 && b.write_bytes > a.write_bytes {
                gs.write_bytes_per_message =
                    Some((b.write_bytes - a.write_bytes) as f64 / d.accepted as f64);
            }
        }
        if let Some((a, b)) = phase_cpu {
            let n = d.unique + res.redeliver.as_ref().map_or(0, |r| r.redelivered);
            if n > 0 {
                res.client.cpu_ms_per_1000_deliveries = Some((b - a) / n as f64 * 1000.0);
            }
        }
        res.deliveries.push(d);
    }
    // Messages stored before the connects (offline, redeliver) are not
    // the connections' memory: measure from after they were stored.
    let conn_base = match plan.scenario {
        Scenario::Device if o.offline => gs.after_send,
        Scenario::Redeliver => gs.before_send,
        _ => gs.before,
    };
    if let (Some(b), Some(c)) = (conn_base, gs.connected) {
        if up_connected > 0 {
            gs.bytes_per_conn =
                Some((c.rss_bytes as f64 - b.rss_bytes as f64) / up_connected as f64);
            if c.fds > 0 {
                gs.fds_per_conn = Some((c.fds as f64 - b.fds as f64) / up_connected as f64);
            }
        }
    }
    // After a restart `after` is another process: no differences across it.
    if plan.restart == Restart::No {
        if let (Some(c), Some(a)) = (gs.connected, gs.after) {
            gs.rss_growth_after = Some(a.rss_bytes as f64 - c.rss_bytes as f64);
        }
        if let (Some(b), Some(a)) = (gs.before, gs.after) {
            if a.cpu_ms > 0.0 {
                gs.cpu_ms_total = Some(a.cpu_ms - b.cpu_ms);
            }
        }
    }
    res.connections.unexpected_closes = if plan.scenario == Scenario::Storm {
        0
    } else {
        res.connections.closed
    };
    if gs.before.is_some() || gs.after.is_some() {
        res.gateway = Some(gs);
    }
    res.client.coordinator_cpu_ms = procstat::self_cpu_ms() - cpu0;
    res.client.cpu_ms =
        res.client.coordinator_cpu_ms + res.client.workers.iter().map(|w| w.cpu_ms).sum::<f64>();
    res.timeline = std::mem::take(&mut fleet.timeline);
    res.elapsed_secs = t0.elapsed().as_secs_f64();
    res.latency_hist = Some(merge_latency(latency));
    Ok(res)
}

/// Calls the API every 10 ms while `on`: a device-directed push with ttl 0
/// (the whole accept path, nothing stored) to a device that is not
/// connected. Latency from send to answer, in µs; errors by kind.
async fn probe_api(api: Arc<Api>, app: String, on: Arc<std::sync::atomic::AtomicBool>) -> ApiProbe {
    let mut out = ApiProbe::default();
    let mut h =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds");
    let path = format!("/v1/apps/{app}/messages");
    let body = json!({"to": {"device": "loadtest-api-probe"}, "data": {"probe": true}, "ttl": 0});
    while on.load(Ordering::SeqCst) {
        let t = std::time::Instant::now();
        match api.post_json(&path, &body).await {
            Ok(r) if r.status == 202 => {
                out.ok += 1;
                let _ = h.record((t.elapsed().as_micros() as u64).max(1));
            }
            Ok(r) => {
                let code = r.error_code().unwrap_or_else(|| r.status.to_string());
                *out.errors.entry(code).or_default() += 1;
            }
            Err(e) => {
                *out.errors.entry(format!("transport: {e:#}")).or_default() += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if !h.is_empty() {
        out.p50_ms = h.value_at_quantile(0.5) as f64 / 1000.0;
        out.p99_ms = h.value_at_quantile(0.99) as f64 / 1000.0;
        out.max_ms = h.max() as f64 / 1000.0;
    }
    out
}

fn merge_latency(h: [Histogram<u64>; 3]) -> Histogram<u64> {
    let [mut a, b, c] = h;
    let _ = a.add(&b);
    let _ = a.add(&c);
    a
}

fn merge_map(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_insert(0) += v;
    }
}
