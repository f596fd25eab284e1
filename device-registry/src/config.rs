//! The registry's configuration section, with documented defaults.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::AuthSettings;

/// Which store holds tenants, devices and credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// A redb file `registry.redb` under the data directory (no server needed).
    Embedded,
    /// A Redis server (`redis_url`) or a Redis Cluster (`redis_cluster_nodes`) shared by all
    /// registry instances.
    Redis,
}

/// Configuration of the device registry (`[registry]` in `ferrule.toml`).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Management API listen address. Default `0.0.0.0:28080`. `bind`, its name before
    /// every listener's address was called `listen`, is still accepted.
    #[serde(alias = "bind")]
    pub listen: SocketAddr,
    /// TLS for the management API (PEM certificate and key); off unless both are set.
    pub tls: ferrule_net::tls::TlsConfig,
    /// `embedded` (default) or `redis`.
    pub storage: StorageKind,
    /// File name of the embedded store, relative to the data directory. Default `registry.redb`.
    pub embedded_file: String,
    /// Redis URL for `storage = "redis"`. Default `redis://127.0.0.1:6379/0`.
    pub redis_url: String,
    /// Seed nodes of a Redis Cluster for `storage = "redis"` (URLs such as
    /// `redis://127.0.0.1:7001/`; one reachable node suffices, all must share one password).
    /// Non-empty: the store uses this cluster and ignores `redis_url`. Default: none.
    pub redis_cluster_nodes: Vec<String>,
    /// Prefix of every Redis key and of the change channel. Default `ferrule:registry`.
    pub redis_key_prefix: String,
    /// PEM file of the CA certificates that `rediss://` servers are verified against.
    /// Default: none (the system's roots). See [`crate::RedisTls`].
    pub redis_tls_ca_file: Option<std::path::PathBuf>,
    /// Bearer tokens accepted from operators (also as the password of HTTP Basic auth).
    /// Default: none, so only `allow_anonymous` opens the API.
    pub auth_tokens: Vec<String>,
    /// Serve the management API without authentication. Default `false`.
    pub allow_anonymous: bool,
    /// How long a successful device verification stays cached. Default `5m`.
    #[serde(with = "humantime_serde")]
    pub auth_cache_ttl: Duration,
    /// How long tenant/device look-ups for adapters stay cached. Default `1m`.
    #[serde(with = "humantime_serde")]
    pub lookup_cache_ttl: Duration,
    /// Failed authentications per auth-id tolerated within `failure_window`. Default `5`.
    pub max_failures: u32,
    /// Window for `max_failures`, and how long a wrong secret is remembered. Default `10s`.
    #[serde(with = "humantime_serde")]
    pub failure_window: Duration,
    /// Bound on entries per cache. Default `100000`.
    pub cache_max_entries: usize,
    /// A file (at least 32 bytes, outside the data directory) holding the key of password
    /// verifiers that survive a restart: with it, a device whose password passed argon2
    /// once reconnects after a restart without another argon2 run (see SECURITY.md,
    /// "Password verifiers"); with the Redis store they are shared there by every
    /// instance. Default: none (off).
    pub verifier_key_file: Option<std::path::PathBuf>,
    /// Where the verifiers are kept, relative to the data directory. Default
    /// `password-verifiers`.
    pub verifier_file: String,
    /// Password hashes/verifications running at once (blocking threads), for the whole
    /// process: device logins, management writes and AMQP application logins share this
    /// one pool; up to 256 × this many wait, beyond that a login is refused as busy.
    /// Default `2`.
    pub hash_pool_size: usize,
    /// Largest accepted request body in bytes; larger bodies get 413. Default `65536`.
    pub max_body_bytes: usize,
    /// Concurrent management API connections. Default `256`.
    pub max_connections: usize,
    /// Most connections open at once from one source address (IPv4, or IPv6 /64). Default `64`.
    pub max_connections_per_ip: usize,
    /// New connections per second from one source address (token bucket rate). Default `20`.
    pub connection_rate_per_ip: f64,
    /// ... and burst. Default `40`.
    pub connection_burst_per_ip: u32,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 28080)),
            tls: Default::default(),
            storage: StorageKind::Embedded,
            embedded_file: "registry.redb".into(),
            redis_url: "redis://127.0.0.1:6379/0".into(),
            redis_cluster_nodes: Vec::new(),
            redis_tls_ca_file: None,
            redis_key_prefix: "ferrule:registry".into(),
            auth_tokens: Vec::new(),
            allow_anonymous: false,
            auth_cache_ttl: Duration::from_secs(300),
            lookup_cache_ttl: Duration::from_secs(60),
            max_failures: 5,
            failure_window: Duration::from_secs(10),
            cache_max_entries: 100_000,
            verifier_key_file: None,
            verifier_file: "password-verifiers".into(),
            hash_pool_size: 2,
            max_body_bytes: 64 * 1024,
            max_connections: 256,
            max_connections_per_ip: 64,
            connection_rate_per_ip: 20.0,
            connection_burst_per_ip: 40,
        }
    }
}

