//! Commands over MQTT, end to end over real sockets: the application side is the
//! messaging core's in-process API (`command/t1`, `command_response/t1/app`,
//! `event/t1` for `ttd` notifications) with the real command router installed; the
//! device side is mosquitto_sub / mosquitto_pub, or a small raw MQTT 3.1.1 client where
//! the test must control PUBACKs or hold many connections.

#[path = "support/raw_mqtt.rs"]
mod raw_mqtt;
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fe2o3_amqp::types::messaging::{Body, MessageId, Properties};
use fe2o3_amqp::types::primitives::SimpleValue;
use ferrule_adapters::mqtt::{self, MqttAdapter, MqttConfig};
use ferrule_adapters::Downstream;
use ferrule_command_control::RequestId;
use ferrule_messaging::message::data_message;
use ferrule_messaging::{Broker, Consumer, Delivery, Message, Outcome, SubscribeOptions};
use raw_mqtt::RawClient;
use support::MemoryRegistry;
use tokio_util::sync::CancellationToken;

const EMPTY_NOTIFICATION: &str = "application/vnd.eclipse-hono-empty-notification";

struct Platform {
    addr: SocketAddr,
    broker: Broker,
    registry: MemoryRegistry,
    shutdown: CancellationToken,
    _adapter: MqttAdapter,
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Platform {
    fn start(config: MqttConfig, devices: usize) -> Self {
        let mut registry = MemoryRegistry::new()
            .tenant("t1")
            .device("t1", "d1", "pw1")
            .device("t1", "gw", "gwpw")
            .device_via("t1", "child", "", &["gw"]);
        for i in 0..devices {
            registry = registry.device("t1", &format!("dev-{i}"), "pw");
        }
        let (broker, router) = support::broker_with_commands(&registry);
        let shutdown = CancellationToken::new();
        let config = MqttConfig { listen: "127.0.0.1:0".parse().unwrap(), ..config };
        let adapter = mqtt::start_with_commands(
            config,
            Downstream::new(broker.clone()),
            Arc::new(registry.clone()),
            Some(router),
            shutdown.clone(),
        )
        .expect("adapter starts");
        Platform { addr: adapter.local_addr(), broker, registry, shutdown, _adapter: adapter }
    }

    fn consumer(&self, address: &str, credit: u32) -> Consumer {
        let consumer =
            self.broker.subscribe(address, &SubscribeOptions::default()).expect("address exists");
        consumer.add_credit(credit);
        consumer
    }

    /// Sends a command as the application; resolves to its disposition.
    fn send(&self, message: Message) -> tokio::task::JoinHandle<Outcome> {
        let submission = self.broker.submit("command/t1", message, false);
        tokio::spawn(submission.outcome())
    }
}

/// A command as an application sends it (`reply`: request/response to
/// `command_response/t1/REPLY`, else one-way).
fn command(
    device: &str,
    name: &str,
    reply: Option<&str>,
    correlation: &str,
    payload: &str,
) -> Message {
    let mut m = data_message(payload.as_bytes().to_vec());
    m.properties = Some(Properties {
        to: Some(format!("command/t1/{device}")),
        subject: Some(name.into()),
        message_id: Some(MessageId::String(correlation.into())),
        reply_to: reply.map(|r| format!("command_response/t1/{r}")),
        content_type: Some("text/plain".into()),
        ..Default::default()
    });
    m
}

async fn next(consumer: &mut Consumer) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), consumer.recv())
        .await
        .expect("a message in time")
        .expect("open")
}

fn app(d: &Delivery, key: &str) -> Option<SimpleValue> {
    d.message().application_properties.as_ref()?.0.get(key).cloned()
}

fn body(d: &Delivery) -> Vec<u8> {
    match &d.message().body {
        Body::Data(batch) => batch.iter().flat_map(|data| data.0.to_vec()).collect(),
        other => panic!("not a data body: {other:?}"),
    }
}

fn correlation(d: &Delivery) -> Option<MessageId> {
    d.message().properties.as_ref()?.correlation_id.clone()
}

