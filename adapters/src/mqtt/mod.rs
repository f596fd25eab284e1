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
mod config;
mod connection;
mod failure;
mod inflight;
pub mod mapping;
mod publish;
mod server;
pub mod session;
mod subscribe;
mod will;

pub use config::{MqttConfig, MqttError, ADAPTER, DEFAULT_TOML};

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use ferrule_command_control::CommandRouter;
use tokio_util::sync::CancellationToken;

use crate::device::DeviceRegistry;
use crate::downstream::Downstream;

/// A running MQTT adapter. It stops once the `shutdown` token given to [`start`] is
/// cancelled; [`MqttAdapter::stopped`] / [`MqttAdapter::join`] wait for that.
pub struct MqttAdapter {
    local_addr: SocketAddr,
    local_tls_addr: Option<SocketAddr>,
    stopped: tokio::sync::watch::Receiver<bool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    revalidator: Revalidator,
}

/// Closes MQTT connections the registry no longer allows ([`MqttAdapter::revalidator`]).
#[derive(Clone)]
pub struct Revalidator {
    connections: Arc<crate::door::Connections>,
    registry: Arc<dyn DeviceRegistry>,
}

impl Revalidator {
    /// Closes the connections of devices in `scope` that the registry no longer lets use
    /// MQTT (device or tenant disabled or deleted, MQTT switched off for the tenant): MQTT
    /// 5 clients get DISCONNECT 0x98 (administrative action). Call it for every registry
    /// change, once the registry's caches followed it. Returns how many connections were
    /// told to close.
    pub async fn revalidate(&self, scope: &crate::door::Scope) -> usize {
        let closed = self.connections.revalidate(self.registry.as_ref(), ADAPTER, scope).await;
        if closed > 0 {
            tracing::info!(
                ?scope,
                closed,
                "closing MQTT connections the registry no longer allows"
            );
            metrics::counter!("ferrule_connections_revoked_total", "adapter" => ADAPTER)
                .increment(closed as u64);
        }
        closed
    }
}

impl MqttAdapter {
    /// What closes the connections of devices the registry no longer allows.
    pub fn revalidator(&self) -> Revalidator {
        self.revalidator.clone()
    }

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
    let connections = Arc::new(crate::door::Connections::default());
    let shared = Arc::new(connection::Shared {
        config,
        downstream,
        registry: registry.clone(),
        commands,
        admission,
        connections: connections.clone(),
        wills: Default::default(),
        draining: CancellationToken::new(),
    });
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
    let (stopped_tx, stopped_rx) = tokio::sync::watch::channel(false);
    let thread = std::thread::Builder::new()
        .name("ferrule-mqtt".into())
        .spawn(move || {
            server::serve(listener, tls, shared, shutdown, ready_tx);
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
        revalidator: Revalidator { connections, registry },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_toml_is_the_default() {
        crate::test_support::assert_default_toml(DEFAULT_TOML, "mqtt", &MqttConfig::default());
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
