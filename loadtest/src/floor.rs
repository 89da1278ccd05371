//! `pushgate-loadtest floor`: what this machine's kernel charges for a
//! fan-out, with no gateway at all. One process accepts N plain TCP
//! connections and writes one frame to each of them per round, in a tight
//! loop of blocking vectored writes (header + payload, as the gateway writes
//! a frame); sink processes, one epoll loop each like the load workers, read
//! the frames and time them from the round's start. The writer's CPU per
//! 1000 writes and the sinks' latency percentiles are the floor a gateway's
//! broadcast can approach on this machine but not go below: everything the
//! gateway adds (WebSocket framing, queues, task wake-ups) comes on top.

use std::io::{BufRead, BufReader, IoSlice, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::results::Percentiles;

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
    pub frame_bytes: usize,
    #[arg(long)]
    pub source: String,
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
    pub connections: usize,
    pub rounds: u32,
    pub frame_bytes: usize,
    pub threads: usize,
    pub sinks: usize,
    /// Wall time of each round's writes, ms.
    pub round_ms: Vec<f64>,
    pub writer_cpu_ms: f64,
    pub writer_cpu_ms_per_1000: f64,
    pub frames_received: u64,
    pub frames_expected: u64,
    pub latency_ms: Option<Percentiles>,
    pub sink_cpu_ms: f64,
}

/// Entry point of `pushgate-loadtest floor`.
pub fn main(o: FloorOpts) -> Result<()> {
    ensure!(o.connections > 0, "-n must be at least 1");
    ensure!(
        o.frame_bytes >= 10 && o.frame_bytes <= 125,
        "--frame-bytes must be 10..=125 (one short frame)"
    );
    ensure!(
        o.threads >= 1 && o.sinks >= 1,
        "--threads and --sinks are at least 1"
    );
    ensure!(
        o.connections.div_ceil(o.sinks) <= 18_000,
        "at most 18000 connections per sink process: give more --sinks"
    );
    ensure!(
        o.connections <= 18_000,
        "the writer holds every connection in one process: at most 18000 here"
    );
    crate::worker::raise_nofile();
    let listener = listen().context("binding the floor listener")?;
    let addr = listener.local_addr()?;
    let exe = std::env::current_exe().context("finding this binary")?;
    let mut sinks = Vec::new();
    for i in 0..o.sinks {
        let share = o.connections / o.sinks + usize::from(i < o.connections % o.sinks);
        let mut child = Command::new(&exe)
            .args(["floor-sink", "--addr", &addr.to_string()])
            .args(["--connections", &share.to_string()])
            .args(["--count", &o.count.to_string()])
            .args(["--frame-bytes", &o.frame_bytes.to_string()])
            .args(["--source", &o.source])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a floor sink")?;
        let out = BufReader::new(child.stdout.take().context("sink stdout")?);
        sinks.push((child, out));
    }
    let outcome = write_rounds(&o, &listener, &mut sinks);
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

/// A loopback listener with a backlog as deep as the gateway's, so the
/// sinks' connects are not dropped and retried.
fn listen() -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    socket.listen(4096)?;
    Ok(socket.into())
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
    for (_, out) in sinks.iter_mut() {
        let line = read_line(out)?;
        ensure!(line.trim() == "ready", "sink said {line:?}, not ready");
    }
    eprintln!(
        "floor: {} connections up in {:.2}s",
        conns.len(),
        start.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs_f64(o.settle));

    let cpu_before = own_cpu_ms()?;
    let round_ms = if o.threads == 1 {
        (0..o.count)
            .map(|_| write_round(&conns, o.frame_bytes))
            .collect::<Result<Vec<_>>>()?
    } else {
        write_rounds_threaded(&conns, o)?
    };
    let writer_cpu_ms = own_cpu_ms()? - cpu_before;

    let mut hist = Histogram::<u64>::new(3).context("histogram")?;
    let (mut frames, mut sink_cpu_ms) = (0, 0.0);
    for (_, out) in sinks.iter_mut() {
        let report: SinkReport = serde_json::from_str(&read_line(out)?).context("sink report")?;
        frames += report.frames;
        sink_cpu_ms += report.cpu_ms;
        for (v, n) in report.buckets {
            hist.record_n(v, n).context("merging sink histograms")?;
        }
    }
    let writes = (o.connections as u64) * u64::from(o.count);
    Ok(FloorResult {
        connections: o.connections,
        rounds: o.count,
        frame_bytes: o.frame_bytes,
        threads: o.threads,
        sinks: o.sinks,
        round_ms,
        writer_cpu_ms,
        writer_cpu_ms_per_1000: writer_cpu_ms * 1000.0 / writes as f64,
        frames_received: frames,
        frames_expected: writes,
        latency_ms: Percentiles::from_us(&hist),
        sink_cpu_ms,
    })
}

