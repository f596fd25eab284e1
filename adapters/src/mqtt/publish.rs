//! PUBLISH: telemetry and events (QoS 1 answered once the messaging core took the message,
//! QoS 0 handed over in order by a per-connection queue) and command responses.

use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferrule_command_control::{CommandRouter, Response};
use ntex_mqtt::{v3, v5, QoS};

use super::config::ADAPTER;
use super::connection::{Close, Shared};
use super::failure::{answer, disconnect_v5, error_report, Answer, Failed, Failure};
use super::mapping::{self, MappingError, PublishAddress, ResponseAddress};
use super::session::{Qos0Send, Qos0Slot, Session, Target};
use crate::device::AdapterAccess;
use crate::door::{self, Denied, Standing};
use crate::downstream::{Downstream, Endpoint, Qos, Upload, UploadError};

/// One PUBLISH, protocol-version neutral.
pub(super) struct Inbound<'a> {
    pub(super) topic: &'a str,
    pub(super) qos: Qos,
    pub(super) retain: bool,
    pub(super) payload: Bytes,
    /// MQTT 5 content-type property.
    pub(super) content_type: Option<String>,
    /// MQTT 5 message-expiry-interval property.
    pub(super) expiry: Option<Duration>,
}

pub(super) async fn handle_publish(
    shared: &Shared,
    session: &Session,
    inbound: Inbound<'_>,
) -> Result<(), Failed> {
    if let Some(router) = &shared.commands {
        if let Some(response) = mapping::parse_response_topic(inbound.topic) {
            return handle_response(shared, router, session, inbound, response).await;
        }
    }
    let fail = |failure, address: Option<&PublishAddress>, target: Option<Target>| Failed {
        failure,
        on_error: address.map(|a| a.properties.on_error).unwrap_or_default(),
        correlation_id: address.and_then(|a| a.properties.correlation_id.clone()),
        target,
        terminal: false,
    };
    let address = mapping::parse_publish_topic(inbound.topic)
        .map_err(|e| Failed::unparsed(inbound.topic, e))?;
    let target = session.target(&address).map_err(|e| fail(e.into(), Some(&address), None))?;
    let fail = |failure| fail(failure, Some(&address), Some(target.clone()));
    if address.endpoint == Endpoint::Event && inbound.qos == Qos::AtMostOnce {
        return Err(fail(Failure::EventAtQos0));
    }
    let timed = shared.downstream.tracing().then(ferrule_net::trace::now_ns);
    let access = authorize(shared, session, &target)
        .await
        .map_err(|(failure, terminal)| Failed { terminal, ..fail(failure) })?;
    let properties = &address.properties;
    let content_type = properties.content_type.clone().or(inbound.content_type);
    Downstream::validate(&inbound.payload, content_type.as_deref(), shared.config.max_payload)
        .map_err(|e| fail(Failure::Upload(e)))?;
    // hono-ttl applies to events (Hono); MQTT 5 message expiry to both.
    let ttl = match address.endpoint {
        Endpoint::Event => properties.ttl.or(inbound.expiry),
        Endpoint::Telemetry => inbound.expiry,
    };
    let upload = Upload {
        tenant: target.tenant().to_owned(),
        device_id: target.device().to_owned(),
        endpoint: address.endpoint,
        qos: inbound.qos,
        payload: inbound.payload,
        content_type,
        ttl,
        orig_adapter: ADAPTER,
        orig_address: inbound.topic.to_owned(),
        properties: properties.other.clone(),
        limits: access.limits,
        retain: inbound.retain,
        defaults: access.defaults,
        ttd: None,
        gateway: match &target {
            Target::ViaGateway { gateway, .. } => Some(gateway.clone()),
            _ => None,
        },
        lookup_ns: timed.map(|start| (start, ferrule_net::trace::now_ns())),
    };
    shared.downstream.send(upload).await.map_err(|e| fail(Failure::Upload(e)))
}

