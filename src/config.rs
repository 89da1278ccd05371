//! The TOML configuration: every key of PROTOCOL.md with its default, plus
//! `validate()`, which names the line and field of each problem so that
//! `pushgate check` can point at it. Read by every part, reads none.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml_edit::{Item, Table, Value};

use crate::protocol::valid_app_id;

/// The longest `ttl` (and so `default_ttl_secs`) PROTOCOL.md allows: 28 days.
pub const MAX_TTL_SECS: u64 = 2_419_200;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub device: DeviceConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub messages: MessagesConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default, rename = "app")]
    pub apps: Vec<AppConfig>,
}

/// `[device]`: the device (WebSocket) listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceConfig {
    pub listen: SocketAddr,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub heartbeat_secs: u64,
    pub handshake_timeout_secs: u64,
    pub max_frame_bytes: usize,
    pub max_topics_per_device: usize,
    pub outbound_queue: usize,
    pub max_handshakes_per_sec: u64,
    /// Handshakes in progress at once (accepted, upgrade not finished); past
    /// it the listener stops accepting until one finishes. Bounds what a
    /// slowloris flood can hold. Not in PROTOCOL.md's list: an extension.
    pub max_pending_handshakes: usize,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            tls_cert: None,
            tls_key: None,
            heartbeat_secs: 30,
            handshake_timeout_secs: 10,
            max_frame_bytes: 4096,
            max_topics_per_device: 64,
            outbound_queue: 64,
            max_handshakes_per_sec: 0,
            max_pending_handshakes: 4096,
        }
    }
}

/// `[api]`: the backend HTTP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    pub fanout_queue: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            fanout_queue: 65536,
        }
    }
}

/// `[messages]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MessagesConfig {
    pub max_payload_bytes: usize,
    pub max_pending: u64,
    pub default_ttl_secs: u64,
}

impl Default for MessagesConfig {
    fn default() -> Self {
        MessagesConfig {
            max_payload_bytes: 4096,
            max_pending: 100,
            default_ttl_secs: 3600,
        }
    }
}

/// Which store implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    Redb,
    Memory,
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub kind: StoreKind,
    pub path: PathBuf,
    /// Group commit: at most this many appends share one transaction.
    /// Not in PROTOCOL.md's list: an extension.
    pub commit_max_batch: usize,
    /// Group commit: how long (µs) the writer waits for more appends after
    /// the first before committing. 0 commits as soon as the writer is free
    /// (appends that arrive during a commit still share the next one).
    /// Not in PROTOCOL.md's list: an extension.
    pub commit_max_wait_us: u64,
    /// redb's page cache, in MiB: a ceiling, filled as pages are read or
    /// written, and kept for the life of the process.
    /// Not in PROTOCOL.md's list: an extension.
    pub cache_mb: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Redb,
            path: PathBuf::from("pushgate-data"),
            commit_max_batch: 4096,
            commit_max_wait_us: 0,
            cache_mb: crate::store::redb::DEFAULT_CACHE_MB,
        }
    }
}

/// `[shutdown]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    pub drain_secs: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { drain_secs: 30 }
    }
}

/// One `[[app]]`: a tenant.
///
/// `device_secret_env` and `api_keys_env` are read once, by
/// [`Config::validate`] (which [`parse`] and [`load`] call); afterwards use
/// [`AppConfig::secret`] and [`AppConfig::keys`], never the environment.
/// `Debug` leaves the secrets out, so a config can be logged.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    pub id: String,
    pub device_secret: Option<String>,
    pub device_secret_env: Option<String>,
    #[serde(default)]
    pub api_keys: Vec<String>,
    pub api_keys_env: Option<String>,
    #[serde(default = "default_max_connections")]
    pub max_connections: u64,
    #[serde(default)]
    pub max_messages_per_sec: u64,
    /// The device secret, resolved by `validate()`.
    #[serde(skip)]
    secret: String,
    /// `api_keys` then the keys of `api_keys_env`, duplicates removed;
    /// resolved by `validate()`.
    #[serde(skip)]
    keys: Vec<String>,
}

fn default_max_connections() -> u64 {
    1_000_000
}

impl AppConfig {
    /// An app whose secret and keys are given directly (tests, `serve --dev`).
    pub fn new(
        id: impl Into<String>,
        device_secret: impl Into<String>,
        api_keys: Vec<String>,
    ) -> Self {
        let secret = device_secret.into();
        AppConfig {
            id: id.into(),
            device_secret: Some(secret.clone()),
            device_secret_env: None,
            keys: api_keys.clone(),
            api_keys,
            api_keys_env: None,
            max_connections: default_max_connections(),
            max_messages_per_sec: 0,
            secret,
        }
    }

    /// The HS256 key of this app's device tokens, from `device_secret` or
    /// the variable named by `device_secret_env`. Empty until `validate()`
    /// succeeded (which `parse` and `load` do).
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// This app's API keys: `api_keys`, then those of `api_keys_env`,
    /// without duplicates. Empty until `validate()` succeeded.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }
}

impl fmt::Debug for AppConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |set: bool| if set { "<redacted>" } else { "<none>" };
        f.debug_struct("AppConfig")
            .field("id", &self.id)
            .field("device_secret", &redacted(self.device_secret.is_some()))
            .field("device_secret_env", &self.device_secret_env)
            .field(
                "api_keys",
                &format_args!("<{} redacted>", self.api_keys.len()),
            )
            .field("api_keys_env", &self.api_keys_env)
            .field("max_connections", &self.max_connections)
            .field("max_messages_per_sec", &self.max_messages_per_sec)
            .field("keys", &format_args!("<{} resolved>", self.keys.len()))
            .finish_non_exhaustive()
    }
}

