//! What happens to a message the API accepted: device-directed ones are
//! stored (durably, before the answer) and handed to the device if it is
//! connected; topic and broadcast ones go through the bounded fan-out queue.
//! Also the device operations of the API (info, kick, purge). The API layer
//! only parses, authenticates and maps errors; everything it promises is
//! kept here.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::fanout::{self, Fanout, FanoutJob, FanoutTarget};
use crate::handoff::{Relay, RelayTarget, Relayed};
use crate::hub::{Frame, Hub, MsgKind, Out, Pushed};
use crate::limit::{retry_after_secs, RateLimiter};
use crate::metrics::{DropReason, Metrics};
use crate::protocol::{new_message_id, CloseReason, MsgTarget};
use crate::store::{AppendOutcome, DeviceRecord, NewMessage, Store, StoreError};

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whom a message goes to (validated by the API: ids valid, 1–1000 distinct).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Device(String),
    Devices(Vec<String>),
    Topic(String),
    Broadcast,
}

/// A validated message from the API.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub target: Target,
    /// The message's `data` as compact JSON.
    pub data: String,
    /// Seconds; 0 = now or never. Device targets only (0 for others).
    pub ttl_secs: u64,
    pub collapse_key: Option<String>,
}

/// The answer to an accepted (or dry-run) message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub id: String,
    pub online: u64,
    pub stored: u64,
}

/// Why a message was not accepted. Nothing of it was stored or sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DispatchError {
    #[error("the app's max_messages_per_sec is reached; retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("the fan-out queue is full; retry shortly")]
    QueueFull,
    #[error("the durable store cannot write: {0}")]
    StoreUnavailable(String),
}

impl From<StoreError> for DispatchError {
    fn from(e: StoreError) -> Self {
        DispatchError::StoreUnavailable(e.to_string())
    }
}

/// Accepts messages and runs the device operations of the API.
pub struct Dispatcher {
    pub hub: Arc<Hub>,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    fanout: Fanout,
    /// Per app, in config order.
    limits: Box<[RateLimiter]>,
    queue_cap: usize,
    max_pending: u64,
    /// After a hand-over: topic and broadcast frames also go to the old
    /// process, for the devices it is still draining.
    relay: OnceLock<Relay>,
    /// The store's ack total when the acked counter was last brought up to
    /// it (a lock, so that two renders at once do not both add the gap).
    acked_seen: Mutex<u64>,
}

impl Dispatcher {
    pub fn new(
        hub: Arc<Hub>,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        fanout: Fanout,
        max_messages_per_sec: impl IntoIterator<Item = u64>,
        queue_cap: usize,
        max_pending: u64,
    ) -> Dispatcher {
        Dispatcher {
            hub,
            store,
            metrics,
            fanout,
            limits: max_messages_per_sec
                .into_iter()
                .map(RateLimiter::new)
                .collect(),
            queue_cap,
            max_pending,
            relay: OnceLock::new(),
            acked_seen: Mutex::new(0),
        }
    }

    /// From now on, relay topic and broadcast frames to the process this
    /// one took over from (set once, after the hand-over).
    pub fn set_relay(&self, relay: Relay) {
        let _ = self.relay.set(relay);
    }

    /// A frame relayed by the process that took over from this one: fan it
    /// out to this process's devices (they are draining and miss it
    /// otherwise). Not counted as accepted: the other process did that.
    pub fn fan_out_relayed(&self, relayed: Relayed) {
        let Some(app) = (0..self.hub.app_count()).find(|&a| **self.hub.app_id(a) == *relayed.app)
        else {
            return; // an app the new config added
        };
        let (target, kind) = match relayed.target {
            RelayTarget::Broadcast => (FanoutTarget::Broadcast, MsgKind::Broadcast),
            RelayTarget::Topic(t) => (FanoutTarget::Topic(t), MsgKind::Topic),
        };
        let frame = Arc::new(Frame {
            text: relayed.frame,
            kind,
            accepted: Instant::now(),
            check_dropped: false,
        });
        // A full queue drops it: these devices are leaving anyway.
        let _ = self.fanout.try_send(FanoutJob { app, target, frame });
    }

    /// Take one message's worth of the app's rate limit (dry runs do not).
    pub fn take_rate(&self, app: usize) -> Result<(), DispatchError> {
        self.fanout.touch(app);
        self.limits[app]
            .try_take()
            .map_err(|wait| DispatchError::RateLimited {
                retry_after_secs: retry_after_secs(wait),
            })
    }

    /// Count what `accept` would do, without storing or sending anything.
    pub fn dry_run(&self, app: usize, msg: &Outgoing) -> Accepted {
        let id = new_message_id();
        let (online, stored) = match &msg.target {
            Target::Device(d) => self.count_devices(app, std::slice::from_ref(d), msg.ttl_secs),
            Target::Devices(ds) => self.count_devices(app, ds, msg.ttl_secs),
            Target::Topic(t) => (self.hub.topic_count(app, t), 0),
            Target::Broadcast => (self.hub.connected(app), 0),
        };
        Accepted { id, online, stored }
    }

