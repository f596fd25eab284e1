//! One CoAP datagram as the UDP and DTLS loops take it: `connection::classify` (header
//! checks, `options_within_bounds`, coap-lite's parser, the empty-payload-marker check),
//! then the request mapping (`coap::mapping`: `request`, `command_response`, `block1`,
//! `size1`, `transfer_key`, `content_format`) of a datagram classified as a request.
//!
//! Input: one UDP datagram (or decrypted DTLS record). Checked: no panic, bounded time and
//! memory; a request never has more options than `classify` bounds them to; a Block1
//! option re-encodes (as the responses echo it) to the same block.
#![no_main]

use ferrule_adapters::coap::mapping;
use ferrule_adapters::fuzzing::{coap_classify, COAP_MAX_OPTIONS, COAP_MAX_OPTION_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(packet) = coap_classify(data) else { return };
    let (count, bytes) = packet
        .options()
        .flat_map(|(_, values)| values.iter())
        .fold((0, 0), |(n, b), v| (n + 1, b + v.len()));
    assert!(
        count <= COAP_MAX_OPTIONS && bytes <= COAP_MAX_OPTION_BYTES,
        "{count} options, {bytes} bytes"
    );
    if let Ok(Some(block)) = mapping::block1(&packet) {
        let value = block.encode().iter().fold(0u32, |n, b| (n << 8) | u32::from(*b));
        assert_eq!(
            (value >> 4, value & 0b1000 != 0, (value & 0b111) as u8),
            (block.num, block.more, block.szx)
        );
    }
    let _ = mapping::size1(&packet);
    let _ = mapping::transfer_key(&packet);
    let _ = mapping::content_format(&packet);
    let _ = mapping::command_response(&packet);
    let _ = mapping::request(&packet);
});
