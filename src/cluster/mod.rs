//! Cluster mode: what N instances over a shared broker and Redis need besides the
//! messaging backend itself: `[cluster]` settings (here), leases in Redis
//! (`leases.rs`: application consumers, which RabbitMQ cannot signal, and command
//! subscriptions), commands between instances (`commands.rs`) and provisioning through
//! RabbitMQ's management API (`rabbit.rs`).

mod commands;
mod leases;
mod rabbit;

pub use commands::{ClusterCommands, PEER_USER};
pub use leases::{Leases, RedisLeases};
pub use rabbit::RabbitAdmin;

use serde::{Deserialize, Serialize};

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
    /// PEM file of the CA certificates that `rediss://` servers in `redis_urls` are
    /// verified against. Default: none (the system's roots).
    pub redis_tls_ca_file: Option<std::path::PathBuf>,
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
    /// Instances hand each other commands over TLS: this instance announces its AMQP TLS
    /// listener (`[messaging] listen_tls` with `[messaging.tls]`; `advertise` then names
    /// that listener) and verifies the other instances' certificates, and the names they
    /// announce, against the CA certificates of this PEM file; it hands nothing to an
    /// instance that announced a plain address. Default: none (plain AMQP between instances).
    pub peer_tls_ca_file: Option<std::path::PathBuf>,
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
            redis_tls_ca_file: None,
            roles: vec![Role::Devices, Role::Applications, Role::Management],
            advertise: String::new(),
            peer_password: String::new(),
            peer_tls_ca_file: None,
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
            .field("redis_tls_ca_file", &self.redis_tls_ca_file)
            .field("roles", &self.roles)
            .field("advertise", &self.advertise)
            .field("peer_password", &"<redacted>")
            .field("peer_tls_ca_file", &self.peer_tls_ca_file)
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
        messaging: &ferrule_messaging::MessagingConfig,
    ) -> Result<(), ferrule_net::ConfigError> {
        let backend = &messaging.backend;
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
        if let Some(ca) = &self.peer_tls_ca_file {
            if self.peer_password.is_empty() {
                return bad("peer_tls_ca_file", "needs peer_password (commands between instances)");
            }
            if !messaging.tls.enabled() {
                return bad(
                    "peer_tls_ca_file",
                    "needs the AMQP TLS listener ([messaging.tls] cert and key), which the \
                     other instances connect to",
                );
            }
            // The connector the peer links will build from it.
            if let Err(e) = ferrule_net::tls::client_connector(ca) {
                return bad("peer_tls_ca_file", &format!("cannot be used: {e}"));
            }
        }
        if !self.advertise.is_empty() && !valid_host_port(&self.advertise) {
            return bad("advertise", "must be HOST:PORT");
        }
        if self.redis_mode == RedisMode::Single && self.redis_urls.len() > 1 {
            return bad("redis_urls", "takes one URL with redis_mode = \"single\"");
        }
        let tls = match self.redis_tls() {
            Ok(tls) => tls,
            Err(e) => return bad("redis_tls_ca_file", &format!("cannot be used: {e}")),
        };
        if self.redis_tls_ca_file.is_some()
            && !self.redis_urls.iter().any(|u| ferrule_device_registry::redis_tls::is_tls_url(u))
        {
            return bad(
                "redis_tls_ca_file",
                "is set, but no URL in redis_urls asks for TLS (rediss://)",
            );
        }
        if let Some(url) = self.redis_urls.iter().find(|u| tls.client(u.as_str()).is_err()) {
            return bad(
                "redis_urls",
                &format!("{} is not a Redis URL", crate::config::redact_url(url)),
            );
        }
        Ok(())
    }

    /// The trust for `rediss://` URLs in `redis_urls`.
    ///
    /// # Errors
    /// `redis_tls_ca_file` cannot be read or holds no certificate.
    pub fn redis_tls(&self) -> std::io::Result<ferrule_device_registry::RedisTls> {
        ferrule_device_registry::RedisTls::from_ca_file(self.redis_tls_ca_file.as_deref())
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
# TLS to Redis: rediss:// URLs connect over TLS and verify the server against the system's
# roots, or against the CA certificates of this PEM file.
# redis_tls_ca_file = "/etc/ferrule/redis-ca.pem"
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
# Commands between instances over TLS: each instance announces its AMQP TLS listener
# ([messaging] listen_tls with [messaging.tls]; advertise then names that listener) and
# verifies the others' certificates against the CA certificates of this PEM file (their
# certificates must name the advertised host).
# peer_tls_ca_file = "/etc/ferrule/peer-ca.pem"

"#;

/// `host:port` with a port number.
fn valid_host_port(s: &str) -> bool {
    s.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}
