//! `bench`: start a gateway with a generated config on loopback ports, run
//! one scenario against it, stop it with SIGTERM. One command per
//! benchmark row, reproducible anywhere the pushgate binary is.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::Rng;
use tokio::process::{Child, Command};

use crate::api::Api;
use crate::cli::{BenchOpts, LoadOpts, Scenario, StoreKind};
use crate::results::{BenchInfo, Results};
use crate::run::{self, Plan, Restart};
use crate::target;

/// The app every bench config defines.
pub const BENCH_APP: &str = "bench";

/// A gateway process this tool started.
pub struct Gateway {
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    pid: u32,
    api: Arc<Api>,
    device_addr: std::net::SocketAddr,
    startup_timeout: Duration,
    drain_secs: u64,
}

impl Gateway {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Spawns `bin serve --config config EXTRA…`, logging to the log file;
    /// it becomes `self.child`.
    fn spawn(&mut self, extra: &[&str]) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            // Own process group: Ctrl-C stops the load test, which then
            // stops the gateway itself after measuring it.
            .process_group(0)
            .kill_on_drop(true);
        if std::env::var_os("RUST_LOG").is_none() {
            // The node's few info lines say when a hand-over is done.
            cmd.env("RUST_LOG", "warn,pushgate::node=info");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.pid = child.id().context("the gateway exited at once")?;
        self.child = Some(child);
        Ok(())
    }