/// One problem in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based line in the file, when the problem has a place in it.
    pub line: Option<usize>,
    /// The key path: `device.heartbeat_secs`, `app[1].id` (indexes count
    /// from 0, in file order); empty when the problem is the whole file.
    pub field: String,
    /// What is wrong, for people; never contains a secret.
    pub message: String,
}

/// Every problem found in a configuration. `Display` prints one line each,
/// `FILE:LINE: FIELD: MESSAGE`, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    /// What the lines refer to: the file's path for [`load`], `config`
    /// otherwise.
    pub origin: String,
    pub errors: Vec<ConfigError>,
}

impl ConfigErrors {
    fn new(errors: Vec<ConfigError>) -> Self {
        ConfigErrors {
            origin: "config".to_string(),
            errors,
        }
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(&self.origin)?;
            if let Some(line) = e.line {
                write!(f, ":{line}")?;
            }
            f.write_str(": ")?;
            if !e.field.is_empty() {
                write!(f, "{}: ", e.field)?;
            }
            f.write_str(&e.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Read and check the config file at `path`; see [`parse`].
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        origin: origin.clone(),
        errors: vec![ConfigError {
            line: None,
            field: String::new(),
            message: format!("cannot read the config file: {e}"),
        }],
    })?;
    parse(&text).map_err(|mut e| {
        e.origin = origin;
        e
    })
}

/// Parse a config from TOML text and check it with [`Config::validate`],
/// reading `*_env` variables from the process environment.
///
/// A TOML syntax or type error (an unknown key, a string where a number
/// belongs) stops parsing, so it is reported alone; the rules of
/// `validate()` are then all checked and every broken one reported.
pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
    parse_with_env(text, &|name| std::env::var(name).ok())
}

/// [`parse`] with `env` standing in for the environment (for tests).
pub fn parse_with_env(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    // toml_edit keeps spans, so problems found after deserializing can be
    // placed on their line; when it cannot parse, toml's error says why.
    let doc = toml_edit::Document::parse(text).ok();
    let mut config: Config = match toml::from_str(text) {
        Ok(config) => config,
        Err(e) => {
            let (line, field) = match e.span() {
                Some(span) => (
                    Some(line_at(text, span.start)),
                    doc.as_ref()
                        .map(|d| field_at(d.as_table(), span.start))
                        .unwrap_or_default(),
                ),
                None => (None, String::new()),
            };
            return Err(ConfigErrors::new(vec![ConfigError {
                line,
                field,
                message: e.message().trim().to_string(),
            }]));
        }
    };
    let mut errors = config.check(env);
    if errors.is_empty() {
        return Ok(config);
    }
    if let Some(doc) = &doc {
        for e in &mut errors {
            e.line = span_of(doc.as_item(), &e.field).map(|s| line_at(text, s.start));
        }
    }
    // File order; problems without a line (a missing `[[app]]`) last.
    errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
    Err(ConfigErrors::new(errors))
}

/// The built-in config of `pushgate serve --dev`: devices on
/// `127.0.0.1:8080`, the API on `127.0.0.1:8081`, one app `demo` whose
/// device secret and API key are new random values at each call, a redb
/// store under `data_dir`, every other key at its default.
/// Where `serve --dev` keeps its random device secret and API key for a
/// successor it starts on SIGHUP, so that a hand-over keeps the devices'
/// tokens and the backends' key valid.
pub const DEV_SECRET_ENV: &str = "PUSHGATE_DEV_DEVICE_SECRET";
/// See [`DEV_SECRET_ENV`].
pub const DEV_KEY_ENV: &str = "PUSHGATE_DEV_API_KEY";

/// The development config; its secret and key are random, or those of
/// [`DEV_SECRET_ENV`] and [`DEV_KEY_ENV`] when both are set (a hand-over).
pub fn dev(data_dir: &Path) -> Config {
    let inherited = std::env::var(DEV_SECRET_ENV)
        .ok()
        .zip(std::env::var(DEV_KEY_ENV).ok());
    dev_with(data_dir, inherited)
}

/// [`dev`] with the (device secret, API key) to keep, if any.
fn dev_with(data_dir: &Path, inherited: Option<(String, String)>) -> Config {
    let (secret, key) = inherited
        .filter(|(secret, key)| !secret.is_empty() && !key.is_empty())
        .unwrap_or_else(|| (random_hex(32), format!("pgk_{}", random_hex(24))));
    Config {
        device: DeviceConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            ..DeviceConfig::default()
        },
        api: ApiConfig::default(),
        messages: MessagesConfig::default(),
        store: StoreConfig {
            kind: StoreKind::Redb,
            path: data_dir.to_path_buf(),
            ..StoreConfig::default()
        },
        shutdown: ShutdownConfig::default(),
        apps: vec![AppConfig::new("demo", secret, vec![key])],
    }
}

