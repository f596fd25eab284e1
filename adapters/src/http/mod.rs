//! The HTTP adapter (Hono's HTTP API): `POST /telemetry`, `POST /event` with Basic auth
//! `auth-id@tenant`, and `PUT /telemetry|event/TENANT/DEVICE` for gateways and
//! unauthenticated devices; commands piggy-backed on the response of an upload that
//! carries `hono-ttd`, and command responses on `/command/res/...`.
//!
//! - `mapping`: method, path, query and headers → what is asked (pure).
//! - `command`: the long poll, one [`CommandSink`](ferrule_command_control::CommandSink)
//!   per waiting request.
//! - this module: the hyper server (keep-alive, body size limit before reading), the
//!   authentication decision, and the one place where errors become status codes.
//!
//! Size: the hyper service, its connection handling and the status table (587 lines of
//! code; tests at the end).

mod command;
pub mod mapping;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferrule_net::listener::{Admission, Connection, Listeners};
use ferrule_net::tls::{TlsAcceptor, TlsConfig};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use ferrule_command_control::{CommandRouter, RespondError};

use crate::device::{AuthError, DeviceIdentity, DeviceRegistry};
use crate::door::{self, Standing::ThisRequest};
use crate::downstream::{Downstream, Qos, Upload, UploadError};
use crate::poll;
use mapping::{MappingError, Resource};

/// Value of `orig_adapter` for messages from this adapter.
pub const ADAPTER: &str = "hono-http";

/// `[adapters.http]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the HTTP adapter.
    pub listen: SocketAddr,
    /// Address of the HTTPS listener, used when `tls` is set.
    pub listen_tls: SocketAddr,
    /// Certificate and key for `listen_tls`; HTTPS is off unless both are set.
    pub tls: TlsConfig,
    /// Largest accepted payload in bytes (larger: 413).
    pub max_payload: usize,
    /// Let devices of tenants that allow it publish without credentials (PUT form only).
    pub allow_unauthenticated: bool,
    /// Most concurrent connections; further ones wait in the accept queue.
    pub max_connections: usize,
    /// Most connections open at once from one source address (IPv4, or IPv6 /64).
    pub max_connections_per_ip: usize,
    /// New connections per second from one source address (token bucket rate)...
    pub connection_rate_per_ip: f64,
    /// ... and burst.
    pub connection_burst_per_ip: u32,
    /// Closes connections whose request headers take longer than this.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Upper bound for `hono-ttd`: the longest a request waits for a command.
    #[serde(with = "humantime_serde")]
    pub max_ttd: Duration,
}

impl HttpConfig {
    /// The per-source connection limits of this listener.
    pub fn source_limits(&self) -> ferrule_net::listener::SourceLimits {
        ferrule_net::listener::SourceLimits {
            max_per_source: self.max_connections_per_ip,
            rate_per_second: self.connection_rate_per_ip,
            burst: self.connection_burst_per_ip,
        }
    }

    /// Checks the values serde cannot check.
    ///
    /// # Errors
    /// The first bad key.
    pub fn validate(&self) -> Result<(), ferrule_net::ConfigError> {
        let bad = |key: &str, problem: &str| {
            Err(ferrule_net::ConfigError::new("adapters.http", key, problem))
        };
        if self.max_payload == 0 {
            return bad("max_payload", "must be at least 1");
        }
        if self.max_connections == 0 {
            return bad("max_connections", "must be at least 1");
        }
        self.source_limits().validate("adapters.http")?;
        if self.header_read_timeout.is_zero() {
            return bad("header_read_timeout", "must not be zero");
        }
        Ok(())
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".parse().expect("valid"),
            listen_tls: "0.0.0.0:8443".parse().expect("valid"),
            tls: TlsConfig::default(),
            max_payload: 2048,
            allow_unauthenticated: false,
            max_connections: 10_000,
            max_connections_per_ip: ferrule_net::listener::SourceLimits::DEFAULT.max_per_source,
            connection_rate_per_ip: ferrule_net::listener::SourceLimits::DEFAULT.rate_per_second,
            connection_burst_per_ip: ferrule_net::listener::SourceLimits::DEFAULT.burst,
            header_read_timeout: Duration::from_secs(10),
            max_ttd: Duration::from_secs(60),
        }
    }
}

