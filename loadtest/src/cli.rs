//! The command line: `run` against a running gateway, `bench` that starts one,
//! and the hidden `worker` that the coordinator re-executes itself as.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Connection, fan-out and latency load tests for pushgate.
///
/// Opens N device WebSockets (spread over worker processes and source
/// addresses), drives one scenario through the backend API and reports
/// connections, deliveries, latency, loss and the gateway's memory and CPU.
/// Only loopback targets are allowed unless `--allow-remote` is given.
#[derive(Debug, Parser)]
#[command(name = "pushgate-loadtest", version, about, long_about, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

const AFTER_HELP: &str = "\
Examples:
  pushgate-loadtest bench idle --gateway-bin target/release/pushgate -n 15000 --json idle.json
  pushgate-loadtest bench broadcast --gateway-bin target/release/pushgate -n 15000 --count 20 --plot b.png
  pushgate-loadtest run device --secret S --api-key K --app demo -n 5000 --rate 2000 --duration 30
  pushgate-loadtest bench storm --restart --gateway-bin target/release/pushgate -n 5000
  pushgate-loadtest bench storm --takeover --store redb --gateway-bin target/release/pushgate -n 15000

Exit codes: 0 clean run; 3 the run finished but saw failures, closes, loss,
duplicates or API errors (see the summary); 1 could not run; 2 bad arguments.";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a scenario against a gateway that is already running.
    Run {
        /// What to do once the devices are connected.
        #[arg(value_enum)]
        scenario: Scenario,
        #[command(flatten)]
        load: LoadOpts,
    },
    /// Start a gateway (`pushgate serve --config FILE`) with a generated
    /// config, run a scenario against it, stop it with SIGTERM: one command
    /// per benchmark row.
    Bench {
        /// What to do once the devices are connected.
        #[arg(value_enum)]
        scenario: Scenario,
        #[command(flatten)]
        bench: BenchOpts,
        #[command(flatten)]
        load: LoadOpts,
    },
    /// Internal: one worker process holding a share of the connections.
    /// Reads its config and commands as JSON lines on stdin, writes events
    /// as JSON lines on stdout.
    #[command(hide = true)]
    Worker,
    /// The kernel's floor for a fan-out on this machine, with no gateway:
    /// one process writes a frame to N plain TCP connections per round in a
    /// tight loop; sink processes read and time them. Reports the writer's
    /// CPU per 1000 writes and the latency percentiles, to set beside
    /// `bench broadcast`.
    Floor(crate::floor::FloorOpts),
    /// Internal: one sink process of `floor`.
    #[command(hide = true)]
    FloorSink(crate::floor::SinkOpts),
}

