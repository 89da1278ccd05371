//! Wire types of PROTOCOL.md: names, frames both ways, close codes and error
//! codes. Knows no sockets and no HTTP, so both the device side and the API
//! side (and the loadtest) speak exactly the same words.

use std::fmt::Write as _;

/// Is `s` a valid app id: `[a-z0-9][a-z0-9_-]{0,63}`.
pub fn valid_app_id(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

/// Is `s` a valid device id: 1–128 bytes of `[A-Za-z0-9._:@-]`.
pub fn valid_device_id(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=128).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'@' | b'-'))
}

/// Is `s` a valid topic: 1–128 bytes of `[A-Za-z0-9._:-]`.
pub fn valid_topic(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=128).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
}

/// Does a token's `topics` claim allow `topic`? An entry ending in `*` is a
/// prefix; an absent or empty list allows nothing.
pub fn topic_allowed(patterns: &[String], topic: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => p == topic,
    })
}

/// A new message id: UUIDv7, so ids are unique and time-ordered.
pub fn new_message_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Why the gateway closes a device connection. Each has its WebSocket close
/// code and, where PROTOCOL.md says so, a `bye` frame first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CloseReason {
    /// Shutdown drain: `bye` with `retry_ms`, close 1001.
    Draining = 1,
    /// Another connection of the same device won: `bye`, close 4001.
    Replaced = 2,
    /// The API kicked the device: `bye`, close 4002.
    Kicked = 3,
    /// The token's `exp` passed: `bye`, close 4003.
    TokenExpired = 4,
    /// The outbound queue overflowed: `bye` with `retry_ms`, close 4008.
    SlowConsumer = 5,
    /// Nothing received for `2 × heartbeat + 5 s`: close 4009, no `bye`.
    Idle = 6,
    /// Ten refused frames: close 1008, no `bye`.
    PolicyViolation = 7,
    /// A frame over `max_frame_bytes`: close 1009, no `bye`.
    FrameTooLarge = 8,
    /// The device closed, or the socket failed (a metric label only).
    Remote = 9,
}

impl CloseReason {
    /// All reasons, for pre-registering metric labels.
    pub const ALL: [CloseReason; 9] = [
        CloseReason::Draining,
        CloseReason::Replaced,
        CloseReason::Kicked,
        CloseReason::TokenExpired,
        CloseReason::SlowConsumer,
        CloseReason::Idle,
        CloseReason::PolicyViolation,
        CloseReason::FrameTooLarge,
        CloseReason::Remote,
    ];

    /// The reason string used in `bye` frames and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Draining => "draining",
            CloseReason::Replaced => "replaced",
            CloseReason::Kicked => "kicked",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Idle => "idle",
            CloseReason::PolicyViolation => "policy_violation",
            CloseReason::FrameTooLarge => "frame_too_large",
            CloseReason::Remote => "remote",
        }
    }

    /// The WebSocket close code.
    pub fn code(self) -> u16 {
        match self {
            CloseReason::Draining => 1001,
            CloseReason::Replaced => 4001,
            CloseReason::Kicked => 4002,
            CloseReason::TokenExpired => 4003,
            CloseReason::SlowConsumer => 4008,
            CloseReason::Idle => 4009,
            CloseReason::PolicyViolation => 1008,
            CloseReason::FrameTooLarge => 1009,
            CloseReason::Remote => 1000,
        }
    }

    /// Whether a `bye` frame precedes the close.
    pub fn sends_bye(self) -> bool {
        matches!(
            self,
            CloseReason::Draining
                | CloseReason::Replaced
                | CloseReason::Kicked
                | CloseReason::TokenExpired
                | CloseReason::SlowConsumer
        )
    }

    /// Whether the `bye` carries `retry_ms` (PROTOCOL.md: draining and
    /// slow_consumer only).
    pub fn has_retry(self) -> bool {
        matches!(self, CloseReason::Draining | CloseReason::SlowConsumer)
    }

    /// Decode from the `repr(u8)` value; unknown values give `None`.
    pub fn from_u8(v: u8) -> Option<CloseReason> {
        CloseReason::ALL.iter().copied().find(|r| *r as u8 == v)
    }
}

