//! The adapter's configuration (its `[adapters.*]` section), defaults and validation,
//! and the errors that stop it from starting.

use ferrule_net::tls::{TlsConfig, TlsError};
use ferrule_net::ConfigError;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::time::Duration;

/// Value of `orig_adapter` for messages from this adapter (also the adapter name the
/// registry is asked about for unauthenticated devices).
pub const ADAPTER: &str = "hono-mqtt";

/// `[adapters.mqtt]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Address of the MQTT adapter.
    pub listen: SocketAddr,
    /// Address of the MQTT-over-TLS listener, used when `tls` is set.
    pub listen_tls: SocketAddr,
    /// Certificate and key for `listen_tls`; MQTT over TLS is off unless both are set.
    /// Devices may authenticate there with X.509 client certificates.
    pub tls: TlsConfig,
    /// Largest accepted payload in bytes (larger: error topic message or disconnect).
    pub max_payload: usize,
    /// Let devices connect without credentials; they must then name tenant and device
    /// in every topic, and their tenant must allow unauthenticated devices.
    pub allow_unauthenticated: bool,
    /// Most concurrent connections; further ones wait in the accept queue.
    pub max_connections: usize,
    /// Most connections open at once from one source address (IPv4, or IPv6 /64); checked
    /// as a connection is accepted, before anything is read (beyond it: closed unanswered).
    pub max_connections_per_ip: usize,
    /// Connections per second from one source address (token bucket rate; beyond it:
    /// closed unanswered)...
    pub connection_rate_per_ip: f64,
    /// ... and burst (devices behind one NAT reconnecting together).
    pub connection_burst_per_ip: u32,
    /// Closes connections whose CONNECT packet does not arrive within this time.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Number of ntex worker threads.
    pub workers: usize,
    /// Publishes (and other packets) one connection may have in flight in Ferrule; at the
    /// bound Ferrule stops reading from the connection until one completes (TCP pushes
    /// back on the device).
    pub max_in_flight: u16,
    /// Bytes of packets one connection may have in flight (one larger packet still
    /// passes alone).
    pub max_in_flight_bytes: usize,
    /// On shutdown, how long open connections get to finish in-flight publishes.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long a command sent at QoS 1 waits for the device's PUBACK before it is
    /// released.
    #[serde(with = "humantime_serde")]
    pub command_ack_timeout: Duration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            listen_tls: SocketAddr::from(([0, 0, 0, 0], 8883)),
            tls: TlsConfig::default(),
            max_payload: 2048,
            allow_unauthenticated: false,
            max_connections: 10_000,
            max_connections_per_ip: 1000,
            connection_rate_per_ip: 200.0,
            connection_burst_per_ip: 1000,
            connect_timeout: Duration::from_secs(10),
            workers: 1,
            max_in_flight: 32,
            max_in_flight_bytes: 256 * 1024,
            shutdown_grace: Duration::from_secs(2),
            command_ack_timeout: Duration::from_secs(10),
        }
    }
}

/// The defaults above as commented TOML.
pub const DEFAULT_TOML: &str = r#"[adapters.mqtt]
# Address of the MQTT adapter.
listen = "0.0.0.0:1883"
# Address of the MQTT-over-TLS listener, used when [adapters.mqtt.tls] is set.
listen_tls = "0.0.0.0:8883"
# Largest accepted payload in bytes (larger: error topic message or disconnect).
max_payload = 2048
# Let devices connect without credentials; they must then name tenant and device
# in every topic, and their tenant must allow unauthenticated devices.
allow_unauthenticated = false
# Most concurrent connections; further ones wait in the accept queue.
max_connections = 10000
# Per source address (IPv4, or IPv6 /64), checked as a connection is accepted, before
# anything is read: connections open at once and new connections per second (token
# bucket: rate and burst). Beyond them the connection is closed unanswered.
max_connections_per_ip = 1000
connection_rate_per_ip = 200.0
connection_burst_per_ip = 1000
# Closes connections whose CONNECT packet does not arrive within this time.
connect_timeout = "10s"
# Number of ntex worker threads.
workers = 1
# Packets one connection may have in flight (publishes waiting for the messaging core or
# the application), and their bytes; at either bound Ferrule stops reading from the
# connection until one completes (TCP pushes back on the device).
max_in_flight = 32
max_in_flight_bytes = 262144
# On shutdown, how long open connections get to finish in-flight publishes.
shutdown_grace = "2s"
# How long a command sent at QoS 1 waits for the device's PUBACK before it is
# released.
command_ack_timeout = "10s"

[adapters.mqtt.tls]
# PEM certificate chain and private key for listen_tls; MQTT over TLS is off unless both
# are set. Devices may then also authenticate with X.509 client certificates.
# cert = "/etc/ferrule/tls/server.crt"
# key = "/etc/ferrule/tls/server.key"
"#;

impl MqttConfig {
    /// The per-source limits checked at CONNECT.
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
        let bad = |key: &str, why: &str| Err(ConfigError::new("adapters.mqtt", key, why));
        if self.max_payload == 0 || self.max_payload > 256 * 1024 * 1024 {
            return bad("max_payload", "must be between 1 byte and 256 MiB");
        }
        if self.max_connections == 0 {
            return bad("max_connections", "must be at least 1");
        }
        self.source_limits().validate("adapters.mqtt")?;
        if self.max_in_flight == 0 {
            return bad("max_in_flight", "must be at least 1");
        }
        if self.max_in_flight_bytes < 1024 {
            return bad("max_in_flight_bytes", "must be at least 1024");
        }
        if self.workers == 0 || self.workers > 64 {
            return bad("workers", "must be between 1 and 64");
        }
        if self.connect_timeout.is_zero() || self.connect_timeout > Duration::from_secs(3600) {
            return bad("connect_timeout", "must be between 1s and 1h");
        }
        if self.command_ack_timeout < Duration::from_millis(10)
            || self.command_ack_timeout > Duration::from_secs(3600)
        {
            return bad("command_ack_timeout", "must be between 10ms and 1h");
        }
        Ok(())
    }
}

/// Errors that stop the adapter from starting.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    /// A configuration value is out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TLS certificate or key could not be loaded.
    #[error("adapters.mqtt.tls: {0}")]
    Tls(TlsError),
    /// The adapter's thread or ntex server could not be started.
    #[error("cannot start the MQTT adapter: {0}")]
    Start(std::io::Error),
}
