//! One MQTT connection's life: what all connections share, CONNECT (per-source admission
//! is at accept, in `server`; authentication and the CONNACK answer here) and the
//! connection events sent when a device connects and disconnects.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferrule_command_control::CommandRouter;
use ntex_mqtt::v5::codec::ConnectAckReason;
use ntex_mqtt::{v3, v5, Control, Reason};

use super::config::{MqttConfig, ADAPTER};
use super::session::{Principal, Session, Version};
use super::will::Will;
use crate::device::{AuthError, CredentialKind, DeviceIdentity, DeviceRegistry};
use crate::door::{self};
use crate::downstream::{Downstream, Endpoint, Qos, Upload, CONNECTION_EVENT};
use crate::quota;

/// What every connection of the adapter shares (across worker threads).
pub(super) struct Shared {
    pub config: MqttConfig,
    pub downstream: Downstream,
    pub registry: Arc<dyn DeviceRegistry>,
    /// `None`: commands are off (command subscriptions refused).
    pub commands: Option<CommandRouter>,
    /// Per-source limits, checked at CONNECT (ntex caps the total).
    pub admission: Arc<ferrule_net::listener::Admission>,
    /// Open device connections per tenant and device (the tenant's `max-connections`,
    /// closing those the registry no longer lets in).
    pub connections: Arc<door::Connections>,
    /// Wills waiting for their delay.
    pub(super) wills: super::will::PendingWills,
    /// Cancelled when the adapter stops: every connection is told so (MQTT 5 DISCONNECT
    /// 0x8B "server shutting down"; 3.1.1: closed), so that devices reconnect elsewhere.
    pub(super) draining: tokio_util::sync::CancellationToken,
}

/// Why the platform closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    /// The registry no longer lets the device in.
    Revoked,
    /// This instance is shutting down.
    Draining,
}

/// An error that ends the connection; ntex hands it to the control service.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct Close(pub(super) String);

/// Needed by ntex-mqtt's v5 dispatcher: a `Close` never turns into a PUBACK (failures that
/// should are answered with `Ok(PublishAck)` carrying a reason code).
impl TryFrom<Close> for v5::PublishAck {
    type Error = Close;

    fn try_from(close: Close) -> Result<Self, Close> {
        Err(close)
    }
}

// ---------------------------------------------------------------------------------------
// CONNECT

/// Why a CONNECT is refused; mapped to CONNACK codes in [`Refusal::v3`] / [`Refusal::v5`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Unknown auth-id, wrong password, unknown tenant, malformed username.
    BadCredentials,
    /// Disabled device or tenant; anonymous when not allowed.
    NotAuthorized,
    /// The registry is busy or unavailable.
    Unavailable,
    /// The tenant holds its `max-connections` already.
    TenantConnectionLimit,
}

impl Refusal {
    fn v3(self) -> v3::codec::ConnectAckReason {
        use v3::codec::ConnectAckReason as R;
        match self {
            Refusal::BadCredentials => R::BadUserNameOrPassword,
            Refusal::NotAuthorized | Refusal::TenantConnectionLimit => R::NotAuthorized,
            Refusal::Unavailable => R::ServiceUnavailable,
        }
    }

    fn v5(self) -> ConnectAckReason {
        match self {
            Refusal::BadCredentials => ConnectAckReason::BadUserNameOrPassword,
            Refusal::NotAuthorized => ConnectAckReason::NotAuthorized,
            Refusal::Unavailable => ConnectAckReason::ServerUnavailable,
            Refusal::TenantConnectionLimit => ConnectAckReason::QuotaExceeded,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Refusal::BadCredentials => "bad credentials",
            Refusal::NotAuthorized => "not authorized",
            Refusal::Unavailable => "device registry unavailable",
            Refusal::TenantConnectionLimit => "the tenant's connection limit is reached",
        }
    }
}

pub(super) fn peer_ip(io: &ntex_io::IoBoxed) -> Option<std::net::IpAddr> {
    io.query::<ntex_io::types::PeerAddr>().get().map(|peer| peer.0.ip())
}

