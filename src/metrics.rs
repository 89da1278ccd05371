//! Every metric PROTOCOL.md names, registered in one owned
//! `prometheus::Registry` (never the global default), so tests can run
//! several gateways in one process.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::hub::MsgKind;
use crate::protocol::CloseReason;

/// Why a message was dropped (the `reason` label of `messages_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    PendingLimit,
    Expired,
    SlowConsumer,
    Collapsed,
}

impl DropReason {
    pub const ALL: [DropReason; 4] = [
        DropReason::PendingLimit,
        DropReason::Expired,
        DropReason::SlowConsumer,
        DropReason::Collapsed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::PendingLimit => "pending_limit",
            DropReason::Expired => "expired",
            DropReason::SlowConsumer => "slow_consumer",
            DropReason::Collapsed => "collapsed",
        }
    }
}

/// Reasons a device handshake failed (the `reason` label).
pub const HANDSHAKE_FAILURES: [&str; 10] = [
    "bad_request",
    "unsupported_version",
    "not_found",
    "unauthorized",
    "too_many_connections",
    "overloaded",
    "draining",
    "timeout",
    "tls",
    "io",
];

/// The gateway's metrics. Counters are looked up by label once here, so hot
/// paths touch a plain atomic.
pub struct Metrics {
    registry: Registry,
    pub connections: IntGaugeVec,
    pub connections_opened: IntCounterVec,
    pub connections_closed: IntCounterVec,
    pub handshake_failures: IntCounterVec,
    accepted: [IntCounter; 3],
    sent: [IntCounter; 3],
    pub acked: IntCounter,
    dropped: [IntCounter; 4],
    pub pending: IntGauge,
    pub fanout_queue_depth: IntGauge,
    pub delivery_seconds: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn kind_index(kind: MsgKind) -> usize {
    match kind {
        MsgKind::Device => 0,
        MsgKind::Topic => 1,
        MsgKind::Broadcast => 2,
    }
}

impl Metrics {
    /// Build and register everything. `apps` pre-creates the per-app label
    /// values so dashboards see zeros rather than gaps.
    pub fn new(apps: &[&str]) -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let connections = IntGaugeVec::new(
            Opts::new("pushgate_connections", "Open device connections."),
            &["app"],
        )?;
        let connections_opened = IntCounterVec::new(
            Opts::new(
                "pushgate_connections_opened_total",
                "Device connections opened (upgrade completed).",
            ),
            &["app"],
        )?;
        let connections_closed = IntCounterVec::new(
            Opts::new(
                "pushgate_connections_closed_total",
                "Device connections closed, by reason.",
            ),
            &["reason"],
        )?;
        let handshake_failures = IntCounterVec::new(
            Opts::new(
                "pushgate_handshake_failures_total",
                "Device handshakes refused or failed, by reason.",
            ),
            &["reason"],
        )?;
        let accepted_vec = IntCounterVec::new(
            Opts::new(
                "pushgate_messages_accepted_total",
                "Messages accepted by the API, one per message whatever its number of targets.",
            ),
            &["kind"],
        )?;
        let sent_vec = IntCounterVec::new(
            Opts::new(
                "pushgate_messages_sent_total",
                "msg frames written to device sockets.",
            ),
            &["kind"],
        )?;
        let acked = IntCounter::new(
            "pushgate_messages_acked_total",
            "Device-directed messages acked by devices.",
        )?;
        let dropped_vec = IntCounterVec::new(
            Opts::new(
                "pushgate_messages_dropped_total",
                "Messages dropped before delivery, by reason.",
            ),
            &["reason"],
        )?;
        let pending = IntGauge::new(
            "pushgate_pending_messages",
            "Device-directed messages stored and not yet acked or expired.",
        )?;
        let fanout_queue_depth = IntGauge::new(
            "pushgate_fanout_queue_depth",
            "Accepted topic and broadcast messages waiting for fan-out.",
        )?;
        let delivery_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "pushgate_delivery_seconds",
                "Time from API acceptance to the socket write of a msg frame.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ]),
        )?;

        registry.register(Box::new(connections.clone()))?;
        registry.register(Box::new(connections_opened.clone()))?;
        registry.register(Box::new(connections_closed.clone()))?;
        registry.register(Box::new(handshake_failures.clone()))?;
        registry.register(Box::new(accepted_vec.clone()))?;
        registry.register(Box::new(sent_vec.clone()))?;
        registry.register(Box::new(acked.clone()))?;
        registry.register(Box::new(dropped_vec.clone()))?;
        registry.register(Box::new(pending.clone()))?;
        registry.register(Box::new(fanout_queue_depth.clone()))?;
        registry.register(Box::new(delivery_seconds.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        for app in apps {
            connections.with_label_values(&[*app]);
            connections_opened.with_label_values(&[*app]);
        }
        for r in CloseReason::ALL {
            connections_closed.with_label_values(&[r.as_str()]);
        }
        for r in HANDSHAKE_FAILURES {
            handshake_failures.with_label_values(&[r]);
        }
        let by_kind = |v: &IntCounterVec| MsgKind::ALL.map(|k| v.with_label_values(&[k.as_str()]));
        let accepted = by_kind(&accepted_vec);
        let sent = by_kind(&sent_vec);
        let dropped = DropReason::ALL.map(|r| dropped_vec.with_label_values(&[r.as_str()]));

        Ok(Metrics {
            registry,
            connections,
            connections_opened,
            connections_closed,
            handshake_failures,
            accepted,
            sent,
            acked,
            dropped,
            pending,
            fanout_queue_depth,
            delivery_seconds,
        })
    }

    /// Registers metrics kept by another part (the store's).
    pub fn register(
        &self,
        collectors: Vec<Box<dyn prometheus::core::Collector>>,
    ) -> Result<(), prometheus::Error> {
        for c in collectors {
            self.registry.register(c)?;
        }
        Ok(())
    }

    pub fn accepted(&self, kind: MsgKind) -> &IntCounter {
        &self.accepted[kind_index(kind)]
    }

    pub fn sent(&self, kind: MsgKind) -> &IntCounter {
        &self.sent[kind_index(kind)]
    }

    pub fn dropped(&self, reason: DropReason) -> &IntCounter {
        &self.dropped[reason as usize]
    }

    pub fn handshake_failed(&self, reason: &str) {
        self.handshake_failures.with_label_values(&[reason]).inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::with_capacity(16 * 1024);
        let families = self.registry.gather();
        // Encoding into a Vec cannot fail for the text format.
        if TextEncoder::new().encode(&families, &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_protocol_metric() {
        let m = Metrics::new(&["demo"]).unwrap();
        m.accepted(MsgKind::Topic).inc();
        m.dropped(DropReason::Collapsed).inc();
        m.delivery_seconds.observe(0.01);
        let text = m.render();
        for name in [
            "pushgate_connections{app=\"demo\"}",
            "pushgate_connections_opened_total{app=\"demo\"}",
            "pushgate_connections_closed_total{reason=\"replaced\"}",
            "pushgate_handshake_failures_total{reason=\"unauthorized\"}",
            "pushgate_messages_accepted_total{kind=\"topic\"} 1",
            "pushgate_messages_sent_total{kind=\"broadcast\"} 0",
            "pushgate_messages_acked_total 0",
            "pushgate_messages_dropped_total{reason=\"collapsed\"} 1",
            "pushgate_pending_messages 0",
            "pushgate_fanout_queue_depth 0",
            "pushgate_delivery_seconds_bucket",
            "process_resident_memory_bytes",
            "process_open_fds",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
