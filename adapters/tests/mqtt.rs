//! The MQTT adapter driven by mosquitto_pub (MQTT 3.1.1 and 5, a client nobody here
//! wrote) and, where one connection must subscribe and publish or a thousand must be open
//! at once, by a small raw MQTT 3.1.1 client below. What reaches the messaging core is
//! observed through its in-process consumer API.
//!
//! Size: one test per behaviour of the MQTT adapter (the device API, bad input, limits,
//! lifecycle); shared setup is in `support/`.

#[path = "support/raw_mqtt.rs"]
mod raw_mqtt;
mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use ferrule_adapters::mqtt::{self, MqttAdapter, MqttConfig, MqttError};
use ferrule_adapters::Downstream;
use ferrule_messaging::{Broker, Consumer, Delivery, Outcome, SubscribeOptions};
use raw_mqtt::{packet, string, RawClient};
use support::MemoryRegistry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

struct Setup {
    addr: SocketAddr,
    broker: Broker,
    registry: MemoryRegistry,
    shutdown: CancellationToken,
    adapter: MqttAdapter,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn start_with(config: MqttConfig) -> Setup {
    let registry = MemoryRegistry::new().tenant("t1").tenant("t2").tenant("t3");
    let registry = registry
        .device("t1", "d1", "pw1")
        .device("t1", "gw", "gwpw")
        .device_via("t1", "child", "", &["gw"])
        .device("t1", "off", "offpw")
        .device("t2", "d9", "pw9")
        .device("t3", "d3", "pw3");
    registry.set_device_enabled("t1", "off", false);
    registry.set_tenant_enabled("t3", false);
    let broker = Broker::in_memory(&Default::default());
    let shutdown = CancellationToken::new();
    let config = MqttConfig { listen: "127.0.0.1:0".parse().unwrap(), ..config };
    let adapter = mqtt::start(
        config,
        Downstream::new(broker.clone()),
        Arc::new(registry.clone()),
        shutdown.clone(),
    )
    .expect("adapter starts");
    Setup { addr: adapter.local_addr(), broker, registry, shutdown, adapter }
}

fn start() -> Setup {
    start_with(MqttConfig { max_payload: 64, ..Default::default() })
}

impl Setup {
    fn consumer(&self, address: &str, credit: u32) -> Consumer {
        let consumer =
            self.broker.subscribe(address, &SubscribeOptions::default()).expect("address exists");
        consumer.add_credit(credit);
        consumer
    }
}

/// The outcome of one mosquitto_pub run.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    /// stdout and stderr (with `-d`: the packets it sent and received).
    output: String,
}

/// Runs mosquitto_pub against the adapter with `-d` (packet log) and a hard time limit.
async fn mosquitto_pub(addr: SocketAddr, version: &str, args: &[&str]) -> Run {
    let mut command = Command::new("timeout");
    command.args([
        "15",
        "mosquitto_pub",
        "-d",
        "-h",
        "127.0.0.1",
        "-p",
        &addr.port().to_string(),
        "-V",
        version,
    ]);
    command.args(args);
    let output = tokio::task::spawn_blocking(move || {
        command.output().expect("mosquitto_pub (mosquitto-clients) is installed")
    })
    .await
    .expect("not cancelled");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Run { code: output.status.code(), output: text }
}

fn spawn_pub(
    addr: SocketAddr,
    version: &'static str,
    args: Vec<String>,
) -> tokio::task::JoinHandle<Run> {
    tokio::spawn(async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        mosquitto_pub(addr, version, &args).await
    })
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

async fn next(consumer: &mut Consumer) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), consumer.recv())
        .await
        .expect("a message in time")
        .expect("open")
}

/// Asserts that nothing arrives for a while (after a refused publish).
async fn nothing(consumer: &mut Consumer) {
    if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(300), consumer.recv()).await {
        panic!("unexpected message: {:?}", d.message());
    }
}

fn app(d: &Delivery, key: &str) -> Option<SimpleValue> {
    d.message().application_properties.as_ref()?.0.get(key).cloned()
}

fn text(value: &str) -> Option<SimpleValue> {
    Some(SimpleValue::String(value.into()))
}

fn annotation(d: &Delivery, key: &str) -> Option<Value> {
    let annotations = d.message().message_annotations.as_ref()?;
    annotations.0.iter().find(|(k, _)| format!("{k:?}").contains(key)).map(|(_, v)| v.clone())
}

