//! The adapter's configuration (its `[adapters.*]` section), defaults and validation,
//! and the errors that stop it from starting.

use ferrule_net::ConfigError;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::time::Duration;

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
    /// A config value is out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Largest payload that fits a UDP datagram with a CoAP header (coap-lite's own
/// limit with its `udp` feature is 64,000 bytes for the whole message).
pub const MAX_PAYLOAD_LIMIT: usize = 63_000;

impl CoapConfig {
    /// Checks the values `bind` relies on.
    ///
    /// # Errors
    /// The first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, problem: String| Err(ConfigError::new("adapters.coap", key, problem));
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
            return bad(key, "must be at least 1".into());
        }
        if self.max_payload > MAX_PAYLOAD_LIMIT {
            let problem = format!(
                "{} does not fit a UDP datagram (at most {MAX_PAYLOAD_LIMIT})",
                self.max_payload
            );
            return bad("max_payload", problem);
        }
        if self.handshake_timeout.is_zero() {
            return bad("handshake_timeout", "must not be zero".into());
        }
        if self.session_idle_timeout.is_zero() {
            return bad("session_idle_timeout", "must not be zero".into());
        }
        Ok(())
    }
}
