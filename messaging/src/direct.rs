//! Direct addresses (`anycast`, `multicast`): routed to attached consumers with credit,
//! never stored. With no consumer able to take a message, the producer learns it at once.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::delivery::{
    new_slot, Consumer, ConsumerHost, ConsumerSlot, CopyTally, Delivery, Responder,
};
use crate::message::{Message, Outcome};
use crate::Submission;

pub(crate) struct DirectNode {
    address: String,
    multicast: bool,
    consumers: Mutex<Vec<ConsumerSlot>>,
    next: AtomicUsize,
    /// Pre-settled messages that found no consumer.
    pub(crate) dropped: AtomicU64,
}

impl DirectNode {
    pub(crate) fn new(address: &str, multicast: bool) -> Arc<Self> {
        Arc::new(Self {
            address: address.to_owned(),
            multicast,
            consumers: Mutex::new(Vec::new()),
            next: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
        })
    }

    pub(crate) fn subscribe(self: &Arc<Self>, address: &str) -> Consumer {
        let (slot, credit, rx) = new_slot();
        let id = slot.id;
        self.consumers.lock().expect("poisoned").push(slot);
        Consumer { id, address: address.to_owned(), credit, rx, host: self.clone(), closed: false }
    }

    pub(crate) fn consumer_count(&self) -> usize {
        self.consumers.lock().expect("poisoned").len()
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
        let mut delivery = Delivery::new(message, 0, responder);
        let mut consumers = self.consumers.lock().expect("poisoned");
        let n = consumers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut i = 0;
        while i < n && !consumers.is_empty() {
            let idx = (start + i) % consumers.len();
            match consumers[idx].offer(delivery) {
                Ok(()) => {
                    return match outcome {
                        Some(rx) => Submission::Pending(rx),
                        None => Submission::Ready(Outcome::Accepted),
                    };
                }
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
        drop(consumers);
        // Nobody could take it: answer here instead of letting the drop release it.
        let _ = delivery.disarm();
        if settled {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        tracing::trace!(address = %self.address, "no consumer with credit");
        Submission::Ready(Outcome::Released)
    }

    /// A copy goes to every consumer with credit. Pre-settled messages get pre-settled
    /// copies; otherwise the producer's outcome waits for every copy to be settled
    /// (`accepted` if any consumer accepted), which bounds a fast producer by its slowest
    /// consumer instead of dropping copies.
    fn submit_multicast(&self, message: Message, settled: bool) -> Submission {
        let mut consumers = self.consumers.lock().expect("poisoned");
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
        drop(consumers);
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
    fn credit_added(&self) {}

    fn detach(&self, consumer_id: u64, _closed: bool) {
        self.consumers.lock().expect("poisoned").retain(|slot| slot.id != consumer_id);
    }
}
