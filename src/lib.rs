//! Ferrule as a library: the whole platform in one process ([`Platform`]), its
//! configuration ([`config`]) and operations endpoint ([`ops`]). The `ferrule` binary is a
//! thin command line over this; integration tests start a [`Platform`] in process.
//!
//! ```text
//!  devices ──MQTT/HTTP/CoAP──▶ adapters ──door──▶ registry (auth, look-ups)
//!                                 │
//!                                 ▼ Downstream (in process)
//!  applications ◀──AMQP 1.0──▶ messaging core (broker, queues, store)
//!                                 ▲
//!                   command-control (router: command/T ⇄ device sessions)
//! ```

pub mod app_cli;
pub mod cluster;
pub mod config;
pub mod ops;
pub mod otlp;
pub mod platform;
mod wiring;

pub use platform::Platform;
