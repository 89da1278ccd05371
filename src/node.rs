//! The node: wires config, store, hub, fan-out, device listener and API
//! together, runs until a signal, then drains as PROTOCOL.md's "Shutdown"
//! says. Tests start a `Node` in-process on `127.0.0.1:0`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use rand::seq::SliceRandom;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::forward::Forwarding;
use crate::api::{self, ApiState};
use crate::auth::Auth;
use crate::config::{Config, StoreKind};
use crate::device::{self, DeviceCtx};
use crate::dispatch::{now_ms, Dispatcher};
use crate::fanout::{self, Fanout};
use crate::handoff::{self, ControlSocket, Ctl, HandoffError, Takeover};
use crate::hub::Hub;
use crate::metrics::{DropReason, Metrics};
use crate::net::{self, ActivatedListeners};
use crate::protocol::CloseReason;
use crate::shutdown::Drain;
use crate::store::memory::MemoryStore;
use crate::store::redb::{RedbStore, Tuning};
use crate::store::{Store, StoreError};

/// Listen backlog for both listeners (the kernel caps it at somaxconn).
const BACKLOG: i32 = 4096;
/// How often expired messages are swept from the store.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);
/// Extra time after the drain window for the last closes to finish.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// How long a hand-over waits for the API calls served here to finish
/// before closing the store under the rest (they then answer 503
/// `store_unavailable`).
const LOCAL_CALLS_WAIT: Duration = Duration::from_secs(10);
/// How long a new process retries opening a store the old one is still
/// closing.
const STORE_LOCK_WAIT: Duration = Duration::from_secs(10);
/// How long the old process waits for its successor's `ready` after
/// releasing the store (the successor opens it meanwhile).
const READY_WAIT: Duration = Duration::from_secs(120);

/// How `run` was asked to start.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// Print nothing extra (the CLI prints the dev banner itself); kept for
    /// callers that want the node to do it.
    pub dev_banner: bool,
    /// Listeners passed by systemd socket activation, taken before the
    /// runtime started.
    pub activated: ActivatedListeners,
    /// `serve --takeover`: take the listeners and the store over from a
    /// gateway running on the same store, if one answers.
    pub takeover: bool,
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
    #[error("{0}")]
    Handoff(#[from] HandoffError),
    #[error("cannot start the API thread: {0}")]
    ApiThread(std::io::Error),
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
    pub dispatcher: Arc<Dispatcher>,
    /// Off while a successor takes the listeners over.
    accepting: watch::Sender<bool>,
    forwarding: Arc<Forwarding>,
    /// Copies of both listeners, to pass to a successor.
    passable: Vec<(&'static str, OwnedFd)>,
    /// Where this node's control socket goes (redb store only).
    control_path: Option<PathBuf>,
    /// After taking over: the frames for the old process's devices, until
    /// `run` connects them to it.
    relay_feed: Option<handoff::RelayFeed>,
}

/// The listener for `addr`: the one passed (by systemd or a predecessor) if
/// any, else a new one. Also returns a copy of its descriptor to pass on.
fn listener(
    what: &'static str,
    addr: SocketAddr,
    passed: Option<std::net::TcpListener>,
) -> Result<(TcpListener, OwnedFd), StartError> {
    let bind_err = |source| StartError::Bind { what, addr, source };
    let std_listener = match passed {
        Some(l) => l,
        None => net::bind_listener(addr, BACKLOG).map_err(bind_err)?,
    };
    std_listener.set_nonblocking(true).map_err(bind_err)?;
    let copy = std_listener
        .as_fd()
        .try_clone_to_owned()
        .map_err(bind_err)?;
    Ok((TcpListener::from_std(std_listener).map_err(bind_err)?, copy))
}

/// A listener handed over by the old process, if it listens where the
/// config says (a deploy may change the address: then we bind anew).
fn handed(
    what: &str,
    want: SocketAddr,
    got: Option<std::net::TcpListener>,
) -> Option<std::net::TcpListener> {
    let got = got?;
    match got.local_addr() {
        Ok(addr) if addr == want || (want.port() == 0 && addr.ip() == want.ip()) => Some(got),
        Ok(addr) => {
            tracing::warn!(listener = what, old = %addr, new = %want, "the listen address changed: binding the new one");
            None
        }
        Err(_) => None,
    }
}

/// Where to forward API calls after a hand-over: the listener's own address,
/// with a wildcard made loopback.
fn forward_addr(api: SocketAddr) -> SocketAddr {
    let ip = match api.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, api.port())
}

