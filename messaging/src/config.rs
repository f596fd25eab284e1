//! Configuration of the messaging core (`[messaging]` in the platform's TOML file).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::address::AddressRule;
use ferrule_net::ConfigError;

/// `[messaging]`: the AMQP 1.0 listener, address types, queues and application users.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MessagingConfig {
    /// Address of the AMQP 1.0 listener for applications.
    pub listen: SocketAddr,
    /// Address of the AMQP 1.0 over TLS listener (`amqps`), used when `tls` is set.
    pub listen_tls: SocketAddr,
    /// Certificate and key for `listen_tls`; TLS is off unless both are set.
    pub tls: ferrule_net::tls::TlsConfig,
    /// Address rules, consulted in order before the built-in ones (`telemetry/+` anycast,
    /// `event/+` queue, `command/+` and `command_response/+/*` anycast).
    pub addresses: Vec<AddressRule>,
    /// Most messages a queue (or topic subscription) holds; beyond it senders get
    /// `rejected` with `amqp:resource-limit-exceeded`.
    pub queue_max_depth: usize,
    /// Most bytes a queue (or topic subscription) holds (messages as stored, plus 512 per
    /// message); beyond it senders get `rejected` with `amqp:resource-limit-exceeded`.
    /// Queues live in memory as well as on disk: this bounds what one address can pin.
    pub queue_max_bytes: usize,
    /// Most bytes all queues of one tenant hold together (same measure): one tenant's
    /// backlog cannot take the memory the others need.
    pub tenant_max_queue_bytes: usize,
    /// Most addresses one tenant has at once (reply addresses, dynamic receivers,
    /// queues; the platform's internal ones, such as deferred commands, are bounded by
    /// the registry instead). Beyond it an attach is refused and a message rejected with
    /// `amqp:resource-limit-exceeded`. Idle reply and dynamic addresses are forgotten.
    pub max_addresses_per_tenant: usize,
    /// Bytes that must stay free on the data directory's file system: below it, new
    /// messages for queues are refused (`amqp:resource-limit-exceeded`, devices: 503 /
    /// 0x97) before the disk is full; acknowledgements still go through. 0: no floor.
    pub min_free_disk: u64,
    /// Messages a consumer link may take from its address ahead of the client's credit
    /// (they wait in the server, bounded by this, and are released if the link goes).
    pub consumer_prefetch: u32,
    /// Most unsettled deliveries outstanding on one consumer link.
    pub consumer_window: u32,
    /// How long an anycast message (telemetry, command responses) waits for credit when
    /// consumers are attached but all busy; meanwhile its producer waits (a QoS 1 device
    /// for its PUBACK). Past it: `released`, as when nobody is attached. `0s`: no wait.
    #[serde(with = "humantime_serde")]
    pub consumer_wait: Duration,
    /// Bytes of such waiting messages one address holds (payload plus 512 per message);
    /// beyond it they are `released` at once.
    pub consumer_wait_bytes: usize,
    /// Bytes of waiting messages all addresses together hold.
    pub consumer_wait_total_bytes: usize,
    /// Largest AMQP frame the listener accepts.
    pub max_frame_size: u32,
    /// Most application connections open at once; further ones wait in the backlog.
    pub max_connections: usize,
    /// Most connections open at once from one source address (IPv4, or IPv6 /64).
    pub max_connections_per_ip: usize,
    /// New connections per second from one source address (token bucket rate)...
    pub connection_rate_per_ip: f64,
    /// ... and burst.
    pub connection_burst_per_ip: u32,
    /// Time a client has for the protocol header, SASL and open; then it is closed.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Idle timeout advertised in open: a peer that sends nothing (not even a heartbeat)
    /// for this long is closed, and its unsettled deliveries go to other consumers.
    /// TCP keep-alive probes start after the same time.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Largest message an application may send; a larger one is refused with
    /// `amqp:link:message-size-exceeded` (and never held in memory whole).
    pub max_message_size: u32,
    /// How often queues drop expired messages that nobody consumes.
    #[serde(with = "humantime_serde")]
    pub expiry_check_interval: Duration,
    /// Application authentication.
    pub sasl: SaslConfig,
    /// Where telemetry and events go: this process's broker, or a shared one.
    pub backend: BackendConfig,
}

/// Which broker carries telemetry and events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// This process's own broker (one instance, embedded storage).
    #[default]
    Embedded,
    /// An AMQP 1.0 broker (cluster) shared by every Ferrule instance: instances hold no
    /// messages of their own.
    Amqp,
}

