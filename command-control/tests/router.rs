//! The command router through the messaging core's in-process API (the AMQP path and the
//! device-side adapters are covered end to end in tests/interop).

use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::types::messaging::{ApplicationProperties, MessageId, Properties};
use fe2o3_amqp::types::primitives::{OrderedMap, SimpleValue};
use ferrule_command_control::{
    BoxFuture, Command, CommandRouter, CommandSink, DeviceCheck, Notify, RequestKey, RespondError,
    Response, Target, DEFER_TTL_PROPERTY,
};
use ferrule_messaging::message::data_message;
use ferrule_messaging::{Broker, Message, Outcome, SubscribeOptions};
use tokio::sync::mpsc;

struct Sink {
    tx: mpsc::UnboundedSender<Command>,
    outcome: Outcome,
}

impl CommandSink for Sink {
    fn deliver(&self, command: Command) -> BoxFuture<Outcome> {
        let _ = self.tx.send(command);
        let outcome = self.outcome.clone();
        Box::pin(async move { outcome })
    }
}

struct Via(Vec<(&'static str, &'static str)>);

impl DeviceCheck for Via {
    fn gateway_may_act_for(&self, _tenant: &str, device: &str, gateway: &str) -> BoxFuture<bool> {
        let ok = self.0.iter().any(|(d, g)| *d == device && *g == gateway);
        Box::pin(async move { ok })
    }

    /// Every device exists except `ghost`.
    fn may_receive_commands(&self, _tenant: &str, device: &str) -> BoxFuture<Option<bool>> {
        let exists = device != "ghost";
        Box::pin(async move { Some(exists) })
    }
}

fn sink(outcome: Outcome) -> (Arc<Sink>, mpsc::UnboundedReceiver<Command>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Arc::new(Sink { tx, outcome }), rx)
}

fn command(device: &str, reply: Option<&str>, defer: Option<i32>) -> Message {
    let mut m = data_message(b"on".to_vec());
    m.properties = Some(Properties {
        to: Some(format!("command/t1/{device}")),
        subject: Some("light".into()),
        message_id: Some(MessageId::String("m-1".into())),
        reply_to: reply.map(|r| format!("command_response/t1/{r}")),
        ..Default::default()
    });
    if let Some(ttl) = defer {
        let mut app = OrderedMap::new();
        app.insert(DEFER_TTL_PROPERTY.to_owned(), SimpleValue::Int(ttl));
        m.application_properties = Some(ApplicationProperties(app));
    }
    m
}

const MQTT: Notify = Notify { adapter: "hono-mqtt", ttd: -1 };

fn setup(broker: &Broker) -> CommandRouter {
    let router = CommandRouter::new(
        broker.clone(),
        Arc::new(Via(vec![("child", "gw")])),
        RequestKey::random(),
    );
    router.install();
    router
}

#[tokio::test]
async fn request_response_round_trip() {
    let broker = Broker::in_memory(&ferrule_command_control::messaging_config(Default::default()));
    let router = setup(&broker);
    let mut responses =
        broker.subscribe("command_response/t1/app-1", &SubscribeOptions::default()).unwrap();
    responses.add_credit(1);
    let (s, mut commands) = sink(Outcome::Accepted);
    let _subscription = router.subscribe("t1", Target::Device("d1".into()), s, MQTT);

    assert_eq!(
        broker.send("command/t1", command("d1", Some("app-1"), None)).await,
        Outcome::Accepted
    );
    let cmd = commands.recv().await.unwrap();
    assert_eq!(
        (cmd.device_id.as_str(), cmd.name.as_str(), &cmd.payload[..]),
        ("d1", "light", &b"on"[..])
    );
    let request_id = cmd.request_id.expect("request/response");
    let response = |tenant: &str, device: &str| Response {
        tenant: tenant.into(),
        device_id: device.into(),
        request_id: request_id.clone(),
        status: 200,
        payload: "done".into(),
        content_type: Some("text/plain".into()),
    };

    // Another device of the tenant (or another tenant's d1) cannot answer d1's command.
    for (tenant, device) in [("t1", "d2"), ("t2", "d1")] {
        assert_eq!(
            router.respond(response(tenant, device)).await,
            Err(RespondError::NotIssuedTo),
            "{tenant}/{device}"
        );
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), responses.recv()).await.is_err(),
        "a forged response reached the application"
    );

    // The response is accepted once the application accepted it: answer concurrently.
    let r = router.clone();
    let genuine = response("t1", "d1");
    let responding = tokio::spawn(async move { r.respond(genuine).await });
    let reply =
        tokio::time::timeout(Duration::from_secs(5), responses.recv()).await.unwrap().unwrap();
    let props = reply.message().properties.clone().unwrap();
    assert_eq!(props.correlation_id, Some(MessageId::String("m-1".into())));
    let app = &reply.message().application_properties.as_ref().unwrap().0;
    assert_eq!(app.get("status"), Some(&SimpleValue::Int(200)));
    reply.settle(Outcome::Accepted);
    responding.await.unwrap().unwrap();
}