/// `bytes` random bytes, hex encoded: copy-pasteable anywhere.
fn random_hex(bytes: usize) -> String {
    use rand::RngCore as _;
    use std::fmt::Write as _;
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    let mut out = String::with_capacity(bytes * 2);
    for b in buf {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Upper bound of the queue capacities: far above any sane value, and below
/// what a bounded channel accepts without panicking.
const MAX_QUEUE: usize = 1 << 30;
/// Upper bound of the time keys in seconds (one day), so that timeouts
/// derived from them (`2 × heartbeat + 5 s`) cannot overflow.
const MAX_SECS: u64 = 86_400;
/// Upper bound of `store.cache_mb` (1 TiB): its bytes fit a `usize` on
/// 64-bit targets with room to spare.
const MAX_CACHE_MB: u64 = 1 << 20;

impl Config {
    /// Index in `apps` of the app `id`.
    pub fn app_index(&self, id: &str) -> Option<usize> {
        self.apps.iter().position(|a| a.id == id)
    }

    /// Check every rule and resolve each app's secret and keys (reading
    /// the `*_env` variables once, here). All broken rules are reported,
    /// without line numbers (see [`parse`] for those).
    ///
    /// Rules of PROTOCOL.md and the brief: at least one app; app ids valid
    /// and unique; exactly one of `device_secret` / `device_secret_env`,
    /// the variable set and non-empty; at least one API key from
    /// `api_keys` / `api_keys_env` (comma separated, trimmed); a key belongs
    /// to one app only; `tls_cert` and `tls_key` both or neither;
    /// `default_ttl_secs` ≤ 2419200; minimums on every size, count and
    /// timeout; distinct device and API listeners.
    ///
    /// Rules added because an operator would rather hear it from `check`
    /// than from production:
    /// - the listeners also collide when one is the unspecified address
    ///   (`0.0.0.0:8080` and `127.0.0.1:8080`); port 0 (any free port, for
    ///   tests) never collides;
    /// - a device secret is never empty and two apps never share one (a
    ///   token's `app` claim picks the key, so whoever signs for one app
    ///   could sign for the other);
    /// - an API key is never empty and is visible ASCII without spaces (it
    ///   travels in an `Authorization` header);
    /// - `max_connections` ≥ 1 (unlike the rate limits, 0 is not "no limit");
    /// - `heartbeat_secs`, `handshake_timeout_secs` and `drain_secs` are at
    ///   most a day, and the queues at most 2^30, so nothing derived from
    ///   them overflows;
    /// - `store.path` and the TLS paths are not empty.
    pub fn validate(&mut self) -> Result<(), ConfigErrors> {
        let errors = self.check(&|name| std::env::var(name).ok());
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors::new(errors))
        }
    }

    fn check(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Vec<ConfigError> {
        let mut errs = Errs(Vec::new());

        let d = &self.device;
        errs.range("device.heartbeat_secs", d.heartbeat_secs, 1, MAX_SECS);
        errs.range(
            "device.handshake_timeout_secs",
            d.handshake_timeout_secs,
            1,
            MAX_SECS,
        );
        errs.range("device.max_frame_bytes", d.max_frame_bytes, 64, usize::MAX);
        errs.range(
            "device.max_topics_per_device",
            d.max_topics_per_device,
            1,
            usize::MAX,
        );
        errs.range("device.outbound_queue", d.outbound_queue, 1, MAX_QUEUE);
        errs.range(
            "device.max_pending_handshakes",
            d.max_pending_handshakes,
            1,
            MAX_QUEUE,
        );
        match (&d.tls_cert, &d.tls_key) {
            (Some(_), None) => errs.add(
                "device.tls_cert",
                "tls_cert is set but tls_key is not: set both (wss://) or neither (ws://)",
            ),
            (None, Some(_)) => errs.add(
                "device.tls_key",
                "tls_key is set but tls_cert is not: set both (wss://) or neither (ws://)",
            ),
            _ => {}
        }
        for (field, path) in [
            ("device.tls_cert", &d.tls_cert),
            ("device.tls_key", &d.tls_key),
        ] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                errs.add(field, "must not be empty");
            }
        }

        let a = &self.api;
        errs.range("api.fanout_queue", a.fanout_queue, 1, MAX_QUEUE);
        if listeners_collide(d.listen, a.listen) {
            errs.add(
                "api.listen",
                format!(
                    "{} collides with device.listen = {}: the API needs its own port",
                    a.listen, d.listen
                ),
            );
        }

        let m = &self.messages;
        errs.range(
            "messages.max_payload_bytes",
            m.max_payload_bytes,
            1,
            usize::MAX,
        );
        errs.range("messages.max_pending", m.max_pending, 1, u64::MAX);
        if m.default_ttl_secs > MAX_TTL_SECS {
            errs.add(
                "messages.default_ttl_secs",
                format!(
                    "must be at most {MAX_TTL_SECS} (28 days, the longest ttl), not {}",
                    m.default_ttl_secs
                ),
            );
        }

        let s = &self.store;
        errs.range("store.commit_max_batch", s.commit_max_batch, 1, usize::MAX);
        errs.range("store.cache_mb", s.cache_mb, 1, MAX_CACHE_MB);
        if s.kind == StoreKind::Redb && s.path.as_os_str().is_empty() {
            errs.add("store.path", "must not be empty with kind = \"redb\"");
        }

        errs.range("shutdown.drain_secs", self.shutdown.drain_secs, 0, MAX_SECS);

        check_apps(&mut self.apps, env, &mut errs);
        errs.0
    }
}

