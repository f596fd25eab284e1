//! Cluster mode: what N instances over a shared broker and Redis need besides the
//! messaging backend itself: `[cluster]` settings, consumer leases in Redis (RabbitMQ
//! gives no "no consumer" signal) and provisioning through RabbitMQ's management API.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use ferrule_messaging::remote::{ConsumerLeases, Provision};

/// `[cluster]`: this instance's part in a deployment of several.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// This instance's name (broker link names, consumer leases). Empty: a random one per
    /// start.
    pub instance_id: String,
    /// Redis for consumer leases (needed with `[messaging.backend] addresses =
    /// "rabbitmq"`): seed URLs of a Redis Cluster, or one URL of a single server.
    pub redis_urls: Vec<String>,
    /// `cluster` (Redis Cluster) or `single` (one server).
    pub redis_mode: RedisMode,
    /// What this instance serves: any of `devices` (MQTT, HTTP, CoAP adapters),
    /// `applications` (the AMQP endpoint) and `management` (the registry API). With
    /// `peer_password`, an instance serving devices keeps its AMQP listener for the
    /// commands other instances hand it.
    pub roles: Vec<Role>,
    /// `host:port` at which the other instances reach this instance's AMQP listener
    /// (commands and responses between instances). Empty: `[messaging] listen` when it
    /// names a concrete address.
    pub advertise: String,
    /// The secret instances present to each other (as `ferrule-peer@TENANT`); the same on
    /// every instance, at least 16 characters. Empty: commands are routed only to devices
    /// connected to the instance the application sends them to.
    pub peer_password: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    Cluster,
    Single,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Devices,
    Applications,
    Management,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            instance_id: String::new(),
            redis_urls: Vec::new(),
            redis_mode: RedisMode::Cluster,
            roles: vec![Role::Devices, Role::Applications, Role::Management],
            advertise: String::new(),
            peer_password: String::new(),
        }
    }
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("instance_id", &self.instance_id)
            .field(
                "redis_urls",
                &format_args!("<{} redacted: may hold a password>", self.redis_urls.len()),
            )
            .field("redis_mode", &self.redis_mode)
            .field("roles", &self.roles)
            .field("advertise", &self.advertise)
            .field("peer_password", &"<redacted>")
            .finish()
    }
}

impl ClusterConfig {
    /// Checks what serde cannot.
    ///
    /// # Errors
    /// The first bad key.
    pub fn validate(
        &self,
        backend: &ferrule_messaging::BackendConfig,
    ) -> Result<(), ferrule_net::ConfigError> {
        let bad =
            |key: &str, problem: &str| Err(ferrule_net::ConfigError::new("cluster", key, problem));
        if self.roles.is_empty() {
            return bad("roles", "must name at least one of devices, applications, management");
        }
        if backend.kind == ferrule_messaging::BackendKind::Amqp
            && backend.addresses == ferrule_messaging::AddressScheme::Rabbitmq
            && self.redis_urls.is_empty()
        {
            return bad("redis_urls", "is needed for consumer leases with a RabbitMQ backend");
        }
        if !self.peer_password.is_empty() && self.peer_password.len() < 16 {
            return bad("peer_password", "must be at least 16 characters");
        }
        if !self.advertise.is_empty() && !valid_host_port(&self.advertise) {
            return bad("advertise", "must be HOST:PORT");
        }
        if self.redis_mode == RedisMode::Single && self.redis_urls.len() > 1 {
            return bad("redis_urls", "takes one URL with redis_mode = \"single\"");
        }
        if let Some(url) = self.redis_urls.iter().find(|u| redis::Client::open(u.as_str()).is_err())
        {
            return bad(
                "redis_urls",
                &format!("{} is not a Redis URL", crate::config::redact_url(url)),
            );
        }
        Ok(())
    }