/// Codes of `error` frames sent to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    BadFrame,
    UnknownType,
    Forbidden,
    TooManyTopics,
}

impl FrameError {
    pub fn as_str(self) -> &'static str {
        match self {
            FrameError::BadFrame => "bad_frame",
            FrameError::UnknownType => "unknown_type",
            FrameError::Forbidden => "forbidden",
            FrameError::TooManyTopics => "too_many_topics",
        }
    }
}

/// A frame from a device, parsed. Unknown fields besides `t` and the frame's
/// own field are ignored, so devices can add fields without breaking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceFrame {
    Ack { seq: u64 },
    Sub { topic: String },
    Unsub { topic: String },
}

/// Why a device frame was refused: the code for the `error` frame and a
/// human message naming what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameRefusal {
    pub code: FrameError,
    pub message: String,
}

impl FrameRefusal {
    fn bad(message: impl Into<String>) -> FrameRefusal {
        FrameRefusal {
            code: FrameError::BadFrame,
            message: message.into(),
        }
    }
}

/// An ack exactly as devices send it: `{"t":"ack","seq":N}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AckFrame<'a> {
    t: &'a str,
    seq: u64,
}

/// Parse a device text frame (one JSON parse). Topic names are checked for
/// validity here (`bad_frame`); permissions are the caller's business.
pub fn parse_device_frame(text: &str) -> Result<DeviceFrame, FrameRefusal> {
    // A device acks every message it gets: an ack in the form devices send
    // is parsed typed and borrowed. Anything this does not take exactly
    // (other fields, a duplicate key, a seq that is no u64) goes the
    // `Value` way, which answers the same for what this takes and names
    // every refusal. The prefix check keeps other frames from paying for a
    // failed typed parse (its error is built with a message).
    if text.starts_with(r#"{"t":"ack","#) {
        if let Ok(AckFrame { t: "ack", seq }) = serde_json::from_str(text) {
            return Ok(DeviceFrame::Ack { seq });
        }
    }
    parse_device_frame_value(text)
}

