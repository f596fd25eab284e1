//! Block-wise (RFC 7959 Block1) uploads over a sequence of datagrams, as `dispatch` in
//! `coap/connection.rs` handles them: `classify`, `mapping::block1`, then
//! `session::Assemblies::add`, and the request mapping of each body put together.
//!
//! Input: records of `[control][length: u16 BE][datagram]`; the control byte's low two
//! bits pick one of four peers, the rest advance the clock by 0..63 s (the transfers
//! expire after `EXCHANGE_LIFETIME`, 247 s). Checked: no panic, bounded time and memory;
//! a body put together is never over the maximum, and the transfers stay bounded.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferrule_adapters::coap::mapping;
use ferrule_adapters::coap::session::{Assembled, Assemblies, EXCHANGE_LIFETIME};
use ferrule_adapters::fuzzing::coap_classify;
use libfuzzer_sys::fuzz_target;

/// The adapter's default `max_payload`; small limits for the transfers themselves so that
/// eviction is reached.
const MAX_BODY: usize = 2048;
const MAX_TRANSFERS: usize = 4;

fuzz_target!(|data: &[u8]| {
    let mut assemblies = Assemblies::new(EXCHANGE_LIFETIME, MAX_TRANSFERS, MAX_BODY);
    let mut now = Instant::now();
    let mut rest = data;
    while let [control, hi, lo, tail @ ..] = rest {
        let length = (usize::from(*hi) << 8 | usize::from(*lo)).min(tail.len());
        let (datagram, next) = tail.split_at(length);
        rest = next;
        now += Duration::from_secs(u64::from(control >> 2));
        let peer = SocketAddr::from(([192, 0, 2, 1], 5683 + u16::from(control & 3)));
        let Some(packet) = coap_classify(datagram) else { continue };
        let Ok(Some(block)) = mapping::block1(&packet) else { continue };
        let assembled = assemblies.add(peer, &packet, block, now);
        assert!(assemblies.len() <= MAX_TRANSFERS);
        if let Assembled::Complete(whole) = assembled {
            assert!(whole.payload.len() <= MAX_BODY, "{} bytes put together", whole.payload.len());
            let _ = mapping::command_response(&whole);
            let _ = mapping::request(&whole);
        }
    }
});
