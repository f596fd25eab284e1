//! The MQTT adapter driven by mosquitto_pub (MQTT 3.1.1 and 5, a client nobody here
//! wrote) and, where one connection must subscribe and publish or a thousand must be open
//! at once, by a small raw MQTT 3.1.1 client (`support/raw_mqtt.rs`). What reaches the
//! messaging core is observed through its in-process consumer API.
//!
//! Size: one test per behaviour of the MQTT adapter (the device API, bad input, limits,
//! lifecycle; where cases differ only in data, one table-driven test that names the
//! failing row); shared setup is in `support/`.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use ferrule_adapters::downstream::CONNECTION_EVENT;
use ferrule_adapters::mqtt::{self, MqttAdapter, MqttConfig, MqttError};
use ferrule_adapters::Downstream;
use ferrule_messaging::{Consumer, Delivery, Outcome};
use support::amqp::{next, nothing, text, MessageExt};
use support::clients::{assert_success, mosquitto, Run};
use support::platform::{devices, Platform};
use support::raw_mqtt::{packet, string, RawClient};
use support::MemoryRegistry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

type Setup = Platform<MqttAdapter>;

/// [`devices`], and a disabled device `off` (`offpw`) in t1 and a disabled tenant t3 with
/// `d3` (`pw3`).
fn registry() -> MemoryRegistry {
    let registry = devices().tenant("t3").device("t1", "off", "offpw").device("t3", "d3", "pw3");
    registry.set_device_enabled("t1", "off", false);
    registry.set_tenant_enabled("t3", false);
    registry
}

async fn start_with(config: MqttConfig) -> Setup {
    Platform::start(registry(), config).await
}

async fn start() -> Setup {
    start_with(MqttConfig { max_payload: 64, ..Default::default() }).await
}

/// mosquitto_pub's arguments for d1: its credentials, then `args`.
fn as_d1<'a>(args: &[&'a str]) -> Vec<&'a str> {
    [&["-u", "d1@t1", "-P", "pw1"][..], args].concat()
}

/// Runs mosquitto_pub with `-d` (packet log) in the background.
fn spawn_pub(addr: SocketAddr, version: &str, args: &[&str]) -> JoinHandle<Run> {
    mosquitto("mosquitto_pub", addr, version, &[&["-d"][..], args].concat())
}

/// Runs mosquitto_pub with `-d` (packet log) to its end.
async fn mosquitto_pub(addr: SocketAddr, version: &str, args: &[&str]) -> Run {
    spawn_pub(addr, version, args).await.expect("not cancelled")
}

/// The next event that is not a connection event (those are accepted and skipped).
async fn next_device_event(consumer: &mut Consumer) -> Delivery {
    loop {
        let d = next(consumer).await;
        if d.content_type().as_deref() != Some(CONNECTION_EVENT) {
            return d;
        }
        d.settle(Outcome::Accepted);
    }
}

fn annotation(d: &Delivery, key: &str) -> Option<Value> {
    let annotations = d.message().message_annotations.as_ref()?;
    annotations.0.iter().find(|(k, _)| format!("{k:?}").contains(key)).map(|(_, v)| v.clone())
}

/// Asserts that a TCP peer closes `stream` (within 10 s).
async fn assert_closed(stream: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "{what}: the server closes the connection, got {read:?}"
    );
}

/// Publishes `payload` to `topic` at QoS 1 (`packet_id`) on `client`, has the consumer
/// accept it and asserts the PUBACK.
async fn publish_accepted(
    client: &mut RawClient,
    consumer: &mut Consumer,
    topic: &str,
    payload: &[u8],
    packet_id: u16,
) {
    client.publish(topic, payload, packet_id).await;
    next(consumer).await.settle(Outcome::Accepted);
    assert_eq!(client.packet_type().await, Some(4), "PUBACK");
}

// ---------------------------------------------------------------------------------------
// Telemetry and events reach the consumer with Hono's properties

