//! Who is connected and who is subscribed to what: per app, device → the
//! connection's handle, and topic → subscribers. Sharded maps (dashmap); the
//! hub never blocks on a socket: handing a frame to a connection is a push
//! onto its bounded outbound queue, and a full queue marks the connection
//! for a `slow_consumer` close instead of buffering without bound.

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::protocol::CloseReason;

/// Which kind of `msg` a frame is (the `kind` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgKind {
    Device,
    Topic,
    Broadcast,
}

impl MsgKind {
    pub const ALL: [MsgKind; 3] = [MsgKind::Device, MsgKind::Topic, MsgKind::Broadcast];

    pub fn as_str(self) -> &'static str {
        match self {
            MsgKind::Device => "device",
            MsgKind::Topic => "topic",
            MsgKind::Broadcast => "broadcast",
        }
    }
}

/// A `msg` frame encoded once and shared by every connection it goes to.
#[derive(Debug)]
pub struct Frame {
    /// The wire text.
    pub text: Utf8Bytes,
    pub kind: MsgKind,
    /// When the API accepted the message (for `pushgate_delivery_seconds`).
    pub accepted: Instant,
    /// Storing it discarded older messages of this device (pending limit):
    /// the connection asks the store how many and sends `dropped` first.
    pub check_dropped: bool,
}

/// One item of a connection's outbound queue: 16 bytes, so a queue of 64
/// costs 1 KiB only while it is full, and nothing at rest.
#[derive(Debug, Clone)]
pub struct Out {
    pub frame: Arc<Frame>,
    /// The device-directed seq, 0 for frames without one.
    pub seq: u64,
}

/// What became of a push onto a connection's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The queue was full: the connection is now closing as a slow consumer.
    Full,
    /// The connection is already closing.
    Closed,
}

/// Kept small (48 bytes): every connection's `Conn` holds one for its whole
/// life, so `Vec` rather than `VecDeque` (only pushed to, then taken
/// whole), a boxed slice for the rarely changed topics, and `retry_ms`
/// (at most 5000) in 32 bits.
#[derive(Debug, Default)]
struct OutState {
    queue: Vec<Out>,
    close: Option<(CloseReason, u32)>,
    /// The connection's subscriptions (they belong to the connection).
    topics: Box<[Arc<str>]>,
}

/// The hub's handle on one connection: its identity and its bounded
/// outbound queue. Cheap to clone; the connection task holds one too.
#[derive(Debug)]
pub struct Conn {
    pub id: u64,
    pub app: usize,
    pub device: Arc<str>,
    state: Mutex<OutState>,
    notify: Notify,
}

/// A shared handle.
pub type ConnHandle = Arc<Conn>;

