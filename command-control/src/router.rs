//! The command router: which adapter session holds each device's command subscription,
//! and the path of a command from `command/TENANT` to it (or into the deferred queue),
//! and of the device's response back to `command_response/TENANT/REPLY-ID`.
//!
//! Size: subscriptions, routing, deferral, responses and their traces share the router's
//! state and are read together (about 700 lines; the tests are in `tests/`); what cluster
//! mode adds to the path of a command is in `cluster.rs`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Header, MessageAnnotations, MessageId, Properties,
};
use fe2o3_amqp::types::primitives::{OrderedMap, SimpleValue, Symbol, Timestamp, Value};
use ferrule_messaging::address::{tenant_of, AddressRule, AddressType};
use ferrule_messaging::message::{condition, data_message, now_millis};
use ferrule_messaging::{
    AddressHandler, Broker, Message, MessagingConfig, Outcome, Submission, SubscribeOptions,
};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::{
    drain_cluster_deferred, hand_over, is_forwarded, CommandCluster, INSTANCE_MARK,
};
use crate::command::{parse, Command, CommandError};
use crate::request_id::{RequestId, RequestIdError, RequestKey};

/// A boxed future (object-safe traits).
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Where an adapter session takes commands for its device(s).
pub trait CommandSink: Send + Sync + 'static {
    /// Sends the command to the device. `Accepted` once delivered (for MQTT QoS 1 after
    /// the device's PUBACK), `Released` if the device is gone or did not acknowledge in
    /// time.
    fn deliver(&self, command: Command) -> BoxFuture<Outcome>;
}

/// What the router asks the device registry.
pub trait DeviceCheck: Send + Sync + 'static {
    /// Whether a gateway may act for a device (the device lists it in `via`).
    fn gateway_may_act_for(&self, tenant: &str, device: &str, gateway: &str) -> BoxFuture<bool>;
    /// Whether commands may go to (or be kept for) `device`: it exists and it and its
    /// tenant are enabled. `None` when the registry cannot tell now.
    fn may_receive_commands(&self, tenant: &str, device: &str) -> BoxFuture<Option<bool>>;
}

/// Whose commands a subscription receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One device: the subscriber itself, or a device a gateway subscribed for.
    Device(String),
    /// Every device that lists this gateway in `via` (MQTT `c//+/q/#`).
    AllDevicesOf { gateway: String },
}

/// Who subscribed, for the `ttd` notification sent on subscribe and unsubscribe.
#[derive(Debug, Clone)]
pub struct Notify {
    /// `hono-mqtt`, `hono-http`, `hono-coap`.
    pub adapter: &'static str,
    /// `ttd` announced on subscribe: -1 (until unsubscribed) or seconds (HTTP/CoAP polls).
    pub ttd: i32,
}

/// Why a response was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RespondError {
    #[error("{0}")]
    BadRequestId(#[from] CommandError),
    /// The request id was not issued to the answering device (nor to a device the
    /// answering gateway acts for): another device's command, or forged.
    #[error("the command with this request id was not sent to this device")]
    NotIssuedTo,
    #[error("no application is waiting for the response")]
    NoConsumer,
    #[error("response refused: {0}")]
    Refused(String),
}

/// A device's answer to a request/response command.
#[derive(Debug, Clone)]
pub struct Response {
    pub tenant: String,
    pub device_id: String,
    pub request_id: String,
    pub status: u16,
    pub payload: Bytes,
    pub content_type: Option<String>,
}

struct Entry {
    id: u64,
    sink: Arc<dyn CommandSink>,
}

#[derive(Default)]
struct Subscriptions {
    /// (tenant, device) → sessions, the most recent last (it wins).
    devices: HashMap<(String, String), Vec<Entry>>,
    /// tenant → (gateway, session) subscribed for all their devices.
    gateways: HashMap<String, Vec<(String, Entry)>>,
}

struct Inner {
    broker: Broker,
    devices: Arc<dyn DeviceCheck>,
    /// Seals and opens request ids.
    key: RequestKey,
    subscriptions: Mutex<Subscriptions>,
    next_id: AtomicU64,
    this: Weak<Inner>,
    /// Every task the router starts (routes in flight, deferred-command drains, ttd
    /// notifications), so that shutdown can wait for them.
    tasks: TaskTracker,
    /// Where devices were last seen: the last-known gateway wins among several.
    presence: Arc<crate::presence::Presence>,
    /// A span per command whose application sent a trace context.
    tracer: ferrule_net::trace::Tracer,
    /// The other instances, in cluster mode.
    cluster: std::sync::OnceLock<Arc<dyn CommandCluster>>,
}

