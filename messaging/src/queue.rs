//! Store-and-forward queues: durable (when backed by the store), competing consumers,
//! TTL, redelivery of released messages, dead-lettering, bounded depth.
//!
//! States of a message: *committing* (handed to the store, not yet on disk: counted in the
//! depth, not yet visible), *ready* (ordered by sequence number), *in flight* (offered to
//! one consumer, waiting for its outcome). `accepted` from the consumer deletes it;
//! `released`/`modified` puts it back in order; `rejected` and expiry dead-letter it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use fe2o3_amqp_types::messaging::{Header, MessageAnnotations};
use fe2o3_amqp_types::primitives::{OrderedMap, Symbol, Value};
use tokio::sync::{mpsc, oneshot};

use crate::delivery::{
    new_slot, Consumer, ConsumerHost, ConsumerSlot, Credit, Delivery, Responder, Settle,
};
use crate::direct::Budget;
use crate::message::Submission;
use crate::message::{body_size, condition, expiry_of, now_millis, Message, Outcome};
use crate::store::{encode_record, Store, StoreError};
/// The handle queues and topics keep of the broker (to dead-letter messages).
pub(crate) type BrokerRef = std::sync::Weak<dyn DeadLetters>;

/// Where a queue's dead letters go (the broker; a trait so that queues need not know it).
pub(crate) trait DeadLetters: Send + Sync {
    /// Enqueues into a store-and-forward address; `done` gets the outcome.
    fn enqueue_internal(
        &self,
        address: &str,
        message: Message,
        done: Box<dyn FnOnce(Outcome) + Send>,
    );
}

/// Suffix of the address that receives a queue's dead letters.
pub const DEAD_LETTER_SUFFIX: &str = "/dlq";

struct Entry {
    seq: u64,
    message: Message,
    expiry: Option<u64>,
    delivery_count: u32,
    /// What it counts against the queue's and the tenant's byte bounds.
    bytes: usize,
}

/// What a queued message counts for besides its stored form (the decoded message and
/// bookkeeping).
const ENTRY_OVERHEAD_BYTES: usize = 512;

/// The bounds of one queue.
#[derive(Debug, Clone)]
pub(crate) struct QueueLimits {
    /// Messages.
    pub(crate) max_depth: usize,
    /// Bytes of this queue.
    pub(crate) max_bytes: usize,
    /// Bytes of all queues of its tenant.
    pub(crate) tenant: Arc<Budget>,
}

#[derive(Default)]
struct State {
    next_seq: u64,
    committing: usize,
    ready: VecDeque<Entry>,
    in_flight: HashMap<u64, Entry>,
    consumers: Vec<ConsumerSlot>,
    next_consumer: usize,
}

impl State {
    fn depth(&self) -> usize {
        self.committing + self.ready.len() + self.in_flight.len()
    }

    /// Puts an entry back where its sequence number says.
    fn requeue(&mut self, entry: Entry) {
        let pos = self.ready.partition_point(|e| e.seq < entry.seq);
        self.ready.insert(pos, entry);
    }
}

/// Counters of one queue.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub enqueued: AtomicU64,
    pub acknowledged: AtomicU64,
    pub expired: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub refused_full: AtomicU64,
    /// Messages refused because storage failed or the disk is low.
    pub refused_storage: AtomicU64,
}

pub(crate) struct QueueNode {
    /// The address, or for a topic subscription `TOPIC::SUBSCRIPTION`.
    pub(crate) name: Arc<str>,
    /// Where dead letters go; `None` for a dead-letter queue itself.
    dead_letter_address: Option<String>,
    store: Option<Store>,
    limits: QueueLimits,
    /// Bytes of the messages it holds (committing, ready, in flight).
    bytes: AtomicUsize,
    broker: BrokerRef,
    this: Weak<QueueNode>,
    state: Mutex<State>,
    pub(crate) stats: QueueStats,
}