#[tokio::test]
async fn telemetry_arrives_with_hono_properties_at_qos0_and_qos1_in_v311_and_v5() {
    for (version, qos) in [("mqttv311", "0"), ("mqttv311", "1"), ("mqttv5", "0"), ("mqttv5", "1")] {
        let row = format!("{version} QoS {qos}");
        let s = start().await;
        let mut consumer = s.consumer("telemetry/t1", 10);
        let topic = "telemetry/?content-type=application%2Fjson&seq=7";
        let args = as_d1(&["-q", qos, "-t", topic, "-m", "{\"temp\":5}"]);
        let run = spawn_pub(s.addr(), version, &args);
        let d = next(&mut consumer).await;
        if qos == "1" {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(!run.is_finished(), "{row}: no PUBACK before the consumer accepted");
        }
        assert_eq!(d.data(), b"{\"temp\":5}", "{row}");
        assert_eq!(d.app_property("device_id"), text("d1"), "{row}");
        assert_eq!(d.app_property("orig_adapter"), text("hono-mqtt"), "{row}");
        assert_eq!(d.app_property("orig_address"), text(topic), "{row}");
        let qos_property = Some(SimpleValue::Int(qos.parse().unwrap()));
        assert_eq!(d.app_property("qos"), qos_property, "{row}");
        assert_eq!(d.app_property("seq"), text("7"), "{row}");
        assert_eq!(annotation(&d, "tenant_id"), Some(Value::String("t1".into())), "{row}");
        assert_eq!(d.content_type().as_deref(), Some("application/json"), "{row}");
        let to = d.message().properties.as_ref().and_then(|p| p.to.clone());
        assert_eq!(to.as_deref(), Some("telemetry/t1"), "{row}");
        assert_eq!(d.is_presettled(), qos == "0", "{row}");
        d.settle(Outcome::Accepted);
        assert_success(run, &row).await;
    }
}

#[tokio::test]
async fn v311_event_qos1_with_property_bag_ttl() {
    let s = start().await;
    let args = as_d1(&["-q", "1", "-t", "e/?hono-ttl=30", "-m", "door open"]);
    let run = mosquitto_pub(s.addr(), "mqttv311", &args).await;
    assert_eq!(run.code, Some(0), "{}", run.output);
    // Events are stored: the consumer may come after the PUBACK.
    let d = next_device_event(&mut s.consumer("event/t1", 10)).await;
    assert_eq!(d.data(), b"door open");
    assert_eq!(d.app_property("orig_address"), text("e/?hono-ttl=30"));
    assert!(d.durable());
    assert_eq!(d.ttl(), Some(30_000));
    d.settle(Outcome::Accepted);
}

#[tokio::test]
async fn v5_event_qos1_with_content_type_and_expiry_properties() {
    let s = start().await;
    let mut args = as_d1(&["-q", "1", "-t", "event", "-m", "<a/>"]);
    args.extend(["-D", "publish", "content-type", "text/xml"]);
    args.extend(["-D", "publish", "message-expiry-interval", "45"]);
    let run = mosquitto_pub(s.addr(), "mqttv5", &args).await;
    assert_eq!(run.code, Some(0), "{}", run.output);
    let d = next_device_event(&mut s.consumer("event/t1", 10)).await;
    assert_eq!(d.content_type().as_deref(), Some("text/xml"));
    assert_eq!(d.ttl(), Some(45_000));
    assert_eq!(d.app_property("qos"), Some(SimpleValue::Int(1)));
    d.settle(Outcome::Accepted);
}

#[tokio::test]
async fn connection_events_on_connect_and_disconnect() {
    let s = start().await;
    let mut events = s.consumer("event/t1", 10);
    let mut telemetry = s.consumer("telemetry/t1", 10);
    let run = spawn_pub(s.addr(), "mqttv311", &as_d1(&["-i", "dev-one", "-t", "t", "-m", "x"]));
    let mut causes = Vec::new();
    for _ in 0..2 {
        let d = next(&mut events).await;
        assert_eq!(d.content_type().as_deref(), Some(CONNECTION_EVENT));
        assert_eq!(d.app_property("device_id"), text("d1"));
        let json: serde_json::Value = serde_json::from_slice(&d.data()).expect("JSON body");
        assert_eq!(json["remote-id"], "dev-one");
        assert_eq!(json["source"], "hono-mqtt");
        causes.push(json["cause"].as_str().unwrap_or_default().to_owned());
        d.settle(Outcome::Accepted);
    }
    assert_eq!(causes, ["connected", "disconnected"]);
    next(&mut telemetry).await.settle(Outcome::Accepted);
    assert_success(run, "mosquitto_pub").await;
}

#[tokio::test]
async fn gateway_publishes_for_a_device_that_lists_it() {
    let s = start().await;
    let mut consumer = s.consumer("telemetry/t1", 10);
    for topic in ["t//child", "telemetry/t1/child"] {
        let args = ["-u", "gw@t1", "-P", "gwpw", "-q", "1", "-t", topic, "-m", "x"];
        let run = spawn_pub(s.addr(), "mqttv5", &args);
        let d = next(&mut consumer).await;
        assert_eq!(d.app_property("device_id"), text("child"), "{topic}");
        d.settle(Outcome::Accepted);
        assert_success(run, topic).await;
    }
}

