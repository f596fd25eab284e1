//! The broker: resolves addresses to nodes and is the in-process API the adapters use.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock, Weak};

use tokio_util::sync::CancellationToken;

use crate::address::{AddressTable, AddressType, DYNAMIC_PREFIX};
use crate::config::MessagingConfig;
use crate::delivery::Consumer;
use crate::direct::{DirectNode, Hold};
use crate::message::{condition, Message, Outcome, Submission};
use crate::queue::QueueNode;
use crate::store::{Store, StoreError};
use crate::topic::TopicNode;

/// Errors of the in-process API.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No address rule matches the address.
    #[error("address {0} does not exist")]
    NotFound(String),
    /// The durable store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The address's tenant has as many addresses as it may (`max_addresses_per_tenant`).
    #[error("tenant {tenant} has reached its limit of {max} addresses")]
    LimitReached { tenant: String, max: usize },
}

impl BrokerError {
    /// The AMQP error condition for this error.
    pub fn condition(&self) -> &'static str {
        match self {
            BrokerError::NotFound(_) => condition::NOT_FOUND,
            BrokerError::Store(_) => condition::INTERNAL_ERROR,
            BrokerError::LimitReached { .. } => condition::RESOURCE_LIMIT_EXCEEDED,
        }
    }
}

/// Options of [`Broker::subscribe`].
#[derive(Debug, Clone, Default)]
pub struct SubscribeOptions {
    /// For topics: the name of a durable subscription (kept while the consumer is away).
    pub durable_name: Option<String>,
}

#[derive(Clone)]
enum Node {
    Direct(Arc<DirectNode>),
    Queue(Arc<QueueNode>),
    Topic(Arc<TopicNode>),
}

/// Told when a consumer attaches to an address under a prefix (a remote backend starts
/// feeding the address from its broker then; see `remote`).
pub trait AttachHook: Send + Sync + 'static {
    /// A consumer was just attached to `address` (it is counted in
    /// [`Broker::consumer_count`] already).
    fn attached(&self, address: &str);
}

/// Takes over every message sent to addresses under a prefix (command & control handles
/// `command/` this way: it routes by the message's `to`, not by consumers on the address).
pub trait AddressHandler: Send + Sync + 'static {
    /// Handles one message; the outcome goes back to the producer.
    fn submit(&self, address: &str, message: Message, settled: bool) -> Submission;
}

pub(crate) struct Inner {
    handlers: RwLock<Vec<(String, Arc<dyn AddressHandler>)>>,
    hooks: RwLock<Vec<(String, Arc<dyn AttachHook>)>>,
    table: AddressTable,
    nodes: RwLock<HashMap<String, Node>>,
    store: Option<Store>,
    max_depth: usize,
    max_queue_bytes: usize,
    tenant_max_queue_bytes: usize,
    /// tenant → the bytes all its queues hold.
    tenant_queue_bytes: std::sync::Mutex<HashMap<String, Arc<crate::direct::Budget>>>,
    max_addresses_per_tenant: usize,
    /// tenant → how many of its addresses have a node (internal ones not counted);
    /// changed only under the `nodes` write lock.
    tenant_addresses: std::sync::Mutex<HashMap<String, usize>>,
    /// What anycast addresses hold for busy consumers (one budget for all of them).
    hold: Hold,
    this: Weak<Inner>,
}

