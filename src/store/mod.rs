//! Where device-directed messages live until they are acked or expire, and
//! the device session registry. The `Store` trait is all the rest of the
//! gateway sees; `memory` is for tests and dry runs, `redb` is the durable,
//! group-committed default. Knows nothing of sockets or HTTP.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

pub mod memory;
pub mod redb;
#[cfg(test)]
mod tests;

/// A message to store for one or more devices of one app.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Message id (UUIDv7), the same for every device it goes to.
    pub id: Arc<str>,
    /// The message's `data`, compact JSON.
    pub data: Bytes,
    /// Unix milliseconds at acceptance.
    pub created_ms: u64,
    /// Unix milliseconds after which it must not be delivered any more.
    pub expires_ms: u64,
    /// Storing it removes a pending message of the same device with the same key.
    pub collapse_key: Option<Arc<str>>,
}

/// A pending message as read back for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: u64,
    pub id: Arc<str>,
    pub data: Bytes,
    pub created_ms: u64,
    pub expires_ms: u64,
}

/// What storing one message for one device did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AppendOutcome {
    /// The seq the message got for that device.
    pub seq: u64,
    /// How many older pending messages the pending limit discarded.
    pub dropped: u64,
    /// How many older pending messages the collapse key removed (0 or 1).
    pub collapsed: u64,
}

/// The session registry entry of one device, as `GET /devices/{device}` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceRecord {
    /// Unix ms of the first connection, `None` if it never connected.
    pub first_seen_ms: Option<u64>,
    /// Unix ms of the start of the latest connection.
    pub last_seen_ms: Option<u64>,
    /// Connections ever opened.
    pub sessions: u64,
    /// Pending (unacked, unexpired) messages now.
    pub pending: u64,
}

/// The store refused or failed an operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot write (disk full, permissions, I/O error): nothing
    /// of the call was accepted. The API maps it to 503 `store_unavailable`.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Another process holds the store (startup only).
    #[error("store locked: {0}")]
    Locked(String),
    /// The store's files are not a store this version can read (startup only).
    #[error("store corrupt or incompatible: {0}")]
    Corrupt(String),
}

/// Totals the store keeps for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExpireOutcome {
    /// Pending messages removed because their ttl passed.
    pub expired: u64,
}

/// Durable (or, for `memory`, in-process) store of device-directed messages.
///
/// Rules every implementation keeps (checked against a model by property tests):
/// - seq is per (app, device), starts at 1, strictly increases, is never
///   reused, also across restarts and after purge;
/// - `ack(seq)` removes every pending message with seq ≤ `seq`;
/// - `append` with a collapse key removes the pending message of that device
///   with the same key (the new one gets a new seq);
/// - more than `max_pending` pending messages for a device discards the
///   oldest, and adds the number discarded to the device's unreported
///   dropped count (read and reset by `take_dropped`);
/// - expired messages are never returned and are removed by `expire`;
/// - when `append` returns Ok, the message is durable (for `redb`: its
///   transaction is committed with fsync); many concurrent appends share one
///   commit.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Store `msg` for each of `devices` (distinct, valid ids) of `app`, in one
    /// durable commit. Returns one outcome per device, in order. On error
    /// nothing of the call is stored.
    async fn append(
        &self,
        app: &str,
        devices: &[&str],
        msg: &NewMessage,
        max_pending: u64,
    ) -> Result<Vec<AppendOutcome>, StoreError>;

    /// Store several messages of `app`, each for its devices, as if
    /// `append` were called for each in turn (so messages to the same device
    /// get seqs in slice order), but letting them share commits. One result
    /// per item, in order; a failed item stored nothing, and a later item may
    /// still succeed (after the store heals). This default really does call
    /// `append` in turn; `redb` queues them all at once.
    async fn append_many(
        &self,
        app: &str,
        items: &[(Vec<&str>, NewMessage)],
        max_pending: u64,
    ) -> Vec<Result<Vec<AppendOutcome>, StoreError>> {
        let mut out = Vec::with_capacity(items.len());
        for (devices, msg) in items {
            out.push(self.append(app, devices, msg, max_pending).await);
        }
        out
    }

    /// Pending, unexpired (at `now_ms`) messages of a device with seq >
    /// `after_seq`, in seq order, at most `limit`.
    async fn pending(
        &self,
        app: &str,
        device: &str,
        after_seq: u64,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError>;

    /// Cumulative ack: remove every pending message with seq ≤ `seq`.
    /// Returns how many were removed. Need not be durable at return (a lost
    /// ack means a redelivery, which at-least-once allows).
    async fn ack(&self, app: &str, device: &str, seq: u64) -> Result<u64, StoreError>;

    /// Cumulative ack that does not wait: what connection tasks use, so a
    /// device's next frame is read at once. The ack is applied soon after
    /// (for `redb`: in the writer's next transaction); acks of one device
    /// queued meanwhile are merged, only the highest seq counting. What it
    /// removes is counted in [`Store::acked_total`]. Like `ack`, not durable
    /// at return, and a failed write forgets it (a redelivery).
    fn ack_queued(&self, app: &str, device: &str, seq: u64);

    /// Messages removed by `ack` and `ack_queued` since the store was opened
    /// (the `pushgate_messages_acked_total` counter).
    fn acked_total(&self) -> u64;

    /// Remove every pending message of a device; returns how many. Durable at return.
    async fn purge(&self, app: &str, device: &str) -> Result<u64, StoreError>;

    /// Read and reset the count of messages discarded by the pending limit
    /// since the device was last told.
    async fn take_dropped(&self, app: &str, device: &str) -> Result<u64, StoreError>;

    /// Remove every message expired at `now_ms` (using an index by deadline,
    /// not a full scan).
    async fn expire(&self, now_ms: u64) -> Result<ExpireOutcome, StoreError>;

    /// Record the start of a connection: sessions += 1, first_seen set if
    /// unset, last_seen = `now_ms`.
    async fn record_session(&self, app: &str, device: &str, now_ms: u64) -> Result<(), StoreError>;

    /// The registry entry plus pending count, or `None` for a device never
    /// seen that has nothing pending.
    async fn device(
        &self,
        app: &str,
        device: &str,
        now_ms: u64,
    ) -> Result<Option<DeviceRecord>, StoreError>;

    /// Pending messages over all devices (the `pushgate_pending_messages` gauge).
    fn pending_total(&self) -> u64;

    /// The store's own Prometheus metrics, for the gateway to register
    /// (none by default).
    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        Vec::new()
    }

    /// Make everything written so far durable (shutdown).
    async fn flush(&self) -> Result<(), StoreError>;

    /// Make everything durable and let go of the store's files, so that a new
    /// process can open them (a hand-over restart). Every later call fails
    /// with `Unavailable` until [`Store::reacquire`]. The in-memory store
    /// has no files: it only flushes.
    async fn release(&self) -> Result<(), StoreError> {
        self.flush().await
    }

    /// Open the files again after [`Store::release`] (the hand-over was
    /// abandoned). Ok at once if they were never let go.
    async fn reacquire(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
