//! The CoAP adapter (Hono's CoAP API, RFC 7252): `POST /telemetry` (`/t`) and
//! `POST /event` (`/e`) for devices authenticated by DTLS-PSK (identity
//! `auth-id@tenant`), `PUT /telemetry|event/TENANT/DEVICE` for gateways and, on plain
//! UDP where allowed, unauthenticated devices.
//!
//! - `mapping`: CoAP method, Uri-Path, Uri-Query, Content-Format → what is asked (pure).
//! - `session`: message deduplication and in-flight limits (a state machine over `now`).
//! - `connection`: the plain UDP socket loop and the DTLS listener and sessions.
//! - this module: config, the authentication decision, and the one place where errors
//!   become CoAP response codes.
//!
//! CON requests are at least once: the piggy-backed 2.04 goes out only after the
//! messaging core accepted the message. NON requests are at most once. Each request is
//! processed in its own task (bounded), so the receive loops never wait for downstream.
//!
//! Commands: with a [`CommandRouter`], an upload carrying `?hono-ttd=N` then waits up to
//! N seconds (at most `max_ttd`) for a command, which comes back in the 2.04
//! (Location-Query `hono-command=NAME`, Location-Path `cr/REQ-ID` / `c`, long forms for
//! long endpoint names); a CON request still waiting after `SEPARATE_RESPONSE_AFTER`
//! gets an empty ACK and later a separate CON response. Devices answer on
//! `/command_response/REQ-ID` (`/cr`), gateways on `/command_response/TENANT/DEVICE/REQ-ID`.

pub(crate) mod connection;
pub(crate) mod dtls;
pub(crate) mod dtls_front;
pub mod mapping;
pub mod session;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, ResponseType};
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use ferrule_command_control::{Command, CommandRouter, RespondError};

use crate::device::{AuthError, DeviceIdentity, DeviceRegistry};
use crate::door::{self, Denied, Standing, Target, TargetError};
use crate::downstream::{Downstream, Upload, UploadError};
use crate::poll::{self, Confirmation};
use mapping::MappingError;

/// Value of `orig_adapter` for messages from this adapter.
pub const ADAPTER: &str = "hono-coap";

/// `[adapters.coap]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoapConfig {
    /// Plain UDP endpoint (unauthenticated devices only; see `allow_unauthenticated`).
    pub listen: SocketAddr,
    /// DTLS endpoint (devices and gateways authenticated by PSK).
    pub listen_dtls: SocketAddr,
    /// Largest accepted payload in bytes (larger: 4.13).
    pub max_payload: usize,
    /// Let devices of tenants that allow it publish over plain UDP (PUT form only).
    pub allow_unauthenticated: bool,
    /// Most requests processed at once, over all peers (more: 5.03).
    pub max_in_flight: usize,
    /// Most requests processed at once for one peer (more: 5.03).
    pub max_in_flight_per_peer: usize,
    /// Most remembered exchanges (message ids) for deduplication on the UDP endpoint.
    pub max_exchanges: usize,
    /// Most remembered exchanges per DTLS session.
    pub max_exchanges_per_session: usize,
    /// Most block-wise (Block1) request bodies being received at once on the UDP
    /// endpoint; a DTLS session may have `max_in_flight_per_peer` of them.
    pub max_block_transfers: usize,
    /// Most DTLS sessions (handshaking or established); further peers are ignored.
    pub max_dtls_sessions: usize,
    /// Most DTLS handshakes in progress from one source IP address (more: ignored).
    pub max_dtls_handshakes_per_ip: usize,
    /// Answers per second to one source address on plain UDP (burst: twice that); more
    /// are not sent, so the endpoint cannot reflect traffic at a spoofed victim.
    pub reply_rate_per_ip: u32,
    /// A DTLS handshake that takes longer than this is abandoned.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A DTLS session without traffic for this long is closed.
    #[serde(with = "humantime_serde")]
    pub session_idle_timeout: Duration,
    /// Upper bound for `hono-ttd`: the longest a request waits for a command.
    #[serde(with = "humantime_serde")]
    pub max_ttd: Duration,
}

