//! Ferrule's protocol adapters: devices speak MQTT, HTTP or CoAP; every adapter
//! authenticates them through a [`DeviceRegistry`] and hands their messages to the
//! messaging core through [`Downstream`] (the in-process API, no socket in between).
//!
//! Each adapter has the same shape: `connection` (socket, limits), `session`
//! (per-connection protocol state) and `mapping` (pure translation of topics/URIs to
//! tenant, device and endpoint, unit-tested without I/O).

pub mod device;
pub mod downstream;
pub mod coap;
pub mod http;
pub mod mqtt;
pub mod tls;

pub use device::{AuthError, BoxFuture, DeviceIdentity, DeviceRegistry};
pub use downstream::{Downstream, Endpoint, Qos, Upload, UploadError};