#[tokio::test]
async fn unauthenticated_devices_only_where_adapter_and_tenant_allow() {
    let s = start_with(MqttConfig { allow_unauthenticated: true, ..Default::default() }).await;
    let mut consumer = s.consumer("telemetry/t1", 10);
    let anonymous = ["-q", "1", "-t", "t/t1/d1", "-m", "x"];
    // The tenant does not allow it yet: PUBACK "not authorized".
    let run = mosquitto_pub(s.addr(), "mqttv5", &anonymous).await;
    assert!(run.output.contains("received PUBACK (Mid: 1, RC:135)"), "{}", run.output);
    s.registry.set_allow_unauthenticated("t1", true);
    let run = spawn_pub(s.addr(), "mqttv311", &anonymous);
    let d = next(&mut consumer).await;
    assert_eq!(d.app_property("device_id"), text("d1"));
    d.settle(Outcome::Accepted);
    assert_success(run, "mosquitto_pub").await;
    // An anonymous device must name tenant and device.
    let run = mosquitto_pub(s.addr(), "mqttv5", &["-q", "1", "-t", "t", "-m", "x"]).await;
    assert!(run.output.contains("received PUBACK (Mid: 1, RC:135)"), "{}", run.output);
    // Without the adapter-level switch, anonymous CONNECTs are refused.
    let strict = start().await;
    let run = mosquitto_pub(strict.addr(), "mqttv311", &anonymous).await;
    assert_ne!(run.code, Some(0));
    assert!(run.output.contains("not authorised"), "{}", run.output);
}

// ---------------------------------------------------------------------------------------
// Flow control: no consumer means an answer at once, never a buffer

#[tokio::test]
async fn v311_telemetry_qos1_without_consumer_closes_the_connection() {
    let s = start().await;
    let run = mosquitto_pub(s.addr(), "mqttv311", &as_d1(&["-q", "1", "-t", "t", "-m", "x"])).await;
    // 3.1.1 has no negative PUBACK: the adapter closes the connection without acking.
    assert!(!run.output.contains("received PUBACK"), "{}", run.output);
    assert!(run.output.contains("The connection was lost"), "{}", run.output);
    assert_ne!(run.code, Some(0));
}

#[tokio::test]
async fn v5_telemetry_qos1_without_consumer_gets_a_negative_puback() {
    let s = start().await;
    // A consumer that never grants credit: the publish waits for it for `consumer_wait`
    // (5 s by default), then is refused as if nobody were attached.
    let _consumer = s.consumer("telemetry/t1", 0);
    let run = mosquitto_pub(s.addr(), "mqttv5", &as_d1(&["-q", "1", "-t", "t", "-m", "x"])).await;
    assert!(run.output.contains("received PUBACK (Mid: 1, RC:128)"), "{}", run.output);
    assert!(run.output.contains("no consumer for telemetry/t1"), "{}", run.output);
}

#[tokio::test]
async fn telemetry_qos0_without_consumer_is_dropped_and_counted() {
    let s = start_with(MqttConfig::default()).await;
    let run = mosquitto_pub(s.addr(), "mqttv311", &as_d1(&["-t", "t", "-m", "x"])).await;
    assert_eq!(run.code, Some(0), "{}", run.output);
    let dropped = &s.downstream.stats.dropped;
    for _ in 0..50 {
        if dropped.load(Ordering::Relaxed) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(dropped.load(Ordering::Relaxed), 1);
    s.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), s.adapter.stopped()).await.expect("stops");
}

// ---------------------------------------------------------------------------------------
// Bad input

#[tokio::test]
async fn bad_input_refused_connects() {
    // (row, version, user, password, CONNACK code = mosquitto_pub's exit code, its text)
    let rows = [
        ("wrong password", "mqttv311", "d1@t1", "nope", 0x04, "bad user name or password"),
        ("wrong password", "mqttv5", "d1@t1", "nope", 0x86, "Bad User Name or Password"),
        ("unknown tenant", "mqttv311", "d1@nope", "pw1", 0x04, "bad user name or password"),
        ("unknown tenant", "mqttv5", "d1@nope", "pw1", 0x86, "Bad User Name or Password"),
        ("username without tenant", "mqttv311", "d1", "pw1", 0x04, "bad user name or password"),
        ("disabled device", "mqttv311", "off@t1", "offpw", 0x05, "not authorised"),
        ("disabled device", "mqttv5", "off@t1", "offpw", 0x87, "Not authorized"),
        ("disabled tenant", "mqttv311", "d3@t3", "pw3", 0x05, "not authorised"),
        ("disabled tenant", "mqttv5", "d3@t3", "pw3", 0x87, "Not authorized"),
    ];
    for (row, version, user, password, code, text) in rows {
        let s = start().await;
        let args = ["-u", user, "-P", password, "-t", "t", "-m", "x"];
        let run = mosquitto_pub(s.addr(), version, &args).await;
        let row = format!("{row} ({version})");
        let output = &run.output;
        assert!(output.contains(&format!("received CONNACK ({code})")), "{row}: {output}");
        assert!(output.contains(text), "{row}: {output}");
        assert_eq!(run.code, Some(code), "{row}: exits with the CONNACK code: {output}");
    }
}