impl Default for CoapConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:5683".parse().expect("valid"),
            listen_dtls: "0.0.0.0:5684".parse().expect("valid"),
            max_payload: 2048,
            allow_unauthenticated: false,
            max_in_flight: 1000,
            max_in_flight_per_peer: 8,
            max_exchanges: 10_000,
            max_exchanges_per_session: 64,
            max_block_transfers: 1000,
            max_dtls_sessions: 10_000,
            max_dtls_handshakes_per_ip: 32,
            reply_rate_per_ip: 200,
            handshake_timeout: Duration::from_secs(10),
            session_idle_timeout: Duration::from_secs(300),
            max_ttd: Duration::from_secs(60),
        }
    }
}

/// The defaults above as commented TOML.
pub const DEFAULT_TOML: &str = r#"[adapters.coap]
# Plain UDP endpoint (unauthenticated devices only: bound only when
# allow_unauthenticated is set).
listen = "0.0.0.0:5683"
# DTLS endpoint (devices and gateways authenticated by PSK, identity auth-id@tenant).
listen_dtls = "0.0.0.0:5684"
# Largest accepted payload in bytes (larger: 4.13).
max_payload = 2048
# Let devices of tenants that allow it publish over plain UDP (PUT form only).
allow_unauthenticated = false
# Most requests processed at once, over all peers (more: 5.03).
max_in_flight = 1000
# Most requests processed at once for one peer (more: 5.03).
max_in_flight_per_peer = 8
# Most remembered exchanges (message ids) for deduplication on the UDP endpoint.
max_exchanges = 10000
# Most remembered exchanges per DTLS session.
max_exchanges_per_session = 64
# Most block-wise (Block1) request bodies being received at once on the UDP endpoint;
# a DTLS session may have max_in_flight_per_peer of them.
max_block_transfers = 1000
# Most DTLS sessions (handshaking or established); further peers are ignored.
max_dtls_sessions = 10000
# Most DTLS handshakes in progress from one source IP address (more are ignored), so
# that one host cannot take every session slot.
max_dtls_handshakes_per_ip = 32
# Answers per second to one source address on plain UDP (burst: twice that); more are not
# sent, so the endpoint cannot reflect traffic at a spoofed victim.
reply_rate_per_ip = 200
# A DTLS handshake that takes longer than this is abandoned.
handshake_timeout = "10s"
# A DTLS session without traffic for this long is closed.
session_idle_timeout = "5m"
# Upper bound for hono-ttd: the longest a request waits for a command (larger values
# are cut to this). Each waiting request counts against max_in_flight.
max_ttd = "1m"
"#;

/// Errors that stop the adapter from starting.
#[derive(Debug, thiserror::Error)]
pub enum CoapError {
    /// A socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    /// The DTLS PSK lookup blocks a worker thread while it asks the registry, which a
    /// current-thread runtime cannot do.
    #[error("the CoAP adapter needs a multi-threaded tokio runtime")]
    Runtime,
    /// OpenSSL's DTLS context could not be set up.
    #[error("cannot set up DTLS: {0}")]
    Dtls(String),
    /// A config value is out of range; the message names the key.
    #[error("adapters.coap.{0}")]
    Config(String),
}

/// Largest payload that fits a UDP datagram with a CoAP header (coap-lite's own
/// limit with its `udp` feature is 64,000 bytes for the whole message).
pub const MAX_PAYLOAD_LIMIT: usize = 63_000;

impl CoapConfig {
    /// Checks the values `bind` relies on.
    ///
    /// # Errors
    /// [`CoapError::Config`] naming the first bad key.
    pub fn validate(&self) -> Result<(), CoapError> {
        let positive = [
            ("max_in_flight", self.max_in_flight),
            ("max_in_flight_per_peer", self.max_in_flight_per_peer),
            ("max_exchanges", self.max_exchanges),
            ("max_exchanges_per_session", self.max_exchanges_per_session),
            ("max_block_transfers", self.max_block_transfers),
            ("max_dtls_sessions", self.max_dtls_sessions),
            ("max_dtls_handshakes_per_ip", self.max_dtls_handshakes_per_ip),
            ("reply_rate_per_ip", self.reply_rate_per_ip as usize),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(CoapError::Config(format!("{key} must be at least 1")));
        }
        if self.max_payload > MAX_PAYLOAD_LIMIT {
            return Err(CoapError::Config(format!(
                "max_payload = {} does not fit a UDP datagram (at most {MAX_PAYLOAD_LIMIT})",
                self.max_payload
            )));
        }
        if self.handshake_timeout.is_zero() || self.session_idle_timeout.is_zero() {
            return Err(CoapError::Config(
                "handshake_timeout and session_idle_timeout must not be zero".into(),
            ));
        }
        Ok(())
    }
}

