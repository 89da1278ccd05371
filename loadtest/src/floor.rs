//! `pushgate-loadtest floor`: what this machine's kernel charges for a
//! fan-out, with no gateway at all. One process accepts N plain TCP
//! connections and writes one frame to each of them per round, in a tight
//! loop of blocking vectored writes (header + payload, as the gateway writes
//! a frame); sink processes, one raw epoll loop each, read the frames and
//! time them from the round's start. The writer's CPU per 1000 writes and
//! the sinks' latency percentiles are the floor a gateway's broadcast can
//! approach on this machine but not go below: everything the gateway adds
//! (WebSocket framing, queues, task wake-ups) comes on top.
//!
//! With `--url`, the same sinks connect to a running gateway as devices
//! instead, and each round is one broadcast through its API: the same
//! client, so the two runs differ only by what is on the sending side.

use std::io::{BufRead, BufReader, IoSlice, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::api::Api;
use crate::cli::{BenchOpts, StoreKind};
use crate::procstat;
use crate::results::Percentiles;
use crate::target::{split_url, Endpoint};

/// Longest a sink waits for its frames after it is ready.
const SINK_DEADLINE: Duration = Duration::from_secs(120);
/// Longest the writer waits for all connections to arrive.
const ACCEPT_DEADLINE: Duration = Duration::from_secs(60);

/// Options of `floor`.
#[derive(Debug, Clone, Args)]
pub struct FloorOpts {
    /// Connections (spread over `--sinks` processes; at most 18000 per
    /// process here).
    #[arg(short = 'n', long, default_value_t = 15000)]
    pub connections: usize,
    /// Rounds: one frame to every connection per round.
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    /// Bytes per frame on the wire, header included (the gateway's
    /// broadcast frame in `bench broadcast` is ~100 bytes).
    #[arg(long, default_value_t = 100)]
    pub frame_bytes: usize,
    /// Writer threads sharing the connections (the gateway runs one tokio
    /// worker per core).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Sink processes reading the connections (like `--workers`).
    #[arg(long, default_value_t = 1)]
    pub sinks: usize,
    /// Seconds between the connections being up and the first round.
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
    /// Source addresses the sinks bind before connect (as `--source`).
    #[arg(long, default_value = "127.0.0.2-127.0.0.250")]
    pub source: String,
    /// Write the result as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Start this gateway binary with a generated config (as `bench` does,
    /// memory store), run in gateway mode against it, and stop it.
    #[arg(long, conflicts_with = "url")]
    pub gateway_bin: Option<std::path::PathBuf>,
    /// A running gateway's device endpoint (ws:// only): the sinks connect
    /// there as devices and each round is a broadcast through `--api`.
    #[arg(long, requires_all = ["api_key", "secret"])]
    pub url: Option<String>,
    /// The gateway's API base URL (with `--url`).
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    pub api: String,
    /// The app the devices belong to (with `--url`).
    #[arg(long, default_value = "demo")]
    pub app: String,
    /// The app's API key (with `--url`).
    #[arg(long, env = "PUSHGATE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The app's device secret, to sign device tokens (with `--url`).
    #[arg(long, env = "PUSHGATE_DEVICE_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// The gateway's PID (with `--url`): its CPU time over the rounds is
    /// reported, from /proc/PID/task/*/schedstat (ns precision).
    #[arg(long)]
    pub gateway_pid: Option<u32>,
    /// Gateway mode: every device subscribes to this topic (token claim)
    /// and each round is a message to it instead of a broadcast.
    #[arg(long)]
    pub topic: Option<String>,
}

/// The internal `floor-sink` process's arguments.
#[derive(Debug, Clone, Args)]
pub struct SinkOpts {
    #[arg(long)]
    pub addr: SocketAddr,
    #[arg(long)]
    pub connections: usize,
    #[arg(long)]
    pub count: u32,
    #[arg(long)]
    pub source: String,
    /// Connect as WebSocket devices to this path (gateway mode).
    #[arg(long)]
    pub ws_path: Option<String>,
    #[arg(long)]
    pub app: Option<String>,
    #[arg(long, env = "PUSHGATE_DEVICE_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    #[arg(long, default_value = "floor")]
    pub device_prefix: String,
    /// Subscribe every device to this topic (token claim).
    #[arg(long)]
    pub topic: Option<String>,
}

/// What one sink saw, sent to the writer as one JSON line.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SinkReport {
    frames: u64,
    cpu_ms: f64,
    /// The latency histogram, serialized as (value µs, count) pairs.
    buckets: Vec<(u64, u64)>,
}