/// The router/broker core. Cheap to clone; all clones share the same nodes and store.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl Broker {
    /// Opens the broker with its durable store at `data_dir/messaging.redb`, recovering
    /// every stored message and durable subscription.
    pub fn open(config: &MessagingConfig, data_dir: &Path) -> Result<Broker, BrokerError> {
        let (store, recovery) =
            Store::open(&data_dir.join("messaging.redb"), config.min_free_disk)?;
        let broker = Self::with_store(config, Some(store));
        let mut recovered = 0usize;
        for (queue_name, topic) in &recovery.subscriptions {
            if let Node::Topic(node) = broker.inner.node_for_recovery(topic, AddressType::Topic) {
                node.restore_subscription(queue_name);
            }
        }
        for (queue_name, messages) in recovery.queues {
            recovered += messages.len();
            let queue = match recovery.subscriptions.get(&queue_name) {
                Some(topic) => match broker.inner.node_for_recovery(topic, AddressType::Topic) {
                    Node::Topic(node) => node.restore_subscription(&queue_name),
                    _ => unreachable!("recovery created a topic"),
                },
                None => match broker.inner.node_for_recovery(&queue_name, AddressType::Queue) {
                    Node::Queue(queue) => queue,
                    _ => {
                        tracing::error!(queue = %queue_name, "stored messages under an address that is no longer a queue");
                        continue;
                    }
                },
            };
            for message in messages {
                queue.restore(message.seq, message.expiry, message.message);
            }
        }
        if recovered > 0 {
            tracing::info!(messages = recovered, "recovered stored messages");
        }
        Ok(broker)
    }

    /// A broker without durable storage (queues live in memory only): for tests.
    pub fn in_memory(config: &MessagingConfig) -> Broker {
        Self::with_store(config, None)
    }

    fn with_store(config: &MessagingConfig, store: Option<Store>) -> Broker {
        let inner = Arc::new_cyclic(|this| Inner {
            handlers: RwLock::new(Vec::new()),
            hooks: RwLock::new(Vec::new()),
            table: AddressTable::new(&config.addresses),
            nodes: RwLock::new(HashMap::new()),
            store,
            max_depth: config.queue_max_depth,
            max_queue_bytes: config.queue_max_bytes,
            tenant_max_queue_bytes: config.tenant_max_queue_bytes,
            tenant_queue_bytes: Default::default(),
            max_addresses_per_tenant: config.max_addresses_per_tenant,
            tenant_addresses: Default::default(),
            hold: Hold {
                max_wait: config.consumer_wait,
                max_bytes: config.consumer_wait_bytes,
                budget: Arc::new(crate::direct::Budget::new(config.consumer_wait_total_bytes)),
            },
            this: this.clone(),
        });
        Broker { inner }
    }

    /// Routes every message sent to an address starting with `prefix` to `handler`
    /// instead of the address's node.
    pub fn register_handler(&self, prefix: &str, handler: Arc<dyn AddressHandler>) {
        self.inner.handlers.write().expect("poisoned").push((prefix.to_owned(), handler));
    }

    /// Calls `hook` after every consumer attached to an address starting with `prefix`.
    pub fn register_attach_hook(&self, prefix: &str, hook: Arc<dyn AttachHook>) {
        self.inner.hooks.write().expect("poisoned").push((prefix.to_owned(), hook));
    }

    /// The type of `address`, or `None` if it does not exist.
    pub fn address_type(&self, address: &str) -> Option<AddressType> {
        self.inner.table.resolve(address)
    }

    /// Whether `address` is one of the platform's own (see [`AddressRule::internal`]).
    ///
    /// [`AddressRule::internal`]: crate::address::AddressRule::internal
    pub fn is_internal(&self, address: &str) -> bool {
        self.inner.table.rule(address).is_some_and(|rule| rule.internal)
    }

    /// Sends a message. `settled` = at most once: the caller will not wait for an outcome
    /// (a direct message without a consumer is then dropped and counted).
    ///
    /// Routing happens before this returns, so messages submitted one after the other
    /// from one task keep their order.
    pub fn submit(&self, address: &str, message: Message, settled: bool) -> Submission {
        if let Some(handler) = self.inner.handler_for(address) {
            return handler.submit(address, message, settled);
        }
        self.submit_local(address, message, settled)
    }

    /// Sends a message to `address`'s own node, past any [`AddressHandler`] (a remote
    /// backend delivers what its broker hands over this way).
    pub fn submit_local(&self, address: &str, message: Message, settled: bool) -> Submission {
        // A reply address nobody made has no consumer: released, and nothing is made for it
        // (a sender cannot fill the node table, or its tenant's address count, with them).
        if !per_tenant(address)
            && self.address_type(address) == Some(AddressType::Anycast)
            && !self.inner.nodes.read().expect("poisoned").contains_key(address)
        {
            return Submission::Ready(Outcome::Released);
        }
        match self.inner.node_for(address) {
            Ok(Node::Direct(node)) => node.submit(message, settled),
            Ok(Node::Queue(node)) => node.submit(message),
            Ok(Node::Topic(node)) => node.submit(message),
            Err(e) => Submission::Ready(Outcome::rejected(e.condition(), e.to_string())),
        }
    }

    /// Sends a message and waits for its outcome (at least once).
    pub async fn send(&self, address: &str, message: Message) -> Outcome {
        self.submit(address, message, false).outcome().await
    }

    /// Attaches a consumer to `address`. It receives nothing until given credit.
    pub fn subscribe(
        &self,
        address: &str,
        options: &SubscribeOptions,
    ) -> Result<Consumer, BrokerError> {
        let consumer = self.attach(address, options)?;
        let hook = {
            let hooks = self.inner.hooks.read().expect("poisoned");
            hooks
                .iter()
                .find(|(prefix, _)| address.starts_with(prefix.as_str()))
                .map(|(_, h)| h.clone())
        };
        if let Some(hook) = hook {
            hook.attached(address);
        }
        Ok(consumer)
    }

    /// How many consumers `address` has on this broker (0 if it has no node).
    pub fn consumer_count(&self, address: &str) -> usize {
        match self.inner.nodes.read().expect("poisoned").get(address) {
            Some(Node::Direct(node)) => node.consumer_count(),
            Some(Node::Queue(node)) => node.consumer_count(),
            Some(Node::Topic(_)) | None => 0,
        }
    }

    fn attach(&self, address: &str, options: &SubscribeOptions) -> Result<Consumer, BrokerError> {
        loop {
            return Ok(match self.inner.node_for(address)? {
                Node::Direct(node) => {
                    let consumer = node.subscribe(address);
                    // Idle direct nodes are collected: if this one was, between the look-up
                    // and the attach, attach to its successor instead.
                    if !self.inner.is_current(address, &node) {
                        drop(consumer);
                        continue;
                    }
                    consumer
                }
                Node::Queue(node) => node.subscribe(address),
                Node::Topic(node) => node.subscribe(options.durable_name.as_deref()),
            });
        }
    }

    /// Forgets direct addresses below the tenant level (`command_response/T/REPLY-ID`,
    /// `dynamic/T/ID`) with no consumer and nothing held: reply addresses and dynamic
    /// receivers that come and go must not add up. Returns how many were forgotten.
    /// Per-tenant addresses (`telemetry/T`) keep their node and counters; queues and topics
    /// are kept (they hold messages).
    pub fn collect_idle(&self) -> usize {
        let mut nodes = self.inner.nodes.write().expect("poisoned");
        let mut counts = self.inner.tenant_addresses.lock().expect("poisoned");
        let before = nodes.len();
        nodes.retain(|address, node| {
            let idle = matches!(node, Node::Direct(d) if !per_tenant(address) && d.is_idle());
            if idle {
                if let Some(count) =
                    self.inner.counted_tenant(address).and_then(|t| counts.get_mut(t))
                {
                    *count = count.saturating_sub(1);
                }
            }
            !idle
        });
        counts.retain(|_, count| *count > 0);
        before - nodes.len()
    }

    /// How many counted addresses `tenant` has now (see `max_addresses_per_tenant`).
    pub fn tenant_address_count(&self, tenant: &str) -> usize {
        self.inner.tenant_addresses.lock().expect("poisoned").get(tenant).copied().unwrap_or(0)
    }

    /// How many addresses have a node now (direct ones are made on use and collected
    /// when idle).
    pub fn node_count(&self) -> usize {
        self.inner.nodes.read().expect("poisoned").len()
    }

    /// Creates a consumer on a fresh address of `tenant` (AMQP dynamic receivers,
    /// reply addresses for request/response).
    ///
    /// # Errors
    /// The tenant has as many addresses as it may.
    pub fn subscribe_dynamic(&self, tenant: &str) -> Result<Consumer, BrokerError> {
        let address = format!("{DYNAMIC_PREFIX}/{tenant}/{}", uuid::Uuid::new_v4().simple());
        self.subscribe(&address, &SubscribeOptions::default())
    }

    /// Removes every message queue `address` holds (ready and in flight; from disk too).
    /// Returns how many there were, `None` if it is not a queue with a node.
    pub fn purge_queue(&self, address: &str) -> Option<usize> {
        let queue = match self.inner.nodes.read().expect("poisoned").get(address) {
            Some(Node::Queue(node)) => node.clone(),
            _ => return None,
        };
        let depth = queue.depth();
        queue.purge();
        Some(depth)
    }

    /// Messages held by queue `address` (stored, in flight or being written).
    pub fn queue_depth(&self, address: &str) -> Option<usize> {
        match self.inner.nodes.read().expect("poisoned").get(address) {
            Some(Node::Queue(node)) => Some(node.depth()),
            _ => None,
        }
    }

    /// Publishes per-address gauges and counters to the metrics recorder (called when
    /// metrics are scraped, so nothing is computed per message).
    pub fn publish_gauges(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let nodes: Vec<(String, Node)> = self
            .inner
            .nodes
            .read()
            .expect("poisoned")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        metrics::gauge!("ferrule_address_nodes").set(nodes.len() as f64);
        let budgets: Vec<(String, usize)> = {
            let budgets = self.inner.tenant_queue_bytes.lock().expect("poisoned");
            budgets.iter().map(|(tenant, budget)| (tenant.clone(), budget.used())).collect()
        };
        for (tenant, used) in budgets {
            metrics::gauge!("ferrule_tenant_queue_bytes", "tenant" => tenant).set(used as f64);
        }
        for (address, node) in nodes {
            match node {
                Node::Queue(q) => {
                    let labels = [("address", address)];
                    metrics::gauge!("ferrule_queue_depth", &labels).set(q.depth() as f64);
                    metrics::gauge!("ferrule_queue_bytes", &labels).set(q.bytes() as f64);
                    metrics::gauge!("ferrule_address_consumers", &labels)
                        .set(q.consumer_count() as f64);
                    let s = &q.stats;
                    for (name, value) in [
                        ("ferrule_queue_enqueued_total", &s.enqueued),
                        ("ferrule_queue_acknowledged_total", &s.acknowledged),
                        ("ferrule_queue_expired_total", &s.expired),
                        ("ferrule_queue_dead_lettered_total", &s.dead_lettered),
                        ("ferrule_queue_refused_full_total", &s.refused_full),
                        ("ferrule_queue_refused_storage_total", &s.refused_storage),
                    ] {
                        metrics::counter!(name, &labels).absolute(value.load(Relaxed));
                    }
                }
                // Addresses below the tenant level come and go (reply addresses): no series
                // of their own, or the series would add up.
                Node::Direct(d) if per_tenant(&address) => {
                    let labels = [("address", address)];
                    metrics::gauge!("ferrule_address_consumers", &labels)
                        .set(d.consumer_count() as f64);
                    for (name, value) in [
                        ("ferrule_direct_dropped_total", &d.dropped),
                        ("ferrule_direct_held_total", &d.held),
                        ("ferrule_direct_held_expired_total", &d.held_expired),
                    ] {
                        metrics::counter!(name, &labels).absolute(value.load(Relaxed));
                    }
                    metrics::gauge!("ferrule_direct_held_bytes", &labels)
                        .set(d.held_bytes() as f64);
                }
                _ => {}
            }
        }
    }

    /// Drops expired messages from all queues.
    pub fn sweep_expired(&self) {
        let queues: Vec<Arc<QueueNode>> = self
            .inner
            .nodes
            .read()
            .expect("poisoned")
            .values()
            .filter_map(|n| match n {
                Node::Queue(q) => Some(q.clone()),
                _ => None,
            })
            .collect();
        for queue in queues {
            queue.sweep();
        }
    }

    /// Runs periodic maintenance (expiry) until `shutdown`.
    pub async fn run_maintenance(self, interval: std::time::Duration, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {
                    self.sweep_expired();
                    self.collect_idle();
                }
            }
        }
    }

    /// Waits until everything accepted so far is on disk.
    /// Whether durable storage works, as its writer last saw it (no I/O; in-memory
    /// brokers are always healthy).
    pub fn storage_healthy(&self) -> bool {
        self.inner.store.as_ref().is_none_or(|store| store.healthy())
    }

    /// How long durable storage has been failing (`None` while it works).
    pub fn storage_failing_for(&self) -> Option<std::time::Duration> {
        self.inner.store.as_ref().and_then(|store| store.failing_for())
    }

    pub async fn flush(&self) -> Result<(), BrokerError> {
        if let Some(store) = &self.inner.store {
            store.flush().await?;
        }
        Ok(())
    }

    /// The end of the broker's life, once nothing sends any more: writes what is pending
    /// and closes the store (its file can be opened again, e.g. by a restart in the same
    /// process), and drops the address handlers (which hold broker handles of their own).
    /// Later durable sends fail.
    ///
    /// # Errors
    /// The last writes failed.
    pub async fn close(&self) -> Result<(), BrokerError> {
        self.inner.handlers.write().expect("poisoned").clear();
        self.inner.hooks.write().expect("poisoned").clear();
        if let Some(store) = &self.inner.store {
            store.close().await?;
        }
        Ok(())
    }
}