/// Every device frame, through a `serde_json::Value`.
fn parse_device_frame_value(text: &str) -> Result<DeviceFrame, FrameRefusal> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| FrameRefusal::bad(format!("invalid JSON: {e}")))?;
    let Some(obj) = value.as_object() else {
        return Err(FrameRefusal::bad("a frame must be a JSON object"));
    };
    let t = match obj.get("t") {
        Some(serde_json::Value::String(t)) => t.as_str(),
        Some(_) => return Err(FrameRefusal::bad("field `t` must be a string")),
        None => return Err(FrameRefusal::bad("field `t` is missing")),
    };
    match t {
        "ack" => {
            let seq = obj
                .get("seq")
                .and_then(|v| v.as_u64())
                .ok_or_else(|| FrameRefusal::bad("ack needs `seq`, an unsigned integer"))?;
            Ok(DeviceFrame::Ack { seq })
        }
        "sub" | "unsub" => {
            let topic = obj
                .get("topic")
                .and_then(|v| v.as_str())
                .ok_or_else(|| FrameRefusal::bad(format!("{t} needs `topic`, a string")))?;
            if !valid_topic(topic) {
                return Err(FrameRefusal::bad(
                    "`topic` must be 1-128 bytes of [A-Za-z0-9._:-]",
                ));
            }
            let topic = topic.to_string();
            Ok(if t == "sub" {
                DeviceFrame::Sub { topic }
            } else {
                DeviceFrame::Unsub { topic }
            })
        }
        other => Err(FrameRefusal {
            code: FrameError::UnknownType,
            message: format!("unknown frame type `{}`", truncate(other, 64)),
        }),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Append `s` as a JSON string literal (quotes included).
pub fn push_json_str(out: &mut String, s: &str) {
    // Escaped in place: this runs for every frame encoded, and going
    // through a serde_json::Value cost two allocations per string. The
    // output is what serde_json writes (checked in the tests).
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The `hello` frame.
pub fn hello_frame(device: &str, heartbeat_secs: u64) -> String {
    let mut s = String::with_capacity(48 + device.len());
    s.push_str(r#"{"t":"hello","device":"#);
    push_json_str(&mut s, device);
    let _ = write!(s, r#","heartbeat":{heartbeat_secs}}}"#);
    s
}

/// Where a `msg` frame is going: picks which of `seq` / `topic` it carries.
#[derive(Debug, Clone, Copy)]
pub enum MsgTarget<'a> {
    Device {
        seq: u64,
    },
    /// A device-directed message with `ttl: 0`: neither `seq` nor `topic`.
    DeviceNow,
    Topic(&'a str),
    Broadcast,
}

/// A `msg` frame. `data` must already be compact JSON.
pub fn msg_frame(id: &str, target: MsgTarget<'_>, data: &str) -> String {
    let mut s = String::with_capacity(40 + id.len() + data.len());
    s.push_str(r#"{"t":"msg","id":"#);
    push_json_str(&mut s, id);
    match target {
        MsgTarget::Device { seq } => {
            let _ = write!(s, r#","seq":{seq}"#);
        }
        MsgTarget::Topic(topic) => {
            s.push_str(r#","topic":"#);
            push_json_str(&mut s, topic);
        }
        MsgTarget::DeviceNow | MsgTarget::Broadcast => {}
    }
    s.push_str(r#","data":"#);
    s.push_str(data);
    s.push('}');
    s
}

/// The `dropped` frame.
pub fn dropped_frame(count: u64) -> String {
    format!(r#"{{"t":"dropped","count":{count}}}"#)
}

/// The `subscribed` / `unsubscribed` answer.
pub fn sub_frame(subscribed: bool, topic: &str) -> String {
    let mut s = String::with_capacity(32 + topic.len());
    s.push_str(if subscribed {
        r#"{"t":"subscribed","topic":"#
    } else {
        r#"{"t":"unsubscribed","topic":"#
    });
    push_json_str(&mut s, topic);
    s.push('}');
    s
}

/// An `error` frame.
pub fn error_frame(code: FrameError, message: &str) -> String {
    let mut s = String::with_capacity(40 + message.len());
    s.push_str(r#"{"t":"error","code":""#);
    s.push_str(code.as_str());
    s.push_str(r#"","message":"#);
    push_json_str(&mut s, message);
    s.push('}');
    s
}

/// A `bye` frame; `retry_ms` is written only for reasons that carry it.
pub fn bye_frame(reason: CloseReason, retry_ms: u64) -> String {
    if reason.has_retry() {
        format!(
            r#"{{"t":"bye","reason":"{}","retry_ms":{retry_ms}}}"#,
            reason.as_str()
        )
    } else {
        format!(r#"{{"t":"bye","reason":"{}"}}"#, reason.as_str())
    }
}

/// Encode a JSON value compactly, the form whose size PROTOCOL.md limits
/// (no insignificant whitespace, non-ASCII not escaped).
pub fn compact_json(value: &serde_json::Value) -> String {
    // serde_json's compact writer never escapes non-ASCII.
    value.to_string()
}

/// Deepest nesting [`compact_raw_json`] answers for: well inside
/// serde_json's limit of 128 for a whole body.
pub const COMPACT_RAW_DEPTH: usize = 64;

/// `raw`, a valid JSON text, in exactly the form [`compact_json`] gives its
/// parsed value, without building that value (the API's hot path: a
/// `Value` costs an allocation per string, number and object entry).
/// `None` wherever the parsed value could print differently from the text
/// — a string with an escape, a number that is not a plain integer of at
/// most 18 digits (floats print in their shortest form), `-0`, a key
/// repeated in one object (the value keeps the last) — or nested deeper
/// than [`COMPACT_RAW_DEPTH`] (a parser refuses deep nesting, this scan
/// would not), and the caller parses it instead.
pub fn compact_raw_json(raw: &str) -> Option<String> {
    let b = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    // Per open container: the keys seen so far for an object, `None` for
    // an array.
    let mut open: Vec<Option<Vec<&str>>> = Vec::new();
    let mut key_next = false;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'"' => {
                let len = b[i + 1..].iter().position(|&c| c == b'"' || c == b'\\')?;
                let end = i + 1 + len;
                if b[end] != b'"' {
                    return None; // an escape
                }
                let text = &raw[i..=end];
                if key_next {
                    let keys = open.last_mut()?.as_mut()?;
                    if keys.contains(&text) {
                        return None;
                    }
                    keys.push(text);
                    key_next = false;
                }
                out.push_str(text);
                i = end + 1;
            }
            b'-' | b'0'..=b'9' => {
                let len = b[i..]
                    .iter()
                    .position(|c| !matches!(c, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'))
                    .unwrap_or(b.len() - i);
                let num = &raw[i..i + len];
                let digits = num.strip_prefix('-').unwrap_or(num);
                if digits.len() > 18
                    || !digits.bytes().all(|c| c.is_ascii_digit())
                    || num.starts_with("-0")
                {
                    return None;
                }
                out.push_str(num);
                i += len;
            }
            c => {
                match c {
                    b'{' | b'[' if open.len() == COMPACT_RAW_DEPTH => return None,
                    b'{' => {
                        open.push(Some(Vec::new()));
                        key_next = true;
                    }
                    b'[' => open.push(None),
                    b'}' | b']' => {
                        open.pop();
                        key_next = false;
                    }
                    b',' => key_next = matches!(open.last(), Some(Some(_))),
                    b':' => key_next = false,
                    _ => {} // a letter of true, false or null
                }
                out.push(char::from(c));
                i += 1;
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_ids() {
        assert!(valid_app_id("demo"));
        assert!(valid_app_id("0a_b-c"));
        assert!(valid_app_id(&"a".repeat(64)));
        assert!(!valid_app_id(&"a".repeat(65)));
        assert!(!valid_app_id(""));
        assert!(!valid_app_id("_a"));
        assert!(!valid_app_id("Demo"));
        assert!(!valid_app_id("a.b"));
    }

    #[test]
    fn device_ids_and_topics() {
        assert!(valid_device_id("d1"));
        assert!(valid_device_id("user@example.com:phone-1_a"));
        assert!(!valid_device_id(""));
        assert!(!valid_device_id(&"x".repeat(129)));
        assert!(valid_device_id(&"x".repeat(128)));
        assert!(!valid_device_id("a b"));
        assert!(!valid_device_id("é"));
        assert!(valid_topic("sport.football:live-1_x"));
        assert!(!valid_topic("a@b"));
        assert!(!valid_topic(""));
        assert!(!valid_topic("a*"));
    }

    #[test]
    fn topic_permissions() {
        let p = vec!["news".to_string(), "sport.*".to_string()];
        assert!(topic_allowed(&p, "news"));
        assert!(!topic_allowed(&p, "newsx"));
        assert!(topic_allowed(&p, "sport.football"));
        assert!(topic_allowed(&p, "sport."));
        assert!(!topic_allowed(&p, "sport"));
        assert!(!topic_allowed(&[], "news"));
        assert!(topic_allowed(&["*".to_string()], "anything"));
    }

    #[test]
    fn parses_device_frames() {
        assert_eq!(
            parse_device_frame(r#"{"t":"ack","seq":7}"#),
            Ok(DeviceFrame::Ack { seq: 7 })
        );
        assert_eq!(
            parse_device_frame(r#"{"seq":7,"t":"sub","topic":"news","x":1}"#),
            Ok(DeviceFrame::Sub {
                topic: "news".into()
            })
        );
        assert_eq!(
            parse_device_frame(r#"{"t":"unsub","topic":"news"}"#),
            Ok(DeviceFrame::Unsub {
                topic: "news".into()
            })
        );
        let code = |s: &str| parse_device_frame(s).unwrap_err().code;
        assert_eq!(code("not json"), FrameError::BadFrame);
        assert_eq!(code("[1,2]"), FrameError::BadFrame);
        assert_eq!(code(r#"{"seq":1}"#), FrameError::BadFrame);
        assert_eq!(code(r#"{"t":5}"#), FrameError::BadFrame);
        assert_eq!(code(r#"{"t":"ack"}"#), FrameError::BadFrame);
        assert_eq!(code(r#"{"t":"ack","seq":-1}"#), FrameError::BadFrame);
        assert_eq!(code(r#"{"t":"ack","seq":"1"}"#), FrameError::BadFrame);
        assert_eq!(code(r#"{"t":"sub"}"#), FrameError::BadFrame);
        assert_eq!(code(r#"{"t":"sub","topic":"a b"}"#), FrameError::BadFrame);
        assert_eq!(code(r#"{"t":"sub","topic":7}"#), FrameError::BadFrame);
        assert_eq!(code(r#"{"t":"hello"}"#), FrameError::UnknownType);
    }

    /// The typed ack path answers exactly what the `Value` path answers,
    /// for acks as devices send them and for everything near them.
    #[test]
    fn typed_ack_path_agrees_with_the_value_path() {
        let inputs = [
            r#"{"t":"ack","seq":7}"#,
            r#"{"t":"ack","seq":0}"#,
            r#"{"seq":7,"t":"ack"}"#,
            r#" { "t" : "ack" , "seq" : 18446744073709551615 } "#,
            r#"{"t":"ack","seq":18446744073709551616}"#,
            r#"{"t":"ack","seq":7,"x":1}"#,
            r#"{"t":"ack","seq":7,"seq":8}"#,
            r#"{"t":"ack","t":"sub","seq":7}"#,
            r#"{"t":"a\u0063k","seq":7}"#,
            r#"{"t":"ack","seq":7.0}"#,
            r#"{"t":"ack","seq":7e0}"#,
            r#"{"t":"ack","seq":-7}"#,
            r#"{"t":"ack","seq":null}"#,
            r#"{"t":"ack","seq":"7"}"#,
            r#"{"t":"ack"}"#,
            r#"{"t":"ACK","seq":7}"#,
            r#"{"t":"ack","seq":7} x"#,
            r#"{"t":"ack","seq":7"#,
            r#"[{"t":"ack","seq":7}]"#,
            r#"{"t":"sub","topic":"news","seq":7}"#,
            "",
        ];
        for input in inputs {
            assert_eq!(
                parse_device_frame(input),
                parse_device_frame_value(input),
                "{input}"
            );
        }
        for seq in [1u64, 9, 10, 99, 1 << 32, u64::MAX - 1] {
            let input = format!(r#"{{"t":"ack","seq":{seq}}}"#);
            assert_eq!(parse_device_frame(&input), Ok(DeviceFrame::Ack { seq }));
        }
    }

    #[test]
    fn frames_put_t_first_and_are_valid_json() {
        let frames = [
            hello_frame("d1", 30),
            msg_frame("id1", MsgTarget::Device { seq: 7 }, r#"{"a":1}"#),
            msg_frame("id1", MsgTarget::Topic("news"), "[1]"),
            msg_frame("id1", MsgTarget::Broadcast, "null"),
            msg_frame("id1", MsgTarget::DeviceNow, "\"é\""),
            dropped_frame(3),
            sub_frame(true, "news"),
            sub_frame(false, "news"),
            error_frame(FrameError::BadFrame, "bad \"quote\""),
            bye_frame(CloseReason::Draining, 1234),
            bye_frame(CloseReason::Replaced, 1234),
        ];
        for f in &frames {
            assert!(f.starts_with(r#"{"t":""#), "{f}");
            let v: serde_json::Value = serde_json::from_str(f).expect(f);
            assert!(v.is_object());
        }
        assert_eq!(
            frames[1],
            r#"{"t":"msg","id":"id1","seq":7,"data":{"a":1}}"#
        );
        assert_eq!(
            frames[2],
            r#"{"t":"msg","id":"id1","topic":"news","data":[1]}"#
        );
        assert_eq!(frames[3], r#"{"t":"msg","id":"id1","data":null}"#);
        assert_eq!(
            frames[9],
            r#"{"t":"bye","reason":"draining","retry_ms":1234}"#
        );
        assert_eq!(frames[10], r#"{"t":"bye","reason":"replaced"}"#);
    }

    #[test]
    fn strings_are_escaped_as_serde_json_does() {
        for input in [
            "plain",
            "quote \" and backslash \\",
            "ctl \n\r\t\u{08}\u{0c}\u{01}\u{1f}",
            "non-ascii é ✓ \u{7f}",
            "",
        ] {
            let mut ours = String::new();
            push_json_str(&mut ours, input);
            assert_eq!(
                ours,
                serde_json::Value::from(input).to_string(),
                "{input:?}"
            );
        }
    }

    #[test]
    fn compact_json_does_not_escape_non_ascii() {
        let v: serde_json::Value =
            serde_json::from_str("{ \"a\" : \"é\" , \"b\": [1, 2] }").unwrap();
        assert_eq!(compact_json(&v), "{\"a\":\"é\",\"b\":[1,2]}");
    }

    #[test]
    fn compact_raw_json_is_compact_json_of_the_parsed_value() {
        let same = [
            "{ \"a\" : \"é x\" , \"b\": [1, -2, true, false, null, {}, []] }",
            "\"plain\"",
            "123456789012345678",
            "{\"ts_us\":1764460000000000,\"run\":\"r1\",\"k\":7,\"pad\":\"xxxx\"}",
            "[ {\"a\":1}, {\"a\":2} ]",
        ];
        for raw in same {
            let v: serde_json::Value = serde_json::from_str(raw).unwrap();
            assert_eq!(
                compact_raw_json(raw).as_deref(),
                Some(&*compact_json(&v)),
                "{raw}"
            );
        }
        // Where the parsed value prints otherwise, no answer.
        for raw in [
            "\"a\\nb\"",
            "1.0",
            "1e2",
            "-0",
            "1234567890123456789",
            "{\"a\":1,\"a\":2}",
            "{\"a\":{\"b\":1,\"b\":1}}",
        ] {
            assert_eq!(compact_raw_json(raw), None, "{raw}");
        }
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert_eq!(compact_raw_json(&deep), None);
        let deep = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert_eq!(compact_raw_json(&deep), Some(deep.clone()));
        // The same key in sibling objects is not a repeat.
        assert!(compact_raw_json("{\"a\":{\"a\":1},\"b\":{\"a\":2}}").is_some());
    }

    proptest::proptest! {
        /// Whatever it answers is what the parsed value prints as.
        #[test]
        fn compact_raw_json_never_differs(v in json_value(), pretty in proptest::bool::ANY) {
            let raw = if pretty {
                serde_json::to_string_pretty(&v).unwrap()
            } else {
                serde_json::to_string(&v).unwrap()
            };
            let parsed: serde_json::Value = serde_json::from_str(&raw).unwrap();
            if let Some(compact) = compact_raw_json(&raw) {
                proptest::prop_assert_eq!(compact, compact_json(&parsed));
            }
        }
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            "[a-c\\\\\"é\n ]{0,6}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::vec(("[a-c]{0,2}", inner), 0..4)
                    .prop_map(|entries| { Value::Object(entries.into_iter().collect()) }),
            ]
        })
    }

    #[test]
    fn close_reasons_round_trip() {
        for r in CloseReason::ALL {
            assert_eq!(CloseReason::from_u8(r as u8), Some(r));
        }
        assert_eq!(CloseReason::from_u8(0), None);
    }
}