    /// Whether this instance serves `role`.
    pub fn serves(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// The configured instance id, or a fresh random one.
    pub fn instance(&self) -> String {
        if self.instance_id.is_empty() {
            uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
        } else {
            self.instance_id.clone()
        }
    }
}

pub const DEFAULT_TOML: &str = r#"[cluster]
# This instance's name in a deployment of several (link names at the shared broker,
# consumer leases). Empty: random per start.
instance_id = ""
# Redis for consumer leases, needed when [messaging.backend] addresses = "rabbitmq":
# Redis Cluster seed URLs (redis_mode = "cluster") or one server's URL ("single").
redis_urls = []
redis_mode = "cluster"
# What this instance serves: "devices" (MQTT, HTTP, CoAP), "applications" (AMQP),
# "management" (registry API). E.g. the management API on some instances only. With
# peer_password, instances serving devices keep their AMQP listener (commands from the
# other instances arrive there).
roles = ["devices", "applications", "management"]
# Where the other instances reach this one's AMQP listener (commands and responses
# between instances), e.g. "10.0.3.7:5672" (a pod IP). Empty: [messaging] listen, when it
# is a concrete address.
advertise = ""
# The secret instances present to each other (same everywhere, >= 16 characters). Empty:
# a command reaches a device only through the instance the device is connected to.
peer_password = ""

"#;

/// `host:port` with a port number.
fn valid_host_port(s: &str) -> bool {
    s.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

/// A Redis connection of either kind.
#[derive(Clone)]
enum RedisConn {
    Cluster(redis::cluster_async::ClusterConnection),
    Single(redis::aio::ConnectionManager),
}

impl RedisConn {
    async fn connect(urls: &[String], mode: RedisMode) -> anyhow::Result<Self> {
        Ok(match mode {
            RedisMode::Cluster => {
                let client = redis::cluster::ClusterClientBuilder::new(urls.to_vec())
                    .connection_timeout(Duration::from_secs(2))
                    .response_timeout(Duration::from_secs(2))
                    .build()
                    .context("Redis Cluster URLs")?;
                RedisConn::Cluster(
                    client.get_async_connection().await.context("connecting to Redis Cluster")?,
                )
            }
            RedisMode::Single => {
                let url = urls.first().context("no Redis URL")?;
                let client = redis::Client::open(url.as_str()).context("Redis URL")?;
                RedisConn::Single(
                    redis::aio::ConnectionManager::new(client)
                        .await
                        .context("connecting to Redis")?,
                )
            }
        })
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self.clone() {
            RedisConn::Cluster(mut c) => cmd.query_async(&mut c).await,
            RedisConn::Single(mut c) => cmd.query_async(&mut c).await,
        }
    }
}

/// How long a lease lasts unless renewed; renewed every [`RENEW`].
const LEASE: Duration = Duration::from_secs(5);
const RENEW: Duration = Duration::from_secs(1);

/// Leases in Redis: a sorted set per thing leased (its key's hash tag is the tenant, so a
/// tenant's keys live on one master), members scored by the time their lease ends. An
/// instance renews its own every second while it holds them; a dead instance's leases
/// end within [`LEASE`]. Used for application consumers (RabbitMQ gives no "no consumer"
/// signal) and command subscriptions (which instance a command goes to).
pub struct RedisLeases {
    conn: RedisConn,
    instance: String,
    /// (key, member) this instance holds, with how many holders each.
    held: Mutex<HashMap<(String, String), usize>>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn lease_key(address: &str) -> String {
    let tenant = ferrule_messaging::address::tenant_of(address).unwrap_or("");
    format!("ferrule:{{{tenant}}}:consumers:{address}")
}

impl RedisLeases {
    /// Connects and renews this instance's leases until `stop`.
    pub async fn start(
        config: &ClusterConfig,
        instance: &str,
        stop: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        anyhow::ensure!(!config.redis_urls.is_empty(), "[cluster] redis_urls is empty");
        let conn = RedisConn::connect(&config.redis_urls, config.redis_mode).await?;
        let leases =
            Arc::new(Self { conn, instance: instance.to_owned(), held: Default::default() });
        tokio::spawn(leases.clone().renew(stop));
        Ok(leases)
    }

    fn held(&self) -> Vec<(String, String)> {
        self.held.lock().expect("poisoned").keys().cloned().collect()
    }

    async fn renew(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(RENEW);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            for (key, member) in self.held() {
                self.write(&key, &member, true).await;
            }
        }
        for (key, member) in self.held() {
            self.write(&key, &member, false).await;
        }
    }

    /// Adds (renews) or removes the lease of `member` in `key`.
    async fn write(&self, key: &str, member: &str, present: bool) {
        let result = if present {
            let expiry = now_ms() + LEASE.as_millis() as u64;
            let mut pipe = redis::pipe();
            pipe.zadd(key, member, expiry)
                .ignore()
                .zrembyscore(key, 0, now_ms())
                .ignore()
                .pexpire(key, (LEASE * 4).as_millis() as i64)
                .ignore();
            self.query_pipe(&pipe).await
        } else {
            self.conn.query::<()>(redis::cmd("ZREM").arg(key).arg(member)).await
        };
        if let Err(e) = result {
            metrics::counter!("ferrule_cluster_redis_errors_total").increment(1);
            tracing::warn!(error = %e, %key, "could not write a lease");
        }
    }

    /// The members of `key` whose lease has not ended.
    async fn members(&self, key: &str) -> redis::RedisResult<Vec<String>> {
        self.conn.query(redis::cmd("ZRANGEBYSCORE").arg(key).arg(now_ms()).arg("+inf")).await
    }

    async fn query_pipe(&self, pipe: &redis::Pipeline) -> redis::RedisResult<()> {
        match self.conn.clone() {
            RedisConn::Cluster(mut c) => pipe.query_async(&mut c).await,
            RedisConn::Single(mut c) => pipe.query_async(&mut c).await,
        }
    }

    /// Holds the lease of `member` in `key` until the guard is dropped (written now,
    /// renewed meanwhile, removed at once when the last holder lets go).
    fn hold(self: &Arc<Self>, key: String, member: String) -> LeaseGuard {
        let entry = (key, member);
        let first = {
            let mut held = self.held.lock().expect("poisoned");
            let n = held.entry(entry.clone()).or_default();
            *n += 1;
            *n == 1
        };
        if first {
            let leases = self.clone();
            let (key, member) = entry.clone();
            tokio::spawn(async move { leases.write(&key, &member, true).await });
        }
        LeaseGuard { leases: self.clone(), entry }
    }
}

struct LeaseGuard {
    leases: Arc<RedisLeases>,
    entry: (String, String),
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let last = {
            let mut held = self.leases.held.lock().expect("poisoned");
            match held.get_mut(&self.entry) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                _ => {
                    held.remove(&self.entry);
                    true
                }
            }
        };
        if last {
            let leases = self.leases.clone();
            let (key, member) = std::mem::take(&mut self.entry);
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { leases.write(&key, &member, false).await });
            }
        }
    }
}

