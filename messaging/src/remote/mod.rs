//! A shared AMQP 1.0 broker as the messaging backend (`[messaging.backend] kind = "amqp"`):
//! how N stateless Ferrule instances serve the same tenants.
//!
//! ```text
//! device ─> adapter ─> Broker::submit("telemetry/T") ─> Forwarder ─> sender actor ─┐
//!                                                                                  │ one link
//!                                                                                  v (own session)
//!                                                                       shared broker (RabbitMQ,
//!                                                                       or a Ferrule broker)
//! application <─ AMQP server <─ local direct node "telemetry/T" <─ bridge <────────┘
//! ```
//! - **Producing** (`forward.rs`): the local broker hands every message for `telemetry/T`
//!   and `event/T` to the forwarder (an `AddressHandler`); it goes to one actor per
//!   broker address, which owns one sender link and answers each producer with the
//!   broker's outcome. Order is kept per address (one actor, one link). A lost link or
//!   connection, or no outcome within `outcome_timeout`, answers `released`: the outcome is
//!   unknown and the device is told to retry (at least once, never a false acknowledgement).
//! - **Consuming** (`bridge.rs`): while an application has a consumer on `telemetry/T` or
//!   `event/T` on this instance, a bridge holds a receiver link at the broker and submits
//!   what it gets to the local node, passing the application's outcome back. Instances
//!   compete for the broker's queue, so an application attached anywhere gets everything.
//!   Locally `event/T` is a direct address (nothing is stored on the instance).
//! - **No consumer** (Hono: telemetry nobody consumes gets 503): a Ferrule broker answers
//!   `released` itself; RabbitMQ accepts and drops it, so with the `rabbitmq` scheme the
//!   instances keep [`ConsumerLeases`] (Redis) and a forwarder checks them first.
//! - **RabbitMQ 3.x quirks** (SCALEOUT-NOTES): one session per link (an attach error ends
//!   the session), links detached rather than closed, no delivery annotations, `header.ttl`
//!   rather than an absolute expiry, `user-id` dropped, quorum queues and the telemetry
//!   policy made through the management API ([`Provision`]), since AMQP 1.0 cannot.

mod bridge;
mod forward;
mod pool;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;

use crate::config::{AddressScheme, BackendConfig};
use crate::{Broker, Message, Submission};

pub use pool::parse_url;

/// Which consumers exist anywhere in the deployment, for brokers that cannot say
/// (RabbitMQ accepts and drops a message nobody will consume).
pub trait ConsumerLeases: Send + Sync + 'static {
    /// Whether any instance has a consumer on `address` now.
    fn has_consumer(&self, address: &str) -> BoxFuture<'static, bool>;
    /// Records that this instance has a consumer on `address` until the returned guard is
    /// dropped (renewed meanwhile).
    fn hold(&self, address: &str) -> Box<dyn Send + Sync>;
}

/// Makes the broker objects a tenant needs that AMQP 1.0 cannot declare (RabbitMQ: the
/// quorum queue for its events).
pub trait Provision: Send + Sync + 'static {
    /// Makes sure `tenant`'s event queue exists (idempotent).
    fn event_queue(&self, tenant: &str) -> BoxFuture<'static, Result<(), String>>;
}

/// The two address classes the shared broker carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    Telemetry,
    Event,
}

impl Kind {
    /// `(kind, tenant)` of a Hono address the backend carries (`telemetry/T`, `event/T`).
    pub(crate) fn of(address: &str) -> Option<(Kind, &str)> {
        let (prefix, tenant) = address.split_once('/')?;
        if tenant.is_empty() || tenant.contains('/') {
            return None;
        }
        match prefix {
            "telemetry" => Some((Kind::Telemetry, tenant)),
            "event" => Some((Kind::Event, tenant)),
            _ => None,
        }
    }
}

impl AddressScheme {
    /// Where instances send messages of `kind` for `tenant`.
    pub(crate) fn target(self, kind: Kind, tenant: &str) -> String {
        match (self, kind) {
            (AddressScheme::Rabbitmq, Kind::Telemetry) => format!("/amq/queue/telemetry.{tenant}"),
            (AddressScheme::Rabbitmq, Kind::Event) => format!("/amq/queue/event.{tenant}"),
            (AddressScheme::Hono, Kind::Telemetry) => format!("telemetry/{tenant}"),
            (AddressScheme::Hono, Kind::Event) => format!("event/{tenant}"),
        }
    }

