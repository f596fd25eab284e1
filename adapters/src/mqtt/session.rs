//! Per-connection protocol state: who is connected, over which MQTT version, whether
//! publish errors are reported on the error topic instead of closing the connection, and
//! the connection's command subscriptions.
//!
//! A session lives on one ntex worker thread (ntex sessions are `Rc`-based), so plain
//! `RefCell`s are enough.

use std::cell::RefCell;

use ferrule_command_control::Subscription;

use crate::device::DeviceIdentity;
pub use crate::door::{Target, TargetError};

use super::command::Outbox;
use super::mapping::{ErrorReport, ErrorSubscription, PublishAddress};

/// The MQTT protocol version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V3_1_1,
    V5,
}

/// Who is on the other end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Authenticated by username/password.
    Device(DeviceIdentity),
    /// Connected without credentials (only where the adapter allows it); every publish
    /// must name tenant and device.
    Anonymous,
}

/// One connection's state.
#[derive(Debug)]
pub struct Session {
    pub principal: Principal,
    pub version: Version,
    pub client_id: String,
    error_subscription: RefCell<Option<ErrorSubscription>>,
    commands: RefCell<Commands>,
    /// The connection's ordered QoS 0 queue (see `connection::queue_qos0`).
    pub(super) qos0: RefCell<Qos0Slot>,
    /// QoS 0 publishes waiting in, or being sent by, that queue.
    pub(super) qos0_pending: std::cell::Cell<usize>,
    /// The device's place in its tenant's connection count, given back when the
    /// connection ends.
    slot: RefCell<Option<crate::door::ConnectionSlot>>,
    /// The Will from CONNECT, published if the connection ends without DISCONNECT.
    will: RefCell<Option<super::will::Will>>,
    /// Cancelled when the session is dropped (the connection ended): ends the tasks that
    /// watch it.
    ended: tokio_util::sync::CancellationToken,
    /// The last registry decision for a publish (see `door::Memo`).
    pub(super) memo: crate::door::Memo,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.ended.cancel();
    }
}

/// A QoS 0 publish on its way: owns everything it needs, so it can move to the queue.
pub(super) type Qos0Send = std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

/// The QoS 0 queue's sender, created on first use; `Closed` once the connection ended.
#[derive(Default)]
pub(super) enum Qos0Slot {
    #[default]
    Idle,
    Open(tokio::sync::mpsc::Sender<Qos0Send>),
    Closed,
}

impl std::fmt::Debug for Qos0Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Qos0Slot::Idle => "Idle",
            Qos0Slot::Open(_) => "Open",
            Qos0Slot::Closed => "Closed",
        })
    }
}

/// The connection's command subscriptions (by topic filter) and, once there is one, the
/// outbox their commands go through.
#[derive(Default)]
struct Commands {
    outbox: Option<Outbox>,
    subscriptions: Vec<(String, Subscription)>,
}

impl Drop for Commands {
    fn drop(&mut self) {
        // Ending a subscription makes the router spawn its `ttd` notification, which needs
        // the worker's runtime; connections normally end through `end_commands` while it
        // runs. Should a session outlive it (the worker tearing down), the subscriptions
        // are left to die with the process rather than panic.
        if !self.subscriptions.is_empty() && tokio::runtime::Handle::try_current().is_err() {
            tracing::debug!(
                count = self.subscriptions.len(),
                "command subscriptions left at shutdown"
            );
            std::mem::forget(std::mem::take(&mut self.subscriptions));
        }
    }
}

impl std::fmt::Debug for Commands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let filters: Vec<&str> = self.subscriptions.iter().map(|(f, _)| f.as_str()).collect();
        f.debug_struct("Commands").field("filters", &filters).finish()
    }
}

impl Session {
    pub fn new(principal: Principal, version: Version, client_id: String) -> Self {
        Self {
            principal,
            version,
            client_id,
            error_subscription: RefCell::new(None),
            commands: RefCell::default(),
            qos0: RefCell::default(),
            qos0_pending: std::cell::Cell::new(0),
            slot: RefCell::new(None),
            will: RefCell::new(None),
            ended: tokio_util::sync::CancellationToken::new(),
            memo: crate::door::Memo::default(),
        }
    }

    /// This session with the Will from its CONNECT.
    pub(super) fn with_will(self, will: Option<super::will::Will>) -> Self {
        *self.will.borrow_mut() = will;
        self
    }

    /// The Will, taken out (to publish it).
    pub(super) fn take_will(&self) -> Option<super::will::Will> {
        self.will.borrow_mut().take()
    }

    /// This session holding `slot` until [`Session::release_slot`] (or its drop).
    pub fn holding(self, slot: Option<crate::door::ConnectionSlot>) -> Self {
        *self.slot.borrow_mut() = slot;
        self
    }

    /// Gives the tenant's connection slot back (the connection ended); this also ends the
    /// task waiting to close the connection on revocation.
    pub fn release_slot(&self) {
        if let Some(slot) = self.slot.borrow_mut().take() {
            slot.revoked().cancel();
        }
    }

    /// Cancelled when the registry no longer lets the device in (see
    /// [`crate::door::Connections::revalidate`]), or when the connection ended.
    /// Cancelled once the connection has ended.
    pub fn ended(&self) -> tokio_util::sync::CancellationToken {
        self.ended.clone()
    }

    pub fn revoked(&self) -> Option<tokio_util::sync::CancellationToken> {
        self.slot.borrow().as_ref().map(|slot| slot.revoked())
    }

    pub fn identity(&self) -> Option<&DeviceIdentity> {
        match &self.principal {
            Principal::Device(identity) => Some(identity),
            Principal::Anonymous => None,
        }
    }

