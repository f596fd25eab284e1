//! Handling one whole CoAP request, whatever socket it came from: the front door's
//! decision, the upload, the command response, the `hono-ttd` wait; and the one place
//! where failures become CoAP response codes. The socket loops (`connection`) call it;
//! it knows nothing of sockets.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, ResponseType};
use tokio_util::sync::CancellationToken;

use ferrule_command_control::{Command, CommandRouter, RespondError};

use super::config::{CoapConfig, ADAPTER};
use super::dtls;
use super::mapping::{self, MappingError};
use super::session::Session;
use crate::device::AdapterAccess;
use crate::device::{AuthError, DeviceRegistry};
use crate::door::{self, Standing};
use crate::downstream::{Downstream, Upload, UploadError};
use crate::poll::{self, Confirmation};

/// What every request task needs.
pub(super) struct Shared {
    pub(super) config: CoapConfig,
    pub(super) downstream: Downstream,
    pub(super) registry: Arc<dyn DeviceRegistry>,
    /// Message ids of the NON responses we originate.
    pub(super) next_message_id: AtomicU16,
    /// Requests being processed, over all peers.
    pub(super) in_flight: Arc<tokio::sync::Semaphore>,
    /// Commands (`hono-ttd`) and command responses; `None`: both are off.
    pub(super) router: Option<CommandRouter>,
    /// Cancelled at shutdown: requests waiting for a command stop waiting.
    pub(super) stopping: CancellationToken,
    /// OpenSSL's DTLS context and the cookie key.
    pub(super) dtls: dtls::DtlsServer,
}

/// Why a request failed: the single place mapping errors to CoAP codes.
#[derive(Debug)]
pub(super) enum Failure {
    Mapping(MappingError),
    Auth(AuthError),
    Upload(UploadError),
    /// Plain UDP, and the request is not an allowed unauthenticated one.
    NoCredentials,
    /// The adapter has too many requests in flight.
    Overloaded,
    /// A Block1 block out of sequence (RFC 7959 §2.9.2).
    BlockIncomplete,
    /// A command response the router could not deliver.
    Respond(RespondError),
    /// `/command_response` without a command router.
    NoCommands,
}

impl Failure {
    pub(super) fn code(&self) -> ResponseType {
        match self {
            Failure::Mapping(MappingError::NotFound(_)) => ResponseType::NotFound,
            Failure::Mapping(MappingError::MethodNotAllowed(_)) => ResponseType::MethodNotAllowed,
            Failure::Mapping(MappingError::BadOption(_))
            | Failure::Mapping(MappingError::EventNotConfirmable) => ResponseType::BadRequest,
            Failure::Mapping(MappingError::UnsupportedCriticalOption(_)) => ResponseType::BadOption,
            Failure::Mapping(MappingError::UnsupportedContentFormat(_)) => {
                ResponseType::UnsupportedContentFormat
            }
            Failure::NoCredentials
            | Failure::Auth(AuthError::BadCredentials)
            | Failure::Auth(AuthError::UnknownTenant) => ResponseType::Unauthorized,
            Failure::Auth(AuthError::TenantDisabled)
            | Failure::Auth(AuthError::DeviceDisabled)
            | Failure::Auth(AuthError::GatewayNotAuthorized)
            | Failure::Auth(AuthError::TenantMismatch) => ResponseType::Forbidden,
            Failure::Auth(AuthError::UnknownDevice) => ResponseType::NotFound,
            Failure::Auth(AuthError::Busy) => ResponseType::TooManyRequests,
            Failure::Auth(AuthError::Unavailable(_)) | Failure::Overloaded => {
                ResponseType::ServiceUnavailable
            }
            Failure::Upload(e) if e.is_transient() => ResponseType::ServiceUnavailable,
            Failure::Upload(UploadError::TooLarge { .. }) => ResponseType::RequestEntityTooLarge,
            Failure::Upload(UploadError::RateLimited(_) | UploadError::VolumeExceeded) => {
                ResponseType::TooManyRequests
            }
            Failure::Upload(_) => ResponseType::BadRequest,
            Failure::BlockIncomplete => ResponseType::RequestEntityIncomplete,
            Failure::Respond(RespondError::BadRequestId(_)) => ResponseType::BadRequest,
            Failure::Respond(RespondError::NotIssuedTo) => ResponseType::Forbidden,
            Failure::Respond(_) => ResponseType::ServiceUnavailable,
            Failure::NoCommands => ResponseType::NotFound,
        }
    }