    /// An error with the log's tail if the gateway process (`who`) has
    /// exited during `what`.
    fn fail_if_exited(&mut self, who: &str, what: &str) -> Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(status) = c.try_wait()? {
                bail!(
                    "{who} exited during {what} ({status}); its log {}:\n{}",
                    self.log.display(),
                    log_tail(&self.log)
                );
            }
        }
        Ok(())
    }

    /// Starts `bin serve --config config` and waits for /healthz and the
    /// device port.
    async fn start(&mut self) -> Result<f64> {
        let t = Instant::now();
        self.spawn(&[])?;
        let deadline = t + self.startup_timeout;
        // Bounded by the startup timeout.
        loop {
            self.fail_if_exited("the gateway", "startup")?;
            let healthy = matches!(self.api.get("/healthz").await, Ok(r) if r.status == 200);
            let device_up = healthy
                && tokio::time::timeout(
                    Duration::from_secs(1),
                    tokio::net::TcpStream::connect(self.device_addr),
                )
                .await
                .is_ok_and(|r| r.is_ok());
            if device_up {
                return Ok(t.elapsed().as_secs_f64());
            }
            if Instant::now() > deadline {
                bail!(
                    "the gateway did not answer /healthz and accept on {} within {:?}; its log {}:\n{}",
                    self.device_addr,
                    self.startup_timeout,
                    self.log.display(),
                    log_tail(&self.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, wait for the drain (bounded), SIGKILL if it does not exit.
    /// Returns the exit code (None if killed by a signal) and the seconds it took.
    pub async fn stop(&mut self) -> Result<(Option<i32>, f64)> {
        let t = Instant::now();
        let Some(mut child) = self.child.take() else {
            return Ok((None, 0.0));
        };
        if let Some(status) = child.try_wait()? {
            return Ok((status.code(), 0.0));
        }
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .with_context(|| format!("sending SIGTERM to the gateway (pid {})", self.pid))?;
        let grace = Duration::from_secs(self.drain_secs + 15);
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(status) => Ok((status?.code(), t.elapsed().as_secs_f64())),
            Err(_) => {
                eprintln!(
                    "the gateway did not exit within {grace:?} of SIGTERM; killing it (pid {})",
                    self.pid
                );
                let _ = child.kill().await;
                Ok((None, t.elapsed().as_secs_f64()))
            }
        }
    }

    /// Hand over to a new process (`serve --takeover`, as `systemctl reload`
    /// does): start it, wait for the old one to drain and exit. Returns the
    /// seconds until the old one exited and until the new one served (its
    /// log says so).
    pub async fn takeover(&mut self) -> Result<(f64, f64)> {
        let t = Instant::now();
        let mut old = self.child.take().context("no gateway to take over from")?;
        let old_pid = self.pid;
        let log_len = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let started = self.spawn(&["--takeover"]);
        if let Err(e) = started {
            self.child = Some(old);
            self.pid = old_pid;
            return Err(e);
        }
        // The old process logs when the new one serves; the old one's exit
        // ends the drain. Both bounded.
        let served_deadline = t + self.startup_timeout;
        let mut served = None;
        let grace = Duration::from_secs(self.drain_secs + 15);
        let exit_deadline = t + grace;
        loop {
            if served.is_none() {
                let text = std::fs::read(&self.log).unwrap_or_default();
                let new_text = String::from_utf8_lossy(&text[(log_len as usize).min(text.len())..]);
                if new_text.contains("handed over: the new process serves") {
                    served = Some(t.elapsed().as_secs_f64());
                }
            }
            self.fail_if_exited("the new gateway", "the takeover")?;
            if let Some(status) = old.try_wait()? {
                if status.code() != Some(0) {
                    eprintln!("note: the old gateway exited with {status} after the takeover");
                }
                break;
            }
            if Instant::now() > exit_deadline
                || (served.is_none() && Instant::now() > served_deadline)
            {
                let _ = old.kill().await;
                bail!(
                    "the takeover did not finish within {grace:?}; log {}:\n{}",
                    self.log.display(),
                    log_tail(&self.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok((t.elapsed().as_secs_f64(), served.unwrap_or(f64::NAN)))
    }

    /// Stop and start again with the same config and ports; returns the
    /// seconds to stop and to be healthy again.
    pub async fn restart(&mut self) -> Result<(f64, f64)> {
        let (code, stop_secs) = self.stop().await?;
        if code != Some(0) {
            eprintln!("note: the gateway exited with {code:?} on SIGTERM during the restart");
        }
        let start_secs = self.start().await?;
        Ok((stop_secs, start_secs))
    }
}

/// The last lines of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn free_port() -> Result<(std::net::TcpListener, u16)> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    let port = l.local_addr()?.port();
    Ok((l, port))
}

fn random_hex(bytes: usize) -> String {
    let mut rng = rand::rng();
    (0..bytes).fold(String::new(), |mut s, _| {
        let _ = write!(s, "{:02x}", rng.random::<u8>());
        s
    })
}

/// A TOML basic string (JSON string escapes are valid TOML escapes).
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Everything the generated config says.
pub struct ConfigSpec<'a> {
    pub device_port: u16,
    pub api_port: u16,
    pub tls: Option<(&'a Path, &'a Path)>,
    pub heartbeat_secs: u64,
    pub outbound_queue: Option<u64>,
    pub max_handshakes_per_sec: Option<u64>,
    pub store: StoreKind,
    pub data: &'a Path,
    pub drain_secs: u64,
    pub secret: &'a str,
    pub api_key: &'a str,
    pub max_connections: u64,
}

/// The gateway config (format of PROTOCOL.md, "Command line and configuration").
pub fn config_toml(c: &ConfigSpec<'_>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# written by pushgate-loadtest bench\n[device]");
    let _ = writeln!(s, "listen = \"127.0.0.1:{}\"", c.device_port);
    if let Some((cert, key)) = c.tls {
        let _ = writeln!(s, "tls_cert = {}", toml_str(&cert.to_string_lossy()));
        let _ = writeln!(s, "tls_key = {}", toml_str(&key.to_string_lossy()));
    }
    let _ = writeln!(s, "heartbeat_secs = {}", c.heartbeat_secs);
    if let Some(q) = c.outbound_queue {
        let _ = writeln!(s, "outbound_queue = {q}");
    }
    if let Some(h) = c.max_handshakes_per_sec {
        let _ = writeln!(s, "max_handshakes_per_sec = {h}");
    }
    let _ = writeln!(s, "\n[api]\nlisten = \"127.0.0.1:{}\"", c.api_port);
    let _ = writeln!(
        s,
        "\n[store]\nkind = \"{}\"\npath = {}",
        match c.store {
            StoreKind::Memory => "memory",
            StoreKind::Redb => "redb",
        },
        toml_str(&c.data.to_string_lossy())
    );
    let _ = writeln!(s, "\n[shutdown]\ndrain_secs = {}", c.drain_secs);
    let _ = writeln!(
        s,
        "\n[[app]]\nid = \"{BENCH_APP}\"\ndevice_secret = {}\napi_keys = [{}]\nmax_connections = {}",
        toml_str(c.secret),
        toml_str(c.api_key),
        c.max_connections
    );
    s
}

/// A gateway started with a generated config, and how to reach it.
pub struct Launched {
    pub gw: Gateway,
    /// The temporary directory: config, certificate, log, data.
    pub dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    /// Device endpoint (ws:// or wss://).
    pub url: String,
    /// API base URL.
    pub api: String,
    pub secret: String,
    pub api_key: String,
}

/// Writes a config for `b` (sized for `connections`) into a new temporary
/// directory and starts the gateway on it, waiting for /healthz.
pub async fn launch(b: &BenchOpts, connections: u64) -> Result<Launched> {
    if !b.gateway_bin.is_file() {
        bail!(
            "--gateway-bin {}: no such file (build it with `cargo build --bin pushgate`, or set PUSHGATE_BIN)",
            b.gateway_bin.display()
        );
    }
    let bin = b.gateway_bin.canonicalize()?;
    let dir = std::env::temp_dir().join(format!(
        "pushgate-bench-{}-{}",
        std::process::id(),
        crate::now_us()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (l1, device_port) = free_port()?;
    let (l2, api_port) = free_port()?;
    // Both were held at once, so they differ; release them for the gateway.
    drop((l1, l2));
    let secret = random_hex(24);
    let api_key = random_hex(24);
    let tls_files = if b.tls {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .context("making a self-signed certificate")?;
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, ck.cert.pem())?;
        std::fs::write(&key, ck.signing_key.serialize_pem())?;
        Some((cert, key))
    } else {
        None
    };
    let config = dir.join("pushgate.toml");
    let log = dir.join("gateway.log");
    let data = dir.join("data");
    let text = config_toml(&ConfigSpec {
        device_port,
        api_port,
        tls: tls_files.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        heartbeat_secs: b.heartbeat,
        outbound_queue: b.outbound_queue,
        max_handshakes_per_sec: b.max_handshakes_per_sec,
        store: b.store,
        data: &data,
        drain_secs: b.drain_secs,
        secret: &secret,
        api_key: &api_key,
        max_connections: connections.saturating_mul(2).max(1_000_000),
    });
    std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;

    let scheme = if b.tls { "wss" } else { "ws" };
    let api = format!("http://127.0.0.1:{api_port}");
    let api_ep = target::resolve(&api, &["http"], false).await?;
    let mut gw = Gateway {
        bin,
        config: config.clone(),
        log: log.clone(),
        child: None,
        pid: 0,
        api: Arc::new(Api::new(&api_ep, None, Duration::from_secs(2))),
        device_addr: std::net::SocketAddr::from(([127, 0, 0, 1], device_port)),
        startup_timeout: Duration::from_secs_f64(b.startup_timeout.max(1.0)),
        drain_secs: b.drain_secs,
    };
    if let Err(e) = gw.start().await {
        let _ = gw.stop().await;
        eprintln!("kept {} for inspection", dir.display());
        return Err(e);
    }
    Ok(Launched {
        gw,
        dir,
        config,
        log,
        url: format!("{scheme}://127.0.0.1:{device_port}/v1/connect"),
        api,
        secret,
        api_key,
    })
}

/// `pushgate-loadtest bench`.
pub async fn bench(scenario: Scenario, b: BenchOpts, mut load: LoadOpts) -> Result<Results> {
    let restart = match (b.restart, b.takeover) {
        (_, true) => Restart::Takeover,
        (true, false) => Restart::Sigterm,
        (false, false) => Restart::No,
    };
    if restart == Restart::Takeover && b.store != StoreKind::Redb {
        bail!("--takeover needs --store redb: the memory store has nothing to hand over");
    }
    let Launched {
        mut gw,
        dir,
        config,
        log,
        url,
        api,
        secret,
        api_key,
    } = launch(&b, load.connections).await?;
    load.url = url;
    load.api = api;
    load.app = BENCH_APP.into();
    load.secret = Some(secret);
    load.api_key = Some(api_key);
    load.gateway_pid = None;
    let outcome = match Plan::new(scenario, load, restart).await {
        Ok(plan) => run::execute(plan, Some(&mut gw)).await,
        Err(e) => Err(e),
    };
    let stopped = gw.stop().await;
    let mut res = match outcome {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kept {} for inspection", dir.display());
            return Err(e);
        }
    };
    let mut info = BenchInfo {
        gateway_bin: gw.bin.display().to_string(),
        store: format!("{:?}", b.store).to_lowercase(),
        tls: b.tls,
        heartbeat_secs: b.heartbeat,
        drain_secs: b.drain_secs,
        config: config.display().to_string(),
        log: log.display().to_string(),
        exit_code: None,
        stop_secs: None,
    };
    match stopped {
        Ok((code, secs)) => {
            info.exit_code = code;
            info.stop_secs = Some(secs);
            if code != Some(0) {
                res.errors.push(format!(
                    "the gateway exited with {} after SIGTERM (expected 0 after a drain)",
                    code.map(|c| c.to_string())
                        .unwrap_or_else(|| "a signal".into())
                ));
            }
        }
        Err(e) => res.errors.push(format!("stopping the gateway: {e:#}")),
    }
    if res.clean() && !b.keep_dir {
        let _ = std::fs::remove_dir_all(&dir);
        info.config.clear();
        info.log.clear();
    } else {
        eprintln!("kept {} (config, gateway log, data)", dir.display());
    }
    res.setup.bench = Some(info);
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_every_section() {
        let t = config_toml(&ConfigSpec {
            device_port: 1,
            api_port: 2,
            tls: Some((Path::new("/tmp/c \"x\".pem"), Path::new("/tmp/k.pem"))),
            heartbeat_secs: 30,
            outbound_queue: Some(64),
            max_handshakes_per_sec: None,
            store: StoreKind::Redb,
            data: Path::new("/tmp/d"),
            drain_secs: 2,
            secret: "s",
            api_key: "k",
            max_connections: 5,
        });
        for needle in [
            "[device]\nlisten = \"127.0.0.1:1\"",
            "tls_cert = \"/tmp/c \\\"x\\\".pem\"",
            "outbound_queue = 64",
            "[api]\nlisten = \"127.0.0.1:2\"",
            "kind = \"redb\"",
            "drain_secs = 2",
            "[[app]]\nid = \"bench\"",
            "api_keys = [\"k\"]",
        ] {
            assert!(t.contains(needle), "{needle:?} not in\n{t}");
        }
        assert!(!t.contains("max_handshakes_per_sec"));
    }
}