fn check_apps(apps: &mut [AppConfig], env: &dyn Fn(&str) -> Option<String>, errs: &mut Errs) {
    if apps.is_empty() {
        errs.add("app", "no [[app]] is configured: at least one is needed");
    }
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut secrets: HashMap<String, usize> = HashMap::new();
    let mut key_owner: HashMap<String, usize> = HashMap::new();
    for (i, app) in apps.iter_mut().enumerate() {
        let field = |name: &str| format!("app[{i}].{name}");
        if !valid_app_id(&app.id) {
            errs.add(
                field("id"),
                format!(
                    "{:?} is not a valid app id ([a-z0-9][a-z0-9_-]{{0,63}})",
                    app.id
                ),
            );
        } else if let Some(first) = ids.get(&app.id) {
            errs.add(
                field("id"),
                format!("{:?} is already the id of app[{first}]", app.id),
            );
        } else {
            ids.insert(app.id.clone(), i);
        }

        // The device secret.
        app.secret.clear();
        let secret_field = match (&app.device_secret, &app.device_secret_env) {
            (Some(_), Some(_)) => {
                errs.add(
                    field("device_secret_env"),
                    "set device_secret or device_secret_env, not both",
                );
                None
            }
            (None, None) => {
                errs.add(
                    field("device_secret"),
                    "missing: set device_secret, or device_secret_env to the name of an \
                     environment variable holding it",
                );
                None
            }
            (Some(secret), None) if secret.is_empty() => {
                errs.add(field("device_secret"), "must not be empty");
                None
            }
            (Some(secret), None) => {
                app.secret = secret.clone();
                Some(field("device_secret"))
            }
            (None, Some(name)) => match env(name) {
                None => {
                    errs.add(
                        field("device_secret_env"),
                        format!("environment variable {name:?} is not set"),
                    );
                    None
                }
                Some(v) if v.is_empty() => {
                    errs.add(
                        field("device_secret_env"),
                        format!("environment variable {name:?} is empty"),
                    );
                    None
                }
                Some(v) => {
                    app.secret = v;
                    Some(field("device_secret_env"))
                }
            },
        };
        if let Some(secret_field) = secret_field {
            if let Some(&other) = secrets.get(&app.secret) {
                errs.add(
                    secret_field,
                    format!(
                        "the same device secret as app[{other}]: each app needs its own, or \
                         whoever signs device tokens for one can sign them for the other"
                    ),
                );
            } else {
                secrets.insert(app.secret.clone(), i);
            }
        }

        // API keys, each with the field to blame for it.
        let mut keys: Vec<(String, String)> = Vec::new();
        for (k, key) in app.api_keys.iter().enumerate() {
            let f = field(&format!("api_keys[{k}]"));
            match key_problem(key) {
                Some(problem) => errs.add(f, problem),
                None => keys.push((key.clone(), f)),
            }
        }
        if let Some(name) = &app.api_keys_env {
            let f = field("api_keys_env");
            match env(name) {
                None => errs.add(f, format!("environment variable {name:?} is not set")),
                Some(v) => {
                    let before = keys.len();
                    let mut bad = false;
                    for key in v.split(',').map(str::trim).filter(|k| !k.is_empty()) {
                        match key_problem(key) {
                            // Once is enough, and never quote the key.
                            Some(problem) if !bad => {
                                bad = true;
                                errs.add(
                                    f.clone(),
                                    format!("a key in environment variable {name:?} {problem}"),
                                );
                            }
                            Some(_) => {}
                            None => keys.push((key.to_string(), f.clone())),
                        }
                    }
                    if keys.len() == before && !bad {
                        errs.add(
                            f,
                            format!(
                                "environment variable {name:?} holds no key (keys are comma separated)"
                            ),
                        );
                    }
                }
            }
        } else if app.api_keys.is_empty() {
            errs.add(
                field("api_keys"),
                "no API key: set api_keys, or api_keys_env to the name of an environment \
                 variable holding them (comma separated)",
            );
        }
        app.keys.clear();
        for (key, f) in keys {
            match key_owner.get(&key) {
                Some(&other) if other != i => errs.add(
                    f,
                    format!(
                        "this key is also a key of app[{other}]: a key must belong to one app only"
                    ),
                ),
                Some(_) => {} // listed twice in one app: harmless, kept once
                None => {
                    key_owner.insert(key.clone(), i);
                    app.keys.push(key);
                }
            }
        }

        if app.max_connections == 0 {
            errs.add(
                field("max_connections"),
                "must be at least 1 (0 is not \"no limit\" here: it would refuse every device)",
            );
        }
    }
}

/// Why `key` cannot be an API key, if it cannot.
fn key_problem(key: &str) -> Option<&'static str> {
    if key.is_empty() {
        Some("must not be empty")
    } else if !key.bytes().all(|b| b.is_ascii_graphic()) {
        Some("must be visible ASCII without spaces (it is sent in an Authorization header)")
    } else {
        None
    }
}

/// Would binding both addresses fail (or one shadow the other)?
fn listeners_collide(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Collects problems, in the order found.
struct Errs(Vec<ConfigError>);

impl Errs {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            line: None,
            field: field.into(),
            message: message.into(),
        });
    }

    fn range<T: PartialOrd + fmt::Display>(&mut self, field: &str, value: T, min: T, max: T) {
        if value < min {
            self.add(field, format!("must be at least {min}, not {value}"));
        } else if value > max {
            self.add(field, format!("must be at most {max}, not {value}"));
        }
    }
}

