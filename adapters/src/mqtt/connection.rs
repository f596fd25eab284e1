//! The ntex-mqtt services of one connection (CONNECT, PUBLISH, SUBSCRIBE/UNSUBSCRIBE,
//! control) for both protocol versions, and the single place where failures become
//! protocol answers ([`Failure`]). Command subscriptions are registered with the
//! command router here; command responses are publishes handed to it.
//!
//! Everything here runs on an ntex worker thread; sessions and sinks are `Rc`-based and
//! never leave it. The messaging core and the registry are reached through `Send`
//! handles whose futures do not care which runtime polls them.

use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use ferrule_command_control::{
    CommandRouter, Notify, RespondError, Response, Target as CommandTarget,
};
use ntex_mqtt::v5::codec::{
    ConnectAckReason, Disconnect, DisconnectReasonCode, PublishAckReason, SubscribeAckReason,
};
use ntex_mqtt::{v3, v5, Control, MqttServer, MqttServiceConfig, QoS, Reason};
use ntex_service::cfg::SharedCfg;
use ntex_service::Service as _;
use ntex_util::time::Seconds;
use tokio_util::sync::CancellationToken;

use super::command::{Outbound, Outbox};
use super::config::{MqttConfig, ADAPTER};
use super::mapping::{
    self, DeviceFilter, ErrorSubscription, MappingError, OnError, PublishAddress, ResponseAddress,
};
use super::session::{Principal, Qos0Send, Qos0Slot, Session, Target, TargetError, Version};
use crate::device::{AuthError, DeviceIdentity, DeviceRegistry};
use crate::door::{self, Denied, Standing};
use crate::downstream::{Downstream, Endpoint, Qos, Upload, UploadError, CONNECTION_EVENT};

/// What every connection of the adapter shares (across worker threads).
pub(super) struct Shared {
    pub config: MqttConfig,
    pub downstream: Downstream,
    pub registry: Arc<dyn DeviceRegistry>,
    /// `None`: commands are off (command subscriptions refused).
    pub commands: Option<CommandRouter>,
    /// Per-source limits, checked at CONNECT (ntex caps the total).
    pub admission: Arc<ferrule_net::listener::Admission>,
}

/// An error that ends the connection; ntex hands it to the control service.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct Close(String);

/// Needed by ntex-mqtt's v5 dispatcher: a `Close` never turns into a PUBACK (failures that
/// should are answered with `Ok(PublishAck)` carrying a reason code).
impl TryFrom<Close> for v5::PublishAck {
    type Error = Close;

    fn try_from(close: Close) -> Result<Self, Close> {
        Err(close)
    }
}

