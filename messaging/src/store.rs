//! The durable store behind queues and durable subscriptions: redb on local disk, written
//! by one thread that group-commits (many appends, one fsync).
//!
//! A message is reported stored only after the transaction holding it committed with
//! `Durability::Immediate`, i.e. after fsync. Deletes (acknowledgements) ride along in
//! the next transaction; a delete-only transaction is not forced to disk, so a crash can
//! redeliver a message that was acknowledged just before it (at-least-once, never lost).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use crate::message::{self, Message};

const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
const SUBSCRIPTIONS: TableDefinition<&str, &str> = TableDefinition::new("subscriptions");

/// Most operations folded into one transaction.
const MAX_BATCH: usize = 8192;

/// Errors of the durable store.
#[derive(Debug, thiserror::Error, Clone)]
pub enum StoreError {
    /// The database could not be opened, read or written.
    #[error("storage: {0}")]
    Io(String),
    /// The writer thread has stopped (the broker is shutting down).
    #[error("storage is shut down")]
    Closed,
    /// Free disk space is below the floor (`[messaging] min_free_disk`): nothing new is
    /// stored until there is more.
    #[error("disk space is low ({free} bytes free, the floor is {floor}); retry later")]
    DiskLow { free: u64, floor: u64 },
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

enum Op {
    Append {
        queue: Arc<str>,
        seq: u64,
        record: Vec<u8>,
        done: Completion,
    },
    Delete {
        queue: Arc<str>,
        seq: u64,
    },
    Purge {
        queue: Arc<str>,
    },
    PutSubscription {
        queue: Arc<str>,
        topic: String,
    },
    DeleteSubscription {
        queue: Arc<str>,
    },
    Flush(oneshot::Sender<Result<(), StoreError>>),
    /// Like `Flush`, then the writer stops and closes the database (its file lock is
    /// released once the answer is sent).
    Close(oneshot::Sender<Result<(), StoreError>>),
}

/// A message read back at start-up.
pub(crate) struct Recovered {
    pub seq: u64,
    pub expiry: Option<u64>,
    pub message: Message,
}

/// What was on disk at start-up.
#[derive(Default)]
pub(crate) struct Recovery {
    pub queues: BTreeMap<String, Vec<Recovered>>,
    /// Durable subscription queue name → topic address.
    pub subscriptions: BTreeMap<String, String>,
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: std_mpsc::Sender<Op>,
    health: Arc<Health>,
}

/// What the writer last saw.
#[derive(Debug, Default)]
struct Health {
    /// The last commit failed (or the writer stopped).
    failing: std::sync::atomic::AtomicBool,
    /// Since when (ms since the epoch) commits fail; 0 while they succeed.
    failing_since: std::sync::atomic::AtomicU64,
}

impl Health {
    fn record(&self, ok: bool) {
        use std::sync::atomic::Ordering::{AcqRel, Release};
        self.failing.store(!ok, Release);
        if ok {
            self.failing_since.store(0, Release);
        } else {
            let _ = self.failing_since.compare_exchange(
                0,
                message::now_millis(),
                AcqRel,
                std::sync::atomic::Ordering::Acquire,
            );
        }
    }
}

impl Store {
    /// Opens (or creates) the database at `path` and starts the writer thread, which
    /// refuses new messages while the file system has less than `min_free` bytes free.
    pub(crate) fn open(path: &Path, min_free: u64) -> Result<(Store, Recovery), StoreError> {
        if let Some(dir) = path.parent() {
            ferrule_net::private::create_dir(dir).map_err(io)?;
        }
        let db = Database::create(path).map_err(io)?;
        ferrule_net::private::restrict_file(path).map_err(io)?;
        let recovery = recover(&db)?;
        let (tx, rx) = std_mpsc::channel();
        let health = Arc::new(Health::default());
        let writer =
            Writer { db: Some(db), path: path.to_owned(), min_free, health: health.clone() };
        thread::Builder::new()
            .name("ferrule-store".into())
            .spawn(move || writer.run(rx))
            .map_err(io)?;
        Ok((Store { tx, health }, recovery))
    }

    /// Appends a record made by [`encode_record`]; `done` runs on the writer thread once
    /// it is on disk (or failed).
    pub(crate) fn append(&self, queue: &Arc<str>, seq: u64, record: Vec<u8>, done: Completion) {
        let op = Op::Append { queue: queue.clone(), seq, record, done };
        if let Err(std_mpsc::SendError(Op::Append { done, .. })) = self.tx.send(op) {
            done(Err(StoreError::Closed));
        }
    }

