//! The node: wires config, store, hub, fan-out, device listener and API
//! together, runs until a signal, then drains as PROTOCOL.md's "Shutdown"
//! says. Tests start a `Node` in-process on `127.0.0.1:0`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use rand::seq::SliceRandom;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::api::{self, ApiState};
use crate::auth::Auth;
use crate::config::{Config, StoreKind};
use crate::device::{self, DeviceCtx};
use crate::dispatch::{now_ms, Dispatcher};
use crate::fanout::{self, Fanout};
use crate::hub::Hub;
use crate::metrics::{DropReason, Metrics};
use crate::net::{self, ActivatedListeners};
use crate::protocol::CloseReason;
use crate::shutdown::Drain;
use crate::store::memory::MemoryStore;
use crate::store::redb::RedbStore;
use crate::store::{Store, StoreError};

/// Listen backlog for both listeners (the kernel caps it at somaxconn).
const BACKLOG: i32 = 4096;
/// How often expired messages are swept from the store.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);
/// Extra time after the drain window for the last closes to finish.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// How `run` was asked to start.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// Print nothing extra (the CLI prints the dev banner itself); kept for
    /// callers that want the node to do it.
    pub dev_banner: bool,
    /// Listeners passed by systemd socket activation, taken before the
    /// runtime started.
    pub activated: ActivatedListeners,
}

/// Why the node did not start: one line saying what and where.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(String),
    #[error("store at {path}: {source}")]
    Store { path: String, source: StoreError },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// A running gateway.
pub struct Node {
    pub device_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub drain: Arc<Drain>,
    pub hub: Arc<Hub>,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    drain_secs: u64,
    api_stop: tokio::sync::watch::Sender<bool>,
    api_task: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
}

fn listener(
    what: &'static str,
    addr: SocketAddr,
    activated: Option<std::net::TcpListener>,
) -> Result<TcpListener, StartError> {
    let bind_err = |source| StartError::Bind { what, addr, source };
    let std_listener = match activated {
        Some(l) => l,
        None => net::bind_listener(addr, BACKLOG).map_err(bind_err)?,
    };
    std_listener.set_nonblocking(true).map_err(bind_err)?;
    TcpListener::from_std(std_listener).map_err(bind_err)
}

fn open_store(config: &Config) -> Result<Arc<dyn Store>, StartError> {
    Ok(match config.store.kind {
        StoreKind::Memory => Arc::new(MemoryStore::new()),
        StoreKind::Redb => Arc::new(
            RedbStore::open(
                &config.store.path,
                config.store.commit_max_batch,
                config.store.commit_max_wait_us,
            )
            .map_err(|source| StartError::Store {
                path: config.store.path.display().to_string(),
                source,
            })?,
        ),
    })
}

