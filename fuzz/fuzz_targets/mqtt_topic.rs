//! MQTT topic names and filters from devices (`mqtt/mapping.rs`): publish topics with
//! their property bag (`t/TENANT/DEVICE/?content-type=..&hono-ttl=..`), error and command
//! subscription filters, command response topics (whose request id is decoded), the
//! `auth-id@tenant` username of CONNECT, and the topics built from parsed filters.
//!
//! Input: one topic (lossy UTF-8; ntex-mqtt hands the adapter valid UTF-8 only). Checked:
//! no panic, bounded time and memory; a parsed publish topic never names an empty device.
#![no_main]

use ferrule_adapters::mqtt::mapping;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let topic = String::from_utf8_lossy(data);
    let topic = topic.as_ref();
    // PUBLISH: a command response, else telemetry/event (with the bag of a bad topic, for
    // the error report), as `connection.rs` tries them.
    if let Some(Ok(response)) = mapping::parse_response_topic(topic) {
        assert!(!response.request_id.is_empty() && (200..600).contains(&response.status));
    }
    match mapping::parse_publish_topic(topic) {
        Ok(address) => assert!(address.device.as_ref().is_none_or(|d| !d.is_empty())),
        Err(_) => drop(mapping::property_bag_of(topic)),
    }
    let endpoint = mapping::endpoint_segment(topic);
    let _ = mapping::parse_property_bag(topic);
    let _ = mapping::url_decode(topic);
    let _ = ferrule_adapters::door::split_auth_id(topic);
    let _ = mapping::valid_command_name(topic);
    // SUBSCRIBE, and the topics then published to the device.
    if let Some(errors) = mapping::parse_error_filter(topic) {
        let _ = errors.matches(endpoint, Some("gw-1"));
        let report = mapping::ErrorReport {
            tenant: "t1",
            device: "d1",
            endpoint,
            correlation_id: "corr-1",
            code: 400,
        };
        let _ = errors.error_topic(&report);
    }
    if let Some(commands) = mapping::parse_command_filter(topic) {
        let _ = commands.command_topic("t1", endpoint, Some("req-1"), "switch");
    }
});