/// Registry checks for a publish for `target`; `Err((failure, terminal))`. The connected
/// device (or gateway) is checked again on every publish, so one disabled while connected
/// is cut off at its next publish instead of at its next CONNECT; the session's memo
/// answers for publishes to the same target while the registry saw no change.
pub(super) async fn authorize(
    shared: &Shared,
    session: &Session,
    target: &Target,
) -> Result<AdapterAccess, (Failure, bool)> {
    let registry = shared.registry.as_ref();
    let access = door::authorize_memo(registry, ADAPTER, target, Standing::Session, &session.memo)
        .await
        .map_err(|refused| {
            let failure = match refused.denied {
                Denied::Auth(e) => Failure::Auth(e),
                Denied::UnauthenticatedNotAllowed => Failure::UnauthenticatedNotAllowed,
            };
            (failure, refused.principal_gone)
        })?;
    Ok(access)
}

/// A device's answer to a command (`command/[T]/[D]/res/REQ-ID/STATUS`): handed to the
/// router, which resolves once the application has it; only then the PUBACK goes out.
pub(super) async fn handle_response(
    shared: &Shared,
    router: &CommandRouter,
    session: &Session,
    inbound: Inbound<'_>,
    parsed: Result<ResponseAddress, MappingError>,
) -> Result<(), Failed> {
    let address = parsed.map_err(|e| Failed::unparsed(inbound.topic, e))?;
    let fail = |failure, target: Option<Target>| Failed {
        failure,
        on_error: address.properties.on_error,
        correlation_id: address.properties.correlation_id.clone(),
        target,
        terminal: false,
    };
    let target = session
        .target_of(address.tenant.as_ref(), address.device.as_ref())
        .map_err(|e| fail(e.into(), None))?;
    authorize(shared, session, &target).await.map_err(|(failure, terminal)| Failed {
        terminal,
        ..fail(failure, Some(target.clone()))
    })?;
    let max = shared.config.max_payload;
    if inbound.payload.len() > max {
        return Err(fail(
            Failure::Upload(UploadError::TooLarge { size: inbound.payload.len(), max }),
            Some(target),
        ));
    }
    let response = Response {
        tenant: target.tenant().to_owned(),
        device_id: target.device().to_owned(),
        request_id: address.request_id.clone(),
        status: address.status,
        payload: inbound.payload,
        content_type: address.properties.content_type.clone().or(inbound.content_type),
    };
    router.respond(response).await.map_err(|e| fail(Failure::Respond(e), Some(target)))
}

pub(super) fn qos_of(qos: QoS) -> Option<Qos> {
    match qos {
        QoS::AtMostOnce => Some(Qos::AtMostOnce),
        QoS::AtLeastOnce => Some(Qos::AtLeastOnce),
        // ntex refuses QoS 2 before it gets here (max QoS is 1); kept total anyway.
        QoS::ExactlyOnce => None,
    }
}

/// Lets the other publishes whose outcome arrived in this scheduler round finish before
/// this one's PUBACK is encoded, so they leave in one write.
///
/// ntex-io sends a connection's buffered bytes from a task it schedules when the first of
/// them is buffered, and that task runs right after the publish that buffered them. Each
/// outcome is handed over from the broker's threads on its own, so without this every
/// PUBACK went out in its own `send`: under load one syscall per QoS 1 message, 12 % of
/// the CPU (BENCHMARKS.md, "Performance round 2"). Tokio's `yield_now` defers the wake-up
/// until the runtime has polled its I/O driver and run the tasks woken meanwhile: the
/// PUBACKs of every publish settled by then are buffered before the send task runs. When
/// nothing else is pending that costs one trip through the scheduler (microseconds).
async fn ack_together() {
    tokio::task::yield_now().await;
}

