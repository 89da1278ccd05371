//! The device endpoint: upgrade refusals, frames both ways, bad frames,
//! topics and permissions, replacement, heartbeat and expiry.

use std::time::Duration;

use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

#[tokio::test]
async fn hello_then_msg_and_ack() {
    let gw = Gateway::start().await;
    let mut d = gw.connect("d1").await;
    let r = gw
        .push(json!({"to": {"device": "d1"}, "data": {"title": "Hi"}}))
        .await;
    assert_eq!(
        (r["online"].as_u64(), r["stored"].as_u64()),
        (Some(1), Some(1))
    );
    let m = d.recv().await;
    assert_eq!(m["t"], "msg");
    assert_eq!(m["seq"], 1);
    assert_eq!(m["id"], r["id"]);
    assert_eq!(m["data"], json!({"title": "Hi"}));
    d.ack(1).await;
    gw.until("ack stored", |n| n.store.pending_total() == 0)
        .await;
}

#[tokio::test]
async fn refusals_before_the_upgrade() {
    let gw = Gateway::start().await;
    let cases: Vec<(String, u16, &str)> = vec![
        (upgrade_request("/v1/other", ""), 404, "not_found"),
        (upgrade_request("/v1/connect", ""), 401, "unauthorized"),
        (
            upgrade_request("/v1/connect?token=garbage", ""),
            401,
            "unauthorized",
        ),
        (
            upgrade_request(
                &format!(
                    "/v1/connect?token={}",
                    token_for("demo", "wrong-secret", "d1", now_secs() + 60, &[])
                ),
                "",
            ),
            401,
            "unauthorized",
        ),
        (
            upgrade_request(
                &format!(
                    "/v1/connect?token={}",
                    token_for("demo", SECRET, "d1", now_secs() - 1, &[])
                ),
                "",
            ),
            401,
            "unauthorized",
        ),
        (
            upgrade_request(
                &format!(
                    "/v1/connect?token={}",
                    token_for("nope", SECRET, "d1", now_secs() + 60, &[])
                ),
                "",
            ),
            401,
            "unauthorized",
        ),
        (
            "GET /v1/connect HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
            400,
            "bad_request",
        ),
        (
            upgrade_request("/v1/connect", "").replace("Version: 13", "Version: 8"),
            426,
            "bad_request",
        ),
    ];
    for (req, status, code) in cases {
        let r = raw_http(gw.device, req.as_bytes()).await;
        assert_eq!(r.status, status, "{req}: {}", r.body);
        assert_eq!(r.code(), code, "{req}");
        assert!(!r.json()["message"].as_str().unwrap().is_empty());
        if status == 426 {
            assert_eq!(r.header("Sec-WebSocket-Version"), Some("13"));
        }
    }
    // A good token in the Authorization header works too.
    let t = token("d1", &[]);
    let req = upgrade_request("/v1/connect", &format!("Authorization: Bearer {t}\r\n"));
    let r = raw_http(gw.device, req.as_bytes()).await;
    assert_eq!(r.status, 101);
    let m = gw.metrics().await;
    assert!(
        metric(
            &m,
            "pushgate_handshake_failures_total{reason=\"unauthorized\"}"
        ) >= 4.0
    );
}

#[tokio::test]
async fn bad_frames_get_errors_and_the_tenth_closes() {
    let gw = Gateway::start().await;
    let mut d = gw.connect("d1").await;
    d.send_raw(Message::Text("not json".into())).await;
    assert_eq!(d.recv().await["code"], "bad_frame");
    d.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
    assert_eq!(d.recv().await["code"], "bad_frame");
    d.send(json!({"t": 5})).await;
    assert_eq!(d.recv().await["code"], "bad_frame");
    d.send(json!({"x": 1})).await;
    assert_eq!(d.recv().await["code"], "bad_frame");
    d.send(json!({"t": "dance"})).await;
    let e = d.recv().await;
    assert_eq!(
        (e["t"].as_str(), e["code"].as_str()),
        (Some("error"), Some("unknown_type"))
    );
    // Still alive: a good frame works.
    d.send(json!({"t": "sub", "topic": "news"})).await;
    assert_eq!(d.recv().await["t"], "subscribed");
    for _ in 0..4 {
        d.send(json!({"t": "nope"})).await;
        assert_eq!(d.recv().await["code"], "unknown_type");
    }
    d.send(json!({"t": "nope"})).await; // the tenth
    assert_eq!(d.recv().await["code"], "unknown_type");
    d.expect_close(None, 1008).await;
}

