//! `guard::scan`, the iterative walker of AMQP 1.0 type encodings that every frame's
//! performative and every message passes before fe2o3-amqp decodes it.
//!
//! Input: raw encoded values. Checked: no panic, bounded time and memory, and the walker's
//! own contract (what it returns is a length within the input; a buffer that walks as a
//! whole also walks value by value).
#![no_main]

use ferrule_messaging::fuzzing::{scan, MAX_DEPTH};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As for a message payload: the values must fill the buffer exactly.
    let whole = scan(data, None, MAX_DEPTH);
    if let Ok(n) = whole {
        assert_eq!(n, data.len());
    }
    // As for a performative: one value, followed by anything (the payload).
    match scan(data, Some(1), MAX_DEPTH) {
        Ok(n) => assert!(n <= data.len()),
        // The first value of a buffer of values is itself a value.
        Err(_) => assert!(whole.is_err() || data.is_empty()),
    }
    // A shallower limit may only refuse more.
    if scan(data, None, 4).is_ok() {
        assert!(whole.is_ok());
    }
});
