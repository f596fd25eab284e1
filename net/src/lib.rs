//! What every Ferrule listener shares, whichever component owns it (AMQP endpoint, device
//! adapters, management API, ops endpoint):
//!
//! - [`listener`]: admission of TCP connections (total cap, per-source caps and connection
//!   rate) and the accept loop with task tracking and graceful drain;
//! - [`tls`]: rustls server configuration from PEM files, reloaded when they change;
//! - [`hashing`]: the one bounded pool for password hashing and verification;
//! - [`text`]: strict percent-decoding of paths, queries and topics.
//!
//! A crate of its own so that components need not depend on each other for them (the
//! device registry used to depend on the whole messaging core for these).

pub mod hashing;
pub mod listener;
pub mod text;
pub mod tls;