    /// Where instances receive them from. RabbitMQ's telemetry queue is declared by its
    /// consumers (`/queue/…`: made on demand, removed by the policy's `expires` when
    /// nobody consumes), and senders never declare it (`/amq/queue/…`).
    pub(crate) fn source(self, kind: Kind, tenant: &str) -> String {
        match (self, kind) {
            (AddressScheme::Rabbitmq, Kind::Telemetry) => format!("/queue/telemetry.{tenant}"),
            _ => self.target(kind, tenant),
        }
    }
}

/// Shared by the forwarder, its actors and the bridges.
pub(crate) struct Inner {
    pub(crate) config: BackendConfig,
    pub(crate) broker: Broker,
    pub(crate) pool: pool::Pool,
    pub(crate) leases: Option<Arc<dyn ConsumerLeases>>,
    pub(crate) provision: Option<Arc<dyn Provision>>,
    /// Tenants whose event queue is known to exist.
    pub(crate) provisioned: Mutex<HashSet<String>>,
    /// Broker address → its sender actor.
    pub(crate) senders: Mutex<HashMap<String, tokio::sync::mpsc::Sender<forward::Job>>>,
    /// Local addresses with a running bridge.
    pub(crate) bridges: Mutex<HashSet<String>>,
    /// This instance's name (link names, connection container id).
    pub(crate) instance: String,
    /// What the endpoint is, in log messages.
    pub(crate) label: &'static str,
    /// Set by `close`: links failing from now on are the shutdown, not a fault.
    pub(crate) closing: std::sync::atomic::AtomicBool,
}

impl Inner {
    pub(crate) fn closing(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Inner {
    /// Makes sure `tenant`'s event queue exists, once per process.
    pub(crate) async fn provision_events(&self, tenant: &str) -> Result<(), String> {
        let Some(provision) = &self.provision else { return Ok(()) };
        if self.provisioned.lock().expect("poisoned").contains(tenant) {
            return Ok(());
        }
        provision.event_queue(tenant).await?;
        self.provisioned.lock().expect("poisoned").insert(tenant.to_owned());
        Ok(())
    }
}

/// The remote backend, installed into the local broker (see the module docs).
#[derive(Clone)]
pub struct Remote {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("instance", &self.inner.instance).finish_non_exhaustive()
    }
}

impl Remote {
    /// Routes `broker`'s telemetry and events through the shared broker of `config`
    /// (connections are made on first use, and again whenever one is lost).
    pub fn install(
        broker: &Broker,
        config: &BackendConfig,
        instance: &str,
        leases: Option<Arc<dyn ConsumerLeases>>,
        provision: Option<Arc<dyn Provision>>,
    ) -> Remote {
        let inner = Arc::new(Inner {
            config: config.clone(),
            broker: broker.clone(),
            pool: pool::Pool::new(config, instance),
            leases,
            provision,
            provisioned: Default::default(),
            closing: Default::default(),
            senders: Default::default(),
            bridges: Default::default(),
            instance: instance.to_owned(),
            label: "the shared broker",
        });
        let remote = Remote { inner };
        tokio::spawn(watch_broker(Arc::downgrade(&remote.inner)));
        for prefix in ["telemetry/", "event/"] {
            broker.register_handler(prefix, Arc::new(forward::Forwarder(remote.inner.clone())));
            broker.register_attach_hook(prefix, Arc::new(bridge::Bridges(remote.inner.clone())));
        }
        remote
    }

    /// Whether the shared broker was reachable when last checked (every 2 s) or used:
    /// what the instance's readiness follows in cluster mode.
    pub fn broker_reachable(&self) -> bool {
        self.inner.pool.reachable()
    }

