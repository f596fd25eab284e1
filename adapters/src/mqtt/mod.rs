//! The MQTT adapter (Hono's MQTT API, MQTT 3.1.1 and 5) on ntex-mqtt: devices publish
//! telemetry and events; the adapter authenticates them through the [`DeviceRegistry`]
//! and hands their messages to the messaging core through [`Downstream`]. With a
//! [`CommandRouter`] ([`start_with_commands`]) devices also subscribe to commands and
//! answer them.
//!
//! - `mapping`: topics → endpoint, tenant, device, property bag; command filters and
//!   topics (pure).
//! - `session`: per-connection state (principal, MQTT version, error-topic subscription,
//!   command subscriptions).
//! - `command`: the router's sink for a session and the outbox that publishes commands
//!   on the worker thread and waits for PUBACKs.
//! - `connection`: the ntex services (CONNECT, PUBLISH, SUBSCRIBE, control) and the one
//!   place where failures become CONNACK codes, PUBACK reason codes, DISCONNECTs or
//!   error-topic messages.
//! - this module: configuration and the server's lifecycle. ntex runs its own
//!   single-threaded runtimes, so the adapter lives on its own thread(s); the socket is
//!   bound before that thread starts, so a bind failure is returned, not lost.

mod command;
mod connection;
pub mod mapping;
pub mod session;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrule_command_control::CommandRouter;
use ferrule_net::tls::{TlsConfig, TlsError};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::device::DeviceRegistry;
use crate::downstream::Downstream;

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

    fn validate(&self) -> Result<(), MqttError> {
        let bad = |key: &'static str, why: &'static str| Err(MqttError::Config { key, why });
        if self.max_payload == 0 || self.max_payload > 256 * 1024 * 1024 {
            return bad("adapters.mqtt.max_payload", "must be between 1 byte and 256 MiB");
        }
        if self.max_connections == 0 {
            return bad("adapters.mqtt.max_connections", "must be at least 1");
        }
        if let Err(why) = self.source_limits().validate() {
            return bad("adapters.mqtt.max_connections_per_ip", why);
        }
        if self.workers == 0 || self.workers > 64 {
            return bad("adapters.mqtt.workers", "must be between 1 and 64");
        }
        if self.connect_timeout.is_zero() || self.connect_timeout > Duration::from_secs(3600) {
            return bad("adapters.mqtt.connect_timeout", "must be between 1s and 1h");
        }
        if self.command_ack_timeout < Duration::from_millis(10)
            || self.command_ack_timeout > Duration::from_secs(3600)
        {
            return bad("adapters.mqtt.command_ack_timeout", "must be between 10ms and 1h");
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
    #[error("{key}: {why}")]
    Config { key: &'static str, why: &'static str },
    /// The TLS certificate or key could not be loaded.
    #[error("adapters.mqtt.tls: {0}")]
    Tls(TlsError),
    /// The adapter's thread or ntex server could not be started.
    #[error("cannot start the MQTT adapter: {0}")]
    Start(std::io::Error),
}

/// A running MQTT adapter. It stops once the `shutdown` token given to [`start`] is
/// cancelled; [`MqttAdapter::stopped`] / [`MqttAdapter::join`] wait for that.
pub struct MqttAdapter {
    local_addr: SocketAddr,
    local_tls_addr: Option<SocketAddr>,
    stopped: tokio::sync::watch::Receiver<bool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl MqttAdapter {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound address of the MQTT-over-TLS listener, if TLS is configured.
    pub fn local_tls_addr(&self) -> Option<SocketAddr> {
        self.local_tls_addr
    }

    /// Waits until the adapter has stopped (after the shutdown token was cancelled).
    ///
    /// # Cancel safety
    /// Cancel safe: it only observes.
    pub async fn stopped(&self) {
        let mut stopped = self.stopped.clone();
        // An error means the thread is gone, which is stopped too.
        let _ = stopped.wait_for(|s| *s).await;
    }

    /// Blocks the calling thread until the adapter has stopped. Do not call it from
    /// inside an async task; use [`MqttAdapter::stopped`] there.
    pub fn join(&self) {
        let handle = self.thread.lock().map(|mut t| t.take()).unwrap_or(None);
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!("the MQTT adapter thread panicked");
            }
        }
    }
}

