//! The bounded queue between the API and the hub for topic and broadcast
//! messages, and the worker that drains it. A message is encoded to its wire
//! frame once; the same buffer is handed to every target connection.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::hub::{ConnHandle, Frame, Hub, MsgKind, Out, Pushed};
use crate::metrics::{DropReason, Metrics};
use crate::protocol::{msg_frame, MsgTarget};

/// Encode a `msg` frame once, to be shared by all its targets.
pub fn encode(
    id: &str,
    target: MsgTarget<'_>,
    data: &str,
    kind: MsgKind,
    accepted: Instant,
    check_dropped: bool,
) -> Arc<Frame> {
    Arc::new(Frame {
        text: Utf8Bytes::from(msg_frame(id, target, data)),
        kind,
        accepted,
        check_dropped,
    })
}

/// Hand `out` to each of `targets`; returns how many took it. A full queue
/// closes that connection as a slow consumer and counts a drop.
pub fn hand_out(targets: &[ConnHandle], out: &Out, cap: usize, metrics: &Metrics) -> u64 {
    let mut handed = 0;
    for conn in targets {
        match conn.push(out.clone(), cap) {
            Pushed::Queued => handed += 1,
            Pushed::Full => metrics.dropped(DropReason::SlowConsumer).inc(),
            Pushed::Closed => {}
        }
    }
    handed
}

/// Where a queued fan-out goes.
#[derive(Debug)]
pub enum FanoutTarget {
    Topic(Arc<str>),
    Broadcast,
}

/// One accepted topic or broadcast message waiting for fan-out.
#[derive(Debug)]
pub struct FanoutJob {
    pub app: usize,
    pub target: FanoutTarget,
    pub frame: Arc<Frame>,
}

/// The sending side, held by the API.
#[derive(Debug, Clone)]
pub struct Fanout {
    tx: mpsc::Sender<FanoutJob>,
    metrics: Arc<Metrics>,
}

/// The queue is full: answer 429 `queue_full`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

impl Fanout {
    /// A queue of `capacity` jobs and the receiving end for [`run`].
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> (Fanout, mpsc::Receiver<FanoutJob>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Fanout { tx, metrics }, rx)
    }

    /// Queue a job, or refuse at once if the queue is full.
    pub fn try_send(&self, job: FanoutJob) -> Result<(), QueueFull> {
        self.tx.try_send(job).map_err(|_| QueueFull)?;
        self.metrics.fanout_queue_depth.inc();
        Ok(())
    }
}

/// How many pushes the worker does before yielding, so a broadcast to a
/// million connections does not hold a runtime thread for its whole length.
const YIELD_EVERY: usize = 4096;

/// The fan-out worker: drains the queue until every sender is gone.
pub async fn run(
    mut rx: mpsc::Receiver<FanoutJob>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    queue_cap: usize,
) {
    while let Some(job) = rx.recv().await {
        metrics.fanout_queue_depth.dec();
        let targets = match &job.target {
            FanoutTarget::Topic(t) => hub.topic_targets(job.app, t),
            FanoutTarget::Broadcast => hub.app_targets(job.app),
        };
        let out = Out {
            frame: job.frame,
            seq: 0,
        };
        for chunk in targets.chunks(YIELD_EVERY) {
            hand_out(chunk, &out, queue_cap, &metrics);
            if chunk.len() == YIELD_EVERY {
                tokio::task::yield_now().await;
            }
        }
    }
}
