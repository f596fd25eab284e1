//! Direct addresses (`anycast`, `multicast`): routed to attached consumers with credit,
//! never stored. With no consumer attached, the producer learns it at once. An anycast
//! message that finds consumers attached but none with credit (the application is merely
//! behind) is held, in arrival order, for up to [`Hold::max_wait`] and within
//! [`Hold::max_bytes`] per address: its producer waits for the outcome meanwhile (an MQTT
//! QoS 1 device gets its PUBACK later instead of losing its connection). Past either bound,
//! or when the last consumer goes, it is `released` as before.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::delivery::{
    new_slot, Consumer, ConsumerHost, ConsumerSlot, CopyTally, Delivery, Responder,
};
use crate::message::{GiveUp, Held as HeldSubmission, Message, Outcome};
use crate::Submission;

/// How long and how much an anycast address holds for consumers that are attached but
/// out of credit.
#[derive(Debug, Clone)]
pub(crate) struct Hold {
    pub(crate) max_wait: Duration,
    /// Per address.
    pub(crate) max_bytes: usize,
    /// Shared by every address of the broker.
    pub(crate) budget: Arc<Budget>,
}

/// Bytes held across all addresses, against one limit.
#[derive(Debug)]
pub(crate) struct Budget {
    used: AtomicUsize,
    max: usize,
}

impl Budget {
    pub(crate) fn new(max: usize) -> Self {
        Self { used: AtomicUsize::new(0), max }
    }

