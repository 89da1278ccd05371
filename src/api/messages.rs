//! `POST …/messages` and `POST …/messages/batch`: turn a JSON body into a
//! validated [`Outgoing`], refusing anything PROTOCOL.md does not allow with
//! a message that names the field (`to.devices[3]`, `messages[2].ttl`).
//!
//! Parsing walks a `serde_json::Value` by hand rather than deriving
//! `Deserialize`: that is what lets every refusal carry the exact path.
//! A body is first tried with a typed, borrowed parse ([`fast`]) that
//! takes only messages the walk would accept, with the same result, and
//! gives up on anything else, which then goes the walk's way: building a
//! `Value` of every message was ~13 % of the gateway's CPU at saturation.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::error::ApiError;
use super::{parse_json, read_json_bytes, ApiState, Caller};
use crate::config::MessagesConfig;
use crate::dispatch::{Accepted, Outgoing, Target};
use crate::protocol::{compact_json, push_json_str, valid_device_id, valid_topic};

mod fast;

/// Largest `ttl`, in seconds (28 days).
pub const MAX_TTL_SECS: u64 = 2_419_200;
/// Most device ids in one `to.devices`.
pub const MAX_DEVICES: usize = 1000;
/// Most messages in one batch.
pub const MAX_BATCH: usize = 500;
/// Longest `collapse_key`, in bytes. PROTOCOL.md sets no bound; this one
/// keeps keys index-sized.
pub const MAX_COLLAPSE_KEY_BYTES: usize = 128;

const MESSAGE_FIELDS: &str = "to, data, ttl, collapse_key, dry_run";
const TARGET_FIELDS: &str = "device, devices, topic, broadcast";
const DEVICE_ID_RULE: &str = "1-128 bytes of [A-Za-z0-9._:@-]";
const TOPIC_RULE: &str = "1-128 bytes of [A-Za-z0-9._:-]";

/// Body limit of a single message: `data` at its limit plus room for the
/// envelope, which holds up to 1000 device ids of up to 128 bytes
/// (~131 KB) and whitespace.
pub fn single_body_limit(cfg: &MessagesConfig) -> usize {
    cfg.max_payload_bytes.saturating_add(256 * 1024)
}

/// Body limit of a batch: 600 × (payload + envelope), a little over what
/// 500 messages at their limit need.
pub fn batch_body_limit(cfg: &MessagesConfig) -> usize {
    cfg.max_payload_bytes
        .saturating_add(1024)
        .saturating_mul(600)
}

/// A message as the API accepted it.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub msg: Outgoing,
    pub dry_run: bool,
}