fn content_type(d: &Delivery) -> Option<String> {
    d.message().properties.as_ref()?.content_type.as_ref().map(|c| c.as_str().to_owned())
}

fn body(d: &Delivery) -> Vec<u8> {
    match &d.message().body {
        fe2o3_amqp::types::messaging::Body::Data(batch) => {
            batch.iter().flat_map(|data| data.0.to_vec()).collect()
        }
        other => panic!("not a data body: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Telemetry and events reach the consumer with Hono's properties

async fn telemetry_arrives(version: &'static str, qos: &str) {
    let s = start();
    let mut consumer = s.consumer("telemetry/t1", 10);
    let run = spawn_pub(
        s.addr,
        version,
        strings(&[
            "-u",
            "d1@t1",
            "-P",
            "pw1",
            "-q",
            qos,
            "-t",
            "telemetry/?content-type=application%2Fjson&seq=7",
            "-m",
            "{\"temp\":5}",
        ]),
    );
    let d = next(&mut consumer).await;
    if qos == "1" {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!run.is_finished(), "no PUBACK before the consumer accepted");
    }
    assert_eq!(body(&d), b"{\"temp\":5}");
    assert_eq!(app(&d, "device_id"), text("d1"));
    assert_eq!(app(&d, "orig_adapter"), text("hono-mqtt"));
    assert_eq!(app(&d, "orig_address"), text("telemetry/?content-type=application%2Fjson&seq=7"));
    assert_eq!(app(&d, "qos"), Some(SimpleValue::Int(qos.parse().unwrap())));
    assert_eq!(app(&d, "seq"), text("7"));
    assert_eq!(annotation(&d, "tenant_id"), Some(Value::String("t1".into())));
    assert_eq!(content_type(&d).as_deref(), Some("application/json"));
    assert_eq!(
        d.message().properties.as_ref().and_then(|p| p.to.clone()).as_deref(),
        Some("telemetry/t1")
    );
    assert_eq!(d.is_presettled(), qos == "0");
    d.settle(Outcome::Accepted);
    let run = run.await.unwrap();
    assert_eq!(run.code, Some(0), "{}", run.output);
}

#[tokio::test]
async fn v311_telemetry_qos0() {
    telemetry_arrives("mqttv311", "0").await;
}

#[tokio::test]
async fn v311_telemetry_qos1() {
    telemetry_arrives("mqttv311", "1").await;
}

#[tokio::test]
async fn v5_telemetry_qos0() {
    telemetry_arrives("mqttv5", "0").await;
}

#[tokio::test]
async fn v5_telemetry_qos1() {
    telemetry_arrives("mqttv5", "1").await;
}

#[tokio::test]
async fn v311_event_qos1_with_property_bag_ttl() {
    let s = start();
    let run = mosquitto_pub(
        s.addr,
        "mqttv311",
        &["-u", "d1@t1", "-P", "pw1", "-q", "1", "-t", "e/?hono-ttl=30", "-m", "door open"],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.output);
    // Events are stored: the consumer may come after the PUBACK.
    let mut consumer = s.consumer("event/t1", 10);
    let d = loop {
        let d = next(&mut consumer).await;
        if content_type(&d).as_deref() != Some(ferrule_adapters::downstream::CONNECTION_EVENT) {
            break d;
        }
        d.settle(Outcome::Accepted);
    };
    assert_eq!(body(&d), b"door open");
    assert_eq!(app(&d, "orig_address"), text("e/?hono-ttl=30"));
    let header = d.message().header.clone().unwrap();
    assert!(header.durable);
    assert_eq!(header.ttl, Some(30_000));
    d.settle(Outcome::Accepted);
}

#[tokio::test]
async fn v5_event_qos1_with_content_type_and_expiry_properties() {
    let s = start();
    let run = mosquitto_pub(
        s.addr,
        "mqttv5",
        &[
            "-u",
            "d1@t1",
            "-P",
            "pw1",
            "-q",
            "1",
            "-t",
            "event",
            "-m",
            "<a/>",
            "-D",
            "publish",
            "content-type",
            "text/xml",
            "-D",
            "publish",
            "message-expiry-interval",
            "45",
        ],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.output);
    let mut consumer = s.consumer("event/t1", 10);
    let d = loop {
        let d = next(&mut consumer).await;
        if content_type(&d).as_deref() != Some(ferrule_adapters::downstream::CONNECTION_EVENT) {
            break d;
        }
        d.settle(Outcome::Accepted);
    };
    assert_eq!(content_type(&d).as_deref(), Some("text/xml"));
    assert_eq!(d.message().header.as_ref().and_then(|h| h.ttl), Some(45_000));
    assert_eq!(app(&d, "qos"), Some(SimpleValue::Int(1)));
    d.settle(Outcome::Accepted);
}

#[tokio::test]
async fn connection_events_on_connect_and_disconnect() {
    let s = start();
    let mut events = s.consumer("event/t1", 10);
    let mut telemetry = s.consumer("telemetry/t1", 10);
    let run = spawn_pub(
        s.addr,
        "mqttv311",
        strings(&["-u", "d1@t1", "-P", "pw1", "-i", "dev-one", "-t", "t", "-m", "x"]),
    );
    let mut causes = Vec::new();
    for _ in 0..2 {
        let d = next(&mut events).await;
        assert_eq!(
            content_type(&d).as_deref(),
            Some(ferrule_adapters::downstream::CONNECTION_EVENT)
        );
        assert_eq!(app(&d, "device_id"), text("d1"));
        let json: serde_json::Value = serde_json::from_slice(&body(&d)).expect("JSON body");
        assert_eq!(json["remote-id"], "dev-one");
        assert_eq!(json["source"], "hono-mqtt");
        causes.push(json["cause"].as_str().unwrap_or_default().to_owned());
        d.settle(Outcome::Accepted);
    }
    assert_eq!(causes, ["connected", "disconnected"]);
    next(&mut telemetry).await.settle(Outcome::Accepted);
    assert_eq!(run.await.unwrap().code, Some(0));
}

#[tokio::test]
async fn gateway_publishes_for_a_device_that_lists_it() {
    let s = start();
    let mut consumer = s.consumer("telemetry/t1", 10);
    for topic in ["t//child", "telemetry/t1/child"] {
        let run = spawn_pub(
            s.addr,
            "mqttv5",
            strings(&["-u", "gw@t1", "-P", "gwpw", "-q", "1", "-t", topic, "-m", "x"]),
        );
        let d = next(&mut consumer).await;
        assert_eq!(app(&d, "device_id"), text("child"), "{topic}");
        d.settle(Outcome::Accepted);
        let run = run.await.unwrap();
        assert_eq!(run.code, Some(0), "{topic}: {}", run.output);
    }
}

#[tokio::test]
async fn unauthenticated_devices_only_where_adapter_and_tenant_allow() {
    let s = start_with(MqttConfig { allow_unauthenticated: true, ..Default::default() });
    let mut consumer = s.consumer("telemetry/t1", 10);
    // The tenant does not allow it yet: PUBACK "not authorized".
    let run = mosquitto_pub(s.addr, "mqttv5", &["-q", "1", "-t", "t/t1/d1", "-m", "x"]).await;
    assert!(run.output.contains("received PUBACK (Mid: 1, RC:135)"), "{}", run.output);
    s.registry.set_allow_unauthenticated("t1", true);
    let run = spawn_pub(s.addr, "mqttv311", strings(&["-q", "1", "-t", "t/t1/d1", "-m", "x"]));
    let d = next(&mut consumer).await;
    assert_eq!(app(&d, "device_id"), text("d1"));
    d.settle(Outcome::Accepted);
    assert_eq!(run.await.unwrap().code, Some(0));
    // An anonymous device must name tenant and device.
    let run = mosquitto_pub(s.addr, "mqttv5", &["-q", "1", "-t", "t", "-m", "x"]).await;
    assert!(run.output.contains("received PUBACK (Mid: 1, RC:135)"), "{}", run.output);
    // Without the adapter-level switch, anonymous CONNECTs are refused.
    let strict = start();
    let run =
        mosquitto_pub(strict.addr, "mqttv311", &["-q", "1", "-t", "t/t1/d1", "-m", "x"]).await;
    assert_ne!(run.code, Some(0));
    assert!(run.output.contains("not authorised"), "{}", run.output);
}

// ---------------------------------------------------------------------------------------
// Flow control: no consumer means an answer at once, never a buffer

#[tokio::test]
async fn v311_telemetry_qos1_without_consumer_closes_the_connection() {
    let s = start();
    let run = mosquitto_pub(
        s.addr,
        "mqttv311",
        &["-u", "d1@t1", "-P", "pw1", "-q", "1", "-t", "t", "-m", "x"],
    )
    .await;
    // 3.1.1 has no negative PUBACK: the adapter closes the connection without acking.
    assert!(!run.output.contains("received PUBACK"), "{}", run.output);
    assert!(run.output.contains("The connection was lost"), "{}", run.output);
    assert_ne!(run.code, Some(0));
}

#[tokio::test]
async fn v5_telemetry_qos1_without_consumer_gets_a_negative_puback() {
    let s = start();
    // A consumer without credit is as good as none.
    let _consumer = s.consumer("telemetry/t1", 0);
    let run = mosquitto_pub(
        s.addr,
        "mqttv5",
        &["-u", "d1@t1", "-P", "pw1", "-q", "1", "-t", "t", "-m", "x"],
    )
    .await;
    assert!(run.output.contains("received PUBACK (Mid: 1, RC:128)"), "{}", run.output);
    assert!(run.output.contains("no consumer for telemetry/t1"), "{}", run.output);
}

#[tokio::test]
async fn telemetry_qos0_without_consumer_is_dropped_and_counted() {
    let s = start();
    let registry: Arc<MemoryRegistry> = Arc::new(s.registry.clone());
    let downstream = Downstream::new(s.broker.clone());
    let shutdown = CancellationToken::new();
    let config = MqttConfig { listen: "127.0.0.1:0".parse().unwrap(), ..Default::default() };
    let adapter =
        mqtt::start(config, downstream.clone(), registry, shutdown.clone()).expect("starts");
    let run = mosquitto_pub(
        adapter.local_addr(),
        "mqttv311",
        &["-u", "d1@t1", "-P", "pw1", "-t", "t", "-m", "x"],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.output);
    let dropped = &downstream.stats.dropped;
    for _ in 0..50 {
        if dropped.load(std::sync::atomic::Ordering::Relaxed) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(dropped.load(std::sync::atomic::Ordering::Relaxed), 1);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), adapter.stopped()).await.expect("stops");
}

// ---------------------------------------------------------------------------------------
// Bad input: one test per row

async fn refused_connect(version: &'static str, user: &str, password: &str, code: i32, text: &str) {
    let s = start();
    let run =
        mosquitto_pub(s.addr, version, &["-u", user, "-P", password, "-t", "t", "-m", "x"]).await;
    assert!(run.output.contains(&format!("received CONNACK ({code})")), "{}", run.output);
    assert!(run.output.contains(text), "{}", run.output);
    assert_eq!(run.code, Some(code), "mosquitto_pub exits with the CONNACK code: {}", run.output);
}

#[tokio::test]
async fn bad_input_wrong_password_v311() {
    refused_connect("mqttv311", "d1@t1", "nope", 0x04, "bad user name or password").await;
}

#[tokio::test]
async fn bad_input_wrong_password_v5() {
    refused_connect("mqttv5", "d1@t1", "nope", 0x86, "Bad User Name or Password").await;
}

#[tokio::test]
async fn bad_input_unknown_tenant() {
    refused_connect("mqttv311", "d1@nope", "pw1", 0x04, "bad user name or password").await;
    refused_connect("mqttv5", "d1@nope", "pw1", 0x86, "Bad User Name or Password").await;
}

#[tokio::test]
async fn bad_input_username_without_tenant() {
    refused_connect("mqttv311", "d1", "pw1", 0x04, "bad user name or password").await;
}

#[tokio::test]
async fn bad_input_disabled_device() {
    refused_connect("mqttv311", "off@t1", "offpw", 0x05, "not authorised").await;
    refused_connect("mqttv5", "off@t1", "offpw", 0x87, "Not authorized").await;
}

#[tokio::test]
async fn bad_input_disabled_tenant() {
    refused_connect("mqttv311", "d3@t3", "pw3", 0x05, "not authorised").await;
    refused_connect("mqttv5", "d3@t3", "pw3", 0x87, "Not authorized").await;
}

#[tokio::test]
async fn bad_input_persistent_session_and_will_v311() {
    let s = start();
    let run = mosquitto_pub(
        s.addr,
        "mqttv311",
        &["-u", "d1@t1", "-P", "pw1", "-c", "-i", "sleepy", "-t", "t", "-m", "x"],
    )
    .await;
    assert!(run.output.contains("received CONNACK (2)"), "clean-session=0: {}", run.output);
    let run = mosquitto_pub(
        s.addr,
        "mqttv311",
        &[
            "-u",
            "d1@t1",
            "-P",
            "pw1",
            "--will-topic",
            "e",
            "--will-payload",
            "bye",
            "-t",
            "t",
            "-m",
            "x",
        ],
    )
    .await;
    assert!(run.output.contains("received CONNACK (5)"), "will: {}", run.output);
}

/// A publish that must not reach the consumer; 3.1.1 QoS 1 → connection closed, no PUBACK;
/// 5 QoS 1 → PUBACK with `reason`.
async fn refused_publish(user: &str, password: &str, topic: &str, payload: &[&str], reason: u8) {
    let s = start();
    let mut telemetry = s.consumer("telemetry/t1", 10);
    let mut foreign = s.consumer("telemetry/t2", 10);
    let mut args = vec!["-u", user, "-P", password, "-q", "1", "-t", topic];
    args.extend_from_slice(payload);
    let run = mosquitto_pub(s.addr, "mqttv311", &args).await;
    assert!(!run.output.contains("received PUBACK"), "{topic}: {}", run.output);
    assert!(run.output.contains("The connection was lost"), "{topic}: {}", run.output);
    let run = mosquitto_pub(s.addr, "mqttv5", &args).await;
    assert!(
        run.output.contains(&format!("received PUBACK (Mid: 1, RC:{reason})")),
        "{topic}: {}",
        run.output
    );
    nothing(&mut telemetry).await;
    nothing(&mut foreign).await;
}

#[tokio::test]
async fn bad_input_gateway_not_in_via() {
    // d1 does not list gw in its `via`.
    refused_publish("gw@t1", "gwpw", "t/t1/d1", &["-m", "x"], 135).await;
}

#[tokio::test]
async fn bad_input_foreign_tenant_in_topic() {
    refused_publish("d1@t1", "pw1", "t/t2/d9", &["-m", "x"], 135).await;
}

#[tokio::test]
async fn bad_input_unknown_topic() {
    refused_publish("d1@t1", "pw1", "foo/bar", &["-m", "x"], 144).await;
}

#[tokio::test]
async fn bad_input_payload_over_the_max() {
    let big = "x".repeat(65);
    refused_publish("d1@t1", "pw1", "t", &["-m", &big], 151).await;
}

#[tokio::test]
async fn bad_input_empty_payload_without_content_type() {
    refused_publish("d1@t1", "pw1", "t", &["-n"], 153).await;
    // With the empty-notification content type it is fine.
    let s = start();
    let mut consumer = s.consumer("telemetry/t1", 10);
    let run = spawn_pub(
        s.addr,
        "mqttv311",
        strings(&[
            "-u",
            "d1@t1",
            "-P",
            "pw1",
            "-q",
            "1",
            "-n",
            "-t",
            "t/?content-type=application%2Fvnd.eclipse-hono-empty-notification",
        ]),
    );
    let d = next(&mut consumer).await;
    assert_eq!(
        content_type(&d).as_deref(),
        Some("application/vnd.eclipse-hono-empty-notification")
    );
    assert!(body(&d).is_empty());
    d.settle(Outcome::Accepted);
    assert_eq!(run.await.unwrap().code, Some(0));
}

#[tokio::test]
async fn bad_input_event_at_qos0() {
    for version in ["mqttv311", "mqttv5"] {
        let s = start();
        let mut events = s.consumer("event/t1", 10);
        let run = mosquitto_pub(
            s.addr,
            version,
            &["-u", "d1@t1", "-P", "pw1", "-q", "0", "-t", "e", "-m", "x"],
        )
        .await;
        assert_eq!(
            run.code,
            Some(0),
            "a QoS 0 publisher does not wait for an answer: {}",
            run.output
        );
        // Only the connection events arrive, not the QoS 0 event.
        for _ in 0..2 {
            let d = next(&mut events).await;
            assert_eq!(
                content_type(&d).as_deref(),
                Some(ferrule_adapters::downstream::CONNECTION_EVENT),
                "{version}"
            );
            d.settle(Outcome::Accepted);
        }
        nothing(&mut events).await;
    }
}

#[tokio::test]
async fn v5_on_error_disconnect_gets_a_disconnect_with_reason_code() {
    let s = start();
    let run = mosquitto_pub(
        s.addr,
        "mqttv5",
        &["-u", "d1@t1", "-P", "pw1", "-q", "1", "-t", "foo/?on-error=disconnect", "-m", "x"],
    )
    .await;
    assert!(!run.output.contains("received PUBACK"), "{}", run.output);
    assert!(run.output.contains("Received DISCONNECT (144)"), "topic name invalid: {}", run.output);
}

#[tokio::test]
async fn bad_input_qos2() {
    let s = start();
    let mut consumer = s.consumer("telemetry/t1", 10);
    let run = mosquitto_pub(
        s.addr,
        "mqttv311",
        &["-u", "d1@t1", "-P", "pw1", "-q", "2", "-t", "t", "-m", "x"],
    )
    .await;
    assert!(!run.output.contains("received PUBREC"), "{}", run.output);
    assert!(run.output.contains("The connection was lost"), "{}", run.output);
    // MQTT 5 clients learn the maximum QoS from the CONNACK and do not even try.
    let run = mosquitto_pub(
        s.addr,
        "mqttv5",
        &["-u", "d1@t1", "-P", "pw1", "-q", "2", "-t", "t", "-m", "x"],
    )
    .await;
    assert!(run.output.contains("QoS not supported"), "{}", run.output);
    nothing(&mut consumer).await;
}

/// A one-shot QoS 0 publisher sends PUBLISH and DISCONNECT in one segment; the device
/// look-up is slow (cache miss). The message must still be delivered, and the connection
/// must end cleanly (ntex-mqtt 9.0 panicked on a QoS 0 handler still pending at DISCONNECT).
#[tokio::test]
async fn qos0_publish_then_disconnect_while_the_registry_is_slow() {
    let s = start();
    let mut consumer = s.consumer("telemetry/t1", 10);
    let client = RawClient::connect(s.addr, "one-shot", Some(("d1@t1", "pw1"))).await;
    s.registry.set_lookup_delay(Duration::from_millis(300));
    let mut stream = client.stream;
    let mut publish = Vec::new();
    string(b"telemetry", &mut publish);
    publish.extend_from_slice(b"last words");
    let mut segment = packet(0x30, &publish); // PUBLISH QoS 0
    segment.extend_from_slice(&[0xe0, 0]); // DISCONNECT
    stream.write_all(&segment).await.expect("PUBLISH + DISCONNECT");
    let delivery = next(&mut consumer).await;
    assert_eq!(body(&delivery), b"last words");
    // The adapter still serves new connections and publishes afterwards.
    s.registry.set_lookup_delay(Duration::ZERO);
    let mut again = RawClient::connect(s.addr, "after", Some(("d1@t1", "pw1"))).await;
    again.publish("telemetry", b"after", 1).await;
    let after = next(&mut consumer).await;
    assert_eq!(body(&after), b"after");
    after.settle(Outcome::Accepted);
    assert_eq!(again.read_packet().await.map(|(h, _)| h), Some(0x40), "PUBACK");
}

#[tokio::test]
async fn bad_input_retain() {
    let s = start();
    let mut consumer = s.consumer("telemetry/t1", 10);
    let run = mosquitto_pub(
        s.addr,
        "mqttv311",
        &["-u", "d1@t1", "-P", "pw1", "-q", "1", "-r", "-t", "t", "-m", "x"],
    )
    .await;
    assert!(!run.output.contains("received PUBACK"), "{}", run.output);
    assert!(run.output.contains("The connection was lost"), "{}", run.output);
    // mosquitto_pub honours "retain not available" from the MQTT 5 CONNACK and clears the
    // flag, so a raw client sends what it may not: a retained QoS 0 publish.
    let mut stream = TcpStream::connect(s.addr).await.expect("connects");
    let mut body = Vec::new();
    string(b"MQTT", &mut body);
    body.extend_from_slice(&[5, 0xc2, 0, 60, 0]); // level 5, clean start + user + password, keep-alive, no properties
    for field in [&b"raw5"[..], b"d1@t1", b"pw1"] {
        string(field, &mut body);
    }
    stream.write_all(&packet(0x10, &body)).await.expect("CONNECT");
    let mut client = RawClient { stream };
    let (header, connack) = client.read_packet().await.expect("CONNACK");
    assert_eq!((header, connack[1]), (0x20, 0), "accepted");
    let mut body = Vec::new();
    string(b"t", &mut body);
    body.push(0); // no properties
    body.extend_from_slice(b"x");
    client.stream.write_all(&packet(0x31, &body)).await.expect("PUBLISH QoS 0, retain");
    let (header, disconnect) = client.read_packet().await.expect("DISCONNECT");
    assert_eq!(
        (header, disconnect.first().copied()),
        (0xe0, Some(0x9a)),
        "DISCONNECT retain not supported"
    );
    nothing(&mut consumer).await;
}

#[tokio::test]
async fn bad_input_malformed_packet_closes_only_that_connection() {
    let s = start();
    let mut consumer = s.consumer("telemetry/t1", 10);
    // A client that stays connected while the bad one comes and goes.
    let mut good = RawClient::connect(s.addr, "steady", Some(("d1@t1", "pw1"))).await;
    let garbage: [&[u8]; 3] = [
        // CONNECT with a protocol name that is not MQTT.
        &[0x10, 0x0c, 0x00, 0x04, b'X', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x00],
        // A reserved packet type.
        &[0xf0, 0x00],
        // A remaining length that never ends.
        &[0x10, 0xff, 0xff, 0xff, 0xff, 0xff],
    ];
    for bytes in garbage {
        let mut bad = TcpStream::connect(s.addr).await.expect("connects");
        bad.write_all(bytes).await.expect("writes");
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(10), bad.read(&mut buf))
            .await
            .expect("closed in time");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "{bytes:?}: the server closes the connection, got {read:?}"
        );
    }
    // After CONNECT, a PUBLISH with a wildcard topic is a protocol violation too.
    let mut bad = RawClient::connect(s.addr, "wild", Some(("d1@t1", "pw1"))).await;
    bad.publish("t/#", b"x", 1).await;
    assert!(bad.closed().await, "connection closed after a malformed PUBLISH");

    good.publish("t", b"still here", 1).await;
    let d = next(&mut consumer).await;
    assert_eq!(body(&d), b"still here");
    d.settle(Outcome::Accepted);
    assert_eq!(good.read_packet().await.map(|p| p.0 >> 4), Some(4), "PUBACK");
    let run = spawn_pub(
        s.addr,
        "mqttv5",
        strings(&["-u", "d1@t1", "-P", "pw1", "-q", "1", "-t", "t", "-m", "y"]),
    );
    next(&mut consumer).await.settle(Outcome::Accepted);
    assert_eq!(run.await.unwrap().code, Some(0));
}

