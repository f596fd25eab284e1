//! The single place where a failed publish becomes protocol answers: [`Failure`] with its
//! Hono status (error topic), MQTT 5 PUBACK and DISCONNECT reason codes, Hono's `on-error`
//! table ([`answer`]) and the error-topic report.

use std::num::NonZeroU16;
use std::time::SystemTime;

use bytes::Bytes;
use ferrule_command_control::RespondError;
use ntex_mqtt::v5::codec::{Disconnect, DisconnectReasonCode, PublishAckReason};

use super::mapping::{self, MappingError, OnError};
use super::session::{Session, Target, TargetError, Version};
use crate::device::AuthError;
use crate::downstream::{Qos, UploadError};

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
    /// The command router did not take a device's command response.
    Respond(RespondError),
}

impl Failure {
    /// HTTP-style status (Hono's error-topic `code`).
    pub(super) fn status(&self) -> u16 {
        match self {
            Failure::Mapping(_) | Failure::EventAtQos0 => 400,
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
            Failure::Upload(UploadError::RateLimited(_) | UploadError::VolumeExceeded) => 429,
            Failure::Upload(_) => 400,
            Failure::Respond(RespondError::BadRequestId(_) | RespondError::Refused(_)) => 400,
            Failure::Respond(RespondError::NotIssuedTo) => 403,
            Failure::Respond(RespondError::NoConsumer) => 503,
        }
    }

    /// MQTT 5 PUBACK reason code for a failed QoS 1 publish.
    pub(super) fn puback_reason(&self) -> PublishAckReason {
        match self {
            Failure::Mapping(_) => PublishAckReason::TopicNameInvalid,
            Failure::Auth(AuthError::Busy) => PublishAckReason::QuotaExceeded,
            Failure::Auth(AuthError::Unavailable(_)) => PublishAckReason::UnspecifiedError,
            Failure::Auth(_) | Failure::IdentityRequired | Failure::UnauthenticatedNotAllowed => {
                PublishAckReason::NotAuthorized
            }
            Failure::Upload(UploadError::NoConsumer(_)) => PublishAckReason::UnspecifiedError,
            Failure::Upload(
                UploadError::Overloaded(_)
                | UploadError::TooLarge { .. }
                | UploadError::RateLimited(_)
                | UploadError::VolumeExceeded,
            ) => PublishAckReason::QuotaExceeded,
            Failure::Upload(UploadError::EmptyWithoutContentType) => {
                PublishAckReason::PayloadFormatInvalid
            }
            Failure::Upload(UploadError::Refused(_)) => PublishAckReason::UnspecifiedError,
            Failure::EventAtQos0 => PublishAckReason::ImplementationSpecificError,
            Failure::Respond(RespondError::BadRequestId(_)) => PublishAckReason::TopicNameInvalid,
            Failure::Respond(RespondError::NotIssuedTo) => PublishAckReason::NotAuthorized,
            Failure::Respond(RespondError::NoConsumer) => PublishAckReason::UnspecifiedError,
            Failure::Respond(RespondError::Refused(_)) => {
                PublishAckReason::ImplementationSpecificError
            }
        }
    }