/// Runs the ntex system and server on the current thread until `shutdown`.
/// `ready` learns whether the server started.
pub(super) fn serve(
    listener: std::net::TcpListener,
    tls: Option<(std::net::TcpListener, Arc<rustls::ServerConfig>)>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    ready: std::sync::mpsc::Sender<std::io::Result<()>>,
) {
    let system = ntex_rt::System::build()
        .name("ferrule-mqtt")
        .disable_signals()
        .build(ntex_net::DefaultRuntime);
    system.block_on(async move {
        let config = &shared.config;
        // The codec limit bounds memory per packet; payloads slightly over `max_payload`
        // still get a proper answer (error topic / PUBACK reason), bigger ones a protocol
        // error. A whole packet under the limit is delivered in one piece.
        let max_packet =
            u32::try_from(config.max_payload.saturating_add(64 * 1024)).unwrap_or(u32::MAX);
        let connect_timeout =
            Seconds(u16::try_from(config.connect_timeout.as_secs().max(1)).unwrap_or(u16::MAX));
        let mqtt_config = || {
            MqttServiceConfig::new()
                .set_max_qos(QoS::AtLeastOnce)
                .set_max_size(max_packet)
                .set_min_chunk_size(max_packet)
                // A silent client is dropped after `connect_timeout` whether it stalls before
                // or inside its CONNECT.
                .protocol_version_timeout(connect_timeout)
                .set_connect_timeout(connect_timeout)
                .set_handshake_timeout(connect_timeout)
                // Without this, QoS 0 publishes that arrive right before a DISCONNECT are
                // dropped (one-shot clients like mosquitto_pub lose messages).
                .set_handle_qos_after_disconnect(Some(QoS::AtLeastOnce))
        };
        let per_worker = config.max_connections.div_ceil(config.workers).max(1);
        let factory_shared = shared.clone();
        let builder = ntex_server::net::ServerBuilder::default()
            .name("ferrule-mqtt")
            .workers(config.workers)
            .disable_signals()
            .maxconn(per_worker)
            .shutdown_timeout(ntex_util::time::Millis(
                u32::try_from(config.shutdown_grace.as_millis()).unwrap_or(u32::MAX),
            ))
            .listen("mqtt", listener, SharedCfg::new("MQTT").add(mqtt_config()), async move |_| {
                let admission = factory_shared.admission.clone();
                ntex_service::apply_fn(
                    build_server(factory_shared.clone()),
                    async move |io: ntex_io::Io, inner| {
                        // Per-source caps and connection rate, checked as the connection is
                        // accepted (before a byte is read); the place is held until it closes.
                        let Some(_admitted) = admit(&admission, &io) else { return Ok(()) };
                        inner.call(io).await
                    },
                )
            });
        let builder = match (builder, tls) {
            (Ok(builder), Some((listener, server_config))) => {
                let tls_config = ntex_tls::TlsConfig::new().set_handshake_timeout(connect_timeout);
                let cfg = SharedCfg::new("MQTTS").add(mqtt_config()).add(tls_config);
                let factory_shared = shared.clone();
                builder.listen("mqtts", listener, cfg, async move |_| {
                    // A failed handshake (bad or expired client certificate, plain text on
                    // the TLS port) ends that connection only.
                    let admission = factory_shared.admission.clone();
                    let tls = ntex_tls::rustls::TlsAcceptor::new(server_config.clone())
                        .map_err(|e| {
                            ntex_mqtt::MqttError::Service(Close(format!(
                                "TLS handshake failed: {e}"
                            )))
                        })
                        .and_then(build_server(factory_shared.clone()));
                    ntex_service::apply_fn(tls, async move |io: ntex_io::Io, inner| {
                        // Admitted before the TLS handshake costs anything.
                        let Some(_admitted) = admit(&admission, &io) else { return Ok(()) };
                        inner.call(io).await
                    })
                })
            }
            (builder, _) => builder,
        };
        let server = match builder {
            Ok(builder) => builder.run(),
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        tokio::select! {
            _ = shutdown.cancelled() => {
                tracing::info!("MQTT adapter stopping");
                server.stop(true).await;
            }
            result = server.clone() => {
                if let Err(e) = result {
                    tracing::error!(error = %e, "MQTT server stopped");
                }
            }
        }
    });
}

/// One worker's MQTT service: v3.1.1 and v5 on the same port; `Req` is the connection
/// (plain or with a TLS filter). The service types are unnameable (closures), hence the
/// long signature.
#[allow(clippy::type_complexity)]
fn build_server<Req>(
    shared: Arc<Shared>,
) -> MqttServer<
    (),
    Req,
    impl ntex_service::Service<
        (),
        ntex_service::State<(), ntex_io::IoBoxed>,
        Res = (),
        Error = ntex_mqtt::MqttError<Close>,
    >,
    impl ntex_service::Service<
        (),
        ntex_service::State<(), ntex_io::IoBoxed>,
        Res = (),
        Error = ntex_mqtt::MqttError<Close>,
    >,
    Close,
>
where
    Req: ntex_service::RequestState<ntex_io::IoBoxed, State = ()>,
{
    let (s1, s2, s3, s4) = (shared.clone(), shared.clone(), shared.clone(), shared.clone());
    let (s5, s6, s7, s8) = (shared.clone(), shared.clone(), shared.clone(), shared);
    let v3 =
        v3::MqttServer::new(async move |session: &v3::Session<Session>, publish: v3::Publish| {
            publish_v3(&s1, session, publish).await
        })
        .protocol(async move |session: &v3::Session<Session>, message: v3::ProtocolMessage| {
            protocol_v3(&s2, session, message).await
        })
        .control(async move |session: &v3::Session<Session>, control: Control<Close>| {
            stopped(&s3, session, control);
            Ok::<_, Close>(None)
        })
        .build(async move |connect: v3::Connect| connect_v3(&s4, connect).await);
    let v5 =
        v5::MqttServer::new(async move |session: &v5::Session<Session>, publish: v5::Publish| {
            publish_v5(&s5, session, publish).await
        })
        .protocol(async move |session: &v5::Session<Session>, message: v5::ProtocolMessage| {
            protocol_v5(&s6, session, message).await
        })
        .control(async move |session: &v5::Session<Session>, control: Control<Close>| {
            stopped(&s7, session, control);
            Ok::<_, Close>(None)
        })
        .build(async move |connect: v5::Connect| connect_v5(&s8, connect).await);
    MqttServer::new().v3(v3).v5(v5)
}

// ---------------------------------------------------------------------------------------
// CONNECT

/// Why a CONNECT is refused; mapped to CONNACK codes in [`Refusal::v3`] / [`Refusal::v5`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Unknown auth-id, wrong password, unknown tenant, malformed username.
    BadCredentials,
    /// Disabled device or tenant; anonymous when not allowed.
    NotAuthorized,
    /// The registry is busy or unavailable.
    Unavailable,
    /// A will message (Ferrule, like Hono, does not publish wills).
    WillNotSupported,
    /// A persistent session (Ferrule keeps no session state).
    PersistentSession,
}