impl fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("listen", &self.listen)
            .field("tls", &self.tls)
            .field("storage", &self.storage)
            .field("embedded_file", &self.embedded_file)
            .field("redis_url", &"<redacted: may hold a password>")
            .field(
                "redis_cluster_nodes",
                &format_args!("<{} redacted: may hold a password>", self.redis_cluster_nodes.len()),
            )
            .field("redis_key_prefix", &self.redis_key_prefix)
            .field("auth_tokens", &format_args!("<{} redacted>", self.auth_tokens.len()))
            .field("allow_anonymous", &self.allow_anonymous)
            .field("auth_cache_ttl", &self.auth_cache_ttl)
            .field("lookup_cache_ttl", &self.lookup_cache_ttl)
            .field("max_failures", &self.max_failures)
            .field("failure_window", &self.failure_window)
            .field("cache_max_entries", &self.cache_max_entries)
            .field("redis_tls_ca_file", &self.redis_tls_ca_file)
            .field("verifier_key_file", &self.verifier_key_file)
            .field("verifier_file", &self.verifier_file)
            .field("hash_pool_size", &self.hash_pool_size)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_connections", &self.max_connections)
            .field("max_connections_per_ip", &self.max_connections_per_ip)
            .field("connection_rate_per_ip", &self.connection_rate_per_ip)
            .field("connection_burst_per_ip", &self.connection_burst_per_ip)
            .finish()
    }
}

pub use ferrule_net::ConfigError;

impl RegistryConfig {
    /// The per-source connection limits of the management API.
    pub fn source_limits(&self) -> ferrule_net::listener::SourceLimits {
        ferrule_net::listener::SourceLimits {
            max_per_source: self.max_connections_per_ip,
            rate_per_second: self.connection_rate_per_ip,
            burst: self.connection_burst_per_ip,
        }
    }

