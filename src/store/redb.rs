//! Durable [`Store`] on redb: one database file in the data directory and one
//! writer thread that group-commits, so that many concurrent appends share
//! one fsync. Reads run inline: they take the in-memory index's lock for
//! as long as it takes to copy a device's keys (the writer holds it while
//! it applies a batch, not while it commits), then read rows in their own
//! read transaction (MVCC: never waiting for the writer).
//!
//! The file is a log in arrival order plus a row per device:
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | name | u64 (`schema`: the layout version, 3) |
//! | `log` | arrival number | (app, device, seq, id, data, created_ms, expires_ms, collapse_key) |
//! | `devices_v3` | (app, device) | (next_seq, dropped, sessions, first_seen_ms, last_seen_ms, acked) |
//!
//! Every stored (message, device) pair is one `log` row, appended at the
//! end: a commit of hundreds of messages writes a few contiguous pages.
//! Keyed by (app, device, seq), as schema 2 did, each message dirtied its
//! own 4 KiB leaf: 4–9 KB written per ~150-byte message and one writer
//! thread saturated at ~43k msgs/s (BENCHMARKS.md, issue 5). A purge,
//! collapse or the pending limit deletes the rows it removes where they
//! are. An ack only marks its messages removed in memory and moves the
//! device row's ack cursor (`acked`: every seq up to it is acked, and the
//! log rows under it are skipped when the file is opened); expiry only
//! marks them (and notes in `meta` when the sweep ran and how far the log
//! went: those rows are skipped too).
//! Those rows are deleted later, lowest key first so that many share a
//! page: in the writer's idle time, one per message a transaction stores,
//! and in every transaction once more than `DEAD_HOLD` wait. Deleting each
//! where it lay cost a random page per ack when a backlog was redelivered
//! (a device's messages are far apart in the log), and an expiry sweep of
//! 200k messages took 330 ms instead of 46 ms, every API call waiting
//! behind it.
//!
//! What finds a device's messages is the in-memory [`index`]: per device its
//! seq counter and the log keys of its messages in seq order, plus the
//! expiry buckets (per device and minute, not per message). It is rebuilt
//! by one pass over the log when the file is opened. Readers see only what
//! is committed (see the index's module doc).
//!
//! A device row is written only when something it holds must survive a
//! restart and the log cannot tell: the dropped count, the session fields,
//! the ack cursor, and `next_seq` once a removal took the device's newest
//! message (seqs are
//! recovered as the greater of the row's `next_seq` and the newest logged
//! seq + 1, so a plain append writes no row). A device with nothing stored
//! and its row up to date leaves memory; its row brings it back.
//!
//! Older files are migrated when opened, in the one transaction that then
//! records schema 3: schema 1 (tables `devices` and `expiry`) to 2, and
//! schema 2 (`pending`, `devices_v2`, `expiry_buckets`, `collapse`) to the
//! log, each device's rows in seq order. A file of a later schema is
//! refused as corrupt.
//!
//! Group commit: every write goes to the writer thread over a channel with a
//! oneshot for the answer. The writer takes the first queued request, then
//! whatever else is queued (waiting up to `commit_max_wait_us` for more while
//! the batch holds a request that must be durable), up to
//! `commit_max_batch`, applies them in order in one write transaction and
//! commits once; only then does anyone get an answer. If anything fails the
//! transaction is aborted and everyone in the batch gets
//! [`StoreError::Unavailable`]. Appends, purges and flushes need a durable
//! commit (fsync); a batch of only acks, sessions, `take_dropped` and
//! `expire` commits without fsync (redb `Durability::None`: visible at once,
//! made durable by the next durable commit, which the writer forces within
//! half a second when idle, and by closing the store).
//!
//! Acks from connections (`ack_queued`) are not requests: they go into a map
//! of the highest seq per device, and every transaction takes its share of
//! the map first (bounded: `ACK_BUDGET` plus two per message it stores; the
//! rest stays queued and the writer goes on at once). Only the first ack into
//! an empty map sends the writer a wake-up, and a transaction of acks alone
//! waits up to `ACK_DELAY` for a request to share it with. A batch call
//! (`append_many`) is one request, weighing one per message against
//! `commit_max_batch`.
//!
//! After a failed write redb refuses every write until the file is reopened;
//! the writer reopens it (and rebuilds the index from it) before the next
//! batch, at most once a second, so a passing fault such as a full disk
//! heals without restarting the gateway. Until then every write answers
//! [`StoreError::Unavailable`].
//!
//! Rules the trait leaves open are decided as in `memory` (see its module doc).

mod index;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, StorageError, Table,
    TableDefinition, WriteTransaction,
};
use tokio::sync::oneshot;

use self::index::{
    leave_bucket, note_deadline, prune_buckets, Dev, DevId, DeviceRow, Index, BUCKET_MS,
};
use super::{
    AppendOutcome, DeviceRecord, ExpireOutcome, NewMessage, Store, StoreError, StoredMessage,
};

/// Name of the database file inside the store directory.
pub const DB_FILE: &str = "pushgate.redb";

/// Least time between two attempts to reopen the file after a failed write.
const REOPEN_INTERVAL: Duration = Duration::from_secs(1);

/// Version of the table layout. Files of versions 1 and 2 are migrated;
/// any other is refused as corrupt.
const SCHEMA: u64 = 3;

/// How long non-durable commits (acks, sessions) may wait for an fsync when
/// the writer has nothing else to do.
const IDLE_SYNC: Duration = Duration::from_millis(500);

/// How long queued acks wait for another request to share its transaction
/// before they get one of their own. Nobody waits on them, and under load
/// a message commit comes long before: acks then cost no commit at all.
const ACK_DELAY: Duration = Duration::from_millis(20);

/// Work queued acks may add to one transaction (messages removed plus
/// devices looked at), on top of twice the messages the transaction stores;
/// the rest waits for the next. Without a bound, 10k devices acking a
/// redelivered backlog at once made one transaction of a million removals,
/// and every API call behind it waited seconds. The share per stored
/// message lets acks keep pace with appends under steady load (a fixed
/// budget let pending grow to the pending limit, whose drops made every
/// append dearer: 20k -> 15k msgs/s).
const ACK_BUDGET: u64 = 1024;

/// Acked and expired rows left in the log before every transaction
/// deletes those over this many. Acks of a redelivered backlog land all
/// over the log (a device's 100 messages are 100 rows far apart), and
/// deleting each as it came cost a page per ack: twice the gateway's CPU
/// per redelivered message, and live pushes stalled behind those commits.
/// Held back (the device row's ack cursor, or the sweep's mark, keeps them
/// from coming back after a restart), they are deleted lowest key first,
/// many to a page: a chunk when the writer is idle, one per message a
/// transaction stores, and, once more than this many wait, those over it
/// (a chunk at most) in every transaction. The hold is as large as a
/// storm's acks: with 2^19, the million acks of 10k devices redelivering
/// 100 each went over it halfway, and the chunks deleted in every
/// transaction from then on took the live pushes' p99 from 9 to 40–48 ms
/// (BENCHMARKS.md). Each waiting key costs ~0.3 B of memory when they are
/// dense in the log (as a backlog's are), ~35 B when far apart (~140 MB
/// at the hold, if every one is in a word of its own), and its row's
/// space on disk.
const DEAD_HOLD: usize = 1 << 22;

/// Acked rows deleted per transaction at most: at a random page each
/// (the worst case), ~5 ms of a request's wait.
const DEAD_CHUNK: usize = 1024;

/// How long the writer waits for a request before it deletes acked rows.
const DEAD_IDLE: Duration = Duration::from_millis(10);

type DeviceKey = (&'static str, &'static str);
/// (app, device, seq, id, data, created_ms, expires_ms, collapse_key)
type LogValue = (
    &'static str,
    &'static str,
    u64,
    &'static str,
    &'static [u8],
    u64,
    u64,
    Option<&'static str>,
);

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// `meta` keys: the `now_ms` of the last committed expiry sweep, and the
/// log key of the first row appended after it. Every row under that key
/// whose deadline is before that time was expired, so if still in the log
/// it is skipped when the file is opened (and the pending count is right).
/// Absent: 0.
const SWEPT_AT: &str = "swept_at_ms";
const SWEPT_BELOW: &str = "swept_below_key";

/// The last sweep's mark, `(swept_at_ms, swept_below_key)`, from `meta`.
fn read_swept(meta: &impl ReadableTable<&'static str, u64>) -> Result<(u64, u64), redb::Error> {
    let get = |k| meta.get(k).map(|v| v.map_or(0, |v| v.value()));
    Ok((get(SWEPT_AT)?, get(SWEPT_BELOW)?))
}

/// Writes the sweep's mark to `meta`.
fn write_swept(txn: &WriteTransaction, (at, below): (u64, u64)) -> Result<(), redb::Error> {
    let mut meta = txn.open_table(META)?;
    meta.insert(SWEPT_AT, at)?;
    meta.insert(SWEPT_BELOW, below)?;
    Ok(())
}
const LOG: TableDefinition<u64, LogValue> = TableDefinition::new("log");
const DEVICES: TableDefinition<DeviceKey, DeviceRow> = TableDefinition::new("devices_v3");

/// Schema 2's device rows: (next_seq, dropped, stored, sessions,
/// first_seen_ms, last_seen_ms, bucket, bucket_min_ms).
type DeviceRowV2 = (u64, u64, u64, u64, u64, u64, u64, u64);
const DEVICES_V2: TableDefinition<DeviceKey, DeviceRowV2> = TableDefinition::new("devices_v2");
/// Schema 2's (and 1's) message rows: (app, device, seq) -> (id, data,
/// created_ms, expires_ms, collapse_key).
type PendingKeyV2 = (&'static str, &'static str, u64);
type PendingValueV2 = (&'static str, &'static [u8], u64, u64, Option<&'static str>);
const PENDING_V2: TableDefinition<PendingKeyV2, PendingValueV2> = TableDefinition::new("pending");
/// Schema 2's expiry buckets: (minute, app, device) -> earliest deadline.
const BUCKETS_V2: TableDefinition<(u64, &str, &str), u64> = TableDefinition::new("expiry_buckets");
/// Schema 2's (and 1's) collapse index: (app, device, key) -> seq.
const COLLAPSE_V2: TableDefinition<(&str, &str, &str), u64> = TableDefinition::new("collapse");
/// Schema 1's device rows: (next_seq, dropped, stored, sessions,
/// first_seen_ms, last_seen_ms).
const DEVICES_V1: TableDefinition<DeviceKey, (u64, u64, u64, u64, u64, u64)> =
    TableDefinition::new("devices");
/// Schema 1's expiry index: (expires_ms, app, device, seq).
const EXPIRY_V1: TableDefinition<(u64, &str, &str, u64), ()> = TableDefinition::new("expiry");

/// The durable store. Dropping it stops the writer thread (after the batch
/// in progress) and closes the file.
pub struct RedbStore {
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

/// What the writer keeps and everyone reads.
struct Shared {
    /// The open database, for readers. `None` only while the writer reopens
    /// it after a failed write.
    db: RwLock<Option<Arc<Database>>>,
    /// Where each device's messages are, as committed (see [`index`]).
    index: Mutex<Index>,
    /// `log` rows, expired ones not yet removed included.
    pending_total: AtomicU64,
    /// Write transactions committed since open.
    commits: AtomicU64,
    /// The files were let go for a new process (hand-over restart).
    released: AtomicBool,
    /// Acks queued by `ack_queued`, highest seq per (app, device), taken
    /// whole by the writer at the start of each transaction.
    acks: Mutex<AckQueue>,
    /// Messages removed by acks since open.
    acked_total: AtomicU64,
    /// Wall time of each durable write transaction, from its first change
    /// to the end of its commit, fsync included.
    commit_seconds: prometheus::Histogram,
    /// (message, device) pairs stored per durable transaction that stores any.
    commit_messages: prometheus::Histogram,
}

/// The two commit histograms (unregistered: the gateway registers them).
fn commit_histograms() -> Result<(prometheus::Histogram, prometheus::Histogram), StoreError> {
    let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
        prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(name, help).buckets(buckets),
        )
        .map_err(|e| StoreError::Unavailable(format!("cannot create {name}: {e}")))
    };
    Ok((
        histogram(
            "pushgate_store_commit_seconds",
            "Wall time of one durable store write transaction (what an API call storing a message waits for): applying it and committing, fsync included.",
            vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5],
        )?,
        histogram(
            "pushgate_store_commit_messages",
            "Device-directed messages stored per durable store write transaction that stores any, one per target device (the group commit's size).",
            vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0],
        )?,
    ))
}