    pub(crate) fn delete(&self, queue: &Arc<str>, seq: u64) {
        let _ = self.tx.send(Op::Delete { queue: queue.clone(), seq });
    }

    pub(crate) fn purge(&self, queue: &Arc<str>) {
        let _ = self.tx.send(Op::Purge { queue: queue.clone() });
    }

    pub(crate) fn put_subscription(&self, queue: &Arc<str>, topic: &str) {
        let _ = self.tx.send(Op::PutSubscription { queue: queue.clone(), topic: topic.to_owned() });
    }

    pub(crate) fn delete_subscription(&self, queue: &Arc<str>) {
        let _ = self.tx.send(Op::DeleteSubscription { queue: queue.clone() });
    }

    /// Whether the last commit succeeded (and the writer still runs); costs no I/O.
    pub fn healthy(&self) -> bool {
        !self.health.failing.load(std::sync::atomic::Ordering::Acquire)
    }

    /// How long commits have been failing (`None` while they succeed).
    pub fn failing_for(&self) -> Option<std::time::Duration> {
        let since = self.health.failing_since.load(std::sync::atomic::Ordering::Acquire);
        (since != 0)
            .then(|| std::time::Duration::from_millis(message::now_millis().saturating_sub(since)))
    }

    /// Waits until everything submitted so far is on disk.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Op::Flush(tx)).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Writes everything submitted so far, then closes the database; later writes fail
    /// with [`StoreError::Closed`]. The same database can be opened again once this
    /// returns (by a restarted broker in the same process).
    pub async fn close(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Op::Close(tx)).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

/// A stored message: its expiry (ms since the epoch, 0 for none) then its AMQP encoding.
pub(crate) fn encode_record(
    expiry: Option<u64>,
    message: &Message,
) -> Result<Vec<u8>, serde_amqp::Error> {
    let body = message::encode(message)?;
    let mut record = Vec::with_capacity(8 + body.len());
    record.extend_from_slice(&expiry.unwrap_or(0).to_le_bytes());
    record.extend_from_slice(&body);
    Ok(record)
}

fn decode_record(record: &[u8]) -> Result<(Option<u64>, Message), StoreError> {
    if record.len() < 8 {
        return Err(StoreError::Io("truncated record".into()));
    }
    let expiry = u64::from_le_bytes(record[..8].try_into().expect("8 bytes"));
    let message = message::decode(&record[8..]).map_err(io)?;
    Ok(((expiry != 0).then_some(expiry), message))
}

fn recover(db: &Database) -> Result<Recovery, StoreError> {
    // Make sure both tables exist so that read transactions can open them.
    let txn = db.begin_write().map_err(io)?;
    txn.open_table(MESSAGES).map_err(io)?;
    txn.open_table(SUBSCRIPTIONS).map_err(io)?;
    txn.commit().map_err(io)?;

    let mut recovery = Recovery::default();
    let txn = db.begin_read().map_err(io)?;
    let messages = txn.open_table(MESSAGES).map_err(io)?;
    for entry in messages.iter().map_err(io)? {
        let (key, value) = entry.map_err(io)?;
        let (queue, seq) = key.value();
        match decode_record(value.value()) {
            Ok((expiry, message)) => recovery
                .queues
                .entry(queue.to_owned())
                .or_default()
                .push(Recovered { seq, expiry, message }),
            Err(e) => tracing::error!(queue, seq, error = %e, "skipping unreadable stored message"),
        }
    }
    let subscriptions = txn.open_table(SUBSCRIPTIONS).map_err(io)?;
    for entry in subscriptions.iter().map_err(io)? {
        let (queue, topic) = entry.map_err(io)?;
        recovery.subscriptions.insert(queue.value().to_owned(), topic.value().to_owned());
    }
    Ok(recovery)
}

/// The writer thread's state: the database (reopened after a failed commit, since redb
/// refuses every later transaction after an I/O error), and the free-space floor.
struct Writer {
    db: Option<Database>,
    path: std::path::PathBuf,
    min_free: u64,
    health: Arc<Health>,
}

impl Writer {
    fn run(mut self, rx: std_mpsc::Receiver<Op>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Ok(first) = rx.recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            // Below the floor, new messages are refused; acknowledgements and the rest
            // still go through (they free space).
            let low = self.below_floor(&batch);
            let mut refused = Vec::new();
            if let Some(e) = &low {
                let (appends, rest): (Vec<Op>, Vec<Op>) =
                    batch.drain(..).partition(|op| matches!(op, Op::Append { .. }));
                batch = rest;
                refused = appends;
                tracing::warn!(error = %e, refused = refused.len(), "store refusing new messages");
            }
            let result = self.commit(&batch);
            // A disk below the floor is backpressure, not a failure (a restart would not
            // help); failed commits are.
            self.health.record(result.is_ok());
            if let Err(e) = &result {
                tracing::error!(error = %e, ops = batch.len(), "store commit failed; reopening the database");
                // redb answers every later transaction with an error after an I/O error:
                // reopen (next batch tries again if this fails).
                self.db = None;
                self.reopen();
            }
            if let Some(e) = low {
                for op in refused {
                    if let Op::Append { done, .. } = op {
                        done(Err(e.clone()));
                    }
                }
            }
            let mut closed = None;
            for op in batch.drain(..) {
                match op {
                    Op::Append { done, .. } => done(result.clone()),
                    Op::Flush(tx) => {
                        let _ = tx.send(result.clone());
                    }
                    Op::Close(tx) => closed = Some(tx),
                    _ => {}
                }
            }
            if let Some(tx) = closed {
                self.db = None;
                self.health.record(false);
                tracing::debug!("store closed");
                let _ = tx.send(result);
                return;
            }
        }
        self.health.record(false);
        tracing::debug!("store writer stopped");
    }