/// Hono 2.7 accepts a persistent session (as a clean one) and a Will: so does Ferrule.
#[tokio::test]
async fn persistent_sessions_and_wills_are_accepted() {
    let s = start().await;
    let mut telemetry = s.consumer("telemetry/t1", 10);
    let args = as_d1(&["-c", "-i", "sleepy", "-q", "1", "-t", "t", "-m", "kept"]);
    let run = spawn_pub(s.addr(), "mqttv311", &args);
    let d = next(&mut telemetry).await;
    assert_eq!(d.data(), b"kept");
    d.settle(Outcome::Accepted);
    let run = run.await.expect("not cancelled");
    assert!(run.output.contains("received CONNACK (0)"), "clean-session=0: {}", run.output);
    let args = as_d1(&["--will-topic", "event", "--will-payload", "bye", "-t", "t", "-m", "w"]);
    let run = mosquitto_pub(s.addr(), "mqttv311", &args).await;
    assert!(run.output.contains("received CONNACK (0)"), "will: {}", run.output);
    assert_eq!(next(&mut telemetry).await.data(), b"w");
}

/// The Will (Ferrule's extension): published as the event its topic names when the
/// connection ends without DISCONNECT, not after a DISCONNECT.
#[tokio::test]
async fn a_will_is_published_when_the_connection_is_lost() {
    let s = start().await;
    let mut events = s.consumer("event/t1", 10);
    let connect = |client_id: &'static str| {
        let mut body = Vec::new();
        string(b"MQTT", &mut body);
        // Level 4, user name + password + will (QoS 1) + clean session, keep-alive 60 s.
        body.extend_from_slice(&[4, 0xce, 0, 60]);
        for field in [client_id.as_bytes(), b"event", b"gone", b"d1@t1", b"pw1"] {
            string(field, &mut body);
        }
        packet(0x10, &body)
    };
    for (client_id, clean) in [("lost", false), ("clean", true)] {
        let mut stream = TcpStream::connect(s.addr()).await.expect("connects");
        stream.write_all(&connect(client_id)).await.expect("CONNECT");
        let mut client = RawClient { stream };
        let (header, connack) = client.read_packet().await.expect("CONNACK");
        assert_eq!((header, connack[1]), (0x20, 0), "accepted with a Will");
        if clean {
            client.stream.write_all(&[0xe0, 0]).await.expect("DISCONNECT");
        }
        drop(client);
        if clean {
            nothing_but_connection_events(&mut events).await;
        } else {
            let will = next_device_event(&mut events).await;
            assert_eq!(will.data(), b"gone", "{client_id}");
            assert_eq!(
                will.message()
                    .application_properties
                    .as_ref()
                    .and_then(|p| p.0.get("device_id"))
                    .cloned(),
                Some(fe2o3_amqp::types::primitives::SimpleValue::String("d1".into()))
            );
            will.settle(Outcome::Accepted);
        }
    }
}

/// Skips connection events for a while; fails on anything else.
async fn nothing_but_connection_events(consumer: &mut Consumer) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Some(d)) = tokio::time::timeout_at(deadline, consumer.recv()).await {
        assert_eq!(d.content_type().as_deref(), Some(CONNECTION_EVENT), "only connection events");
        d.settle(Outcome::Accepted);
    }
}

