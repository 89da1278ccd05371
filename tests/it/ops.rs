//! Metrics present and moving; health endpoints.

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn metrics_move() {
    let gw = Gateway::start().await;
    let before = gw.metrics().await;
    assert_eq!(metric(&before, "pushgate_connections{app=\"demo\"}"), 0.0);
    let mut d = gw.connect("d1").await;
    gw.push(json!({"to": {"device": "d1"}, "data": 1})).await;
    gw.push(json!({"to": {"broadcast": true}, "data": 2})).await;
    d.recv().await;
    d.recv().await;
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "pushgate_connections{app=\"demo\"}"), 1.0);
    assert_eq!(
        metric(&m, "pushgate_connections_opened_total{app=\"demo\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "pushgate_messages_accepted_total{kind=\"device\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "pushgate_messages_accepted_total{kind=\"broadcast\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "pushgate_messages_sent_total{kind=\"device\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "pushgate_messages_sent_total{kind=\"broadcast\"}"),
        1.0
    );
    assert_eq!(metric(&m, "pushgate_pending_messages"), 1.0);
    assert!(metric(&m, "pushgate_delivery_seconds_count") >= 2.0);
    assert!(metric(&m, "process_open_fds") > 0.0);
    assert!(metric(&m, "process_resident_memory_bytes") > 0.0);
    // The memory store has no commits to time.
    assert!(!m.contains("pushgate_store_commit"), "{m}");
    d.close().await;
    gw.until("closed", |n| n.hub.live() == 0).await;
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "pushgate_connections{app=\"demo\"}"), 0.0);
    assert_eq!(
        metric(&m, "pushgate_connections_closed_total{reason=\"remote\"}"),
        1.0
    );
}

/// The redb store's group commits are timed and sized on /metrics.
#[tokio::test]
async fn store_commit_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store").display().to_string();
    let gw = Gateway::with(|t| {
        t.replace(
            "kind = \"memory\"",
            &format!("kind = \"redb\"\npath = \"{store}\""),
        )
    })
    .await;
    gw.push(json!({"to": {"device": "d1"}, "data": 1})).await;
    gw.push(json!({"to": {"devices": ["d1", "d2"]}, "data": 2}))
        .await;
    let m = gw.metrics().await;
    // Three (message, device) pairs stored, in one or two commits.
    assert_eq!(metric(&m, "pushgate_store_commit_messages_sum"), 3.0, "{m}");
    let commits = metric(&m, "pushgate_store_commit_messages_count");
    assert!((1.0..=2.0).contains(&commits), "{m}");
    assert!(metric(&m, "pushgate_store_commit_seconds_count") >= commits);
    assert!(metric(&m, "pushgate_store_commit_seconds_sum") > 0.0);
}

#[tokio::test]
async fn health_and_ready() {
    let gw = Gateway::start().await;
    assert_eq!(
        http(gw.api, "GET", "/healthz", None, None, "").await.status,
        200
    );
    assert_eq!(
        http(gw.api, "GET", "/readyz", None, None, "").await.status,
        200
    );
    gw.node().drain.start();
    assert_eq!(
        http(gw.api, "GET", "/readyz", None, None, "").await.status,
        503
    );
    assert_eq!(
        http(gw.api, "GET", "/healthz", None, None, "").await.status,
        200
    );
}