impl Refusal {
    fn v3(self) -> v3::codec::ConnectAckReason {
        use v3::codec::ConnectAckReason as R;
        match self {
            Refusal::BadCredentials => R::BadUserNameOrPassword,
            Refusal::NotAuthorized | Refusal::WillNotSupported => R::NotAuthorized,
            Refusal::Unavailable => R::ServiceUnavailable,
            Refusal::PersistentSession => R::IdentifierRejected,
        }
    }

    fn v5(self) -> ConnectAckReason {
        match self {
            Refusal::BadCredentials => ConnectAckReason::BadUserNameOrPassword,
            Refusal::NotAuthorized => ConnectAckReason::NotAuthorized,
            Refusal::Unavailable => ConnectAckReason::ServerUnavailable,
            Refusal::WillNotSupported | Refusal::PersistentSession => {
                ConnectAckReason::ImplementationSpecificError
            }
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Refusal::BadCredentials => "bad credentials",
            Refusal::NotAuthorized => "not authorized",
            Refusal::Unavailable => "device registry unavailable",
            Refusal::WillNotSupported => "will messages are not supported",
            Refusal::PersistentSession => "persistent sessions are not supported",
        }
    }
}

fn peer_ip(io: &ntex_io::IoBoxed) -> Option<std::net::IpAddr> {
    io.query::<ntex_io::types::PeerAddr>().get().map(|peer| peer.0.ip())
}

