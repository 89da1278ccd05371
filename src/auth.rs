//! Who a peer is: device tokens (JWTs signed HS256 with the app's device
//! secret, PROTOCOL.md "Device endpoint") and backend API keys. Built once
//! from the validated config; every check here is pure and cheap.

use std::collections::HashMap;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::Config;
use crate::protocol::{valid_app_id, valid_device_id, valid_topic};

/// The claims of a device token, once verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceClaims {
    /// The app id.
    pub app: String,
    /// The device id.
    pub sub: String,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// Topics the device may subscribe to; an entry ending in `*` is a
    /// prefix. Empty: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topics: Vec<String>,
}

/// Why a device token is refused (all answered 401 `unauthorized`, with
/// this text as the message), or cannot be issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token algorithm must be HS256, not {0:?}")]
    Algorithm(String),
    #[error("token has no `{0}` claim")]
    MissingClaim(&'static str),
    #[error("token is for unknown app {0:?}")]
    UnknownApp(String),
    #[error("token signature does not match the app's device secret")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token `sub` is not a valid device id (1-128 bytes of [A-Za-z0-9._:@-])")]
    BadSub,
    #[error("token `app` is not a valid app id ([a-z0-9][a-z0-9_-]{{0,63}})")]
    BadApp,
    #[error(
        "token `topics` entry {0:?} is not a topic (1-128 bytes of [A-Za-z0-9._:-]) \
         nor a topic prefix followed by `*`"
    )]
    BadTopic(String),
    #[error("cannot sign the token: {0}")]
    Signing(String),
}

/// Is `p` a valid entry of a token's `topics`: a topic, or a topic prefix
/// (possibly empty) followed by `*`.
pub fn valid_topic_pattern(p: &str) -> bool {
    match p.strip_suffix('*') {
        Some(prefix) => prefix.is_empty() || valid_topic(prefix),
        None => valid_topic(p),
    }
}

/// Device token verification keys and the API key table, per app index
/// (the index into `config.apps`).
pub struct Auth {
    apps: HashMap<String, usize>,
    keys: Vec<DecodingKey>,
    api_keys: HashMap<String, usize>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys stay out of logs.
        f.debug_struct("Auth")
            .field("apps", &self.apps)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// Build from a config that passed `validate()` (so secrets and keys are
    /// resolved, ids and keys unique).
    pub fn new(config: &Config) -> Auth {
        let mut apps = HashMap::new();
        let mut keys = Vec::with_capacity(config.apps.len());
        let mut api_keys = HashMap::new();
        for (i, app) in config.apps.iter().enumerate() {
            apps.insert(app.id.clone(), i);
            keys.push(DecodingKey::from_secret(app.secret().as_bytes()));
            for key in app.keys() {
                api_keys.insert(key.clone(), i);
            }
        }
        Auth {
            apps,
            keys,
            api_keys,
        }
    }