/// `PREFIX/TENANT`: an address of which there is one per tenant (and rule).
fn per_tenant(address: &str) -> bool {
    address.matches('/').count() <= 1
}

impl Inner {
    /// Whether `node` is still the node of `address` (not collected since it was looked up).
    fn is_current(&self, address: &str, node: &Arc<DirectNode>) -> bool {
        matches!(self.nodes.read().expect("poisoned").get(address), Some(Node::Direct(d)) if Arc::ptr_eq(d, node))
    }

    fn handler_for(&self, address: &str) -> Option<Arc<dyn AddressHandler>> {
        let handlers = self.handlers.read().expect("poisoned");
        if handlers.is_empty() {
            return None;
        }
        handlers
            .iter()
            .find(|(prefix, _)| address.starts_with(prefix.as_str()))
            .map(|(_, h)| h.clone())
    }

    fn node_for(&self, address: &str) -> Result<Node, BrokerError> {
        if let Some(node) = self.nodes.read().expect("poisoned").get(address) {
            return Ok(node.clone());
        }
        let kind =
            self.table.resolve(address).ok_or_else(|| BrokerError::NotFound(address.to_owned()))?;
        self.create(address, kind, true)
    }

    /// The tenant whose address count `address` is part of: `None` for the platform's
    /// internal addresses (bounded by the registry) and addresses without a tenant.
    fn counted_tenant<'a>(&self, address: &'a str) -> Option<&'a str> {
        if self.table.rule(address).is_some_and(|rule| rule.internal) {
            return None;
        }
        crate::address::tenant_of(address)
    }

    /// The byte budget all queues of `address`'s tenant share.
    fn tenant_budget(&self, address: &str) -> Arc<crate::direct::Budget> {
        let tenant = crate::address::tenant_of(address).unwrap_or_default();
        let mut budgets = self.tenant_queue_bytes.lock().expect("poisoned");
        if let Some(budget) = budgets.get(tenant) {
            return budget.clone();
        }
        let budget = Arc::new(crate::direct::Budget::new(self.tenant_max_queue_bytes));
        budgets.insert(tenant.to_owned(), budget.clone());
        budget
    }

    /// Like `node_for`, but creates the node with the stored kind even if the
    /// configuration no longer says so: stored messages are never silently dropped.
    fn node_for_recovery(&self, address: &str, stored: AddressType) -> Node {
        match self.table.resolve(address) {
            Some(kind) if kind == stored => {}
            other => {
                tracing::warn!(address, configured = ?other, ?stored, "address type changed; keeping stored data as {stored:?}")
            }
        }
        let mut nodes = self.nodes.write().expect("poisoned");
        if let Some(node) = nodes.get(address) {
            return node.clone();
        }
        // Not limited: stored messages are never dropped.
        self.count_address(address, false);
        self.insert(&mut nodes, address, stored)
    }

    /// The node of `address`, made as `kind` if it has none, unless its tenant has as many
    /// addresses as it may.
    fn create(&self, address: &str, kind: AddressType, limited: bool) -> Result<Node, BrokerError> {
        let mut nodes = self.nodes.write().expect("poisoned");
        if let Some(node) = nodes.get(address) {
            return Ok(node.clone());
        }
        if !self.count_address(address, limited) {
            let tenant = crate::address::tenant_of(address).unwrap_or_default().to_owned();
            metrics::counter!("ferrule_tenant_limit_refusals_total", "tenant" => tenant.clone(), "adapter" => "amqp", "limit" => "addresses").increment(1);
            return Err(BrokerError::LimitReached { tenant, max: self.max_addresses_per_tenant });
        }
        Ok(self.insert(&mut nodes, address, kind))
    }

    /// Counts one more address for `address`'s tenant; `false` (and nothing counted) if
    /// `limited` and the tenant has as many as it may. Called under the `nodes` write lock.
    fn count_address(&self, address: &str, limited: bool) -> bool {
        let Some(tenant) = self.counted_tenant(address) else { return true };
        let mut counts = self.tenant_addresses.lock().expect("poisoned");
        let count = counts.get(tenant).copied().unwrap_or(0);
        if limited && count >= self.max_addresses_per_tenant {
            return false;
        }
        counts.insert(tenant.to_owned(), count + 1);
        true
    }

    /// Makes the node of `address` (the caller holds the `nodes` write lock and checked
    /// that there is none).
    fn insert(&self, nodes: &mut HashMap<String, Node>, address: &str, kind: AddressType) -> Node {
        let limits = || crate::queue::QueueLimits {
            max_depth: self.max_depth,
            max_bytes: self.max_queue_bytes,
            tenant: self.tenant_budget(address),
        };
        nodes
            .entry(address.to_owned())
            .or_insert_with(|| match kind {
                AddressType::Anycast => {
                    Node::Direct(DirectNode::new(address, false, self.hold.clone()))
                }
                AddressType::Multicast => {
                    Node::Direct(DirectNode::new(address, true, self.hold.clone()))
                }
                AddressType::Queue => Node::Queue(QueueNode::new(
                    address,
                    self.store.clone(),
                    limits(),
                    self.this.clone(),
                    // Internal queues (deferred commands) expire by design: no dead letters.
                    !self.table.rule(address).is_some_and(|rule| rule.internal),
                )),
                AddressType::Topic => Node::Topic(TopicNode::new(
                    address,
                    self.store.clone(),
                    limits(),
                    self.this.clone(),
                )),
            })
            .clone()
    }
}

impl crate::queue::DeadLetters for Inner {
    /// Enqueues into a store-and-forward address (dead letters); `done` gets the outcome.
    fn enqueue_internal(
        &self,
        address: &str,
        message: Message,
        done: Box<dyn FnOnce(Outcome) + Send>,
    ) {
        match self.node_for(address) {
            Ok(Node::Queue(queue)) => queue.enqueue(message, done),
            Ok(_) => done(Outcome::rejected(
                condition::NOT_ALLOWED,
                "dead-letter address is not a queue",
            )),
            Err(e) => done(Outcome::rejected(e.condition(), e.to_string())),
        }
    }
}