/// The result of a floor run.
#[derive(Debug, Serialize)]
pub struct FloorResult {
    /// `raw` (this process writes), `gateway` (broadcasts through --api) or
    /// `gateway-topic` (topic messages, with --topic).
    pub sender: &'static str,
    pub connections: usize,
    pub rounds: u32,
    pub frame_bytes: usize,
    pub threads: usize,
    pub sinks: usize,
    /// Raw: wall time of each round's writes, ms. Gateway: each broadcast
    /// call's API latency, ms.
    pub round_ms: Vec<f64>,
    /// CPU of the sending side (this process, or the gateway with
    /// --gateway-pid) from the first round until the sinks had every frame.
    pub sender_cpu_ms: Option<f64>,
    pub sender_cpu_ms_per_1000: Option<f64>,
    pub frames_received: u64,
    pub frames_expected: u64,
    pub latency_ms: Option<Percentiles>,
    pub sink_cpu_ms: f64,
}

impl FloorResult {
    fn new(
        o: &FloorOpts,
        sender: &'static str,
        round_ms: Vec<f64>,
        sender_cpu_ms: Option<f64>,
        (frames, sink_cpu_ms, latency_ms): (u64, f64, Option<Percentiles>),
    ) -> FloorResult {
        let expected = (o.connections as u64) * u64::from(o.count);
        FloorResult {
            sender,
            connections: o.connections,
            rounds: o.count,
            frame_bytes: o.frame_bytes,
            threads: o.threads,
            sinks: o.sinks,
            round_ms,
            sender_cpu_ms,
            sender_cpu_ms_per_1000: sender_cpu_ms.map(|c| c * 1000.0 / expected as f64),
            frames_received: frames,
            frames_expected: expected,
            latency_ms,
            sink_cpu_ms,
        }
    }
}

/// Where the frames come from.
enum Sender {
    /// This process, over connections it accepts.
    Raw(TcpListener),
    /// A gateway: devices connect to `device`, broadcasts go through `api`.
    Gateway {
        device: SocketAddr,
        path: String,
        api: Endpoint,
    },
}

