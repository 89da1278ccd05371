//! One shared clock for every connection's heartbeat, idle and token checks,
//! instead of a timer per connection. Connections are spread over shards;
//! each shard is woken once per heartbeat, at staggered moments, so a
//! million connections do not all wake in the same instant.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

/// How many staggered groups connections are spread over.
pub const SHARDS: usize = 16;

/// Unix seconds now.
pub fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The shared heartbeat clock.
#[derive(Debug)]
pub struct Ticker {
    shards: Box<[watch::Sender<()>]>,
    now: AtomicU64,
    period: Duration,
}

impl Ticker {
    /// A ticker that wakes each shard once per `period` (the heartbeat).
    pub fn new(period: Duration) -> Ticker {
        Ticker {
            shards: (0..SHARDS).map(|_| watch::channel(()).0).collect(),
            now: AtomicU64::new(unix_secs()),
            period,
        }
    }

    /// The receiver a connection waits on; `id` picks its shard.
    pub fn subscribe(&self, id: u64) -> watch::Receiver<()> {
        self.shards[(id % SHARDS as u64) as usize].subscribe()
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
            self.shards[shard].send_replace(());
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
        let mut rxs: Vec<_> = (0..SHARDS as u64).map(|i| t.subscribe(i)).collect();
        let task = tokio::spawn(t.clone().run());
        tokio::time::sleep(Duration::from_millis(16_500)).await;
        for rx in &mut rxs {
            assert!(rx.has_changed().unwrap());
            rx.borrow_and_update();
        }
        tokio::time::sleep(Duration::from_millis(8_000)).await;
        let woke = rxs.iter().filter(|rx| rx.has_changed().unwrap()).count();
        assert!((7..=9).contains(&woke), "{woke}");
        task.abort();
    }
}