/// (row, user, password, topic, payload arguments, MQTT 5 reason code)
type RefusedPublish<'a> = (&'a str, &'a str, &'a str, &'a str, &'a [&'a str], u8);

/// Publishes that must not reach a consumer: at QoS 1, 3.1.1 closes the connection without
/// a PUBACK, 5 answers with a PUBACK with the row's reason code.
#[tokio::test]
async fn bad_input_refused_publishes() {
    let big = "x".repeat(65);
    let rows: [RefusedPublish; 5] = [
        ("gateway not in d1's via", "gw@t1", "gwpw", "t/t1/d1", &["-m", "x"], 135),
        ("foreign tenant in topic", "d1@t1", "pw1", "t/t2/d9", &["-m", "x"], 135),
        ("unknown topic", "d1@t1", "pw1", "foo/bar", &["-m", "x"], 144),
        ("payload over the max", "d1@t1", "pw1", "t", &["-m", &big], 151),
        ("empty payload without content type", "d1@t1", "pw1", "t", &["-n"], 153),
    ];
    for (row, user, password, topic, payload, reason) in rows {
        let s = start().await;
        let mut telemetry = s.consumer("telemetry/t1", 10);
        let mut foreign = s.consumer("telemetry/t2", 10);
        let args = [&["-u", user, "-P", password, "-q", "1", "-t", topic][..], payload].concat();
        let run = mosquitto_pub(s.addr(), "mqttv311", &args).await;
        assert!(!run.output.contains("received PUBACK"), "{row}: {}", run.output);
        assert!(run.output.contains("The connection was lost"), "{row}: {}", run.output);
        let run = mosquitto_pub(s.addr(), "mqttv5", &args).await;
        let puback = format!("received PUBACK (Mid: 1, RC:{reason})");
        assert!(run.output.contains(&puback), "{row}: {}", run.output);
        nothing(&mut telemetry).await;
        nothing(&mut foreign).await;
    }
}

#[tokio::test]
async fn empty_payload_with_the_empty_notification_content_type_is_fine() {
    let s = start().await;
    let mut consumer = s.consumer("telemetry/t1", 10);
    let topic = "t/?content-type=application%2Fvnd.eclipse-hono-empty-notification";
    let run = spawn_pub(s.addr(), "mqttv311", &as_d1(&["-q", "1", "-n", "-t", topic]));
    let d = next(&mut consumer).await;
    assert_eq!(
        d.content_type().as_deref(),
        Some("application/vnd.eclipse-hono-empty-notification")
    );
    assert!(d.data().is_empty());
    d.settle(Outcome::Accepted);
    assert_success(run, "mosquitto_pub").await;
}

#[tokio::test]
async fn bad_input_event_at_qos0() {
    for version in ["mqttv311", "mqttv5"] {
        let s = start().await;
        let mut events = s.consumer("event/t1", 10);
        let run =
            mosquitto_pub(s.addr(), version, &as_d1(&["-q", "0", "-t", "e", "-m", "x"])).await;
        assert_eq!(
            run.code,
            Some(0),
            "a QoS 0 publisher does not wait for an answer: {}",
            run.output
        );
        // Only the connection events arrive, not the QoS 0 event.
        for _ in 0..2 {
            let d = next(&mut events).await;
            assert_eq!(d.content_type().as_deref(), Some(CONNECTION_EVENT), "{version}");
            d.settle(Outcome::Accepted);
        }
        nothing(&mut events).await;
    }
}

#[tokio::test]
async fn v5_on_error_disconnect_gets_a_disconnect_with_reason_code() {
    let s = start().await;
    let args = as_d1(&["-q", "1", "-t", "foo/?on-error=disconnect", "-m", "x"]);
    let run = mosquitto_pub(s.addr(), "mqttv5", &args).await;
    assert!(!run.output.contains("received PUBACK"), "{}", run.output);
    assert!(run.output.contains("Received DISCONNECT (144)"), "topic name invalid: {}", run.output);
}

#[tokio::test]
async fn bad_input_qos2() {
    let s = start().await;
    let mut consumer = s.consumer("telemetry/t1", 10);
    let args = as_d1(&["-q", "2", "-t", "t", "-m", "x"]);
    let run = mosquitto_pub(s.addr(), "mqttv311", &args).await;
    assert!(!run.output.contains("received PUBREC"), "{}", run.output);
    assert!(run.output.contains("The connection was lost"), "{}", run.output);
    // MQTT 5 clients learn the maximum QoS from the CONNACK and do not even try.
    let run = mosquitto_pub(s.addr(), "mqttv5", &args).await;
    assert!(run.output.contains("QoS not supported"), "{}", run.output);
    nothing(&mut consumer).await;
}

/// A one-shot QoS 0 publisher sends PUBLISH and DISCONNECT in one segment; the device
/// look-up is slow (cache miss). The message must still be delivered, and the connection
/// must end cleanly (ntex-mqtt 9.0 panicked on a QoS 0 handler still pending at DISCONNECT).
#[tokio::test]
async fn qos0_publish_then_disconnect_while_the_registry_is_slow() {
    let s = start().await;
    let mut consumer = s.consumer("telemetry/t1", 10);
    let client = RawClient::connect(s.addr(), "one-shot", Some(("d1@t1", "pw1"))).await;
    s.registry.set_lookup_delay(Duration::from_millis(300));
    let mut stream = client.stream;
    let mut publish = Vec::new();
    string(b"telemetry", &mut publish);
    publish.extend_from_slice(b"last words");
    let mut segment = packet(0x30, &publish); // PUBLISH QoS 0
    segment.extend_from_slice(&[0xe0, 0]); // DISCONNECT
    stream.write_all(&segment).await.expect("PUBLISH + DISCONNECT");
    let delivery = next(&mut consumer).await;
    assert_eq!(delivery.data(), b"last words");
    // The adapter still serves new connections and publishes afterwards.
    s.registry.set_lookup_delay(Duration::ZERO);
    let mut again = RawClient::connect(s.addr(), "after", Some(("d1@t1", "pw1"))).await;
    again.publish("telemetry", b"after", 1).await;
    let after = next(&mut consumer).await;
    assert_eq!(after.data(), b"after");
    after.settle(Outcome::Accepted);
    assert_eq!(again.read_packet().await.map(|(h, _)| h), Some(0x40), "PUBACK");
}

/// A retained publish is taken and passed on as the annotation `x-opt-retain` (Hono).
#[tokio::test]
async fn retain_is_passed_on_as_an_annotation() {
    let s = start().await;
    let mut consumer = s.consumer("telemetry/t1", 10);
    for version in ["mqttv311", "mqttv5"] {
        let args = as_d1(&["-q", "1", "-r", "-t", "t", "-m", version]);
        let run = spawn_pub(s.addr(), version, &args);
        let d = next(&mut consumer).await;
        assert_eq!(d.data(), version.as_bytes());
        assert_eq!(annotation(&d, "x-opt-retain"), Some(Value::Bool(true)), "{version}");
        d.settle(Outcome::Accepted);
        let run = run.await.expect("not cancelled");
        assert!(run.output.contains("received PUBACK"), "{version}: {}", run.output);
    }
    let run = spawn_pub(s.addr(), "mqttv311", &as_d1(&["-q", "1", "-t", "t", "-m", "plain"]));
    let d = next(&mut consumer).await;
    assert_eq!(annotation(&d, "x-opt-retain"), None, "only when asked");
    d.settle(Outcome::Accepted);
    let run = run.await.expect("not cancelled");
    assert!(run.output.contains("received PUBACK"), "{}", run.output);
}

#[tokio::test]
async fn bad_input_malformed_packet_closes_only_that_connection() {
    let s = start().await;
    let mut consumer = s.consumer("telemetry/t1", 10);
    // A client that stays connected while the bad one comes and goes.
    let mut good = RawClient::connect(s.addr(), "steady", Some(("d1@t1", "pw1"))).await;
    let garbage: [&[u8]; 3] = [
        // CONNECT with a protocol name that is not MQTT.
        &[0x10, 0x0c, 0x00, 0x04, b'X', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x00],
        // A reserved packet type.
        &[0xf0, 0x00],
        // A remaining length that never ends.
        &[0x10, 0xff, 0xff, 0xff, 0xff, 0xff],
    ];
    for bytes in garbage {
        let mut bad = TcpStream::connect(s.addr()).await.expect("connects");
        bad.write_all(bytes).await.expect("writes");
        assert_closed(&mut bad, &format!("{bytes:?}")).await;
    }
    // After CONNECT, a PUBLISH with a wildcard topic is a protocol violation too.
    let mut bad = RawClient::connect(s.addr(), "wild", Some(("d1@t1", "pw1"))).await;
    bad.publish("t/#", b"x", 1).await;
    assert!(bad.closed().await, "connection closed after a malformed PUBLISH");

    good.publish("t", b"still here", 1).await;
    let d = next(&mut consumer).await;
    assert_eq!(d.data(), b"still here");
    d.settle(Outcome::Accepted);
    assert_eq!(good.packet_type().await, Some(4), "PUBACK");
    let run = spawn_pub(s.addr(), "mqttv5", &as_d1(&["-q", "1", "-t", "t", "-m", "y"]));
    next(&mut consumer).await.settle(Outcome::Accepted);
    assert_success(run, "mosquitto_pub").await;
}

// ---------------------------------------------------------------------------------------
// Error topic

#[tokio::test]
async fn error_topic_reports_instead_of_disconnecting() {
    let s = start().await;
    let mut client = RawClient::connect(s.addr(), "reporter", Some(("d1@t1", "pw1"))).await;
    client.send_subscribe("error///#", 0, 7).await;
    let (header, suback) = client.read_packet().await.expect("SUBACK");
    assert_eq!((header >> 4, suback), (9, vec![0, 7, 0x00]), "granted QoS 0");
    client.send_subscribe("command///req/#", 0, 8).await;
    let (_, suback) = client.read_packet().await.expect("SUBACK");
    assert_eq!(suback, vec![0, 8, 0x80], "not an error topic: refused (commands come later)");

    // No consumer: the error goes to the error topic and the publish is still acknowledged.
    client.publish("t", b"x", 21).await;
    let mut error = None;
    let mut acked = false;
    while error.is_none() || !acked {
        let (header, body) = client.read_packet().await.expect("error message and PUBACK");
        match header >> 4 {
            3 => error = Some(body),
            4 => acked = true,
            other => panic!("unexpected packet type {other}"),
        }
    }
    let error = error.unwrap_or_default();
    let topic_len = usize::from(u16::from_be_bytes([error[0], error[1]]));
    let topic = String::from_utf8_lossy(&error[2..2 + topic_len]).into_owned();
    assert_eq!(topic, "error///t/21/503");
    let json: serde_json::Value = serde_json::from_slice(&error[2 + topic_len..]).expect("JSON");
    assert_eq!(json["code"], 503);
    assert_eq!(json["correlation-id"], "21");
    assert!(json["message"].as_str().unwrap_or_default().contains("no consumer"), "{json}");
    assert!(json["timestamp"].as_str().unwrap_or_default().ends_with('Z'), "{json}");

    // The connection is still usable.
    let mut consumer = s.consumer("telemetry/t1", 10);
    publish_accepted(&mut client, &mut consumer, "t/?correlation-id=abc", b"ok", 22).await;

    // on-error=disconnect closes even with the subscription.
    client.publish("foo/?on-error=disconnect", b"x", 23).await;
    let (header, body) = client.read_packet().await.expect("error message first");
    assert_eq!(header >> 4, 3);
    assert!(String::from_utf8_lossy(&body).contains("error///foo/23/400"));
    assert!(client.closed().await);
}

#[tokio::test]
async fn a_device_disabled_while_connected_is_cut_off_even_with_an_error_subscription() {
    let s = start().await;
    let mut consumer = s.consumer("telemetry/t1", 10);
    let mut client = RawClient::connect(s.addr(), "doomed", Some(("d1@t1", "pw1"))).await;
    client.send_subscribe("e///#", 0, 1).await;
    assert_eq!(client.packet_type().await, Some(9), "SUBACK");
    publish_accepted(&mut client, &mut consumer, "t", b"before", 1).await;
    s.registry.set_device_enabled("t1", "d1", false);
    client.publish("t", b"after", 2).await;
    let (header, body) = client.read_packet().await.expect("error message");
    assert_eq!(header >> 4, 3);
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("e///t/2/404"), "{body}");
    assert_eq!(client.read_packet().await, None, "closed without a PUBACK");
    nothing(&mut consumer).await;
}