/// Opens the store; during a hand-over the old process may still be closing
/// it, so `Locked` is retried for a while.
async fn open_store_retrying(config: &Config, retry: bool) -> Result<Arc<dyn Store>, StartError> {
    let deadline = tokio::time::Instant::now() + STORE_LOCK_WAIT;
    loop {
        match open_store(config) {
            Err(StartError::Store {
                source: StoreError::Locked(_),
                ..
            }) if retry && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => return other,
        }
    }
}

fn open_store(config: &Config) -> Result<Arc<dyn Store>, StartError> {
    Ok(match config.store.kind {
        StoreKind::Memory => Arc::new(MemoryStore::new()),
        StoreKind::Redb => Arc::new(
            RedbStore::open(
                &config.store.path,
                Tuning {
                    commit_max_batch: config.store.commit_max_batch,
                    commit_max_wait_us: config.store.commit_max_wait_us,
                    cache_mb: config.store.cache_mb,
                },
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
        Node::start_with(config, activated, None).await
    }

    /// [`Node::start`], taking the listeners and the store over from the
    /// process behind `takeover` if given (see [`crate::handoff`]).
    pub async fn start_with(
        config: Config,
        mut activated: ActivatedListeners,
        takeover: Option<&mut Takeover>,
    ) -> Result<Node, StartError> {
        let tls = match (&config.device.tls_cert, &config.device.tls_key) {
            (Some(cert), Some(key)) => {
                Some(device::tls_acceptor(cert, key).map_err(StartError::Tls)?)
            }
            _ => None,
        };
        let taking_over = takeover.is_some();
        if let Some(takeover) = takeover {
            let passed = takeover.listeners().await?;
            if activated.device.is_none() {
                activated.device = handed("device", config.device.listen, passed.device);
            }
            if activated.api.is_none() {
                activated.api = handed("api", config.api.listen, passed.api);
            }
            takeover.take_store().await?;
        }
        let (device_listener, device_fd) =
            listener("device", config.device.listen, activated.device)?;
        let (api_listener, api_fd) = listener("api", config.api.listen, activated.api)?;
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
        let store = open_store_retrying(&config, taking_over).await?;

        let app_ids: Vec<Arc<str>> = config
            .apps
            .iter()
            .map(|a| Arc::from(a.id.as_str()))
            .collect();
        let labels: Vec<&str> = app_ids.iter().map(|a| &**a).collect();
        let metrics = Arc::new(Metrics::new(&labels)?);
        metrics.register(store.collectors())?;
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

        // Before anything is accepted: every topic and broadcast message
        // from now on also goes to the devices still on the old process.
        let relay_feed = taking_over.then(|| {
            let (relay, feed) = handoff::relay_channel();
            dispatcher.set_relay(relay);
            feed
        });
        let (accepting, _) = watch::channel(true);
        let mut background = vec![
            tokio::spawn(ctx.ticker.clone().run()),
            tokio::spawn(fanout::run(
                fanout_rx,
                hub.clone(),
                metrics.clone(),
                config.device.outbound_queue,
            )),
            tokio::spawn(expire_loop(
                store.clone(),
                metrics.clone(),
                accepting.subscribe(),
            )),
            tokio::spawn(device::serve(
                device_listener,
                ctx,
                tls,
                accepting.subscribe(),
            )),
        ];
        if let Some(watchdog) = crate::systemd::spawn_watchdog() {
            background.push(watchdog);
        }

        let forwarding = Arc::new(Forwarding::default());
        let state = Arc::new(ApiState {
            dispatcher: dispatcher.clone(),
            auth,
            drain: drain.clone(),
            messages: config.messages.clone(),
            app_ids,
            forwarding: forwarding.clone(),
        });
        let (api_stop, stop_rx) = tokio::sync::watch::channel(false);
        let router = api::router(state);
        // Registered again on the API thread's runtime (see
        // `api::spawn_on_own_thread`), so accepting does not depend on the
        // device runtime's I/O driver either.
        let api_listener = api_listener.into_std().map_err(StartError::ApiThread)?;
        let api_task = api::spawn_on_own_thread(|| {
            let listener = tokio::net::TcpListener::from_std(api_listener)?;
            let listener = net::GatedListener::new(listener, accepting.subscribe());
            Ok(api::serve(listener, router, stop_rx, api::HEADER_TIMEOUT))
        })
        .map_err(StartError::ApiThread)?;

        tracing::info!(pid = std::process::id(), device = %device_addr, api = %api_addr, tls = config.device.tls_cert.is_some(), store = ?config.store.kind, "pushgate serving");
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
            dispatcher,
            accepting,
            forwarding,
            passable: vec![("device", device_fd), ("api", api_fd)],
            control_path: handoff::socket_path(&config),
            relay_feed,
        })
    }

    /// Hands this node over to the successor on `ctl` (see
    /// [`crate::handoff`]). On `Ok` the successor serves and this node only
    /// has its devices left to drain ([`Node::drain_handed_over`]); on `Err`
    /// this node took everything back and serves on.
    pub async fn hand_over(&self, ctl: &mut Ctl) -> Result<(), HandoffError> {
        let hello = ctl.expect("hello", handoff::STEP_TIMEOUT).await?;
        if hello != handoff::HELLO {
            let _ = ctl.send("error unknown hand-over version").await;
            return Err(HandoffError::Protocol(format!("unexpected {hello:?}")));
        }
        let fds: Vec<_> = self
            .passable
            .iter()
            .map(|(name, fd)| (*name, fd.as_fd()))
            .collect();
        handoff::send_listeners(ctl, &fds).await?;
        let take = ctl.expect("take", handoff::STEP_TIMEOUT).await?;
        if take != "take" {
            return Err(HandoffError::Protocol(format!("unexpected {take:?}")));
        }

        // From here on the successor owns new connections and calls.
        let started = tokio::time::Instant::now();
        self.accepting.send_replace(false);
        self.forwarding.start(forward_addr(self.api_addr));
        if !self.forwarding.local_calls_done(LOCAL_CALLS_WAIT).await {
            tracing::warn!(
                calls = self.forwarding.local_calls(),
                "hand-over: API calls still running; closing the store under them"
            );
        }
        if let Err(e) = self.store.release().await {
            self.take_back().await;
            let _ = ctl
                .send(&format!("error cannot release the store: {e}"))
                .await;
            return Err(HandoffError::Protocol(format!(
                "cannot release the store: {e}"
            )));
        }
        let answered = async {
            ctl.send("released").await?;
            match ctl.expect("ready", READY_WAIT).await? {
                line if line == "ready" => Ok(()),
                line => Err(HandoffError::Protocol(format!("unexpected {line:?}"))),
            }
        };
        match answered.await {
            Ok(()) => {
                tracing::info!(
                    gap_ms = started.elapsed().as_millis() as u64,
                    "handed over: the new process serves"
                );
                Ok(())
            }
            Err(e) => {
                self.take_back().await;
                Err(e)
            }
        }
    }

    /// Undoes a hand-over that failed after this node stopped accepting.
    async fn take_back(&self) {
        let deadline = tokio::time::Instant::now() + STORE_LOCK_WAIT;
        loop {
            match self.store.reacquire().await {
                Ok(()) => break,
                Err(StoreError::Locked(_)) if tokio::time::Instant::now() < deadline => {
                    // The successor is still closing it.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    // Serve on without the store: device-directed pushes
                    // answer 503 store_unavailable until a restart.
                    tracing::error!(error = %e, "hand-over abandoned and the store cannot be opened again");
                    break;
                }
            }
        }
        self.forwarding.stop();
        self.accepting.send_replace(true);
        tracing::warn!("hand-over abandoned: serving again");
    }

    /// After [`Node::hand_over`]: close every device at a moment spread over
    /// the drain window (they reconnect to the successor), let forwarded
    /// calls finish, and stop. Sends nothing to systemd: the successor is
    /// the service's main process now.
    pub async fn drain_handed_over(self) {
        self.close_devices_spread().await;
        let _ = self.api_stop.send(true);
        let _ = self.api_task.await;
        for task in &self.background {
            task.abort();
        }
    }

    /// Closes every device with `bye` `draining` at a moment spread
    /// uniformly over the drain window, then waits for the sockets.
    async fn close_devices_spread(&self) {
        let window = Duration::from_secs(self.drain_secs);
        let started = tokio::time::Instant::now();
        let mut targets = self.hub.all_targets();
        targets.shuffle(&mut rand::rng());
        let n = targets.len();
        tracing::info!(connections = n, window_secs = self.drain_secs, "draining");
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
    }

    /// Drain and stop: refuse new work, close every device at a moment
    /// spread uniformly over the drain window, wait for them, let in-flight
    /// API calls finish, flush the store. Returns whether the store flushed.
    pub async fn shutdown(self) -> bool {
        self.drain.start();
        crate::systemd::notify_stopping();
        crate::systemd::notify_status(&format!("draining {} connections", self.hub.live()));
        self.close_devices_spread().await;
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

/// Sweeps expired messages, except while a hand-over has the store.
async fn expire_loop(
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    accepting: watch::Receiver<bool>,
) {
    let mut every = tokio::time::interval(EXPIRE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if !*accepting.borrow() {
            continue;
        }
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
///
/// With the redb store the gateway also listens on its control socket: a
/// new process started with `serve --takeover` (or spawned by this one on
/// SIGHUP) takes the listeners and the store over, and this one then drains
/// its devices and exits 0 (see [`crate::handoff`]).
pub async fn run(config: Config, opts: RunOptions) -> ExitCode {
    let mut takeover = None;
    if opts.takeover {
        match handoff::socket_path(&config) {
            None => tracing::warn!("--takeover needs the redb store: starting on our own"),
            Some(path) => match Takeover::connect(&path).await {
                Ok(Some(t)) => {
                    tracing::info!(control = %path.display(), "taking over from the running gateway");
                    takeover = Some(t);
                }
                Ok(None) => {
                    tracing::info!("no running gateway to take over from: starting on our own")
                }
                Err(e) => {
                    eprintln!("pushgate: hand-over: cannot reach {}: {e}", path.display());
                    return ExitCode::from(1);
                }
            },
        }
    }
    let mut node = match Node::start_with(config, opts.activated, takeover.as_mut()).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("pushgate: {e}");
            return ExitCode::from(1);
        }
    };
    let took_over = takeover.is_some();
    if let Some(takeover) = takeover {
        crate::systemd::notify_main_pid();
        let feed = node
            .relay_feed
            .take()
            .unwrap_or_else(|| handoff::relay_channel().1);
        if let Err(e) = takeover.ready(feed).await {
            // It released the store to us: it cannot serve again anyway.
            tracing::warn!(error = %e, "could not tell the old process we serve");
        }
    }
    crate::systemd::notify_ready();
    let control = node.control_path.as_deref().and_then(|path| {
        match ControlSocket::bind(path, took_over) {
            Ok(control) => Some(control),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "no control socket: hand-over restarts are off");
                None
            }
        }
    });
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler: reload by SIGHUP is off");
            None
        }
    };
    loop {
        tokio::select! {
            _ = signal() => break,
            Some(()) = async { hangup.as_mut()?.recv().await } => {
                if control.is_some() {
                    spawn_successor();
                } else {
                    tracing::warn!("SIGHUP: a hand-over restart needs the redb store and its control socket; ignored");
                }
            }
            accepted = async { control.as_ref()?.accept().await.ok() }, if control.is_some() => {
                let Some(mut ctl) = accepted else {
                    // accept() failed (out of descriptors?): not in a spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                tracing::info!("a new process is taking over");
                match node.hand_over(&mut ctl).await {
                    Ok(()) => {
                        if let Some(control) = control {
                            control.handed_over();
                        }
                        tokio::spawn(relay_in(ctl, node.dispatcher.clone()));
                        spawn_second_signal_exit();
                        node.drain_handed_over().await;
                        tracing::info!("handed over and drained; exiting");
                        return ExitCode::SUCCESS;
                    }
                    Err(e) => tracing::warn!(error = %e, "hand-over failed; still serving"),
                }
            }
        }
    }
    tracing::info!("signal received: draining (a second signal exits at once)");
    drop(control);
    spawn_second_signal_exit();
    if node.shutdown().await {
        tracing::info!("drained; exiting");
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// After a hand-over: fan out what the new process relays to the devices
/// still draining here, until it closes the connection.
async fn relay_in(mut ctl: Ctl, dispatcher: Arc<Dispatcher>) {
    loop {
        match handoff::recv_relayed(&mut ctl).await {
            Ok(Some(relayed)) => dispatcher.fan_out_relayed(relayed),
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "relay from the new process failed");
                break;
            }
        }
    }
}

