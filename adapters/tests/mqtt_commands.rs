//! Commands over MQTT, end to end over real sockets: the application side is the
//! messaging core's in-process API (`command/t1`, `command_response/t1/app`,
//! `event/t1` for `ttd` notifications) with the real command router installed; the
//! device side is mosquitto_sub / mosquitto_pub, or a small raw MQTT 3.1.1 client where
//! the test must control PUBACKs or hold many connections.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fe2o3_amqp::types::messaging::MessageId;
use fe2o3_amqp::types::primitives::SimpleValue;
use ferrule_adapters::mqtt::{MqttAdapter, MqttConfig};
use ferrule_command_control::RequestId;
use ferrule_messaging::{Consumer, Outcome};
use support::amqp::{command, next, next_response, MessageExt};
use support::clients::{assert_success, mosquitto, Run};
use support::platform::{devices, Platform};
use support::raw_mqtt::RawClient;
use tokio::task::JoinHandle;

type Setup = Platform<MqttAdapter>;

/// [`devices`] and `devices_more` in t1 (`dev-N`, password `pw`), with commands.
async fn start(config: MqttConfig, devices_more: usize) -> Setup {
    let registry = (0..devices_more)
        .fold(devices(), |registry, i| registry.device("t1", &format!("dev-{i}"), "pw"));
    Platform::with_commands(registry, config).await
}

/// A platform and an application receiving its events (ttd notifications) and the
/// command responses for reply address `app`.
async fn with_application() -> (Setup, Consumer, Consumer) {
    let p = start(MqttConfig::default(), 0).await;
    let events = p.consumer("event/t1", 100);
    let responses = p.consumer("command_response/t1/app", 10);
    (p, events, responses)
}

/// mosquitto_sub for one command (`args`, then `-v -C 1`), once its subscription is
/// announced (`ttd` -1 for `device`).
async fn subscribed(
    p: &Setup,
    events: &mut Consumer,
    version: &str,
    args: &[&str],
    device: &str,
) -> JoinHandle<Run> {
    let sub = mosquitto("mosquitto_sub", p.addr(), version, &[args, &["-v", "-C", "1"]].concat());
    assert_eq!(p.ttd(events, device).await, -1, "subscribed");
    sub
}

fn publish(addr: SocketAddr, version: &str, args: &[&str]) -> JoinHandle<Run> {
    mosquitto("mosquitto_pub", addr, version, args)
}

// ---------------------------------------------------------------------------------------

/// The request id in mosquitto_sub's `TOPIC PAYLOAD` line for command `name` (topic
/// `PREFIX` `REQ-ID/NAME`), after asserting the payload.
fn request_id<'a>(printed: &'a str, prefix: &str, name: &str, payload: &str) -> &'a str {
    let (topic, printed_payload) = printed.trim().split_once(' ').expect("topic and payload");
    assert_eq!(printed_payload, payload);
    topic
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_suffix(name))
        .and_then(|rest| rest.strip_suffix('/'))
        .expect(topic)
}

#[tokio::test]
async fn request_response_with_a_device_subscription_and_ttd_notifications() {
    let (p, mut events, mut responses) = with_application().await;
    let args = ["-u", "d1@t1", "-P", "pw1", "-q", "1", "-t", "command///req/#"];
    let sub = subscribed(&p, &mut events, "mqttv311", &args, "d1").await;

    let outcome = p.send_command(command("d1", "light", "on", Some(("app", "corr-1"))));
    let run = assert_success(sub, "mosquitto_sub").await;
    // QoS 1 subscription: accepted once mosquitto_sub acknowledged.
    assert_eq!(outcome.await.unwrap(), Outcome::Accepted);
    let request_id = request_id(&run.output, "command///req/", "light", "on");
    assert!(!request_id.is_empty(), "request/response commands carry a request id");
    // mosquitto_sub disconnected after its one message.
    assert_eq!(p.ttd(&mut events, "d1").await, 0, "connection gone");

    let topic = format!("command///res/{request_id}/200");
    let args = ["-u", "d1@t1", "-P", "pw1", "-q", "1", "-t", &topic, "-m", "done"];
    let answer = publish(p.addr(), "mqttv311", &args);
    let response = next_response(&mut responses, "corr-1", 200, "d1").await;
    assert_eq!(response.data(), b"done");
    response.settle(Outcome::Accepted);
    assert_success(answer, "PUBACK once the application accepted").await;
}

