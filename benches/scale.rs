//! The in-process scale bench: up to a million device connections in one
//! process, through the real handshake and connection task
//! (`pushgate::device::serve_stream`) over in-memory duplex pipes, so no
//! file descriptors are used and the fd limit does not apply.
//!
//! Each client writes a real upgrade request with its own device token,
//! reads the `101` and the `hello` frame, then keeps only its pipe end, a
//! waker and a few bytes of frame-parsing state; a few reader tasks answer
//! the gateway's heartbeat pings with pongs and count `msg` frames. After a
//! hold (heartbeat ticks included), one broadcast is handed to every
//! connection exactly as the fan-out worker does it (`hub.app_targets` +
//! `fanout::hand_out` of one shared frame), timed until every client has
//! received it.
//!
//! RSS is the whole process: gateway + pipes + clients. Run it a second
//! time with `--trivial` (a do-nothing server that answers the upgrade with
//! the same bytes and keeps only its pipe end) to measure pipes + clients;
//! the difference is what the gateway's connection state costs.
//!
//! ```text
//! cargo bench --bench scale -- --conns 1000000
//! cargo bench --bench scale -- --conns 1000000 --trivial
//! ```
//! Flags: `--conns N` (default 100000), `--trivial`, `--heartbeat SECS`
//! (default 10), `--hold SECS` (default 25), `--pipe BYTES` (duplex
//! capacity, default 1024), `--batch N` (handshakes in flight, default
//! 10000), `--group N` (clients per reader task, default 50000).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use pushgate::auth::{issue_device_token, Auth};
use pushgate::device::{serve_stream, DeviceCtx};
use pushgate::fanout::{encode, hand_out};
use pushgate::hub::{Hub, MsgKind, Out};
use pushgate::metrics::Metrics;
use pushgate::protocol::MsgTarget;
use pushgate::shutdown::Drain;
use pushgate::store::memory::MemoryStore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};

const APP: &str = "bench";
const SECRET: &str = "scale-bench-secret-0123456789";
/// A masked pong with an empty payload (mask key 0): what a device sends
/// back for a ping.
const PONG: [u8; 6] = [0x8A, 0x80, 0, 0, 0, 0];
/// How many ready clients a reader serves before yielding.
const READER_SLICE: usize = 4096;
/// Every wait is bounded.
const DELIVERY_LIMIT: Duration = Duration::from_secs(600);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The gateway binary's allocator, set up as `pushgate serve` does
/// (src/main.rs), so the RSS figures are the binary's.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

struct Args {
    conns: usize,
    trivial: bool,
    heartbeat: u64,
    hold: u64,
    pipe: usize,
    batch: usize,
    group: usize,
}

fn parse_args() -> Result<Args, BoxError> {
    let mut args = Args {
        conns: 100_000,
        trivial: false,
        heartbeat: 10,
        hold: 25,
        pipe: 1024,
        batch: 10_000,
        group: 50_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || -> Result<usize, BoxError> {
            let v = it.next().ok_or(format!("{flag} needs a value"))?;
            Ok(v.parse().map_err(|e| format!("{flag} {v}: {e}"))?)
        };
        match flag.as_str() {
            "--conns" => args.conns = value()?,
            "--heartbeat" => args.heartbeat = value()? as u64,
            "--hold" => args.hold = value()? as u64,
            "--pipe" => args.pipe = value()?,
            "--batch" => args.batch = value()?.max(1),
            "--group" => args.group = value()?.max(1),
            "--trivial" => args.trivial = true,
            "--bench" => {} // cargo bench passes it to every bench binary
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    Ok(args)
}

/// Resident set size of this process, from /proc.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn cpu_secs() -> f64 {
    // utime + stime of the whole process, in clock ticks (100/s on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn ctx(heartbeat: u64, conns: usize) -> Result<Arc<DeviceCtx>, BoxError> {
    let cfg = pushgate::config::parse(&format!(
        "[device]\nheartbeat_secs = {heartbeat}\n\n[[app]]\nid = \"{APP}\"\ndevice_secret = \"{SECRET}\"\napi_keys = [\"bench-key\"]\nmax_connections = {}\n",
        conns + 1
    ))
    .map_err(|e| e.to_string())?;
    let hub = Arc::new(Hub::new(
        cfg.apps.iter().map(|a| (a.id.clone(), a.max_connections)),
    ));
    let metrics = Arc::new(Metrics::new(&[APP])?);
    Ok(Arc::new(DeviceCtx::new(
        hub,
        Arc::new(MemoryStore::new()),
        metrics,
        Arc::new(Auth::new(&cfg)),
        Arc::new(Drain::new()),
        cfg.device.clone(),
    )))
}

fn upgrade_request(token: &str) -> String {
    format!(
        "GET /v1/connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
}

/// Read the `101` head and one complete server frame (the `hello`).
async fn read_hello(client: &mut DuplexStream) -> Result<(), BoxError> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Err("EOF before hello".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            if !buf.starts_with(b"HTTP/1.1 101") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                return Err(format!("upgrade refused: {head}").into());
            }
            let frame = &buf[end + 4..];
            if frame.len() >= 2 && frame.len() >= 2 + usize::from(frame[1] & 0x7f) {
                return Ok(());
            }
        }
    }
}