/// Binds `config.listen` and starts serving on ntex worker threads, without commands
/// (command subscriptions are refused); see [`start_with_commands`].
///
/// # Errors
/// As [`start_with_commands`].
pub fn start(
    config: MqttConfig,
    downstream: Downstream,
    registry: Arc<dyn DeviceRegistry>,
    shutdown: CancellationToken,
) -> Result<MqttAdapter, MqttError> {
    start_with_commands(config, downstream, registry, None, shutdown)
}

/// Binds `config.listen` and starts serving on ntex worker threads. With `commands`,
/// devices may subscribe to commands (`command///req/#` and the gateway forms) and
/// answer them (`command///res/REQ-ID/STATUS`); without, such subscriptions are refused
/// and such publishes fail like unknown topics.
///
/// # Errors
/// [`MqttError::Bind`] if the socket cannot be bound (returned here, synchronously),
/// [`MqttError::Config`] for out-of-range settings, [`MqttError::Start`] if the server
/// thread cannot start.
pub fn start_with_commands(
    config: MqttConfig,
    downstream: Downstream,
    registry: Arc<dyn DeviceRegistry>,
    commands: Option<CommandRouter>,
    shutdown: CancellationToken,
) -> Result<MqttAdapter, MqttError> {
    config.validate()?;
    let addr = config.listen;
    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| MqttError::Bind { addr, source })?;
    let local_addr = listener.local_addr().map_err(|source| MqttError::Bind { addr, source })?;
    listener.set_nonblocking(true).map_err(MqttError::Start)?;
    let tls = if config.tls.enabled() {
        let server_config =
            crate::tls::device_server_config(&config.tls).map_err(MqttError::Tls)?;
        let addr = config.listen_tls;
        let listener =
            std::net::TcpListener::bind(addr).map_err(|source| MqttError::Bind { addr, source })?;
        listener.set_nonblocking(true).map_err(MqttError::Start)?;
        Some((listener, server_config))
    } else {
        None
    };
    let local_tls_addr = match &tls {
        Some((l, _)) => Some(
            l.local_addr().map_err(|source| MqttError::Bind { addr: config.listen_tls, source })?,
        ),
        None => None,
    };

    let admission = ferrule_net::listener::Admission::new(
        "mqtt",
        config.max_connections,
        config.source_limits(),
    );
    let shared = Arc::new(connection::Shared { config, downstream, registry, commands, admission });
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
    let (stopped_tx, stopped_rx) = tokio::sync::watch::channel(false);
    let thread = std::thread::Builder::new()
        .name("ferrule-mqtt".into())
        .spawn(move || {
            connection::serve(listener, tls, shared, shutdown, ready_tx);
            let _ = stopped_tx.send(true);
        })
        .map_err(MqttError::Start)?;
    // The ntex server reports whether it could start; the thread exits if not.
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = thread.join();
            return Err(MqttError::Start(e));
        }
        Err(_) => {
            let _ = thread.join();
            return Err(MqttError::Start(std::io::Error::other(
                "the MQTT adapter thread exited during start-up",
            )));
        }
    }
    tracing::info!(addr = %local_addr, "MQTT adapter up");
    if let Some(addr) = local_tls_addr {
        tracing::info!(%addr, "MQTT adapter (TLS) up");
    }
    Ok(MqttAdapter {
        local_addr,
        local_tls_addr,
        stopped: stopped_rx,
        thread: Mutex::new(Some(thread)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Root {
        adapters: Adapters,
    }

    #[derive(Deserialize)]
    struct Adapters {
        mqtt: MqttConfig,
    }

    #[test]
    fn default_toml_is_the_default() {
        let root: Root = toml::from_str(DEFAULT_TOML).expect("DEFAULT_TOML parses");
        assert_eq!(root.adapters.mqtt, MqttConfig::default());
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<MqttConfig>("max_payloads = 1").is_err());
        let partial: MqttConfig = toml::from_str("max_payload = 64").expect("partial config");
        assert_eq!(partial.max_payload, 64);
        assert_eq!(partial.listen, MqttConfig::default().listen);
    }

    #[test]
    fn validation_names_the_key() {
        let config = MqttConfig { workers: 0, ..Default::default() };
        let err = config.validate().expect_err("invalid");
        assert!(err.to_string().contains("adapters.mqtt.workers"), "{err}");
    }
}