    /// Checks values serde cannot check.
    ///
    /// # Errors
    /// The first [`ConfigError`] found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key, problem: &str| Err(ConfigError::new("registry", key, problem));
        if self.hash_pool_size == 0 {
            return err("hash_pool_size", "must be at least 1");
        }
        if self.max_connections == 0 {
            return err("max_connections", "must be at least 1");
        }
        self.source_limits().validate("registry")?;
        if self.max_body_bytes < 1024 {
            return err("max_body_bytes", "must be at least 1024");
        }
        if self.cache_max_entries == 0 {
            return err("cache_max_entries", "must be at least 1");
        }
        if self.auth_tokens.iter().any(|t| t.len() < 16) {
            return err("auth_tokens", "tokens must be at least 16 characters");
        }
        if self.verifier_key_file.is_some() && self.verifier_file.is_empty() {
            return err("verifier_file", "must not be empty");
        }
        if self.storage == StorageKind::Embedded && self.embedded_file.is_empty() {
            return err("embedded_file", "must not be empty");
        }
        if self.storage == StorageKind::Redis {
            self.validate_redis()?;
        }
        Ok(())
    }

    /// The Redis settings `storage = "redis"` uses: the cluster nodes if any, else the URL.
    fn validate_redis(&self) -> Result<(), ConfigError> {
        let err = |key, problem: &str| Err(ConfigError::new("registry", key, problem));
        let tls = match crate::RedisTls::from_ca_file(self.redis_tls_ca_file.as_deref()) {
            Ok(tls) => tls,
            Err(e) => return err("redis_tls_ca_file", &format!("cannot be used: {e}")),
        };
        let urls: Vec<&str> = if self.redis_cluster_nodes.is_empty() {
            vec![self.redis_url.as_str()]
        } else {
            self.redis_cluster_nodes.iter().map(String::as_str).collect()
        };
        if self.redis_tls_ca_file.is_some() && !urls.iter().any(|u| crate::redis_tls::is_tls_url(u))
        {
            return err("redis_tls_ca_file", "is set, but no Redis URL asks for TLS (rediss://)");
        }
        if self.redis_cluster_nodes.is_empty() {
            if tls.client(self.redis_url.as_str()).is_err() {
                return err("redis_url", "is not a valid Redis URL");
            }
            return Ok(());
        }
        for node in &self.redis_cluster_nodes {
            // No node in the message: the URL may hold a password.
            let Ok(info) = redis::IntoConnectionInfo::into_connection_info(node.as_str()) else {
                return err("redis_cluster_nodes", "holds an invalid Redis URL");
            };
            if info.redis_settings().db() != 0 {
                return err("redis_cluster_nodes", "a Redis Cluster has database 0 only");
            }
        }
        if tls.cluster(urls).build().is_err() {
            return err(
                "redis_cluster_nodes",
                "nodes must share one password, user name, protocol and TLS mode",
            );
        }
        Ok(())
    }

    /// The [`AuthSettings`] these values describe.
    pub fn auth_settings(&self) -> AuthSettings {
        AuthSettings {
            cache_ttl: self.auth_cache_ttl,
            lookup_ttl: self.lookup_cache_ttl,
            max_failures: self.max_failures,
            failure_window: self.failure_window,
            max_entries: self.cache_max_entries,
            verifiers: None,
        }
    }
}

/// The defaults as commented TOML, for `ferrule config print-default` (the `[registry]`
/// section). A unit test checks it parses to `RegistryConfig::default()`.
pub const DEFAULT_TOML: &str = r#"[registry]
# Management API (Hono Device Registry Management API v1) listen address (formerly `bind`,
# still accepted).
listen = "0.0.0.0:28080"
# "embedded": a redb file under the data directory; "redis": shared store for several instances.
storage = "embedded"
# File of the embedded store, relative to the data directory.
embedded_file = "registry.redb"
# Redis server for storage = "redis" (cache invalidation between instances uses its pub/sub).
redis_url = "redis://127.0.0.1:6379/0"
# Redis Cluster for storage = "redis" instead of redis_url: seed node URLs, e.g.
# ["redis://127.0.0.1:7001/", "redis://127.0.0.1:7002/"] (one reachable node suffices; all
# with the same password). Each tenant's keys share a slot; tenants spread over the masters.
redis_cluster_nodes = []
# Prefix of every Redis key and of the change channel.
redis_key_prefix = "ferrule:registry"
# TLS to Redis: rediss:// URLs (above) connect over TLS and verify the server against the
# system's roots, or against the CA certificates of this PEM file.
# redis_tls_ca_file = "/etc/ferrule/redis-ca.pem"
# Bearer tokens accepted from operators (also accepted as the Basic auth password), >= 16 chars.
auth_tokens = []
# Serve the management API without authentication (development only).
allow_anonymous = false
# How long a successful device verification stays cached (changes invalidate it at once).
auth_cache_ttl = "5m"
# How long tenant/device look-ups for adapters stay cached (changes invalidate them at once).
lookup_cache_ttl = "1m"
# Failed authentications per auth-id tolerated within failure_window, then refused until it ends.
max_failures = 5
failure_window = "10s"
# Bound on entries per cache.
cache_max_entries = 100000
# Password verifiers that survive a restart (off unless set): a file of >= 32 random bytes
# kept apart from the data directory (e.g. a mounted secret). With it, a device whose
# password passed argon2 once reconnects after a restart without another argon2 run;
# without it, a restart storm costs one argon2 run per device. With storage = "redis" the
# verifiers are kept in Redis too, for every instance (give them all the same key). See
# SECURITY.md.
# verifier_key_file = "/run/secrets/ferrule-verifier-key"
# Where the verifiers are kept, relative to the data directory.
verifier_file = "password-verifiers"
# Password hashes/verifications running at once, for the whole process (device logins,
# management writes and AMQP application logins share one pool; argon2id: ~20 ms CPU and
# 19 MiB each). Up to 256 x this many wait; beyond that a login is refused as busy.
hash_pool_size = 2
# Largest request body in bytes (413 above).
max_body_bytes = 65536
# Concurrent management API connections.
max_connections = 256
# Per source address (IPv4, or IPv6 /64): open connections, and new connections per
# second (token bucket: rate and burst). Refused peers are closed at once.
max_connections_per_ip = 64
connection_rate_per_ip = 20.0
connection_burst_per_ip = 40