impl Node {
    /// Bind, open the store and start every task. `config` must be validated.
    pub async fn start(config: Config, activated: ActivatedListeners) -> Result<Node, StartError> {
        let tls = match (&config.device.tls_cert, &config.device.tls_key) {
            (Some(cert), Some(key)) => {
                Some(device::tls_acceptor(cert, key).map_err(StartError::Tls)?)
            }
            _ => None,
        };
        let device_listener = listener("device", config.device.listen, activated.device)?;
        let api_listener = listener("api", config.api.listen, activated.api)?;
        let device_addr = device_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                what: "device",
                addr: config.device.listen,
                source,
            })?;
        let api_addr = api_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                what: "api",
                addr: config.api.listen,
                source,
            })?;
        let store = open_store(&config)?;

        let app_ids: Vec<Arc<str>> = config
            .apps
            .iter()
            .map(|a| Arc::from(a.id.as_str()))
            .collect();
        let labels: Vec<&str> = app_ids.iter().map(|a| &**a).collect();
        let metrics = Arc::new(Metrics::new(&labels)?);
        metrics.pending.set(store.pending_total() as i64);
        let hub = Arc::new(Hub::new(
            config
                .apps
                .iter()
                .map(|a| (a.id.clone(), a.max_connections)),
        ));
        let auth = Arc::new(Auth::new(&config));
        let drain = Arc::new(Drain::new());
        let (fanout, fanout_rx) =
            Fanout::new(config.apps.len(), config.api.fanout_queue, metrics.clone());
        let dispatcher = Arc::new(Dispatcher::new(
            hub.clone(),
            store.clone(),
            metrics.clone(),
            fanout,
            config.apps.iter().map(|a| a.max_messages_per_sec),
            config.device.outbound_queue,
            config.messages.max_pending,
        ));
        let ctx = Arc::new(DeviceCtx::new(
            hub.clone(),
            store.clone(),
            metrics.clone(),
            auth.clone(),
            drain.clone(),
            config.device.clone(),
        ));

        let mut background = vec![
            tokio::spawn(ctx.ticker.clone().run()),
            tokio::spawn(fanout::run(
                fanout_rx,
                hub.clone(),
                metrics.clone(),
                config.device.outbound_queue,
            )),
            tokio::spawn(expire_loop(store.clone(), metrics.clone())),
            tokio::spawn(device::serve(device_listener, ctx, tls)),
        ];
        if let Some(watchdog) = crate::systemd::spawn_watchdog() {
            background.push(watchdog);
        }

        let state = Arc::new(ApiState {
            dispatcher,
            auth,
            drain: drain.clone(),
            messages: config.messages.clone(),
            app_ids,
        });
        let (api_stop, mut stop_rx) = tokio::sync::watch::channel(false);
        let router = api::router(state);
        let api_task = tokio::spawn(async move {
            let stopped = async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(api_listener, router)
                .with_graceful_shutdown(stopped)
                .await
            {
                tracing::error!(error = %e, "API server failed");
            }
        });

        tracing::info!(device = %device_addr, api = %api_addr, tls = config.device.tls_cert.is_some(), store = ?config.store.kind, "pushgate serving");
        Ok(Node {
            device_addr,
            api_addr,
            drain,
            hub,
            store,
            metrics,
            drain_secs: config.shutdown.drain_secs,
            api_stop,
            api_task,
            background,
        })
    }

    /// Drain and stop: refuse new work, close every device at a moment
    /// spread uniformly over the drain window, wait for them, let in-flight
    /// API calls finish, flush the store. Returns whether the store flushed.
    pub async fn shutdown(self) -> bool {
        self.drain.start();
        crate::systemd::notify_stopping();
        let window = Duration::from_secs(self.drain_secs);
        let started = tokio::time::Instant::now();
        let mut targets = self.hub.all_targets();
        targets.shuffle(&mut rand::rng());
        let n = targets.len();
        tracing::info!(connections = n, window_secs = self.drain_secs, "draining");
        crate::systemd::notify_status(&format!("draining {n} connections"));
        for (i, conn) in targets.iter().enumerate() {
            let at = started + window.mul_f64(i as f64 / n as f64);
            tokio::time::sleep_until(at).await;
            conn.close(CloseReason::Draining, rand::random_range(0..=5000));
        }
        drop(targets);
        // Anyone who registered after the snapshot (a handshake in flight
        // when the drain began) is closed now; then wait for the sockets.
        let deadline = started + window + DRAIN_GRACE;
        while self.hub.live() > 0 && tokio::time::Instant::now() < deadline {
            for conn in self.hub.all_targets() {
                conn.close(CloseReason::Draining, rand::random_range(0..=5000));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.hub.live() > 0 {
            tracing::warn!(
                left = self.hub.live(),
                "drain window over with connections still open"
            );
        }
        let _ = self.api_stop.send(true);
        let _ = self.api_task.await;
        for task in &self.background {
            task.abort();
        }
        match self.store.flush().await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "store flush failed");
                false
            }
        }
    }
}

async fn expire_loop(store: Arc<dyn Store>, metrics: Arc<Metrics>) {
    let mut every = tokio::time::interval(EXPIRE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        match store.expire(now_ms()).await {
            Ok(out) if out.expired > 0 => {
                metrics.dropped(DropReason::Expired).inc_by(out.expired);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "expiry sweep failed"),
        }
    }
}

/// Wait for SIGTERM or SIGINT.
async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process can only be killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Run the gateway until a signal, drain, and return the exit code:
/// 0 after a drain, 1 on a startup failure (with one line on stderr), 1 at
/// once on a second signal.
pub async fn run(config: Config, opts: RunOptions) -> ExitCode {
    let node = match Node::start(config, opts.activated).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("pushgate: {e}");
            return ExitCode::from(1);
        }
    };
    crate::systemd::notify_ready();
    signal().await;
    tracing::info!("signal received: draining (a second signal exits at once)");
    tokio::spawn(async {
        signal().await;
        eprintln!("pushgate: second signal: exiting at once");
        std::process::exit(1);
    });
    if node.shutdown().await {
        tracing::info!("drained; exiting");
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