#[tokio::test]
async fn connected_clients_are_cut_off_at_their_next_publish_once_no_longer_allowed() {
    type Change = fn(&MemoryRegistry);
    // (row, user, password, topic, what changes while the client is connected)
    let rows: [(&str, &str, &str, &str, Change); 2] = [
        // Issue 17: a tenant's `adapters` list was never checked; now as for a disabled
        // tenant.
        ("tenant switched MQTT off", "d1@t1", "pw1", "t", |r| {
            r.set_adapter_enabled("t1", "hono-mqtt", false)
        }),
        // Publishing for a device it serves ends the session of a disabled gateway (the
        // device listed in `via` is still enabled).
        ("gateway disabled", "gw@t1", "gwpw", "t/t1/child", |r| {
            r.set_device_enabled("t1", "gw", false)
        }),
    ];
    for (row, user, password, topic, change) in rows {
        let s = start().await;
        let mut consumer = s.consumer("telemetry/t1", 10);
        let mut client = RawClient::connect(s.addr(), "publisher", Some((user, password))).await;
        publish_accepted(&mut client, &mut consumer, topic, b"before", 1).await;
        change(&s.registry);
        client.publish(topic, b"after", 2).await;
        assert_eq!(client.read_packet().await, None, "{row}: closed without a PUBACK");
        nothing(&mut consumer).await;
    }
}