/// Validate one message. `prefix` is prepended to every field name (`""`
/// for a single message, `"messages[3]."` in a batch).
pub fn parse_message(value: Value, prefix: &str, cfg: &MessagesConfig) -> Result<Parsed, ApiError> {
    let Value::Object(mut obj) = value else {
        let name = if prefix.is_empty() {
            "body".to_string()
        } else {
            prefix.trim_end_matches('.').to_string()
        };
        return Err(ApiError::invalid(format!(
            "{name}: must be a JSON object with the fields {MESSAGE_FIELDS}, got {}",
            kind_of(&value)
        )));
    };
    if let Some(key) = obj.keys().find(|k| {
        !matches!(
            k.as_str(),
            "to" | "data" | "ttl" | "collapse_key" | "dry_run"
        )
    }) {
        return Err(ApiError::invalid(format!(
            "{prefix}{}: unknown field (expected {MESSAGE_FIELDS})",
            show_key(key)
        )));
    }

    let target = parse_target(obj.get("to"), prefix)?;
    let Some(data) = obj.remove("data") else {
        return Err(ApiError::invalid(format!(
            "{prefix}data: missing (any JSON value, null included)"
        )));
    };
    let ttl = match present(obj.get("ttl")) {
        None => None,
        Some(v) => Some(v.as_u64().filter(|t| *t <= MAX_TTL_SECS).ok_or_else(|| {
            ApiError::invalid(format!(
                "{prefix}ttl: must be an integer from 0 to {MAX_TTL_SECS} (seconds), got {}",
                show_value(v)
            ))
        })?),
    };
    let collapse_key = match present(obj.get("collapse_key")) {
        None => None,
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_COLLAPSE_KEY_BYTES => {
            Some(s.clone())
        }
        Some(v) => {
            return Err(ApiError::invalid(format!(
            "{prefix}collapse_key: must be a string of 1 to {MAX_COLLAPSE_KEY_BYTES} bytes, got {}",
            show_value(v)
        )))
        }
    };
    let dry_run = match present(obj.get("dry_run")) {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(ApiError::invalid(format!(
                "{prefix}dry_run: must be true or false, got {}",
                show_value(v)
            )))
        }
    };

    let device_target = matches!(target, Target::Device(_) | Target::Devices(_));
    if !device_target {
        let to = match target {
            Target::Topic(_) => "to.topic",
            _ => "to.broadcast",
        };
        if ttl.is_some() {
            return Err(ApiError::invalid(format!(
                "{prefix}ttl: applies to device targets only, not to {prefix}{to}"
            )));
        }
        if collapse_key.is_some() {
            return Err(ApiError::invalid(format!(
                "{prefix}collapse_key: applies to device targets only, not to {prefix}{to}"
            )));
        }
    }

    let data = compact_json(&data);
    if data.len() > cfg.max_payload_bytes {
        return Err(ApiError::too_large(format!(
            "{prefix}data: {} bytes as compact JSON, over max_payload_bytes ({})",
            data.len(),
            cfg.max_payload_bytes
        )));
    }

    Ok(Parsed {
        msg: Outgoing {
            target,
            data,
            ttl_secs: if device_target {
                ttl.unwrap_or(cfg.default_ttl_secs)
            } else {
                0
            },
            collapse_key,
        },
        dry_run,
    })
}

fn parse_target(to: Option<&Value>, prefix: &str) -> Result<Target, ApiError> {
    let obj = match to {
        Some(Value::Object(o)) => o,
        None => {
            return Err(ApiError::invalid(format!(
                "{prefix}to: missing (an object with exactly one of {TARGET_FIELDS})"
            )))
        }
        Some(v) => {
            return Err(ApiError::invalid(format!(
                "{prefix}to: must be an object with exactly one of {TARGET_FIELDS}, got {}",
                kind_of(v)
            )))
        }
    };
    if let Some(key) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "device" | "devices" | "topic" | "broadcast"))
    {
        return Err(ApiError::invalid(format!(
            "{prefix}to.{}: unknown field (expected one of {TARGET_FIELDS})",
            show_key(key)
        )));
    }
    let mut entries = obj.iter();
    let (key, value) = match (entries.next(), entries.next()) {
        (Some(one), None) => one,
        (None, _) => {
            return Err(ApiError::invalid(format!(
                "{prefix}to: needs exactly one of {TARGET_FIELDS}, got none"
            )))
        }
        (Some(_), Some(_)) => {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            return Err(ApiError::invalid(format!(
                "{prefix}to: needs exactly one of {TARGET_FIELDS}, got {}",
                keys.join(" and ")
            )));
        }
    };
    match key.as_str() {
        "device" => device_str(value)
            .map(|id| Target::Device(id.to_owned()))
            .map_err(|problem| ApiError::invalid(format!("{prefix}to.device: {problem}"))),
        "devices" => parse_devices(value, prefix),
        "topic" => match value {
            Value::String(t) if valid_topic(t) => Ok(Target::Topic(t.clone())),
            Value::String(t) => Err(ApiError::invalid(format!(
                "{prefix}to.topic: {} is not a valid topic ({TOPIC_RULE})",
                show_str(t)
            ))),
            v => Err(ApiError::invalid(format!(
                "{prefix}to.topic: must be a string (a topic), got {}",
                kind_of(v)
            ))),
        },
        // The key list was checked above: only `broadcast` is left.
        _ => match value {
            Value::Bool(true) => Ok(Target::Broadcast),
            v => Err(ApiError::invalid(format!(
                "{prefix}to.broadcast: must be true, got {}",
                show_value(v)
            ))),
        },
    }
}

