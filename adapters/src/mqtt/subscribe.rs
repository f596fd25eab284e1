//! SUBSCRIBE / UNSUBSCRIBE: error-topic and command subscriptions (Hono's filters), checked
//! at the front door and registered with the command router.

use ferrule_command_control::{Notify, Target as CommandTarget};
use ntex_mqtt::v5::codec::SubscribeAckReason;
use ntex_mqtt::{v3, v5, QoS};

use super::command::{Outbound, Outbox};
use super::config::ADAPTER;
use super::connection::{Close, Shared};
use super::mapping::{self, DeviceFilter, ErrorSubscription};
use super::session::{Session, Target};
use crate::door::{self, Standing};

// ---------------------------------------------------------------------------------------
// SUBSCRIBE / UNSUBSCRIBE

/// Whether `filter` is an error-topic filter this session may use (Hono's rules).
pub(super) async fn error_subscription(
    shared: &Shared,
    session: &Session,
    filter: &str,
) -> Option<ErrorSubscription> {
    let subscription = mapping::parse_error_filter(filter)?;
    // `Any` (a gateway's devices) names no device; unauthenticated devices must name
    // themselves (error/TENANT/DEVICE/#).
    let device = match &subscription.device {
        DeviceFilter::One(device) => Some(device.as_str()),
        DeviceFilter::Own | DeviceFilter::Any => None,
    };
    let target =
        Target::resolve(session.identity(), subscription.tenant.as_deref(), device).ok()?;
    door::authorize(shared.registry.as_ref(), ADAPTER, &target, Standing::ThisRequest)
        .await
        .ok()?;
    Some(subscription)
}

/// Registers a command subscription if `filter` is a command filter this session may
/// use; the granted QoS, `None` to refuse. Unauthenticated devices get no commands.
pub(super) async fn command_subscription(
    shared: &Shared,
    session: &Session,
    filter: &str,
    requested: QoS,
    outbound: impl FnOnce() -> Outbound,
) -> Option<QoS> {
    let router = shared.commands.as_ref()?;
    let form = mapping::parse_command_filter(filter)?;
    let identity = session.identity()?;
    let device = match &form.device {
        DeviceFilter::One(device) => Some(device.as_str()),
        DeviceFilter::Own | DeviceFilter::Any => None,
    };
    let resolved = Target::resolve(Some(identity), form.tenant.as_deref(), device).ok()?;
    door::authorize(shared.registry.as_ref(), ADAPTER, &resolved, Standing::ThisRequest)
        .await
        .ok()?;
    let target = match &form.device {
        DeviceFilter::Any => CommandTarget::AllDevicesOf { gateway: identity.device_id.clone() },
        DeviceFilter::Own | DeviceFilter::One(_) => {
            CommandTarget::Device(resolved.device().to_owned())
        }
    };
    let at_least_once = requested != QoS::AtMostOnce;
    let ack_timeout = shared.config.command_ack_timeout;
    session.subscribe_commands(
        filter.to_owned(),
        || Outbox::start(outbound(), ack_timeout),
        |outbox| {
            let sink = outbox.sink(form, at_least_once);
            router.subscribe(&identity.tenant, target, sink, Notify { adapter: ADAPTER, ttd: -1 })
        },
    );
    Some(if at_least_once { QoS::AtLeastOnce } else { QoS::AtMostOnce })
}

/// One SUBSCRIBE filter: a command subscription, else an error-topic subscription (error
/// messages are published at QoS 0 only, as in Hono). The granted QoS, `None` to refuse.
async fn subscribe_one(
    shared: &Shared,
    session: &Session,
    filter: &str,
    requested: QoS,
    outbound: impl FnOnce() -> Outbound,
) -> Option<QoS> {
    if let Some(qos) = command_subscription(shared, session, filter, requested, outbound).await {
        return Some(qos);
    }
    let subscription = error_subscription(shared, session, filter).await?;
    session.subscribe_errors(subscription);
    Some(QoS::AtMostOnce)
}

/// UNSUBSCRIBE: whatever the filter named.
fn unsubscribe_one(session: &Session, filter: &str) {
    session.unsubscribe_errors(filter);
    session.unsubscribe_commands(filter);
}

pub(super) async fn protocol_v3(
    shared: &Shared,
    session: &v3::Session<Session>,
    message: v3::ProtocolMessage,
) -> Result<v3::ProtocolMessageAck, Close> {
    match message {
        v3::ProtocolMessage::Subscribe(mut subscribe) => {
            for mut item in subscribe.iter_mut() {
                let filter = item.topic().to_string();
                let outbound = || Outbound::V3(session.sink().clone());
                match subscribe_one(shared, session, &filter, item.qos(), outbound).await {
                    Some(qos) => item.confirm(qos),
                    None => item.fail(),
                }
            }
            Ok(subscribe.ack())
        }
        v3::ProtocolMessage::Unsubscribe(unsubscribe) => {
            unsubscribe.iter().for_each(|filter| unsubscribe_one(session, filter));
            Ok(unsubscribe.ack())
        }
        v3::ProtocolMessage::Disconnect(disconnect) => {
            // A clean end: the Will is discarded.
            drop(session.take_will());
            Ok(disconnect.ack())
        }
        other => Ok(other.ack()),
    }
}

pub(super) async fn protocol_v5(
    shared: &Shared,
    session: &v5::Session<Session>,
    message: v5::ProtocolMessage,
) -> Result<v5::ProtocolMessageAck, Close> {
    match message {
        v5::ProtocolMessage::Subscribe(mut subscribe) => {
            for mut item in subscribe.iter_mut() {
                let filter = item.topic().to_string();
                let outbound = || Outbound::V5(session.sink().clone());
                let requested = item.options().qos;
                match subscribe_one(shared, session, &filter, requested, outbound).await {
                    Some(qos) => item.confirm(qos),
                    None => item.fail(SubscribeAckReason::TopicFilterInvalid),
                }
            }
            Ok(subscribe.ack())
        }
        v5::ProtocolMessage::Unsubscribe(unsubscribe) => {
            unsubscribe.iter().for_each(|filter| unsubscribe_one(session, filter));
            Ok(unsubscribe.ack())
        }
        v5::ProtocolMessage::Disconnect(disconnect) => {
            // A clean end discards the Will, unless the client asks for it (0x04).
            let keep = disconnect.packet().reason_code
                == v5::codec::DisconnectReasonCode::DisconnectWithWillMessage;
            if !keep {
                drop(session.take_will());
            }
            Ok(disconnect.ack())
        }
        other => Ok(other.ack()),
    }
}