/// Routes commands; register it with [`CommandRouter::install`]. Cheap to clone.
#[derive(Clone)]
pub struct CommandRouter {
    inner: Arc<Inner>,
}

/// Prefix of the per-device queues that hold deferred commands.
pub const DEFERRED_PREFIX: &str = "command_deferred";

/// The addresses command & control needs in the messaging core: one internal queue per
/// device for deferred commands (`command_deferred/TENANT/DEVICE`: applications cannot
/// reach it; expired commands are dropped, not dead-lettered). Give them to the broker
/// at construction ([`messaging_config`]), so that recovery at start-up knows them too.
pub fn address_rules() -> Vec<AddressRule> {
    vec![AddressRule::internal(&format!("{DEFERRED_PREFIX}/*"), AddressType::Queue)]
}

/// `config` with [`address_rules`] added.
pub fn messaging_config(mut config: MessagingConfig) -> MessagingConfig {
    for rule in address_rules() {
        if !config.addresses.contains(&rule) {
            config.addresses.push(rule);
        }
    }
    config
}

impl CommandRouter {
    /// A router over `broker`, which must have been built with [`address_rules`] for
    /// deferred commands to work (an error is logged otherwise).
    /// Request ids are sealed with `key`: every instance of a deployment needs the same.
    pub fn new(broker: Broker, devices: Arc<dyn DeviceCheck>, key: RequestKey) -> Self {
        Self::with_presence(broker, devices, key, Arc::default())
    }

    /// [`CommandRouter::new`] sharing `presence` with the adapters (see
    /// [`CommandRouter::presence`]).
    pub fn with_presence(
        broker: Broker,
        devices: Arc<dyn DeviceCheck>,
        key: RequestKey,
        presence: Arc<crate::presence::Presence>,
    ) -> Self {
        Self::with_parts(broker, devices, key, presence, ferrule_net::trace::Tracer::disabled())
    }

    /// [`CommandRouter::with_presence`], recording a span into `tracer` for each command
    /// whose message carries a `traceparent` application property (the application's
    /// trace continues through the platform, as in Hono 2.5+).
    pub fn with_parts(
        broker: Broker,
        devices: Arc<dyn DeviceCheck>,
        key: RequestKey,
        presence: Arc<crate::presence::Presence>,
        tracer: ferrule_net::trace::Tracer,
    ) -> Self {
        if !broker.is_internal(&format!("{DEFERRED_PREFIX}/t/d")) {
            tracing::error!(
                "the messaging core lacks command-control's address rules: deferred commands \
                 will be refused (build it with ferrule_command_control::messaging_config)"
            );
        }
        let inner = Arc::new_cyclic(|this| Inner {
            broker,
            devices,
            key,
            subscriptions: Mutex::new(Subscriptions::default()),
            next_id: AtomicU64::new(1),
            this: this.clone(),
            tasks: TaskTracker::new(),
            presence,
            tracer,
            cluster: std::sync::OnceLock::new(),
        });
        CommandRouter { inner }
    }

    /// Routes commands for devices connected to other instances through `cluster`, and
    /// records this instance's subscriptions there. Call before the first subscription.
    pub fn set_cluster(&self, cluster: Arc<dyn CommandCluster>) {
        if self.inner.cluster.set(cluster).is_err() {
            tracing::warn!("command cluster set twice; keeping the first");
        }
    }

    /// Where devices were last seen: the adapters report to it (it is the router's, so
    /// that among several gateways subscribed for a device's commands the one that last
    /// acted for it wins, Hono's last-known gateway rule).
    pub fn presence(&self) -> &Arc<crate::presence::Presence> {
        &self.inner.presence
    }