fn parse_devices(value: &Value, prefix: &str) -> Result<Target, ApiError> {
    let Value::Array(items) = value else {
        return Err(ApiError::invalid(format!(
            "{prefix}to.devices: must be an array of device ids, got {}",
            kind_of(value)
        )));
    };
    if items.is_empty() || items.len() > MAX_DEVICES {
        return Err(ApiError::invalid(format!(
            "{prefix}to.devices: must hold 1 to {MAX_DEVICES} device ids, got {}",
            items.len()
        )));
    }
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(items.len());
    let mut ids = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let id = device_str(item)
            .map_err(|problem| ApiError::invalid(format!("{prefix}to.devices[{i}]: {problem}")))?;
        if let Some(first) = seen.insert(id, i) {
            return Err(ApiError::invalid(format!(
                "{prefix}to.devices[{i}]: {} repeats {prefix}to.devices[{first}]; ids must be distinct",
                show_str(id)
            )));
        }
        ids.push(id.to_owned());
    }
    Ok(Target::Devices(ids))
}

/// A valid device id, or what is wrong with it (without the field name).
fn device_str(value: &Value) -> Result<&str, String> {
    match value {
        Value::String(s) if valid_device_id(s) => Ok(s),
        Value::String(s) => Err(format!(
            "{} is not a valid device id ({DEVICE_ID_RULE})",
            show_str(s)
        )),
        v => Err(format!(
            "must be a string (a device id), got {}",
            kind_of(v)
        )),
    }
}

/// A device id from the path, checked like one in a body.
pub fn path_device_id(device: &str) -> Result<(), ApiError> {
    if valid_device_id(device) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "device: {} is not a valid device id ({DEVICE_ID_RULE})",
            show_str(device)
        )))
    }
}

/// An optional field: absent and `null` both mean "not given".
fn present(v: Option<&Value>) -> Option<&Value> {
    v.filter(|v| !v.is_null())
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Scalars as written (bounded), containers by kind.
fn show_value(v: &Value) -> String {
    match v {
        Value::String(s) => show_str(s),
        Value::Bool(_) | Value::Number(_) => v.to_string(),
        _ => kind_of(v).to_string(),
    }
}

/// A client-supplied string, JSON-quoted and cut at 64 bytes, so a message
/// stays readable whatever was sent.
fn show_str(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return Value::from(s).to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let quoted = Value::from(&s[..end]).to_string();
    format!("{}…\"", &quoted[..quoted.len() - 1])
}

/// A field name as the client wrote it: bare when it is a plain identifier.
fn show_key(k: &str) -> String {
    if !k.is_empty()
        && k.len() <= 64
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        k.to_string()
    } else {
        show_str(k)
    }
}

/// Appends the answer for one accepted (or dry-run) message:
/// `{"id":…,"online":…,"stored":…}`, plus `"dry_run":true` for a dry run.
fn push_accepted(out: &mut String, a: &Accepted, dry_run: bool) {
    use std::fmt::Write;
    out.push_str("{\"id\":");
    push_json_str(out, &a.id);
    let _ = write!(out, ",\"online\":{},\"stored\":{}", a.online, a.stored);
    if dry_run {
        out.push_str(",\"dry_run\":true");
    }
    out.push('}');
}

/// Appends `{"error":{"code":…,"message":…}}`.
fn push_error(out: &mut String, e: &ApiError) {
    out.push_str("{\"error\":");
    out.push_str(&e.to_json().to_string());
    out.push('}');
}

/// A JSON answer written as text (no `Value` built for it).
fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// Dry-run or accept one validated message (the rate limit counts real
/// messages only); the answer's JSON.
async fn submit(state: &ApiState, app: usize, parsed: Parsed) -> Result<String, ApiError> {
    let mut out = String::with_capacity(96);
    if parsed.dry_run {
        let a = state.dispatcher.dry_run(app, &parsed.msg);
        push_accepted(&mut out, &a, true);
        return Ok(out);
    }
    state.dispatcher.take_rate(app)?;
    let a = state.dispatcher.accept(app, parsed.msg).await?;
    push_accepted(&mut out, &a, false);
    Ok(out)
}