/// Consumer leases as the messaging backend asks for them.
pub struct Leases(pub Arc<RedisLeases>);

impl ConsumerLeases for Leases {
    fn has_consumer(&self, address: &str) -> BoxFuture<'static, bool> {
        let leases = self.0.clone();
        let key = lease_key(address);
        Box::pin(async move {
            let mine = (key.clone(), leases.instance.clone());
            if leases.held.lock().expect("poisoned").contains_key(&mine) {
                return true;
            }
            let count = redis::cmd("ZCOUNT").arg(&key).arg(now_ms()).arg("+inf").clone();
            match leases.conn.query::<u64>(&count).await {
                Ok(n) => n > 0,
                Err(e) => {
                    // Redis unreachable: send anyway (the broker may still have the
                    // consumer's queue) rather than refuse every device.
                    metrics::counter!("ferrule_cluster_redis_errors_total").increment(1);
                    tracing::warn!(error = %e, "consumer lease look-up failed; assuming a consumer");
                    true
                }
            }
        })
    }

    fn hold(&self, address: &str) -> Box<dyn Send + Sync> {
        Box::new(self.0.hold(lease_key(address), self.0.instance.clone()))
    }
}

/// Where each instance's AMQP listener is, for the others (`HSET ferrule:instances`).
const INSTANCES_KEY: &str = "ferrule:instances";
/// How long a peer's address is reused before it is read again (a restarted instance
/// may come back elsewhere).
const PEER_ADDRESS_TTL: Duration = Duration::from_secs(30);