/// Highest queued ack per app, then device.
type AckQueue = HashMap<Box<str>, HashMap<Box<str>, u64>>;

struct Request {
    op: Op,
    /// `None` for a request nobody waits for (`Op::Acks`).
    reply: Option<oneshot::Sender<Result<Answer, StoreError>>>,
}

impl Request {
    fn answer(self, answer: Result<Answer, StoreError>) {
        if let Some(reply) = self.reply {
            let _ = reply.send(answer);
        }
    }
}

enum Op {
    Append {
        app: Box<str>,
        devices: Vec<Box<str>>,
        msg: NewMessage,
        max_pending: u64,
    },
    /// The messages of one `append_many`, in order: one request and one
    /// answer for the lot, not one per message.
    AppendMany {
        app: Box<str>,
        items: Vec<(Vec<Box<str>>, NewMessage)>,
        max_pending: u64,
    },
    Ack {
        app: Box<str>,
        device: Box<str>,
        seq: u64,
    },
    Purge {
        app: Box<str>,
        device: Box<str>,
    },
    TakeDropped {
        app: Box<str>,
        device: Box<str>,
    },
    RecordSession {
        app: Box<str>,
        device: Box<str>,
        now_ms: u64,
    },
    Expire {
        now_ms: u64,
    },
    Flush,
    /// Commit durably, then close the file (hand-over restart).
    Release,
    /// Open the file again after `Release`.
    Reacquire,
    /// Wakes the writer for the queued acks (sent when the queue stops
    /// being empty); every transaction takes the queue, this one included.
    Acks,
}

impl Op {
    /// Handled by the writer itself, alone, after the requests before it.
    fn is_control(&self) -> bool {
        matches!(self, Op::Release | Op::Reacquire)
    }

    /// Whether the caller may only hear back once the batch is fsynced.
    fn needs_durable(&self) -> bool {
        matches!(
            self,
            Op::Append { .. } | Op::AppendMany { .. } | Op::Purge { .. } | Op::Flush
        )
    }

    /// (message, device) pairs it stores.
    fn stores(&self) -> u64 {
        match self {
            Op::Append { devices, .. } => devices.len() as u64,
            Op::AppendMany { items, .. } => items.iter().map(|(d, _)| d.len() as u64).sum(),
            _ => 0,
        }
    }

    /// What it counts against `commit_max_batch`: one per message.
    fn weight(&self) -> usize {
        match self {
            Op::AppendMany { items, .. } => items.len().max(1),
            _ => 1,
        }
    }
}

enum Answer {
    Appended(Vec<AppendOutcome>),
    AppendedMany(Vec<Vec<AppendOutcome>>),
    Count(u64),
    Done,
}

/// redb's page cache when the config does not say: the log's interior
/// pages and the recent leaves fit many times over. redb's own default,
/// 1 GiB, let RSS grow by ~90 MB more during a 1M-message redelivery for
/// no measurable gain (BENCHMARKS.md, issue 5).
pub const DEFAULT_CACHE_MB: u64 = 64;

/// How the store commits and caches (`[store]` in the config).
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Messages one transaction takes at most.
    pub commit_max_batch: usize,
    /// How long the writer waits for more requests after the first.
    pub commit_max_wait_us: u64,
    /// redb's page cache (reads and writes), in MiB.
    pub cache_mb: u64,
}

impl Tuning {
    /// The given group commit, with the default cache.
    pub fn batch(commit_max_batch: usize, commit_max_wait_us: u64) -> Tuning {
        Tuning {
            commit_max_batch,
            commit_max_wait_us,
            cache_mb: DEFAULT_CACHE_MB,
        }
    }
}