    /// `DiskLow` when `batch` stores new messages while the file system is below the
    /// floor (asked only then: one `statvfs` per group commit that appends; a closing
    /// batch still writes what it has).
    fn below_floor(&self, batch: &[Op]) -> Option<StoreError> {
        let appends = batch.iter().any(|op| matches!(op, Op::Append { .. }));
        let closing = batch.iter().any(|op| matches!(op, Op::Close(_)));
        if self.min_free == 0 || !appends || closing {
            return None;
        }
        let free = free_space(&self.path)?;
        (free < self.min_free).then_some(StoreError::DiskLow { free, floor: self.min_free })
    }

    fn reopen(&mut self) {
        match Database::create(&self.path) {
            Ok(db) => {
                tracing::info!(path = %self.path.display(), "store reopened");
                self.db = Some(db);
            }
            Err(e) => {
                tracing::error!(error = %e, "store could not be reopened; retrying with the next write")
            }
        }
    }

    fn commit(&mut self, batch: &[Op]) -> Result<(), StoreError> {
        if self.db.is_none() {
            self.reopen();
        }
        match &self.db {
            Some(db) => commit(db, batch),
            None => Err(StoreError::Io("the database is not open".into())),
        }
    }
}

/// Bytes available to this process on the file system holding `path`.
fn free_space(path: &Path) -> Option<u64> {
    let dir = path.parent().unwrap_or(path);
    let stat = rustix::fs::statvfs(dir).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

fn commit(db: &Database, batch: &[Op]) -> Result<(), StoreError> {
    let mut txn = db.begin_write().map_err(io)?;
    let must_sync = batch.iter().any(|op| !matches!(op, Op::Delete { .. }));
    if !must_sync {
        txn.set_durability(Durability::None).map_err(io)?;
    }
    {
        let mut messages = txn.open_table(MESSAGES).map_err(io)?;
        let mut subscriptions = txn.open_table(SUBSCRIPTIONS).map_err(io)?;
        for op in batch {
            match op {
                Op::Append { queue, seq, record, .. } => {
                    messages.insert((&**queue, *seq), record.as_slice()).map_err(io)?;
                }
                Op::Delete { queue, seq } => {
                    messages.remove((&**queue, *seq)).map_err(io)?;
                }
                Op::Purge { queue } => {
                    messages
                        .retain_in((&**queue, 0)..=(&**queue, u64::MAX), |_, _| false)
                        .map_err(io)?;
                }
                Op::PutSubscription { queue, topic } => {
                    subscriptions.insert(&**queue, topic.as_str()).map_err(io)?;
                }
                Op::DeleteSubscription { queue } => {
                    subscriptions.remove(&**queue).map_err(io)?;
                }
                Op::Flush(_) | Op::Close(_) => {}
            }
        }
    }
    txn.commit().map_err(io)
}
