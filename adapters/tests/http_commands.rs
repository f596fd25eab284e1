//! Commands for HTTP devices, driven by curl over real sockets: the device long-polls
//! with `hono-ttd`, the test acts as the application on `command/t1` and
//! `command_response/t1/app` through the messaging core's in-process API.

mod support;

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::types::messaging::{ApplicationProperties, MessageId, Properties};
use fe2o3_amqp::types::primitives::{OrderedMap, SimpleValue};
use ferrule_adapters::http::{HttpAdapter, HttpConfig};
use ferrule_adapters::Downstream;
use ferrule_command_control::DEFER_TTL_PROPERTY;
use ferrule_messaging::message::data_message;
use ferrule_messaging::{Broker, Consumer, Message, Outcome, SubscribeOptions};
use support::MemoryRegistry;
use tokio_util::sync::CancellationToken;

struct Setup {
    url: String,
    broker: Broker,
    /// `event/t1`: the devices' events and the `ttd` notifications.
    events: Consumer,
    _shutdown: tokio_util::sync::DropGuard,
}

async fn start() -> Setup {
    let mut registry = MemoryRegistry::new().tenant("t1").tenant("t2").device("t2", "d9", "pw9");
    registry = registry.device("t1", "d1", "pw1").device("t1", "gw", "gwpw").device_via(
        "t1",
        "child",
        "",
        &["gw"],
    );
    for i in 0..50 {
        registry = registry.device("t1", &format!("p{i}"), "pw");
    }
    let (broker, router) = support::broker_with_commands(&registry);
    let events = broker.subscribe("event/t1", &SubscribeOptions::default()).unwrap();
    events.add_credit(1000);
    let config = HttpConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        max_payload: 64,
        ..Default::default()
    };
    let adapter = HttpAdapter::bind(
        config,
        Downstream::new(broker.clone()),
        Arc::new(registry),
        Some(router),
    )
    .await
    .unwrap();
    let url = format!("http://{}", adapter.local_addr());
    let shutdown = CancellationToken::new();
    tokio::spawn(adapter.run(shutdown.clone()));
    Setup { url, broker, events, _shutdown: shutdown.drop_guard() }
}

/// What curl saw: status, headers (names lower-cased), body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

/// Runs curl with `args` (`-i` prints the response head before the body).
async fn curl(args: Vec<String>) -> Answer {
    let output = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-s", "-i", "--max-time", "20"])
            .args(&args)
            .output()
            .expect("curl is installed")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer { status, headers, body: body.to_owned() }
}

fn request(
    method: &str,
    url: &str,
    user: Option<&str>,
    body: &str,
    headers: &[&str],
) -> Vec<String> {
    let mut args =
        vec!["-X".into(), method.into(), url.into(), "--data-binary".into(), body.into()];
    if let Some(user) = user {
        args.extend(["-u".into(), user.into()]);
    }
    args.extend(["-H".into(), "content-type: text/plain".into()]);
    for h in headers {
        args.extend(["-H".into(), h.to_string()]);
    }
    args
}

/// An application's command (Hono's format); `reply` = None is one-way.
fn command(device: &str, name: &str, payload: &str, reply: Option<(&str, &str)>) -> Message {
    let mut m = data_message(payload.as_bytes().to_vec());
    m.properties = Some(Properties {
        to: Some(format!("command/t1/{device}")),
        subject: Some(name.into()),
        message_id: reply.map(|(_, id)| MessageId::String(id.into())),
        reply_to: reply.map(|(app, _)| format!("command_response/t1/{app}")),
        content_type: Some("text/plain".into()),
        ..Default::default()
    });
    m
}

fn app_property(m: &Message, key: &str) -> Option<SimpleValue> {
    m.application_properties.as_ref()?.0.get(key).cloned()
}