/// 1-based line of byte `offset` in `text`.
fn line_at(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The span of the deepest item of `field` (`app[1].api_keys[0]`) present
/// in the document: the value itself, or else the table that should hold it.
fn span_of(root: &Item, field: &str) -> Option<Range<usize>> {
    let mut item = root;
    let mut best = None;
    for part in field.split('.') {
        let mut pieces = part.split('[');
        let name = pieces.next().unwrap_or_default();
        match item.get(name) {
            Some(next) => item = next,
            None => return best,
        }
        best = item.span().or(best);
        for index in pieces {
            let Some(next) = index
                .trim_end_matches(']')
                .parse::<usize>()
                .ok()
                .and_then(|i| item.get(i))
            else {
                return best;
            };
            item = next;
            best = item.span().or(best);
        }
    }
    best
}

fn covers(span: Option<Range<usize>>, offset: usize) -> bool {
    span.is_some_and(|s| s.start <= offset && offset < s.end.max(s.start + 1))
}

/// The key path (as in [`ConfigError::field`]) of the innermost key or
/// value at byte `offset`, or "" when none is there.
fn field_at(table: &Table, offset: usize) -> String {
    let mut path = String::new();
    find_in_table(table, offset, &mut path);
    path
}

fn push_key(path: &mut String, key: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(key);
}

fn find_in_table(table: &Table, offset: usize, path: &mut String) -> bool {
    for (name, _) in table.iter() {
        let Some((key, item)) = table.get_key_value(name) else {
            continue;
        };
        let len = path.len();
        push_key(path, name);
        if find_in_item(item, offset, path) || covers(key.span(), offset) {
            return true;
        }
        path.truncate(len);
    }
    false
}

fn find_in_item(item: &Item, offset: usize, path: &mut String) -> bool {
    match item {
        Item::None => false,
        Item::Table(t) => find_in_table(t, offset, path) || covers(t.span(), offset),
        Item::ArrayOfTables(tables) => {
            for (i, t) in tables.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                if find_in_table(t, offset, path) || covers(t.span(), offset) {
                    return true;
                }
                path.truncate(len);
            }
            false
        }
        Item::Value(v) => find_in_value(v, offset, path),
    }
}

