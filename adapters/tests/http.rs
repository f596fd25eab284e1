//! The HTTP adapter driven by curl (a client nobody here wrote) over real sockets; what
//! reaches the messaging core is observed through its in-process consumer API.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::types::primitives::SimpleValue;
use ferrule_adapters::http::{HttpAdapter, HttpConfig};
use ferrule_adapters::Downstream;
use ferrule_messaging::{Broker, Consumer, Outcome, SubscribeOptions};
use support::MemoryRegistry;
use tokio_util::sync::CancellationToken;

struct Setup {
    url: String,
    broker: Broker,
    registry: MemoryRegistry,
    _shutdown: tokio_util::sync::DropGuard,
}

async fn start(allow_unauthenticated: bool) -> Setup {
    let registry = MemoryRegistry::new().tenant("t1").tenant("t2").device("t2", "d9", "pw9");
    let registry = registry.device("t1", "d1", "pw1").device("t1", "gw", "gwpw").device_via(
        "t1",
        "child",
        "",
        &["gw"],
    );
    let broker = Broker::in_memory(&Default::default());
    let config = HttpConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        max_payload: 64,
        allow_unauthenticated,
        ..Default::default()
    };
    let adapter = HttpAdapter::bind(
        config,
        Downstream::new(broker.clone()),
        Arc::new(registry.clone()),
        None,
    )
    .await
    .unwrap();
    let url = format!("http://{}", adapter.local_addr());
    let shutdown = CancellationToken::new();
    tokio::spawn(adapter.run(shutdown.clone()));
    Setup { url, broker, registry, _shutdown: shutdown.drop_guard() }
}

/// Runs curl; returns (status, response headers lower-cased).
async fn curl(args: Vec<String>) -> (u16, String) {
    let output = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-D", "-", "-w", "%{http_code}", "--max-time", "10"])
            .args(&args)
            .output()
            .expect("curl is installed")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let status = text[text.len().saturating_sub(3)..].parse().unwrap_or(0);
    (status, text.to_ascii_lowercase())
}