/// The defaults above as commented TOML.
pub const DEFAULT_TOML: &str = r#"[adapters.http]
# Address of the HTTP adapter.
listen = "0.0.0.0:8080"
# Largest accepted payload in bytes (larger: 413).
max_payload = 2048
# Let devices of tenants that allow it publish without credentials (PUT form only).
allow_unauthenticated = false
# Most concurrent connections; further ones wait in the accept queue.
max_connections = 10000
# Per source address (IPv4, or IPv6 /64): open connections, and new connections per
# second (token bucket: rate and burst). Refused peers are closed at once.
max_connections_per_ip = 1000
connection_rate_per_ip = 100.0
connection_burst_per_ip = 200
# Closes connections whose request headers take longer than this.
header_read_timeout = "10s"
# Upper bound for hono-ttd: the longest a request waits for a command (larger values
# are cut to this).
max_ttd = "1m"
# Address of the HTTPS listener, used when [adapters.http.tls] is set.
listen_tls = "0.0.0.0:8443"

[adapters.http.tls]
# PEM certificate chain and private key for listen_tls; HTTPS is off unless both are set.
# cert = "/etc/ferrule/tls/server.crt"
# key = "/etc/ferrule/tls/server.key"
"#;

/// Errors that stop the adapter from starting.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    /// The TLS certificate or key is unusable.
    #[error("adapters.http.tls: {0}")]
    Tls(ferrule_net::tls::TlsError),
    /// A configuration value is out of range.
    #[error(transparent)]
    Config(#[from] ferrule_net::ConfigError),
}

/// A bound HTTP adapter, ready to [`HttpAdapter::run`].
pub struct HttpAdapter {
    listeners: Listeners,
    state: Arc<State>,
}

struct State {
    config: HttpConfig,
    downstream: Downstream,
    registry: Arc<dyn DeviceRegistry>,
    /// Commands and command responses; `None`: `hono-ttd` is ignored and
    /// `/command/res` is not a resource.
    router: Option<CommandRouter>,
}

impl HttpAdapter {
    /// Binds the listener. With a `router`, uploads carrying `hono-ttd` wait for a
    /// command and `/command/res/...` takes command responses.
    ///
    /// # Errors
    /// The listen address cannot be bound.
    pub async fn bind(
        config: HttpConfig,
        downstream: Downstream,
        registry: Arc<dyn DeviceRegistry>,
        router: Option<CommandRouter>,
    ) -> Result<Self, HttpError> {
        config.validate()?;
        let tls = if config.tls.enabled() {
            let server = crate::tls::device_server_config(&config.tls).map_err(HttpError::Tls)?;
            Some((config.listen_tls, TlsAcceptor::from(server)))
        } else {
            None
        };
        let listeners = Listeners::bind(config.listen, tls)
            .await
            .map_err(|e| HttpError::Bind { addr: e.addr, source: e.source })?;
        Ok(Self { listeners, state: Arc::new(State { config, downstream, registry, router }) })
    }

    /// The bound sockets (plain and HTTPS).
    pub fn listeners(&self) -> &Listeners {
        &self.listeners
    }