/// How Hono's addresses map onto the shared broker's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressScheme {
    /// RabbitMQ 3.x with its AMQP 1.0 plugin: events in the quorum queue `event.T`
    /// (`/amq/queue/event.T`), telemetry through the short-lived queue `telemetry.T`
    /// (`/amq/queue/telemetry.T`, consumed from `/queue/telemetry.T`).
    #[default]
    Rabbitmq,
    /// Hono's own addresses (`telemetry/T`, `event/T`): a Ferrule broker run as its own
    /// process, or another broker or router that takes them.
    Hono,
}

/// `[messaging.backend]`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendConfig {
    /// `embedded` (default) or `amqp`.
    pub kind: BackendKind,
    /// The broker's AMQP 1.0 URLs (`amqp://host:5672`), tried in turn on (re)connect.
    pub urls: Vec<String>,
    /// PEM file of the CA certificates trusted for `amqps://` URLs (required with them).
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// SASL PLAIN user at the broker (empty: no SASL). A Ferrule broker's `name@*` user
    /// is used as `name@TENANT` over one connection per tenant.
    pub username: String,
    pub password: String,
    /// `rabbitmq` (default) or `hono`.
    pub addresses: AddressScheme,
    /// RabbitMQ's management API (`http://host:15672`): events need their quorum queue
    /// `event.T` and telemetry queues a policy, which 3.x's AMQP 1.0 cannot declare.
    /// Required with `addresses = "rabbitmq"`.
    pub management_url: String,
    pub management_username: String,
    pub management_password: String,
    /// How long a message sent to the broker waits for its outcome; past it, or when the
    /// connection is lost, the outcome is unknown and the device is told to retry.
    #[serde(with = "humantime_serde")]
    pub outcome_timeout: Duration,
    /// Messages the broker may hand one instance's consumer link ahead of the
    /// application (per address).
    pub credit: u32,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            kind: BackendKind::Embedded,
            urls: Vec::new(),
            tls_ca_file: None,
            username: String::new(),
            password: String::new(),
            addresses: AddressScheme::Rabbitmq,
            management_url: String::new(),
            management_username: "guest".into(),
            management_password: "guest".into(),
            outcome_timeout: Duration::from_secs(10),
            credit: 256,
        }
    }
}

impl std::fmt::Debug for BackendConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendConfig")
            .field("kind", &self.kind)
            .field("urls", &self.urls)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("addresses", &self.addresses)
            .field("management_url", &self.management_url)
            .field("management_username", &self.management_username)
            .field("management_password", &"<redacted>")
            .field("outcome_timeout", &self.outcome_timeout)
            .field("credit", &self.credit)
            .finish()
    }
}

impl BackendConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad =
            |key: &str, problem: &str| Err(ConfigError::new("messaging.backend", key, problem));
        if self.kind == BackendKind::Embedded {
            return Ok(());
        }
        if self.urls.is_empty() {
            return bad("urls", "must name at least one broker with kind = \"amqp\"");
        }
        if let Some(url) = self.urls.iter().find(|u| crate::remote::parse_url(u).is_err()) {
            return bad("urls", &format!("{url:?} is not an amqp:// or amqps:// URL with a host"));
        }
        if self.urls.iter().any(|u| u.starts_with("amqps://")) && self.tls_ca_file.is_none() {
            return bad("tls_ca_file", "is needed for amqps:// URLs");
        }
        if self.addresses == AddressScheme::Rabbitmq && self.management_url.is_empty() {
            return bad("management_url", "is needed with addresses = \"rabbitmq\"");
        }
        if self.outcome_timeout.is_zero() {
            return bad("outcome_timeout", "must not be zero");
        }
        if self.credit == 0 {
            return bad("credit", "must be at least 1");
        }
        Ok(())
    }
}