/// Commands between instances: subscriptions as leases in Redis, and each command or
/// response for another instance sent straight to that instance's AMQP endpoint (as
/// `ferrule-peer@TENANT`), so that its outcome (the device's) comes back on the same link.
#[derive(Clone)]
pub struct ClusterCommands(Arc<CommandsInner>);

struct CommandsInner {
    leases: Arc<RedisLeases>,
    broker: ferrule_messaging::Broker,
    password: String,
    outcome_timeout: Duration,
    /// instance → (its advertised AMQP address, when read).
    addresses: Mutex<HashMap<String, (String, std::time::Instant)>>,
    /// advertised address → relay.
    relays: Mutex<HashMap<String, ferrule_messaging::remote::Relay>>,
}

/// The SASL user instances present to each other (`ferrule-peer@TENANT`).
pub const PEER_USER: &str = "ferrule-peer@*";

impl ClusterCommands {
    /// Announces this instance at `advertise` and routes commands through `leases`.
    ///
    /// # Errors
    /// Redis refused the announcement.
    pub async fn start(
        leases: Arc<RedisLeases>,
        broker: ferrule_messaging::Broker,
        advertise: &str,
        password: &str,
        outcome_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let announce =
            redis::cmd("HSET").arg(INSTANCES_KEY).arg(&leases.instance).arg(advertise).clone();
        leases.conn.query::<()>(&announce).await.context("announcing this instance in Redis")?;
        Ok(Self(Arc::new(CommandsInner {
            leases,
            broker,
            password: password.to_owned(),
            outcome_timeout,
            addresses: Default::default(),
            relays: Default::default(),
        })))
    }

    /// Ends the connections to other instances.
    pub async fn close(&self) {
        let relays: Vec<_> =
            self.0.relays.lock().expect("poisoned").drain().map(|(_, r)| r).collect();
        for relay in relays {
            relay.close().await;
        }
    }
}

impl CommandsInner {
    async fn address_of(&self, instance: &str) -> Option<String> {
        if let Some((address, at)) = self.addresses.lock().expect("poisoned").get(instance) {
            if at.elapsed() < PEER_ADDRESS_TTL {
                return Some(address.clone());
            }
        }
        let get = redis::cmd("HGET").arg(INSTANCES_KEY).arg(instance).clone();
        let address: Option<String> = match self.leases.conn.query(&get).await {
            Ok(address) => address,
            Err(e) => {
                metrics::counter!("ferrule_cluster_redis_errors_total").increment(1);
                tracing::warn!(error = %e, instance, "peer address look-up failed");
                None
            }
        };
        let address = address?;
        self.addresses
            .lock()
            .expect("poisoned")
            .insert(instance.to_owned(), (address.clone(), std::time::Instant::now()));
        Some(address)
    }

    fn relay(&self, address: &str) -> ferrule_messaging::remote::Relay {
        let mut relays = self.relays.lock().expect("poisoned");
        relays
            .entry(address.to_owned())
            .or_insert_with(|| {
                let config = ferrule_messaging::BackendConfig {
                    kind: ferrule_messaging::BackendKind::Amqp,
                    urls: vec![format!("amqp://{address}")],
                    username: PEER_USER.into(),
                    password: self.password.clone(),
                    addresses: ferrule_messaging::AddressScheme::Hono,
                    outcome_timeout: self.outcome_timeout,
                    ..Default::default()
                };
                ferrule_messaging::remote::Relay::new(&self.broker, &config, &self.leases.instance)
            })
            .clone()
    }