impl From<AuthError> for Refusal {
    fn from(e: AuthError) -> Self {
        match e {
            // An unknown tenant must not be distinguishable from bad credentials.
            AuthError::BadCredentials | AuthError::UnknownTenant => Refusal::BadCredentials,
            AuthError::TenantDisabled
            | AuthError::DeviceDisabled
            | AuthError::UnknownDevice
            | AuthError::GatewayNotAuthorized
            | AuthError::TenantMismatch => Refusal::NotAuthorized,
            AuthError::Busy | AuthError::Unavailable(_) => Refusal::Unavailable,
        }
    }
}

/// The end-entity certificate a client presented in the TLS handshake (DER).
pub(super) fn client_certificate(io: &ntex_io::IoBoxed) -> Option<Vec<u8>> {
    io.query::<ntex_tls::rustls::PeerCert<'static>>().as_ref().map(|cert| cert.0.as_ref().to_vec())
}

/// Authenticates a CONNECT: a client certificate wins (as in Hono; username and password
/// are then ignored), else username/password, else anonymous if allowed. A device gets
/// one of its tenant's connection slots (`max-connections`).
pub(super) async fn authenticate(
    shared: &Shared,
    io: &ntex_io::IoBoxed,
    username: Option<&str>,
    password: Option<&[u8]>,
) -> Result<(Principal, Option<door::ConnectionSlot>), Refusal> {
    let source = peer_ip(io);
    let (identity, kind) = if let Some(cert) = client_certificate(io) {
        let identity = shared.registry.authenticate_certificate(&cert).await;
        (identity.map_err(Refusal::from)?, CredentialKind::Certificate)
    } else {
        match username.filter(|u| !u.is_empty()) {
            None if password.is_none() && shared.config.allow_unauthenticated => {
                return Ok((Principal::Anonymous, None))
            }
            None if password.is_none() => return Err(Refusal::NotAuthorized),
            None => return Err(Refusal::BadCredentials),
            Some(username) => {
                let (auth_id, tenant) =
                    door::split_auth_id(username).ok_or(Refusal::BadCredentials)?;
                let identity = shared
                    .registry
                    .authenticate_password(tenant, auth_id, password.unwrap_or_default(), source)
                    .await
                    .map_err(Refusal::from)?;
                (identity, CredentialKind::Password)
            }
        }
    };
    // A tenant may switch MQTT off in its `adapters` list.
    let access = shared.registry.adapter_access(&identity.tenant, ADAPTER).await;
    let access = access.map_err(Refusal::from)?;
    if !access.enabled {
        return Err(Refusal::NotAuthorized);
    }
    let volume_used_up = access.limits.data_volume.is_some_and(|limit| {
        shared.downstream.volumes().exhausted(&identity.tenant, &limit, quota::now_secs())
    });
    let slot = if volume_used_up {
        Err("data_volume")
    } else {
        let credential = Some((identity.clone(), kind));
        shared.connections.open_with(
            &identity.tenant,
            &identity.device_id,
            &access.limits,
            credential,
        )
    };
    let slot = slot.map_err(|limit| {
        door::limit_refused(&identity.tenant, ADAPTER, limit);
        Refusal::TenantConnectionLimit
    })?;
    Ok((Principal::Device(identity), Some(slot)))
}

/// What the version-specific CONNECT handlers pass to [`admit`].
struct ConnectRequest<'a> {
    version: Version,
    client_id: String,
    /// Published as a device message if the connection ends without DISCONNECT.
    will: Option<Will>,
    username: Option<&'a str>,
    password: Option<&'a [u8]>,
}