/// A bound CoAP adapter, ready to [`CoapAdapter::run`].
pub struct CoapAdapter {
    /// Bound only when unauthenticated devices are allowed: nothing else may use it.
    udp: Option<Arc<UdpSocket>>,
    dtls: Arc<UdpSocket>,
    shared: Arc<Shared>,
}

/// What every request task needs.
pub(crate) struct Shared {
    config: CoapConfig,
    downstream: Downstream,
    registry: Arc<dyn DeviceRegistry>,
    /// Message ids of the NON responses we originate.
    next_message_id: AtomicU16,
    /// Requests being processed, over all peers.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Commands (`hono-ttd`) and command responses; `None`: both are off.
    router: Option<CommandRouter>,
    /// Cancelled at shutdown: requests waiting for a command stop waiting.
    stopping: CancellationToken,
    /// OpenSSL's DTLS context and the cookie key.
    dtls: dtls::DtlsServer,
}

impl CoapAdapter {
    /// Binds the plain UDP and the DTLS sockets. With a `router`, uploads carrying
    /// `hono-ttd` wait for a command and `/command_response` takes command responses.
    ///
    /// # Errors
    /// The config is invalid, a socket cannot be bound, or the runtime is not
    /// multi-threaded.
    pub async fn bind(
        config: CoapConfig,
        downstream: Downstream,
        registry: Arc<dyn DeviceRegistry>,
        router: Option<CommandRouter>,
    ) -> Result<Self, CoapError> {
        config.validate()?;
        if tokio::runtime::Handle::current().runtime_flavor()
            != tokio::runtime::RuntimeFlavor::MultiThread
        {
            return Err(CoapError::Runtime);
        }
        let bind = |addr: SocketAddr| async move {
            UdpSocket::bind(addr)
                .await
                .map(Arc::new)
                .map_err(|source| CoapError::Bind { addr, source })
        };
        // Plain UDP serves unauthenticated devices only: unbound otherwise, so it is
        // neither an attack surface nor a reflector.
        let udp =
            if config.allow_unauthenticated { Some(bind(config.listen).await?) } else { None };
        let dtls = bind(config.listen_dtls).await?;
        // Start message ids somewhere unpredictable, so a restart does not reuse recent ones.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u16)
            .unwrap_or(0);
        let in_flight = Arc::new(tokio::sync::Semaphore::new(config.max_in_flight));
        let shared = Shared {
            config,
            downstream,
            registry,
            next_message_id: AtomicU16::new(seed),
            in_flight,
            router,
            stopping: CancellationToken::new(),
            dtls: dtls::DtlsServer::new().map_err(|e| CoapError::Dtls(e.to_string()))?,
        };
        Ok(Self { udp, dtls, shared: Arc::new(shared) })
    }

    /// The plain UDP address; `None` unless `allow_unauthenticated` is set.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.udp.as_ref().map(|udp| udp.local_addr().expect("bound socket has an address"))
    }

    /// The DTLS address.
    pub fn local_dtls_addr(&self) -> SocketAddr {
        self.dtls.local_addr().expect("bound socket has an address")
    }

    /// Serves until `shutdown`; then lets requests being processed finish.
    pub async fn run(self, shutdown: CancellationToken) {
        match self.local_addr() {
            Some(udp) => tracing::info!(%udp, dtls = %self.local_dtls_addr(), "CoAP adapter up"),
            None => {
                tracing::info!(dtls = %self.local_dtls_addr(), "CoAP adapter up (plain UDP off)")
            }
        }
        let tasks = tokio_util::task::TaskTracker::new();
        let stopping = self.shared.stopping.clone();
        let stop = async {
            shutdown.cancelled().await;
            stopping.cancel();
        };
        let (shared, udp_tasks, udp_shutdown) =
            (self.shared.clone(), tasks.clone(), shutdown.clone());
        let udp = async move {
            if let Some(udp) = self.udp {
                connection::serve_udp(udp, shared, udp_tasks, udp_shutdown).await;
            }
        };
        let dtls = connection::serve_dtls(self.dtls, self.shared, tasks.clone(), shutdown.clone());
        tokio::join!(udp, dtls, stop);
        tasks.close();
        tasks.wait().await;
    }
}