    /// The members of `key` (none when Redis cannot be read: the command is then
    /// handled as for a device that is not connected).
    async fn members_or_none(&self, key: &str) -> Vec<String> {
        match self.leases.members(key).await {
            Ok(members) => members,
            Err(e) => {
                metrics::counter!("ferrule_cluster_redis_errors_total").increment(1);
                tracing::warn!(error = %e, "command subscription look-up failed");
                Vec::new()
            }
        }
    }
}

impl ferrule_command_control::CommandCluster for ClusterCommands {
    fn instance(&self) -> &str {
        &self.0.leases.instance
    }

    fn hold(&self, tenant: &str, target: &ferrule_command_control::Target) -> Box<dyn Send + Sync> {
        use ferrule_command_control::Target;
        let leases = &self.0.leases;
        let me = leases.instance.clone();
        Box::new(match target {
            Target::Device(device) => leases.hold(device_key(tenant, device), me),
            Target::AllDevicesOf { gateway } => {
                leases.hold(gateways_key(tenant), format!("{gateway}\n{me}"))
            }
        })
    }

    fn device_holders(
        &self,
        tenant: &str,
        device: &str,
    ) -> ferrule_command_control::BoxFuture<Vec<String>> {
        let (this, key) = (self.0.clone(), device_key(tenant, device));
        Box::pin(async move { this.members_or_none(&key).await })
    }

    fn gateway_holders(
        &self,
        tenant: &str,
    ) -> ferrule_command_control::BoxFuture<Vec<(String, String)>> {
        let (this, key) = (self.0.clone(), gateways_key(tenant));
        Box::pin(async move {
            let members = this.members_or_none(&key).await;
            members
                .into_iter()
                .filter_map(|m| m.split_once('\n').map(|(g, i)| (g.to_owned(), i.to_owned())))
                .collect()
        })
    }

    fn send(
        &self,
        instance: &str,
        tenant: &str,
        address: &str,
        message: ferrule_messaging::Message,
    ) -> ferrule_command_control::BoxFuture<ferrule_messaging::Outcome> {
        let this = self.0.clone();
        let (instance, tenant, address) =
            (instance.to_owned(), tenant.to_owned(), address.to_owned());
        Box::pin(async move {
            let Some(peer) = this.address_of(&instance).await else {
                tracing::debug!(%instance, "no address known for the instance");
                return ferrule_messaging::Outcome::Released;
            };
            let relay = this.relay(&peer);
            relay.send(&tenant, &address, message, false).outcome().await
        })
    }

    fn defer(
        &self,
        tenant: &str,
        device: &str,
        message: ferrule_messaging::Message,
        expires: u64,
    ) -> ferrule_command_control::BoxFuture<ferrule_messaging::Outcome> {
        use ferrule_messaging::{message::condition, Outcome};
        let (this, key) = (self.0.clone(), deferred_key(tenant, device));
        Box::pin(async move {
            let Some(entry) = encode_deferred(&message, expires) else {
                return Outcome::rejected(condition::DECODE_ERROR, "the command does not encode");
            };
            let ttl = expires.saturating_sub(now_ms()).max(1);
            let script = redis::Script::new(DEFER_SCRIPT);
            let mut call = script.key(&key);
            call.arg(entry).arg(MAX_DEFERRED_PER_DEVICE).arg(ttl);
            let kept: redis::RedisResult<i64> = match this.leases.conn.clone() {
                RedisConn::Cluster(mut c) => call.invoke_async(&mut c).await,
                RedisConn::Single(mut c) => call.invoke_async(&mut c).await,
            };
            match kept {
                Ok(1) => Outcome::Accepted,
                Ok(_) => Outcome::rejected(
                    condition::RESOURCE_LIMIT_EXCEEDED,
                    format!("the device has {MAX_DEFERRED_PER_DEVICE} deferred commands"),
                ),
                Err(e) => {
                    metrics::counter!("ferrule_cluster_redis_errors_total").increment(1);
                    tracing::warn!(error = %e, "could not keep a deferred command");
                    Outcome::Released
                }
            }
        })
    }

