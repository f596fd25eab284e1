//! Ferrule's protocol adapters: devices speak MQTT, HTTP or CoAP; every adapter
//! authenticates them through a [`DeviceRegistry`] and hands their messages to the
//! messaging core through [`Downstream`] (the in-process API, no socket in between).
//!
//! Each adapter has the same shape: `connection` (socket, limits), `session`
//! (per-connection protocol state) and `mapping` (pure translation of topics/URIs to
//! tenant, device and endpoint, unit-tested without I/O). The device rules they share
//! (whom a request acts for, what the registry must confirm) are in [`door`].

pub mod coap;
pub mod device;
pub mod door;
pub mod downstream;
pub mod http;
pub mod mqtt;
mod poll;
pub mod quota;
mod rates;
pub mod tls;

pub use device::{
    AdapterAccess, AuthError, BoxFuture, CredentialKind, DeviceIdentity, DeviceRegistry,
};
pub use downstream::{Downstream, Endpoint, Qos, Upload, UploadError};
pub use quota::{TenantLimits, UsageLimit};

/// For the fuzz targets only (`fuzz/`, see `fuzz/README.md`): the checks that see a CoAP
/// or DTLS datagram first, which are otherwise private, and the libraries they guard.
/// Not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::coap::dtls_front::{
        client_hello_is_well_formed, inspect, psk_identity, Refusal, Shape,
        MAX_RECORDS_PER_DATAGRAM,
    };
    pub use coap_lite;

    /// The DTLS loop's answer to an admitted ClientHello without a valid cookie
    /// (`dtls::hello_fields`, then `dtls::hello_verify_request` with `cookie`): `None`
    /// when the datagram is dropped instead.
    pub fn dtls_hello_verify_request(datagram: &[u8], cookie: &[u8]) -> Option<Vec<u8>> {
        let hello = crate::coap::dtls::hello_fields(datagram)?;
        Some(crate::coap::dtls::hello_verify_request(&hello, cookie))
    }

    /// `dtls::rewrite_for_handover`: the synthetic first ClientHello and the real one that
    /// OpenSSL is given for a ClientHello with a valid cookie.
    pub fn dtls_rewrite_for_handover(datagram: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
        crate::coap::dtls::rewrite_for_handover(datagram)
    }

    /// Bounds `classify` applies before coap-lite parses a request.
    pub const COAP_MAX_OPTIONS: usize = crate::coap::connection::MAX_OPTIONS;
    pub const COAP_MAX_OPTION_BYTES: usize = crate::coap::connection::MAX_OPTION_BYTES;

    /// The CoAP socket loops' `classify`: `Some(packet)` for a request to process, `None`
    /// for a datagram answered with a Reset, dropped, or taken as an ACK/RST.
    pub fn coap_classify(datagram: &[u8]) -> Option<coap_lite::Packet> {
        match crate::coap::connection::classify(datagram) {
            crate::coap::connection::Inbound::Request(packet) => Some(packet),
            _ => None,
        }
    }
}

/// Helpers for the adapters' unit tests.
#[cfg(test)]
mod test_support {
    use serde::de::DeserializeOwned;

    /// Checks that `default_toml` (an adapter's `DEFAULT_TOML`) parses, that its
    /// `[adapters.<name>]` section equals `default`, and that the section refuses unknown
    /// keys.
    pub(crate) fn assert_default_toml<T>(default_toml: &str, name: &str, default: &T)
    where
        T: DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let root: toml::Table = toml::from_str(default_toml).expect("DEFAULT_TOML parses");
        let section = root["adapters"][name].clone();
        let parsed: T = section.try_into().expect("the section is a valid config");
        assert_eq!(&parsed, default, "DEFAULT_TOML says what Default does");
        assert!(toml::from_str::<T>("no_such_key = 1").is_err(), "unknown keys are refused");
    }
}
