//! Delivery semantics: seq, acks, redelivery, ttl, pending limit, collapse.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn unacked_messages_are_redelivered_in_order_before_new_ones() {
    let gw = Gateway::start().await;
    for i in 1..=3 {
        let r = gw.push(json!({"to": {"device": "d1"}, "data": i})).await;
        assert_eq!(
            (r["online"].as_u64(), r["stored"].as_u64()),
            (Some(0), Some(1))
        );
    }
    let mut d = gw.connect("d1").await;
    for i in 1..=3 {
        let m = d.recv().await;
        assert_eq!((m["seq"].as_u64(), m["data"].as_u64()), (Some(i), Some(i)));
    }
    d.ack(2).await;
    gw.until("ack", |n| n.store.pending_total() == 1).await;
    d.close().await;
    gw.push(json!({"to": {"device": "d1"}, "data": 4})).await;
    let mut d = gw.connect("d1").await;
    assert_eq!(d.recv().await["seq"], 3);
    assert_eq!(d.recv().await["seq"], 4);
    d.ack(4).await;
    gw.until("all acked", |n| n.store.pending_total() == 0)
        .await;
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "pushgate_messages_acked_total"), 4.0);
}

#[tokio::test]
async fn ack_ahead_of_what_was_sent_is_clamped() {
    let gw = Gateway::start().await;
    let mut d = gw.connect("d1").await;
    gw.push(json!({"to": {"device": "d1"}, "data": 1})).await;
    assert_eq!(d.recv().await["seq"], 1);
    d.close().await;
    gw.push(json!({"to": {"device": "d1"}, "data": 2})).await;
    let mut d = gw.connect("d1").await;
    // seq 1 was never acked: it comes again, then 2.
    assert_eq!(d.recv().await["seq"], 1);
    assert_eq!(d.recv().await["seq"], 2);
    d.ack(1000).await;
    gw.until("acked", |n| n.store.pending_total() == 0).await;
}

#[tokio::test]
async fn ttl_zero_is_now_or_never() {
    let gw = Gateway::start().await;
    let r = gw
        .push(json!({"to": {"device": "d1"}, "data": "lost", "ttl": 0}))
        .await;
    assert_eq!(
        (r["online"].as_u64(), r["stored"].as_u64()),
        (Some(0), Some(0))
    );
    let mut d = gw.connect("d1").await;
    let r = gw
        .push(json!({"to": {"device": "d1"}, "data": "now", "ttl": 0}))
        .await;
    assert_eq!(
        (r["online"].as_u64(), r["stored"].as_u64()),
        (Some(1), Some(0))
    );
    let m = d.recv().await;
    assert_eq!(m["data"], "now");
    assert!(m.get("seq").is_none());
    d.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn expired_messages_are_not_delivered() {
    let gw = Gateway::start().await;
    gw.push(json!({"to": {"device": "d1"}, "data": "short", "ttl": 1}))
        .await;
    gw.push(json!({"to": {"device": "d1"}, "data": "long", "ttl": 60}))
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut d = gw.connect("d1").await;
    let m = d.recv().await;
    assert_eq!(
        (m["seq"].as_u64(), m["data"].as_str()),
        (Some(2), Some("long"))
    );
    gw.until("expiry sweep", |n| n.store.pending_total() == 1)
        .await;
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "pushgate_messages_dropped_total{reason=\"expired\"}"),
        1.0
    );
}

#[tokio::test]
async fn pending_limit_drops_the_oldest_and_tells_the_device() {
    let gw =
        Gateway::with(|t| t.replace("[store]", "[messages]\nmax_pending = 3\n\n[store]")).await;
    for i in 1..=5 {
        gw.push(json!({"to": {"device": "d1"}, "data": i})).await;
    }
    let mut d = gw.connect("d1").await;
    assert_eq!(d.recv().await, json!({"t": "dropped", "count": 2}));
    for seq in 3..=5 {
        assert_eq!(d.recv().await["seq"], seq);
    }
    // Connected: a drop is reported before the next msg.
    gw.push(json!({"to": {"device": "d1"}, "data": 6})).await;
    assert_eq!(d.recv().await, json!({"t": "dropped", "count": 1}));
    assert_eq!(d.recv().await["seq"], 6);
    let info = gw.api("GET", "/v1/apps/demo/devices/d1", None).await.json();
    assert_eq!(info["pending"], 3);
}