#[tokio::test]
async fn a_tenant_that_switched_mqtt_off_is_refused_at_connect() {
    // Issue 17: a tenant's `adapters` list was never checked.
    let s = start().await;
    s.registry.set_adapter_enabled("t1", "hono-mqtt", false);
    // CONNACK 0x05 (not authorised).
    let run = mosquitto_pub(s.addr(), "mqttv311", &as_d1(&["-t", "t", "-m", "x"])).await;
    assert!(run.output.contains("received CONNACK (5)"), "{}", run.output);
    assert_eq!(run.code, Some(5), "{}", run.output);
    // Another tenant is not affected.
    let args = ["-u", "d9@t2", "-P", "pw9", "-t", "t", "-m", "x"];
    let run = mosquitto_pub(s.addr(), "mqttv311", &args).await;
    assert_eq!(run.code, Some(0), "{}", run.output);
}

// ---------------------------------------------------------------------------------------
// Scale and lifecycle

#[tokio::test]
async fn a_thousand_devices_connected_at_once_each_send_telemetry() {
    const DEVICES: usize = 1000;
    let registry = (0..DEVICES).fold(MemoryRegistry::new().tenant("t1"), |r, i| {
        r.device("t1", &format!("dev{i}"), &format!("pw{i}"))
    });
    let s: Setup = Platform::start(registry, MqttConfig::default()).await;
    let addr = s.addr();

    let mut consumer = s.consumer("telemetry/t1", DEVICES as u32);
    let collector = tokio::spawn(async move {
        let mut seen = std::collections::HashSet::new();
        while seen.len() < DEVICES {
            let d = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
                .await
                .expect("in time")
                .expect("open");
            if let Some(SimpleValue::String(device)) = d.app_property("device_id") {
                seen.insert(device);
            }
            d.settle(Outcome::Accepted);
        }
        seen
    });

    // Connect everyone first (a few at a time so the accept backlog is not the test).
    let mut clients = Vec::with_capacity(DEVICES);
    for chunk in (0..DEVICES).collect::<Vec<_>>().chunks(100) {
        let connects = chunk.iter().map(|&i| {
            tokio::spawn(async move {
                let (user, password) = (format!("dev{i}@t1"), format!("pw{i}"));
                RawClient::connect(addr, &format!("c{i}"), Some((&user, &password))).await
            })
        });
        for client in futures_join(connects).await {
            clients.push(client);
        }
    }
    assert_eq!(clients.len(), DEVICES, "all connected at once");
    // Then every device publishes one QoS 1 message and waits for its PUBACK.
    let publishes = clients.into_iter().enumerate().map(|(i, mut client)| {
        tokio::spawn(async move {
            client.publish("telemetry", format!("{{\"n\":{i}}}").as_bytes(), 1).await;
            assert_eq!(client.packet_type().await, Some(4), "PUBACK for device {i}");
            client
        })
    });
    let clients = futures_join(publishes).await;
    let seen = collector.await.expect("collector");
    assert_eq!(seen.len(), DEVICES);
    drop(clients);
}