/// The per-source admission of an accepted connection (caps and connection rate), held
/// until the connection closes; `None`: refused (the connection is closed unanswered, before
/// anything is read, and counted in `ferrule_connections_refused_total`). Connections whose
/// peer address is unknown are admitted.
fn admit(
    admission: &Arc<ferrule_net::listener::Admission>,
    io: &ntex_io::Io,
) -> Option<Option<ferrule_net::listener::Admitted>> {
    let Some(ip) = io.query::<ntex_io::types::PeerAddr>().get().map(|peer| peer.0.ip()) else {
        return Some(None);
    };
    match admission.admit_source(ip) {
        Ok(admitted) => Some(Some(admitted)),
        Err(refusal) => {
            tracing::debug!(%ip, reason = refusal.as_str(), "MQTT connection refused");
            None
        }
    }
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
fn client_certificate(io: &ntex_io::IoBoxed) -> Option<Vec<u8>> {
    io.query::<ntex_tls::rustls::PeerCert<'static>>().as_ref().map(|cert| cert.0.as_ref().to_vec())
}

/// Authenticates a CONNECT: a client certificate wins (as in Hono; username and password
/// are then ignored), else username/password, else anonymous if allowed.
async fn authenticate(
    shared: &Shared,
    cert: Option<Vec<u8>>,
    username: Option<&str>,
    password: Option<&[u8]>,
    source: Option<std::net::IpAddr>,
) -> Result<Principal, Refusal> {
    if let Some(cert) = cert {
        let identity =
            shared.registry.authenticate_certificate(&cert).await.map_err(Refusal::from)?;
        return Ok(Principal::Device(identity));
    }
    match username.filter(|u| !u.is_empty()) {
        None if password.is_none() => {
            if shared.config.allow_unauthenticated {
                Ok(Principal::Anonymous)
            } else {
                Err(Refusal::NotAuthorized)
            }
        }
        None => Err(Refusal::BadCredentials),
        Some(username) => {
            let (auth_id, tenant) = door::split_auth_id(username).ok_or(Refusal::BadCredentials)?;
            let identity = shared
                .registry
                .authenticate_password(tenant, auth_id, password.unwrap_or_default(), source)
                .await
                .map_err(Refusal::from)?;
            Ok(Principal::Device(identity))
        }
    }
}

async fn connect_v3(
    shared: &Arc<Shared>,
    connect: v3::Connect,
) -> Result<v3::ConnectAck<Session>, Close> {
    let cert = client_certificate(connect.io());
    let packet = connect.packet();
    let client_id = packet.client_id.to_string();
    let refused = if packet.last_will.is_some() {
        Err(Refusal::WillNotSupported)
    } else if !packet.clean_session {
        Err(Refusal::PersistentSession)
    } else {
        authenticate(
            shared,
            cert,
            packet.username.as_deref(),
            packet.password.as_deref(),
            peer_ip(connect.io()),
        )
        .await
    };
    match refused {
        Ok(principal) => {
            connected(shared, &principal, &client_id);
            let session = Session::new(principal, Version::V3_1_1, client_id);
            Ok(connect.ack(session, false))
        }
        Err(refusal) => {
            tracing::debug!(client_id, reason = refusal.reason(), "MQTT 3.1.1 CONNECT refused");
            Ok(connect.failed(refusal.v3()))
        }
    }
}

async fn connect_v5(
    shared: &Arc<Shared>,
    connect: v5::Connect,
) -> Result<v5::ConnectAck<Session>, Close> {
    let cert = client_certificate(connect.io());
    let packet = connect.packet();
    let client_id = packet.client_id.to_string();
    let asks_for_session = packet.session_expiry_interval_secs > 0;
    let refused = if packet.last_will.is_some() {
        Err(Refusal::WillNotSupported)
    } else {
        authenticate(
            shared,
            cert,
            packet.username.as_deref(),
            packet.password.as_deref(),
            peer_ip(connect.io()),
        )
        .await
    };
    match refused {
        Ok(principal) => {
            connected(shared, &principal, &client_id);
            let session = Session::new(principal, Version::V5, client_id);
            Ok(connect.ack(session).with(|ack| {
                ack.retain_available = false;
                ack.shared_subscription_available = false;
                ack.subscription_identifiers_available = false;
                // MQTT 5 lets the server override the session expiry: no state is kept
                // after the connection ends, and the client learns it here.
                if asks_for_session {
                    ack.session_expiry_interval_secs = Some(0);
                }
            }))
        }
        Err(refusal) => {
            tracing::debug!(client_id, reason = refusal.reason(), "MQTT 5 CONNECT refused");
            Ok(connect
                .failed::<Session>(refusal.v5())
                .with(|ack| ack.reason_string = Some(refusal.reason().into())))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Connection events

fn connected(shared: &Arc<Shared>, principal: &Principal, client_id: &str) {
    metrics::gauge!("ferrule_adapter_connections", "adapter" => "hono-mqtt").increment(1.0);
    if let Principal::Device(identity) = principal {
        connection_event(shared, identity, client_id, "connected");
    }
}

/// The control service: ntex reports the end of a connection here, exactly once.
fn stopped(shared: &Arc<Shared>, session: &Session, control: Control<Close>) {
    if let Control::Stop(reason) = control {
        metrics::gauge!("ferrule_adapter_connections", "adapter" => "hono-mqtt").decrement(1.0);
        // Announces `ttd` 0 and releases commands not yet acknowledged.
        session.end_commands();
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
            connection_event(shared, identity, &session.client_id, "disconnected");
        }
    }
}

/// Sends a Hono connection event in the background; failures only get logged, a device
/// must not be refused because nobody listens to its connection events.
fn connection_event(
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
    };
    let downstream = shared.downstream.clone();
    ntex_rt::spawn(async move {
        if let Err(e) = downstream.send(upload).await {
            tracing::debug!(error = %e, cause, "connection event not delivered");
        }
    });
}

// ---------------------------------------------------------------------------------------
// PUBLISH

/// Why a publish failed: the one place where failures become status codes (error topic),
/// PUBACK reason codes and DISCONNECT reason codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Failure {
    Mapping(MappingError),
    Auth(AuthError),
    Upload(UploadError),
    /// An unauthenticated connection published without naming tenant and device.
    IdentityRequired,
    /// The tenant does not allow unauthenticated devices.
    UnauthenticatedNotAllowed,
    /// Events are QoS 1 only.
    EventAtQos0,
    /// Retained messages are not supported.
    Retain,
    /// The command router did not take a device's command response.
    Respond(RespondError),
}

impl Failure {
    /// HTTP-style status (Hono's error-topic `code`).
    fn status(&self) -> u16 {
        match self {
            Failure::Mapping(_) | Failure::EventAtQos0 | Failure::Retain => 400,
            Failure::Auth(AuthError::BadCredentials | AuthError::UnknownTenant)
            | Failure::IdentityRequired => 401,
            Failure::Auth(
                AuthError::TenantDisabled
                | AuthError::GatewayNotAuthorized
                | AuthError::TenantMismatch,
            )
            | Failure::UnauthenticatedNotAllowed => 403,
            Failure::Auth(AuthError::UnknownDevice | AuthError::DeviceDisabled) => 404,
            Failure::Auth(AuthError::Busy) => 429,
            Failure::Auth(AuthError::Unavailable(_)) => 503,
            Failure::Upload(e) if e.is_transient() => 503,
            Failure::Upload(UploadError::TooLarge { .. }) => 413,
            Failure::Upload(_) => 400,
            Failure::Respond(RespondError::BadRequestId(_) | RespondError::Refused(_)) => 400,
            Failure::Respond(RespondError::NoConsumer) => 503,
        }
    }

    /// MQTT 5 PUBACK reason code for a failed QoS 1 publish.
    fn puback_reason(&self) -> PublishAckReason {
        match self {
            Failure::Mapping(_) => PublishAckReason::TopicNameInvalid,
            Failure::Auth(AuthError::Busy) => PublishAckReason::QuotaExceeded,
            Failure::Auth(AuthError::Unavailable(_)) => PublishAckReason::UnspecifiedError,
            Failure::Auth(_) | Failure::IdentityRequired | Failure::UnauthenticatedNotAllowed => {
                PublishAckReason::NotAuthorized
            }
            Failure::Upload(UploadError::NoConsumer(_)) => PublishAckReason::UnspecifiedError,
            Failure::Upload(UploadError::Overloaded(_) | UploadError::TooLarge { .. }) => {
                PublishAckReason::QuotaExceeded
            }
            Failure::Upload(UploadError::EmptyWithoutContentType) => {
                PublishAckReason::PayloadFormatInvalid
            }
            Failure::Upload(UploadError::Refused(_)) => PublishAckReason::UnspecifiedError,
            Failure::EventAtQos0 | Failure::Retain => PublishAckReason::ImplementationSpecificError,
            Failure::Respond(RespondError::BadRequestId(_)) => PublishAckReason::TopicNameInvalid,
            Failure::Respond(RespondError::NoConsumer) => PublishAckReason::UnspecifiedError,
            Failure::Respond(RespondError::Refused(_)) => {
                PublishAckReason::ImplementationSpecificError
            }
        }
    }

    /// MQTT 5 DISCONNECT reason code when the connection is closed over this failure.
    fn disconnect_reason(&self) -> DisconnectReasonCode {
        match self {
            Failure::Mapping(_) => DisconnectReasonCode::TopicNameInvalid,
            Failure::Auth(AuthError::Busy) => DisconnectReasonCode::ServerBusy,
            Failure::Auth(AuthError::Unavailable(_)) => DisconnectReasonCode::UnspecifiedError,
            Failure::Auth(_) | Failure::IdentityRequired | Failure::UnauthenticatedNotAllowed => {
                DisconnectReasonCode::NotAuthorized
            }
            Failure::Upload(UploadError::TooLarge { .. }) => DisconnectReasonCode::PacketTooLarge,
            Failure::Upload(UploadError::Overloaded(_)) => DisconnectReasonCode::QuotaExceeded,
            Failure::Upload(UploadError::EmptyWithoutContentType) => {
                DisconnectReasonCode::PayloadFormatInvalid
            }
            Failure::Upload(_) => DisconnectReasonCode::UnspecifiedError,
            Failure::EventAtQos0 => DisconnectReasonCode::QosNotSupported,
            Failure::Retain => DisconnectReasonCode::RetainNotSupported,
            Failure::Respond(RespondError::BadRequestId(_)) => {
                DisconnectReasonCode::TopicNameInvalid
            }
            Failure::Respond(RespondError::NoConsumer) => DisconnectReasonCode::UnspecifiedError,
            Failure::Respond(RespondError::Refused(_)) => {
                DisconnectReasonCode::ImplementationSpecificError
            }
        }
    }

    fn message(&self) -> String {
        match self {
            Failure::Mapping(e) => e.to_string(),
            Failure::Auth(e) => e.to_string(),
            Failure::Upload(e) => e.to_string(),
            Failure::IdentityRequired => {
                "unauthenticated devices must publish to ENDPOINT/TENANT/DEVICE".into()
            }
            Failure::UnauthenticatedNotAllowed => {
                "the tenant does not allow unauthenticated devices".into()
            }
            Failure::EventAtQos0 => "events must be published with QoS 1".into(),
            Failure::Retain => "retained messages are not supported".into(),
            Failure::Respond(e) => e.to_string(),
        }
    }
}

/// What to do about a failed publish (Hono's `on-error` table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Acknowledge as if accepted (3.1.1 PUBACK; 5: PUBACK success) and keep the connection.
    Ack,
    /// Answer with a failure and keep the connection (5: PUBACK reason code).
    Nack,
    /// Close the connection (5: DISCONNECT with a reason code).
    Close,
}