/// The CONNECT checks shared by both versions; a session for the admitted client.
async fn admit(
    shared: &Arc<Shared>,
    io: &ntex_io::IoBoxed,
    request: ConnectRequest<'_>,
) -> Result<Session, Refusal> {
    // A Will is accepted (as Hono does) and published as a device message; a persistent
    // session is accepted as a clean one (session-present 0; MQTT 5: expiry 0 in CONNACK).
    let admitted = authenticate(shared, io, request.username, request.password).await;
    let client_id = request.client_id;
    match admitted {
        Ok((principal, slot)) => {
            if let Principal::Device(identity) = &principal {
                // Back within its Will delay: the Will is not published.
                shared.wills.cancel(&identity.tenant, &identity.device_id);
            }
            connected(shared, &principal, &client_id);
            let session = Session::new(principal, request.version, client_id);
            Ok(session.holding(slot).with_will(request.will))
        }
        Err(refusal) => {
            let version = request.version;
            tracing::debug!(client_id, ?version, reason = refusal.reason(), "CONNECT refused");
            Err(refusal)
        }
    }
}

/// Runs `close` on the connection's worker once the registry no longer lets the device
/// in, or the adapter shuts down; the task ends with the connection.
fn close_when(shared: &Shared, session: &Session, close: impl FnOnce(Closing) + 'static) {
    let draining = shared.draining.clone();
    let revoked = session.revoked();
    let ended = session.ended();
    ntex_rt::spawn(async move {
        let revoked = async {
            match revoked {
                Some(token) => token.cancelled().await,
                None => std::future::pending().await,
            }
        };
        let why = tokio::select! {
            _ = revoked => Closing::Revoked,
            _ = draining.cancelled() => Closing::Draining,
            _ = ended.cancelled() => return,
        };
        close(why);
    });
}

pub(super) async fn connect_v3(
    shared: &Arc<Shared>,
    connect: v3::Connect,
) -> Result<v3::ConnectAck<Session>, Close> {
    let packet = connect.packet();
    let request = ConnectRequest {
        version: Version::V3_1_1,
        client_id: packet.client_id.to_string(),
        will: packet.last_will.as_ref().map(|will| Will {
            topic: will.topic.to_string(),
            payload: Bytes::copy_from_slice(&will.message),
            retain: will.retain,
            delay: Duration::ZERO,
            content_type: None,
            expiry: None,
        }),
        username: packet.username.as_deref(),
        password: packet.password.as_deref(),
    };
    Ok(match admit(shared, connect.io(), request).await {
        Ok(session) => {
            let sink = connect.sink();
            close_when(shared, &session, move |_| {
                if sink.is_open() {
                    sink.close();
                }
            });
            connect.ack(session, false)
        }
        Err(refusal) => connect.failed(refusal.v3()),
    })
}

pub(super) async fn connect_v5(
    shared: &Arc<Shared>,
    connect: v5::Connect,
) -> Result<v5::ConnectAck<Session>, Close> {
    let packet = connect.packet();
    let asks_for_session = packet.session_expiry_interval_secs > 0;
    let request = ConnectRequest {
        version: Version::V5,
        client_id: packet.client_id.to_string(),
        will: packet.last_will.as_ref().map(|will| Will {
            topic: will.topic.to_string(),
            payload: Bytes::copy_from_slice(&will.message),
            retain: will.retain,
            delay: Duration::from_secs(u64::from(will.will_delay_interval_sec.unwrap_or(0))),
            content_type: will
                .content_type
                .as_ref()
                .map(|c| c.to_string())
                .filter(|c| !c.is_empty()),
            expiry: will.message_expiry_interval.map(|s| Duration::from_secs(u64::from(s.get()))),
        }),
        username: packet.username.as_deref(),
        password: packet.password.as_deref(),
    };
    Ok(match admit(shared, connect.io(), request).await {
        Ok(session) => {
            let sink = connect.sink();
            close_when(shared, &session, move |why| {
                if sink.is_open() {
                    sink.close_with_reason(v5::codec::Disconnect::new(match why {
                        Closing::Revoked => v5::codec::DisconnectReasonCode::AdministrativeAction,
                        Closing::Draining => v5::codec::DisconnectReasonCode::ServerShuttingDown,
                    }));
                }
            });
            connect.ack(session).with(|ack| {
                // A retained publish is taken (passed on as `x-opt-retain`, as Hono does);
                // device subscriptions are command topics, for which nothing is retained.
                ack.retain_available = true;
                ack.shared_subscription_available = false;
                ack.subscription_identifiers_available = false;
                // MQTT 5 lets the server override the session expiry: no state is kept after
                // the connection ends, and the client learns it here.
                if asks_for_session {
                    ack.session_expiry_interval_secs = Some(0);
                }
            })
        }
        Err(refusal) => connect
            .failed::<Session>(refusal.v5())
            .with(|ack| ack.reason_string = Some(refusal.reason().into())),
    })
}

