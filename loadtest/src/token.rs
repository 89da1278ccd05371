//! Device tokens: HS256 JWTs with the claims PROTOCOL.md names, signed with
//! the app's device secret, as a backend would mint them.

use anyhow::{Context, Result};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

#[derive(Debug, Serialize)]
struct Claims<'a> {
    app: &'a str,
    sub: &'a str,
    exp: u64,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    topics: &'a [String],
}

/// Signs device tokens for one app.
pub struct Signer {
    key: EncodingKey,
    header: Header,
    app: String,
    ttl_secs: u64,
}

impl Signer {
    pub fn new(app: &str, secret: &str, ttl_secs: u64) -> Signer {
        Signer {
            key: EncodingKey::from_secret(secret.as_bytes()),
            header: Header::new(Algorithm::HS256),
            app: app.to_string(),
            ttl_secs,
        }
    }

    /// A token for `device`, valid for the signer's ttl from now, allowing
    /// `topics`.
    pub fn token(&self, device: &str, topics: &[String]) -> Result<String> {
        let claims = Claims {
            app: &self.app,
            sub: device,
            exp: crate::unix_secs() + self.ttl_secs,
            topics,
        };
        jsonwebtoken::encode(&self.header, &claims, &self.key)
            .with_context(|| format!("signing the token of {device}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    #[test]
    fn tokens_verify_with_the_secret() {
        let s = Signer::new("demo", "change-me", 60);
        let topics = vec!["news".to_string()];
        let t = s.token("lt-0-1", &topics).expect("signs");
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &t,
            &DecodingKey::from_secret(b"change-me"),
            &Validation::new(Algorithm::HS256),
        )
        .expect("verifies");
        assert_eq!(data.claims["app"], "demo");
        assert_eq!(data.claims["sub"], "lt-0-1");
        assert_eq!(data.claims["topics"][0], "news");
        assert!(data.claims["exp"].as_u64().expect("exp") > crate::unix_secs());
        let bad = jsonwebtoken::decode::<serde_json::Value>(
            &t,
            &DecodingKey::from_secret(b"other"),
            &Validation::new(Algorithm::HS256),
        );
        assert!(bad.is_err());
        let t = s.token("d", &[]).expect("signs");
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &t,
            &DecodingKey::from_secret(b"change-me"),
            &Validation::new(Algorithm::HS256),
        )
        .expect("verifies");
        assert!(data.claims.get("topics").is_none());
    }
}