    fn count_devices(&self, app: usize, devices: &[String], ttl: u64) -> (u64, u64) {
        let online = devices
            .iter()
            .filter(|d| self.hub.get(app, d).is_some())
            .count() as u64;
        let stored = if ttl > 0 { devices.len() as u64 } else { 0 };
        (online, stored)
    }

    /// Accept a message (the rate limit is the caller's: see `take_rate`).
    pub async fn accept(&self, app: usize, msg: Outgoing) -> Result<Accepted, DispatchError> {
        let accepted = Instant::now();
        let id = new_message_id();
        let result = match &msg.target {
            Target::Device(d) => {
                self.accept_devices(app, &id, std::slice::from_ref(d), &msg, accepted)
                    .await?
            }
            Target::Devices(ds) => self.accept_devices(app, &id, ds, &msg, accepted).await?,
            Target::Topic(topic) => self.queue_fan_out(
                app,
                &id,
                &msg.data,
                FanoutTarget::Topic(Arc::from(topic.as_str())),
                accepted,
            )?,
            Target::Broadcast => {
                self.queue_fan_out(app, &id, &msg.data, FanoutTarget::Broadcast, accepted)?
            }
        };
        Ok(Accepted {
            id,
            online: result.0,
            stored: result.1,
        })
    }

    /// Encode a topic or broadcast message once and queue it for fan-out.
    /// Returns (online, stored): the targets on this node now, and 0.
    fn queue_fan_out(
        &self,
        app: usize,
        id: &str,
        data: &str,
        target: FanoutTarget,
        accepted: Instant,
    ) -> Result<(u64, u64), DispatchError> {
        let (wire, kind, online) = match &target {
            FanoutTarget::Topic(t) => (
                MsgTarget::Topic(t),
                MsgKind::Topic,
                self.hub.topic_count(app, t),
            ),
            FanoutTarget::Broadcast => (
                MsgTarget::Broadcast,
                MsgKind::Broadcast,
                self.hub.connected(app),
            ),
        };
        let frame = fanout::encode(id, wire, data, kind, accepted, false);
        let relayed = self.relay.get().map(|relay| {
            let target = match &target {
                FanoutTarget::Broadcast => RelayTarget::Broadcast,
                FanoutTarget::Topic(t) => RelayTarget::Topic(t.clone()),
            };
            (relay, target, frame.text.clone())
        });
        self.fanout
            .try_send(FanoutJob { app, target, frame })
            .map_err(|_| DispatchError::QueueFull)?;
        if let Some((relay, target, frame)) = relayed {
            relay.send(Relayed {
                app: self.hub.app_id(app).clone(),
                target,
                frame,
            });
        }
        self.metrics.accepted(kind).inc();
        Ok((online, 0))
    }

    async fn accept_devices(
        &self,
        app: usize,
        id: &str,
        devices: &[String],
        msg: &Outgoing,
        accepted: Instant,
    ) -> Result<(u64, u64), DispatchError> {
        let mut online = 0;
        if msg.ttl_secs == 0 {
            // Now or never: no seq, never stored.
            let frame = fanout::encode(
                id,
                MsgTarget::DeviceNow,
                &msg.data,
                MsgKind::Device,
                accepted,
                false,
            );
            let out = Out { frame, seq: 0 };
            for d in devices {
                if let Some(conn) = self.hub.get(app, d) {
                    online += fanout::hand_out(&[conn], &out, self.queue_cap, &self.metrics);
                }
            }
            self.metrics.accepted(MsgKind::Device).inc();
            return Ok((online, 0));
        }

        let new = stored_message(id, msg, now_ms());
        let app_id = self.hub.app_id(app).clone();
        let refs: Vec<&str> = devices.iter().map(String::as_str).collect();
        let outcomes = self
            .store
            .append(&app_id, &refs, &new, self.max_pending)
            .await?;
        Ok(self.hand_stored(app, id, devices, msg, accepted, &outcomes))
    }

    /// After a stored message's commit: count it and hand it to whichever
    /// of its devices are connected. Returns (online, stored).
    fn hand_stored(
        &self,
        app: usize,
        id: &str,
        devices: &[String],
        msg: &Outgoing,
        accepted: Instant,
        outcomes: &[AppendOutcome],
    ) -> (u64, u64) {
        let mut online = 0;
        self.metrics.accepted(MsgKind::Device).inc();
        for (d, outcome) in devices.iter().zip(outcomes) {
            if outcome.dropped > 0 {
                self.metrics
                    .dropped(DropReason::PendingLimit)
                    .inc_by(outcome.dropped);
            }
            if outcome.collapsed > 0 {
                self.metrics
                    .dropped(DropReason::Collapsed)
                    .inc_by(outcome.collapsed);
            }
            let Some(conn) = self.hub.get(app, d) else {
                continue;
            };
            let frame = fanout::encode(
                id,
                MsgTarget::Device { seq: outcome.seq },
                &msg.data,
                MsgKind::Device,
                accepted,
                outcome.dropped > 0,
            );
            // A full queue closes the connection as a slow consumer; the
            // message stays pending and is redelivered on reconnect.
            match conn.push(
                Out {
                    frame,
                    seq: outcome.seq,
                },
                self.queue_cap,
            ) {
                Pushed::Queued => online += 1,
                Pushed::Full | Pushed::Closed => {}
            }
        }
        (online, outcomes.len() as u64)
    }