// ---------------------------------------------------------------------------------------
// Connection events

pub(super) fn connected(shared: &Arc<Shared>, principal: &Principal, client_id: &str) {
    metrics::gauge!("ferrule_adapter_connections", "adapter" => "hono-mqtt").increment(1.0);
    if let Principal::Device(identity) = principal {
        if let Some(presence) = shared.downstream.presence() {
            presence.connected(&identity.tenant, &identity.device_id, ADAPTER);
        }
        connection_event(shared, identity, client_id, "connected");
    }
}

/// The control service: ntex reports the end of a connection here, exactly once.
pub(super) fn stopped(shared: &Arc<Shared>, session: &Session, control: Control<Close>) {
    if let Control::Stop(reason) = control {
        metrics::gauge!("ferrule_adapter_connections", "adapter" => "hono-mqtt").decrement(1.0);
        // Announces `ttd` 0 and releases commands not yet acknowledged.
        session.end_commands();
        session.release_slot();
        session.end_qos0();
        match &reason {
            Reason::Error(e) => {
                tracing::debug!(client_id = %session.client_id, error = %e.get_ref(), "MQTT connection closed")
            }
            Reason::Protocol(e) => {
                tracing::debug!(client_id = %session.client_id, error = %e.get_ref(), "MQTT connection closed on a protocol error")
            }
            Reason::PeerGone(_) => {
                tracing::trace!(client_id = %session.client_id, "MQTT connection ended")
            }
        }
        if let Principal::Device(identity) = &session.principal {
            if let Some(presence) = shared.downstream.presence() {
                presence.disconnected(&identity.tenant, &identity.device_id);
            }
            connection_event(shared, identity, &session.client_id, "disconnected");
        }
        // Still there: the connection ended without DISCONNECT (which discards it).
        super::will::publish(shared, session);
    }
}

/// Sends a Hono connection event in the background; failures only get logged, a device
/// must not be refused because nobody listens to its connection events.
pub(super) fn connection_event(
    shared: &Arc<Shared>,
    identity: &DeviceIdentity,
    client_id: &str,
    cause: &'static str,
) {
    let body = serde_json::json!({
        "cause": cause,
        "remote-id": client_id,
        "source": ADAPTER,
        "data": {},
    });
    let upload = Upload {
        tenant: identity.tenant.clone(),
        device_id: identity.device_id.clone(),
        endpoint: Endpoint::Event,
        qos: Qos::AtLeastOnce,
        payload: Bytes::from(body.to_string()),
        content_type: Some(CONNECTION_EVENT.to_owned()),
        ttl: None,
        orig_adapter: ADAPTER,
        orig_address: Endpoint::Event.as_str().to_owned(),
        properties: Vec::new(),
        // A notification is not counted against the tenant's data volume.
        limits: Default::default(),
        retain: false,
        defaults: None,
        ttd: None,
        gateway: None,
        lookup_ns: None,
    };
    let downstream = shared.downstream.clone();
    ntex_rt::spawn(async move {
        if let Err(e) = downstream.send_notification(upload).await {
            tracing::debug!(error = %e, cause, "connection event not delivered");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_codes() {
        assert_eq!(Refusal::from(AuthError::UnknownTenant), Refusal::BadCredentials);
        assert_eq!(Refusal::from(AuthError::DeviceDisabled).v5(), ConnectAckReason::NotAuthorized);
        assert_eq!(
            Refusal::from(AuthError::Busy).v3(),
            v3::codec::ConnectAckReason::ServiceUnavailable
        );
    }
}