impl MessagingConfig {
    /// The per-source connection limits of the AMQP listeners.
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
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, problem: &str| Err(ConfigError::new("messaging", key, problem));
        let positive = [
            ("queue_max_depth", self.queue_max_depth),
            ("queue_max_bytes", self.queue_max_bytes),
            ("tenant_max_queue_bytes", self.tenant_max_queue_bytes),
            ("max_addresses_per_tenant", self.max_addresses_per_tenant),
            ("consumer_prefetch", self.consumer_prefetch as usize),
            ("consumer_window", self.consumer_window as usize),
            ("consumer_wait_bytes", self.consumer_wait_bytes),
            ("consumer_wait_total_bytes", self.consumer_wait_total_bytes),
            ("max_message_size", self.max_message_size as usize),
            ("max_connections", self.max_connections),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return bad(key, "must be at least 1");
        }
        if self.max_frame_size < 512 {
            return bad("max_frame_size", "must be at least 512 (AMQP minimum)");
        }
        self.source_limits().validate("messaging")?;
        if self.connect_timeout.is_zero() {
            return bad("connect_timeout", "must not be zero");
        }
        if self.idle_timeout.is_zero() {
            return bad("idle_timeout", "must not be zero");
        }
        for (i, user) in self.sasl.users.iter().enumerate() {
            match user.username.rsplit_once('@') {
                Some((name, tenant)) if !name.is_empty() && !tenant.is_empty() => {}
                _ => {
                    return bad(
                        &format!("sasl.users[{i}].username"),
                        "must look like name@tenant or name@*",
                    )
                }
            }
        }
        self.backend.validate()?;
        for (i, rule) in self.addresses.iter().enumerate() {
            if rule.pattern.is_empty() || rule.pattern.split('/').any(str::is_empty) {
                let problem = format!("{:?} has an empty segment", rule.pattern);
                return bad(&format!("addresses[{i}].pattern"), &problem);
            }
        }
        Ok(())
    }
}

impl Default for MessagingConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:5672".parse().expect("valid"),
            listen_tls: "0.0.0.0:5671".parse().expect("valid"),
            tls: Default::default(),
            addresses: Vec::new(),
            queue_max_depth: 100_000,
            queue_max_bytes: 256 * 1024 * 1024,
            tenant_max_queue_bytes: 1024 * 1024 * 1024,
            max_addresses_per_tenant: 1000,
            min_free_disk: 64 * 1024 * 1024,
            consumer_prefetch: 256,
            consumer_window: 1024,
            consumer_wait: Duration::from_secs(5),
            consumer_wait_bytes: 1024 * 1024,
            consumer_wait_total_bytes: 64 * 1024 * 1024,
            max_frame_size: 65_536,
            max_connections: 10_000,
            max_connections_per_ip: ferrule_net::listener::SourceLimits::DEFAULT.max_per_source,
            connection_rate_per_ip: ferrule_net::listener::SourceLimits::DEFAULT.rate_per_second,
            connection_burst_per_ip: ferrule_net::listener::SourceLimits::DEFAULT.burst,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_message_size: 1024 * 1024,
            expiry_check_interval: Duration::from_secs(1),
            sasl: SaslConfig::default(),
            backend: BackendConfig::default(),
        }
    }
}

/// `[messaging.sasl]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SaslConfig {
    /// Offer SASL ANONYMOUS. Anonymous clients may use every tenant's addresses: for
    /// development only.
    pub allow_anonymous: bool,
    /// Application users (SASL PLAIN). When empty and anonymous is off, `ferrule serve`
    /// generates an `admin@*` user and writes its password to `DATA_DIR/admin-credentials`.
    pub users: Vec<UserConfig>,
}

/// One application user.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// `name@tenant`; `name@*` may log in as `name@ANY-TENANT` and then uses that tenant.
    pub username: String,
    /// The password: an argon2 PHC string (`$argon2id$...`, recommended) or plain text.
    pub password: String,
}