[registry.tls]
# PEM certificate chain and private key for the management API; TLS is off unless both
# are set.
# cert = "/etc/ferrule/tls/server.crt"
# key = "/etc/ferrule/tls/server.key"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        registry: RegistryConfig,
    }

    #[test]
    fn default_toml_is_the_default() {
        let f: File = toml::from_str(DEFAULT_TOML).unwrap();
        assert_eq!(f.registry, RegistryConfig::default());
        assert!(RegistryConfig::default().validate().is_ok());
    }

    #[test]
    fn bind_is_still_accepted_for_listen() {
        let f: File = toml::from_str("[registry]\nbind = \"127.0.0.1:1234\"").unwrap();
        assert_eq!(f.registry.listen, "127.0.0.1:1234".parse().unwrap());
        let f: File = toml::from_str("[registry]\nlisten = \"127.0.0.1:4321\"").unwrap();
        assert_eq!(f.registry.listen, "127.0.0.1:4321".parse().unwrap());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        assert!(toml::from_str::<File>("[registry]\nbindd = \"x\"").is_err());
        let c = RegistryConfig { hash_pool_size: 0, ..Default::default() };
        assert_eq!(c.validate().unwrap_err().key, "registry.hash_pool_size");
    }

    #[test]
    fn debug_hides_tokens() {
        let c = RegistryConfig {
            auth_tokens: vec!["supersecrettoken123".into()],
            redis_url: "redis://:urlsecret@127.0.0.1:6379/0".into(),
            redis_cluster_nodes: vec!["redis://:nodesecret@127.0.0.1:7001/".into()],
            ..Default::default()
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("supersecret"));
        assert!(!shown.contains("urlsecret"));
        assert!(!shown.contains("nodesecret"));
    }

    #[test]
    fn cluster_nodes_are_validated() {
        let redis = |nodes: &[&str]| RegistryConfig {
            storage: StorageKind::Redis,
            redis_cluster_nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
            ..Default::default()
        };
        assert!(redis(&["redis://127.0.0.1:7001/", "redis://127.0.0.1:7002"]).validate().is_ok());
        let key = |c: RegistryConfig| c.validate().unwrap_err().key;
        assert_eq!(key(redis(&["not a url"])), "registry.redis_cluster_nodes");
        assert_eq!(key(redis(&["redis://127.0.0.1:7001/2"])), "registry.redis_cluster_nodes");
        let mixed = redis(&["redis://:a@127.0.0.1:7001/", "redis://:b@127.0.0.1:7002/"]);
        assert_eq!(key(mixed), "registry.redis_cluster_nodes");
        // Not checked unless the store is Redis.
        let embedded = RegistryConfig { storage: StorageKind::Embedded, ..redis(&["x"]) };
        assert!(embedded.validate().is_ok());
        let f: File = toml::from_str(
            "[registry]\nstorage = \"redis\"\nredis_cluster_nodes = [\"redis://127.0.0.1:7001/\"]",
        )
        .unwrap();
        assert_eq!(f.registry.redis_cluster_nodes, vec!["redis://127.0.0.1:7001/"]);
    }
}