    /// Waits until every task the router started has ended: commands being routed get
    /// their outcome (the device sessions stop first, so they are answered or released),
    /// deferred-command drains end with their subscriptions.
    pub async fn stopped(&self) {
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    /// Takes over `command/...` in the messaging core.
    pub fn install(&self) {
        self.inner.broker.register_handler("command/", Arc::new(self.clone()));
    }

    /// Registers a session's command subscription; it lasts until the returned value is
    /// dropped. Deferred commands for a device target are delivered now.
    pub fn subscribe(
        &self,
        tenant: &str,
        target: Target,
        sink: Arc<dyn CommandSink>,
        notify: Notify,
    ) -> Subscription {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Entry { id, sink: sink.clone() };
        let notified_device = {
            let mut subs = self.inner.subscriptions.lock().expect("poisoned");
            match &target {
                Target::Device(device) => {
                    subs.devices
                        .entry((tenant.to_owned(), device.clone()))
                        .or_default()
                        .push(entry);
                    device.clone()
                }
                Target::AllDevicesOf { gateway } => {
                    subs.gateways
                        .entry(tenant.to_owned())
                        .or_default()
                        .push((gateway.clone(), entry));
                    gateway.clone()
                }
            }
        };
        self.inner.notify(tenant, &notified_device, notify.adapter, notify.ttd);
        let lease = self.inner.cluster.get().map(|cluster| cluster.hold(tenant, &target));
        let cancel = CancellationToken::new();
        if let (Target::Device(device), Some(cluster)) = (&target, self.inner.cluster.get()) {
            self.inner.tasks.spawn(drain_cluster_deferred(
                cluster.clone(),
                self.inner.key.clone(),
                tenant.to_owned(),
                device.clone(),
                sink.clone(),
                cancel.clone(),
            ));
        }
        if let Target::Device(device) = &target {
            self.inner.tasks.spawn(drain_deferred(
                self.inner.presence.clone(),
                self.inner.broker.clone(),
                self.inner.key.clone(),
                tenant.to_owned(),
                device.clone(),
                sink,
                cancel.clone(),
            ));
        }
        Subscription {
            router: Arc::downgrade(&self.inner),
            id,
            tenant: tenant.to_owned(),
            target,
            notify,
            notified_device,
            cancel,
            _lease: lease,
        }
    }

    /// Sends a device's response to the application that asked.
    pub async fn respond(&self, response: Response) -> Result<(), RespondError> {
        let id = RequestId::open(
            &self.inner.key,
            &response.tenant,
            &response.device_id,
            &response.request_id,
        )
        .map_err(|e| {
            let reason = match e {
                RequestIdError::NotIssuedTo => "not_issued_to_device",
                _ => "malformed",
            };
            metrics::counter!("ferrule_command_responses_refused_total", "tenant" => response.tenant.clone(), "reason" => reason).increment(1);
            match e {
                RequestIdError::NotIssuedTo => RespondError::NotIssuedTo,
                e => RespondError::BadRequestId(e.into()),
            }
        })?;
        let (correlation_id, reply_id) = (id.correlation_id, id.reply_id);
        // A command handed over from another instance: its application is there.
        let (instance, reply_id) = match reply_id.strip_prefix(INSTANCE_MARK) {
            Some(rest) => match rest.split_once('/') {
                Some((instance, rest)) => (Some(instance.to_owned()), rest.to_owned()),
                None => (None, reply_id),
            },
            None => (None, reply_id),
        };
        let address = format!("command_response/{}/{}", response.tenant, reply_id);
        let mut message = data_message(response.payload.to_vec());
        message.properties = Some(Properties {
            to: Some(address.clone()),
            correlation_id: Some(correlation_id),
            content_type: response.content_type.as_deref().map(Symbol::from),
            creation_time: Some(Timestamp::from_milliseconds(now_millis() as i64)),
            ..Default::default()
        });
        let mut app = OrderedMap::new();
        app.insert("status".to_owned(), SimpleValue::Int(response.status as i32));
        app.insert("device_id".to_owned(), SimpleValue::String(response.device_id.clone()));
        app.insert("tenant_id".to_owned(), SimpleValue::String(response.tenant.clone()));
        message.application_properties = Some(ApplicationProperties(app));
        let cluster = self.inner.cluster.get();
        let outcome = match (instance, cluster) {
            (Some(instance), Some(cluster)) if instance != cluster.instance() => {
                cluster.send(&instance, &response.tenant, &address, message).await
            }
            _ => self.inner.broker.submit(&address, message, false).outcome().await,
        };
        match outcome {
            Outcome::Accepted => Ok(()),
            Outcome::Released | Outcome::Modified { .. } => Err(RespondError::NoConsumer),
            Outcome::Rejected { description, .. } => Err(RespondError::Refused(description)),
        }
    }
}

/// A live command subscription; dropping it unsubscribes (and announces `ttd` 0).
pub struct Subscription {
    router: Weak<Inner>,
    id: u64,
    tenant: String,
    target: Target,
    notify: Notify,
    notified_device: String,
    cancel: CancellationToken,
    /// This instance's record of the subscription in cluster mode.
    _lease: Option<Box<dyn Send + Sync>>,
}

impl Subscription {
    pub fn target(&self) -> &Target {
        &self.target
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.cancel.cancel();
        let Some(inner) = self.router.upgrade() else { return };
        {
            let mut subs = inner.subscriptions.lock().expect("poisoned");
            match &self.target {
                Target::Device(device) => {
                    let key = (self.tenant.clone(), device.clone());
                    if let Some(list) = subs.devices.get_mut(&key) {
                        list.retain(|e| e.id != self.id);
                        if list.is_empty() {
                            subs.devices.remove(&key);
                        }
                    }
                }
                Target::AllDevicesOf { .. } => {
                    if let Some(list) = subs.gateways.get_mut(&self.tenant) {
                        list.retain(|(_, e)| e.id != self.id);
                        if list.is_empty() {
                            subs.gateways.remove(&self.tenant);
                        }
                    }
                }
            }
        }
        // Only subscriptions that stand until cancelled announce their end.
        if self.notify.ttd < 0 {
            inner.notify(&self.tenant, &self.notified_device, self.notify.adapter, 0);
        }
    }
}

impl Inner {
    /// The session to deliver to: the device's own (or a gateway's for it), else a
    /// gateway subscribed for all its devices that the device lists in `via`.
    async fn find(&self, tenant: &str, device: &str) -> Option<Arc<dyn CommandSink>> {
        let gateways: Vec<(String, Arc<dyn CommandSink>)> = {
            let subs = self.subscriptions.lock().expect("poisoned");
            if let Some(entry) =
                subs.devices.get(&(tenant.to_owned(), device.to_owned())).and_then(|l| l.last())
            {
                return Some(entry.sink.clone());
            }
            subs.gateways
                .get(tenant)
                .map(|l| l.iter().rev().map(|(g, e)| (g.clone(), e.sink.clone())).collect())
                .unwrap_or_default()
        };
        // The gateway that last acted for the device first (Hono), then the latest subscribed.
        let mut gateways = gateways;
        if let Some(last) = self.presence.last_gateway(tenant, device) {
            if let Some(at) = gateways.iter().position(|(g, _)| *g == last) {
                let preferred = gateways.remove(at);
                gateways.insert(0, preferred);
            }
        }
        for (gateway, sink) in gateways {
            if gateway == device || self.devices.gateway_may_act_for(tenant, device, &gateway).await
            {
                return Some(sink);
            }
        }
        None
    }