/// Hono's error-handling table; MQTT 5 answers a QoS 1 failure with a PUBACK reason code
/// instead of closing by default, since the protocol has a way to say "no".
fn answer(on_error: OnError, reported: bool, version: Version, qos: Qos) -> Answer {
    let v5_qos1 = version == Version::V5 && qos == Qos::AtLeastOnce;
    match on_error {
        OnError::Disconnect => Answer::Close,
        OnError::Ignore => Answer::Ack,
        OnError::Default if reported && v5_qos1 => Answer::Nack,
        OnError::Default if reported => Answer::Ack,
        OnError::Default | OnError::SkipAck if v5_qos1 => Answer::Nack,
        OnError::Default => Answer::Close,
        // ntex-mqtt 3.1.1 sends a PUBACK for every publish the service accepts; the only
        // way not to acknowledge is to close (the device resends on reconnect).
        OnError::SkipAck if qos == Qos::AtLeastOnce => Answer::Close,
        OnError::SkipAck => Answer::Ack,
    }
}

/// One PUBLISH, protocol-version neutral.
struct Inbound<'a> {
    topic: &'a str,
    qos: Qos,
    retain: bool,
    payload: Bytes,
    /// MQTT 5 content-type property.
    content_type: Option<String>,
    /// MQTT 5 message-expiry-interval property.
    expiry: Option<Duration>,
}

