//! Command request ids (`command-control/src/request_id.rs`) as devices send them back in
//! MQTT topics, HTTP and CoAP paths: `RequestId::open` (the id is parsed before its MAC is
//! checked, so the parser sees every input), and `seal` of ids built from the input.
//!
//! Input: the request id (lossy UTF-8). Checked: no panic, bounded time and memory; an id
//! built from the input seals to text that opens to the same id, for that device only.
//! The same text as a W3C `traceparent` (from a device's or an application's message
//! properties): parsed without panic, and what parses prints back to the same value.
#![no_main]

use std::sync::LazyLock;

use ferrule_command_control::{RequestId, RequestIdError, RequestKey};
use ferrule_messaging::fuzzing::fe2o3_amqp::types::messaging::MessageId;
use libfuzzer_sys::fuzz_target;

static KEY: LazyLock<RequestKey> = LazyLock::new(|| RequestKey::new(&[7; 32]).unwrap());

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(context) = ferrule_net::trace::TraceContext::parse(&text) {
        assert_eq!(ferrule_net::trace::TraceContext::parse(&context.traceparent()), Some(context));
    }
    if let Ok(id) = RequestId::open(&KEY, "t", "d", &text) {
        let again = id.seal(&KEY, "t", "d").expect("an opened id seals");
        assert_eq!(RequestId::open(&KEY, "t", "d", &again), Ok(id));
    }
    let mid = (0..=text.len() / 2).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
    let (corr, reply) = text.split_at(mid);
    if reply.is_empty() {
        return;
    }
    let id = RequestId { correlation_id: MessageId::String(corr.into()), reply_id: reply.into() };
    match id.seal(&KEY, "t", "d") {
        Ok(sealed) => {
            assert_eq!(RequestId::open(&KEY, "t", "d", &sealed), Ok(id));
            assert_eq!(RequestId::open(&KEY, "t", "e", &sealed), Err(RequestIdError::NotIssuedTo));
        }
        Err(e) => assert_eq!(e, RequestIdError::TooLong),
    }
});