/// Entry point of `pushgate-loadtest floor`.
pub fn main(mut o: FloorOpts) -> Result<()> {
    let Some(bin) = o.gateway_bin.take() else {
        return floor(o);
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let b = BenchOpts {
        gateway_bin: bin,
        store: StoreKind::Memory,
        tls: false,
        heartbeat: 30,
        drain_secs: 1,
        outbound_queue: None,
        max_handshakes_per_sec: None,
        restart: false,
        takeover: false,
        startup_timeout: 20.0,
        keep_dir: false,
    };
    let mut g = rt.block_on(crate::bench::launch(&b, o.connections as u64))?;
    o.url = Some(g.url.clone());
    o.api = g.api.clone();
    o.app = crate::bench::BENCH_APP.into();
    o.api_key = Some(g.api_key.clone());
    o.secret = Some(g.secret.clone());
    o.gateway_pid = Some(g.gw.pid());
    let outcome = floor(o);
    match rt.block_on(g.gw.stop()) {
        Ok((Some(0), _)) if outcome.is_ok() => {
            let _ = std::fs::remove_dir_all(&g.dir);
        }
        Ok((code, _)) => eprintln!(
            "the gateway exited with {code:?}; kept {} (config, log)",
            g.dir.display()
        ),
        Err(e) => eprintln!("stopping the gateway: {e:#}; kept {}", g.dir.display()),
    }
    outcome
}

fn floor(o: FloorOpts) -> Result<()> {
    ensure!(
        o.topic.is_none() || o.url.is_some(),
        "--topic needs a gateway (--gateway-bin or --url)"
    );
    ensure!(o.connections > 0, "-n must be at least 1");
    ensure!(
        (MIN_FRAME..=125).contains(&o.frame_bytes),
        "--frame-bytes must be {MIN_FRAME}..=125 (one short text frame)"
    );
    ensure!(
        o.threads >= 1 && o.sinks >= 1,
        "--threads and --sinks are at least 1"
    );
    ensure!(
        o.connections.div_ceil(o.sinks) <= 18_000,
        "at most 18000 connections per sink process: give more --sinks"
    );
    crate::worker::raise_nofile();
    let sender = match &o.url {
        None => {
            ensure!(
                o.connections <= 18_000,
                "the writer holds every connection in one process: at most 18000 here"
            );
            Sender::Raw(listen().context("binding the floor listener")?)
        }
        Some(url) => {
            let (_, host, port, path) = split_url(url, &["ws"])?;
            let device = loopback(&host, port, url)?;
            let (_, ahost, aport, _) = split_url(&o.api, &["http"])?;
            let api = Endpoint {
                scheme: "http".into(),
                addr: loopback(&ahost, aport, &o.api)?,
                host: ahost,
                port: aport,
                path: "/".into(),
            };
            Sender::Gateway { device, path, api }
        }
    };
    let exe = std::env::current_exe().context("finding this binary")?;
    let mut sinks = Vec::new();
    for i in 0..o.sinks {
        let share = o.connections / o.sinks + usize::from(i < o.connections % o.sinks);
        let mut cmd = Command::new(&exe);
        cmd.arg("floor-sink")
            .args(["--connections", &share.to_string()])
            .args(["--count", &o.count.to_string()])
            .args(["--source", &o.source])
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        match &sender {
            Sender::Raw(l) => cmd.args(["--addr", &l.local_addr()?.to_string()]),
            Sender::Gateway { device, path, .. } => cmd
                .args(["--addr", &device.to_string(), "--ws-path", path])
                .args(["--app", &o.app, "--device-prefix", &format!("floor{i}")])
                .args(o.topic.iter().flat_map(|t| ["--topic", t.as_str()]))
                .env("PUSHGATE_DEVICE_SECRET", o.secret.as_deref().unwrap_or("")),
        };
        let mut child = cmd.spawn().context("starting a floor sink")?;
        let out = BufReader::new(child.stdout.take().context("sink stdout")?);
        sinks.push((child, out));
    }
    let outcome = match &sender {
        Sender::Raw(listener) => write_rounds(&o, listener, &mut sinks),
        Sender::Gateway { api, .. } => broadcast_rounds(&o, api, &mut sinks),
    };
    for (child, _) in &mut sinks {
        let _ = child.kill();
        let _ = child.wait();
    }
    let result = outcome?;
    print!("{}", summary(&result));
    if let Some(path) = &o.json {
        std::fs::write(path, serde_json::to_string_pretty(&result)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    ensure!(
        result.frames_received == result.frames_expected,
        "the sinks received {} of {} frames",
        result.frames_received,
        result.frames_expected
    );
    Ok(())
}

/// The shortest frame: the 2-byte header and the JSON around the stamp.
const MIN_FRAME: usize = 72;

/// Resolves `host:port`, which must be a loopback address (this mode has
/// no --allow-remote).
fn loopback(host: &str, port: u16, url: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let addr = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("{url}: cannot resolve {host}"))?
        .next()
        .with_context(|| format!("{url}: {host} resolves to no address"))?;
    ensure!(
        addr.ip().is_loopback(),
        "{url}: {} is not a loopback address; floor only runs on this machine",
        addr.ip()
    );
    Ok(addr)
}

/// A loopback listener with a backlog as deep as the gateway's, so the
/// sinks' connects are not dropped and retried.
fn listen() -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

fn wait_ready(sinks: &mut [(Child, BufReader<ChildStdout>)]) -> Result<()> {
    for (_, out) in sinks.iter_mut() {
        let line = read_line(out)?;
        ensure!(line.trim() == "ready", "sink said {line:?}, not ready");
    }
    Ok(())
}

/// Merges the sinks' reports (each sends one when it has every frame or
/// its deadline passed).
fn collect(
    sinks: &mut [(Child, BufReader<ChildStdout>)],
) -> Result<(u64, f64, Option<Percentiles>)> {
    let mut hist = Histogram::<u64>::new(3).context("histogram")?;
    let (mut frames, mut cpu_ms) = (0, 0.0);
    for (_, out) in sinks.iter_mut() {
        let report: SinkReport = serde_json::from_str(&read_line(out)?).context("sink report")?;
        frames += report.frames;
        cpu_ms += report.cpu_ms;
        for (v, n) in report.buckets {
            hist.record_n(v, n).context("merging sink histograms")?;
        }
    }
    Ok((frames, cpu_ms, Percentiles::from_us(&hist)))
}

fn write_rounds(
    o: &FloorOpts,
    listener: &TcpListener,
    sinks: &mut [(Child, BufReader<ChildStdout>)],
) -> Result<FloorResult> {
    listener.set_nonblocking(true)?;
    let start = Instant::now();
    let mut conns = Vec::with_capacity(o.connections);
    while conns.len() < o.connections {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                conns.push(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() > ACCEPT_DEADLINE {
                    bail!("{} of {} connections arrived", conns.len(), o.connections);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e).context("accepting"),
        }
    }
    wait_ready(sinks)?;
    eprintln!(
        "floor: {} connections up in {:.2}s",
        conns.len(),
        start.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs_f64(o.settle));

    let cpu_before = procstat::own_cpu_ms()?;
    let round_ms = if o.threads == 1 {
        (0..o.count)
            .map(|_| write_round(&conns, o.frame_bytes))
            .collect::<Result<Vec<_>>>()?
    } else {
        write_rounds_threaded(&conns, o)?
    };
    let cpu_ms = procstat::own_cpu_ms()? - cpu_before;
    Ok(FloorResult::new(
        o,
        "raw",
        round_ms,
        Some(cpu_ms),
        collect(sinks)?,
    ))
}

/// Gateway mode: `--count` broadcasts back to back through the API, each
/// stamped with its send time; then waits for the sinks.
fn broadcast_rounds(
    o: &FloorOpts,
    ep: &Endpoint,
    sinks: &mut [(Child, BufReader<ChildStdout>)],
) -> Result<FloorResult> {
    let start = Instant::now();
    wait_ready(sinks)?;
    eprintln!(
        "floor: {} devices connected in {:.2}s",
        o.connections,
        start.elapsed().as_secs_f64()
    );
    let api = Api::new(ep, o.api_key.clone(), Duration::from_secs(30));
    let path = format!("/v1/apps/{}/messages", o.app);
    let pad = "x".repeat(o.frame_bytes.saturating_sub(MIN_FRAME + 16));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let to = match &o.topic {
        Some(t) => serde_json::json!({ "topic": t }),
        None => serde_json::json!({ "broadcast": true }),
    };
    // Every device registered (and subscribed) before the first round: a
    // dry run counts them (bounded wait).
    let probe = serde_json::json!({"to": to, "data": null, "dry_run": true});
    let deadline = Instant::now() + ACCEPT_DEADLINE;
    loop {
        let r = rt.block_on(api.post_json(&path, &probe))?;
        let online = r.json().and_then(|v| v["online"].as_u64()).unwrap_or(0);
        if r.status == 200 && online >= o.connections as u64 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the gateway counts {online} of {} devices as targets (HTTP {})",
            o.connections,
            r.status
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs_f64(o.settle));
    let cpu_before = o.gateway_pid.map(procstat::threads_cpu_ms).transpose()?;
    let round_ms = rt.block_on(async {
        let mut rounds = Vec::new();
        for _ in 0..o.count {
            let body = serde_json::json!({
                "to": to,
                "data": {"ts_us": crate::now_us(), "pad": pad},
            });
            let t = Instant::now();
            let r = api.post_json(&path, &body).await?;
            ensure!(
                r.status == 202,
                "broadcast: HTTP {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            );
            rounds.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        anyhow::Ok(rounds)
    })?;
    let seen = collect(sinks)?;
    let cpu_ms = match (o.gateway_pid, cpu_before) {
        (Some(pid), Some(before)) => Some(procstat::threads_cpu_ms(pid)? - before),
        _ => None,
    };
    let sender = if o.topic.is_some() {
        "gateway-topic"
    } else {
        "gateway"
    };
    Ok(FloorResult::new(o, sender, round_ms, cpu_ms, seen))
}

/// One raw frame: a WebSocket text header and a msg frame like the
/// gateway's, stamped with the round's start, padded to `frame_bytes`.
fn frame(frame_bytes: usize) -> ([u8; 2], Vec<u8>) {
    let len = frame_bytes - 2;
    let mut payload = format!(
        r#"{{"t":"msg","id":"floor","data":{{"ts_us":{},"pad":""#,
        crate::now_us()
    );
    let pad = len.saturating_sub(payload.len() + 3);
    payload.extend(std::iter::repeat_n('x', pad));
    payload.push_str(r#""}}"#);
    ([0x81, payload.len() as u8], payload.into_bytes())
}

/// Writes one frame to every connection; returns the round's wall time, ms.
fn write_round(conns: &[TcpStream], frame_bytes: usize) -> Result<f64> {
    let (header, payload) = frame(frame_bytes);
    let t = Instant::now();
    write_all(conns, &header, &payload)?;
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

fn write_all(conns: &[TcpStream], header: &[u8], payload: &[u8]) -> Result<()> {
    for mut s in conns {
        let bufs = [IoSlice::new(header), IoSlice::new(payload)];
        let n = s.write_vectored(&bufs).context("writing a frame")?;
        if n < header.len() + payload.len() {
            // A short write only happens with a full send buffer, which one
            // small frame per round never fills; finish it plainly.
            let mut all = header.to_vec();
            all.extend_from_slice(payload);
            s.write_all(&all[n..]).context("writing a frame")?;
        }
    }
    Ok(())
}

/// Rounds with the connections split over `--threads` threads, which start
/// each round together; a round ends when the last thread is done.
fn write_rounds_threaded(conns: &[TcpStream], o: &FloorOpts) -> Result<Vec<f64>> {
    let parts: Vec<&[TcpStream]> = conns.chunks(conns.len().div_ceil(o.threads)).collect();
    let barrier = Barrier::new(parts.len() + 1);
    let slot = std::sync::Mutex::new(frame(o.frame_bytes));
    let poisoned = || anyhow::anyhow!("a writer thread panicked");
    std::thread::scope(|scope| {
        let workers: Vec<_> = parts
            .iter()
            .map(|part| {
                let (barrier, slot) = (&barrier, &slot);
                scope.spawn(move || -> Result<()> {
                    // Every thread meets every barrier, even after an error,
                    // so the rounds always end.
                    let mut failed = None;
                    for _ in 0..o.count {
                        barrier.wait();
                        if failed.is_none() {
                            let written = match slot.lock() {
                                Ok(f) => write_all(part, &f.0, &f.1),
                                Err(_) => Err(poisoned()),
                            };
                            failed = written.err();
                        }
                        barrier.wait();
                    }
                    failed.map_or(Ok(()), Err)
                })
            })
            .collect();
        let mut rounds = Vec::new();
        for _ in 0..o.count {
            *slot.lock().map_err(|_| poisoned())? = frame(o.frame_bytes);
            let t = Instant::now();
            barrier.wait();
            barrier.wait();
            rounds.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        for w in workers {
            w.join().map_err(|_| poisoned())??;
        }
        Ok(rounds)
    })
}

fn read_line(out: &mut BufReader<ChildStdout>) -> Result<String> {
    let mut line = String::new();
    let n = out.read_line(&mut line).context("reading a sink")?;
    ensure!(n > 0, "a floor sink exited early (see its error above)");
    Ok(line)
}

fn summary(r: &FloorResult) -> String {
    let mut s = match r.sender {
        "raw" => format!(
            "floor: {} plain TCP connections, {} round(s) of {}-byte frames, {} writer thread(s), {} sink process(es)\n",
            r.connections, r.rounds, r.frame_bytes, r.threads, r.sinks
        ),
        _ => format!(
            "floor: {} devices on the gateway, {} {}(s), {} sink process(es)\n",
            r.connections,
            r.rounds,
            if r.sender == "gateway-topic" { "topic message" } else { "broadcast" },
            r.sinks
        ),
    };
    let rounds: Vec<String> = r.round_ms.iter().map(|m| format!("{m:.1}")).collect();
    let what = if r.sender == "raw" {
        "writer  round wall ms"
    } else {
        "api     202 in ms"
    };
    s += &format!("  {what} [{}]\n", rounds.join(", "));
    match (r.sender_cpu_ms, r.sender_cpu_ms_per_1000) {
        (Some(c), Some(k)) => {
            s += &format!(
                "  {} cpu {c:.1} ms = {k:.2} ms per 1000 deliveries\n",
                if r.sender == "raw" {
                    "writer "
                } else {
                    "gateway"
                }
            )
        }
        _ => s += "  gateway cpu not measured (give --gateway-pid)\n",
    }
    s += &format!(
        "  sinks   frames {}/{}  cpu {:.1} ms = {:.2} ms per 1000 frames\n",
        r.frames_received,
        r.frames_expected,
        r.sink_cpu_ms,
        r.sink_cpu_ms * 1000.0 / r.frames_expected.max(1) as f64
    );
    if let Some(p) = &r.latency_ms {
        s += &format!("  latency {}\n", p.line());
    }
    s
}

/// Entry point of the internal `floor-sink` process: plain blocking
/// connects (and WebSocket handshakes in gateway mode), then one
/// level-triggered epoll loop over all of them with no runtime, tasks or
/// buffering beyond a frame's remainder: the cheapest client this machine
/// can run, so what it sees is the sender's doing.
pub fn sink_main(o: SinkOpts) -> Result<()> {
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
    use std::io::Read;

    crate::worker::raise_nofile();
    let sources = crate::target::parse_sources(&o.source, false)?;
    let signer = match (&o.ws_path, &o.secret) {
        (Some(_), Some(secret)) => Some(crate::token::Signer::new(
            o.app.as_deref().unwrap_or("demo"),
            secret,
            3600,
        )),
        (Some(_), None) => bail!("--ws-path needs the device secret"),
        _ => None,
    };
    let topics: Vec<String> = o.topic.iter().cloned().collect();
    // A frame that arrived in pieces keeps its first part here (rare).
    let mut partial: Vec<Vec<u8>> = vec![Vec::new(); o.connections];
    let mut streams = Vec::with_capacity(o.connections);
    for i in 0..o.connections {
        let source = (!sources.is_empty()).then(|| sources[i % sources.len()]);
        let mut s = connect(o.addr, source).with_context(|| format!("connection {i}"))?;
        if let (Some(path), Some(signer)) = (&o.ws_path, &signer) {
            let device = format!("{}-{i}", o.device_prefix);
            let token = signer.token(&device, &topics)?;
            partial[i] = upgrade(&mut s, o.addr, path, &token)
                .with_context(|| format!("the WebSocket handshake of {device}"))?;
            if let Some(topic) = &o.topic {
                let sub = serde_json::json!({"t": "sub", "topic": topic}).to_string();
                s.write_all(&client_frame(sub.as_bytes()))
                    .with_context(|| format!("subscribing {device}"))?;
            }
        }
        streams.push(s);
    }
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll_create")?;
    for (i, s) in streams.iter().enumerate() {
        s.set_nonblocking(true)?;
        epoll
            .add(s, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))
            .context("epoll_ctl")?;
    }
    println!("ready");
    let cpu_before = procstat::own_cpu_ms()?;
    let expected = o.connections as u64 * u64::from(o.count);
    let mut hist = Histogram::<u64>::new(3).context("histogram")?;
    let mut frames = 0u64;
    let mut events = vec![EpollEvent::empty(); 1024];
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = Instant::now() + SINK_DEADLINE;
    while frames < expected && Instant::now() < deadline {
        let ready = epoll.wait(&mut events, 100u16).context("epoll_wait")?;
        for ev in &events[..ready] {
            let i = ev.data() as usize;
            let n = match (&streams[i]).read(&mut buf) {
                Ok(0) => bail!("connection {i} was closed"),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e).context("reading"),
            };
            let now = crate::now_us();
            let mut stamp = |text: &[u8]| {
                if let Some(ts) = stamp_of(text) {
                    let _ = hist.record(now.saturating_sub(ts));
                    frames += 1;
                }
            };
            let held = &mut partial[i];
            if held.is_empty() {
                let used = text_frames(&buf[..n], &mut stamp)?;
                held.extend_from_slice(&buf[used..n]);
            } else {
                held.extend_from_slice(&buf[..n]);
                let used = text_frames(held, &mut stamp)?;
                held.drain(..used);
                if held.is_empty() {
                    *held = Vec::new();
                }
            }
        }
    }
    let report = SinkReport {
        frames,
        cpu_ms: procstat::own_cpu_ms()? - cpu_before,
        buckets: hist
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect(),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// A blocking connect from `source` (loopback connects complete at once).
fn connect(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = crate::net::client_socket(addr, source)?;
    socket.connect(&addr.into())?;
    Ok(socket.into())
}

/// The client side of the WebSocket upgrade, blocking; returns the bytes
/// that came after the 101 head (the gateway's first frames).
fn upgrade(s: &mut TcpStream, addr: SocketAddr, path: &str, token: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    )?;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let end = loop {
        if let Some(at) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        ensure!(got.len() < 16 * 1024, "no end of the response head");
        let n = s.read(&mut buf)?;
        ensure!(n > 0, "the gateway closed the connection");
        got.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&got[..end]);
    ensure!(
        head.starts_with("HTTP/1.1 101"),
        "refused: {}",
        head.lines().next().unwrap_or("")
    );
    s.set_read_timeout(None)?;
    Ok(got[end..].to_vec())
}

/// A masked client text frame (RFC 6455 5.3) of a short payload.
fn client_frame(payload: &[u8]) -> Vec<u8> {
    const MASK: [u8; 4] = [0x5a, 0x17, 0xc3, 0x88];
    assert!(payload.len() < 126, "short frames only");
    let mut f = vec![0x81, 0x80 | payload.len() as u8];
    f.extend_from_slice(&MASK);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    f
}

/// Frames bigger than this are refused (the gateway's are < 64 KiB).
const MAX_FRAME: u64 = 1 << 20;

/// Calls `on_text` with the payload of each complete text frame at the
/// front of `buf` (server frames are unmasked); returns the bytes used.
/// Control and binary frames are skipped.
fn text_frames(buf: &[u8], mut on_text: impl FnMut(&[u8])) -> Result<usize> {
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        if rest.len() < 2 {
            return Ok(at);
        }
        let (len, head) = match rest[1] & 0x7f {
            126 if rest.len() >= 4 => (u64::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
            127 if rest.len() >= 10 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&rest[2..10]);
                (u64::from_be_bytes(b), 10)
            }
            126 | 127 => return Ok(at),
            n => (u64::from(n), 2),
        };
        ensure!(len <= MAX_FRAME, "a {len}-byte frame");
        let end = head + len as usize;
        if rest.len() < end {
            return Ok(at);
        }
        if rest[0] & 0x0f == 1 {
            on_text(&rest[head..end]);
        }
        at += end;
    }
}

/// The `"ts_us":N` stamp in a frame's text, if any.
fn stamp_of(text: &[u8]) -> Option<u64> {
    const KEY: &[u8] = br#""ts_us":"#;
    let at = text.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits = text[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&text[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_frames_are_gateway_shaped_and_stamped() {
        for size in [MIN_FRAME, 100, 125] {
            let (h, p) = frame(size);
            assert_eq!(2 + p.len(), size, "size {size}");
            assert_eq!(usize::from(h[1]), p.len());
            let v: serde_json::Value = serde_json::from_slice(&p).expect("json");
            assert_eq!(v["t"], "msg");
            assert!(stamp_of(&p).is_some_and(|ts| ts > 1_600_000_000_000_000));
        }
    }

    #[test]
    fn text_frames_split_anywhere_are_found_once() {
        let mut wire = Vec::new();
        let texts: [&[u8]; 3] = [
            br#"{"ts_us":11}"#,
            &[b'y'; 300],
            br#"{"t":"msg","data":{"ts_us":33}}"#,
        ];
        for t in texts {
            wire.push(0x81);
            if t.len() < 126 {
                wire.push(t.len() as u8);
            } else {
                wire.push(126);
                wire.extend_from_slice(&(t.len() as u16).to_be_bytes());
            }
            wire.extend_from_slice(t);
        }
        // A ping in the middle is skipped.
        wire.splice(0..0, [0x89, 0]);
        for cut in 0..wire.len() {
            let mut stamps = Vec::new();
            let mut held = wire[..cut].to_vec();
            let used = text_frames(&held, |t| stamps.extend(stamp_of(t))).expect("parses");
            held.drain(..used);
            held.extend_from_slice(&wire[cut..]);
            let used = text_frames(&held, |t| stamps.extend(stamp_of(t))).expect("parses");
            assert_eq!(used, held.len(), "cut {cut}");
            assert_eq!(stamps, [11, 33], "cut {cut}");
        }
    }

    #[test]
    fn client_frames_are_masked() {
        let f = client_frame(b"hello");
        assert_eq!(&f[..2], &[0x81, 0x80 | 5]);
        let mask = &f[2..6];
        let text: Vec<u8> = f[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        assert_eq!(text, b"hello");
        assert_ne!(&f[6..], b"hello");
    }

    #[test]
    fn huge_frames_are_refused() {
        let mut wire = vec![0x81, 127];
        wire.extend_from_slice(&(MAX_FRAME + 1).to_be_bytes());
        assert!(text_frames(&wire, |_| ()).is_err());
    }
}