/// The next `ttd` notification for `device` on `event/t1` (connection events skipped).
async fn ttd(events: &mut Consumer, device: &str) -> i32 {
    loop {
        let d = next(events).await;
        let content_type = d.message().properties.as_ref().and_then(|p| p.content_type.clone());
        let wanted = content_type.as_ref().map(|c| c.as_str()) == Some(EMPTY_NOTIFICATION)
            && app(&d, "device_id") == Some(SimpleValue::String(device.into()));
        let ttd = app(&d, "ttd");
        let adapter = app(&d, "orig_adapter");
        d.settle(Outcome::Accepted);
        if wanted {
            assert_eq!(adapter, Some(SimpleValue::String("hono-mqtt".into())));
            match ttd {
                Some(SimpleValue::Int(ttd)) => return ttd,
                other => panic!("ttd {other:?}"),
            }
        }
    }
}

/// Runs a mosquitto client (`mosquitto_sub` / `mosquitto_pub`) with a hard time limit;
/// returns exit code and stdout.
fn mosquitto(
    addr: SocketAddr,
    tool: &'static str,
    version: &'static str,
    args: &[&str],
) -> tokio::task::JoinHandle<(Option<i32>, String)> {
    let mut command = Command::new("timeout");
    command.args(["20", tool, "-h", "127.0.0.1", "-p", &addr.port().to_string(), "-V", version]);
    command.args(args);
    tokio::task::spawn_blocking(move || {
        let output = command.output().expect("mosquitto-clients is installed");
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        (output.status.code(), text)
    })
}

// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn request_response_with_a_device_subscription_and_ttd_notifications() {
    let p = Platform::start(MqttConfig::default(), 0);
    let mut events = p.consumer("event/t1", 100);
    let mut responses = p.consumer("command_response/t1/app", 10);
    let sub = mosquitto(
        p.addr,
        "mosquitto_sub",
        "mqttv311",
        &["-u", "d1@t1", "-P", "pw1", "-q", "1", "-t", "command///req/#", "-v", "-C", "1"],
    );
    assert_eq!(ttd(&mut events, "d1").await, -1, "subscribed");

    let outcome = p.send(command("d1", "light", Some("app"), "corr-1", "on"));
    let (code, printed) = sub.await.unwrap();
    assert_eq!(code, Some(0), "{printed}");
    // QoS 1 subscription: accepted once mosquitto_sub acknowledged.
    assert_eq!(outcome.await.unwrap(), Outcome::Accepted);
    let (topic, payload) = printed.trim().split_once(' ').expect("topic and payload");
    assert_eq!(payload, "on");
    let request_id = topic
        .strip_prefix("command///req/")
        .and_then(|rest| rest.strip_suffix("/light"))
        .expect(topic);
    assert!(!request_id.is_empty(), "request/response commands carry a request id");
    // mosquitto_sub disconnected after its one message.
    assert_eq!(ttd(&mut events, "d1").await, 0, "connection gone");

    let topic = format!("command///res/{request_id}/200");
    let answer = mosquitto(
        p.addr,
        "mosquitto_pub",
        "mqttv311",
        &["-u", "d1@t1", "-P", "pw1", "-q", "1", "-t", &topic, "-m", "done"],
    );
    let response = next(&mut responses).await;
    assert_eq!(correlation(&response), Some(MessageId::String("corr-1".into())));
    assert_eq!(app(&response, "status"), Some(SimpleValue::Int(200)));
    assert_eq!(app(&response, "device_id"), Some(SimpleValue::String("d1".into())));
    assert_eq!(body(&response), b"done");
    response.settle(Outcome::Accepted);
    let (code, printed) = answer.await.unwrap();
    assert_eq!(code, Some(0), "PUBACK once the application accepted: {printed}");
}