/// A failed publish with what is needed to report it.
struct Failed {
    failure: Failure,
    on_error: OnError,
    correlation_id: Option<String>,
    target: Option<Target>,
    /// The connected device itself is no longer allowed (disabled, deleted, tenant
    /// disabled): Hono closes the connection whatever `on-error` says.
    terminal: bool,
}

async fn handle_publish(
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
    let address = mapping::parse_publish_topic(inbound.topic).map_err(|e| {
        let bag = mapping::property_bag_of(inbound.topic).unwrap_or_default();
        Failed {
            failure: Failure::Mapping(e),
            on_error: bag.on_error,
            correlation_id: bag.correlation_id,
            target: None,
            terminal: false,
        }
    })?;
    let target = session.target(&address).map_err(|e| {
        let failure = match e {
            TargetError::TenantMismatch => Failure::Auth(AuthError::TenantMismatch),
            TargetError::IdentityRequired => Failure::IdentityRequired,
        };
        fail(failure, Some(&address), None)
    })?;
    let fail = |failure| fail(failure, Some(&address), Some(target.clone()));
    if inbound.retain {
        return Err(fail(Failure::Retain));
    }
    if address.endpoint == Endpoint::Event && inbound.qos == Qos::AtMostOnce {
        return Err(fail(Failure::EventAtQos0));
    }
    authorize(shared, &target)
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
    };
    shared.downstream.send(upload).await.map_err(|e| fail(Failure::Upload(e)))
}

/// Registry checks for a publish for `target`; `Err((failure, terminal))`. The connected
/// device (or gateway) is checked again on every publish (the registry caches), so one
/// disabled while connected is cut off at its next publish instead of at its next CONNECT.
async fn authorize(shared: &Shared, target: &Target) -> Result<(), (Failure, bool)> {
    door::authorize(shared.registry.as_ref(), ADAPTER, target, Standing::Session).await.map_err(
        |refused| {
            let failure = match refused.denied {
                Denied::Auth(e) => Failure::Auth(e),
                Denied::UnauthenticatedNotAllowed => Failure::UnauthenticatedNotAllowed,
            };
            (failure, refused.principal_gone)
        },
    )
}

