//! The API against a real `Dispatcher` over `MemoryStore`, through
//! `tower::ServiceExt::oneshot`: no socket.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::{router, ApiState};
use crate::auth::Auth;
use crate::dispatch::Dispatcher;
use crate::fanout::{Fanout, FanoutQueue};
use crate::hub::{Conn, ConnHandle, Hub};
use crate::metrics::Metrics;
use crate::protocol::CloseReason;
use crate::shutdown::Drain;
use crate::store::memory::MemoryStore;
use crate::store::{
    AppendOutcome, DeviceRecord, ExpireOutcome, NewMessage, Store, StoreError, StoredMessage,
};

const CONFIG: &str = r#"
[messages]
max_payload_bytes = 64
default_ttl_secs = 600

[[app]]
id = "demo"
device_secret = "demo-secret-0123456789abcdef0123456789"
api_keys = ["k-demo"]

[[app]]
id = "other"
device_secret = "other-secret-0123456789abcdef012345678"
api_keys = ["k-other"]

[[app]]
id = "limited"
device_secret = "limited-secret-0123456789abcdef0123456"
api_keys = ["k-limited"]
max_messages_per_sec = 1
"#;

struct Fx {
    app: Router,
    state: Arc<ApiState>,
    /// Kept so the fan-out queue stays open (and fills up: no worker).
    _rx: FanoutQueue,
}

fn fixture() -> Fx {
    fixture_with(Arc::new(MemoryStore::new()), 1024)
}

fn fixture_with(store: Arc<dyn Store>, fanout_cap: usize) -> Fx {
    let config = crate::config::parse(CONFIG).unwrap();
    let ids: Vec<&str> = config.apps.iter().map(|a| a.id.as_str()).collect();
    let metrics = Arc::new(Metrics::new(&ids).unwrap());
    let hub = Arc::new(Hub::new(
        config
            .apps
            .iter()
            .map(|a| (a.id.clone(), a.max_connections)),
    ));
    let (fanout, rx) = Fanout::new(config.apps.len(), fanout_cap, metrics.clone());
    let dispatcher = Dispatcher::new(
        hub,
        store,
        metrics,
        fanout,
        config.apps.iter().map(|a| a.max_messages_per_sec),
        config.device.outbound_queue,
        config.messages.max_pending,
    );
    let state = Arc::new(ApiState {
        dispatcher: Arc::new(dispatcher),
        auth: Arc::new(Auth::new(&config)),
        drain: Arc::new(Drain::new()),
        forwarding: Default::default(),
        messages: config.messages.clone(),
        app_ids: config
            .apps
            .iter()
            .map(|a| Arc::from(a.id.as_str()))
            .collect(),
    });
    Fx {
        app: router(state.clone()),
        state,
        _rx: rx,
    }
}

/// A response, with its body parsed as JSON (`Value::Null` for an empty
/// body; a non-JSON body fails the test).
struct Resp {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

impl Resp {
    fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Assert a refusal: status, code, and that the message mentions `needle`.
    #[track_caller]
    fn refused(&self, status: StatusCode, code: &str, needle: &str) {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.body["error"], code, "{}", self.body);
        let message = self.body["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        let keys: Vec<&String> = self.body.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["error", "message"]);
    }
}

impl Fx {
    async fn send(&self, req: Request<Body>) -> Resp {
        let res = self.app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!(
                    "{status}: body is not JSON ({e}): {:?}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        Resp {
            status,
            headers,
            body,
        }
    }

    async fn post(&self, path: &str, key: &str, body: impl Into<String>) -> Resp {
        self.send(
            Request::post(path)
                .header(header::AUTHORIZATION, format!("Bearer {key}"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.into()))
                .unwrap(),
        )
        .await
    }

    /// `POST /v1/apps/demo/messages` with the demo key.
    async fn msg(&self, body: Value) -> Resp {
        self.post("/v1/apps/demo/messages", "k-demo", body.to_string())
            .await
    }

    async fn batch(&self, body: Value) -> Resp {
        self.post("/v1/apps/demo/messages/batch", "k-demo", body.to_string())
            .await
    }