#[tokio::test]
async fn one_way_command_on_the_short_topic_at_qos0() {
    let p = Platform::start(MqttConfig::default(), 0);
    let mut events = p.consumer("event/t1", 100);
    let sub = mosquitto(
        p.addr,
        "mosquitto_sub",
        "mqttv5",
        &["-u", "d1@t1", "-P", "pw1", "-q", "0", "-t", "c///q/#", "-v", "-C", "1"],
    );
    assert_eq!(ttd(&mut events, "d1").await, -1);
    let outcome = p.send(command("d1", "reboot", None, "c-2", "now"));
    assert_eq!(outcome.await.unwrap(), Outcome::Accepted, "QoS 0: accepted once written");
    let (code, printed) = sub.await.unwrap();
    assert_eq!(code, Some(0), "{printed}");
    assert_eq!(printed.trim(), "c///q//reboot now", "one-way: empty request id");
}

#[tokio::test]
async fn gateway_subscribed_for_all_its_devices() {
    let p = Platform::start(MqttConfig::default(), 0);
    let mut events = p.consumer("event/t1", 100);
    let mut responses = p.consumer("command_response/t1/app", 10);
    let sub = mosquitto(
        p.addr,
        "mosquitto_sub",
        "mqttv5",
        &["-u", "gw@t1", "-P", "gwpw", "-q", "1", "-t", "command//+/req/#", "-v", "-C", "1"],
    );
    assert_eq!(ttd(&mut events, "gw").await, -1);

    // d1 does not list gw in via: nobody to deliver to.
    assert_eq!(p.send(command("d1", "light", None, "x", "on")).await.unwrap(), Outcome::Released);
    let outcome = p.send(command("child", "light", Some("app"), "corr-gw", "off"));
    let (code, printed) = sub.await.unwrap();
    assert_eq!(code, Some(0), "{printed}");
    assert_eq!(outcome.await.unwrap(), Outcome::Accepted);
    let (topic, payload) = printed.trim().split_once(' ').expect("topic and payload");
    assert_eq!(payload, "off");
    let request_id = topic
        .strip_prefix("command//child/req/")
        .and_then(|r| r.strip_suffix("/light"))
        .expect(topic);

    let topic = format!("command//child/res/{request_id}/204");
    let answer = mosquitto(
        p.addr,
        "mosquitto_pub",
        "mqttv5",
        &[
            "-u",
            "gw@t1",
            "-P",
            "gwpw",
            "-q",
            "1",
            "-t",
            &topic,
            "-n",
            "-D",
            "publish",
            "content-type",
            "application/vnd.empty",
        ],
    );
    let response = next(&mut responses).await;
    assert_eq!(correlation(&response), Some(MessageId::String("corr-gw".into())));
    assert_eq!(app(&response, "status"), Some(SimpleValue::Int(204)));
    assert_eq!(app(&response, "device_id"), Some(SimpleValue::String("child".into())));
    let content_type = response.message().properties.as_ref().and_then(|p| p.content_type.clone());
    assert_eq!(
        content_type.as_ref().map(|c| c.as_str()),
        Some("application/vnd.empty"),
        "MQTT 5 content type"
    );
    response.settle(Outcome::Accepted);
    let (code, printed) = answer.await.unwrap();
    assert_eq!(code, Some(0), "{printed}");
}

#[tokio::test]
async fn device_not_subscribed_is_released_and_malformed_is_rejected() {
    let p = Platform::start(MqttConfig::default(), 0);
    assert_eq!(
        p.send(command("d1", "light", Some("app"), "c", "on")).await.unwrap(),
        Outcome::Released
    );
    let mut no_subject = command("d1", "light", None, "c", "on");
    no_subject.properties.as_mut().unwrap().subject = None;
    assert!(matches!(p.send(no_subject).await.unwrap(), Outcome::Rejected { .. }));
}

#[tokio::test]
async fn qos1_subscription_without_puback_is_released_after_the_timeout() {
    let timeout = Duration::from_millis(500);
    let p = Platform::start(MqttConfig { command_ack_timeout: timeout, ..Default::default() }, 0);
    let mut device = RawClient::connect(p.addr, "silent", Some(("d1@t1", "pw1"))).await;
    assert_eq!(device.subscribe("command///req/#", 1, 1).await, 1, "granted QoS 1");
    let started = Instant::now();
    let outcome = p.send(command("d1", "light", Some("app"), "c", "on"));
    let publish = device.next_publish().await.expect("the command arrives");
    assert!(
        publish.topic.starts_with("command///req/") && publish.topic.ends_with("/light"),
        "{}",
        publish.topic
    );
    assert_eq!(publish.packet_id.map(|_| ()), Some(()), "sent at QoS 1");
    // No PUBACK from the device.
    assert_eq!(outcome.await.unwrap(), Outcome::Released);
    assert!(
        started.elapsed() >= timeout,
        "released only after the timeout ({:?})",
        started.elapsed()
    );
}