#[tokio::test]
async fn one_way_command_on_the_short_topic_at_qos0() {
    let p = start(MqttConfig::default(), 0).await;
    let mut events = p.consumer("event/t1", 100);
    let args = ["-u", "d1@t1", "-P", "pw1", "-q", "0", "-t", "c///q/#"];
    let sub = subscribed(&p, &mut events, "mqttv5", &args, "d1").await;
    let outcome = p.send_command(command("d1", "reboot", "now", None));
    assert_eq!(outcome.await.unwrap(), Outcome::Accepted, "QoS 0: accepted once written");
    let run = assert_success(sub, "mosquitto_sub").await;
    assert_eq!(run.output.trim(), "c///q//reboot now", "one-way: empty request id");
}

#[tokio::test]
async fn gateway_subscribed_for_all_its_devices() {
    let (p, mut events, mut responses) = with_application().await;
    let args = ["-u", "gw@t1", "-P", "gwpw", "-q", "1", "-t", "command//+/req/#"];
    let sub = subscribed(&p, &mut events, "mqttv5", &args, "gw").await;

    // d1 does not list gw in via: nobody to deliver to.
    let outcome = p.send_command(command("d1", "light", "on", None));
    assert_eq!(outcome.await.unwrap(), Outcome::Released);
    let outcome = p.send_command(command("child", "light", "off", Some(("app", "corr-gw"))));
    let run = assert_success(sub, "mosquitto_sub").await;
    assert_eq!(outcome.await.unwrap(), Outcome::Accepted);
    let request_id = request_id(&run.output, "command//child/req/", "light", "off");

    let topic = format!("command//child/res/{request_id}/204");
    let mut args = vec!["-u", "gw@t1", "-P", "gwpw", "-q", "1", "-t", &topic, "-n"];
    args.extend(["-D", "publish", "content-type", "application/vnd.empty"]);
    let answer = publish(p.addr(), "mqttv5", &args);
    let response = next_response(&mut responses, "corr-gw", 204, "child").await;
    assert_eq!(
        response.content_type().as_deref(),
        Some("application/vnd.empty"),
        "MQTT 5 content type"
    );
    response.settle(Outcome::Accepted);
    assert_success(answer, "mosquitto_pub").await;
}

#[tokio::test]
async fn device_not_subscribed_is_released_and_malformed_is_rejected() {
    let p = start(MqttConfig::default(), 0).await;
    let outcome = p.send_command(command("d1", "light", "on", Some(("app", "c"))));
    assert_eq!(outcome.await.unwrap(), Outcome::Released);
    let mut no_subject = command("d1", "light", "on", None);
    no_subject.properties.as_mut().unwrap().subject = None;
    assert!(matches!(p.send_command(no_subject).await.unwrap(), Outcome::Rejected { .. }));
}

#[tokio::test]
async fn qos1_subscription_without_puback_is_released_after_the_timeout() {
    let timeout = Duration::from_millis(500);
    let p = start(MqttConfig { command_ack_timeout: timeout, ..Default::default() }, 0).await;
    let mut device = RawClient::connect(p.addr(), "silent", Some(("d1@t1", "pw1"))).await;
    assert_eq!(device.subscribe("command///req/#", 1, 1).await, 1, "granted QoS 1");
    let started = Instant::now();
    let outcome = p.send_command(command("d1", "light", "on", Some(("app", "c"))));
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
    let p = start(MqttConfig::default(), 0).await;
    let mut events = p.consumer("event/t1", 100);
    let mut device = RawClient::connect(p.addr(), "d1", Some(("d1@t1", "pw1"))).await;
    assert_eq!(device.subscribe("c///q/#", 0, 1).await, 0, "granted QoS 0");
    assert_eq!(p.ttd(&mut events, "d1").await, -1);
    device.unsubscribe("c///q/#", 2).await;
    assert_eq!(p.ttd(&mut events, "d1").await, 0);
    let outcome = p.send_command(command("d1", "light", "on", None));
    assert_eq!(outcome.await.unwrap(), Outcome::Released, "unsubscribed");
    assert_eq!(device.subscribe("command///req/#", 1, 3).await, 1);
    assert_eq!(p.ttd(&mut events, "d1").await, -1);
    drop(device);
    assert_eq!(p.ttd(&mut events, "d1").await, 0);
}

#[tokio::test]
async fn forbidden_filters_and_malformed_responses() {
    let p = start(MqttConfig::default(), 0).await;
    let mut device = RawClient::connect(p.addr(), "d1", Some(("d1@t1", "pw1"))).await;
    // Another tenant, and a device that does not list d1 as its gateway.
    assert_eq!(device.subscribe("command/t2//req/#", 1, 1).await, 0x80);
    assert_eq!(device.subscribe("command//child/req/#", 1, 2).await, 0x80);
    // A response with a status that is not a number: without an error subscription the
    // connection is closed (as for a malformed telemetry topic).
    device.publish("command///res/AAAx/abc", b"", 3).await;
    assert!(device.closed().await);
    let mut device = RawClient::connect(p.addr(), "d1b", Some(("d1@t1", "pw1"))).await;
    device.publish("command///res/!!/200", b"", 4).await;
    assert!(device.closed().await, "malformed request id");
}