    /// Verify a device token at time `now_secs` (unix seconds): HS256
    /// only, signed with the secret of the app named by its `app` claim,
    /// `exp` > now, `sub` a valid device id, each `topics` entry a topic or
    /// a prefix ending in `*`. Returns the app index and the claims.
    pub fn verify_device_token(
        &self,
        token: &str,
        now_secs: u64,
    ) -> Result<(usize, DeviceClaims), AuthError> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("not three base64url parts separated by dots"));
        };
        let signed = &token.as_bytes()[..header.len() + 1 + payload.len()];

        // The library refuses other algorithms too, but `none` is not even
        // in its list, so it would only say "malformed"; say what is wrong.
        let header = decode_part(header)
            .ok_or_else(|| malformed("the header is not base64url-encoded JSON"))?;
        match header.get("alg") {
            Some(Value::String(alg)) if alg == "HS256" => {}
            Some(Value::String(alg)) => return Err(AuthError::Algorithm(clip(alg))),
            _ => return Err(malformed("the header has no `alg`")),
        }

        // Which app's secret to verify with comes from the claims, read
        // before verification; nothing else from them is trusted.
        let unverified = decode_part(payload)
            .ok_or_else(|| malformed("the claims are not base64url-encoded JSON"))?;
        let app = match unverified.get("app") {
            None => return Err(AuthError::MissingClaim("app")),
            Some(Value::String(app)) => app,
            Some(_) => return Err(malformed("claim `app` must be a string")),
        };
        let &index = self
            .apps
            .get(app.as_str())
            .ok_or_else(|| AuthError::UnknownApp(clip(app)))?;
        let key = self
            .keys
            .get(index)
            .ok_or_else(|| AuthError::UnknownApp(clip(app)))?;

        // The signature covers the exact header and claims text decoded
        // above (HMAC compared in constant time), so once it verifies those
        // decoded claims are the signed ones: no second decode.
        let verified = jsonwebtoken::crypto::verify(signature, signed, key, Algorithm::HS256)
            .map_err(|e| AuthError::Malformed(e.to_string()))?;
        if !verified {
            return Err(AuthError::BadSignature);
        }
        let claims = &unverified;

        // From here on, the claims are the signed ones.
        let app = app.to_string();
        let sub = match claims.get("sub") {
            None => return Err(AuthError::MissingClaim("sub")),
            Some(Value::String(sub)) => sub.clone(),
            Some(_) => return Err(malformed("claim `sub` must be a string")),
        };
        let exp = match claims.get("exp") {
            None => return Err(AuthError::MissingClaim("exp")),
            Some(exp) => numeric_date(exp)
                .ok_or_else(|| malformed("claim `exp` must be unix seconds, a number >= 0"))?,
        };
        if exp <= now_secs {
            return Err(AuthError::Expired);
        }
        if !valid_device_id(&sub) {
            return Err(AuthError::BadSub);
        }
        let topics = match claims.get("topics") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => {
                let mut topics = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Value::String(t) if valid_topic_pattern(t) => topics.push(t.clone()),
                        Value::String(t) => return Err(AuthError::BadTopic(clip(t))),
                        other => return Err(AuthError::BadTopic(clip(&other.to_string()))),
                    }
                }
                topics
            }
            Some(_) => return Err(malformed("claim `topics` must be an array of strings")),
        };
        Ok((
            index,
            DeviceClaims {
                app,
                sub,
                exp,
                topics,
            },
        ))
    }

    /// The index of the app `key` belongs to, if it is a configured API key.
    ///
    /// A `HashMap` lookup, not a constant-time comparison: the map's hasher
    /// is keyed randomly per process, so timing says little about stored
    /// keys, and keys are long random strings; good enough here.
    pub fn api_key_app(&self, key: &str) -> Option<usize> {
        self.api_keys.get(key).copied()
    }
}

