//! Deliveries handed to consumers, and the consumer handle of the in-process API.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use tokio::sync::{mpsc, oneshot};

use crate::message::{Message, Outcome};

/// A store-and-forward node that keeps a message until it is settled (queues).
pub(crate) trait Settle: Send + Sync {
    /// The consumer's outcome for the message with `seq`.
    fn settle(&self, seq: u64, outcome: Outcome);
}

/// Who learns a delivery's outcome.
pub(crate) enum Responder {
    /// The producer of a direct (anycast) message, waiting for the consumer's outcome.
    Producer(oneshot::Sender<Outcome>),
    /// A store-and-forward queue that keeps the message until it is accepted.
    Queue { queue: Weak<dyn Settle>, seq: u64 },
    /// One copy of a multicast message; the producer hears once every copy is settled.
    Copy(Arc<CopyTally>),
}

/// Collects the outcomes of a multicast message's copies: `accepted` if any consumer
/// accepted it, `released` otherwise.
pub(crate) struct CopyTally {
    remaining: AtomicU32,
    accepted: std::sync::atomic::AtomicBool,
    producer: std::sync::Mutex<Option<oneshot::Sender<Outcome>>>,
}

impl CopyTally {
    pub(crate) fn new(copies: u32, producer: oneshot::Sender<Outcome>) -> Arc<Self> {
        Arc::new(Self {
            remaining: AtomicU32::new(copies),
            accepted: Default::default(),
            producer: std::sync::Mutex::new(Some(producer)),
        })
    }

    /// Records one copy's outcome (`None`: the copy was never handed out).
    pub(crate) fn record(&self, outcome: Option<Outcome>) {
        if outcome.is_some_and(|o| o.is_accepted()) {
            self.accepted.store(true, Ordering::Release);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let outcome = if self.accepted.load(Ordering::Acquire) {
                Outcome::Accepted
            } else {
                Outcome::Released
            };
            if let Some(tx) = self.producer.lock().expect("poisoned").take() {
                let _ = tx.send(outcome);
            }
        }
    }
}

impl Responder {
    pub(crate) fn respond(self, outcome: Outcome) {
        match self {
            Responder::Producer(tx) => {
                let _ = tx.send(outcome);
            }
            Responder::Queue { queue, seq } => {
                if let Some(queue) = queue.upgrade() {
                    queue.settle(seq, outcome);
                }
            }
            Responder::Copy(tally) => tally.record(Some(outcome)),
        }
    }
}

/// One message offered to a consumer. Settle it with [`Delivery::settle`]; a delivery
/// dropped unsettled counts as `released`, so nothing is lost when a consumer goes away.
pub struct Delivery {
    message: Message,
    delivery_count: u32,
    responder: Option<Responder>,
}

impl Delivery {
    pub(crate) fn new(message: Message, delivery_count: u32, responder: Option<Responder>) -> Self {
        Self { message, delivery_count, responder }
    }

    pub fn message(&self) -> &Message {
        &self.message
    }

    /// How many earlier deliveries of this message failed (AMQP header `delivery-count`).
    pub fn delivery_count(&self) -> u32 {
        self.delivery_count
    }

    /// True if nobody waits for an outcome (at-most-once): settle it or not, it is gone.
    pub fn is_presettled(&self) -> bool {
        self.responder.is_none()
    }

    /// Whether the producer waiting for this delivery's outcome stopped waiting.
    pub(crate) fn producer_gone(&self) -> bool {
        matches!(&self.responder, Some(Responder::Producer(tx)) if tx.is_closed())
    }

    /// The bytes of the message's body sections (what a buffer of held messages counts).
    pub(crate) fn message_size(&self) -> usize {
        crate::message::body_size(&self.message)
    }

    /// Takes the message out; the delivery still has to be settled.
    pub fn take_message(&mut self) -> Message {
        let empty = crate::message::with_body(fe2o3_amqp_types::messaging::Body::Empty);
        std::mem::replace(&mut self.message, empty)
    }

    pub fn settle(mut self, outcome: Outcome) {
        if let Some(responder) = self.responder.take() {
            responder.respond(outcome);
        }
    }