/// A device's answer to a command (`command/[T]/[D]/res/REQ-ID/STATUS`): handed to the
/// router, which resolves once the application has it; only then the PUBACK goes out.
async fn handle_response(
    shared: &Shared,
    router: &CommandRouter,
    session: &Session,
    inbound: Inbound<'_>,
    parsed: Result<ResponseAddress, MappingError>,
) -> Result<(), Failed> {
    let address = parsed.map_err(|e| {
        let bag = mapping::property_bag_of(inbound.topic).unwrap_or_default();
        Failed {
            failure: Failure::Mapping(e),
            on_error: bag.on_error,
            correlation_id: bag.correlation_id,
            target: None,
            terminal: false,
        }
    })?;
    let fail = |failure, target: Option<Target>| Failed {
        failure,
        on_error: address.properties.on_error,
        correlation_id: address.properties.correlation_id.clone(),
        target,
        terminal: false,
    };
    let target =
        session.target_of(address.tenant.as_ref(), address.device.as_ref()).map_err(|e| {
            let failure = match e {
                TargetError::TenantMismatch => Failure::Auth(AuthError::TenantMismatch),
                TargetError::IdentityRequired => Failure::IdentityRequired,
            };
            fail(failure, None)
        })?;
    if inbound.retain {
        return Err(fail(Failure::Retain, Some(target)));
    }
    authorize(shared, &target).await.map_err(|(failure, terminal)| Failed {
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

/// Where (if anywhere) the failure is reported, and the JSON to publish there.
fn error_report(
    session: &Session,
    topic: &str,
    packet_id: Option<NonZeroU16>,
    failed: &Failed,
) -> Option<(String, Bytes)> {
    let (tenant, device) = match (&failed.target, session.identity()) {
        (Some(target), _) => (target.tenant().to_owned(), target.device().to_owned()),
        (None, Some(identity)) => (identity.tenant.clone(), identity.device_id.clone()),
        (None, None) => return None,
    };
    let correlation_id = failed
        .correlation_id
        .clone()
        .or_else(|| packet_id.map(|id| id.get().to_string()))
        .unwrap_or_else(|| "-1".to_owned());
    let code = failed.failure.status();
    let endpoint = mapping::endpoint_segment(topic);
    let error_topic = session.error_topic(&tenant, &device, endpoint, &correlation_id, code)?;
    let body = serde_json::json!({
        "code": code,
        "message": failed.failure.message(),
        "timestamp": iso8601(SystemTime::now()),
        "correlation-id": correlation_id,
    });
    Some((error_topic, Bytes::from(body.to_string())))
}

fn qos_of(qos: QoS) -> Option<Qos> {
    match qos {
        QoS::AtMostOnce => Some(Qos::AtMostOnce),
        QoS::AtLeastOnce => Some(Qos::AtLeastOnce),
        // ntex refuses QoS 2 before it gets here (max QoS is 1); kept total anyway.
        QoS::ExactlyOnce => None,
    }
}

async fn publish_v3(
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
    let Err(failed) = handle_publish(shared, session, inbound).await else { return Ok(()) };
    match report_failure(&Conn::V3(session.clone()), &topic, packet_id, qos, &failed) {
        Answer::Ack | Answer::Nack => Ok(()),
        Answer::Close => Err(Close(failed.failure.message())),
    }
}

async fn publish_v5(
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
fn report_failure(
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

/// MQTT 5 DISCONNECT for a failure that closes the connection.
fn disconnect_v5(failure: &Failure) -> Disconnect {
    let mut disconnect = Disconnect::new(failure.disconnect_reason());
    disconnect.reason_string = Some(failure.message().as_str().into());
    disconnect
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
const QOS0_QUEUE: usize = 64;

/// The connection, as the QoS 0 task (which outlives the handler) uses it.
#[derive(Clone)]
enum Conn {
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
    topic: String,
    retain: bool,
    payload: Bytes,
    content_type: Option<String>,
    expiry: Option<Duration>,
}

async fn queue_qos0(shared: &Arc<Shared>, conn: Conn, item: Qos0) {
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
async fn run_qos0(conn: Conn, mut queue: tokio::sync::mpsc::Receiver<Qos0Send>) {
    while let Some(send) = queue.recv().await {
        send.await;
        let pending = &conn.state().qos0_pending;
        pending.set(pending.get().saturating_sub(1));
    }
}

/// Sends one QoS 0 publish; a failure is reported as Hono's table says (error topic,
/// closing the connection), without an acknowledgement to withhold.
async fn send_qos0(shared: &Shared, conn: &Conn, item: Qos0) {
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
fn publish_error(conn: &Conn, error_topic: &str, body: &Bytes) {
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

// ---------------------------------------------------------------------------------------
// SUBSCRIBE / UNSUBSCRIBE

/// Whether `filter` is an error-topic filter this session may use (Hono's rules).
async fn error_subscription(
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
async fn command_subscription(
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

async fn protocol_v3(
    shared: &Shared,
    session: &v3::Session<Session>,
    message: v3::ProtocolMessage,
) -> Result<v3::ProtocolMessageAck, Close> {
    match message {
        v3::ProtocolMessage::Subscribe(mut subscribe) => {
            for mut item in subscribe.iter_mut() {
                let filter = item.topic().to_string();
                let outbound = || Outbound::V3(session.sink().clone());
                if let Some(qos) =
                    command_subscription(shared, session, &filter, item.qos(), outbound).await
                {
                    item.confirm(qos);
                    continue;
                }
                match error_subscription(shared, session, &filter).await {
                    Some(subscription) => {
                        session.subscribe_errors(subscription);
                        // Error messages are published at QoS 0 only (Hono).
                        item.confirm(QoS::AtMostOnce);
                    }
                    None => item.fail(),
                }
            }
            Ok(subscribe.ack())
        }
        v3::ProtocolMessage::Unsubscribe(unsubscribe) => {
            for filter in unsubscribe.iter() {
                session.unsubscribe_errors(filter);
                session.unsubscribe_commands(filter);
            }
            Ok(unsubscribe.ack())
        }
        other => Ok(other.ack()),
    }
}

async fn protocol_v5(
    shared: &Shared,
    session: &v5::Session<Session>,
    message: v5::ProtocolMessage,
) -> Result<v5::ProtocolMessageAck, Close> {
    match message {
        v5::ProtocolMessage::Subscribe(mut subscribe) => {
            for mut item in subscribe.iter_mut() {
                let filter = item.topic().to_string();
                let outbound = || Outbound::V5(session.sink().clone());
                if let Some(qos) =
                    command_subscription(shared, session, &filter, item.options().qos, outbound)
                        .await
                {
                    item.confirm(qos);
                    continue;
                }
                match error_subscription(shared, session, &filter).await {
                    Some(subscription) => {
                        session.subscribe_errors(subscription);
                        item.confirm(QoS::AtMostOnce);
                    }
                    None => item.fail(SubscribeAckReason::TopicFilterInvalid),
                }
            }
            Ok(subscribe.ack())
        }
        v5::ProtocolMessage::Unsubscribe(unsubscribe) => {
            for filter in unsubscribe.iter() {
                session.unsubscribe_errors(filter);
                session.unsubscribe_commands(filter);
            }
            Ok(unsubscribe.ack())
        }
        other => Ok(other.ack()),
    }
}

/// `2026-11-24T15:20:00.123Z` (UTC).
fn iso8601(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn timestamps() {
        assert_eq!(iso8601(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789); // a leap day
        assert_eq!(iso8601(t), "2024-02-29T12:34:56.789Z");
    }

    #[test]
    fn on_error_table() {
        use Answer::*;
        use OnError::*;
        let v3 = Version::V3_1_1;
        let q1 = Qos::AtLeastOnce;
        let q0 = Qos::AtMostOnce;
        // (on-error, subscribed to the error topic) → answer, as in Hono's table.
        assert_eq!(answer(Default, false, v3, q1), Close);
        assert_eq!(answer(Default, true, v3, q1), Ack);
        assert_eq!(answer(Disconnect, true, v3, q1), Close);
        assert_eq!(answer(Ignore, false, v3, q1), Ack);
        assert_eq!(answer(SkipAck, true, v3, q1), Close);
        assert_eq!(answer(SkipAck, false, v3, q0), Ack);
        // MQTT 5 says "no" with a PUBACK reason code instead of closing.
        assert_eq!(answer(Default, false, Version::V5, q1), Nack);
        assert_eq!(answer(Default, true, Version::V5, q1), Nack);
        assert_eq!(answer(Default, false, Version::V5, q0), Close);
        assert_eq!(answer(Default, true, Version::V5, q0), Ack);
        assert_eq!(answer(Disconnect, false, Version::V5, q1), Close);
    }

    #[test]
    fn failure_codes() {
        assert_eq!(Failure::Upload(UploadError::NoConsumer("telemetry/t1".into())).status(), 503);
        assert_eq!(Failure::Upload(UploadError::TooLarge { size: 3, max: 2 }).status(), 413);
        assert_eq!(Failure::Auth(AuthError::GatewayNotAuthorized).status(), 403);
        assert_eq!(Failure::Mapping(MappingError::UnknownEndpoint("x".into())).status(), 400);
        assert_eq!(Failure::EventAtQos0.disconnect_reason(), DisconnectReasonCode::QosNotSupported);
        assert_eq!(Failure::Retain.disconnect_reason(), DisconnectReasonCode::RetainNotSupported);
        assert_eq!(
            Failure::Auth(AuthError::TenantMismatch).puback_reason(),
            PublishAckReason::NotAuthorized
        );
        assert_eq!(Refusal::from(AuthError::UnknownTenant), Refusal::BadCredentials);
        assert_eq!(Refusal::from(AuthError::DeviceDisabled).v5(), ConnectAckReason::NotAuthorized);
        assert_eq!(
            Refusal::from(AuthError::Busy).v3(),
            v3::codec::ConnectAckReason::ServiceUnavailable
        );
    }
}
