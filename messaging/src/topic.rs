//! Topics: store-and-forward publish/subscribe. Each subscription is a queue of its own;
//! a named (durable) subscription is persisted and keeps collecting messages while its
//! subscriber is away, an unnamed one lives as long as its consumer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::oneshot;

use crate::delivery::{Consumer, ConsumerHost};
use crate::message::Submission;
use crate::message::{Message, Outcome};
use crate::queue::{BrokerRef, QueueLimits, QueueNode};
use crate::store::Store;

pub(crate) struct TopicNode {
    address: String,
    store: Option<Store>,
    limits: QueueLimits,
    broker: BrokerRef,
    subscriptions: Mutex<HashMap<String, Subscription>>,
    this: Weak<TopicNode>,
}

struct Subscription {
    queue: Arc<QueueNode>,
    durable: bool,
}

impl TopicNode {
    pub(crate) fn new(
        address: &str,
        store: Option<Store>,
        limits: QueueLimits,
        broker: BrokerRef,
    ) -> Arc<Self> {
        Arc::new_cyclic(|this| Self {
            address: address.to_owned(),
            store,
            limits,
            broker,
            subscriptions: Mutex::new(HashMap::new()),
            this: this.clone(),
        })
    }

    /// The queue name of subscription `name` on this topic.
    pub(crate) fn queue_name(&self, name: &str) -> String {
        format!("{}::{}", self.address, name)
    }

    /// Re-creates a durable subscription found on disk; returns its queue for the
    /// recovered messages.
    pub(crate) fn restore_subscription(&self, queue_name: &str) -> Arc<QueueNode> {
        let queue = QueueNode::new(
            queue_name,
            self.store.clone(),
            self.limits.clone(),
            self.broker.clone(),
            true,
        );
        self.subscriptions
            .lock()
            .expect("poisoned")
            .insert(queue_name.to_owned(), Subscription { queue: queue.clone(), durable: true });
        queue
    }

    /// Attaches a subscriber. With a `durable_name`, the subscription outlives the consumer
    /// (and the process) until the consumer closes it explicitly.
    pub(crate) fn subscribe(&self, durable_name: Option<&str>) -> Consumer {
        let (queue_name, durable) = match durable_name {
            Some(name) => (self.queue_name(name), true),
            None => (self.queue_name(&uuid::Uuid::new_v4().to_string()), false),
        };
        let mut subscriptions = self.subscriptions.lock().expect("poisoned");
        let queue = subscriptions
            .entry(queue_name.clone())
            .or_insert_with(|| {
                let store = if durable { self.store.clone() } else { None };
                let queue = QueueNode::new(
                    &queue_name,
                    store,
                    self.limits.clone(),
                    self.broker.clone(),
                    true,
                );
                if durable {
                    if let Some(store) = &self.store {
                        store.put_subscription(&queue.name, &self.address);
                    }
                }
                Subscription { queue, durable }
            })
            .queue
            .clone();
        drop(subscriptions);
        let (id, credit, rx) = queue.attach();
        // The topic, not the queue, hosts the consumer, so it learns when it goes away.
        let host = Arc::new(SubscriptionHost { topic: self.this.clone(), queue, queue_name });
        Consumer { id, address: self.address.clone(), credit, rx, host, closed: false }
    }

    pub(crate) fn submit(&self, message: Message) -> Submission {
        let queues: Vec<Arc<QueueNode>> = self
            .subscriptions
            .lock()
            .expect("poisoned")
            .values()
            .map(|s| s.queue.clone())
            .collect();
        if queues.is_empty() {
            return Submission::Ready(Outcome::Accepted);
        }
        let (tx, rx) = oneshot::channel();
        let tally = Arc::new(Tally {
            remaining: AtomicUsize::new(queues.len()),
            first_failure: Mutex::new(None),
            tx: Mutex::new(Some(tx)),
        });
        for queue in queues {
            let tally = tally.clone();
            queue.enqueue(message.clone(), Box::new(move |outcome| tally.record(outcome)));
        }
        Submission::Pending(rx)
    }

    fn unsubscribe(&self, queue_name: &str, closed: bool, queue: &QueueNode) {
        let mut subscriptions = self.subscriptions.lock().expect("poisoned");
        let Some(subscription) = subscriptions.get(queue_name) else { return };
        if subscription.durable && !closed {
            return;
        }
        if queue.consumer_count() > 0 {
            return;
        }
        let removed = subscriptions.remove(queue_name).expect("present");
        drop(subscriptions);
        removed.queue.purge();
        if removed.durable {
            if let Some(store) = &self.store {
                store.delete_subscription(&removed.queue.name);
            }
        }
    }
}

/// Counts the outcomes of one publication across subscriptions: accepted when every
/// subscription stored it, otherwise the first failure.
struct Tally {
    remaining: AtomicUsize,
    first_failure: Mutex<Option<Outcome>>,
    tx: Mutex<Option<oneshot::Sender<Outcome>>>,
}

impl Tally {
    fn record(&self, outcome: Outcome) {
        if !outcome.is_accepted() {
            self.first_failure.lock().expect("poisoned").get_or_insert(outcome);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let outcome =
                self.first_failure.lock().expect("poisoned").take().unwrap_or(Outcome::Accepted);
            if let Some(tx) = self.tx.lock().expect("poisoned").take() {
                let _ = tx.send(outcome);
            }
        }
    }
}

struct SubscriptionHost {
    topic: Weak<TopicNode>,
    queue: Arc<QueueNode>,
    queue_name: String,
}

impl ConsumerHost for SubscriptionHost {
    fn credit_added(&self) {
        self.queue.credit_added();
    }

    fn detach(&self, consumer_id: u64, closed: bool) {
        self.queue.detach(consumer_id, closed);
        if let Some(topic) = self.topic.upgrade() {
            topic.unsubscribe(&self.queue_name, closed, &self.queue);
        }
    }
}