/// One frame: a 2-byte WebSocket text header and a payload whose first 8
/// bytes are the round's start (Unix µs), padded with `x`.
fn frame(frame_bytes: usize) -> ([u8; 2], Vec<u8>) {
    let len = frame_bytes - 2;
    let header = [0x81, len as u8];
    let mut payload = vec![b'x'; len];
    payload[..8].copy_from_slice(&crate::now_us().to_le_bytes());
    (header, payload)
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

/// This process's CPU time (all threads), ms, from getrusage: µs precision,
/// unlike /proc's 10 ms ticks.
pub fn own_cpu_ms() -> Result<f64> {
    use nix::sys::resource::{getrusage, UsageWho};
    let u = getrusage(UsageWho::RUSAGE_SELF).context("getrusage")?;
    let ms = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1000.0 + t.tv_usec() as f64 / 1000.0;
    Ok(ms(u.user_time()) + ms(u.system_time()))
}

fn summary(r: &FloorResult) -> String {
    let mut s = format!(
        "floor: {} plain TCP connections, {} round(s) of {}-byte frames, {} writer thread(s), {} sink process(es)\n",
        r.connections, r.rounds, r.frame_bytes, r.threads, r.sinks
    );
    let rounds: Vec<String> = r.round_ms.iter().map(|m| format!("{m:.1}")).collect();
    s += &format!("  writer  round wall ms [{}]\n", rounds.join(", "));
    s += &format!(
        "  writer  cpu {:.1} ms = {:.2} ms per 1000 writes\n",
        r.writer_cpu_ms, r.writer_cpu_ms_per_1000
    );
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
/// connects, then one level-triggered epoll loop over all of them with no
/// runtime, tasks or buffering beyond a frame's remainder: the cheapest
/// client this machine can run, so the latencies are the kernel's floor.
pub fn sink_main(o: SinkOpts) -> Result<()> {
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
    use std::io::Read;

    crate::worker::raise_nofile();
    let sources = crate::target::parse_sources(&o.source, false)?;
    let mut streams = Vec::with_capacity(o.connections);
    for i in 0..o.connections {
        let source = (!sources.is_empty()).then(|| sources[i % sources.len()]);
        streams.push(connect(o.addr, source).with_context(|| format!("connection {i}"))?);
    }
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll_create")?;
    for (i, s) in streams.iter().enumerate() {
        s.set_nonblocking(true)?;
        epoll
            .add(s, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))
            .context("epoll_ctl")?;
    }
    println!("ready");
    let cpu_before = own_cpu_ms()?;
    let expected = o.connections as u64 * u64::from(o.count);
    let mut hist = Histogram::<u64>::new(3).context("histogram")?;
    let mut frames = 0u64;
    // A frame split over two reads keeps its first part here.
    let mut partial = vec![(0u8, [0u8; 128]); o.connections];
    let mut events = vec![EpollEvent::empty(); 1024];
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + SINK_DEADLINE;
    while frames < expected && Instant::now() < deadline {
        let ready = epoll.wait(&mut events, 100u16).context("epoll_wait")?;
        for ev in &events[..ready] {
            let i = ev.data() as usize;
            let (have, rest) = &mut partial[i];
            let mut have_n = usize::from(*have);
            buf[..have_n].copy_from_slice(&rest[..have_n]);
            let n = match (&streams[i]).read(&mut buf[have_n..]) {
                Ok(0) => bail!("the writer closed connection {i}"),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e).context("reading"),
            };
            have_n += n;
            let now = crate::now_us();
            let mut at = 0;
            while have_n - at >= o.frame_bytes {
                let mut ts = [0u8; 8];
                ts.copy_from_slice(&buf[at + 2..at + 10]);
                let _ = hist.record(now.saturating_sub(u64::from_le_bytes(ts)));
                at += o.frame_bytes;
                frames += 1;
            }
            let left = have_n - at;
            rest[..left].copy_from_slice(&buf[at..have_n]);
            *have = left as u8;
        }
    }
    let report = SinkReport {
        frames,
        cpu_ms: own_cpu_ms()? - cpu_before,
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
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        let _ = nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        );
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    socket.connect(&addr.into())?;
    Ok(socket.into())
}