impl Conn {
    pub fn new(id: u64, app: usize, device: Arc<str>) -> ConnHandle {
        Arc::new(Conn {
            id,
            app,
            device,
            state: Mutex::new(OutState::default()),
            notify: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, OutState> {
        // A panic while holding this lock leaves a queue of frames, which is
        // still consistent: keep going rather than poison every later push.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hand a frame to the connection; `cap` is the queue bound.
    pub fn push(&self, out: Out, cap: usize) -> Pushed {
        let mut st = self.lock();
        if st.close.is_some() {
            return Pushed::Closed;
        }
        if st.queue.len() >= cap {
            st.close = Some((CloseReason::SlowConsumer, 0));
            drop(st);
            self.notify.notify_one();
            return Pushed::Full;
        }
        st.queue.push(out);
        drop(st);
        self.notify.notify_one();
        Pushed::Queued
    }

    /// Ask the connection to close with `reason` (the first reason wins).
    /// `retry_ms` goes into the `bye` where the reason carries one.
    pub fn close(&self, reason: CloseReason, retry_ms: u64) {
        let mut st = self.lock();
        if st.close.is_none() {
            st.close = Some((reason, u32::try_from(retry_ms).unwrap_or(u32::MAX)));
        }
        drop(st);
        self.notify.notify_one();
    }

    /// Is a close requested?
    pub fn closing(&self) -> Option<CloseReason> {
        self.lock().close.map(|(r, _)| r)
    }

    /// Wait until something was pushed or a close was requested. Only the
    /// connection task waits here.
    pub async fn wait(&self) {
        self.notify.notified().await;
    }

    /// The connection's topics, for `GET /devices/{device}`.
    pub fn topics(&self) -> Vec<String> {
        self.lock().topics.iter().map(|t| t.to_string()).collect()
    }

    /// How many topics the connection is subscribed to.
    pub fn topic_len(&self) -> usize {
        self.lock().topics.len()
    }

    /// Resolves once a close is requested. It takes wake-ups meant for the
    /// queue too: call [`Conn::rearm`] after racing it against a write.
    pub async fn closed(&self) {
        while self.closing().is_none() {
            self.notify.notified().await;
        }
    }

    /// Wake the connection task again if work is waiting for it.
    pub fn rearm(&self) {
        let st = self.lock();
        if !st.queue.is_empty() || st.close.is_some() {
            drop(st);
            self.notify.notify_one();
        }
    }

    /// Take everything queued and the close request, if any. The queue's
    /// buffer moves out with it, so an idle connection holds none.
    pub fn take(&self) -> (Vec<Out>, Option<(CloseReason, u64)>) {
        let mut st = self.lock();
        let close = st.close.map(|(r, ms)| (r, u64::from(ms)));
        (std::mem::take(&mut st.queue), close)
    }
}

/// Why a connection was not registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterError {
    /// The app's `max_connections` is reached.
    TooManyConnections,
}

/// A registered connection as the key of its app's device map, hashed and
/// compared by its device id: the map holds one pointer per device, where a
/// (device id, handle) entry took 24 bytes in every bucket.
#[derive(Debug, Clone)]
struct ByDevice(ConnHandle);

impl Hash for ByDevice {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As `str` hashes: lookups by `&str` go through `Borrow<str>`.
        (*self.0.device).hash(state)
    }
}

impl PartialEq for ByDevice {
    fn eq(&self, other: &Self) -> bool {
        self.0.device == other.0.device
    }
}

impl Eq for ByDevice {}

impl Borrow<str> for ByDevice {
    fn borrow(&self) -> &str {
        &self.0.device
    }
}

/// One app's share of the hub.
#[derive(Debug)]
pub struct AppHub {
    pub id: Arc<str>,
    max_connections: u64,
    devices: DashMap<ByDevice, ()>,
    topics: DashMap<Arc<str>, Vec<ConnHandle>>,
    /// Registered devices (admission counts these).
    registered: AtomicU64,
}

/// The registry of connections and topic subscriptions of every app.
#[derive(Debug)]
pub struct Hub {
    apps: Box<[AppHub]>,
    next_id: AtomicU64,
    /// Open connections over all apps (registered or not yet unregistered).
    live: AtomicUsize,
}

impl Hub {
    /// `apps`: (app id, max_connections) in config order; the index is the
    /// app number used everywhere else.
    pub fn new(apps: impl IntoIterator<Item = (String, u64)>) -> Hub {
        let apps = apps
            .into_iter()
            .map(|(id, max)| AppHub {
                id: Arc::from(id),
                max_connections: max,
                devices: DashMap::new(),
                topics: DashMap::new(),
                registered: AtomicU64::new(0),
            })
            .collect();
        Hub {
            apps,
            next_id: AtomicU64::new(1),
            live: AtomicUsize::new(0),
        }
    }

    /// The app's id string.
    pub fn app_id(&self, app: usize) -> &Arc<str> {
        &self.apps[app].id
    }

    /// How many apps.
    pub fn app_count(&self) -> usize {
        self.apps.len()
    }

    /// A new connection id, unique in this process.
    pub fn next_conn_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Register a connection for its (app, device). A connection that
    /// replaces the same device's is always admitted; the one it replaces
    /// is returned, already asked to close with `replaced`.
    pub fn register(&self, conn: &ConnHandle) -> Result<Option<ConnHandle>, RegisterError> {
        let app = &self.apps[conn.app];
        let old = match app.devices.entry(ByDevice(conn.clone())) {
            // The entry's key becomes the new connection.
            Entry::Occupied(e) => Some(e.replace_entry(()).0 .0),
            Entry::Vacant(e) => {
                if app.registered.fetch_add(1, Ordering::AcqRel) >= app.max_connections {
                    app.registered.fetch_sub(1, Ordering::AcqRel);
                    return Err(RegisterError::TooManyConnections);
                }
                e.insert(());
                None
            }
        };
        self.live.fetch_add(1, Ordering::Relaxed);
        if let Some(old) = &old {
            old.close(CloseReason::Replaced, 0);
        }
        Ok(old)
    }

    /// Remove a connection (only if it is still the registered one for its
    /// device) and all its subscriptions.
    pub fn unregister(&self, conn: &ConnHandle) {
        let app = &self.apps[conn.app];
        if app
            .devices
            .remove_if(&*conn.device, |cur, _| cur.0.id == conn.id)
            .is_some()
        {
            app.registered.fetch_sub(1, Ordering::AcqRel);
        }
        let topics = std::mem::take(&mut conn.lock().topics);
        for t in topics.iter() {
            self.remove_subscriber(conn, t);
        }
        self.live.fetch_sub(1, Ordering::Relaxed);
    }

    /// The connection of a device, if connected here.
    pub fn get(&self, app: usize, device: &str) -> Option<ConnHandle> {
        self.apps[app]
            .devices
            .get(device)
            .map(|e| e.key().0.clone())
    }

    /// Connected devices of an app.
    pub fn connected(&self, app: usize) -> u64 {
        self.apps[app].registered.load(Ordering::Acquire)
    }

    /// Open connections over all apps.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Subscribe a connection to a topic. Idempotent; false (and nothing
    /// done) when it would exceed `max_topics` subscriptions.
    pub fn subscribe(&self, conn: &ConnHandle, topic: &str, max_topics: usize) -> bool {
        let topic: Arc<str> = {
            let mut st = conn.lock();
            if st.topics.iter().any(|t| &**t == topic) {
                return true;
            }
            if st.topics.len() >= max_topics {
                return false;
            }
            let t: Arc<str> = Arc::from(topic);
            let mut topics = std::mem::take(&mut st.topics).into_vec();
            topics.push(t.clone());
            st.topics = topics.into_boxed_slice();
            t
        };
        let mut subs = self.apps[conn.app].topics.entry(topic).or_default();
        if !subs.iter().any(|c| c.id == conn.id) {
            subs.push(conn.clone());
        }
        true
    }

    /// Unsubscribe a connection from a topic (idempotent).
    pub fn unsubscribe(&self, conn: &ConnHandle, topic: &str) {
        {
            let mut st = conn.lock();
            if let Some(i) = st.topics.iter().position(|t| &**t == topic) {
                let mut topics = std::mem::take(&mut st.topics).into_vec();
                topics.swap_remove(i);
                st.topics = topics.into_boxed_slice();
            }
        }
        self.remove_subscriber(conn, topic);
    }

    fn remove_subscriber(&self, conn: &ConnHandle, topic: &str) {
        let topics = &self.apps[conn.app].topics;
        if let Some(mut subs) = topics.get_mut(topic) {
            if let Some(i) = subs.iter().position(|c| c.id == conn.id) {
                subs.swap_remove(i);
            }
        }
        topics.remove_if(topic, |_, subs| subs.is_empty());
    }

    /// Subscribers of a topic now.
    pub fn topic_count(&self, app: usize, topic: &str) -> u64 {
        self.apps[app]
            .topics
            .get(topic)
            .map_or(0, |s| s.len() as u64)
    }

    /// The connections subscribed to a topic, snapshotted so no map lock is
    /// held while frames are pushed.
    pub fn topic_targets(&self, app: usize, topic: &str) -> Vec<ConnHandle> {
        self.apps[app]
            .topics
            .get(topic)
            .map_or_else(Vec::new, |s| s.clone())
    }

    /// Every registered connection of an app, snapshotted.
    pub fn app_targets(&self, app: usize) -> Vec<ConnHandle> {
        let devices = &self.apps[app].devices;
        let mut out = Vec::with_capacity(devices.len());
        out.extend(devices.iter().map(|e| e.key().0.clone()));
        out
    }

    /// Every registered connection of every app (drain).
    pub fn all_targets(&self) -> Vec<ConnHandle> {
        let mut out = Vec::with_capacity(self.live());
        for app in 0..self.apps.len() {
            out.extend(self.apps[app].devices.iter().map(|e| e.key().0.clone()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame() -> Arc<Frame> {
        Arc::new(Frame {
            text: Utf8Bytes::from_static("{}"),
            kind: MsgKind::Broadcast,
            accepted: Instant::now(),
            check_dropped: false,
        })
    }

    #[test]
    fn replace_and_limits() {
        let hub = Hub::new([("a".to_string(), 2)]);
        let c1 = Conn::new(hub.next_conn_id(), 0, "d1".into());
        let c2 = Conn::new(hub.next_conn_id(), 0, "d2".into());
        let c3 = Conn::new(hub.next_conn_id(), 0, "d3".into());
        let c1b = Conn::new(hub.next_conn_id(), 0, "d1".into());
        assert!(hub.register(&c1).unwrap().is_none());
        assert!(hub.register(&c2).unwrap().is_none());
        assert!(matches!(
            hub.register(&c3),
            Err(RegisterError::TooManyConnections)
        ));
        // Replacing is always admitted, and the old one is told.
        let old = hub.register(&c1b).unwrap().unwrap();
        assert_eq!(old.id, c1.id);
        assert_eq!(c1.closing(), Some(CloseReason::Replaced));
        assert_eq!(hub.connected(0), 2);
        // The replaced connection leaving does not remove its successor.
        hub.unregister(&c1);
        assert_eq!(hub.get(0, "d1").unwrap().id, c1b.id);
        assert_eq!(hub.connected(0), 2);
        hub.unregister(&c1b);
        assert!(hub.get(0, "d1").is_none());
        assert_eq!(hub.connected(0), 1);
        assert!(hub.register(&c3).unwrap().is_none());
    }

    #[test]
    fn topics() {
        let hub = Hub::new([("a".to_string(), 10)]);
        let c1 = Conn::new(1, 0, "d1".into());
        let c2 = Conn::new(2, 0, "d2".into());
        assert!(hub.subscribe(&c1, "news", 2));
        assert!(hub.subscribe(&c1, "news", 2));
        assert!(hub.subscribe(&c1, "sport", 2));
        assert!(!hub.subscribe(&c1, "weather", 2));
        assert!(hub.subscribe(&c2, "news", 2));
        assert_eq!(hub.topic_count(0, "news"), 2);
        assert_eq!(c1.topics(), vec!["news".to_string(), "sport".to_string()]);
        hub.unsubscribe(&c1, "news");
        assert_eq!(hub.topic_targets(0, "news")[0].id, 2);
        assert_eq!(c1.topic_len(), 1);
        hub.register(&c2).unwrap();
        hub.unregister(&c2);
        assert_eq!(hub.topic_count(0, "news"), 0);
        assert_eq!(hub.topic_count(0, "sport"), 1);
    }

    #[test]
    fn queue_bound_marks_slow_consumer() {
        let c = Conn::new(1, 0, "d".into());
        for _ in 0..3 {
            assert_eq!(
                c.push(
                    Out {
                        frame: frame(),
                        seq: 0
                    },
                    3
                ),
                Pushed::Queued
            );
        }
        assert_eq!(
            c.push(
                Out {
                    frame: frame(),
                    seq: 0
                },
                3
            ),
            Pushed::Full
        );
        assert_eq!(c.closing(), Some(CloseReason::SlowConsumer));
        assert_eq!(
            c.push(
                Out {
                    frame: frame(),
                    seq: 0
                },
                3
            ),
            Pushed::Closed
        );
        let (q, close) = c.take();
        assert_eq!(q.len(), 3);
        assert_eq!(close.map(|c| c.0), Some(CloseReason::SlowConsumer));
        // The first close reason wins.
        c.close(CloseReason::Kicked, 0);
        assert_eq!(c.closing(), Some(CloseReason::SlowConsumer));
    }

    #[test]
    fn out_item_is_small() {
        assert_eq!(std::mem::size_of::<Out>(), 16);
    }

    /// Every connection holds a `Conn` (in an `Arc`) for its whole life: at
    /// 120 bytes (136 with the counts) glibc gives it a 144-byte chunk; 8
    /// bytes more and it takes 160.
    #[test]
    fn conn_is_small() {
        let size = std::mem::size_of::<Conn>();
        assert!(size <= 120, "Conn is {size} bytes");
    }
}