// ---------------------------------------------------------------------------------------
// Error topic

#[tokio::test]
async fn error_topic_reports_instead_of_disconnecting() {
    let s = start();
    let mut client = RawClient::connect(s.addr, "reporter", Some(("d1@t1", "pw1"))).await;
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
    client.publish("t/?correlation-id=abc", b"ok", 22).await;
    next(&mut consumer).await.settle(Outcome::Accepted);
    assert_eq!(client.read_packet().await.map(|p| p.0 >> 4), Some(4));

    // on-error=disconnect closes even with the subscription.
    client.publish("foo/?on-error=disconnect", b"x", 23).await;
    let (header, body) = client.read_packet().await.expect("error message first");
    assert_eq!(header >> 4, 3);
    assert!(String::from_utf8_lossy(&body).contains("error///foo/23/400"));
    assert!(client.closed().await);
}

#[tokio::test]
async fn a_device_disabled_while_connected_is_cut_off_even_with_an_error_subscription() {
    let s = start();
    let mut consumer = s.consumer("telemetry/t1", 10);
    let mut client = RawClient::connect(s.addr, "doomed", Some(("d1@t1", "pw1"))).await;
    client.send_subscribe("e///#", 0, 1).await;
    assert_eq!(client.read_packet().await.map(|p| p.0 >> 4), Some(9), "SUBACK");
    client.publish("t", b"before", 1).await;
    next(&mut consumer).await.settle(Outcome::Accepted);
    assert_eq!(client.read_packet().await.map(|p| p.0 >> 4), Some(4), "PUBACK");
    s.registry.set_device_enabled("t1", "d1", false);
    client.publish("t", b"after", 2).await;
    let (header, body) = client.read_packet().await.expect("error message");
    assert_eq!(header >> 4, 3);
    assert!(
        String::from_utf8_lossy(&body).contains("e///t/2/404"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(client.read_packet().await, None, "closed without a PUBACK");
    nothing(&mut consumer).await;
}

#[tokio::test]
async fn a_tenant_that_switched_mqtt_off_is_refused_at_connect_and_cut_off_when_connected() {
    // Issue 17: a tenant's `adapters` list was never checked.
    let s = start();
    let mut consumer = s.consumer("telemetry/t1", 10);
    let mut client = RawClient::connect(s.addr, "on", Some(("d1@t1", "pw1"))).await;
    client.publish("t", b"while on", 1).await;
    next(&mut consumer).await.settle(Outcome::Accepted);
    assert_eq!(client.read_packet().await.map(|p| p.0 >> 4), Some(4), "PUBACK");
    s.registry.set_adapter_enabled("t1", "hono-mqtt", false);
    // Connected: the next publish ends the session (as for a disabled tenant).
    client.publish("t", b"after", 2).await;
    assert_eq!(client.read_packet().await, None, "closed without a PUBACK");
    nothing(&mut consumer).await;
    // A new connection is refused: CONNACK 0x05 (not authorised).
    let run =
        mosquitto_pub(s.addr, "mqttv311", &["-u", "d1@t1", "-P", "pw1", "-t", "t", "-m", "x"])
            .await;
    assert!(run.output.contains("received CONNACK (5)"), "{}", run.output);
    assert_eq!(run.code, Some(5), "{}", run.output);
    // Another tenant is not affected.
    let run =
        mosquitto_pub(s.addr, "mqttv311", &["-u", "d9@t2", "-P", "pw9", "-t", "t", "-m", "x"])
            .await;
    assert_eq!(run.code, Some(0), "{}", run.output);
}

#[tokio::test]
async fn a_gateway_disabled_while_connected_is_cut_off_at_its_next_publish_for_a_device() {
    let s = start();
    let mut consumer = s.consumer("telemetry/t1", 10);
    let mut client = RawClient::connect(s.addr, "gw-client", Some(("gw@t1", "gwpw"))).await;
    client.publish("t/t1/child", b"before", 1).await;
    next(&mut consumer).await.settle(Outcome::Accepted);
    assert_eq!(client.read_packet().await.map(|p| p.0 >> 4), Some(4), "PUBACK");
    // The gateway itself is disabled: publishing for a device it serves ends its session
    // (the device listed in `via` is still enabled).
    s.registry.set_device_enabled("t1", "gw", false);
    client.publish("t/t1/child", b"after", 2).await;
    assert_eq!(client.read_packet().await, None, "closed without a PUBACK");
    nothing(&mut consumer).await;
}

// ---------------------------------------------------------------------------------------
// Scale and lifecycle

#[tokio::test]
async fn a_thousand_devices_connected_at_once_each_send_telemetry() {
    const DEVICES: usize = 1000;
    let registry = MemoryRegistry::new().tenant("t1");
    let registry =
        (0..DEVICES).fold(registry, |r, i| r.device("t1", &format!("dev{i}"), &format!("pw{i}")));
    let broker = Broker::in_memory(&Default::default());
    let shutdown = CancellationToken::new();
    let _guard = shutdown.clone().drop_guard();
    let config = MqttConfig { listen: "127.0.0.1:0".parse().unwrap(), ..Default::default() };
    let adapter =
        mqtt::start(config, Downstream::new(broker.clone()), Arc::new(registry), shutdown.clone())
            .expect("starts");
    let addr = adapter.local_addr();

    let mut consumer =
        broker.subscribe("telemetry/t1", &SubscribeOptions::default()).expect("consumer");
    consumer.add_credit(DEVICES as u32);
    let collector = tokio::spawn(async move {
        let mut seen = std::collections::HashSet::new();
        while seen.len() < DEVICES {
            let d = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
                .await
                .expect("in time")
                .expect("open");
            if let Some(SimpleValue::String(device)) = app(&d, "device_id") {
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
            let ack = client.read_packet().await;
            assert_eq!(ack.map(|p| p.0 >> 4), Some(4), "PUBACK for device {i}");
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
        start_with(MqttConfig { connect_timeout: Duration::from_secs(1), ..Default::default() });
    let started = std::time::Instant::now();
    let mut silent = TcpStream::connect(s.addr).await.expect("connects");
    let mut half = TcpStream::connect(s.addr).await.expect("connects");
    half.write_all(&[0x10, 0x20, 0x00, 0x04, b'M']).await.expect("a CONNECT that never completes");
    for stream in [&mut silent, &mut half] {
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("closed in time");
        assert!(matches!(read, Ok(0) | Err(_)), "closed, got {read:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn bind_failure_is_returned() {
    let s = start();
    let config = MqttConfig { listen: s.addr, ..Default::default() };
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
    let s = start();
    let client = RawClient::connect(s.addr, "lingering", Some(("d1@t1", "pw1"))).await;
    s.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), s.adapter.stopped())
        .await
        .expect("stopped in time");
    assert!(TcpStream::connect(s.addr).await.is_err(), "no longer listening");
    drop(client);
}