    /// Serves until `shutdown`; then lets open requests finish.
    pub async fn run(self, shutdown: CancellationToken) {
        let tasks = TaskTracker::new();
        let config = &self.state.config;
        let admission = Admission::new("http", config.max_connections, config.source_limits());
        if let Some((listener, acceptor)) = self.listeners.tls {
            tracing::info!(addr = %listener.local_addr().expect("bound"), "HTTPS adapter up");
            let (state, admission, shutdown, t) =
                (self.state.clone(), admission.clone(), shutdown.clone(), tasks.clone());
            tasks.spawn(accept_loop(listener, Some(acceptor), state, admission, shutdown, t));
        }
        let listener = self.listeners.plain;
        tracing::info!(addr = %listener.local_addr().expect("bound"), "HTTP adapter up");
        accept_loop(listener, None, self.state, admission, shutdown, tasks.clone()).await;
        tasks.close();
        tasks.wait().await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    state: Arc<State>,
    admission: Arc<Admission>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let serve_shutdown = shutdown.clone();
    let serving = move |connection: Connection, peer| {
        let (state, shutdown) = (state.clone(), serve_shutdown.clone());
        async move {
            let cert = match &connection {
                Either::Left(_) => None,
                Either::Right(tls) => tls.get_ref().1.peer_certificates().and_then(|c| c.first()),
            };
            let cert = cert.map(|c| ClientCert(Arc::from(c.as_ref())));
            serve(TokioIo::new(connection), peer, cert, state, shutdown).await;
        }
    };
    ferrule_net::listener::serve_maybe_tls(listener, tls, admission, shutdown, tasks, serving)
        .await;
}

/// The end-entity certificate (DER) a client presented in the TLS handshake; put into
/// every request's extensions of that connection.
#[derive(Clone)]
struct ClientCert(Arc<[u8]>);

/// The client's address, in every request's extensions (failures are remembered per
/// source address).
#[derive(Clone, Copy)]
struct PeerIp(std::net::IpAddr);

/// What one keep-alive connection remembers between its requests (`door::Remembered`:
/// only while the registry saw no change, for at most `door::MEMO_TTL`): the identity its
/// last credentials authenticated as, with the `Authorization` header that presented them
/// (`None`: the connection's client certificate did), and its last registry decision.
#[derive(Default)]
struct ConnectionMemo {
    identity: door::Remembered<KnownIdentity>,
    admit: door::Memo,
}

/// The `Authorization` header that authenticated (`None`: the client certificate), and as
/// whom.
type KnownIdentity = (Option<Box<[u8]>>, Arc<DeviceIdentity>);

impl ConnectionMemo {
    /// The identity `authorization` (`None`: the client certificate) authenticated as on
    /// this connection, if still current at `seq`. The header is compared in constant
    /// time: a proxy may send other clients' requests over the same connection.
    fn identity(&self, authorization: Option<&[u8]>, seq: u64) -> Option<Arc<DeviceIdentity>> {
        use subtle::ConstantTimeEq;
        let same = |(kept, _): &KnownIdentity| match (kept, authorization) {
            (Some(a), Some(b)) => bool::from(a.as_ref().ct_eq(b)),
            (None, None) => true,
            _ => false,
        };
        self.identity.get(seq, same).map(|(_, identity)| identity)
    }
}

/// Serves one connection (plain or TLS) until it ends or `shutdown` drains it.
async fn serve<Io>(
    io: Io,
    peer: SocketAddr,
    cert: Option<ClientCert>,
    state: Arc<State>,
    shutdown: CancellationToken,
) where
    Io: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let header_timeout = state.config.header_read_timeout;
    let stopping = shutdown.clone();
    let memo = Arc::new(ConnectionMemo::default());
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        if let Some(cert) = &cert {
            req.extensions_mut().insert(cert.clone());
        }
        req.extensions_mut().insert(PeerIp(peer.ip()));
        req.extensions_mut().insert(memo.clone());
        let (state, stopping) = (state.clone(), stopping.clone());
        async move { Ok::<_, std::convert::Infallible>(handle(&state, req, &stopping).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Some(header_timeout))
        .serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Why a request failed: the single place mapping errors to HTTP answers.
#[derive(Debug)]
enum Failure {
    Mapping(MappingError),
    Auth(AuthError),
    Upload(UploadError),
    NoCredentials,
    BodyTooLarge(usize),
    BadBody(String),
    /// A command response the router could not deliver.
    Respond(RespondError),
    /// `/command/res` without a command router.
    NoCommands,
}

impl Failure {
    fn into_response(self) -> Response<Full<Bytes>> {
        let (status, message) = match &self {
            Failure::Mapping(MappingError::NotFound(_)) => (StatusCode::NOT_FOUND, self.message()),
            Failure::Mapping(MappingError::MethodNotAllowed { .. }) => {
                (StatusCode::METHOD_NOT_ALLOWED, self.message())
            }
            Failure::Mapping(MappingError::BadHeader(_)) => {
                (StatusCode::BAD_REQUEST, self.message())
            }
            Failure::NoCredentials
            | Failure::Auth(AuthError::BadCredentials)
            | Failure::Auth(AuthError::UnknownTenant) => {
                (StatusCode::UNAUTHORIZED, "bad credentials".to_owned())
            }
            Failure::Auth(AuthError::TenantDisabled)
            | Failure::Auth(AuthError::DeviceDisabled)
            | Failure::Auth(AuthError::GatewayNotAuthorized)
            | Failure::Auth(AuthError::TenantMismatch) => (StatusCode::FORBIDDEN, self.message()),
            Failure::Auth(AuthError::UnknownDevice) => (StatusCode::NOT_FOUND, self.message()),
            Failure::Auth(AuthError::Busy) => (StatusCode::TOO_MANY_REQUESTS, self.message()),
            Failure::Auth(AuthError::Unavailable(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "registry unavailable".to_owned())
            }
            Failure::Upload(e) if e.is_transient() => {
                (StatusCode::SERVICE_UNAVAILABLE, self.message())
            }
            Failure::Upload(UploadError::TooLarge { .. }) | Failure::BodyTooLarge(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, self.message())
            }
            Failure::Upload(UploadError::RateLimited(_) | UploadError::VolumeExceeded) => {
                (StatusCode::TOO_MANY_REQUESTS, self.message())
            }
            Failure::Upload(UploadError::EmptyWithoutContentType) | Failure::BadBody(_) => {
                (StatusCode::BAD_REQUEST, self.message())
            }
            Failure::Upload(_) => (StatusCode::BAD_REQUEST, self.message()),
            Failure::Respond(RespondError::BadRequestId(_)) => {
                (StatusCode::BAD_REQUEST, self.message())
            }
            Failure::Respond(RespondError::NotIssuedTo) => (StatusCode::FORBIDDEN, self.message()),
            Failure::Respond(RespondError::NoConsumer)
            | Failure::Respond(RespondError::Refused(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, self.message())
            }
            Failure::NoCommands => (StatusCode::NOT_FOUND, self.message()),
        };
        let mut response = text(status, &message);
        let headers = response.headers_mut();
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"Ferrule\""));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }

    fn message(&self) -> String {
        match self {
            Failure::Mapping(e) => e.to_string(),
            Failure::Auth(e) => e.to_string(),
            Failure::Upload(e) => e.to_string(),
            Failure::NoCredentials => "credentials required".into(),
            Failure::BodyTooLarge(max) => format!("payload exceeds the maximum of {max} bytes"),
            Failure::BadBody(e) => e.clone(),
            Failure::Respond(e) => e.to_string(),
            Failure::NoCommands => "commands are not enabled".into(),
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

async fn handle(
    state: &State,
    req: Request<Incoming>,
    shutdown: &CancellationToken,
) -> Response<Full<Bytes>> {
    let result = match mapping::resource(req.method().as_str(), req.uri().path()) {
        Err(e) => Err(Failure::Mapping(e)),
        Ok(Resource::Upload(route)) => upload(state, req, route, shutdown).await,
        Ok(Resource::CommandResponse { request_id, target }) => {
            command_response(state, req, request_id, target)
                .await
                .map(|()| status(StatusCode::ACCEPTED))
        }
    };
    result.unwrap_or_else(|failure| {
        tracing::debug!(?failure, "HTTP request refused");
        failure.into_response()
    })
}

fn status(status: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

fn header<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Who a request acts for, once authenticated and authorised.
struct Principal {
    tenant: String,
    device_id: String,
    /// A gateway acting for `device_id` (not the device itself).
    via_gateway: bool,
    /// The gateway acting for `device_id`.
    gateway: Option<String>,
    /// Its tenant's terms for the adapter (limits, defaults).
    access: crate::device::AdapterAccess,
}

/// How a request authenticates.
enum Credentials {
    /// A client certificate from the TLS handshake (it wins over Basic, as in Hono).
    Certificate(ClientCert),
    Basic(String, String),
}

/// Authenticates the request (client certificate, Basic auth, or an allowed
/// unauthenticated form) and checks it may act for `target` (the URI's tenant and device,
/// if any). A keep-alive connection presenting the credentials that authenticated its
/// previous request reuses that identity and decision ([`ConnectionMemo`]) while the
/// registry saw no change.
async fn authorize(
    state: &State,
    req: &Request<Incoming>,
    target: Option<(String, String)>,
) -> Result<Principal, Failure> {
    let memo = req.extensions().get::<Arc<ConnectionMemo>>();
    let seq = memo.and_then(|_| state.registry.change_seq());
    let cert = req.extensions().get::<ClientCert>();
    // What the memo is keyed on: the client certificate (None) or the Authorization header.
    let presented = match cert {
        Some(_) => None,
        None => req.headers().get(hyper::header::AUTHORIZATION).map(|v| v.as_bytes()),
    };
    let remembered = match (memo, seq) {
        (Some(memo), Some(seq)) if cert.is_some() || presented.is_some() => {
            memo.identity(presented, seq)
        }
        _ => None,
    };
    let identity = match remembered {
        Some(identity) => {
            count_memo_hit(cert.is_some());
            Some(identity)
        }
        None => {
            let identity = authenticate(state, req).await?.map(Arc::new);
            if let (Some(memo), Some(seq), Some(id)) = (memo, seq, &identity) {
                memo.identity.put(seq, (presented.map(Box::from), id.clone()), 1, |_| true);
            }
            identity
        }
    };
    let (tenant, device) = target.unzip();
    let names = (tenant.as_deref(), device.as_deref());
    let registry = state.registry.as_ref();
    let admit_memo = memo.map(|m| &m.admit);
    let (target, access) =
        door::admit_memo(registry, ADAPTER, identity.as_deref(), names, ThisRequest, admit_memo)
            .await
            .map_err(|e| e.auth_error().map_or(Failure::NoCredentials, Failure::Auth))?;
    Ok(Principal {
        tenant: target.tenant().to_owned(),
        device_id: target.device().to_owned(),
        via_gateway: target.via_gateway(),
        gateway: match &target {
            door::Target::ViaGateway { gateway, .. } => Some(gateway.clone()),
            _ => None,
        },
        access,
    })
}

/// A request authenticated from its connection's memo still counts as a successful
/// attempt of its credential type (`ferrule_auth_attempts_total`, as the registry path
/// counts it), through handles cached per thread.
fn count_memo_hit(certificate: bool) {
    thread_local! {
        static COUNTERS: [metrics::Counter; 2] = [
            metrics::counter!("ferrule_auth_attempts_total", "type" => "hashed-password", "outcome" => "success"),
            metrics::counter!("ferrule_auth_attempts_total", "type" => "x509-cert", "outcome" => "success"),
        ];
    }
    COUNTERS.with(|c| c[usize::from(certificate)].increment(1));
}

/// The device the request's credentials (client certificate, else Basic) authenticate;
/// `None` for a request without any that the adapter lets in unauthenticated.
async fn authenticate(
    state: &State,
    req: &Request<Incoming>,
) -> Result<Option<DeviceIdentity>, Failure> {
    let credentials = match req.extensions().get::<ClientCert>() {
        Some(cert) => Some(Credentials::Certificate(cert.clone())),
        None => basic_credentials(req)?.map(|(user, password)| Credentials::Basic(user, password)),
    };
    Ok(match credentials {
        Some(Credentials::Certificate(cert)) => {
            Some(state.registry.authenticate_certificate(&cert.0).await.map_err(Failure::Auth)?)
        }
        Some(Credentials::Basic(username, password)) => {
            let (auth_id, tenant) =
                door::split_auth_id(&username).ok_or(Failure::Auth(AuthError::BadCredentials))?;
            let source = req.extensions().get::<PeerIp>().map(|p| p.0);
            let identity = state
                .registry
                .authenticate_password(tenant, auth_id, password.as_bytes(), source)
                .await
                .map_err(Failure::Auth)?;
            Some(identity)
        }
        None if !state.config.allow_unauthenticated => return Err(Failure::NoCredentials),
        None => None,
    })
}

/// Reads the body, refusing one over `max_payload` before reading it where the length
/// is announced.
async fn body(state: &State, req: Request<Incoming>) -> Result<Bytes, Failure> {
    let max = state.config.max_payload;
    if let Some(length) =
        header(&req, CONTENT_LENGTH.as_str()).and_then(|v| v.parse::<usize>().ok())
    {
        if length > max {
            return Err(Failure::BodyTooLarge(max));
        }
    }
    Ok(Limited::new(req.into_body(), max)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                Failure::BodyTooLarge(max)
            } else {
                Failure::BadBody(format!("reading the body failed: {e}"))
            }
        })?
        .to_bytes())
}