#[tokio::test]
async fn unsubscribe_and_disconnect_announce_ttd_0() {
    let p = Platform::start(MqttConfig::default(), 0);
    let mut events = p.consumer("event/t1", 100);
    let mut device = RawClient::connect(p.addr, "d1", Some(("d1@t1", "pw1"))).await;
    assert_eq!(device.subscribe("c///q/#", 0, 1).await, 0, "granted QoS 0");
    assert_eq!(ttd(&mut events, "d1").await, -1);
    device.unsubscribe("c///q/#", 2).await;
    assert_eq!(ttd(&mut events, "d1").await, 0);
    assert_eq!(
        p.send(command("d1", "light", None, "c", "on")).await.unwrap(),
        Outcome::Released,
        "unsubscribed"
    );
    assert_eq!(device.subscribe("command///req/#", 1, 3).await, 1);
    assert_eq!(ttd(&mut events, "d1").await, -1);
    drop(device);
    assert_eq!(ttd(&mut events, "d1").await, 0);
}

#[tokio::test]
async fn forbidden_filters_and_malformed_responses() {
    let p = Platform::start(MqttConfig::default(), 0);
    let mut device = RawClient::connect(p.addr, "d1", Some(("d1@t1", "pw1"))).await;
    // Another tenant, and a device that does not list d1 as its gateway.
    assert_eq!(device.subscribe("command/t2//req/#", 1, 1).await, 0x80);
    assert_eq!(device.subscribe("command//child/req/#", 1, 2).await, 0x80);
    // A response with a status that is not a number: without an error subscription the
    // connection is closed (as for a malformed telemetry topic).
    device.publish("command///res/AAAx/abc", b"", 3).await;
    assert!(device.closed().await);
    let mut device = RawClient::connect(p.addr, "d1b", Some(("d1@t1", "pw1"))).await;
    device.publish("command///res/!!/200", b"", 4).await;
    assert!(device.closed().await, "malformed request id");
}

#[tokio::test]
async fn gateway_subscribed_for_one_device_gets_its_commands_on_the_short_topic() {
    let p = Platform::start(MqttConfig::default(), 0);
    let mut gateway = RawClient::connect(p.addr, "gw", Some(("gw@t1", "gwpw"))).await;
    assert_eq!(gateway.subscribe("c//child/q/#", 0, 1).await, 0);
    let wildcard = p.send(command("child", "a+b", None, "c", "on"));
    assert!(matches!(wildcard.await.unwrap(), Outcome::Rejected { .. }), "not a topic level");
    let outcome = p.send(command("child", "light", None, "c", "on"));
    let publish = gateway.next_publish().await.expect("the command arrives");
    assert_eq!(
        (publish.topic.as_str(), publish.packet_id, &publish.payload[..]),
        ("c//child/q//light", None, &b"on"[..])
    );
    assert_eq!(outcome.await.unwrap(), Outcome::Accepted);
    assert_eq!(
        p.send(command("gw", "light", None, "c", "on")).await.unwrap(),
        Outcome::Released,
        "only child's commands"
    );
}

#[tokio::test]
async fn unauthenticated_devices_cannot_subscribe_to_commands() {
    let p = Platform::start(MqttConfig { allow_unauthenticated: true, ..Default::default() }, 0);
    p.registry.set_allow_unauthenticated("t1", true);
    let mut device = RawClient::connect(p.addr, "anon", None).await;
    assert_eq!(device.subscribe("command/t1/d1/req/#", 1, 1).await, 0x80);
    assert_eq!(device.subscribe("command///req/#", 1, 2).await, 0x80);
    assert_eq!(p.send(command("d1", "light", None, "c", "on")).await.unwrap(), Outcome::Released);
}