    /// Removes the responder without answering it (used under a node's lock, where the
    /// answer must not re-enter the node).
    pub(crate) fn disarm(mut self) -> Option<Responder> {
        self.responder.take()
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(responder) = self.responder.take() {
            responder.respond(Outcome::Released);
        }
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("delivery_count", &self.delivery_count)
            .field("presettled", &self.is_presettled())
            .finish_non_exhaustive()
    }
}

/// Link credit of one consumer: how many more deliveries it is willing to take.
#[derive(Debug, Default)]
pub(crate) struct Credit(AtomicU32);

impl Credit {
    /// Takes one unit of credit if there is any.
    pub(crate) fn try_take(&self) -> bool {
        self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| c.checked_sub(1)).is_ok()
    }

    pub(crate) fn add(&self, n: u32) {
        self.0.fetch_add(n, Ordering::AcqRel);
    }

    pub(crate) fn get(&self) -> u32 {
        self.0.load(Ordering::Acquire)
    }
}

/// A node's record of one attached consumer.
pub(crate) struct ConsumerSlot {
    pub(crate) id: u64,
    pub(crate) credit: Arc<Credit>,
    pub(crate) tx: mpsc::UnboundedSender<Delivery>,
}

impl ConsumerSlot {
    /// Hands `delivery` over if the consumer has credit. On failure the delivery comes
    /// back, with `true` if the consumer is gone and `false` if it had no credit.
    // The delivery comes back by value: boxing it would cost an allocation per refusal
    // on the hot path.
    #[allow(clippy::result_large_err)]
    pub(crate) fn offer(&self, delivery: Delivery) -> Result<(), (Delivery, bool)> {
        if !self.credit.try_take() {
            return Err((delivery, false));
        }
        self.tx.send(delivery).map_err(|e| (e.0, true))
    }
}

static NEXT_CONSUMER_ID: AtomicU64 = AtomicU64::new(1);

pub(crate) fn new_slot() -> (ConsumerSlot, Arc<Credit>, mpsc::UnboundedReceiver<Delivery>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let credit = Arc::new(Credit::default());
    let id = NEXT_CONSUMER_ID.fetch_add(1, Ordering::Relaxed);
    (ConsumerSlot { id, credit: credit.clone(), tx }, credit, rx)
}

/// What a consumer is attached to, so it can detach and ask for dispatch on new credit.
pub(crate) trait ConsumerHost: Send + Sync {
    fn credit_added(&self);
    fn detach(&self, consumer_id: u64, closed: bool);
}

/// A receiving endpoint of the in-process API. Deliveries arrive only while it has
/// credit ([`Consumer::add_credit`]); the channel behind it is therefore bounded by the
/// credit granted. Dropping it detaches it and releases whatever it had not settled.
pub struct Consumer {
    pub(crate) id: u64,
    pub(crate) address: String,
    pub(crate) credit: Arc<Credit>,
    pub(crate) rx: mpsc::UnboundedReceiver<Delivery>,
    pub(crate) host: Arc<dyn ConsumerHost>,
    pub(crate) closed: bool,
}

impl Consumer {
    /// The address it consumes from (for dynamic consumers, the address made for it).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The next delivery; `None` if the address is gone.
    ///
    /// # Cancel safety
    /// Cancel safe: a delivery is either returned or stays queued.
    pub async fn recv(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }

    /// The next delivery if one is already queued.
    pub fn try_recv(&mut self) -> Result<Delivery, mpsc::error::TryRecvError> {
        self.rx.try_recv()
    }

    /// Grants `n` more deliveries.
    pub fn add_credit(&self, n: u32) {
        self.credit.add(n);
        self.host.credit_added();
    }

    pub fn credit(&self) -> u32 {
        self.credit.get()
    }

    /// Marks the consumer as closed for good: for a durable subscription, dropping the
    /// consumer then deletes the subscription (AMQP detach with `closed = true`).
    pub fn close_on_drop(&mut self) {
        self.closed = true;
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.host.detach(self.id, self.closed);
        // Unsettled deliveries still queued are released by their own drop, after the
        // host has forgotten this consumer.
        self.rx.close();
        while let Ok(delivery) = self.rx.try_recv() {
            drop(delivery);
        }
    }
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer").field("id", &self.id).field("address", &self.address).finish()
    }
}