impl std::fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserConfig")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The defaults above as commented TOML (printed by `ferrule config print-default`).
pub const DEFAULT_TOML: &str = r#"[messaging]
# Address of the AMQP 1.0 listener for applications.
listen = "0.0.0.0:5672"
# Address of the AMQP 1.0 over TLS listener (amqps), used when [messaging.tls] is set.
listen_tls = "0.0.0.0:5671"
# Most messages a queue (or topic subscription) holds; beyond it senders get `rejected`
# with amqp:resource-limit-exceeded.
queue_max_depth = 100000
# Most bytes a queue holds (messages as stored plus 512 each; queues are kept in memory
# as well as on disk), and all queues of one tenant together; beyond them senders get
# `rejected` with amqp:resource-limit-exceeded (devices: 503 / PUBACK 0x97).
queue_max_bytes = 268435456
tenant_max_queue_bytes = 1073741824
# Most addresses one tenant has at once (reply addresses, dynamic receivers, queues; not
# the platform's internal ones). Beyond it attaches and messages for new addresses are
# refused with amqp:resource-limit-exceeded. Idle reply/dynamic addresses are forgotten.
max_addresses_per_tenant = 1000
# Bytes that must stay free on the data directory's file system: below it, new messages
# for queues are refused (amqp:resource-limit-exceeded; devices get 503 / PUBACK 0x97)
# before the disk is full, acknowledgements still go through. 0: no floor.
min_free_disk = 67108864
# Messages a consumer link may take from its address ahead of the client's credit
# (they wait in the server, bounded by this, and are released if the link goes away).
consumer_prefetch = 256
# Most unsettled deliveries outstanding on one consumer link.
consumer_window = 1024
# How long an anycast message (telemetry, command responses) waits for credit when
# consumers are attached but all busy; meanwhile its producer waits (a QoS 1 device for
# its PUBACK, an HTTP device for its response). Past it the message is released, as when
# nobody is attached (Hono's "no consumer" answers). "0s": no wait.
consumer_wait = "5s"
# Bytes of such waiting messages one address, and all addresses together, hold (payload
# plus 512 per message); beyond them messages are released at once.
consumer_wait_bytes = 1048576
consumer_wait_total_bytes = 67108864
# Largest AMQP frame accepted.
max_frame_size = 65536
# Most application connections open at once (further ones wait in the backlog).
max_connections = 10000
# Per source address (IPv4, or IPv6 /64): open connections, and new connections per
# second (token bucket: rate and burst). Refused peers are closed at once.
max_connections_per_ip = 1000
connection_rate_per_ip = 100.0
connection_burst_per_ip = 200
# Time a client has for the protocol header, SASL and open.
connect_timeout = "10s"
# Idle timeout advertised in open (a silent peer is closed and its unsettled deliveries
# go to other consumers); TCP keep-alive probes start after the same time.
idle_timeout = "60s"
# Largest message an application may send (bytes); larger ones are refused with
# amqp:link:message-size-exceeded.
max_message_size = 1048576
# How often queues drop expired messages that nobody consumes.
expiry_check_interval = "1s"
# Address rules, consulted in order before the built-in ones (Hono's shapes only):
#   telemetry/+ anycast, event/+ queue, event/+/dlq queue, command/+ anycast,
#   command_response/+/* anycast.
# Types: anycast | multicast | queue | topic. In a pattern `+` matches one segment, `*`
# one segment (one or more when last) and `#` zero or more.
# Example: addresses = [{ pattern = "news/*", type = "topic" }]. `internal = true` marks
# addresses of the platform's own (no application access, no dead letters); command &
# control adds `command_deferred/*` that way.
addresses = []

[messaging.tls]
# PEM certificate chain and private key for listen_tls; TLS is off unless both are set.
# cert = "/etc/ferrule/tls/server.crt"
# key = "/etc/ferrule/tls/server.key"

[messaging.sasl]
# Offer SASL ANONYMOUS (anonymous clients may use every tenant: development only).
allow_anonymous = false
# Application users for SASL PLAIN: username `name@tenant` (or `name@*` for any tenant),
# password as an argon2 PHC string ($argon2id$...) or plain text. When empty and anonymous
# is off, `ferrule serve` creates `admin@*` with a random password written to
# DATA_DIR/admin-credentials.
# Example: users = [{ username = "app@my-tenant", password = "$argon2id$v=19$..." }]
users = []

[messaging.backend]
# "embedded": this process's broker. "amqp": a shared AMQP 1.0 broker (cluster) carries
# telemetry and events, so that several Ferrule instances serve the same tenants (see
# README "Scale-out").
kind = "embedded"
# Broker URLs, tried in turn: ["amqp://rabbit-1:5672", "amqps://rabbit-2:5671"].
urls = []
# PEM file of the CA certificates trusted for amqps:// URLs (required with them).
# tls_ca_file = "/etc/ferrule/broker-ca.pem"
# SASL PLAIN at the broker (empty: none). For a Ferrule broker, a `name@*` user (one
# connection per tenant).
username = ""
password = ""
# Address scheme: "rabbitmq" (RabbitMQ 3.x AMQP 1.0 plugin) or "hono" (Hono's addresses:
# a Ferrule broker as its own process, or a broker/router that takes them).
addresses = "rabbitmq"
# RabbitMQ management API, for the per-tenant quorum queues and the telemetry policy.
management_url = ""
management_username = "guest"
management_password = "guest"
# Longest wait for the broker's outcome of a message (then: unknown, the device retries).
outcome_timeout = "10s"
# Messages the broker may hand this instance ahead of the application, per address.
credit = 256
"#;