    /// Another instance with a subscription for `device`: its own (or a gateway's for it),
    /// else a gateway's for all its devices that the device lists in `via`.
    async fn holder(
        &self,
        cluster: &dyn CommandCluster,
        tenant: &str,
        device: &str,
    ) -> Option<String> {
        let me = cluster.instance();
        // Holders come oldest lease first: the latest renewed (alive, and the latest to
        // subscribe) is tried; a dead instance's lease is the oldest until it ends.
        if let Some(instance) =
            cluster.device_holders(tenant, device).await.into_iter().rev().find(|i| i != me)
        {
            return Some(instance);
        }
        for (gateway, instance) in cluster.gateway_holders(tenant).await.into_iter().rev() {
            if instance != me
                && (gateway == device
                    || self.devices.gateway_may_act_for(tenant, device, &gateway).await)
            {
                return Some(instance);
            }
        }
        None
    }

    /// Announces a device's command readiness (Hono's `ttd` empty notification event).
    fn notify(&self, tenant: &str, device: &str, adapter: &'static str, ttd: i32) {
        let address = format!("event/{tenant}");
        let mut message = data_message(Vec::new());
        message.header = Some(Header { durable: true, ..Default::default() });
        message.properties = Some(Properties {
            to: Some(address.clone()),
            content_type: Some(Symbol::from("application/vnd.eclipse-hono-empty-notification")),
            creation_time: Some(Timestamp::from_milliseconds(now_millis() as i64)),
            ..Default::default()
        });
        let mut app = OrderedMap::new();
        app.insert("device_id".to_owned(), SimpleValue::String(device.to_owned()));
        app.insert("ttd".to_owned(), SimpleValue::Int(ttd));
        app.insert("orig_adapter".to_owned(), SimpleValue::String(adapter.to_owned()));
        app.insert("qos".to_owned(), SimpleValue::Int(1));
        message.application_properties = Some(ApplicationProperties(app));
        let mut annotations = OrderedMap::new();
        annotations.insert(Symbol::from("tenant_id").into(), Value::String(tenant.to_owned()));
        annotations.insert(Symbol::from("device_id").into(), Value::String(device.to_owned()));
        message.message_annotations = Some(MessageAnnotations(annotations));
        let submission = self.broker.submit(&address, message, false);
        let (tenant, device) = (tenant.to_owned(), device.to_owned());
        self.tasks.spawn(async move {
            let outcome = submission.outcome().await;
            if !outcome.is_accepted() {
                tracing::debug!(%tenant, %device, ?outcome, "ttd notification not stored");
            }
        });
    }