pub(super) async fn publish_v3(
    shared: &Arc<Shared>,
    session: &v3::Session<Session>,
    publish: v3::Publish,
) -> Result<(), Close> {
    let qos = qos_of(publish.qos()).ok_or_else(|| Close("QoS 2 is not supported".into()))?;
    let topic = publish.publish_topic().to_owned();
    let packet_id = publish.id();
    let payload = match publish.read_all().await {
        Ok(payload) => Bytes::copy_from_slice(&payload),
        Err(e) => return Err(Close(format!("cannot read the payload: {e}"))),
    };
    if qos == Qos::AtMostOnce {
        let item =
            Qos0 { topic, retain: publish.retain(), payload, content_type: None, expiry: None };
        queue_qos0(shared, Conn::V3(session.clone()), item).await;
        return Ok(());
    }
    let inbound = Inbound {
        topic: &topic,
        qos,
        retain: publish.retain(),
        payload,
        content_type: None,
        expiry: None,
    };
    let Err(failed) = handle_publish(shared, session, inbound).await else {
        ack_together().await;
        return Ok(());
    };
    match report_failure(&Conn::V3(session.clone()), &topic, packet_id, qos, &failed) {
        Answer::Ack | Answer::Nack => Ok(()),
        Answer::Close => Err(Close(failed.failure.message())),
    }
}

pub(super) async fn publish_v5(
    shared: &Arc<Shared>,
    session: &v5::Session<Session>,
    publish: v5::Publish,
) -> Result<v5::PublishAck, Close> {
    let qos = qos_of(publish.qos()).ok_or_else(|| Close("QoS 2 is not supported".into()))?;
    let packet = publish.packet();
    let topic = packet.topic.to_string();
    let packet_id = packet.packet_id;
    let retain = packet.retain;
    let content_type =
        packet.properties.content_type.as_ref().map(|c| c.to_string()).filter(|c| !c.is_empty());
    let expiry =
        packet.properties.message_expiry_interval.map(|s| Duration::from_secs(u64::from(s.get())));
    let payload = match publish.read_all().await {
        Ok(payload) => payload,
        Err(e) => return Err(Close(format!("cannot read the payload: {e}"))),
    };
    // ntex and the messaging core use different `Bytes` types: one copy here.
    let payload = Bytes::copy_from_slice(&payload);
    if qos == Qos::AtMostOnce {
        let item = Qos0 { topic, retain, payload, content_type, expiry };
        queue_qos0(shared, Conn::V5(session.clone()), item).await;
        return Ok(publish.ack());
    }
    let inbound = Inbound { topic: &topic, qos, retain, payload, content_type, expiry };
    let Err(failed) = handle_publish(shared, session, inbound).await else {
        ack_together().await;
        return Ok(publish.ack());
    };
    let reason = failed.failure.message();
    match report_failure(&Conn::V5(session.clone()), &topic, packet_id, qos, &failed) {
        Answer::Ack => Ok(publish.ack()),
        Answer::Nack => {
            Ok(publish.ack().reason_code(failed.failure.puback_reason()).reason(reason.into()))
        }
        Answer::Close => {
            session.sink().close_with_reason(disconnect_v5(&failed.failure));
            // An error, not an ack: a QoS 1 publish must not get a PUBACK on the way out.
            Err(Close(reason))
        }
    }
}

/// The one place a failed publish is reported: on the device's error topic if it
/// subscribed one, in the log, and the answer Hono's table gives (always `Close` for a
/// device that is no longer allowed).
pub(super) fn report_failure(
    conn: &Conn,
    topic: &str,
    packet_id: Option<NonZeroU16>,
    qos: Qos,
    failed: &Failed,
) -> Answer {
    let session = conn.state();
    let report = error_report(session, topic, packet_id, failed);
    if let Some((error_topic, body)) = &report {
        publish_error(conn, error_topic, body);
    }
    tracing::debug!(client_id = %session.client_id, version = ?session.version, ?qos, topic, failure = ?failed.failure, "MQTT publish failed");
    if failed.terminal {
        Answer::Close
    } else {
        answer(failed.on_error, report.is_some(), session.version, qos)
    }
}

// ---------------------------------------------------------------------------------------
// QoS 0: answered at once, handed to the messaging core in order by a per-connection task
//
// A QoS 0 publish needs no answer, so its handler returns as soon as the publish is
// queued. This keeps the order of a device's QoS 0 messages, and no QoS 0 handler is still
// pending when the client's DISCONNECT arrives (ntex-mqtt 9.0 panics the connection task
// then, losing the message: a one-shot `mosquitto_pub -q 0` whose device look-up misses
// the registry cache). A full queue makes the handler wait (backpressure on the reader).

/// QoS 0 publishes of one connection that may wait for the messaging core.
pub(super) const QOS0_QUEUE: usize = 64;