/// A second SIGTERM or SIGINT during a drain exits at once with 1.
fn spawn_second_signal_exit() {
    tokio::spawn(async {
        signal().await;
        eprintln!("pushgate: second signal: exiting at once");
        std::process::exit(1);
    });
}

/// SIGHUP: start this binary again with the same arguments plus
/// `--takeover`; it takes over through the control socket. Its output goes
/// where ours goes; if it fails, we serve on.
fn spawn_successor() {
    let mut args = std::env::args_os();
    let program = successor_program(args.next());
    let mut rest: Vec<std::ffi::OsString> = args.collect();
    if !rest.iter().any(|a| a == "--takeover") {
        rest.push("--takeover".into());
    }
    let spawned = tokio::process::Command::new(&program)
        .args(&rest)
        // systemd's watchdog variables name our pid; the successor's pings
        // count once it has announced itself as the main process.
        .env_remove("WATCHDOG_PID")
        .stdin(std::process::Stdio::null())
        .spawn();
    match spawned {
        Ok(mut child) => {
            let pid = child.id().unwrap_or(0);
            tracing::info!(pid, program = %program.display(), "SIGHUP: started a new process to take over");
            tokio::spawn(async move {
                match child.wait().await {
                    Ok(status) if status.success() => {}
                    Ok(status) => tracing::warn!(pid, %status, "the new process exited"),
                    Err(e) => tracing::warn!(pid, error = %e, "waiting for the new process failed"),
                }
            });
        }
        Err(e) => {
            tracing::error!(program = %program.display(), error = %e, "SIGHUP: cannot start a new process")
        }
    }
}

/// The binary to start on SIGHUP: the path we were started as (after a
/// deploy it names the new binary), else our own executable.
fn successor_program(argv0: Option<std::ffi::OsString>) -> PathBuf {
    match argv0.map(PathBuf::from) {
        Some(path) if path.components().count() > 1 => path,
        _ => std::env::current_exe().unwrap_or_else(|_| PathBuf::from("pushgate")),
    }
}