/// `POST /v1/apps/{app}/messages`: 202 when accepted, 200 for a dry run.
pub async fn send(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_json_bytes(&headers, body, single_body_limit(&state.messages)).await?;
    let parsed = match fast::message(&bytes, &state.messages) {
        Some(parsed) => parsed,
        None => parse_message(parse_json(&bytes)?, "", &state.messages)?,
    };
    let dry_run = parsed.dry_run;
    let answer = submit(&state, caller.app, parsed).await?;
    let status = if dry_run {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok(json_response(status, answer))
}

/// `POST /v1/apps/{app}/messages/batch`: 200 with one result per message,
/// in request order. The accepted messages go to the dispatcher together
/// (`Dispatcher::accept_many`), so their durable appends share commits;
/// messages to the same device still get their seqs in request order.
pub async fn batch(
    State(state): State<Arc<ApiState>>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_json_bytes(&headers, body, batch_body_limit(&state.messages)).await?;
    // Every entry parsed the typed way, or the whole body the walk's way
    // (so that a refusal is exactly the walk's, body-level ones included).
    let parsed: Vec<Result<Parsed, ApiError>> = match fast::batch(&bytes, &state.messages) {
        Some(all) => all.into_iter().map(Ok).collect(),
        None => batch_messages(parse_json(&bytes)?)?
            .into_iter()
            .enumerate()
            .map(|(i, entry)| parse_message(entry, &format!("messages[{i}]."), &state.messages))
            .collect(),
    };
    // Each entry's answer: written at once (refused, dry run), or the index
    // of its message among those accepted together.
    let mut answers: Vec<Result<String, usize>> = Vec::with_capacity(parsed.len());
    let mut to_accept = Vec::new();
    for entry in parsed {
        let mut out = String::new();
        match entry {
            Ok(parsed) if parsed.dry_run => push_accepted(
                &mut out,
                &state.dispatcher.dry_run(caller.app, &parsed.msg),
                true,
            ),
            Ok(parsed) => match state.dispatcher.take_rate(caller.app) {
                Ok(()) => {
                    answers.push(Err(to_accept.len()));
                    to_accept.push(parsed.msg);
                    continue;
                }
                Err(e) => push_error(&mut out, &ApiError::from(e)),
            },
            Err(e) => push_error(&mut out, &e),
        }
        answers.push(Ok(out));
    }
    let accepted = state.dispatcher.accept_many(caller.app, to_accept).await;
    let mut body = String::with_capacity(16 + 64 * answers.len());
    body.push_str("{\"results\":[");
    for (i, answer) in answers.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        match answer {
            Ok(text) => body.push_str(text),
            Err(k) => match accepted.get(*k) {
                Some(Ok(a)) => push_accepted(&mut body, a, false),
                Some(Err(e)) => push_error(&mut body, &ApiError::from(e.clone())),
                // accept_many answers every message it was given; this
                // only keeps the answer aligned with the request if that
                // ever broke.
                None => body.push_str(
                    r#"{"error":{"code":"store_unavailable","message":"no answer for this message; retry it"}}"#,
                ),
            },
        }
    }
    body.push_str("]}");
    Ok(json_response(StatusCode::OK, body))
}

/// The `messages` array of a batch body, 1–500 entries.
fn batch_messages(value: Value) -> Result<Vec<Value>, ApiError> {
    let Value::Object(mut obj) = value else {
        return Err(ApiError::invalid(format!(
            "body: must be a JSON object {{\"messages\": [...]}}, got {}",
            kind_of(&value)
        )));
    };
    if let Some(key) = obj.keys().find(|k| k.as_str() != "messages") {
        return Err(ApiError::invalid(format!(
            "{}: unknown field (expected messages)",
            show_key(key)
        )));
    }
    match obj.remove("messages") {
        Some(Value::Array(items)) if (1..=MAX_BATCH).contains(&items.len()) => Ok(items),
        Some(Value::Array(items)) => Err(ApiError::invalid(format!(
            "messages: must hold 1 to {MAX_BATCH} messages, got {}",
            items.len()
        ))),
        Some(v) => Err(ApiError::invalid(format!(
            "messages: must be an array of messages, got {}",
            kind_of(&v)
        ))),
        None => Err(ApiError::invalid(
            "messages: missing (an array of 1 to 500 messages)",
        )),
    }
}