#[tokio::test]
async fn gateway_subscribed_for_one_device_gets_its_commands_on_the_short_topic() {
    let p = start(MqttConfig::default(), 0).await;
    let mut gateway = RawClient::connect(p.addr(), "gw", Some(("gw@t1", "gwpw"))).await;
    assert_eq!(gateway.subscribe("c//child/q/#", 0, 1).await, 0);
    let wildcard = p.send_command(command("child", "a+b", "on", None));
    assert!(matches!(wildcard.await.unwrap(), Outcome::Rejected { .. }), "not a topic level");
    let outcome = p.send_command(command("child", "light", "on", None));
    let publish = gateway.next_publish().await.expect("the command arrives");
    assert_eq!(
        (publish.topic.as_str(), publish.packet_id, &publish.payload[..]),
        ("c//child/q//light", None, &b"on"[..])
    );
    assert_eq!(outcome.await.unwrap(), Outcome::Accepted);
    let outcome = p.send_command(command("gw", "light", "on", None));
    assert_eq!(outcome.await.unwrap(), Outcome::Released, "only child's commands");
}

#[tokio::test]
async fn unauthenticated_devices_cannot_subscribe_to_commands() {
    let p = start(MqttConfig { allow_unauthenticated: true, ..Default::default() }, 0).await;
    p.registry.set_allow_unauthenticated("t1", true);
    let mut device = RawClient::connect(p.addr(), "anon", None).await;
    assert_eq!(device.subscribe("command/t1/d1/req/#", 1, 1).await, 0x80);
    assert_eq!(device.subscribe("command///req/#", 1, 2).await, 0x80);
    let outcome = p.send_command(command("d1", "light", "on", None));
    assert_eq!(outcome.await.unwrap(), Outcome::Released);
}

#[tokio::test]
async fn v5_responses_nobody_waits_for_or_not_allowed_get_a_negative_puback() {
    let p = start(MqttConfig::default(), 0).await;
    let request_id =
        RequestId { correlation_id: MessageId::String("x".into()), reply_id: "nobody".into() }
            .seal(&support::request_key(), "t1", "d1")
            .unwrap();
    let topic = format!("command///res/{request_id}/200");
    let args = ["-d", "-u", "d1@t1", "-P", "pw1", "-q", "1", "-t", topic.as_str(), "-m", "late"];
    let printed = publish(p.addr(), "mqttv5", &args).await.unwrap().output;
    assert!(
        printed.contains("received PUBACK (Mid: 1, RC:128)"),
        "no application waiting: {printed}"
    );
    // d1 does not list gw in via.
    let topic = format!("command//d1/res/{request_id}/200");
    let args = ["-d", "-u", "gw@t1", "-P", "gwpw", "-q", "1", "-t", topic.as_str(), "-m", "x"];
    let printed = publish(p.addr(), "mqttv5", &args).await.unwrap().output;
    assert!(printed.contains("received PUBACK (Mid: 1, RC:135)"), "gateway not in via: {printed}");
}

#[tokio::test]
async fn a_hundred_devices_with_ten_commands_each_all_answered_once() {
    const DEVICES: usize = 100;
    const COMMANDS: usize = 10;
    let p = start(MqttConfig::default(), DEVICES).await;
    let mut responses = p.consumer("command_response/t1/app", (DEVICES * COMMANDS) as u32);
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        let id = format!("dev-{i}");
        let mut client = RawClient::connect(p.addr(), &id, Some((&format!("{id}@t1"), "pw"))).await;
        assert_eq!(client.subscribe("command///req/#", 1, 1).await, 1);
        devices.push(tokio::spawn(echo(client, id)));
    }
    let mut outcomes = Vec::new();
    for i in 0..DEVICES {
        for j in 0..COMMANDS {
            let tag = format!("dev-{i}/{j}");
            let message = command(&format!("dev-{i}"), "echo", &tag, Some(("app", &tag)));
            outcomes.push(p.send_command(message));
        }
    }
    let mut answered: HashMap<String, usize> = HashMap::new();
    for _ in 0..DEVICES * COMMANDS {
        let d = next(&mut responses).await;
        let Some(MessageId::String(tag)) = d.correlation_id() else { panic!("correlation id") };
        let device = tag.split('/').next().unwrap().to_owned();
        assert_eq!(
            String::from_utf8(d.data()).unwrap(),
            format!("{device} {tag}"),
            "answered by the right device"
        );
        assert_eq!(d.app_property("device_id"), Some(SimpleValue::String(device)));
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