    fn next_deferred(
        &self,
        tenant: &str,
        device: &str,
    ) -> ferrule_command_control::BoxFuture<Option<ferrule_messaging::Message>> {
        let (this, key) = (self.0.clone(), deferred_key(tenant, device));
        Box::pin(async move {
            loop {
                let head: Option<Vec<u8>> =
                    match this.leases.conn.query(redis::cmd("LINDEX").arg(&key).arg(0)).await {
                        Ok(head) => head,
                        Err(e) => {
                            metrics::counter!("ferrule_cluster_redis_errors_total").increment(1);
                            tracing::warn!(error = %e, "could not read deferred commands");
                            return None;
                        }
                    };
                match decode_deferred(&head?) {
                    Some((expiry, message)) if expiry > now_ms() => return Some(message),
                    // Expired, or unreadable: dropped.
                    _ => {
                        let _ = this.leases.conn.query::<()>(redis::cmd("LPOP").arg(&key)).await;
                    }
                }
            }
        })
    }

    fn pop_deferred(&self, tenant: &str, device: &str) -> ferrule_command_control::BoxFuture<()> {
        let (this, key) = (self.0.clone(), deferred_key(tenant, device));
        Box::pin(async move {
            if let Err(e) = this.leases.conn.query::<()>(redis::cmd("LPOP").arg(&key)).await {
                metrics::counter!("ferrule_cluster_redis_errors_total").increment(1);
                tracing::warn!(error = %e, "could not remove a delivered deferred command");
            }
        })
    }
}

/// Most commands kept for one device in cluster mode; beyond, the application's command
/// is rejected (`amqp:resource-limit-exceeded`).
const MAX_DEFERRED_PER_DEVICE: usize = 100;

/// Appends a kept command unless the device has [`MAX_DEFERRED_PER_DEVICE`]; the list
/// lives as long as its longest-lived command.
const DEFER_SCRIPT: &str = r#"
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1])
local ttl = tonumber(ARGV[3])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"#;

fn deferred_key(tenant: &str, device: &str) -> String {
    format!("ferrule:{{{tenant}}}:deferred:{device}")
}

/// A kept command as stored: its expiry (ms since the epoch, 8 bytes big-endian), then
/// the AMQP-encoded message.
fn encode_deferred(message: &ferrule_messaging::Message, expires: u64) -> Option<Vec<u8>> {
    let mut bytes = expires.to_be_bytes().to_vec();
    bytes.extend(ferrule_messaging::message::encode(message).ok()?);
    Some(bytes)
}

fn decode_deferred(bytes: &[u8]) -> Option<(u64, ferrule_messaging::Message)> {
    let (expiry, message) = bytes.split_at_checked(8)?;
    let expiry = u64::from_be_bytes(expiry.try_into().ok()?);
    Some((expiry, ferrule_messaging::message::decode(message).ok()?))
}

fn device_key(tenant: &str, device: &str) -> String {
    format!("ferrule:{{{tenant}}}:cmd:d:{device}")
}

fn gateways_key(tenant: &str) -> String {
    format!("ferrule:{{{tenant}}}:cmd:gw")
}

/// RabbitMQ's management API: quorum queues for events, the telemetry policy.
pub struct RabbitAdmin {
    authority: String,
    base_path: String,
    authorization: String,
}