    /// Decides for whom a publish to `address` is (pure; the registry checks follow).
    pub fn target(&self, address: &PublishAddress) -> Result<Target, TargetError> {
        self.target_of(address.tenant.as_ref(), address.device.as_ref())
    }

    /// Decides for whom a topic naming `tenant` and `device` (either may be left out) is.
    pub fn target_of(
        &self,
        tenant: Option<&String>,
        device: Option<&String>,
    ) -> Result<Target, TargetError> {
        Target::resolve(self.identity(), tenant.map(String::as_str), device.map(String::as_str))
    }

    /// Records an error-topic subscription (replacing an earlier one).
    pub fn subscribe_errors(&self, subscription: ErrorSubscription) {
        *self.error_subscription.borrow_mut() = Some(subscription);
    }

    /// Removes the error-topic subscription if `filter` names it.
    pub fn unsubscribe_errors(&self, filter: &str) {
        let mut current = self.error_subscription.borrow_mut();
        if super::mapping::parse_error_filter(filter).is_some_and(|s| current.as_ref() == Some(&s))
        {
            *current = None;
        }
    }

    /// The error topic for `report`, if the device asked for error messages.
    pub fn error_topic(&self, report: &ErrorReport) -> Option<String> {
        let own = self.identity().map(|id| id.device_id.as_str());
        let subscription = self.error_subscription.borrow();
        let subscription = subscription.as_ref().filter(|s| s.matches(report.device, own))?;
        Some(subscription.error_topic(report))
    }

    /// Adds a command subscription under `filter`, replacing one with the same filter
    /// (MQTT: a repeated SUBSCRIBE replaces). `subscribe` gets the outbox, started on
    /// first use with `start`.
    pub(super) fn subscribe_commands(
        &self,
        filter: String,
        start: impl FnOnce() -> Outbox,
        subscribe: impl FnOnce(&Outbox) -> Subscription,
    ) {
        let mut commands = self.commands.borrow_mut();
        commands.subscriptions.retain(|(f, _)| *f != filter);
        let outbox = commands.outbox.get_or_insert_with(start);
        let subscription = subscribe(outbox);
        commands.subscriptions.push((filter, subscription));
    }

    /// Ends the command subscription under `filter` (the router announces `ttd` 0).
    pub(super) fn unsubscribe_commands(&self, filter: &str) {
        let removed: Vec<_> = {
            let mut commands = self.commands.borrow_mut();
            let (gone, kept) = std::mem::take(&mut commands.subscriptions)
                .into_iter()
                .partition(|(f, _)| f == filter);
            commands.subscriptions = kept;
            gone
        };
        drop(removed);
    }

    /// The connection ended: every command subscription ends and the outbox stops
    /// (commands queued or waiting for a PUBACK are released).
    pub(super) fn end_commands(&self) {
        let commands = std::mem::take(&mut *self.commands.borrow_mut());
        drop(commands);
    }

    /// The connection ended: the QoS 0 queue's task sends what is queued, then ends (and
    /// with it its reference to this session).
    pub(super) fn end_qos0(&self) {
        *self.qos0.borrow_mut() = Qos0Slot::Closed;
    }

    /// Whether an error subscription exists at all.
    pub fn reports_errors(&self) -> bool {
        self.error_subscription.borrow().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::super::mapping::{parse_error_filter, parse_publish_topic};
    use super::*;

    fn device(tenant: &str, id: &str) -> Session {
        let identity =
            DeviceIdentity { tenant: tenant.into(), device_id: id.into(), auth_id: id.into() };
        Session::new(Principal::Device(identity), Version::V3_1_1, "client".into())
    }

    fn target(session: &Session, topic: &str) -> Result<Target, TargetError> {
        session.target(&parse_publish_topic(topic).expect("valid topic"))
    }

    #[test]
    fn targets() {
        let s = device("t1", "gw");
        assert_eq!(target(&s, "t"), Ok(Target::Own { tenant: "t1".into(), device: "gw".into() }));
        assert_eq!(
            target(&s, "t//gw"),
            Ok(Target::Own { tenant: "t1".into(), device: "gw".into() })
        );
        assert_eq!(
            target(&s, "e/t1/d2"),
            Ok(Target::ViaGateway {
                tenant: "t1".into(),
                device: "d2".into(),
                gateway: "gw".into()
            })
        );
        assert_eq!(target(&s, "t/t2/d2"), Err(TargetError::TenantMismatch));
        let anon = Session::new(Principal::Anonymous, Version::V5, "c".into());
        assert_eq!(target(&anon, "t"), Err(TargetError::IdentityRequired));
        assert_eq!(target(&anon, "t//d"), Err(TargetError::IdentityRequired));
        assert_eq!(
            target(&anon, "t/t1/d"),
            Ok(Target::Unauthenticated { tenant: "t1".into(), device: "d".into() })
        );
    }

    #[test]
    fn error_subscription_lifecycle() {
        let s = device("t1", "d1");
        assert!(!s.reports_errors());
        let report = ErrorReport {
            tenant: "t1",
            device: "d1",
            endpoint: "t",
            correlation_id: "-1",
            code: 503,
        };
        assert_eq!(s.error_topic(&report), None);
        s.subscribe_errors(parse_error_filter("error///#").expect("valid"));
        assert_eq!(s.error_topic(&report).as_deref(), Some("error///t/-1/503"));
        s.unsubscribe_errors("e///#");
        assert!(s.reports_errors(), "a different filter does not remove it");
        s.unsubscribe_errors("error///#");
        assert!(!s.reports_errors());
    }
}