    pub(crate) fn try_take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + bytes <= self.max).then_some(used + bytes)
            })
            .is_ok()
    }

    pub(crate) fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Counts `bytes` even over the limit (messages recovered from disk are kept).
    pub(crate) fn add(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    pub(crate) fn max(&self) -> usize {
        self.max
    }

    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// What a held message counts for besides its payload (message, headers, bookkeeping).
const HELD_OVERHEAD_BYTES: usize = 512;

pub(crate) struct DirectNode {
    address: String,
    multicast: bool,
    routing: Mutex<Routing>,
    /// `routing.held.len()`, readable without the lock (new credit checks it).
    held_len: AtomicUsize,
    next: AtomicUsize,
    hold: Hold,
    this: Weak<DirectNode>,
    /// Pre-settled messages that found no consumer (or waited past the bound).
    pub(crate) dropped: AtomicU64,
    /// Messages that had to wait for a consumer's credit.
    pub(crate) held: AtomicU64,
    /// Held messages released because they waited past the bound.
    pub(crate) held_expired: AtomicU64,
}

#[derive(Default)]
struct Routing {
    consumers: Vec<ConsumerSlot>,
    held: VecDeque<Held>,
    held_bytes: usize,
    next_held_id: u64,
}

struct Held {
    id: u64,
    delivery: Delivery,
    since: Instant,
    bytes: usize,
    /// A pre-settled message's producer, told `accepted` once a consumer has it (an
    /// unsettled one hears the consumer's outcome through the delivery): so that an
    /// at-most-once producer waits too, and a device that floods is slowed down (its
    /// connection stops being read) instead of its messages being dropped.
    handed: Option<oneshot::Sender<Outcome>>,
}

impl DirectNode {
    pub(crate) fn new(address: &str, multicast: bool, hold: Hold) -> Arc<Self> {
        Arc::new_cyclic(|this| Self {
            address: address.to_owned(),
            multicast,
            routing: Mutex::new(Routing::default()),
            held_len: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            hold,
            this: this.clone(),
            dropped: AtomicU64::new(0),
            held: AtomicU64::new(0),
            held_expired: AtomicU64::new(0),
        })
    }

    pub(crate) fn subscribe(self: &Arc<Self>, address: &str) -> Consumer {
        let (slot, credit, rx) = new_slot();
        let id = slot.id;
        self.routing.lock().expect("poisoned").consumers.push(slot);
        Consumer { id, address: address.to_owned(), credit, rx, host: self.clone(), closed: false }
    }

    /// Bytes held for busy consumers now.
    pub(crate) fn held_bytes(&self) -> usize {
        self.routing.lock().expect("poisoned").held_bytes
    }

    pub(crate) fn consumer_count(&self) -> usize {
        self.routing.lock().expect("poisoned").consumers.len()
    }

    /// No consumer attached and nothing held: the node can be forgotten (a new one is
    /// made when the address is next used).
    pub(crate) fn is_idle(&self) -> bool {
        let routing = self.routing.lock().expect("poisoned");
        routing.consumers.is_empty() && routing.held.is_empty()
    }

    pub(crate) fn submit(&self, message: Message, settled: bool) -> Submission {
        if self.multicast {
            return self.submit_multicast(message, settled);
        }
        let (responder, outcome) = if settled {
            (None, None)
        } else {
            let (tx, rx) = oneshot::channel();
            (Some(Responder::Producer(tx)), Some(rx))
        };
        let delivery = Delivery::new(message, 0, responder);
        let mut routing = self.routing.lock().expect("poisoned");
        if !routing.held.is_empty() {
            // Earlier messages first.
            self.dispatch_held(&mut routing);
        }
        let delivery = if routing.held.is_empty() {
            match self.offer(&mut routing.consumers, delivery) {
                Ok(()) => {
                    return match outcome {
                        Some(rx) => Submission::Pending(rx),
                        None => Submission::Ready(Outcome::Accepted),
                    };
                }
                Err(delivery) => delivery,
            }
        } else {
            delivery
        };
        if !routing.consumers.is_empty() {
            let (handed, rx) = match outcome {
                Some(rx) => (None, rx),
                None => {
                    let (tx, rx) = oneshot::channel();
                    (Some(tx), rx)
                }
            };
            let size = delivery.message_size();
            if let Some(id) = self.try_hold(&mut routing, size, delivery, handed) {
                let node = self.this.clone() as Weak<dyn GiveUp>;
                let until = Instant::now() + self.hold.max_wait;
                return Submission::Held(HeldSubmission { rx, until, node, id });
            }
        } else {
            // Nobody could take it: answer here instead of letting the drop release it.
            let _ = delivery.disarm();
        }
        drop(routing);
        if settled {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        tracing::trace!(address = %self.address, "no consumer with credit");
        Submission::Ready(Outcome::Released)
    }

    /// Hands `delivery` to the next consumer with credit (round robin), forgetting
    /// consumers that are gone; gives it back if none has credit.
    #[allow(clippy::result_large_err)]
    fn offer(
        &self,
        consumers: &mut Vec<ConsumerSlot>,
        mut delivery: Delivery,
    ) -> Result<(), Delivery> {
        let n = consumers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut i = 0;
        while i < n && !consumers.is_empty() {
            let idx = (start + i) % consumers.len();
            match consumers[idx].offer(delivery) {
                Ok(()) => return Ok(()),
                Err((back, gone)) => {
                    delivery = back;
                    if gone {
                        consumers.swap_remove(idx);
                        continue;
                    }
                }
            }
            i += 1;
        }
        Err(delivery)
    }

    /// Queues `delivery` behind the held ones if the bounds allow: its id, or `None` (the
    /// delivery is then disarmed, the caller answers).
    fn try_hold(
        &self,
        routing: &mut Routing,
        size: usize,
        delivery: Delivery,
        handed: Option<oneshot::Sender<Outcome>>,
    ) -> Option<u64> {
        let bytes = size + HELD_OVERHEAD_BYTES;
        if self.hold.max_wait.is_zero()
            || routing.held_bytes + bytes > self.hold.max_bytes
            || !self.hold.budget.try_take(bytes)
        {
            let _ = delivery.disarm();
            return None;
        }
        let id = routing.next_held_id;
        routing.next_held_id += 1;
        routing.held_bytes += bytes;
        routing.held.push_back(Held { id, delivery, since: Instant::now(), bytes, handed });
        self.held_len.store(routing.held.len(), Ordering::Release);
        self.held.fetch_add(1, Ordering::Relaxed);
        Some(id)
    }

    /// Hands held messages, oldest first, to consumers with credit; drops those that
    /// waited past the bound or whose producer stopped waiting.
    fn dispatch_held(&self, routing: &mut Routing) {
        while let Some(held) = routing.held.pop_front() {
            let given_up = held.handed.as_ref().is_some_and(oneshot::Sender::is_closed);
            if held.since.elapsed() > self.hold.max_wait
                || held.delivery.producer_gone()
                || given_up
            {
                self.forget(routing, &held);
                self.held_expired.fetch_add(1, Ordering::Relaxed);
                if held.delivery.is_presettled() {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
                continue; // an unsettled one answers `released` as it drops
            }
            let bytes = held.bytes;
            match self.offer(&mut routing.consumers, held.delivery) {
                Ok(()) => {
                    routing.held_bytes -= bytes;
                    self.hold.budget.give_back(bytes);
                    if let Some(handed) = held.handed {
                        let _ = handed.send(Outcome::Accepted);
                    }
                }
                Err(delivery) => {
                    routing.held.push_front(Held { delivery, ..held });
                    break;
                }
            }
        }
        self.held_len.store(routing.held.len(), Ordering::Release);
    }

    /// Takes a held message's bytes off both counts.
    fn forget(&self, routing: &mut Routing, held: &Held) {
        routing.held_bytes -= held.bytes;
        self.hold.budget.give_back(held.bytes);
    }
}

impl GiveUp for DirectNode {
    fn give_up(&self, id: u64) {
        let mut routing = self.routing.lock().expect("poisoned");
        if let Some(at) = routing.held.iter().position(|held| held.id == id) {
            let held = routing.held.remove(at).expect("present");
            self.forget(&mut routing, &held);
            self.held_expired.fetch_add(1, Ordering::Relaxed);
            self.held_len.store(routing.held.len(), Ordering::Release);
            drop(routing);
            drop(held); // answers `released`
        }
    }
}

impl DirectNode {
    /// A copy goes to every consumer with credit. Pre-settled messages get pre-settled
    /// copies; otherwise the producer's outcome waits for every copy to be settled
    /// (`accepted` if any consumer accepted), which bounds a fast producer by its slowest
    /// consumer instead of dropping copies.
    fn submit_multicast(&self, message: Message, settled: bool) -> Submission {
        let mut routing = self.routing.lock().expect("poisoned");
        let consumers = &mut routing.consumers;
        let (tally, outcome) = if settled || consumers.is_empty() {
            (None, None)
        } else {
            let (tx, rx) = oneshot::channel();
            (Some(CopyTally::new(consumers.len() as u32, tx)), Some(rx))
        };
        let copies = consumers.len();
        let mut delivered = 0usize;
        consumers.retain(|slot| {
            let responder = tally.clone().map(Responder::Copy);
            match slot.offer(Delivery::new(message.clone(), 0, responder)) {
                Ok(()) => {
                    delivered += 1;
                    true
                }
                Err((copy, gone)) => {
                    let _ = copy.disarm();
                    !gone
                }
            }
        });
        drop(routing);
        if delivered == 0 {
            if settled {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            return Submission::Ready(Outcome::Released);
        }
        if let (Some(tally), Some(rx)) = (tally, outcome) {
            // Copies that were not handed out count as not accepted.
            for _ in delivered..copies {
                tally.record(None);
            }
            return Submission::Pending(rx);
        }
        Submission::Ready(Outcome::Accepted)
    }
}

impl ConsumerHost for DirectNode {
    fn credit_added(&self) {
        if self.held_len.load(Ordering::Acquire) > 0 {
            self.dispatch_held(&mut self.routing.lock().expect("poisoned"));
        }
    }

    fn detach(&self, consumer_id: u64, _closed: bool) {
        let mut routing = self.routing.lock().expect("poisoned");
        routing.consumers.retain(|slot| slot.id != consumer_id);
        if routing.consumers.is_empty() && !routing.held.is_empty() {
            // Nobody left to wait for: the held messages are answered `released` now.
            let held = std::mem::take(&mut routing.held);
            self.hold.budget.give_back(std::mem::take(&mut routing.held_bytes));
            self.held_len.store(0, Ordering::Release);
            drop(routing);
            let presettled = held.iter().filter(|h| h.delivery.is_presettled()).count();
            self.dropped.fetch_add(presettled as u64, Ordering::Relaxed);
        }
    }
}