#[tokio::test]
async fn api_auth_and_errors_over_the_wire() {
    let gw = Gateway::start().await;
    let body = json!({"to": {"device": "d1"}, "data": 1}).to_string();
    let r = http(
        gw.api,
        "POST",
        "/v1/apps/demo/messages",
        None,
        Some(&body),
        "application/json",
    )
    .await;
    assert_eq!((r.status, r.code().as_str()), (401, "unauthorized"));
    let r = http(
        gw.api,
        "POST",
        "/v1/apps/demo/messages",
        Some("nope"),
        Some(&body),
        "application/json",
    )
    .await;
    assert_eq!((r.status, r.code().as_str()), (401, "unauthorized"));
    let r = http(
        gw.api,
        "POST",
        "/v1/apps/demo/messages",
        Some(OTHER_KEY),
        Some(&body),
        "application/json",
    )
    .await;
    assert_eq!((r.status, r.code().as_str()), (403, "forbidden"));
    let r = http(
        gw.api,
        "POST",
        "/v1/apps/ghost/messages",
        Some(OTHER_KEY),
        Some(&body),
        "application/json",
    )
    .await;
    assert_eq!((r.status, r.code().as_str()), (403, "forbidden"));
    let r = http(
        gw.api,
        "POST",
        "/v1/apps/demo/messages",
        Some(KEY),
        Some(&body),
        "text/plain",
    )
    .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (415, "unsupported_media_type")
    );
    let r = http(
        gw.api,
        "POST",
        "/v1/apps/demo/messages",
        Some(KEY),
        Some("{"),
        "application/json",
    )
    .await;
    assert_eq!((r.status, r.code().as_str()), (400, "invalid"));
    let big = json!({"to": {"device": "d1"}, "data": "x".repeat(5000)}).to_string();
    let r = http(
        gw.api,
        "POST",
        "/v1/apps/demo/messages",
        Some(KEY),
        Some(&big),
        "application/json",
    )
    .await;
    assert_eq!((r.status, r.code().as_str()), (413, "too_large"));
    let r = http(gw.api, "GET", "/nowhere", Some(KEY), None, "").await;
    assert_eq!((r.status, r.code().as_str()), (404, "not_found"));
    let batch = json!({"messages": [
        {"to": {"device": "d1"}, "data": 1},
        {"to": {"device": "bad id"}, "data": 2},
        {"to": {"topic": "news"}, "data": 3, "ttl": 5},
        {"to": {"device": "d1"}, "data": 4, "dry_run": true}
    ]});
    let r = gw
        .api("POST", "/v1/apps/demo/messages/batch", Some(batch))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let results = r.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 4);
    assert_eq!(results[0]["stored"], 1);
    assert_eq!(results[1]["error"]["code"], "invalid");
    assert_eq!(results[2]["error"]["code"], "invalid");
    assert_eq!(results[3]["dry_run"], true);
    let info = gw.api("GET", "/v1/apps/demo/devices/d1", None).await.json();
    assert_eq!(info["pending"], 1, "the dry run stored nothing");
}

#[tokio::test]
async fn rate_limit_per_app() {
    let gw = Gateway::with(|t| {
        t.replacen(
            "api_keys = [\"demo-key\"]",
            "api_keys = [\"demo-key\"]\nmax_messages_per_sec = 3",
            1,
        )
    })
    .await;
    let mut statuses = Vec::new();
    for i in 0..6 {
        let r = gw
            .api(
                "POST",
                "/v1/apps/demo/messages",
                Some(json!({"to": {"device": "d1"}, "data": i})),
            )
            .await;
        if r.status == 429 {
            assert_eq!(r.code(), "rate_limited");
            assert!(r.header("Retry-After").is_some());
        }
        statuses.push(r.status);
    }
    // The burst (3) is accepted, then refusals; a token may refill on a
    // slow machine, so bound rather than pin the count.
    let accepted = statuses.iter().filter(|s| **s == 202).count();
    assert!((3..=5).contains(&accepted), "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(statuses[..3].iter().all(|s| *s == 202), "{statuses:?}");
    // The other app is not limited by demo's budget.
    let body = json!({"to": {"device": "d1"}, "data": 1}).to_string();
    let r = http(
        gw.api,
        "POST",
        "/v1/apps/other/messages",
        Some(OTHER_KEY),
        Some(&body),
        "application/json",
    )
    .await;
    assert_eq!(r.status, 202);
}

/// The API has a thread of its own: it answers while every thread of the
/// runtime the devices run on is blocked (here the test's only one, by a
/// blocking call). On the shared runtime this call could not be answered.
#[tokio::test(flavor = "current_thread")]
async fn the_api_answers_while_the_device_runtime_is_busy() {
    use std::io::{Read, Write};
    let gw = Gateway::start().await;
    let mut s = std::net::TcpStream::connect(gw.api).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let read = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{read:?}: {answer:?}");
}