    async fn call(&self, method: &str, path: &str, key: Option<&str>) -> Resp {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(key) = key {
            req = req.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        self.send(req.body(Body::empty()).unwrap()).await
    }

    /// Register a connection for `device` of app 0 (demo).
    fn connect(&self, device: &str) -> ConnHandle {
        let hub = &self.state.dispatcher.hub;
        let conn = Conn::new(hub.next_conn_id(), 0, Arc::from(device));
        hub.register(&conn).unwrap();
        conn
    }

    async fn pending_data(&self, device: &str) -> Vec<String> {
        self.state
            .dispatcher
            .store
            .pending("demo", device, 0, crate::dispatch::now_ms(), 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|m| String::from_utf8(m.data.to_vec()).unwrap())
            .collect()
    }
}

// ---- single messages -------------------------------------------------------

#[tokio::test]
async fn device_message_is_stored_and_answered_202() {
    let fx = fixture();
    let r = fx
        .msg(json!({"to": {"device": "d1"}, "data": {"title": "Hi"}}))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert!(r.body["id"].as_str().is_some_and(|id| !id.is_empty()));
    assert_eq!(r.body["online"], 0);
    assert_eq!(r.body["stored"], 1);
    assert!(r.body.get("dry_run").is_none());
    assert_eq!(fx.pending_data("d1").await, [r#"{"title":"Hi"}"#]);
}

#[tokio::test]
async fn connected_device_counts_online_and_gets_the_frame() {
    let fx = fixture();
    let conn = fx.connect("d1");
    let r = fx.msg(json!({"to": {"device": "d1"}, "data": 1})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.body["online"], 1);
    assert_eq!(r.body["stored"], 1);
    let (queued, _) = conn.take();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].seq, 1);
}

#[tokio::test]
async fn devices_topic_broadcast_and_ttl_zero() {
    let fx = fixture();
    let r = fx
        .msg(json!({"to": {"devices": ["a", "b", "c"]}, "data": null, "ttl": 60, "collapse_key": "k"}))
        .await;
    assert_eq!(
        (r.status, &r.body["stored"]),
        (StatusCode::ACCEPTED, &json!(3))
    );
    // `data: null` is a value like any other.
    assert_eq!(fx.pending_data("b").await, ["null"]);

    let r = fx.msg(json!({"to": {"topic": "news"}, "data": [1]})).await;
    assert_eq!(
        (r.status, &r.body["stored"]),
        (StatusCode::ACCEPTED, &json!(0))
    );
    let r = fx
        .msg(json!({"to": {"broadcast": true}, "data": "x"}))
        .await;
    assert_eq!(
        (r.status, &r.body["stored"]),
        (StatusCode::ACCEPTED, &json!(0))
    );

    let r = fx
        .msg(json!({"to": {"device": "now"}, "data": 1, "ttl": 0}))
        .await;
    assert_eq!(
        (r.status, &r.body["stored"]),
        (StatusCode::ACCEPTED, &json!(0))
    );
    assert!(fx.pending_data("now").await.is_empty());

    // `null` for an optional field means "not given".
    let r = fx
        .msg(json!({"to": {"topic": "news"}, "data": 1, "ttl": null, "collapse_key": null, "dry_run": null}))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
}

#[tokio::test]
async fn dry_run_counts_without_storing() {
    let fx = fixture();
    fx.connect("on");
    let r = fx
        .msg(json!({"to": {"devices": ["on", "off"]}, "data": 1, "dry_run": true}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["dry_run"], true);
    assert_eq!(r.body["online"], 1);
    assert_eq!(r.body["stored"], 2);
    assert!(r.body["id"].is_string());
    assert!(fx.pending_data("off").await.is_empty());
    let r = fx
        .call("GET", "/v1/apps/demo/devices/off", Some("k-demo"))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // Still validated.
    let r = fx
        .msg(json!({"to": {"topic": "news"}, "data": 1, "ttl": 5, "dry_run": true}))
        .await;
    r.refused(StatusCode::BAD_REQUEST, "invalid", "ttl");
}

#[tokio::test]
async fn unknown_fields_are_refused_by_name() {
    let fx = fixture();
    let r = fx
        .msg(json!({"to": {"device": "d1"}, "data": 1, "priority": "high"}))
        .await;
    r.refused(
        StatusCode::BAD_REQUEST,
        "invalid",
        "priority: unknown field",
    );
    let r = fx
        .msg(json!({"to": {"device": "d1", "app": "x"}, "data": 1}))
        .await;
    r.refused(StatusCode::BAD_REQUEST, "invalid", "to.app: unknown field");
    let r = fx
        .batch(json!({"messages": [{"to": {"device": "d1"}, "data": 1}], "x": 1}))
        .await;
    r.refused(StatusCode::BAD_REQUEST, "invalid", "x: unknown field");
}

#[tokio::test]
async fn wrong_types_name_the_field() {
    let fx = fixture();
    let cases = [
        (json!([1]), "body: must be a JSON object"),
        (json!({"to": "d1", "data": 1}), "to: must be an object"),
        (json!({"data": 1}), "to: missing"),
        (json!({"to": {"device": "d1"}}), "data: missing"),
        (
            json!({"to": {"device": 5}, "data": 1}),
            "to.device: must be a string",
        ),
        (
            json!({"to": {"devices": "d1"}, "data": 1}),
            "to.devices: must be an array",
        ),
        (
            json!({"to": {"devices": ["a", 7]}, "data": 1}),
            "to.devices[1]: must be a string",
        ),
        (
            json!({"to": {"topic": true}, "data": 1}),
            "to.topic: must be a string",
        ),
        (
            json!({"to": {"broadcast": "yes"}, "data": 1}),
            "to.broadcast: must be true",
        ),
        (
            json!({"to": {"device": "d1"}, "data": 1, "ttl": "3600"}),
            "ttl: must be an integer",
        ),
        (
            json!({"to": {"device": "d1"}, "data": 1, "dry_run": "yes"}),
            "dry_run: must be true or false",
        ),
        (
            json!({"to": {"device": "d1"}, "data": 1, "collapse_key": 5}),
            "collapse_key: must be a string",
        ),
        (
            json!({"to": {"device": "d1"}, "data": 1, "collapse_key": ""}),
            "collapse_key: must be a string of 1 to 128 bytes",
        ),
        (
            json!({"to": {"device": "d1"}, "data": 1, "collapse_key": "k".repeat(129)}),
            "collapse_key",
        ),
    ];
    for (body, needle) in cases {
        fx.msg(body)
            .await
            .refused(StatusCode::BAD_REQUEST, "invalid", needle);
    }
    let r = fx
        .post("/v1/apps/demo/messages", "k-demo", "{\"to\": ")
        .await;
    r.refused(StatusCode::BAD_REQUEST, "invalid", "body: not valid JSON");
}

#[tokio::test]
async fn ttl_bounds() {
    let fx = fixture();
    for ttl in [json!(0), json!(1), json!(2_419_200)] {
        let r = fx
            .msg(json!({"to": {"device": "d1"}, "data": 1, "ttl": ttl}))
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "ttl {ttl}: {}", r.body);
    }
    for ttl in [
        json!(-1),
        json!(2_419_201),
        json!(1.5),
        json!(60.0),
        json!(1e30),
    ] {
        fx.msg(json!({"to": {"device": "d1"}, "data": 1, "ttl": ttl}))
            .await
            .refused(
                StatusCode::BAD_REQUEST,
                "invalid",
                "ttl: must be an integer from 0 to 2419200",
            );
    }
}

#[tokio::test]
async fn device_lists_are_bounded_valid_and_distinct() {
    let fx = fixture();
    fx.msg(json!({"to": {"devices": []}, "data": 1}))
        .await
        .refused(
            StatusCode::BAD_REQUEST,
            "invalid",
            "to.devices: must hold 1 to 1000",
        );
    let many: Vec<String> = (0..1001).map(|i| format!("d{i}")).collect();
    fx.msg(json!({"to": {"devices": many}, "data": 1}))
        .await
        .refused(StatusCode::BAD_REQUEST, "invalid", "got 1001");
    let r = fx
        .msg(json!({"to": {"devices": &many[..1000]}, "data": 1}))
        .await;
    assert_eq!(
        (r.status, &r.body["stored"]),
        (StatusCode::ACCEPTED, &json!(1000))
    );

    // 1000 ids of the longest kind still fit the body limit.
    let long: Vec<String> = (0..1000).map(|i| format!("{i:0>128}")).collect();
    let r = fx.msg(json!({"to": {"devices": long}, "data": 1})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);

    fx.msg(json!({"to": {"devices": ["a", "b", "a"]}, "data": 1}))
        .await
        .refused(
            StatusCode::BAD_REQUEST,
            "invalid",
            r#"to.devices[2]: "a" repeats to.devices[0]"#,
        );
    fx.msg(json!({"to": {"devices": ["ok", "a b"]}, "data": 1}))
        .await
        .refused(
            StatusCode::BAD_REQUEST,
            "invalid",
            r#"to.devices[1]: "a b" is not a valid device id"#,
        );
    fx.msg(json!({"to": {"device": "x".repeat(129)}, "data": 1}))
        .await
        .refused(StatusCode::BAD_REQUEST, "invalid", "to.device: ");
}

#[tokio::test]
async fn target_rules() {
    let fx = fixture();
    let cases = [
        (
            json!({"to": {"topic": "news"}, "data": 1, "ttl": 60}),
            "ttl: applies to device targets only, not to to.topic",
        ),
        (
            json!({"to": {"broadcast": true}, "data": 1, "collapse_key": "k"}),
            "collapse_key: applies to device targets only",
        ),
        (
            json!({"to": {"broadcast": false}, "data": 1}),
            "to.broadcast: must be true",
        ),
        (
            json!({"to": {}, "data": 1}),
            "to: needs exactly one of device, devices, topic, broadcast, got none",
        ),
        (
            json!({"to": {"device": "d1", "topic": "t"}, "data": 1}),
            "got device and topic",
        ),
        (
            json!({"to": {"topic": "a*"}, "data": 1}),
            r#"to.topic: "a*" is not a valid topic"#,
        ),
    ];
    for (body, needle) in cases {
        fx.msg(body)
            .await
            .refused(StatusCode::BAD_REQUEST, "invalid", needle);
    }
}

#[tokio::test]
async fn data_is_measured_as_compact_utf8_json() {
    let fx = fixture();
    // 64 bytes compact: a string of 62 chars plus quotes. Whitespace around
    // it in the request does not count.
    let at_limit = format!(
        "{{ \"to\" : {{ \"device\" : \"d1\" }} ,   \"data\" :   \"{}\"   }}",
        "x".repeat(62)
    );
    let r = fx.post("/v1/apps/demo/messages", "k-demo", at_limit).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let over = json!({"to": {"device": "d1"}, "data": "x".repeat(63)});
    fx.msg(over)
        .await
        .refused(StatusCode::PAYLOAD_TOO_LARGE, "too_large", "data: 65 bytes");
    // "é" is two UTF-8 bytes, sent unescaped: 31 × 2 + 2 = 64 fits, 32 does not.
    let r = fx
        .msg(json!({"to": {"device": "d1"}, "data": "é".repeat(31)}))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    fx.msg(json!({"to": {"device": "d1"}, "data": "é".repeat(32)}))
        .await
        .refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "max_payload_bytes",
        );
}

#[tokio::test]
async fn body_over_the_limit_is_413_json() {
    let fx = fixture();
    // Single limit: max_payload_bytes + 256 KiB.
    let big = format!(
        "{{\"to\":{{\"device\":\"d1\"}},\"data\":1,\"pad\":\"{}\"}}",
        "x".repeat(300 * 1024)
    );
    fx.post("/v1/apps/demo/messages", "k-demo", big)
        .await
        .refused(StatusCode::PAYLOAD_TOO_LARGE, "too_large", "body");
    // Without a Content-Length (a stream), the limit holds as well.
    let chunks: Vec<Result<String, std::io::Error>> =
        (0..300).map(|_| Ok("x".repeat(1024))).collect();
    let req = Request::post("/v1/apps/demo/messages")
        .header(header::AUTHORIZATION, "Bearer k-demo")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap();
    fx.send(req)
        .await
        .refused(StatusCode::PAYLOAD_TOO_LARGE, "too_large", "body");
}

#[tokio::test]
async fn content_type_must_be_json() {
    let fx = fixture();
    let body = json!({"to": {"device": "d1"}, "data": 1}).to_string();
    let with = |ct: Option<&str>| {
        let mut req =
            Request::post("/v1/apps/demo/messages").header(header::AUTHORIZATION, "Bearer k-demo");
        if let Some(ct) = ct {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        req.body(Body::from(body.clone())).unwrap()
    };
    fx.send(with(None)).await.refused(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        "Content-Type",
    );
    fx.send(with(Some("text/plain"))).await.refused(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        "text/plain",
    );
    let r = fx.send(with(Some("Application/JSON; charset=utf-8"))).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
}

// ---- auth --------------------------------------------------------------

#[tokio::test]
async fn auth_401_and_403() {
    let fx = fixture();
    let body = json!({"to": {"device": "d1"}, "data": 1}).to_string();
    let req = |path: &str, auth: Option<&str>| {
        let mut req = Request::post(path).header(header::CONTENT_TYPE, "application/json");
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        req.body(Body::from(body.clone())).unwrap()
    };
    let r = fx.send(req("/v1/apps/demo/messages", None)).await;
    r.refused(StatusCode::UNAUTHORIZED, "unauthorized", "Authorization");
    assert_eq!(r.header(header::WWW_AUTHENTICATE), Some("Bearer"));
    fx.send(req("/v1/apps/demo/messages", Some("Basic k-demo")))
        .await
        .refused(StatusCode::UNAUTHORIZED, "unauthorized", "Bearer");
    fx.send(req("/v1/apps/demo/messages", Some("Bearer nope")))
        .await
        .refused(StatusCode::UNAUTHORIZED, "unauthorized", "unknown API key");
    // An unknown key on an unknown app: still 401, never 404.
    fx.send(req("/v1/apps/ghost/messages", Some("Bearer nope")))
        .await
        .refused(StatusCode::UNAUTHORIZED, "unauthorized", "unknown API key");
    // The scheme is case-insensitive.
    let r = fx
        .send(req("/v1/apps/demo/messages", Some("bearer k-demo")))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);

    // Another app's key: 403, whether the named app exists or not.
    for path in [
        "/v1/apps/demo/messages",
        "/v1/apps/ghost/messages",
        "/v1/apps/Not%20An%20App/messages",
        "/v1/apps/%FF/messages",
    ] {
        fx.send(req(path, Some("Bearer k-other"))).await.refused(
            StatusCode::FORBIDDEN,
            "forbidden",
            "another app",
        );
    }
    for (method, path) in [
        ("GET", "/v1/apps/demo/devices/d1"),
        ("DELETE", "/v1/apps/demo/devices/d1/connection"),
        ("DELETE", "/v1/apps/demo/devices/d1/messages"),
        ("GET", "/v1/apps/ghost/devices/d1"),
    ] {
        fx.call(method, path, Some("k-other")).await.refused(
            StatusCode::FORBIDDEN,
            "forbidden",
            "another app",
        );
        fx.call(method, path, None).await.refused(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Authorization",
        );
    }
}

// ---- limits and the store ----------------------------------------------

#[tokio::test]
async fn rate_limited_with_retry_after_and_dry_runs_exempt() {
    let fx = fixture();
    let body = json!({"to": {"device": "d1"}, "data": 1}).to_string();
    let dry = json!({"to": {"device": "d1"}, "data": 1, "dry_run": true}).to_string();
    for _ in 0..3 {
        let r = fx
            .post("/v1/apps/limited/messages", "k-limited", dry.clone())
            .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let r = fx
        .post("/v1/apps/limited/messages", "k-limited", body.clone())
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let r = fx
        .post("/v1/apps/limited/messages", "k-limited", body)
        .await;
    r.refused(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "max_messages_per_sec",
    );
    let secs: u64 = r.header(header::RETRY_AFTER).unwrap().parse().unwrap();
    assert!(secs >= 1);
}

#[tokio::test]
async fn queue_full_is_429_with_retry_after() {
    let fx = fixture_with(Arc::new(MemoryStore::new()), 1);
    let r = fx.msg(json!({"to": {"topic": "news"}, "data": 1})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let r = fx.msg(json!({"to": {"broadcast": true}, "data": 1})).await;
    r.refused(StatusCode::TOO_MANY_REQUESTS, "queue_full", "queue is full");
    assert_eq!(r.header(header::RETRY_AFTER), Some("1"));
}

/// A store whose disk is gone.
struct BrokenStore;

#[async_trait]
impl Store for BrokenStore {
    async fn append(
        &self,
        _: &str,
        _: &[&str],
        _: &NewMessage,
        _: u64,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        Err(StoreError::Unavailable("disk full".into()))
    }
    async fn pending(
        &self,
        _: &str,
        _: &str,
        _: u64,
        _: u64,
        _: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        Err(StoreError::Unavailable("disk full".into()))
    }
    async fn ack(&self, _: &str, _: &str, _: u64) -> Result<u64, StoreError> {
        Err(StoreError::Unavailable("disk full".into()))
    }
    fn ack_queued(&self, _: &str, _: &str, _: u64) {}
    fn acked_total(&self) -> u64 {
        0
    }
    async fn purge(&self, _: &str, _: &str) -> Result<u64, StoreError> {
        Err(StoreError::Unavailable("disk full".into()))
    }
    async fn take_dropped(&self, _: &str, _: &str) -> Result<u64, StoreError> {
        Err(StoreError::Unavailable("disk full".into()))
    }
    async fn expire(&self, _: u64) -> Result<ExpireOutcome, StoreError> {
        Err(StoreError::Unavailable("disk full".into()))
    }
    async fn record_session(&self, _: &str, _: &str, _: u64) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("disk full".into()))
    }
    async fn device(&self, _: &str, _: &str, _: u64) -> Result<Option<DeviceRecord>, StoreError> {
        Err(StoreError::Unavailable("disk full".into()))
    }
    fn pending_total(&self) -> u64 {
        0
    }
    async fn flush(&self) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("disk full".into()))
    }
}