#[tokio::test]
async fn outcomes_not_connected_malformed_and_gateways() {
    let broker = Broker::in_memory(&ferrule_command_control::messaging_config(Default::default()));
    let router = setup(&broker);
    assert_eq!(
        broker.send("command/t1", command("d1", None, None)).await,
        Outcome::Released,
        "not connected"
    );
    let mut bad = command("d1", None, None);
    bad.properties.as_mut().unwrap().subject = None;
    assert!(matches!(broker.send("command/t1", bad).await, Outcome::Rejected { .. }), "no subject");
    assert!(
        matches!(
            broker.send("command/t1", command("d1/x", None, None)).await,
            Outcome::Rejected { .. }
        ),
        "bad to"
    );

    let (s, mut commands) = sink(Outcome::Released);
    let sub = router.subscribe("t1", Target::Device("d1".into()), s, MQTT);
    assert_eq!(
        broker.send("command/t1", command("d1", None, None)).await,
        Outcome::Released,
        "device did not ack"
    );
    assert!(commands.recv().await.is_some());
    drop(sub);

    let (gw, mut via_gw) = sink(Outcome::Accepted);
    let _g = router.subscribe("t1", Target::AllDevicesOf { gateway: "gw".into() }, gw, MQTT);
    assert_eq!(broker.send("command/t1", command("child", None, None)).await, Outcome::Accepted);
    assert_eq!(via_gw.recv().await.unwrap().device_id, "child");
    assert_eq!(
        broker.send("command/t1", command("d1", None, None)).await,
        Outcome::Released,
        "d1 does not list gw"
    );
}

#[tokio::test]
async fn deferred_commands_wait_for_the_device_and_expire() {
    let broker = Broker::in_memory(&ferrule_command_control::messaging_config(Default::default()));
    let router = setup(&broker);
    assert_eq!(
        broker.send("command/t1", command("d1", Some("app"), Some(60))).await,
        Outcome::Accepted,
        "kept"
    );
    assert_eq!(broker.send("command/t1", command("d2", None, Some(1))).await, Outcome::Accepted);
    assert!(
        matches!(
            broker.send("command/t1", command("ghost", None, Some(60))).await,
            Outcome::Rejected { condition: "amqp:not-found", .. }
        ),
        "nothing is kept for a device that does not exist"
    );
    assert_eq!(broker.queue_depth("command_deferred/t1/ghost"), None);
    tokio::time::sleep(Duration::from_millis(1200)).await;

    let (s, mut commands) = sink(Outcome::Accepted);
    let _sub = router.subscribe("t1", Target::Device("d1".into()), s, MQTT);
    let cmd = tokio::time::timeout(Duration::from_secs(5), commands.recv()).await.unwrap().unwrap();
    assert_eq!(cmd.device_id, "d1");
    assert!(cmd.request_id.is_some());

    let (s2, mut late) = sink(Outcome::Accepted);
    let _sub2 = router.subscribe("t1", Target::Device("d2".into()), s2, MQTT);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), late.recv()).await.is_err(),
        "expired command not delivered"
    );
}

#[tokio::test]
async fn ttd_notifications_on_subscribe_and_unsubscribe() {
    let broker = Broker::in_memory(&ferrule_command_control::messaging_config(Default::default()));
    let router = setup(&broker);
    let (s, _commands) = sink(Outcome::Accepted);
    let sub = router.subscribe("t1", Target::Device("d1".into()), s, MQTT);
    drop(sub);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut events = broker.subscribe("event/t1", &SubscribeOptions::default()).unwrap();
    events.add_credit(10);
    let mut ttds = Vec::new();
    for _ in 0..2 {
        let d = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap().unwrap();
        let app = &d.message().application_properties.as_ref().unwrap().0;
        ttds.push(app.get("ttd").cloned());
        d.settle(Outcome::Accepted);
    }
    assert_eq!(ttds, vec![Some(SimpleValue::Int(-1)), Some(SimpleValue::Int(0))]);
}