/// The connection, as the QoS 0 task (which outlives the handler) uses it.
#[derive(Clone)]
pub(super) enum Conn {
    V3(v3::Session<Session>),
    V5(v5::Session<Session>),
}

impl Conn {
    fn state(&self) -> &Session {
        match self {
            Conn::V3(s) => s,
            Conn::V5(s) => s,
        }
    }
}

/// A queued QoS 0 publish.
#[derive(Debug)]
pub(super) struct Qos0 {
    pub(super) topic: String,
    pub(super) retain: bool,
    pub(super) payload: Bytes,
    pub(super) content_type: Option<String>,
    pub(super) expiry: Option<Duration>,
}

pub(super) async fn queue_qos0(shared: &Arc<Shared>, conn: Conn, item: Qos0) {
    let (owned_shared, owned_conn) = (shared.clone(), conn.clone());
    let mut send: Qos0Send =
        Box::pin(async move { send_qos0(&owned_shared, &owned_conn, item).await });
    let state = conn.state();
    // Fast path, when nothing is queued before it (order): most publishes complete on the
    // first poll (cached registry look-ups, synchronous routing) and need no queue.
    if state.qos0_pending.get() == 0
        && send
            .as_mut()
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
            .is_ready()
    {
        return;
    }
    // Slow path: the rest of this publish (polled once already) goes to the queue.
    let sender = {
        let mut slot = state.qos0.borrow_mut();
        match &*slot {
            Qos0Slot::Open(sender) => Some(sender.clone()),
            Qos0Slot::Idle => {
                let (sender, receiver) = tokio::sync::mpsc::channel(QOS0_QUEUE);
                ntex_rt::spawn(run_qos0(conn.clone(), receiver));
                *slot = Qos0Slot::Open(sender.clone());
                Some(sender)
            }
            // A publish handled after the connection ended: no queue to keep alive.
            Qos0Slot::Closed => None,
        }
    };
    match sender {
        Some(sender) => {
            state.qos0_pending.set(state.qos0_pending.get() + 1);
            if let Err(tokio::sync::mpsc::error::TrySendError::Full(send)) = sender.try_send(send) {
                if sender.send(send).await.is_err() {
                    state.qos0_pending.set(state.qos0_pending.get() - 1);
                }
            }
        }
        None => {
            ntex_rt::spawn(send);
        }
    }
}

/// The queue's task: ends once the connection ended and the queue is empty.
pub(super) async fn run_qos0(conn: Conn, mut queue: tokio::sync::mpsc::Receiver<Qos0Send>) {
    while let Some(send) = queue.recv().await {
        send.await;
        let pending = &conn.state().qos0_pending;
        pending.set(pending.get().saturating_sub(1));
    }
}

/// Sends one QoS 0 publish; a failure is reported as Hono's table says (error topic,
/// closing the connection), without an acknowledgement to withhold.
pub(super) async fn send_qos0(shared: &Shared, conn: &Conn, item: Qos0) {
    let Qos0 { topic, retain, payload, content_type, expiry } = item;
    let inbound =
        Inbound { topic: &topic, qos: Qos::AtMostOnce, retain, payload, content_type, expiry };
    let session = conn.state();
    let Err(failed) = handle_publish(shared, session, inbound).await else { return };
    if report_failure(conn, &topic, None, Qos::AtMostOnce, &failed) == Answer::Close {
        match conn {
            Conn::V3(s) => s.sink().close(),
            Conn::V5(s) => s.sink().close_with_reason(disconnect_v5(&failed.failure)),
        }
    }
}

/// Publishes an error report at most once on the device's error topic.
pub(super) fn publish_error(conn: &Conn, error_topic: &str, body: &Bytes) {
    let body = ntex_bytes::Bytes::copy_from_slice(body);
    let sent = match conn {
        Conn::V3(s) => {
            s.sink().publish(error_topic).send_at_most_once(body).map_err(|e| format!("{e:?}"))
        }
        Conn::V5(s) => {
            s.sink().publish(error_topic).send_at_most_once(body).map_err(|e| format!("{e:?}"))
        }
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "cannot publish on the error topic");
    }
}