#[tokio::test]
async fn store_unavailable_is_503_and_hides_the_cause() {
    let fx = fixture_with(Arc::new(BrokenStore), 16);
    let r = fx.msg(json!({"to": {"device": "d1"}, "data": 1})).await;
    r.refused(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "nothing was accepted",
    );
    assert_eq!(r.header(header::RETRY_AFTER), Some("1"));
    assert!(!r.body["message"].as_str().unwrap().contains("disk full"));
    // Live-only messages do not need the store.
    let r = fx.msg(json!({"to": {"topic": "news"}, "data": 1})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    for (method, path) in [
        ("GET", "/v1/apps/demo/devices/d1"),
        ("DELETE", "/v1/apps/demo/devices/d1/messages"),
    ] {
        fx.call(method, path, Some("k-demo")).await.refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "store",
        );
    }
}

// ---- batch -------------------------------------------------------------

#[tokio::test]
async fn batch_answers_each_entry_in_order() {
    let fx = fixture();
    let r = fx
        .batch(json!({"messages": [
            {"to": {"device": "d1"}, "data": "first"},
            {"to": {"device": "d1"}, "data": 1, "bogus": true},
            {"to": {"device": "d1"}, "data": "second"},
            {"to": {"device": "d1"}, "data": "x".repeat(100)},
            {"to": {"devices": ["d1", "d2"]}, "data": "dry", "dry_run": true},
            "not an object",
            {"to": {"topic": "news"}, "data": "third"},
        ]}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let results = r.body["results"].as_array().unwrap();
    assert_eq!(results.len(), 7);
    assert_eq!(results[0]["stored"], 1);
    assert!(results[0]["id"].is_string());
    assert!(results[0].get("dry_run").is_none());
    assert_eq!(results[1]["error"]["code"], "invalid");
    assert!(results[1]["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("messages[1].bogus: unknown field"));
    assert_eq!(results[2]["stored"], 1);
    assert_eq!(results[3]["error"]["code"], "too_large");
    assert!(results[3]["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("messages[3].data"));
    assert_eq!(results[4]["dry_run"], true);
    assert_eq!(results[4]["stored"], 2);
    assert_eq!(results[5]["error"]["code"], "invalid");
    assert!(results[5]["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("messages[5]: must be a JSON object"));
    assert_eq!(results[6]["stored"], 0);
    assert_ne!(results[0]["id"], results[2]["id"]);
    // Seq order is request order.
    assert_eq!(fx.pending_data("d1").await, [r#""first""#, r#""second""#]);
    assert!(fx.pending_data("d2").await.is_empty());
}

#[tokio::test]
async fn batch_shape_is_checked() {
    let fx = fixture();
    let one = json!({"to": {"device": "d1"}, "data": 1});
    let cases = [
        (
            json!({"messages": []}),
            "messages: must hold 1 to 500 messages, got 0",
        ),
        (json!({"messages": vec![one.clone(); 501]}), "got 501"),
        (
            json!({"messages": one.clone()}),
            "messages: must be an array",
        ),
        (json!({}), "messages: missing"),
        (json!([one.clone()]), "body: must be a JSON object"),
    ];
    for (body, needle) in cases {
        fx.batch(body)
            .await
            .refused(StatusCode::BAD_REQUEST, "invalid", needle);
    }
    let r = fx.batch(json!({"messages": vec![one; 500]})).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["results"].as_array().unwrap().len(), 500);
}

#[tokio::test]
async fn batch_entries_share_the_rate_limit() {
    let fx = fixture();
    let one = json!({"to": {"device": "d1"}, "data": 1});
    let r = fx
        .post(
            "/v1/apps/limited/messages/batch",
            "k-limited",
            json!({"messages": [one, one, {"to": {"device": "d1"}, "data": 1, "dry_run": true}]})
                .to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let results = r.body["results"].as_array().unwrap();
    assert_eq!(results[0]["stored"], 1);
    assert_eq!(results[1]["error"]["code"], "rate_limited");
    assert_eq!(results[2]["dry_run"], true);
}

// ---- devices -----------------------------------------------------------

#[tokio::test]
async fn device_info_pending_only_then_connected() {
    let fx = fixture();
    fx.call("GET", "/v1/apps/demo/devices/d1", Some("k-demo"))
        .await
        .refused(StatusCode::NOT_FOUND, "not_found", "d1");
    fx.msg(json!({"to": {"device": "d1"}, "data": 1})).await;
    let r = fx
        .call("GET", "/v1/apps/demo/devices/d1", Some("k-demo"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.body,
        json!({"device": "d1", "online": false, "first_seen": null, "last_seen": null,
               "sessions": 0, "pending": 1, "topics": []})
    );

    let conn = fx.connect("d1");
    fx.state
        .dispatcher
        .store
        .record_session("demo", "d1", 1_700_000_000_000)
        .await
        .unwrap();
    assert!(fx.state.dispatcher.hub.subscribe(&conn, "news", 8));
    let r = fx
        .call("GET", "/v1/apps/demo/devices/d1", Some("k-demo"))
        .await;
    assert_eq!(r.body["online"], true);
    assert_eq!(r.body["first_seen"], 1_700_000_000_000u64);
    assert_eq!(r.body["last_seen"], 1_700_000_000_000u64);
    assert_eq!(r.body["sessions"], 1);
    assert_eq!(r.body["topics"], json!(["news"]));
}

#[tokio::test]
async fn invalid_device_in_path_is_400() {
    let fx = fixture();
    for path in [
        "/v1/apps/demo/devices/a%20b",
        "/v1/apps/demo/devices/a%20b/connection",
        "/v1/apps/demo/devices/%FF/messages",
    ] {
        let method = if path.ends_with("a%20b") {
            "GET"
        } else {
            "DELETE"
        };
        fx.call(method, path, Some("k-demo")).await.refused(
            StatusCode::BAD_REQUEST,
            "invalid",
            "device",
        );
    }
}

#[tokio::test]
async fn kick_and_purge() {
    let fx = fixture();
    fx.call(
        "DELETE",
        "/v1/apps/demo/devices/d1/connection",
        Some("k-demo"),
    )
    .await
    .refused(StatusCode::NOT_FOUND, "not_found", "not connected");
    let conn = fx.connect("d1");
    let r = fx
        .call(
            "DELETE",
            "/v1/apps/demo/devices/d1/connection",
            Some("k-demo"),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(r.body, Value::Null);
    assert_eq!(conn.closing(), Some(CloseReason::Kicked));

    let r = fx
        .call(
            "DELETE",
            "/v1/apps/demo/devices/nobody/messages",
            Some("k-demo"),
        )
        .await;
    assert_eq!((r.status, r.body), (StatusCode::OK, json!({"purged": 0})));
    for _ in 0..3 {
        fx.msg(json!({"to": {"device": "d2"}, "data": 1})).await;
    }
    let r = fx
        .call(
            "DELETE",
            "/v1/apps/demo/devices/d2/messages",
            Some("k-demo"),
        )
        .await;
    assert_eq!((r.status, r.body), (StatusCode::OK, json!({"purged": 3})));
    assert!(fx.pending_data("d2").await.is_empty());
}

// ---- operations, routing, drain ----------------------------------------

#[tokio::test]
async fn health_ready_and_metrics() {
    let fx = fixture();
    assert_eq!(
        fx.call("GET", "/healthz", None).await.status,
        StatusCode::OK
    );
    assert_eq!(fx.call("GET", "/readyz", None).await.status, StatusCode::OK);

    fx.msg(json!({"to": {"device": "d1"}, "data": 1})).await;
    let res = fx
        .app
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let ct = res.headers()[header::CONTENT_TYPE].to_str().unwrap();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let text = String::from_utf8(
        axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains("pushgate_messages_accepted_total{kind=\"device\"} 1"),
        "{text}"
    );
    assert!(text.contains("pushgate_pending_messages 1"), "{text}");
}

#[tokio::test]
async fn draining_refuses_v1_but_keeps_healthz() {
    let fx = fixture();
    fx.state.drain.start();
    let r = fx.msg(json!({"to": {"device": "d1"}, "data": 1})).await;
    r.refused(StatusCode::SERVICE_UNAVAILABLE, "draining", "shutting down");
    assert!(r.header(header::RETRY_AFTER).is_some());
    // Before auth: even without a key, and on any /v1 path.
    for (method, path) in [
        ("GET", "/v1/apps/demo/devices/d1"),
        ("POST", "/v1/apps/demo/messages/batch"),
        ("GET", "/v1/nothing/here"),
    ] {
        fx.call(method, path, None).await.refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "shutting down",
        );
    }
    let r = fx.call("GET", "/readyz", None).await;
    r.refused(StatusCode::SERVICE_UNAVAILABLE, "draining", "shutting down");
    assert!(r.header(header::RETRY_AFTER).is_some());
    assert_eq!(
        fx.call("GET", "/healthz", None).await.status,
        StatusCode::OK
    );
    let res = fx
        .app
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn unknown_route_404_and_wrong_method_405_are_json() {
    let fx = fixture();
    for path in ["/", "/v1/apps/demo", "/v1/apps/demo/messages/", "/v2/x"] {
        fx.call("GET", path, Some("k-demo")).await.refused(
            StatusCode::NOT_FOUND,
            "not_found",
            "no route",
        );
    }
    let r = fx
        .call("GET", "/v1/apps/demo/messages", Some("k-demo"))
        .await;
    r.refused(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "GET is not allowed",
    );
    assert_eq!(r.header(header::ALLOW), Some("POST"));
    let r = fx.call("POST", "/healthz", None).await;
    r.refused(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "POST");
    let r = fx
        .call("PUT", "/v1/apps/demo/devices/d1", Some("k-demo"))
        .await;
    r.refused(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "PUT");
}

/// A body that never finishes is answered 400 after `BODY_TIMEOUT`
/// (virtual time: the test does not wait for it).
#[tokio::test(start_paused = true)]
async fn a_body_that_never_ends_is_refused_after_the_body_timeout() {
    let fx = fixture();
    use futures_util::StreamExt;
    let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(
        axum::body::Bytes::from_static(b"{\"to\":"),
    )])
    .chain(futures_util::stream::pending());
    let req = Request::post("/v1/apps/demo/messages")
        .header(header::AUTHORIZATION, "Bearer k-demo")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap();
    let started = tokio::time::Instant::now();
    let r = fx.send(req).await;
    r.refused(StatusCode::BAD_REQUEST, "invalid", "not received within");
    assert!(started.elapsed() >= super::BODY_TIMEOUT);
}

/// Over a real socket: a request head that never completes, and a
/// keep-alive connection left idle, are closed after the header timeout; a
/// complete request on time is served.
#[tokio::test]
async fn slow_heads_and_idle_connections_are_closed_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let fx = fixture();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_accepting_tx, accepting) = tokio::sync::watch::channel(true);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let timeout = std::time::Duration::from_millis(300);
    let server = tokio::spawn(super::serve(
        crate::net::GatedListener::new(listener, accepting),
        fx.app.clone(),
        stop,
        timeout,
    ));

    // Closed: the head never completes.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Served, then left idle: closed too.
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );

    let limit = timeout * 20;
    for (name, conn) in [("slow head", &mut slow), ("idle keep-alive", &mut idle)] {
        let started = std::time::Instant::now();
        let end = tokio::time::timeout(limit, async {
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    // hyper may answer 408 before closing.
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(end.is_ok(), "{name}: still open after {limit:?}");
        assert!(started.elapsed() < limit);
    }
    stop_tx.send(true).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .expect("serve stops")
        .unwrap();
}