/// Telemetry or event; then, with `hono-ttd`, the wait for a command.
async fn upload(
    state: &State,
    req: Request<Incoming>,
    route: mapping::Route,
    shutdown: &CancellationToken,
) -> Result<Response<Full<Bytes>>, Failure> {
    let qos = mapping::qos(route.endpoint, header(&req, "qos-level")).map_err(Failure::Mapping)?;
    let ttl = mapping::ttl(header(&req, "hono-ttl")).map_err(Failure::Mapping)?;
    let ttd = mapping::ttd(header(&req, "hono-ttd"), req.uri().query(), state.config.max_ttd)
        .map_err(Failure::Mapping)?;
    let content_type = header(&req, CONTENT_TYPE.as_str()).map(str::to_owned);
    let timed = state.downstream.tracing().then(ferrule_net::trace::now_ns);
    let principal = authorize(state, &req, route.target).await?;
    let lookup_ns = timed.map(|start| (start, ferrule_net::trace::now_ns()));
    let ttd = ttd.map(|ttd| principal.access.limits.clamp_ttd(ttd)).filter(|ttd| !ttd.is_zero());
    // Subscribed before the upload goes out: an application that answers the upload's
    // `ttd` at once finds the device waiting.
    let waiting = match (&state.router, ttd) {
        (Some(router), Some(ttd)) => {
            Some(poll::subscribe(router, ADAPTER, &principal.tenant, &principal.device_id, ttd))
        }
        _ => None,
    };
    let orig_address = req.uri().path().to_owned();
    let payload = body(state, req).await?;
    Downstream::validate(&payload, content_type.as_deref(), state.config.max_payload)
        .map_err(Failure::Upload)?;
    let upload = Upload {
        tenant: principal.tenant.clone(),
        device_id: principal.device_id.clone(),
        endpoint: route.endpoint,
        qos,
        payload,
        content_type,
        ttl,
        orig_adapter: ADAPTER,
        orig_address,
        properties: Vec::new(),
        limits: principal.access.limits,
        retain: false,
        defaults: principal.access.defaults.clone(),
        ttd: ttd.filter(|_| waiting.is_some()),
        gateway: principal.gateway.clone(),
        lookup_ns,
    };
    // HTTP has no fire-and-forget: even QoS 0 tells the device there was no consumer.
    state
        .downstream
        .send_reporting_drops(upload, qos == Qos::AtMostOnce)
        .await
        .map_err(Failure::Upload)?;
    let Some(waiting) = waiting else {
        return Ok(status(StatusCode::ACCEPTED));
    };
    match waiting.wait(shutdown).await {
        Some(handover) => {
            let (command, confirmation) = handover.into_parts();
            confirmation.accepted();
            Ok(command::response(command, principal.via_gateway))
        }
        None => Ok(status(StatusCode::ACCEPTED)),
    }
}