    /// Accept the messages of one batch request, results in order (the
    /// rate limit is the caller's). The stored device-directed ones go to
    /// the store together (`Store::append_many`), so they share commits
    /// instead of each waiting for the one before; messages to the same
    /// device still get their seqs in request order. The others are
    /// accepted one by one after them.
    pub async fn accept_many(
        &self,
        app: usize,
        msgs: Vec<Outgoing>,
    ) -> Vec<Result<Accepted, DispatchError>> {
        let accepted = Instant::now();
        let now = now_ms();
        let mut ids: Vec<Option<String>> = Vec::with_capacity(msgs.len());
        let mut items: Vec<(Vec<&str>, NewMessage)> = Vec::new();
        for msg in &msgs {
            let devices = stored_devices(msg);
            if devices.is_empty() {
                ids.push(None);
                continue;
            }
            let id = new_message_id();
            items.push((
                devices.iter().map(String::as_str).collect(),
                stored_message(&id, msg, now),
            ));
            ids.push(Some(id));
        }
        let app_id = self.hub.app_id(app).clone();
        let mut outcomes = self
            .store
            .append_many(&app_id, &items, self.max_pending)
            .await
            .into_iter();
        drop(items);
        let mut results = Vec::with_capacity(msgs.len());
        for (msg, id) in msgs.into_iter().zip(ids) {
            let result = match id {
                None => self.accept(app, msg).await,
                Some(id) => match outcomes.next() {
                    Some(Ok(outcomes)) => {
                        let devices = stored_devices(&msg);
                        let (online, stored) =
                            self.hand_stored(app, &id, devices, &msg, accepted, &outcomes);
                        Ok(Accepted { id, online, stored })
                    }
                    Some(Err(e)) => Err(e.into()),
                    None => Err(DispatchError::StoreUnavailable(
                        "the store answered fewer messages than it was given".into(),
                    )),
                },
            };
            results.push(result);
        }
        results
    }

    /// `GET /devices/{device}`: the registry entry, whether it is connected
    /// here, and its topics. `None`: never seen and nothing pending.
    pub async fn device_info(
        &self,
        app: usize,
        device: &str,
    ) -> Result<Option<DeviceInfo>, DispatchError> {
        let app_id = self.hub.app_id(app).clone();
        let record = self.store.device(&app_id, device, now_ms()).await?;
        let conn = self.hub.get(app, device);
        let Some(record) = record else {
            return Ok(None);
        };
        let topics = conn.as_ref().map(|c| c.topics()).unwrap_or_default();
        Ok(Some(DeviceInfo {
            online: conn.is_some(),
            record,
            topics,
        }))
    }

    /// `DELETE …/connection`: `bye kicked`. False when not connected.
    pub fn kick(&self, app: usize, device: &str) -> bool {
        match self.hub.get(app, device) {
            Some(conn) => {
                conn.close(CloseReason::Kicked, 0);
                true
            }
            None => false,
        }
    }

    /// `DELETE …/messages`: drop every pending message of the device.
    pub async fn purge(&self, app: usize, device: &str) -> Result<u64, DispatchError> {
        let app_id = self.hub.app_id(app).clone();
        Ok(self.store.purge(&app_id, device).await?)
    }

    /// Refresh gauges that are read from elsewhere, then render metrics.
    pub fn render_metrics(&self) -> String {
        self.metrics.pending.set(self.store.pending_total() as i64);
        {
            // Acks are counted by the store (connection tasks do not wait
            // for them): carry its total over to the counter.
            let mut seen = self
                .acked_seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let total = self.store.acked_total();
            self.metrics.acked.inc_by(total.saturating_sub(*seen));
            *seen = (*seen).max(total);
        }
        self.metrics.render()
    }
}

/// A device as `GET /devices/{device}` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub online: bool,
    pub record: DeviceRecord,
    pub topics: Vec<String>,
}

/// The devices a message is stored for: its device targets when ttl > 0.
fn stored_devices(msg: &Outgoing) -> &[String] {
    match &msg.target {
        _ if msg.ttl_secs == 0 => &[],
        Target::Device(d) => std::slice::from_ref(d),
        Target::Devices(ds) => ds,
        Target::Topic(_) | Target::Broadcast => &[],
    }
}

/// What the store keeps of a device-directed message accepted at `now` (unix ms).
fn stored_message(id: &str, msg: &Outgoing, now: u64) -> NewMessage {
    NewMessage {
        id: Arc::from(id),
        data: Bytes::from(msg.data.clone()),
        created_ms: now,
        expires_ms: now.saturating_add(msg.ttl_secs.saturating_mul(1000)),
        collapse_key: msg.collapse_key.as_deref().map(Arc::from),
    }
}
