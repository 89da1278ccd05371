//! The `pushgate` command line: parses arguments, loads the config and
//! calls into the library. Exit codes: 0 ok, 2 bad config or arguments,
//! 1 any other failure, each with one line saying what and where.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::filter::{EnvFilter, LevelFilter};

use pushgate::auth::{issue_device_token, valid_topic_pattern, AuthError};
use pushgate::config::{self, Config};
use pushgate::node::{self, RunOptions};

/// jemalloc rather than glibc's malloc: after a burst of broadcasts glibc
/// kept the freed per-connection queue buffers (RSS +160–390 B per
/// connection at 15k, for good), jemalloc gives them back to the system
/// (see [`return_freed_memory_in_background`] and BENCHMARKS.md,
/// "Allocator").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Where `serve --dev` keeps its data.
const DEV_DATA_DIR: &str = "pushgate-data";
/// The device of the token `serve --dev` prints.
const DEV_DEVICE: &str = "dev1";
/// How long that token is valid.
const DEV_TOKEN_TTL_SECS: u64 = 24 * 3600;

#[derive(Parser)]
#[command(
    name = "pushgate",
    version,
    about = "Push notification gateway: devices hold WebSockets, backends push over HTTP.",
    long_about = "Push notification gateway: devices hold one WebSocket each, backends push \
                  messages to them over an HTTP API.\n\n\
                  To try it: `pushgate serve --dev` prints an API key, a device token and a \
                  curl line that pushes a first message.\n\n\
                  Exit codes: 0 ok, 2 bad configuration or arguments, 1 any other failure."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    #[command(
        long_about = "Run the gateway until SIGTERM or SIGINT, then drain the connected \
                      devices and exit 0 (a second signal exits at once with 1).\n\n\
                      On SIGHUP (`systemctl reload`) start this binary again with \
                      --takeover: the new process takes the listeners and the store over, \
                      this one drains its devices and exits 0; nothing is refused.\n\n\
                      Give exactly one of --config FILE and --dev. Logs go to stderr; \
                      RUST_LOG filters them (default: info)."
    )]
    Serve(ServeArgs),
    /// Check a config file: print every problem with its line and field.
    #[command(
        long_about = "Check a config file without starting anything: prints `FILE: ok` and \
                      exits 0, or prints each problem as `FILE:LINE: FIELD: what is wrong` \
                      and exits 2. The environment variables named by *_env keys are read, \
                      as `serve` would."
    )]
    Check {
        /// The config file (TOML).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print a device token signed with an app's device secret.
    #[command(
        long_about = "Print a device token: a JWT signed HS256 with the app's device secret \
                      from the config. A device presents it on /v1/connect as \
                      `Authorization: Bearer TOKEN` or `?token=TOKEN`."
    )]
    Token(TokenArgs),
}