/// `POST /command/res/REQ-ID`, `PUT /command/res/TENANT/DEVICE/REQ-ID`.
async fn command_response(
    state: &State,
    req: Request<Incoming>,
    request_id: String,
    target: Option<(String, String)>,
) -> Result<(), Failure> {
    let router = state.router.as_ref().ok_or(Failure::NoCommands)?;
    let status = mapping::command_status(header(&req, "hono-cmd-status"), req.uri().query())
        .map_err(Failure::Mapping)?;
    let content_type = header(&req, CONTENT_TYPE.as_str()).map(str::to_owned);
    let principal = authorize(state, &req, target).await?;
    let payload = body(state, req).await?;
    let response = ferrule_command_control::Response {
        tenant: principal.tenant,
        device_id: principal.device_id,
        request_id,
        status,
        payload,
        content_type,
    };
    router.respond(response).await.map_err(Failure::Respond)
}

/// `Authorization: Basic base64(username:password)`; `Ok(None)` when absent.
fn basic_credentials(req: &Request<Incoming>) -> Result<Option<(String, String)>, Failure> {
    use base64::Engine;
    let Some(value) = req.headers().get(hyper::header::AUTHORIZATION) else { return Ok(None) };
    let bad = || Failure::Auth(AuthError::BadCredentials);
    let value = value.to_str().map_err(|_| bad())?;
    let encoded =
        value.strip_prefix("Basic ").or_else(|| value.strip_prefix("basic ")).ok_or_else(bad)?;
    let decoded =
        base64::engine::general_purpose::STANDARD.decode(encoded.trim()).map_err(|_| bad())?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
    let (user, password) = decoded.split_once(':').ok_or_else(bad)?;
    Ok(Some((user.to_owned(), password.to_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_toml_is_the_default_config() {
        crate::test_support::assert_default_toml(DEFAULT_TOML, "http", &HttpConfig::default());
    }

    #[test]
    fn command_response_failures_map_to_status_codes() {
        let cases = [
            (Failure::Respond(RespondError::NoConsumer), StatusCode::SERVICE_UNAVAILABLE),
            (Failure::Respond(RespondError::Refused("x".into())), StatusCode::SERVICE_UNAVAILABLE),
            (
                Failure::Respond(RespondError::BadRequestId(
                    ferrule_command_control::CommandError::NoSubject,
                )),
                StatusCode::BAD_REQUEST,
            ),
            (Failure::Respond(RespondError::NotIssuedTo), StatusCode::FORBIDDEN),
            (Failure::NoCommands, StatusCode::NOT_FOUND),
        ];
        for (failure, status) in cases {
            let response = failure.into_response();
            assert_eq!(response.status(), status);
            if status == StatusCode::SERVICE_UNAVAILABLE {
                assert!(response.headers().contains_key(RETRY_AFTER));
            }
        }
    }
}