fn post(url: &str, path: &str, user: Option<&str>, body: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "-X".into(),
        "POST".into(),
        format!("{url}{path}"),
        "--data-binary".into(),
        body.into(),
    ];
    if let Some(user) = user {
        args.extend(["-u".into(), user.into()]);
    }
    args.extend(["-H".into(), "content-type: text/plain".into()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn put(url: &str, path: &str, user: Option<&str>, body: &str) -> Vec<String> {
    let mut args = post(url, path, user, body, &[]);
    args[1] = "PUT".into();
    args
}

async fn next(consumer: &mut Consumer) -> ferrule_messaging::Delivery {
    tokio::time::timeout(Duration::from_secs(5), consumer.recv())
        .await
        .expect("in time")
        .expect("open")
}

fn app_property(d: &ferrule_messaging::Delivery, key: &str) -> Option<SimpleValue> {
    d.message().application_properties.as_ref()?.0.get(key).cloned()
}

#[tokio::test]
async fn telemetry_qos1_is_accepted_only_after_the_consumer_accepted() {
    let s = start(false).await;
    let mut consumer = s.broker.subscribe("telemetry/t1", &SubscribeOptions::default()).unwrap();
    consumer.add_credit(10);
    let request = tokio::spawn(curl(post(
        &s.url,
        "/telemetry",
        Some("d1@t1:pw1"),
        "21.5",
        &["-H", "QoS-Level: 1"],
    )));
    let delivery = next(&mut consumer).await;
    assert!(!request.is_finished(), "no answer before the application accepted");
    assert_eq!(app_property(&delivery, "device_id"), Some(SimpleValue::String("d1".into())));
    assert_eq!(
        app_property(&delivery, "orig_adapter"),
        Some(SimpleValue::String("hono-http".into()))
    );
    assert_eq!(app_property(&delivery, "qos"), Some(SimpleValue::Int(1)));
    assert_eq!(
        app_property(&delivery, "orig_address"),
        Some(SimpleValue::String("/telemetry".into()))
    );
    let props = delivery.message().properties.clone().unwrap();
    assert_eq!(props.content_type.unwrap().as_str(), "text/plain");
    delivery.settle(Outcome::Accepted);
    assert_eq!(request.await.unwrap().0, 202);
}

#[tokio::test]
async fn telemetry_without_consumer_is_503_with_retry_after() {
    let s = start(false).await;
    for qos in ["0", "1"] {
        let header = format!("QoS-Level: {qos}");
        let (status, headers) =
            curl(post(&s.url, "/telemetry", Some("d1@t1:pw1"), "x", &["-H", &header])).await;
        assert_eq!(status, 503, "QoS {qos}");
        assert!(headers.contains("retry-after: 1"), "{headers}");
    }
}

#[tokio::test]
async fn events_are_stored_until_a_consumer_comes() {
    let s = start(false).await;
    let (status, _) =
        curl(post(&s.url, "/event", Some("d1@t1:pw1"), "door open", &["-H", "hono-ttl: 60"])).await;
    assert_eq!(status, 202);
    let mut consumer = s.broker.subscribe("event/t1", &SubscribeOptions::default()).unwrap();
    consumer.add_credit(1);
    let d = next(&mut consumer).await;
    let header = d.message().header.clone().unwrap();
    assert!(header.durable);
    assert_eq!(header.ttl, Some(60_000));
    d.settle(Outcome::Accepted);
}

#[tokio::test]
async fn gateway_publishes_for_devices_that_list_it() {
    let s = start(false).await;
    let mut consumer = s.broker.subscribe("telemetry/t1", &SubscribeOptions::default()).unwrap();
    consumer.add_credit(10);
    let request = tokio::spawn(curl(put(&s.url, "/telemetry/t1/child", Some("gw@t1:gwpw"), "x")));
    let d = next(&mut consumer).await;
    assert_eq!(app_property(&d, "device_id"), Some(SimpleValue::String("child".into())));
    d.settle(Outcome::Accepted);
    assert_eq!(request.await.unwrap().0, 202);
    // d1 does not list gw in `via`.
    assert_eq!(curl(put(&s.url, "/telemetry/t1/d1", Some("gw@t1:gwpw"), "x")).await.0, 403);
}

#[tokio::test]
async fn bad_input_gets_clear_answers() {
    let s = start(false).await;
    let mut consumer = s.broker.subscribe("telemetry/t1", &SubscribeOptions::default()).unwrap();
    consumer.add_credit(100);
    let u = &s.url;
    let cases: Vec<(&str, Vec<String>, u16)> = vec![
        ("wrong password", post(u, "/telemetry", Some("d1@t1:nope"), "x", &[]), 401),
        ("no credentials", post(u, "/telemetry", None, "x", &[]), 401),
        ("unknown tenant", post(u, "/telemetry", Some("d1@nope:pw1"), "x", &[]), 401),
        ("username without tenant", post(u, "/telemetry", Some("d1:pw1"), "x", &[]), 401),
        ("foreign tenant in URI", put(u, "/telemetry/t2/d9", Some("d1@t1:pw1"), "x"), 403),
        ("unknown URI", post(u, "/nothing", Some("d1@t1:pw1"), "x", &[]), 404),
        (
            "wrong method",
            {
                let mut a = post(u, "/telemetry", Some("d1@t1:pw1"), "x", &[]);
                a[1] = "DELETE".into();
                a
            },
            405,
        ),
        (
            "payload over the max",
            post(u, "/telemetry", Some("d1@t1:pw1"), &"x".repeat(65), &[]),
            413,
        ),
        (
            "bad QoS-Level",
            post(u, "/telemetry", Some("d1@t1:pw1"), "x", &["-H", "QoS-Level: 2"]),
            400,
        ),
        ("bad hono-ttl", post(u, "/event", Some("d1@t1:pw1"), "x", &["-H", "hono-ttl: soon"]), 400),
        (
            "empty payload without content type",
            vec![
                "-X".into(),
                "POST".into(),
                format!("{u}/telemetry"),
                "-u".into(),
                "d1@t1:pw1".into(),
                "-H".into(),
                "content-type:".into(),
                "--data-binary".into(),
                "".into(),
            ],
            400,
        ),
        ("unauthenticated PUT when not allowed", put(u, "/telemetry/t1/d1", None, "x"), 401),
    ];
    for (name, args, expected) in cases {
        let (status, headers) = curl(args).await;
        assert_eq!(status, expected, "{name}: {headers}");
        if expected == 401 {
            assert!(headers.contains("www-authenticate: basic"), "{name}: {headers}");
        }
    }
    // Empty notification with its content type is fine.
    let request = tokio::spawn(curl(vec![
        "-X".into(),
        "POST".into(),
        format!("{u}/telemetry"),
        "-u".into(),
        "d1@t1:pw1".into(),
        "-H".into(),
        "content-type: application/vnd.eclipse-hono-empty-notification".into(),
        "--data-binary".into(),
        "".into(),
    ]));
    let d = next(&mut consumer).await;
    d.settle(Outcome::Accepted);
    assert_eq!(request.await.unwrap().0, 202);

    s.registry.set_device_enabled("t1", "d1", false);
    assert_eq!(
        curl(post(u, "/telemetry", Some("d1@t1:pw1"), "x", &[])).await.0,
        403,
        "disabled device"
    );
    s.registry.set_device_enabled("t1", "d1", true);
    s.registry.set_tenant_enabled("t1", false);
    assert_eq!(
        curl(post(u, "/telemetry", Some("d1@t1:pw1"), "x", &[])).await.0,
        403,
        "disabled tenant"
    );
}

#[tokio::test]
async fn unauthenticated_devices_only_where_the_tenant_allows() {
    let s = start(true).await;
    let mut consumer = s.broker.subscribe("telemetry/t1", &SubscribeOptions::default()).unwrap();
    consumer.add_credit(10);
    assert_eq!(
        curl(put(&s.url, "/telemetry/t1/d1", None, "x")).await.0,
        401,
        "tenant does not allow it"
    );
    s.registry.set_allow_unauthenticated("t1", true);
    let request = tokio::spawn(curl(put(&s.url, "/telemetry/t1/d1", None, "x")));
    let d = next(&mut consumer).await;
    d.settle(Outcome::Accepted);
    assert_eq!(request.await.unwrap().0, 202);
    assert_eq!(curl(put(&s.url, "/telemetry/t1/ghost", None, "x")).await.0, 404, "unknown device");
}