async fn futures_join<T: Send + 'static>(
    handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for handle in handles.collect::<Vec<_>>() {
        out.push(handle.await.expect("task"));
    }
    out
}

#[tokio::test]
async fn silent_clients_are_dropped_after_the_connect_timeout() {
    let s =
        start_with(MqttConfig { connect_timeout: Duration::from_secs(1), ..Default::default() })
            .await;
    let started = std::time::Instant::now();
    let mut silent = TcpStream::connect(s.addr()).await.expect("connects");
    let mut half = TcpStream::connect(s.addr()).await.expect("connects");
    half.write_all(&[0x10, 0x20, 0x00, 0x04, b'M']).await.expect("a CONNECT that never completes");
    assert_closed(&mut silent, "silent").await;
    assert_closed(&mut half, "half a CONNECT").await;
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn bind_failure_is_returned() {
    let s = start().await;
    let config = MqttConfig { listen: s.addr(), ..Default::default() };
    let result = mqtt::start(
        config,
        Downstream::new(s.broker.clone()),
        Arc::new(s.registry.clone()),
        CancellationToken::new(),
    );
    assert!(matches!(result, Err(MqttError::Bind { .. })), "the port is taken");
}

#[tokio::test]
async fn stops_when_cancelled() {
    let s = start().await;
    let client = RawClient::connect(s.addr(), "lingering", Some(("d1@t1", "pw1"))).await;
    s.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), s.adapter.stopped())
        .await
        .expect("stopped in time");
    assert!(TcpStream::connect(s.addr()).await.is_err(), "no longer listening");
    drop(client);
}