    /// Ends every connection to the broker (links first; what is in flight is answered).
    pub async fn close(&self) {
        self.inner.closing.store(true, std::sync::atomic::Ordering::Release);
        self.inner.senders.lock().expect("poisoned").clear();
        self.inner.pool.close().await;
    }
}

/// Checks the shared broker every [`pool::CHECK_INTERVAL`] until the backend closes.
async fn watch_broker(inner: std::sync::Weak<Inner>) {
    loop {
        let Some(inner) = inner.upgrade().filter(|i| !i.closing()) else { return };
        inner.pool.check().await;
        drop(inner);
        tokio::time::sleep(pool::CHECK_INTERVAL).await;
    }
}

/// Plain relaying to another AMQP 1.0 endpoint with Hono's addresses (a peer Ferrule
/// instance): the same pooled connections and per-address actors as the shared broker's,
/// without consumer leases, provisioning or message rewriting.
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("urls", &self.inner.config.urls).finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay to the endpoint of `config` (`urls`, credentials, `tls_ca_file`,
    /// `outcome_timeout`; a `name@*` user connects per tenant as `name@TENANT`).
    pub fn new(broker: &Broker, config: &BackendConfig, instance: &str) -> Relay {
        let inner = Arc::new(Inner {
            config: config.clone(),
            broker: broker.clone(),
            pool: pool::Pool::new(config, instance),
            leases: None,
            provision: None,
            provisioned: Default::default(),
            closing: Default::default(),
            senders: Default::default(),
            bridges: Default::default(),
            instance: instance.to_owned(),
            label: "a peer instance",
        });
        Relay { inner }
    }

    /// Sends `message` to `address` over a connection for `tenant`; the submission
    /// answers with the endpoint's outcome (`released` when it cannot be reached or does
    /// not answer within `outcome_timeout`).
    pub fn send(&self, tenant: &str, address: &str, message: Message, settled: bool) -> Submission {
        forward::enqueue(&self.inner, None, tenant, address, message, settled)
    }

    /// Ends its connections.
    pub async fn close(&self) {
        self.inner.closing.store(true, std::sync::atomic::Ordering::Release);
        self.inner.senders.lock().expect("poisoned").clear();
        self.inner.pool.close().await;
    }
}

/// The address rules a remote backend needs locally: `event/T` becomes a direct address
/// (the shared broker stores events; an instance only passes them on).
pub fn local_rules() -> Vec<crate::address::AddressRule> {
    vec![crate::address::AddressRule::new("event/+", crate::address::AddressType::Anycast)]
}

/// Readies `message` for the shared broker: no delivery annotations (RabbitMQ 3.x ends
/// the session), a relative `ttl` rather than an absolute expiry (which RabbitMQ ignores),
/// no `user-id` (RabbitMQ refuses one that is not the connection's user), durable for
/// events only.
pub(crate) fn prepare(mut message: Message, kind: Kind) -> Message {
    message.delivery_annotations = None;
    let now = crate::message::now_millis();
    let expiry = crate::message::expiry_of(&message, now);
    let header = message.header.get_or_insert_with(Default::default);
    header.durable = kind == Kind::Event;
    if let Some(expiry) = expiry {
        header.ttl = Some(expiry.saturating_sub(now).clamp(1, u32::MAX as u64) as u32);
    }
    if let Some(properties) = message.properties.as_mut() {
        properties.user_id = None;
    }
    message
}

/// A ready answer for an address the backend does not carry.
pub(crate) fn not_carried(address: &str) -> Submission {
    Submission::Ready(crate::Outcome::rejected(
        crate::message::condition::NOT_FOUND,
        format!("address {address} is not available with a shared broker"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::messaging::{Header, Properties};
    use fe2o3_amqp_types::primitives::Timestamp;

    #[test]
    fn kinds_and_addresses() {
        assert_eq!(Kind::of("telemetry/t1"), Some((Kind::Telemetry, "t1")));
        assert_eq!(Kind::of("event/t1"), Some((Kind::Event, "t1")));
        assert_eq!(Kind::of("event/t1/dlq"), None);
        assert_eq!(Kind::of("event/"), None);
        assert_eq!(Kind::of("command/t1"), None);
        let r = AddressScheme::Rabbitmq;
        assert_eq!(r.target(Kind::Event, "t1"), "/amq/queue/event.t1");
        assert_eq!(r.source(Kind::Event, "t1"), "/amq/queue/event.t1");
        assert_eq!(r.target(Kind::Telemetry, "t1"), "/amq/queue/telemetry.t1");
        assert_eq!(r.source(Kind::Telemetry, "t1"), "/queue/telemetry.t1");
        assert_eq!(AddressScheme::Hono.source(Kind::Telemetry, "t1"), "telemetry/t1");
    }

    #[test]
    fn prepare_makes_ttl_relative_and_drops_what_rabbitmq_refuses() {
        let mut m = crate::message::data_message(b"x".to_vec());
        let in_a_minute = crate::message::now_millis() as i64 + 60_000;
        m.properties = Some(Properties {
            absolute_expiry_time: Some(Timestamp::from_milliseconds(in_a_minute)),
            user_id: Some(vec![1u8].into()),
            ..Default::default()
        });
        m.delivery_annotations = Some(Default::default());
        let out = prepare(m, Kind::Event);
        let header = out.header.unwrap();
        assert!(header.durable);
        assert!((55_000..=60_000).contains(&header.ttl.unwrap()), "{:?}", header.ttl);
        assert!(out.delivery_annotations.is_none());
        assert!(out.properties.unwrap().user_id.is_none());
        let mut t = crate::message::data_message(b"x".to_vec());
        t.header = Some(Header { durable: true, ..Default::default() });
        let out = prepare(t, Kind::Telemetry);
        assert!(!out.header.as_ref().unwrap().durable);
        assert_eq!(out.header.unwrap().ttl, None);
    }
}
