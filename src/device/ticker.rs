//! One shared clock for every connection's heartbeat, idle and token checks,
//! instead of a timer per connection. Connections are spread over shards;
//! each shard is woken once per heartbeat, at staggered moments, so a
//! million connections do not all wake in the same instant.
//!
//! A shard is a tick counter and a `Notify` rather than a `watch` channel:
//! the wait is part of every idle connection's task, and this one is 40
//! bytes smaller than `watch::Receiver::changed`'s, with no receiver to keep
//! (a connection keeps the last tick it saw, two bytes).

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

/// How many staggered groups connections are spread over.
pub const SHARDS: usize = 16;

/// Unix seconds now.
pub fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One staggered group of connections.
#[derive(Debug, Default)]
struct Shard {
    /// Ticks so far (wrapping: only compared for a change).
    ticks: AtomicU16,
    notify: Notify,
}

/// The shared heartbeat clock.
#[derive(Debug)]
pub struct Ticker {
    shards: Box<[Shard]>,
    now: AtomicU64,
    period: Duration,
}

impl Ticker {
    /// A ticker that wakes each shard once per `period` (the heartbeat).
    pub fn new(period: Duration) -> Ticker {
        Ticker {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            now: AtomicU64::new(unix_secs()),
            period,
        }
    }

    fn shard(&self, id: u64) -> &Shard {
        &self.shards[(id % SHARDS as u64) as usize]
    }

    /// The current tick of connection `id`'s shard: what [`Ticker::tick`]
    /// takes as seen, so that a new connection waits for the next one.
    pub fn current(&self, id: u64) -> u16 {
        self.shard(id).ticks.load(Ordering::Acquire)
    }

    /// Wait until connection `id`'s shard ticks past `seen`, then record the
    /// new tick in `seen`. A tick that came while the connection was busy
    /// elsewhere is not lost: it returns at once.
    pub async fn tick(&self, id: u64, seen: &mut u16) {
        let shard = self.shard(id);
        loop {
            // Register first, then check: a tick between the two still
            // wakes this wait (`notify_waiters` reaches every `Notified`
            // created before it).
            let notified = shard.notify.notified();
            let now = shard.ticks.load(Ordering::Acquire);
            if now != *seen {
                *seen = now;
                return;
            }
            notified.await;
        }
    }

    /// Unix seconds as of the last tick (coarse, cheap).
    pub fn now_secs(&self) -> u64 {
        self.now.load(Ordering::Relaxed)
    }

    /// Drive the shards forever (until the task is dropped).
    pub async fn run(self: Arc<Self>) {
        let step = self.period / SHARDS as u32;
        let mut interval = tokio::time::interval(step.max(Duration::from_millis(1)));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shard = 0;
        loop {
            interval.tick().await;
            self.now.store(unix_secs(), Ordering::Relaxed);
            let s = &self.shards[shard];
            s.ticks.fetch_add(1, Ordering::AcqRel);
            s.notify.notify_waiters();
            shard = (shard + 1) % SHARDS;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn every_shard_ticks_once_per_period() {
        let t = Arc::new(Ticker::new(Duration::from_secs(16)));
        let mut seen: Vec<u16> = (0..SHARDS as u64).map(|i| t.current(i)).collect();
        let task = tokio::spawn(t.clone().run());
        tokio::time::sleep(Duration::from_millis(16_500)).await;
        for (i, s) in seen.iter_mut().enumerate() {
            assert_ne!(t.current(i as u64), *s);
            *s = t.current(i as u64);
        }
        tokio::time::sleep(Duration::from_millis(8_000)).await;
        let woke = (0..SHARDS)
            .filter(|&i| t.current(i as u64) != seen[i])
            .count();
        assert!((7..=9).contains(&woke), "{woke}");
        // A tick that came while nobody waited is reported at once.
        let i = (0..SHARDS)
            .find(|&i| t.current(i as u64) != seen[i])
            .expect("a shard that ticked");
        let mut s = seen[i];
        tokio::time::timeout(Duration::from_millis(1), t.tick(i as u64, &mut s))
            .await
            .expect("the tick that came meanwhile");
        assert_eq!(s, t.current(i as u64));
        task.abort();
    }
}
