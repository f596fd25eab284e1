//! The DTLS port before authentication (`coap/dtls_front.rs`, `coap/dtls.rs`): `inspect`
//! on every datagram, `client_hello_is_well_formed`, the stateless cookie exchange's
//! `hello_fields` + `hello_verify_request` on an admitted ClientHello, the
//! `rewrite_for_handover` of a ClientHello with a valid cookie, and the PSK identity read
//! from a ClientKeyExchange (`psk_identity`, then `door::split_auth_id_bytes`) before
//! the key is known. (OpenSSL, which gets what passes, is not part of this target.)
//!
//! Input: one UDP datagram. Checked: no panic, bounded time and memory; an admitted
//! datagram has no more handshake records than a datagram may carry, and a
//! HelloVerifyRequest is one well-formed record.
#![no_main]

use ferrule_adapters::door::split_auth_id_bytes as split_identity;
use ferrule_adapters::fuzzing::{
    client_hello_is_well_formed, dtls_hello_verify_request, dtls_rewrite_for_handover, inspect,
    psk_identity, MAX_RECORDS_PER_DATAGRAM,
};
use libfuzzer_sys::fuzz_target;

/// What `CookieKey::cookie` makes: 16 bytes.
const COOKIE: [u8; 16] = [0xc0; 16];

fuzz_target!(|data: &[u8]| {
    let _ = client_hello_is_well_formed(data);
    let _ = split_identity(data);
    let Ok(shape) = inspect(data) else { return };
    assert!(shape.handshake_records as usize <= MAX_RECORDS_PER_DATAGRAM);
    if shape.client_hello {
        if let Some(answer) = dtls_hello_verify_request(data, &COOKIE) {
            let length = u16::from_be_bytes([answer[11], answer[12]]) as usize;
            assert_eq!(13 + length, answer.len(), "HelloVerifyRequest record length");
        }
        // As if the cookie were valid (only a peer that received it gets this far).
        let _ = dtls_rewrite_for_handover(data);
    }
    if let Some(identity) = psk_identity(data) {
        let _ = split_identity(identity);
    }
});
