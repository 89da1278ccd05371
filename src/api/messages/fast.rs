//! The typed, borrowed parse of message bodies: no `Value` is built, ids
//! and topics are borrowed from the body, `data` is compacted from its raw
//! text. It answers only for a body the `Value` walk of the parent module
//! would accept, with the same [`Parsed`]; for anything else (a refusal, an
//! escape in a string, a float in `data`, a repeated key) it answers `None`
//! and the caller takes the walk, which says what is wrong. A property test
//! holds the two to the same results.

use std::collections::HashSet;

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use super::{Parsed, MAX_BATCH, MAX_COLLAPSE_KEY_BYTES, MAX_DEVICES, MAX_TTL_SECS};
use crate::config::MessagesConfig;
use crate::dispatch::{Outgoing, Target};
use crate::protocol::{compact_raw_json, valid_device_id, valid_topic};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Batch<'a> {
    #[serde(borrow)]
    messages: Vec<&'a RawValue>,
}

/// A message as the walk accepts it, field for field: `null` is "not
/// given" for the optional fields, as there.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Message<'a> {
    #[serde(borrow)]
    to: To<'a>,
    #[serde(borrow)]
    data: &'a RawValue,
    ttl: Option<u64>,
    #[serde(borrow)]
    collapse_key: Option<&'a str>,
    dry_run: Option<bool>,
}

/// `to`: a target given as `null` is not "not given" there (the walk
/// refuses it), so `null` fails the parse here.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct To<'a> {
    #[serde(default, borrow, deserialize_with = "not_null")]
    device: Option<&'a str>,
    #[serde(default, borrow, deserialize_with = "not_null")]
    devices: Option<Vec<&'a str>>,
    #[serde(default, borrow, deserialize_with = "not_null")]
    topic: Option<&'a str>,
    #[serde(default, deserialize_with = "not_null")]
    broadcast: Option<bool>,
}

fn not_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// A batch body's messages, if every one of them parses this way.
pub(super) fn batch(body: &[u8], cfg: &MessagesConfig) -> Option<Vec<Parsed>> {
    let body = std::str::from_utf8(body).ok()?;
    let batch: Batch = serde_json::from_str(body).ok()?;
    if !(1..=MAX_BATCH).contains(&batch.messages.len()) {
        return None;
    }
    batch
        .messages
        .iter()
        .map(|raw| parse(serde_json::from_str(raw.get()).ok()?, cfg))
        .collect()
}

/// A single message's body, if it parses this way.
pub(super) fn message(body: &[u8], cfg: &MessagesConfig) -> Option<Parsed> {
    let body = std::str::from_utf8(body).ok()?;
    parse(serde_json::from_str(body).ok()?, cfg)
}