impl RedbStore {
    /// Opens (creating if needed) the store in directory `path`. Fails with
    /// [`StoreError::Locked`] at once if another process (or another
    /// `RedbStore` in this one) has it open.
    pub fn open(path: &Path, tuning: Tuning) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(path).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create store directory {}: {e}",
                path.display()
            ))
        })?;
        let file = path.join(DB_FILE);
        let label = file.display().to_string();
        let cache_bytes =
            usize::try_from(tuning.cache_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
        let reopen = move || {
            Database::builder()
                .set_cache_size(cache_bytes)
                .create(&file)
                .map_err(|e| open_error(&file, e))
        };
        let db = reopen()?;
        Self::start(db, label, Box::new(reopen), REOPEN_INTERVAL, tuning)
    }

    /// Checks or creates the tables, recovers the counters and starts the writer.
    fn start(
        db: Database,
        label: String,
        reopen: Reopen,
        reopen_interval: Duration,
        tuning: Tuning,
    ) -> Result<RedbStore, StoreError> {
        init_tables(&db, &label)?;
        let (index, pending_total) = load_index(&db, &label, 0, 0)?;
        let (commit_seconds, commit_messages) = commit_histograms()?;
        let db = Arc::new(db);
        let shared = Arc::new(Shared {
            db: RwLock::new(Some(db.clone())),
            index: Mutex::new(index),
            pending_total: AtomicU64::new(pending_total),
            commits: AtomicU64::new(0),
            released: AtomicBool::new(false),
            acks: Mutex::new(HashMap::new()),
            acked_total: AtomicU64::new(0),
            commit_seconds,
            commit_messages,
        });
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            db: Some(db),
            label,
            reopen,
            reopen_interval,
            broken: None,
            last_reopen: None,
            rx,
            shared: shared.clone(),
            max_batch: tuning.commit_max_batch.max(1),
            max_wait: Duration::from_micros(tuning.commit_max_wait_us),
            expired_unreported: 0,
            unsynced: false,
            last_durable: Instant::now(),
            released: false,
            acks_left: false,
            idle: false,
            wrote: true,
        };
        let handle = std::thread::Builder::new()
            .name("pushgate-store".into())
            .spawn(move || writer.run())
            .map_err(|e| StoreError::Unavailable(format!("cannot start store writer: {e}")))?;
        Ok(RedbStore {
            requests: Some(tx),
            writer: Some(handle),
            shared,
        })
    }

    /// The database for a read.
    fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.shared
            .db
            .read()
            .expect("store db slot poisoned: the writer panicked while swapping it")
            .clone()
            .ok_or_else(|| {
                StoreError::Unavailable(if self.shared.released.load(Ordering::SeqCst) {
                    RELEASED.into()
                } else {
                    "store is reopening after a write failure".into()
                })
            })
    }

    /// Write transactions committed since open: with group commit, far fewer
    /// than the writes asked for under load.
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }

    /// Hands `op` to the writer and waits for the commit that carries it.
    async fn call(&self, op: Op) -> Result<Answer, StoreError> {
        let (reply, answer) = oneshot::channel();
        let sent = match &self.requests {
            Some(requests) => requests
                .send(Request {
                    op,
                    reply: Some(reply),
                })
                .is_ok(),
            None => false,
        };
        if !sent {
            return Err(writer_gone());
        }
        answer.await.map_err(|_| writer_gone())?
    }

    /// The device's unreported dropped count as last committed (0 for a
    /// device never seen).
    fn read_dropped(&self, app: &str, device: &str) -> Result<u64, StoreError> {
        let txn = self.db()?.begin_read().map_err(unavailable)?;
        let devices = txn.open_table(DEVICES).map_err(unavailable)?;
        let row = devices.get((app, device)).map_err(unavailable)?;
        Ok(row.map_or(0, |v| v.value().1))
    }

    async fn count(&self, op: Op) -> Result<u64, StoreError> {
        match self.call(op).await? {
            Answer::Count(n) => Ok(n),
            _ => Err(mismatch()),
        }
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        // Closing the channel ends the writer after its current batch; wait
        // for it so that the file lock is released when this returns.
        self.requests.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Why every call fails after a hand-over.
const RELEASED: &str = "store handed over to another process";

fn writer_gone() -> StoreError {
    StoreError::Unavailable("store writer stopped".into())
}

fn mismatch() -> StoreError {
    StoreError::Unavailable("store writer answered the wrong kind (bug)".into())
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Maps redb's open errors to the three the gateway tells apart at startup.
fn open_error(file: &Path, e: DatabaseError) -> StoreError {
    let at = file.display();
    match e {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            StoreError::Locked(format!(
                "{at} is held by another process (or already open in this one)"
            ))
        }
        DatabaseError::UpgradeRequired(v) => {
            StoreError::Corrupt(format!("{at}: file format {v} needs a manual upgrade"))
        }
        DatabaseError::Storage(StorageError::Corrupted(why)) => {
            StoreError::Corrupt(format!("{at}: {why}"))
        }
        DatabaseError::Storage(StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::InvalidData =>
        {
            StoreError::Corrupt(format!("{at}: {io}"))
        }
        other => StoreError::Unavailable(format!("{at}: {other}")),
    }
}

impl Shared {
    /// The index, also if a panic poisoned its lock (its data is rebuilt
    /// from the file after any failed transaction anyway).
    fn index(&self) -> MutexGuard<'_, Index> {
        self.index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Creates the tables of a new file, or checks those of an old one and
/// migrates them to this schema.
fn init_tables(db: &Database, label: &str) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(|e| init_error(label, e.into()))?;
    let checked = (|| -> Result<Result<(), u64>, redb::Error> {
        {
            let mut meta = txn.open_table(META)?;
            let found = meta.get("schema")?.map(|v| v.value());
            match found {
                None => {}
                Some(1) => {
                    migrate_v1(&txn)?;
                    migrate_v2(&txn)?;
                }
                Some(2) => migrate_v2(&txn)?,
                Some(SCHEMA) => {}
                Some(other) => return Ok(Err(other)),
            }
            if found != Some(SCHEMA) {
                meta.insert("schema", SCHEMA)?;
            }
        }
        txn.open_table(LOG)?;
        txn.open_table(DEVICES)?;
        Ok(Ok(()))
    })()
    .map_err(|e| init_error(label, e))?;
    checked.map_err(|found| {
        StoreError::Corrupt(format!(
            "{label}: table layout version {found}, this build reads {SCHEMA}"
        ))
    })?;
    txn.commit().map_err(|e| init_error(label, e.into()))?;
    Ok(())
}

/// Schema 1 to 2, inside the caller's transaction, as far as schema 3
/// needs it: device rows get schema 2's shape, and the per-message expiry
/// index goes (schema 3 rebuilds its expiry buckets from the log).
fn migrate_v1(txn: &WriteTransaction) -> Result<(), redb::Error> {
    {
        let old = txn.open_table(DEVICES_V1)?;
        let mut devices = txn.open_table(DEVICES_V2)?;
        for entry in old.iter()? {
            let (key, value) = entry?;
            let (app, device) = key.value();
            let (next_seq, dropped, stored, sessions, first, last) = value.value();
            devices.insert(
                (app, device),
                (
                    next_seq,
                    dropped,
                    stored,
                    sessions,
                    first,
                    last,
                    u64::MAX,
                    0,
                ),
            )?;
        }
    }
    txn.delete_table(DEVICES_V1)?;
    txn.delete_table(EXPIRY_V1)?;
    Ok(())
}

/// Schema 2 to 3, inside the caller's transaction: every `pending` row
/// goes to the log (in key order, so each device's in seq order), device
/// rows lose their counters that the log now tells, and the per-device
/// tables go (the expiry buckets and collapse keys are rebuilt in memory
/// from the log).
fn migrate_v2(txn: &WriteTransaction) -> Result<(), redb::Error> {
    {
        let old = txn.open_table(PENDING_V2)?;
        let mut log = txn.open_table(LOG)?;
        for (key, entry) in old.iter()?.enumerate() {
            let (row, value) = entry?;
            let (app, device, seq) = row.value();
            let (id, data, created_ms, expires_ms, collapse_key) = value.value();
            log.insert(
                key as u64,
                (
                    app,
                    device,
                    seq,
                    id,
                    data,
                    created_ms,
                    expires_ms,
                    collapse_key,
                ),
            )?;
        }
        let old = txn.open_table(DEVICES_V2)?;
        let mut devices = txn.open_table(DEVICES)?;
        for entry in old.iter()? {
            let (key, value) = entry?;
            let (app, device) = key.value();
            let (next_seq, dropped, _, sessions, first, last, _, _) = value.value();
            devices.insert((app, device), (next_seq, dropped, sessions, first, last, 0))?;
        }
    }
    txn.delete_table(PENDING_V2)?;
    txn.delete_table(DEVICES_V2)?;
    txn.delete_table(BUCKETS_V2)?;
    txn.delete_table(COLLAPSE_V2)?;
    Ok(())
}

/// Builds the index by one pass over the log; returns it with the number
/// of stored messages. `committed` and `next_key` carry on from the index
/// it replaces (0 on open): log keys must never be handed out twice while
/// readers may hold one.
fn load_index(
    db: &Database,
    label: &str,
    committed: u64,
    next_key: u64,
) -> Result<(Index, u64), StoreError> {
    let load = || -> Result<(Index, u64), redb::Error> {
        let txn = db.begin_read()?;
        let log = txn.open_table(LOG)?;
        let rows = txn.open_table(DEVICES)?;
        let swept = read_swept(&txn.open_table(META)?)?;
        let mut ix = Index {
            committed,
            // Never below the sweep's mark, even with the log emptied:
            // a row under it with an early deadline would be skipped.
            next_key: next_key.max(swept.1),
            swept,
            ..Index::default()
        };
        let mut stored = 0;
        for entry in log.iter()? {
            let (key, value) = entry?;
            let key = key.value();
            let (app, device, seq, _, _, _, expires_ms, collapse_key) = value.value();
            ix.next_key = ix.next_key.max(key + 1);
            let Index {
                devices,
                buckets,
                dead,
                ..
            } = &mut ix;
            let dev = dev_entry(devices, &rows, app, device)?;
            if seq <= dev.acked || (key < swept.1 && expires_ms < swept.0) {
                // Acked or expired, the row not deleted yet.
                dead.insert(key);
                continue;
            }
            dev.push(seq, key, expires_ms, 0);
            if let Some(k) = collapse_key {
                dev.collapse(k, seq);
            }
            note_deadline(buckets, app, device, dev, expires_ms);
            stored += 1;
        }
        // Devices whose rows were all acked were read in only to skip them.
        ix.devices.retain(|_, devices| {
            devices.retain(|_, dev| !dev.evictable());
            !devices.is_empty()
        });
        Ok((ix, stored))
    };
    load().map_err(|e| init_error(label, e))
}

fn init_error(label: &str, e: redb::Error) -> StoreError {
    match e {
        redb::Error::Io(_)
        | redb::Error::Backend(_)
        | redb::Error::PreviousIo
        | redb::Error::DatabaseClosed => StoreError::Unavailable(format!("{label}: {e}")),
        // Tables of the wrong shape, corrupt pages: not a file we can use.
        e => StoreError::Corrupt(format!("{label}: {e}")),
    }
}

/// Opens the database file again (after a failed write).
type Reopen = Box<dyn Fn() -> Result<Database, StoreError> + Send>;

/// The writer thread: owns the write side of the database.
struct Writer {
    /// `None` after a failed reopen.
    db: Option<Arc<Database>>,
    /// Names the file in errors.
    label: String,
    reopen: Reopen,
    /// Least time between two reopen attempts (a reopen after an unclean
    /// close repairs the whole file: not something to do per batch).
    reopen_interval: Duration,
    /// Why the last write failed, until a reopen succeeds: redb refuses
    /// every write after a failed commit until the file is reopened.
    broken: Option<String>,
    last_reopen: Option<Instant>,
    rx: mpsc::Receiver<Request>,
    shared: Arc<Shared>,
    max_batch: usize,
    max_wait: Duration,
    /// Expired messages removed by appends (pending limit), reported by the
    /// next `expire`. Not persisted: it only feeds a metric.
    expired_unreported: u64,
    /// Whether a commit without fsync happened since the last durable one.
    unsynced: bool,
    /// When the last durable commit ended.
    last_durable: Instant,
    /// The file is closed for another process (`Op::Release`).
    released: bool,
    /// Queued acks were put back for lack of budget: run another
    /// transaction without waiting for a request.
    acks_left: bool,
    /// The transaction being made is the writer's idle time: it deletes a
    /// chunk of acked rows.
    idle: bool,
    /// A request's transaction committed since the file was last
    /// (re)opened: only then do idle deletions run, so that a store that
    /// cannot write (disk full) is not reopened, and its log read again,
    /// for a deletion nobody waits for.
    wrote: bool,
}

/// What a committed batch changed in the shared counters.
#[derive(Default)]
struct Effects {
    pending: i64,
    expired_unreported: u64,
    /// Messages removed by acks.
    acked: u64,
}

impl Writer {
    fn run(mut self) {
        let mut batch = Vec::with_capacity(self.max_batch.min(1024));
        loop {
            // Queued acks left over by the last transaction go on at once,
            // with whatever requests are waiting.
            let acks_left = self.acks_left;
            if acks_left {
                match self.rx.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(mpsc::TryRecvError::Empty) => {}
                    Err(mpsc::TryRecvError::Disconnected) => break,
                }
                self.fill(&mut batch);
            } else {
                let dead = !self.released
                    && self.broken.is_none()
                    && self.wrote
                    && !self.shared.index().dead.is_empty();
                let first = if dead {
                    match self.rx.recv_timeout(DEAD_IDLE) {
                        Ok(request) => request,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            // Idle: delete a chunk of acked rows, with an
                            // fsync if acks and sessions have waited for
                            // one as long as `IDLE_SYNC`.
                            let durable = self.unsynced && self.last_durable.elapsed() >= IDLE_SYNC;
                            self.idle = true;
                            self.process(&mut Vec::new(), durable);
                            self.idle = false;
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                } else if self.unsynced {
                    match self.rx.recv_timeout(IDLE_SYNC) {
                        Ok(request) => request,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            // Idle: make the acks and sessions so far durable.
                            self.process(&mut Vec::new(), true);
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                } else {
                    match self.rx.recv() {
                        Ok(request) => request,
                        Err(_) => break,
                    }
                };
                batch.push(first);
                self.fill(&mut batch);
                if batch.iter().all(|r| matches!(r.op, Op::Acks)) {
                    if let Ok(request) = self.rx.recv_timeout(ACK_DELAY) {
                        batch.push(request);
                        self.fill(&mut batch);
                    }
                }
            }
            // `fill` stops at a control request: it can only be the last.
            let control = match batch.last() {
                Some(r) if r.op.is_control() => batch.pop(),
                _ => None,
            };
            let release = matches!(
                control,
                Some(Request {
                    op: Op::Release,
                    ..
                })
            );
            let durable = release || batch.iter().any(|r| r.op.needs_durable());
            if !batch.is_empty() || release || acks_left {
                self.process(&mut batch, durable);
            }
            if release {
                // Every ack queued so far goes with the store, not lost.
                while self.acks_left {
                    self.process(&mut Vec::new(), true);
                }
            }
            if let Some(request) = control {
                let result = match request.op {
                    Op::Release => self.release(),
                    _ => self.reacquire(),
                };
                request.answer(result.map(|()| Answer::Done));
            }
        }
        // Dropping the database makes any non-durable commits durable.
    }

    /// Adds queued requests to `batch`, waiting up to `max_wait` for more
    /// while the batch has something to fsync.
    /// Stops after a control request: it must end its batch.
    fn fill(&self, batch: &mut Vec<Request>) {
        if batch.last().is_some_and(|r| r.op.is_control()) {
            return;
        }
        let deadline = Instant::now() + self.max_wait;
        let mut weight: usize = batch.iter().map(|r| r.op.weight()).sum();
        while weight < self.max_batch {
            let request = match self.rx.try_recv() {
                Ok(request) => request,
                Err(mpsc::TryRecvError::Disconnected) => break,
                Err(mpsc::TryRecvError::Empty) => {
                    if self.max_wait.is_zero() || !batch.iter().any(|r| r.op.needs_durable()) {
                        break;
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    match self.rx.recv_timeout(deadline - now) {
                        Ok(request) => request,
                        Err(_) => break,
                    }
                }
            };
            weight += request.op.weight();
            let control = request.op.is_control();
            batch.push(request);
            if control {
                break;
            }
        }
    }

    /// Applies and commits `batch`, then answers everyone in it.
    fn process(&mut self, batch: &mut Vec<Request>, durable: bool) {
        self.acks_left = false;
        if let Err(why) = self.ensure_open() {
            for request in batch.drain(..) {
                request.answer(Err(StoreError::Unavailable(why.clone())));
            }
            return;
        }
        match self.commit_batch(batch, durable) {
            Ok((answers, effects, left)) => {
                if !left.is_empty() {
                    self.put_back(left);
                }
                // A durable commit also makes every earlier one durable.
                self.unsynced = !durable;
                if durable {
                    self.last_durable = Instant::now();
                }
                if !batch.is_empty() {
                    self.wrote = true;
                }
                if effects.pending >= 0 {
                    self.shared
                        .pending_total
                        .fetch_add(effects.pending.unsigned_abs(), Ordering::Relaxed);
                } else {
                    self.shared
                        .pending_total
                        .fetch_sub(effects.pending.unsigned_abs(), Ordering::Relaxed);
                }
                self.expired_unreported = effects.expired_unreported;
                self.shared
                    .acked_total
                    .fetch_add(effects.acked, Ordering::Relaxed);
                for (request, answer) in batch.drain(..).zip(answers) {
                    request.answer(Ok(answer));
                }
            }
            Err(e) => {
                let why = format!(
                    "{}: write failed, nothing of this batch was stored: {e}",
                    self.label
                );
                self.broken = Some(why.clone());
                for request in batch.drain(..) {
                    request.answer(Err(StoreError::Unavailable(why.clone())));
                }
            }
        }
    }

    /// Queues acks again that a transaction had no budget for (merged with
    /// any queued since), and makes the writer go on without waiting.
    fn put_back(&mut self, left: AckQueue) {
        let mut acks = self
            .shared
            .acks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (app, devices) in left {
            let queued = acks.entry(app).or_default();
            for (device, seq) in devices {
                let highest = queued.entry(device).or_insert(seq);
                *highest = (*highest).max(seq);
            }
        }
        self.acks_left = true;
    }

    /// After a failed write, reopens the file (at most once per
    /// `reopen_interval`) so that a passing fault (disk full) heals without
    /// restarting the gateway.
    fn ensure_open(&mut self) -> Result<(), String> {
        if self.released {
            return Err(RELEASED.into());
        }
        let Some(why) = self.broken.clone() else {
            return Ok(());
        };
        if let Some(last) = self.last_reopen {
            if last.elapsed() < self.reopen_interval {
                return Err(why);
            }
        }
        self.last_reopen = Some(Instant::now());
        match self.reopen_db() {
            Ok(()) => {
                self.broken = None;
                Ok(())
            }
            Err(e) => {
                let why = format!("{why}; reopening failed: {e}");
                self.broken = Some(why.clone());
                Err(why)
            }
        }
    }

    /// Closes the file so that another process can open it; everything
    /// before was committed durably by the caller. Every later request fails
    /// until `reacquire`.
    fn release(&mut self) -> Result<(), StoreError> {
        self.shared.released.store(true, Ordering::SeqCst);
        self.released = true;
        self.unsynced = false;
        self.close_db();
        Ok(())
    }

    /// Opens the file again after `release` (the other process gave up).
    fn reacquire(&mut self) -> Result<(), StoreError> {
        if !self.released {
            return Ok(());
        }
        self.reopen_db()?;
        self.broken = None;
        self.released = false;
        self.shared.released.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Drops every handle of the database, which releases its file lock.
    /// Readers hold theirs for one read at most.
    fn close_db(&mut self) {
        self.shared
            .db
            .write()
            .expect("store db slot poisoned: the writer panicked while swapping it")
            .take();
        if let Some(old) = self.db.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    fn reopen_db(&mut self) -> Result<(), StoreError> {
        // The old handle holds the file lock: every copy of it must be gone first.
        self.close_db();
        let slot = &self.shared.db;
        let db = (self.reopen)()?;
        init_tables(&db, &self.label)?;
        // The failed commit may or may not have landed, and the index holds
        // its changes: build it again from what is on disk.
        let (committed, next_key) = {
            let ix = self.shared.index();
            (ix.committed, ix.next_key)
        };
        let (index, stored) = load_index(&db, &self.label, committed, next_key)?;
        *self.shared.index() = index;
        self.wrote = false;
        self.shared.pending_total.store(stored, Ordering::Relaxed);
        let db = Arc::new(db);
        *slot
            .write()
            .expect("store db slot poisoned: the writer panicked while swapping it") =
            Some(db.clone());
        self.db = Some(db);
        Ok(())
    }

    /// One write transaction for the whole batch: all of it commits or none.
    /// Returns the queued acks the budget left for later.
    fn commit_batch(
        &self,
        batch: &[Request],
        durable: bool,
    ) -> Result<(Vec<Answer>, Effects, AckQueue), redb::Error> {
        let db = self.db.as_ref().ok_or(redb::Error::DatabaseClosed)?;
        let mut txn = db.begin_write()?;
        txn.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })?;
        let mut effects = Effects {
            pending: 0,
            expired_unreported: self.expired_unreported,
            acked: 0,
        };
        // Taken whole: acks queued from now on wake the writer again. If
        // this transaction fails they are lost, which at-least-once allows.
        let acks = std::mem::take(
            &mut *self
                .shared
                .acks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let started = Instant::now();
        let stores: u64 = batch.iter().map(|r| r.op.stores()).sum();
        let mut index = self.shared.index();
        let pass = Pass {
            number: index.committed + 1,
            stores,
        };
        let applied = apply_all(&txn, &mut index, &pass, acks, batch, &mut effects);
        // Acked and expired rows to delete, lowest keys first (many to a
        // page): a chunk in the writer's idle time, else see `DEAD_HOLD`.
        let dead = dead_to_delete(self.idle, index.dead.len(), stores);
        let dead = index.dead.take_lowest(dead);
        // Readers wait for the index only while the batch is applied, not
        // while rows are deleted or it commits: they do not see its changes
        // until `committed` says so.
        drop(index);
        let applied = applied.and_then(|done| {
            let mut log = txn.open_table(LOG)?;
            for key in dead {
                log.remove(key)?;
            }
            Ok(done)
        });
        match applied {
            Ok((answers, left, touched)) => {
                txn.commit()?;
                publish(&mut self.shared.index(), pass.number, &touched);
                self.shared.commits.fetch_add(1, Ordering::Relaxed);
                // Only the commits API calls wait for: the non-durable ones
                // (acks, sessions) take microseconds and would hide them.
                if durable {
                    self.shared
                        .commit_seconds
                        .observe(started.elapsed().as_secs_f64());
                    if stores > 0 {
                        self.shared.commit_messages.observe(stores as f64);
                    }
                }
                Ok((answers, effects, left))
            }
            Err(e) => {
                // Nothing of the batch may become visible.
                let _ = txn.abort();
                Err(e)
            }
        }
    }
}

/// How many acked or expired rows a transaction deletes, of `waiting`: a
/// chunk in the writer's idle time; else one per message it stores (under
/// steady traffic the writer is never idle, and they would stay until the
/// hold), and those over the hold.
fn dead_to_delete(idle: bool, waiting: usize, stores: u64) -> usize {
    if idle {
        return DEAD_CHUNK;
    }
    let stores = usize::try_from(stores).unwrap_or(usize::MAX);
    waiting
        .saturating_sub(DEAD_HOLD)
        .saturating_add(stores)
        .min(DEAD_CHUNK)
}

/// After transaction `number` committed: readers may see it, and the
/// devices it touched drop their removed entries (and leave memory if
/// nothing is stored for them and their row is up to date).
fn publish(ix: &mut Index, number: u64, touched: &[DevId]) {
    ix.committed = number;
    for id in touched {
        let (app, device) = (&*id.0, &*id.1);
        let Index {
            devices, buckets, ..
        } = &mut *ix;
        let Some(dev) = devices.get_mut(app).and_then(|d| d.get_mut(device)) else {
            continue;
        };
        dev.compact();
        prune_buckets(buckets, id, dev);
        if dev.evictable() {
            ix.remove(app, device);
        }
    }
}

/// What the writer knows of the transaction it is applying.
struct Pass {
    /// Its number (the index's `committed` once it commits).
    number: u64,
    /// (message, device) pairs its batch stores.
    stores: u64,
}

/// Applies queued acks (up to [`ACK_BUDGET`] plus two per message the batch
/// stores), then the batch, in one transaction; returns the answers, the
/// acks left for later and the devices touched.
/// The acks may go first: a device acks only seqs it was sent, which are
/// committed, and every append in the batch gets a higher seq.
fn apply_all(
    txn: &WriteTransaction,
    ix: &mut Index,
    pass: &Pass,
    acks: AckQueue,
    batch: &[Request],
    fx: &mut Effects,
) -> Result<(Vec<Answer>, AckQueue, Vec<DevId>), redb::Error> {
    let swept = ix.swept;
    let mut t = Tables::open(txn, ix, pass.number)?;
    let budget = ACK_BUDGET + 2 * pass.stores;
    let mut spent = 0;
    let mut left = AckQueue::new();
    for (app, devices) in acks {
        for (device, seq) in devices {
            if spent >= budget {
                left.entry(app.clone()).or_default().insert(device, seq);
                continue;
            }
            let n = t.ack(&app, &device, seq, fx)?;
            fx.acked += n;
            spent += n + 1;
        }
    }
    let answers = batch
        .iter()
        .map(|r| t.apply(&r.op, fx))
        .collect::<Result<Vec<_>, _>>()?;
    t.write_rows()?;
    if t.ix.swept != swept {
        write_swept(txn, t.ix.swept)?;
    }
    Ok((answers, left, t.touched))
}

/// Devices of the index, by app then device.
type Devices = HashMap<Box<str>, HashMap<Box<str>, Dev>>;

/// The tables and the index, for one write transaction.
struct Tables<'t, 'i> {
    log: Table<'t, u64, LogValue>,
    rows: Table<'t, DeviceKey, DeviceRow>,
    ix: &'i mut Index,
    /// This transaction's number.
    number: u64,
    /// Devices changed in it, each once: their rows are written if needed
    /// before the commit, their entries compacted after.
    touched: Vec<DevId>,
}

/// A device of the index, read from its row (or new) if not there.
fn dev_entry<'a>(
    devices: &'a mut Devices,
    rows: &impl ReadableTable<DeviceKey, DeviceRow>,
    app: &str,
    device: &str,
) -> Result<&'a mut Dev, redb::Error> {
    if devices.get(app).and_then(|d| d.get(device)).is_none() {
        let row = rows.get((app, device))?.map(|v| v.value());
        devices
            .entry(app.into())
            .or_default()
            .insert(device.into(), Dev::from_row(row));
    }
    devices
        .get_mut(app)
        .and_then(|d| d.get_mut(device))
        .ok_or_else(|| redb::Error::Corrupted("store index lost a device it just added".into()))
}

/// Notes the device as touched by transaction `number` (once): its row is
/// written if needed before the commit, its entries compacted after.
fn touch(dev: &mut Dev, touched: &mut Vec<DevId>, number: u64, app: &str, device: &str) {
    if dev.touched != number {
        dev.touched = number;
        touched.push((app.into(), device.into()));
    }
}

impl<'t, 'i> Tables<'t, 'i> {
    fn open(
        txn: &'t WriteTransaction,
        ix: &'i mut Index,
        number: u64,
    ) -> Result<Self, redb::Error> {
        Ok(Tables {
            log: txn.open_table(LOG)?,
            rows: txn.open_table(DEVICES)?,
            ix,
            number,
            touched: Vec::new(),
        })
    }

    fn apply(&mut self, op: &Op, fx: &mut Effects) -> Result<Answer, redb::Error> {
        Ok(match op {
            Op::Append {
                app,
                devices,
                msg,
                max_pending,
            } => {
                let mut out = Vec::with_capacity(devices.len());
                for device in devices {
                    out.push(self.append(app, device, msg, *max_pending, fx)?);
                }
                Answer::Appended(out)
            }
            Op::AppendMany {
                app,
                items,
                max_pending,
            } => {
                let mut all = Vec::with_capacity(items.len());
                for (devices, msg) in items {
                    let mut out = Vec::with_capacity(devices.len());
                    for device in devices {
                        out.push(self.append(app, device, msg, *max_pending, fx)?);
                    }
                    all.push(out);
                }
                Answer::AppendedMany(all)
            }
            Op::Ack { app, device, seq } => {
                let n = self.ack(app, device, *seq, fx)?;
                fx.acked += n;
                Answer::Count(n)
            }
            Op::Purge { app, device } => {
                // Durable at return, and never to come back: deleted now.
                Answer::Count(self.remove_upto(app, device, u64::MAX, false, fx)?)
            }
            Op::TakeDropped { app, device } => {
                let dev = self.dev(app, device)?;
                let taken = std::mem::take(&mut dev.dropped);
                if taken > 0 {
                    dev.row_dirty = true;
                }
                Answer::Count(taken)
            }
            Op::RecordSession {
                app,
                device,
                now_ms,
            } => {
                let dev = self.dev(app, device)?;
                if dev.sessions == 0 {
                    dev.first_seen_ms = *now_ms;
                }
                dev.sessions += 1;
                dev.last_seen_ms = *now_ms;
                dev.row_dirty = true;
                Answer::Done
            }
            Op::Expire { now_ms } => {
                let removed = self.expire(*now_ms, fx)?;
                let expired = removed + std::mem::take(&mut fx.expired_unreported);
                Answer::Count(expired)
            }
            Op::Flush | Op::Acks => Answer::Done,
            // The writer takes these out of the batch before applying it.
            Op::Release | Op::Reacquire => Answer::Done,
        })
    }

    /// The device, loaded and noted as touched.
    fn dev(&mut self, app: &str, device: &str) -> Result<&mut Dev, redb::Error> {
        let dev = dev_entry(&mut self.ix.devices, &self.rows, app, device)?;
        touch(dev, &mut self.touched, self.number, app, device);
        Ok(dev)
    }

    /// Writes the rows of touched devices that need it (see the module doc).
    fn write_rows(&mut self) -> Result<(), redb::Error> {
        for (app, device) in &self.touched {
            let Some(dev) = self.ix.get_mut(app, device) else {
                continue;
            };
            if dev.row_dirty || dev.needs_floor() {
                self.rows.insert((&**app, &**device), dev.row())?;
                dev.floor = dev.next_seq;
                dev.row_dirty = false;
            }
        }
        Ok(())
    }

    /// Stores one message for one device; the order of the rules is the
    /// module doc's of `memory`.
    fn append(
        &mut self,
        app: &str,
        device: &str,
        msg: &NewMessage,
        max_pending: u64,
        fx: &mut Effects,
    ) -> Result<AppendOutcome, redb::Error> {
        let now_ms = msg.created_ms;
        let max_pending = max_pending.max(1);
        let number = self.number;
        let Tables {
            log,
            rows,
            ix,
            touched,
            ..
        } = self;
        let dev = dev_entry(&mut ix.devices, rows, app, device)?;
        touch(dev, touched, number, app, device);
        let seq = dev.next_seq;

        let mut collapsed = 0;
        if let Some(key) = msg.collapse_key.as_deref() {
            if let Some(old) = dev.collapse(key, seq) {
                if dev.remove_seq(old, number, |key| log.remove(key).map(|_| ()))? {
                    collapsed = 1;
                    fx.pending -= 1;
                }
            }
        }
        let key = ix.next_key;
        ix.next_key += 1;
        log.insert(
            key,
            (
                app,
                device,
                seq,
                &*msg.id,
                &msg.data[..],
                msg.created_ms,
                msg.expires_ms,
                msg.collapse_key.as_deref(),
            ),
        )?;
        dev.push(seq, key, msg.expires_ms, number);
        note_deadline(&mut ix.buckets, app, device, dev, msg.expires_ms);
        fx.pending += 1;

        let mut dropped = 0;
        if dev.live() > max_pending {
            // Expired messages go first, and are not "dropped".
            let n = dev.remove_where(
                u64::MAX,
                u64::MAX,
                number,
                |expires_ms| expires_ms < now_ms,
                |key| log.remove(key).map(|_| ()),
            )?;
            fx.pending -= n as i64;
            fx.expired_unreported += n;

            if dev.live() > max_pending {
                let excess = dev.live() - max_pending;
                dev.remove_where(
                    u64::MAX,
                    excess,
                    number,
                    |_| true,
                    |key| log.remove(key).map(|_| ()),
                )?;
                dropped = excess;
                fx.pending -= excess as i64;
                dev.dropped += excess;
                dev.row_dirty = true;
            }
        }
        Ok(AppendOutcome {
            seq,
            dropped,
            collapsed,
        })
    }

    /// Acks every message of the device with seq ≤ `upto`; returns how
    /// many were stored. Their rows join the acked ones to delete later,
    /// and the device's ack cursor moves (its row is written).
    fn ack(
        &mut self,
        app: &str,
        device: &str,
        upto: u64,
        fx: &mut Effects,
    ) -> Result<u64, redb::Error> {
        self.remove_upto(app, device, upto, true, fx)
    }

    /// Removes every message of the device with seq ≤ `upto` (as acked, or
    /// deleting their rows now); returns how many.
    fn remove_upto(
        &mut self,
        app: &str,
        device: &str,
        upto: u64,
        acked: bool,
        fx: &mut Effects,
    ) -> Result<u64, redb::Error> {
        let number = self.number;
        let Tables {
            log, ix, touched, ..
        } = self;
        // A device not in memory has nothing stored: no need to read its row.
        let Some(dev) = ix
            .devices
            .get_mut(app)
            .and_then(|d| d.get_mut(device))
            .filter(|d| d.live() > 0)
        else {
            return Ok(0);
        };
        touch(dev, touched, number, app, device);
        let n = if acked {
            let dead = &mut ix.dead;
            let n = dev.remove_where(
                upto,
                u64::MAX,
                number,
                |_| true,
                |key| {
                    dead.insert(key);
                    Ok::<_, redb::Error>(())
                },
            )?;
            dev.ack_upto(upto);
            n
        } else {
            dev.remove_where(
                upto,
                u64::MAX,
                number,
                |_| true,
                |key| log.remove(key).map(|_| ()),
            )?
        };
        fx.pending -= n as i64;
        Ok(n)
    }

    /// Removes every message with `expires_ms < now_ms`, found through the
    /// expiry buckets; returns how many. Each device with a bucket whose
    /// minute has begun and whose value is before `now_ms` gets one pass
    /// over its entries; then its buckets whose minute is over go, and the
    /// one still running gets the earliest deadline left in it.
    fn expire(&mut self, now_ms: u64, fx: &mut Effects) -> Result<u64, redb::Error> {
        // A message expired at `now_ms` has its deadline in a minute that
        // began before `now_ms`: in a bucket below this one, whose value
        // (its earliest deadline) is before `now_ms`.
        let bound = now_ms.div_ceil(BUCKET_MS);
        let mut due: HashMap<DevId, Vec<u64>> = HashMap::new();
        for (minute, devices) in self.ix.buckets.range(..bound) {
            for (id, min) in devices {
                if *min < now_ms {
                    due.entry(id.clone()).or_default().push(*minute);
                }
            }
        }
        // The minute `now_ms` is in: its bucket may keep messages.
        let running = now_ms / BUCKET_MS;
        let number = self.number;
        let mut removed = 0;
        // The rows go later and the mark moves, unless the clock went back
        // since the last sweep: lowering the mark would bring back at the
        // next start rows that sweep expired, so they go at once instead.
        let defer = now_ms >= self.ix.swept.0;
        let Tables {
            log, ix, touched, ..
        } = self;
        let Index {
            devices,
            buckets,
            dead,
            ..
        } = &mut **ix;
        for (id, minutes) in due {
            let (app, device) = (&*id.0, &*id.1);
            // Not in memory: nothing stored, only the buckets to sweep.
            let mut dev = devices.get_mut(app).and_then(|d| d.get_mut(device));
            let mut left = None;
            if let Some(dev) = dev.as_deref_mut() {
                touch(dev, touched, number, app, device);
                // Their rows are deleted later, as acked ones are (the
                // mark keeps them from coming back at the next start).
                removed += dev.remove_where(
                    u64::MAX,
                    u64::MAX,
                    number,
                    |expires_ms| expires_ms < now_ms,
                    |key| {
                        if defer {
                            dead.insert(key);
                            Ok(())
                        } else {
                            log.remove(key).map(|_| ())
                        }
                    },
                )?;
                left = dev.earliest_in(running);
            }
            for minute in minutes {
                let kept = left.filter(|_| minute == running);
                if let Some(dev) = dev.as_deref_mut() {
                    dev.bucket_swept(minute, kept);
                }
                match kept {
                    Some(min) => {
                        if let Some(bucket) = buckets.get_mut(&minute) {
                            bucket.insert(id.clone(), min);
                        }
                    }
                    // Over, or nothing left in it.
                    None => leave_bucket(buckets, minute, &id),
                }
            }
        }
        if defer {
            ix.swept = (now_ms, ix.next_key);
        }
        fx.pending -= removed as i64;
        Ok(removed)
    }
}

/// Copies one `log` row out of the database.
#[allow(clippy::type_complexity)]
fn stored_message(
    seq: u64,
    v: (&str, &str, u64, &str, &[u8], u64, u64, Option<&str>),
) -> StoredMessage {
    let (_, _, _, id, data, created_ms, expires_ms, _) = v;
    StoredMessage {
        seq,
        id: Arc::from(id),
        data: Bytes::copy_from_slice(data),
        created_ms,
        expires_ms,
    }
}

#[async_trait]
impl Store for RedbStore {
    async fn append(
        &self,
        app: &str,
        devices: &[&str],
        msg: &NewMessage,
        max_pending: u64,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let op = Op::Append {
            app: app.into(),
            devices: devices.iter().map(|d| Box::from(*d)).collect(),
            msg: msg.clone(),
            max_pending,
        };
        match self.call(op).await? {
            Answer::Appended(outcomes) => Ok(outcomes),
            _ => Err(mismatch()),
        }
    }

    async fn append_many(
        &self,
        app: &str,
        items: &[(Vec<&str>, NewMessage)],
        max_pending: u64,
    ) -> Vec<Result<Vec<AppendOutcome>, StoreError>> {
        // One request for the lot: the writer applies it in slice order (so
        // seqs follow the slice) in one transaction, and answers once. A
        // failed commit fails every item, which the trait allows.
        let op = Op::AppendMany {
            app: app.into(),
            items: items
                .iter()
                .filter(|(devices, _)| !devices.is_empty())
                .map(|(devices, msg)| {
                    (devices.iter().map(|d| Box::from(*d)).collect(), msg.clone())
                })
                .collect(),
            max_pending,
        };
        let answer = if items.iter().all(|(devices, _)| devices.is_empty()) {
            Ok(Answer::AppendedMany(Vec::new()))
        } else {
            self.call(op).await
        };
        let mut stored = match answer {
            Ok(Answer::AppendedMany(all)) => all.into_iter(),
            Ok(_) => return items.iter().map(|_| Err(mismatch())).collect(),
            Err(e) => {
                let why = match e {
                    StoreError::Unavailable(why) => why,
                    other => other.to_string(),
                };
                return items
                    .iter()
                    .map(|(devices, _)| {
                        if devices.is_empty() {
                            Ok(Vec::new())
                        } else {
                            Err(StoreError::Unavailable(why.clone()))
                        }
                    })
                    .collect();
            }
        };
        items
            .iter()
            .map(|(devices, _)| {
                if devices.is_empty() {
                    return Ok(Vec::new());
                }
                stored.next().ok_or_else(mismatch)
            })
            .collect()
    }

    async fn pending(
        &self,
        app: &str,
        device: &str,
        after_seq: u64,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Keys first, then a read transaction begun after: every key the
        // index shows is committed, so its row is there unless a later
        // commit removed it (acked, expired: then it is rightly skipped).
        // A page short of `limit` tells the caller there is no more, so
        // rows removed meanwhile are made up for with the next keys.
        let mut out = Vec::new();
        let mut after = after_seq;
        loop {
            let want = limit - out.len();
            let keys = {
                let ix = self.shared.index();
                match ix.get(app, device) {
                    Some(dev) => dev.visible(ix.committed, after, now_ms, want),
                    None => Vec::new(),
                }
            };
            let Some(&(last, _)) = keys.last() else {
                break;
            };
            let more = keys.len() == want;
            let txn = self.db()?.begin_read().map_err(unavailable)?;
            let log = txn.open_table(LOG).map_err(unavailable)?;
            for (seq, key) in keys {
                let Some(row) = log.get(key).map_err(unavailable)? else {
                    continue;
                };
                let row = row.value();
                if (row.0, row.1, row.2) == (app, device, seq) {
                    out.push(stored_message(seq, row));
                }
            }
            if out.len() == limit || !more {
                break;
            }
            after = last;
        }
        Ok(out)
    }

    async fn ack(&self, app: &str, device: &str, seq: u64) -> Result<u64, StoreError> {
        self.count(Op::Ack {
            app: app.into(),
            device: device.into(),
            seq,
        })
        .await
    }

    fn ack_queued(&self, app: &str, device: &str, seq: u64) {
        let wake = {
            let mut acks = self
                .shared
                .acks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let was_empty = acks.is_empty();
            // Keys are allocated only for a device not queued yet.
            let devices = match acks.get_mut(app) {
                Some(devices) => devices,
                None => acks.entry(app.into()).or_default(),
            };
            match devices.get_mut(device) {
                Some(highest) => *highest = (*highest).max(seq),
                None => {
                    devices.insert(device.into(), seq);
                }
            }
            was_empty
        };
        // Only the first ack into an empty queue wakes the writer: the
        // writer takes the whole queue with every transaction.
        if wake {
            if let Some(requests) = &self.requests {
                let _ = requests.send(Request {
                    op: Op::Acks,
                    reply: None,
                });
            }
        }
    }

    fn acked_total(&self) -> u64 {
        self.shared.acked_total.load(Ordering::Relaxed)
    }

    async fn purge(&self, app: &str, device: &str) -> Result<u64, StoreError> {
        self.count(Op::Purge {
            app: app.into(),
            device: device.into(),
        })
        .await
    }

    async fn take_dropped(&self, app: &str, device: &str) -> Result<u64, StoreError> {
        // Every connect asks, and almost every device has nothing dropped:
        // a read (which never waits for the writer) answers those. A drop
        // committed after this read is told with the message that caused
        // it (its frame asks for a fresh look).
        if let Ok(0) = self.read_dropped(app, device) {
            return Ok(0);
        }
        self.count(Op::TakeDropped {
            app: app.into(),
            device: device.into(),
        })
        .await
    }

    async fn expire(&self, now_ms: u64) -> Result<ExpireOutcome, StoreError> {
        let expired = self.count(Op::Expire { now_ms }).await?;
        Ok(ExpireOutcome { expired })
    }

    async fn record_session(&self, app: &str, device: &str, now_ms: u64) -> Result<(), StoreError> {
        self.call(Op::RecordSession {
            app: app.into(),
            device: device.into(),
            now_ms,
        })
        .await
        .map(|_| ())
    }

    async fn device(
        &self,
        app: &str,
        device: &str,
        now_ms: u64,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        let pending = {
            let ix = self.shared.index();
            ix.get(app, device)
                .map_or(0, |dev| dev.visible_count(ix.committed, now_ms))
        };
        let txn = self.db()?.begin_read().map_err(unavailable)?;
        let rows = txn.open_table(DEVICES).map_err(unavailable)?;
        let (_, _, sessions, first_seen_ms, last_seen_ms, _) = rows
            .get((app, device))
            .map_err(unavailable)?
            .map(|v| v.value())
            .unwrap_or_default();
        if sessions == 0 && pending == 0 {
            return Ok(None);
        }
        let seen = |ms| (sessions > 0).then_some(ms);
        Ok(Some(DeviceRecord {
            first_seen_ms: seen(first_seen_ms),
            last_seen_ms: seen(last_seen_ms),
            sessions,
            pending,
        }))
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.shared.commit_seconds.clone()),
            Box::new(self.shared.commit_messages.clone()),
        ]
    }

    fn pending_total(&self) -> u64 {
        self.shared.pending_total.load(Ordering::Relaxed)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.call(Op::Flush).await.map(|_| ())
    }

    async fn release(&self) -> Result<(), StoreError> {
        self.call(Op::Release).await.map(|_| ())
    }

    async fn reacquire(&self) -> Result<(), StoreError> {
        self.call(Op::Reacquire).await.map(|_| ())
    }
}

#[cfg(test)]
impl RedbStore {
    /// A store on any redb backend (for failure injection); `make` is called
    /// again to reopen it, with no wait between attempts.
    fn with_backend<B: redb::StorageBackend>(
        make: impl Fn() -> B + Send + 'static,
        tuning: Tuning,
    ) -> Result<RedbStore, StoreError> {
        let reopen = move || {
            Database::builder()
                .create_with_backend(make())
                .map_err(|e| open_error(Path::new("<memory>"), e))
        };
        let db = reopen()?;
        Self::start(
            db,
            "<memory>".into(),
            Box::new(reopen),
            Duration::ZERO,
            tuning,
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::store::tests::{msg, seqs};

    fn open(dir: &Path) -> RedbStore {
        RedbStore::open(dir, Tuning::batch(64, 0)).expect("open store")
    }

    #[tokio::test]
    async fn restart_recovers_seqs_pending_dropped_sessions_and_total() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path());
        for i in 0..5 {
            let key = (i == 0).then_some("k");
            s.append("a", &["d", "e"], &msg(&format!("m{i}"), 0, 10_000, key), 3)
                .await
                .expect("append");
        }
        s.ack("a", "e", 4).await.expect("ack");
        s.record_session("a", "d", 7).await.expect("session");
        s.record_session("a", "d", 9).await.expect("session");
        s.append("a", &["x"], &msg("gone", 0, 10_000, None), 3)
            .await
            .expect("append");
        s.purge("a", "x").await.expect("purge");
        let total = s.pending_total();
        assert_eq!(total, 3 + 1);
        drop(s);

        let s = open(dir.path());
        assert_eq!(s.pending_total(), total);
        assert_eq!(seqs(&s, "a", "d", 0).await, [3, 4, 5]);
        assert_eq!(seqs(&s, "a", "e", 0).await, [5]);
        let rec = s.device("a", "d", 0).await.expect("device").expect("seen");
        assert_eq!(
            rec,
            DeviceRecord {
                first_seen_ms: Some(7),
                last_seen_ms: Some(9),
                sessions: 2,
                pending: 3
            }
        );
        assert_eq!(s.take_dropped("a", "d").await.expect("take"), 2);
        assert_eq!(s.take_dropped("a", "d").await.expect("take"), 0);
        // Seqs go on where they were, even for a purged device.
        let out = s
            .append("a", &["d", "x"], &msg("m5", 0, 10_000, None), 3)
            .await
            .expect("append");
        assert_eq!((out[0].seq, out[1].seq), (6, 2));
        // The expiry index came back too.
        assert_eq!(s.expire(10_001).await.expect("expire").expired, 5);
        assert_eq!(s.pending_total(), 0);
    }

    #[tokio::test]
    async fn acks_and_take_dropped_survive_a_clean_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path());
        for i in 0..4 {
            s.append("a", &["d"], &msg(&format!("m{i}"), 0, 1000, None), 2)
                .await
                .expect("append");
        }
        // Not durable at return, but visible at once...
        assert_eq!(s.ack("a", "d", 3).await.expect("ack"), 1);
        assert_eq!(s.take_dropped("a", "d").await.expect("take"), 2);
        assert_eq!(seqs(&s, "a", "d", 0).await, [4]);
        drop(s);
        // ...and made durable by the close.
        let s = open(dir.path());
        assert_eq!(seqs(&s, "a", "d", 0).await, [4]);
        assert_eq!(s.take_dropped("a", "d").await.expect("take"), 0);
    }

    #[tokio::test]
    async fn collapse_index_survives_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path());
        s.append("a", &["d"], &msg("v1", 0, 1000, Some("score")), 10)
            .await
            .expect("append");
        drop(s);
        let s = open(dir.path());
        let out = s
            .append("a", &["d"], &msg("v2", 0, 1000, Some("score")), 10)
            .await
            .expect("append");
        assert_eq!((out[0].seq, out[0].collapsed), (2, 1));
        assert_eq!(seqs(&s, "a", "d", 0).await, [2]);
    }

    /// Entries of the expiry buckets (device and minute).
    fn bucket_count(s: &RedbStore) -> usize {
        s.shared.index().buckets.values().map(HashMap::len).sum()
    }

    #[tokio::test]
    async fn expiry_buckets_are_one_per_device_minute_and_swept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path());
        // 50 messages of one device expiring in one minute: one bucket.
        for i in 0..50 {
            s.append("a", &["d"], &msg(&format!("m{i}"), 0, 1000 + i, None), 100)
                .await
                .expect("append");
        }
        assert_eq!(bucket_count(&s), 1);
        // An earlier deadline in the same minute lowers it: still swept
        // on time.
        s.append("a", &["d"], &msg("early", 0, 500, None), 100)
            .await
            .expect("append");
        assert_eq!(bucket_count(&s), 1);
        assert_eq!(s.expire(501).await.expect("expire").expired, 1);
        // A message in a later minute: a second bucket.
        s.append("a", &["d"], &msg("kept", 0, 200_000, None), 100)
            .await
            .expect("append");
        assert_eq!(bucket_count(&s), 2);
        // Acking every message of the first minute takes the device out of
        // its bucket at once (it is in more buckets than it has messages).
        s.ack("a", "d", 51).await.expect("ack");
        assert_eq!(bucket_count(&s), 1);
        assert_eq!(s.expire(60_000).await.expect("expire").expired, 0);
        assert_eq!(bucket_count(&s), 1);
        // In the running minute a bucket stays while messages are left in it.
        for ttl in [61_000, 62_000] {
            s.append("a", &["d"], &msg("late", 0, ttl, None), 100)
                .await
                .expect("append");
        }
        assert_eq!(s.expire(61_001).await.expect("expire").expired, 1);
        assert_eq!(bucket_count(&s), 2);
        assert_eq!(s.expire(62_001).await.expect("expire").expired, 1);
        assert_eq!(bucket_count(&s), 1);
        // A message of that minute stored after its bucket went gets it back.
        s.append("a", &["d"], &msg("later", 0, 63_000, None), 100)
            .await
            .expect("append");
        assert_eq!(bucket_count(&s), 2);
        assert_eq!(s.expire(63_001).await.expect("expire").expired, 1);
        assert_eq!(s.expire(200_001).await.expect("expire").expired, 1);
        assert_eq!(bucket_count(&s), 0);
        assert_eq!(s.pending_total(), 0);
    }

    #[tokio::test]
    async fn a_device_that_acks_everything_is_in_no_bucket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path());
        // One message a minute for 20 minutes, each acked: without pruning
        // the device would stay in 20 buckets until each minute came.
        for k in 0..20u64 {
            let m = msg(&format!("m{k}"), 0, 3_600_000 + k * BUCKET_MS, None);
            let seq = s.append("a", &["d"], &m, 100).await.expect("append")[0].seq;
            s.ack("a", "d", seq).await.expect("ack");
            assert_eq!(bucket_count(&s), 0, "after minute {k}");
        }
        assert!(!in_memory(&s, "d"));
    }

    fn in_memory(s: &RedbStore, device: &str) -> bool {
        s.shared.index().get("a", device).is_some()
    }

    #[tokio::test]
    async fn devices_with_nothing_stored_leave_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path());
        // A device that only connects costs no memory once its row is written.
        s.record_session("a", "idle", 5).await.expect("session");
        assert!(!in_memory(&s, "idle"));
        for i in 0..3 {
            s.append("a", &["d"], &msg(&format!("m{i}"), 0, 1000, None), 10)
                .await
                .expect("append");
        }
        assert!(in_memory(&s, "d"));
        s.ack("a", "d", 2).await.expect("ack");
        assert!(in_memory(&s, "d"));
        s.ack("a", "d", 3).await.expect("ack");
        assert!(!in_memory(&s, "d"), "all acked: the row has its seq");
        // Read back from the row: seqs go on, the registry is intact.
        let out = s
            .append("a", &["d", "idle"], &msg("m3", 0, 1000, None), 10)
            .await
            .expect("append");
        assert_eq!((out[0].seq, out[1].seq), (4, 1));
        let rec = s
            .device("a", "idle", 0)
            .await
            .expect("device")
            .expect("seen");
        assert_eq!((rec.sessions, rec.pending), (1, 1));
    }

    /// Rows in the log, acked ones not deleted yet included.
    fn log_rows(s: &RedbStore) -> u64 {
        use redb::ReadableTableMetadata;
        let txn = s.db().expect("db").begin_read().expect("read");
        txn.open_table(LOG).expect("log").len().expect("len")
    }

    /// Waits (up to 10 s) for the writer to delete acked rows until `rows` are left.
    async fn wait_for_log_rows(s: &RedbStore, rows: u64) {
        for _ in 0..1000 {
            if log_rows(s) == rows {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("log still has {} rows, expected {rows}", log_rows(s));
    }

    /// Writes a store file in `dir` by hand: layout version `schema`, and
    /// whatever `fill` puts in its tables, in one transaction.
    fn write_file(dir: &Path, schema: u64, fill: impl FnOnce(&WriteTransaction)) {
        let db = Database::create(dir.join(DB_FILE)).expect("create");
        let txn = db.begin_write().expect("txn");
        txn.open_table(META)
            .expect("meta")
            .insert("schema", schema)
            .expect("schema");
        fill(&txn);
        txn.commit().expect("commit");
    }

    #[tokio::test]
    async fn acked_rows_are_deleted_later_and_never_come_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        // As a crash would leave it: the ack cursor of "d" is at 2, and the
        // rows of seqs 1 and 2 are not deleted yet.
        write_file(dir.path(), SCHEMA, |txn| {
            let mut log = txn.open_table(LOG).expect("log");
            for seq in 1..=3u64 {
                let id = format!("m{seq}");
                log.insert(seq * 10, ("a", "d", seq, &*id, &b"1"[..], 0, 10_000, None))
                    .expect("row");
            }
            // "e" has only an acked row left: it is not kept in memory.
            log.insert(40, ("a", "e", 1, "e1", &b"1"[..], 0, 10_000, None))
                .expect("row");
            let mut devices = txn.open_table(DEVICES).expect("devices");
            devices
                .insert(("a", "d"), (4, 0, 0, 0, 0, 2))
                .expect("device");
            devices
                .insert(("a", "e"), (2, 0, 0, 0, 0, 1))
                .expect("device");
        });
        let s = open(dir.path());
        assert_eq!(seqs(&s, "a", "d", 0).await, [3]);
        assert_eq!(s.pending_total(), 1);
        assert!(!in_memory(&s, "e"));
        // The writer deletes them when it has nothing else to do.
        wait_for_log_rows(&s, 1).await;
        // An ack marks at once; the row goes later, and stays gone.
        s.ack("a", "d", 3).await.expect("ack");
        assert_eq!(seqs(&s, "a", "d", 0).await, Vec::<u64>::new());
        assert_eq!(s.pending_total(), 0);
        wait_for_log_rows(&s, 0).await;
        let out = s
            .append("a", &["d"], &msg("m4", 0, 10_000, None), 10)
            .await
            .expect("append");
        assert_eq!(out[0].seq, 4);
        drop(s);
        let s = open(dir.path());
        assert_eq!(seqs(&s, "a", "d", 0).await, [4]);
    }

    #[tokio::test]
    async fn expired_rows_go_and_stay_gone_after_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path());
        for (id, expires_ms) in [("m1", 1000), ("m2", 1000), ("m3", 10_000)] {
            s.append("a", &["d"], &msg(id, 0, expires_ms, None), 10)
                .await
                .expect("append");
        }
        assert_eq!(s.expire(5000).await.expect("expire").expired, 2);
        assert_eq!(seqs(&s, "a", "d", 0).await, [3]);
        assert_eq!(s.pending_total(), 1);
        wait_for_log_rows(&s, 1).await;
        drop(s);
        let s = open(dir.path());
        assert_eq!(seqs(&s, "a", "d", 0).await, [3]);
        assert_eq!(s.pending_total(), 1);
        assert_eq!(s.expire(5000).await.expect("expire").expired, 0);
    }

    /// Writes a file with the rows `(key, seq, expires_ms)` of device
    /// a/d, and the mark of a sweep that ran at `at` ms when the next row
    /// was to be key `below`.
    fn write_swept_file(dir: &Path, rows: &[(u64, u64, u64)], at: u64, below: u64) {
        write_file(dir, SCHEMA, |txn| {
            let mut log = txn.open_table(LOG).expect("log");
            for &(key, seq, expires_ms) in rows {
                let id = format!("m{seq}");
                log.insert(key, ("a", "d", seq, &*id, &b"1"[..], 0, expires_ms, None))
                    .expect("row");
            }
            write_swept(txn, (at, below)).expect("sweep mark");
        });
    }

    fn swept_mark(s: &RedbStore) -> (u64, u64) {
        let txn = s.db().expect("db").begin_read().expect("read");
        read_swept(&txn.open_table(META).expect("meta")).expect("sweep mark")
    }

    #[tokio::test]
    async fn rows_a_sweep_expired_are_skipped_when_a_crash_left_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The last sweep ran at 5000 ms when the next row was to be key 35:
        // only key 10 is under the key and before the time. Key 20's
        // deadline is the sweep's time (not before it), key 35 came after.
        let rows = [(10, 1, 1000), (20, 2, 5000), (30, 3, 10_000), (35, 4, 1000)];
        write_swept_file(dir.path(), &rows, 5000, 35);
        let s = open(dir.path());
        assert_eq!(seqs(&s, "a", "d", 0).await, [2, 3, 4]);
        assert_eq!(s.pending_total(), 3);
        assert_eq!(s.expire(5000).await.expect("expire").expired, 1);
        assert_eq!(seqs(&s, "a", "d", 0).await, [2, 3]);
        // The sweep took the newest seq: after a restart it is not reused.
        drop(s);
        let s = open(dir.path());
        assert_eq!(seqs(&s, "a", "d", 0).await, [2, 3]);
        let out = s
            .append("a", &["d"], &msg("m5", 0, 10_000, None), 10)
            .await
            .expect("append");
        assert_eq!(out[0].seq, 5);
    }

    #[tokio::test]
    async fn a_sweep_with_an_earlier_clock_leaves_the_mark() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_swept_file(dir.path(), &[(40, 1, 3000), (50, 2, 20_000)], 10_000, 35);
        let s = open(dir.path());
        // The clock went back: this sweep deletes its row at once, and the
        // mark still covers what the sweep at 10 s expired.
        assert_eq!(s.expire(4000).await.expect("expire").expired, 1);
        assert_eq!(swept_mark(&s), (10_000, 35));
        assert_eq!(seqs(&s, "a", "d", 0).await, [2]);
        assert_eq!(s.expire(11_000).await.expect("expire").expired, 0);
        assert_eq!(swept_mark(&s), (11_000, 51));
    }

    #[tokio::test]
    async fn log_keys_never_go_back_under_the_sweep_mark() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path());
        s.append("a", &["d"], &msg("m1", 0, 100_000, None), 10)
            .await
            .expect("append");
        // The mark says key 1; the purge then empties the log.
        s.expire(10_000).await.expect("expire");
        s.purge("a", "d").await.expect("purge");
        drop(s);
        let s = open(dir.path());
        // A deadline before the mark's time (a clock that went back): its
        // row must not get a key under the mark, or the next start skips it.
        let out = s
            .append("a", &["d"], &msg("m2", 0, 7000, None), 10)
            .await
            .expect("append");
        assert_eq!(out[0].seq, 2);
        drop(s);
        let s = open(dir.path());
        assert_eq!(s.pending_total(), 1);
        assert_eq!(seqs(&s, "a", "d", 0).await, [2]);
        let out = s
            .append("a", &["d"], &msg("m3", 0, 100_000, None), 10)
            .await
            .expect("append");
        assert_eq!(out[0].seq, 3);
    }

    #[test]
    fn acked_rows_go_in_idle_time_one_per_stored_message_and_over_the_hold() {
        assert_eq!(dead_to_delete(true, 10, 0), DEAD_CHUNK);
        // Under traffic: one per message stored...
        assert_eq!(dead_to_delete(false, 10, 0), 0);
        assert_eq!(dead_to_delete(false, 10, 4), 4);
        assert_eq!(dead_to_delete(false, DEAD_HOLD, 4), 4);
        // ... and those over the hold, a chunk at most.
        assert_eq!(dead_to_delete(false, DEAD_HOLD + 5, 4), 9);
        assert_eq!(dead_to_delete(false, DEAD_HOLD + 5000, 4), DEAD_CHUNK);
        assert_eq!(dead_to_delete(false, usize::MAX, u64::MAX), DEAD_CHUNK);
    }

    #[tokio::test]
    async fn a_page_is_filled_up_when_rows_went_after_the_index_was_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path());
        for i in 1..=3 {
            s.append("a", &["d"], &msg(&format!("m{i}"), 0, 10_000, None), 10)
                .await
                .expect("append");
        }
        // As if a commit removed seq 1's row between the index read and
        // the row reads: the index still lists it.
        let key = {
            let ix = s.shared.index();
            ix.get("a", "d")
                .expect("device")
                .visible(ix.committed, 0, 0, 1)[0]
                .1
        };
        let db = s.db().expect("db");
        let txn = db.begin_write().expect("txn");
        txn.open_table(LOG)
            .expect("log")
            .remove(key)
            .expect("remove");
        txn.commit().expect("commit");
        // A short page would tell the connection there is nothing more.
        assert_eq!(
            s.pending("a", "d", 0, 0, 2)
                .await
                .expect("pending")
                .iter()
                .map(|m| m.seq)
                .collect::<Vec<_>>(),
            [2, 3]
        );
    }

    #[tokio::test]
    async fn an_ack_beyond_the_last_seq_does_not_hide_later_messages() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path());
        s.append("a", &["d"], &msg("m1", 0, 10_000, None), 10)
            .await
            .expect("append");
        // A device may claim any seq; the cursor stops at the last one sent.
        assert_eq!(s.ack("a", "d", 1_000_000).await.expect("ack"), 1);
        s.append("a", &["d"], &msg("m2", 0, 10_000, None), 10)
            .await
            .expect("append");
        drop(s);
        let s = open(dir.path());
        assert_eq!(seqs(&s, "a", "d", 0).await, [2]);
    }

    /// Device "d"'s two messages of both migration tests, in schema 1's and
    /// 2's `pending` and `collapse` tables: seqs `first` (collapse key "k",
    /// deadline 70 s) and `first + 1` (200 s). Returns (seq, deadline) of
    /// each, for the expiry index of the schema at hand.
    fn write_pending_v2(txn: &WriteTransaction, first: u64) -> [(u64, u64); 2] {
        let mut pending = txn.open_table(PENDING_V2).expect("pending");
        let written = [(first, 70_000), (first + 1, 200_000)];
        for (seq, expires_ms) in written {
            let id = format!("m{seq}");
            let data = format!("{seq}");
            let key = (seq == first).then_some("k");
            pending
                .insert(("a", "d", seq), (&*id, data.as_bytes(), 0, expires_ms, key))
                .expect("pending");
        }
        txn.open_table(COLLAPSE_V2)
            .expect("collapse")
            .insert(("a", "d", "k"), first)
            .expect("collapse");
        written
    }

    /// What both migration tests wrote, as the migrated store must show
    /// it: device "d" with two pending messages from seq `first` (`m<seq>`,
    /// data `<seq>`, the first with collapse key "k" and deadline 70 s, the
    /// second 200 s), 3 sessions seen at 7 and 9 ms, 1 dropped; device "e"
    /// with nothing pending whose next seq is `e_next`.
    async fn check_migrated(s: RedbStore, first: u64, e_next: u64) {
        assert_eq!(s.pending_total(), 2);
        let got = s.pending("a", "d", 0, 0, 10).await.expect("pending");
        let got: Vec<(u64, String, String)> = got
            .iter()
            .map(|m| {
                let data = String::from_utf8_lossy(&m.data).into_owned();
                (m.seq, m.id.to_string(), data)
            })
            .collect();
        let want = |seq: u64| (seq, format!("m{seq}"), format!("{seq}"));
        assert_eq!(got, [want(first), want(first + 1)]);
        let rec = s.device("a", "d", 0).await.expect("device").expect("seen");
        assert_eq!(
            rec,
            DeviceRecord {
                first_seen_ms: Some(7),
                last_seen_ms: Some(9),
                sessions: 3,
                pending: 2
            }
        );
        assert_eq!(s.take_dropped("a", "d").await.expect("take"), 1);
        // Seqs go on (also where nothing was left); the collapse key came over.
        let out = s
            .append("a", &["d", "e"], &msg("new", 0, 100_000, Some("k")), 10)
            .await
            .expect("append");
        assert_eq!(
            (out[0].seq, out[0].collapsed, out[1].seq),
            (first + 2, 1, e_next)
        );
        // Expiry works from the migrated rows: the second expires on time.
        assert_eq!(s.expire(100_001).await.expect("expire").expired, 2);
        assert_eq!(seqs(&s, "a", "d", 0).await, [first + 1]);
        assert_eq!(s.expire(200_001).await.expect("expire").expired, 1);
        assert_eq!(s.pending_total(), 0);
    }

    #[tokio::test]
    async fn schema_1_file_is_migrated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(DB_FILE);
        write_file(dir.path(), 1, |txn| {
            let mut devices = txn.open_table(DEVICES_V1).expect("devices");
            devices.insert(("a", "d"), (4, 1, 2, 3, 7, 9)).expect("row");
            devices.insert(("a", "e"), (2, 0, 0, 1, 5, 5)).expect("row");
            let mut expiry = txn.open_table(EXPIRY_V1).expect("expiry");
            for (seq, expires_ms) in write_pending_v2(txn, 2) {
                expiry
                    .insert((expires_ms, "a", "d", seq), ())
                    .expect("expiry");
            }
        });

        check_migrated(open(dir.path()), 2, 2).await;

        let db = Database::create(&file).expect("open");
        let txn = db.begin_read().expect("read");
        let meta = txn.open_table(META).expect("meta");
        assert_eq!(
            meta.get("schema").expect("get").map(|v| v.value()),
            Some(SCHEMA)
        );
        drop((meta, txn));
        assert_eq!(table_names(&db), ["devices_v3", "log", "meta"]);
    }

    /// The file's tables, sorted.
    fn table_names(db: &Database) -> Vec<String> {
        let txn = db.begin_read().expect("read");
        let mut names: Vec<String> = txn
            .list_tables()
            .expect("tables")
            .map(|t| redb::TableHandle::name(&t).to_string())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn schema_2_file_is_migrated_to_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(DB_FILE);
        write_file(dir.path(), 2, |txn| {
            let mut devices = txn.open_table(DEVICES_V2).expect("devices");
            devices
                .insert(("a", "d"), (6, 1, 2, 3, 7, 9, 1, 70_000))
                .expect("row");
            // Everything acked: only the row knows where seqs are.
            devices
                .insert(("a", "e"), (3, 0, 0, 1, 5, 5, u64::MAX, 0))
                .expect("row");
            let mut buckets = txn.open_table(BUCKETS_V2).expect("buckets");
            for (_, expires_ms) in write_pending_v2(txn, 4) {
                buckets
                    .insert((expires_ms / BUCKET_MS, "a", "d"), expires_ms)
                    .expect("bucket");
            }
        });

        check_migrated(open(dir.path()), 4, 3).await;
        let db = Database::create(&file).expect("open");
        assert_eq!(table_names(&db), ["devices_v3", "log", "meta"]);
    }

    #[tokio::test]
    async fn second_open_is_locked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = open(dir.path());
        match RedbStore::open(dir.path(), Tuning::batch(64, 0)) {
            Err(StoreError::Locked(why)) => assert!(why.contains(DB_FILE), "{why}"),
            Err(other) => panic!("expected Locked, got {other}"),
            Ok(_) => panic!("expected Locked, opened twice"),
        }
    }

    #[tokio::test]
    async fn release_hands_the_file_to_another_store_and_reacquire_takes_it_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = open(dir.path());
        old.append("a", &["d"], &msg("m1", 0, 10_000, None), 10)
            .await
            .expect("append");
        // An ack is not durable at return: the release must make it so.
        old.append("a", &["d"], &msg("m2", 0, 10_000, None), 10)
            .await
            .expect("append");
        old.ack("a", "d", 1).await.expect("ack");
        old.release().await.expect("release");
        for result in [
            old.ack("a", "d", 2).await.map(|_| ()),
            old.pending("a", "d", 0, 0, 10).await.map(|_| ()),
            old.append("a", &["d"], &msg("lost", 0, 10_000, None), 10)
                .await
                .map(|_| ()),
        ] {
            match result {
                Err(StoreError::Unavailable(why)) => assert!(why.contains("handed over"), "{why}"),
                other => panic!("expected Unavailable after release, got {other:?}"),
            }
        }

        let new = open(dir.path());
        assert_eq!(seqs(&new, "a", "d", 0).await, [2]);
        let out = new
            .append("a", &["d"], &msg("m3", 0, 10_000, None), 10)
            .await
            .expect("append");
        assert_eq!(out[0].seq, 3);
        // The old one cannot take it back while the new one holds it.
        assert!(matches!(old.reacquire().await, Err(StoreError::Locked(_))));
        drop(new);
        old.reacquire().await.expect("reacquire");
        assert_eq!(seqs(&old, "a", "d", 0).await, [2, 3]);
        let out = old
            .append("a", &["d"], &msg("m4", 0, 10_000, None), 10)
            .await
            .expect("append after reacquire");
        assert_eq!(out[0].seq, 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn release_amid_appends_keeps_every_ok_and_lets_go_of_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = Arc::new(open(dir.path()));
        let appends: Vec<_> = (0..300)
            .map(|i| {
                let s = old.clone();
                tokio::spawn(async move {
                    let m = msg(&format!("m{i}"), 0, 10_000, None);
                    s.append("a", &[&format!("d{}", i % 7)], &m, 1000)
                        .await
                        .is_ok()
                })
            })
            .collect();
        tokio::task::yield_now().await;
        old.release().await.expect("release");
        let mut ok = 0;
        for a in appends {
            ok += u64::from(a.await.expect("task"));
        }
        // Opens at once: the file was let go even with requests queued
        // behind the release.
        let new = open(dir.path());
        assert_eq!(new.pending_total(), ok);
    }

    #[tokio::test]
    async fn not_a_database_is_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(DB_FILE), vec![0x5a; 8192]).expect("write");
        match RedbStore::open(dir.path(), Tuning::batch(64, 0)) {
            Err(StoreError::Corrupt(_)) => {}
            Err(other) => panic!("expected Corrupt, got {other}"),
            Ok(_) => panic!("expected Corrupt, opened"),
        }
    }

    #[tokio::test]
    async fn other_table_layout_is_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_file(dir.path(), 99, |_| {});
        match RedbStore::open(dir.path(), Tuning::batch(64, 0)) {
            Err(StoreError::Corrupt(why)) => assert!(why.contains("99"), "{why}"),
            Err(other) => panic!("expected Corrupt, got {other}"),
            Ok(_) => panic!("expected Corrupt, opened"),
        }
    }

    #[tokio::test]
    async fn path_that_is_a_file_is_unavailable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").expect("write");
        assert!(matches!(
            RedbStore::open(&file, Tuning::batch(64, 0)),
            Err(StoreError::Unavailable(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_share_one_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The batch closes when 64 requests are in, long before the wait ends.
        let s = Arc::new(RedbStore::open(dir.path(), Tuning::batch(64, 60_000_000)).expect("open"));
        let before = s.commits();
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    s.append("a", &["d"], &msg(&format!("m{i}"), 0, 1000, None), 100)
                        .await
                        .expect("append")[0]
                        .seq
                })
            })
            .collect();
        let mut got = Vec::new();
        for task in tasks {
            got.push(task.await.expect("task"));
        }
        got.sort_unstable();
        assert_eq!(got, (1..=64).collect::<Vec<u64>>());
        assert_eq!(s.commits() - before, 1);
        assert_eq!(s.pending_total(), 64);
        // The commit histograms saw that one transaction of 64 messages.
        let (seconds, messages) = commit_histogram_readings(&*s);
        assert_eq!(seconds.0, 1);
        assert!(seconds.1 > 0.0);
        assert_eq!(messages, (1, 64.0));
    }

    #[tokio::test]
    async fn only_durable_commits_are_timed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = RedbStore::open(dir.path(), Tuning::batch(64, 0)).expect("open");
        s.append("a", &["d1", "d2"], &msg("m1", 0, 1000, None), 100)
            .await
            .expect("append");
        // An ack alone commits without fsync: nobody waits on it.
        assert_eq!(s.ack("a", "d1", 1).await.expect("ack"), 1);
        // (More than two if the writer has deleted the acked row since,
        // in a transaction of its own: not durable either.)
        assert!(s.commits() >= 2);
        let (seconds, messages) = commit_histogram_readings(&s);
        assert_eq!(seconds.0, 1);
        // One message to two devices stores two.
        assert_eq!(messages, (1, 2.0));
    }

    /// (count, sum) of `pushgate_store_commit_seconds` and of
    /// `pushgate_store_commit_messages`, from the store's collectors.
    fn commit_histogram_readings(s: &dyn Store) -> ((u64, f64), (u64, f64)) {
        let mut seconds = None;
        let mut messages = None;
        for c in s.collectors() {
            for family in c.collect() {
                let h = family.get_metric()[0].get_histogram();
                let reading = (h.get_sample_count(), h.get_sample_sum());
                match family.name() {
                    "pushgate_store_commit_seconds" => seconds = Some(reading),
                    "pushgate_store_commit_messages" => messages = Some(reading),
                    other => panic!("unexpected metric {other}"),
                }
            }
        }
        (seconds.expect("seconds"), messages.expect("messages"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rules_hold_inside_one_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Eight appends of one collapse key to one device, limit 2, in one
        // transaction: each sees the ones before it.
        let s = Arc::new(RedbStore::open(dir.path(), Tuning::batch(8, 60_000_000)).expect("open"));
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    let key = if i % 2 == 0 { "even" } else { "odd" };
                    let m = msg(&format!("m{i}"), 0, 1000, Some(key));
                    s.append("a", &["d"], &m, 2).await.expect("append")[0]
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.expect("task"));
        }
        assert_eq!(s.commits(), 1);
        let collapsed: u64 = outcomes.iter().map(|o| o.collapsed).sum();
        let dropped: u64 = outcomes.iter().map(|o| o.dropped).sum();
        // Two keys, so at most two pending: the other six went by collapse
        // (never by the limit, which collapsing keeps from being reached).
        assert_eq!((collapsed, dropped), (6, 0));
        let pending = s.pending("a", "d", 0, 0, 10).await.expect("pending");
        // The latest of each key, whichever order the tasks came in.
        assert_eq!(pending.len(), 2);
        assert_eq!(pending[1].seq, 8);
        let parity = |m: &StoredMessage| m.id[1..].parse::<u32>().expect("id m<i>") % 2;
        assert_ne!(parity(&pending[0]), parity(&pending[1]));
        assert_eq!(s.pending_total(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn append_many_keeps_order_and_shares_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = RedbStore::open(dir.path(), Tuning::batch(4096, 0)).expect("open");
        let items: Vec<(Vec<&str>, NewMessage)> = (0..200)
            .map(|i| {
                let devices = if i % 3 == 0 {
                    vec!["d", "e"]
                } else {
                    vec!["d"]
                };
                (devices, msg(&format!("m{i}"), 0, 1000, None))
            })
            .chain(std::iter::once((Vec::new(), msg("none", 0, 1000, None))))
            .collect();
        let before = s.commits();
        let out = s.append_many("a", &items, 1000).await;
        // One queue, one writer: at most a commit in progress plus one.
        assert!(
            s.commits() - before <= 2,
            "{} commits",
            s.commits() - before
        );
        let d_seqs: Vec<u64> = out[..200]
            .iter()
            .map(|r| r.as_ref().expect("append")[0].seq)
            .collect();
        assert_eq!(d_seqs, (1..=200).collect::<Vec<u64>>());
        assert_eq!(out[3].as_ref().expect("append")[1].seq, 2);
        assert!(out[200].as_ref().expect("no devices").is_empty());
        let pending = s.pending("a", "d", 0, 0, 1000).await.expect("pending");
        let ids: Vec<&str> = pending.iter().map(|m| &*m.id).collect();
        let want: Vec<String> = (0..200).map(|i| format!("m{i}")).collect();
        assert_eq!(ids, want.iter().map(String::as_str).collect::<Vec<_>>());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_ack_backlog_is_spread_over_transactions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = RedbStore::open(dir.path(), Tuning::batch(4096, 0)).expect("open");
        let devices: Vec<String> = (0..ACK_BUDGET + 500).map(|i| format!("d{i}")).collect();
        let names: Vec<&str> = devices.iter().map(String::as_str).collect();
        // One message each: acking them all is more than one budget.
        s.append("a", &names, &msg("m", 0, 1000, None), 10)
            .await
            .expect("append");
        let before = s.commits();
        for d in &names {
            s.ack_queued("a", d, 1);
        }
        let want = names.len() as u64;
        // Each flush is one more transaction; leftovers ride on every one.
        for _ in 0..10 {
            s.flush().await.expect("flush");
            if s.acked_total() == want {
                break;
            }
        }
        assert_eq!(s.acked_total(), want);
        assert_eq!(s.pending_total(), 0);
        assert!(
            s.commits() - before >= 2,
            "{} commits",
            s.commits() - before
        );
    }

    /// An in-memory backend whose writes and syncs fail on demand; clones
    /// share the bytes, so the store can reopen it.
    #[derive(Debug, Clone)]
    struct FailingBackend {
        inner: Arc<redb::backends::InMemoryBackend>,
        fail: Arc<AtomicBool>,
    }

    impl FailingBackend {
        fn check(&self) -> std::io::Result<()> {
            if self.fail.load(Ordering::SeqCst) {
                Err(std::io::Error::other("injected I/O failure"))
            } else {
                Ok(())
            }
        }
    }

    impl redb::StorageBackend for FailingBackend {
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.check()?;
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.check()?;
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.inner.write(offset, data)
        }
    }

    /// Three appends and an ack of `ack` for device "d", sent together so
    /// that they make one batch of a store whose batches are 4 long. Each
    /// call queues its request when first polled, and `join!(biased; …)`
    /// polls them in order, so the ack is queued after the appends (with
    /// a task each, the ack was now and then queued first: it acked
    /// nothing, and the appends waited the batch's full minute for a
    /// fourth request).
    async fn batch_of_four(
        s: &Arc<RedbStore>,
        ids: [&'static str; 3],
        ack: u64,
    ) -> (
        Vec<Result<Vec<AppendOutcome>, StoreError>>,
        Result<u64, StoreError>,
    ) {
        let [m1, m2, m3] = ids.map(|id| msg(id, 0, 1000, None));
        let (a1, a2, a3, ack) = tokio::join!(
            biased;
            s.append("a", &["d"], &m1, 10),
            s.append("a", &["d"], &m2, 10),
            s.append("a", &["d"], &m3, 10),
            s.ack("a", "d", ack),
        );
        (vec![a1, a2, a3], ack)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_commit_fails_the_whole_batch_and_heals_after() {
        let backend = FailingBackend {
            inner: Arc::new(redb::backends::InMemoryBackend::new()),
            fail: Arc::new(AtomicBool::new(false)),
        };
        let fail = backend.fail.clone();
        // A batch closes when 4 requests are in (the wait is far longer).
        let s = Arc::new(
            RedbStore::with_backend(move || backend.clone(), Tuning::batch(4, 60_000_000))
                .expect("open"),
        );
        let (appends, ack) = batch_of_four(&s, ["m1", "m2", "m3"], 1).await;
        assert!(appends.iter().all(Result::is_ok));
        assert_eq!(ack.expect("ack"), 1);
        assert_eq!(seqs(&*s, "a", "d", 0).await, [2, 3]);
        // The acked row goes in the writer's idle time: let that pass
        // first, so that the failure below hits the batches it means to.
        wait_for_log_rows(&s, 2).await;

        fail.store(true, Ordering::SeqCst);
        let (appends, ack) = batch_of_four(&s, ["lost1", "lost2", "lost3"], 2).await;
        for append in appends {
            assert!(
                matches!(append, Err(StoreError::Unavailable(_))),
                "{append:?}"
            );
        }
        assert!(matches!(ack, Err(StoreError::Unavailable(_))), "{ack:?}");
        // Nothing of the failed batch is visible, its ack of seq 2 included.
        assert_eq!(seqs(&*s, "a", "d", 0).await, [2, 3]);
        assert_eq!(s.pending_total(), 2);
        // Still failing: reopening fails too, and so does the next batch.
        let (appends, _) = batch_of_four(&s, ["lost4", "lost5", "lost6"], 2).await;
        assert!(appends.iter().all(Result::is_err));

        // The fault passes: the writer reopens the file and goes on.
        fail.store(false, Ordering::SeqCst);
        let (appends, ack) = batch_of_four(&s, ["n1", "n2", "n3"], 1).await;
        let got: Vec<u64> = appends
            .into_iter()
            .map(|a| a.expect("append")[0].seq)
            .collect();
        let mut sorted = got.clone();
        sorted.sort_unstable();
        // The failed batches' seqs were never committed, so they are reused:
        // no device ever saw them.
        assert_eq!(sorted, [4, 5, 6]);
        assert_eq!(ack.expect("ack"), 0);
        assert_eq!(seqs(&*s, "a", "d", 0).await, [2, 3, 4, 5, 6]);
        assert_eq!(s.pending_total(), 5);
    }
}