impl QueueNode {
    pub(crate) fn new(
        name: &str,
        store: Option<Store>,
        limits: QueueLimits,
        broker: BrokerRef,
        dead_letters: bool,
    ) -> Arc<Self> {
        // Dead-letter queues have none themselves.
        let dead_letter_address = (dead_letters && !name.ends_with(DEAD_LETTER_SUFFIX))
            .then(|| format!("{name}{DEAD_LETTER_SUFFIX}"));
        Arc::new_cyclic(|this| Self {
            name: name.into(),
            dead_letter_address,
            store,
            limits,
            bytes: AtomicUsize::new(0),
            broker,
            this: this.clone(),
            state: Mutex::new(State::default()),
            stats: QueueStats::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("queue state poisoned")
    }

    /// Loads messages recovered from disk (at start-up, before any traffic).
    pub(crate) fn restore(&self, seq: u64, expiry: Option<u64>, message: Message) {
        // Recovered messages are kept even over the bounds: nothing on disk is dropped.
        let bytes = body_size(&message) + ENTRY_OVERHEAD_BYTES;
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.limits.tenant.add(bytes);
        let mut state = self.lock();
        state.next_seq = state.next_seq.max(seq + 1);
        state.requeue(Entry { seq, message, expiry, delivery_count: 0, bytes });
    }

    pub(crate) fn depth(&self) -> usize {
        self.lock().depth()
    }

    /// Bytes of the messages it holds.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Gives back what a message that left the queue counted.
    fn forget_bytes(&self, bytes: usize) {
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.limits.tenant.give_back(bytes);
    }

    /// Registers a consumer slot; the caller builds the [`Consumer`] around it.
    pub(crate) fn attach(&self) -> (u64, Arc<Credit>, mpsc::UnboundedReceiver<Delivery>) {
        let (slot, credit, rx) = new_slot();
        let id = slot.id;
        self.lock().consumers.push(slot);
        (id, credit, rx)
    }

    pub(crate) fn subscribe(&self, address: &str) -> Consumer {
        let (id, credit, rx) = self.attach();
        Consumer {
            id,
            address: address.to_owned(),
            credit,
            rx,
            host: self.this.upgrade().expect("queue alive while subscribing"),
            closed: false,
        }
    }

    /// Enqueues a message; the outcome is `accepted` once it is on disk.
    pub(crate) fn submit(&self, message: Message) -> Submission {
        let (tx, rx) = oneshot::channel();
        self.enqueue(
            message,
            Box::new(move |outcome| {
                let _ = tx.send(outcome);
            }),
        );
        Submission::Pending(rx)
    }

    /// Enqueues a message and calls `done` with the outcome (possibly on the store thread).
    pub(crate) fn enqueue(&self, message: Message, done: Box<dyn FnOnce(Outcome) + Send>) {
        let now = now_millis();
        let expiry = expiry_of(&message, now);
        // Encode before taking the lock: the lock is held only to order the append.
        let record = match self.store.as_ref().map(|_| encode_record(expiry, &message)).transpose()
        {
            Ok(record) => record,
            Err(e) => return done(Outcome::rejected(condition::INTERNAL_ERROR, e.to_string())),
        };
        let bytes =
            record.as_ref().map_or_else(|| body_size(&message), Vec::len) + ENTRY_OVERHEAD_BYTES;
        let mut state = self.lock();
        // The checks and the count happen under the lock: concurrent senders cannot both
        // take the last room.
        let full = if state.depth() >= self.limits.max_depth {
            Some(format!("queue {} is full ({} messages)", self.name, self.limits.max_depth))
        } else if self.bytes() + bytes > self.limits.max_bytes {
            Some(format!("queue {} is full ({} bytes)", self.name, self.limits.max_bytes))
        } else if !self.limits.tenant.try_take(bytes) {
            Some(format!("the tenant's queues are full ({} bytes)", self.limits.tenant.max()))
        } else {
            None
        };
        if let Some(description) = full {
            drop(state);
            self.stats.refused_full.fetch_add(1, Ordering::Relaxed);
            return done(Outcome::rejected(condition::RESOURCE_LIMIT_EXCEEDED, description));
        }
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        let seq = state.next_seq;
        state.next_seq += 1;
        self.stats.enqueued.fetch_add(1, Ordering::Relaxed);
        match (&self.store, record) {
            (Some(store), Some(record)) => {
                state.committing += 1;
                // Appending under the lock keeps the store's order equal to `seq` order.
                let this = self.this.clone();
                store.append(
                    &self.name,
                    seq,
                    record,
                    Box::new(move |result| {
                        let Some(this) = this.upgrade() else { return done(Outcome::Released) };
                        let mut state = this.lock();
                        state.committing -= 1;
                        if result.is_err() {
                            this.forget_bytes(bytes);
                        }
                        match result {
                            Ok(()) => {
                                let entry =
                                    Entry { seq, message, expiry, delivery_count: 0, bytes };
                                state.requeue(entry);
                                this.dispatch(state);
                                done(Outcome::Accepted);
                            }
                            // Storage trouble is backpressure, as a full queue: the producer
                            // retries later (the store reopens itself, or space comes back).
                            Err(e @ (StoreError::Io(_) | StoreError::DiskLow { .. })) => {
                                drop(state);
                                this.stats.refused_storage.fetch_add(1, Ordering::Relaxed);
                                done(Outcome::rejected(
                                    condition::RESOURCE_LIMIT_EXCEEDED,
                                    e.to_string(),
                                ));
                            }
                            Err(e) => {
                                drop(state);
                                done(Outcome::rejected(condition::INTERNAL_ERROR, e.to_string()));
                            }
                        }
                    }),
                );
            }
            _ => {
                state.ready.push_back(Entry { seq, message, expiry, delivery_count: 0, bytes });
                self.dispatch(state);
                done(Outcome::Accepted);
            }
        }
    }

    /// Offers ready messages to consumers with credit, in order, round robin.
    fn dispatch(&self, mut state: std::sync::MutexGuard<'_, State>) {
        let now = now_millis();
        let mut expired = Vec::new();
        while !state.ready.is_empty() && !state.consumers.is_empty() {
            if state.ready.front().is_some_and(|e| e.expiry.is_some_and(|x| x <= now)) {
                expired.extend(state.ready.pop_front());
                continue;
            }
            let n = state.consumers.len();
            let start = state.next_consumer;
            let chosen =
                (0..n).map(|i| (start + i) % n).find(|&i| state.consumers[i].credit.try_take());
            let Some(idx) = chosen else { break };
            state.next_consumer = idx + 1;
            let entry = state.ready.pop_front().expect("not empty");
            let queue: std::sync::Weak<dyn Settle> = self.this.clone();
            let responder = Responder::Queue { queue, seq: entry.seq };
            let delivery =
                Delivery::new(with_delivery_count(&entry), entry.delivery_count, Some(responder));
            match state.consumers[idx].tx.send(delivery) {
                Ok(()) => {
                    state.in_flight.insert(entry.seq, entry);
                }
                Err(e) => {
                    // The consumer is gone; answering the responder here would re-enter.
                    let _ = e.0.disarm();
                    state.consumers.swap_remove(idx);
                    state.requeue(entry);
                }
            }
        }
        drop(state);
        for entry in expired {
            self.stats.expired.fetch_add(1, Ordering::Relaxed);
            self.dead_letter(entry, "expired");
        }
    }

    /// Applies a consumer's outcome for message `seq`.
    pub(crate) fn settle(&self, seq: u64, outcome: Outcome) {
        let mut state = self.lock();
        let Some(mut entry) = state.in_flight.remove(&seq) else { return };
        match outcome {
            Outcome::Accepted => {
                drop(state);
                self.forget_bytes(entry.bytes);
                self.stats.acknowledged.fetch_add(1, Ordering::Relaxed);
                if let Some(store) = &self.store {
                    store.delete(&self.name, seq);
                }
            }
            Outcome::Released => {
                state.requeue(entry);
                self.dispatch(state);
            }
            Outcome::Modified { delivery_failed, .. } => {
                if delivery_failed {
                    entry.delivery_count += 1;
                }
                state.requeue(entry);
                self.dispatch(state);
            }
            Outcome::Rejected { .. } => {
                drop(state);
                self.dead_letter(entry, "rejected");
            }
        }
    }

    /// Drops expired messages that nobody is consuming (called periodically).
    pub(crate) fn sweep(&self) {
        let now = now_millis();
        let mut state = self.lock();
        let (expired, kept): (VecDeque<Entry>, VecDeque<Entry>) = std::mem::take(&mut state.ready)
            .into_iter()
            .partition(|e| e.expiry.is_some_and(|x| x <= now));
        state.ready = kept;
        drop(state);
        if !expired.is_empty() {
            tracing::debug!(queue = %self.name, expired = expired.len(), "expired messages");
        }
        for entry in expired {
            self.stats.expired.fetch_add(1, Ordering::Relaxed);
            self.dead_letter(entry, "expired");
        }
    }

    /// Moves a message to the dead-letter address; it leaves this queue's storage only
    /// once the dead-letter queue has it.
    fn dead_letter(&self, entry: Entry, reason: &'static str) {
        let Entry { seq, mut message, bytes, .. } = entry;
        // It leaves this queue now (the dead-letter queue counts it for itself).
        self.forget_bytes(bytes);
        let store = self.store.clone();
        let name = self.name.clone();
        let forget = move || {
            if let Some(store) = store {
                store.delete(&name, seq);
            }
        };
        let (Some(address), Some(broker)) = (&self.dead_letter_address, self.broker.upgrade())
        else {
            tracing::warn!(queue = %self.name, reason, "dropping message: no dead-letter address");
            return forget();
        };
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        // A dead letter must not expire again on arrival.
        if let Some(header) = message.header.as_mut() {
            header.ttl = None;
        }
        if let Some(properties) = message.properties.as_mut() {
            properties.absolute_expiry_time = None;
        }
        let annotations = message
            .message_annotations
            .get_or_insert_with(|| MessageAnnotations(OrderedMap::new()));
        annotations
            .0
            .insert(Symbol::from("x-opt-ferrule-dead-letter-reason").into(), Value::from(reason));
        annotations.0.insert(
            Symbol::from("x-opt-ferrule-original-address").into(),
            Value::from(&*self.name),
        );
        let target = address.clone();
        let queue = self.name.clone();
        broker.enqueue_internal(address, message, Box::new(move |outcome| {
            let address = &target;
            if !outcome.is_accepted() {
                tracing::warn!(%queue, %address, ?outcome, "dead-letter queue refused a message; dropped");
            }
            forget();
        }));
    }

    /// Removes every message (a deleted subscription).
    pub(crate) fn purge(&self) {
        let mut state = self.lock();
        let ready = std::mem::take(&mut state.ready);
        let in_flight = std::mem::take(&mut state.in_flight);
        drop(state);
        let bytes: usize = ready.iter().chain(in_flight.values()).map(|entry| entry.bytes).sum();
        self.forget_bytes(bytes);
        if let Some(store) = &self.store {
            store.purge(&self.name);
        }
    }

    pub(crate) fn consumer_count(&self) -> usize {
        self.lock().consumers.len()
    }
}

fn with_delivery_count(entry: &Entry) -> Message {
    let mut message = entry.message.clone();
    if entry.delivery_count > 0 {
        message.header.get_or_insert_with(Header::default).delivery_count = entry.delivery_count;
    }
    message
}

impl ConsumerHost for QueueNode {
    fn credit_added(&self) {
        self.dispatch(self.lock());
    }

    fn detach(&self, consumer_id: u64, _closed: bool) {
        self.lock().consumers.retain(|slot| slot.id != consumer_id);
    }
}

impl Settle for QueueNode {
    fn settle(&self, seq: u64, outcome: Outcome) {
        QueueNode::settle(self, seq, outcome);
    }
}
