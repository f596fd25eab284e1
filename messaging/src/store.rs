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
    /// The last commit succeeded and the writer thread runs.
    healthy: Arc<std::sync::atomic::AtomicBool>,
}

impl Store {
    /// Opens (or creates) the database at `path` and starts the writer thread.
    pub(crate) fn open(path: &Path) -> Result<(Store, Recovery), StoreError> {
        if let Some(dir) = path.parent() {
            ferrule_net::private::create_dir(dir).map_err(io)?;
        }
        let db = Database::create(path).map_err(io)?;
        ferrule_net::private::restrict_file(path).map_err(io)?;
        let recovery = recover(&db)?;
        let (tx, rx) = std_mpsc::channel();
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let writer_healthy = healthy.clone();
        thread::Builder::new()
            .name("ferrule-store".into())
            .spawn(move || writer(db, rx, &writer_healthy))
            .map_err(io)?;
        Ok((Store { tx, healthy }, recovery))
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
        self.healthy.load(std::sync::atomic::Ordering::Acquire)
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

fn writer(db: Database, rx: std_mpsc::Receiver<Op>, healthy: &std::sync::atomic::AtomicBool) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let result = commit(&db, &batch);
        healthy.store(result.is_ok(), std::sync::atomic::Ordering::Release);
        if let Err(e) = &result {
            tracing::error!(error = %e, ops = batch.len(), "store commit failed");
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
            drop(db);
            healthy.store(false, std::sync::atomic::Ordering::Release);
            tracing::debug!("store closed");
            let _ = tx.send(result);
            return;
        }
    }
    healthy.store(false, std::sync::atomic::Ordering::Release);
    tracing::debug!("store writer stopped");
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