/// Waits until `devices` have announced (`ttd` notification > 0) that they wait for a
/// command; other events are accepted and skipped.
async fn ready(events: &mut Consumer, devices: &[String]) {
    let mut missing: Vec<&String> = devices.iter().collect();
    while !missing.is_empty() {
        let d = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("notification")
            .unwrap();
        let m = d.message();
        if let (Some(SimpleValue::Int(ttd)), Some(SimpleValue::String(device))) =
            (app_property(m, "ttd"), app_property(m, "device_id"))
        {
            assert_eq!(
                app_property(m, "orig_adapter"),
                Some(SimpleValue::String("hono-http".into()))
            );
            if ttd > 0 {
                missing.retain(|d| **d != device);
            }
        }
        d.settle(Outcome::Accepted);
    }
}

fn device(name: &str) -> Vec<String> {
    vec![name.to_owned()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_response_command_round_trip() {
    let mut s = start().await;
    let mut responses =
        s.broker.subscribe("command_response/t1/app", &SubscribeOptions::default()).unwrap();
    responses.add_credit(10);
    let url = format!("{}/event", s.url);
    let poll =
        tokio::spawn(curl(request("POST", &url, Some("d1@t1:pw1"), "21.5", &["hono-ttd: 10"])));
    ready(&mut s.events, &device("d1")).await;
    let outcome = s
        .broker
        .submit("command/t1", command("d1", "light", "on", Some(("app", "m-1"))), false)
        .outcome()
        .await;
    assert_eq!(outcome, Outcome::Accepted);
    let answer = poll.await.unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.headers.get("hono-command").map(String::as_str), Some("light"));
    assert_eq!(answer.headers.get("content-type").map(String::as_str), Some("text/plain"));
    assert!(!answer.headers.contains_key("hono-cmd-target-device"), "own command");
    assert_eq!(answer.body, "on");
    let request_id = answer.headers.get("hono-cmd-req-id").expect("request/response").clone();

    // The device answers; the application gets status and correlation id.
    let url = format!("{}/command/res/{request_id}?hono-cmd-status=200", s.url);
    let respond = tokio::spawn(curl(request("POST", &url, Some("d1@t1:pw1"), "done", &[])));
    let reply =
        tokio::time::timeout(Duration::from_secs(10), responses.recv()).await.unwrap().unwrap();
    let props = reply.message().properties.clone().unwrap();
    assert_eq!(props.correlation_id, Some(MessageId::String("m-1".into())));
    assert_eq!(app_property(reply.message(), "status"), Some(SimpleValue::Int(200)));
    assert_eq!(app_property(reply.message(), "device_id"), Some(SimpleValue::String("d1".into())));
    reply.settle(Outcome::Accepted);
    assert_eq!(respond.await.unwrap().status, 202);

    // Query parameter form of hono-ttd on telemetry works the same.
    let mut telemetry = s.broker.subscribe("telemetry/t1", &SubscribeOptions::default()).unwrap();
    telemetry.add_credit(10);
    let url = format!("{}/telemetry?hono-ttd=10", s.url);
    let poll = tokio::spawn(curl(request("POST", &url, Some("d1@t1:pw1"), "1", &[])));
    let d = tokio::time::timeout(Duration::from_secs(10), telemetry.recv()).await.unwrap().unwrap();
    d.settle(Outcome::Accepted);
    ready(&mut s.events, &device("d1")).await;
    assert_eq!(
        s.broker.send("command/t1", command("d1", "reset", "", Some(("app", "m-2")))).await,
        Outcome::Accepted
    );
    let answer = poll.await.unwrap();
    assert_eq!(
        (answer.status, answer.headers.get("hono-command").map(String::as_str)),
        (200, Some("reset"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_command_has_no_request_id() {
    let mut s = start().await;
    let url = format!("{}/event", s.url);
    let poll = tokio::spawn(curl(request("POST", &url, Some("d1@t1:pw1"), "x", &["hono-ttd: 10"])));
    ready(&mut s.events, &device("d1")).await;
    assert_eq!(
        s.broker.send("command/t1", command("d1", "blink", "3", None)).await,
        Outcome::Accepted
    );
    let answer = poll.await.unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.headers.get("hono-command").map(String::as_str), Some("blink"));
    assert!(!answer.headers.contains_key("hono-cmd-req-id"), "{answer:?}");
    assert_eq!(answer.body, "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_command_in_time_is_202_and_late_commands_are_released() {
    let s = start().await;
    let url = format!("{}/event", s.url);
    let answer = curl(request("POST", &url, Some("d1@t1:pw1"), "x", &["hono-ttd: 1"])).await;
    assert_eq!(answer.status, 202, "{answer:?}");
    assert!(!answer.headers.contains_key("hono-command"));
    // Nobody polls any more: the application learns at once.
    assert_eq!(
        s.broker.send("command/t1", command("d1", "light", "on", Some(("app", "m")))).await,
        Outcome::Released
    );

    // The client gives up (closes the connection) before its ttd is over: released too.
    let answer = curl({
        let mut args = request("POST", &url, Some("d1@t1:pw1"), "x", &["hono-ttd: 30"]);
        args.extend(["--max-time".into(), "1".into()]);
        args
    })
    .await;
    assert_eq!(answer.status, 0, "curl gave up");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        s.broker.send("command/t1", command("d1", "light", "on", None)).await,
        Outcome::Released
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_polls_for_a_device_and_answers_for_it() {
    let mut s = start().await;
    let mut responses =
        s.broker.subscribe("command_response/t1/app", &SubscribeOptions::default()).unwrap();
    responses.add_credit(10);
    let url = format!("{}/event/t1/child", s.url);
    let poll = tokio::spawn(curl(request("PUT", &url, Some("gw@t1:gwpw"), "x", &["hono-ttd: 10"])));
    ready(&mut s.events, &device("child")).await;
    let outcome =
        s.broker.send("command/t1", command("child", "open", "valve", Some(("app", "g-1")))).await;
    assert_eq!(outcome, Outcome::Accepted);
    let answer = poll.await.unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.headers.get("hono-cmd-target-device").map(String::as_str), Some("child"));
    let request_id = answer.headers.get("hono-cmd-req-id").unwrap().clone();

    let url = format!("{}/command/res/t1/child/{request_id}?hono-cmd-status=204", s.url);
    let respond = tokio::spawn(curl(request("PUT", &url, Some("gw@t1:gwpw"), "", &[])));
    let reply =
        tokio::time::timeout(Duration::from_secs(10), responses.recv()).await.unwrap().unwrap();
    assert_eq!(app_property(reply.message(), "status"), Some(SimpleValue::Int(204)));
    assert_eq!(
        app_property(reply.message(), "device_id"),
        Some(SimpleValue::String("child".into()))
    );
    assert_eq!(
        reply.message().properties.clone().unwrap().correlation_id,
        Some(MessageId::String("g-1".into()))
    );
    reply.settle(Outcome::Accepted);
    assert_eq!(respond.await.unwrap().status, 202);

    // d1 does not list gw in `via`: neither polling nor answering for it.
    let url = format!("{}/event/t1/d1", s.url);
    assert_eq!(
        curl(request("PUT", &url, Some("gw@t1:gwpw"), "x", &["hono-ttd: 1"])).await.status,
        403
    );
    let url = format!("{}/command/res/t1/d1/{request_id}?hono-cmd-status=200", s.url);
    assert_eq!(curl(request("PUT", &url, Some("gw@t1:gwpw"), "", &[])).await.status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_command_responses_get_clear_answers() {
    let s = start().await;
    let id = {
        // A well-formed request id for reply address `app` (no one listening there).
        use ferrule_command_control::RequestId;
        RequestId { correlation_id: MessageId::String("x".into()), reply_id: "app".into() }
            .encode()
            .unwrap()
    };
    let u = &s.url;
    let cases: Vec<(&str, Vec<String>, u16)> = vec![
        (
            "no status",
            request("POST", &format!("{u}/command/res/{id}"), Some("d1@t1:pw1"), "", &[]),
            400,
        ),
        (
            "bad status",
            request(
                "POST",
                &format!("{u}/command/res/{id}?hono-cmd-status=1"),
                Some("d1@t1:pw1"),
                "",
                &[],
            ),
            400,
        ),
        (
            "bad request id",
            request(
                "POST",
                &format!("{u}/command/res/garbage!?hono-cmd-status=200"),
                Some("d1@t1:pw1"),
                "",
                &[],
            ),
            400,
        ),
        (
            "nobody waits",
            request(
                "POST",
                &format!("{u}/command/res/{id}?hono-cmd-status=200"),
                Some("d1@t1:pw1"),
                "",
                &[],
            ),
            503,
        ),
        (
            "status as header",
            request(
                "POST",
                &format!("{u}/command/res/{id}"),
                Some("d1@t1:pw1"),
                "",
                &["hono-cmd-status: 200"],
            ),
            503,
        ),
        (
            "wrong password",
            request(
                "POST",
                &format!("{u}/command/res/{id}?hono-cmd-status=200"),
                Some("d1@t1:no"),
                "",
                &[],
            ),
            401,
        ),
        (
            "no credentials",
            request("POST", &format!("{u}/command/res/{id}?hono-cmd-status=200"), None, "", &[]),
            401,
        ),
        (
            "foreign tenant",
            request(
                "PUT",
                &format!("{u}/command/res/t2/d9/{id}?hono-cmd-status=200"),
                Some("d1@t1:pw1"),
                "",
                &[],
            ),
            403,
        ),
        (
            "wrong method",
            request("GET", &format!("{u}/command/res/{id}"), Some("d1@t1:pw1"), "", &[]),
            405,
        ),
        (
            "too large",
            request(
                "POST",
                &format!("{u}/command/res/{id}?hono-cmd-status=200"),
                Some("d1@t1:pw1"),
                &"x".repeat(65),
                &[],
            ),
            413,
        ),
        (
            "bad hono-ttd",
            request("POST", &format!("{u}/event"), Some("d1@t1:pw1"), "x", &["hono-ttd: soon"]),
            400,
        ),
    ];
    for (name, args, expected) in cases {
        let answer = curl(args).await;
        assert_eq!(answer.status, expected, "{name}: {answer:?}");
        if expected == 503 {
            assert_eq!(answer.headers.get("retry-after").map(String::as_str), Some("1"), "{name}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_command_arrives_with_the_next_poll() {
    let s = start().await;
    let mut deferred = command("d1", "update", "v2", None);
    let mut app = OrderedMap::new();
    app.insert(DEFER_TTL_PROPERTY.to_owned(), SimpleValue::Int(60));
    deferred.application_properties = Some(ApplicationProperties(app));
    assert_eq!(
        s.broker.send("command/t1", deferred).await,
        Outcome::Accepted,
        "kept for the offline device"
    );
    let url = format!("{}/event", s.url);
    let answer = curl(request("POST", &url, Some("d1@t1:pw1"), "x", &["hono-ttd: 10"])).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.headers.get("hono-command").map(String::as_str), Some("update"));
    assert_eq!(answer.body, "v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_polls_each_get_their_own_command() {
    let mut s = start().await;
    let devices: Vec<String> = (0..50).map(|i| format!("p{i}")).collect();
    let polls: Vec<_> = devices
        .iter()
        .map(|d| {
            let url = format!("{}/event", s.url);
            tokio::spawn(curl(request(
                "POST",
                &url,
                Some(&format!("{d}@t1:pw")),
                "x",
                &["hono-ttd: 15"],
            )))
        })
        .collect();
    ready(&mut s.events, &devices).await;
    let sends: Vec<_> = devices
        .iter()
        .map(|d| {
            let broker = s.broker.clone();
            let message = command(d, "set", &format!("for {d}"), Some(("app", d)));
            tokio::spawn(async move { broker.send("command/t1", message).await })
        })
        .collect();
    for send in sends {
        assert_eq!(send.await.unwrap(), Outcome::Accepted);
    }
    for (poll, d) in polls.into_iter().zip(&devices) {
        let answer = poll.await.unwrap();
        assert_eq!(answer.status, 200, "{d}: {answer:?}");
        assert_eq!(answer.body, format!("for {d}"));
    }
}