    /// MQTT 5 DISCONNECT reason code when the connection is closed over this failure.
    pub(super) fn disconnect_reason(&self) -> DisconnectReasonCode {
        match self {
            Failure::Mapping(_) => DisconnectReasonCode::TopicNameInvalid,
            Failure::Auth(AuthError::Busy) => DisconnectReasonCode::ServerBusy,
            Failure::Auth(AuthError::Unavailable(_)) => DisconnectReasonCode::UnspecifiedError,
            Failure::Auth(_) | Failure::IdentityRequired | Failure::UnauthenticatedNotAllowed => {
                DisconnectReasonCode::NotAuthorized
            }
            Failure::Upload(UploadError::TooLarge { .. }) => DisconnectReasonCode::PacketTooLarge,
            Failure::Upload(
                UploadError::Overloaded(_)
                | UploadError::RateLimited(_)
                | UploadError::VolumeExceeded,
            ) => DisconnectReasonCode::QuotaExceeded,
            Failure::Upload(UploadError::EmptyWithoutContentType) => {
                DisconnectReasonCode::PayloadFormatInvalid
            }
            Failure::Upload(_) => DisconnectReasonCode::UnspecifiedError,
            Failure::EventAtQos0 => DisconnectReasonCode::QosNotSupported,
            Failure::Respond(RespondError::BadRequestId(_)) => {
                DisconnectReasonCode::TopicNameInvalid
            }
            Failure::Respond(RespondError::NotIssuedTo) => DisconnectReasonCode::NotAuthorized,
            Failure::Respond(RespondError::NoConsumer) => DisconnectReasonCode::UnspecifiedError,
            Failure::Respond(RespondError::Refused(_)) => {
                DisconnectReasonCode::ImplementationSpecificError
            }
        }
    }

    pub(super) fn message(&self) -> String {
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
            Failure::Respond(e) => e.to_string(),
        }
    }
}

/// What to do about a failed publish (Hono's `on-error` table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    /// Acknowledge as if accepted (3.1.1 PUBACK; 5: PUBACK success) and keep the connection.
    Ack,
    /// Answer with a failure and keep the connection (5: PUBACK reason code).
    Nack,
    /// Close the connection (5: DISCONNECT with a reason code).
    Close,
}

/// Hono's error-handling table; MQTT 5 answers a QoS 1 failure with a PUBACK reason code
/// instead of closing by default, since the protocol has a way to say "no".
pub(super) fn answer(on_error: OnError, reported: bool, version: Version, qos: Qos) -> Answer {
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

/// A failed publish with what is needed to report it.
pub(super) struct Failed {
    pub(super) failure: Failure,
    pub(super) on_error: OnError,
    pub(super) correlation_id: Option<String>,
    pub(super) target: Option<Target>,
    /// The connected device itself is no longer allowed (disabled, deleted, tenant
    /// disabled): Hono closes the connection whatever `on-error` says.
    pub(super) terminal: bool,
}

impl Failed {
    /// A topic that did not parse: reported with whatever property bag can be read from it.
    pub(super) fn unparsed(topic: &str, error: MappingError) -> Self {
        let bag = mapping::property_bag_of(topic).unwrap_or_default();
        Failed {
            failure: Failure::Mapping(error),
            on_error: bag.on_error,
            correlation_id: bag.correlation_id,
            target: None,
            terminal: false,
        }
    }
}

impl From<TargetError> for Failure {
    fn from(e: TargetError) -> Self {
        match e {
            TargetError::TenantMismatch => Failure::Auth(AuthError::TenantMismatch),
            TargetError::IdentityRequired => Failure::IdentityRequired,
        }
    }
}

/// Where (if anywhere) the failure is reported, and the JSON to publish there.
pub(super) fn error_report(
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
    let report = mapping::ErrorReport {
        tenant: &tenant,
        device: &device,
        endpoint,
        correlation_id: &correlation_id,
        code,
    };
    let error_topic = session.error_topic(&report)?;
    let body = serde_json::json!({
        "code": code,
        "message": failed.failure.message(),
        "timestamp": iso8601(SystemTime::now()),
        "correlation-id": correlation_id,
    });
    Some((error_topic, Bytes::from(body.to_string())))
}

/// MQTT 5 DISCONNECT for a failure that closes the connection.
pub(super) fn disconnect_v5(failure: &Failure) -> Disconnect {
    let mut disconnect = Disconnect::new(failure.disconnect_reason());
    disconnect.reason_string = Some(failure.message().as_str().into());
    disconnect
}

/// `2026-11-24T15:20:00.123Z` (UTC).
pub(super) fn iso8601(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

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
        assert_eq!(
            Failure::Auth(AuthError::TenantMismatch).puback_reason(),
            PublishAckReason::NotAuthorized
        );
    }
}