/// The scenarios of issue 4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Connect, hold, report memory per connection.
    Idle,
    /// `--count` broadcasts, back to back (or `--interval-ms` apart).
    Broadcast,
    /// Devices subscribe to one of `--topics` topics; `--count` topic
    /// messages round-robin over them.
    Topic,
    /// Push to random devices through the API at `--rate` for `--duration`;
    /// devices ack, order, loss and duplicates are checked by seq.
    Device,
    /// All devices drop and reconnect at once (`--rounds` times), or, with
    /// `bench --restart`, the gateway restarts (with `bench --takeover`, a new
    /// process takes over): time until all are back.
    Storm,
    /// Before any device connects, `--backlog` messages are stored for
    /// each; then all connect at once while pushes go on as in `device`
    /// (`--rate`, `--duration`, `--batch`): time until every stored message
    /// is redelivered, and the pushes' latency meanwhile.
    Redeliver,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Broadcast => "broadcast",
            Scenario::Topic => "topic",
            Scenario::Device => "device",
            Scenario::Storm => "storm",
            Scenario::Redeliver => "redeliver",
        }
    }

    /// Whether the scenario talks to the backend API.
    pub fn needs_api(self) -> bool {
        matches!(
            self,
            Scenario::Broadcast | Scenario::Topic | Scenario::Device | Scenario::Redeliver
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TokenIn {
    /// `Authorization: Bearer <token>`.
    Header,
    /// `?token=<token>` (what browsers do).
    Query,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    Memory,
    Redb,
}

/// Options shared by `run` and `bench`.
#[derive(Debug, Clone, Args)]
pub struct LoadOpts {
    /// Device endpoint (ws:// or wss://; certificates are not verified).
    /// `bench` sets it.
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/connect")]
    pub url: String,
    /// Backend API base URL (http://). `bench` sets it.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    pub api: String,
    /// API key of the app (needed by broadcast, topic, device). `bench` sets it.
    #[arg(long, env = "PUSHGATE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// App id the devices belong to. `bench` sets it.
    #[arg(long, default_value = "demo")]
    pub app: String,
    /// The app's device secret: devices sign their own HS256 tokens with it.
    /// `bench` sets it.
    #[arg(long, env = "PUSHGATE_DEVICE_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Number of device connections.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub connections: u64,
    /// Connection ramp, new connections per second over all workers (0: as
    /// fast as `--concurrency` allows).
    #[arg(long, default_value_t = 2000.0)]
    pub ramp: f64,
    /// Seconds to hold the connections after the scenario's action (idle:
    /// the whole scenario).
    #[arg(long, default_value_t = 5.0)]
    pub hold: f64,
    /// Worker processes (default: enough for `--per-worker`).
    #[arg(long)]
    pub workers: Option<u32>,
    /// Most connections one worker process holds (the fd limit is 20000 per
    /// process here).
    #[arg(long, default_value_t = 15000)]
    pub per_worker: u64,
    /// Source addresses to bind before connect, round-robin: a comma list of
    /// addresses and inclusive ranges (`127.0.0.2-127.0.0.250`), or `none`
    /// to let the kernel choose.
    #[arg(long, default_value = "127.0.0.2-127.0.0.250")]
    pub source: String,
    /// Allow targets and source addresses outside 127.0.0.0/8 and ::1 (real
    /// metal only).
    #[arg(long)]
    pub allow_remote: bool,
    /// Where devices put their token.
    #[arg(long, value_enum, default_value = "header")]
    pub token_in: TokenIn,
    /// Token lifetime in seconds (the `exp` claim).
    #[arg(long, default_value_t = 86400)]
    pub token_ttl: u64,
    /// Device ids are `<prefix>-<worker>-<n>`.
    #[arg(long, default_value = "lt")]
    pub device_prefix: String,
    /// Seconds allowed for TCP connect + TLS + upgrade + `hello`.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Handshakes in flight at once, per worker.
    #[arg(long, default_value_t = 512)]
    pub concurrency: usize,
    /// Retries of a failed initial connect (0: a failure is final and counted).
    #[arg(long, default_value_t = 0)]
    pub retries: u32,
    /// broadcast, topic: messages to send.
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// broadcast, topic: milliseconds between sends (0: back to back, each
    /// after the previous 202).
    #[arg(long, default_value_t = 0)]
    pub interval_ms: u64,
    /// topic: number of topics; device k subscribes to `lt-topic-<k mod T>`.
    #[arg(long, default_value_t = 10)]
    pub topics: u32,
    /// device: messages per second (sent in API calls of `--batch` messages).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// device: seconds of pushing.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// device: message ttl in seconds (0: now-or-never, no seq, no ack).
    #[arg(long, default_value_t = 3600)]
    pub ttl: u64,
    /// device: push while no device is connected (store-and-forward: the
    /// durable store and the API alone), then connect every device and
    /// check it receives every accepted message. Needs ttl > 0 and at most
    /// 50 messages per device on average (the gateway's default
    /// max_pending is 100).
    #[arg(long)]
    pub offline: bool,
    /// device: messages per API call (>1 uses /messages/batch, at most 500).
    #[arg(long, default_value_t = 1)]
    pub batch: u32,
    /// API connections (keep-alive) used for pushes.
    #[arg(long, default_value_t = 8)]
    pub api_conns: usize,
    /// Extra payload bytes per message (a padding string in `data`).
    #[arg(long, default_value_t = 0)]
    pub payload_bytes: usize,
    /// redeliver: messages stored for each device before it connects
    /// (sent as `to.devices` lists of up to 1000 ids, 10 messages a call).
    #[arg(long, default_value_t = 100)]
    pub backlog: u64,
    /// storm: drop-and-reconnect rounds.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// storm: seconds allowed for all devices to come back.
    #[arg(long, default_value_t = 60.0)]
    pub storm_timeout: f64,
    /// Seconds to wait for outstanding deliveries after the last send.
    #[arg(long, default_value_t = 10.0)]
    pub drain_timeout: f64,
    /// PID of the gateway: RSS, CPU and fds from /proc before and after.
    /// Without it they are read from the gateway's /metrics if reachable.
    #[arg(long)]
    pub gateway_pid: Option<u32>,
    /// Seconds to wait after the ramp before measuring the gateway's memory.
    #[arg(long, default_value_t = 1.0)]
    pub settle: f64,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw the connection ramp and the latency distribution into this PNG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// No live progress line.
    #[arg(short, long)]
    pub quiet: bool,
    /// Seed for picking devices (device scenario).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Hard limit on the whole run in seconds; when it passes the run stops
    /// and reports what it has, as on Ctrl-C.
    #[arg(long, default_value_t = 900.0)]
    pub time_limit: f64,
}

impl LoadOpts {
    /// Seconds the connect ramp asks for (0 with `--ramp 0`: as fast as
    /// the handshake concurrency allows).
    pub fn ramp_secs(&self) -> f64 {
        if self.ramp > 0.0 {
            self.connections as f64 / self.ramp
        } else {
            0.0
        }
    }
}

/// Options of `bench` only: how to start the gateway.
#[derive(Debug, Clone, Args)]
pub struct BenchOpts {
    /// The pushgate binary.
    #[arg(long, env = "PUSHGATE_BIN")]
    pub gateway_bin: PathBuf,
    /// Store kind in the generated config.
    #[arg(long, value_enum, default_value = "memory")]
    pub store: StoreKind,
    /// Serve wss:// with a self-signed certificate made for the run.
    #[arg(long)]
    pub tls: bool,
    /// `device.heartbeat_secs` of the generated config.
    #[arg(long, default_value_t = 30)]
    pub heartbeat: u64,
    /// `shutdown.drain_secs` of the generated config.
    #[arg(long, default_value_t = 2)]
    pub drain_secs: u64,
    /// `device.outbound_queue` of the generated config (gateway default if unset).
    #[arg(long)]
    pub outbound_queue: Option<u64>,
    /// `device.max_handshakes_per_sec` of the generated config (gateway default if unset).
    #[arg(long)]
    pub max_handshakes_per_sec: Option<u64>,
    /// storm: restart the gateway (SIGTERM, wait, start again) instead of
    /// dropping the client side.
    #[arg(long, conflicts_with = "takeover")]
    pub restart: bool,
    /// storm: hand the gateway over to a new process (`serve --takeover`,
    /// what `systemctl reload` does) instead of dropping the client side.
    /// Needs `--store redb`.
    #[arg(long)]
    pub takeover: bool,
    /// Seconds to wait for /healthz after starting the gateway.
    #[arg(long, default_value_t = 20.0)]
    pub startup_timeout: f64,
    /// Keep the temporary directory (config, certificate, gateway log, data).
    #[arg(long)]
    pub keep_dir: bool,
}
