//! The worker process: holds up to ~15k device connections (one process may
//! hold only ~20k fds here), ramps them at its share of the rate, and talks
//! to the coordinator in JSON lines (config and commands on stdin, events on
//! stdout). It exits when told to finish or when its stdin closes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::device::{self, Control, Device, Shared};
use crate::wire::{Cmd, Event, WorkerConfig};

/// How often progress goes to the coordinator.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// How long connection tasks get to close after Finish.
const FINISH_GRACE: Duration = Duration::from_secs(10);

/// Entry point of `pushgate-loadtest worker`.
pub fn main() -> Result<()> {
    // One thread: a worker is one epoll loop, like the load clients the
    // targets were measured with; parallelism comes from more workers.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the worker runtime")?;
    let r = rt.block_on(run());
    // stdin is read on a blocking thread that may still wait for a line.
    rt.shutdown_timeout(Duration::from_secs(1));
    r
}

/// Raises the soft fd limit to the hard one; returns the limit in force.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

async fn run() -> Result<()> {
    let fd_limit = raise_nofile();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let first = lines
        .next_line()
        .await
        .context("reading the worker config")?
        .context("no worker config on stdin (this subcommand is started by the coordinator)")?;
    let cfg: WorkerConfig = serde_json::from_str(&first).context("parsing the worker config")?;
    let worker = cfg.worker;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(cfg.deadline_ms);

    let (out_tx, mut out_rx) = mpsc::channel::<Event>(64);
    let writer = tokio::spawn(async move {
        let mut out = tokio::io::stdout();
        while let Some(ev) = out_rx.recv().await {
            let mut line = match serde_json::to_vec(&ev) {
                Ok(l) => l,
                Err(_) => continue,
            };
            line.push(b'\n');
            if out.write_all(&line).await.is_err() || out.flush().await.is_err() {
                break;
            }
        }
    });

    // Leave room for the runtime's own fds and stdio.
    if cfg.count + 64 > fd_limit {
        let message = format!(
            "worker {worker}: {} connections need more than its fd limit {fd_limit}; use more --workers or a lower --per-worker",
            cfg.count
        );
        let _ = out_tx.send(Event::Fatal { worker, message }).await;
        drop(out_tx);
        let _ = writer.await;
        return Ok(());
    }
    let shared = match Shared::new(cfg) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            let message = format!("worker {worker}: {e:#}");
            let _ = out_tx.send(Event::Fatal { worker, message }).await;
            drop(out_tx);
            let _ = writer.await;
            return Ok(());
        }
    };
    let _ = out_tx.send(Event::Ready { worker, fd_limit }).await;

    // Commands from the coordinator; EOF (coordinator gone) means finish.
    let (ctl_tx, ctl_rx) = watch::channel(Control::default());
    let (start_tx, mut start_rx) = mpsc::channel::<()>(1);
    tokio::spawn(async move {
        let commands = async {
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Cmd>(&line) {
                    Ok(Cmd::Connect) => {
                        let _ = start_tx.try_send(());
                    }
                    Ok(Cmd::Storm { round }) => {
                        ctl_tx.send_modify(|c| c.storm_round = round);
                    }
                    Ok(Cmd::Finish) => break,
                    Err(_) => {}
                }
            }
        };
        // Finish, EOF, or the worker's own deadline: all end the same way.
        let _ = tokio::time::timeout_at(deadline, commands).await;
        ctl_tx.send_modify(|c| c.finish = true);
        // Keep the sender alive until the process ends, so tasks see
        // `finish` rather than a closed channel mid-close.
        std::future::pending::<()>().await;
    });

    let mut ctl = ctl_rx.clone();
    let started = tokio::select! {
        s = start_rx.recv() => s.is_some(),
        _ = async { while !ctl.borrow_and_update().finish { if ctl.changed().await.is_err() { break; } } } => false,
    };

    let ramp = started.then(|| tokio::spawn(ramp(shared.clone(), ctl_rx.clone())));

    // Progress until finish.
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    let mut ctl = ctl_rx.clone();
    loop {
        if ctl.borrow_and_update().finish {
            break;
        }
        tokio::select! {
            _ = tick.tick() => {
                let _ = out_tx.send(Event::Progress(shared.progress())).await;
            }
            r = ctl.changed() => if r.is_err() { break; },
        }
    }
    if let Some(ramp) = ramp {
        let _ = tokio::time::timeout(FINISH_GRACE, ramp).await;
    }
    let _ = out_tx.send(Event::Report(Box::new(shared.report()))).await;
    drop(out_tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    Ok(())
}

/// Spawns the device tasks at this worker's rate, then waits for them all.
async fn ramp(sh: Arc<Shared>, ctl: watch::Receiver<Control>) {
    let mut set = JoinSet::new();
    let count = sh.cfg.count;
    let rate = sh.cfg.rate;
    let start = tokio::time::Instant::now();
    sh.ramp_start_us.store(crate::now_us(), Ordering::Relaxed);
    let mut fin = ctl.clone();
    for n in 0..count {
        if rate > 0.0 {
            let at = start + Duration::from_secs_f64(n as f64 / rate);
            tokio::time::sleep_until(at).await;
        }
        if fin.borrow_and_update().finish {
            sh.ramp_pending.fetch_sub(count - n, Ordering::AcqRel);
            break;
        }
        // The handshake slot is taken here, so the ramp never runs ahead
        // of what can be in flight.
        let permit = loop {
            tokio::select! {
                p = sh.permits.clone().acquire_owned() => break p.ok(),
                r = fin.changed() => if r.is_err() || fin.borrow().finish { break None },
            }
        };
        let Some(permit) = permit else {
            sh.ramp_pending.fetch_sub(count - n, Ordering::AcqRel);
            break;
        };
        let dev = Device::new(&sh.cfg, n);
        set.spawn(device::run(sh.clone(), dev, permit, ctl.clone()));
    }
    sh.ramp_spawned.store(true, Ordering::Release);
    while set.join_next().await.is_some() {}
}