/// The walk's rules (`parse_message`), in its terms; `None` where it refuses.
fn parse(m: Message, cfg: &MessagesConfig) -> Option<Parsed> {
    let to = m.to;
    let target = match (to.device, to.devices, to.topic, to.broadcast) {
        (Some(d), None, None, None) if valid_device_id(d) => Target::Device(d.to_owned()),
        (None, Some(ds), None, None) => {
            if ds.is_empty() || ds.len() > MAX_DEVICES {
                return None;
            }
            let mut seen = HashSet::with_capacity(ds.len());
            if !ds.iter().all(|d| valid_device_id(d) && seen.insert(*d)) {
                return None;
            }
            Target::Devices(ds.iter().map(|d| (*d).to_owned()).collect())
        }
        (None, None, Some(t), None) if valid_topic(t) => Target::Topic(t.to_owned()),
        (None, None, None, Some(true)) => Target::Broadcast,
        _ => return None,
    };
    if m.ttl.is_some_and(|t| t > MAX_TTL_SECS) {
        return None;
    }
    if m.collapse_key
        .is_some_and(|k| k.is_empty() || k.len() > MAX_COLLAPSE_KEY_BYTES)
    {
        return None;
    }
    let device_target = matches!(target, Target::Device(_) | Target::Devices(_));
    if !device_target && (m.ttl.is_some() || m.collapse_key.is_some()) {
        return None;
    }
    let data = compact_raw_json(m.data.get())?;
    if data.len() > cfg.max_payload_bytes {
        return None;
    }
    Some(Parsed {
        msg: Outgoing {
            target,
            data,
            ttl_secs: if device_target {
                m.ttl.unwrap_or(cfg.default_ttl_secs)
            } else {
                0
            },
            collapse_key: m.collapse_key.map(str::to_owned),
        },
        dry_run: m.dry_run.unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::super::{batch_messages, parse_message};
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn cfg() -> MessagesConfig {
        MessagesConfig {
            max_payload_bytes: 64,
            ..MessagesConfig::default()
        }
    }

    /// What the walk makes of a single message body.
    fn walk(body: &str, cfg: &MessagesConfig) -> Result<Parsed, String> {
        let v: Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
        parse_message(v, "", cfg).map_err(|e| format!("{e:?}"))
    }

    fn same(a: &Parsed, b: &Parsed) -> bool {
        format!("{:?}", a) == format!("{:?}", b)
    }

    /// The messages the load client and most backends send take this path
    /// (without it the property below holds trivially).
    #[test]
    fn plain_messages_take_the_typed_path() {
        let c = cfg();
        for body in [
            json!({"to": {"device": "d1"}, "data": {"ts_us": 1, "run": "r", "k": 3, "pad": "xx"}, "ttl": 3600}),
            json!({"to": {"devices": ["a", "b"]}, "data": "x", "collapse_key": "k", "ttl": null}),
            json!({"to": {"topic": "news"}, "data": [1, 2], "dry_run": true}),
            json!({"to": {"broadcast": true}, "data": null}),
        ] {
            let text = body.to_string();
            let fast = message(text.as_bytes(), &c).expect("typed path");
            assert!(
                same(&fast, &walk(&text, &c).expect("walk accepts")),
                "{text}"
            );
        }
        let text = json!({"messages": [{"to": {"device": "d1"}, "data": 1}, {"to": {"device": "d2"}, "data": 2}]}).to_string();
        assert_eq!(batch(text.as_bytes(), &c).expect("typed path").len(), 2);
    }

    /// What the walk refuses, or cannot tell apart from the text, is left
    /// to it.
    #[test]
    fn refusals_and_doubtful_text_go_to_the_walk() {
        let c = cfg();
        for body in [
            r#"{"to":{"device":"d1"},"data":1,"bogus":1}"#,
            r#"{"to":{"device":"d1","topic":null},"data":1}"#,
            r#"{"to":{"device":null},"data":1}"#,
            r#"{"to":{"devices":["a","a"]},"data":1}"#,
            r#"{"to":{"devices":[]},"data":1}"#,
            r#"{"to":{"topic":"news"},"data":1,"ttl":5}"#,
            r#"{"to":{"broadcast":false},"data":1}"#,
            r#"{"to":{"device":"d1"},"data":1,"ttl":2419201}"#,
            r#"{"to":{"device":"d1"},"data":1,"collapse_key":""}"#,
            r#"{"to":{"device":"d1"}}"#,
            r#"{"to":{"device":"d1"},"data":1,"data":2}"#,
            r#"{"to":{"device":"d\u0031"},"data":1}"#,
            r#"{"to":{"device":"d1"},"data":1.5}"#,
            r#"{"to":{"device":"d1"},"data":"this text is longer than the sixty-four bytes of the limit set here"}"#,
        ] {
            assert!(message(body.as_bytes(), &c).is_none(), "{body}");
        }
        for body in [
            r#"{"messages":[]}"#,
            r#"{"messages":[{"to":{"device":"d1"},"data":1},"not a message"]}"#,
            r#"{"messages":[{"to":{"device":"d1"},"data":1}],"extra":1}"#,
        ] {
            assert!(batch(body.as_bytes(), &c).is_none(), "{body}");
        }
    }

    /// Messages that are mostly valid, each with a few ways of being
    /// wrong, so that both parses see the edges of every rule.
    fn data() -> impl Strategy<Value = Value> {
        prop_oneof![
            4 => Just(json!({"k": [1, "x", {"z": true}], "n": -3})),
            2 => Just(json!(null)),
            2 => Just(json!(12)),
            1 => Just(json!(1.25)),
            1 => Just(json!("a\"b")),
            1 => Just(json!({"a": 1.0e3})),
            1 => Just(json!("x".repeat(70))),
        ]
    }

    prop_compose! {
        fn message_body()(
            kind in 0..4u8,
            device in prop_oneof![
                8 => Just(json!("d1")),
                1 => Just(json!("")),
                1 => Just(json!("bad id")),
                1 => Just(json!("d\u{e9}")),
                1 => Just(json!(7)),
                1 => Just(Value::Null),
            ],
            devices in prop_oneof![
                6 => Just(json!(["d1", "d2"])),
                1 => Just(json!([])),
                1 => Just(json!(["d1", "d1"])),
                1 => Just(json!(["d1", 3])),
                1 => Just(json!("d1")),
            ],
            topic in prop_oneof![
                6 => Just(json!("news")),
                1 => Just(json!("bad topic")),
                1 => Just(Value::Null),
            ],
            broadcast in prop_oneof![
                6 => Just(json!(true)),
                1 => Just(json!(false)),
                1 => Just(json!("yes")),
            ],
            second_target in proptest::bool::weighted(0.1),
            to_extra in proptest::bool::weighted(0.1),
            to_shape in prop_oneof![8 => Just(0u8), 1 => Just(1), 1 => Just(2)],
            data in proptest::option::weighted(0.9, data()),
            ttl in proptest::option::weighted(0.6, prop_oneof![
                Just(json!(0)),
                Just(json!(60)),
                Just(json!(MAX_TTL_SECS)),
                Just(json!(MAX_TTL_SECS + 1)),
                Just(json!(-1)),
                Just(json!(1.5)),
                Just(Value::Null),
            ]),
            collapse_key in proptest::option::weighted(0.4, prop_oneof![
                Just(json!("k")),
                Just(json!("")),
                Just(json!("k".repeat(MAX_COLLAPSE_KEY_BYTES + 1))),
                Just(json!(3)),
                Just(Value::Null),
            ]),
            dry_run in proptest::option::weighted(0.3, prop_oneof![
                Just(json!(true)),
                Just(json!(false)),
                Just(json!(1)),
                Just(Value::Null),
            ]),
            extra in proptest::bool::weighted(0.1),
        ) -> Value {
            let targets = [("device", device), ("devices", devices), ("topic", topic), ("broadcast", broadcast)];
            let mut to = serde_json::Map::new();
            let (k, v) = targets[usize::from(kind)].clone();
            to.insert(k.into(), v);
            if second_target {
                let (k, v) = targets[usize::from((kind + 1) % 4)].clone();
                to.insert(k.into(), v);
            }
            if to_extra { to.insert("x".into(), json!(1)); }
            let mut m = serde_json::Map::new();
            match to_shape {
                0 => { m.insert("to".into(), Value::Object(to)); }
                1 => { m.insert("to".into(), json!("d1")); }
                _ => {}
            }
            for (k, v) in [("data", data), ("ttl", ttl), ("collapse_key", collapse_key), ("dry_run", dry_run)] {
                if let Some(v) = v { m.insert(k.into(), v); }
            }
            if extra { m.insert("other".into(), json!(0)); }
            Value::Object(m)
        }
    }

    proptest! {
        /// Whatever the typed parse accepts, the walk accepts with the same
        /// result.
        #[test]
        fn typed_parse_agrees_with_the_walk(body in message_body(), pretty in any::<bool>()) {
            let c = cfg();
            let text = if pretty { serde_json::to_string_pretty(&body).unwrap() } else { body.to_string() };
            if let Some(fast) = message(text.as_bytes(), &c) {
                let slow = walk(&text, &c);
                prop_assert!(slow.as_ref().is_ok_and(|s| same(&fast, s)), "{} -> {:?} vs {:?}", text, fast, slow);
            }
        }

        #[test]
        fn typed_batch_agrees_with_the_walk(bodies in proptest::collection::vec(message_body(), 1..4)) {
            let c = cfg();
            let text = json!({"messages": bodies}).to_string();
            if let Some(fast) = batch(text.as_bytes(), &c) {
                let entries = batch_messages(serde_json::from_str(&text).unwrap()).unwrap();
                prop_assert_eq!(fast.len(), entries.len());
                for (i, (f, e)) in fast.iter().zip(entries).enumerate() {
                    let slow = parse_message(e, &format!("messages[{i}]."), &c);
                    prop_assert!(slow.as_ref().is_ok_and(|s| same(f, s)), "{} -> {:?}", text, f);
                }
            }
        }
    }
}
