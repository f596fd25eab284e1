//! Command request ids (`command-control/src/request_id.rs`) as devices send them back in
//! MQTT topics, HTTP and CoAP paths: `RequestId::decode`, and `encode` of what decoded
//! (the router answers with it).
//!
//! Input: the request id (lossy UTF-8). Checked: no panic, bounded time and memory; what
//! decodes encodes again, to an id that decodes to the same.
#![no_main]

use ferrule_command_control::RequestId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(id) = RequestId::decode(&text) else { return };
    let again = id.encode().expect("a decoded id encodes");
    assert_eq!(RequestId::decode(&again), Ok(id));
});