    async fn route(self: Arc<Self>, tenant: String, message: Message) -> Outcome {
        let parent = self.tracer.enabled().then(|| traceparent(&message)).flatten();
        let start = ferrule_net::trace::now_ns();
        let name = message.properties.as_ref().and_then(|p| p.subject.clone());
        let to = message.properties.as_ref().and_then(|p| p.to.clone());
        let outcome = self.clone().route_traced(tenant.clone(), message).await;
        if let Some(parent) = parent {
            let mut attributes = vec![("tenant_id", tenant)];
            attributes.extend(to.map(|to| ("to", to)));
            attributes.extend(name.map(|name| ("command", name)));
            attributes.push(("outcome", format!("{outcome:?}")));
            self.tracer.record(ferrule_net::trace::Span {
                name: "command",
                kind: ferrule_net::trace::SpanKind::Consumer,
                context: parent.child(),
                parent: Some(parent.span_id),
                start_ns: start,
                end_ns: ferrule_net::trace::now_ns(),
                attributes,
                error: !outcome.is_accepted(),
            });
        }
        outcome
    }

    async fn route_traced(self: Arc<Self>, tenant: String, message: Message) -> Outcome {
        let parsed = match parse(&tenant, &message, &self.key) {
            Ok(parsed) => parsed,
            Err(e) => return Outcome::rejected(condition::INVALID_FIELD, e.to_string()),
        };
        let command = parsed.command;
        // A device that does not exist or is disabled gets no command, connected or not,
        // and none is kept for it.
        match self.devices.may_receive_commands(&tenant, &command.device_id).await {
            Some(true) => {}
            Some(false) => {
                metrics::counter!("ferrule_commands_total", "tenant" => tenant.clone(), "outcome" => "unknown_device").increment(1);
                return Outcome::rejected(
                    condition::NOT_FOUND,
                    format!("device {} does not exist or is disabled", command.device_id),
                );
            }
            None => return Outcome::Released,
        }
        if let Some(sink) = self.find(&tenant, &command.device_id).await {
            metrics::counter!("ferrule_commands_total", "tenant" => tenant.clone(), "outcome" => "delivered").increment(1);
            return sink.deliver(command).await;
        }
        let forwarded = is_forwarded(&message);
        if forwarded {
            // Handed over by another instance that saw the subscription here: it is gone.
            metrics::counter!("ferrule_commands_total", "tenant" => tenant.clone(), "outcome" => "not_connected").increment(1);
            return Outcome::Released;
        }
        if let Some(cluster) = self.cluster.get() {
            if let Some(instance) = self.holder(cluster.as_ref(), &tenant, &command.device_id).await
            {
                metrics::counter!("ferrule_commands_total", "tenant" => tenant.clone(), "outcome" => "handed_over").increment(1);
                let message = hand_over(message, &tenant, cluster.instance());
                let address = format!("command/{tenant}");
                return cluster.send(&instance, &tenant, &address, message).await;
            }
        }
        let Some(ttl) = parsed.defer_ttl else {
            metrics::counter!("ferrule_commands_total", "tenant" => tenant.clone(), "outcome" => "not_connected").increment(1);
            return Outcome::Released;
        };
        // Keep the original message, with the deferral as its time to live.
        let id = message_key(&message);
        let mut stored = message;
        let header = stored.header.get_or_insert_with(Header::default);
        header.durable = true;
        header.ttl = Some((ttl.saturating_mul(1000)).min(u32::MAX as u64) as u32);
        let expires = now_millis() + ttl.saturating_mul(1000);
        if let Some(cluster) = self.cluster.get() {
            // Kept where every instance finds it when the device comes back.
            let outcome = cluster.defer(&tenant, &command.device_id, stored, expires).await;
            metrics::counter!("ferrule_commands_total", "tenant" => tenant.clone(), "outcome" => "deferred").increment(1);
            if outcome.is_accepted() {
                if let Some(sink) = self.find(&command.tenant, &command.device_id).await {
                    self.tasks.spawn(drain_cluster_deferred(
                        cluster.clone(),
                        self.key.clone(),
                        command.tenant,
                        command.device_id,
                        sink,
                        CancellationToken::new(),
                    ));
                }
            }
            return outcome;
        }
        let queue = format!("{DEFERRED_PREFIX}/{tenant}/{}", command.device_id);
        let outcome = self.broker.submit(&queue, stored, false).outcome().await;
        if outcome.is_accepted() {
            self.presence.deferred(&tenant, &command.device_id, &id, &command.name, expires);
        }
        metrics::counter!("ferrule_commands_total", "tenant" => tenant, "outcome" => "deferred")
            .increment(1);
        // The device may have subscribed while the command was being stored.
        if outcome.is_accepted() {
            if let Some(sink) = self.find(&command.tenant, &command.device_id).await {
                let cancel = CancellationToken::new();
                self.tasks.spawn(drain_deferred(
                    self.presence.clone(),
                    self.broker.clone(),
                    self.key.clone(),
                    command.tenant,
                    command.device_id,
                    sink,
                    cancel,
                ));
            }
        }
        outcome
    }
}

impl AddressHandler for CommandRouter {
    fn submit(&self, address: &str, message: Message, settled: bool) -> Submission {
        // `command/TENANT` only; the device is in the message's `to`.
        let tenant = match (tenant_of(address), address.matches('/').count()) {
            (Some(tenant), 1) => tenant.to_owned(),
            _ => {
                return Submission::Ready(Outcome::rejected(
                    condition::NOT_FOUND,
                    format!("send commands to command/TENANT, not {address}"),
                ))
            }
        };
        let inner = self.inner.this.upgrade().expect("router alive");
        let (tx, rx) = oneshot::channel();
        inner.clone().tasks.spawn(async move {
            let outcome = inner.route(tenant, message).await;
            let _ = tx.send(outcome);
        });
        if settled {
            Submission::Ready(Outcome::Accepted)
        } else {
            Submission::Pending(rx)
        }
    }
}

/// Delivers the deferred commands of one device, oldest first, while its subscription
/// lasts. A command the device does not take stays queued for next time.
async fn drain_deferred(
    presence: Arc<crate::presence::Presence>,
    broker: Broker,
    key: RequestKey,
    tenant: String,
    device: String,
    sink: Arc<dyn CommandSink>,
    cancel: CancellationToken,
) {
    let queue = format!("{DEFERRED_PREFIX}/{tenant}/{device}");
    if broker.queue_depth(&queue).unwrap_or(0) == 0 {
        return;
    }
    let Ok(mut consumer) = broker.subscribe(&queue, &SubscribeOptions::default()) else { return };
    consumer.add_credit(1);
    loop {
        let delivery = tokio::select! {
            _ = cancel.cancelled() => return,
            d = consumer.recv() => match d { Some(d) => d, None => return },
        };
        let id = message_key(delivery.message());
        let command = match parse(&tenant, delivery.message(), &key) {
            Ok(parsed) => parsed.command,
            Err(e) => {
                delivery.settle(Outcome::rejected(condition::INVALID_FIELD, e.to_string()));
                consumer.add_credit(1);
                continue;
            }
        };
        let outcome = sink.deliver(command).await;
        let delivered = outcome.is_accepted();
        delivery.settle(if delivered { Outcome::Accepted } else { Outcome::Released });
        if delivered {
            presence.deferred_delivered(&tenant, &device, &id);
        }
        if !delivered {
            return;
        }
        consumer.add_credit(1);
        if broker.queue_depth(&queue).unwrap_or(0) == 0 {
            return;
        }
    }
}

/// How a deferred command is known in the device state API: the application's message id
/// (or correlation id), as text.
fn message_key(message: &Message) -> String {
    let properties = message.properties.as_ref();
    let id = properties.and_then(|p| p.message_id.as_ref().or(p.correlation_id.as_ref()));
    match id {
        Some(MessageId::String(s)) => s.clone(),
        Some(MessageId::Ulong(n)) => n.to_string(),
        Some(MessageId::Uuid(u)) => format!("{u:?}"),
        Some(MessageId::Binary(b)) => format!("{b:?}"),
        None => String::new(),
    }
}

/// The trace context an application put on its command (`traceparent` application
/// property).
fn traceparent(message: &Message) -> Option<ferrule_net::trace::TraceContext> {
    let ApplicationProperties(app) = message.application_properties.as_ref()?;
    match app.get(ferrule_net::trace::TRACEPARENT)? {
        SimpleValue::String(value) => ferrule_net::trace::TraceContext::parse(value),
        _ => None,
    }
}