    /// RFC 7252 §5.5.2 diagnostic payload: short, for humans. Cut to a few dozen bytes,
    /// since it may quote the request (a long path must not make the answer too big).
    pub(super) fn diagnostic(&self) -> String {
        let mut text = self.full_diagnostic();
        if text.len() > MAX_DIAGNOSTIC {
            let mut end = MAX_DIAGNOSTIC;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        text
    }

    pub(super) fn full_diagnostic(&self) -> String {
        match self {
            Failure::Mapping(e) => e.to_string(),
            Failure::Auth(AuthError::Unavailable(_)) => "registry unavailable".into(),
            Failure::Auth(e) => e.to_string(),
            Failure::Upload(e) => e.to_string(),
            Failure::NoCredentials => "credentials required (use DTLS)".into(),
            Failure::Overloaded => "too many requests in flight".into(),
            Failure::BlockIncomplete => "block out of sequence; start again with block 0".into(),
            Failure::Respond(e) => e.to_string(),
            Failure::NoCommands => "commands are not enabled".into(),
        }
    }
}

impl Shared {
    pub(super) fn message_id(&self) -> u16 {
        self.next_message_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The response to `request`: piggy-backed in an ACK for a CON, a NON with a fresh
    /// message id for a NON (RFC 7252 §5.2.3), same token either way.
    pub(super) fn response(&self, request: &Packet, code: ResponseType) -> Packet {
        let mut response = Packet::new();
        if request.header.get_type() == MessageType::Confirmable {
            response.header.set_type(MessageType::Acknowledgement);
            response.header.message_id = request.header.message_id;
        } else {
            response.header.set_type(MessageType::NonConfirmable);
            response.header.message_id = self.message_id();
        }
        response.header.code = MessageClass::Response(code);
        response.set_token(request.get_token().to_vec());
        response
    }

    pub(super) fn failure_response(&self, request: &Packet, failure: Failure) -> Packet {
        let code = failure.code();
        let mut response = self.response(request, code);
        match code {
            // Max-Age on 5.03 tells the device when to retry (RFC 7252 §5.9.3.4).
            ResponseType::ServiceUnavailable | ResponseType::TooManyRequests => {
                response.add_option(CoapOption::MaxAge, vec![RETRY_AFTER_SECONDS]);
            }
            // Size1 on 4.13 tells the device the largest payload accepted (§5.9.2.9).
            ResponseType::RequestEntityTooLarge => {
                response.add_option(CoapOption::Size1, uint(self.config.max_payload as u32));
            }
            _ => {}
        }
        response.payload = failure.diagnostic().into_bytes();
        response
    }

    /// 2.31 Continue for a non-final Block1 block, echoing it (RFC 7959 §2.3).
    pub(super) fn continue_response(&self, request: &Packet, block: mapping::Block) -> Packet {
        let mut response = self.response(request, ResponseType::Continue);
        response.add_option(CoapOption::Block1, block.encode());
        response
    }

    /// Processes one request: the response to send, or a wait for a command.
    pub(super) async fn handle(&self, from: &Session, mut request: Packet) -> Handled {
        match self.accept(from, &mut request).await {
            Ok(None) => Handled::Done(self.response(&request, ResponseType::Changed)),
            Ok(Some(wait)) => Handled::Poll(Box::new(Poll { request, wait })),
            Err(failure) => {
                tracing::debug!(?failure, "CoAP request refused");
                Handled::Done(self.failure_response(&request, failure))
            }
        }
    }

    /// Who a request from the session `from` acts for: `(tenant, device, via_gateway)`. A
    /// DTLS session outlives registry changes, so its device (or gateway) is checked again
    /// on every request; the session's memo answers while the registry saw no change (see
    /// `door::Memo`; the plain-UDP session's memo serves every unauthenticated device, whose
    /// decisions do not depend on the sender).
    pub(super) async fn authorize(
        &self,
        from: &Session,
        target: Option<(String, String)>,
    ) -> Result<(String, String, bool, AdapterAccess), Failure> {
        let identity = from.identity.as_ref();
        if identity.is_none() && !self.config.allow_unauthenticated {
            return Err(Failure::NoCredentials);
        }
        let (tenant, device) = target.unzip();
        let names = (tenant.as_deref(), device.as_deref());
        let registry = self.registry.as_ref();
        let memo = Some(&from.memo);
        let (target, access) =
            door::admit_memo(registry, ADAPTER, identity, names, Standing::Session, memo)
                .await
                .map_err(|e| e.auth_error().map_or(Failure::NoCredentials, Failure::Auth))?;
        let via_gateway = target.via_gateway();
        let (tenant, device) = target.into_tenant_device();
        Ok((tenant, device, via_gateway, access))
    }

    /// For a request without a DTLS identity: whether its target device may upload
    /// unauthenticated (the same checks as for the whole request, without the body).
    pub(super) async fn may_upload_unauthenticated(
        &self,
        from: &Session,
        packet: &Packet,
    ) -> Result<(), Failure> {
        let target = match mapping::command_response(packet).map_err(Failure::Mapping)? {
            Some(answer) => answer.target,
            None => mapping::request(packet).map_err(Failure::Mapping)?.route.target,
        };
        self.authorize(from, target).await.map(drop)
    }

    /// Decides and sends; takes the payload out of `packet` (the answer needs only its
    /// header and token). `Some`: the upload was accepted and the device waits for a
    /// command.
    pub(super) async fn accept(
        &self,
        from: &Session,
        packet: &mut Packet,
    ) -> Result<Option<Wait>, Failure> {
        let identity = from.identity.as_ref();
        if let Some(answer) = mapping::command_response(packet).map_err(Failure::Mapping)? {
            self.respond(from, answer, packet).await?;
            return Ok(None);
        }
        let request = mapping::request(packet).map_err(Failure::Mapping)?;
        let timed = self.downstream.tracing().then(ferrule_net::trace::now_ns);
        let (tenant, device_id, via_gateway, access) =
            self.authorize(from, request.route.target).await?;
        let lookup_ns = timed.map(|start| (start, ferrule_net::trace::now_ns()));
        let ttd = request
            .ttd
            .map(|ttd| access.limits.clamp_ttd(ttd.min(self.config.max_ttd)))
            .filter(|ttd| !ttd.is_zero());
        // Subscribed before the upload goes out: an application that answers the upload's
        // `ttd` at once finds the device waiting.
        let waiting = match (&self.router, ttd) {
            (Some(router), Some(ttd)) => {
                Some(poll::subscribe(router, ADAPTER, &tenant, &device_id, ttd))
            }
            _ => None,
        };
        let max = self.config.max_payload;
        Downstream::validate(&packet.payload, request.content_type.as_deref(), max)
            .map_err(Failure::Upload)?;
        let payload = Bytes::from(std::mem::take(&mut packet.payload));
        let upload = Upload {
            tenant: tenant.clone(),
            device_id: device_id.clone(),
            endpoint: request.route.endpoint,
            qos: request.qos,
            payload,
            content_type: request.content_type,
            ttl: request.ttl,
            orig_adapter: ADAPTER,
            orig_address: request.path,
            properties: Vec::new(),
            limits: access.limits,
            retain: false,
            defaults: access.defaults,
            ttd: ttd.filter(|_| waiting.is_some()),
            gateway: via_gateway.then(|| identity.map(|i| i.device_id.clone())).flatten(),
            lookup_ns,
        };
        // NON (at most once) is dropped and counted by `send` when nobody consumes.
        self.downstream.send(upload).await.map_err(Failure::Upload)?;
        Ok(waiting.map(|waiting| Wait {
            tenant,
            via_gateway,
            waiting: std::sync::Mutex::new(Some(waiting)),
            short_form: request.short_form,
        }))
    }

    /// `POST /command_response/REQ-ID`, `PUT /command_response/TENANT/DEVICE/REQ-ID`.
    pub(super) async fn respond(
        &self,
        from: &Session,
        answer: mapping::CommandResponse,
        packet: &mut Packet,
    ) -> Result<(), Failure> {
        let router = self.router.as_ref().ok_or(Failure::NoCommands)?;
        let (tenant, device_id, ..) = self.authorize(from, answer.target).await?;
        let max = self.config.max_payload;
        if packet.payload.len() > max {
            return Err(Failure::Upload(UploadError::TooLarge { size: packet.payload.len(), max }));
        }
        let response = ferrule_command_control::Response {
            tenant,
            device_id,
            request_id: answer.request_id,
            status: answer.status,
            payload: Bytes::from(std::mem::take(&mut packet.payload)),
            content_type: answer.content_type,
        };
        router.respond(response).await.map_err(Failure::Respond)
    }

    /// Waits for a command for `poll`'s device: the 2.04 to send (with the command, if one
    /// came) and, with a command, its confirmation (use it once the device has the
    /// response; dropping it releases the command).
    ///
    /// # Cancel safety
    /// Dropping the future ends the wait; a command being handed over is released.
    pub(super) async fn wait_for_command(&self, poll: &Poll) -> (Packet, Option<Confirmation>) {
        let plain = self.response(&poll.request, ResponseType::Changed);
        let w = &poll.wait;
        let waiting = w.waiting.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(waiting) = waiting else { return (plain, None) };
        let Some(handover) = waiting.wait(&self.stopping).await else {
            return (plain, None);
        };
        let (command, confirmation) = handover.into_parts();
        let response = self.command_response(&poll.request, w, &command);
        // A command that does not fit a datagram (no Block2 here) is released.
        match response.to_bytes() {
            Ok(_) => (response, Some(confirmation)),
            Err(e) => {
                tracing::warn!(error = ?e, command = %command.name, "command does not fit a CoAP response; released");
                (plain, None)
            }
        }
    }

    /// 2.04 carrying `command` (Hono's CoAP command format).
    pub(super) fn command_response(
        &self,
        request: &Packet,
        wait: &Wait,
        command: &Command,
    ) -> Packet {
        let mut response = self.response(request, ResponseType::Changed);
        let (one_way, answer) =
            if wait.short_form { ("c", "cr") } else { ("command", "command_response") };
        let mut path = vec![if command.request_id.is_some() { answer } else { one_way }.to_owned()];
        if wait.via_gateway {
            path.push(wait.tenant.clone());
            path.push(command.device_id.clone());
        }
        path.extend(command.request_id.clone());
        for segment in path {
            response.add_option(CoapOption::LocationPath, segment.into_bytes());
        }
        response.add_option(
            CoapOption::LocationQuery,
            format!("hono-command={}", command.name).into_bytes(),
        );
        if let Some(format) = command.content_type.as_deref().and_then(mapping::content_format_of) {
            response.add_option(CoapOption::ContentFormat, uint(u32::from(format)));
        }
        response.payload = command.payload.to_vec();
        response
    }
}

/// What became of a request.
pub(crate) enum Handled {
    /// Answer with this.
    Done(Packet),
    /// Accepted; the device waits for a command ([`Shared::wait_for_command`]). Boxed:
    /// a poll holds its command subscription, much larger than an answer.
    Poll(Box<Poll>),
}

/// A request waiting for a command.
pub(super) struct Poll {
    /// The request, payload taken (for the response's type, message id and token).
    request: Packet,
    wait: Wait,
}

impl Poll {
    pub(crate) fn confirmable(&self) -> bool {
        self.request.header.get_type() == MessageType::Confirmable
    }
}

/// For whom and how long to wait.
pub(super) struct Wait {
    tenant: String,
    via_gateway: bool,
    /// The subscription, made before the upload (taken by the wait).
    waiting: std::sync::Mutex<Option<poll::Waiting>>,
    short_form: bool,
}

/// Longest diagnostic payload, in bytes.
pub(super) const MAX_DIAGNOSTIC: usize = 96;

/// Seconds a device should wait before retrying after 5.03 / 4.29.
pub(super) const RETRY_AFTER_SECONDS: u8 = 1;

/// A CoAP uint option value: big endian, no leading zero bytes (RFC 7252 §3.2).
pub(super) fn uint(value: u32) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    bytes[skip..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn diagnostics_are_short() {
        let long = Failure::Mapping(MappingError::NotFound(format!("/{}", "ü".repeat(1000))));
        assert!(long.diagnostic().len() <= MAX_DIAGNOSTIC);
        assert_eq!(Failure::Overloaded.diagnostic(), "too many requests in flight");
    }

    #[test]
    pub(super) fn uint_options_have_no_leading_zeros() {
        assert_eq!(uint(0), Vec::<u8>::new());
        assert_eq!(uint(64), vec![64]);
        assert_eq!(uint(2048), vec![0x08, 0x00]);
    }

    #[test]
    pub(super) fn failures_map_to_hono_codes() {
        let cases = [
            (Failure::Mapping(MappingError::NotFound("/x".into())), ResponseType::NotFound),
            (Failure::Mapping(MappingError::EventNotConfirmable), ResponseType::BadRequest),
            (Failure::Auth(AuthError::BadCredentials), ResponseType::Unauthorized),
            (Failure::Auth(AuthError::DeviceDisabled), ResponseType::Forbidden),
            (Failure::Auth(AuthError::GatewayNotAuthorized), ResponseType::Forbidden),
            (Failure::Auth(AuthError::TenantMismatch), ResponseType::Forbidden),
            (Failure::Auth(AuthError::Busy), ResponseType::TooManyRequests),
            (
                Failure::Upload(UploadError::NoConsumer("telemetry/t".into())),
                ResponseType::ServiceUnavailable,
            ),
            (
                Failure::Upload(UploadError::TooLarge { size: 3, max: 2 }),
                ResponseType::RequestEntityTooLarge,
            ),
            (Failure::Upload(UploadError::EmptyWithoutContentType), ResponseType::BadRequest),
            (Failure::Upload(UploadError::RateLimited("r".into())), ResponseType::TooManyRequests),
            (Failure::Overloaded, ResponseType::ServiceUnavailable),
        ];
        for (failure, code) in cases {
            assert_eq!(failure.code(), code, "{failure:?}");
        }
    }
}