/// The trivial server: takes the request head, answers with a `101` and a
/// `hello` frame of the real server's sizes, and keeps nothing but its end.
async fn trivial_server(server: &mut DuplexStream, device: &str) -> Result<(), BoxError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = server.read(&mut chunk).await?;
        if n == 0 {
            return Err("EOF in request".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    server
        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
        .await?;
    let hello = pushgate::protocol::hello_frame(device, 10);
    let mut frame = vec![0x81, hello.len() as u8];
    frame.extend_from_slice(hello.as_bytes());
    server.write_all(&frame).await?;
    Ok(())
}

/// One device: upgrade, hello; returns its pipe end (and, in trivial mode,
/// the server's end, which must stay open).
async fn connect(
    ctx: Option<Arc<DeviceCtx>>,
    i: usize,
    pipe: usize,
    exp: u64,
) -> Result<(DuplexStream, Option<DuplexStream>), BoxError> {
    let device = format!("d{i}");
    let token = issue_device_token(SECRET, APP, &device, exp, &[])?;
    let (mut client, mut server) = tokio::io::duplex(pipe);
    let request = upgrade_request(&token);
    match ctx {
        Some(ctx) => {
            tokio::spawn(serve_stream(ctx, server));
            client.write_all(request.as_bytes()).await?;
            read_hello(&mut client).await?;
            Ok((client, None))
        }
        None => {
            client.write_all(request.as_bytes()).await?;
            trivial_server(&mut server, &device).await?;
            read_hello(&mut client).await?;
            Ok((client, Some(server)))
        }
    }
}

#[derive(Default)]
struct Counters {
    msgs: AtomicU64,
    pings: AtomicU64,
    pongs_skipped: AtomicU64,
    closed: AtomicU64,
}

/// What wakes a reader: the index of the client whose pipe has data.
struct Ready {
    queue: Mutex<Vec<u32>>,
    task: AtomicWaker,
}

struct ClientWaker {
    idx: u32,
    ready: Arc<Ready>,
}

impl Wake for ClientWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.ready
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(self.idx);
        self.ready.task.wake();
    }
}

/// A client at rest: its pipe end, its waker, and the parse state of the
/// frame it is in the middle of.
struct Client {
    stream: DuplexStream,
    waker: Waker,
    /// Payload bytes of the current frame still to skip.
    skip: u32,
    hdr: [u8; 10],
    hdr_len: u8,
    closed: bool,
}

impl Client {
    fn new(stream: DuplexStream, idx: u32, ready: &Arc<Ready>) -> Client {
        Client {
            stream,
            waker: Waker::from(Arc::new(ClientWaker {
                idx,
                ready: ready.clone(),
            })),
            skip: 0,
            hdr: [0; 10],
            hdr_len: 0,
            closed: false,
        }
    }

    /// Read until the pipe is empty (which registers this client's waker).
    fn poll(&mut self, scratch: &mut [u8], counters: &Counters) {
        if self.closed {
            return;
        }
        let waker = self.waker.clone();
        let mut cx = Context::from_waker(&waker);
        loop {
            let mut rb = ReadBuf::new(scratch);
            match Pin::new(&mut self.stream).poll_read(&mut cx, &mut rb) {
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                    let n = rb.filled().len();
                    self.parse(&scratch[..n], &mut cx, counters);
                }
                Poll::Ready(_) => {
                    self.closed = true;
                    counters.closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Poll::Pending => return,
            }
        }
    }