#[tokio::test]
async fn collapse_key_keeps_only_the_latest() {
    let gw = Gateway::start().await;
    gw.push(json!({"to": {"device": "d1"}, "data": "a1", "collapse_key": "score"}))
        .await;
    gw.push(json!({"to": {"device": "d1"}, "data": "b", "collapse_key": "other"}))
        .await;
    gw.push(json!({"to": {"device": "d1"}, "data": "a2", "collapse_key": "score"}))
        .await;
    let mut d = gw.connect("d1").await;
    let m = d.recv().await;
    assert_eq!(
        (m["seq"].as_u64(), m["data"].as_str()),
        (Some(2), Some("b"))
    );
    let m = d.recv().await;
    assert_eq!(
        (m["seq"].as_u64(), m["data"].as_str()),
        (Some(3), Some("a2"))
    );
    d.expect_silence(Duration::from_millis(200)).await;
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "pushgate_messages_dropped_total{reason=\"collapsed\"}"),
        1.0
    );
}

#[tokio::test]
async fn devices_target_and_device_info_and_purge() {
    let gw = Gateway::start().await;
    let mut d1 = gw.connect("d1").await;
    let r = gw
        .push(json!({"to": {"devices": ["d1", "d2"]}, "data": "x"}))
        .await;
    assert_eq!(
        (r["online"].as_u64(), r["stored"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(d1.recv().await["data"], "x");

    let info = gw.api("GET", "/v1/apps/demo/devices/d1", None).await.json();
    assert_eq!(info["device"], "d1");
    assert_eq!(info["online"], true);
    assert_eq!(info["sessions"], 1);
    assert!(info["first_seen"].as_u64().unwrap() > 0);
    let info = gw.api("GET", "/v1/apps/demo/devices/d2", None).await.json();
    assert_eq!(info["online"], false);
    assert_eq!(info["first_seen"], serde_json::Value::Null);
    assert_eq!(info["sessions"], 0);
    assert_eq!(info["pending"], 1);
    let r = gw.api("GET", "/v1/apps/demo/devices/never", None).await;
    assert_eq!((r.status, r.code().as_str()), (404, "not_found"));

    let r = gw
        .api("DELETE", "/v1/apps/demo/devices/d2/messages", None)
        .await;
    assert_eq!((r.status, r.json()["purged"].as_u64()), (200, Some(1)));
    let r = gw
        .api("DELETE", "/v1/apps/demo/devices/never/messages", None)
        .await;
    assert_eq!((r.status, r.json()["purged"].as_u64()), (200, Some(0)));
}

#[tokio::test]
async fn slow_consumer_is_closed_and_loses_nothing_device_directed() {
    let gw = Gateway::with(|t| {
        t.replace(
            "heartbeat_secs = 30",
            "heartbeat_secs = 30\noutbound_queue = 2",
        )
    })
    .await;
    let url = format!("ws://{}/v1/connect?token={}", gw.device, token("d1", &[]));
    // A device that never reads: its socket buffers fill, then its queue.
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let big = "x".repeat(4000);
    for _ in 0..5000 {
        gw.push(json!({"to": {"broadcast": true}, "data": big}))
            .await;
        let m = gw.metrics().await;
        if metric(
            &m,
            "pushgate_messages_dropped_total{reason=\"slow_consumer\"}",
        ) >= 1.0
        {
            break;
        }
    }
    gw.until("the slow consumer closed", |n| n.hub.live() == 0)
        .await;
    drop(ws);
    let m = gw.metrics().await;
    assert!(
        metric(
            &m,
            "pushgate_connections_closed_total{reason=\"slow_consumer\"}"
        ) >= 1.0
    );
    // A device-directed message stays pending through it.
    let r = gw
        .push(json!({"to": {"device": "d1"}, "data": "kept"}))
        .await;
    assert_eq!(r["stored"], 1);
    let mut d = gw.connect("d1").await;
    assert_eq!(d.recv().await["data"], "kept");
}
