//! The bounded queue between the API and the hub for topic and broadcast
//! messages, and the worker that drains it. A message is encoded to its wire
//! frame once; the same buffer is handed to every target connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;
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

/// Per-app bounded queues of accepted topic and broadcast messages. One
/// queue per app, drained round-robin by one worker, so an app that queues
/// a thousand broadcasts delays another app's next fan-out by at most one
/// job, not by a thousand.
struct Queues {
    per_app: Box<[Mutex<VecDeque<FanoutJob>>]>,
    capacity: usize,
    ready: Notify,
    /// Per app: when it last had a message accepted (ms since `epoch`).
    active_ms: Box<[AtomicU64]>,
    epoch: Instant,
}

impl Queues {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether an app other than `app` had a message accepted within
    /// [`ACTIVE_WINDOW_MS`].
    fn others_active(&self, app: usize) -> bool {
        self.others_active_at(app, self.now_ms())
    }

    fn others_active_at(&self, app: usize, now: u64) -> bool {
        self.active_ms.iter().enumerate().any(|(other, at)| {
            let at = at.load(Ordering::Relaxed);
            other != app && at != 0 && now.saturating_sub(at) < ACTIVE_WINDOW_MS
        })
    }
}

/// The sending side, held by the API.
#[derive(Clone)]
pub struct Fanout {
    queues: Arc<Queues>,
    metrics: Arc<Metrics>,
}

/// The receiving side, drained by [`run`].
pub struct FanoutQueue {
    queues: Arc<Queues>,
}

/// The app's queue is full: answer 429 `queue_full`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

fn lock(q: &Mutex<VecDeque<FanoutJob>>) -> std::sync::MutexGuard<'_, VecDeque<FanoutJob>> {
    // A queue of jobs stays consistent even if a holder panicked.
    q.lock().unwrap_or_else(|p| p.into_inner())
}

impl Fanout {
    /// Queues of `capacity` jobs for each of `apps` apps.
    pub fn new(apps: usize, capacity: usize, metrics: Arc<Metrics>) -> (Fanout, FanoutQueue) {
        let queues = Arc::new(Queues {
            per_app: (0..apps).map(|_| Mutex::new(VecDeque::new())).collect(),
            capacity: capacity.max(1),
            ready: Notify::new(),
            active_ms: (0..apps).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
        });
        (
            Fanout {
                queues: queues.clone(),
                metrics,
            },
            FanoutQueue { queues },
        )
    }

    /// Queue a job, or refuse at once if its app's queue is full.
    /// Note that `app` had a message accepted (any kind): while another app
    /// is active, a broadcast is handed out in small steps so that app's
    /// calls and deliveries are not queued behind the whole broadcast.
    pub fn touch(&self, app: usize) {
        if let Some(at) = self.queues.active_ms.get(app) {
            // Never 0: that means "never".
            at.store(self.queues.now_ms().max(1), Ordering::Relaxed);
        }
    }

    pub fn try_send(&self, job: FanoutJob) -> Result<(), QueueFull> {
        {
            let mut q = lock(&self.queues.per_app[job.app]);
            if q.len() >= self.queues.capacity {
                return Err(QueueFull);
            }
            q.push_back(job);
        }
        self.metrics.fanout_queue_depth.inc();
        self.queues.ready.notify_one();
        Ok(())
    }
}

/// How many pushes the worker does before yielding, so a broadcast to a
/// million connections does not hold a runtime thread for its whole length.
const YIELD_EVERY: usize = 4096;
/// The same while another app is active: small enough that the connection
/// tasks one step wakes fit tokio's local run queue (256), so they do not
/// spill into the global queue, where another app's API call or delivery,
/// woken meanwhile, would wait behind all of them. Measured
/// (`loadtest/scripts/isolation.sh`, app b's push p99 while app a
/// broadcasts to 15k 4×/s): 4096 → 146–339 ms, 512 → 154 ms, 128 → 55 ms,
/// 64 → 15 ms. It costs broadcast throughput (about half), hence only while
/// another app is active.
const YIELD_EVERY_SHARED: usize = 64;
/// How recent another app's accepted message must be to count as active.
const ACTIVE_WINDOW_MS: u64 = 1000;