impl RabbitAdmin {
    /// # Errors
    /// `url` is not `http://host[:port][/path]`.
    pub fn new(url: &str, username: &str, password: &str) -> anyhow::Result<Self> {
        use base64::Engine;
        let rest = url.strip_prefix("http://").context("management_url must be http://")?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        anyhow::ensure!(!authority.is_empty(), "management_url has no host");
        let authority =
            if authority.contains(':') { authority.to_owned() } else { format!("{authority}:80") };
        let credentials =
            base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
        Ok(Self {
            authority,
            base_path: format!("/{}", path.trim_end_matches('/')).trim_end_matches('/').to_owned(),
            authorization: format!("Basic {credentials}"),
        })
    }

    /// Makes the policy that bounds telemetry queues: messages live 2 s, at most 100,000
    /// per queue (oldest dropped, never `reject-publish`, which crashes 3.x sessions), and
    /// a queue nobody consumed for 60 s goes away.
    pub async fn telemetry_policy(&self) -> anyhow::Result<()> {
        let body = serde_json::json!({
            "pattern": "^telemetry\\.",
            "apply-to": "queues",
            "priority": 0,
            "definition": {"message-ttl": 2000, "max-length": 100000, "overflow": "drop-head", "expires": 60000}
        });
        self.put("/api/policies/%2F/ferrule-telemetry", body).await
    }

    async fn put(&self, path: &str, body: serde_json::Value) -> anyhow::Result<()> {
        let connect = tokio::net::TcpStream::connect(&self.authority);
        let stream = tokio::time::timeout(Duration::from_secs(5), connect).await??;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = hyper::Request::put(format!("{}{path}", self.base_path))
            .header(hyper::header::HOST, self.authority.as_str())
            .header(hyper::header::AUTHORIZATION, self.authorization.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))?;
        let response =
            tokio::time::timeout(Duration::from_secs(10), sender.send_request(request)).await??;
        let status = response.status();
        if !status.is_success() {
            let body =
                response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            anyhow::bail!(
                "{path}: {status} {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            );
        }
        Ok(())
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Provision for RabbitAdmin {
    fn event_queue(&self, tenant: &str) -> BoxFuture<'static, Result<(), String>> {
        let path = format!("/api/queues/%2F/{}", encode_segment(&format!("event.{tenant}")));
        let admin = RabbitAdmin {
            authority: self.authority.clone(),
            base_path: self.base_path.clone(),
            authorization: self.authorization.clone(),
        };
        Box::pin(async move {
            let body =
                serde_json::json!({"durable": true, "arguments": {"x-queue-type": "quorum"}});
            admin.put(&path, body).await.map_err(|e| format!("provisioning the event queue: {e:#}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deferred_entries_round_trip() {
        let message = ferrule_messaging::message::data_message(b"later".to_vec());
        let bytes = encode_deferred(&message, 1_234).unwrap();
        assert_eq!(decode_deferred(&bytes), Some((1_234, message)));
        assert_eq!(decode_deferred(&bytes[..5]), None);
    }

    #[test]
    fn keys_and_urls() {
        assert_eq!(lease_key("telemetry/t1"), "ferrule:{t1}:consumers:telemetry/t1");
        assert_eq!(encode_segment("event.a b/c"), "event.a%20b%2Fc");
        let admin = RabbitAdmin::new("http://127.0.0.1:15672", "guest", "guest").unwrap();
        assert_eq!((admin.authority.as_str(), admin.base_path.as_str()), ("127.0.0.1:15672", ""));
        assert_eq!(admin.authorization, "Basic Z3Vlc3Q6Z3Vlc3Q=");
        let admin = RabbitAdmin::new("http://rabbit/mgmt/", "u", "p").unwrap();
        assert_eq!((admin.authority.as_str(), admin.base_path.as_str()), ("rabbit:80", "/mgmt"));
        assert!(RabbitAdmin::new("https://rabbit", "u", "p").is_err());
    }
}