#[derive(Args)]
#[command(group(ArgGroup::new("source").required(true).args(["config", "dev"])))]
struct ServeArgs {
    /// The config file (TOML).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Use the built-in development config: devices on 127.0.0.1:8080, API on
    /// 127.0.0.1:8081, app `demo`, data under ./pushgate-data. Prints an API key, a
    /// device token and a curl line to try it.
    #[arg(long)]
    dev: bool,
    /// Take over from a gateway running on the same store (a deploy): receive
    /// its listening sockets and its store through the control socket in the
    /// store directory; it then drains its devices and exits. With no gateway
    /// running, start as usual. `systemctl reload` (SIGHUP) does this for you.
    #[arg(long)]
    takeover: bool,
    /// How logs are written to stderr: `text` for people, `json` for machines.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args)]
struct TokenArgs {
    /// The config file holding the app's device secret.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// The app id.
    #[arg(long, value_name = "APP")]
    app: String,
    /// The device id (1-128 bytes of [A-Za-z0-9._:@-]).
    #[arg(long, value_name = "DEVICE")]
    device: String,
    /// Seconds until the token expires.
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    ttl: u64,
    /// Topics the device may subscribe to, comma separated. An entry ending in `*` is
    /// a prefix (`sport.*`); `*` alone allows every topic. Default: none.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    topics: Vec<String>,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::Check { config } => check(&config),
        Command::Token(args) => token(args),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    init_logging(args.log_format);
    let config = match &args.config {
        Some(path) => match config::load(path) {
            Ok(config) => config,
            Err(errors) => {
                eprintln!("{errors}");
                return ExitCode::from(2);
            }
        },
        None => {
            let config = config::dev(Path::new(DEV_DATA_DIR));
            // A successor started on SIGHUP inherits them: same tokens and
            // key across a hand-over. Before the runtime starts threads.
            if let Some(app) = config.apps.first() {
                std::env::set_var(config::DEV_SECRET_ENV, app.secret());
                if let Some(key) = app.keys().first() {
                    std::env::set_var(config::DEV_KEY_ENV, key);
                }
            }
            config
        }
    };
    // Before the runtime starts threads: this edits the environment.
    let activated = match pushgate::net::take_activated_listeners() {
        Ok(activated) => activated,
        Err(e) => {
            eprintln!("pushgate: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.dev {
        match dev_banner(&config) {
            Ok(banner) => println!("{banner}"),
            Err(e) => {
                eprintln!("pushgate: cannot make the development token: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    return_freed_memory_in_background();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("pushgate: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options = RunOptions {
        dev_banner: false,
        activated,
        takeover: args.takeover,
    };
    runtime.block_on(node::run(config, options))
}

/// Start jemalloc's background thread, which returns freed pages to the
/// system once they have been unused for about 10 s (jemalloc's
/// `dirty_decay_ms`; `_RJEM_MALLOC_CONF=dirty_decay_ms:N` changes it).
/// Without it jemalloc purges only from inside later allocations, so a
/// gateway that goes quiet after a burst would keep the burst's memory.
/// After the environment edits above: this starts a thread.
fn return_freed_memory_in_background() {
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(
            error = %e,
            "cannot start the allocator's background thread: memory freed \
             after a burst goes back to the system only with later allocations"
        );
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env_lossy();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: journald, files and
        // pipes get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// What `serve --dev` prints to stdout: everything needed to connect a
/// device and push to it, ready to copy.
fn dev_banner(config: &Config) -> Result<String, AuthError> {
    let app = config
        .apps
        .first()
        .ok_or_else(|| AuthError::Signing("the development config has no app".into()))?;
    let key = app.keys().first().map(String::as_str).unwrap_or_default();
    let token = issue_device_token(
        app.secret(),
        &app.id,
        DEV_DEVICE,
        now_secs() + DEV_TOKEN_TTL_SECS,
        &["*".to_string()],
    )?;
    let device_url = format!("ws://{}/v1/connect?token={token}", config.device.listen);
    let push_url = format!("http://{}/v1/apps/{}/messages", config.api.listen, app.id);
    let body = format!(r#"{{"to":{{"device":"{DEV_DEVICE}"}},"data":{{"hello":"world"}}}}"#);
    Ok(format!(
        "pushgate development mode (a new key and token at every start; data in ./{DEV_DATA_DIR})\n\
         \n\
         app:          {app_id}\n\
         API key:      {key}\n\
         device token: {token}\n\
         \x20             (device {DEV_DEVICE}, every topic, valid 24 h)\n\
         device URL:   {device_url}\n\
         \n\
         Connect a device to the URL above, then push to it:\n\
         \n\
         curl -sS -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' -d '{body}' {push_url}\n",
        app_id = app.id,
    ))
}

fn check(path: &Path) -> ExitCode {
    match config::load(path) {
        Ok(_) => {
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::from(2)
        }
    }
}

fn token(args: TokenArgs) -> ExitCode {
    let config = match config::load(&args.config) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    let usage = |message: String| {
        eprintln!("pushgate token: {message}");
        ExitCode::from(2)
    };
    let Some(app) = config.apps.iter().find(|a| a.id == args.app) else {
        return usage(format!(
            "--app {:?}: no such app in {}",
            args.app,
            args.config.display()
        ));
    };
    if !pushgate::protocol::valid_device_id(&args.device) {
        return usage(format!(
            "--device {:?}: not a valid device id (1-128 bytes of [A-Za-z0-9._:@-])",
            args.device
        ));
    }
    let topics: Vec<String> = args
        .topics
        .iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    if let Some(bad) = topics.iter().find(|t| !valid_topic_pattern(t)) {
        return usage(format!(
            "--topics: {bad:?} is not a topic (1-128 bytes of [A-Za-z0-9._:-]) nor a topic \
             prefix followed by `*`"
        ));
    }
    if args.ttl == 0 {
        return usage("--ttl must be at least 1 second".to_string());
    }
    let Some(exp) = now_secs().checked_add(args.ttl) else {
        return usage(format!("--ttl {} is too large", args.ttl));
    };
    match issue_device_token(app.secret(), &app.id, &args.device, exp, &topics) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pushgate token: {e}");
            ExitCode::FAILURE
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_memory_is_returned_in_the_background() {
        return_freed_memory_in_background();
        assert!(tikv_jemalloc_ctl::background_thread::read().expect("read"));
    }
}