/// The fan-out worker: takes one job from each app's queue in turn, forever
/// (the node aborts it at shutdown).
pub async fn run(queue: FanoutQueue, hub: Arc<Hub>, metrics: Arc<Metrics>, queue_cap: usize) {
    let queues = queue.queues;
    loop {
        let mut idle = true;
        for app_queue in queues.per_app.iter() {
            let Some(job) = lock(app_queue).pop_front() else {
                continue;
            };
            idle = false;
            metrics.fanout_queue_depth.dec();
            fan_out(job, &hub, &metrics, queue_cap, &queues).await;
            // Let the connections just woken write before the next job.
            tokio::task::yield_now().await;
        }
        if idle {
            // A permit stored by a send since the queues were looked at
            // makes this return at once: no wake-up is lost.
            queues.ready.notified().await;
        }
    }
}

async fn fan_out(job: FanoutJob, hub: &Hub, metrics: &Metrics, queue_cap: usize, queues: &Queues) {
    let targets = match &job.target {
        FanoutTarget::Topic(t) => hub.topic_targets(job.app, t),
        FanoutTarget::Broadcast => hub.app_targets(job.app),
    };
    let out = Out {
        frame: job.frame,
        seq: 0,
    };
    let mut rest = &targets[..];
    while !rest.is_empty() {
        // Looked at for each step: pacing starts as soon as another app
        // sends, also in the middle of a long broadcast.
        let step = if queues.others_active(job.app) {
            YIELD_EVERY_SHARED
        } else {
            YIELD_EVERY
        };
        let (chunk, tail) = rest.split_at(step.min(rest.len()));
        hand_out(chunk, &out, queue_cap, metrics);
        rest = tail;
        if !rest.is_empty() {
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Conn;

    fn job(app: usize) -> FanoutJob {
        FanoutJob {
            app,
            target: FanoutTarget::Broadcast,
            frame: encode(
                "id",
                MsgTarget::Broadcast,
                "1",
                MsgKind::Broadcast,
                Instant::now(),
                false,
            ),
        }
    }

    #[test]
    fn another_app_is_active_for_a_while_after_its_last_message() {
        let metrics = Arc::new(Metrics::new(&["a", "b"]).expect("metrics"));
        let (fanout, queue) = Fanout::new(2, 2, metrics);
        assert!(!queue.queues.others_active(0), "nobody sent anything yet");
        fanout.touch(0);
        assert!(
            !queue.queues.others_active(0),
            "an app's own messages do not count"
        );
        assert!(queue.queues.others_active(1));
        fanout.touch(1);
        assert!(queue.queues.others_active(0));
        // Active for ACTIVE_WINDOW_MS after its last message, then not.
        let at = queue.queues.active_ms[1].load(Ordering::Relaxed);
        assert!(queue.queues.others_active_at(0, at + ACTIVE_WINDOW_MS - 1));
        assert!(!queue.queues.others_active_at(0, at + ACTIVE_WINDOW_MS));
    }

    #[test]
    fn each_app_has_its_own_bound() {
        let metrics = Arc::new(Metrics::new(&["a", "b"]).expect("metrics"));
        let (fanout, _queue) = Fanout::new(2, 2, metrics);
        assert!(fanout.try_send(job(0)).is_ok());
        assert!(fanout.try_send(job(0)).is_ok());
        assert_eq!(fanout.try_send(job(0)), Err(QueueFull));
        // App b is not refused because app a's queue is full.
        assert!(fanout.try_send(job(1)).is_ok());
    }

    #[tokio::test]
    async fn apps_take_turns() {
        let hub = Arc::new(Hub::new([("a".to_string(), 10), ("b".to_string(), 10)]));
        let metrics = Arc::new(Metrics::new(&["a", "b"]).expect("metrics"));
        let a = Conn::new(1, 0, "da".into());
        let b = Conn::new(2, 1, "db".into());
        hub.register(&a).expect("register");
        hub.register(&b).expect("register");
        let (fanout, queue) = Fanout::new(2, 100, metrics.clone());
        for _ in 0..50 {
            fanout.try_send(job(0)).expect("queued");
        }
        fanout.try_send(job(1)).expect("queued");
        let worker = tokio::spawn(run(queue, hub.clone(), metrics, 1000));
        // App b's one job is handed out while app a still has most of its
        // fifty waiting (round-robin), not after all of them.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while b.take().0.is_empty() {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::task::yield_now().await;
        }
        let a_done = a.take().0.len();
        assert!(a_done < 50, "app a got {a_done} of 50 before app b got 1");
        worker.abort();
    }
}