    fn parse(&mut self, mut bytes: &[u8], cx: &mut Context<'_>, counters: &Counters) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let k = (self.skip as usize).min(bytes.len());
                self.skip -= k as u32;
                bytes = &bytes[k..];
                continue;
            }
            self.hdr[usize::from(self.hdr_len)] = bytes[0];
            self.hdr_len += 1;
            bytes = &bytes[1..];
            if self.hdr_len < 2 {
                continue;
            }
            let (need, len) = match self.hdr[1] & 0x7f {
                126 => (4, u64::from(u16::from_be_bytes([self.hdr[2], self.hdr[3]]))),
                127 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&self.hdr[2..10]);
                    (10, u64::from_be_bytes(b))
                }
                l => (2, u64::from(l)),
            };
            if usize::from(self.hdr_len) < need {
                continue;
            }
            self.hdr_len = 0;
            self.skip = len as u32;
            match self.hdr[0] & 0x0f {
                0x1 => {
                    counters.msgs.fetch_add(1, Ordering::Relaxed);
                }
                0x9 => {
                    counters.pings.fetch_add(1, Ordering::Relaxed);
                    match Pin::new(&mut self.stream).poll_write(cx, &PONG) {
                        Poll::Ready(Ok(6)) => {}
                        _ => {
                            counters.pongs_skipped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// Serve one group of clients: whichever a pipe woke, read it.
async fn reader(mut clients: Vec<Client>, ready: Arc<Ready>, counters: Arc<Counters>) {
    let mut scratch = vec![0u8; 4096];
    let mut batch: Vec<u32> = Vec::new();
    // Poll everyone once so every pipe knows its waker.
    for c in &mut clients {
        c.poll(&mut scratch, &counters);
    }
    std::future::poll_fn(|cx| {
        ready.task.register(cx.waker());
        if batch.is_empty() {
            std::mem::swap(
                &mut batch,
                &mut *ready.queue.lock().unwrap_or_else(|p| p.into_inner()),
            );
        }
        let take = batch.len().min(READER_SLICE);
        for idx in batch.drain(batch.len() - take..) {
            clients[idx as usize].poll(&mut scratch, &counters);
        }
        if !batch.is_empty()
            || !ready
                .queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
        {
            cx.waker().wake_by_ref();
        }
        Poll::<()>::Pending
    })
    .await;
}

async fn wait_for(counter: &AtomicU64, target: u64, start: Instant) -> Option<Duration> {
    while counter.load(Ordering::Relaxed) < target {
        if start.elapsed() > DELIVERY_LIMIT {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Some(start.elapsed())
}

fn main() -> Result<(), BoxError> {
    let args = parse_args()?;
    tikv_jemalloc_ctl::background_thread::write(true)
        .map_err(|e| format!("cannot start jemalloc's background thread: {e}"))?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> Result<(), BoxError> {
    let n = args.conns;
    let mode = if args.trivial {
        "trivial server (pipes + clients only)"
    } else {
        "real connection code"
    };
    println!(
        "scale bench: {n} connections, {mode}, duplex {} B, heartbeat {} s, hold {} s, {} worker threads",
        args.pipe,
        args.heartbeat,
        args.hold,
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    let ctx = ctx(args.heartbeat, n)?;
    let ticker = tokio::spawn(ctx.ticker.clone().run());
    let exp = pushgate::device::ticker::unix_secs() + 86_400;

    let rss0 = rss();
    let cpu0 = cpu_secs();
    let start = Instant::now();
    // Clients go to a reader as soon as their group is full, so pings are
    // answered (and no connection idles out) while the rest connect.
    let counters = Arc::new(Counters::default());
    let mut readers = Vec::new();
    let mut group: Option<(Vec<Client>, Arc<Ready>)> = None;
    let mut servers: Vec<DuplexStream> = Vec::with_capacity(if args.trivial { n } else { 0 });
    let mut next_report = 100_000;
    for first in (0..n).step_by(args.batch) {
        let last = (first + args.batch).min(n);
        let tasks: Vec<_> = (first..last)
            .map(|i| {
                let c = (!args.trivial).then(|| ctx.clone());
                tokio::spawn(connect(c, i, args.pipe, exp))
            })
            .collect();
        for t in tasks {
            let (client, server) = t.await??;
            servers.extend(server);
            let (clients, ready) = group.get_or_insert_with(|| {
                let ready = Arc::new(Ready {
                    queue: Mutex::new(Vec::new()),
                    task: AtomicWaker::new(),
                });
                (Vec::with_capacity(args.group), ready)
            });
            let idx = clients.len() as u32;
            clients.push(Client::new(client, idx, ready));
            if clients.len() == args.group {
                if let Some((clients, ready)) = group.take() {
                    readers.push(tokio::spawn(reader(clients, ready, counters.clone())));
                }
            }
        }
        if last >= next_report || last == n {
            println!(
                "  {last:>8} up after {:6.1} s, RSS {:8.1} MiB",
                start.elapsed().as_secs_f64(),
                mib(rss())
            );
            next_report += 100_000;
        }
    }
    if let Some((clients, ready)) = group.take() {
        readers.push(tokio::spawn(reader(clients, ready, counters.clone())));
    }
    let setup = start.elapsed();
    let setup_cpu = cpu_secs() - cpu0;
    if !args.trivial {
        let registered = ctx.hub.connected(0);
        if registered != n as u64 {
            return Err(format!("{registered} registered, expected {n}").into());
        }
    }
    let rss_setup = rss();
    println!(
        "setup: {n} connections in {:.1} s ({:.0}/s), CPU {:.1} s, RSS {:.1} MiB -> {:.1} MiB",
        setup.as_secs_f64(),
        n as f64 / setup.as_secs_f64(),
        setup_cpu,
        mib(rss0),
        mib(rss_setup)
    );

    // Hold: every connection gets heartbeat ticks (pings) and answers them.
    let hold_start = Instant::now();
    let cpu_hold0 = cpu_secs();
    while hold_start.elapsed() < Duration::from_secs(args.hold) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        println!(
            "  hold {:4.0} s: pings {} (pongs skipped {}), closed {}, RSS {:.1} MiB",
            hold_start.elapsed().as_secs_f64(),
            counters.pings.load(Ordering::Relaxed),
            counters.pongs_skipped.load(Ordering::Relaxed),
            counters.closed.load(Ordering::Relaxed),
            mib(rss())
        );
    }
    let hold_cpu = cpu_secs() - cpu_hold0;
    let rss_idle = rss();
    let per_conn = (rss_idle.saturating_sub(rss0)) as f64 / n as f64;
    println!(
        "idle: RSS {:.1} MiB, {:.0} B per connection over the start ({:.0} B with the start), {} pings answered, {} closed; CPU while idle {:.2} s over {:.0} s",
        mib(rss_idle),
        per_conn,
        rss_idle as f64 / n as f64,
        counters.pings.load(Ordering::Relaxed),
        counters.closed.load(Ordering::Relaxed),
        hold_cpu,
        hold_start.elapsed().as_secs_f64()
    );

    if !args.trivial {
        // One broadcast to all, as the fan-out worker does it.
        let before = counters.msgs.load(Ordering::Relaxed);
        let data = r#"{"title":"Hi","body":"scale bench broadcast"}"#;
        let cpu_b0 = cpu_secs();
        let t0 = Instant::now();
        let targets = ctx.hub.app_targets(0);
        let t_targets = t0.elapsed();
        let frame = encode(
            "0190c2a4-7d3e-7a31-9c5b-2f1e8d4c6a10",
            MsgTarget::Broadcast,
            data,
            MsgKind::Broadcast,
            Instant::now(),
            false,
        );
        let out = Out { frame, seq: 0 };
        let mut handed = 0;
        for chunk in targets.chunks(4096) {
            handed += hand_out(chunk, &out, ctx.cfg.outbound_queue, &ctx.metrics);
            tokio::task::yield_now().await;
        }
        let t_handed = t0.elapsed();
        drop(targets);
        drop(out);
        let n64 = n as u64;
        let half = wait_for(&counters.msgs, before + n64 / 2, t0).await;
        let p99 = wait_for(&counters.msgs, before + n64 * 99 / 100, t0).await;
        let all = wait_for(&counters.msgs, before + n64, t0).await;
        let cpu_b = cpu_secs() - cpu_b0;
        let fmt = |d: Option<Duration>| {
            d.map_or("not reached".to_string(), |d| {
                format!("{:.3} s", d.as_secs_f64())
            })
        };
        println!(
            "broadcast to {n}: targets listed {:.3} s, handed to {handed} queues {:.3} s, 50% received {}, 99% {}, 100% {}; CPU {:.2} s ({:.2} ms per 1000 deliveries, clients included)",
            t_targets.as_secs_f64(),
            t_handed.as_secs_f64(),
            fmt(half),
            fmt(p99),
            fmt(all),
            cpu_b,
            cpu_b * 1e6 / n as f64
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rss_after = rss();
        println!(
            "after the broadcast (+3 s): RSS {:.1} MiB ({:+.0} B per connection over idle), received {}, closed {}",
            mib(rss_after),
            (rss_after as f64 - rss_idle as f64) / n as f64,
            counters.msgs.load(Ordering::Relaxed) - before,
            counters.closed.load(Ordering::Relaxed)
        );
    }
    ticker.abort();
    for r in &readers {
        r.abort();
    }
    drop(servers);
    // Tearing down a million tasks and pipes measures nothing: leave.
    std::process::exit(0)
}
