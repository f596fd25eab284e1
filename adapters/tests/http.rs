//! The HTTP adapter driven by curl (a client nobody here wrote) over real sockets; what
//! reaches the messaging core is observed through its in-process consumer API.

mod support;

use fe2o3_amqp::types::primitives::SimpleValue;
use ferrule_adapters::http::HttpConfig;
use ferrule_messaging::Outcome;
use support::amqp::{next, text, MessageExt};
use support::clients::{curl, request, HttpAnswer};
use support::platform::{devices, Http, Platform};

type Setup = Platform<Http>;

async fn start(allow_unauthenticated: bool) -> Setup {
    let config = HttpConfig { max_payload: 64, allow_unauthenticated, ..Default::default() };
    Platform::start(devices(), config).await
}

const D1: Option<&str> = Some("d1@t1:pw1");
const GW: Option<&str> = Some("gw@t1:gwpw");

/// curl's arguments for a POST to `path` (text/plain unless `headers` name a content type).
fn post(s: &Setup, path: &str, user: Option<&str>, body: &str, headers: &[&str]) -> Vec<String> {
    request("POST", &format!("{}{path}", s.url()), user, body, headers)
}

fn put(s: &Setup, path: &str, user: Option<&str>, body: &str) -> Vec<String> {
    request("PUT", &format!("{}{path}", s.url()), user, body, &[])
}

/// Asserts `answer`'s status, and for a 401 that it asks for basic credentials.
fn assert_status(answer: &HttpAnswer, expected: u16, what: &str) {
    assert_eq!(answer.status, expected, "{what}: {answer:?}");
    if expected == 401 {
        let challenge = answer.header("www-authenticate").unwrap_or_default();
        assert!(challenge.to_ascii_lowercase().starts_with("basic"), "{what}: {answer:?}");
    }
}

#[tokio::test]
async fn telemetry_qos1_is_accepted_only_after_the_consumer_accepted() {
    let s = start(false).await;
    let mut consumer = s.consumer("telemetry/t1", 10);
    let request = tokio::spawn(curl(post(&s, "/telemetry", D1, "21.5", &["QoS-Level: 1"])));
    let delivery = next(&mut consumer).await;
    assert!(!request.is_finished(), "no answer before the application accepted");
    assert_eq!(delivery.app_property("device_id"), text("d1"));
    assert_eq!(delivery.app_property("orig_adapter"), text("hono-http"));
    assert_eq!(delivery.app_property("qos"), Some(SimpleValue::Int(1)));
    assert_eq!(delivery.app_property("orig_address"), text("/telemetry"));
    assert_eq!(delivery.content_type().as_deref(), Some("text/plain"));
    delivery.settle(Outcome::Accepted);
    assert_eq!(request.await.unwrap().status, 202);
}

#[tokio::test]
async fn telemetry_without_consumer_is_503_with_retry_after() {
    let s = start(false).await;
    for qos in ["0", "1"] {
        let header = format!("QoS-Level: {qos}");
        let answer = curl(post(&s, "/telemetry", D1, "x", &[&header])).await;
        assert_eq!(answer.status, 503, "QoS {qos}");
        assert_eq!(answer.header("retry-after"), Some("1"), "{answer:?}");
    }
}

#[tokio::test]
async fn events_are_stored_until_a_consumer_comes() {
    let s = start(false).await;
    let answer = curl(post(&s, "/event", D1, "door open", &["hono-ttl: 60"])).await;
    assert_eq!(answer.status, 202);
    let d = next(&mut s.consumer("event/t1", 1)).await;
    assert!(d.durable());
    assert_eq!(d.ttl(), Some(60_000));
    d.settle(Outcome::Accepted);
}

#[tokio::test]
async fn gateway_publishes_for_devices_that_list_it() {
    let s = start(false).await;
    let mut consumer = s.consumer("telemetry/t1", 10);
    let request = tokio::spawn(curl(put(&s, "/telemetry/t1/child", GW, "x")));
    let d = next(&mut consumer).await;
    assert_eq!(d.app_property("device_id"), text("child"));
    d.settle(Outcome::Accepted);
    assert_eq!(request.await.unwrap().status, 202);
    // d1 does not list gw in `via`.
    assert_eq!(curl(put(&s, "/telemetry/t1/d1", GW, "x")).await.status, 403);
}

#[tokio::test]
async fn bad_input_gets_clear_answers() {
    let s = start(false).await;
    let mut consumer = s.consumer("telemetry/t1", 100);
    let big = "x".repeat(65);
    let rows = [
        ("wrong password", post(&s, "/telemetry", Some("d1@t1:nope"), "x", &[]), 401),
        ("no credentials", post(&s, "/telemetry", None, "x", &[]), 401),
        ("unknown tenant", post(&s, "/telemetry", Some("d1@nope:pw1"), "x", &[]), 401),
        ("username without tenant", post(&s, "/telemetry", Some("d1:pw1"), "x", &[]), 401),
        ("foreign tenant in URI", put(&s, "/telemetry/t2/d9", D1, "x"), 403),
        ("unknown URI", post(&s, "/nothing", D1, "x", &[]), 404),
        ("wrong method", request("DELETE", &format!("{}/telemetry", s.url()), D1, "x", &[]), 405),
        ("payload over the max", post(&s, "/telemetry", D1, &big, &[]), 413),
        ("bad QoS-Level", post(&s, "/telemetry", D1, "x", &["QoS-Level: 2"]), 400),
        ("bad hono-ttl", post(&s, "/event", D1, "x", &["hono-ttl: soon"]), 400),
        (
            "empty payload without content type",
            post(&s, "/telemetry", D1, "", &["content-type:"]),
            400,
        ),
        ("unauthenticated PUT when not allowed", put(&s, "/telemetry/t1/d1", None, "x"), 401),
    ];
    for (name, args, expected) in rows {
        assert_status(&curl(args).await, expected, name);
    }
    // Empty notification with its content type is fine.
    let empty = "content-type: application/vnd.eclipse-hono-empty-notification";
    let request = tokio::spawn(curl(post(&s, "/telemetry", D1, "", &[empty])));
    next(&mut consumer).await.settle(Outcome::Accepted);
    assert_eq!(request.await.unwrap().status, 202);

    s.registry.set_device_enabled("t1", "d1", false);
    assert_status(&curl(post(&s, "/telemetry", D1, "x", &[])).await, 403, "disabled device");
    s.registry.set_device_enabled("t1", "d1", true);
    s.registry.set_tenant_enabled("t1", false);
    assert_status(&curl(post(&s, "/telemetry", D1, "x", &[])).await, 403, "disabled tenant");
}

#[tokio::test]
async fn unauthenticated_devices_only_where_the_tenant_allows() {
    let s = start(true).await;
    let mut consumer = s.consumer("telemetry/t1", 10);
    let answer = curl(put(&s, "/telemetry/t1/d1", None, "x")).await;
    assert_eq!(answer.status, 401, "tenant does not allow it");
    s.registry.set_allow_unauthenticated("t1", true);
    let request = tokio::spawn(curl(put(&s, "/telemetry/t1/d1", None, "x")));
    next(&mut consumer).await.settle(Outcome::Accepted);
    assert_eq!(request.await.unwrap().status, 202);
    let answer = curl(put(&s, "/telemetry/t1/ghost", None, "x")).await;
    assert_eq!(answer.status, 404, "unknown device");
}
