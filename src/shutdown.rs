//! Graceful drain as a first-class signal: a `Drain` flag every part can
//! read (API answers 503 `draining`, `/readyz` 503, device upgrades 503) and
//! await, plus the signal handling of PROTOCOL.md's "Shutdown".

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

/// Set once when the drain starts; never unset.
#[derive(Debug)]
pub struct Drain {
    flag: AtomicBool,
    tx: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain::new()
    }
}

impl Drain {
    pub fn new() -> Drain {
        Drain {
            flag: AtomicBool::new(false),
            tx: watch::channel(false).0,
        }
    }

    /// Start draining (idempotent).
    pub fn start(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.tx.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Resolves once the drain has started.
    pub async fn started(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives in self, so this only ends when the flag is set.
        let _ = rx.wait_for(|d| *d).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn started_resolves_after_start() {
        let d = std::sync::Arc::new(Drain::new());
        assert!(!d.is_draining());
        let d2 = d.clone();
        let waiter = tokio::spawn(async move { d2.started().await });
        d.start();
        waiter.await.unwrap();
        assert!(d.is_draining());
        // Already started: resolves at once.
        d.started().await;
    }
}