#[tokio::test]
async fn v5_responses_nobody_waits_for_or_not_allowed_get_a_negative_puback() {
    let p = Platform::start(MqttConfig::default(), 0);
    let request_id =
        RequestId { correlation_id: MessageId::String("x".into()), reply_id: "nobody".into() }
            .encode()
            .unwrap();
    let topic = format!("command///res/{request_id}/200");
    let args = ["-d", "-u", "d1@t1", "-P", "pw1", "-q", "1", "-t", topic.as_str(), "-m", "late"];
    let (_, printed) = mosquitto(p.addr, "mosquitto_pub", "mqttv5", &args).await.unwrap();
    assert!(
        printed.contains("received PUBACK (Mid: 1, RC:128)"),
        "no application waiting: {printed}"
    );
    // d1 does not list gw in via.
    let topic = format!("command//d1/res/{request_id}/200");
    let args = ["-d", "-u", "gw@t1", "-P", "gwpw", "-q", "1", "-t", topic.as_str(), "-m", "x"];
    let (_, printed) = mosquitto(p.addr, "mosquitto_pub", "mqttv5", &args).await.unwrap();
    assert!(printed.contains("received PUBACK (Mid: 1, RC:135)"), "gateway not in via: {printed}");
}

#[tokio::test]
async fn a_hundred_devices_with_ten_commands_each_all_answered_once() {
    const DEVICES: usize = 100;
    const COMMANDS: usize = 10;
    let p = Platform::start(MqttConfig::default(), DEVICES);
    let mut responses = p.consumer("command_response/t1/app", (DEVICES * COMMANDS) as u32);
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        let id = format!("dev-{i}");
        let mut client = RawClient::connect(p.addr, &id, Some((&format!("{id}@t1"), "pw"))).await;
        assert_eq!(client.subscribe("command///req/#", 1, 1).await, 1);
        devices.push(tokio::spawn(echo(client, id)));
    }
    let mut outcomes = Vec::new();
    for i in 0..DEVICES {
        for j in 0..COMMANDS {
            let tag = format!("dev-{i}/{j}");
            outcomes.push(p.send(command(&format!("dev-{i}"), "echo", Some("app"), &tag, &tag)));
        }
    }
    let mut answered: HashMap<String, usize> = HashMap::new();
    for _ in 0..DEVICES * COMMANDS {
        let d = next(&mut responses).await;
        let Some(MessageId::String(tag)) = correlation(&d) else { panic!("correlation id") };
        let device = tag.split('/').next().unwrap().to_owned();
        assert_eq!(
            String::from_utf8(body(&d)).unwrap(),
            format!("{device} {tag}"),
            "answered by the right device"
        );
        assert_eq!(app(&d, "device_id"), Some(SimpleValue::String(device)));
        *answered.entry(tag).or_default() += 1;
        d.settle(Outcome::Accepted);
    }
    assert_eq!(answered.len(), DEVICES * COMMANDS);
    assert!(answered.values().all(|n| *n == 1));
    for outcome in outcomes {
        assert_eq!(outcome.await.unwrap(), Outcome::Accepted);
    }
    if let Ok(Some(extra)) =
        tokio::time::timeout(Duration::from_millis(200), responses.recv()).await
    {
        panic!("a response too many: {:?}", extra.message());
    }
    for device in devices {
        device.abort();
    }
}

/// A device that acknowledges each command and answers `DEVICE-ID PAYLOAD` with status 200.
async fn echo(mut client: RawClient, id: String) {
    let mut packet_id = 100u16;
    while let Some(publish) = client.next_publish().await {
        if let Some(pid) = publish.packet_id {
            client.puback(pid).await;
        }
        let request_id = publish
            .topic
            .strip_prefix("command///req/")
            .and_then(|r| r.strip_suffix("/echo"))
            .expect("command topic");
        let answer = format!("{id} {}", String::from_utf8_lossy(&publish.payload));
        packet_id = packet_id.wrapping_add(1).max(1);
        client
            .publish(&format!("command///res/{request_id}/200"), answer.as_bytes(), packet_id)
            .await;
    }
}