/// Why a request failed: the single place mapping errors to CoAP codes.
#[derive(Debug)]
enum Failure {
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
    fn code(&self) -> ResponseType {
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
            Failure::Upload(_) => ResponseType::BadRequest,
            Failure::BlockIncomplete => ResponseType::RequestEntityIncomplete,
            Failure::Respond(RespondError::BadRequestId(_)) => ResponseType::BadRequest,
            Failure::Respond(_) => ResponseType::ServiceUnavailable,
            Failure::NoCommands => ResponseType::NotFound,
        }
    }

    /// RFC 7252 §5.5.2 diagnostic payload: short, for humans. Cut to a few dozen bytes,
    /// since it may quote the request (a long path must not make the answer too big).
    fn diagnostic(&self) -> String {
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

    fn full_diagnostic(&self) -> String {
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
    fn message_id(&self) -> u16 {
        self.next_message_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The response to `request`: piggy-backed in an ACK for a CON, a NON with a fresh
    /// message id for a NON (RFC 7252 §5.2.3), same token either way.
    fn response(&self, request: &Packet, code: ResponseType) -> Packet {
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

    fn failure_response(&self, request: &Packet, failure: Failure) -> Packet {
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
    fn continue_response(&self, request: &Packet, block: mapping::Block) -> Packet {
        let mut response = self.response(request, ResponseType::Continue);
        response.add_option(CoapOption::Block1, block.encode());
        response
    }

    /// Processes one request: the response to send, or a wait for a command.
    async fn handle(&self, identity: Option<&DeviceIdentity>, mut request: Packet) -> Handled {
        match self.accept(identity, &mut request).await {
            Ok(None) => Handled::Done(self.response(&request, ResponseType::Changed)),
            Ok(Some(wait)) => Handled::Poll(Poll { request, wait }),
            Err(failure) => {
                tracing::debug!(?failure, "CoAP request refused");
                Handled::Done(self.failure_response(&request, failure))
            }
        }
    }

    /// Who the request acts for: `(tenant, device, via_gateway)`. A DTLS session outlives
    /// registry changes, so its device (or gateway) is checked again on every request (the
    /// registry caches): one disabled while its session lasts is cut off promptly.
    async fn authorize(
        &self,
        identity: Option<&DeviceIdentity>,
        target: Option<(String, String)>,
    ) -> Result<(String, String, bool), Failure> {
        if identity.is_none() && !self.config.allow_unauthenticated {
            return Err(Failure::NoCredentials);
        }
        let (tenant, device) = target.unzip();
        let target = Target::resolve(identity, tenant.as_deref(), device.as_deref()).map_err(
            |e| match e {
                TargetError::TenantMismatch => Failure::Auth(AuthError::TenantMismatch),
                TargetError::IdentityRequired => Failure::NoCredentials,
            },
        )?;
        door::authorize(self.registry.as_ref(), ADAPTER, &target, Standing::Session)
            .await
            .map_err(|refused| match refused.denied {
                Denied::Auth(e) => Failure::Auth(e),
                Denied::UnauthenticatedNotAllowed => Failure::NoCredentials,
            })?;
        let via_gateway = target.via_gateway();
        let (tenant, device) = target.into_tenant_device();
        Ok((tenant, device, via_gateway))
    }

    /// For a request without a DTLS identity: whether its target device may upload
    /// unauthenticated (the same checks as for the whole request, without the body).
    async fn may_upload_unauthenticated(&self, packet: &Packet) -> Result<(), Failure> {
        let target = match mapping::command_response(packet).map_err(Failure::Mapping)? {
            Some(answer) => answer.target,
            None => mapping::request(packet).map_err(Failure::Mapping)?.route.target,
        };
        self.authorize(None, target).await.map(drop)
    }

    /// Decides and sends; takes the payload out of `packet` (the answer needs only its
    /// header and token). `Some`: the upload was accepted and the device waits for a
    /// command.
    async fn accept(
        &self,
        identity: Option<&DeviceIdentity>,
        packet: &mut Packet,
    ) -> Result<Option<Wait>, Failure> {
        if let Some(answer) = mapping::command_response(packet).map_err(Failure::Mapping)? {
            self.respond(identity, answer, packet).await?;
            return Ok(None);
        }
        let request = mapping::request(packet).map_err(Failure::Mapping)?;
        let (tenant, device_id, via_gateway) =
            self.authorize(identity, request.route.target).await?;
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
        };
        // NON (at most once) is dropped and counted by `send` when nobody consumes.
        self.downstream.send(upload).await.map_err(Failure::Upload)?;
        let ttd = request.ttd.map(|ttd| ttd.min(self.config.max_ttd)).filter(|ttd| !ttd.is_zero());
        Ok(match (&self.router, ttd) {
            (Some(_), Some(ttd)) => {
                Some(Wait { tenant, device_id, via_gateway, ttd, short_form: request.short_form })
            }
            _ => None,
        })
    }

    /// `POST /command_response/REQ-ID`, `PUT /command_response/TENANT/DEVICE/REQ-ID`.
    async fn respond(
        &self,
        identity: Option<&DeviceIdentity>,
        answer: mapping::CommandResponse,
        packet: &mut Packet,
    ) -> Result<(), Failure> {
        let router = self.router.as_ref().ok_or(Failure::NoCommands)?;
        let (tenant, device_id, _) = self.authorize(identity, answer.target).await?;
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
    async fn wait_for_command(&self, poll: &Poll) -> (Packet, Option<Confirmation>) {
        let plain = self.response(&poll.request, ResponseType::Changed);
        let Some(router) = &self.router else { return (plain, None) };
        let w = &poll.wait;
        let Some(handover) =
            poll::wait(router, ADAPTER, &w.tenant, &w.device_id, w.ttd, &self.stopping).await
        else {
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
    fn command_response(&self, request: &Packet, wait: &Wait, command: &Command) -> Packet {
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
    /// Accepted; the device waits for a command ([`Shared::wait_for_command`]).
    Poll(Poll),
}

/// A request waiting for a command.
pub(crate) struct Poll {
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
struct Wait {
    tenant: String,
    device_id: String,
    via_gateway: bool,
    ttd: Duration,
    short_form: bool,
}

/// Longest diagnostic payload, in bytes.
const MAX_DIAGNOSTIC: usize = 96;

/// Seconds a device should wait before retrying after 5.03 / 4.29.
const RETRY_AFTER_SECONDS: u8 = 1;

/// A CoAP uint option value: big endian, no leading zero bytes (RFC 7252 §3.2).
fn uint(value: u32) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    bytes[skip..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_toml_is_the_default_config() {
        #[derive(Deserialize)]
        struct File {
            adapters: Adapters,
        }
        #[derive(Deserialize)]
        struct Adapters {
            coap: CoapConfig,
        }
        let file: File = toml::from_str(DEFAULT_TOML).expect("DEFAULT_TOML parses");
        assert_eq!(file.adapters.coap, CoapConfig::default());
        assert!(
            toml::from_str::<CoapConfig>("no_such_key = 1").is_err(),
            "unknown keys are refused"
        );
    }

    #[test]
    fn config_is_validated_naming_the_key() {
        assert!(CoapConfig::default().validate().is_ok());
        let config = CoapConfig { max_payload: 70_000, ..Default::default() };
        assert!(config.validate().unwrap_err().to_string().contains("max_payload"));
        let config = CoapConfig { max_in_flight_per_peer: 0, ..Default::default() };
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("adapters.coap.max_in_flight_per_peer"));
    }

    #[test]
    fn diagnostics_are_short() {
        let long = Failure::Mapping(MappingError::NotFound(format!("/{}", "ü".repeat(1000))));
        assert!(long.diagnostic().len() <= MAX_DIAGNOSTIC);
        assert_eq!(Failure::Overloaded.diagnostic(), "too many requests in flight");
    }

    #[test]
    fn uint_options_have_no_leading_zeros() {
        assert_eq!(uint(0), Vec::<u8>::new());
        assert_eq!(uint(64), vec![64]);
        assert_eq!(uint(2048), vec![0x08, 0x00]);
    }

    #[test]
    fn failures_map_to_hono_codes() {
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
            (Failure::Overloaded, ResponseType::ServiceUnavailable),
        ];
        for (failure, code) in cases {
            assert_eq!(failure.code(), code, "{failure:?}");
        }
    }
}