/// Sign a device token (HS256) for `device` of `app`, expiring at `exp`
/// (unix seconds), allowed `topics` (each a topic or a prefix ending in
/// `*`). The inputs are checked as `verify_device_token` would.
pub fn issue_device_token(
    secret: &str,
    app: &str,
    device: &str,
    exp: u64,
    topics: &[String],
) -> Result<String, AuthError> {
    if !valid_app_id(app) {
        return Err(AuthError::BadApp);
    }
    if !valid_device_id(device) {
        return Err(AuthError::BadSub);
    }
    if let Some(bad) = topics.iter().find(|t| !valid_topic_pattern(t)) {
        return Err(AuthError::BadTopic(clip(bad)));
    }
    if secret.is_empty() {
        return Err(AuthError::Signing("the device secret is empty".into()));
    }
    let claims = DeviceClaims {
        app: app.to_string(),
        sub: device.to_string(),
        exp,
        topics: topics.to_vec(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| AuthError::Signing(e.to_string()))
}

fn malformed(why: &str) -> AuthError {
    AuthError::Malformed(why.to_string())
}

/// At most 64 bytes of a peer-chosen string, for an error message.
fn clip(s: &str) -> String {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// A JWT NumericDate: seconds, an integer or (RFC 7519 allows it) a
/// fraction, which is truncated.
fn numeric_date(v: &Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    let f = v.as_f64()?;
    if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 {
        Some(f as u64)
    } else {
        None
    }
}

/// A base64url (unpadded) JWT part holding a JSON object.
fn decode_part(part: &str) -> Option<Map<String, Value>> {
    serde_json::from_slice(&b64url_decode(part)?).ok()
}

fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AppConfig, Config};
    use serde_json::json;

    const NOW: u64 = 1_700_000_000;

    fn config() -> Config {
        let mut c = crate::config::dev(std::path::Path::new("unused"));
        c.apps = vec![
            AppConfig::new("demo", "secret-demo", vec!["key-demo".into()]),
            AppConfig::new("other", "secret-other", vec!["key-other".into()]),
        ];
        c
    }

    fn topics(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn b64url(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    /// A token with arbitrary claims, signed HS256 with `secret`.
    fn signed(secret: &str, claims: &Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("sign")
    }

    #[test]
    fn round_trip() {
        let auth = Auth::new(&config());
        let t = issue_device_token("secret-other", "other", "d1", NOW + 60, &topics(&["news"]))
            .expect("issue");
        let (index, claims) = auth.verify_device_token(&t, NOW).expect("verify");
        assert_eq!(index, 1);
        assert_eq!(
            claims,
            DeviceClaims {
                app: "other".into(),
                sub: "d1".into(),
                exp: NOW + 60,
                topics: topics(&["news"]),
            }
        );
        // No topics: the claim is left out and reads back as none.
        let t = issue_device_token("secret-demo", "demo", "d1", NOW + 60, &[]).expect("issue");
        let (index, claims) = auth.verify_device_token(&t, NOW).expect("verify");
        assert_eq!((index, claims.topics.len()), (0, 0));
    }

    #[test]
    fn expired_at_exp_without_leeway() {
        let auth = Auth::new(&config());
        let t = issue_device_token("secret-demo", "demo", "d1", NOW, &[]).expect("issue");
        assert_eq!(auth.verify_device_token(&t, NOW), Err(AuthError::Expired));
        assert_eq!(
            auth.verify_device_token(&t, NOW + 1000),
            Err(AuthError::Expired)
        );
        assert!(auth.verify_device_token(&t, NOW - 1).is_ok());
    }

    #[test]
    fn wrong_secret_and_other_apps_secret_refused() {
        let auth = Auth::new(&config());
        let t = issue_device_token("nope", "demo", "d1", NOW + 60, &[]).expect("issue");
        assert_eq!(
            auth.verify_device_token(&t, NOW),
            Err(AuthError::BadSignature)
        );
        // Signed by app "other" but claiming "demo".
        let t = issue_device_token("secret-other", "demo", "d1", NOW + 60, &[]).expect("issue");
        assert_eq!(
            auth.verify_device_token(&t, NOW),
            Err(AuthError::BadSignature)
        );
        // A tampered payload no longer matches its signature.
        let t = issue_device_token("secret-demo", "demo", "d1", NOW + 60, &[]).expect("issue");
        let parts: Vec<&str> = t.split('.').collect();
        let forged = b64url(
            json!({"app": "demo", "sub": "d2", "exp": NOW + 60})
                .to_string()
                .as_bytes(),
        );
        let t = format!("{}.{}.{}", parts[0], forged, parts[2]);
        assert_eq!(
            auth.verify_device_token(&t, NOW),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn unknown_app_refused() {
        let auth = Auth::new(&config());
        let t = issue_device_token("secret-demo", "ghost", "d1", NOW + 60, &[]).expect("issue");
        assert_eq!(
            auth.verify_device_token(&t, NOW),
            Err(AuthError::UnknownApp("ghost".into()))
        );
        let t = signed("secret-demo", &json!({"sub": "d1", "exp": NOW + 60}));
        assert_eq!(
            auth.verify_device_token(&t, NOW),
            Err(AuthError::MissingClaim("app"))
        );
    }

    #[test]
    fn alg_none_and_other_algorithms_refused() {
        let auth = Auth::new(&config());
        let claims = b64url(
            json!({"app": "demo", "sub": "d1", "exp": NOW + 60})
                .to_string()
                .as_bytes(),
        );
        for alg in ["none", "None", "HS384", "RS256"] {
            let header = b64url(json!({"alg": alg, "typ": "JWT"}).to_string().as_bytes());
            for sig in ["", "c2ln"] {
                let t = format!("{header}.{claims}.{sig}");
                assert_eq!(
                    auth.verify_device_token(&t, NOW),
                    Err(AuthError::Algorithm(alg.into())),
                    "{alg}"
                );
            }
        }
        // Really signed with HS384 and the right secret: still refused.
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &json!({"app": "demo", "sub": "d1", "exp": NOW + 60}),
            &EncodingKey::from_secret(b"secret-demo"),
        )
        .expect("sign");
        assert_eq!(
            auth.verify_device_token(&t, NOW),
            Err(AuthError::Algorithm("HS384".into()))
        );
    }

    #[test]
    fn missing_or_bad_exp_refused() {
        let auth = Auth::new(&config());
        let t = signed("secret-demo", &json!({"app": "demo", "sub": "d1"}));
        assert_eq!(
            auth.verify_device_token(&t, NOW),
            Err(AuthError::MissingClaim("exp"))
        );
        for exp in [json!("soon"), json!(-5), json!(null)] {
            let t = signed(
                "secret-demo",
                &json!({"app": "demo", "sub": "d1", "exp": exp}),
            );
            assert!(
                matches!(
                    auth.verify_device_token(&t, NOW),
                    Err(AuthError::Malformed(_))
                ),
                "{exp}"
            );
        }
        // A fractional NumericDate is allowed by RFC 7519.
        let t = signed(
            "secret-demo",
            &json!({"app": "demo", "sub": "d1", "exp": NOW as f64 + 10.5}),
        );
        assert_eq!(
            auth.verify_device_token(&t, NOW).map(|(_, c)| c.exp),
            Ok(NOW + 10)
        );
    }

    #[test]
    fn bad_sub_refused() {
        let auth = Auth::new(&config());
        for sub in [json!(""), json!("a b"), json!("x".repeat(129)), json!("é")] {
            let t = signed(
                "secret-demo",
                &json!({"app": "demo", "sub": sub, "exp": NOW + 60}),
            );
            assert_eq!(
                auth.verify_device_token(&t, NOW),
                Err(AuthError::BadSub),
                "{sub}"
            );
        }
        let t = signed("secret-demo", &json!({"app": "demo", "exp": NOW + 60}));
        assert_eq!(
            auth.verify_device_token(&t, NOW),
            Err(AuthError::MissingClaim("sub"))
        );
        let t = signed(
            "secret-demo",
            &json!({"app": "demo", "sub": 5, "exp": NOW + 60}),
        );
        assert!(matches!(
            auth.verify_device_token(&t, NOW),
            Err(AuthError::Malformed(_))
        ));
        assert_eq!(
            issue_device_token("secret-demo", "demo", "a b", NOW + 60, &[]),
            Err(AuthError::BadSub)
        );
    }

    #[test]
    fn topics_with_star() {
        let auth = Auth::new(&config());
        let ok = topics(&["*", "sport.*", "news", "a:b-c_d.e"]);
        let t = issue_device_token("secret-demo", "demo", "d1", NOW + 60, &ok).expect("issue");
        assert_eq!(
            auth.verify_device_token(&t, NOW).map(|(_, c)| c.topics),
            Ok(ok)
        );
        for bad in ["", "a*b", "**", "*a", "sp ort.*", "a@b"] {
            let t = signed(
                "secret-demo",
                &json!({"app": "demo", "sub": "d1", "exp": NOW + 60, "topics": ["news", bad]}),
            );
            assert_eq!(
                auth.verify_device_token(&t, NOW),
                Err(AuthError::BadTopic(bad.into())),
                "{bad}"
            );
            assert_eq!(
                issue_device_token("secret-demo", "demo", "d1", NOW + 60, &topics(&[bad])),
                Err(AuthError::BadTopic(bad.into()))
            );
        }
        let t = signed(
            "secret-demo",
            &json!({"app": "demo", "sub": "d1", "exp": NOW + 60, "topics": "news"}),
        );
        assert!(matches!(
            auth.verify_device_token(&t, NOW),
            Err(AuthError::Malformed(_))
        ));
        let t = signed(
            "secret-demo",
            &json!({"app": "demo", "sub": "d1", "exp": NOW + 60, "topics": [7]}),
        );
        assert_eq!(
            auth.verify_device_token(&t, NOW),
            Err(AuthError::BadTopic("7".into()))
        );
    }

    #[test]
    fn malformed_tokens_refused() {
        let auth = Auth::new(&config());
        for t in [
            "",
            "abc",
            "a.b",
            "a.b.c.d",
            "!!.!!.!!",
            "e30.e30.",
            "e30.W10.x",
        ] {
            assert!(
                matches!(
                    auth.verify_device_token(t, NOW),
                    Err(AuthError::Malformed(_))
                ),
                "{t}"
            );
        }
    }

    #[test]
    fn api_keys_map_to_their_app() {
        let auth = Auth::new(&config());
        assert_eq!(auth.api_key_app("key-demo"), Some(0));
        assert_eq!(auth.api_key_app("key-other"), Some(1));
        assert_eq!(auth.api_key_app("key-"), None);
        assert_eq!(auth.api_key_app(""), None);
    }

    #[test]
    fn base64url_decoder_matches_the_encoder() {
        for len in 0..40 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(b64url_decode(&b64url(&bytes)), Some(bytes));
        }
        assert_eq!(b64url_decode("a"), None);
        assert_eq!(b64url_decode("ab+/"), None);
    }
}
