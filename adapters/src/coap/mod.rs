//! The CoAP adapter (Hono's CoAP API, RFC 7252): `POST /telemetry` (`/t`) and
//! `POST /event` (`/e`) for devices authenticated by DTLS-PSK (identity
//! `auth-id@tenant`), `PUT /telemetry|event/TENANT/DEVICE` for gateways and, on plain
//! UDP where allowed, unauthenticated devices.
//!
//! - `mapping`: CoAP method, Uri-Path, Uri-Query, Content-Format → what is asked (pure).
//! - `session`: message deduplication and in-flight limits (a state machine over `now`).
//! - `connection`: the plain UDP socket loop and the DTLS listener and sessions.
//! - `handler`: one whole request (the front door's decision, upload, command response,
//!   `hono-ttd` wait), and the one place where errors become CoAP response codes.
//! - this module: config, binding and running the adapter.
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

mod config;
pub(crate) mod connection;
pub(crate) mod dtls;
pub(crate) mod dtls_front;
mod dtls_server;
mod handler;
pub mod mapping;
pub mod session;

pub use config::{CoapConfig, CoapError, ADAPTER, DEFAULT_TOML, MAX_PAYLOAD_LIMIT};

use std::net::SocketAddr;
use std::sync::atomic::AtomicU16;
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use ferrule_command_control::CommandRouter;

use crate::device::DeviceRegistry;
use crate::downstream::Downstream;
use handler::Shared;

/// A bound CoAP adapter, ready to [`CoapAdapter::run`].
pub struct CoapAdapter {
    /// Bound only when unauthenticated devices are allowed: nothing else may use it.
    udp: Option<Arc<UdpSocket>>,
    dtls: Arc<UdpSocket>,
    shared: Arc<Shared>,
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
        let dtls = dtls_server::serve_dtls(self.dtls, self.shared, tasks.clone(), shutdown.clone());
        tokio::join!(udp, dtls, stop);
        tasks.close();
        tasks.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_toml_is_the_default_config() {
        crate::test_support::assert_default_toml(DEFAULT_TOML, "coap", &CoapConfig::default());
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
}