fn find_in_value(value: &Value, offset: usize, path: &mut String) -> bool {
    match value {
        Value::Array(array) => {
            for (i, v) in array.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                if find_in_value(v, offset, path) {
                    return true;
                }
                path.truncate(len);
            }
        }
        Value::InlineTable(t) => {
            for (name, _) in t.iter() {
                let Some((key, item)) = t.get_key_value(name) else {
                    continue;
                };
                let len = path.len();
                push_key(path, name);
                if find_in_item(item, offset, path) || covers(key.span(), offset) {
                    return true;
                }
                path.truncate(len);
            }
        }
        _ => {}
    }
    covers(value.span(), offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PROTOCOL.md's config block, verbatim.
    const PROTOCOL_EXAMPLE: &str = r#"[device]
listen = "0.0.0.0:8080"
# tls_cert = "/etc/pushgate/cert.pem"   # both set: wss://
# tls_key  = "/etc/pushgate/key.pem"
heartbeat_secs = 30
handshake_timeout_secs = 10
max_frame_bytes = 4096
max_topics_per_device = 64
outbound_queue = 64          # frames queued per connection before slow_consumer
max_handshakes_per_sec = 0   # admission control; over it: 503 overloaded (0 = no limit)

[api]
listen = "127.0.0.1:8081"
fanout_queue = 65536         # accepted messages waiting for fan-out; full: 429 queue_full

[messages]
max_payload_bytes = 4096
max_pending = 100
default_ttl_secs = 3600

[store]
kind = "redb"                # "redb" (durable, embedded) or "memory" (tests, dry runs)
path = "pushgate-data"

[shutdown]
drain_secs = 30

[[app]]
id = "demo"
device_secret = "change-me"  # HS256 key for device tokens; device_secret_env = "NAME" reads it from the environment instead
api_keys = ["change-me-too"] # api_keys_env = "NAME" (comma separated) likewise
max_connections = 1000000
max_messages_per_sec = 0     # messages accepted per second for this app (each message of a batch counts, dry runs do not); over it: 429 rate_limited (0 = no limit)
"#;

    const APP: &str = "[[app]]\nid = \"demo\"\ndevice_secret = \"s\"\napi_keys = [\"k\"]\n";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    fn errors(text: &str) -> Vec<ConfigError> {
        match parse_with_env(text, &no_env) {
            Ok(_) => Vec::new(),
            Err(e) => e.errors,
        }
    }

    /// The fields blamed for `text`.
    fn fields(text: &str) -> Vec<String> {
        errors(text).into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn protocol_example_is_exactly_the_defaults() {
        let c = parse_with_env(PROTOCOL_EXAMPLE, &no_env).expect("the example is valid");
        assert_eq!(
            format!("{:?}", c.device),
            format!("{:?}", DeviceConfig::default())
        );
        assert_eq!(
            format!("{:?}", c.api),
            format!("{:?}", ApiConfig::default())
        );
        assert_eq!(
            format!("{:?}", c.messages),
            format!("{:?}", MessagesConfig::default())
        );
        assert_eq!(
            format!("{:?}", c.store),
            format!("{:?}", StoreConfig::default())
        );
        assert_eq!(c.shutdown.drain_secs, ShutdownConfig::default().drain_secs);
        assert_eq!(c.apps.len(), 1);
        let app = &c.apps[0];
        assert_eq!(app.id, "demo");
        assert_eq!(app.secret(), "change-me");
        assert_eq!(app.keys(), ["change-me-too".to_string()]);
        assert_eq!(
            (app.max_connections, app.max_messages_per_sec),
            (1_000_000, 0)
        );

        // An app with only the required keys gets the example's values.
        let min = parse_with_env(
            "[[app]]\nid = \"demo\"\ndevice_secret = \"change-me\"\napi_keys = [\"change-me-too\"]\n",
            &no_env,
        )
        .expect("valid");
        assert_eq!(format!("{:?}", min.apps), format!("{:?}", c.apps));
        assert_eq!(format!("{:?}", min.device), format!("{:?}", c.device));
        assert_eq!(format!("{:?}", min.store), format!("{:?}", c.store));

        // And the defaults are PROTOCOL.md's numbers (plus the extensions).
        let d = DeviceConfig::default();
        assert_eq!(
            d.listen,
            "0.0.0.0:8080".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!((d.tls_cert.clone(), d.tls_key.clone()), (None, None));
        assert_eq!(
            (
                d.heartbeat_secs,
                d.handshake_timeout_secs,
                d.max_frame_bytes
            ),
            (30, 10, 4096)
        );
        assert_eq!(
            (
                d.max_topics_per_device,
                d.outbound_queue,
                d.max_handshakes_per_sec
            ),
            (64, 64, 0)
        );
        let a = ApiConfig::default();
        assert_eq!(
            a.listen,
            "127.0.0.1:8081".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(a.fanout_queue, 65536);
        let m = MessagesConfig::default();
        assert_eq!(
            (m.max_payload_bytes, m.max_pending, m.default_ttl_secs),
            (4096, 100, 3600)
        );
        let s = StoreConfig::default();
        assert_eq!(
            (s.kind, s.path.as_path()),
            (StoreKind::Redb, Path::new("pushgate-data"))
        );
        assert_eq!(ShutdownConfig::default().drain_secs, 30);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let e = errors("[device]\nlisten = \"0.0.0.0:8080\"\nheartbeat = 5\n");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].line, Some(3));
        assert_eq!(e[0].field, "device.heartbeat");
        assert!(
            e[0].message.contains("unknown field `heartbeat`"),
            "{}",
            e[0].message
        );

        let e = errors(&format!("{APP}\n[[app]]\nid = \"b\"\ncolour = \"red\"\n"));
        assert_eq!((e[0].line, e[0].field.as_str()), (Some(8), "app[1].colour"));

        let e = errors(&format!("{APP}[extra]\nx = 1\n"));
        assert_eq!((e[0].line, e[0].field.as_str()), (Some(5), "extra"));

        let e = errors(&format!("{APP}device.listn = \"1.2.3.4:5\"\n"));
        assert_eq!(e[0].line, Some(5));
    }

    #[test]
    fn type_and_syntax_errors_have_their_line() {
        let e = errors("[device]\n\nheartbeat_secs = \"30\"\n");
        assert_eq!(
            (e[0].line, e[0].field.as_str()),
            (Some(3), "device.heartbeat_secs")
        );
        let e = errors("[api]\nlisten = \"localhost\"\n");
        assert_eq!((e[0].line, e[0].field.as_str()), (Some(2), "api.listen"));
        let e = errors("[store]\nkind = \"rocks\"\n");
        assert_eq!((e[0].line, e[0].field.as_str()), (Some(2), "store.kind"));
        assert!(e[0].message.contains("redb"), "{}", e[0].message);
        let e = errors("[device]\nlisten = \n");
        assert_eq!(e[0].line, Some(2));
        assert!(!e[0].message.is_empty());
        let e = errors("[[app]]\ndevice_secret = \"s\"\n");
        assert_eq!(e[0].line, Some(1));
        assert!(
            e[0].message.contains("missing field `id`"),
            "{}",
            e[0].message
        );
    }

    #[test]
    fn display_is_one_line_per_error_with_file_line_and_field() {
        let text = "[device]\nheartbeat_secs = 0\n\n[[app]]\nid = \"Bad\"\ndevice_secret = \"s\"\napi_keys = [\"k\"]\n";
        let mut e = parse_with_env(text, &no_env).expect_err("invalid");
        e.origin = "config.toml".into();
        assert_eq!(
            e.to_string(),
            "config.toml:2: device.heartbeat_secs: must be at least 1, not 0\n\
             config.toml:5: app[0].id: \"Bad\" is not a valid app id ([a-z0-9][a-z0-9_-]{0,63})"
        );
    }

    #[test]
    fn every_error_is_reported_in_file_order() {
        let text = format!(
            "[messages]\nmax_pending = 0\n[device]\nheartbeat_secs = 0\nmax_frame_bytes = 1\n{APP}id2 = 1\n"
        );
        // An unknown key stops parsing: fix it, then all rules report.
        assert_eq!(fields(&text), ["app[0].id2"]);
        let text =
            "[messages]\nmax_pending = 0\n[device]\nheartbeat_secs = 0\nmax_frame_bytes = 1\n";
        let e = errors(text);
        let got: Vec<(Option<usize>, &str)> =
            e.iter().map(|e| (e.line, e.field.as_str())).collect();
        assert_eq!(
            got,
            [
                (Some(2), "messages.max_pending"),
                (Some(4), "device.heartbeat_secs"),
                (Some(5), "device.max_frame_bytes"),
                (None, "app"),
            ]
        );
    }

    #[test]
    fn numeric_minimums_and_maximums() {
        // (section, key, refused, accepted)
        let cases: &[(&str, &str, &str, &str)] = &[
            ("device", "heartbeat_secs", "0", "1"),
            ("device", "heartbeat_secs", "86401", "86400"),
            ("device", "handshake_timeout_secs", "0", "1"),
            ("device", "max_frame_bytes", "63", "64"),
            ("device", "max_topics_per_device", "0", "1"),
            ("device", "outbound_queue", "0", "1"),
            ("device", "outbound_queue", "1073741825", "1073741824"),
            ("device", "max_pending_handshakes", "0", "1"),
            ("api", "fanout_queue", "0", "1"),
            ("messages", "max_payload_bytes", "0", "1"),
            ("messages", "max_pending", "0", "1"),
            ("messages", "default_ttl_secs", "2419201", "2419200"),
            ("store", "commit_max_batch", "0", "1"),
            ("store", "cache_mb", "0", "1"),
            ("store", "cache_mb", "1048577", "1048576"),
            ("shutdown", "drain_secs", "86401", "0"),
        ];
        for (section, key, bad, good) in cases {
            let text = format!("{APP}[{section}]\n{key} = {bad}\n");
            let e = errors(&text);
            assert_eq!(e.len(), 1, "{section}.{key} = {bad}: {e:?}");
            assert_eq!(e[0].field, format!("{section}.{key}"));
            assert_eq!(e[0].line, Some(6));
            let text = format!("{APP}[{section}]\n{key} = {good}\n");
            assert_eq!(errors(&text), [], "{section}.{key} = {good}");
        }
        assert_eq!(
            fields(&format!("{APP}max_connections = 0\n")),
            ["app[0].max_connections"]
        );
    }

    #[test]
    fn listeners_must_differ() {
        let f = |dev: &str, api: &str| {
            fields(&format!(
                "{APP}[device]\nlisten = \"{dev}\"\n[api]\nlisten = \"{api}\"\n"
            ))
        };
        assert_eq!(f("127.0.0.1:9000", "127.0.0.1:9000"), ["api.listen"]);
        assert_eq!(f("0.0.0.0:9000", "127.0.0.1:9000"), ["api.listen"]);
        assert_eq!(f("127.0.0.1:9000", "[::]:9000"), ["api.listen"]);
        assert!(f("127.0.0.1:9000", "127.0.0.1:9001").is_empty());
        assert!(f("127.0.0.1:9000", "127.0.0.2:9000").is_empty());
        // Port 0 asks the OS for a free port each: no collision (tests).
        assert!(f("127.0.0.1:0", "127.0.0.1:0").is_empty());
    }

    #[test]
    fn tls_cert_and_key_go_together() {
        assert_eq!(
            fields(&format!("{APP}[device]\ntls_cert = \"c.pem\"\n")),
            ["device.tls_cert"]
        );
        assert_eq!(
            fields(&format!("{APP}[device]\ntls_key = \"k.pem\"\n")),
            ["device.tls_key"]
        );
        assert!(fields(&format!(
            "{APP}[device]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n"
        ))
        .is_empty());
        assert_eq!(
            fields(&format!(
                "{APP}[device]\ntls_cert = \"\"\ntls_key = \"k.pem\"\n"
            )),
            ["device.tls_cert"]
        );
    }

    #[test]
    fn store_path_needed_for_redb() {
        assert_eq!(
            fields(&format!("{APP}[store]\npath = \"\"\n")),
            ["store.path"]
        );
        assert!(fields(&format!("{APP}[store]\nkind = \"memory\"\npath = \"\"\n")).is_empty());
    }

    #[test]
    fn apps_needed_valid_and_unique() {
        let e = errors("");
        assert_eq!((e[0].line, e[0].field.as_str()), (None, "app"));
        let e = errors("[[app]]\nid = \"Bad\"\ndevice_secret = \"s\"\napi_keys = [\"k\"]\n");
        assert_eq!((e[0].line, e[0].field.as_str()), (Some(2), "app[0].id"));
        assert_eq!(
            e[0].message,
            "\"Bad\" is not a valid app id ([a-z0-9][a-z0-9_-]{0,63})"
        );
        let e = errors(&format!(
            "{APP}\n[[app]]\nid = \"demo\"\ndevice_secret = \"t\"\napi_keys = [\"l\"]\n"
        ));
        assert_eq!((e[0].line, e[0].field.as_str()), (Some(7), "app[1].id"));
        assert!(e[0].message.contains("app[0]"), "{}", e[0].message);
    }

    #[test]
    fn device_secret_exactly_one_source() {
        let both = "[[app]]\nid = \"a\"\ndevice_secret = \"s\"\ndevice_secret_env = \"S\"\napi_keys = [\"k\"]\n";
        let e = errors(both);
        assert_eq!(
            (e[0].line, e[0].field.as_str()),
            (Some(4), "app[0].device_secret_env")
        );
        let neither = "[[app]]\nid = \"a\"\napi_keys = [\"k\"]\n";
        let e = errors(neither);
        // Missing from the file: blamed on the app's table header.
        assert_eq!(
            (e[0].line, e[0].field.as_str()),
            (Some(1), "app[0].device_secret")
        );
        assert_eq!(
            fields("[[app]]\nid = \"a\"\ndevice_secret = \"\"\napi_keys = [\"k\"]\n"),
            ["app[0].device_secret"]
        );
    }

    #[test]
    fn env_variables_are_resolved_once() {
        let text = "[[app]]\nid = \"a\"\ndevice_secret_env = \"PG_SECRET\"\napi_keys = [\"k0\"]\napi_keys_env = \"PG_KEYS\"\n";
        let env = env_of(&[("PG_SECRET", "from-env"), ("PG_KEYS", " k1 , k2,,k0, ")]);
        let c = parse_with_env(text, &env).expect("valid");
        assert_eq!(c.apps[0].secret(), "from-env");
        assert_eq!(c.apps[0].keys(), ["k0", "k1", "k2"]);
        // The original fields are kept as written.
        assert_eq!(c.apps[0].device_secret, None);
        assert_eq!(c.apps[0].device_secret_env.as_deref(), Some("PG_SECRET"));

        let unset = parse_with_env(text, &no_env).expect_err("unset");
        let got: Vec<&str> = unset.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(got, ["app[0].device_secret_env", "app[0].api_keys_env"]);
        assert!(unset.errors[0].message.contains("\"PG_SECRET\" is not set"));

        let empty = env_of(&[("PG_SECRET", ""), ("PG_KEYS", " , ")]);
        let e = parse_with_env(text, &empty).expect_err("empty");
        assert!(e.errors[0].message.contains("is empty"), "{e}");
        assert!(e.errors[1].message.contains("holds no key"), "{e}");

        // Keys from the environment alone are enough.
        let only_env = "[[app]]\nid = \"a\"\ndevice_secret = \"s\"\napi_keys_env = \"PG_KEYS\"\n";
        let c = parse_with_env(only_env, &env_of(&[("PG_KEYS", "x")])).expect("valid");
        assert_eq!(c.apps[0].keys(), ["x"]);
        let bad = env_of(&[("PG_KEYS", "good, has space")]);
        let e = parse_with_env(only_env, &bad).expect_err("bad key");
        assert_eq!(e.errors.len(), 1);
        assert!(
            !e.to_string().contains("has space"),
            "keys are never printed: {e}"
        );
    }

    #[test]
    fn api_keys_needed_well_formed_and_owned_by_one_app() {
        assert_eq!(
            fields("[[app]]\nid = \"a\"\ndevice_secret = \"s\"\n"),
            ["app[0].api_keys"]
        );
        assert_eq!(
            fields("[[app]]\nid = \"a\"\ndevice_secret = \"s\"\napi_keys = []\n"),
            ["app[0].api_keys"]
        );
        let e = errors("[[app]]\nid = \"a\"\ndevice_secret = \"s\"\napi_keys = [\n  \"ok\",\n  \"\",\n  \"a b\",\n]\n");
        let got: Vec<(Option<usize>, &str)> =
            e.iter().map(|e| (e.line, e.field.as_str())).collect();
        assert_eq!(
            got,
            [
                (Some(6), "app[0].api_keys[1]"),
                (Some(7), "app[0].api_keys[2]")
            ]
        );
        let two = format!(
            "{APP}\n[[app]]\nid = \"b\"\ndevice_secret = \"t\"\napi_keys = [\"x\", \"k\"]\n"
        );
        let e = errors(&two);
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].line, e[0].field.as_str()),
            (Some(9), "app[1].api_keys[1]")
        );
        // Twice in one app is harmless: kept once.
        let c = parse_with_env(
            "[[app]]\nid = \"a\"\ndevice_secret = \"s\"\napi_keys = [\"k\", \"k\"]\n",
            &no_env,
        )
        .expect("valid");
        assert_eq!(c.apps[0].keys(), ["k"]);
    }

    #[test]
    fn apps_do_not_share_a_device_secret() {
        let text =
            format!("{APP}\n[[app]]\nid = \"b\"\ndevice_secret = \"s\"\napi_keys = [\"l\"]\n");
        let e = errors(&text);
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].line, e[0].field.as_str()),
            (Some(8), "app[1].device_secret")
        );
    }

    #[test]
    fn inline_array_of_apps_gets_lines_too() {
        let e = errors("app = [\n  { id = \"a\", device_secret = \"s\", api_keys = [\"k\"] },\n  { id = \"B\", device_secret = \"t\", api_keys = [\"l\"] },\n]\n");
        assert_eq!((e[0].line, e[0].field.as_str()), (Some(3), "app[1].id"));
    }

    #[test]
    fn load_names_the_file() {
        let missing = load(Path::new("/nonexistent/pushgate.toml")).expect_err("missing");
        let text = missing.to_string();
        assert!(
            text.starts_with("/nonexistent/pushgate.toml: cannot read"),
            "{text}"
        );

        let path =
            std::env::temp_dir().join(format!("pushgate-config-test-{}.toml", std::process::id()));
        std::fs::write(&path, "[device]\nheartbeat_secs = 0\n").expect("write");
        let e = load(&path).expect_err("invalid");
        let _ = std::fs::remove_file(&path);
        let first = e.to_string().lines().next().unwrap_or_default().to_string();
        assert_eq!(
            first,
            format!(
                "{}:2: device.heartbeat_secs: must be at least 1, not 0",
                path.display()
            )
        );
    }

    #[test]
    fn dev_config_keeps_an_inherited_secret_and_key() {
        let kept = dev_with(
            Path::new("pushgate-data"),
            Some(("ab".repeat(32), "pgk_kept".into())),
        );
        assert_eq!(kept.apps[0].secret(), "ab".repeat(32));
        assert_eq!(kept.apps[0].keys(), ["pgk_kept".to_string()]);
        // Half given is not given.
        let fresh = dev_with(
            Path::new("pushgate-data"),
            Some((String::new(), "k".into())),
        );
        assert_ne!(fresh.apps[0].keys(), ["k".to_string()]);
    }

    #[test]
    fn dev_config_is_valid_and_random() {
        let mut a = dev(Path::new("pushgate-data"));
        let b = dev(Path::new("pushgate-data"));
        a.validate().expect("dev config is valid");
        assert_eq!(a.device.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(a.api.listen, SocketAddr::from(([127, 0, 0, 1], 8081)));
        assert_eq!(a.store.path, Path::new("pushgate-data"));
        assert_eq!(a.store.kind, StoreKind::Redb);
        assert_eq!(a.device.heartbeat_secs, 30);
        assert_eq!(a.apps.len(), 1);
        assert_eq!(a.apps[0].id, "demo");
        assert_eq!(a.app_index("demo"), Some(0));
        let secret = a.apps[0].secret();
        assert_eq!(secret.len(), 64);
        assert!(secret.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(secret, b.apps[0].secret());
        assert_eq!(a.apps[0].keys().len(), 1);
        assert_ne!(a.apps[0].keys(), b.apps[0].keys());
    }

    #[test]
    fn debug_leaves_secrets_out() {
        let c = parse_with_env(PROTOCOL_EXAMPLE, &no_env).expect("valid");
        let text = format!("{c:?}");
        assert!(text.contains("demo"));
        assert!(!text.contains("change-me"), "{text}");
    }
}
