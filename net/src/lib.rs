//! What every Ferrule listener shares, whichever component owns it (AMQP endpoint, device
//! adapters, management API, ops endpoint):
//!
//! - [`listener`]: admission of TCP connections (total cap, per-source caps and connection
//!   rate) and the accept loop with task tracking and graceful drain;
//! - [`tls`]: rustls server configuration from PEM files, reloaded when they change;
//! - [`hashing`]: the one bounded pool for password hashing and verification;
//! - [`text`]: strict percent-decoding of paths, queries and topics;
//! - [`private`]: the data directory and store files, readable by their owner only;
//! - [`trace`]: W3C trace context and spans for the OTLP exporter;
//! - [`usage`]: a tenant's usage limits per accounting period.
//!
//! A crate of its own so that components need not depend on each other for them (the
//! device registry used to depend on the whole messaging core for these).

pub mod hashing;
pub mod listener;
pub mod private;
pub mod text;
pub mod tls;
pub mod trace;
pub mod usage;

/// A configuration value that cannot work: the key's full path (`adapters.mqtt.workers`)
/// and what is wrong with it. Every section's `validate()` returns it, so that every bad
/// value is reported the same way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    /// The offending key, with its section (`registry.hash_pool_size`).
    pub key: String,
    /// What is wrong with it.
    pub problem: String,
}

impl ConfigError {
    /// A `ConfigError` for `key` in `section`.
    pub fn new(section: &str, key: &str, problem: impl Into<String>) -> Self {
        Self { key: format!("{section}.{key}"), problem: problem.into() }
    }
}