#[tokio::test]
async fn oversize_frame_closes_1009() {
    let gw = Gateway::with(|t| {
        t.replace(
            "heartbeat_secs = 30",
            "heartbeat_secs = 30\nmax_frame_bytes = 100",
        )
    })
    .await;
    let mut d = gw.connect("d1").await;
    d.send(json!({"t": "sub", "topic": "x".repeat(120)})).await;
    d.expect_close(None, 1009).await;
}

#[tokio::test]
async fn topics_permissions_and_limits() {
    let gw = Gateway::with(|t| {
        t.replace(
            "heartbeat_secs = 30",
            "heartbeat_secs = 30\nmax_topics_per_device = 2",
        )
    })
    .await;
    let mut d = gw.connect_token(&token("d1", &["news", "sport.*"])).await;
    let mut other = gw.connect_token(&token("d2", &["news"])).await;
    d.send(json!({"t": "sub", "topic": "weather"})).await;
    assert_eq!(d.recv().await["code"], "forbidden");
    d.send(json!({"t": "sub", "topic": "bad topic"})).await;
    assert_eq!(d.recv().await["code"], "bad_frame");
    d.send(json!({"t": "sub", "topic": "news"})).await;
    assert_eq!(d.recv().await, json!({"t": "subscribed", "topic": "news"}));
    d.send(json!({"t": "sub", "topic": "sport.f1"})).await;
    assert_eq!(d.recv().await["t"], "subscribed");
    d.send(json!({"t": "sub", "topic": "sport.golf"})).await;
    assert_eq!(d.recv().await["code"], "too_many_topics");
    other.send(json!({"t": "sub", "topic": "news"})).await;
    assert_eq!(other.recv().await["t"], "subscribed");

    let r = gw.push(json!({"to": {"topic": "news"}, "data": 1})).await;
    assert_eq!(r["online"], 2);
    assert_eq!(r["stored"], 0);
    for dev in [&mut d, &mut other] {
        let m = dev.recv().await;
        assert_eq!((m["topic"].as_str(), m.get("seq")), (Some("news"), None));
    }
    let info = gw.api("GET", "/v1/apps/demo/devices/d1", None).await.json();
    assert_eq!(info["topics"], json!(["news", "sport.f1"]));

    d.send(json!({"t": "unsub", "topic": "news"})).await;
    assert_eq!(
        d.recv().await,
        json!({"t": "unsubscribed", "topic": "news"})
    );
    let r = gw.push(json!({"to": {"topic": "news"}, "data": 2})).await;
    assert_eq!(r["online"], 1);
    assert_eq!(other.recv().await["data"], 2);
    d.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn broadcast_reaches_every_connection_of_the_app_only() {
    let gw = Gateway::start().await;
    let mut a = gw.connect("a").await;
    let mut b = gw.connect("b").await;
    let mut o = gw
        .connect_token(&token_for("other", OTHER_SECRET, "a", now_secs() + 60, &[]))
        .await;
    let r = gw
        .push(json!({"to": {"broadcast": true}, "data": "all"}))
        .await;
    assert_eq!(r["online"], 2);
    for d in [&mut a, &mut b] {
        let m = d.recv().await;
        assert_eq!(m["data"], "all");
        assert!(m.get("seq").is_none() && m.get("topic").is_none());
    }
    o.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn second_connection_replaces_the_first() {
    let gw = Gateway::start().await;
    let mut first = gw.connect("d1").await;
    let mut second = gw.connect("d1").await;
    first.expect_close(Some("replaced"), 4001).await;
    gw.push(json!({"to": {"device": "d1"}, "data": 1})).await;
    assert_eq!(second.recv().await["data"], 1);
}

#[tokio::test]
async fn kick() {
    let gw = Gateway::start().await;
    let mut d = gw.connect("d1").await;
    let r = gw
        .api("DELETE", "/v1/apps/demo/devices/d1/connection", None)
        .await;
    assert_eq!(r.status, 204);
    let bye = d.expect_close(Some("kicked"), 4002).await.unwrap();
    assert!(bye.get("retry_ms").is_none());
    gw.until("unregistered", |n| n.hub.live() == 0).await;
    let r = gw
        .api("DELETE", "/v1/apps/demo/devices/d1/connection", None)
        .await;
    assert_eq!((r.status, r.code().as_str()), (404, "not_found"));
}

#[tokio::test]
async fn token_expiry_closes_4003() {
    let gw = Gateway::start().await;
    let t = token_for("demo", SECRET, "d1", now_secs() + 2, &[]);
    let mut d = gw.connect_token(&t).await;
    d.expect_close(Some("token_expired"), 4003).await;
}

#[tokio::test]
async fn heartbeat_pings_and_idle_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Gateway::with(|t| t.replace("heartbeat_secs = 30", "heartbeat_secs = 1")).await;
    // A raw socket that upgrades and then never answers anything (a real
    // client library would answer pings with pongs).
    let mut s = tokio::net::TcpStream::connect(gw.device).await.unwrap();
    let req = upgrade_request(&format!("/v1/connect?token={}", token("d1", &[])), "");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let started = tokio::time::Instant::now();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("closed in time")
        .unwrap();
    let idle_for = started.elapsed();
    let head = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(buf.starts_with(b"HTTP/1.1 101"));
    // Walk the server's (unmasked) frames: text hello, pings, close.
    let (mut pings, mut close_code, mut i) = (0, None, head);
    while i + 2 <= buf.len() {
        let opcode = buf[i] & 0x0f;
        let len = (buf[i + 1] & 0x7f) as usize;
        assert!(len < 126, "small control frames only");
        let payload = &buf[i + 2..i + 2 + len];
        match opcode {
            0x9 => pings += 1,
            0x8 => close_code = Some(u16::from_be_bytes([payload[0], payload[1]])),
            _ => {}
        }
        i += 2 + len;
    }
    // Idle after 2 × 1 + 5 = 7 s, checked on the heartbeat tick: no bye.
    assert_eq!(close_code, Some(4009));
    assert!(pings >= 3, "{pings} pings");
    assert!(
        idle_for >= Duration::from_secs(7),
        "closed after {idle_for:?}"
    );
}

#[tokio::test]
async fn a_device_that_answers_pings_stays() {
    let gw = Gateway::with(|t| t.replace("heartbeat_secs = 30", "heartbeat_secs = 1")).await;
    let mut d = gw.connect("d1").await;
    // Reading answers the gateway's pings; 9 s is past the idle limit.
    d.expect_silence(Duration::from_secs(9)).await;
    gw.push(json!({"to": {"device": "d1"}, "data": 1})).await;
    assert_eq!(d.recv().await["data"], 1);
}

#[tokio::test]
async fn too_many_connections_and_replacement_admitted() {
    let gw = Gateway::with(|t| {
        t.replacen(
            "api_keys = [\"demo-key\"]",
            "api_keys = [\"demo-key\"]\nmax_connections = 1",
            1,
        )
    })
    .await;
    let _d1 = gw.connect("d1").await;
    let req = upgrade_request(&format!("/v1/connect?token={}", token("d2", &[])), "");
    let r = raw_http(gw.device, req.as_bytes()).await;
    assert_eq!((r.status, r.code().as_str()), (429, "too_many_connections"));
    assert!(r.header("Retry-After").is_some());
    // The same device again is a replacement: always admitted.
    let _d1b = gw.connect("d1").await;
}

#[tokio::test]
async fn handshake_rate_admission() {
    let gw = Gateway::with(|t| {
        t.replace(
            "heartbeat_secs = 30",
            "heartbeat_secs = 30\nmax_handshakes_per_sec = 2",
        )
    })
    .await;
    let mut statuses = Vec::new();
    for i in 0..6 {
        let req = upgrade_request(
            &format!("/v1/connect?token={}", token(&format!("d{i}"), &[])),
            "",
        );
        let r = raw_http(gw.device, req.as_bytes()).await;
        if r.status == 503 {
            assert_eq!(r.code(), "overloaded");
            assert!(r.header("Retry-After").is_some());
        }
        statuses.push(r.status);
    }
    // A burst of one second's worth is admitted, the rest refused; on a
    // slow machine a token may refill between requests, so bound, not pin.
    let admitted = statuses.iter().filter(|s| **s == 101).count();
    assert!((2..=4).contains(&admitted), "{statuses:?}");
    assert!(statuses.contains(&503), "{statuses:?}");
}

#[tokio::test]
async fn handshake_timeout_closes_without_response() {
    let gw = Gateway::with(|t| {
        t.replace(
            "heartbeat_secs = 30",
            "heartbeat_secs = 30\nhandshake_timeout_secs = 1",
        )
    })
    .await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw.device).await.unwrap();
    s.write_all(b"GET /v1/connect HTTP/1.1\r\n").await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("closed in time");
    assert!(
        n.is_err() || buf.is_empty(),
        "got {:?}",
        String::from_utf8_lossy(&buf)
    );
}
